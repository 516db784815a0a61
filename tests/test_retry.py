"""Retries through the pipeline (the guide's "Retries with a budget"; issue 15, Done when 2), on the FakeClock.

Every test runs under both drivers, and with a plain and an ``async def run()``
where that applies; the budget's own arithmetic is in test_retry_budget.py.
"""
import asyncio
import threading

import pytest

from blackgate import BadRequest, Command, CommandError, Event, component
from support import in_thread, run_async

RETRY = Event.RETRY
EXHAUSTED = Event.RETRY_BUDGET_EXHAUSTED


class Throttled(ConnectionError):
    def __init__(self, retry_after):
        super().__init__('429 slow down')
        self.retry_after = retry_after


class Scripted(Command):
    """Each attempt takes the next outcome of its script: a value, or an exception to raise.

    ``advance`` seconds of fake time pass in each attempt (the dependency's latency).
    """

    command_key = 'scripted'
    retry_attempts = 2
    retry_backoff = 0.0
    circuit_breaker_enabled = False

    def __init__(self, *script, advance=0.0):
        self.script = list(script)
        self.advance = advance
        self.attempts = 0

    def run(self):
        return self._next()

    def _next(self):
        self.attempts += 1
        if self.advance:
            component.clock.advance(self.advance)
        outcome = self.script.pop(0) if self.script else ConnectionError('no more script')
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def fallback(self):
        return 'stale'


class AsyncScripted(Scripted):
    command_key = 'async_scripted'

    async def run(self):
        return self._next()


def call(command):
    """Run ``command`` under the driver the test is parametrized with."""
    if DRIVER[0] == 'execute':
        return command.execute()

    async def queued():
        return await command.queue()

    return run_async(queued())


DRIVER = ['execute']


@pytest.fixture(params=['execute', 'queue'])
def driver(request):
    DRIVER[0] = request.param
    yield request.param
    DRIVER[0] = 'execute'


@pytest.fixture(params=['sync', 'async'])
def kind(request, driver):
    if request.param == 'async' and driver == 'execute':
        pytest.skip('an async def run() needs queue()')
    return Scripted if request.param == 'sync' else AsyncScripted


def subclass(base, **attributes):
    return type(base.__name__ + 'Variant', (base,), attributes)


# -- the basics ------------------------------------------------------------------------------

def test_success_on_the_second_attempt(kind):
    command = kind(ConnectionError('reset'), 'fresh')
    assert call(command) == 'fresh'
    assert command.events == (Event.FAILURE, RETRY, Event.SUCCESS)
    assert command.attempts == 2
    metrics = component.metrics(kind.command_key)
    assert metrics.rolling_count(RETRY) == 1
    assert metrics.rolling_count(Event.FAILURE) == 1 and metrics.rolling_count(Event.SUCCESS) == 1


def test_attempts_run_out_and_the_fallback_answers(kind):
    command = kind(OSError('1'), OSError('2'), OSError('3'), 'never reached')
    assert call(command) == 'stale'
    assert command.attempts == 3   # the first and retry_attempts = 2 more
    assert command.events == (Event.FAILURE, RETRY, Event.FAILURE, RETRY, Event.FAILURE,
                              Event.FALLBACK_SUCCESS)


def test_bad_request_is_never_retried(kind):
    command = kind(BadRequest('no such user'), 'fresh')
    with pytest.raises(BadRequest):
        call(command)
    assert command.attempts == 1 and command.events == (Event.BAD_REQUEST,)


def test_retry_on_narrows_what_is_retried(kind):
    narrow = subclass(kind, retry_on=(ConnectionError,))
    command = narrow(ValueError('a bug, not an outage'), 'fresh')
    assert call(command) == 'stale'
    assert command.attempts == 1 and RETRY not in command.events


def test_without_retry_attempts_nothing_changes(kind):
    plain = subclass(kind, retry_attempts=0)
    command = plain(ConnectionError('reset'), 'fresh')
    assert call(command) == 'stale'
    assert command.events == (Event.FAILURE, Event.FALLBACK_SUCCESS)
    assert component.retry_budget(kind.command_key) is None


