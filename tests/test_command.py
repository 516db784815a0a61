"""Command.execute() and the pipeline of docs/guide.rst (The pipeline).

Time is the FakeClock's: a thread blocked in ``execute()`` times out when the
test advances the clock. Workers are held on a ``Gate`` (a threading.Event;
``support.Gate``, made by conftest's ``gates`` fixture), never by sleeping, and
every wait on a thread is bounded by ``WAIT``. The commands that test_queue.py
uses too (``Held``, ``Tiny`` and their variants) come from support.py.
"""
import asyncio
import contextvars
import gc
import logging
import pathlib
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from blackgate import (BadRequest, BlackgateError, Command, CommandError, Event, FailureType,
                       component)
from support import ForcedOpenNoFallback, Held, HeldNoFallback, Tiny, TinyNoFallback, add_pool

#: Real seconds: the longest a test waits for a thread before it fails.
WAIT = 5.0

IS_PROPERTIES = ('is_successful_execution', 'is_failed_execution', 'is_response_from_fallback',
                 'is_response_timed_out', 'is_response_short_circuited', 'is_response_rejected',
                 'is_circuit_breaker_open')


# -- helpers -------------------------------------------------------------------------------

class Call:
    """``fn()`` on a daemon thread; ``result()`` returns its value or raises its exception."""

    def __init__(self, fn):
        self.done = threading.Event()
        self.value = self.error = None
        threading.Thread(target=self._run, args=(fn,), daemon=True).start()

    def _run(self, fn):
        try:
            self.value = fn()
        except BaseException as exc:
            self.error = exc
        finally:
            self.done.set()

    def result(self):
        assert self.done.wait(WAIT), 'the call never returned'
        if self.error is not None:
            raise self.error
        return self.value


def advance_until_done(clock, seconds, call):
    """Advance the clock by ``seconds`` until ``call`` returns.

    The thread in ``execute()`` may not be waiting yet when the clock first moves;
    then one more step ends it.
    """
    deadline = time.monotonic() + WAIT
    while True:
        clock.advance(seconds)
        if call.done.wait(0.05):
            return
        assert time.monotonic() < deadline, 'advancing the clock never ended the call'


def wait_until(predicate):
    deadline = time.monotonic() + WAIT
    while not predicate():
        assert time.monotonic() < deadline, 'condition never became true'
        time.sleep(0.001)


def outcome(cmd):
    """What ``cmd.execute()`` returned, or the exception it raised."""
    try:
        return cmd.execute()
    except Exception as exc:
        return exc


# -- commands ------------------------------------------------------------------------------

class Fresh(Command):
    """run() takes 0.25 s of the injected clock and answers."""

    def run(self):
        component.clock.advance(0.25)
        return 'fresh'

    def fallback(self):
        return 'stale'


class Echo(Command):
    def __init__(self, value):
        self.value = value

    def run(self):
        return self.value

    def fallback(self):
        return 'stale'


class _Broken(Command):
    """run() takes 0.25 s of the injected clock, then raises ``self.error``."""

    def __init__(self):
        self.error = ConnectionError('upstream down')
        self.fallback_calls = 0

    def run(self):
        component.clock.advance(0.25)
        raise self.error


class Broken(_Broken):
    def fallback(self):
        self.fallback_calls += 1
        return 'stale'


class BrokenNoFallback(_Broken):
    pass


class BrokenFallbackRaises(_Broken):
    def fallback(self):
        self.fallback_error = LookupError('cache empty')
        raise self.fallback_error


class BrokenFallbackDisabled(Broken):
    fallback_enabled = False


class HeldFallbackRaises(Held):
    def fallback(self):
        self.fallback_error = LookupError('cache empty')
        raise self.fallback_error


class HeldWithoutTimeout(Held):
    timeout_enabled = False


class ForcedOpen(Fresh):
    circuit_breaker_force_open = True


class Invalid(Command):
    """run() raises BadRequest, as user code does for invalid arguments."""

    def __init__(self):
        self.error = BadRequest('user id must be a number')
        self.fallback_calls = 0

    def run(self):
        component.clock.advance(0.25)
        raise self.error

    def fallback(self):
        self.fallback_calls += 1
        return 'stale'


class FallbackHog(Command):
    """run() raises; fallback() waits at its gate. One fallback at a time."""

    fallback_max_concurrent_requests = 1

    def __init__(self, gate=None):
        self.gate = gate
        self.error = ConnectionError('upstream down')

    def run(self):
        component.clock.advance(0.25)
        raise self.error

    def fallback(self):
        if self.gate is not None:
            self.gate.hold()
        return 'stale'


class AsyncFresh(Command):
    async def run(self):
        return 'fresh'

    def fallback(self):
        return 'stale'


class AsyncHeldNoFallback(Command):
    max_concurrent_requests = 1

    def __init__(self, release):
        self.release = release

    async def run(self):
        await self.release.wait()
        return 'fresh'


# -- scenarios: each runs one command to one outcome through execute() ------------------------

def succeeded(clock, gates):
    cmd = Fresh()
    return cmd, outcome(cmd)


def failed_with_fallback(clock, gates):
    cmd = Broken()
    return cmd, outcome(cmd)


def failed_without_fallback(clock, gates):
    cmd = BrokenNoFallback()
    return cmd, outcome(cmd)


def fallback_raised(clock, gates):
    cmd = BrokenFallbackRaises()
    return cmd, outcome(cmd)


def fallback_disabled(clock, gates):
    cmd = BrokenFallbackDisabled()
    return cmd, outcome(cmd)


def timed_out(clock, gates):
    gate = gates()
    cmd = Held(gate)
    call = Call(lambda: outcome(cmd))
    gate.wait_entered()
    advance_until_done(clock, cmd.timeout, call)
    return cmd, call.result()


def short_circuited(clock, gates):
    cmd = ForcedOpen()
    return cmd, outcome(cmd)


def pool_rejected(clock, gates):
    add_pool('tiny', 1)
    gate = gates()
    blocker = Call(Tiny(gate).execute)
    gate.wait_entered()
    cmd = Tiny()
    result = outcome(cmd)
    gate.open()
    assert blocker.result() == 'fresh'
    return cmd, result


