"""Command.queue() and async commands (docs/guide.rst, execute() and queue()).

The queue() timeout is an IOLoop timer that follows the FakeClock: the test
advances the clock and the timer fires on the next loop iteration. Workers are
held on a ``Gate`` (a threading.Event; ``support.Gate``, made by conftest's
``gates`` fixture), async runs on an ``asyncio.Event``; every wait is bounded
(``WAIT``, and pytest-tornado's own test timeout). ``Held``, ``Tiny`` and their
variants are the commands of test_command.py too, from support.py.
"""
import asyncio
import gc
import logging
import sys
import threading

import pytest
import tornado.gen
import tornado.ioloop

from blackgate import (BadRequest, BlackgateError, BreakerState, Command, CommandError, Event,
                       FailureType, component)
from blackgate.testing import FakeClock
from support import ForcedOpenNoFallback, Held, HeldNoFallback, Tiny, TinyNoFallback, add_pool

#: Real seconds: the longest a test waits for a thread before it fails.
WAIT = 5.0


# -- helpers -------------------------------------------------------------------------------

async def in_thread(fn, *args):
    """``fn(*args)`` on a helper thread, awaited without blocking the loop."""
    loop = asyncio.get_running_loop()
    return await asyncio.wait_for(loop.run_in_executor(None, fn, *args), WAIT)


async def entered(gate):
    assert await in_thread(gate.entered.wait, WAIT), 'run() never reached the gate'


async def spin(times=5):
    """Let the loop run the callbacks already scheduled (a FakeClock timer fires this way)."""
    for _ in range(times):
        await asyncio.sleep(0)


async def drain_workers():
    """Wait until every worker finished (component.shutdown waits), then run what they posted."""
    await in_thread(component.shutdown)
    await spin()


def loop_trouble(caplog):
    """Records that tell of a broken future: lost exceptions, failing callbacks."""
    return [record for record in caplog.records
            if record.levelno >= logging.ERROR or record.name == 'asyncio'
            or record.name.startswith('tornado')]


# -- commands ------------------------------------------------------------------------------

class Echo(Command):
    def __init__(self, value='fresh'):
        self.value = value

    def run(self):
        return self.value

    def fallback(self):
        return 'stale'


class HeldFailing(Held):
    def run(self):
        self.gate.hold()
        raise ConnectionError('upstream down')


class HeldFailingNoFallback(Command):
    def __init__(self, gate):
        self.gate = gate

    def run(self):
        self.gate.hold()
        raise ConnectionError('upstream down')


class Broken(Command):
    def __init__(self):
        self.error = ConnectionError('upstream down')
        self.fallback_calls = 0

    def run(self):
        raise self.error

    def fallback(self):
        self.fallback_calls += 1
        return 'stale'


class BrokenNoFallback(Command):
    def __init__(self):
        self.error = ConnectionError('upstream down')

    def run(self):
        raise self.error


class BrokenFallbackRaises(Command):
    def __init__(self):
        self.error = ConnectionError('upstream down')
        self.fallback_error = LookupError('cache empty')

    def run(self):
        raise self.error

    def fallback(self):
        raise self.fallback_error


class Invalid(Command):
    def __init__(self):
        self.error = BadRequest('user id must be a number')
        self.fallback_calls = 0

    def run(self):
        raise self.error

    def fallback(self):
        self.fallback_calls += 1
        return 'stale'


class AsyncInvalid(Invalid):
    async def run(self):
        raise self.error


class Where(Command):
    """Records the thread of run() and of fallback()."""

    def __init__(self, fail=True):
        self.fail = fail

    def run(self):
        self.run_thread = threading.current_thread()
        if self.fail:
            raise ConnectionError('upstream down')
        return 'fresh'

    def fallback(self):
        self.fallback_thread = threading.get_ident()
        return 'stale'


class HeldWhere(Held):
    def fallback(self):
        self.fallback_thread = threading.get_ident()
        return 'stale'


class ForcedOpenWhere(Where):
    circuit_breaker_force_open = True


class AsyncHeld(Command):
    """async run() awaits ``release``; at most two at once."""

    max_concurrent_requests = 2

    def __init__(self, release):
        self.release = release
        self.cancelled = False

    async def run(self):
        self.thread = threading.get_ident()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        return 'fresh'

    def fallback(self):
        self.fallback_thread = threading.get_ident()
        return 'stale'


class AsyncHeldNoFallback(Command):
    max_concurrent_requests = 1

    def __init__(self, release):
        self.release = release

    async def run(self):
        await self.release.wait()
        return 'fresh'


class AsyncBroken(Command):
    max_concurrent_requests = 1

    async def run(self):
        await asyncio.sleep(0)
        raise ConnectionError('upstream down')

    def fallback(self):
        return 'stale'


class AsyncFallback(Command):
    """A sync run() that raises, answered by an async def fallback()."""

    def __init__(self):
        self.error = ConnectionError('upstream down')

    def run(self):
        raise self.error

    async def fallback(self):
        await asyncio.sleep(0)
        self.fallback_thread = threading.get_ident()
        return 'stale'


