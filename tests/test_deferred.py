"""What an ``async def run()`` may ask of the pipeline: an outcome counted after run()
returns (``defer_outcome()``), a timeout restarted or paused (``refresh_timeout()``,
``pause_timeout()``), and admission by the group's pool (``group_admission``).

HTTPProxyCommand is built on these; here they are tested on plain commands, on the
FakeClock.
"""
import asyncio

import pytest

from blackgate import BlackgateError, BreakerState, Command, CommandError, Event, component
from support import add_pool

WAIT = 5.0


class Streaming(Command):
    """run() answers at once; the work goes on until the test settles its outcome."""

    command_key = 'streaming'
    group_key = 'streams'
    group_admission = True
    circuit_breaker_request_volume_threshold = 1
    metrics_health_snapshot_interval = 0

    async def run(self):
        self.outcome = self.defer_outcome()
        return 'head'


class Paced(Command):
    """run() waits for the test; each step asks the pipeline for something."""

    command_key = 'paced'
    timeout = 1.0

    def __init__(self, steps):
        self.steps = steps

    async def run(self):
        for step in self.steps:
            action = await step.get()
            if action is None:
                return 'done'
            getattr(self, action)()
        return 'done'

    def fallback(self):
        return 'stale'


def counts(key):
    return {event: n for event, n in component.metrics(key).rolling_counts().items() if n}


@pytest.mark.gen_test
async def test_the_caller_gets_the_result_before_the_outcome_is_counted():
    pool = add_pool('streams', max_workers=2)
    cmd = Streaming()
    assert await asyncio.wait_for(cmd.queue(), WAIT) == 'head'
    assert counts('streaming') == {}            # not yet counted
    assert pool.in_flight == 1                  # and its slot still taken
    cmd.outcome.success()
    assert counts('streaming') == {Event.SUCCESS: 1}
    assert pool.in_flight == 0
    assert cmd.events == (Event.SUCCESS,)


@pytest.mark.gen_test
async def test_a_failure_after_the_answer_is_counted_as_a_failure_with_no_fallback():
    add_pool('streams', max_workers=2)
    cmd = Streaming()
    await asyncio.wait_for(cmd.queue(), WAIT)
    cmd.outcome.failure(ConnectionResetError('broke off'))
    assert counts('streaming') == {Event.FAILURE: 1}
    assert cmd.events == (Event.FAILURE,)
    assert isinstance(cmd.execution_exception, ConnectionResetError)
    assert component.circuit_breaker('streaming').state is BreakerState.OPEN   # it counts


@pytest.mark.gen_test
async def test_settling_twice_counts_once():
    add_pool('streams', max_workers=2)
    cmd = Streaming()
    await asyncio.wait_for(cmd.queue(), WAIT)
    cmd.outcome.success()
    cmd.outcome.failure(ValueError('late'))
    assert counts('streaming') == {Event.SUCCESS: 1}
    assert cmd.outcome.settled is True


@pytest.mark.gen_test
async def test_a_group_admitted_run_is_rejected_when_the_groups_pool_is_full():
    pool = add_pool('streams', max_workers=1, max_queue_size=1)

    class Bounded(Streaming):
        command_key = 'bounded'
        circuit_breaker_enabled = False

    held = [Bounded(), Streaming()]   # two keys of one group share its bound
    for cmd in held:
        await asyncio.wait_for(cmd.queue(), WAIT)
    assert pool.in_flight == 2 and pool.active_count == 1 and pool.queue_size == 1
    with pytest.raises(CommandError) as raised:
        await asyncio.wait_for(Bounded().queue(), WAIT)
    assert raised.value.failure_type.value == 'REJECTED_THREAD_EXECUTION'
    assert "executor pool 'streams' is full" in str(raised.value.cause)
    for cmd in held:
        cmd.outcome.success()
    assert await asyncio.wait_for(Bounded().queue(), WAIT) == 'head'


@pytest.mark.gen_test
async def test_a_trial_is_judged_when_run_returns(clock):
    add_pool('streams', max_workers=2)
    breaker = component.circuit_breaker('streaming')
    cmd = Streaming()   # one failure opens it (volume threshold 1)
    await asyncio.wait_for(cmd.queue(), WAIT)
    cmd.outcome.failure(ValueError('down'))
    assert breaker.state is BreakerState.OPEN
    clock.advance(Streaming.circuit_breaker_sleep_window + 0.1)
    trial = Streaming()
    await asyncio.wait_for(trial.queue(), WAIT)
    # An event stream may last for hours: the breaker does not wait for its end.
    assert breaker.state is BreakerState.CLOSED
    trial.outcome.failure(ValueError('after the head'))
    assert breaker.state is BreakerState.CLOSED   # counted once, when it returned


@pytest.mark.gen_test
async def test_a_run_that_fails_after_asking_to_defer_is_counted_as_usual():
    add_pool('streams', max_workers=2)

    class Breaks(Streaming):
        command_key = 'breaks'

        async def run(self):
            self.outcome = self.defer_outcome()
            raise ValueError('before the head')

        def fallback(self):
            return 'stale'

    cmd = Breaks()
    assert await asyncio.wait_for(cmd.queue(), WAIT) == 'stale'
    assert cmd.events == (Event.FAILURE, Event.FALLBACK_SUCCESS)
    assert component.pool('streams').in_flight == 0
    cmd.outcome.success()   # void: nothing more is counted
    assert counts('breaks') == {Event.FAILURE: 1, Event.FALLBACK_SUCCESS: 1}


@pytest.mark.gen_test
async def test_refresh_timeout_restarts_the_timeout_from_now(clock):
    step = asyncio.Queue()
    cmd = Paced([step, step])
    future = cmd.queue()
    await asyncio.sleep(0)
    clock.advance(0.8)
    await step.put('refresh_timeout')
    await asyncio.sleep(0)
    clock.advance(0.8)   # 1.6 s since the start, 0.8 s since the refresh
    await asyncio.sleep(0.01)
    assert not future.done()
    clock.advance(0.3)   # 1.1 s since the refresh
    assert await asyncio.wait_for(future, WAIT) == 'stale'
    assert cmd.events == (Event.TIMEOUT, Event.FALLBACK_SUCCESS)


@pytest.mark.gen_test
async def test_pause_timeout_stops_it_until_refreshed(clock):
    step = asyncio.Queue()
    cmd = Paced([step, step, step])
    future = cmd.queue()
    await step.put('pause_timeout')
    await asyncio.sleep(0)
    clock.advance(30.0)   # paused: the client's turn, however long
    await asyncio.sleep(0.01)
    assert not future.done()
    await step.put(None)
    assert await asyncio.wait_for(future, WAIT) == 'done'
    assert cmd.events == (Event.SUCCESS,)


def test_the_hooks_refuse_to_work_outside_an_async_run():
    cmd = Streaming()
    for name in ('defer_outcome', 'refresh_timeout', 'pause_timeout'):
        with pytest.raises(BlackgateError, match=name):
            getattr(cmd, name)()
