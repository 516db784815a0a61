"""The circuit breaker: when it trips, what it does open, the one trial, overrides, listeners.

Every test drives time with the injected ``FakeClock`` (the autouse ``clock``
fixture) and holds workers with ``threading.Event``; nothing sleeps. Each wait
on a thread or an Event is bounded by ``WAIT`` so a broken breaker fails a
test instead of hanging it.
"""
import asyncio
import logging
import threading
import time

import pytest

from blackgate import BadRequest, BlackgateError, BreakerState, Command, Event, component
from support import finish, held, start

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN

#: The longest any test waits for a thread or an Event before it fails (seconds).
WAIT = 5.0

#: Passed to command(): leave that setting to the built-in default.
DEFAULT = object()


class Upstream(Command):
    """A call to a fake upstream: ``Cls(outcome)``, outcome 'ok', 'fail', 'bad' or a callable.

    Every ``run()`` appends its outcome to the class's ``runs`` list, so tests
    can count how many calls reached the upstream.
    """

    runs = None  # each class made by command() has its own list

    def __init__(self, outcome='ok'):
        self.outcome = outcome

    def run(self):
        self.runs.append(self.outcome)
        if callable(self.outcome):
            return self.outcome()
        if self.outcome == 'fail':
            raise ConnectionError('upstream down')
        if self.outcome == 'bad':
            raise BadRequest('no such user')
        return 'fresh'

    def fallback(self):
        return 'stale'


def command(key='flaky', **settings):
    """An Upstream subclass for ``key``: trips at 2 requests, judging every completion."""
    settings = {'circuit_breaker_request_volume_threshold': 2,
                'metrics_health_snapshot_interval': 0, **settings}
    settings = {name: value for name, value in settings.items() if value is not DEFAULT}
    return type(key.title(), (Upstream,), dict(command_key=key, runs=[], **settings))


def trip(cls, failures=2):
    """Fail ``failures`` times; the breaker of ``cls`` must be open afterwards."""
    for _ in range(failures):
        assert cls('fail').execute() == 'stale'
    assert component.circuit_breaker(cls.command_key).state is OPEN


def advance_until_returns(clock, thread, seconds):
    """Advance the clock by ``seconds`` until ``thread``, blocked in execute(), returns.

    execute() fixes its deadline when it starts waiting, an instant after run()
    started; an advance that lands before that instant does not time it out, so
    advance again (each extra step only makes the call later, never earlier).
    """
    for _ in range(int(WAIT / 0.05)):
        clock.advance(seconds)
        thread.join(0.05)
        if not thread.is_alive():
            return
    raise AssertionError('execute() did not time out')


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


def run_async(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 2 * WAIT))


# -- when it trips -------------------------------------------------------------------------

@pytest.mark.parametrize('volume, percentage, successes, failures, expected', [
    pytest.param(4, 50, 0, 3, CLOSED, id='volume just below, all errors'),
    pytest.param(4, 50, 0, 4, OPEN, id='volume reached, all errors'),
    pytest.param(4, 50, 2, 2, OPEN, id='successes count toward the volume'),
    pytest.param(4, 50, 3, 2, CLOSED, id='successes lower the percentage below'),
    pytest.param(4, 51, 2, 2, CLOSED, id='50% just below 51%'),
    pytest.param(3, 66.7, 1, 2, CLOSED, id='66.67% just below 66.7%'),
    pytest.param(3, 66.6, 1, 2, OPEN, id='66.67% at or above 66.6%'),
    pytest.param(4, 100, 0, 4, OPEN, id='threshold 100, all errors'),
    pytest.param(4, 100, 1, 4, CLOSED, id='threshold 100, one success'),
    pytest.param(4, 0, 4, 0, OPEN, id='threshold 0 trips on volume alone'),
    pytest.param(4, 0, 3, 0, CLOSED, id='threshold 0, volume not reached'),
    pytest.param(0, 50, 0, 1, OPEN, id='volume 0, first failure'),
    pytest.param(0, 50, 1, 0, CLOSED, id='volume 0, first success'),
    pytest.param(DEFAULT, DEFAULT, 10, 9, CLOSED, id='defaults, 19 requests, 47%'),
    pytest.param(DEFAULT, DEFAULT, 10, 10, OPEN, id='defaults, 20 requests, 50%'),
])
def test_breaker_trips_only_when_volume_and_error_percentage_reach_thresholds(
        volume, percentage, successes, failures, expected):
    Flaky = command(circuit_breaker_request_volume_threshold=volume,
                    circuit_breaker_error_threshold_percentage=percentage)
    # Successes first: the error percentage then only grows, so the last call decides.
    for outcome in ['ok'] * successes + ['fail'] * failures:
        Flaky(outcome).execute()
    assert component.circuit_breaker('flaky').state is expected