def bad_request(clock, gates):
    cmd = Invalid()
    return cmd, outcome(cmd)


def fallback_rejected(clock, gates):
    gate = gates()
    first = Call(FallbackHog(gate).execute)
    gate.wait_entered()
    cmd = FallbackHog()
    result = outcome(cmd)
    gate.open()
    assert first.result() == 'stale'
    return cmd, result


E = Event
#: scenario, events, result (a value or an exception class), the is_* that are True,
#: execution_exception ('raised': the exception run() raised; 'made': one Blackgate made),
#: execution_time ('timeout': at least the command's timeout)
OUTCOMES = [
    pytest.param(succeeded, (E.SUCCESS,), 'fresh', {'is_successful_execution'}, None, 0.25,
                 id='success'),
    pytest.param(failed_with_fallback, (E.FAILURE, E.FALLBACK_SUCCESS), 'stale',
                 {'is_failed_execution', 'is_response_from_fallback'}, 'raised', 0.25,
                 id='failure+fallback'),
    pytest.param(failed_without_fallback, (E.FAILURE, E.FALLBACK_MISSING), CommandError,
                 {'is_failed_execution'}, 'raised', 0.25, id='failure-no-fallback'),
    pytest.param(fallback_raised, (E.FAILURE, E.FALLBACK_FAILURE), CommandError,
                 {'is_failed_execution'}, 'raised', 0.25, id='fallback-raises'),
    pytest.param(fallback_disabled, (E.FAILURE, E.FALLBACK_MISSING), CommandError,
                 {'is_failed_execution'}, 'raised', 0.25, id='fallback-disabled'),
    pytest.param(timed_out, (E.TIMEOUT, E.FALLBACK_SUCCESS), 'stale',
                 {'is_response_timed_out', 'is_response_from_fallback'}, 'made', 'timeout',
                 id='timeout'),
    pytest.param(short_circuited, (E.SHORT_CIRCUITED, E.FALLBACK_SUCCESS), 'stale',
                 {'is_response_short_circuited', 'is_response_from_fallback',
                  'is_circuit_breaker_open'}, 'made', None, id='short-circuit'),
    pytest.param(pool_rejected, (E.THREAD_POOL_REJECTED, E.FALLBACK_SUCCESS), 'stale',
                 {'is_response_rejected', 'is_response_from_fallback'}, 'made', None,
                 id='pool-rejection'),
    pytest.param(bad_request, (E.BAD_REQUEST,), BadRequest, set(), 'raised', 0.25,
                 id='bad-request'),
    pytest.param(fallback_rejected, (E.FAILURE, E.FALLBACK_REJECTION), CommandError,
                 {'is_failed_execution'}, 'raised', 0.25, id='fallback-rejection'),
]


# -- step 1: an instance runs once ---------------------------------------------------------

def test_second_execute_of_an_instance_raises_blackgate_error():
    cmd = Fresh()
    assert cmd.execute() == 'fresh'
    with pytest.raises(BlackgateError, match='once|already'):
        cmd.execute()


def test_refused_second_execute_keeps_the_first_outcome():
    cmd = Broken()
    cmd.execute()
    with pytest.raises(BlackgateError):
        cmd.execute()
    assert cmd.events == (Event.FAILURE, Event.FALLBACK_SUCCESS)
    assert component.metrics('Broken').rolling_count(Event.FAILURE) == 1


def test_instance_executed_from_two_threads_at_once_runs_once(gates):
    gate = gates()
    cmd = Held(gate)
    first = Call(cmd.execute)
    gate.wait_entered()
    with pytest.raises(BlackgateError, match='once|already'):
        cmd.execute()
    gate.open()
    assert first.result() == 'late'
    assert cmd.events == (Event.SUCCESS,)


@pytest.mark.gen_test
async def test_queue_of_an_executed_instance_raises_blackgate_error():
    cmd = Echo('fresh')
    assert await asyncio.get_running_loop().run_in_executor(None, cmd.execute) == 'fresh'
    with pytest.raises(BlackgateError, match='once|already'):
        cmd.queue()


@pytest.mark.gen_test
async def test_execute_of_a_queued_instance_raises_blackgate_error():
    cmd = Echo('fresh')
    assert await cmd.queue() == 'fresh'
    error = await asyncio.get_running_loop().run_in_executor(None, outcome, cmd)
    assert isinstance(error, BlackgateError)
    assert 'once' in str(error) or 'already' in str(error)


@pytest.mark.gen_test
async def test_instance_queued_twice_at_once_runs_once():
    cmd = Echo('fresh')
    future = cmd.queue()
    with pytest.raises(BlackgateError, match='once|already'):
        cmd.queue()
    assert await future == 'fresh'
    assert component.metrics('Echo').rolling_count(Event.SUCCESS) == 1


@pytest.mark.gen_test
async def test_second_queue_of_an_instance_raises_blackgate_error():
    cmd = Echo('fresh')
    assert await cmd.queue() == 'fresh'
    with pytest.raises(BlackgateError, match='once|already'):
        cmd.queue()


# -- §5.8: what happened -------------------------------------------------------------------

@pytest.mark.parametrize('prop', IS_PROPERTIES)
def test_is_properties_are_false_before_execution(prop):
    assert getattr(Fresh(), prop) is False


def test_events_are_empty_before_execution():
    cmd = Fresh()
    assert cmd.events == ()
    assert cmd.execution_exception is None


@pytest.mark.parametrize('scenario, events, result, true, exception, elapsed', OUTCOMES)
def test_events_of_each_outcome_in_order(clock, gates, scenario, events, result, true,
                                         exception, elapsed):
    cmd, _ = scenario(clock, gates)
    assert cmd.events == events
    assert all(isinstance(event, Event) for event in cmd.events)


@pytest.mark.parametrize('scenario, events, result, true, exception, elapsed', OUTCOMES)
def test_result_of_each_outcome(clock, gates, scenario, events, result, true, exception,
                                elapsed):
    _, got = scenario(clock, gates)
    if isinstance(result, type):
        assert type(got) is result
    else:
        assert got == result


