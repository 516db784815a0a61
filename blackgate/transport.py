"""The gateway's upstream transport: HTTP/1.1 on asyncio protocols, kept alive per origin.

This module carries bytes and reads them strictly; what to send and what an
answer means is :mod:`blackgate.proxy`'s business. It writes the request line
and every field itself (so the target goes out exactly as given, and no field
is added but ``Host`` and the body's framing), reads the response head line
by line as RFC 9112 asks of a proxy, and hands the body out in chunks as it
arrives, so that memory is bounded by a chunk, not by the body.

A :class:`ConnectionPool` per IOLoop keeps idle keep-alive connections per
origin (scheme, host, port). A connection is reused only when its last
response was framed and read to the end, and is checked for a close from the
upstream before each reuse; a request on a reused connection that the
upstream closed before answering (the race every keep-alive client has) is
reported as :class:`StaleConnection`, so the caller may send it again.

.. warning::

   Everything here runs on one IOLoop thread; a pool and its connections
   belong to the loop that made them.
"""
import asyncio
import errno
import re
import socket
import ssl
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Tuple, cast

import tornado.iostream
import tornado.netutil

__all__ = ('WireError', 'WireTimeout', 'StaleConnection', 'Origin', 'Target', 'parse_url',
           'Connection', 'ConnectionPool', 'pool', 'dial', 'ResponseHead', 'ResponseBody',
           'send_request', 'read_head', 'CHUNK_SIZE')

#: Bytes read or written at a time: the most a body holds in memory per exchange.
CHUNK_SIZE = 64 * 1024
#: The longest response head accepted (Tornado's own default for requests).
MAX_HEAD_SIZE = 64 * 1024
_MAX_LINE = 8 * 1024

_HEAD_END = re.compile(rb'\r?\n\r?\n')
#: Unread bytes a connection holds before the event loop stops reading it.
MAX_BUFFER = CHUNK_SIZE * 4
_STATUS_LINE = re.compile(r'HTTP/1\.([01]) ([1-9][0-9][0-9])(?: (.*))?')
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# A head that needs none of parse_head()'s repairs, in one match (the common case).
_CLEAN_HEAD = re.compile(r"HTTP/1\.([01]) ([1-9][0-9][0-9])(?: ([^\r\n]*))?\r\n"
                         r"((?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[^\r\n]*\r\n)*)\r\n")
# The request fields as one block: each a token, a colon and a value without CR, LF or NUL.
_FIELD_BLOCK = re.compile(r"(?:[!#$%&'*+.^_`|~0-9A-Za-z-]+: [^\r\n\x00]*\r\n)*")
_CHUNK_SIZE_LINE = re.compile(rb'([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]*)?\r?\n')
_VERBATIM_TARGET = re.compile(r'/[\x21\x22\x24-\x7e]*')   # visible ASCII, no '#'
_NOT_VISIBLE = re.compile(r'[^\x21-\x7e]')
_DEFAULT_PORTS = {'http': 80, 'https': 443}


class WireError(Exception):
    """The upstream could not be reached, or what it sent is not HTTP/1.1 as it must be."""


class WireTimeout(WireError):
    """The upstream did not connect, answer or send more within the time given."""


class StaleConnection(WireError):
    """A reused connection was closed by the upstream before any byte of an answer."""


class Origin(NamedTuple):
    """Where connections go: they are pooled and reused per origin."""

    scheme: str
    host: str
    port: int


class Target(NamedTuple):
    """A URL taken apart for the wire."""

    origin: Origin
    authority: str   # the Host field: host, and the port unless it is the scheme's default
    target: str      # the request target: path and query, as they are


_origins: Dict[str, Tuple[Origin, str]] = {}   # 'scheme://netloc' -> (origin, authority)


