"""Collapser: single-item calls gathered into batch commands (Hystrix's HystrixCollapser).

Time is the FakeClock's: a batch waits for ``timer_delay`` on it, so a test
sees exactly when the batch goes out. Threads calling ``execute()`` wait on the
same clock (``clock.wait_for_waiters(n)`` tells when n of them wait).
"""
import asyncio
import logging
import threading

import pytest

from blackgate import BlackgateError, Command, CommandError, ConfigError, Event, component
from blackgate.collapser import Collapser

#: Real seconds: the longest a test waits for a thread or a future.
WAIT = 5.0

#: The arguments of every batch GetUsers ran, in order.
CALLS = []


@pytest.fixture(autouse=True)
def fresh_calls():
    CALLS.clear()
    yield
    CALLS.clear()


class GetUsers(Command):
    command_key = 'get_users'

    def __init__(self, ids):
        self.ids = ids

    def run(self):
        CALLS.append(list(self.ids))
        return {user_id: 'user-%s' % (user_id,) for user_id in self.ids}


class GetUser(Collapser):
    collapser_key = 'get_user'
    timer_delay = 0.01

    def __init__(self, user_id):
        self.user_id = user_id

    def request_argument(self):
        return self.user_id

    def create_command(self, arguments):
        return GetUsers(arguments)

    def map_response(self, batch_result, arguments):
        return [batch_result[user_id] for user_id in arguments]


class GetUserGlobally(GetUser):
    collapser_key = 'get_user_globally'
    scope = 'global'


class GetUserInTens(GetUser):
    collapser_key = 'get_user_in_tens'
    max_requests_in_batch = 10


async def gathered(futures):
    return await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), WAIT)


async def loop_turns(count=5):
    for _ in range(count):
        await asyncio.sleep(0)


# -- gathering on the IOLoop ------------------------------------------------------------

@pytest.mark.gen_test
async def test_25_queue_calls_within_the_timer_delay_make_one_batch_command(clock):
    with component.request_context():
        futures = [GetUser(i).queue() for i in range(25)]
    await loop_turns()
    assert CALLS == []   # the batch waits for its timer
    clock.advance(0.01)
    assert await gathered(futures) == ['user-%d' % i for i in range(25)]
    assert CALLS == [list(range(25))]
    assert component.metrics('get_users').rolling_count(Event.SUCCESS) == 1


@pytest.mark.gen_test
async def test_a_batch_is_not_sent_before_its_timer_delay(clock):
    with component.request_context():
        futures = [GetUser(i).queue() for i in range(3)]
        clock.advance(0.009)
        await loop_turns()
        assert CALLS == []
        futures.append(GetUser(3).queue())   # still in time for the same batch
    clock.advance(0.001)
    assert await gathered(futures) == ['user-0', 'user-1', 'user-2', 'user-3']
    assert CALLS == [[0, 1, 2, 3]]


@pytest.mark.gen_test
async def test_max_requests_in_batch_sends_full_batches_at_once_and_the_rest_on_the_timer(clock):
    with component.request_context():
        futures = [GetUserInTens(i).queue() for i in range(25)]
    first_two = await gathered(futures[:20])   # no clock move: full batches go at once
    assert first_two == ['user-%d' % i for i in range(20)]
    assert CALLS == [list(range(10)), list(range(10, 20))]
    clock.advance(0.01)
    assert await gathered(futures[20:]) == ['user-%d' % i for i in range(20, 25)]
    assert CALLS[2] == list(range(20, 25))


@pytest.mark.gen_test
async def test_each_caller_learns_the_batch_command_that_answered_it(clock):
    with component.request_context():
        callers = [GetUser(i) for i in range(3)]
        futures = [caller.queue() for caller in callers]
    clock.advance(0.01)
    await gathered(futures)
    command = callers[0].batch_command
    assert isinstance(command, GetUsers) and command.ids == [0, 1, 2]
    assert all(caller.batch_command is command for caller in callers)
    assert command.is_successful_execution


# -- request and global scope -------------------------------------------------------------

@pytest.mark.gen_test
async def test_request_scope_gathers_each_request_context_apart(clock):
    futures = []
    for first in (0, 10):
        with component.request_context():
            futures += [GetUser(first + i).queue() for i in range(3)]
    clock.advance(0.01)
    await gathered(futures)
    assert sorted(CALLS) == [[0, 1, 2], [10, 11, 12]]


