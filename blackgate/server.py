"""Connection hygiene for a gateway's HTTP server: nginx's timeouts and a connection cap.

Tornado's own ``HTTPServer`` waits an hour for a request head and has no limit
on connections, so a few thousand slow or idle clients can use up a process's
file descriptors. :class:`GatewayServer` is an ``HTTPServer`` with nginx's
defaults, for anyone who mounts :class:`~blackgate.HTTPProxy` in an
application of their own::

    from blackgate.server import listen

    app = tornado.web.Application([(r'/api/(.*)', HTTPProxy, dict(command=APIService))])
    server = listen(app, 8080, '127.0.0.1')              # nginx's defaults
    server = listen(app, 8080, client_header_timeout=10)  # or your own

- ``client_header_timeout`` (60 s): receiving the first request head of a
  connection, from the moment it is accepted;
- ``client_body_timeout`` (60 s): the silence between two reads of a request
  body (not the whole body, as in nginx);
- ``keepalive_timeout`` (75 s): an idle kept-alive connection, until its next
  request head is complete; 0 turns keep-alive off;
- ``max_connections`` (1024): open client connections per process; one more
  is answered ``503`` and closed, and logged once per interval;
- ``max_header_size`` (65536): bytes of a request head (Tornado's own setting).

A connection that runs out of time is closed without an answer. Where Tornado
itself would answer before any handler runs, the client gets the gateway's
short JSON error instead: a request head over ``max_header_size`` (which
Tornado closes without a word) is answered ``431``, a ``Content-Length`` over
the server's ``max_body_size`` ``413``, and any other malformed request ``400``
(Tornado sends a bare ``400`` with no body). A request
whose body stalls never reaches its command, so no upstream is called and no
failure is counted against it: a slow client is the client's fault.

.. warning::

   A :class:`GatewayServer` runs on its IOLoop's thread, like any Tornado
   server; :meth:`GatewayServer.apply_settings` and :meth:`GatewayServer.drain`
   must be called from that thread too.
"""
import copy
import dataclasses
import logging
import math
import sys
import time
from typing import Any, Dict, List, Mapping, Optional, Tuple

import tornado.httpserver
import tornado.httputil
import tornado.ioloop
import tornado.iostream
import tornado.netutil

from .errors import ConfigError

__all__ = ('GatewayServer', 'ServerSettings', 'listen', 'check_server_settings',
           'SERVER_SETTINGS')

log = logging.getLogger('blackgate')

#: Seconds to receive a connection's first request head (nginx ``client_header_timeout``).
DEFAULT_CLIENT_HEADER_TIMEOUT = 60.0
#: Seconds of silence allowed between two reads of a request body (nginx ``client_body_timeout``).
DEFAULT_CLIENT_BODY_TIMEOUT = 60.0
#: Seconds an idle kept-alive connection stays open (nginx ``keepalive_timeout``).
DEFAULT_KEEPALIVE_TIMEOUT = 75.0
#: Open client connections per process (nginx's ``worker_connections`` is per worker too).
DEFAULT_MAX_CONNECTIONS = 1024
#: Bytes of a request head: Tornado's default.
DEFAULT_MAX_HEADER_SIZE = 65536
#: Seconds between two log records about refused connections.
REFUSAL_LOG_INTERVAL = 10.0

_REFUSAL = (b'HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n'
            b'Retry-After: 1\r\nConnection: close\r\nX-Blackgate-Error: too-many-connections\r\n'
            b'Content-Length: 33\r\n\r\n{"error": "too many connections"}')




def _json_answer(status: str, marker: str, error: str) -> bytes:
    body = ('{"error": "%s", "command_key": null, "failure_type": null}' % (error,)).encode()
    return (('HTTP/1.1 %s\r\nContent-Type: application/json\r\nCache-Control: no-store\r\n'
             'X-Blackgate-Error: %s\r\nConnection: close\r\nContent-Length: %d\r\n\r\n'
             % (status, marker, len(body))).encode('ascii') + body)


# What Tornado's HTTP1Connection writes for any malformed request, and what goes instead.
_TORNADO_400 = b'HTTP/1.1 400 Bad Request\r\n\r\n'
_BAD_REQUEST = _json_answer('400 Bad Request', 'bad-request', 'bad request')
_BODY_TOO_LARGE = _json_answer('413 Content Too Large', 'body-too-large', 'request body too large')
_HEAD_TOO_LARGE = _json_answer('431 Request Header Fields Too Large', 'head-too-large',
                               'request head too large')


