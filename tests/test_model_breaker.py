"""A model-based test of the circuit breaker and the rolling counts (issue 8).

A hypothesis state machine drives real commands of one command key through the
public API, with the injected ``FakeClock``, in random sequences of:
successes, failures and bad requests (through ``execute()`` and ``queue()``,
synchronous and ``async def run()``), timeouts (a ``run()`` answering after
its deadline, a ``run()`` held on an Event while the clock passes the
deadline, in ``execute()`` on a helper thread and in ``queue()``, and an
``async def run()`` cancelled by its timer), thread-pool rejections (the one
worker of the pool held busy), semaphore rejections (the one permit held by
an ``async def run()``, which then answers), fallbacks that work, raise, are
missing or are rejected, clock advances (small steps, to bucket boundaries,
to the end of the sleep window, past the whole window), forced states
(``blackgate.testing``), ``breaker.reset()`` and configuration changes
(``component.add('command', ...)`` then ``install()``).

After every step the breaker's state, the events of the command, its answer,
every rolling count, the health and the transitions a listener saw are
compared with :class:`Reference`, a small model written from docs/guide.rst (The circuit breaker)
and the documentation of the rolling window, not from the code:

- the window is ``metrics_rolling_buckets`` whole buckets of ``window /
  buckets`` seconds, aligned on ``floor(now / width)``, the newest included;
- a completion is counted when it completes, at the time it completes;
- the breaker judges the health on a completion when a snapshot falls due
  (every ``metrics_health_snapshot_interval``; 0: every completion), and trips
  when ``total >= volume``, ``total > 0`` and ``error% >= threshold``, with
  errors = FAILURE + TIMEOUT + THREAD_POOL_REJECTED + SEMAPHORE_REJECTED and
  total = errors + SUCCESS;
- after the sleep window, one trial: its success closes the breaker and
  restarts the counts (the trial itself is then counted in the fresh window),
  anything else re-opens it for a new sleep window, from the trial's end;
- force_open wins over force_closed; a disabled breaker never opens; neither
  changes the state underneath, which shows again once they are lifted;
- ``reset()`` closes and restarts the counts; a change of the window's shape
  restarts the counts.

Every duration is a multiple of 1/64 s and every bucket width a power of two,
so the model's arithmetic is exact and a divergence is never float noise.

Two machines: one judging every completion (snapshot interval 0), one with a
non-zero snapshot interval. The number of sequences comes from a hypothesis
profile: ``blackgate-model-ci`` (2,000 sequences of up to 30 steps per
machine, about 25 s each) when the environment variable ``CI`` is set, as CI
services set it, else ``blackgate-model-dev`` (200, a few seconds);
``BLACKGATE_MODEL_PROFILE=ci`` or ``=dev`` chooses one explicitly.
"""
import asyncio
import collections
import logging
import math
import os
import threading
import time

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition,
                                 rule, run_state_machine_as_test)

from blackgate import (BadRequest, BreakerState, Command, CommandError, Event, FailureType,
                       component)
from blackgate.testing import FakeClock, force_closed, force_open, unforce

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN

#: Real seconds: the longest any step waits for a thread, a worker or the loop.
WAIT = 10.0
#: Every duration in the test is a multiple of this (exact in binary).
TICK = 1 / 64
KEY = 'model'
GROUP = 'model'

_COMMON = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.filter_too_much])
#: CI (the environment variable ``CI`` set, as CI services do): 2,000 sequences per machine.
settings.register_profile('blackgate-model-ci', max_examples=2000, stateful_step_count=30,
                          **_COMMON)
#: A developer's run: 200 sequences per machine, a few seconds.
settings.register_profile('blackgate-model-dev', max_examples=200, stateful_step_count=30,
                          **_COMMON)


def _profile():
    """``BLACKGATE_MODEL_PROFILE`` (ci or dev) if set, else ci under CI, else dev."""
    name = os.environ.get('BLACKGATE_MODEL_PROFILE', '').strip().lower()
    if name not in ('ci', 'dev'):
        on_ci = os.environ.get('CI', '').strip().lower() not in ('', '0', 'false', 'no')
        name = 'ci' if on_ci else 'dev'
    return settings.get_profile('blackgate-model-' + name)