@pytest.mark.gen_test
async def test_global_scope_gathers_callers_of_every_context_and_of_none(clock):
    futures = []
    for first in (0, 10):
        with component.request_context():
            futures += [GetUserGlobally(first + i).queue() for i in range(3)]
    futures.append(GetUserGlobally(99).queue())   # outside any context: global needs none
    clock.advance(0.01)
    assert await gathered(futures) == ['user-0', 'user-1', 'user-2', 'user-10', 'user-11',
                                       'user-12', 'user-99']
    assert CALLS == [[0, 1, 2, 10, 11, 12, 99]]


def test_request_scope_outside_any_context_is_refused_with_the_fix():
    with pytest.raises(BlackgateError) as caught:
        GetUser(1).execute()
    message = str(caught.value)
    assert "scope 'request'" in message and 'component.request_context()' in message
    assert "scope = 'global'" in message
    assert CALLS == []


# -- threads ------------------------------------------------------------------------------

def test_8_threads_calling_execute_collapse_into_one_batch(clock):
    results = {}

    def call(user_id):
        results[user_id] = GetUser(user_id).execute()

    with component.request_context() as context:
        threads = [threading.Thread(target=context.wrap(call), args=(i,), daemon=True)
                   for i in range(8)]
        for thread in threads:
            thread.start()
        # the batch's first thread waits for the timer, the seven others for their answer
        assert clock.wait_for_waiters(8, WAIT)
        assert CALLS == []
        clock.advance(0.01)
        for thread in threads:
            thread.join(WAIT)
    assert results == {i: 'user-%d' % i for i in range(8)}
    assert len(CALLS) == 1 and sorted(CALLS[0]) == list(range(8))


def test_threads_fill_a_batch_and_it_goes_without_waiting_for_the_timer(clock):
    results = {}

    def call(user_id):
        results[user_id] = GetUserInTens(user_id).execute()

    with component.request_context() as context:
        threads = [threading.Thread(target=context.wrap(call), args=(i,), daemon=True)
                   for i in range(10)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT)   # the clock never moves
    assert results == {i: 'user-%d' % i for i in range(10)}
    assert len(CALLS) == 1 and sorted(CALLS[0]) == list(range(10))


def test_execute_with_a_batch_of_one_needs_no_timer(clock):
    class Alone(GetUser):
        max_requests_in_batch = 1

    with component.request_context():
        assert Alone(5).execute() == 'user-5'
    assert CALLS == [[5]]


# -- failures -----------------------------------------------------------------------------

class Flaky(Command):
    command_key = 'get_users_flaky'
    circuit_breaker_enabled = False

    def __init__(self, ids):
        self.ids = ids

    def run(self):
        CALLS.append(list(self.ids))
        raise ConnectionError('user service down')

    def fallback(self):
        return {user_id: 'anonymous' for user_id in self.ids}


class FlakyNoFallback(Flaky):
    command_key = 'get_users_flaky_no_fallback'
    fallback_enabled = False


class GetUserFlaky(GetUser):
    collapser_key = 'get_user_flaky'

    def create_command(self, arguments):
        return Flaky(arguments)


class GetUserFlakyNoFallback(GetUser):
    collapser_key = 'get_user_flaky_no_fallback'

    def create_command(self, arguments):
        return FlakyNoFallback(arguments)


@pytest.mark.gen_test
async def test_a_failed_batch_falls_back_for_every_request(clock):
    with component.request_context():
        callers = [GetUserFlaky(i) for i in range(4)]
        futures = [caller.queue() for caller in callers]
    clock.advance(0.01)
    assert await gathered(futures) == ['anonymous'] * 4
    assert len(CALLS) == 1
    assert callers[0].batch_command.events[:2] == (Event.FAILURE, Event.FALLBACK_SUCCESS)


@pytest.mark.gen_test
async def test_a_failed_batch_without_fallback_fails_every_request_with_its_error(clock):
    with component.request_context():
        futures = [GetUserFlakyNoFallback(i).queue() for i in range(4)]
    clock.advance(0.01)
    errors = await gathered(futures)
    assert all(isinstance(error, CommandError) for error in errors)
    assert len({id(error) for error in errors}) == 1   # the batch's one error, for each
    assert errors[0].command_key == 'get_users_flaky_no_fallback'
    assert isinstance(errors[0].cause, ConnectionError)


