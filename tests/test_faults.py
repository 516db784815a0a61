"""Fault injection (issue 8): stuck runs, shutdown, raising fallbacks and listeners, pools.

What each case shows:

- a ``run()`` that never returns: the caller gets the fallback at its timeout,
  the pool shows the occupied worker, and ``component.shutdown()`` refuses
  new work at once and returns as soon as the stuck ``run()`` returns (the
  documented bound: Python cannot interrupt the thread, so shutdown waits for
  it and for nothing else);
- fallbacks and listeners that raise: the caller gets a ``CommandError`` (or
  its answer), every count is kept, the fallback permit is given back, the
  other listeners still hear everything;
- a pool saturated, then recovering: rejections, the breaker trips on them,
  and everything answers normally once the workers are free again;
- queue() futures cancelled by their caller, loops closed under a running
  ``run()``, nested calls into a full pool, ``run()`` raising
  ``KeyboardInterrupt`` on a worker.

The autouse ``clock`` fixture (FakeClock) drives timeouts unless the test asks
for ``system_clock``. Every wait is bounded by ``WAIT``.
"""
import asyncio
import logging
import signal
import subprocess
import sys
import threading
import time

import pytest

from blackgate import (BadRequest, BreakerState, Command, CommandError, Event, FailureType,
                       component)
from support import FailsOnDemand, add_pool, gate_maker

#: Real seconds: the longest a test waits for a thread, a worker or a future.
WAIT = 10.0


# -- helpers -------------------------------------------------------------------------------

class Gate:
    """A point where run() waits (at most WAIT) until the test opens it.

    Stricter than ``support.Gate``: a run() never released fails, and ``left``
    tells when run() went on.
    """

    def __init__(self):
        self.entered = threading.Event()
        self.opened = threading.Event()
        self.left = threading.Event()

    def hold(self):
        self.entered.set()
        try:
            if not self.opened.wait(WAIT):
                raise AssertionError('run() was never released')
        finally:
            self.left.set()

    def open(self):
        self.opened.set()


@pytest.fixture
def gates(clock):
    """Make Gates; every one is opened at teardown, before the registry shuts down."""
    yield from gate_maker(Gate)


def start(target, *args):
    """Run ``target(*args)`` on a daemon thread; its answer lands in ``thread.answer``."""
    def call():
        try:
            thread.answer = ('value', target(*args))
        except BaseException as exc:
            thread.answer = ('error', exc)

    thread = threading.Thread(target=call, daemon=True)
    thread.answer = None
    thread.start()
    return thread


def finish(thread, bound=WAIT):
    thread.join(bound)
    assert not thread.is_alive(), 'the thread did not return within %ss' % bound
    return thread.answer


def run_async(coroutine, bound=WAIT):
    return asyncio.run(asyncio.wait_for(coroutine, bound))


def wait_for(predicate, bound=WAIT, what='condition'):
    deadline = time.monotonic() + bound
    while not predicate():
        assert time.monotonic() < deadline, '%s not reached within %ss' % (what, bound)
        time.sleep(0.002)


def counts(key):
    return {event: n for event, n in component.metrics(key).rolling_counts().items() if n}


class Stuck(Command):
    """run() waits at its gate (a dependency that never answers), then says 'late'."""

    command_key = 'stuck'
    group_key = 'narrow'
    timeout = 1.0

    def __init__(self, gate, then='late'):
        self.gate = gate
        self.then = then
        self.called = False

    def run(self):
        self.called = True
        self.gate.hold()
        if isinstance(self.then, BaseException):
            raise self.then
        return self.then

    def fallback(self):
        return 'stale'


class Quick(Command):
    command_key = 'quick'
    group_key = 'narrow'

    def run(self):
        return 'fresh'

    def fallback(self):
        return 'stale'


# -- a run() that never returns ------------------------------------------------------------

