"""Retry strategy objects: the policy's decision, the backoff, the budget (issue 15, point 2).

Truth tables over fabricated outcomes, on the FakeClock; the pipeline's retry
loop, through Command, is tested in test_retry.py.
"""
import asyncio

import pytest

from blackgate import BadRequest, Command, ConfigError, component
from blackgate.retry import (BUDGET_EXHAUSTED, GIVE_UP, RETRY, RetryBudget, RetryPolicy,
                             full_jitter, retry_after_of)


class Throttled(Exception):
    def __init__(self, retry_after):
        super().__init__('slow down')
        self.retry_after = retry_after


def policy(attempts=3, backoff=0.1, random=lambda: 1.0, **kw):
    return RetryPolicy(attempts, backoff, random=random, **kw)


# -- the decision ------------------------------------------------------------------------

@pytest.mark.parametrize('error, timed_out, retry_on_timeout, action', [
    (ConnectionError('down'), False, False, RETRY),
    (ValueError('bad answer'), False, False, RETRY),            # retry_on = (Exception,)
    (BadRequest('no such user'), False, False, GIVE_UP),        # never
    (asyncio.CancelledError(), False, False, GIVE_UP),          # tenacity #186
    (KeyboardInterrupt(), False, False, GIVE_UP),               # tenacity #529
    (SystemExit(1), False, False, GIVE_UP),
    (None, True, False, GIVE_UP),                               # a timeout, not enabled
    (None, True, True, RETRY),
])
def test_what_is_retried(error, timed_out, retry_on_timeout, action):
    decision = policy(retry_on_timeout=retry_on_timeout).decide(0, error, timed_out, 1.0)
    assert decision.action == action


def test_retry_on_narrows_what_is_retried():
    only = policy(retry_on=(ConnectionError,))
    assert only.decide(0, ConnectionResetError(), False, 1.0).action == RETRY
    assert only.decide(0, ValueError(), False, 1.0).action == GIVE_UP


def test_attempts_run_out():
    retries = policy(attempts=2)
    assert [retries.decide(done, OSError(), False, None).action for done in range(4)] == \
        [RETRY, RETRY, GIVE_UP, GIVE_UP]


def test_the_backoff_is_exponential_with_full_jitter():
    top = policy(backoff=0.1, random=lambda: 1.0)
    assert [top.decide(done, OSError(), False, None).delay for done in range(3)] == \
        pytest.approx([0.1, 0.2, 0.4])
    half = policy(backoff=0.1, random=lambda: 0.5)
    assert half.decide(2, OSError(), False, None).delay == pytest.approx(0.2)
    assert full_jitter(0.1, 3, lambda: 0.0) == 0.0


def test_the_wait_leaves_room_for_the_attempt_within_the_timeout():
    assert policy(backoff=1.0).decide(0, OSError(), False, 0.3).delay == pytest.approx(0.15)
    assert policy().decide(0, OSError(), False, 0.0).action == GIVE_UP


def test_retry_after_is_honoured_up_to_the_time_left():
    # Polly #414: the upstream said when it can take more.
    assert policy(random=lambda: 0.0).decide(0, Throttled(0.2), False, 1.0).delay == \
        pytest.approx(0.2)
    assert policy().decide(0, Throttled(5), False, 1.0).action == GIVE_UP
    assert retry_after_of(Throttled('soon')) is None


def test_the_budget_is_asked_last_and_only_for_a_retry_that_would_go(clock):
    budget = RetryBudget(0, 0, clock)
    assert policy().decide(0, BadRequest('x'), False, 1.0, budget).action == GIVE_UP
    assert budget.refused == 0
    assert policy().decide(0, OSError(), False, 1.0, budget).action == BUDGET_EXHAUSTED
    assert budget.refused == 1


