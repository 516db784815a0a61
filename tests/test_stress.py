"""Stress: threads calling execute() and coroutines calling queue() at once (issue 8).

Real time (the ``system_clock`` fixture), real threads, real short timeouts.
Every caller writes down what it observed (the command key and the events of
each call); at the end the totals must add up exactly:

- every call answered exactly once, and its answer agrees with its events;
- per command key and event, what the callers observed equals what an
  ``on_event`` listener heard and, for keys whose breaker is forced closed (so
  a closing breaker never restarts the counts), the rolling counts;
- per pool, ``rejected_count`` equals the THREAD_POOL_REJECTED calls and
  ``completed_count`` the calls that got a worker (a timed-out ``run()``
  keeps its worker until it returns; it is counted once it has);
- the breaker that trips, probes and closes under the load moved only along
  its transition table, each move starting where the previous one ended.

Nothing may deadlock: every thread is joined with a timeout, the IOLoop's
coroutines run under ``asyncio.wait_for``, every wait in a ``run()`` is
bounded. Set ``BLACKGATE_SOAK=1`` to run ten times as many calls.
"""
import asyncio
import collections
import logging
import os
import random
import threading
import time

import pytest

from blackgate import (BadRequest, BreakerState, Command, CommandError, Event, FailureType,
                       component)
from support import FailsOnDemand

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN
LEGAL = {(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED), (HALF_OPEN, OPEN)}

SOAK = os.environ.get('BLACKGATE_SOAK', '') not in ('', '0')
SCALE = 10 if SOAK else 1
THREADS = 8
CALLS_PER_THREAD = 4000 * SCALE
COROUTINES = 10
CALLS_PER_COROUTINE = 1500 * SCALE
#: Real seconds: the bound on the whole run of callers (generous: a loaded 2-core machine).
BOUND = 120.0 * SCALE

#: What each stress run observed; the figures for the report.
FIGURES = {}


class Stressed(Command):
    group_key = 'stress'
    timeout = 30.0   # a loaded machine never turns a quick run() into a timeout
    # Long enough that no bucket leaves the window during a test; ten buckets, so
    # that crossing a bucket boundary loses nothing either.
    metrics_rolling_window = 100_000.0
    metrics_rolling_buckets = 10

    def __init__(self, fallback='ok'):
        self.fallback_behaviour = fallback

    def fallback(self):
        if self.fallback_behaviour == 'raise':
            raise LookupError('cache empty')
        return 'stale'


class Counted(Stressed):
    """A key whose breaker never trips, so that its rolling counts keep every call."""

    circuit_breaker_force_closed = True


class Ok(Counted):
    command_key = 'stress.ok'

    def run(self):
        return 'fresh'


class Fail(Counted):
    command_key = 'stress.fail'
    fallback_max_concurrent_requests = 2

    def run(self):
        raise ConnectionError('upstream down')


class Bad(Counted):
    command_key = 'stress.bad'

    def run(self):
        raise BadRequest('no such user')


class Slow(Counted):
    """Times out after 20 ms; its worker stays busy until run() gives up at 100 ms."""

    command_key = 'stress.slow'
    group_key = 'stress.slow'
    timeout = 0.02
    never = threading.Event()

    def run(self):
        self.never.wait(0.1)
        return 'late'


class Async(Counted):
    command_key = 'stress.async'
    max_concurrent_requests = 4

    async def run(self):
        await asyncio.sleep(0.001)
        return 'fresh'


class Flaky(Stressed):
    """A live breaker: half its calls fail, it trips, probes after 5 ms and closes again."""

    command_key = 'stress.flaky'
    circuit_breaker_request_volume_threshold = 10
    circuit_breaker_error_threshold_percentage = 50
    circuit_breaker_sleep_window = 0.005
    metrics_health_snapshot_interval = 0

    def __init__(self, fail, fallback='ok'):
        super().__init__(fallback)
        self.fail = fail

    def run(self):
        if self.fail:
            raise ConnectionError('upstream down')
        return 'fresh'


SYNC = (Ok, Ok, Ok, Fail, Bad, Slow, Flaky, Flaky, Flaky)
ALL = SYNC + (Async, Async)
RUN_VALUE = {'stress.slow': 'late'}


def make(cls, rng):
    fallback = 'raise' if rng.random() < 0.2 else 'ok'
    if cls is Flaky:
        return Flaky(rng.random() < 0.5, fallback)
    return cls(fallback)


class Recorder:
    """An on_event and on_state_change listener; thread-safe."""

    def __init__(self):
        self.lock = threading.Lock()
        self.events = collections.Counter()
        self.transitions = collections.defaultdict(list)

    def on_event(self, command_key, event):
        with self.lock:
            self.events[command_key, event] += 1

    def on_state_change(self, command_key, old, new):
        with self.lock:
            self.transitions[command_key].append((old, new))


def outcome(call):
    """('value', v) or ('error', exc) of ``call()``."""
    try:
        return 'value', call()
    except (CommandError, BadRequest) as exc:
        return 'error', exc