def test_a_run_that_never_returns_times_out_and_its_worker_stays_visibly_busy(clock, gates):
    add_pool('narrow', 1)
    gate = gates()
    cmd = Stuck(gate)
    caller = start(cmd.execute)
    assert gate.entered.wait(WAIT)
    assert clock.wait_for_waiters(1, WAIT)
    clock.advance(1.0)
    assert finish(caller) == ('value', 'stale')
    assert cmd.events == (Event.TIMEOUT, Event.FALLBACK_SUCCESS)
    pool = component.pool('narrow')
    assert (pool.active_count, pool.in_flight, pool.queue_size) == (1, 1, 0)
    assert component.metrics('stuck').concurrent_executions == 1
    other = Quick()
    assert other.execute() == 'stale'       # the one worker is still taken
    assert other.events == (Event.THREAD_POOL_REJECTED, Event.FALLBACK_SUCCESS)
    gate.open()
    wait_for(lambda: pool.in_flight == 0, what='the stuck worker free')
    assert Quick().execute() == 'fresh'
    assert counts('stuck') == {Event.TIMEOUT: 1, Event.FALLBACK_SUCCESS: 1}   # late answer dropped
    assert component.metrics('stuck').concurrent_executions == 0


def test_a_run_that_never_returns_times_out_through_queue_too(clock, gates):
    add_pool('narrow', 1)
    gate = gates()

    async def scenario():
        cmd = Stuck(gate)
        future = cmd.queue()
        await asyncio.get_running_loop().run_in_executor(None, gate.entered.wait, WAIT)
        clock.advance(1.0)
        assert await future == 'stale'
        assert component.pool('narrow').active_count == 1
        return cmd

    cmd = run_async(scenario())
    assert cmd.is_response_timed_out is True
    gate.open()
    wait_for(lambda: component.pool('narrow').in_flight == 0, what='the stuck worker free')


#: Measured bounds, for the report: seconds from the stuck run()'s release to shutdown's end.
SHUTDOWN_FIGURES = {}


def test_shutdown_refuses_new_work_at_once_and_ends_as_soon_as_the_stuck_run_returns(
        system_clock, gates):
    """The documented bound: shutdown() returns once the stuck run() returns, not before.

    Python cannot interrupt a worker thread, so no bound in seconds can hold
    for a run() that never returns; what can be promised, and is tested here,
    is that shutdown() waits for nothing else (a generous 5 s covers thread
    wake-ups on a loaded machine; the measured figure is milliseconds), that
    it refuses new work meanwhile, and that the registry stays readable.
    """
    add_pool('narrow', 2)
    gate = gates()

    class StuckFast(Stuck):
        timeout = 0.05

    stuck = StuckFast(gate)
    assert stuck.execute() == 'stale'        # timed out after 50 ms; the worker stays
    assert stuck.is_response_timed_out
    pool = component.pool('narrow')
    assert pool.active_count == 1

    stopping = start(component.shutdown)
    wait_for(lambda: pool.is_shut_down, what='shutdown started')
    time.sleep(0.3)
    assert stopping.is_alive(), 'shutdown() returned while a run() was still running'

    refused = Quick()                        # a worker is free, but the pool is stopping
    assert refused.execute() == 'stale'
    assert refused.events == (Event.THREAD_POOL_REJECTED, Event.FALLBACK_SUCCESS)
    assert 'shut down' in str(refused.execution_exception)

    async def queued():
        cmd = Quick()
        return cmd, await cmd.queue()

    cmd, answer = run_async(queued())
    assert answer == 'stale' and cmd.events[0] is Event.THREAD_POOL_REJECTED
    # the registry does not wait for the pool: it stays readable
    assert component.metrics('stuck').rolling_count(Event.TIMEOUT) == 1
    assert component.circuit_breaker('stuck').state is BreakerState.CLOSED

    released = time.monotonic()
    gate.open()
    assert finish(stopping, bound=5.0) == ('value', [])   # no worker left busy
    SHUTDOWN_FIGURES['stuck run released -> shutdown returned (s)'] = round(
        time.monotonic() - released, 4)
    print('\nshutdown figures:', SHUTDOWN_FIGURES)
    assert pool.in_flight == 0

    component.install()                      # starts the pools again
    assert Quick().execute() == 'fresh'


def test_shutdown_with_nothing_running_returns_at_once(system_clock):
    add_pool('narrow', 2)
    assert Quick().execute() == 'fresh'
    began = time.monotonic()
    component.shutdown()
    assert time.monotonic() - began < 2.0