@pytest.mark.parametrize('scenario, events, result, true, exception, elapsed', OUTCOMES)
def test_is_properties_of_each_outcome_are_real_bools(clock, gates, scenario, events, result,
                                                      true, exception, elapsed):
    cmd, _ = scenario(clock, gates)
    assert {prop: getattr(cmd, prop) for prop in IS_PROPERTIES} == \
        {prop: prop in true for prop in IS_PROPERTIES}
    for prop in IS_PROPERTIES:
        assert getattr(cmd, prop) is (prop in true), prop


@pytest.mark.parametrize('scenario, events, result, true, exception, elapsed', OUTCOMES)
def test_execution_exception_of_each_outcome(clock, gates, scenario, events, result, true,
                                             exception, elapsed):
    cmd, _ = scenario(clock, gates)
    if exception is None:
        assert cmd.execution_exception is None
    elif exception == 'raised':
        assert cmd.execution_exception is cmd.error
    else:
        assert isinstance(cmd.execution_exception, Exception)
        # built when first read for a short-circuit or timeout; the same one every time
        assert cmd.execution_exception is cmd.execution_exception
        assert cmd.command_key in str(cmd.execution_exception)


@pytest.mark.parametrize('scenario, events, result, true, exception, elapsed', OUTCOMES)
def test_execution_time_of_each_outcome(clock, gates, scenario, events, result, true,
                                        exception, elapsed):
    cmd, _ = scenario(clock, gates)
    if elapsed == 'timeout':
        assert cmd.execution_time >= cmd.timeout
    else:
        assert cmd.execution_time == elapsed


def test_timeout_cause_is_a_timeout_error(clock, gates):
    cmd, _ = timed_out(clock, gates)
    assert isinstance(cmd.execution_exception, TimeoutError)


def test_outcome_is_counted_in_the_rolling_metrics(clock, gates):
    cmd, _ = failed_with_fallback(clock, gates)
    metrics = component.metrics(cmd.command_key)
    assert metrics.rolling_count(Event.FAILURE) == 1
    assert metrics.rolling_count(Event.FALLBACK_SUCCESS) == 1
    assert metrics.rolling_count(Event.SUCCESS) == 0


# -- CommandError --------------------------------------------------------------------------

def command_exception(clock, gates):
    cmd = BrokenNoFallback()
    return cmd, outcome(cmd), cmd.error, None


def command_exception_and_fallback_raised(clock, gates):
    cmd = BrokenFallbackRaises()
    error = outcome(cmd)
    return cmd, error, cmd.error, cmd.fallback_error


def timeout_without_fallback(clock, gates):
    gate = gates()
    cmd = HeldNoFallback(gate)
    call = Call(lambda: outcome(cmd))
    gate.wait_entered()
    advance_until_done(clock, cmd.timeout, call)
    return cmd, call.result(), 'made', None


def timeout_and_fallback_raised(clock, gates):
    gate = gates()
    cmd = HeldFallbackRaises(gate)
    call = Call(lambda: outcome(cmd))
    gate.wait_entered()
    advance_until_done(clock, cmd.timeout, call)
    error = call.result()
    return cmd, error, 'made', cmd.fallback_error


def short_circuit_without_fallback(clock, gates):
    cmd = ForcedOpenNoFallback()
    return cmd, outcome(cmd), 'made', None


def pool_rejection_without_fallback(clock, gates):
    add_pool('tiny', 1)
    gate = gates()
    blocker = Call(Tiny(gate).execute)
    gate.wait_entered()
    cmd = TinyNoFallback()
    error = outcome(cmd)
    gate.open()
    assert blocker.result() == 'fresh'
    return cmd, error, 'made', None


def fallback_rejection(clock, gates):
    cmd, error = fallback_rejected(clock, gates)
    return cmd, error, cmd.error, None


COMMAND_ERRORS = [
    pytest.param(command_exception, FailureType.COMMAND_EXCEPTION, id='command-exception'),
    pytest.param(command_exception_and_fallback_raised, FailureType.COMMAND_EXCEPTION,
                 id='command-exception+fallback-raised'),
    pytest.param(timeout_without_fallback, FailureType.TIMEOUT, id='timeout'),
    pytest.param(timeout_and_fallback_raised, FailureType.TIMEOUT,
                 id='timeout+fallback-raised'),
    pytest.param(short_circuit_without_fallback, FailureType.SHORTCIRCUIT, id='shortcircuit'),
    pytest.param(pool_rejection_without_fallback, FailureType.REJECTED_THREAD_EXECUTION,
                 id='rejected-thread'),
    pytest.param(fallback_rejection, FailureType.REJECTED_SEMAPHORE_FALLBACK,
                 id='rejected-fallback'),
]


@pytest.mark.parametrize('scenario, failure_type', COMMAND_ERRORS)
def test_command_error_is_raised_when_there_is_no_usable_fallback(clock, gates, scenario,
                                                                   failure_type):
    _, error, _, _ = scenario(clock, gates)
    assert type(error) is CommandError
    assert isinstance(error, BlackgateError)


@pytest.mark.parametrize('scenario, failure_type', COMMAND_ERRORS)
def test_command_error_carries_command_key_and_failure_type(clock, gates, scenario,
                                                            failure_type):
    cmd, error, _, _ = scenario(clock, gates)
    assert error.command_key == cmd.command_key == type(cmd).__name__
    assert error.failure_type is failure_type


@pytest.mark.parametrize('scenario, failure_type', COMMAND_ERRORS)
def test_command_error_cause_is_what_made_run_fail(clock, gates, scenario, failure_type):
    cmd, error, cause, _ = scenario(clock, gates)
    if cause == 'made':
        assert isinstance(error.cause, Exception)
        assert not isinstance(error.cause, CommandError)
        assert error.cause is cmd.execution_exception
    else:
        assert error.cause is cause


@pytest.mark.parametrize('scenario, failure_type', COMMAND_ERRORS)
def test_command_error_carries_the_fallback_exception_or_none(clock, gates, scenario,
                                                              failure_type):
    _, error, _, fallback_exception = scenario(clock, gates)
    assert error.fallback_exception is fallback_exception


@pytest.mark.parametrize('scenario, failure_type', COMMAND_ERRORS)
def test_command_error_message_is_one_line_naming_command_and_failure(clock, gates, scenario,
                                                                       failure_type):
    cmd, error, _, _ = scenario(clock, gates)
    message = str(error)
    assert '\n' not in message
    assert cmd.command_key in message
    assert failure_type.value in message