def parse_url(url: str) -> Target:
    """The origin, ``Host`` and request target of an ``http(s)://`` URL, the target unchanged.

    A fragment is left out, and so is any ``user:password@``. Octets outside
    visible ASCII (a space in a URL built by hand, say) are percent-encoded;
    nothing else is: no dot segments removed, no percent-encoding changed.
    """
    start = url.find('://')
    slash = url.find('/', start + 3) if start > 0 else -1
    if slash > 0 and '?' not in url[:slash] and '#' not in url[:slash]:
        known = _origins.get(url[:slash])
        if known is not None:
            target = url[slash:]
            if not _VERBATIM_TARGET.fullmatch(target):
                target = _NOT_VISIBLE.sub(_percent_encode, target.partition('#')[0])
            return Target(known[0], known[1], target)
    parsed = _parse_url(url, start)
    if slash > 0 and url[slash:].startswith(parsed.target[:1]) and len(_origins) < 1024:
        if '?' not in url[:slash] and '#' not in url[:slash]:
            _origins[url[:slash]] = (parsed.origin, parsed.authority)
    return parsed


def _parse_url(url: str, start: int) -> Target:
    scheme = url[:start].lower() if start > 0 else ''
    if scheme not in _DEFAULT_PORTS:
        raise WireError('not an http:// or https:// URL')
    rest = url[start + 3:]
    end = len(rest)
    for mark in '/?#':
        found = rest.find(mark)
        if 0 <= found < end:
            end = found
    netloc, target = rest[:end], rest[end:]
    hostport = netloc.rpartition('@')[2]
    if hostport.startswith('['):   # an IPv6 literal
        close = hostport.find(']')
        host, port_text = hostport[1:close], hostport[close + 2:] if close > 0 else ''
        if close < 0 or (len(hostport) > close + 1 and hostport[close + 1] != ':'):
            raise WireError('bad host in URL')
    else:
        host, _, port_text = hostport.partition(':')
    if not host:
        raise WireError('no host in URL')
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise WireError('bad port in URL')
        port = int(port_text)
    else:
        port = _DEFAULT_PORTS[scheme]
    target = target.partition('#')[0]
    if not target.startswith('/'):
        target = '/' + target
    if not _VERBATIM_TARGET.fullmatch(target):
        target = _NOT_VISIBLE.sub(_percent_encode, target)
    shown = '[%s]' % host if ':' in host else host
    authority = shown if port == _DEFAULT_PORTS[scheme] else '%s:%d' % (shown, port)
    return Target(Origin(scheme, host.lower(), port), authority, target)


def _percent_encode(match: 're.Match[str]') -> str:
    return ''.join('%%%02X' % octet for octet in match.group().encode('utf-8'))


# -- the byte stream under a connection ----------------------------------------------------------

_StreamClosed = tornado.iostream.StreamClosedError
_Unsatisfiable = tornado.iostream.UnsatisfiableReadError


