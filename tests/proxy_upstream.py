"""Test helpers for the HTTPProxy tests: upstreams, a raw client and a gateway, on 127.0.0.1.

- :class:`Upstream` is a small HTTP/1.1 server on its own thread and event loop,
  written on raw sockets so that it can misbehave on purpose. It records every
  request exactly as it arrived (request line, fields in order and spelling,
  body bytes) and answers what ``upstream.respond(received)`` returns: a
  :class:`Reply` (the default echoes the request as JSON), a :class:`Raw`
  byte string, a :class:`Reset`, or a :class:`Stall` before one of those.
- :func:`fetch` is a raw client: it sends the bytes the test asks for and parses
  the response strictly (framing included), so nothing is normalized on the way.
- The ``upstream`` and ``gateway`` fixtures start and stop them; import them into a
  test module to use them.

Every wait is bounded by ``WAIT`` (generous: other test runs share the machine).
"""
import asyncio
import base64
import json
import socket
import struct
import threading
import time
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import pytest
import tornado.web
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from blackgate import HTTPProxy, HTTPProxyCommand, component

#: Real seconds: the longest any step of a test waits before it fails.
WAIT = 10.0
#: pytest-tornado's limit for a whole async test.
TEST_TIMEOUT = 30


# -- what the upstream received and what it answers ---------------------------------------

class Received(NamedTuple):
    """One request as the upstream read it off the wire."""

    method: str
    target: str
    version: str
    headers: List[Tuple[str, str]]   # in order, as spelled, repeats kept
    body: bytes
    peer: Tuple[str, int]

    def values(self, name: str) -> List[str]:
        """Every value of the field ``name`` (any case), in order."""
        name = name.lower()
        return [value for key, value in self.headers if key.lower() == name]

    def header(self, name: str) -> Optional[str]:
        """The only value of ``name``, or None; fails if the field is repeated."""
        values = self.values(name)
        assert len(values) <= 1, '%s received %d times: %r' % (name, len(values), values)
        return values[0] if values else None


class Reply(NamedTuple):
    """A well-formed response. ``Content-Length`` is added unless ``chunked`` or given."""

    status: int = 200
    reason: str = 'OK'
    headers: Sequence[Tuple[str, str]] = ()
    body: bytes = b''
    chunked: bool = False
    close: bool = False


class Raw(NamedTuple):
    """Bytes written as they are; then, after ``hold`` seconds, the connection is closed
    (or reset)."""

    data: bytes
    reset: bool = False
    hold: float = 0.0


class Reset(NamedTuple):
    """Reset the connection (TCP RST) without answering."""


class Stall(NamedTuple):
    """Wait ``seconds``, then do ``then``."""

    seconds: float
    then: object = None


def echo(received: Received) -> Reply:
    """The default answer: 200 with the request as JSON (the body base64-encoded)."""
    body = json.dumps({
        'method': received.method,
        'target': received.target,
        'headers': received.headers,
        'body': base64.b64encode(received.body).decode('ascii'),
    }).encode('utf-8')
    return Reply(headers=[('Content-Type', 'application/json')], body=body)


