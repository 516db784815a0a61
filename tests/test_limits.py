"""Adaptive concurrency limits (the guide's "Adaptive concurrency limits"; issue 15, Done when 1).

The algorithms are fed on the FakeClock's time, with a closed loop where the
pool is busy (as much in flight as the limit admits) and the RTT a function of
that concurrency. One test runs real threads against a simulated upstream.
"""
import math

import pytest

from benchmarks.upstreams import QueueingUpstream, closed_loop
from blackgate import Command, ConfigError, Event, component
from blackgate.clock import SystemClock
from blackgate.config import check_limit_mapping
from blackgate.limits import FLOOR_WINDOWS, new_limit

ALGORITHMS = ('gradient2', 'vegas', 'aimd')
BASE = 0.010   # seconds: the dependency's no-load latency in the closed loops


def limit_of(algorithm, max_workers=64, random=lambda: 0.5, **options):
    settings = check_limit_mapping('test', dict(algorithm=algorithm, **options), max_workers)
    return new_limit(settings, random=random)


def drive(limit, clock, windows, rtt_of, dropped_of=lambda n: False, busy=True,
          per_window=10):
    """Feed ``windows`` windows of ``per_window`` samples each; the limits seen after each."""
    seen = []
    step = max(limit.settings.window, 0.001) / per_window
    for _ in range(windows):
        n = limit.limit if busy else 1
        rtt = rtt_of(n)
        for _ in range(per_window):
            clock.advance(step)
            now = clock.monotonic()
            limit.sample(now, now - rtt, rtt, n, dropped_of(n))
        seen.append(limit.limit)
    return seen


def flat(n):
    return BASE


def queueing(knee):
    return lambda n: BASE * max(1.0, n / knee) ** 2


# -- each algorithm against its published behaviour -----------------------------------

@pytest.mark.parametrize('algorithm', ALGORITHMS)
def test_limit_grows_under_low_latency_up_to_max(clock, algorithm):
    limit = limit_of(algorithm, initial=10, max=40)
    seen = drive(limit, clock, 400, flat)
    assert seen[0] >= 10 and max(seen) == 40 and seen[-1] == 40


@pytest.mark.parametrize('algorithm', ALGORITHMS)
def test_limit_does_not_grow_while_the_pool_is_app_limited(clock, algorithm):
    limit = limit_of(algorithm, initial=10, max=40)
    seen = drive(limit, clock, 100, flat, busy=False)
    assert set(seen) == {10}


@pytest.mark.parametrize('algorithm', ('gradient2', 'vegas'))
def test_limit_shrinks_when_latency_rises(clock, algorithm):
    limit = limit_of(algorithm, initial=10, max=64)
    grown = drive(limit, clock, 200, flat)[-1]
    assert grown == 64
    # The dependency now saturates at 8 calls: beyond, each call costs (n/8)^2 as long.
    settled = drive(limit, clock, 300, queueing(8))
    assert settled[-1] < grown / 2
    assert max(settled[-50:]) <= 3 * 8


@pytest.mark.parametrize('algorithm', ALGORITHMS)
def test_limit_shrinks_on_drops_down_to_min_and_no_lower(clock, algorithm):
    limit = limit_of(algorithm, initial=30, min=3, max=40)
    seen = drive(limit, clock, 200, flat, dropped_of=lambda n: True)
    assert seen[2] < 30
    assert min(seen) == 3 and seen[-1] == 3


def test_aimd_backs_off_by_its_ratio_and_adds_one(clock):
    limit = limit_of('aimd', initial=20, max=40, window=0, window_size=1)   # every sample
    now = clock.monotonic()
    assert limit.sample(now, now - BASE, BASE, 20, dropped=True) == 18   # int(20 * 0.9)
    assert limit.sample(now, now - BASE, BASE, 18) == 19
    assert limit.sample(now, now - BASE, BASE, 2) == 19                  # app-limited


def test_aimd_cuts_once_for_the_timeouts_of_one_burst(clock):
    # Twenty calls admitted together all time out: one cut, not twenty (down to the floor).
    limit = limit_of('aimd', initial=20, max=40, window=0, window_size=1)
    admitted = clock.monotonic()
    clock.advance(1.0)
    for _ in range(20):
        limit.sample(clock.monotonic(), admitted, 1.0, 20, dropped=True)
    assert limit.limit == 18
    clock.advance(0.5)
    later = clock.monotonic()
    clock.advance(1.0)
    limit.sample(clock.monotonic(), later, 1.0, 18, dropped=True)   # admitted after the cut
    assert limit.limit == 16