class Stream(asyncio.Protocol):
    """A socket as an asyncio protocol, read through the part of IOStream's API used here.

    The event loop reads into one buffer as bytes arrive (no reader added and
    removed per read, as an ``IOStream`` does); a read is answered from the
    buffer at once when it can be, else when enough arrives. Reading pauses
    while :data:`MAX_BUFFER` bytes wait unread, and :meth:`write`'s future
    waits while the kernel will not take more: memory stays bounded both ways.
    Closing fails a pending read at once with ``StreamClosedError``, as
    IOStream's ``close()`` does (a timer closes the stream to end a read).
    """

    def __init__(self) -> None:
        self.socket: Optional[socket.socket] = None
        self._transport: Optional[asyncio.Transport] = None
        self._buffer = bytearray()
        self._kind = 0                   # the pending read: 0 none, 1 bytes, 2 until, 3 regex
        self._future: 'Optional[asyncio.Future[bytes]]' = None
        self._size = 0                   # bytes wanted (1), or the most scanned for (2, 3)
        self._delimiter: Any = None      # bytes (2) or a compiled pattern (3)
        self._scanned = 0
        self._closed = False
        self._eof = False
        self._error: Optional[BaseException] = None
        self._reading_paused = False
        self._drained: 'Optional[asyncio.Future[None]]' = None   # writes wait on it
        self._written: 'Optional[asyncio.Future[None]]' = None   # done: the kernel took all

    # -- the protocol, called by the event loop ---------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._transport.set_write_buffer_limits(CHUNK_SIZE, CHUNK_SIZE // 4)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._kind:
            self._satisfy()
        if len(self._buffer) >= MAX_BUFFER and not self._reading_paused and not self._closed:
            self._reading_paused = True
            cast(asyncio.Transport, self._transport).pause_reading()

    def eof_received(self) -> bool:
        self._eof = True
        if self._kind:
            self._fail_read(None)
        return False   # the transport closes itself

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if self._error is None:
            self._error = exc
        self._eof = True
        self._shut()

    def pause_writing(self) -> None:
        if self._drained is None:
            self._drained = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    # -- IOStream's API, as far as this module uses it ---------------------------------------

    def closed(self) -> bool:
        return self._closed

    def at_rest(self) -> bool:
        """Open, nothing received and nothing left to send: fit for the next request."""
        if self._closed or self._eof or self._buffer or self._drained is not None:
            return False
        transport = self._transport
        return transport is not None and not transport.get_write_buffer_size()

    @property
    def buffered(self) -> int:
        """Bytes received and not read yet."""
        return len(self._buffer)

    def write(self, data: bytes) -> 'asyncio.Future[None]':
        """Send ``data``; a future done when the connection can take more."""
        if self._closed:
            raise _StreamClosed(self._error)
        cast(asyncio.Transport, self._transport).write(data)
        if self._drained is not None:
            return self._drained
        written = self._written
        if written is None:
            written = self._written = asyncio.get_running_loop().create_future()
            written.set_result(None)
        return written

    def read_bytes(self, size: int, partial: bool = False) -> 'asyncio.Future[bytes]':
        """Up to ``size`` bytes, as soon as there are any (``partial`` is always True here)."""
        return self._start(1, size, None)

    def read_until(self, delimiter: bytes, max_bytes: int) -> 'asyncio.Future[bytes]':
        """The bytes up to and with ``delimiter``, which must come within ``max_bytes``."""
        return self._start(2, max_bytes, delimiter)

    def read_until_regex(self, pattern: 're.Pattern[bytes]', max_bytes: int
                         ) -> 'asyncio.Future[bytes]':
        """The bytes up to and with the end of the first match of ``pattern``."""
        return self._start(3, max_bytes, pattern)

    def close(self) -> None:
        """Close at once: a pending read fails, unsent bytes are dropped."""
        if not self._closed:
            transport = self._transport
            self._shut()
            if transport is not None:
                transport.abort()   # off the selector now; the socket closed from a callback
            if self.socket is not None:
                self.socket.close()   # now: a loop stopped before the callback leaks none

    def abandon(self) -> None:
        """Close the socket of a stream whose event loop is closed already."""
        self._closed = True
        if self.socket is not None:
            self.socket.close()

    # -- inside ------------------------------------------------------------------------------

    def _start(self, kind: int, size: int, delimiter: Any) -> 'asyncio.Future[bytes]':
        if self._kind:
            raise RuntimeError('a read is pending already')
        future: 'asyncio.Future[bytes]' = asyncio.get_running_loop().create_future()
        self._kind, self._future, self._size, self._delimiter = kind, future, size, delimiter
        self._scanned = 0
        if self._buffer:
            self._satisfy()
        if self._kind and (self._closed or self._eof):
            self._fail_read(None)
        return future

    def _satisfy(self) -> None:
        buffer = self._buffer
        kind = self._kind
        if kind == 1:
            end = min(self._size, len(buffer))
        else:
            start = max(0, self._scanned - 3)
            if kind == 2:
                found = buffer.find(self._delimiter, start)
                end = -1 if found < 0 else found + len(self._delimiter)
            else:
                match = self._delimiter.search(buffer, start)
                end = -1 if match is None else match.end()
            if end < 0 or end > self._size:
                if end > self._size or len(buffer) >= self._size:
                    self._fail_read(_Unsatisfiable('the delimiter is not within %d bytes'
                                                   % (self._size,)))
                    self.close()
                else:
                    self._scanned = len(buffer)
                return
        if end == len(buffer):
            data = bytes(buffer)
            buffer.clear()
        else:
            data = bytes(buffer[:end])
            del buffer[:end]
        future = cast('asyncio.Future[bytes]', self._future)
        self._kind, self._future, self._delimiter = 0, None, None
        if self._reading_paused and len(buffer) < MAX_BUFFER and not self._closed:
            self._reading_paused = False
            cast(asyncio.Transport, self._transport).resume_reading()
        if not future.done():
            future.set_result(data)

    def _fail_read(self, error: Optional[BaseException]) -> None:
        future = self._future
        self._kind, self._future, self._delimiter = 0, None, None
        if future is not None and not future.done():
            future.set_exception(error if error is not None else _StreamClosed(self._error))

    def _shut(self) -> None:
        self._closed = True
        if self._kind:
            self._fail_read(None)
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_exception(_StreamClosed(self._error))
            drained.exception()   # retrieved: a writer that did not wait is not warned


