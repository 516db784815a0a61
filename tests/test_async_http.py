"""``async def run()`` with Tornado's AsyncHTTPClient, paired as the guide says (issue 18, point 10).

Cancelling a timed-out task does not cancel AsyncHTTPClient's fetch: with the
client's defaults (``max_clients`` 10, ``request_timeout`` 20 s) a dozen
timeouts against a stalled upstream kept every client slot taken, and calls to
the recovered upstream went on timing out. The guide's example
(``docs/examples/async_profile.py``) gives the fetch a timeout below the
command's and the client as many slots as the command's semaphore; this runs
it against an upstream that stalls, then recovers. Real time: the fetch's
timeouts are the client's own timers.
"""
import asyncio
import importlib.util
import logging
import pathlib

import tornado.web
from tornado.httpclient import AsyncHTTPClient
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from blackgate import Event

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / 'docs' / 'examples' / 'async_profile.py'

#: Real seconds: the bound on the whole scenario.
WAIT = 20.0


def load_example():
    spec = importlib.util.spec_from_file_location('async_profile', EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Profiles(tornado.web.RequestHandler):
    """Answers a profile, or (while ``stalled``) holds the request until the test ends."""

    async def get(self, user_id):
        state = self.settings['state']
        if state['stalled']:
            await state['release'].wait()
            return
        self.write({'user_id': int(user_id)})


async def stall_then_recover(example, stalled_calls):
    state = {'stalled': True, 'release': asyncio.Event()}
    sockets = bind_sockets(0, '127.0.0.1')
    server = HTTPServer(tornado.web.Application([(r'/users/(\d+)', Profiles)], state=state))
    server.add_sockets(sockets)
    example.GetProfile.base_url = 'http://127.0.0.1:%d' % (sockets[0].getsockname()[1],)
    example.configure_http_client()
    try:
        stalled = [example.GetProfile(n) for n in range(stalled_calls)]
        answers = await asyncio.gather(*[cmd.queue() for cmd in stalled])
        state['stalled'] = False
        recovered = example.GetProfile(7)
        return stalled, answers, recovered, await recovered.queue()
    finally:
        state['release'].set()
        server.stop()
        await server.close_all_connections()
        AsyncHTTPClient().close()
        AsyncHTTPClient.configure(None)   # back to Tornado's defaults for the other tests


def test_after_a_dozen_stalled_calls_the_recovered_upstream_answers_at_once(system_clock,
                                                                              caplog):
    caplog.set_level(logging.ERROR, logger='tornado')
    example = load_example()
    assert example.GetProfile.max_concurrent_requests > 10   # more than the client's default
    stalled, answers, recovered, answer = asyncio.run(
        asyncio.wait_for(stall_then_recover(example, 12), WAIT))
    assert answers == [{}] * 12                              # each answered by its fallback
    assert all(cmd.is_response_from_fallback for cmd in stalled)
    assert answer == {'user_id': 7}
    assert recovered.events == (Event.SUCCESS,)              # not a TIMEOUT waiting for a slot
    cancelled = [r for r in caplog.records if 'after Future was cancelled' in r.getMessage()]
    assert cancelled == []
