"""The Hystrix metrics stream (blackgate.web.MetricsStreamHandler), read as the dashboard reads it.

Each test serves ``routes()`` on 127.0.0.1 and reads the stream with a small
client that speaks HTTP/1.1 (chunked) and parses Server-Sent Events the way a
browser's EventSource does: lines ``field: value``, an event ends at a blank
line, ``data`` is what the dashboard's ``onmessage`` gets, and anything else
(Hystrix's ``ping:``) is a keep-alive the browser ignores.

The metrics follow the FakeClock of conftest.py (a ``run()`` that advances it
takes exactly that long); the stream's own timing is the IOLoop's, in real
milliseconds, kept short.
"""
import asyncio
import gc
import json
import weakref

import pytest
import tornado.web
from tornado.tcpclient import TCPClient

from blackgate import BadRequest, Command, component
from blackgate.web import DashboardHandler, MetricsStreamHandler, routes
from support import Gate, Lookup

#: Real seconds: the longest a test waits for the stream before it fails.
WAIT = 5.0

# The fields the Netflix Hystrix dashboard reads for a command: validateData() of
# hystrix-dashboard/.../hystrixCommand/hystrixCommand.js (an event missing one is
# dropped with "Key Missing"), and what its templates hystrixCircuit.html and
# hystrixCircuitContainer.html show.
DASHBOARD_COMMAND_FIELDS = (
    'reportingHosts', 'type', 'name', 'group', 'isCircuitBreakerOpen', 'errorPercentage',
    'errorCount', 'requestCount', 'rollingCountCollapsedRequests',
    'rollingCountExceptionsThrown', 'rollingCountFailure', 'rollingCountFallbackFailure',
    'rollingCountFallbackRejection', 'rollingCountFallbackSuccess',
    'rollingCountResponsesFromCache', 'rollingCountSemaphoreRejected',
    'rollingCountShortCircuited', 'rollingCountSuccess', 'rollingCountThreadPoolRejected',
    'rollingCountTimeout', 'rollingCountBadRequests', 'currentConcurrentExecutionCount',
    'latencyExecute_mean', 'latencyExecute', 'latencyTotal_mean', 'latencyTotal',
    'propertyValue_circuitBreakerRequestVolumeThreshold',
    'propertyValue_circuitBreakerSleepWindowInMilliseconds',
    'propertyValue_circuitBreakerErrorThresholdPercentage',
    'propertyValue_circuitBreakerForceOpen', 'propertyValue_circuitBreakerForceClosed',
    'propertyValue_executionIsolationStrategy',
    'propertyValue_executionIsolationThreadTimeoutInMilliseconds',
    'propertyValue_executionIsolationThreadInterruptOnTimeout',
    'propertyValue_executionIsolationSemaphoreMaxConcurrentRequests',
    'propertyValue_fallbackIsolationSemaphoreMaxConcurrentRequests',
    'propertyValue_requestCacheEnabled', 'propertyValue_requestLogEnabled',
    'propertyValue_metricsRollingStatisticalWindowInMilliseconds',
    'currentTime',
)
#: The keys of latencyExecute and latencyTotal (the templates read '50', '90', '99', '99.5').
LATENCY_KEYS = ('0', '25', '50', '75', '90', '95', '99', '99.5', '100')

# The fields it reads for a thread pool: validateData() of hystrixThreadPool.js and the
# template hystrixThreadPool.html (plus rollingCountCommandRejections, which Hystrix's
# own stream sends).
DASHBOARD_POOL_FIELDS = (
    'type', 'name', 'currentActiveCount', 'currentCompletedTaskCount', 'currentCorePoolSize',
    'currentLargestPoolSize', 'currentMaximumPoolSize', 'currentPoolSize', 'currentQueueSize',
    'currentTaskCount', 'rollingCountThreadsExecuted', 'rollingMaxActiveThreads',
    'reportingHosts', 'propertyValue_queueSizeRejectionThreshold',
    'propertyValue_metricsRollingStatisticalWindowInMilliseconds',
    'rollingCountCommandRejections', 'currentTime',
)


# -- a stream client -----------------------------------------------------------------------

