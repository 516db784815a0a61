"""HTTPProxy, framing and bodies: lengths, encodings, HEAD, 204 and 304, limits, reuse.

The raw client parses every response by its framing and then reads up to the
close: a wrong ``Content-Length`` shows up as a short body or as ``extra`` bytes.
"""
import asyncio
import gzip
import os

import pytest

from proxy_upstream import (TEST_TIMEOUT, WAIT, Raw, Reply, Stall, answer,  # noqa: F401
                            forward_to, gateway, install_pool, proxy, read_response,
                            request_bytes, upstream)

pytestmark = pytest.mark.gen_test(timeout=TEST_TIMEOUT)


def echo_body(received):
    return Reply(headers=[('Content-Type', 'application/octet-stream')], body=received.body)


async def test_an_encoded_body_arrives_as_encoded_with_its_length(proxy, upstream):
    payload = gzip.compress(b'{"items": [1, 2, 3]}' * 50, mtime=0)
    upstream.respond = answer(Reply(headers=[('Content-Encoding', 'gzip'),
                                             ('Content-Type', 'application/json')], body=payload))
    response = await proxy.fetch('GET', '/', [('Accept-Encoding', 'gzip')])
    assert response.header('Content-Encoding') == 'gzip'
    assert response.body == payload
    assert response.header('Content-Length') == str(len(payload))
    assert response.extra == b''


async def test_a_chunked_upstream_body_is_sent_whole_with_a_length(proxy, upstream):
    upstream.respond = answer(Reply(body=b'first part, then the rest', chunked=True))
    response = await proxy.fetch('GET', '/')
    assert response.body == b'first part, then the rest'
    assert response.header('Content-Length') == '25'
    assert response.values('Transfer-Encoding') == []
    assert response.extra == b''


async def test_a_close_delimited_upstream_body_is_sent_with_a_length(proxy, upstream):
    upstream.respond = answer(Raw(b'HTTP/1.1 200 OK\r\nX-Framing: none\r\n\r\nuntil the end'))
    response = await proxy.fetch('GET', '/')
    assert response.body == b'until the end'
    assert response.header('Content-Length') == '13'


async def test_head_keeps_the_upstreams_length_and_has_no_body(proxy, upstream):
    upstream.respond = answer(Reply(headers=[('Content-Length', '123456'),
                                             ('Content-Type', 'video/mp4')]))
    response = await proxy.fetch('HEAD', '/movie')
    assert response.status == 200
    assert upstream.received[-1].method == 'HEAD'
    assert response.header('Content-Length') == '123456'
    assert response.header('Content-Type') == 'video/mp4'
    assert response.body == b'' and response.extra == b''


async def test_head_without_an_upstream_length_gets_no_invented_one(proxy, upstream):
    upstream.respond = answer(Reply(headers=[('Transfer-Encoding', 'chunked')]))
    response = await proxy.fetch('HEAD', '/stream')
    assert response.status == 200
    assert response.values('Content-Length') == []
    assert response.extra == b''


async def test_204_has_no_body_and_no_length(proxy, upstream):
    upstream.respond = answer(Reply(204, 'No Content', [('X-Deleted', 'yes')]))
    response = await proxy.fetch('DELETE', '/item/1')
    assert (response.status, response.header('X-Deleted')) == (204, 'yes')
    assert response.values('Content-Length') == [] and response.values('Transfer-Encoding') == []
    assert response.extra == b''


async def test_304_has_no_body_and_keeps_its_validators(proxy, upstream):
    upstream.respond = answer(Reply(304, 'Not Modified', [
        ('ETag', '"v7"'), ('Cache-Control', 'max-age=600'), ('Content-Type', 'text/html'),
        ('Vary', 'Accept-Encoding')]))
    response = await proxy.fetch('GET', '/page', [('If-None-Match', '"v7"')])
    assert response.status == 304
    assert upstream.received[-1].header('If-None-Match') == '"v7"'
    assert response.header('ETag') == '"v7"'
    assert response.header('Cache-Control') == 'max-age=600'
    assert response.header('Content-Type') == 'text/html'
    assert response.header('Vary') == 'Accept-Encoding'
    assert response.values('Transfer-Encoding') == []
    assert response.extra == b''


async def test_a_binary_request_body_is_forwarded_with_its_length(proxy, upstream):
    body = bytes(range(256)) * 16 + b'\r\n\r\n0\r\n'
    upstream.respond = echo_body
    response = await proxy.fetch('POST', '/upload', [('Content-Type', 'application/octet-stream')],
                                 body)
    received = upstream.received[-1]
    assert received.body == body
    assert received.header('Content-Length') == str(len(body))
    assert response.body == body


async def test_a_large_body_makes_the_round_trip_intact(proxy, upstream):
    body = os.urandom(3 * 1024 * 1024)
    upstream.respond = echo_body
    response = await proxy.fetch('PUT', '/blob', body=body)
    assert response.status == 200
    assert response.body == body


