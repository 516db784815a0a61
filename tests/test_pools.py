"""Fail-fast bulkheads (docs/guide.rst, Isolation; issue 3, Done when 4 and 6)."""
import asyncio
import sys
import threading
import time

import pytest

from blackgate import Command, Event, component
from blackgate.pools import Permits
from blackgate.testing import FakeClock
from support import add_pool, in_thread, run_async

WAIT = 5.0   # seconds: the bound on every wait between threads
GROUP = 'bulkhead'


class Gate:
    """Holds run()s until opened, and counts those that started."""

    def __init__(self):
        self._open = threading.Event()
        self._started = threading.Semaphore(0)
        self._lock = threading.Lock()
        self.started = 0

    def hold(self):
        with self._lock:
            self.started += 1
        self._started.release()
        self._open.wait(WAIT)

    def wait_started(self, count):
        return all(self._started.acquire(timeout=WAIT) for _ in range(count))

    def open(self):
        self._open.set()


@pytest.fixture
def gate():
    gate = Gate()
    yield gate
    gate.open()


@pytest.fixture
def admissions(clock):
    """The FakeClock, named for the tests that wait until execute() calls block on it."""
    return clock


def install_pool(max_workers, max_queue_size):
    return add_pool(GROUP, max_workers, max_queue_size)


class Held(Command):
    """Runs on the bulkhead pool and stays there until its gate opens."""

    group_key = GROUP
    command_key = 'held'

    def __init__(self, gate):
        self.gate = gate

    def run(self):
        self.gate.hold()
        return 'ran'

    def fallback(self):
        return 'fallback'


class Quick(Command):
    group_key = GROUP
    command_key = 'quick'

    def run(self):
        return 'ran'

    def fallback(self):
        return 'fallback'


async def next_iterations(count=3):
    """Let the loop run the callbacks that other threads or due timers posted."""
    for _ in range(count):
        await asyncio.sleep(0)


# -- fail-fast admission ----------------------------------------------------------------

def test_full_pool_without_queue_rejects_at_once(admissions, gate):
    pool = install_pool(max_workers=2, max_queue_size=0)
    running = [in_thread(Held(gate).execute) for _ in range(2)]
    assert gate.wait_started(2)
    assert pool.active_count == 2
    third = Held(gate)
    answer = in_thread(third.execute)
    assert answer.result(WAIT) == 'fallback'           # while both workers are still held
    assert third.events == (Event.THREAD_POOL_REJECTED, Event.FALLBACK_SUCCESS)
    assert third.is_response_rejected is True
    assert gate.started == 2                           # its run() never ran
    gate.open()
    assert [result.result(WAIT) for result in running] == ['ran', 'ran']
    assert (pool.active_count, pool.queue_size) == (0, 0)
    assert (pool.completed_count, pool.rejected_count) == (2, 1)
    metrics = component.metrics('held')
    assert metrics.rolling_count(Event.SUCCESS) == 2
    assert metrics.rolling_count(Event.THREAD_POOL_REJECTED) == 1


def test_queue_slots_admit_waiting_work_then_reject(admissions, gate):
    pool = install_pool(max_workers=2, max_queue_size=2)
    running = [in_thread(Held(gate).execute) for _ in range(2)]
    assert gate.wait_started(2)
    queued = [in_thread(Held(gate).execute) for _ in range(2)]
    assert admissions.wait_for_waiters(4, WAIT)
    assert (pool.active_count, pool.queue_size) == (2, 2)
    fifth = Held(gate)
    assert in_thread(fifth.execute).result(WAIT) == 'fallback'
    assert fifth.events == (Event.THREAD_POOL_REJECTED, Event.FALLBACK_SUCCESS)
    assert gate.started == 2                           # the queued ones wait for a worker
    gate.open()
    assert [result.result(WAIT) for result in running + queued] == ['ran'] * 4
    assert (pool.active_count, pool.queue_size) == (0, 0)
    assert (pool.completed_count, pool.rejected_count) == (4, 1)
    metrics = component.metrics('held')
    assert metrics.rolling_count(Event.SUCCESS) == 4
    assert metrics.rolling_count(Event.THREAD_POOL_REJECTED) == 1
    assert metrics.rolling_count(Event.FALLBACK_SUCCESS) == 1