def _failures(clock, gate, n):
    Sick = command('sick', circuit_breaker_request_volume_threshold=n)
    for _ in range(n):
        assert Sick('fail').execute() == 'stale'


def _timeouts(clock, gate, n):
    Sick = command('sick', circuit_breaker_request_volume_threshold=n, timeout=1.0)
    release = gate()

    async def time_out_n_calls():
        for _ in range(n):
            future = Sick(held(release)).queue()
            clock.advance(1.0)
            assert await future == 'stale'

    run_async(time_out_n_calls())


def _thread_pool_rejections(clock, gate, n):
    component.add('executor_pool', {'group_key': 'narrow', 'max_workers': 1})
    component.install()
    Occupant = command('occupant', group_key='narrow', timeout_enabled=False)
    entered, release = threading.Event(), gate()
    occupant = start(Occupant(held(release, entered)).execute)
    assert entered.wait(WAIT)
    Sick = command('sick', circuit_breaker_request_volume_threshold=n, group_key='narrow')
    for _ in range(n):
        assert Sick('ok').execute() == 'stale'
    release.set()
    finish(occupant)


def _semaphore_rejections(clock, gate, n):
    class Sick(Command):
        command_key = 'sick'
        circuit_breaker_request_volume_threshold = n
        metrics_health_snapshot_interval = 0
        max_concurrent_requests = 0   # no execution admitted: every call is rejected

        async def run(self):
            return 'fresh'

        def fallback(self):
            return 'stale'

    async def reject_n_calls():
        for _ in range(n):
            assert await Sick().queue() == 'stale'

    run_async(reject_n_calls())


@pytest.mark.parametrize('event, produce', [
    pytest.param(Event.FAILURE, _failures, id='FAILURE'),
    pytest.param(Event.TIMEOUT, _timeouts, id='TIMEOUT'),
    pytest.param(Event.THREAD_POOL_REJECTED, _thread_pool_rejections, id='THREAD_POOL_REJECTED'),
    pytest.param(Event.SEMAPHORE_REJECTED, _semaphore_rejections, id='SEMAPHORE_REJECTED'),
])
def test_each_kind_of_error_counts_toward_tripping_the_breaker(clock, gate, event, produce):
    produce(clock, gate, 3)
    assert component.metrics('sick').rolling_count(event) == 3
    assert component.circuit_breaker('sick').state is OPEN


@pytest.mark.parametrize('event, produce', [
    pytest.param(Event.THREAD_POOL_REJECTED, _thread_pool_rejections, id='THREAD_POOL_REJECTED'),
    pytest.param(Event.SEMAPHORE_REJECTED, _semaphore_rejections, id='SEMAPHORE_REJECTED'),
])
def test_rejections_are_counted_but_do_not_trip_when_count_rejections_is_off(
        clock, gate, event, produce):
    component.set('command_defaults', {'circuit_breaker_count_rejections': False})
    produce(clock, gate, 3)
    metrics = component.metrics('sick')
    assert metrics.rolling_count(event) == 3
    assert metrics.health() == (0, 0, 0.0)   # neither errors nor requests for the breaker
    assert component.circuit_breaker('sick').state is CLOSED


def test_with_count_rejections_off_failures_still_trip_the_breaker():
    Flaky = command(circuit_breaker_count_rejections=False)
    trip(Flaky)


def test_a_flood_of_bad_requests_does_not_trip_the_breaker():
    Flaky = command(circuit_breaker_error_threshold_percentage=1)
    for _ in range(100):
        with pytest.raises(BadRequest):
            Flaky('bad').execute()
    assert component.metrics('flaky').rolling_count(Event.BAD_REQUEST) == 100
    assert component.metrics('flaky').health().total_requests == 0
    assert component.circuit_breaker('flaky').state is CLOSED