def test_command_error_message_names_the_exception_run_raised():
    cmd = BrokenNoFallback()
    with pytest.raises(CommandError) as info:
        cmd.execute()
    assert 'upstream down' in str(info.value)


def test_timeout_cause_of_command_error_is_a_timeout_error(clock, gates):
    _, error, _, _ = timeout_without_fallback(clock, gates)
    assert isinstance(error.cause, TimeoutError)


@pytest.mark.gen_test
async def test_semaphore_rejection_without_fallback_is_rejected_semaphore_execution():
    release = asyncio.Event()
    first = AsyncHeldNoFallback(release).queue()
    cmd = AsyncHeldNoFallback(release)
    with pytest.raises(CommandError) as info:
        await cmd.queue()
    release.set()
    assert await first == 'fresh'
    error = info.value
    assert error.failure_type is FailureType.REJECTED_SEMAPHORE_EXECUTION
    assert error.command_key == 'AsyncHeldNoFallback'
    assert error.cause is cmd.execution_exception
    assert isinstance(error.cause, Exception)
    assert error.fallback_exception is None
    assert cmd.events == (Event.SEMAPHORE_REJECTED, Event.FALLBACK_MISSING)


# -- BadRequest ----------------------------------------------------------------------------

def test_bad_request_reaches_the_caller_unchanged():
    cmd = Invalid()
    with pytest.raises(BadRequest) as info:
        cmd.execute()
    assert info.value is cmd.error


def test_bad_request_calls_no_fallback():
    cmd = Invalid()
    with pytest.raises(BadRequest):
        cmd.execute()
    assert cmd.fallback_calls == 0


def test_bad_request_is_counted_as_bad_request():
    with pytest.raises(BadRequest):
        Invalid().execute()
    assert component.metrics('Invalid').rolling_count(Event.BAD_REQUEST) == 1


def test_bad_request_is_not_counted_as_a_failure():
    for _ in range(3):
        with pytest.raises(BadRequest):
            Invalid().execute()
    metrics = component.metrics('Invalid')
    assert metrics.rolling_count(Event.FAILURE) == 0
    assert metrics.health().error_count == 0
    assert metrics.health().total_requests == 0


def test_failure_calls_the_fallback_once():
    cmd = Broken()
    assert cmd.execute() == 'stale'
    assert cmd.fallback_calls == 1


# -- fallback concurrency --------------------------------------------------------------------

class TwoFallbacks(FallbackHog):
    fallback_max_concurrent_requests = 2


def test_fallback_over_the_limit_is_rejected_while_others_run(clock, gates):
    holders = [gates(), gates()]
    calls = []
    for gate in holders:                # two fallbacks allowed, both held
        calls.append(Call(TwoFallbacks(gate).execute))
        gate.wait_entered()
    cmd = TwoFallbacks()                # the third is rejected
    with pytest.raises(CommandError) as info:
        cmd.execute()
    assert info.value.failure_type is FailureType.REJECTED_SEMAPHORE_FALLBACK
    assert cmd.events == (Event.FAILURE, Event.FALLBACK_REJECTION)
    for gate in holders:
        gate.open()
    assert [call.result() for call in calls] == ['stale', 'stale']
    metrics = component.metrics('TwoFallbacks')
    assert metrics.rolling_count(Event.FALLBACK_REJECTION) == 1
    assert metrics.rolling_count(Event.FALLBACK_SUCCESS) == 2


def test_fallback_permit_comes_back_after_the_fallback_returns(clock, gates):
    gate = gates()
    first = Call(FallbackHog(gate).execute)
    gate.wait_entered()
    gate.open()
    assert first.result() == 'stale'
    assert FallbackHog().execute() == 'stale'


def test_fallback_permit_comes_back_after_the_fallback_raises():
    class OneRaisingFallback(BrokenFallbackRaises):
        fallback_max_concurrent_requests = 1

    for _ in range(3):
        with pytest.raises(CommandError) as info:
            OneRaisingFallback().execute()
        assert info.value.failure_type is FailureType.COMMAND_EXCEPTION


# -- README: subclasses ---------------------------------------------------------------------

class NoSuperInit(Command):
    def __init__(self, cookie):
        self.cookie = cookie

    def run(self):
        return 'user for %s' % (self.cookie,)

    def fallback(self):
        return None


def test_subclass_whose_init_never_calls_super_executes():
    cmd = NoSuperInit(cookie='session=abc')
    assert cmd.execute() == 'user for session=abc'
    assert cmd.events == (Event.SUCCESS,)


def test_subclass_whose_init_never_calls_super_answers_properties_before_running():
    cmd = NoSuperInit(cookie='session=abc')
    assert cmd.events == ()
    assert cmd.is_successful_execution is False
    assert cmd.execution_exception is None


def test_subclass_whose_init_never_calls_super_runs_once():
    cmd = NoSuperInit(cookie='session=abc')
    cmd.execute()
    with pytest.raises(BlackgateError):
        cmd.execute()


def test_instances_of_one_class_do_not_share_state():
    first, second = Broken(), Fresh()
    first.execute()
    assert second.events == ()
    assert second.execute() == 'fresh'
    assert first.events == (Event.FAILURE, Event.FALLBACK_SUCCESS)


def test_subclass_without_init_executes():
    cmd = Plain()
    assert cmd.execute() == 'fresh'
    assert cmd.events == (Event.SUCCESS,)


class Base(Command):
    command_key = 'shared_key'

    def run(self):
        return 'fresh'


class Child(Base):
    pass


class Grandchild(Child):
    pass


class Plain(Command):
    def run(self):
        return 'fresh'


class PlainChild(Plain):
    pass


@pytest.mark.parametrize('cls, key', [
    (Plain, 'Plain'),
    (PlainChild, 'PlainChild'),
    (Base, 'shared_key'),
    (Child, 'shared_key'),
    (Grandchild, 'shared_key'),
])
def test_command_key_is_the_class_name_unless_a_class_sets_it(cls, key):
    assert cls.command_key == key
    assert cls().command_key == key