class StreamClient:
    """An HTTP/1.1 client of one event stream, parsing events as EventSource does."""

    def __init__(self, port):
        self.port = port
        self.status = None
        self.headers = {}
        self.raw = b''          # the body as received, chunk framing removed
        self._buffer = ''
        self._events = []       # ('data', text) or ('ping', '') in arrival order

    async def open(self, path):
        self.stream = await TCPClient().connect('127.0.0.1', self.port)
        self.stream.write(('GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n'
                           'Accept: text/event-stream\r\n\r\n' % (path, self.port)).encode())
        head = (await self.stream.read_until(b'\r\n\r\n')).decode('latin-1')
        lines = head.split('\r\n')
        self.status = int(lines[0].split()[1])
        for line in lines[1:]:
            if ':' in line:
                name, value = line.split(':', 1)
                self.headers[name.strip().lower()] = value.strip()
        return self

    async def body(self):
        """The whole body of a response with a Content-Length (errors)."""
        return (await self.stream.read_bytes(int(self.headers['content-length']))).decode()

    async def _read_chunk(self):
        size = int((await self.stream.read_until(b'\r\n')).strip(), 16)
        chunk = await self.stream.read_bytes(size + 2)
        self.raw += chunk[:-2]
        self._parse(chunk[:-2].decode('utf-8'))

    def _parse(self, text):
        self._buffer += text
        while '\n\n' in self._buffer:
            block, self._buffer = self._buffer.split('\n\n', 1)
            data = []
            for line in block.split('\n'):
                field, _, value = line.partition(':')
                if value.startswith(' '):
                    value = value[1:]
                if field == 'data':
                    data.append(value)
                elif field == 'ping':
                    self._events.append(('ping', value))
            if data:
                self._events.append(('data', '\n'.join(data)))

    async def next_event(self):
        while not self._events:
            await asyncio.wait_for(self._read_chunk(), WAIT)
        return self._events.pop(0)

    async def next_data(self):
        """The next event the dashboard's onmessage would get, parsed as JSON."""
        while True:
            kind, value = await self.next_event()
            if kind == 'data':
                return json.loads(value)

    async def sample(self, name, type_='HystrixCommand'):
        """The next event about ``name``."""
        while True:
            data = await self.next_data()
            if data['type'] == type_ and data['name'] == name:
                return data

    async def fresh_sample(self, name, type_='HystrixCommand'):
        """An event about ``name`` sampled after this call: skip what was already sent."""
        await self.sample(name, type_)
        return await self.sample(name, type_)

    def close(self):
        self.stream.close()


@pytest.fixture
def app():
    return tornado.web.Application(routes('/blackgate'))


@pytest.fixture
def port(http_server, http_port):
    return http_port


@pytest.fixture
def streams(port):
    """Open stream clients; all closed at teardown."""
    opened = []

    async def open_stream(path='/blackgate/hystrix.stream?delay=20'):
        client = await StreamClient(port).open(path)
        opened.append(client)
        return client

    yield open_stream
    for client in opened:
        client.close()