# -- connections ------------------------------------------------------------------------------

class Connection:
    """One connection to an origin, for one exchange at a time."""

    __slots__ = ('origin', 'stream', 'reused', 'idle_since', '__weakref__')

    def __init__(self, origin: Origin, stream: Stream) -> None:
        self.origin = origin
        self.stream = stream
        #: whether it served an exchange before this one
        self.reused = False
        self.idle_since = 0.0

    def closed_by_peer(self) -> bool:
        """Whether the upstream closed it (or sent something unasked) while it was idle."""
        stream = self.stream
        if not stream.at_rest():
            return True
        sock = stream.socket
        try:
            # What the event loop has not read yet: a close (or bytes) just arrived.
            cast(socket.socket, sock).recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False   # nothing to read: still open
        except (OSError, ValueError, AttributeError):
            return True
        return True   # b'' (closed) or bytes nobody asked for: not reusable either way

    def close(self) -> None:
        self.stream.close()

    def __repr__(self) -> str:
        return '<Connection %s://%s:%d%s>' % (self.origin + (
            ' closed' if self.stream.closed() else '',))


async def dial(origin: Origin, timeout: Optional[float]) -> Connection:
    """Open a new connection to ``origin`` (TLS for https), within ``timeout`` seconds."""
    ssl_context = _client_ssl_context() if origin.scheme == 'https' else None
    stream = Stream()
    opening = _open(stream, origin, ssl_context)
    try:
        if timeout is None:
            await opening
        else:
            await asyncio.wait_for(opening, max(0.0, timeout))
    except WireError:
        raise
    except asyncio.TimeoutError:
        raise WireTimeout('no connection within %s s' % (timeout,)) from None
    except (OSError, ssl.SSLError) as exc:
        raise WireError('connection failed: %s' % (_describe(exc),)) from None
    return Connection(origin, stream)


async def _open(stream: Stream, origin: Origin, ssl_context: Optional[ssl.SSLContext]) -> None:
    loop = asyncio.get_running_loop()
    host, port = origin.host, origin.port
    if tornado.netutil.is_valid_ip(host):
        addresses: List[Tuple[int, Any]] = [
            (socket.AF_INET6 if ':' in host else socket.AF_INET, (host, port))]
    else:
        found = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = [(info[0], info[4]) for info in found]
    failure: Optional[BaseException] = None
    for family, address in addresses:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            failure = exc
            continue
        except BaseException:
            sock.close()
            raise
        stream.socket = sock
        try:
            await loop.create_connection(lambda: stream, sock=sock, ssl=ssl_context,
                                         server_hostname=host if ssl_context else None)
        except BaseException:
            sock.close()
            raise
        return
    raise failure if failure is not None else WireError('no address for %s' % (host,))


_ssl_context: Optional[ssl.SSLContext] = None


def _client_ssl_context() -> ssl.SSLContext:
    global _ssl_context
    if _ssl_context is None:
        _ssl_context = ssl.create_default_context()
    return _ssl_context


