"""Rolling metrics: counts per event, the rolling window, health, latency percentiles.

Time is the injected ``FakeClock``: a ``run()`` that calls ``clock.advance(x)``
takes exactly ``x`` seconds as Blackgate measures it, and windows roll when a
test advances the clock. Each wait on a thread or an Event is bounded by
``WAIT``.
"""
import asyncio
import gc
import math
import random
import sys
import threading
import tracemalloc

import pytest

from blackgate import BadRequest, Command, CommandError, Event, component
from blackgate.metrics import FOLD_AT, RollingMetrics
from blackgate.testing import FakeClock
from support import finish, held, start

#: The longest any test waits for a thread or an Event before it fails (seconds).
WAIT = 5.0

#: Latency percentiles come from a histogram of 16 bins per power of two, read at the
#: geometric middle of a bin: within 2**(1/32) - 1 (2.2%) of the true value.
PRECISION = 2 ** (1 / 32) - 1


class Upstream(Command):
    """A call to a fake upstream: ``Cls(outcome)``, outcome 'ok', 'fail', 'bad' or a callable."""

    command_key = 'dep'

    def __init__(self, outcome='ok'):
        self.outcome = outcome

    def run(self):
        if callable(self.outcome):
            return self.outcome()
        if self.outcome == 'fail':
            raise ConnectionError('upstream down')
        if self.outcome == 'bad':
            raise BadRequest('no such user')
        return 'fresh'

    def fallback(self):
        return 'stale'


def command(**settings):
    """An Upstream subclass with these class attributes (command key 'dep')."""
    return type('Dep', (Upstream,), settings)


def counts(key='dep'):
    """The non-zero rolling counts of ``key``."""
    metrics = component.metrics(key)
    return {event: metrics.rolling_count(event) for event in Event
            if metrics.rolling_count(event)}


def takes(clock, seconds, value='fresh'):
    """An outcome whose run() takes exactly ``seconds`` on the fake clock."""
    def outcome():
        clock.advance(seconds)
        return value
    return outcome


def run_async(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 2 * WAIT))


@pytest.fixture
def gate(clock):
    """Make threading.Events that hold run()s; all are set at teardown, freeing every worker."""
    events = []

    def make():
        events.append(threading.Event())
        return events[-1]

    yield make
    for event in events:
        event.set()


# -- one scenario per event: each returns the counts read the moment the call returned ---------

def _success(clock, gate):
    assert command()('ok').execute() == 'fresh'
    return counts()


def _failure(clock, gate):
    assert command()('fail').execute() == 'stale'
    return counts()


def _timeout(clock, gate):
    Dep = command(timeout=1.0)
    release = gate()

    async def time_out():
        future = Dep(held(release)).queue()
        clock.advance(1.0)
        assert await future == 'stale'
        return counts()

    return run_async(time_out())


def _short_circuited(clock, gate):
    assert command(circuit_breaker_force_open=True)('ok').execute() == 'stale'
    return counts()


def _thread_pool_rejected(clock, gate):
    component.add('executor_pool', {'group_key': 'narrow', 'max_workers': 1})
    component.install()
    entered, release = threading.Event(), gate()
    occupant = command(command_key='occupant', group_key='narrow', timeout_enabled=False)
    thread = start(occupant(held(release, entered)).execute)
    assert entered.wait(WAIT)
    assert command(group_key='narrow')('ok').execute() == 'stale'
    seen = counts()
    release.set()
    finish(thread)
    return seen


def _semaphore_rejected(clock, gate):
    class Dep(Command):
        command_key = 'dep'
        max_concurrent_requests = 1

        def __init__(self, release=None):
            self.release = release

        async def run(self):
            if self.release is not None:
                await asyncio.wait_for(self.release.wait(), WAIT)
            return 'fresh'

        def fallback(self):
            return 'stale'

    async def reject_one():
        release = asyncio.Event()
        first = Dep(release).queue()            # holds the only permit
        assert await Dep().queue() == 'stale'
        seen = counts()
        release.set()
        assert await first == 'fresh'
        return seen

    return run_async(reject_one())