class AsyncFallbackRaises(AsyncFallback):
    async def fallback(self):
        await asyncio.sleep(0)
        self.fallback_error = LookupError('cache empty')
        raise self.fallback_error


class SlowAsyncFallback(Command):
    """run() raises; the async fallback awaits ``release``. One fallback at a time."""

    fallback_max_concurrent_requests = 1

    def __init__(self, release):
        self.release = release
        self.error = ConnectionError('upstream down')

    def run(self):
        raise self.error

    async def fallback(self):
        await self.release.wait()
        return 'stale'


# -- the future ------------------------------------------------------------------------------

@pytest.mark.gen_test
async def test_queue_returns_a_future_awaitable_in_async_def():
    assert await Echo('fresh').queue() == 'fresh'


def test_queue_returns_a_future_yieldable_in_a_gen_coroutine(io_loop):
    @tornado.gen.coroutine
    def handler_code():
        user_id = yield Echo('user-1').queue()
        return user_id

    assert io_loop.run_sync(handler_code, timeout=WAIT) == 'user-1'


@pytest.mark.gen_test
async def test_queue_works_inside_a_gen_coroutine_called_from_async_def():
    @tornado.gen.coroutine
    def handler_code():
        user_id = yield Echo('user-1').queue()
        return user_id

    assert await handler_code() == 'user-1'


@pytest.mark.gen_test
async def test_queued_command_reports_what_happened():
    cmd = Broken()
    assert await cmd.queue() == 'stale'
    assert cmd.events == (Event.FAILURE, Event.FALLBACK_SUCCESS)
    assert cmd.is_failed_execution is True
    assert cmd.is_response_from_fallback is True
    assert cmd.execution_exception is cmd.error


def test_queue_without_a_running_loop_raises_blackgate_error_naming_execute():
    with pytest.raises(BlackgateError, match=r'execute\(\)'):
        Echo().queue()


def test_queue_with_a_current_but_stopped_ioloop_raises_blackgate_error(io_loop):
    with pytest.raises(BlackgateError, match=r'execute\(\)'):
        Echo().queue()


def test_queue_refused_without_a_loop_leaves_the_instance_usable():
    cmd = Echo('fresh')
    with pytest.raises(BlackgateError):
        cmd.queue()
    assert cmd.events == ()
    assert cmd.execute() == 'fresh'


# -- the loop is never blocked ------------------------------------------------------------------

@pytest.mark.gen_test
async def test_queue_returns_before_run_finishes(gates):
    gate = gates()
    future = Held(gate).queue()
    assert not future.done()
    await entered(gate)
    assert not future.done()


@pytest.mark.gen_test
async def test_loop_serves_callbacks_while_run_is_held(gates):
    gate = gates()
    future = Held(gate).queue()
    await entered(gate)
    served = []
    last = asyncio.Event()
    io_loop = tornado.ioloop.IOLoop.current()
    for n in range(10):
        io_loop.call_later(0, served.append, n)
    io_loop.call_later(0, last.set)
    await asyncio.wait_for(last.wait(), WAIT)
    assert served == list(range(10))
    assert not future.done()
    gate.open()
    assert await future == 'late'


@pytest.mark.gen_test
async def test_other_coroutines_progress_while_run_is_held(gates):
    gate = gates()
    future = Held(gate).queue()
    progress = []

    async def other():
        for n in range(100):
            progress.append(n)
            await asyncio.sleep(0)
        return 'done'

    assert await other() == 'done'
    assert len(progress) == 100
    assert not future.done()
    gate.open()
    assert await future == 'late'


@pytest.mark.gen_test
async def test_result_arrives_after_release(gates):
    gate = gates()
    cmd = Held(gate)
    future = cmd.queue()
    await entered(gate)
    gate.open()
    assert await future == 'late'
    assert cmd.events == (Event.SUCCESS,)


# -- the timeout is an IOLoop timer on the injected clock ---------------------------------------

@pytest.mark.gen_test
async def test_queue_times_out_when_the_clock_passes_the_timeout(clock, gates):
    gate = gates()
    cmd = Held(gate)
    future = cmd.queue()
    await entered(gate)
    clock.advance(cmd.timeout)
    assert await asyncio.wait_for(future, WAIT) == 'stale'
    assert cmd.events == (Event.TIMEOUT, Event.FALLBACK_SUCCESS)
    assert cmd.is_response_timed_out is True


@pytest.mark.gen_test
async def test_queue_timeout_answers_while_the_worker_is_still_busy(clock, gates):
    gate = gates()
    cmd = Held(gate)
    future = cmd.queue()
    await entered(gate)
    clock.advance(cmd.timeout)
    await asyncio.wait_for(future, WAIT)
    assert component.metrics('Held').concurrent_executions == 1


@pytest.mark.gen_test
async def test_queue_does_not_time_out_before_the_timeout(clock, gates):
    gate = gates()
    cmd = Held(gate)
    future = cmd.queue()
    await entered(gate)
    clock.advance(cmd.timeout * 0.9)
    await spin()
    assert not future.done()
    gate.open()
    assert await future == 'late'