@pytest.mark.parametrize('max_workers, max_queue_size', [(1, 0), (3, 0), (1, 1), (2, 3)])
def test_pool_admits_workers_plus_queue_slots_and_rejects_the_next(admissions, gate,
                                                                    max_workers, max_queue_size):
    pool = install_pool(max_workers, max_queue_size)
    capacity = max_workers + max_queue_size
    admitted = [in_thread(Held(gate).execute) for _ in range(capacity)]
    assert admissions.wait_for_waiters(capacity, WAIT)
    assert (pool.active_count, pool.queue_size) == (max_workers, max_queue_size)
    rejected = Held(gate)
    assert in_thread(rejected.execute).result(WAIT) == 'fallback'
    assert rejected.is_response_rejected is True
    gate.open()
    assert [result.result(WAIT) for result in admitted] == ['ran'] * capacity
    assert (pool.completed_count, pool.rejected_count) == (capacity, 1)


def test_freed_worker_admits_work_again(admissions, gate):
    pool = install_pool(max_workers=1, max_queue_size=0)
    held = in_thread(Held(gate).execute)
    assert gate.wait_started(1)
    assert Quick().execute() == 'fallback'
    gate.open()
    assert held.result(WAIT) == 'ran'
    command = Quick()
    assert command.execute() == 'ran'
    assert command.events == (Event.SUCCESS,)
    assert pool.active_count == 0


def test_queue_is_rejected_at_once_too(gate):
    pool = install_pool(max_workers=1, max_queue_size=0)

    async def scenario():
        first = Held(gate).queue()
        second = Held(gate)
        answer = second.queue()
        assert answer.done()                           # decided inside queue()
        assert await answer == 'fallback'
        gate.open()
        return second, await first

    second, first = run_async(scenario())
    component.shutdown()                       # the pool's own counts settle when work ends
    assert first == 'ran'
    assert second.events == (Event.THREAD_POOL_REJECTED, Event.FALLBACK_SUCCESS)
    assert pool.rejected_count == 1


class HandOffLoop(asyncio.SelectorEventLoop):
    """A loop on which a worker thread pauses right after handing it a callback.

    The worker goes on only once the loop has run that callback and whatever it
    woke up: one interleaving that the OS may always choose, made certain.
    """

    def call_soon_threadsafe(self, callback, *args, context=None):
        if threading.get_ident() == self.loop_thread:
            return super().call_soon_threadsafe(callback, *args, context=context)
        handed_off = threading.Event()

        def then_let_the_worker_go_on(*args):
            callback(*args)
            self.call_soon(self.call_soon, handed_off.set)

        handle = super().call_soon_threadsafe(then_let_the_worker_go_on, *args,
                                              context=context)
        handed_off.wait(WAIT)
        return handle

    def run(self, coroutine):
        self.loop_thread = threading.get_ident()
        try:
            return self.run_until_complete(asyncio.wait_for(coroutine, WAIT))
        finally:
            self.close()


def test_worker_is_free_again_once_queue_resolves():
    install_pool(max_workers=1, max_queue_size=0)

    async def scenario():
        commands = []
        for _ in range(3):
            command = Quick()
            await command.queue()
            commands.append(command)
        return commands

    commands = HandOffLoop().run(scenario())
    assert [command.events for command in commands] == [(Event.SUCCESS,)] * 3


def test_worker_is_free_again_once_execute_returns():
    install_pool(max_workers=1, max_queue_size=0)
    commands = [Quick() for _ in range(50)]
    for command in commands:
        command.execute()
    assert [command.events for command in commands] == [(Event.SUCCESS,)] * 50


def test_pools_are_separate_bulkheads(admissions, gate):
    install_pool(max_workers=1, max_queue_size=0)
    component.add('executor_pool', {'group_key': 'other', 'max_workers': 1})
    component.install()
    held = in_thread(Held(gate).execute)
    assert gate.wait_started(1)
    elsewhere = type('Elsewhere', (Quick,), {'group_key': 'other', 'command_key': 'elsewhere'})
    assert elsewhere().execute() == 'ran'              # the full 'bulkhead' pool is not shared
    gate.open()
    assert held.result(WAIT) == 'ran'