def test_the_caller_sees_the_original_error_as_cause(kind):
    # tenacity #24: not a RetryError that hides what happened.
    bare = subclass(kind, fallback_enabled=False)
    command = bare(ConnectionError('first'), ConnectionError('last'), ConnectionError('x'))
    with pytest.raises(CommandError) as raised:
        call(command)
    assert isinstance(raised.value.cause, ConnectionError)
    assert str(raised.value.cause) == 'x'   # the last attempt's own exception
    assert raised.value.failure_type.value == 'COMMAND_EXCEPTION'


@pytest.mark.parametrize('stop', [KeyboardInterrupt, SystemExit])
def test_the_program_being_stopped_is_never_retried(stop, driver):
    # tenacity #186, #529
    command = Scripted(stop(), 'fresh')
    try:   # (what becomes of it is the pipeline's usual rule; here: no second attempt)
        call(command)
    except (stop, CommandError):
        pass
    assert command.attempts == 1 and RETRY not in command.events


def test_a_cancelled_async_run_is_never_retried(clock):
    command = AsyncScripted(asyncio.CancelledError(), 'fresh')

    async def queued():
        return await command.queue()

    try:   # (what becomes of it is the pipeline's usual rule; here: no second attempt)
        run_async(queued())
    except (asyncio.CancelledError, CommandError):
        pass
    assert command.attempts == 1 and RETRY not in command.events


# -- time -------------------------------------------------------------------------------------

def test_a_timeout_is_retried_only_when_enabled(clock, driver):
    # Each attempt takes 0.6 s of a 1 s timeout. Without retry_on_timeout the first
    # may use it all; with it, the first gets its share (half: one retry left) and
    # times out, and the second gets what is left.
    plain = subclass(Scripted, timeout=1.0, retry_attempts=1)
    command = plain('fresh', 'fresh', advance=0.6)
    assert call(command) == 'fresh'
    assert command.events == (Event.SUCCESS,)
    too_slow = plain('fresh', 'fresh', advance=1.2)
    assert call(too_slow) == 'stale'
    assert too_slow.events == (Event.TIMEOUT, Event.FALLBACK_SUCCESS)

    retried = subclass(Scripted, timeout=1.0, retry_attempts=1, retry_on_timeout=True,
                       command_key='scripted_timeouts')
    command = retried('late', 'fresh', advance=0.6)
    assert call(command) == 'stale'   # 0.6 > 0.5, then 0.6 > the 0.4 left
    assert command.events == (Event.TIMEOUT, RETRY, Event.TIMEOUT, Event.FALLBACK_SUCCESS)
    assert call(retried('fresh')) == 'fresh'   # quick: within its share


def test_the_whole_call_stays_within_one_timeout(clock, driver):
    many = subclass(Scripted, timeout=1.0, retry_attempts=10)
    started = clock.monotonic()
    command = many(*[ConnectionError(str(i)) for i in range(11)], advance=0.3)
    assert call(command) == 'stale'
    # attempts at 0.0, 0.3, 0.6 and 0.9 s; the fourth answers after the deadline
    assert command.attempts == 4
    assert command.events[-2:] == (Event.TIMEOUT, Event.FALLBACK_SUCCESS)
    assert clock.monotonic() - started == pytest.approx(1.2)


def test_retry_after_is_honoured_up_to_the_time_left(clock, driver):
    # Polly #414. Asked to wait 5 s with 1 s left: give up now rather than sleep past it.
    command = subclass(Scripted, timeout=1.0)(Throttled(5.0), 'fresh')
    assert call(command) == 'stale'
    assert command.attempts == 1


