"""A user's tests of code that uses Blackgate, driven by a FakeClock."""
import asyncio
import threading

import pytest

from blackgate import BreakerState, Command, CommandError, Event, component


# -- the code under test (in an application, imported from its own module) ----

class GetPrice(Command):
    group_key = 'pricing'
    command_key = 'get_price'

    def __init__(self, client, sku):
        self.client = client
        self.sku = sku

    def run(self):
        return self.client.price(self.sku)

    def fallback(self):
        return None          # the page shows "price unavailable"


class GetBalance(Command):
    group_key = 'pricing'
    command_key = 'get_balance'

    def __init__(self, client):
        self.client = client

    def run(self):
        return self.client.balance()
    # no fallback: a made-up balance is worse than an error


# -- test doubles and fixtures -------------------------------------------------

class FakePricingClient:
    """Stands in for the pricing service's client library."""

    def __init__(self):
        self.down = False
        self.slow = False
        self.release = threading.Event()   # holds a slow call until set
        self.calls = 0

    def price(self, sku):
        self.calls += 1
        if self.slow:
            self.release.wait()
        if self.down:
            raise ConnectionError('pricing is down')
        return 9.99

    def balance(self):
        return self.price('balance')


@pytest.fixture
def clock(blackgate_clock):
    # blackgate_clock (from Blackgate's pytest plugin) resets the component before and
    # after the test and installs a FakeClock: time moves only when the test says so.
    component.add('executor_pool', {'group_key': 'pricing', 'max_workers': 2})
    component.install()
    return blackgate_clock


@pytest.fixture
def pricing(clock):
    client = FakePricingClient()
    yield client
    client.release.set()   # free any worker still held, or reset() would wait for it


# -- the tests -------------------------------------------------------------------

def test_returns_the_price(pricing):
    command = GetPrice(pricing, 'sku-1')
    assert command.execute() == 9.99
    assert command.events == (Event.SUCCESS,)


def test_falls_back_when_pricing_fails(pricing):
    pricing.down = True
    command = GetPrice(pricing, 'sku-1')
    assert command.execute() is None
    assert command.events == (Event.FAILURE, Event.FALLBACK_SUCCESS)
    assert component.metrics('get_price').rolling_count(Event.FAILURE) == 1


def test_without_a_fallback_the_caller_gets_command_error(pricing):
    pricing.down = True
    with pytest.raises(CommandError) as caught:
        GetBalance(pricing).execute()
    assert caught.value.command_key == 'get_balance'
    assert isinstance(caught.value.cause, ConnectionError)


def test_breaker_opens_then_closes_after_a_successful_trial(clock, pricing):
    # Trip after 3 requests, judged on fresh counts, without touching GetPrice.
    component.add('command', {'command_key': 'get_price',
                              'circuit_breaker_request_volume_threshold': 3,
                              'metrics_health_snapshot_interval': 0})
    component.install()
    pricing.down = True
    for _ in range(3):
        assert GetPrice(pricing, 'sku-1').execute() is None
    breaker = component.circuit_breaker('get_price')
    assert breaker.state is BreakerState.OPEN

    calls = pricing.calls
    command = GetPrice(pricing, 'sku-1')
    assert command.execute() is None
    assert command.is_response_short_circuited
    assert pricing.calls == calls          # the service was left alone

    pricing.down = False
    clock.advance(4.9)                     # still inside the 5 s sleep window
    assert GetPrice(pricing, 'sku-1').execute() is None
    clock.advance(0.1)
    assert GetPrice(pricing, 'sku-1').execute() == 9.99   # the one trial
    assert breaker.state is BreakerState.CLOSED


def test_a_slow_call_times_out_to_the_fallback(clock, pricing):
    pricing.slow = True

    async def call():
        future = GetPrice(pricing, 'sku-1').queue()
        clock.advance(1.0)                 # the default timeout passes
        return await future

    assert asyncio.run(call()) is None
    assert component.metrics('get_price').rolling_count(Event.TIMEOUT) == 1


def test_execute_times_out_too(clock, pricing):
    pricing.slow = True
    answers = []
    caller = threading.Thread(
        target=lambda: answers.append(GetPrice(pricing, 'sku-1').execute()))
    caller.start()
    assert clock.wait_for_waiters(1)       # the caller is blocked, waiting for its timeout
    clock.advance(1.0)
    caller.join()
    assert answers == [None]


def test_a_full_pool_rejects_at_once(pricing):
    component.add('executor_pool', {'group_key': 'pricing', 'max_workers': 1})
    component.install()
    pricing.slow = True

    async def call_twice():
        first = GetPrice(pricing, 'sku-1').queue()     # takes the only worker
        second = GetPrice(pricing, 'sku-2')
        assert await second.queue() is None
        assert second.is_response_rejected
        pricing.release.set()
        assert await first == 9.99

    asyncio.run(call_twice())