# -- timeouts and busy workers ----------------------------------------------------------

class LongHeld(Held):
    command_key = 'long_held'
    timeout = 60.0


class Queued(Command):
    group_key = GROUP
    command_key = 'queued'
    ran = None      # set per test to a threading.Event

    def run(self):
        self.ran.set()
        return 'ran'

    def fallback(self):
        return 'fallback'


@pytest.fixture
def queued_ran():
    Queued.ran = threading.Event()
    return Queued.ran

# -- what a pool tells of itself ------------------------------------------------------------

def test_a_pool_is_used_once_work_was_submitted_admitted_or_not(gate):
    pool = install_pool(1, 0)
    assert not pool.used
    assert Quick().execute() == 'ran'
    assert pool.used
    other = add_pool('refusing', 1, 0)
    other.shutdown()
    Refused = type('Refused', (Quick,), {'group_key': 'refusing', 'command_key': 'refused'})
    assert Refused().execute() == 'fallback'      # refused: a shut-down pool admits nothing
    assert other.used and other.rejected_count == 1


def test_pool_size_counts_the_threads_started_one_per_work_held_at_once(gate):
    pool = install_pool(6, 0)
    assert pool.pool_size == 0
    held = [in_thread(Held(gate).execute) for _ in range(4)]
    assert gate.wait_started(4)
    # The submitting thread records a thread it started just after starting it, so the
    # count may trail the runs by a moment; it never goes past the four.
    pause = threading.Event()
    for _ in range(500):
        if pool.pool_size == 4:
            break
        pause.wait(0.01)
    assert pool.pool_size == 4
    gate.open()
    assert [future.result(WAIT) for future in held] == ['ran'] * 4
    assert pool.pool_size == 4                    # ThreadPoolExecutor keeps its threads


def test_time_waiting_in_the_queue_counts_against_the_timeout(clock, gate, queued_ran):
    pool = install_pool(max_workers=1, max_queue_size=1)

    async def scenario():
        holder = LongHeld(gate).queue()
        assert gate.wait_started(1)
        waiting = Queued()
        answer = waiting.queue()
        assert pool.queue_size == 1
        clock.advance(0.9)
        await next_iterations()
        assert not answer.done()
        clock.advance(0.1)                             # 1.0 s since admission: the timeout
        assert await answer == 'fallback'
        assert not queued_ran.is_set()                 # run() never started
        gate.open()
        assert await holder == 'ran'
        return waiting

    waiting = run_async(scenario())
    assert waiting.events == (Event.TIMEOUT, Event.FALLBACK_SUCCESS)


def test_command_that_timed_out_in_the_queue_never_runs(clock, gate, queued_ran):
    install_pool(max_workers=1, max_queue_size=1)

    async def scenario():
        holder = LongHeld(gate).queue()
        assert gate.wait_started(1)
        answer = Queued().queue()
        clock.advance(1.0)
        assert await answer == 'fallback'
        gate.open()
        assert await holder == 'ran'

    run_async(scenario())
    component.shutdown()                               # waits for queued work
    assert not queued_ran.is_set()


def test_execute_that_timed_out_in_the_queue_never_runs(admissions, gate, queued_ran):
    pool = install_pool(max_workers=1, max_queue_size=1)
    holder = in_thread(LongHeld(gate).execute)
    assert gate.wait_started(1)
    waiting = Queued()
    answer = in_thread(waiting.execute)
    assert admissions.wait_for_waiters(2, WAIT)
    assert pool.queue_size == 1
    admissions.advance(1.0)
    assert answer.result(WAIT) == 'fallback'
    assert waiting.events == (Event.TIMEOUT, Event.FALLBACK_SUCCESS)
    gate.open()
    assert holder.result(WAIT) == 'ran'
    component.shutdown()                               # waits for queued work
    assert not queued_ran.is_set()


