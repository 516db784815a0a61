"""The request cache (Hystrix's ``getCacheKey()``): once per key per request context.

A command whose ``cache_key()`` returns a str runs once per key in a context;
the later instances answer the first one's value (or raise its error) with
``RESPONSE_FROM_CACHE`` after its events, and callers arriving while it runs
wait for it instead of running again. Outside any context such a command is
refused; ``request_cache_enabled = False`` turns the cache off.
"""
import asyncio
import threading

import pytest

from blackgate import BadRequest, BlackgateError, Command, CommandError, Event, component
from support import Gate, add_pool

WAIT = 5.0

#: the key of every run() of the commands below, in order
RUNS = []


@pytest.fixture(autouse=True)
def fresh_runs():
    RUNS.clear()
    yield
    RUNS.clear()


class GetPrice(Command):
    command_key = 'get_price'

    def __init__(self, sku, gate=None, clock=None):
        self.sku, self.gate, self.clock = sku, gate, clock

    def cache_key(self):
        return self.sku

    def run(self):
        RUNS.append(self.sku)
        if self.gate is not None:
            self.gate.hold()
        if self.clock is not None:
            self.clock.advance(0.003)   # run() takes 3 ms of FakeClock time
        if self.sku == 'bad':
            raise BadRequest('no such sku')
        if self.sku.startswith('down'):
            raise ConnectionError('price service down')
        return 'price of %s' % (self.sku,)


class GetPriceOrNothing(GetPrice):
    command_key = 'get_price_or_nothing'

    def fallback(self):
        return 'no price'


class GetPriceUncached(GetPrice):
    command_key = 'get_price_uncached'
    request_cache_enabled = False


class GetPriceSometimes(GetPrice):
    command_key = 'get_price_sometimes'

    def cache_key(self):
        return None if self.sku.startswith('fresh') else self.sku


# -- once per key -------------------------------------------------------------------------

def test_the_same_key_runs_once_and_the_later_calls_answer_from_the_cache():
    with component.request_context():
        first, second, third = GetPrice('book'), GetPrice('book'), GetPrice('book')
        assert [c.execute() for c in (first, second, third)] == ['price of book'] * 3
    assert RUNS == ['book']
    assert first.events == (Event.SUCCESS,)
    assert second.events == third.events == (Event.SUCCESS, Event.RESPONSE_FROM_CACHE)
    assert second.is_successful_execution and not second.is_response_from_fallback
    assert second.execution_time is None   # its own run() never ran


def test_other_keys_and_a_none_key_each_run():
    with component.request_context():
        assert GetPrice('book').execute() == 'price of book'
        assert GetPrice('pen').execute() == 'price of pen'
        for _ in range(2):
            assert GetPriceSometimes('fresh-1').execute() == 'price of fresh-1'
    assert RUNS == ['book', 'pen', 'fresh-1', 'fresh-1']


def test_the_same_error_is_raised_again_from_the_cache():
    with component.request_context():
        with pytest.raises(CommandError) as first:
            GetPrice('down').execute()
        again = GetPrice('down')
        with pytest.raises(CommandError) as second:
            again.execute()
    assert second.value is first.value
    assert again.events == (Event.FAILURE, Event.FALLBACK_MISSING, Event.RESPONSE_FROM_CACHE)
    assert isinstance(again.execution_exception, ConnectionError)
    assert RUNS == ['down']


def test_a_bad_request_is_raised_again_as_it_was():
    with component.request_context():
        with pytest.raises(BadRequest) as first:
            GetPrice('bad').execute()
        with pytest.raises(BadRequest) as second:
            GetPrice('bad').execute()
    assert second.value is first.value and RUNS == ['bad']


def test_a_fallback_value_is_cached_too():
    with component.request_context():
        assert GetPriceOrNothing('down').execute() == 'no price'
        again = GetPriceOrNothing('down')
        assert again.execute() == 'no price'
    assert again.events == (Event.FAILURE, Event.FALLBACK_SUCCESS, Event.RESPONSE_FROM_CACHE)
    assert again.is_response_from_fallback
    assert RUNS == ['down']


def test_contexts_do_not_share_their_caches():
    for _ in range(2):
        with component.request_context():
            assert GetPrice('book').execute() == 'price of book'
            assert GetPrice('book').execute() == 'price of book'
    with component.request_context():
        with component.request_context():
            GetPrice('book').execute()
        GetPrice('book').execute()   # the outer context has not seen it
    assert RUNS == ['book'] * 4


def test_command_keys_do_not_share_a_cache_key():
    with component.request_context():
        GetPrice('book').execute()
        GetPriceOrNothing('book').execute()
    assert RUNS == ['book', 'book']