class ConnectionPool:
    """Idle keep-alive connections per origin, for the IOLoop that made them."""

    def __init__(self, max_idle_per_origin: int = 128, idle_timeout: float = 15.0) -> None:
        #: the most idle connections kept per origin; more are closed
        self.max_idle_per_origin = max_idle_per_origin
        #: seconds an idle connection is kept before it is closed
        self.idle_timeout = idle_timeout
        self._idle: Dict[Origin, List[Connection]] = {}
        self._loop = asyncio.get_running_loop()
        #: connections opened since the pool was made
        self.opened = 0

    def take(self, origin: Origin) -> Optional[Connection]:
        """An idle connection to ``origin`` that is still open, or None."""
        idle = self._idle.get(origin)
        if not idle:
            return None
        oldest_allowed = self._loop.time() - self.idle_timeout
        if idle[0].idle_since < oldest_allowed:   # expired ones sit at the bottom
            while idle and idle[0].idle_since < oldest_allowed:
                idle.pop(0).close()
        while idle:
            connection = idle.pop()   # the most recently used: the least likely closed
            if not connection.closed_by_peer():
                connection.reused = True
                return connection
            connection.close()
        return None

    async def connect(self, origin: Origin, timeout: Optional[float]) -> Connection:
        """A new connection to ``origin``."""
        connection = await dial(origin, timeout)
        self.opened += 1
        return connection

    def give_back(self, connection: Connection) -> None:
        """Keep ``connection`` for the next exchange with its origin (or close it)."""
        stream = connection.stream
        if stream.closed():
            return
        if not stream.at_rest():
            # Bytes after the end of the answer (a body sent with a HEAD or 204, say): what
            # they are is anybody's guess; or a request body still going out, which the
            # upstream answered before it read it: the connection is not used again.
            connection.close()
            return
        idle = self._idle.setdefault(connection.origin, [])
        if len(idle) >= self.max_idle_per_origin:
            connection.close()
            return
        connection.idle_since = self._loop.time()
        idle.append(connection)

    @property
    def idle_count(self) -> int:
        """Idle connections kept now, over every origin."""
        return sum(len(idle) for idle in self._idle.values())

    def abandon(self) -> None:
        """Close the sockets of every idle connection of a loop that is closed already."""
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                connection.stream.abandon()

    def close(self) -> None:
        """Close every idle connection."""
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                connection.close()

    def __repr__(self) -> str:
        return '<ConnectionPool %d idle over %d origins>' % (self.idle_count, len(self._idle))


# One pool per event loop. Not a WeakKeyDictionary: a pool's streams refer to their loop,
# so its key would never die. A closed loop's pool is swept when a new loop asks.
_pools: Dict[asyncio.AbstractEventLoop, ConnectionPool] = {}


def pool() -> ConnectionPool:
    """The connection pool of the running IOLoop (made on first use)."""
    loop = asyncio.get_running_loop()
    found = _pools.get(loop)
    if found is None:
        for closed in [other for other in _pools if other.is_closed()]:
            _pools.pop(closed).abandon()
        found = _pools[loop] = ConnectionPool()
    return found


# -- one exchange ---------------------------------------------------------------------------

class _Deadline:
    """Closes ``stream`` if still waiting after ``seconds``: a pending read then fails."""

    __slots__ = ('stream', 'handle', 'fired')

    def __init__(self, stream: Stream, seconds: Optional[float]) -> None:
        self.stream = stream
        self.fired = False
        self.handle = None if seconds is None else \
            asyncio.get_running_loop().call_later(max(0.0, seconds), self._fire)

    def _fire(self) -> None:
        self.fired = True
        self.stream.close()

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()


def send_request(connection: Connection, method: str, target: str, authority: str,
                 fields: Iterable[Tuple[str, str]], framing: Optional[str],
                 body: Optional[bytes] = None) -> 'asyncio.Future[None]':
    """Write the request head (and ``body``, if whole); the future of the write.

    ``fields`` go out in order as given, after ``Host``. ``framing`` is the
    field that frames the body: ``'Content-Length: N'``, ``'Transfer-Encoding:
    chunked'`` (then write the body with :func:`chunk`) or None for no body.
    """
    block = ''.join(['%s: %s\r\n' % field for field in fields])
    if framing is not None:
        block += framing + '\r\n'
    if not _FIELD_BLOCK.fullmatch(block):
        raise WireError('a request field has a bad name, or a CR, LF or NUL in its value')
    if not _TOKEN.fullmatch(method):
        raise WireError('bad request method')
    try:
        head = ('%s %s HTTP/1.1\r\nHost: %s\r\n%s\r\n'
                % (method, target, authority, block)).encode('latin-1')
    except UnicodeEncodeError:
        raise WireError('a request field has characters outside Latin-1') from None
    if body:
        head += body
    return connection.stream.write(head)