def test_timed_out_run_keeps_its_worker_busy_until_it_returns(clock, gate):
    pool = install_pool(max_workers=1, max_queue_size=0)

    async def scenario():
        command = Held(gate)
        answer = command.queue()
        assert gate.wait_started(1)
        clock.advance(1.0)
        assert await answer == 'fallback'              # the caller does not wait for run()
        assert command.events == (Event.TIMEOUT, Event.FALLBACK_SUCCESS)
        assert pool.active_count == 1
        assert component.metrics('held').concurrent_executions == 1
        blocked = Quick()
        assert await blocked.queue() == 'fallback'     # the busy worker still counts
        assert blocked.events == (Event.THREAD_POOL_REJECTED, Event.FALLBACK_SUCCESS)
        gate.open()

    run_async(scenario())
    component.shutdown()                               # waits for the held run() to return
    assert pool.active_count == 0
    assert component.metrics('held').concurrent_executions == 0


def test_late_result_of_a_timed_out_run_is_dropped(clock, gate):
    pool = install_pool(max_workers=1, max_queue_size=1)

    async def scenario():
        command = Held(gate)
        answer = command.queue()
        assert gate.wait_started(1)
        clock.advance(1.0)
        assert await answer == 'fallback'
        after = Quick()
        later = after.queue()                          # queued behind the busy worker
        assert pool.queue_size == 1
        gate.open()
        # The worker posts the late result before it takes the next command.
        assert await later == 'ran'
        await next_iterations()
        return command

    command = run_async(scenario())
    component.shutdown()                       # the pool's own counts settle when work ends
    assert command.events == (Event.TIMEOUT, Event.FALLBACK_SUCCESS)
    assert command.is_successful_execution is False
    assert command.is_response_timed_out is True
    metrics = component.metrics('held')
    assert metrics.rolling_count(Event.TIMEOUT) == 1
    assert metrics.rolling_count(Event.SUCCESS) == 0
    assert metrics.health().total_requests == 1
    assert (pool.active_count, pool.completed_count) == (0, 2)


# -- thread safety (issue 3, Done when 4) -----------------------------------------------

class Counted(Command):
    command_key = 'counted'
    group_key = GROUP

    def run(self):
        return 'ran'

    def fallback(self):
        return 'fallback'


def call_from_threads(threads, calls_each, make_command):
    """``execute()`` from ``threads`` threads at once; the commands, in one list."""
    barrier = threading.Barrier(threads)

    def worker():
        barrier.wait(WAIT)
        commands = [make_command() for _ in range(calls_each)]
        for command in commands:
            command.execute()
        return commands

    futures = [in_thread(worker) for _ in range(threads)]
    return [command for future in futures for command in future.result(30)]


def test_rolling_counts_equal_calls_from_sixteen_threads_exactly():
    pool = install_pool(max_workers=16, max_queue_size=0)
    commands = call_from_threads(16, 625, Counted)
    assert len(commands) == 10_000
    assert all(command.events == (Event.SUCCESS,) for command in commands)
    metrics = component.metrics('counted')
    assert metrics.rolling_count(Event.SUCCESS) == 10_000
    assert metrics.health().total_requests == 10_000
    assert metrics.rolling_count(Event.THREAD_POOL_REJECTED) == 0
    assert (pool.completed_count, pool.rejected_count) == (10_000, 0)
    assert metrics.concurrent_executions == 0


def test_rejections_from_many_threads_are_counted_exactly():
    class Busy(Counted):
        command_key = 'busy'
        circuit_breaker_enabled = False    # rejections are errors; keep every call admitted to try

        def run(self):
            time.sleep(0.0005)             # the work: lets callers pile up on 4 workers
            return 'ran'

    pool = install_pool(max_workers=4, max_queue_size=2)
    commands = call_from_threads(16, 100, Busy)
    successes = sum(command.events == (Event.SUCCESS,) for command in commands)
    rejections = sum(command.events == (Event.THREAD_POOL_REJECTED, Event.FALLBACK_SUCCESS)
                     for command in commands)
    assert successes + rejections == 1_600
    assert rejections > 0
    metrics = component.metrics('busy')
    assert metrics.rolling_count(Event.SUCCESS) == successes == pool.completed_count
    assert metrics.rolling_count(Event.THREAD_POOL_REJECTED) == rejections == pool.rejected_count
    assert metrics.rolling_count(Event.FALLBACK_SUCCESS) == rejections


