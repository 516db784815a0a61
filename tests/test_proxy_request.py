"""HTTPProxy, request side: the fields, target and body the upstream receives.

Real HTTP on 127.0.0.1: a raw client talks to the gateway, the gateway to an
:class:`~proxy_upstream.Upstream` that records each request as it came off the wire.
"""
import pytest

from blackgate import HTTPProxyCommand
from proxy_upstream import (TEST_TIMEOUT, forward_to, gateway, install_pool,  # noqa: F401
                            proxy, upstream)

pytestmark = pytest.mark.gen_test(timeout=TEST_TIMEOUT)


async def test_hop_by_hop_request_fields_are_dropped(proxy, upstream):
    response = await proxy.fetch('GET', '/', [
        ('Keep-Alive', 'timeout=5'), ('Proxy-Connection', 'keep-alive'), ('TE', 'trailers'),
        ('Trailer', 'X-Checksum'), ('Upgrade', 'websocket'),
        ('Proxy-Authorization', 'Basic cHJveHk6c2VjcmV0'), ('X-Kept', 'yes')])
    assert response.status == 200
    received = upstream.received[-1]
    for name in ('Connection', 'Keep-Alive', 'Proxy-Connection', 'TE', 'Trailer', 'Upgrade',
                 'Proxy-Authorization'):
        assert received.values(name) == [], name
    assert received.header('X-Kept') == 'yes'


async def test_fields_named_in_connection_are_dropped(proxy, upstream):
    response = await proxy.fetch('GET', '/', [
        ('Connection', 'X-Hop-One, x-hop-two'), ('X-Hop-One', '1'), ('X-Hop-Two', '2'),
        ('X-End-To-End', '3')])
    assert response.status == 200
    received = upstream.received[-1]
    assert received.values('X-Hop-One') == received.values('X-Hop-Two') == []
    assert received.header('X-End-To-End') == '3'


async def test_upstream_gets_exactly_one_host_its_own(proxy, upstream):
    await proxy.fetch('GET', '/', [('Host', 'attacker.example')])
    received = upstream.received[-1]
    assert received.values('Host') == ['127.0.0.1:%d' % upstream.port]
    assert received.header('X-Forwarded-Host') == 'attacker.example'


async def test_forwarded_fields_are_set_for_a_direct_client(proxy, upstream):
    await proxy.fetch('GET', '/')
    received = upstream.received[-1]
    assert received.header('X-Forwarded-For') == '127.0.0.1'
    assert received.header('X-Forwarded-Proto') == 'http'
    assert received.header('X-Forwarded-Host') == '127.0.0.1:%d' % proxy.port


async def test_x_forwarded_for_from_a_trusted_proxy_is_appended_to(proxy, upstream):
    await proxy.fetch('GET', '/', [('X-Forwarded-For', '203.0.113.7, 198.51.100.2'),
                                   ('X-Forwarded-For', '192.0.2.1'),
                                   ('X-Forwarded-Proto', 'https'),
                                   ('X-Forwarded-Host', 'www.example.com')])
    received = upstream.received[-1]
    assert received.header('X-Forwarded-For') == '203.0.113.7, 198.51.100.2, 192.0.2.1, 127.0.0.1'
    assert received.header('X-Forwarded-Proto') == 'https'
    assert received.header('X-Forwarded-Host') == 'www.example.com'


async def test_edge_gateway_replaces_forwarded_fields_from_the_client(upstream, gateway):
    install_pool('proxy')
    edge = gateway(forward_to(upstream.url), trust_forwarded_headers=False)
    await edge.fetch('GET', '/', [
        ('Host', 'shop.example'), ('X-Forwarded-For', '10.0.0.1'), ('X-Forwarded-Proto', 'https'),
        ('X-Forwarded-Host', 'admin.internal'), ('X-Forwarded-Port', '8443'),
        ('X-Forwarded-Prefix', '/admin'), ('Forwarded', 'for=10.0.0.1;proto=https'),
        ('X-Real-IP', '10.0.0.1'), ('X-Kept', 'yes')])
    received = upstream.received[-1]
    assert received.header('X-Forwarded-For') == '127.0.0.1'
    assert received.header('X-Forwarded-Proto') == 'http'
    assert received.header('X-Forwarded-Host') == 'shop.example'
    for name in ('X-Forwarded-Port', 'X-Forwarded-Prefix', 'Forwarded', 'X-Real-IP'):
        assert received.values(name) == [], name
    assert received.header('X-Kept') == 'yes'


async def test_via_is_appended_with_the_clients_protocol_version(proxy, upstream):
    await proxy.fetch('GET', '/', [('Via', '1.1 cdn-edge')])
    assert upstream.received[-1].values('Via') == ['1.1 cdn-edge', '1.1 blackgate']
    await proxy.fetch('GET', '/', version='HTTP/1.0')
    assert upstream.received[-1].values('Via') == ['1.0 blackgate']