def _bad_request(clock, gate):
    with pytest.raises(BadRequest):
        command()('bad').execute()
    return counts()


def _fallback_failure(clock, gate):
    def fallback(self):
        raise LookupError('no cached value')

    with pytest.raises(CommandError):
        command(fallback=fallback)('fail').execute()
    return counts()


def _fallback_rejection(clock, gate):
    entered, release = threading.Event(), gate()

    def fallback(self):
        if self.outcome == 'hold':
            entered.set()
            release.wait(WAIT)
        return 'stale'

    def run(self):
        raise ConnectionError('upstream down')

    Dep = command(run=run, fallback=fallback, fallback_max_concurrent_requests=1)
    thread = start(Dep('hold').execute)   # its fallback holds the only fallback permit
    assert entered.wait(WAIT)
    with pytest.raises(CommandError):
        Dep('fail').execute()
    seen = counts()
    release.set()
    assert finish(thread) == ['stale']
    return seen


def _fallback_missing(clock, gate):
    class Dep(Command):
        command_key = 'dep'

        def run(self):
            raise ConnectionError('upstream down')

    with pytest.raises(CommandError):
        Dep().execute()
    return counts()


FALLBACK = Event.FALLBACK_SUCCESS


_SCENARIOS = [
    (Event.SUCCESS, _success, {Event.SUCCESS: 1}),
    (Event.FAILURE, _failure, {Event.FAILURE: 1, FALLBACK: 1}),
    (Event.TIMEOUT, _timeout, {Event.TIMEOUT: 1, FALLBACK: 1}),
    (Event.SHORT_CIRCUITED, _short_circuited, {Event.SHORT_CIRCUITED: 1, FALLBACK: 1}),
    (Event.THREAD_POOL_REJECTED, _thread_pool_rejected,
     {Event.THREAD_POOL_REJECTED: 1, FALLBACK: 1}),
    (Event.SEMAPHORE_REJECTED, _semaphore_rejected, {Event.SEMAPHORE_REJECTED: 1, FALLBACK: 1}),
    (Event.BAD_REQUEST, _bad_request, {Event.BAD_REQUEST: 1}),
    (Event.FALLBACK_SUCCESS, _failure, {Event.FAILURE: 1, FALLBACK: 1}),
    (Event.FALLBACK_FAILURE, _fallback_failure, {Event.FAILURE: 1, Event.FALLBACK_FAILURE: 1}),
    (Event.FALLBACK_REJECTION, _fallback_rejection,
     {Event.FAILURE: 1, Event.FALLBACK_REJECTION: 1}),
    (Event.FALLBACK_MISSING, _fallback_missing, {Event.FAILURE: 1, Event.FALLBACK_MISSING: 1}),
]


@pytest.mark.parametrize('event, scenario, expected', [
    pytest.param(*row, id=row[0].value) for row in _SCENARIOS])
def test_each_event_is_counted_as_soon_as_the_call_returns(clock, gate, event, scenario,
                                                           expected):
    seen = scenario(clock, gate)
    assert seen[event] == 1
    assert seen == expected


@pytest.mark.parametrize('outcome, expected', [
    ('ok', {Event.SUCCESS: 1}),
    ('fail', {Event.FAILURE: 1, FALLBACK: 1}),
    ('bad', {Event.BAD_REQUEST: 1}),
])
def test_queued_calls_are_counted_as_soon_as_the_future_resolves(outcome, expected):
    Dep = command()

    async def call():
        try:
            await Dep(outcome).queue()
        except BadRequest:
            pass
        return counts()

    assert run_async(call()) == expected


# -- the rolling window ------------------------------------------------------------------------

def test_events_age_out_of_the_window_bucket_by_bucket(clock):
    Dep = command(metrics_rolling_window=10.0, metrics_rolling_buckets=10)
    for _ in range(10):             # one success in each of 10 one-second buckets
        Dep('ok').execute()
        clock.advance(1.0)
    metrics = component.metrics('dep')
    seen = []
    for _ in range(11):
        seen.append(metrics.rolling_count(Event.SUCCESS))
        clock.advance(1.0)
    assert seen == [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 0]