def test_bad_requests_do_not_dilute_the_error_percentage():
    Flaky = command(circuit_breaker_error_threshold_percentage=50)
    Flaky('ok').execute()
    for _ in range(10):
        with pytest.raises(BadRequest):
            Flaky('bad').execute()
    Flaky('fail').execute()   # 1 error in 2 requests: 50%; in 12 calls it would be 8%
    assert component.circuit_breaker('flaky').state is OPEN


def test_short_circuited_calls_are_not_counted_as_requests():
    Flaky = command()
    trip(Flaky)
    for _ in range(10):
        assert Flaky('ok').execute() == 'stale'
    metrics = component.metrics('flaky')
    assert metrics.rolling_count(Event.SHORT_CIRCUITED) == 10
    assert metrics.health() == (2, 2, 100.0)


# -- open ----------------------------------------------------------------------------------

def test_open_breaker_short_circuits_to_the_fallback_without_calling_run():
    Flaky = command()
    trip(Flaky)
    cmd = Flaky('ok')
    assert cmd.execute() == 'stale'
    assert Flaky.runs == ['fail', 'fail']
    assert cmd.events == (Event.SHORT_CIRCUITED, Event.FALLBACK_SUCCESS)
    assert cmd.is_response_short_circuited is True


@pytest.mark.parametrize('elapsed, trial', [
    (0.0, False),
    (2.5, False),
    (4.9990234375, False),   # 5 - 2**-10: exact in binary, a moment before the window ends
    (5.0, True),
    (60.0, True),
])
def test_open_breaker_lets_a_trial_through_only_after_the_sleep_window(clock, elapsed, trial):
    Flaky = command(circuit_breaker_sleep_window=5.0)
    trip(Flaky)
    clock.advance(elapsed)
    assert Flaky('ok').execute() == ('fresh' if trial else 'stale')
    assert len(Flaky.runs) == 2 + trial


def test_breaker_is_half_open_and_short_circuits_everyone_else_while_the_trial_runs(
        clock, gate):
    Flaky = command()
    trip(Flaky)
    clock.advance(5.0)
    entered, release = threading.Event(), gate()
    trial = start(Flaky(held(release, entered)).execute)
    assert entered.wait(WAIT)
    breaker = component.circuit_breaker('flaky')
    assert breaker.state is HALF_OPEN
    assert breaker.is_open() is True
    others = [Flaky('ok') for _ in range(3)]
    assert [cmd.execute() for cmd in others] == ['stale'] * 3
    assert all(cmd.events[0] is Event.SHORT_CIRCUITED for cmd in others)
    assert len(Flaky.runs) == 3   # two failures and the trial
    release.set()
    assert finish(trial) == ['fresh']


def test_successful_trial_closes_the_breaker_and_forgets_the_old_counts(clock):
    Flaky = command()
    trip(Flaky)
    Flaky('ok').execute()                       # short-circuited
    clock.advance(5.0)
    assert Flaky('ok').execute() == 'fresh'     # the trial
    metrics = component.metrics('flaky')
    assert component.circuit_breaker('flaky').state is CLOSED
    assert metrics.rolling_count(Event.FAILURE) == 0
    assert metrics.rolling_count(Event.SHORT_CIRCUITED) == 0
    assert metrics.health().error_count == 0


def test_failed_trial_reopens_the_breaker_for_a_new_full_sleep_window(clock):
    Flaky = command(circuit_breaker_sleep_window=5.0)
    trip(Flaky)                                 # opened at t
    clock.advance(5.0)
    assert Flaky('fail').execute() == 'stale'   # the trial fails at t + 5
    breaker = component.circuit_breaker('flaky')
    assert breaker.state is OPEN
    clock.advance(4.75)                         # t + 9.75: the first window is long over
    assert Flaky('ok').execute() == 'stale'
    assert len(Flaky.runs) == 3
    clock.advance(0.25)                         # t + 10: a full window after the trial
    assert Flaky('ok').execute() == 'fresh'
    assert breaker.state is CLOSED


def test_trial_that_times_out_reopens_the_breaker_even_if_run_returns_later(clock, gate):
    Flaky = command(timeout=1.0)
    trip(Flaky)
    clock.advance(5.0)
    entered, release, returned = threading.Event(), gate(), threading.Event()

    def slow_success():
        value = held(release, entered)()
        returned.set()
        return value

    trial = start(Flaky(slow_success).execute)
    assert entered.wait(WAIT)
    breaker = component.circuit_breaker('flaky')
    assert breaker.state is HALF_OPEN
    advance_until_returns(clock, trial, 1.0)
    assert trial.results == ['stale']
    assert breaker.state is OPEN
    release.set()
    assert returned.wait(WAIT)
    assert breaker.state is OPEN
    assert Flaky('ok').execute() == 'stale'