ERRORS = (Event.FAILURE, Event.TIMEOUT, Event.THREAD_POOL_REJECTED, Event.SEMAPHORE_REJECTED)
FAILURE_TYPE = {
    Event.FAILURE: FailureType.COMMAND_EXCEPTION,
    Event.TIMEOUT: FailureType.TIMEOUT,
    Event.SHORT_CIRCUITED: FailureType.SHORTCIRCUIT,
    Event.THREAD_POOL_REJECTED: FailureType.REJECTED_THREAD_EXECUTION,
    Event.SEMAPHORE_REJECTED: FailureType.REJECTED_SEMAPHORE_EXECUTION,
}
PRIMARY = {'ok': Event.SUCCESS, 'fail': Event.FAILURE, 'bad': Event.BAD_REQUEST}

#: Sequences run, by machine (the figure the issue asks for).
SEQUENCES = collections.Counter()


# -- the reference model ------------------------------------------------------------------

class Reference:
    """What the breaker, the counts and the listener should show (docs/guide.rst)."""

    def __init__(self, now, config):
        self.now = now
        self.config = dict(config)
        self.state = CLOSED            # underneath any force or disable
        self.opened_at = None
        self.buckets = {}              # bucket number -> Counter of events
        self.next_snapshot = -math.inf
        self.transitions = []

    # configuration
    def shape(self):
        c = self.config
        return (c.get('metrics_rolling_window'), c.get('metrics_rolling_buckets'),
                c.get('metrics_health_snapshot_interval'))

    def configure(self, changes):
        before = self.shape()
        self.config.update(changes)
        if self.shape() != before:
            self._forget_counts()

    def width(self):
        return self.config['metrics_rolling_window'] / self.config['metrics_rolling_buckets']

    def judging(self):
        """The breaker follows its health: enabled and not forced either way."""
        c = self.config
        return (c['circuit_breaker_enabled'] and not c['circuit_breaker_force_open']
                and not c['circuit_breaker_force_closed'])

    def visible_state(self):
        c = self.config
        if not c['circuit_breaker_enabled']:
            return CLOSED
        if c['circuit_breaker_force_open']:
            return OPEN
        if c['circuit_breaker_force_closed']:
            return CLOSED
        return self.state

    # time and counts
    def advance(self, seconds):
        self.now += seconds

    def _forget_counts(self):
        self.buckets.clear()
        self.next_snapshot = -math.inf

    def counts(self):
        current = math.floor(self.now / self.width())
        oldest_kept = current - self.config['metrics_rolling_buckets'] + 1
        total = {event: 0 for event in Event}
        for number, counter in self.buckets.items():
            if oldest_kept <= number <= current:
                for event, n in counter.items():
                    total[event] += n
        return total

    def health(self):
        counts = self.counts()
        errors = sum(counts[event] for event in ERRORS)
        return errors + counts[Event.SUCCESS], errors

    def _count(self, events):
        """Count a completion now; the health if a snapshot fell due, else None."""
        number = math.floor(self.now / self.width())
        self.buckets.setdefault(number, collections.Counter()).update(events)
        if self.now < self.next_snapshot:
            return None
        self.next_snapshot = self.now + self.config['metrics_health_snapshot_interval']
        return self.health()

    # the breaker
    def _move(self, to):
        if self.state is not to:
            self.transitions.append((self.state, to))
        self.state = to
        if to is OPEN:
            self.opened_at = self.now
        elif to is CLOSED:
            self._forget_counts()

    def admit(self):
        """'allow', 'trial' or 'deny' for a call starting now."""
        c = self.config
        if not c['circuit_breaker_enabled'] or (c['circuit_breaker_force_closed']
                                                and not c['circuit_breaker_force_open']):
            return 'allow'
        if c['circuit_breaker_force_open']:
            return 'deny'
        if self.state is CLOSED:
            return 'allow'
        if (self.state is OPEN
                and self.now >= self.opened_at + c['circuit_breaker_sleep_window']):
            self._move(HALF_OPEN)
            return 'trial'
        return 'deny'

    def complete(self, events, ticket):
        if ticket == 'trial':
            if self.state is HALF_OPEN:
                self._move(CLOSED if events[0] is Event.SUCCESS else OPEN)
            self._count(events)   # a trial's completion is not judged
            return
        health = self._count(events)
        if health is None or not self.judging() or self.state is not CLOSED:
            return
        total, errors = health
        volume = self.config['circuit_breaker_request_volume_threshold']
        threshold = self.config['circuit_breaker_error_threshold_percentage']
        if total >= volume and total > 0 and 100 * errors >= threshold * total:
            self._move(OPEN)

    def reset(self):
        self._move(CLOSED)
        self._forget_counts()

    def events(self, primary, fallback):
        """The events a call with this primary event and fallback behaviour records."""
        if primary in (Event.SUCCESS, Event.BAD_REQUEST):
            return (primary,)
        if not self.config['fallback_enabled']:
            return (primary, Event.FALLBACK_MISSING)
        if self.config['fallback_max_concurrent_requests'] == 0:
            return (primary, Event.FALLBACK_REJECTION)
        return (primary, Event.FALLBACK_SUCCESS if fallback == 'ok' else Event.FALLBACK_FAILURE)