@pytest.mark.parametrize('elapsed, counted', [
    (0.0, 1),
    (5.0, 1),
    (9.9990234375, 1),    # 10 - 2**-10: exact in binary, a moment before the window passed
    (10.0, 0),
    (10.5, 0),
])
def test_an_event_is_counted_until_a_full_window_has_passed(clock, elapsed, counted):
    Dep = command(metrics_rolling_window=10.0, metrics_rolling_buckets=10)
    Dep('ok').execute()             # at t = 1000.0, the start of a bucket
    clock.advance(elapsed)
    assert component.metrics('dep').rolling_count(Event.SUCCESS) == counted


def test_a_window_of_one_bucket_drops_all_its_events_at_once(clock):
    Dep = command(metrics_rolling_window=10.0, metrics_rolling_buckets=1)
    Dep('ok').execute()             # t = 1000.0
    clock.advance(9.5)
    Dep('ok').execute()             # t = 1009.5, same (only) bucket
    metrics = component.metrics('dep')
    assert metrics.rolling_count(Event.SUCCESS) == 2
    clock.advance(0.5)              # t = 1010.0: a new bucket starts, the old one is gone
    assert metrics.rolling_count(Event.SUCCESS) == 0
    Dep('ok').execute()
    assert metrics.rolling_count(Event.SUCCESS) == 1


def test_a_long_idle_gap_empties_the_window(clock):
    Dep = command(circuit_breaker_force_closed=True)
    Dep(takes(clock, 0.25)).execute()
    Dep('fail').execute()
    clock.advance(3600.0)
    metrics = component.metrics('dep')
    assert counts() == {}
    assert metrics.health() == (0, 0, 0.0)
    assert metrics.latency_percentile(100) == 0.0
    Dep('ok').execute()
    assert counts() == {Event.SUCCESS: 1}


# -- health -------------------------------------------------------------------------------------

@pytest.mark.parametrize('successes, failures, bad_requests, health', [
    (1, 0, 0, (1, 0, 0.0)),
    (0, 1, 0, (1, 1, 100.0)),
    (3, 1, 0, (4, 1, 25.0)),
    (1, 2, 0, (3, 2, 200 / 3)),
    (2, 2, 5, (4, 2, 50.0)),
    (0, 0, 3, (0, 0, 0.0)),
    (0, 7, 3, (7, 7, 100.0)),
])
def test_health_reports_requests_errors_and_error_percentage(successes, failures, bad_requests,
                                                             health):
    Dep = command(circuit_breaker_force_closed=True)
    for outcome in ['ok'] * successes + ['fail'] * failures + ['bad'] * bad_requests:
        try:
            Dep(outcome).execute()
        except BadRequest:
            pass
    total, errors, percentage = component.metrics('dep').health()
    assert (total, errors) == health[:2]
    assert percentage == pytest.approx(health[2])


def test_health_counts_timeouts_and_thread_pool_rejections_as_errors(clock, gate):
    component.add('executor_pool', {'group_key': 'narrow', 'max_workers': 1})
    component.install()
    Dep = command(group_key='narrow', timeout=1.0, circuit_breaker_force_closed=True)
    assert Dep('ok').execute() == 'fresh'
    assert Dep('fail').execute() == 'stale'
    release = gate()

    async def time_out_and_reject():
        slow = Dep(held(release)).queue()             # takes the only worker
        assert await Dep('ok').queue() == 'stale'     # rejected
        clock.advance(1.0)
        assert await slow == 'stale'                  # timed out

    run_async(time_out_and_reject())
    assert counts() == {Event.SUCCESS: 1, Event.FAILURE: 1, Event.THREAD_POOL_REJECTED: 1,
                        Event.TIMEOUT: 1, FALLBACK: 3}
    assert component.metrics('dep').health() == (4, 3, 75.0)