class Upstream:
    """An HTTP/1.1 server on 127.0.0.1 (port 0) that tests can script.

    ``respond`` maps a :class:`Received` to what to do; ``received`` lists every
    request; ``connections`` counts accepted connections.
    """

    def __init__(self, respond: Callable[[Received], object] = echo) -> None:
        self.respond = respond
        self.received: List[Received] = []
        self.connections = 0
        self.port = 0
        self._ready = threading.Event()
        self._writers: set = set()
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        return 'http://127.0.0.1:%d' % self.port

    def start(self) -> 'Upstream':
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),),
                                        name='test-upstream', daemon=True)
        self._thread.start()
        assert self._ready.wait(WAIT), 'the upstream did not start'
        return self

    def stop(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(WAIT)

    def __enter__(self) -> 'Upstream':
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._serve, '127.0.0.1', 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        await self._stop.wait()
        server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for _ in range(3):   # connections accepted just now see the stop, and close
            await asyncio.sleep(0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._stop.is_set():
            writer.transport.abort()
            return
        self.connections += 1
        self._writers.add(writer)
        peer = writer.get_extra_info('peername')[:2]
        try:
            while True:
                received = await _read_request(reader, peer)
                if received is None:
                    break
                self.received.append(received)
                if not await self._act(self.respond(received), received, writer):
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._writers.discard(writer)
            writer.transport.abort()

    async def _act(self, action, received: Received, writer: asyncio.StreamWriter) -> bool:
        """Carry out ``action``; whether the connection stays open for another request."""
        if isinstance(action, Stall):
            await asyncio.sleep(action.seconds)
            return await self._act(action.then or echo(received), received, writer)
        if isinstance(action, Reset):
            _reset(writer)
            return False
        if isinstance(action, Raw):
            writer.write(action.data)
            await writer.drain()
            if action.hold:
                await asyncio.sleep(action.hold)
            if action.reset:
                _reset(writer)
            return False
        writer.write(_format_reply(action, received.method))
        await writer.drain()
        return not action.close


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info('socket')
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
    writer.transport.abort()


def _format_reply(reply: Reply, method: str) -> bytes:
    lines = ['HTTP/1.1 %d %s' % (reply.status, reply.reason) if reply.reason is not None
             else 'HTTP/1.1 %d' % reply.status]
    names = {name.lower() for name, _ in reply.headers}
    lines += ['%s: %s' % field for field in reply.headers]
    no_body = method == 'HEAD' or reply.status in (204, 304)
    body = reply.body
    if reply.chunked and not no_body:
        lines.append('Transfer-Encoding: chunked')
        body = b''.join(b'%x\r\n%s\r\n' % (len(part), part)
                        for part in (body[:3], body[3:]) if part) + b'0\r\n\r\n'
    elif not names & {'content-length', 'transfer-encoding'} and reply.status not in (204, 304):
        lines.append('Content-Length: %d' % len(reply.body))
    if reply.close:
        lines.append('Connection: close')
    head = ('\r\n'.join(lines) + '\r\n\r\n').encode('latin-1')
    return head if no_body else head + body


async def _read_request(reader: asyncio.StreamReader, peer) -> Optional[Received]:
    try:
        head = await reader.readuntil(b'\r\n\r\n')
    except asyncio.IncompleteReadError:
        return None
    lines = head[:-4].decode('latin-1').split('\r\n')
    method, target, version = lines[0].split(' ')
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(':')
        headers.append((name, value.strip(' \t')))
    fields = {name.lower(): value for name, value in headers}
    if fields.get('transfer-encoding', '').lower() == 'chunked':
        body = await _read_chunked(reader)
    else:
        body = await reader.readexactly(int(fields.get('content-length', '0')))
    return Received(method, target, version, headers, body, peer)


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts = []
    while True:
        size = int((await reader.readuntil(b'\r\n'))[:-2].split(b';')[0], 16)
        if size == 0:
            while await reader.readuntil(b'\r\n') != b'\r\n':   # trailers
                pass
            return b''.join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens: connecting is refused."""
    sock = socket.socket()
    sock.bind(('127.0.0.1', 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


# -- the raw client -------------------------------------------------------------------------

class Response(NamedTuple):
    """A response as the client read it: status line, fields in order, body, and after."""

    version: str
    status: int
    reason: str
    headers: List[Tuple[str, str]]
    body: bytes
    extra: bytes   # anything after the framed body, before the connection closed

    def values(self, name: str) -> List[str]:
        name = name.lower()
        return [value for key, value in self.headers if key.lower() == name]

    def header(self, name: str) -> Optional[str]:
        values = self.values(name)
        assert len(values) <= 1, '%s sent %d times: %r' % (name, len(values), values)
        return values[0] if values else None

    def json(self):
        return json.loads(self.body.decode('utf-8'))


def request_bytes(method: str = 'GET', target: str = '/', headers: Sequence[Tuple[str, str]] = (),
                  body: bytes = b'', *, port: int = 0, host: bool = True, close: bool = True,
                  version: str = 'HTTP/1.1') -> bytes:
    """A request as bytes: ``Host`` (unless given or ``host=False``), ``Content-Length``
    for a body (unless a framing field is given) and ``Connection: close`` are added."""
    names = {name.lower() for name, _ in headers}
    lines = ['%s %s %s' % (method, target, version)]
    if host and 'host' not in names:
        lines.append('Host: 127.0.0.1:%d' % port)
    lines += ['%s: %s' % field for field in headers]
    if body and not names & {'content-length', 'transfer-encoding'}:
        lines.append('Content-Length: %d' % len(body))
    if close and 'connection' not in names:
        lines.append('Connection: close')
    return ('\r\n'.join(lines) + '\r\n\r\n').encode('latin-1') + body


async def read_response(reader: asyncio.StreamReader, method: str = 'GET',
                        until_close: bool = True) -> Response:
    """Read one response, framed as RFC 9112 §6.3 says, then (optionally) up to the close."""
    head = await reader.readuntil(b'\r\n\r\n')
    lines = head[:-4].decode('latin-1').split('\r\n')
    version, status, reason = (lines[0].split(' ', 2) + [''])[:3]
    status = int(status)
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(':')
        headers.append((name, value.strip(' \t')))
    fields = {}
    for name, value in headers:
        fields.setdefault(name.lower(), []).append(value)
    if method == 'HEAD' or status in (204, 304) or status < 200:
        body = b''
    elif 'chunked' in ','.join(fields.get('transfer-encoding', [])).lower():
        body = await _read_chunked(reader)
    elif 'content-length' in fields:
        assert len(fields['content-length']) == 1, fields['content-length']
        body = await reader.readexactly(int(fields['content-length'][0]))
    else:
        body = await reader.read()
    extra = await reader.read() if until_close else b''
    return Response(version, status, reason, headers, body, extra)


async def fetch(port: int, method: str = 'GET', target: str = '/',
                headers: Sequence[Tuple[str, str]] = (), body: bytes = b'', *,
                raw: Optional[bytes] = None, **options) -> Response:
    """Send one request to 127.0.0.1:``port`` on a new connection and read the response.

    The request says ``Connection: close``, and what follows the response up to the
    close is read into ``extra``; a request that sends ``Connection`` fields of its
    own keeps the connection open (Tornado closes only on exactly ``close``), so
    ``extra`` is not read then.
    """
    data = raw if raw is not None else request_bytes(method, target, headers, body,
                                                     port=port, **options)
    until_close = raw is None and not any(name.lower() == 'connection' for name, _ in headers)

    async def exchange() -> Response:
        reader, writer = await asyncio.open_connection('127.0.0.1', port)
        try:
            writer.write(data)
            await writer.drain()
            return await read_response(reader, method, until_close)
        finally:
            writer.close()

    return await asyncio.wait_for(exchange(), WAIT)


# -- the gateway ----------------------------------------------------------------------------

class Gateway(NamedTuple):
    port: int

    async def fetch(self, method: str = 'GET', target: str = '/', headers=(), body=b'',
                    **options) -> Response:
        return await fetch(self.port, method, target, headers, body, **options)


def install_pool(group_key: str, max_workers: int = 4, max_queue_size: int = 0) -> None:
    component.add('executor_pool', {'group_key': group_key, 'max_workers': max_workers,
                                    'max_queue_size': max_queue_size})
    component.install()


async def drained(group_key: str) -> None:
    """Wait until no work of ``group_key`` is in flight (a worker may finish late)."""
    pool = component.pool(group_key)
    deadline = time.monotonic() + WAIT
    while pool.in_flight and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert pool.in_flight == 0 and pool.active_count == 0, pool


@pytest.fixture
def upstream():
    """A started echo :class:`Upstream`; stopped after the test."""
    with Upstream() as server:
        yield server


@pytest.fixture
def gateway(io_loop):
    """Start gateways: ``gateway(CommandClass, pattern=r'/(.*)', **HTTPProxy settings)``."""
    servers = []

    def start(command, pattern: str = r'/(.*)', **settings) -> Gateway:
        app = tornado.web.Application([(pattern, HTTPProxy, dict(command=command, **settings))])
        sockets = bind_sockets(0, '127.0.0.1')
        server = HTTPServer(app)
        server.add_sockets(sockets)
        servers.append(server)
        return Gateway(sockets[0].getsockname()[1])

    yield start
    for server in servers:
        server.stop()
        io_loop.run_sync(server.close_all_connections, timeout=WAIT)


def forward_to(base_url: str, name: str = 'Forward', **attributes) -> type:
    """An HTTPProxyCommand subclass whose before_request() sends the path to ``base_url``.

    Group ``'proxy'``, a generous ``timeout`` of WAIT seconds; ``attributes`` override.
    """
    def before_request(self):
        self.request['url'] = base_url + self.request['path']

    namespace = {'group_key': 'proxy', 'timeout': WAIT, 'before_request': before_request}
    namespace.update(attributes)
    return type(name, (HTTPProxyCommand,), namespace)


@pytest.fixture
def proxy(upstream, gateway):
    """A gateway forwarding every path to the echo upstream, on the pool 'proxy'."""
    install_pool('proxy')
    return gateway(forward_to(upstream.url))


def answer(reply):
    """A script for ``upstream.respond``: answer every request with ``reply``."""
    return lambda received: reply