def check_answer(cmd, answer):
    """The answer a caller got agrees with the events of its command."""
    events = cmd.events
    kind, value = answer
    primary, last = events[0], events[-1]
    if primary is Event.SUCCESS:
        assert answer == ('value', RUN_VALUE.get(cmd.command_key, 'fresh')), (events, answer)
    elif primary is Event.BAD_REQUEST:
        assert kind == 'error' and type(value) is BadRequest, (events, answer)
    elif last is Event.FALLBACK_SUCCESS:
        assert answer == ('value', 'stale'), (events, answer)
    else:
        assert kind == 'error' and type(value) is CommandError, (events, answer)
        if last is Event.FALLBACK_REJECTION:
            assert value.failure_type is FailureType.REJECTED_SEMAPHORE_FALLBACK
        assert last in (Event.FALLBACK_FAILURE, Event.FALLBACK_MISSING, Event.FALLBACK_REJECTION)


def wait_idle(pools, keys, bound=30.0):
    deadline = time.monotonic() + bound
    while any(pool.in_flight for pool in pools) or any(
            component.metrics(key).concurrent_executions for key in keys):
        assert time.monotonic() < deadline, 'workers still busy %ss after the callers' % bound
        time.sleep(0.01)


def assert_legal_chain(transitions, final):
    """Each move is in the table, starts where the previous ended; the last is the state."""
    state = CLOSED
    for number, (old, new) in enumerate(transitions):
        assert (old, new) in LEGAL, 'illegal move %s -> %s (#%d)' % (old, new, number)
        assert old is state, 'move #%d %s -> %s, but the breaker was %s' % (
            number, old, new, state)
        state = new
    assert state is final


@pytest.fixture
def stress_pools(system_clock):
    component.add('executor_pool', {'group_key': 'stress', 'max_workers': 8,
                                    'max_queue_size': 8})
    component.add('executor_pool', {'group_key': 'stress.slow', 'max_workers': 2,
                                    'max_queue_size': 1})
    component.install()
    yield component.pool('stress'), component.pool('stress.slow')
    Slow.never.set()
    Slow.never = threading.Event()


def test_threads_and_coroutines_at_once_lose_no_count_and_never_deadlock(stress_pools, caplog):
    caplog.set_level('CRITICAL', logger='blackgate')   # thousands of failures: keep quiet
    recorder = Recorder()
    component.add_listener(recorder)
    observed = []            # (command, answer); list.append is atomic
    problems = []
    start = threading.Barrier(THREADS + 1)

    def thread_caller(seed):
        rng = random.Random(seed)
        try:
            start.wait(30)
            for _ in range(CALLS_PER_THREAD):
                cmd = make(rng.choice(SYNC), rng)
                observed.append((cmd, outcome(cmd.execute)))
        except BaseException as exc:   # reported by the main thread
            problems.append(exc)

    async def coroutine_caller(seed):
        rng = random.Random(seed)
        for _ in range(CALLS_PER_COROUTINE):
            cmd = make(rng.choice(ALL), rng)
            try:
                answer = 'value', await cmd.queue()
            except (CommandError, BadRequest) as exc:
                answer = 'error', exc
            observed.append((cmd, answer))

    async def all_coroutines():
        start.wait(30)   # blocks the loop a moment, before any coroutine runs
        await asyncio.wait_for(
            asyncio.gather(*(coroutine_caller(1000 + n) for n in range(COROUTINES))), BOUND)

    def loop_thread():
        try:
            asyncio.run(all_coroutines())
        except BaseException as exc:
            problems.append(exc)

    began = time.monotonic()
    threads = [threading.Thread(target=thread_caller, args=(n,), name='stress-%d' % n,
                                daemon=True) for n in range(THREADS)]
    threads.append(threading.Thread(target=loop_thread, name='stress-loop', daemon=True))
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + BOUND
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    alive = [thread.name for thread in threads if thread.is_alive()]
    assert not alive, 'deadlock? still running after %ss: %s' % (BOUND, alive)
    assert not problems, problems
    elapsed = time.monotonic() - began
    pools = stress_pools
    keys = sorted({cls.command_key for cls in ALL})
    wait_idle(pools, keys)

    # every call answered once, as its events say
    issued = THREADS * CALLS_PER_THREAD + COROUTINES * CALLS_PER_COROUTINE
    assert len(observed) == issued
    assert len({id(cmd) for cmd, _ in observed}) == issued
    for cmd, answer in observed:
        check_answer(cmd, answer)

    # per key and event: callers == listener == rolling counts
    seen = collections.Counter()
    for cmd, _ in observed:
        for event in cmd.events:
            seen[cmd.command_key, event] += 1
    assert recorder.events == seen
    for cls in (Ok, Fail, Bad, Slow, Async):
        counts = component.metrics(cls.command_key).rolling_counts()
        assert {event: n for event, n in counts.items() if n} == {
            event: n for (key, event), n in seen.items() if key == cls.command_key}

    # per pool: rejections and completed runs
    ran = (Event.SUCCESS, Event.FAILURE, Event.BAD_REQUEST, Event.TIMEOUT)
    for pool in pools:
        calls = [cmd for cmd, _ in observed
                 if cmd.group_key == pool.group_key and cmd.command_key != 'stress.async']
        assert pool.rejected_count == sum(
            cmd.events[0] is Event.THREAD_POOL_REJECTED for cmd in calls)
        assert pool.completed_count == sum(cmd.events[0] in ran for cmd in calls)
        assert pool.in_flight == 0
        assert pool.largest_active_count <= pool.max_workers

    # the live breaker moved only along its table
    breaker = component.circuit_breaker('stress.flaky')
    assert_legal_chain(recorder.transitions['stress.flaky'], breaker.state)
    for key in keys:
        if key != 'stress.flaky':
            assert recorder.transitions[key] == []

    # each kind of outcome really happened, or the test proves little
    primaries = collections.Counter(cmd.events[0] for cmd, _ in observed)
    for event in (Event.SUCCESS, Event.FAILURE, Event.BAD_REQUEST, Event.TIMEOUT,
                  Event.THREAD_POOL_REJECTED, Event.SEMAPHORE_REJECTED, Event.SHORT_CIRCUITED):
        assert primaries[event] > 0, (event, primaries)
    assert len(recorder.transitions['stress.flaky']) >= 3
    FIGURES["mixed"] = dict(calls=issued, seconds=round(elapsed, 2),
                            primaries={e.value: n for e, n in primaries.items()},
                            events=sum(seen.values()),
                            transitions=len(recorder.transitions['stress.flaky']))
    print('\nstress figures:', FIGURES['mixed'])