def chunk(data: bytes) -> bytes:
    """``data`` framed as one chunk of a chunked body (the last is ``chunk(b'')``)."""
    if not data:
        return b'0\r\n\r\n'
    return b'%x\r\n%s\r\n' % (len(data), data)


class ResponseHead(NamedTuple):
    """A response head, read strictly."""

    version: int          # 10 or 11
    status: int
    reason: str
    fields: List[Tuple[str, str]]   # in order, repeats kept, obs-folds unfolded


async def read_head(connection: Connection, timeout: Optional[float]) -> ResponseHead:
    """Read the next final (or 101) response head; interim 1xx answers are skipped."""
    stream = connection.stream
    deadline = _Deadline(stream, timeout)
    got_bytes = False
    try:
        while True:
            try:
                data = await stream.read_until_regex(_HEAD_END, max_bytes=MAX_HEAD_SIZE)
            except tornado.iostream.StreamClosedError as exc:
                if deadline.fired:
                    raise WireTimeout('no answer within %s s' % (timeout,)) from None
                if connection.reused and not got_bytes:
                    raise StaleConnection('the kept-alive connection was closed') from None
                raise _closed_error('closed the connection before a full answer', exc) from None
            except tornado.iostream.UnsatisfiableReadError:
                raise WireError('sent a response head over %d bytes' % MAX_HEAD_SIZE) from None
            got_bytes = True
            head = parse_head(data)
            if head.status >= 200 or head.status == 101:
                return head
    finally:
        deadline.cancel()


def parse_head(data: bytes) -> ResponseHead:
    """A response head from its bytes (up to and with the empty line), read strictly.

    RFC 9112 §2.2, §4, §5: a bare CR becomes a space, whitespace before a
    field's colon is removed, an obs-fold becomes one space, and a line that is
    no field makes the whole response malformed.
    """
    text = data.decode('latin-1')
    clean = _CLEAN_HEAD.fullmatch(text)
    if clean is not None:   # CRLF lines, no fold, no bare CR, no space before a colon
        version, status, reason, block = clean.groups()
        pairs = []
        for line in block.split('\r\n')[:-1]:
            name, _, value = line.partition(':')
            pairs.append((name, value.strip(' \t')))
        return ResponseHead(10 if version == '0' else 11, int(status), reason or '', pairs)
    lines = text.split('\n')
    status_line = _line(lines[0])
    match = _STATUS_LINE.fullmatch(status_line)
    if match is None:
        raise WireError('sent a malformed status line: %r' % (status_line[:60],))
    version, status, reason = match.groups()
    fields: List[Tuple[str, str]] = []
    for raw in lines[1:]:
        line = _line(raw)
        if not line:
            continue   # the empty line(s) that end the head
        first = line[0]
        if first == ' ' or first == '\t':   # obs-fold
            if not fields:
                raise WireError('sent a continuation line before any field')
            name, value = fields[-1]
            fields[-1] = (name, (value + ' ' + line.strip(' \t')).strip(' \t'))
            continue
        name, colon, value = line.partition(':')
        name = name.rstrip(' \t')
        if not colon or not _TOKEN.fullmatch(name):
            raise WireError('sent a line that is no field: %r' % (line[:60],))
        fields.append((name, value.strip(' \t')))
    return ResponseHead(10 if version == '0' else 11, int(status), reason or '', fields)


def _line(raw: str) -> str:
    line = raw[:-1] if raw.endswith('\r') else raw
    return line.replace('\r', ' ') if '\r' in line else line


def _closed_error(what: str, exc: tornado.iostream.StreamClosedError) -> WireError:
    real = exc.real_error
    return WireError('%s (%s)' % (what, _describe(real)) if real else what)


def _describe(exc: BaseException) -> str:
    code = exc.errno if isinstance(exc, OSError) else None
    if code is not None and code in errno.errorcode and not str(exc):
        return '%s: %s' % (type(exc).__name__, errno.errorcode[code])
    text = ' '.join(str(exc).split())[:200]
    return '%s: %s' % (type(exc).__name__, text) if text else type(exc).__name__