# -- at the same time ---------------------------------------------------------------------

def test_threads_asking_while_the_first_runs_wait_for_it_and_share_its_answer(clock):
    gate = Gate()
    results = []

    def ask():
        results.append(GetPrice('book', gate).execute())

    with component.request_context() as context:
        threads = [threading.Thread(target=context.wrap(ask), daemon=True) for _ in range(4)]
        for thread in threads:
            thread.start()
        gate.wait_entered()
        assert clock.wait_for_waiters(4, WAIT)   # the first waits for run(), three for it
        gate.open()
        for thread in threads:
            thread.join(WAIT)
    assert results == ['price of book'] * 4
    assert RUNS == ['book']


@pytest.mark.gen_test
async def test_queue_calls_made_while_the_first_runs_share_its_future(clock):
    gate = Gate()
    async with component.request_context():
        first = GetPrice('book', gate).queue()
        later = [GetPrice('book', gate).queue() for _ in range(3)]
        assert all(future is not first for future in later)
        await asyncio.get_running_loop().run_in_executor(None, gate.wait_entered)
        assert not any(future.done() for future in later)
        gate.open()
        answers = await asyncio.wait_for(asyncio.gather(first, *later), WAIT)
    assert answers == ['price of book'] * 4
    assert RUNS == ['book']


@pytest.mark.gen_test
async def test_cancelling_one_callers_future_leaves_the_others_their_answer(clock):
    gate = Gate()
    async with component.request_context():
        first = GetPrice('book', gate).queue()
        second = GetPrice('book', gate).queue()
        first.cancel()
        gate.open()
        assert await asyncio.wait_for(second, WAIT) == 'price of book'
        assert await GetPrice('book').queue() == 'price of book'
    assert RUNS == ['book']


@pytest.mark.gen_test
async def test_the_cache_follows_tasks_and_threads_of_the_context(clock):
    async with component.request_context():
        assert await GetPrice('book').queue() == 'price of book'
        in_task = await asyncio.ensure_future(GetPrice('book').queue())
        in_thread = GetPrice('book')
        assert await asyncio.to_thread(in_thread.execute) == 'price of book'
    assert in_task == 'price of book'
    assert in_thread.events == (Event.SUCCESS, Event.RESPONSE_FROM_CACHE)
    assert RUNS == ['book']


# -- outside a context, and turned off -----------------------------------------------------

def test_outside_any_context_a_cached_command_is_refused_with_the_fixes():
    command = GetPrice('book')
    with pytest.raises(BlackgateError) as caught:
        command.execute()
    message = str(caught.value)
    assert 'get_price' in message and "'book'" in message
    assert 'component.request_context()' in message and 'request_cache_enabled' in message
    assert RUNS == []
    with component.request_context():   # refused before it ran: the instance is still good
        assert command.execute() == 'price of book'


@pytest.mark.gen_test
async def test_outside_any_context_queue_is_refused_too():
    with pytest.raises(BlackgateError, match='outside any request context'):
        GetPrice('book').queue()


def test_a_none_key_needs_no_context():
    assert GetPriceSometimes('fresh').execute() == 'price of fresh'


def test_request_cache_enabled_false_runs_every_call_and_needs_no_context():
    assert GetPriceUncached('book').execute() == 'price of book'
    with component.request_context():
        GetPriceUncached('book').execute()
        GetPriceUncached('book').execute()
    assert RUNS == ['book'] * 3


def test_request_cache_enabled_can_be_turned_off_without_code_changes():
    component.add('command', {'command_key': 'get_price', 'request_cache_enabled': False})
    component.install()
    with component.request_context():
        GetPrice('book').execute()
        GetPrice('book').execute()
    assert RUNS == ['book', 'book']


def test_a_cache_key_that_is_not_a_string_is_refused_naming_what_it_returned():
    class Numbered(GetPrice):
        def cache_key(self):
            return 42

    with component.request_context():
        with pytest.raises(TypeError, match=r'Numbered.cache_key\(\) returned 42 \(int\)'):
            Numbered('book').execute()
    assert RUNS == []


# -- counted -------------------------------------------------------------------------------

def test_hits_are_counted_apart_and_do_not_move_the_breakers_counts():
    with component.request_context():
        for _ in range(3):
            GetPrice('book').execute()
    metrics = component.metrics('get_price')
    assert metrics.rolling_count(Event.RESPONSE_FROM_CACHE) == 2
    assert metrics.rolling_count(Event.SUCCESS) == 1
    assert metrics.health().total_requests == 1