# -- the commands under test ----------------------------------------------------------------

class Gate:
    """A point where a run() on a worker waits (at most WAIT) until the test opens it."""

    def __init__(self):
        self.entered = threading.Event()
        self.opened = threading.Event()

    def hold(self):
        self.entered.set()
        if not self.opened.wait(WAIT):
            raise AssertionError('run() was never released')


class Late:
    """run() moves the clock past its own deadline, then answers: too late, a timeout."""

    def __init__(self, seconds):
        self.seconds = seconds


def _act(outcome):
    if outcome == 'ok':
        return 'fresh'
    if outcome == 'fail':
        raise ConnectionError('upstream down')
    if outcome == 'bad':
        raise BadRequest('no such user')
    if isinstance(outcome, Late):
        component.clock.advance(outcome.seconds)
        return 'late'
    if isinstance(outcome, Gate):
        outcome.hold()
        return 'late'
    raise AssertionError(outcome)


class ModelCommand(Command):
    command_key = KEY
    group_key = GROUP
    max_concurrent_requests = 1   # shared by the key: one async run() at a time

    def __init__(self, outcome, fallback='ok'):
        self.outcome = outcome
        self.fallback_behaviour = fallback

    def fallback(self):
        if self.fallback_behaviour == 'raise':
            raise LookupError('cache empty')
        return 'stale'


class Sync(ModelCommand):
    def run(self):
        return _act(self.outcome)


class Async(ModelCommand):
    async def run(self):
        outcome = self.outcome
        if isinstance(outcome, tuple):      # ('hold', asyncio.Event, then)
            await outcome[1].wait()
            outcome = outcome[2]
        return _act(outcome)


class Occupant(Command):
    """Another key in the same one-worker pool: holds the worker while its gate is shut."""

    command_key = 'occupant'
    group_key = GROUP
    timeout_enabled = False

    def __init__(self, gate):
        self.gate = gate

    def run(self):
        self.gate.hold()
        return 'done'


class Transitions:
    def __init__(self):
        self.seen = []

    def on_state_change(self, command_key, old, new):
        if command_key == KEY:
            self.seen.append((old, new))


# -- the state machine ----------------------------------------------------------------------

fallbacks = st.sampled_from(['ok', 'ok', 'ok', 'raise'])
drivers = st.sampled_from(['execute', 'queue'])
SHAPES = [(1.0, 4), (2.5, 10), (2.0, 1), (4.0, 4), (10.0, 10), (3.0, 6)]


def setting_values():
    return {
        'circuit_breaker_enabled': st.sampled_from([True, True, True, True, False]),
        'circuit_breaker_request_volume_threshold': st.integers(0, 6),
        'circuit_breaker_error_threshold_percentage': st.sampled_from([0, 1, 25, 50, 60, 75,
                                                                       100]),
        'circuit_breaker_sleep_window': st.sampled_from([0.0, 0.25, 1.0, 2.5, 5.0]),
        'shape': st.sampled_from(SHAPES),
        # an index into the machine's ``intervals``
        'metrics_health_snapshot_interval': st.integers(0, 2),
        'timeout': st.sampled_from([0.25, 1.0, 2.0]),
        'fallback_enabled': st.sampled_from([True, True, True, True, False]),
        'fallback_max_concurrent_requests': st.sampled_from([10, 10, 10, 10, 0]),
    }