def test_shutdown_with_a_timeout_returns_after_it_and_names_the_stuck_worker(system_clock, gates,
                                                                             caplog):
    """Issue 18: shutdown() in a `finally` hung forever behind a run() that never returns."""
    add_pool('narrow', 2)
    gate = gates()

    class StuckFast(Stuck):
        timeout = 0.05

    assert StuckFast(gate).execute() == 'stale'
    stopping = start(component.shutdown, 0.2)
    kind, stuck = finish(stopping)                # returns although the run() is still held
    assert kind == 'value' and len(stuck) == 1
    assert 'blackgate-narrow' in stuck[0] and 'stuck' in stuck[0]
    warned = [r for r in caplog.records if r.name == 'blackgate' and 'still busy' in r.message]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING
    gate.open()


#: A program whose only call hangs in run() forever (after its caller got the fallback).
HANGING_PROGRAM = '''
import sys, threading
from blackgate import Command, component

class Hangs(Command):
    timeout = 0.05
    timeout_enabled = sys.argv[1] != 'untimed'

    def run(self):
        print('running', flush=True)
        threading.Event().wait()

    def fallback(self):
        return 'stale'

try:
    print(Hangs().execute(), flush=True)
finally:
    if sys.argv[2] == 'shutdown':
        print('stuck:', component.shutdown(timeout=0.2), flush=True)
'''


@pytest.mark.parametrize('finally_', ['nothing', 'shutdown'])
def test_a_program_whose_run_never_returns_still_exits_when_its_main_program_ends(finally_):
    """Issue 18: the pool's non-daemon workers were joined at exit, so the process hung."""
    result = subprocess.run([sys.executable, '-c', HANGING_PROGRAM, 'timed', finally_],
                            capture_output=True, text=True, timeout=20)
    assert result.returncode == 0, result.stderr
    assert 'stale' in result.stdout
    if finally_ == 'shutdown':
        assert "stuck: ['blackgate-default_0: <Hangs Hangs" in result.stdout


def test_ctrl_c_stops_a_program_blocked_in_a_run_that_never_returns():
    process = subprocess.Popen([sys.executable, '-c', HANGING_PROGRAM, 'untimed', 'shutdown'],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == 'running'
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=20)
    finally:
        process.kill()
    assert 'KeyboardInterrupt' in err
    assert 'stuck:' in out   # the finally ran, and shutdown(timeout=...) returned


def test_a_queued_run_whose_caller_timed_out_is_never_called(clock, gates):
    add_pool('narrow', 1, max_queue_size=1)
    occupant_gate = gates()
    occupant = start(Stuck(occupant_gate).execute)
    assert occupant_gate.entered.wait(WAIT)
    waiting = Stuck(gates())
    caller = start(waiting.execute)
    assert clock.wait_for_waiters(2, WAIT)
    assert component.pool('narrow').queue_size == 1
    clock.advance(1.0)                       # both callers time out
    assert finish(caller) == ('value', 'stale')
    assert finish(occupant) == ('value', 'stale')
    occupant_gate.open()
    wait_for(lambda: component.pool('narrow').in_flight == 0, what='pool idle')
    assert waiting.called is False           # its caller had its answer: run() skipped
    assert counts('stuck')[Event.TIMEOUT] == 2


def test_a_run_that_fails_after_its_timeout_is_counted_and_logged_once(clock, gates, caplog):
    caplog.set_level(logging.INFO, logger='blackgate')
    add_pool('narrow', 1)
    gate = gates()
    cmd = Stuck(gate, then=ConnectionError('finally refused'))
    caller = start(cmd.execute)
    assert gate.entered.wait(WAIT) and clock.wait_for_waiters(1, WAIT)
    clock.advance(1.0)
    assert finish(caller) == ('value', 'stale')
    gate.open()
    assert gate.left.wait(WAIT)
    wait_for(lambda: component.pool('narrow').in_flight == 0, what='pool idle')
    assert counts('stuck') == {Event.TIMEOUT: 1, Event.FALLBACK_SUCCESS: 1}
    records = [r for r in caplog.records if r.name == 'blackgate' and 'stuck' in r.getMessage()]
    assert len(records) == 1 and 'TIMEOUT' in records[0].getMessage()


@pytest.mark.parametrize('error', [KeyboardInterrupt(), SystemExit(3), GeneratorExit()],
                         ids=lambda e: type(e).__name__)