class _LateWorkerLoop(asyncio.SelectorEventLoop):
    """A loop on which a worker thread pauses, right after handing it a result, until ``resume``.

    That is an interleaving a busy machine produces at random: the loop thread
    runs as soon as the worker wakes it, before the worker has finished up.
    """

    def __init__(self, resume):
        super().__init__()
        self.resume = resume
        self.owner = threading.get_ident()

    def call_soon_threadsafe(self, *args, **kwargs):
        handle = super().call_soon_threadsafe(*args, **kwargs)
        if threading.get_ident() != self.owner:
            self.resume.wait(WAIT)
        return handle


def test_a_queued_call_made_after_the_previous_one_answered_finds_its_worker_free(gate):
    component.add('executor_pool', {'group_key': 'narrow', 'max_workers': 1})
    component.install()
    Dep = command(group_key='narrow')
    resume = gate()

    async def one_after_the_other():
        first = await Dep('ok').queue()
        second = Dep('ok').queue()   # the first call has answered: its worker is free
        resume.set()
        return first, await second

    loop = _LateWorkerLoop(resume)
    try:
        results = loop.run_until_complete(asyncio.wait_for(one_after_the_other(), 2 * WAIT))
    finally:
        resume.set()
        loop.close()
    assert results == ('fresh', 'fresh')
    assert counts() == {Event.SUCCESS: 2}


# -- latency ------------------------------------------------------------------------------------

@pytest.mark.parametrize('percentile, expected', [
    (0, 0.001),
    (50, 0.050),
    (90, 0.090),
    (99, 0.099),
    (100, 0.100),
])
def test_latency_percentile_reads_the_execution_times_of_run(clock, percentile, expected):
    Dep = command()
    latencies = [ms / 1000 for ms in range(1, 101)]   # 5.05 s in all: one 10 s window
    random.Random(3).shuffle(latencies)
    for seconds in latencies:
        assert Dep(takes(clock, seconds)).execute() == 'fresh'
    value = component.metrics('dep').latency_percentile(percentile)
    assert value == pytest.approx(expected, rel=PRECISION)


def test_median_latency_of_three_executions_is_the_middle_one(clock):
    Dep = command()
    for seconds in (0.030, 0.010, 0.020):
        Dep(takes(clock, seconds)).execute()
    assert component.metrics('dep').latency_percentile(50) == pytest.approx(
        0.020, rel=PRECISION)


def test_latency_is_the_time_of_run_alone_not_of_the_fallback(clock):
    def run(self):
        clock.advance(0.010)
        raise ConnectionError('upstream down')

    def fallback(self):
        clock.advance(0.500)
        return 'stale'

    Dep = command(run=run, fallback=fallback)
    assert Dep().execute() == 'stale'
    assert component.metrics('dep').latency_percentile(100) == pytest.approx(
        0.010, rel=PRECISION)


def test_latency_percentile_is_zero_without_data():
    command(circuit_breaker_force_open=True)().execute()   # short-circuited: run() never ran
    metrics = component.metrics('dep')
    assert [metrics.latency_percentile(p) for p in (0, 50, 100)] == [0.0, 0.0, 0.0]


@pytest.mark.parametrize('percentile', [-1, -0.001, 100.001, 1000, math.nan])
def test_latency_percentile_outside_0_to_100_raises_value_error(percentile):
    command()('ok').execute()
    with pytest.raises(ValueError):
        component.metrics('dep').latency_percentile(percentile)


def test_latency_percentiles_forget_executions_that_left_the_window(clock):
    Dep = command(metrics_rolling_window=10.0, metrics_rolling_buckets=10)
    for _ in range(3):
        Dep(takes(clock, 0.5)).execute()
    clock.advance(10.0)
    for _ in range(3):
        Dep(takes(clock, 0.02)).execute()
    metrics = component.metrics('dep')
    assert metrics.latency_percentile(0) == pytest.approx(0.02, rel=PRECISION)
    assert metrics.latency_percentile(100) == pytest.approx(0.02, rel=PRECISION)