async def until(condition, timeout=WAIT):
    """Wait (polling the loop) until ``condition()`` is true; fail after ``timeout`` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, 'timed out waiting for the stream'
        await asyncio.sleep(0.005)


@pytest.fixture(autouse=True)
def no_stream_left_behind():
    """After each test (and its server's teardown) no stream is still being served."""
    yield
    left = set(MetricsStreamHandler._streams)
    MetricsStreamHandler._streams.clear()   # so that one failure does not cascade
    assert not left, 'streams still served after the test: %r' % (left,)


# -- commands with known behaviour ---------------------------------------------------------

class Search(Command):
    command_key = 'search'

    async def run(self):
        return 'hits'


class Sick(Command):
    group_key = 'lookups'
    command_key = 'sick'
    circuit_breaker_request_volume_threshold = 2
    metrics_health_snapshot_interval = 0

    def run(self):
        raise ConnectionError('upstream down')


class HeldLookup(Command):
    group_key = 'tight'
    command_key = 'held'

    def __init__(self, gate):
        self.gate = gate

    def run(self):
        self.gate.hold()
        return 'late'

    def fallback(self):
        return 'stale'


def add_pool(group_key, max_workers, max_queue_size=0):
    component.add('executor_pool', {'group_key': group_key, 'max_workers': max_workers,
                                    'max_queue_size': max_queue_size})


# -- the response --------------------------------------------------------------------------

@pytest.mark.gen_test
async def test_stream_is_an_event_stream_that_opens_with_a_ping(streams):
    stream = await streams()
    assert stream.status == 200
    assert stream.headers['content-type'] == 'text/event-stream;charset=UTF-8'
    assert stream.headers['cache-control'] == 'no-cache, no-store, max-age=0, must-revalidate'
    assert stream.headers['transfer-encoding'] == 'chunked'
    assert await stream.next_event() == ('ping', '')
    assert stream.raw.startswith(b'ping: \n\n')


@pytest.mark.gen_test
async def test_without_commands_or_pools_the_stream_sends_pings_every_delay(streams):
    stream = await streams('/blackgate/hystrix.stream?delay=20')
    kinds = [(await stream.next_event())[0] for _ in range(4)]
    assert kinds == ['ping'] * 4
    assert stream.raw == b'ping: \n\n' * 4


@pytest.mark.gen_test
async def test_each_event_is_one_data_line_of_json(streams, clock):
    add_pool('lookups', 2)
    component.install()
    await Lookup(clock).queue()
    stream = await streams()
    await stream.sample('lookup')
    events = stream.raw.decode().split('\n\n')
    data = [event for event in events if event.startswith('data: ')]
    assert data
    for event in data:
        assert '\n' not in event
        json.loads(event[len('data: '):])


# -- a command, field by field ---------------------------------------------------------------

@pytest.mark.gen_test
async def test_command_event_has_every_field_the_hystrix_dashboard_reads(streams, clock):
    add_pool('lookups', 4)
    component.install()
    for _ in range(6):
        assert await Lookup(clock, 0.02).queue() == 'fresh'
    for _ in range(3):
        assert await Lookup(clock, 0.04, fail=True).queue() == 'stale'
    with pytest.raises(BadRequest):
        await Lookup(clock, 0.01, bad=True).queue()

    data = await (await streams()).sample('lookup')

    missing = [field for field in DASHBOARD_COMMAND_FIELDS if data.get(field) is None]
    assert missing == []
    assert sorted(data['latencyExecute']) == sorted(LATENCY_KEYS)
    assert sorted(data['latencyTotal']) == sorted(LATENCY_KEYS)
    assert data['type'] == 'HystrixCommand'
    assert data['name'] == 'lookup'
    assert data['group'] == 'lookups'
    assert data['threadPool'] == 'lookups'
    assert data['reportingHosts'] == 1
    assert data['currentTime'] == int(round(clock.wall() * 1000))
    assert data['isCircuitBreakerOpen'] is False
    assert data['circuitBreakerState'] == 'closed'
    # 9 requests (bad requests are not requests for the breaker), 3 of them errors
    assert data['requestCount'] == 9
    assert data['errorCount'] == 3
    assert data['errorPercentage'] == 33
    assert data['rollingCountSuccess'] == 6
    assert data['rollingCountFailure'] == 3
    assert data['rollingCountBadRequests'] == 1
    assert data['rollingCountFallbackSuccess'] == 3
    assert data['currentConcurrentExecutionCount'] == 0
    assert data['rollingMaxConcurrentExecutionCount'] == 1   # one call at a time
    assert data['rollingCountExceptionsThrown'] == 1   # the bad request raised to its caller
    for field in ('rollingCountTimeout', 'rollingCountShortCircuited',
                  'rollingCountThreadPoolRejected', 'rollingCountSemaphoreRejected',
                  'rollingCountFallbackFailure', 'rollingCountFallbackRejection',
                  'rollingCountFallbackMissing',
                  'rollingCountResponsesFromCache', 'rollingCountCollapsedRequests',
                  'currentConcurrentExecutionCount'):
        assert data[field] == 0, field


@pytest.mark.gen_test
async def test_latencies_are_whole_milliseconds_of_run_and_of_the_whole_call(streams, clock):
    add_pool('lookups', 4)
    component.install()
    for _ in range(8):
        await Lookup(clock, 0.010).queue()
    for _ in range(2):
        await Lookup(clock, 0.080).queue()

    data = await (await streams()).sample('lookup')

    execute = data['latencyExecute']
    assert all(isinstance(value, int) for value in execute.values())
    # A histogram bin is read at its middle, within 2.2% of the true time; then rounded.
    near = lambda value, ms: abs(value - ms) <= ms * (2 ** (1 / 32) - 1) + 0.5  # noqa: E731
    assert all(near(execute[p], 10) for p in ('0', '25', '50', '75'))
    assert all(near(execute[p], 80) for p in ('90', '99', '99.5', '100'))
    assert near(data['latencyExecute_mean'], 24)          # (8 * 10 + 2 * 80) / 10
    # run() is the whole call here: the FakeClock moves only inside it
    assert data['latencyTotal'] == execute
    assert data['latencyTotal_mean'] == data['latencyExecute_mean']


@pytest.mark.gen_test
async def test_command_event_shows_the_configuration_in_hystrix_units(streams, clock):
    add_pool('lookups', 4)
    component.add('command', {'command_key': 'lookup', 'timeout': 0.25,
                              'circuit_breaker_request_volume_threshold': 7,
                              'circuit_breaker_error_threshold_percentage': 40,
                              'circuit_breaker_sleep_window': 2.5,
                              'circuit_breaker_force_closed': True,
                              'metrics_rolling_window': 20.0,
                              'max_concurrent_requests': 3,
                              'fallback_max_concurrent_requests': 4})
    component.install()
    await Lookup(clock).queue()
    await Search().queue()

    stream = await streams()
    data = await stream.sample('lookup')
    assert data['propertyValue_executionIsolationStrategy'] == 'THREAD'
    assert data['propertyValue_executionIsolationThreadTimeoutInMilliseconds'] == 250
    assert data['propertyValue_executionTimeoutInMilliseconds'] == 250
    assert data['propertyValue_circuitBreakerRequestVolumeThreshold'] == 7
    assert data['propertyValue_circuitBreakerErrorThresholdPercentage'] == 40
    assert data['propertyValue_circuitBreakerSleepWindowInMilliseconds'] == 2500
    assert data['propertyValue_circuitBreakerForceClosed'] is True
    assert data['propertyValue_circuitBreakerForceOpen'] is False
    assert data['propertyValue_circuitBreakerEnabled'] is True
    assert data['propertyValue_metricsRollingStatisticalWindowInMilliseconds'] == 20000
    assert data['propertyValue_executionIsolationSemaphoreMaxConcurrentRequests'] == 3
    assert data['propertyValue_fallbackIsolationSemaphoreMaxConcurrentRequests'] == 4
    # Python cannot interrupt a thread; no cache_key(), so no request cache; every
    # command started in a request context is in its request log
    assert data['propertyValue_executionIsolationThreadInterruptOnTimeout'] is False
    assert data['propertyValue_requestCacheEnabled'] is False
    assert data['propertyValue_requestLogEnabled'] is True
    search = await stream.sample('search')
    assert search['propertyValue_executionIsolationStrategy'] == 'SEMAPHORE'
    assert search['rollingCountSuccess'] == 1


@pytest.mark.gen_test
async def test_an_open_breaker_shows_open_with_its_short_circuits(streams, clock):
    add_pool('lookups', 4)
    component.install()
    for _ in range(2):
        with pytest.raises(Exception):
            await Sick().queue()
    with pytest.raises(Exception):
        await Sick().queue()          # short-circuited, no fallback

    data = await (await streams()).sample('sick')
    assert data['isCircuitBreakerOpen'] is True
    assert data['circuitBreakerState'] == 'open'
    assert data['rollingCountFailure'] == 2
    assert data['rollingCountShortCircuited'] == 1
    assert data['rollingCountFallbackMissing'] == 3
    assert data['rollingCountExceptionsThrown'] == 3   # three CommandErrors reached the caller
    assert data['errorPercentage'] == 100


@pytest.mark.gen_test
async def test_a_half_open_breaker_is_open_for_hystrix_and_half_open_for_blackgate(streams,
                                                                                   clock):
    add_pool('lookups', 4)
    component.install()
    for _ in range(2):
        with pytest.raises(Exception):
            await Sick().queue()
    gate = Gate()
    try:
        breaker = component.circuit_breaker('sick')
        clock.advance(5.0)           # sleep window over: the next call is the one trial
        trial = asyncio.ensure_future(_trial_through_gate(gate))
        await until(gate.entered.is_set)
        assert breaker.state.value == 'half_open'
        data = await (await streams()).fresh_sample('sick')
        assert data['isCircuitBreakerOpen'] is True
        assert data['circuitBreakerState'] == 'half_open'
    finally:
        gate.opened.set()
    with pytest.raises(Exception):
        await trial


class SickHeld(Command):
    group_key = 'lookups'
    command_key = 'sick'
    circuit_breaker_request_volume_threshold = 2
    metrics_health_snapshot_interval = 0

    def __init__(self, gate):
        self.gate = gate

    def run(self):
        self.gate.hold()
        raise ConnectionError('still down')


async def _trial_through_gate(gate):
    return await SickHeld(gate).queue()


@pytest.mark.gen_test
async def test_counts_follow_the_rolling_window(streams, clock):
    add_pool('lookups', 4)
    component.install()
    await Lookup(clock).queue()
    stream = await streams()
    assert (await stream.sample('lookup'))['rollingCountSuccess'] == 1
    clock.advance(11.0)               # the default window is 10 s
    await until(lambda: component.metrics('lookup').rolling_count('SUCCESS') == 0)
    assert (await stream.fresh_sample('lookup'))['rollingCountSuccess'] == 0


# -- a pool, field by field ----------------------------------------------------------------

@pytest.mark.gen_test
async def test_pool_event_has_every_field_the_hystrix_dashboard_reads(streams, clock):
    add_pool('tight', max_workers=2, max_queue_size=1)
    component.install()
    gates = [Gate() for _ in range(3)]
    try:
        held = [asyncio.ensure_future(HeldLookup(gate).queue()) for gate in gates]
        await until(lambda: gates[0].entered.is_set() and gates[1].entered.is_set())
        assert await HeldLookup(Gate()).queue() == 'stale'      # 2 busy, 1 queued: rejected
        stream = await streams()
        data = await stream.sample('tight', 'HystrixThreadPool')
        missing = [field for field in DASHBOARD_POOL_FIELDS if data.get(field) is None]
        assert missing == []
        assert data['type'] == 'HystrixThreadPool'
        assert data['name'] == 'tight'
        assert data['reportingHosts'] == 1
        assert data['currentActiveCount'] == 2
        assert data['currentQueueSize'] == 1
        assert data['currentCorePoolSize'] == data['currentMaximumPoolSize'] == 2
        assert data['currentPoolSize'] == data['currentLargestPoolSize'] == 2
        assert data['propertyValue_queueSizeRejectionThreshold'] == 1
        assert data['propertyValue_metricsRollingStatisticalWindowInMilliseconds'] == 10000
        assert data['rollingMaxActiveThreads'] == 2
        assert data['rollingCountCommandRejections'] == 1
        assert data['currentCompletedTaskCount'] == 0
        assert data['currentTaskCount'] == 3
        assert data['rollingCountThreadsExecuted'] == 0
    finally:
        for gate in gates:
            gate.opened.set()
    assert [await future for future in held] == ['late'] * 3

    data = await stream.fresh_sample('tight', 'HystrixThreadPool')
    assert data['currentActiveCount'] == 0
    assert data['currentQueueSize'] == 0
    assert data['currentCompletedTaskCount'] == 3
    assert data['currentTaskCount'] == 3
    assert data['rollingCountThreadsExecuted'] == 3
    assert data['rollingMaxActiveThreads'] == 2
    assert data['currentPoolSize'] == data['currentLargestPoolSize'] == 2


# -- Java Hystrix 1.5's values ---------------------------------------------------------------
# rollingCountExceptionsThrown sums, over the window, the events of Hystrix's
# EXCEPTION_PRODUCING_EVENT_TYPES: BAD_REQUEST, FALLBACK_FAILURE, FALLBACK_DISABLED
# (our FALLBACK_MISSING), FALLBACK_MISSING and FALLBACK_REJECTION. A pool's
# rollingMaxActiveThreads is the rolling maximum (over the window, bucket by bucket) of
# the concurrency each of its commands had as it started. currentPoolSize and
# currentLargestPoolSize are the executor's threads.

class Picky(Command):
    group_key = 'lookups'
    command_key = 'picky'

    def __init__(self, outcome):
        self.outcome = outcome

    def run(self):
        if self.outcome == 'bad':
            raise BadRequest('no such id')
        raise ConnectionError('upstream down')

    def fallback(self):
        if self.outcome == 'fallback fails':
            raise LookupError('no cached copy either')
        return 'stale'


@pytest.mark.gen_test
async def test_exceptions_thrown_counts_bad_requests_and_failed_or_missing_fallbacks(streams,
                                                                                    clock):
    add_pool('lookups', 4)
    component.install()
    for outcome in ('bad', 'bad', 'fallback fails'):
        with pytest.raises(Exception):
            await Picky(outcome).queue()
    assert await Picky('fails').queue() == 'stale'       # fell back: nothing thrown
    for _ in range(2):
        with pytest.raises(Exception):
            await Sick().queue()                          # no fallback: FALLBACK_MISSING

    stream = await streams()
    picky = await stream.sample('picky')
    assert (picky['rollingCountBadRequests'], picky['rollingCountFallbackFailure'],
            picky['rollingCountFallbackSuccess']) == (2, 1, 1)
    assert picky['rollingCountExceptionsThrown'] == 2 + 1
    sick = await stream.sample('sick')
    assert sick['rollingCountExceptionsThrown'] == 2
    clock.advance(11.0)                                    # out of the 10 s window
    assert (await stream.fresh_sample('picky'))['rollingCountExceptionsThrown'] == 0


@pytest.mark.gen_test
async def test_pool_size_is_the_threads_started_and_max_active_rolls_with_the_window(streams,
                                                                                    clock):
    add_pool('tight', max_workers=6)
    component.install()
    gates = [Gate() for _ in range(4)]
    try:
        held = [asyncio.ensure_future(HeldLookup(gate).queue()) for gate in gates]
        await until(lambda: all(gate.entered.is_set() for gate in gates))
        stream = await streams()
        data = await stream.sample('tight', 'HystrixThreadPool')
        assert data['currentCorePoolSize'] == data['currentMaximumPoolSize'] == 6
        assert data['currentPoolSize'] == data['currentLargestPoolSize'] == 4
        assert data['currentActiveCount'] == 4
        assert data['rollingMaxActiveThreads'] == 4
    finally:
        for gate in gates:
            gate.opened.set()
    assert [await future for future in held] == ['late'] * 4
    clock.advance(3.0)
    opened = Gate()
    opened.open()
    assert await HeldLookup(opened).queue() == 'late'      # alone, 3 s later
    data = await stream.fresh_sample('tight', 'HystrixThreadPool')
    assert data['rollingMaxActiveThreads'] == 4            # the four are still in the window
    clock.advance(8.0)                                     # they have left it; the one has not
    data = await stream.fresh_sample('tight', 'HystrixThreadPool')
    assert data['rollingMaxActiveThreads'] == 1
    assert data['currentPoolSize'] == data['currentLargestPoolSize'] == 4
    assert data['currentActiveCount'] == 0


async def one_round(stream, first):
    """(type, name) of every event of one sample, which starts with the command ``first``."""
    await stream.fresh_sample(first)
    names = [('HystrixCommand', first)]
    while True:
        data = await stream.next_data()
        if (data['type'], data['name']) == names[0]:
            return names
        names.append((data['type'], data['name']))


@pytest.mark.gen_test
async def test_a_pool_is_streamed_only_once_work_was_submitted_to_it(streams, clock):
    add_pool('lookups', 4)
    add_pool('spare', 2)
    component.install()
    await Search().queue()                                 # async def run(): no pool
    stream = await streams()
    assert await one_round(stream, 'search') == [('HystrixCommand', 'search')]
    await Lookup(clock).queue()
    assert await one_round(stream, 'lookup') == [
        ('HystrixCommand', 'lookup'), ('HystrixCommand', 'search'),
        ('HystrixThreadPool', 'lookups')]                  # not 'spare', nor 'default'


@pytest.mark.gen_test
async def test_every_pool_is_streamed_after_every_command(streams, clock):
    add_pool('lookups', 4)
    add_pool('tight', 1)
    component.install()
    await Lookup(clock).queue()
    await Search().queue()
    stream = await streams()
    order = []
    while len(order) < 3:
        data = await stream.next_data()
        order.append((data['type'], data['name']))
    assert order == [('HystrixCommand', 'lookup'), ('HystrixCommand', 'search'),
                     ('HystrixThreadPool', 'lookups')]   # 'tight' and 'default' ran nothing


# -- delay, client limit, clean-up -----------------------------------------------------------

@pytest.mark.gen_test
async def test_samples_come_every_delay_milliseconds(streams, clock):
    add_pool('lookups', 4)
    component.install()
    await Lookup(clock).queue()
    loop = asyncio.get_running_loop()

    fast = await streams('/blackgate/hystrix.stream?delay=20')
    await fast.sample('lookup')
    started = loop.time()
    for _ in range(5):
        await fast.sample('lookup')
    assert loop.time() - started >= 5 * 0.020 * 0.8

    default = await streams('/blackgate/hystrix.stream')
    await default.sample('lookup')          # the first sample comes at once
    started = loop.time()
    await default.sample('lookup')
    assert loop.time() - started >= 0.4     # then every 500 ms


@pytest.mark.parametrize('delay', ['abc', '-5', '0', '5', '60001', '1e3', ''])
@pytest.mark.gen_test
async def test_a_delay_that_is_not_a_sane_number_of_milliseconds_is_a_400(streams, delay):
    response = await streams('/blackgate/hystrix.stream?delay=' + delay)
    assert response.status == 400
    assert 'delay' in await response.body()
    assert MetricsStreamHandler.client_count() == 0


def test_routes_are_the_dashboard_and_the_stream():
    assert routes() == [('/blackgate/', DashboardHandler),
                        ('/blackgate/hystrix.stream', MetricsStreamHandler),
                        ('/blackgate', tornado.web.RedirectHandler, {'url': '/blackgate/'})]
    assert routes('/ops/') == [('/ops/', DashboardHandler),
                               ('/ops/hystrix.stream', MetricsStreamHandler),
                               ('/ops', tornado.web.RedirectHandler, {'url': '/ops/'})]
    assert routes('') == [('/', DashboardHandler), ('/hystrix.stream', MetricsStreamHandler)]
    assert routes('/ops', max_clients=2)[1] == ('/ops/hystrix.stream', MetricsStreamHandler,
                                                {'max_clients': 2})


@pytest.mark.gen_test
async def test_more_clients_than_the_limit_get_503(port, streams):
    assert MetricsStreamHandler.max_clients == 5
    first = await streams('/blackgate/hystrix.stream?delay=20')
    await streams('/blackgate/hystrix.stream?delay=20')
    await until(lambda: MetricsStreamHandler.client_count() == 2)
    for _ in range(3):
        await streams('/blackgate/hystrix.stream?delay=20')
    assert MetricsStreamHandler.client_count() == 5

    refused = await streams('/blackgate/hystrix.stream?delay=20')
    assert refused.status == 503
    assert await refused.body() == 'MaxConcurrentConnections reached: 5\n'
    assert MetricsStreamHandler.client_count() == 5

    first.close()                              # one leaves: there is room again
    await until(lambda: MetricsStreamHandler.client_count() == 4)
    again = await streams('/blackgate/hystrix.stream?delay=20')
    assert again.status == 200
    assert await again.next_event() == ('ping', '')


@pytest.mark.gen_test
async def test_the_limit_is_an_option_of_the_route(io_loop):
    app = tornado.web.Application(routes('/blackgate', max_clients=1))
    server = app.listen(0, '127.0.0.1')
    port = next(iter(server._sockets.values())).getsockname()[1]
    clients = []
    try:
        clients.append(await StreamClient(port).open('/blackgate/hystrix.stream'))
        assert clients[0].status == 200
        clients.append(await StreamClient(port).open('/blackgate/hystrix.stream'))
        assert clients[1].status == 503
        assert await clients[1].body() == 'MaxConcurrentConnections reached: 1\n'
    finally:
        for client in clients:
            client.close()
        await until(lambda: MetricsStreamHandler.client_count() == 0)
        server.stop()


@pytest.mark.gen_test
async def test_a_client_that_goes_away_leaves_no_timer_or_callback_behind(streams, clock):
    add_pool('lookups', 4)
    component.install()
    await Lookup(clock).queue()
    stream = await streams('/blackgate/hystrix.stream?delay=10')
    await stream.sample('lookup')
    (handler,) = MetricsStreamHandler._streams
    timer = handler._timer
    assert timer.is_running()
    handler_ref = weakref.ref(handler)
    del handler

    stream.close()
    await until(lambda: MetricsStreamHandler.client_count() == 0)
    assert not timer.is_running()
    del timer                   # it holds the handler's bound _tick
    await asyncio.sleep(0.05)   # five delays: a timer left behind would have fired
    gc.collect()
    # Nothing (timer, loop callback, pending write) holds the handler any more.
    assert handler_ref() is None