def test_a_run_raising_a_base_exception_on_a_worker_is_a_failure_and_the_pool_survives(error):
    class Dying(Command):
        command_key = 'dying'

        def run(self):
            raise error

        def fallback(self):
            return 'stale'

    cmd = Dying()
    assert cmd.execute() == 'stale'
    assert cmd.events == (Event.FAILURE, Event.FALLBACK_SUCCESS)
    assert cmd.execution_exception is error
    assert component.pool('default').in_flight == 0

    class Fine(Command):
        def run(self):
            return 'fresh'

    assert Fine().execute() == 'fresh'


# -- fallbacks that raise --------------------------------------------------------------------

class BrokenFallback(Command):
    command_key = 'broken_fallback'
    fallback_max_concurrent_requests = 1   # a permit not given back would show at once

    def __init__(self, fallback_raises=True):
        self.fallback_raises = fallback_raises

    def run(self):
        raise ConnectionError('upstream down')

    def fallback(self):
        if self.fallback_raises:
            raise LookupError('cache empty')
        return 'stale'


class AsyncBrokenFallback(BrokenFallback):
    async def fallback(self):
        await asyncio.sleep(0)
        if self.fallback_raises:
            raise LookupError('cache empty')
        return 'stale'


def _answer(cmd, driver):
    if driver == 'execute':
        try:
            return 'value', cmd.execute()
        except (CommandError, BadRequest) as exc:
            return 'error', exc

    async def queued():
        try:
            return 'value', await cmd.queue()
        except (CommandError, BadRequest) as exc:
            return 'error', exc

    return run_async(queued())


@pytest.mark.parametrize('cls, driver', [
    (BrokenFallback, 'execute'),
    (BrokenFallback, 'queue'),
    (AsyncBrokenFallback, 'queue'),
])
def test_a_fallback_that_raises_gives_a_command_error_and_its_permit_back(cls, driver, caplog):
    caplog.set_level(logging.INFO, logger='blackgate')
    for _ in range(3):                       # one permit: each must be given back
        cmd = cls()
        kind, error = _answer(cmd, driver)
        assert kind == 'error' and type(error) is CommandError
        assert error.failure_type is FailureType.COMMAND_EXCEPTION
        assert type(error.cause) is ConnectionError
        assert type(error.fallback_exception) is LookupError
        assert cmd.events == (Event.FAILURE, Event.FALLBACK_FAILURE)
    cmd = cls(fallback_raises=False)
    assert _answer(cmd, driver) == ('value', 'stale')
    assert counts('broken_fallback') == {Event.FAILURE: 4, Event.FALLBACK_FAILURE: 3,
                                         Event.FALLBACK_SUCCESS: 1}
    logged = [r for r in caplog.records if r.name == 'blackgate'
              and 'broken_fallback' in r.getMessage()]
    assert len(logged) == 4                   # one record per failed execution
    assert all('FALLBACK_FAILURE' in r.getMessage() for r in logged[:3])


class Abort(BaseException):
    """Not an Exception: what KeyboardInterrupt, SystemExit or CancelledError are too."""


class AbortingFallback(Command):
    command_key = 'aborting'
    fallback_max_concurrent_requests = 1

    def __init__(self, abort=True):
        self.abort = abort

    def run(self):
        raise ConnectionError('upstream down')

    def fallback(self):
        if self.abort:
            raise Abort('operator pressed ^C')
        return 'stale'


def test_a_fallback_raising_a_base_exception_under_queue_resolves_the_future_and_frees_its_permit(
        caplog):
    """Found by this issue: the future stayed unresolved forever and the permit was kept."""
    caplog.set_level(logging.CRITICAL, logger='asyncio')

    async def scenario():
        try:
            await asyncio.wait_for(AbortingFallback().queue(), 1.0)
        except asyncio.TimeoutError:
            return 'hung'
        except BaseException as exc:   # Abort, or a CommandError carrying it
            return type(exc).__name__
        return 'answered'

    assert run_async(scenario()) != 'hung'
    assert counts('aborting').get(Event.FAILURE) == 1
    later = AbortingFallback(abort=False)
    assert _answer(later, 'queue') == ('value', 'stale')   # not FALLBACK_REJECTION