# -- concurrency --------------------------------------------------------------------------------

def test_concurrent_executions_counts_the_run_calls_in_progress(gate):
    Dep = command(timeout_enabled=False)
    release = gate()
    entered = [threading.Event() for _ in range(3)]
    Dep('ok').execute()
    metrics = component.metrics('dep')
    assert metrics.concurrent_executions == 0
    threads = [start(Dep(held(release, event)).execute) for event in entered]
    assert all(event.wait(WAIT) for event in entered)
    assert metrics.concurrent_executions == 3
    release.set()
    assert [finish(thread) for thread in threads] == [['fresh']] * 3
    assert metrics.concurrent_executions == 0


def test_rolling_max_concurrent_executions_is_the_peak_in_the_window(clock, gate):
    Dep = command(timeout_enabled=False)
    metrics = component.metrics('dep')
    assert metrics.rolling_max_concurrent_executions == 0
    Dep('ok').execute()
    assert metrics.rolling_max_concurrent_executions == 1
    release = gate()
    entered = [threading.Event() for _ in range(3)]
    threads = [start(Dep(held(release, event)).execute) for event in entered]
    assert all(event.wait(WAIT) for event in entered)
    # counted from the start of run(), before any of them finished
    assert metrics.rolling_max_concurrent_executions == 3
    release.set()
    assert [finish(thread) for thread in threads] == [['fresh']] * 3
    clock.advance(5.0)
    Dep('ok').execute()
    assert metrics.concurrent_executions == 0
    assert metrics.rolling_max_concurrent_executions == 3   # still in the 10 s window
    clock.advance(6.0)                                         # the peak's second has left it
    assert metrics.rolling_max_concurrent_executions == 1
    clock.advance(10.0)
    assert metrics.rolling_max_concurrent_executions == 0


def test_a_run_still_going_keeps_counting_in_the_rolling_max(clock, gate):
    Dep = command(timeout_enabled=False)
    metrics = component.metrics('dep')
    release, entered = gate(), threading.Event()
    thread = start(Dep(held(release, entered)).execute)
    assert entered.wait(WAIT)
    for _ in range(3):          # 30 s: three whole windows while it runs
        clock.advance(10.0)
        assert metrics.rolling_max_concurrent_executions == 1
    release.set()
    assert finish(thread) == ['fresh']
    clock.advance(10.0)
    assert metrics.rolling_max_concurrent_executions == 0


def test_histogram_memory_stays_bounded_over_many_distinct_latencies(clock):
    class Dep(Command):
        command_key = 'dep'
        timeout_enabled = False   # no timer per call: only the metrics keep anything

        def __init__(self, seconds):
            self.seconds = seconds

        async def run(self):
            clock.advance(self.seconds)

    rng = random.Random(7)
    # 11,000 distinct latencies spread log-uniformly over 10 octaves (0.1 us to 100 us):
    # at most 160 histogram bins, and 0.2 s of fake time, so every call lands in the
    # same bucket and none leaves the window.
    warm_up = [10 ** rng.uniform(-7, -4) for _ in range(1_000)]
    latencies = [10 ** rng.uniform(-7, -4) for _ in range(10_000)]

    async def record(batch):
        for seconds in batch:
            await Dep(seconds).queue()

    run_async(record(warm_up))   # every bin this range can fill exists now
    gc.collect()
    tracemalloc.start()
    try:
        run_async(record(latencies))
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    # A bounded histogram grows by little more than a few replaced int objects (under
    # 1 KiB here); keeping the 10,000 samples would take at least 8 bytes each (78 KiB)
    # even packed in an array, and a dict keyed by exact latency about 1 MiB. 32 KiB is
    # generous for the first and well below the others.
    assert grown < 32 * 1024
    everything = sorted(warm_up + latencies)
    metrics = component.metrics('dep')
    assert metrics.rolling_count(Event.SUCCESS) == 11_000
    for percentile in (1, 50, 99):
        exact = everything[math.ceil(len(everything) * percentile / 100) - 1]
        assert metrics.latency_percentile(percentile) == pytest.approx(exact, rel=PRECISION)