# -- exactly one trial under concurrency (issue 3, done-when 5) ----------------------------

CALLERS = 50


def test_fifty_threads_released_together_after_the_sleep_window_send_one_trial(clock):
    Flaky = command()
    trip(Flaky)
    clock.advance(5.0)
    barrier = threading.Barrier(CALLERS)
    others_back = threading.Event()
    lock = threading.Lock()
    returned = []

    def trial():
        # Held until every other caller has its answer, so all of them really
        # asked while this trial was in flight.
        if not others_back.wait(WAIT):
            raise AssertionError('the other callers did not all return')
        return 'fresh'

    def call():
        barrier.wait(WAIT)
        value = Flaky(trial).execute()
        with lock:
            returned.append(value)
            if len(returned) == CALLERS - 1:
                others_back.set()
        return value

    threads = [start(call) for _ in range(CALLERS)]
    results = [value for thread in threads for value in finish(thread)]
    assert len(Flaky.runs) == 2 + 1
    assert sorted(results) == ['fresh'] + ['stale'] * (CALLERS - 1)
    assert component.circuit_breaker('flaky').state is CLOSED


def test_fifty_coroutines_after_the_sleep_window_send_one_trial(clock):
    Flaky = command()
    trip(Flaky)
    clock.advance(5.0)
    others_back = threading.Event()
    returned = []

    def trial():   # on a worker thread, held until the 49 other coroutines have answers
        if not others_back.wait(WAIT):
            raise AssertionError('the other callers did not all return')
        return 'fresh'

    async def call():
        value = await Flaky(trial).queue()
        returned.append(value)
        if len(returned) == CALLERS - 1:
            others_back.set()
        return value

    async def all_callers():
        return await asyncio.gather(*(call() for _ in range(CALLERS)))

    results = run_async(all_callers())
    assert len(Flaky.runs) == 2 + 1
    assert sorted(results) == ['fresh'] + ['stale'] * (CALLERS - 1)
    assert component.circuit_breaker('flaky').state is CLOSED


# -- the health snapshot --------------------------------------------------------------------

def test_breaker_waits_for_the_next_health_snapshot_before_tripping(clock):
    class Flaky(Upstream):   # metrics_health_snapshot_interval left at its default, 0.5 s
        command_key = 'flaky'
        runs = []
        circuit_breaker_request_volume_threshold = 2

    breaker = component.circuit_breaker
    Flaky('fail').execute()             # the first snapshot: 1 request
    for _ in range(5):
        Flaky('fail').execute()         # the snapshot still says 1 request
    assert breaker('flaky').state is CLOSED
    clock.advance(0.25)
    Flaky('fail').execute()
    assert breaker('flaky').state is CLOSED
    clock.advance(0.25)                 # 0.5 s after the first snapshot
    assert breaker('flaky').state is CLOSED   # time alone trips nothing
    Flaky('fail').execute()
    assert breaker('flaky').state is OPEN


def test_zero_snapshot_interval_trips_on_the_completion_that_crosses_the_threshold():
    Flaky = command(metrics_health_snapshot_interval=0)
    Flaky('fail').execute()
    assert component.circuit_breaker('flaky').state is CLOSED
    Flaky('fail').execute()
    assert component.circuit_breaker('flaky').state is OPEN


# -- forced and disabled ---------------------------------------------------------------------

def test_forced_open_breaker_short_circuits_every_call_without_running_it():
    Flaky = command(circuit_breaker_force_open=True)
    commands = [Flaky('ok') for _ in range(5)]
    assert [cmd.execute() for cmd in commands] == ['stale'] * 5
    assert Flaky.runs == []
    assert all(cmd.events == (Event.SHORT_CIRCUITED, Event.FALLBACK_SUCCESS)
               for cmd in commands)


def test_forced_open_breaker_reports_itself_open():
    Flaky = command(circuit_breaker_force_open=True)
    cmd = Flaky('ok')
    cmd.execute()
    breaker = component.circuit_breaker('flaky')
    assert cmd.is_circuit_breaker_open is True
    assert breaker.state is OPEN
    assert breaker.is_open() is True