class Admitted(Command):
    command_key = 'admitted'
    group_key = GROUP
    circuit_breaker_enabled = False        # rejections are errors; keep the breaker out of it
    work = None                            # set per test

    def run(self):
        self.work()
        return 'ran'

    def fallback(self):
        return 'fallback'


def tally(commands):
    successes = sum(command.events == (Event.SUCCESS,) for command in commands)
    rejections = sum(command.events == (Event.THREAD_POOL_REJECTED, Event.FALLBACK_SUCCESS)
                     for command in commands)
    return successes, rejections


def test_thousand_concurrent_queue_calls_are_counted_exactly():
    pool = install_pool(max_workers=10, max_queue_size=50)
    Admitted.work = staticmethod(lambda: time.sleep(0.0005))

    async def scenario():
        commands, futures = [], []
        for i in range(1_000):
            command = Admitted()
            commands.append(command)
            futures.append(command.queue())
            if i % 250 == 249:
                await asyncio.sleep(0)         # let finished work come back meanwhile
        results = await asyncio.gather(*futures)
        return commands, results

    commands, results = run_async(scenario(), timeout=30)
    component.shutdown()                       # the pool's own counts settle when work ends
    successes, rejections = tally(commands)
    assert successes + rejections == 1_000
    assert rejections > 0
    assert results.count('ran') == successes
    assert results.count('fallback') == rejections
    metrics = component.metrics('admitted')
    assert metrics.rolling_count(Event.SUCCESS) == successes == pool.completed_count
    assert metrics.rolling_count(Event.THREAD_POOL_REJECTED) == rejections == pool.rejected_count
    assert metrics.rolling_count(Event.TIMEOUT) == 0


def test_thousand_queue_calls_on_held_workers_admit_exactly_workers_plus_queue(gate):
    pool = install_pool(max_workers=10, max_queue_size=100)
    Admitted.work = gate.hold

    async def scenario():
        commands = [Admitted() for _ in range(1_000)]
        futures = [command.queue() for command in commands]
        assert (pool.active_count, pool.queue_size) == (10, 100)
        gate.open()
        await asyncio.gather(*futures)
        return commands

    commands = run_async(scenario(), timeout=30)
    component.shutdown()                       # the pool's own counts settle when work ends
    assert tally(commands) == (110, 890)
    metrics = component.metrics('admitted')
    assert metrics.rolling_count(Event.SUCCESS) == 110
    assert metrics.rolling_count(Event.THREAD_POOL_REJECTED) == 890
    assert (pool.active_count, pool.queue_size) == (0, 0)


# -- no lock across user code (issue 3, Done when 6) ------------------------------------

class Slow(Admitted):
    command_key = 'slow'
    timeout = 5.0


def test_hundred_twenty_ms_runs_on_ten_workers_take_ten_rounds_not_a_hundred(system_clock):
    pool = install_pool(max_workers=10, max_queue_size=100)
    lock = threading.Lock()
    running = most = 0

    def work():
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.02)                       # the work itself
        with lock:
            running -= 1

    Slow.work = staticmethod(work)

    async def scenario():
        commands = [Slow() for _ in range(100)]
        started = time.monotonic()
        results = await asyncio.gather(*(command.queue() for command in commands))
        return commands, results, time.monotonic() - started

    commands, results, elapsed = run_async(scenario(), timeout=10)
    component.shutdown()                       # the pool's own counts settle when work ends
    assert results == ['ran'] * 100
    assert all(command.events == (Event.SUCCESS,) for command in commands)
    assert 0.19 <= elapsed < 1.0               # 10 rounds = 0.2 s; serial would be 2 s
    assert most == 10
    assert pool.completed_count == 100