async def test_repeated_request_fields_are_kept_in_order(proxy, upstream):
    await proxy.fetch('GET', '/', [('X-Multi', 'one'), ('Accept', 'text/html'),
                                   ('X-Multi', 'two, three'), ('X-Multi', 'four')])
    received = upstream.received[-1]
    assert received.values('X-Multi') == ['one', 'two, three', 'four']
    assert received.header('Accept') == 'text/html'


async def test_no_user_agent_or_accept_encoding_is_added(proxy, upstream):
    await proxy.fetch('GET', '/')
    names = [name.lower() for name, _ in upstream.received[-1].headers]
    assert 'user-agent' not in names and 'accept-encoding' not in names
    assert 'accept' not in names and 'connection' not in names


async def test_user_agent_and_accept_encoding_are_forwarded_as_sent(proxy, upstream):
    await proxy.fetch('GET', '/', [('User-Agent', 'curl/8.5.0'), ('Accept-Encoding', 'br;q=1, gzip')])
    received = upstream.received[-1]
    assert received.header('User-Agent') == 'curl/8.5.0'
    assert received.header('Accept-Encoding') == 'br;q=1, gzip'


@pytest.mark.parametrize('target', [
    '/a/./b/../c/%2e%2e/d',            # dot segments, plain and encoded
    '/files/a%2fb%2Fc%7e%41',          # percent-encodings, any case, none decoded
    '/q?x=%zz&y=100%&z=%2f',           # a stray '%' must not re-encode the others
    '/list?ids[]=1&ids[]=2&f={"a":|}', # characters RFC 3986 leaves out, sent raw
    '/s?a=1&a=2&a=&b&=v&c=x+y%20z',    # repeated and empty keys, '+' and '%20'
    '/p;v=1,2/x:y@z!$&\'()*~',         # sub-delimiters in the path
])
async def test_path_and_query_are_forwarded_byte_for_byte(proxy, upstream, target):
    response = await proxy.fetch('GET', target)
    assert response.status == 200
    assert upstream.received[-1].target == target


async def test_octets_outside_ascii_are_percent_encoded_as_the_same_octets(proxy, upstream):
    raw = b'GET /caf\xc3\xa9?q=\xe9 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n'
    response = await proxy.fetch(raw=raw)
    assert response.status == 200
    assert upstream.received[-1].target == '/caf%C3%A9?q=%E9'


async def test_before_request_sees_the_request_dict(upstream, gateway):
    install_pool('proxy')
    seen = {}

    class Inspect(HTTPProxyCommand):
        group_key = 'proxy'

        def before_request(self):
            seen.update(self.request)
            seen['header_list'] = list(self.request['headers'].items())
            self.request['url'] = upstream.url + self.request['path']

    proxy = gateway(Inspect, r'/api/(.*)')
    await proxy.fetch('PUT', '/api/items/7?tag=a&tag=b&empty=&flag', [('X-Trace', 't1')],
                      body=b'{"name": "lamp"}')
    assert seen['method'] == 'PUT'
    assert seen['path'] == '/api/items/7'
    assert seen['query'] == 'tag=a&tag=b&empty=&flag'
    assert seen['params'] == {'tag': ['a', 'b'], 'empty': [''], 'flag': ['']}
    assert seen['data'] == b'{"name": "lamp"}'
    assert seen['remote_ip'] == '127.0.0.1'
    assert seen['url'] is None
    assert ('X-Trace', 't1') in seen['header_list']
    assert seen['headers']['x-forwarded-for'] == '127.0.0.1'
    assert upstream.received[-1].target == '/api/items/7?tag=a&tag=b&empty=&flag'


async def test_a_url_with_its_own_query_gets_no_second_one(upstream, gateway):
    install_pool('proxy')

    class FixedQuery(HTTPProxyCommand):
        group_key = 'proxy'

        def before_request(self):
            self.request['url'] = upstream.url + '/search?lang=en'

    proxy = gateway(FixedQuery)
    await proxy.fetch('GET', '/anything?q=client')
    assert upstream.received[-1].target == '/search?lang=en'


async def test_fields_changed_in_before_request_are_sent(upstream, gateway):
    install_pool('proxy')

    class Authorize(HTTPProxyCommand):
        group_key = 'proxy'

        def before_request(self):
            headers = self.request['headers']
            headers['Authorization'] = 'Bearer internal-token'
            headers.add('X-Tag', 'gateway')
            del headers['Cookie']
            self.request['url'] = upstream.url + self.request['path']

    proxy = gateway(Authorize)
    await proxy.fetch('GET', '/', [('Cookie', 'session=1'), ('X-Tag', 'client')])
    received = upstream.received[-1]
    assert received.header('Authorization') == 'Bearer internal-token'
    assert received.values('X-Tag') == ['client', 'gateway']
    assert received.values('Cookie') == []