@pytest.mark.gen_test
async def test_queue_execution_time_at_timeout_is_the_timeout(clock, gates):
    gate = gates()
    cmd = Held(gate)
    future = cmd.queue()
    clock.advance(cmd.timeout)
    await asyncio.wait_for(future, WAIT)
    assert cmd.execution_time == cmd.timeout


@pytest.mark.gen_test
async def test_late_result_after_queue_timeout_is_dropped(clock, gates, caplog):
    gate = gates()
    cmd = Held(gate)
    future = cmd.queue()
    await entered(gate)
    clock.advance(cmd.timeout)
    assert await asyncio.wait_for(future, WAIT) == 'stale'
    metrics = component.metrics('Held')
    before = metrics.rolling_counts()
    gate.open()
    await drain_workers()
    assert metrics.rolling_counts() == before
    assert metrics.rolling_count(Event.SUCCESS) == 0
    assert cmd.events == (Event.TIMEOUT, Event.FALLBACK_SUCCESS)
    assert future.result() == 'stale'
    assert loop_trouble(caplog) == []


@pytest.mark.gen_test
async def test_late_failure_after_queue_timeout_logs_nothing_more(clock, gates, caplog):
    caplog.set_level(logging.DEBUG, logger='blackgate')
    gate = gates()
    cmd = HeldFailing(gate)
    future = cmd.queue()
    await entered(gate)
    clock.advance(cmd.timeout)
    assert await asyncio.wait_for(future, WAIT) == 'stale'
    logged = len(caplog.records)
    gate.open()
    await drain_workers()
    assert len(caplog.records) == logged
    assert component.metrics('HeldFailing').rolling_count(Event.FAILURE) == 0


class Narrow(Held):
    group_key = 'narrow'


class NarrowBlocker(Held):
    group_key = 'narrow'
    timeout_enabled = False


@pytest.mark.gen_test
async def test_queue_timeout_starts_at_admission_so_time_in_the_pool_queue_counts(clock,
                                                                                  gates):
    add_pool('narrow', 1, max_queue_size=1)
    gate = gates()
    blocker = NarrowBlocker(gate).queue()
    await entered(gate)
    queued = Narrow(gates())
    future = queued.queue()
    clock.advance(queued.timeout)
    assert await asyncio.wait_for(future, WAIT) == 'stale'
    assert queued.events == (Event.TIMEOUT, Event.FALLBACK_SUCCESS)
    assert not queued.ran.is_set()
    gate.open()
    assert await blocker == 'late'


class LateClock(FakeClock):
    """A FakeClock under which the loop is descheduled right after admission.

    The timer of ``queue()`` is armed only once ``run()`` has taken its time, as when
    the OS runs the worker before the IOLoop thread that submitted it.
    """

    def __init__(self):
        super().__init__()
        self.run_took_its_time = threading.Event()

    def call_later(self, loop, delay, callback):
        self.run_took_its_time.wait(WAIT)
        return super().call_later(loop, delay, callback)


class Overrun(Command):
    """run() takes twice its timeout of the injected clock, then answers."""

    def run(self):
        clock = component.clock
        clock.advance(2 * self.timeout)
        if isinstance(clock, LateClock):
            clock.run_took_its_time.set()
        return 'late'

    def fallback(self):
        return 'stale'


@pytest.mark.parametrize('attempt', range(5))
@pytest.mark.gen_test
async def test_queued_run_that_outlasts_its_timeout_by_the_injected_clock_times_out(attempt):
    cmd = Overrun()
    assert await asyncio.wait_for(cmd.queue(), WAIT) == 'stale'
    assert cmd.events == (Event.TIMEOUT, Event.FALLBACK_SUCCESS)


@pytest.mark.gen_test
async def test_queued_run_that_outlasts_its_timeout_since_admission_times_out():
    component.clock = LateClock()
    cmd = Overrun()
    assert await asyncio.wait_for(cmd.queue(), WAIT) == 'stale'
    assert cmd.events == (Event.TIMEOUT, Event.FALLBACK_SUCCESS)


@pytest.mark.gen_test
async def test_queued_command_that_timed_out_in_the_pool_queue_never_runs(clock, gates):
    add_pool('narrow', 1, max_queue_size=1)
    gate = gates()
    blocker = NarrowBlocker(gate).queue()
    await entered(gate)
    queued = Narrow(gates())
    future = queued.queue()
    clock.advance(queued.timeout)
    assert await asyncio.wait_for(future, WAIT) == 'stale'
    gate.open()
    assert await blocker == 'late'
    await drain_workers()
    assert not queued.ran.is_set()
    assert queued.events == (Event.TIMEOUT, Event.FALLBACK_SUCCESS)


@pytest.mark.gen_test
async def test_sequential_queue_calls_through_a_one_worker_pool_are_never_rejected():
    add_pool('tiny', 1)
    results = [await Tiny().queue() for _ in range(50)]
    assert results == ['fresh'] * 50
    assert component.metrics('Tiny').rolling_count(Event.THREAD_POOL_REJECTED) == 0