def test_gradient2_defaults_are_the_published_ones():
    limit = limit_of('gradient2', max_workers=200)
    assert (limit.limit, limit.smoothing, limit.queue_size, limit.long_window,
            limit.tolerance) == (20, 0.2, 4, 600, 1.5)
    vegas, aimd = limit_of('vegas'), limit_of('aimd')
    assert (vegas.smoothing, vegas.probe_multiplier, aimd.backoff_ratio) == (1.0, 30, 0.9)


def test_a_window_with_too_few_samples_is_discarded(clock):
    limit = limit_of('gradient2', initial=10, max=40)
    seen = drive(limit, clock, 50, flat, per_window=5)   # window_size is 10
    assert set(seen) == {10} and limit.updates == 0


# -- what the anchors' users learned the hard way ---------------------------------------

def test_gradient2_stays_bounded_under_modest_overload(clock):
    # concurrency-limits #134: with the queue headroom always added, a gradient just
    # below 1 keeps the limit creeping up as the long average follows the slow RTT.
    limit = limit_of('gradient2', initial=10, max=64)
    seen = drive(limit, clock, 3000, lambda n: BASE * max(1.0, n / 8))
    assert max(seen[-1000:]) <= max(seen[1000:2000]) + 1   # no creep
    assert max(seen) <= 3 * 8


def test_vegas_ramps_up_by_beta_while_no_queue_shows(clock):
    # concurrency-limits #35: one at a time, 10 -> 64 would take 54 windows.
    limit = limit_of('vegas', initial=10, max=64)
    seen = drive(limit, clock, 15, flat)
    assert seen[-1] == 64


def test_baseline_is_measured_again_after_five_windows_at_the_floor(clock):
    # Envoy #10647: a baseline measured in a fast spell keeps a slower dependency pinned
    # at the floor for ever; 5 windows there re-measure it.
    limit = limit_of('gradient2', initial=10, min=2, max=40)
    drive(limit, clock, 50, flat)
    assert limit.long_rtt == pytest.approx(BASE)
    drive(limit, clock, 100, lambda n: 10 * BASE)   # the dependency is now 10x slower
    assert limit.rebases >= 1
    assert limit.long_rtt is not None and limit.long_rtt > 5 * BASE
    assert drive(limit, clock, 200, lambda n: 10 * BASE)[-1] == 40   # and it grows again


def test_samples_from_before_a_new_baseline_epoch_are_ignored(clock):
    # Envoy #11579: work admitted before the baseline was reset carries the old load.
    limit = limit_of('vegas', initial=10, max=40)
    drive(limit, clock, 5, flat)
    updates = limit.updates
    admitted_before = clock.monotonic()
    clock.advance(1.0)
    limit.rebase(clock.monotonic())
    assert limit.rtt_noload is None
    for _ in range(30):   # slow answers of work admitted before the epoch
        clock.advance(0.1)
        limit.sample(clock.monotonic(), admitted_before, 5.0, limit.limit)
    assert limit.rtt_noload is None and limit.updates == updates
    drive(limit, clock, 2, flat)
    assert limit.rtt_noload == pytest.approx(BASE)


def test_vegas_probes_are_jittered_and_never_pin_the_limit_low(clock):
    # Envoy #8337: probes in step across instances, and a limit pinned low while the
    # baseline is measured, cost a burst of 503s.
    early = limit_of('vegas', initial=40, max=40, random=lambda: 0.0)
    late = limit_of('vegas', initial=40, max=40, random=lambda: 0.99)
    seen_early = drive(early, clock, 2000, flat)
    seen_late = drive(late, clock, 2000, flat)
    assert early.rebases > late.rebases >= 1
    assert min(seen_early) == 40 and min(seen_late) == 40   # the limit never dropped


# -- configuration ------------------------------------------------------------------------