def test_callers_hammering_a_breaker_with_no_sleep_window_see_only_legal_moves(
        system_clock, caplog):
    """Trip, trial, re-open, trial, close... as fast as six threads can: one trial at a time."""
    caplog.set_level('CRITICAL', logger='blackgate')
    recorder = Recorder()
    component.add_listener(recorder)

    class Probe(Command):
        command_key = 'stress.probe'
        circuit_breaker_request_volume_threshold = 1
        circuit_breaker_sleep_window = 0.0   # every call after a trip may be the trial
        metrics_health_snapshot_interval = 0
        timeout = 30.0

        def __init__(self, fail):
            self.fail = fail

        def run(self):
            time.sleep(0.0005)
            if self.fail:
                raise ConnectionError('upstream down')
            return 'fresh'

        def fallback(self):
            return 'stale'

    calls = 300 * SCALE
    answers = []

    def caller(seed):
        rng = random.Random(seed)
        for _ in range(calls):
            cmd = Probe(rng.random() < 0.7)
            answers.append((cmd, outcome(cmd.execute)))

    threads = [threading.Thread(target=caller, args=(n,), daemon=True) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(BOUND)
    assert not any(thread.is_alive() for thread in threads), 'deadlock?'
    wait_idle([component.pool('default')], ['stress.probe'])
    assert len(answers) == 6 * calls
    for cmd, answer in answers:
        check_answer(cmd, answer)
    transitions = recorder.transitions['stress.probe']
    assert_legal_chain(transitions, component.circuit_breaker('stress.probe').state)
    trials = sum(1 for old, new in transitions if new is HALF_OPEN)
    assert trials > 10
    FIGURES['trials'] = dict(calls=6 * calls, transitions=len(transitions), trials=trials)
    print('\nprobe figures:', FIGURES['trials'])


class HeldLog(logging.Handler):
    """Holds the record of the breaker opening (before it is written) until released.

    It blocks in ``handle()``, before the handler's own lock, as a slow handler
    (a remote syslog, a full pipe) may take its time.
    """

    def __init__(self):
        super().__init__()
        self.entered = threading.Event()
        self.go_on = threading.Event()

    def handle(self, record):
        if 'opened' in record.getMessage():
            self.entered.set()
            self.go_on.wait(10.0)
        return super().handle(record)

    def emit(self, record):
        pass


def test_listeners_hear_the_moves_of_a_breaker_in_the_order_they_happened(clock):
    recorder = Recorder()
    component.add_listener(recorder)
    slow = HeldLog()
    logger = logging.getLogger('blackgate')
    logger.addHandler(slow)

    class Quick(FailsOnDemand):
        command_key = 'stress.quick'
        circuit_breaker_request_volume_threshold = 1
        circuit_breaker_sleep_window = 0.0
        metrics_health_snapshot_interval = 0

    try:
        tripping = threading.Thread(target=lambda: Quick(True).execute(), daemon=True)
        tripping.start()                     # trips CLOSED -> OPEN, then logs it (held)
        assert slow.entered.wait(10.0)
        assert Quick(False).execute() == 'fresh'   # OPEN -> HALF_OPEN -> CLOSED, announced
        slow.go_on.set()
        tripping.join(10.0)
        assert not tripping.is_alive()
    finally:
        slow.go_on.set()
        logger.removeHandler(slow)
    breaker = component.circuit_breaker('stress.quick')
    assert breaker.state is CLOSED
    assert_legal_chain(recorder.transitions['stress.quick'], breaker.state)