@pytest.mark.gen_test
async def test_queue_with_timeout_disabled_waits_for_a_slow_run(clock, gates):
    class Patient(Held):
        timeout_enabled = False

    gate = gates()
    cmd = Patient(gate)
    future = cmd.queue()
    await entered(gate)
    clock.advance(cmd.timeout * 5)
    await spin()
    assert not future.done()
    gate.open()
    assert await future == 'late'
    assert cmd.events == (Event.SUCCESS,)


# -- threads ---------------------------------------------------------------------------------

@pytest.mark.gen_test
async def test_sync_run_of_a_queued_command_runs_on_a_blackgate_worker():
    cmd = Where(fail=False)
    assert await cmd.queue() == 'fresh'
    assert cmd.run_thread.name.startswith('blackgate-')
    assert cmd.run_thread is not threading.current_thread()


@pytest.mark.gen_test
async def test_fallback_of_a_failed_sync_command_runs_on_the_ioloop_thread():
    cmd = Where()
    assert await cmd.queue() == 'stale'
    assert cmd.run_thread.name.startswith('blackgate-')
    assert cmd.fallback_thread == threading.get_ident()


@pytest.mark.gen_test
async def test_fallback_of_a_timed_out_sync_command_runs_on_the_ioloop_thread(clock, gates):
    gate = gates()
    cmd = HeldWhere(gate)
    future = cmd.queue()
    await entered(gate)
    clock.advance(cmd.timeout)
    assert await asyncio.wait_for(future, WAIT) == 'stale'
    assert cmd.fallback_thread == threading.get_ident()


@pytest.mark.gen_test
async def test_fallback_of_a_short_circuited_command_runs_on_the_ioloop_thread():
    cmd = ForcedOpenWhere()
    assert await cmd.queue() == 'stale'
    assert cmd.fallback_thread == threading.get_ident()
    assert not hasattr(cmd, 'run_thread')


# -- async def run -----------------------------------------------------------------------------

@pytest.mark.gen_test
async def test_async_run_runs_on_the_ioloop_thread():
    release = asyncio.Event()
    release.set()
    cmd = AsyncHeld(release)
    assert await cmd.queue() == 'fresh'
    assert cmd.thread == threading.get_ident()
    assert cmd.events == (Event.SUCCESS,)


@pytest.mark.gen_test
async def test_async_run_uses_no_worker_thread():
    release = asyncio.Event()
    release.set()
    before = set(threading.enumerate())
    assert await AsyncHeld(release).queue() == 'fresh'
    started = [t for t in set(threading.enumerate()) - before if t.name.startswith('blackgate-')]
    assert started == []


@pytest.mark.gen_test
async def test_async_run_over_max_concurrent_requests_is_semaphore_rejected_at_once():
    release = asyncio.Event()
    running = [AsyncHeld(release).queue() for _ in range(2)]
    cmd = AsyncHeld(release)
    third = cmd.queue()
    assert await asyncio.wait_for(third, WAIT) == 'stale'
    assert not any(future.done() for future in running)
    assert cmd.events == (Event.SEMAPHORE_REJECTED, Event.FALLBACK_SUCCESS)
    assert cmd.is_response_rejected is True
    assert cmd.execution_time is None
    release.set()
    assert await asyncio.gather(*running) == ['fresh', 'fresh']


@pytest.mark.gen_test
async def test_semaphore_rejection_is_counted():
    release = asyncio.Event()
    running = [AsyncHeld(release).queue() for _ in range(2)]
    for _ in range(3):
        await AsyncHeld(release).queue()
    release.set()
    await asyncio.gather(*running)
    metrics = component.metrics('AsyncHeld')
    assert metrics.rolling_count(Event.SEMAPHORE_REJECTED) == 3
    assert metrics.rolling_count(Event.SUCCESS) == 2


@pytest.mark.gen_test
async def test_semaphore_permits_come_back_after_completion():
    release = asyncio.Event()
    running = [AsyncHeld(release).queue() for _ in range(2)]
    release.set()
    assert await asyncio.gather(*running) == ['fresh', 'fresh']
    again = [AsyncHeld(release) for _ in range(2)]
    assert await asyncio.gather(*(cmd.queue() for cmd in again)) == ['fresh', 'fresh']
    assert [cmd.events for cmd in again] == [(Event.SUCCESS,)] * 2


@pytest.mark.gen_test
async def test_semaphore_permit_comes_back_after_a_failure():
    for _ in range(3):
        cmd = AsyncBroken()
        assert await cmd.queue() == 'stale'
        assert cmd.events == (Event.FAILURE, Event.FALLBACK_SUCCESS)


class InItsOwnTask(Command):
    """async run() that notes the task it runs in, before and after it suspends."""

    async def run(self):
        self.tasks = [asyncio.current_task()]
        await asyncio.sleep(0)
        self.tasks.append(asyncio.current_task())
        return 'fresh'