@pytest.mark.parametrize('cls, key', [
    (Plain, 'Plain'),
    (PlainChild, 'PlainChild'),
    (Child, 'shared_key'),
])
def test_executions_are_counted_under_the_command_key(cls, key):
    cls().execute()
    assert component.metrics(key).rolling_count(Event.SUCCESS) == 1


def test_inherited_command_key_shares_one_breaker_and_metrics():
    Base().execute()
    Child().execute()
    Grandchild().execute()
    assert component.metrics('shared_key').rolling_count(Event.SUCCESS) == 3


# -- §5.7: execute() -------------------------------------------------------------------------

def test_execute_needs_no_ioloop():
    assert Fresh().execute() == 'fresh'


def test_execute_works_from_a_thread_that_never_had_a_loop():
    assert Call(Fresh().execute).result() == 'fresh'


class Wide(Echo):
    group_key = 'wide'


def test_execute_from_many_threads_returns_each_callers_result():
    add_pool('wide', 16)
    threads, calls = 16, 100
    results = [None] * threads

    def caller(n):
        results[n] = [Wide((n, i)).execute() for i in range(calls)]

    workers = [threading.Thread(target=caller, args=(n,), daemon=True) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(WAIT)
    assert not any(worker.is_alive() for worker in workers)
    assert results == [[(n, i) for i in range(calls)] for n in range(threads)]
    assert component.metrics('Wide').rolling_count(Event.SUCCESS) == threads * calls


class Inner(Command):
    def run(self):
        return 'inner'


class Outer(Command):
    def run(self):
        return 'outer+' + Inner().execute()


def test_execute_works_inside_another_commands_run():
    cmd = Outer()
    assert cmd.execute() == 'outer+inner'
    assert cmd.events == (Event.SUCCESS,)
    assert component.metrics('Inner').rolling_count(Event.SUCCESS) == 1


def test_run_executes_on_a_blackgate_worker_thread():
    class WhereAmI(Command):
        def run(self):
            return threading.current_thread().name

    name = WhereAmI().execute()
    assert name.startswith('blackgate-')
    assert name != threading.current_thread().name


@pytest.mark.gen_test
async def test_execute_on_the_ioloop_thread_raises_blackgate_error_naming_queue():
    with pytest.raises(BlackgateError, match=r'queue\(\)'):
        Echo('fresh').execute()


@pytest.mark.gen_test
async def test_execute_refused_on_the_ioloop_thread_leaves_the_instance_usable():
    cmd = Echo('fresh')
    with pytest.raises(BlackgateError):
        cmd.execute()
    assert cmd.events == ()
    assert await cmd.queue() == 'fresh'


class AsyncFallbackOnly(Command):
    def run(self):
        return 'fresh'

    async def fallback(self):
        return 'stale'


@pytest.mark.parametrize('cls', [AsyncFresh, AsyncFallbackOnly])
def test_execute_of_an_async_command_raises_blackgate_error_naming_queue(cls):
    with pytest.raises(BlackgateError, match=r'queue\(\)'):
        cls().execute()


@pytest.mark.gen_test
async def test_instance_refused_by_execute_for_async_run_can_then_be_queued():
    cmd = AsyncFresh()
    refused = await asyncio.get_running_loop().run_in_executor(None, outcome, cmd)
    assert isinstance(refused, BlackgateError)
    assert await cmd.queue() == 'fresh'


# -- §5.3, §5.4: timeouts ----------------------------------------------------------------------

def test_execute_times_out_when_the_clock_passes_the_timeout(clock, gates):
    gate = gates()
    cmd = Held(gate)
    call = Call(cmd.execute)
    gate.wait_entered()
    assert not call.done.wait(0.05)
    advance_until_done(clock, cmd.timeout, call)
    assert call.result() == 'stale'
    assert cmd.events == (Event.TIMEOUT, Event.FALLBACK_SUCCESS)


def test_execute_does_not_time_out_before_the_timeout(clock, gates):
    gate = gates()
    cmd = Held(gate)
    call = Call(cmd.execute)
    gate.wait_entered()
    clock.advance(cmd.timeout * 0.9)
    assert not call.done.wait(0.1)
    gate.open()
    assert call.result() == 'late'
    assert cmd.events == (Event.SUCCESS,)


def test_configured_timeout_is_the_one_applied(clock, gates):
    class QuickTimeout(Held):
        timeout = 0.1

    gate = gates()
    cmd = QuickTimeout(gate)
    call = Call(cmd.execute)
    gate.wait_entered()
    advance_until_done(clock, 0.1, call)
    assert call.result() == 'stale'
    assert 0.1 <= cmd.execution_time < 1.0


def test_late_result_after_timeout_is_dropped(clock, gates):
    gate = gates()
    cmd = Held(gate)
    call = Call(cmd.execute)
    gate.wait_entered()
    advance_until_done(clock, cmd.timeout, call)
    gate.open()
    metrics = component.metrics('Held')
    wait_until(lambda: metrics.concurrent_executions == 0)
    assert call.result() == 'stale'
    assert cmd.events == (Event.TIMEOUT, Event.FALLBACK_SUCCESS)
    assert metrics.rolling_count(Event.SUCCESS) == 0
    assert metrics.rolling_count(Event.TIMEOUT) == 1


def test_timed_out_worker_stays_busy_until_run_returns(clock, gates):
    gate = gates()
    cmd = Held(gate)
    call = Call(cmd.execute)
    gate.wait_entered()
    advance_until_done(clock, cmd.timeout, call)
    assert component.metrics('Held').concurrent_executions == 1
    gate.open()
    wait_until(lambda: component.metrics('Held').concurrent_executions == 0)


class Narrow(Held):
    """Runs on 'narrow': one worker and one queue slot."""

    group_key = 'narrow'


class NarrowBlocker(Held):
    group_key = 'narrow'
    timeout_enabled = False


def test_timeout_starts_at_admission_so_time_in_the_pool_queue_counts(clock, gates):
    add_pool('narrow', 1, max_queue_size=1)
    gate = gates()
    blocker = Call(NarrowBlocker(gate).execute)
    gate.wait_entered()
    queued = Narrow(gates())
    call = Call(queued.execute)
    advance_until_done(clock, queued.timeout, call)
    assert call.result() == 'stale'
    assert queued.events == (Event.TIMEOUT, Event.FALLBACK_SUCCESS)
    assert not queued.ran.is_set()      # it timed out waiting for a worker
    gate.open()
    assert blocker.result() == 'late'


def test_command_that_timed_out_in_the_pool_queue_never_runs(clock, gates):
    add_pool('narrow', 1, max_queue_size=1)
    gate = gates()
    blocker = Call(NarrowBlocker(gate).execute)
    gate.wait_entered()
    queued = Narrow(gates())
    call = Call(queued.execute)
    advance_until_done(clock, queued.timeout, call)
    gate.open()
    assert blocker.result() == 'late'
    Call(component.shutdown).result()   # waits for the pool's running and queued work
    assert not queued.ran.is_set()
    assert queued.events == (Event.TIMEOUT, Event.FALLBACK_SUCCESS)


def test_sequential_calls_through_a_one_worker_pool_are_never_rejected():
    add_pool('tiny', 1)
    results = [Tiny().execute() for _ in range(50)]
    assert results == ['fresh'] * 50
    assert component.metrics('Tiny').rolling_count(Event.THREAD_POOL_REJECTED) == 0


class Overrun(Command):
    """run() takes twice its timeout of the injected clock, then answers."""

    def run(self):
        component.clock.advance(2 * self.timeout)
        return 'late'

    def fallback(self):
        return 'stale'


@pytest.mark.parametrize('attempt', range(5))
def test_run_that_outlasts_its_timeout_by_the_injected_clock_times_out(attempt):
    cmd = Overrun()
    assert cmd.execute() == 'stale'
    assert cmd.events == (Event.TIMEOUT, Event.FALLBACK_SUCCESS)


def test_execution_time_is_measured_with_the_injected_clock():
    cmd = Fresh()
    cmd.execute()
    assert cmd.execution_time == 0.25


def test_timeout_disabled_lets_a_slow_run_succeed(clock, gates):
    gate = gates()
    cmd = HeldWithoutTimeout(gate)
    call = Call(cmd.execute)
    gate.wait_entered()
    clock.advance(cmd.timeout * 5)
    assert not call.done.wait(0.1)
    gate.open()
    assert call.result() == 'late'
    assert cmd.events == (Event.SUCCESS,)
    assert cmd.execution_time == cmd.timeout * 5


# -- §5.2: short circuit ---------------------------------------------------------------------

def test_short_circuit_runs_nothing():
    class CountedForcedOpen(ForcedOpen):
        runs = 0

        def run(self):
            type(self).runs += 1
            return 'fresh'

    assert CountedForcedOpen().execute() == 'stale'
    assert CountedForcedOpen.runs == 0
    assert component.metrics('CountedForcedOpen').concurrent_executions == 0


# -- §5.9: logging -----------------------------------------------------------------------------

def timeout_fallback_raises(clock, gates):
    cmd, error, _, _ = timeout_and_fallback_raised(clock, gates)
    return cmd, error


def short_circuit_no_fallback(clock, gates):
    cmd, error, _, _ = short_circuit_without_fallback(clock, gates)
    return cmd, error


#: scenario, event named in the record, traceback expected, level (None: unspecified), failed
#: executions in the scenario (fallback-rejection fails a second, holding instance too)
WARNING = logging.WARNING
FAILED_LOGS = [
    pytest.param(failed_with_fallback, E.FAILURE, True, WARNING, 1, id='failure+fallback'),
    pytest.param(failed_without_fallback, E.FAILURE, True, WARNING, 1,
                 id='failure-no-fallback'),
    pytest.param(fallback_raised, E.FAILURE, True, WARNING, 1, id='fallback-raises'),
    pytest.param(fallback_rejected, E.FAILURE, True, WARNING, 2, id='fallback-rejection'),
    pytest.param(timed_out, E.TIMEOUT, False, WARNING, 1, id='timeout+fallback'),
    pytest.param(timeout_fallback_raises, E.TIMEOUT, True, WARNING, 1,
                 id='timeout+fallback-raises'),
    pytest.param(short_circuited, E.SHORT_CIRCUITED, False, logging.INFO, 1,
                 id='short-circuit+fallback'),
    pytest.param(short_circuit_no_fallback, E.SHORT_CIRCUITED, False, None, 1,
                 id='short-circuit-no-fallback'),
    pytest.param(pool_rejected, E.THREAD_POOL_REJECTED, False, logging.INFO, 1,
                 id='pool-rejection+fallback'),
]


def records_of(caplog, cmd):
    """The records naming ``cmd``'s key; ``cmd``'s own comes first (any other instance
    of the key in a scenario is released only after ``cmd`` answered)."""
    return [record for record in caplog.records
            if record.name == 'blackgate' and cmd.command_key in record.getMessage()]


@pytest.mark.parametrize('scenario, event, traceback, level, failed', FAILED_LOGS)
def test_failed_execution_is_logged_once(clock, gates, caplog, scenario, event, traceback,
                                         level, failed):
    caplog.set_level(logging.DEBUG, logger='blackgate')
    cmd, _ = scenario(clock, gates)
    assert len(records_of(caplog, cmd)) == failed


@pytest.mark.parametrize('scenario, event, traceback, level, failed', FAILED_LOGS)
def test_failure_record_names_key_event_and_cause(clock, gates, caplog, scenario, event,
                                                  traceback, level, failed):
    caplog.set_level(logging.DEBUG, logger='blackgate')
    cmd, _ = scenario(clock, gates)
    record = records_of(caplog, cmd)[0]
    message = record.getMessage()
    assert record.name == 'blackgate'
    assert cmd.command_key in message
    assert event.value in message
    assert str(cmd.execution_exception) in message


@pytest.mark.parametrize('scenario, event, traceback, level, failed', FAILED_LOGS)
def test_failure_record_has_a_traceback_only_where_user_code_raised(clock, gates, caplog,
                                                                    scenario, event,
                                                                    traceback, level, failed):
    caplog.set_level(logging.DEBUG, logger='blackgate')
    cmd, _ = scenario(clock, gates)
    record = records_of(caplog, cmd)[0]
    assert bool(record.exc_info) is traceback
    if traceback and event is E.FAILURE:
        assert record.exc_info[1] is cmd.error


@pytest.mark.parametrize('scenario, event, traceback, level, failed',
                         [p for p in FAILED_LOGS if p.values[3] == logging.INFO])
def test_expected_failures_with_a_served_fallback_are_logged_at_info(clock, gates, caplog,
                                                                     scenario, event,
                                                                     traceback, level, failed):
    caplog.set_level(logging.DEBUG, logger='blackgate')
    cmd, _ = scenario(clock, gates)
    record = records_of(caplog, cmd)[0]
    assert record.levelno == level


@pytest.mark.parametrize('scenario, event, traceback, level, failed',
                         [p for p in FAILED_LOGS if p.values[3] == logging.WARNING])
def test_failures_and_timeouts_are_logged_at_warning_or_above(clock, gates, caplog, scenario,
                                                            event, traceback, level, failed):
    caplog.set_level(logging.DEBUG, logger='blackgate')
    cmd, _ = scenario(clock, gates)
    record = records_of(caplog, cmd)[0]
    assert record.levelno >= logging.WARNING


def test_success_logs_nothing(caplog):
    caplog.set_level(logging.DEBUG, logger='blackgate')
    for _ in range(3):
        Fresh().execute()
    assert [r for r in caplog.records if r.name.startswith('blackgate')] == []


@pytest.mark.parametrize('scenario', [p.values[0] for p in FAILED_LOGS] + [succeeded],
                         ids=[p.id for p in FAILED_LOGS] + ['success'])
def test_nothing_is_printed(clock, gates, capsys, scenario):
    cmd, _ = scenario(clock, gates)
    assert cmd.events
    assert capsys.readouterr() == ('', '')


def test_nothing_is_printed_when_the_application_has_not_configured_logging():
    script = textwrap.dedent('''
        from blackgate import Command

        class Broken(Command):
            def run(self):
                raise ConnectionError('upstream down')

            def fallback(self):
                return 'stale'

        assert Broken().execute() == 'stale'
    ''')
    repo = pathlib.Path(__file__).resolve().parent.parent    # import the blackgate under test
    done = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                          cwd=repo, timeout=30)
    assert done.returncode == 0, done.stderr
    assert (done.stdout, done.stderr) == ('', '')