@pytest.fixture
def preemptive():
    """Switch threads every 10 us instead of 5 ms, so unguarded updates really interleave."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(interval)


def test_counts_are_exact_when_16_threads_execute_1000_calls_each(preemptive):
    component.add('executor_pool', {'group_key': 'wide', 'max_workers': 16})
    component.install()
    Dep = command(group_key='wide', timeout_enabled=False)
    threads_, calls = 16, 1000
    barrier = threading.Barrier(threads_)

    def caller():
        barrier.wait(WAIT)
        return sum(Dep('ok').execute() == 'fresh' for _ in range(calls))

    threads = [start(caller) for _ in range(threads_)]
    for thread in threads:
        thread.join(4 * WAIT)
    assert not any(thread.is_alive() for thread in threads)
    assert sum(thread.results[0] for thread in threads) == threads_ * calls
    assert counts() == {Event.SUCCESS: threads_ * calls}
    assert component.metrics('dep').health() == (threads_ * calls, 0, 0.0)


def test_counts_are_exact_when_16_threads_record_straight_into_the_metrics(preemptive):
    # record() takes no lock: outcomes wait in a list that readers and every FOLD_AT-th
    # record fold. Interleaved appends and folds must lose or double nothing.
    metrics = RollingMetrics('raw', 10.0, 10, 0.5, FakeClock())
    events = (Event.TIMEOUT, Event.FALLBACK_SUCCESS)
    threads_, calls = 16, 5000
    barrier = threading.Barrier(threads_)

    def recorder():
        barrier.wait(WAIT)
        for i in range(calls):
            metrics.record(events, 0.001, 0.002)
            if i % 997 == 0:
                metrics.rolling_count(Event.TIMEOUT)   # a reader folding meanwhile

    threads = [start(recorder) for _ in range(threads_)]
    for thread in threads:
        thread.join(4 * WAIT)
    assert not any(thread.is_alive() for thread in threads)
    assert metrics.rolling_count(Event.TIMEOUT) == threads_ * calls
    assert metrics.rolling_count(Event.FALLBACK_SUCCESS) == threads_ * calls
    assert metrics.latency_summary().measured == threads_ * calls


@pytest.mark.parametrize('records', [1, FOLD_AT - 1, FOLD_AT, 3 * FOLD_AT + 1])
def test_every_record_is_read_at_once_however_many_wait_to_be_folded(records):
    metrics = RollingMetrics('raw', 10.0, 10, 0.5, FakeClock())
    for _ in range(records):
        metrics.record((Event.SUCCESS,), 0.001, 0.001)
    assert metrics.rolling_count(Event.SUCCESS) == records
    assert metrics.health() == (records, 0, 0.0)


def test_a_record_that_lost_the_race_to_a_newer_one_is_counted_in_its_own_bucket():
    clock = FakeClock(start=0.0)
    metrics = RollingMetrics('raw', 10.0, 10, 60.0, clock)   # 1 s buckets
    clock.advance(5.5)
    metrics.record((Event.SUCCESS,), 0.001, 0.001)                  # folded: its health is due
    metrics.record((Event.FAILURE,), 0.001, 0.001, now=3.2)         # measured earlier
    metrics.record((Event.TIMEOUT,), 0.001, 0.001, now=-20.0)       # before the window
    assert metrics.rolling_counts()[Event.FAILURE] == 1
    assert metrics.rolling_count(Event.TIMEOUT) == 0
    clock.advance(13.5 - 5.5)          # the window is now (3, 13]: second 3 has left it
    assert metrics.rolling_count(Event.FAILURE) == 0
    assert metrics.rolling_count(Event.SUCCESS) == 1


def test_reset_forgets_records_still_waiting_to_be_folded():
    metrics = RollingMetrics('raw', 10.0, 10, 60.0, FakeClock())
    metrics.record((Event.FAILURE,), 0.001, 0.001)     # folded: the first snapshot is due
    metrics.record((Event.FAILURE,), 0.001, 0.001)     # waits
    metrics.reset()
    metrics.record((Event.SUCCESS,), 0.001, 0.001)
    assert metrics.rolling_counts()[Event.FAILURE] == 0
    assert metrics.rolling_count(Event.SUCCESS) == 1


# -- cumulative counts and histograms (for exporters) -------------------------------------------

def test_cumulative_counts_keep_what_left_the_window_and_what_a_reset_cleared(clock):
    Dep = command(metrics_rolling_window=10.0, metrics_rolling_buckets=10,
                  circuit_breaker_request_volume_threshold=1000)
    for _ in range(3):
        Dep('ok').execute()
    Dep('fail').execute()
    clock.advance(30.0)               # all four have left the window
    with pytest.raises(BadRequest):
        Dep('bad').execute()
    metrics = component.metrics('dep')
    metrics.reset()                   # what the breaker does when it closes
    Dep('ok').execute()

    assert counts() == {Event.SUCCESS: 1}
    cumulative = metrics.cumulative().counts
    assert {event: n for event, n in cumulative.items() if n} == {
        Event.SUCCESS: 4, Event.FAILURE: 1, Event.FALLBACK_SUCCESS: 1, Event.BAD_REQUEST: 1}


def test_cumulative_counts_survive_new_window_settings(clock):
    metrics = RollingMetrics('raw', 10.0, 10, 60.0, clock)
    metrics.record((Event.SUCCESS,), 0.001, 0.001)
    metrics.record((Event.SUCCESS,), 0.001, 0.001)     # still waiting to be folded
    metrics.configure(20.0, 20, 60.0)
    metrics.record((Event.TIMEOUT,), 0.001, 0.001)
    assert metrics.rolling_counts()[Event.SUCCESS] == 0
    counted = metrics.cumulative().counts
    assert (counted[Event.SUCCESS], counted[Event.TIMEOUT]) == (2, 1)


def test_a_record_from_before_the_window_still_counts_in_the_total():
    clock = FakeClock(start=0.0)
    metrics = RollingMetrics('raw', 10.0, 10, 60.0, clock)
    clock.advance(30.0)
    metrics.record((Event.SUCCESS,), 0.002, 0.003)                  # folded: health is due
    metrics.record((Event.FAILURE,), 0.004, 0.005, now=1.0)         # measured long before
    assert metrics.rolling_count(Event.FAILURE) == 0
    cumulative = metrics.cumulative((0.0035,))
    assert cumulative.counts[Event.FAILURE] == 1
    assert cumulative.latency.buckets == ((0.0035, 1), (math.inf, 2))
    assert cumulative.total_latency.buckets == ((0.0035, 1), (math.inf, 2))


def test_cumulative_histogram_counts_calls_at_or_under_each_bound(clock):
    Dep = command()
    latencies = [0.004] * 5 + [0.030] * 3 + [0.400] * 2
    for seconds in latencies:
        Dep(takes(clock, seconds)).execute()
    histogram = component.metrics('dep').cumulative((0.01, 0.1, 1.0)).latency
    assert histogram.buckets == ((0.01, 5), (0.1, 8), (1.0, 10), (math.inf, 10))
    assert histogram.measured == 10
    assert histogram.seconds == pytest.approx(sum(latencies), rel=PRECISION)


def test_cumulative_histogram_without_calls_is_empty():
    histogram = component.metrics('idle').cumulative((0.5,)).latency
    assert histogram == (0, 0.0, ((0.5, 0), (math.inf, 0)))


@pytest.mark.parametrize('bounds', [(0.1, 0.05), (0.0,), (-1.0,), (0.1, 0.1), (math.inf,)])
def test_cumulative_bounds_must_ascend_above_zero(bounds):
    with pytest.raises(ValueError, match='ascending, finite numbers of seconds above 0'):
        component.metrics('dep').cumulative(bounds)