@pytest.mark.gen_test
async def test_async_run_runs_in_a_task_of_its_own_from_its_first_step():
    # So that what run() sets up before it first suspends (asyncio.timeout(), a TaskGroup,
    # a cancel scope) belongs to run()'s task, never to the caller's.
    cmd = InItsOwnTask()
    assert await cmd.queue() == 'fresh'
    caller = asyncio.current_task()
    assert cmd.tasks[0] is cmd.tasks[1]
    assert cmd.tasks[0] is not caller


@pytest.mark.skipif(sys.version_info < (3, 11), reason='asyncio.timeout() is new in 3.11')
@pytest.mark.gen_test
async def test_asyncio_timeout_inside_async_run_cancels_run_not_the_caller():
    class WithItsOwnTimeout(Command):
        timeout_enabled = False

        async def run(self):
            async with asyncio.timeout(0.01):
                await asyncio.Event().wait()

        def fallback(self):
            return 'stale'

    cmd = WithItsOwnTimeout()
    assert await asyncio.wait_for(cmd.queue(), WAIT) == 'stale'
    assert cmd.events == (Event.FAILURE, Event.FALLBACK_SUCCESS)
    assert isinstance(cmd.execution_exception, TimeoutError)
    assert asyncio.current_task().cancelling() == 0


@pytest.mark.gen_test
async def test_async_run_that_needs_no_io_is_answered_without_waiting_for_the_loop():
    class Cached(Command):
        async def run(self):
            return 'fresh'

    future = Cached().queue()
    if sys.version_info >= (3, 12):   # eager tasks: run() went as far as it could at once
        assert future.done() and future.result() == 'fresh'
    else:
        assert await future == 'fresh'


@pytest.mark.gen_test
async def test_async_run_result_reaches_the_caller_in_the_loop_pass_it_finished_in():
    # Blackgate settles the future inside run()'s own task step: no extra pass of the loop.
    release = asyncio.Event()
    cmd = AsyncHeld(release)
    future = cmd.queue()
    await spin()
    release.set()
    passes = 0
    while not future.done():
        await asyncio.sleep(0)
        passes += 1
    # run() resumes, returns and settles the future in the first pass after the release
    assert passes == 1
    assert future.result() == 'fresh'


@pytest.mark.gen_test
async def test_async_run_timeout_cancels_the_coroutine_and_gives_the_fallback(clock):
    cmd = AsyncHeld(asyncio.Event())        # never released
    future = cmd.queue()
    await spin()
    clock.advance(cmd.timeout)
    assert await asyncio.wait_for(future, WAIT) == 'stale'
    await spin()
    assert cmd.cancelled is True
    assert cmd.events == (Event.TIMEOUT, Event.FALLBACK_SUCCESS)


@pytest.mark.gen_test
async def test_async_run_does_not_time_out_before_the_timeout(clock):
    release = asyncio.Event()
    cmd = AsyncHeld(release)
    future = cmd.queue()
    await spin()
    clock.advance(cmd.timeout * 0.9)
    await spin()
    assert not future.done()
    release.set()
    assert await future == 'fresh'
    assert cmd.cancelled is False


@pytest.mark.gen_test
async def test_semaphore_permit_comes_back_after_a_timeout(clock):
    for _ in range(2):
        cmd = AsyncHeld(asyncio.Event())
        future = cmd.queue()
        await spin()
        clock.advance(cmd.timeout)
        await asyncio.wait_for(future, WAIT)
        await spin()
    release = asyncio.Event()
    release.set()
    after = [AsyncHeld(release) for _ in range(2)]
    assert await asyncio.gather(*(cmd.queue() for cmd in after)) == ['fresh', 'fresh']


@pytest.mark.gen_test
async def test_async_run_timeout_logs_no_loop_trouble(clock, caplog):
    cmd = AsyncHeld(asyncio.Event())
    future = cmd.queue()
    await spin()
    clock.advance(cmd.timeout)
    await asyncio.wait_for(future, WAIT)
    await spin()
    del future
    gc.collect()
    assert loop_trouble(caplog) == []


@pytest.mark.gen_test
async def test_fallback_of_an_async_run_runs_on_the_ioloop_thread():
    release = asyncio.Event()
    running = [AsyncHeld(release).queue() for _ in range(2)]
    cmd = AsyncHeld(release)
    assert await cmd.queue() == 'stale'
    assert cmd.fallback_thread == threading.get_ident()
    release.set()
    await asyncio.gather(*running)


# -- async def fallback ------------------------------------------------------------------------

@pytest.mark.gen_test
async def test_async_fallback_is_awaited_by_queue():
    cmd = AsyncFallback()
    assert await cmd.queue() == 'stale'
    assert cmd.events == (Event.FAILURE, Event.FALLBACK_SUCCESS)
    assert cmd.fallback_thread == threading.get_ident()


