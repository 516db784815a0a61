"""HTTPProxy, response side: the status, reason and fields the client receives.

The upstream is scripted per test (``upstream.respond``); the client reads the
gateway's answer raw, so nothing normalizes it on the way.
"""
import json

import pytest

from blackgate import Event, HTTPProxyCommand, component
from proxy_upstream import (TEST_TIMEOUT, Reply, answer, forward_to, gateway,  # noqa: F401
                            install_pool, proxy, upstream)

pytestmark = pytest.mark.gen_test(timeout=TEST_TIMEOUT)


@pytest.mark.parametrize('status, reason', [
    (200, 'Everything Is Fine'),
    (299, 'Custom Success'),
    (451, 'Unavailable For Legal Reasons'),
    (418, "I'm a teapot"),
    (499, 'Some Unusual Client Error'),
])
async def test_status_and_reason_are_passed_verbatim(proxy, upstream, status, reason):
    upstream.respond = answer(Reply(status, reason, body=b'x'))
    response = await proxy.fetch('GET', '/')
    assert (response.status, response.reason) == (status, reason)
    assert response.body == b'x'


async def test_every_set_cookie_stays_its_own_field(proxy, upstream):
    cookies = ['a=1; Path=/; HttpOnly', 'b=2; Expires=Wed, 21 Oct 2026 07:28:00 GMT',
               'c=3; SameSite=Lax']
    upstream.respond = answer(Reply(headers=[('Set-Cookie', value) for value in cookies]))
    response = await proxy.fetch('GET', '/')
    assert response.values('Set-Cookie') == cookies


async def test_hop_by_hop_response_fields_are_dropped(proxy, upstream):
    upstream.respond = answer(Reply(headers=[
        ('Connection', 'X-Upstream-Hop'), ('X-Upstream-Hop', 'secret'), ('Keep-Alive', 'timeout=5'),
        ('Proxy-Authenticate', 'Basic realm="internal"'), ('Trailer', 'X-Sum'),
        ('Upgrade', 'h2c'), ('Proxy-Connection', 'keep-alive'), ('X-Kept', 'yes')], body=b'ok'))
    response = await proxy.fetch('GET', '/')
    for name in ('X-Upstream-Hop', 'Keep-Alive', 'Proxy-Authenticate', 'Trailer', 'Upgrade',
                 'Proxy-Connection'):
        assert response.values(name) == [], name
    assert response.values('Connection') in ([], ['close'])   # the gateway's own, if any
    assert response.header('X-Kept') == 'yes'
    assert response.body == b'ok'


async def test_end_to_end_fields_pass_unchanged(proxy, upstream):
    fields = [('Content-Type', 'text/csv; charset=latin-1'), ('Cache-Control', 'max-age=60'),
              ('Vary', 'Accept, Cookie'), ('Server', 'upstream/2.1'), ('Link', '</n>; rel="next"'),
              ('Date', 'Mon, 02 Feb 2026 10:00:00 GMT'), ('X-Request-Id', 'abc-123'),
              ('WWW-Authenticate', 'Bearer realm="api"'), ('Location', '/elsewhere')]
    upstream.respond = answer(Reply(201, 'Created', fields, b'a,b\n'))
    response = await proxy.fetch('POST', '/', body=b'x')
    for name, value in fields:
        assert response.values(name) == [value], name
    assert response.body == b'a,b\n'


async def test_no_content_type_server_or_etag_of_the_frameworks_own(proxy, upstream):
    upstream.respond = answer(Reply(headers=[('X-Only', '1')], body=b'raw bytes'))
    response = await proxy.fetch('GET', '/')
    names = {name.lower() for name, _ in response.headers} - {'connection'}
    assert names == {'x-only', 'date', 'content-length'}   # Date: RFC 9110 §6.6.1


async def test_no_304_is_invented_when_the_upstream_answers_200(proxy, upstream):
    upstream.respond = answer(Reply(headers=[('ETag', '"v1"')], body=b'fresh'))
    response = await proxy.fetch('GET', '/', [('If-None-Match', '"v1"')])
    assert response.status == 200
    assert response.header('ETag') == '"v1"'
    assert response.body == b'fresh'
    # and without an upstream ETag, none is computed from the body
    upstream.respond = answer(Reply(body=b'fresh'))
    response = await proxy.fetch('GET', '/', [('If-None-Match', '*')])
    assert response.status == 200 and response.values('ETag') == []