# -- the response body ------------------------------------------------------------------------

_NONE, _LENGTH, _CHUNKED, _CLOSE = 'none', 'length', 'chunked', 'close'


def body_framing(head: ResponseHead, method: str) -> Tuple[str, int]:
    """How the body of ``head`` is framed (RFC 9112 §6.3), and its length if given."""
    status = head.status
    if method == 'HEAD' or status < 200 or status in (204, 304):
        return _NONE, 0
    encodings = lengths = None
    for name, value in head.fields:
        lower = name.lower()
        if lower == 'transfer-encoding':
            encodings = value if encodings is None else encodings + ',' + value
        elif lower == 'content-length':
            lengths = value if lengths is None else lengths + ',' + value
    if encodings is not None:
        # RFC 9112 §6.1, §6.3: both framings at once may be an attempt at response
        # splitting, and a proxy that guessed would pass it on; so may an empty coding.
        if head.version == 10:
            raise WireError('sent Transfer-Encoding in an HTTP/1.0 response')
        if lengths is not None:
            raise WireError('sent both Transfer-Encoding and Content-Length')
        last = encodings.rpartition(',')[2].strip(' \t').lower()
        if not last:
            raise WireError('sent an empty Transfer-Encoding')
        return (_CHUNKED, -1) if last == 'chunked' else (_CLOSE, -1)
    if lengths is not None:
        values = {value.strip(' \t') for value in lengths.split(',')}
        if len(values) != 1:
            raise WireError('sent conflicting Content-Length values')
        value = values.pop()
        if not value.isdigit() or not value.isascii() or len(value) > 18:
            raise WireError('sent a malformed Content-Length')
        length = int(value)
        return (_LENGTH, length) if length else (_NONE, 0)
    return _CLOSE, -1