@pytest.mark.gen_test
async def test_async_fallback_that_raises_gives_command_error_with_fallback_exception():
    cmd = AsyncFallbackRaises()
    with pytest.raises(CommandError) as info:
        await cmd.queue()
    assert info.value.fallback_exception is cmd.fallback_error
    assert info.value.cause is cmd.error
    assert info.value.failure_type is FailureType.COMMAND_EXCEPTION
    assert cmd.events == (Event.FAILURE, Event.FALLBACK_FAILURE)


@pytest.mark.gen_test
async def test_async_fallback_is_counted_once_it_answers():
    cmd = AsyncFallback()
    await cmd.queue()
    assert component.metrics('AsyncFallback').rolling_count(Event.FALLBACK_SUCCESS) == 1


# -- failures through queue() -------------------------------------------------------------------

async def queue_command_exception(clock, gates):
    cmd = BrokenNoFallback()
    return cmd, cmd.queue(), cmd.error, None


async def queue_fallback_raised(clock, gates):
    cmd = BrokenFallbackRaises()
    return cmd, cmd.queue(), cmd.error, cmd.fallback_error


async def queue_timeout(clock, gates):
    gate = gates()
    cmd = HeldNoFallback(gate)
    future = cmd.queue()
    await entered(gate)
    clock.advance(cmd.timeout)
    return cmd, future, 'made', None


async def queue_short_circuit(clock, gates):
    cmd = ForcedOpenNoFallback()
    return cmd, cmd.queue(), 'made', None


async def queue_pool_rejection(clock, gates):
    add_pool('tiny', 1)
    gate = gates()
    Tiny(gate).queue()
    await entered(gate)
    cmd = TinyNoFallback()
    return cmd, cmd.queue(), 'made', None


async def queue_semaphore_rejection(clock, gates):
    release = asyncio.Event()
    AsyncHeldNoFallback(release).queue()
    cmd = AsyncHeldNoFallback(release)
    future = cmd.queue()
    release.set()
    return cmd, future, 'made', None


async def queue_fallback_rejection(clock, gates):
    release = asyncio.Event()
    first = SlowAsyncFallback(release).queue()
    await spin()
    cmd = SlowAsyncFallback(release)
    future = cmd.queue()
    await asyncio.wait_for(asyncio.wait([future]), WAIT)
    release.set()
    assert await first == 'stale'
    return cmd, future, cmd.error, None


QUEUE_ERRORS = [
    pytest.param(queue_command_exception, FailureType.COMMAND_EXCEPTION, id='command-exception'),
    pytest.param(queue_fallback_raised, FailureType.COMMAND_EXCEPTION, id='fallback-raised'),
    pytest.param(queue_timeout, FailureType.TIMEOUT, id='timeout'),
    pytest.param(queue_short_circuit, FailureType.SHORTCIRCUIT, id='shortcircuit'),
    pytest.param(queue_pool_rejection, FailureType.REJECTED_THREAD_EXECUTION,
                 id='rejected-thread'),
    pytest.param(queue_semaphore_rejection, FailureType.REJECTED_SEMAPHORE_EXECUTION,
                 id='rejected-semaphore'),
    pytest.param(queue_fallback_rejection, FailureType.REJECTED_SEMAPHORE_FALLBACK,
                 id='rejected-fallback'),
]


async def failed(future):
    with pytest.raises(CommandError) as info:
        await asyncio.wait_for(future, WAIT)
    return info.value


@pytest.mark.parametrize('scenario, failure_type', QUEUE_ERRORS)
@pytest.mark.gen_test
async def test_queue_future_fails_with_command_error(clock, gates, scenario, failure_type):
    cmd, future, _, _ = await scenario(clock, gates)
    error = await failed(future)
    assert type(error) is CommandError
    assert error.command_key == cmd.command_key == type(cmd).__name__
    assert error.failure_type is failure_type


@pytest.mark.parametrize('scenario, failure_type', QUEUE_ERRORS)
@pytest.mark.gen_test
async def test_queue_command_error_carries_cause_and_fallback_exception(clock, gates, scenario,
                                                                       failure_type):
    cmd, future, cause, fallback_exception = await scenario(clock, gates)
    error = await failed(future)
    if cause == 'made':
        assert isinstance(error.cause, Exception)
        assert error.cause is cmd.execution_exception
    else:
        assert error.cause is cause
    assert error.fallback_exception is fallback_exception


@pytest.mark.parametrize('scenario, failure_type', QUEUE_ERRORS)
@pytest.mark.gen_test
async def test_queue_command_error_message_is_one_line_naming_the_command(clock, gates,
                                                                          scenario,
                                                                          failure_type):
    cmd, future, _, _ = await scenario(clock, gates)
    message = str(await failed(future))
    assert '\n' not in message
    assert cmd.command_key in message
    assert failure_type.value in message


@pytest.mark.parametrize('cls', [BrokenNoFallback, BrokenFallbackRaises, ForcedOpenNoFallback])
@pytest.mark.gen_test
async def test_queue_fails_with_the_same_command_error_as_execute(cls):
    def fields(error):
        return (type(error), error.command_key, error.failure_type, type(error.cause),
                type(error.fallback_exception))

    def executed():
        try:
            cls().execute()
        except CommandError as error:
            return error

    by_execute = await in_thread(executed)
    by_queue = await failed(cls().queue())
    assert fields(by_queue) == fields(by_execute)