def test_a_fallback_raising_a_base_exception_under_execute_still_counts_the_failure():
    """Found by this issue: the exception escaped (fine) but the FAILURE was never counted."""
    with pytest.raises(BaseException):
        AbortingFallback().execute()
    assert counts('aborting').get(Event.FAILURE) == 1


@pytest.mark.parametrize('driver', ['execute', 'queue'])
def test_a_fallback_raising_a_base_exception_gives_the_same_command_error_under_both_drivers(
        driver):
    """Issue 19: execute() re-raised it raw where queue() wrapped it; now both wrap it."""
    cmd = AbortingFallback()
    kind, error = _answer(cmd, driver)
    assert kind == 'error' and type(error) is CommandError
    assert error.failure_type is FailureType.COMMAND_EXCEPTION
    assert type(error.cause) is ConnectionError
    assert type(error.fallback_exception) is Abort and error.__cause__ is error.fallback_exception
    assert cmd.events == (Event.FAILURE, Event.FALLBACK_FAILURE)
    assert _answer(AbortingFallback(abort=False), driver) == ('value', 'stale')   # permit back
    assert counts('aborting') == {Event.FAILURE: 2, Event.FALLBACK_FAILURE: 1,
                                  Event.FALLBACK_SUCCESS: 1}


@pytest.mark.parametrize('error', [KeyboardInterrupt, SystemExit], ids=lambda e: e.__name__)
def test_a_fallback_raising_keyboard_interrupt_goes_on_up_from_either_driver_once_recorded(error):
    """The one exception rule: recorded as FALLBACK_FAILURE, answered, then it escapes."""
    class Interrupted(Command):
        command_key = 'interrupted'
        circuit_breaker_force_open = True   # so that queue() runs the fallback in its call

        def run(self):
            return 'fresh'

        def fallback(self):
            raise error('operator pressed ^C')

    with pytest.raises(error):
        Interrupted().execute()

    async def queued():
        with pytest.raises(error):
            Interrupted().queue()

    run_async(queued())
    assert counts('interrupted') == {Event.SHORT_CIRCUITED: 2, Event.FALLBACK_FAILURE: 2}


# -- listeners that raise ---------------------------------------------------------------------

class Recorder:
    def __init__(self):
        self.events = []
        self.transitions = []

    def on_event(self, command_key, event):
        self.events.append((command_key, event))

    def on_state_change(self, command_key, old, new):
        self.transitions.append((command_key, old, new))


class Raising:
    def __init__(self, kind=RuntimeError):
        self.kind = kind

    def on_event(self, command_key, event):
        raise self.kind('listener bug in on_event')

    def on_state_change(self, command_key, old, new):
        raise self.kind('listener bug in on_state_change')


class Flaky(FailsOnDemand):
    command_key = 'flaky'
    circuit_breaker_request_volume_threshold = 2
    metrics_health_snapshot_interval = 0


@pytest.mark.parametrize('kind', [RuntimeError, asyncio.CancelledError, KeyboardInterrupt,
                                  SystemExit, GeneratorExit])
@pytest.mark.parametrize('driver', ['execute', 'queue'])
def test_listeners_that_raise_break_nothing_and_the_others_hear_everything(clock, caplog,
                                                                            driver, kind):
    """A BaseException from a listener too: it escaped execute() and left queue() pending."""
    caplog.set_level(logging.INFO, logger='blackgate')
    before, after = Recorder(), Recorder()
    component.add_listener(before)
    component.add_listener(Raising(kind))
    component.add_listener(after)
    answers = [_answer(Flaky(fail), driver) for fail in (True, True, False)]
    clock.advance(5.0)
    answers.append(_answer(Flaky(False), driver))   # the trial
    assert answers == [('value', 'stale')] * 3 + [('value', 'fresh')]
    assert component.circuit_breaker('flaky').state is BreakerState.CLOSED
    expected_events = [('flaky', e) for e in (Event.FAILURE, Event.FALLBACK_SUCCESS,
                                              Event.FAILURE, Event.FALLBACK_SUCCESS,
                                              Event.SHORT_CIRCUITED, Event.FALLBACK_SUCCESS,
                                              Event.SUCCESS)]
    assert before.events == after.events == expected_events
    O, C, H = BreakerState.OPEN, BreakerState.CLOSED, BreakerState.HALF_OPEN
    expected_moves = [('flaky', C, O), ('flaky', O, H), ('flaky', H, C)]
    assert before.transitions == after.transitions == expected_moves
    broken = [r for r in caplog.records if r.name == 'blackgate' and r.exc_info
              and isinstance(r.exc_info[1], kind)]
    assert len(broken) == len(expected_events) + len(expected_moves)   # each logged, once
    assert all(r.levelno >= logging.ERROR for r in broken)