def test_forced_open_breaker_never_lets_a_trial_through(clock):
    Flaky = command(circuit_breaker_force_open=True)
    Flaky('ok').execute()
    clock.advance(60.0)
    assert Flaky('ok').execute() == 'stale'
    assert Flaky.runs == []


@pytest.mark.parametrize('used_before_install', [False, True],
                         ids=['before first use', 'after first use'])
def test_force_open_added_to_the_component_applies_on_install(used_before_install):
    Flaky = command()
    if used_before_install:
        assert Flaky('ok').execute() == 'fresh'
    component.add('command', {'command_key': 'flaky', 'circuit_breaker_force_open': True})
    component.install()
    cmd = Flaky('ok')
    assert cmd.execute() == 'stale'
    assert len(Flaky.runs) == used_before_install
    assert cmd.is_circuit_breaker_open is True
    assert component.circuit_breaker('flaky').state is OPEN


def test_forced_closed_breaker_never_trips_but_metrics_still_count():
    Flaky = command(circuit_breaker_force_closed=True,
                    circuit_breaker_error_threshold_percentage=1)
    for _ in range(10):
        assert Flaky('fail').execute() == 'stale'
    assert len(Flaky.runs) == 10
    assert component.circuit_breaker('flaky').state is CLOSED
    metrics = component.metrics('flaky')
    assert metrics.rolling_count(Event.FAILURE) == 10
    assert metrics.health() == (10, 10, 100.0)


@pytest.mark.parametrize('enabled, force_open, force_closed, short_circuited', [
    (True, False, False, True),     # trips on the failures
    (True, True, False, True),
    (True, False, True, False),
    (True, True, True, True),       # force_open wins, as in Hystrix
    (False, False, False, False),
    (False, True, False, False),    # disabled: no breaker at all, as in Hystrix
    (False, False, True, False),
])
def test_breaker_settings_decide_whether_a_failing_command_is_short_circuited(
        enabled, force_open, force_closed, short_circuited):
    Flaky = command(circuit_breaker_enabled=enabled, circuit_breaker_force_open=force_open,
                    circuit_breaker_force_closed=force_closed)
    for _ in range(4):
        Flaky('fail').execute()
    cmd = Flaky('ok')
    assert cmd.execute() == ('stale' if short_circuited else 'fresh')
    assert cmd.is_response_short_circuited is short_circuited
    assert component.circuit_breaker('flaky').is_open() is short_circuited


def test_disabled_breaker_is_never_open_and_runs_every_call():
    Flaky = command(circuit_breaker_enabled=False)
    for _ in range(10):
        assert Flaky('fail').execute() == 'stale'
    breaker = component.circuit_breaker('flaky')
    assert len(Flaky.runs) == 10
    assert breaker.is_open() is False
    assert breaker.state is CLOSED


# -- reset() and reading -------------------------------------------------------------------

def test_reset_closes_an_open_breaker_and_clears_the_counts():
    Flaky = command()
    trip(Flaky)
    breaker = component.circuit_breaker('flaky')
    breaker.reset()
    assert breaker.state is CLOSED
    assert component.metrics('flaky').health() == (0, 0, 0.0)
    assert component.metrics('flaky').rolling_count(Event.FAILURE) == 0
    assert Flaky('ok').execute() == 'fresh'


def test_reset_closes_a_half_open_breaker_and_the_late_trial_failure_is_ignored(clock, gate):
    Flaky = command(circuit_breaker_error_threshold_percentage=100)
    trip(Flaky)
    clock.advance(5.0)
    entered, release = threading.Event(), gate()
    trial = start(Flaky(held(release, entered, ConnectionError('still down'))).execute)
    assert entered.wait(WAIT)
    breaker = component.circuit_breaker('flaky')
    assert breaker.state is HALF_OPEN
    breaker.reset()
    assert breaker.state is CLOSED
    assert component.metrics('flaky').health() == (0, 0, 0.0)
    assert Flaky('ok').execute() == 'fresh'   # not short-circuited: the breaker is closed
    release.set()
    assert finish(trial) == ['stale']
    assert breaker.state is CLOSED