@pytest.mark.parametrize('cls', [Invalid, AsyncInvalid])
@pytest.mark.gen_test
async def test_bad_request_is_set_on_the_future_unchanged(cls):
    cmd = cls()
    with pytest.raises(BadRequest) as info:
        await cmd.queue()
    assert info.value is cmd.error
    assert cmd.fallback_calls == 0
    assert cmd.events == (Event.BAD_REQUEST,)


@pytest.mark.gen_test
async def test_bad_request_through_queue_is_not_a_failure():
    with pytest.raises(BadRequest):
        await Invalid().queue()
    metrics = component.metrics('Invalid')
    assert metrics.rolling_count(Event.BAD_REQUEST) == 1
    assert metrics.health().error_count == 0


# -- cancelling the future ------------------------------------------------------------------------

async def cancel_then_succeed(clock, gate):
    cmd = Held(gate)
    future = cmd.queue()
    await entered(gate)
    future.cancel()
    gate.open()
    return cmd, future, (Event.SUCCESS,)


async def cancel_then_fail_without_fallback(clock, gate):
    cmd = HeldFailingNoFallback(gate)
    future = cmd.queue()
    await entered(gate)
    future.cancel()
    gate.open()
    return cmd, future, (Event.FAILURE, Event.FALLBACK_MISSING)


async def cancel_then_time_out(clock, gate):
    cmd = Held(gate)
    future = cmd.queue()
    await entered(gate)
    future.cancel()
    clock.advance(cmd.timeout)
    await spin()
    gate.open()
    return cmd, future, (Event.TIMEOUT, Event.FALLBACK_SUCCESS)


async def cancel_async_run(clock, gate):
    release = asyncio.Event()
    cmd = AsyncHeld(release)
    future = cmd.queue()
    await spin()
    future.cancel()
    release.set()
    return cmd, future, (Event.SUCCESS,)


CANCELLED = [
    pytest.param(cancel_then_succeed, id='success'),
    pytest.param(cancel_then_fail_without_fallback, id='failure-no-fallback'),
    pytest.param(cancel_then_time_out, id='timeout'),
    pytest.param(cancel_async_run, id='async-run'),
]


@pytest.mark.parametrize('scenario', CANCELLED)
@pytest.mark.gen_test
async def test_cancelled_future_still_counts_the_outcome(clock, gates, scenario):
    cmd, future, events = await scenario(clock, gates())
    await drain_workers()
    assert future.cancelled()
    assert cmd.events == events
    metrics = component.metrics(cmd.command_key)
    assert [metrics.rolling_count(event) for event in events] == [1] * len(events)


@pytest.mark.parametrize('scenario', CANCELLED)
@pytest.mark.gen_test
async def test_cancelled_future_logs_no_loop_trouble(clock, gates, caplog, scenario):
    cmd, future, events = await scenario(clock, gates())
    await drain_workers()
    del future
    gc.collect()
    await spin()
    assert loop_trouble(caplog) == []


@pytest.mark.gen_test
async def test_command_still_works_after_a_cancelled_future(gates):
    gate = gates()
    future = Held(gate).queue()
    await entered(gate)
    future.cancel()
    gate.open()
    assert await Echo('fresh').queue() == 'fresh'


# -- many at once ---------------------------------------------------------------------------------

class Quick(Command):
    group_key = 'big'

    def __init__(self, n):
        self.n = n

    def run(self):
        return self.n

    def fallback(self):
        return -1


@pytest.mark.gen_test(timeout=10)
async def test_a_thousand_concurrent_queue_calls_all_resolve():
    add_pool('big', 10, max_queue_size=1000)
    futures = [Quick(n).queue() for n in range(1000)]
    assert await asyncio.gather(*futures) == list(range(1000))
    assert component.metrics('Quick').rolling_count(Event.SUCCESS) == 1000


@pytest.mark.gen_test(timeout=10)
async def test_a_thousand_queue_calls_on_ten_workers_count_successes_and_rejections_exactly():
    add_pool('big', 10)
    futures = [Quick(n).queue() for n in range(1000)]
    results = await asyncio.gather(*futures)
    metrics = component.metrics('Quick')
    successes = sum(1 for n, value in enumerate(results) if value == n)
    rejections = results.count(-1)
    assert successes + rejections == 1000
    assert metrics.rolling_count(Event.SUCCESS) == successes
    assert metrics.rolling_count(Event.THREAD_POOL_REJECTED) == rejections
    assert metrics.rolling_count(Event.FALLBACK_SUCCESS) == rejections


class HeldQuick(Held):
    group_key = 'big'