@pytest.mark.parametrize('limit, message', [
    ({'algorithm': 'cubic'}, "algorithm='cubic' is not known; expected one of 'gradient2'"),
    ({'algorithm': 'vegas', 'smothing': 0.5}, "unknown key 'smothing' (did you mean "
                                               "'smoothing'?)"),
    ({'algorithm': 'aimd', 'queue_size': 4}, "unknown key 'queue_size'"),
    ({'max': 100}, 'max=100 is more than the pool\'s max_workers=64'),
    ({'min': 10, 'initial': 5}, 'expected min <= initial <= max, got min=10, initial=5'),
    ({'initial': 0}, 'initial=0 is out of range; expected a whole number from 1'),
    ({'smoothing': 'high'}, "smoothing='high' has the wrong type"),
    ({'backoff_ratio': 0.2, 'algorithm': 'aimd'}, 'backoff_ratio=0.2 is out of range'),
    (['gradient2'], 'expected a dict, got list'),
])
def test_a_bad_concurrency_limit_is_refused_at_add(limit, message):
    with pytest.raises(ConfigError) as raised:
        component.add('executor_pool', {'group_key': 'g', 'max_workers': 64,
                                         'concurrency_limit': limit})
    assert message in str(raised.value)
    assert "executor pool 'g': concurrency_limit" in str(raised.value)


def test_a_limit_in_front_of_a_queue_is_refused():
    with pytest.raises(ConfigError, match='remove max_queue_size=5'):
        component.add('executor_pool', {'group_key': 'g', 'max_workers': 8, 'max_queue_size': 5,
                                         'concurrency_limit': {'algorithm': 'aimd'}})


def test_defaults_fill_a_bare_limit():
    component.add('executor_pool', {'group_key': 'g', 'max_workers': 12,
                                     'concurrency_limit': {}})
    component.install()
    pool = component.pool('g')
    assert pool.limit == 12   # initial 20, capped by max = max_workers
    assert (pool.limiter.algorithm, pool.limiter.min, pool.limiter.max) == ('gradient2', 1, 12)


def test_a_pool_without_a_limit_has_none():
    component.add('executor_pool', {'group_key': 'g', 'max_workers': 4})
    component.install()
    assert component.pool('g').limit is None


# -- the pool admits up to the limit ----------------------------------------------------

class Limited(Command):
    group_key = 'limited'
    timeout = 0.5

    def __init__(self, gate=None, takes=0.0):
        self.gate = gate
        self.takes = takes

    def run(self):
        if self.gate is not None:
            self.gate.hold()
        if self.takes:
            component.clock.advance(self.takes)
        return 'fresh'

    def fallback(self):
        return 'stale'


def install_limited(**limit):
    component.add('executor_pool', {'group_key': 'limited', 'max_workers': 8,
                                     'concurrency_limit': limit})
    component.install()
    return component.pool('limited')


def test_the_pool_rejects_beyond_the_limit(clock, gates):
    from support import in_thread
    pool = install_limited(algorithm='aimd', initial=2, max=8)
    held = [gates() for _ in range(2)]
    running = [in_thread(Limited(gate).execute) for gate in held]
    for gate in held:
        gate.wait_entered()
    refused = Limited()
    assert refused.execute() == 'stale'
    assert refused.events == (Event.THREAD_POOL_REJECTED, Event.FALLBACK_SUCCESS)
    assert pool.in_flight == 2 and pool.active_count == 2
    assert 'adaptive concurrency limit (2 running, limit 2 of 8 workers)' in \
        str(refused.execution_exception)
    for gate in held:
        gate.open()
    assert [future.result(5) for future in running] == ['fresh', 'fresh']


def test_the_limit_learns_from_executions_and_timeouts_are_drops(clock):
    pool = install_limited(algorithm='aimd', initial=4, max=8, window=0, window_size=1)
    for _ in range(3):   # one at a time
        assert Limited(takes=0.01).execute() == 'fresh'
    assert pool.limit == 4   # one in flight of 4: app-limited, no growth
    slow = Limited(takes=0.6)   # longer than its timeout: a drop
    assert slow.execute() == 'stale'
    assert slow.events[0] is Event.TIMEOUT
    assert pool.limit == 3   # max(1, min(4 - 1, int(4 * 0.9)))


def test_the_limit_is_never_more_than_max_workers(clock):
    pool = install_limited(algorithm='aimd', initial=8, max=8)
    now = clock.monotonic()
    for _ in range(20):
        pool.record(now, now, 0.001, 8)
    assert pool.limit == 8


def test_limit_shows_in_repr(clock):
    pool = install_limited(algorithm='vegas', initial=3, max=8)
    assert 'limit 3' in repr(pool)


# -- real threads: a dependency that slows down with concurrency ---------------------------

