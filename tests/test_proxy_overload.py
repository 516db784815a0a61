"""HTTPProxy under overload: more clients than the bulkhead has slots, healthy upstream.

Real sockets and real time (a few seconds): six clients loop on a pool of four
slots in front of an upstream that answers every request in 100 ms. Two clients
are always refused at once; whether those refusals open the breaker is the
``circuit_breaker_count_rejections`` setting.
"""
import asyncio
import time

import pytest

from blackgate import BreakerState, Event, HTTPProxyCommand, component
from blackgate.web import command_sample
from proxy_upstream import (TEST_TIMEOUT, Reply, Stall, Upstream, answer, echo,  # noqa: F401
                            forward_to, gateway, install_pool, upstream)

pytestmark = pytest.mark.gen_test(timeout=TEST_TIMEOUT)

CLIENTS = 6
SLOTS = 4
UPSTREAM_SECONDS = 0.1
#: Real seconds the clients keep going: the breaker re-judges every 0.5 s (the
#: default snapshot interval), so six snapshots at least.
RUN_SECONDS = 3.0


async def overload(proxy, stop_when=lambda: False):
    """Every client fetches in a loop until RUN_SECONDS pass; the answers' status and type."""
    answers = []
    deadline = time.monotonic() + RUN_SECONDS

    async def client():
        while time.monotonic() < deadline and not stop_when():
            response = await proxy.fetch('GET', '/')
            failure = response.json().get('failure_type') if response.status != 200 else None
            answers.append((response.status, failure))

    await asyncio.gather(*(client() for _ in range(CLIENTS)))
    return answers


@pytest.fixture
def slow_upstream():
    with Upstream(answer(Stall(UPSTREAM_SECONDS))) as server:
        yield server


def test_a_proxy_command_does_not_count_rejections_by_default():
    assert HTTPProxyCommand.circuit_breaker_count_rejections is False


async def test_a_full_pool_does_not_open_the_breaker_against_a_healthy_upstream(
        system_clock, slow_upstream, gateway):
    install_pool('proxy', max_workers=SLOTS)
    proxy = gateway(forward_to(slow_upstream.url, 'Crowded'))

    answers = await overload(proxy)

    metrics = component.metrics('Crowded')
    assert component.circuit_breaker('Crowded').state is BreakerState.CLOSED
    assert metrics.rolling_count(Event.SHORT_CIRCUITED) == 0
    rejected = metrics.rolling_count(Event.THREAD_POOL_REJECTED)
    succeeded = metrics.rolling_count(Event.SUCCESS)
    # Four slots of 100 ms for 3 s is up to 120 answers; half of that on a loaded machine.
    assert succeeded >= 30
    assert rejected > 0
    # Every client got either the upstream's answer or the bulkhead's 503, nothing else.
    assert set(answers) == {(200, None), (503, 'REJECTED_THREAD_EXECUTION')}
    assert answers.count((200, None)) == succeeded
    assert answers.count((503, 'REJECTED_THREAD_EXECUTION')) == rejected
    # The breaker's view: only the upstream's own outcomes.
    health = metrics.health()
    assert health.error_count == 0
    assert health.total_requests == succeeded
    # The metrics stream still shows the rejections.
    sample = command_sample('Crowded')
    assert sample['rollingCountThreadPoolRejected'] == rejected
    assert sample['isCircuitBreakerOpen'] is False


async def test_counting_rejections_reproduces_hystrix_opening_the_breaker(
        system_clock, slow_upstream, gateway):
    install_pool('proxy', max_workers=SLOTS)
    proxy = gateway(forward_to(slow_upstream.url, 'HystrixRule',
                               circuit_breaker_count_rejections=True))
    metrics = component.metrics('HystrixRule')

    answers = await overload(proxy, lambda: metrics.rolling_count(Event.SHORT_CIRCUITED) > 0)

    assert component.circuit_breaker('HystrixRule').state is BreakerState.OPEN
    assert metrics.rolling_count(Event.SHORT_CIRCUITED) > 0
    assert (503, 'SHORTCIRCUIT') in answers
    health = metrics.health()
    assert health.error_count >= metrics.rolling_count(Event.THREAD_POOL_REJECTED) > 0


# -- the short refusal path -----------------------------------------------------------------

async def test_while_the_breaker_is_open_refusals_are_the_same_json_503(upstream, gateway):
    install_pool('proxy')
    proxy = gateway(forward_to(upstream.url, 'Closed', circuit_breaker_force_open=True))
    first, second = [await proxy.fetch('GET', '/x?a=1', headers=[('X-Client', 'one')])
                     for _ in range(2)]
    for response in (first, second):
        assert response.status == 503
        assert response.header('X-Blackgate-Error') == 'short-circuited'
        assert response.header('Retry-After') == '5'
        assert response.json() == {'error': 'circuit breaker open', 'command_key': 'Closed',
                                   'failure_type': 'SHORTCIRCUIT'}
    assert first.body == second.body
    assert upstream.received == []
    assert component.metrics('Closed').rolling_count(Event.SHORT_CIRCUITED) == 2


async def test_the_trial_after_the_sleep_window_forwards_the_whole_request(
        clock, upstream, gateway):
    # While OPEN the handler expects a refusal and builds no request dict; once the sleep
    # window is over the breaker lets one trial through, which must still carry everything.
    install_pool('proxy')
    sick = True
    upstream.respond = lambda received: Reply(500, 'Oops') if sick else echo(received)
    proxy = gateway(forward_to(upstream.url, 'Recovering',
                               circuit_breaker_request_volume_threshold=2,
                               metrics_health_snapshot_interval=0))
    for _ in range(2):
        assert (await proxy.fetch('GET', '/x')).status == 500
    breaker = component.circuit_breaker('Recovering')
    assert breaker.state is BreakerState.OPEN
    assert (await proxy.fetch('GET', '/x')).status == 503
    sick = False
    clock.advance(6.0)
    response = await proxy.fetch('POST', '/trial?q=1', headers=[('X-Client', 'yes')],
                                 body=b'payload')
    assert response.status == 200
    received = upstream.received[-1]
    assert (received.method, received.target, received.body) == ('POST', '/trial?q=1',
                                                                 b'payload')
    assert received.header('X-Client') == 'yes'
    assert received.header('X-Forwarded-For') == '127.0.0.1'
    assert breaker.state is BreakerState.CLOSED