def test_reading_the_state_after_the_sleep_window_does_not_change_it(clock):
    Flaky = command()
    trip(Flaky)
    clock.advance(60.0)
    breaker = component.circuit_breaker('flaky')
    for _ in range(3):
        assert breaker.state is OPEN
        assert breaker.is_open() is True
    assert Flaky('ok').execute() == 'fresh'   # the trial is still available to a caller


# -- listeners -----------------------------------------------------------------------------

class Transitions:
    def __init__(self):
        self.seen = []

    def on_state_change(self, command_key, old, new):
        self.seen.append((command_key, old, new))


def test_listener_sees_every_transition_in_order(clock):
    listener = Transitions()
    component.add_listener(listener)
    Flaky = command()
    trip(Flaky)
    clock.advance(5.0)
    Flaky('fail').execute()   # failed trial
    clock.advance(5.0)
    Flaky('ok').execute()     # successful trial
    assert listener.seen == [
        ('flaky', CLOSED, OPEN),
        ('flaky', OPEN, HALF_OPEN),
        ('flaky', HALF_OPEN, OPEN),
        ('flaky', OPEN, HALF_OPEN),
        ('flaky', HALF_OPEN, CLOSED),
    ]


@pytest.mark.parametrize('method', ['on_state_change', 'on_event'])
def test_listener_that_raises_is_logged_and_does_not_break_the_command(caplog, method):
    def broken(*args):
        raise RuntimeError('listener bug')

    class Broken:
        pass

    setattr(Broken, method, staticmethod(broken))
    component.add_listener(Broken())
    caplog.set_level(logging.INFO, logger='blackgate')
    Flaky = command()
    assert Flaky('ok').execute() == 'fresh'
    assert Flaky('fail').execute() == 'stale'
    assert Flaky('fail').execute() == 'stale'
    assert component.circuit_breaker('flaky').state is OPEN
    logged = [record for record in caplog.records
              if record.name == 'blackgate' and record.exc_info
              and isinstance(record.exc_info[1], RuntimeError)]
    assert logged
    assert all(record.levelno >= logging.ERROR for record in logged)


def test_removed_listener_is_not_called_again(clock):
    listener = Transitions()
    component.add_listener(listener)
    Flaky = command()
    trip(Flaky)
    component.remove_listener(listener)
    clock.advance(5.0)
    Flaky('ok').execute()
    assert listener.seen == [('flaky', CLOSED, OPEN)]


# -- how it shows ----------------------------------------------------------------------------

def test_repr_shows_key_state_and_error_and_request_counts():
    Flaky = command(circuit_breaker_request_volume_threshold=3)
    Flaky('ok').execute()
    Flaky('fail').execute()
    Flaky('fail').execute()
    assert repr(component.circuit_breaker('flaky')) == '<CircuitBreaker flaky open 2/3>'


def test_opening_is_logged_once_at_warning_with_the_command_key(caplog):
    caplog.set_level(logging.DEBUG, logger='blackgate')
    Flaky = command()
    trip(Flaky)
    for _ in range(5):
        Flaky('ok').execute()   # short-circuited
    opened = [record for record in caplog.records
              if record.name == 'blackgate' and record.levelno == logging.WARNING
              and 'open' in record.getMessage()]
    assert len(opened) == 1
    assert 'flaky' in opened[0].getMessage()


# -- a trial that never answers ---------------------------------------------------------------

class Stuck(Command):
    """Its trial never answers: run() is held until the test lets it go."""

    command_key = 'stuck'
    circuit_breaker_request_volume_threshold = 1
    metrics_health_snapshot_interval = 0
    timeout_enabled = False
    release = threading.Event()

    def __init__(self, fail=True):
        self.fail = fail

    def run(self):
        if not self.fail:
            Stuck.release.wait(5)
            return 'late'
        raise ConnectionError('down')

    def fallback(self):
        return 'stale'


def test_a_trial_that_never_answers_is_given_up_after_its_lease(clock):
    Stuck.release.clear()
    Stuck().execute()
    breaker = component.circuit_breaker('stuck')
    assert breaker.state is BreakerState.OPEN
    clock.advance(5.0)
    trial = threading.Thread(target=Stuck(fail=False).execute)
    trial.start()
    try:
        assert eventually_half_open(breaker)
        clock.advance(breaker.trial_lease - 0.001)
        waiting = Stuck()
        waiting.execute()
        assert waiting.events == (Event.SHORT_CIRCUITED, Event.FALLBACK_SUCCESS)
        clock.advance(0.001)        # the lease (sleep window + 60 s with no timeout) is over
        second = Stuck()
        second.execute()            # a new trial goes; it fails and re-opens the breaker
        assert second.events == (Event.FAILURE, Event.FALLBACK_SUCCESS)
        assert breaker.state is BreakerState.OPEN
    finally:
        Stuck.release.set()
        trial.join(5)
    assert not trial.is_alive()