class _Answering:
    """Mixed into a client connection's IOStream: JSON where Tornado answers nothing or bare.

    Tornado closes a connection whose request head outgrows ``max_header_size``
    (the read fails with ``UnsatisfiableReadError``) and writes a bare 400 for a
    malformed request, both before any handler runs: only the stream sees them.
    """

    #: True from the start of each request until its head has been parsed
    reading_head = True
    #: the head announced a Content-Length over the server's body limit
    body_too_large = False
    #: the current request's answer has begun (bytes after it are never Tornado's 400)
    responding = False

    def write(self, data: Any, *args: Any, **kwargs: Any) -> Any:
        if not self.responding:
            if len(data) == len(_TORNADO_400) and data == _TORNADO_400:
                data = _BODY_TOO_LARGE if self.body_too_large else _BAD_REQUEST
            if not (isinstance(data, bytes) and data.startswith(b'HTTP/1.1 100 ')):
                self.responding = True   # an interim 100 Continue is not the answer
        return super().write(data, *args, **kwargs)  # type: ignore[misc]

    def close(self, exc_info: Any = False) -> None:
        error = exc_info
        if error is True:
            error = sys.exc_info()[1]
        elif isinstance(error, tuple):
            error = error[1]
        if isinstance(error, tornado.iostream.UnsatisfiableReadError) and self.reading_head \
                and not self.closed():  # type: ignore[attr-defined]
            try:
                super().write(_HEAD_TOO_LARGE)  # type: ignore[misc]
            except tornado.iostream.StreamClosedError:
                pass
        super().close(exc_info)  # type: ignore[misc]


class _GatewayStream(_Answering, tornado.iostream.IOStream):
    pass


class _GatewaySSLStream(_Answering, tornado.iostream.SSLIOStream):
    pass


_ANSWERING = {tornado.iostream.IOStream: _GatewayStream,
              tornado.iostream.SSLIOStream: _GatewaySSLStream}


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """The validated connection-hygiene settings of a :class:`GatewayServer`."""

    client_header_timeout: float = DEFAULT_CLIENT_HEADER_TIMEOUT
    client_body_timeout: float = DEFAULT_CLIENT_BODY_TIMEOUT
    keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_header_size: int = DEFAULT_MAX_HEADER_SIZE


def _seconds(low_open: bool):
    if low_open:
        return (lambda v: _is_number(v) and 0 < v <= 1_000_000,
                'a number of seconds greater than 0 and at most 1000000')
    return (lambda v: _is_number(v) and 0 <= v <= 1_000_000,
            'a number of seconds from 0 to 1000000 (0 turns keep-alive off)')


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _whole(low: int, high: int):
    return (lambda v: isinstance(v, int) and not isinstance(v, bool) and low <= v <= high,
            'a whole number from %d to %d' % (low, high))


#: Each setting's check and what it allows, for messages in the library's style.
SERVER_SETTINGS: Dict[str, Tuple[Any, str]] = {
    'client_header_timeout': _seconds(low_open=True),
    'client_body_timeout': _seconds(low_open=True),
    'keepalive_timeout': _seconds(low_open=False),
    'max_connections': _whole(1, 1_000_000),
    'max_header_size': _whole(1024, 64 * 1024 * 1024),
}


def check_server_settings(owner: str, values: Mapping[str, Any]) -> ServerSettings:
    """Validate connection-hygiene settings; :class:`~blackgate.ConfigError` names the bad one."""
    for key, value in values.items():
        rule = SERVER_SETTINGS.get(key)
        if rule is None:
            raise ConfigError('%s: unknown setting %r; allowed: %s'
                              % (owner, key, ', '.join(SERVER_SETTINGS)))
        accepts, expected = rule
        if not accepts(value):
            raise ConfigError('%s: %s=%r is not allowed; expected %s'
                              % (owner, key, value, expected))
    return ServerSettings(**values)