def test_learned_limit_settles_below_max_workers_with_better_goodput(clock):
    # Real time and real threads (the pool's workers sleep in the simulated upstream);
    # the comparison is within one run, and the margins are wide (see benchmarks/).
    component.clock = SystemClock()
    # 16 calls at once take 20 ms; beyond, they share it: 60 at once take 75 ms, more
    # than the 60 ms timeout, while 4 at once leave three quarters of it unused.
    upstream = QueueingUpstream(base=0.02, knee=16)

    def goodput(name, **pool):
        component.add('executor_pool', dict(group_key=name, **pool))
        component.install()

        class Call(Command):
            group_key = name
            command_key = 'call_' + name
            timeout = 0.06
            circuit_breaker_enabled = False   # the bulkhead alone is measured here

            def run(self):
                return upstream.call()

            def fallback(self):
                return None

        def one():
            return Call().execute() is not None

        if 'concurrency_limit' in pool:
            closed_loop(one, clients=60, duration=1.5)   # learning
        return closed_loop(one, clients=60, duration=1.5).goodput

    fixed = {size: goodput('fixed_%d' % size, max_workers=size) for size in (4, 64)}
    adaptive = goodput('adaptive', max_workers=64, concurrency_limit={
        'algorithm': 'gradient2', 'initial': 10, 'window': 0.1})
    learned = component.pool('adaptive').limit
    assert learned <= 64 / 2, learned
    assert adaptive >= max(fixed.values()), (adaptive, fixed)


# -- where the limit shows ------------------------------------------------------------------

def test_the_stream_shows_the_limit_of_a_limited_pool_only(clock):
    from blackgate.web import stream_samples
    install_limited(algorithm='aimd', initial=3, max=8)
    assert Limited().execute() == 'fresh'

    class Plain(Command):
        def run(self):
            return 1

    assert Plain().execute() == 1
    pools = {sample['name']: sample for sample in stream_samples()
             if sample['type'] == 'HystrixThreadPool'}
    assert pools['limited']['currentConcurrencyLimit'] == 3
    assert 'currentConcurrencyLimit' not in pools['default']


def test_prometheus_has_a_limit_gauge_for_a_limited_pool_only(clock):
    prometheus_client = pytest.importorskip('prometheus_client')
    from prometheus_client.parser import text_string_to_metric_families

    from blackgate.prometheus import BlackgateCollector
    install_limited(algorithm='aimd', initial=3, max=8)
    assert Limited().execute() == 'fresh'

    class Plain(Command):
        def run(self):
            return 1

    assert Plain().execute() == 1
    registry = prometheus_client.CollectorRegistry()
    registry.register(BlackgateCollector(component))
    text = prometheus_client.generate_latest(registry).decode()
    samples = [sample for family in text_string_to_metric_families(text)
               for sample in family.samples if sample.name == 'blackgate_pool_concurrency_limit']
    assert [(sample.labels, sample.value) for sample in samples] == [({'group': 'limited'}, 3.0)]


# -- the async def run() semaphore with a learned limit -------------------------------------

def test_learned_permits_time_each_permit_and_shrink_on_drops(clock):
    from blackgate.config import check_limit_mapping
    from blackgate.pools import LimitedPermits
    permits = LimitedPermits(check_limit_mapping('test', {'algorithm': 'aimd', 'initial': 4,
                                                          'window': 0, 'window_size': 1}, 10),
                             clock, drop_after=0.5)
    releases = [permits.try_take() for _ in range(4)]
    assert all(releases) and permits.try_take() is None   # the limit, 4
    clock.advance(0.6)   # all four held past the timeout: one cut for the round
    for release in releases:
        release()
    assert permits.limit == 3 and permits.in_use == 0


def test_a_command_limit_is_checked_against_max_concurrent_requests():
    component.add('command', {'command_key': 'streams', 'max_concurrent_requests': 8,
                              'concurrency_limit': {'algorithm': 'vegas', 'max': 20}})
    with pytest.raises(ConfigError, match=r"command 'streams': concurrency_limit: max=20 is more than "
                       r"max_concurrent_requests=8"):
        component.install()


def test_an_async_run_under_a_learned_limit_is_refused_beyond_it(clock):
    import asyncio

    from support import run_async

    class Streams(Command):
        command_key = 'streams'
        max_concurrent_requests = 8
        concurrency_limit = {'algorithm': 'aimd', 'initial': 1}

        async def run(self):
            await asyncio.sleep(0)
            return 'fresh'

        def fallback(self):
            return 'stale'

    async def two_at_once():
        first, second = Streams(), Streams()
        answers = await asyncio.gather(first.queue(), second.queue())
        return answers, second

    answers, second = run_async(two_at_once())
    assert answers == ['fresh', 'stale']
    assert second.events[0] is Event.SEMAPHORE_REJECTED
    assert 'adaptive concurrency limit' in str(second.execution_exception)