# -- fallback() sees why it runs (issue 18, point 3) ------------------------------------------

class Introspective(Command):
    """fallback() records what the instance tells of the execution while it runs."""
    command_key = 'introspective'
    timeout = 0.5

    def __init__(self, how):
        self.how = how

    def run(self):
        raise ConnectionError('upstream down')

    def _record(self):
        self.seen = {'events': self.events, 'cause': self.execution_exception,
                     'failed': self.is_failed_execution,
                     'short_circuited': self.is_response_short_circuited,
                     'rejected': self.is_response_rejected,
                     'timed_out': self.is_response_timed_out}

    def fallback(self):
        self._record()
        return 'stale'


class AsyncRunIntrospective(Introspective):
    command_key = 'introspective_async_run'
    max_concurrent_requests = 0   # every call is SEMAPHORE_REJECTED

    async def run(self):
        raise ConnectionError('upstream down')


class AsyncFallbackIntrospective(Introspective):
    async def fallback(self):
        await asyncio.sleep(0)   # still readable after the fallback awaited
        self._record()
        return 'stale'


class NeverAnswers(Introspective):
    command_key = 'never_answers'

    async def run(self):
        await asyncio.Event().wait()


def _queued(cmd, clock=None):
    async def scenario():
        future = cmd.queue()
        if clock is not None:
            await asyncio.sleep(0)
            clock.advance(cmd.timeout)
        return await future
    return asyncio.run(asyncio.wait_for(scenario(), WAIT))