class GatewayServer(tornado.httpserver.HTTPServer):
    """An ``HTTPServer`` that closes slow and idle clients and caps its connections.

    Takes Tornado's ``HTTPServer`` arguments, and the settings of
    :class:`ServerSettings` as keywords (nginx's defaults). Tornado's
    ``idle_connection_timeout`` and ``body_timeout`` are replaced by them.
    """

    def initialize(self, request_callback: Any, **kwargs: Any) -> None:  # type: ignore[override]
        for name in ('idle_connection_timeout', 'body_timeout'):
            if name in kwargs:
                raise TypeError('GatewayServer replaces Tornado\'s %s: use client_header_timeout, '
                                'client_body_timeout and keepalive_timeout' % (name,))
        own = {key: kwargs.pop(key) for key in list(kwargs) if key in SERVER_SETTINGS}
        settings = check_server_settings('GatewayServer', own)
        self._no_keep_alive = bool(kwargs.get('no_keep_alive'))
        super().initialize(request_callback, max_header_size=settings.max_header_size,
                           idle_connection_timeout=settings.client_header_timeout, **kwargs)
        self.settings = settings
        self._open: Dict[Any, '_Watch'] = {}   # server connection -> its current request
        self._draining = False
        self._refused = 0
        self._refusal_logged_at: Optional[float] = None
        self._apply(settings)
        #: The ``(host, port)`` of every socket :meth:`add_sockets` was given.
        self.bound_addresses: List[Tuple[str, int]] = []

    # -- settings ---------------------------------------------------------------------------

    def _apply(self, settings: ServerSettings) -> None:
        self.conn_params.header_timeout = settings.client_header_timeout
        self.conn_params.max_header_size = settings.max_header_size
        # After its first request a connection waits for the next head under this one.
        keepalive = copy.copy(self.conn_params)
        keepalive.header_timeout = settings.keepalive_timeout or None
        keepalive.no_keep_alive = self._no_keep_alive or settings.keepalive_timeout == 0
        self.conn_params.no_keep_alive = keepalive.no_keep_alive
        self._keepalive_params = keepalive

    def apply_settings(self, settings: ServerSettings) -> None:
        """Use new settings from now on: for new connections and the next request of others."""
        self.settings = settings
        self._apply(settings)

    @property
    def connection_count(self) -> int:
        """Client connections open now."""
        return len(self._open)

    # -- Tornado's hooks --------------------------------------------------------------------

    def add_sockets(self, sockets: Any) -> None:
        sockets = list(sockets)
        super().add_sockets(sockets)
        self.bound_addresses.extend(sock.getsockname()[:2] for sock in sockets)

    def handle_stream(self, stream: tornado.iostream.IOStream, address: tuple) -> None:
        if self._draining or len(self._open) >= self.settings.max_connections:
            self._refuse(stream, address)
            return
        answering = _ANSWERING.get(type(stream))
        if answering is not None:
            # The same object, given the overrides of _Answering (which add no state of
            # their own to its layout): TCPServer made it before this hook runs.
            stream.__class__ = answering
        super().handle_stream(stream, address)

    def start_request(self, server_conn: object,
                      request_conn: tornado.httputil.HTTPConnection
                      ) -> tornado.httputil.HTTPMessageDelegate:
        delegate = super().start_request(server_conn, request_conn)
        stream = getattr(request_conn, 'stream', None)
        if isinstance(stream, _Answering):
            stream.reading_head = True
            stream.body_too_large = False
            stream.responding = False
        watch = _Watch(delegate, request_conn, self.settings.client_body_timeout,
                       stream if isinstance(stream, _Answering) else None,
                       self.conn_params.max_body_size)
        self._open[server_conn] = watch
        # The connection's next request waits for its head under the keep-alive timeout.
        server_conn.params = self._keepalive_params   # type: ignore[attr-defined]
        if self._draining:
            # A response just ended on a kept-alive connection: no next request now.
            tornado.ioloop.IOLoop.current().add_callback(request_conn.close)  # type: ignore
        return watch

    def on_close(self, server_conn: object) -> None:
        watch = self._open.pop(server_conn, None)
        if watch is not None:
            watch.cancel()
        super().on_close(server_conn)

    # -- refusing and draining --------------------------------------------------------------

    def _refuse(self, stream: tornado.iostream.IOStream, address: tuple) -> None:
        self._refused += 1
        now = time.monotonic()
        if self._refusal_logged_at is None or now - self._refusal_logged_at >= \
                REFUSAL_LOG_INTERVAL:
            log.warning('%s: refused %d connection(s): max_connections=%d are open',
                        'draining' if self._draining else 'gateway', self._refused,
                        self.settings.max_connections)
            self._refusal_logged_at = now
            self._refused = 0
        try:
            stream.write(_REFUSAL).add_done_callback(lambda future: stream.close())
        except tornado.iostream.StreamClosedError:
            stream.close()

    def drain(self, close_paths: Tuple[str, ...] = ()) -> None:
        """Stop accepting; close idle connections now, busy ones when their response ends.

        ``close_paths``: requests for paths starting with one of these (endless
        streams) are closed now too.
        """
        self._draining = True
        self.stop()
        for watch in list(self._open.values()):
            if watch.idle or (close_paths and watch.path.startswith(close_paths)):
                watch.request_conn.close()   # type: ignore[attr-defined]

    @property
    def busy_count(self) -> int:
        """Connections with a request in progress."""
        return sum(1 for watch in self._open.values() if not watch.idle)


