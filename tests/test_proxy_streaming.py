"""Streaming through HTTPProxy (docs/proxy.rst): bodies both ways with flow control, event
streams, WebSockets, and how a streamed exchange is counted.

The memory cases run the gateway in a subprocess (tests/streaming_gateway.py, the
README's APIService route as written) and read its peak RSS (VmHWM) from /proc.
"""
import asyncio
import gc
import hashlib
import json
import logging
import os
import subprocess
import sys
import time

import pytest
import tornado.httpclient
import tornado.web
import tornado.websocket
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from blackgate import Event, HTTPProxyCommand, component
from proxy_upstream import (TEST_TIMEOUT, WAIT, Raw, Reply, Stall, answer,  # noqa: F401
                            drained, forward_to, gateway, install_pool, request_bytes,
                            upstream)

pytestmark = pytest.mark.gen_test(timeout=TEST_TIMEOUT * 4)

MB = 1024 * 1024
BIG = 200 * MB
#: The most a 200 MB body may raise the gateway's peak RSS (the issue's bound).
RSS_BOUND = 64 * MB
_BLOCK = os.urandom(MB)


def _blocks(total):
    """``total`` bytes as 1 MB blocks, each made different by its number."""
    for number in range(total // MB):
        yield number.to_bytes(8, 'big') + _BLOCK[8:]


def _sha256_of(total):
    digest = hashlib.sha256()
    for block in _blocks(total):
        digest.update(block)
    return digest.hexdigest()


# -- an upstream that streams, on the test's own loop ----------------------------------------

class Streams:
    """What the streaming upstream saw: bytes sent, connections opened and lost."""

    def __init__(self):
        self.sent = 0
        self.closed = asyncio.Event()
        self.requests = []


class Download(tornado.web.RequestHandler):
    def initialize(self, streams):
        self.streams = streams

    async def get(self, size):
        total = int(size) * MB
        self.set_header('Content-Type', 'application/octet-stream')
        self.set_header('Content-Length', total)
        for block in _blocks(total):
            self.write(block)
            await self.flush()
            self.streams.sent += len(block)

    def on_connection_close(self):
        self.streams.closed.set()


@tornado.web.stream_request_body
class Upload(tornado.web.RequestHandler):
    def initialize(self, streams):
        self.streams = streams

    def prepare(self):
        self.request.connection.set_max_body_size(1 << 40)
        self.digest = hashlib.sha256()
        self.size = 0
        self.streams.requests.append(dict(self.request.headers.get_all()))

    def data_received(self, chunk):
        self.digest.update(chunk)
        self.size += len(chunk)

    def post(self):
        self.write({'sha256': self.digest.hexdigest(), 'size': self.size})


class Events(tornado.web.RequestHandler):
    async def get(self):
        self.set_header('Content-Type', 'text/event-stream')
        self.set_header('Cache-Control', 'no-cache')
        for number in range(5):
            if number:
                await asyncio.sleep(0.3)
            self.write('id: %d\ndata: event %d\n\n' % (number, number))
            await self.flush()


class Trickle(tornado.web.RequestHandler):
    """Sends a little, then nothing: until the client (the gateway) goes away."""

    def initialize(self, streams):
        self.streams = streams

    async def get(self):
        self.set_header('Content-Type', 'application/octet-stream')
        while not self.streams.closed.is_set():
            self.write(b'x' * 1024)
            try:
                await self.flush()
            except tornado.iostream.StreamClosedError:
                break
            self.streams.sent += 1024
            await asyncio.sleep(0.02)

    def on_connection_close(self):
        self.streams.closed.set()


class Echo(tornado.websocket.WebSocketHandler):
    def on_message(self, message):
        self.write_message(message, binary=isinstance(message, bytes))


@pytest.fixture
def streams():
    return Streams()


@pytest.fixture
def streaming_upstream(io_loop, streams):
    app = tornado.web.Application([
        # (the README's route sends /api/v1/x to /v1/x)
        (r'(?:/v1)?/download/(\d+)', Download, dict(streams=streams)),
        (r'(?:/v1)?/upload', Upload, dict(streams=streams)),
        (r'/events', Events),
        (r'/trickle', Trickle, dict(streams=streams)),
        (r'/echo', Echo),
    ])
    sockets = bind_sockets(0, '127.0.0.1')
    server = HTTPServer(app, max_body_size=1 << 40)
    server.add_sockets(sockets)
    yield 'http://127.0.0.1:%d' % sockets[0].getsockname()[1]
    server.stop()
    io_loop.run_sync(server.close_all_connections, timeout=WAIT)


# -- the gateway in a process of its own ----------------------------------------------------

class GatewayProcess:
    def __init__(self, upstream_url):
        script = os.path.join(os.path.dirname(__file__), 'streaming_gateway.py')
        self.process = subprocess.Popen([sys.executable, script, upstream_url, '120'],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.port = int(self.process.stdout.readline())

    def peak_rss(self):
        """VmHWM: the most resident memory the process has had, in bytes."""
        with open('/proc/%d/status' % self.process.pid) as status:
            for line in status:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) * 1024
        raise AssertionError('no VmHWM')

    def stop(self):
        self.process.stdin.close()
        try:
            self.process.wait(WAIT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(WAIT)


@pytest.fixture
def gateway_process(streaming_upstream):
    process = GatewayProcess(streaming_upstream)
    yield process
    process.stop()


async def _open(port):
    return await asyncio.wait_for(asyncio.open_connection('127.0.0.1', port), WAIT)


async def _read_head(reader):
    head = await asyncio.wait_for(reader.readuntil(b'\r\n\r\n'), WAIT)
    lines = head.decode('latin-1').split('\r\n')
    fields = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(':')
            fields[name.strip().lower()] = value.strip()
    return int(lines[0].split(' ')[1]), fields


async def _warm_up(port):
    reader, writer = await _open(port)
    writer.write(request_bytes('GET', '/api/v1/download/1', port=port))
    status, fields = await _read_head(reader)
    await reader.read()
    writer.close()
    assert status == 200, fields


async def test_a_200_mb_download_streams_through_intact_with_flat_memory(gateway_process):
    await _warm_up(gateway_process.port)
    before = gateway_process.peak_rss()
    reader, writer = await _open(gateway_process.port)
    writer.write(request_bytes('GET', '/api/v1/download/200', port=gateway_process.port))
    status, fields = await _read_head(reader)
    assert status == 200 and fields['content-length'] == str(BIG)
    digest, size = hashlib.sha256(), 0
    while size < BIG:
        data = await asyncio.wait_for(reader.read(MB), WAIT)
        assert data, 'the download broke off at %d bytes' % size
        digest.update(data)
        size += len(data)
    writer.close()
    assert size == BIG and digest.hexdigest() == _sha256_of(BIG)
    growth = gateway_process.peak_rss() - before
    print('\n200 MB download: gateway peak RSS grew by %.1f MB' % (growth / MB))
    assert growth <= RSS_BOUND, growth


async def test_a_200_mb_chunked_upload_streams_through_intact_with_flat_memory(gateway_process,
                                                                                streams):
    await _warm_up(gateway_process.port)
    before = gateway_process.peak_rss()
    reader, writer = await _open(gateway_process.port)
    writer.write(request_bytes('POST', '/api/v1/upload', [('Transfer-Encoding', 'chunked')],
                               port=gateway_process.port))
    for block in _blocks(BIG):
        writer.write(b'%x\r\n%s\r\n' % (len(block), block))
        await asyncio.wait_for(writer.drain(), WAIT)
    writer.write(b'0\r\n\r\n')
    status, fields = await _read_head(reader)
    body = json.loads(await asyncio.wait_for(reader.read(), WAIT))
    writer.close()
    assert status == 200
    assert body == {'sha256': _sha256_of(BIG), 'size': BIG}
    assert streams.requests[-1].get('Transfer-Encoding') == 'chunked'   # streamed, not buffered
    growth = gateway_process.peak_rss() - before
    print('\n200 MB upload: gateway peak RSS grew by %.1f MB' % (growth / MB))
    assert growth <= RSS_BOUND, growth


async def test_a_client_slow_to_read_pauses_the_upstream(gateway_process, streams):
    await _warm_up(gateway_process.port)
    before = gateway_process.peak_rss()
    sent_before = streams.sent
    reader, writer = await _open(gateway_process.port)
    writer.write(request_bytes('GET', '/api/v1/download/200', port=gateway_process.port))
    status, _ = await _read_head(reader)
    assert status == 200
    await asyncio.wait_for(reader.readexactly(MB), WAIT)
    await asyncio.sleep(1.0)   # the client reads nothing for a second
    sent = streams.sent - sent_before
    writer.close()
    # What the sockets' buffers hold between the three processes, no more: the upstream
    # waits for the client instead of filling the gateway's memory.
    assert sent < 40 * MB, sent / MB
    assert gateway_process.peak_rss() - before <= RSS_BOUND


# -- in-process gateway cases ---------------------------------------------------------------

async def test_server_sent_events_reach_the_client_as_they_are_sent(streaming_upstream, gateway):
    install_pool('proxy')
    proxy = gateway(forward_to(streaming_upstream))
    reader, writer = await _open(proxy.port)
    writer.write(request_bytes('GET', '/events', port=proxy.port))
    status, fields = await _read_head(reader)
    assert status == 200 and fields['content-type'] == 'text/event-stream'
    arrived, text = [], b''
    while len(arrived) < 5:
        data = await asyncio.wait_for(reader.read(4096), WAIT)
        assert data, 'the stream ended after %d events' % len(arrived)
        text += data
        while text.count(b'\n\n') > len(arrived):
            arrived.append(time.monotonic())
    writer.close()
    assert b'data: event 0' in text and b'data: event 4' in text
    assert arrived[-1] - arrived[0] >= 0.8, arrived


async def test_a_websocket_is_relayed_on_a_route_that_allows_it(streaming_upstream, gateway):
    install_pool('proxy')
    proxy = gateway(forward_to(streaming_upstream), websocket=True)
    connection = await asyncio.wait_for(tornado.websocket.websocket_connect(
        'ws://127.0.0.1:%d/echo' % proxy.port), WAIT)
    try:
        for message in ('hello', 'x' * 200000):
            await connection.write_message(message)
            assert await asyncio.wait_for(connection.read_message(), WAIT) == message
        await connection.write_message(b'\x00\x01binary', binary=True)
        assert await asyncio.wait_for(connection.read_message(), WAIT) == b'\x00\x01binary'
    finally:
        connection.close()
    assert component.metrics('Forward').rolling_count(Event.SUCCESS) == 1   # one execution
    await drained('proxy')   # a tunnel holds no slot


async def test_a_websocket_is_refused_on_a_route_without_it(streaming_upstream, gateway, caplog):
    install_pool('proxy')
    proxy = gateway(forward_to(streaming_upstream))
    with pytest.raises(tornado.httpclient.HTTPClientError) as raised:
        await asyncio.wait_for(tornado.websocket.websocket_connect(
            'ws://127.0.0.1:%d/echo' % proxy.port), WAIT)
    assert raised.value.code == 403
    reader, writer = await _open(proxy.port)
    writer.write(request_bytes('GET', '/echo', [
        ('Connection', 'Upgrade'), ('Upgrade', 'websocket'), ('Sec-WebSocket-Version', '13'),
        ('Sec-WebSocket-Key', 'dGhlIHNhbXBsZSBub25jZQ==')], port=proxy.port))
    status, fields = await _read_head(reader)
    body = json.loads(await asyncio.wait_for(reader.read(), WAIT))
    writer.close()
    assert status == 403
    assert fields['x-blackgate-error'] == 'websocket-refused'
    assert body['error'] == 'websocket not allowed here'
    assert 'Traceback' not in caplog.text


async def test_a_client_leaving_mid_stream_closes_the_upstream_and_frees_the_slot(
        streaming_upstream, gateway, streams, caplog):
    install_pool('proxy', max_workers=1)
    proxy = gateway(forward_to(streaming_upstream))
    reader, writer = await _open(proxy.port)
    writer.write(request_bytes('GET', '/trickle', port=proxy.port))
    status, _ = await _read_head(reader)
    assert status == 200
    await asyncio.wait_for(reader.read(1024), WAIT)
    writer.close()
    await asyncio.wait_for(streams.closed.wait(), WAIT)   # the upstream was let go
    await drained('proxy')
    metrics = component.metrics('Forward')
    assert metrics.rolling_count(Event.SUCCESS) == 1
    assert metrics.rolling_count(Event.FAILURE) == 0
    assert [record for record in caplog.records if record.levelno >= logging.WARNING
            and record.name != 'tornado.access'] == []


async def test_an_upstream_stalling_mid_body_is_a_failure_and_cuts_the_client(upstream, gateway,
                                                                             caplog):
    install_pool('proxy')
    head = b'HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n' % (2 * MB)
    upstream.respond = answer(Raw(head + b'y' * (300 * 1024), hold=3.0))
    proxy = gateway(forward_to(upstream.url, body_idle_timeout=0.3))
    reader, writer = await _open(proxy.port)
    writer.write(request_bytes('GET', '/', port=proxy.port))
    status, fields = await _read_head(reader)
    assert status == 200 and fields['content-length'] == str(2 * MB)
    received = await asyncio.wait_for(reader.read(), WAIT)   # up to the cut
    writer.close()
    assert len(received) == 300 * 1024   # what arrived, and then the connection closed
    await drained('proxy')
    metrics = component.metrics('Forward')
    assert metrics.rolling_count(Event.FAILURE) == 1
    assert metrics.rolling_count(Event.SUCCESS) == 0
    [record] = [record for record in caplog.records if record.name == 'blackgate']
    assert 'FAILURE' in record.getMessage() and 'Traceback' not in caplog.text


async def test_a_client_leaving_mid_upload_is_a_bad_request_not_a_failure(streaming_upstream,
                                                                        gateway, caplog):
    install_pool('proxy')
    proxy = gateway(forward_to(streaming_upstream))
    reader, writer = await _open(proxy.port)
    writer.write(request_bytes('POST', '/upload', [('Content-Length', str(4 * MB))],
                               port=proxy.port) + b'z' * MB)
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.close()
    await drained('proxy')
    metrics = component.metrics('Forward')
    assert metrics.rolling_count(Event.BAD_REQUEST) == 1
    assert metrics.rolling_count(Event.FAILURE) == 0
    gc.collect()   # a future whose error nobody took is reported as it is collected
    await asyncio.sleep(0.05)
    assert [record for record in caplog.records if record.name in ('blackgate', 'asyncio')] == []


async def test_a_streamed_body_leaves_its_connection_for_the_next_request(streaming_upstream,
                                                                          gateway):
    install_pool('proxy')
    proxy = gateway(forward_to(streaming_upstream))
    for _ in range(3):
        reader, writer = await _open(proxy.port)
        writer.write(request_bytes('GET', '/download/2', port=proxy.port))
        status, _ = await _read_head(reader)
        body = await asyncio.wait_for(reader.read(), WAIT)
        writer.close()
        assert status == 200 and len(body) == 2 * MB
    from blackgate import transport
    assert transport.pool().opened == 1


async def test_a_groups_pool_bounds_its_exchanges_together(upstream, gateway):
    install_pool('proxy', max_workers=2, max_queue_size=1)
    upstream.respond = lambda received: (Raw(b'HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok',
                                             hold=0) if received.target == '/fast' else
                                         Stall(1.0, Reply()))
    first = gateway(forward_to(upstream.url, 'First'))
    second = gateway(forward_to(upstream.url, 'Second'))
    slow = [asyncio.ensure_future(proxy.fetch('GET', '/slow'))
            for proxy in (first, second, first)]
    deadline = time.monotonic() + WAIT
    while component.pool('proxy').in_flight < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert component.pool('proxy').in_flight == 3   # 2 workers + 1 queue slot, no thread
    refused = await second.fetch('GET', '/fast')
    assert refused.status == 503
    assert refused.header('X-Blackgate-Error') == 'rejected'
    assert [response.status for response in await asyncio.gather(*slow)] == [200] * 3
    assert (await second.fetch('GET', '/fast')).status == 200


async def test_a_buffered_command_sees_and_rewrites_whole_bodies(streaming_upstream, gateway):
    install_pool('proxy')

    class Rewrite(HTTPProxyCommand):
        group_key = 'proxy'
        buffer_body = True

        def before_request(self):
            assert isinstance(self.request['data'], bytes)
            self.request['url'] = streaming_upstream + self.request['path']

        def after_response(self):
            digest = json.loads(self.response['content'])['sha256']
            self.response['content'] = digest.encode()

    proxy = gateway(Rewrite, max_body_size=None)
    payload = os.urandom(3 * MB)
    response = await proxy.fetch('POST', '/upload', body=payload)
    assert response.body == hashlib.sha256(payload).hexdigest().encode()


async def test_a_buffered_response_over_its_limit_is_a_502(streaming_upstream, gateway):
    install_pool('proxy')
    proxy = gateway(forward_to(streaming_upstream, buffer_body=True),
                    max_response_body_size=MB)
    response = await proxy.fetch('GET', '/download/2')
    assert response.status == 502
    assert response.header('X-Blackgate-Error') == 'bad-gateway'


@pytest.mark.parametrize('attribute, value', [
    ('buffer_body', 'yes'), ('body_idle_timeout', -1), ('body_idle_timeout', 0),
    ('max_response_body_size', 0), ('body_buffer_window', -0.1)])
def test_bad_proxy_settings_fail_at_class_definition(attribute, value):
    with pytest.raises(Exception) as raised:
        type('Bad', (HTTPProxyCommand,), {attribute: value})
    assert attribute in str(raised.value) and repr(value) in str(raised.value)