@pytest.mark.parametrize('cls, driver', [(Introspective, 'execute'), (Introspective, 'queue'),
                                         (AsyncFallbackIntrospective, 'queue')])
def test_fallback_sees_the_failure_and_the_exception_run_raised(cls, driver):
    cmd = cls('fail')
    assert (cmd.execute() if driver == 'execute' else _queued(cmd)) == 'stale'
    assert cmd.seen['events'] == (Event.FAILURE,)
    assert isinstance(cmd.seen['cause'], ConnectionError)
    assert cmd.seen['cause'] is cmd.execution_exception
    assert cmd.seen['failed'] is True


@pytest.mark.parametrize('driver', ['execute', 'queue'])
def test_fallback_sees_the_short_circuit_and_its_cause(driver):
    component.add('command', {'command_key': 'introspective', 'circuit_breaker_force_open': True})
    component.install()
    cmd = Introspective('fail')
    assert (cmd.execute() if driver == 'execute' else _queued(cmd)) == 'stale'
    assert cmd.seen['events'] == (Event.SHORT_CIRCUITED,)
    assert cmd.seen['short_circuited'] is True
    assert 'forced open' in str(cmd.seen['cause'])
    assert cmd.seen['cause'] is cmd.execution_exception


def test_fallback_sees_the_semaphore_rejection():
    cmd = AsyncRunIntrospective('fail')
    assert _queued(cmd) == 'stale'
    assert cmd.seen['events'] == (Event.SEMAPHORE_REJECTED,)
    assert cmd.seen['rejected'] is True
    assert 'max_concurrent_requests' in str(cmd.seen['cause'])


def test_fallback_sees_the_timeout(clock):
    cmd = NeverAnswers('hang')
    assert _queued(cmd, clock) == 'stale'
    assert cmd.seen['events'] == (Event.TIMEOUT,)
    assert cmd.seen['timed_out'] is True
    assert isinstance(cmd.seen['cause'], TimeoutError)


# -- a plain fallback() that returns a coroutine (issue 18, point 9) --------------------------

class CoroutineFallback(Command):
    """fallback() is a plain def that hands back a coroutine (forgot the async, or a helper)."""
    command_key = 'coroutine_fallback'

    def run(self):
        raise ConnectionError('upstream down')

    async def _stale(self):
        await asyncio.sleep(0)
        return 'stale'

    def fallback(self):
        return self._stale()