def test_execute_waits_for_the_backoff_on_the_clock(clock):
    slow = subclass(Scripted, retry_backoff=0.2, timeout=5.0,
                    command_key='scripted_backoff')
    command = slow(Throttled(0.5), 'fresh')   # the upstream asked for 0.5 s
    answer = in_thread(command.execute)
    assert clock.wait_for_waiters(1)
    assert command.attempts == 1 and not answer.done()
    clock.advance(0.4)
    assert command.attempts == 1 and not answer.done()
    clock.advance(0.2)
    assert answer.result(5) == 'fresh'
    assert command.attempts == 2


def test_queue_backs_off_on_an_ioloop_timer_and_never_blocks(clock):
    slow = subclass(Scripted, retry_backoff=0.2, timeout=5.0,
                    command_key='scripted_backoff')

    async def scenario():
        command = slow(Throttled(0.5), 'fresh')
        future = command.queue()
        for _ in range(50):   # the first attempt runs on a worker; its answer comes back
            await asyncio.sleep(0.01)
            if command.attempts:
                break
        ticks = 0
        while ticks < 5:   # the loop keeps turning while the retry waits
            await asyncio.sleep(0)
            ticks += 1
        assert not future.done() and command.attempts == 1
        clock.advance(0.6)
        return await asyncio.wait_for(future, 5), command

    value, command = run_async(scenario())
    assert value == 'fresh' and command.attempts == 2


# -- the breaker and the budget --------------------------------------------------------------

def test_an_open_breaker_stops_the_retries(clock, kind):
    tripping = subclass(kind, retry_attempts=5, circuit_breaker_enabled=True,
                        circuit_breaker_request_volume_threshold=2,
                        metrics_health_snapshot_interval=0)
    command = tripping(*[ConnectionError(str(i)) for i in range(6)])
    assert call(command) == 'stale'
    assert command.attempts == 2   # each attempt counted: 2 failures of 2 open it
    assert command.events == (Event.FAILURE, RETRY, Event.FAILURE, RETRY,
                              Event.SHORT_CIRCUITED, Event.FALLBACK_SUCCESS)
    assert isinstance(command.execution_exception, ConnectionError)


def test_the_budget_holds_under_total_failure(clock, driver):
    # 100 % failure, three retries wanted per call: retries stay within 20 % of the
    # calls plus the floor of 10 a second over the run.
    hopeless = subclass(Scripted, retry_attempts=3, command_key='hopeless')
    seen = []

    class Count:
        def on_event(self, command_key, event):
            seen.append(event)

    component.add_listener(Count())
    calls, seconds = 400, 8.0
    for _ in range(calls):
        clock.advance(seconds / calls)
        assert call(hopeless()) == 'stale'
    retries = seen.count(RETRY)
    assert retries <= 0.2 * calls + 10 * (seconds + 1)
    assert retries < calls   # without a budget: 3 * calls
    assert seen.count(EXHAUSTED) > 0
    budget = component.retry_budget('hopeless')
    assert budget.withdrawn == retries


def test_budget_exhausted_is_an_event_of_the_call(clock, driver):
    broke = subclass(Scripted, retry_attempts=1, retry_budget_percent=0,
                     retry_budget_min_per_second=0, command_key='broke')
    command = broke(ConnectionError('reset'), 'fresh')
    assert call(command) == 'stale'
    assert command.events == (Event.FAILURE, EXHAUSTED, Event.FALLBACK_SUCCESS)
    assert component.metrics('broke').rolling_count(EXHAUSTED) == 1


def test_retry_state_is_per_call_under_threads(clock):
    # tenacity #93: two calls at once each get their own attempts.
    gate = threading.Barrier(2, timeout=5)

    class Together(Scripted):
        command_key = 'together'

        def run(self):
            if self.attempts == 0:
                gate.wait()
            return self._next()

    first = Together(ConnectionError('a'), 'one')
    second = Together(ConnectionError('b'), 'two')
    answers = [in_thread(first.execute), in_thread(second.execute)]
    assert [answer.result(5) for answer in answers] == ['one', 'two']
    assert first.attempts == second.attempts == 2