class _Watch(tornado.httputil.HTTPMessageDelegate):
    """Wraps one request's delegate: notes when it starts, times the body's silences."""

    __slots__ = ('delegate', 'request_conn', 'idle', 'path', '_timeout', '_last', '_timer',
                 '_stream', '_body_limit')

    def __init__(self, delegate: tornado.httputil.HTTPMessageDelegate,
                 request_conn: tornado.httputil.HTTPConnection, body_timeout: float,
                 stream: Optional[_Answering] = None,
                 body_limit: Optional[int] = None) -> None:
        self.delegate = delegate
        self.request_conn = request_conn
        self._stream = stream
        self._body_limit = body_limit
        self.idle = True   # until the head is in
        self.path = ''
        self._timeout = body_timeout
        self._last = 0.0
        self._timer: Optional[object] = None

    def headers_received(self, start_line: Any, headers: tornado.httputil.HTTPHeaders) -> Any:
        self.idle = False
        self.path = getattr(start_line, 'path', '')
        stream = self._stream
        if stream is not None:
            stream.reading_head = False
            length = headers.get('Content-Length', '')
            limit = self._body_limit
            if limit is None:
                limit = getattr(stream, 'max_buffer_size', None)
            stream.body_too_large = bool(limit is not None and length.isdigit()
                                         and int(length) > limit)
        if headers.get('Content-Length', '0') not in ('', '0') or \
                'chunked' in headers.get('Transfer-Encoding', '').lower():
            loop = tornado.ioloop.IOLoop.current()
            self._last = loop.time()
            self._timer = loop.call_later(self._timeout, self._check)
        return self.delegate.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Any:
        if self._timer is not None:
            self._last = tornado.ioloop.IOLoop.current().time()
        return self.delegate.data_received(chunk)

    def finish(self) -> None:
        self.cancel()
        self.delegate.finish()

    def on_connection_close(self) -> None:
        self.cancel()
        self.delegate.on_connection_close()

    def cancel(self) -> None:
        if self._timer is not None:
            tornado.ioloop.IOLoop.current().remove_timeout(self._timer)
            self._timer = None

    def _check(self) -> None:
        # One timer per body, moved on lazily: no timer work for each chunk.
        loop = tornado.ioloop.IOLoop.current()
        silent = loop.time() - self._last
        if silent < self._timeout:
            self._timer = loop.call_later(self._timeout - silent, self._check)
            return
        self._timer = None
        log.info('closed a client connection: no request body byte for %g s '
                 '(client_body_timeout)', self._timeout)
        self.request_conn.close()   # type: ignore[attr-defined]


def listen(app: Any, port: int, address: Optional[str] = None, **settings: Any
           ) -> GatewayServer:
    """Serve ``app`` on ``address:port`` with a :class:`GatewayServer` (nginx's defaults).

    ``settings``: those of :class:`ServerSettings` and Tornado's ``HTTPServer``
    arguments. Port 0 picks a free port: read it from ``server.bound_addresses``.
    """
    server = GatewayServer(app, **settings)
    server.add_sockets(tornado.netutil.bind_sockets(port, address))
    return server