def test_permits_never_admit_more_than_their_limit_under_contention():
    # Permits take no lock (a thread takes one, then gives it back if that went over the
    # limit), so a race may refuse a caller that could have had the last permit: never
    # admit one too many, and count every refusal.
    permits = Permits(3)
    guard = threading.Lock()
    held = [0, 0]            # now, most ever
    refused = [0] * 8
    barrier = threading.Barrier(8)

    def contend(me):
        barrier.wait(30)
        for _ in range(5000):
            if not permits.try_acquire():
                refused[me] += 1
                continue
            with guard:
                held[0] += 1
                held[1] = max(held)
            with guard:
                held[0] -= 1
            permits.release()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        futures = [in_thread(contend, me) for me in range(8)]
        for future in futures:
            future.result(60)
    finally:
        sys.setswitchinterval(interval)
    assert 1 <= held[1] <= 3
    assert sum(refused) == permits.rejected > 0
    assert permits.in_use == 0


# -- install() swapping a pool under load (issue 18, point 13) ------------------------------------

class InstallsOnce(FakeClock):
    """A FakeClock whose next reading, once armed, runs component.install() first.

    A command reads the clock between taking its (cached) pool and submitting to
    it, so this puts an install() exactly in the window where a call under load
    met a pool that had just been shut down.
    """

    armed = False

    def monotonic(self):
        if self.armed:
            self.armed = False
            component.install()
        return super().monotonic()


def _resize_between_lookup_and_submit(max_workers):
    clock = component.clock = InstallsOnce()
    install_pool(2, 0)
    assert Quick().execute() == 'ran'          # the class's pool is now cached
    old = component.pool(GROUP)
    component.add('executor_pool', {'group_key': GROUP, 'max_workers': max_workers})
    clock.armed = True
    return old


@pytest.mark.parametrize('driver', ['execute', 'queue'])
def test_a_call_that_took_the_pool_just_before_install_replaced_it_runs_on_the_new_one(driver):
    old = _resize_between_lookup_and_submit(3)
    cmd = Quick()
    if driver == 'execute':
        result = cmd.execute()
    else:
        async def queued():
            return await cmd.queue()
        result = run_async(queued())
    assert (result, cmd.events) == ('ran', (Event.SUCCESS,))   # not 'executor pool is shut down'
    new = component.pool(GROUP)
    assert new is not old and new.max_workers == 3
    assert old.is_shut_down and old.successor is new
    assert (old.rejected_count, new.rejected_count) == (0, 0)


def test_work_running_on_a_replaced_pool_finishes_there_and_new_work_goes_to_the_new_one(gate):
    install_pool(1, 0)
    old = component.pool(GROUP)
    running = in_thread(Held(gate).execute)
    assert gate.wait_started(1)
    component.add('executor_pool', {'group_key': GROUP, 'max_workers': 2})
    component.install()
    new = component.pool(GROUP)
    assert old.successor is new
    # the old pool's one worker is busy: a call that still holds the old pool is passed on
    assert old.try_submit(lambda release: release() or 'passed on').result(WAIT) == 'passed on'
    assert Quick().execute() == 'ran'
    gate.open()
    assert running.result(WAIT) == 'ran'
    assert old.in_flight == 0 and old.rejected_count == 0


def test_a_slot_taken_without_a_thread_from_a_replaced_pool_comes_from_its_successor():
    install_pool(1, 0)
    old = component.pool(GROUP)
    component.add('executor_pool', {'group_key': GROUP, 'max_workers': 2})
    component.install()
    new = component.pool(GROUP)
    release = old.try_admit()   # an HTTPProxyCommand that looked the pool up just before
    assert release is not None and (old.in_flight, new.in_flight) == (0, 1)
    assert new.try_admit() is not None and new.try_admit() is None   # the new bound: 2
    release()
    assert new.in_flight == 1 and old.rejected_count == 0


def test_installs_under_load_reject_nothing(clock):
    """The chaos run's shape, bounded: callers hammer while install() keeps resizing the pool."""
    install_pool(4, 0)
    stop = threading.Event()
    outcomes = []

    def caller():
        events = []
        while not stop.is_set():
            cmd = Quick()
            cmd.execute()
            events.append(cmd.events[0])
        return events

    callers = [in_thread(caller) for _ in range(4)]   # never more calls than workers
    for size in [5, 4] * 20:
        component.add('executor_pool', {'group_key': GROUP, 'max_workers': size})
        component.install()
    stop.set()
    for future in callers:
        outcomes += future.result(WAIT)
    assert outcomes and set(outcomes) == {Event.SUCCESS}
