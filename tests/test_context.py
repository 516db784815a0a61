"""The request context: entering and leaving it, and where it is seen.

It is a context variable: coroutines and the tasks they start see it, so do
threads it is handed to (``context.wrap``, ``asyncio.to_thread``); code outside
sees none, and a context left is gone.
"""
import asyncio
import threading

import pytest
import tornado.web

from blackgate import component
from blackgate.context import RequestContext, RequestContextMixin, current

WAIT = 5.0


def test_with_makes_the_context_current_and_leaving_it_restores_none():
    assert current() is None
    with component.request_context() as context:
        assert isinstance(context, RequestContext)
        assert current() is context
    assert current() is None


def test_contexts_nest_and_the_outer_one_comes_back():
    with component.request_context() as outer:
        with component.request_context() as inner:
            assert inner is not outer and current() is inner
        assert current() is outer


def test_leaving_the_context_on_an_exception_restores_the_outer_one():
    with pytest.raises(ZeroDivisionError):
        with component.request_context():
            1 / 0
    assert current() is None


def test_async_with_makes_the_context_current_in_the_coroutine():
    async def main():
        async with component.request_context() as context:
            assert current() is context
            await asyncio.sleep(0)
            assert current() is context
        return current()

    assert asyncio.run(main()) is None


def test_tasks_started_inside_see_it_and_concurrent_requests_each_see_their_own():
    async def request(seen):
        async with component.request_context() as context:
            await asyncio.sleep(0)
            task = asyncio.ensure_future(child())
            seen.append((context, await task))

    async def child():
        await asyncio.sleep(0)
        return current()

    async def main():
        seen = []
        await asyncio.gather(request(seen), request(seen))
        return seen

    seen = asyncio.run(main())
    assert len(seen) == 2 and seen[0][0] is not seen[1][0]
    assert all(context is child_saw for context, child_saw in seen)


def test_a_thread_given_the_context_with_wrap_sees_it():
    seen = []
    with component.request_context() as context:
        thread = threading.Thread(target=context.wrap(lambda: seen.append(current())))
        thread.start()
        thread.join(WAIT)
    assert seen == [context]


def test_a_plain_thread_sees_no_context():
    seen = []
    with component.request_context():
        thread = threading.Thread(target=lambda: seen.append(current()))
        thread.start()
        thread.join(WAIT)
    assert seen == [None]


def test_asyncio_to_thread_carries_the_context():
    async def main():
        async with component.request_context() as context:
            return context, await asyncio.to_thread(current)

    context, seen = asyncio.run(main())
    assert seen is context


def test_run_lends_the_context_for_one_call():
    context = component.request_context()
    assert context.run(current) is context
    assert current() is None


def test_request_log_is_none_outside_a_context_and_empty_inside():
    assert component.request_log() is None
    with component.request_context() as context:
        log = component.request_log()
        assert log is context.log and len(log) == 0 and log.commands == ()
        assert str(log) == ''


def test_a_scope_makes_each_entry_once():
    with component.request_context() as context:
        made = []
        first = context.scope.get('x', lambda: made.append(1) or object())
        assert context.scope.get('x', object) is first
        assert made == [1]


# -- Tornado ------------------------------------------------------------------------------

#: the context of every request ContextHandler served
SERVED = []


class ContextHandler(RequestContextMixin, tornado.web.RequestHandler):
    async def get(self):
        await asyncio.sleep(0)
        SERVED.append(self.request_context)
        task_saw = await asyncio.ensure_future(_current_later())
        self.write({'same': task_saw is current() is self.request_context})


async def _current_later():
    await asyncio.sleep(0)
    return current()


class PrepareHandler(RequestContextMixin, tornado.web.RequestHandler):
    def prepare(self):
        super().prepare()
        self.seen_in_prepare = current()

    def get(self):
        self.write({'same': self.seen_in_prepare is current() is self.request_context})


@pytest.fixture
def app():
    return tornado.web.Application([('/context', ContextHandler), ('/prepare', PrepareHandler)])


@pytest.mark.gen_test
async def test_the_mixin_opens_one_context_per_request(http_client, base_url):
    import json
    SERVED.clear()
    bodies = [json.loads((await http_client.fetch(base_url + '/context')).body)
              for _ in range(2)]
    assert bodies == [{'same': True}, {'same': True}]
    assert len(SERVED) == 2 and SERVED[0] is not SERVED[1]
    assert current() is None   # nothing leaked into the test's own context


@pytest.mark.gen_test
async def test_a_handler_that_defines_prepare_calling_super_keeps_its_context(http_client,
                                                                            base_url):
    import json
    body = json.loads((await http_client.fetch(base_url + '/prepare')).body)
    assert body == {'same': True}


def test_a_request_log_keeps_a_thousand_commands_and_counts_the_rest():
    from blackgate import Command
    from blackgate.context import MAX_LOGGED_COMMANDS, RequestLog

    class Quick(Command):
        command_key = 'quick'

        def run(self):
            return 1

    log = RequestLog()
    command = Quick()
    command.execute()
    for _ in range(MAX_LOGGED_COMMANDS + 5):
        log.add(command)
    assert len(log) == MAX_LOGGED_COMMANDS and log.dropped == 5
    assert str(log) == 'quick[SUCCESS][0ms]x%d, ... 5 more' % (MAX_LOGGED_COMMANDS,)


def test_a_command_still_running_shows_as_executed():
    from blackgate import Command
    from blackgate.context import RequestLog

    class NotYet(Command):
        def run(self):
            return 1

    log = RequestLog()
    log.add(NotYet())
    assert str(log) == 'NotYet[Executed][0ms]'