@pytest.mark.gen_test(timeout=10)
async def test_busy_workers_reject_the_rest_of_a_thousand_at_once(gates):
    add_pool('big', 10)
    gate = gates()
    held = [HeldQuick(gate).queue() for _ in range(10)]
    rest = [Quick(n).queue() for n in range(990)]
    assert await asyncio.gather(*rest) == [-1] * 990
    assert not any(future.done() for future in held)
    gate.open()
    assert await asyncio.gather(*held) == ['late'] * 10
    assert component.metrics('Quick').rolling_count(Event.THREAD_POOL_REJECTED) == 990
    assert component.metrics('HeldQuick').rolling_count(Event.SUCCESS) == 10


# -- what happened, through queue() ---------------------------------------------------------------

class Quarter(Command):
    """run() takes 0.25 s of the injected clock."""

    def run(self):
        component.clock.advance(0.25)
        return 'fresh'


class AsyncQuarter(Command):
    async def run(self):
        component.clock.advance(0.25)
        await asyncio.sleep(0)
        return 'fresh'


@pytest.mark.parametrize('cls', [Quarter, AsyncQuarter])
@pytest.mark.gen_test
async def test_queue_execution_time_is_measured_with_the_injected_clock(cls):
    cmd = cls()
    assert await cmd.queue() == 'fresh'
    assert cmd.execution_time == 0.25


@pytest.mark.parametrize('cls, event, traceback', [
    (Broken, Event.FAILURE, True),
    (BrokenNoFallback, Event.FAILURE, True),
    (ForcedOpenWhere, Event.SHORT_CIRCUITED, False),
])
@pytest.mark.gen_test
async def test_failure_through_queue_is_logged_once(caplog, cls, event, traceback):
    caplog.set_level(logging.DEBUG, logger='blackgate')
    cmd = cls()
    try:
        await cmd.queue()
    except CommandError:
        pass
    [record] = [r for r in caplog.records if r.name == 'blackgate']
    assert cmd.command_key in record.getMessage()
    assert event.value in record.getMessage()
    assert bool(record.exc_info) is traceback


@pytest.mark.gen_test
async def test_semaphore_rejection_with_a_fallback_is_logged_at_info_without_traceback(caplog):
    caplog.set_level(logging.DEBUG, logger='blackgate')
    release = asyncio.Event()
    running = [AsyncHeld(release).queue() for _ in range(2)]
    await AsyncHeld(release).queue()
    release.set()
    await asyncio.gather(*running)
    [record] = [r for r in caplog.records if r.name == 'blackgate']
    assert Event.SEMAPHORE_REJECTED.value in record.getMessage()
    assert record.levelno == logging.INFO
    assert not record.exc_info


@pytest.mark.gen_test
async def test_success_through_queue_logs_nothing(caplog):
    caplog.set_level(logging.DEBUG, logger='blackgate')
    assert await Echo('fresh').queue() == 'fresh'
    assert [r for r in caplog.records if r.name.startswith('blackgate')] == []


class AsyncQuick(Command):
    """async run() awaits ``release``; ten at once."""

    def __init__(self, release):
        self.release = release

    async def run(self):
        await self.release.wait()
        return 'fresh'

    def fallback(self):
        return 'stale'


@pytest.mark.gen_test(timeout=10)
async def test_a_thousand_async_runs_admit_ten_and_reject_the_rest_exactly():
    release = asyncio.Event()
    futures = [AsyncQuick(release).queue() for _ in range(1000)]
    await spin()
    assert sum(future.done() for future in futures) == 990
    release.set()
    results = await asyncio.gather(*futures)
    assert results.count('fresh') == 10
    assert results.count('stale') == 990
    metrics = component.metrics('AsyncQuick')
    assert metrics.rolling_count(Event.SUCCESS) == 10
    assert metrics.rolling_count(Event.SEMAPHORE_REJECTED) == 990


class TrialOnAClosingLoop(Command):
    command_key = 'trial_closing_loop'
    circuit_breaker_request_volume_threshold = 1
    metrics_health_snapshot_interval = 0
    gate = threading.Event()
    fail = True

    def run(self):
        if TrialOnAClosingLoop.fail:
            raise ConnectionError('down')
        TrialOnAClosingLoop.gate.wait(5)
        return 'fresh'

    def fallback(self):
        return 'stale'


def test_a_trial_whose_loop_closed_still_closes_the_breaker(clock):
    TrialOnAClosingLoop.gate.clear()
    TrialOnAClosingLoop.fail = True
    TrialOnAClosingLoop().execute()
    breaker = component.circuit_breaker('trial_closing_loop')
    assert breaker.state is BreakerState.OPEN
    clock.advance(5.0)
    TrialOnAClosingLoop.fail = False

    async def start_trial_and_leave():
        TrialOnAClosingLoop().queue()      # nobody awaits it; the loop ends at once

    asyncio.run(start_trial_and_leave())   # closes the loop while run() is held
    assert breaker.state is BreakerState.HALF_OPEN
    TrialOnAClosingLoop.gate.set()
    component.shutdown()                   # waits for the worker to finish
    assert breaker.state is BreakerState.CLOSED
    assert component.metrics('trial_closing_loop').rolling_count(Event.SUCCESS) == 1