def test_a_failed_batch_falls_back_for_every_thread(clock):
    results = {}

    def call(user_id):
        results[user_id] = GetUserFlaky(user_id).execute()

    with component.request_context() as context:
        threads = [threading.Thread(target=context.wrap(call), args=(i,), daemon=True)
                   for i in range(3)]
        for thread in threads:
            thread.start()
        assert clock.wait_for_waiters(3, WAIT)
        clock.advance(0.01)
        for thread in threads:
            thread.join(WAIT)
    assert results == {0: 'anonymous', 1: 'anonymous', 2: 'anonymous'}


class ShortMapping(GetUser):
    collapser_key = 'get_user_short'

    def map_response(self, batch_result, arguments):
        return list(batch_result.values())[:-1]   # a bug: one result missing


@pytest.mark.gen_test
async def test_a_mapping_of_the_wrong_length_is_a_clear_error_for_every_request(clock, caplog):
    with component.request_context():
        futures = [ShortMapping(i).queue() for i in range(5)]
    clock.advance(0.01)
    errors = await gathered(futures)
    assert all(isinstance(error, BlackgateError) for error in errors)
    message = str(errors[0])
    assert "'get_user_short'" in message
    assert 'returned 4 results for a batch of 5 requests' in message
    assert any('returned 4 results' in record.getMessage() for record in caplog.records)


def test_a_mapping_of_the_wrong_length_fails_every_thread(clock):
    errors = []

    def call(user_id):
        try:
            ShortMapping(user_id).execute()
        except BlackgateError as error:
            errors.append(error)

    with component.request_context() as context:
        threads = [threading.Thread(target=context.wrap(call), args=(i,), daemon=True)
                   for i in range(3)]
        for thread in threads:
            thread.start()
        assert clock.wait_for_waiters(3, WAIT)
        clock.advance(0.01)
        for thread in threads:
            thread.join(WAIT)
    assert len(errors) == 3
    assert all('returned 2 results for a batch of 3 requests' in str(e) for e in errors)


class BrokenCreate(GetUser):
    collapser_key = 'get_user_broken_create'

    def create_command(self, arguments):
        return {'not': 'a command'}


@pytest.mark.gen_test
async def test_create_command_must_return_a_command_and_every_request_is_told(clock, caplog):
    caplog.set_level(logging.WARNING, logger='blackgate')
    with component.request_context():
        futures = [BrokenCreate(i).queue() for i in range(2)]
    clock.advance(0.01)
    errors = await gathered(futures)
    assert all(isinstance(error, TypeError) for error in errors)
    assert 'must return a Command' in str(errors[0])
    assert [r for r in caplog.records if 'create_command' in r.getMessage()]


class RaisingMap(GetUser):
    collapser_key = 'get_user_raising_map'

    def map_response(self, batch_result, arguments):
        return [batch_result[user_id + 1000] for user_id in arguments]   # KeyError


@pytest.mark.gen_test
async def test_what_map_response_raises_reaches_every_request(clock):
    with component.request_context():
        futures = [RaisingMap(i).queue() for i in range(2)]
    clock.advance(0.01)
    errors = await gathered(futures)
    assert all(isinstance(error, KeyError) for error in errors)


# -- misuse -------------------------------------------------------------------------------

@pytest.mark.parametrize('name, value, expected', [
    ('timer_delay', -0.1, 'is out of range; expected a number of seconds from 0 to 60'),
    ('timer_delay', '10ms', 'has the wrong type'),
    ('max_requests_in_batch', 0, 'is out of range; expected a whole number from 1'),
    ('max_requests_in_batch', 2.5, 'has the wrong type'),
    ('scope', 'session', "expected 'request' or 'global'"),
    ('collapser_key', '', 'expected a non-empty string'),
])
def test_bad_settings_are_refused_when_the_class_is_defined(name, value, expected):
    with pytest.raises(ConfigError) as caught:
        type('Bad', (GetUser,), {name: value})
    assert '%s=%r' % (name, value) in str(caught.value)
    assert expected in str(caught.value)


def test_a_misspelt_setting_is_refused_when_the_class_is_defined():
    with pytest.raises(ConfigError, match="'timer_dealy' is not a setting.*'timer_delay'"):
        type('Bad', (GetUser,), {'timer_dealy': 0.05})


