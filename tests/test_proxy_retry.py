"""HTTPProxy retries only what it can replay (issue 15, point 4).

An idempotent request with a body held whole is retried after a 503; a POST,
or a body that streamed upstream (committed once it started flowing, as gRPC's
retry design says), is not; the upstream's ``Retry-After`` sets the wait.
"""
import pytest

from blackgate import Event, component
from proxy_upstream import (TEST_TIMEOUT, Reply, drained, forward_to, gateway,  # noqa: F401
                            install_pool, upstream)

pytestmark = pytest.mark.gen_test(timeout=TEST_TIMEOUT)

UNAVAILABLE = Reply(503, 'Service Unavailable', body=b'busy')


def first_fails(then=Reply(200, 'OK', body=b'fresh'), failure=UNAVAILABLE):
    """A script for ``upstream.respond``: the first request fails, the rest succeed."""
    seen = []

    def respond(received):
        seen.append(received)
        return failure if len(seen) == 1 else then

    respond.seen = seen
    return respond


def retrying(upstream, **attributes):
    install_pool('proxy')
    settings = dict(retry_attempts=2, retry_backoff=0.0, circuit_breaker_enabled=False)
    settings.update(attributes)
    return forward_to(upstream.url, 'Retrying', **settings)


async def test_an_idempotent_request_is_retried_after_a_503(upstream, gateway):
    upstream.respond = script = first_fails()
    proxy = gateway(retrying(upstream))
    response = await proxy.fetch('GET', '/price')
    assert response.status == 200 and response.body == b'fresh'
    assert [received.method for received in script.seen] == ['GET', 'GET']
    metrics = component.metrics('Retrying')
    assert metrics.rolling_count(Event.RETRY) == 1
    assert metrics.rolling_count(Event.SUCCESS) == 1
    await drained('proxy')


async def test_a_small_put_body_is_sent_again_whole(upstream, gateway):
    upstream.respond = script = first_fails()
    proxy = gateway(retrying(upstream, buffer_body=True))
    response = await proxy.fetch('PUT', '/price', body=b'{"price": 3}')
    assert response.status == 200
    assert [received.body for received in script.seen] == [b'{"price": 3}'] * 2
    await drained('proxy')


async def test_a_post_is_not_retried_unless_the_route_says_so(upstream, gateway):
    upstream.respond = script = first_fails()
    proxy = gateway(retrying(upstream))
    response = await proxy.fetch('POST', '/orders', body=b'one order')
    assert response.status == 503   # no fallback: the upstream's own answer
    assert len(script.seen) == 1
    assert component.metrics('Retrying').rolling_count(Event.RETRY) == 0

    upstream.respond = script = first_fails()
    idempotent = gateway(retrying(upstream, retry_methods=frozenset(('POST',)),
                                  command_key='IdempotentPosts'))
    response = await idempotent.fetch('POST', '/orders', body=b'one order')
    assert response.status == 200 and len(script.seen) == 2
    await drained('proxy')


async def test_a_streamed_body_is_committed_and_not_retried(upstream, gateway):
    upstream.respond = script = first_fails()
    proxy = gateway(retrying(upstream))
    big = b'x' * (256 * 1024)   # beyond the gateway's buffer: it streams upstream
    response = await proxy.fetch('PUT', '/blob', body=big)
    assert response.status == 503
    assert len(script.seen) == 1 and script.seen[0].body == big
    await drained('proxy')


async def test_retry_after_beyond_the_timeout_ends_the_retries(upstream, gateway):
    upstream.respond = script = first_fails(
        failure=Reply(503, 'Service Unavailable', headers=[('Retry-After', '120')]))
    proxy = gateway(retrying(upstream))
    response = await proxy.fetch('GET', '/price')
    assert response.status == 503 and len(script.seen) == 1
    await drained('proxy')