class ResponseBody:
    """One response body as it arrives; the connection goes back to its pool at the end.

    :meth:`read` returns the next bytes, ``b''`` at the end, and raises
    :class:`WireError` if the body breaks off or is malformed, or
    :class:`WireTimeout` if nothing arrives within its idle timeout. :meth:`close`
    gives up on the rest (the connection is then closed, not reused).
    """

    def __init__(self, connection: Connection, pool: ConnectionPool, head: ResponseHead,
                 mode: str, length: int) -> None:
        self.connection = connection
        self._pool = pool
        self._mode = mode
        #: the length the head announced, or -1
        self.length = length
        self._left = length          # bytes to come (LENGTH), of the current chunk (CHUNKED)
        self._keep = mode != _CLOSE and head.version == 11 and not any(
            name.lower() == 'connection' and 'close' in value.lower()
            for name, value in head.fields)
        self._buffered: List[bytes] = []   # read ahead, not yet handed out
        self._buffered_size = 0
        self._filler: 'Optional[asyncio.Task[None]]' = None
        self._error: Optional[BaseException] = None
        #: True once the last byte was read (or there was no body)
        self.complete = mode == _NONE
        #: True once the body ended: read to its end, failed or closed
        self.ended = False
        #: bytes handed out so far
        self.received = 0
        if self.complete:
            self._finish()

    # -- reading ahead, before the head goes to the client ---------------------------------

    async def read_ahead(self, limit: int, window: float, timeout: Optional[float]) -> bool:
        """Read up to ``limit`` bytes ahead; True if that was the whole body.

        A body whose announced length fits in ``limit`` is waited for (each read
        within ``timeout``); one of unknown length only for ``window`` seconds,
        so that a stream still reaches its client as it arrives.
        """
        if self.complete:
            return True
        if self._mode == _LENGTH:
            if self.length > limit:
                return False
            while not self.complete:
                data = await self._next(timeout)
                self._buffered.append(data)
                self._buffered_size += len(data)
            return True
        self._filler = asyncio.ensure_future(self._fill(limit, timeout))
        if window > 0:
            await asyncio.wait((self._filler,), timeout=window)
        if self._filler.done():
            self._filler.result()   # raises what broke the body
            self._filler = None
            return self.complete
        return False

    async def _fill(self, limit: int, timeout: Optional[float]) -> None:
        while not self.complete and self._buffered_size < limit:
            data = await self._next(timeout)
            if data:
                self._buffered.append(data)
                self._buffered_size += len(data)

    def take_buffered(self) -> bytes:
        """The bytes read ahead, handed out now (all of the body if :attr:`complete`)."""
        data = b''.join(self._buffered)
        self._buffered = []
        self._buffered_size = 0
        self.received += len(data)
        return data

    # -- streaming --------------------------------------------------------------------------

    async def read(self, idle_timeout: Optional[float]) -> bytes:
        """The next bytes of the body, ``b''`` once it ended."""
        filler = self._filler
        if filler is not None:
            if not filler.done():
                await asyncio.wait((filler,))
            self._filler = None
            filler.result()
        if self._buffered:
            return self.take_buffered()
        if self.complete:
            return b''
        data = await self._next(idle_timeout)
        self.received += len(data)
        return data

    async def _next(self, timeout: Optional[float]) -> bytes:
        if self.ended:
            raise WireError('the body was closed')
        stream = self.connection.stream
        if self._mode == _LENGTH:
            # Most often the bytes are buffered already (they came with the head): then
            # the read is done at once, and needs no timer.
            reading = cast('asyncio.Future[bytes]',
                           stream.read_bytes(min(self._left, CHUNK_SIZE), partial=True))
            if reading.done() and reading.exception() is None:
                data = reading.result()
                self._left -= len(data)
                if not self._left:
                    self._finish()
                return data
        else:
            reading = None
        deadline = _Deadline(stream, timeout)
        try:
            mode = self._mode
            if reading is not None:
                data = await reading
                self._left -= len(data)
                if not self._left:
                    self._finish()
                return data
            if mode == _CHUNKED:
                return await self._next_chunk(stream)
            try:
                return await stream.read_bytes(CHUNK_SIZE, partial=True)
            except tornado.iostream.StreamClosedError:
                if deadline.fired:
                    raise
                self._finish()   # a close-delimited body ends with the connection
                return b''
        except tornado.iostream.StreamClosedError as exc:
            self._fail()
            if deadline.fired:
                raise WireTimeout('sent no more of the body within %s s' % (timeout,)) from None
            raise _closed_error('the body broke off', exc) from None
        except tornado.iostream.UnsatisfiableReadError:
            self._fail()
            raise WireError('sent a malformed chunked body') from None
        except WireError:
            self._fail()
            raise
        finally:
            deadline.cancel()

    async def _next_chunk(self, stream: Stream) -> bytes:
        if self._left <= 0:
            line = await stream.read_until(b'\n', max_bytes=_MAX_LINE)
            match = _CHUNK_SIZE_LINE.fullmatch(line)
            if match is None:
                raise WireError('sent a malformed chunk size line')
            self._left = int(match.group(1), 16)
            if self._left == 0:
                while True:   # trailer fields: not forwarded (RFC 9110 §6.5.1)
                    line = await stream.read_until(b'\n', max_bytes=_MAX_LINE)
                    if line in (b'\r\n', b'\n'):
                        break
                self._finish()
                return b''
        data = await stream.read_bytes(min(self._left, CHUNK_SIZE), partial=True)
        self._left -= len(data)
        if not self._left:
            end = await stream.read_until(b'\n', max_bytes=2)
            if end not in (b'\r\n', b'\n'):
                raise WireError('sent a chunk longer than its size line')
        return data

    def _finish(self) -> None:
        self.complete = True
        if not self.ended:
            self.ended = True
            if self._keep:
                self._pool.give_back(self.connection)
            else:
                self.connection.close()

    def _fail(self) -> None:
        if not self.ended:
            self.ended = True
            self.connection.close()

    def close(self) -> None:
        """Give up on the rest of the body: the connection is closed, not reused."""
        filler = self._filler
        if filler is not None and not filler.done():
            filler.cancel()
        self._filler = None
        self._buffered = []
        self._fail()

    def __repr__(self) -> str:
        return '<ResponseBody %s %d received%s>' % (
            self._mode, self.received, ' complete' if self.complete else '')