def _expand(drawn):
    values = dict(drawn)
    if 'shape' in values:
        values['metrics_rolling_window'], values['metrics_rolling_buckets'] = values.pop('shape')
    return values


full_configs = st.fixed_dictionaries(setting_values()).map(_expand)
config_changes = st.fixed_dictionaries({}, optional=setting_values()).filter(bool).map(_expand)


class BreakerMachine(RuleBasedStateMachine):
    """Drive the real 'model' command key and the Reference side by side."""

    intervals = (0.0,)

    def __init__(self):
        super().__init__()
        SEQUENCES[type(self).__name__] += 1
        component.reset()
        self.clock = component.clock = FakeClock()
        component.add('executor_pool', {'group_key': GROUP, 'max_workers': 1})
        component.install()
        self.listener = Transitions()
        component.add_listener(self.listener)
        self.model = None
        self.loop = None
        self.gates = []

    def teardown(self):
        for gate in self.gates:
            gate.opened.set()
        if self.loop is not None:
            self.loop.run_until_complete(asyncio.sleep(0))
            self.loop.close()
        component.reset()

    # -- helpers --------------------------------------------------------------------------

    def run(self, coroutine):
        if self.loop is None:
            self.loop = asyncio.new_event_loop()
        return self.loop.run_until_complete(asyncio.wait_for(coroutine, WAIT))

    def gate(self):
        self.gates.append(Gate())
        return self.gates[-1]

    def settle(self):
        """Wait (in real time) until a worker that answered too late has finished."""
        pool = component.pool(GROUP)
        metrics = component.metrics(KEY)
        deadline = time.monotonic() + WAIT
        while pool.in_flight or metrics.concurrent_executions:
            assert time.monotonic() < deadline, 'a worker stayed busy'
            time.sleep(0.0002)

    @staticmethod
    async def answer(future):
        try:
            return 'value', await future
        except (CommandError, BadRequest) as exc:
            return 'error', exc

    def drive(self, cmd, driver):
        if driver == 'execute':
            try:
                return 'value', cmd.execute()
            except (CommandError, BadRequest) as exc:
                return 'error', exc

        async def queued():
            return await self.answer(cmd.queue())

        return self.run(queued())

    def check(self, cmd, got, events):
        assert cmd.events == events
        primary, last = events[0], events[-1]
        kind, value = got
        if primary is Event.SUCCESS:
            assert got == ('value', 'fresh')
        elif primary is Event.BAD_REQUEST:
            assert kind == 'error' and type(value) is BadRequest
        elif last is Event.FALLBACK_SUCCESS:
            assert got == ('value', 'stale')
        else:
            assert kind == 'error' and type(value) is CommandError, got
            expected = (FailureType.REJECTED_SEMAPHORE_FALLBACK
                        if last is Event.FALLBACK_REJECTION else FAILURE_TYPE[primary])
            assert value.failure_type is expected

    def predict(self, outcome_if_admitted, fallback):
        """Admit a call in the model; its ticket and its events if nothing else happens."""
        ticket = self.model.admit()
        primary = Event.SHORT_CIRCUITED if ticket == 'deny' else outcome_if_admitted
        return ticket, self.model.events(primary, fallback)

    def configure(self, values):
        if 'metrics_health_snapshot_interval' in values:
            values = dict(values)
            index = values['metrics_health_snapshot_interval']
            values['metrics_health_snapshot_interval'] = self.intervals[index % len(self.intervals)]
        component.add('command', {'command_key': KEY, **values})
        component.install()
        self.model.configure(values)

    # -- steps ----------------------------------------------------------------------------

    @initialize(config=full_configs)
    def start(self, config):
        config = {**config, 'circuit_breaker_force_open': False,
                  'circuit_breaker_force_closed': False}
        self.model = Reference(self.clock.monotonic(), {})
        self.configure(config)

    @rule(outcome=st.sampled_from(['ok', 'ok', 'fail', 'fail', 'bad']), driver=drivers,
          fallback=fallbacks)
    def call(self, outcome, driver, fallback):
        cmd = Sync(outcome, fallback)
        ticket, events = self.predict(PRIMARY[outcome], fallback)
        self.model.complete(events, ticket)
        self.check(cmd, self.drive(cmd, driver), events)

    @rule(outcome=st.sampled_from(['ok', 'fail', 'bad']), fallback=fallbacks)
    def call_async(self, outcome, fallback):
        cmd = Async(outcome, fallback)
        ticket, events = self.predict(PRIMARY[outcome], fallback)
        self.model.complete(events, ticket)

        async def queued():
            return await self.answer(cmd.queue())

        self.check(cmd, self.run(queued()), events)

    @rule(how=st.sampled_from(['late execute', 'late queue', 'held execute', 'held queue',
                               'async']),
          fallback=fallbacks)
    def time_out(self, how, fallback):
        past_deadline = self.model.config['timeout'] + TICK
        ticket, events = self.predict(Event.TIMEOUT, fallback)
        admitted = ticket != 'deny'
        if admitted:
            self.model.advance(past_deadline)
        self.model.complete(events, ticket)
        if how.startswith('late'):
            cmd = Sync(Late(past_deadline), fallback)
            got = self.drive(cmd, how.split()[1])
        elif how == 'held execute':
            cmd, got = self._held_execute(past_deadline, fallback, admitted)
        elif how == 'held queue':
            cmd, got = self._held_queue(past_deadline, fallback, admitted)
        else:
            cmd, got = self._async_timeout(past_deadline, fallback, admitted)
        self.check(cmd, got, events)
        self.settle()

    def _held_execute(self, seconds, fallback, admitted):
        gate = self.gate()
        cmd = Sync(gate, fallback)
        box = []

        def call():
            box.append(self.drive(cmd, 'execute'))

        caller = threading.Thread(target=call, name='model-caller', daemon=True)
        caller.start()
        if admitted:
            assert gate.entered.wait(WAIT), 'run() was never called'
            assert self.clock.wait_for_waiters(1, WAIT), 'execute() is not waiting'
            self.clock.advance(seconds)
        caller.join(WAIT)
        assert not caller.is_alive(), 'execute() did not return'
        assert gate.entered.is_set() is admitted
        gate.opened.set()
        return cmd, box[0]

    def _held_queue(self, seconds, fallback, admitted):
        gate = self.gate()
        cmd = Sync(gate, fallback)

        async def queued():
            future = cmd.queue()
            assert future.done() is not admitted
            if admitted:
                # run() is on the worker: wait for it there (a short block of this loop)
                assert gate.entered.wait(WAIT), 'run() was never called'
                self.clock.advance(seconds)
            return await self.answer(future)

        got = self.run(queued())
        gate.opened.set()
        return cmd, got

    def _async_timeout(self, seconds, fallback, admitted):
        async def queued():
            release = asyncio.Event()
            cmd = Async(('hold', release, 'ok'), fallback)
            future = cmd.queue()
            assert future.done() is not admitted
            if admitted:
                await asyncio.sleep(0)   # run() starts and waits
                self.clock.advance(seconds)
            got = await self.answer(future)
            release.set()
            return cmd, got

        return self.run(queued())

    @rule(driver=drivers, fallback=fallbacks)
    def pool_rejection(self, driver, fallback):
        gate = self.gate()

        async def occupy():
            return Occupant(gate).queue()

        occupied = self.run(occupy())
        assert gate.entered.wait(WAIT), 'the occupant never started'
        cmd = Sync('ok', fallback)
        ticket, events = self.predict(Event.THREAD_POOL_REJECTED, fallback)
        self.model.complete(events, ticket)
        self.check(cmd, self.drive(cmd, driver), events)
        gate.opened.set()
        assert self.run(occupied) == 'done'
        self.settle()

    @rule(holder=st.sampled_from(['ok', 'fail', 'bad']), fallback=fallbacks)
    def semaphore_rejection(self, holder, fallback):
        model = self.model
        first_ticket, first_events = self.predict(PRIMARY[holder], 'ok')
        if first_ticket == 'deny':
            model.complete(first_events, first_ticket)
        # the second call finds the one permit taken, unless the first was short-circuited
        second_ticket, second_events = self.predict(
            Event.SUCCESS if first_ticket == 'deny' else Event.SEMAPHORE_REJECTED, fallback)
        model.complete(second_events, second_ticket)
        if first_ticket != 'deny':
            model.complete(first_events, first_ticket)

        async def scenario():
            release = asyncio.Event()
            first = Async(('hold', release, holder))
            first_future = first.queue()
            second = Async('ok', fallback)
            second_got = await self.answer(second.queue())
            release.set()
            return first, await self.answer(first_future), second, second_got

        first, first_got, second, second_got = self.run(scenario())
        self.check(second, second_got, second_events)
        self.check(first, first_got, first_events)

    @rule(kind=st.sampled_from(['tick', 'bucket', 'sleep window', 'rolling window']),
          offset=st.integers(-3, 8))
    def advance(self, kind, offset):
        model = self.model
        if kind == 'tick':
            target = model.now + max(0, offset) * TICK
        elif kind == 'bucket':   # around the start of the next bucket
            width = model.width()
            target = (math.floor(model.now / width) + 1) * width + offset * TICK
        elif kind == 'sleep window' and model.opened_at is not None:
            target = model.opened_at + model.config['circuit_breaker_sleep_window'] + offset * TICK
        else:                    # about a whole window on
            target = model.now + model.config['metrics_rolling_window'] + offset * TICK
        seconds = max(0.0, target - model.now)
        self.clock.advance(seconds)
        model.advance(seconds)

    @rule(how=st.sampled_from(['open', 'closed', 'none']))
    def force(self, how):
        {'open': force_open, 'closed': force_closed, 'none': unforce}[how](KEY)
        self.model.configure({'circuit_breaker_force_open': how == 'open',
                              'circuit_breaker_force_closed': how == 'closed'})

    @precondition(lambda self: self.model is not None and self.model.judging())
    @rule(open_too=st.booleans())
    def force_both(self, open_too):
        """Both flags at once: force_open wins."""
        self.configure({'circuit_breaker_force_open': open_too,
                        'circuit_breaker_force_closed': True})

    @rule()
    def reset(self):
        component.circuit_breaker(KEY).reset()
        self.model.reset()

    @rule(changes=config_changes)
    def change_configuration(self, changes):
        self.configure(changes)

    # -- after every step --------------------------------------------------------------------

    @invariant()
    def agrees_with_the_model(self):
        model = self.model
        assert self.clock.monotonic() == model.now
        breaker = component.circuit_breaker(KEY)
        expected = model.visible_state()
        assert breaker.state is expected
        assert breaker.is_open() is (expected is not CLOSED)
        metrics = component.metrics(KEY)
        assert metrics.rolling_counts() == model.counts()
        health = metrics.health()
        total, errors = model.health()
        assert (health.total_requests, health.error_count) == (total, errors)
        assert health.error_percentage == pytest.approx(100.0 * errors / total if total else 0.0)
        assert self.listener.seen == model.transitions
        assert metrics.concurrent_executions == 0


class SnapshotMachine(BreakerMachine):
    """The same, with health snapshots every 0.25 to 1 s instead of on every completion."""

    intervals = (0.25, 0.5, 1.0)


# -- the tests ------------------------------------------------------------------------------

@pytest.fixture
def quiet_log():
    """Thousands of failures each log a record; keep them out of the captured log."""
    logger = logging.getLogger('blackgate')
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    yield
    logger.setLevel(level)


@pytest.mark.parametrize('machine', [BreakerMachine, SnapshotMachine],
                         ids=['judging every completion', 'health snapshots'])
def test_breaker_and_rolling_counts_agree_with_the_reference_model(quiet_log, machine):
    before = SEQUENCES[machine.__name__]
    profile = _profile()
    run_state_machine_as_test(machine, settings=profile)
    assert SEQUENCES[machine.__name__] - before >= profile.max_examples