def test_a_listener_hears_of_each_hit():
    heard = []

    class Listener:
        def on_event(self, command_key, event):
            heard.append((command_key, event))

    component.add_listener(Listener())
    with component.request_context():
        GetPrice('book').execute()
        GetPrice('book').execute()
    assert heard == [('get_price', Event.SUCCESS), ('get_price', Event.RESPONSE_FROM_CACHE)]


def test_the_stream_counts_responses_from_cache_and_says_the_cache_is_on():
    from blackgate.web import command_sample
    with component.request_context():
        for _ in range(4):
            GetPrice('book').execute()
    sample = command_sample('get_price')
    assert sample['rollingCountResponsesFromCache'] == 3
    assert sample['rollingCountSuccess'] == 1 and sample['requestCount'] == 1
    assert sample['propertyValue_requestCacheEnabled'] is True
    assert sample['propertyValue_requestLogEnabled'] is True


def test_prometheus_counts_responses_from_cache():
    prometheus_client = pytest.importorskip('prometheus_client')
    from prometheus_client.parser import text_string_to_metric_families

    from blackgate.prometheus import register
    with component.request_context():
        for _ in range(3):
            GetPrice('book').execute()
    registry = prometheus_client.CollectorRegistry()
    register(registry)
    text = prometheus_client.generate_latest(registry).decode()
    found = {(s.name, s.labels.get('command')): s.value
             for family in text_string_to_metric_families(text) for s in family.samples}
    assert found[('blackgate_command_responses_from_cache_total', 'get_price')] == 2
    successful = [s.value for family in text_string_to_metric_families(text)
                  for s in family.samples if s.name == 'blackgate_command_calls_total'
                  and s.labels == {'command': 'get_price', 'group': 'default',
                                   'kind': 'successful'}]
    assert successful == [1]


# -- the request log -----------------------------------------------------------------------

def test_the_request_log_lists_the_commands_with_their_events_and_times(clock):
    with component.request_context():
        GetPrice('book', clock=clock).execute()
        GetPrice('book', clock=clock).execute()
        GetPrice('book', clock=clock).execute()
        GetPriceOrNothing('down', clock=clock).execute()
        log = component.request_log()
    assert [type(c).__name__ for c in log.commands] == ['GetPrice'] * 3 + ['GetPriceOrNothing']
    assert str(log) == ('get_price[SUCCESS][3ms], get_price[SUCCESS, RESPONSE_FROM_CACHE][0ms]x2, '
                        'get_price_or_nothing[FAILURE, FALLBACK_SUCCESS][3ms]')


def test_commands_without_a_cache_key_are_logged_too():
    with component.request_context():
        GetPriceUncached('pen').execute()
        assert [c.sku for c in component.request_log()] == ['pen']


# -- commands started from run() ------------------------------------------------------------

class GetBasket(Command):
    command_key = 'get_basket'

    def __init__(self, skus):
        self.skus = skus

    def run(self):   # on a pool worker: the commands it starts are in the caller's context
        return [GetPrice(sku).execute() for sku in self.skus]


def test_commands_started_from_a_run_on_a_worker_share_the_callers_context():
    with component.request_context():
        assert GetBasket(['book', 'pen', 'book']).execute() == [
            'price of book', 'price of pen', 'price of book']
        assert GetPrice('pen').execute() == 'price of pen'
        log = component.request_log()
    assert RUNS == ['book', 'pen']
    assert [type(c).__name__ for c in log.commands] == ['GetBasket'] + ['GetPrice'] * 4


@pytest.mark.gen_test
async def test_a_queued_commands_run_on_a_worker_shares_the_context_too(clock):
    async with component.request_context():
        assert await GetBasket(['book', 'book']).queue() == ['price of book'] * 2
        assert await GetPrice('book').queue() == 'price of book'
    assert RUNS == ['book']


def test_a_worker_is_left_without_the_context_once_run_returns():
    from blackgate.context import current
    add_pool('solo', 1)
    seen = []

    class Look(Command):
        group_key = 'solo'

        def run(self):
            seen.append(current())

    with component.request_context() as context:
        Look().execute()
    Look().execute()   # the same worker thread, outside any context
    assert seen == [context, None]


# -- traced -----------------------------------------------------------------------------------

def test_under_tracing_the_first_call_and_each_hit_get_a_span_and_run_once():
    pytest.importorskip('opentelemetry.sdk')
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    component.set('tracing', {'backend': 'otel', 'tracer_provider': provider})
    component.install()
    with component.request_context():
        assert [GetPrice('book').execute() for _ in range(3)] == ['price of book'] * 3
        assert len(component.request_log()) == 3
    assert RUNS == ['book']
    events = [span.attributes.get('blackgate.events') for span in exporter.get_finished_spans()]
    assert len(events) == 3
    assert sum('RESPONSE_FROM_CACHE' in str(found) for found in events) == 2