async def test_a_chunked_request_body_reaches_the_upstream_with_a_length(proxy, upstream):
    chunked = b'5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n'
    await proxy.fetch('POST', '/', [('Transfer-Encoding', 'chunked')], chunked)
    received = upstream.received[-1]
    assert received.body == b'hello, world'
    assert received.header('Content-Length') == '12'
    assert received.values('Transfer-Encoding') == []


async def test_content_length_only_where_a_body_is_expected(proxy, upstream):
    await proxy.fetch('POST', '/empty')
    assert upstream.received[-1].header('Content-Length') == '0'
    await proxy.fetch('GET', '/')
    assert upstream.received[-1].values('Content-Length') == []


async def test_expect_100_continue_is_answered_by_the_gateway_not_forwarded(proxy, upstream):
    reader, writer = await asyncio.open_connection('127.0.0.1', proxy.port)
    try:
        writer.write(request_bytes('POST', '/', [('Expect', '100-continue'),
                                                 ('Content-Length', '4')], port=proxy.port))
        interim = await asyncio.wait_for(reader.readuntil(b'\r\n\r\n'), WAIT)
        assert interim.startswith(b'HTTP/1.1 100 ')
        writer.write(b'data')
        response = await asyncio.wait_for(read_response(reader, 'POST'), WAIT)
    finally:
        writer.close()
    assert response.status == 200
    received = upstream.received[-1]
    assert received.values('Expect') == []
    assert received.body == b'data'


async def test_a_body_over_the_limit_is_refused_413_before_the_upstream(upstream, gateway):
    install_pool('proxy')
    proxy = gateway(forward_to(upstream.url), max_body_size=1000)
    response = await proxy.fetch('POST', '/', body=b'x' * 1001)
    assert response.status == 413
    assert response.header('X-Blackgate-Error') == 'body-too-large'
    assert response.json()['error'] == 'request body too large'
    assert upstream.received == []
    response = await proxy.fetch('POST', '/', body=b'x' * 1000)
    assert response.status == 200


async def test_a_chunked_body_over_the_limit_is_refused_413(upstream, gateway):
    install_pool('proxy')
    proxy = gateway(forward_to(upstream.url), max_body_size=1000)
    chunked = b''.join(b'100\r\n' + b'y' * 256 + b'\r\n' for _ in range(5)) + b'0\r\n\r\n'
    response = await proxy.fetch('POST', '/', [('Transfer-Encoding', 'chunked')], chunked)
    assert response.status == 413
    assert upstream.received == []


async def test_a_kept_alive_client_connection_gets_each_response_framed(proxy, upstream):
    upstream.respond = lambda received: Reply(body=received.target.encode() * 3)
    reader, writer = await asyncio.open_connection('127.0.0.1', proxy.port)
    try:
        bodies = []
        for target in ('/one', '/two', '/three'):
            writer.write(request_bytes('GET', target, port=proxy.port, close=False))
            response = await asyncio.wait_for(read_response(reader, until_close=False), WAIT)
            bodies.append(response.body)
    finally:
        writer.close()
    assert bodies == [b'/one' * 3, b'/two' * 3, b'/three' * 3]


async def test_upstream_connections_are_reused(proxy, upstream):
    for _ in range(5):
        assert (await proxy.fetch('GET', '/')).status == 200
    assert upstream.connections == 1
    assert len({received.peer for received in upstream.received}) == 1


async def test_every_worker_keeps_its_upstream_connection(upstream, gateway, caplog):
    # The shared session's pool is as large as the largest executor pool: 16 workers
    # busy at once open 16 connections, and the next 16 requests reuse them.
    install_pool('proxy', max_workers=16)
    upstream.respond = lambda received: Stall(0.2, Reply())
    proxy = gateway(forward_to(upstream.url))
    for _ in range(2):
        responses = await asyncio.gather(*[proxy.fetch('GET', '/') for _ in range(16)])
        assert [response.status for response in responses] == [200] * 16
    assert upstream.connections <= 16
    assert 'pool is full' not in caplog.text


async def test_an_oversized_body_waiting_for_100_continue_is_refused_at_once(upstream, gateway):
    install_pool('proxy')
    proxy = gateway(forward_to(upstream.url), max_body_size=1000)
    reader, writer = await asyncio.open_connection('127.0.0.1', proxy.port)
    try:
        writer.write(request_bytes('PUT', '/', [('Expect', '100-continue'),
                                                ('Content-Length', '50000000')], port=proxy.port))
        response = await asyncio.wait_for(read_response(reader, 'PUT'), WAIT)   # no body sent
    finally:
        writer.close()
    assert response.status == 413   # not 100 Continue
    assert upstream.received == []