# -- a pool saturated, then recovering ---------------------------------------------------------

def test_a_saturated_pool_rejects_trips_the_breaker_and_recovers_once_its_workers_are_free(
        clock, gates):
    add_pool('narrow', 2)

    class Occupant(Command):
        command_key = 'occupant'
        group_key = 'narrow'
        timeout_enabled = False

        def __init__(self, gate):
            self.gate = gate

        def run(self):
            self.gate.hold()
            return 'done'

    class Caller(Quick):
        command_key = 'caller'
        circuit_breaker_request_volume_threshold = 5
        metrics_health_snapshot_interval = 0

    held = [gates() for _ in range(2)]
    occupants = [start(Occupant(gate).execute) for gate in held]
    for gate in held:
        assert gate.entered.wait(WAIT)
    pool = component.pool('narrow')
    assert pool.active_count == 2

    rejected = [Caller() for _ in range(5)]
    assert [cmd.execute() for cmd in rejected] == ['stale'] * 5
    assert all(cmd.events[0] is Event.THREAD_POOL_REJECTED for cmd in rejected)
    assert pool.rejected_count == 5
    breaker = component.circuit_breaker('caller')
    assert breaker.state is BreakerState.OPEN   # rejections are errors
    short = Caller()
    assert short.execute() == 'stale' and short.is_response_short_circuited

    for gate in held:
        gate.open()
    assert [finish(thread) for thread in occupants] == [('value', 'done')] * 2
    assert pool.in_flight == 0
    clock.advance(5.0)
    assert Caller().execute() == 'fresh'        # the trial
    assert breaker.state is BreakerState.CLOSED
    assert [Caller().execute() for _ in range(20)] == ['fresh'] * 20
    assert pool.rejected_count == 5
    assert counts('caller') == {Event.SUCCESS: 21}   # the window restarted with the trial


# -- futures, loops and nesting ----------------------------------------------------------------

def test_a_queue_future_cancelled_by_its_caller_still_counts_and_frees_the_worker(
        clock, gates, caplog):
    caplog.set_level(logging.DEBUG)
    add_pool('narrow', 1)
    gate = gates()

    async def scenario():
        future = Stuck(gate).queue()
        await asyncio.get_running_loop().run_in_executor(None, gate.entered.wait, WAIT)
        future.cancel()
        gate.open()
        await asyncio.get_running_loop().run_in_executor(None, gate.left.wait, WAIT)
        for _ in range(20):                   # the worker's answer reaches the loop
            await asyncio.sleep(0.01)
            if counts('stuck'):
                break

    run_async(scenario())
    assert counts('stuck') == {Event.SUCCESS: 1}
    assert component.pool('narrow').in_flight == 0
    trouble = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert trouble == []


def test_a_loop_closed_under_a_running_run_leaves_the_worker_and_pool_healthy(
        system_clock, gates, caplog):
    caplog.set_level(logging.DEBUG)
    add_pool('narrow', 1)
    gate = gates()

    class Patient(Stuck):
        timeout_enabled = False

    async def walk_away():
        Patient(gate).queue()                 # never awaited: the loop closes under it
        await asyncio.get_running_loop().run_in_executor(None, gate.entered.wait, WAIT)

    asyncio.run(walk_away())
    gate.open()
    wait_for(lambda: component.pool('narrow').in_flight == 0, what='pool idle')
    assert Quick().execute() == 'fresh'
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_a_run_calling_a_command_of_its_own_full_pool_is_rejected_not_deadlocked(system_clock):
    add_pool('narrow', 1)

    class Outer(Command):
        command_key = 'outer'
        group_key = 'narrow'
        timeout = 5.0

        def run(self):
            inner = Quick()
            return inner.execute(), inner.events[0]

    outer = start(Outer().execute)
    assert finish(outer, bound=WAIT) == ('value', ('stale', Event.THREAD_POOL_REJECTED))