@pytest.mark.parametrize('status', [301, 302, 303, 307, 308])
async def test_redirects_are_passed_through_not_followed(proxy, upstream, status):
    upstream.respond = answer(Reply(status, 'Moved', [('Location', 'http://elsewhere.example/x?y=1')],
                                    b'see elsewhere'))
    response = await proxy.fetch('GET', '/old')
    assert response.status == status
    assert response.header('Location') == 'http://elsewhere.example/x?y=1'
    assert response.body == b'see elsewhere'
    assert len(upstream.received) == 1


async def test_upstream_5xx_reaches_a_client_without_fallback_as_it_is(proxy, upstream):
    upstream.respond = answer(Reply(503, 'Down For Maintenance',
                                    [('Retry-After', '120'), ('Content-Type', 'text/plain')],
                                    b'back at noon'))
    response = await proxy.fetch('GET', '/')
    assert (response.status, response.reason) == (503, 'Down For Maintenance')
    assert response.header('Retry-After') == '120'
    assert response.header('Content-Type') == 'text/plain'
    assert response.values('X-Blackgate-Error') == []
    assert response.body == b'back at noon'


async def test_upstream_5xx_counts_as_a_failure_and_runs_the_fallback(upstream, gateway):
    install_pool('proxy')
    upstream.respond = answer(Reply(500, 'Internal Server Error', body=b'boom'))

    class WithFallback(HTTPProxyCommand):
        group_key = 'proxy'

        def before_request(self):
            self.request['url'] = upstream.url + self.request['path']

        def fallback(self):
            return {'status_code': 200, 'reason': 'OK', 'headers': {'X-From': 'fallback'},
                    'content': b'stale copy'}

    proxy = gateway(WithFallback)
    response = await proxy.fetch('GET', '/')
    assert (response.status, response.body) == (200, b'stale copy')
    assert response.header('X-From') == 'fallback'
    metrics = component.metrics('WithFallback')
    assert metrics.rolling_count(Event.FAILURE) == 1
    assert metrics.rolling_count(Event.FALLBACK_SUCCESS) == 1
    assert metrics.rolling_count(Event.SUCCESS) == 0


async def test_a_4xx_is_a_success_for_the_breaker(proxy, upstream):
    upstream.respond = answer(Reply(404, 'Not Found', body=b'no such thing'))
    response = await proxy.fetch('GET', '/')
    assert response.status == 404
    assert component.metrics('Forward').rolling_count(Event.SUCCESS) == 1


@pytest.mark.parametrize('headers', [
    {'Content-Type': 'application/json', 'X-Multi': ['a', 'b']},
    [('Content-Type', 'application/json'), ('X-Multi', 'a'), ('X-Multi', 'b')],
])
async def test_a_fallback_may_return_a_plain_dict(upstream, gateway, headers):
    install_pool('proxy')

    class Down(HTTPProxyCommand):
        group_key = 'proxy'

        def before_request(self):
            self.request['url'] = 'http://127.0.0.1:1/'

        def fallback(self):
            return dict(status_code=500, reason='Internal Server Error', headers=headers,
                        content=json.dumps({'code': 500, 'message': 'caf\u00e9'}))

    proxy = gateway(Down)
    response = await proxy.fetch('GET', '/')
    assert (response.status, response.reason) == (500, 'Internal Server Error')
    assert response.header('Content-Type') == 'application/json'
    assert response.values('X-Multi') == ['a', 'b']
    assert response.json() == {'code': 500, 'message': 'caf\u00e9'}
    assert response.body == '{"code": 500, "message": "caf\\u00e9"}'.encode()


async def test_after_response_may_change_the_response(upstream, gateway):
    install_pool('proxy')
    upstream.respond = answer(Reply(headers=[('X-Internal', 'secret')], body=b'upstream'))

    class Rewrite(HTTPProxyCommand):
        group_key = 'proxy'

        def before_request(self):
            self.request['url'] = upstream.url + self.request['path']

        def after_response(self):
            self.response['headers'] = [(name, value) for name, value in self.response['headers']
                                        if name.lower() != 'x-internal']
            self.response['content'] = b'rewritten and longer'

    proxy = gateway(Rewrite)
    response = await proxy.fetch('GET', '/')
    assert response.values('X-Internal') == []
    assert response.body == b'rewritten and longer'
    assert response.header('Content-Length') == str(len(b'rewritten and longer'))