def test_collapser_key_defaults_to_the_class_name():
    class LookUpPrices(GetUser):
        pass

    assert Collapser.collapser_key == 'Collapser'
    assert type('X', (Collapser,), {}).collapser_key == 'X'
    assert LookUpPrices.collapser_key == 'get_user'   # an explicit key is inherited


def test_an_instance_runs_once():
    with component.request_context():
        caller = GetUser(1)
        GetUserAlone = type('GetUserAlone', (GetUser,), {'max_requests_in_batch': 1})
        alone = GetUserAlone(1)
        assert alone.execute() == 'user-1'
        with pytest.raises(BlackgateError, match='already run'):
            alone.execute()
    assert caller.batch_command is None


def test_queue_without_a_loop_and_execute_on_the_loop_are_refused():
    with pytest.raises(BlackgateError, match=r'use .*execute\(\)'):
        GetUser(1).queue()

    async def on_the_loop():
        with component.request_context():
            GetUser(2).execute()

    with pytest.raises(BlackgateError, match=r'await .*queue\(\)'):
        asyncio.run(on_the_loop())


# -- metrics ------------------------------------------------------------------------------

@pytest.mark.gen_test
async def test_collapser_metrics_count_batches_requests_and_batch_sizes(clock):
    with component.request_context():
        futures = [GetUserInTens(i).queue() for i in range(23)]
        clock.advance(0.01)
        await gathered(futures)
        futures = [GetUserInTens(i).queue() for i in range(2)]
        clock.advance(0.01)
        await gathered(futures)
    metrics = component.collapser_metrics('get_user_in_tens')
    counts = metrics.rolling_counts()
    assert counts['batches'] == 4 and counts['requests_batched'] == 25
    sizes = metrics.rolling_batch_sizes((0, 50, 100))
    assert sizes.sizes == ((2, 1), (3, 1), (10, 2))
    assert sizes.percentiles == {0: 2, 50: 3, 100: 10}
    assert sizes.mean == 25 / 4
    assert 'get_user_in_tens' in component.collapser_keys
    clock.advance(11.0)   # out of the rolling window; still in the totals
    assert metrics.rolling_counts()['batches'] == 0
    totals, all_sizes = metrics.cumulative()
    assert totals['requests_batched'] == 25 and all_sizes.batches == 4


# -- the batch command's events -----------------------------------------------------------

@pytest.mark.gen_test
async def test_the_batch_command_is_collapsed_and_counts_each_request_it_answered(clock):
    with component.request_context():
        callers = [GetUserInTens(i).queue() for i in range(13)]
        clock.advance(0.01)
        await gathered(callers)
        log = component.request_log()
    commands = [command for command in log.commands if isinstance(command, GetUsers)]
    assert [command.events for command in commands] == [(Event.SUCCESS, Event.COLLAPSED)] * 2
    metrics = component.metrics('get_users')
    assert metrics.rolling_count(Event.COLLAPSED) == 13
    assert metrics.rolling_count(Event.SUCCESS) == 2
    assert metrics.health().total_requests == 2


def test_a_thread_batch_is_collapsed_too(clock):
    class Alone(GetUser):
        max_requests_in_batch = 1

    with component.request_context():
        caller = Alone(5)
        caller.execute()
    assert caller.batch_command.events == (Event.SUCCESS, Event.COLLAPSED)
    assert component.metrics('get_users').rolling_count(Event.COLLAPSED) == 1


@pytest.mark.gen_test
async def test_a_failed_batch_is_collapsed_after_its_fallback_events(clock):
    with component.request_context():
        callers = [GetUserFlaky(i) for i in range(3)]
        futures = [caller.queue() for caller in callers]
    clock.advance(0.01)
    await gathered(futures)
    assert callers[0].batch_command.events == (Event.FAILURE, Event.FALLBACK_SUCCESS,
                                               Event.COLLAPSED)


@pytest.mark.gen_test
async def test_a_global_batch_is_in_no_request_log_and_a_request_batch_is_in_its_own(clock):
    with component.request_context():
        futures = [GetUserGlobally(i).queue() for i in range(2)]
        futures += [GetUser(i).queue() for i in range(2)]
        clock.advance(0.01)
        await gathered(futures)
        batches = [c for c in component.request_log().commands if isinstance(c, GetUsers)]
    assert len(CALLS) == 2
    assert [command.ids for command in batches] == [[0, 1]]   # the request-scoped one only