def eventually_half_open(breaker, timeout=5.0):
    deadline = time.monotonic() + timeout
    while breaker.state is not BreakerState.HALF_OPEN:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def test_a_snapshot_overtaken_by_a_reset_does_not_trip_the_closed_breaker():
    # A completion's snapshot is judged after the lock is released; if the breaker closed
    # (and its counts were reset) in between, that old snapshot must not re-open it.
    Flaky = command(circuit_breaker_request_volume_threshold=1)
    Flaky('fail').execute()
    breaker = component.circuit_breaker('flaky')
    metrics = component.metrics('flaky')
    stale = metrics.last_snapshot
    assert breaker.state is BreakerState.OPEN and stale.error_count == 1
    breaker.reset()
    breaker.evaluate(stale)
    assert breaker.state is BreakerState.CLOSED


# -- the lock order (breaker.py's warning) ---------------------------------------------------

class _OrderedLock:
    """A real lock that notes, per thread, which kinds of lock are held when it is taken."""

    def __init__(self, kind, held, nestings):
        self.kind, self._held, self._nestings = kind, held, nestings
        self._lock = threading.Lock()

    def acquire(self, blocking=True, timeout=-1):
        taken = self._lock.acquire(blocking, timeout)
        if taken:
            stack = self._held.__dict__.setdefault('stack', [])
            self._nestings.extend((outer, self.kind) for outer in stack)
            stack.append(self.kind)
        return taken

    def release(self):
        self._held.stack.remove(self.kind)
        self._lock.release()

    __enter__ = acquire

    def __exit__(self, *exc_info):
        self.release()


def test_a_breaker_takes_its_lock_before_its_windows_never_after(clock, monkeypatch):
    """Trip, trial, close, reset, read: every nesting of the two is breaker -> metrics."""
    import types

    import blackgate.breaker
    import blackgate.metrics
    held, nestings = threading.local(), []
    for module, kind in ((blackgate.breaker, 'breaker'), (blackgate.metrics, 'metrics')):
        fake = types.SimpleNamespace(Lock=lambda kind=kind: _OrderedLock(kind, held, nestings))
        monkeypatch.setattr(module, 'threading', fake)
    cls = command(circuit_breaker_request_volume_threshold=2,
                  metrics_health_snapshot_interval=0)
    trip(cls)
    breaker = component.circuit_breaker('flaky')
    clock.advance(5.0)
    assert cls('ok').execute() == 'fresh'               # the trial: closes, counts reset
    assert breaker.state is CLOSED
    trip(cls)
    breaker.reset()
    assert breaker.state is CLOSED and component.metrics('flaky').health().total_requests == 0
    assert ('breaker', 'metrics') in nestings           # the order was exercised
    assert ('metrics', 'breaker') not in nestings       # and never inverted


def test_adopt_takes_only_the_fleet_reasons_of_the_one_table():
    """Issue 19: every fleet move goes through the breaker's one gate and its table."""
    from blackgate.breaker import FLEET_MOVES, FLEET_REASONS

    breaker = component.circuit_breaker('adopter')
    with pytest.raises(BlackgateError, match=r"adopt\(why='because'\): not a fleet reason"):
        breaker.adopt(BreakerState.OPEN, breaker.version, why='because')
    assert breaker.state is BreakerState.CLOSED
    assert breaker.adopt(BreakerState.OPEN, breaker.version, why='fleet tripped')
    assert breaker.state is BreakerState.OPEN
    with pytest.raises(BlackgateError, match='illegal fleet transition'):
        breaker.adopt(BreakerState.HALF_OPEN, breaker.version)   # a trial is never adopted
    assert breaker.adopt(BreakerState.CLOSED, breaker.version)
    assert (BreakerState.OPEN, BreakerState.CLOSED) in FLEET_MOVES
    assert FLEET_REASONS == {'fleet tripped', 'trial elsewhere'}