def test_execute_refuses_a_coroutine_from_a_plain_fallback_clearly(recwarn):
    cmd = CoroutineFallback()
    with pytest.raises(CommandError) as caught:
        cmd.execute()
    assert cmd.events == (Event.FAILURE, Event.FALLBACK_FAILURE)
    assert 'returned a coroutine' in str(caught.value.fallback_exception)
    assert 'queue()' in str(caught.value.fallback_exception)
    del cmd, caught
    gc.collect()
    assert not [w for w in recwarn.list if 'was never awaited' in str(w.message)]


def test_queue_awaits_a_coroutine_from_a_plain_fallback():
    async def scenario():
        cmd = CoroutineFallback()
        return cmd, await cmd.queue()
    cmd, result = asyncio.run(asyncio.wait_for(scenario(), WAIT))
    assert result == 'stale'
    assert cmd.events == (Event.FAILURE, Event.FALLBACK_SUCCESS)


# -- run() sees the caller's contextvars (issue 18, point 6) ----------------------------------

REQUEST_ID = contextvars.ContextVar('request_id', default=None)


class ReadsContext(Command):
    """run() answers the caller's request id, then sets its own (which must not leak)."""
    command_key = 'reads_context'

    def run(self):
        seen = REQUEST_ID.get()
        REQUEST_ID.set('set-by-run')
        return seen


class AsyncReadsContext(ReadsContext):
    command_key = 'async_reads_context'

    async def run(self):
        return ReadsContext.run(self)


def _in_context(request_id, driver, cls=ReadsContext):
    """Call ``cls`` with REQUEST_ID set to ``request_id``, in a context of its own."""
    def call():
        REQUEST_ID.set(request_id)
        if driver == 'execute':
            result = cls().execute()
        else:
            async def queued():
                return await cls().queue()
            result = asyncio.run(asyncio.wait_for(queued(), WAIT))
        assert REQUEST_ID.get() == request_id   # what run() set stayed in its copy
        return result
    return contextvars.Context().run(call)


@pytest.mark.parametrize('cls, driver', [(ReadsContext, 'execute'), (ReadsContext, 'queue'),
                                         (AsyncReadsContext, 'queue')])
def test_run_sees_the_contextvars_its_caller_set(cls, driver):
    add_pool('default', 1)   # one worker: every call runs on the same thread
    assert [_in_context(request_id, driver, cls) for request_id in ('a', 'b', None)] == \
        ['a', 'b', None]


# -- a bug in run() is seen even with no logging configured (issue 18, point 2) ---------------

BUGGY_PROGRAM = textwrap.dedent('''
    import asyncio, logging, sys
    from blackgate import Command

    if 'configured' in sys.argv:
        logging.basicConfig(format='configured: %(message)s')

    class GetUser(Command):
        def run(self):
            if 'dependency' in sys.argv:
                raise ConnectionError('session service refused the connection')
            return undefined_name

        def fallback(self):
            return None

    class GetCart(GetUser):
        async def run(self):
            return GetUser.run(self)

    async def queued():
        return await GetCart().queue()

    answers = [GetUser().execute(), GetUser().execute(), asyncio.run(queued())]
    print(answers)
''')


def run_program(tmp_path, *args):
    program = tmp_path / 'buggy.py'
    program.write_text(BUGGY_PROGRAM)
    result = subprocess.run([sys.executable, str(program)] + list(args),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == '[None, None, None]'   # the fallback answered every call
    return result.stderr


def test_a_bug_in_run_reaches_stderr_once_per_command_key_when_nothing_configured_logging(
        tmp_path):
    stderr = run_program(tmp_path)
    assert stderr.count("NameError: name 'undefined_name' is not defined") == 4   # 2 x (line + tb)
    assert stderr.count('GetUser FAILURE: NameError') == 1
    assert stderr.count('GetCart FAILURE: NameError') == 1
    assert 'configured no logging' in stderr
    assert stderr.count('Traceback') == 2 and 'return undefined_name' in stderr


def test_a_dependency_failure_stays_quiet_when_nothing_configured_logging(tmp_path):
    assert run_program(tmp_path, 'dependency') == ''


def test_configured_logging_gets_every_failure_once_and_nothing_more(tmp_path):
    stderr = run_program(tmp_path, 'configured')
    lines = [line for line in stderr.splitlines() if line.startswith('configured: ')]
    assert len(lines) == 3 and all('FAILURE: NameError' in line for line in lines)
    assert 'configured no logging' not in stderr


# -- the pipeline's state is its own (issue 19) ----------------------------------------------

class Crowded(Command):
    """A subclass using the names the pipeline's state once had, for its own things."""
    command_key = 'crowded'
    _bg_events = 'mine'
    _bg_decided = True
    _bg_rt = None

    def __init__(self, fail=False):
        self.fail = fail
        self._bg_exception = 'also mine'
        self._bg_future = self._bg_timer = self._bg_used = 'mine too'

    def run(self):
        if self.fail:
            raise ConnectionError('down')
        return 'fresh'

    def fallback(self):
        return 'stale'


@pytest.mark.parametrize('driver', ['execute', 'queue'])
def test_a_subclass_may_name_its_attributes_as_the_pipeline_once_named_its_state(driver):
    def answer(cmd):
        if driver == 'execute':
            return cmd.execute()

        async def queued():
            return await cmd.queue()
        return asyncio.run(queued())

    good, bad = Crowded(), Crowded(fail=True)
    assert answer(good) == 'fresh' and good.events == (Event.SUCCESS,)
    assert answer(bad) == 'stale'
    assert bad.events == (Event.FAILURE, Event.FALLBACK_SUCCESS)
    assert type(bad.execution_exception) is ConnectionError
    assert (bad._bg_events, bad._bg_exception, bad._bg_future) == ('mine', 'also mine',
                                                                   'mine too')


def test_resolved_timeout_is_the_one_the_execution_started_with():
    class Reads(Command):
        command_key = 'reads_timeout'
        timeout = 2.0

        def run(self):
            component.add('command', {'command_key': 'reads_timeout', 'timeout': 5.0})
            component.install()   # while this execution runs: its timer keeps 2 s
            return self.resolved_timeout

    cmd = Reads()
    assert cmd.resolved_timeout == 2.0
    assert cmd.execute() == 2.0
    assert Reads().resolved_timeout == 5.0