def test_a_policy_keeps_no_state_between_calls():
    # tenacity #93: the decision depends on what the caller passes, nothing else.
    shared = policy(attempts=1)
    assert shared.decide(0, OSError(), False, 1.0).action == RETRY
    assert shared.decide(0, OSError(), False, 1.0).action == RETRY
    assert shared.decide(1, OSError(), False, 1.0).action == GIVE_UP


# -- the budget ----------------------------------------------------------------------------

def test_each_call_earns_a_share_of_a_retry(clock):
    budget = RetryBudget(20, 0, clock)
    for _ in range(4):
        budget.deposit()
    assert not budget.try_withdraw()
    budget.deposit()
    assert budget.try_withdraw()   # five calls at 20 %: one retry
    assert not budget.try_withdraw()


def test_the_floor_allows_min_per_second_whatever_the_traffic(clock):
    budget = RetryBudget(20, 3, clock)
    assert [budget.try_withdraw() for _ in range(4)] == [True, True, True, False]
    clock.advance(1.0 / 3)
    assert budget.try_withdraw() and not budget.try_withdraw()
    clock.advance(10.0)
    assert budget.balance == 3   # one second's worth at most


def test_deposits_expire_after_ttl(clock):
    budget = RetryBudget(50, 0, clock, ttl=10.0)
    for _ in range(10):
        budget.deposit()
    assert budget.balance == 5
    clock.advance(11.0)
    assert budget.balance == 0 and not budget.try_withdraw()


@pytest.mark.parametrize('percent, floor', [(20, 10), (10, 3), (20, 0)])
def test_under_total_failure_retries_stay_within_the_budget(clock, percent, floor):
    # Every call fails and wants its retries: the retries made are at most
    # percent of the calls plus the floor's per-second allowance over the run.
    budget = RetryBudget(percent, floor, clock)
    calls = retries = 0
    seconds = 30.0
    for _ in range(int(seconds * 100)):   # 100 calls a second, 3 retries wanted each
        clock.advance(0.01)
        budget.deposit()
        calls += 1
        for _ in range(3):
            if budget.try_withdraw():
                retries += 1
    assert retries <= percent / 100 * calls + floor * (seconds + 1)
    assert retries >= percent / 100 * calls * 0.9   # and the share is actually given


def test_the_budget_counts_under_threads(clock):
    import threading
    budget = RetryBudget(100, 0, clock)

    def work():
        for _ in range(2000):
            budget.deposit()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert budget.balance == 8000


# -- the settings --------------------------------------------------------------------------

@pytest.mark.parametrize('name, value, message', [
    ('retry_attempts', -1, 'retry_attempts=-1 is out of range'),
    ('retry_attempts', 1.5, 'retry_attempts=1.5 has the wrong type; expected a whole number'),
    ('retry_backoff', -0.1, 'retry_backoff=-0.1 is out of range'),
    ('retry_on', BadRequest, 'not of BadRequest (never retried)'),
    ('retry_on', KeyboardInterrupt, 'subclasses of Exception'),
    ('retry_on', 'ConnectionError', 'an exception class, or a tuple of them'),
    ('retry_on_timeout', 'yes', 'retry_on_timeout=\'yes\' has the wrong type'),
    ('retry_budget_percent', 150, 'retry_budget_percent=150 is out of range; expected a '
                                  'number from 0 to 100'),
    ('retry_budget_min_per_second', -1, 'retry_budget_min_per_second=-1 is out of range'),
])
def test_bad_retry_settings_are_refused_at_class_definition(name, value, message):
    with pytest.raises(ConfigError) as raised:
        type('Bad', (Command,), {name: value, 'run': lambda self: None})
    assert message in str(raised.value)
    assert 'command class Bad' in str(raised.value)


def test_a_budget_exists_only_for_a_key_that_retries(clock):
    component.add('command', {'command_key': 'retries', 'retry_attempts': 2})
    component.install()
    assert component.retry_budget('retries').percent == 20
    assert component.retry_budget('plain') is None
