"""HTTPProxy: an API gateway whose every upstream call is a command.

:class:`HTTPProxy` is a Tornado request handler. For each request it builds a
``request`` dict, runs ``command(request).queue()`` (an
:class:`HTTPProxyCommand` subclass: breaker, bulkhead, timeout, fallback) and
writes the answer back::

    class APIService(HTTPProxyCommand):
        group_key = 'api.v1'
        command_key = 'proxy_v1_traffic'

        def before_request(self):
            path = self.request['path'].replace('/api', '')
            self.request['url'] = 'http://intra.service.com' + path

    app = tornado.web.Application([(r'/api/v1/(.*)', HTTPProxy, dict(command=APIService))])

The handler does what a careful reverse proxy does (RFC 9110 and 9112): it
drops hop-by-hop fields both ways, adds ``X-Forwarded-*`` and ``Via``, sends
the path and query byte for byte, passes the response's status, fields and
body bytes through unchanged, and answers failures with 502, 503 or 504.

Bodies stream both ways with flow control (:mod:`blackgate.transport` carries
them, on the IOLoop): memory per exchange is bounded by a chunk, not by the
body. A small body that arrives whole at once is sent whole, with its length.

.. warning::

   Everything here runs on the IOLoop thread: the handler, the command's
   ``run()`` (an ``async def``: no worker thread), and so ``before_request()``,
   ``after_response()`` and ``fallback()``. Keep those hooks quick and never
   block in them.
"""
import asyncio
import functools
import json
import logging
import math
import re
import urllib.parse
from typing import (Any, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Union,
                    cast)

import tornado.httputil
import tornado.iostream
import tornado.web

from . import tracing, transport
from .command import Command, DeferredOutcome
from .errors import BadRequest, BlackgateError, CommandError, ConfigError
from .events import Event, FailureType
from .registry import component
from .transport import WireError, WireTimeout

log = logging.getLogger('blackgate')

try:
    from urllib3 import HTTPHeaderDict
except ImportError:  # urllib3 1.26
    from urllib3._collections import HTTPHeaderDict

__all__ = ('HTTPProxy', 'HTTPProxyCommand', 'GatewayNotFound', 'UpstreamBody',
           'UpstreamError', 'UpstreamTimeout', 'UpstreamServerError', 'ClientGone',
           'ProxyMisconfigured')

#: Fields that describe one connection, not the message (RFC 9110 §7.6.1), and the
#: proxy credentials meant for this hop only. Dropped both ways, with every field
#: that a ``Connection`` field names.
HOP_BY_HOP = ('Connection', 'Keep-Alive', 'Proxy-Connection', 'TE', 'Trailer',
              'Transfer-Encoding', 'Upgrade', 'Proxy-Authorization', 'Proxy-Authenticate')

#: A body up to this size that arrives whole at once is sent whole, with its length.
BUFFER_SIZE = transport.CHUNK_SIZE

_BODY_METHODS = frozenset(('POST', 'PUT', 'PATCH'))
_NO_BODY_STATUS = frozenset((204, 304))
_REJECTED = frozenset((FailureType.SHORTCIRCUIT, FailureType.REJECTED_THREAD_EXECUTION,
                       FailureType.REJECTED_SEMAPHORE_EXECUTION,
                       FailureType.REJECTED_SEMAPHORE_FALLBACK))
_ABSOLUTE_FORM = re.compile(r'[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*')
_NOT_ASCII = re.compile(r'[^\x00-\x7f]')
_UNSAFE_IN_FIELD = re.compile(r'[\r\n\x00]')
_UNLIMITED = 1 << 62


def _normalize(name: str) -> str:
    """``Http-Header-Case``, as Tornado spells the names of the fields it received."""
    return '-'.join([word.capitalize() for word in name.split('-')])


# What the request pass does with a field, by Tornado's normalized name; the rest are kept.
_DROP, _FORWARDED_FOR = 'drop', 'forwarded-for'
_REQUEST_FIELDS = {_normalize(name): _DROP
                   for name in HOP_BY_HOP + ('Host', 'Expect', 'Content-Length')}
_REQUEST_FIELDS['X-Forwarded-For'] = _FORWARDED_FOR
# Fields only a trusted peer may set; an edge gateway drops what the client sent.
_UNTRUSTED_FIELDS = frozenset(('Forwarded', 'X-Real-Ip'))
# Fields of the request dict that the transport writes itself, from the body's framing.
_FRAMING_FIELDS = frozenset(('content-length', 'transfer-encoding', 'host'))

# What the response pass does with a field, by lower-case name; the rest are kept.
_CONNECTION, _LENGTH, _DATE = 'connection', 'length', 'date'
_RESPONSE_FIELDS = {name.lower(): _DROP for name in HOP_BY_HOP}
_RESPONSE_FIELDS.update({'connection': _CONNECTION, 'content-length': _LENGTH,
                         'date': _DATE})
# What a 101 answer to a WebSocket handshake keeps of the hop-by-hop fields.
_UPGRADE_FIELDS = frozenset(('connection', 'upgrade'))


class UpstreamError(BlackgateError):
    """The upstream could not be reached, or its answer was malformed or truncated.

    The cause of a ``FAILURE`` of :class:`HTTPProxyCommand`; :class:`HTTPProxy`
    answers 502.
    """

    #: Logged on one line: the message tells all, and the stack is Blackgate's own.
    log_traceback = False


class UpstreamTimeout(UpstreamError, TimeoutError):
    """The upstream did not connect or answer within the command's ``timeout``; 504."""


class UpstreamServerError(UpstreamError):
    """The upstream answered with a 5xx status: a failure for the circuit breaker.

    With no fallback, :class:`HTTPProxy` sends this response to the client as it is.
    """

    def __init__(self, response: Dict[str, Any]) -> None:
        #: the upstream's response dict, as :attr:`HTTPProxyCommand.response`
        self.response = response
        super().__init__('upstream answered %s %s'
                         % (response.get('status_code'), response.get('reason') or ''))


class ClientGone(BadRequest):
    """The client went away (or stalled) while its request body was being forwarded.

    A :class:`~blackgate.BadRequest`: the client's doing, not the upstream's, so
    it is not counted against the breaker and runs no fallback.
    """


class ProxyMisconfigured(BadRequest):
    """The gateway's own code is wrong (a ``before_request()`` that set no URL): 500.

    Not the upstream's fault, so not counted against its breaker, and no fallback
    runs; :class:`HTTPProxy` answers 500 and logs it on one line.
    """


class UpstreamBody:
    """The body of an upstream response, still arriving: ``response['body']``.

    :class:`HTTPProxy` reads it with :meth:`read` and sends each part to the
    client as it comes; the command's outcome is counted when it ends (a body
    that breaks off or goes idle past ``body_idle_timeout`` is a ``FAILURE``).
    """

    __slots__ = ('_body', '_host', '_outcome', 'idle_timeout')

    def __init__(self, body: transport.ResponseBody, host: str,
                 idle_timeout: Optional[float]) -> None:
        self._body = body
        self._host = host
        self._outcome: Optional[DeferredOutcome] = None
        #: seconds :meth:`read` waits for more before the body counts as broken off
        self.idle_timeout = idle_timeout

    @property
    def complete(self) -> bool:
        """Whether every byte of the body has been read from the upstream."""
        return self._body.complete

    @property
    def length(self) -> Optional[int]:
        """The ``Content-Length`` the upstream announced, or None."""
        length = self._body.length
        return None if length < 0 else length

    def take_buffered(self) -> bytes:
        """The bytes already read ahead, handed out now."""
        data = self._body.take_buffered()
        if self._body.complete:
            self._settle(None)
        return data

    async def read(self) -> bytes:
        """The next bytes; ``b''`` at the end. Raises :class:`UpstreamError` if it breaks off."""
        try:
            data = await self._body.read(self.idle_timeout)
        except WireError as exc:
            error: UpstreamError
            if isinstance(exc, WireTimeout):
                error = UpstreamTimeout('%s %s' % (self._host, exc))
            else:
                error = UpstreamError('the response of %s broke off: %s' % (self._host, exc))
            self._settle(error)
            raise error from None
        if not data or self._body.complete:
            self._settle(None)
        return data

    def close(self) -> None:
        """Give up on the rest (the client left, or the body is not wanted): not a failure."""
        self._body.close()
        self._settle(None)

    def _settle(self, error: Optional[BaseException]) -> None:
        outcome = self._outcome
        if outcome is not None:
            self._outcome = None
            if error is None:
                outcome.success()
            else:
                outcome.failure(error)

    def __repr__(self) -> str:
        return '<UpstreamBody %r>' % (self._body,)


class HTTPProxyCommand(Command):
    """A command that forwards one HTTP request to an upstream and returns its response.

    Subclass it, set ``group_key`` and ``command_key``, and write
    :meth:`before_request` to choose the upstream URL. ``run()`` sends exactly
    one request on a kept-alive connection of the IOLoop's transport, following
    no redirect, and returns :attr:`response`. An upstream 5xx is raised as
    :class:`UpstreamServerError`, so it counts as a failure and runs the fallback.

    Each exchange takes a slot of the group's executor pool (``max_workers +
    max_queue_size`` exchanges at once for the group; beyond them 503) but no
    thread. ``timeout`` bounds connecting and the response head; the time a
    request body spends streaming upstream counts only while the upstream is the
    one being waited for.
    """

    group_admission = True
    #: A full bulkhead means the gateway's own callers outnumber its slots, not that
    #: the upstream is sick: rejections are counted and answered 503, but they do not
    #: open the breaker (resilience4j and Envoy do the same). Set True for Hystrix's rule.
    circuit_breaker_count_rejections = False

    #: True: read the whole request and response bodies into memory, as
    #: ``request['data']`` and ``response['content']`` (bytes), for hooks that read or
    #: rewrite them (bounded by ``HTTPProxy.max_body_size`` and
    #: :attr:`max_response_body_size`). False: bodies stream through.
    buffer_body: bool = False
    #: Seconds a streaming response body may go without sending anything before it
    #: counts as broken off (a ``FAILURE``; the client's connection is closed). None:
    #: the command's ``timeout``, except for a ``text/event-stream``, which may stay
    #: silent as long as it likes. ``math.inf``: never.
    body_idle_timeout: Optional[float] = None
    #: Largest response body read into memory with ``buffer_body``; beyond it 502.
    max_response_body_size: Optional[int] = 10 * 1024 * 1024
    #: Seconds a response body of unknown length may take to end (within
    #: :data:`BUFFER_SIZE` bytes) and still be sent whole, with its length; a slower
    #: or longer one streams. An event stream never waits.
    body_buffer_window: float = 0.05

    # Set by HTTPProxy when it expects a refusal (the breaker is open) and so has not
    # built the request dict: run() builds it, should the command be let through after all.
    _proxy_build_request: Optional[Any] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _check_proxy_settings(cls)

    def __init__(self, request: Dict[str, Any]) -> None:
        #: What :class:`HTTPProxy` built from the client's request: ``method``,
        #: ``path`` and ``query`` (raw, as received), ``params`` (``{name: [values]}``),
        #: ``headers`` (a case-insensitive ``urllib3.HTTPHeaderDict`` that keeps repeated
        #: fields; ``add()`` appends, ``[name] =`` replaces), ``data`` (the body as bytes,
        #: or None while it streams), ``remote_ip``, and ``url`` (None until
        #: :meth:`before_request` sets it).
        self.request = request
        #: The upstream's answer once ``run()`` has it: ``status_code``, ``reason``,
        #: ``headers`` (a list of ``(name, value)`` pairs, repeated fields kept),
        #: ``content`` (the body bytes with ``buffer_body``, else None) and ``body``
        #: (an :class:`UpstreamBody` while the body streams, else None).
        self.response: Optional[Dict[str, Any]] = None

    def before_request(self) -> None:
        """Set ``self.request['url']`` to the upstream URL; change the request if needed.

        Build the URL from a fixed base and the path, as in
        ``'http://users.internal' + self.request['path']``: the host is then yours
        whatever the client sent. When the URL has no query, the client's raw query
        is appended. Raise :class:`~blackgate.BadRequest` to answer 400.
        """

    def after_response(self) -> None:
        """Inspect or change ``self.response`` before it is returned (or judged a 5xx).

        With a streaming body, setting ``content`` to bytes sends those instead.
        """

    async def run(self) -> Dict[str, Any]:
        """``before_request()``, one upstream exchange, ``after_response()``; the response."""
        if self.request is None and self._proxy_build_request is not None:
            request = self._proxy_build_request()
            if request is None:   # the handler has answered 400 already
                raise BadRequest('the request target was refused')
            self.request = request
        self.before_request()
        request = self.request
        url = request.get('url')
        if not url:
            raise ProxyMisconfigured("%s.before_request() must set self.request['url'] to "
                                     "the upstream URL" % (type(self).__name__,))
        query = request.get('query')
        if query and '?' not in url:
            url += '?' + query
        try:
            where = transport.parse_url(url)
        except WireError as exc:
            raise UpstreamError('cannot send to the URL that before_request() set: %s'
                                % (exc,)) from None
        host = where.authority
        exchange = _Exchange(self, request, where)
        try:
            try:
                head = await exchange.send()
            finally:
                exchange.end_request()
            response = await exchange.receive(head)
        except BaseException as exc:
            exchange.abandon()
            if isinstance(exc, WireTimeout):
                raise UpstreamTimeout('%s %s' % (host, exc)) from None
            if isinstance(exc, WireError):
                raise UpstreamError('%s: %s' % (host, exc)) from None
            raise
        self.response = response
        body: Any = response['body']
        try:
            self.after_response()
            response = cast(Dict[str, Any], self.response)
            if response['status_code'] >= 500:
                raise UpstreamServerError(response)   # its body is the handler's to close
        except UpstreamServerError:
            raise
        except BaseException:
            if body is not None:
                body.close()
            raise
        streaming = body if isinstance(body, UpstreamBody) else None
        if streaming is not None:
            replaced = response.get('body') is not body or response.get('content') is not None
            if replaced:
                streaming.close()   # after_response() replaced it
            elif not streaming.complete:
                streaming._outcome = self.defer_outcome()   # counted when the body ends
        return response


def _check_proxy_settings(cls: Any) -> None:
    """The proxy's own class attributes, checked at class definition."""
    name = cls.__qualname__
    if not isinstance(cls.buffer_body, bool):
        raise BlackgateError('%s.buffer_body=%r: expected True or False'
                             % (name, cls.buffer_body))
    for attribute in ('body_idle_timeout', 'max_response_body_size'):
        value = getattr(cls, attribute)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not value > 0):
            raise BlackgateError('%s.%s=%r: expected a number above 0, or None'
                                 % (name, attribute, value))
    window = cls.body_buffer_window
    if isinstance(window, bool) or not isinstance(window, (int, float)) or \
            not 0 <= window < math.inf:
        raise BlackgateError('%s.body_buffer_window=%r: expected seconds, 0 or more'
                             % (name, window))


class _Exchange:
    """One request and its response head over the transport, for HTTPProxyCommand.run()."""

    __slots__ = ('command', 'request', 'where', 'pool', 'connection', 'timeout', 'upgrade')

    def __init__(self, command: HTTPProxyCommand, request: Dict[str, Any],
                 where: transport.Target) -> None:
        self.command = command
        self.request = request
        self.where = where
        self.pool = transport.pool()
        self.connection: Optional[transport.Connection] = None
        self.timeout = command.resolved_timeout   # the armed timer's, not a fresh lookup
        self.upgrade = request.get('upgrade')

    async def send(self) -> transport.ResponseHead:
        request = self.request
        method = request['method']
        headers = request.get('headers')
        authority = self.where.authority
        if component.tracer is not None and isinstance(headers, HTTPHeaderDict):
            tracing.inject(headers)   # the upstream's spans join this command's trace
        fields: List[Tuple[str, str]] = []
        for name, value in _fields(headers):
            lower = name.lower()
            if lower in _FRAMING_FIELDS:
                if lower == 'host':
                    authority = str(value)   # before_request() chose the Host: its own
                continue
            fields.append((name, str(value)))
        if self.upgrade:
            fields.append(('Connection', 'Upgrade'))
            fields.append(('Upgrade', self.upgrade))
        streamed = request.get('body') if request.get('data') is None else None
        if not isinstance(streamed, _RequestBody):
            streamed = None
        data = request.get('data') or None
        if isinstance(data, str):
            data = data.encode('utf-8')
        elif data is not None and not isinstance(data, bytes):
            data = bytes(data)
        framing: Optional[str]
        chunked = False
        if streamed is not None:
            length = streamed.length
            chunked = length is None
            framing = ('Transfer-Encoding: chunked' if length is None
                       else 'Content-Length: %d' % length)
        elif data is not None:
            framing = 'Content-Length: %d' % len(data)
        elif method in _BODY_METHODS:
            framing = 'Content-Length: 0'
        else:
            framing = None
        origin, target = self.where.origin, self.where.target
        # A request whose body is not streaming can be sent again on a new connection if a
        # kept-alive one turns out closed: it never reached the upstream's application.
        for attempt in (1, 2):
            connection = self.pool.take(origin) if attempt == 1 else None
            if connection is None:
                connection = await self.pool.connect(origin, self.timeout)
            self.connection = connection
            transport.send_request(connection, method, target, authority, fields, framing, data)
            if streamed is not None:
                await streamed.pump(self.command, connection, chunked)
            try:
                return await transport.read_head(connection, self.timeout)
            except transport.StaleConnection:
                connection.close()
                if streamed is not None or attempt == 2:
                    raise
        raise AssertionError('unreachable')

    def end_request(self) -> None:
        """The request is sent (or failed): whatever else the client sends is dropped."""
        sent = self.request.get('body')
        if isinstance(sent, _RequestBody):
            sent.detach()

    async def receive(self, head: transport.ResponseHead) -> Dict[str, Any]:
        command = self.command
        connection = self.connection
        assert connection is not None   # send() returned a head read from it
        method = self.request['method']
        status = head.status
        if status == 101:
            if not self.upgrade:
                connection.close()
                raise WireError('switched protocols (101) though no upgrade was asked for')
            body: Any = _Tunnel(connection)
            return {'status_code': 101, 'reason': head.reason, 'headers': head.fields,
                    'content': None, 'body': body}
        mode, length = transport.body_framing(head, method)
        raw = transport.ResponseBody(connection, self.pool, head, mode, length)
        self.connection = None   # the body owns it now
        if command.buffer_body:
            limit = command.max_response_body_size
            if limit is not None and length > limit:
                raw.close()
                raise WireError('sent a body of %d bytes; max_response_body_size is %d'
                                % (length, limit))
            parts, size = [], 0
            while True:
                data = await raw.read(self.timeout)
                if not data:
                    break
                size += len(data)
                if limit is not None and size > limit:
                    raw.close()
                    raise WireError('sent a body over max_response_body_size (%d bytes)'
                                    % (limit,))
                parts.append(data)
            return {'status_code': status, 'reason': head.reason, 'headers': head.fields,
                    'content': b''.join(parts), 'body': None}
        event_stream = _is_event_stream(head.fields)
        idle = command.body_idle_timeout
        if idle is None:
            idle = None if event_stream else self.timeout
        elif idle == math.inf:
            idle = None
        body = UpstreamBody(raw, self.where.authority, idle)
        if not event_stream:
            try:
                await raw.read_ahead(BUFFER_SIZE, command.body_buffer_window, self.timeout)
            except BaseException:
                raw.close()
                raise
        return {'status_code': status, 'reason': head.reason, 'headers': head.fields,
                'content': None, 'body': body}

    def abandon(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


def _is_event_stream(fields: List[Tuple[str, str]]) -> bool:
    for name, value in fields:
        if name.lower() == 'content-type':
            return value.partition(';')[0].strip(' \t').lower() == 'text/event-stream'
    return False


class _Tunnel:
    """The upstream side of an upgraded connection (a WebSocket), relayed byte for byte."""

    __slots__ = ('connection',)

    def __init__(self, connection: transport.Connection) -> None:
        self.connection = connection

    def close(self) -> None:
        self.connection.close()


class _RequestBody:
    """A request body streaming from the client to the upstream, with flow control.

    The handler feeds it from ``data_received()``; the command's ``run()`` pumps
    it into the upstream connection once that is open. Until then, and while
    the upstream is slow to take it, the handler's read of the client waits.
    """

    __slots__ = ('length', '_queue', '_stream', '_chunked', '_command', '_waiter', '_done',
                 '_ended', '_error', '_writing', '_detached')

    def __init__(self, length: Optional[int], prefix: Iterable[bytes] = ()) -> None:
        #: the ``Content-Length`` the client sent, or None for a chunked body
        self.length = length
        self._queue: List[bytes] = list(prefix)
        self._stream: Optional[tornado.iostream.IOStream] = None
        self._chunked = False
        self._command: Optional[HTTPProxyCommand] = None
        self._waiter: Optional[asyncio.Future] = None    # the handler, waiting to feed more
        self._done: Optional[asyncio.Future] = None      # run(), waiting for the body's end
        self._ended = False
        self._error: Optional[BaseException] = None
        self._writing = 0
        self._detached = False

    # -- the handler's side ----------------------------------------------------------------

    def feed(self, data: bytes) -> Optional['asyncio.Future[None]']:
        """A part of the body from the client; a future to wait on before reading more."""
        if self._error is not None or self._detached:
            return None   # nobody takes it any more: dropped
        if self._stream is None:
            self._queue.append(data)
            if self._waiter is None:
                self._waiter = asyncio.get_running_loop().create_future()
            return self._waiter
        return self._write(data)

    def end(self) -> None:
        """The client sent the whole body."""
        self._ended = True
        if self._stream is not None and self._error is None and not self._detached:
            self._write(b'')

    def fail(self, error: BaseException) -> None:
        """The client went away (or stalled): the upstream must not take it as complete."""
        if self._error is None and not self._ended:
            self._error = error
            self._wake()

    # -- run()'s side ----------------------------------------------------------------------

    async def pump(self, command: HTTPProxyCommand, connection: transport.Connection,
                   chunked: bool) -> None:
        """Send the body into ``connection``; return when all of it has been written."""
        self._command = command
        self._stream = connection.stream
        self._chunked = chunked
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        queued, self._queue = self._queue, []
        for data in queued:
            self._write(data)
        if self._ended:
            self._write(b'')
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self._writing == 0 and not self._ended and self._error is None:
            command.pause_timeout()   # the client's turn
        await self._done
        if self._error is not None:
            if isinstance(self._error, ClientGone):
                raise self._error
            raise WireError('stopped taking the request body (%s)' % (self._error,))

    def detach(self) -> None:
        """run() has stopped: whatever else the client sends is dropped."""
        self._detached = True
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _write(self, data: bytes) -> 'asyncio.Future[None]':
        command, stream, done = self._command, self._stream, self._done
        assert command is not None and stream is not None and done is not None   # pumping
        if self._writing == 0 and not done.done():
            command.refresh_timeout()   # the upstream's turn to take it
        self._writing += 1
        framed = transport.chunk(data) if self._chunked else data
        written = asyncio.get_running_loop().create_future()
        if framed:
            try:
                future = stream.write(framed)
            except tornado.iostream.StreamClosedError as exc:
                self._written(written, exc, data)
                return written
            future.add_done_callback(lambda future: self._written(
                written, future.exception(), data))
        else:
            self._written(written, None, data)
        return written

    def _written(self, written: 'asyncio.Future[None]', error: Optional[BaseException],
                 data: bytes) -> None:
        self._writing -= 1
        if not written.done():
            written.set_result(None)   # never fails: the handler must not see our errors
        if error is not None:
            if self._error is None:
                self._error = error
            self._wake()
        elif self._ended and self._writing == 0:
            self._wake()
        elif self._writing == 0 and self._command is not None and \
                self._done is not None and not self._done.done():
            self._command.pause_timeout()   # all sent: waiting for the client again

    def _wake(self) -> None:
        done = self._done
        if done is not None and not done.done():
            done.set_result(None)
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


@tornado.web.stream_request_body
class HTTPProxy(tornado.web.RequestHandler):
    """A request handler that forwards every request through an :class:`HTTPProxyCommand`.

    Route it with the command class: ``(r'/api/v1/(.*)', HTTPProxy,
    dict(command=APIService))``. The settings below are class attributes; a
    subclass may change them, and so may the route's dict (``dict(command=...,
    trust_forwarded_headers=False)``).
    """

    SUPPORTED_METHODS = ('GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE', 'OPTIONS')

    #: Largest request body in bytes; a larger one is answered 413 before it is
    #: forwarded (or, when it streams, as soon as it is seen to be too long). None: no
    #: limit of the proxy's own (for a streaming body, not even the HTTP server's
    #: ``max_body_size``).
    max_body_size: Optional[int] = 10 * 1024 * 1024
    #: Largest response body a command with ``buffer_body`` reads into memory; beyond
    #: it 502. None: the command's own ``max_response_body_size``.
    max_response_body_size: Optional[int] = None
    #: Whether the peer is a proxy you run. True: an incoming ``X-Forwarded-For`` is
    #: appended to, and an incoming ``X-Forwarded-Proto`` or ``X-Forwarded-Host`` kept.
    #: False, for a gateway at the edge: every ``X-Forwarded-*``, ``Forwarded`` and
    #: ``X-Real-Ip`` field from the client is dropped and set from what the gateway saw.
    trust_forwarded_headers: bool = True
    #: The name this gateway gives itself in the ``Via`` field it adds to requests
    #: (RFC 9110 §7.6.3); None adds none.
    via: Optional[str] = 'blackgate'
    #: Whether a WebSocket handshake (``Upgrade: websocket``) is relayed: the upstream's
    #: 101, then frames both ways until either side closes. False: answered 403.
    websocket: bool = False

    command: 'type[HTTPProxyCommand]'

    @classmethod
    def route(cls, pattern: str, command: 'type[HTTPProxyCommand]', **settings: Any
              ) -> Tuple[str, type, Dict[str, Any]]:
        """The route ``(pattern, HTTPProxy, dict(command=..., **settings))``, checked now.

        Raises :class:`~blackgate.ConfigError` at start-up for what a plain route
        would only show at the first request: a command that is not an
        :class:`HTTPProxyCommand` subclass, an unknown setting or a bad value.
        The route's capture groups are not used: ``before_request()`` reads
        ``self.request['path']``.
        """
        problem = _route_problem(command, settings)
        if problem is not None:
            raise ConfigError('HTTPProxy.route(%r): %s' % (pattern, problem))
        return (pattern, cls, dict(settings, command=command))

    def initialize(self, command: Any = None, **settings: Any) -> None:
        """Take the :class:`HTTPProxyCommand` subclass, and any of the settings above.

        A wrong route is answered 500 (and logged on one line) at each request:
        build routes with :meth:`route` to have it refused at start-up instead.
        """
        self._misconfigured = _route_problem(command, settings)
        if self._misconfigured is None:
            self.command = command
            for name, value in settings.items():
                setattr(self, name, value)
        self._chunks: List[bytes] = []
        self._received = 0
        self._answered = False
        self._client_gone = False
        self._body: Optional[_RequestBody] = None
        self._pending: Optional['asyncio.Future[Any]'] = None
        self._instance: Optional[HTTPProxyCommand] = None
        self._upgrade: Optional[str] = None

    # -- what Tornado would otherwise add or check ----------------------------------------

    def set_default_headers(self) -> None:
        # No Server or Content-Type of Tornado's own on the upstream's answer.
        self.clear_header('Server')
        self.clear_header('Content-Type')

    def compute_etag(self) -> Optional[str]:
        """None: the upstream's ETag, or none; Tornado must not invent one (or a 304)."""
        return None

    def check_xsrf_cookie(self) -> None:
        """Nothing: a gateway forwards requests; XSRF is the upstream's business."""

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Tornado's own errors (405, or a bug: 500) as the same short JSON; no traceback."""
        if status_code == 405:
            self.set_header('Allow', ', '.join(self.SUPPORTED_METHODS))
        reason = tornado.httputil.responses.get(status_code, 'Unknown')
        self._json_error(reason.lower(), reason.lower().replace(' ', '-'), None)

    # -- the request body ------------------------------------------------------------------

    def prepare(self) -> None:
        if self._misconfigured is not None:
            log.error('HTTPProxy route for %s is misconfigured: %s; answered 500',
                      self.request.path, self._misconfigured)
            self._gateway_error(500, 'gateway misconfigured', 'misconfigured')
            return
        headers = self.request.headers
        if 'Transfer-Encoding' in headers and self.request.version == 'HTTP/1.0':
            # RFC 9112 §6.1: faulty framing, whatever Content-Length says. Answered
            # before the body is read, so Tornado closes the connection after it.
            self._gateway_error(400, 'bad request framing', 'bad-request')
            return
        if _wants_websocket(headers):
            if not self.websocket or self.request.method != 'GET':
                self._gateway_error(403, 'websocket not allowed here', 'websocket-refused')
                return
            self._upgrade = 'websocket'
        limit = self.max_body_size
        length = headers.get('Content-Length')
        # (a malformed length is Tornado's to refuse, with a 400)
        known = int(length) if length is not None and length.isdigit() else None
        if limit is not None and known is not None and known > limit:
            self._gateway_error(413, 'request body too large', 'body-too-large')
            return
        buffered = self.command.buffer_body
        if limit is not None or not buffered:
            # The proxy's own limit replaces the server's (whose 400 would say nothing of
            # it); a streaming body without one has no limit at all.
            cast(Any, self.request.connection).set_max_body_size(_UNLIMITED)
        if buffered:
            return
        if known is not None and known > BUFFER_SIZE:
            self._stream_body(known)   # large: streams from the first byte

    def data_received(self, chunk: bytes) -> Optional['asyncio.Future[None]']:
        if self._answered:
            return None
        self._received += len(chunk)
        limit = self.max_body_size
        if limit is not None and self._received > limit:   # a chunked body, too long
            self._chunks = []
            if self._body is not None:
                self._body.fail(ClientGone('request body over max_body_size'))
            self._gateway_error(413, 'request body too large', 'body-too-large')
            return None
        body = self._body
        if body is not None:
            return body.feed(chunk)
        self._chunks.append(chunk)
        if self._received > BUFFER_SIZE and not self.command.buffer_body:
            # A chunked body too long to wait for: it streams from here, chunked.
            chunks, self._chunks = self._chunks, []
            self._stream_body(None, chunks)
        return None

    def on_connection_close(self) -> None:
        self._client_gone = True
        body = self._body
        if body is not None:
            body.fail(ClientGone('the client went away before its request body ended'))
        super().on_connection_close()

    def _stream_body(self, length: Optional[int], prefix: Iterable[bytes] = ()) -> None:
        request = self._request_dict(None)
        if request is None:
            return
        body = self._body = _RequestBody(length, prefix)
        request['body'] = body
        self._start(request)

    def _refusal_expected(self) -> bool:
        command = self.command
        return (command.fallback is Command.fallback and component.tracer is None
                and command.__init__ is HTTPProxyCommand.__init__
                and component.circuit_breaker(command.command_key).is_open())

    def _request_later(self) -> Optional[Dict[str, Any]]:
        chunks = self._chunks
        return self._request_dict(chunks[0] if len(chunks) == 1 else b''.join(chunks))

    def _start(self, request: Optional[Dict[str, Any]]) -> None:
        command = self._instance = self.command(request)  # type: ignore[arg-type]
        if request is None:
            command._proxy_build_request = self._request_later
        if self.max_response_body_size is not None:
            command.max_response_body_size = self.max_response_body_size
        if component.tracer is None:
            self._pending = command.queue()
        else:
            with tracing.incoming(self.request.headers):   # the client's trace, if any
                self._pending = command.queue()

    # -- the methods -----------------------------------------------------------------------

    async def get(self, *args: str, **kwargs: str) -> None:
        """Forward the request (every supported method does the same)."""
        if self._answered:
            return
        if self._body is not None:
            self._body.end()
        elif self._refusal_expected():
            # The breaker is open and only the gateway's 503 can answer: no request dict
            # (unless the breaker lets this one through after all: run() builds it then).
            self._start(None)
        else:
            chunks = self._chunks
            request = self._request_dict(chunks[0] if len(chunks) == 1 else b''.join(chunks))
            if request is None:
                return
            self._start(request)
        command, pending = self._instance, self._pending
        assert command is not None and pending is not None   # _start() ran
        try:
            response = await pending
        except CommandError as error:
            response = self._failure_response(error)
        except ProxyMisconfigured as error:
            log.error('%s: %s; answered 500', command.command_key, error)
            self._gateway_error(500, 'gateway misconfigured', 'misconfigured',
                                Event.BAD_REQUEST.value)
            return
        except BadRequest:
            if not self._answered:
                self._gateway_error(400, 'bad request', 'bad-request', Event.BAD_REQUEST.value)
            return
        if command.is_response_from_fallback:
            cause = command.execution_exception
            if isinstance(cause, UpstreamServerError):
                _close_body(cause.response)
        if response is None:
            return
        if self._client_gone:
            _close_body(response)
            self.set_status(499, 'Client Closed Request')   # for the access log
            self.finish()
            return
        try:
            await self._write_response(response)
        except _MalformedField:
            _close_body(response)
            self.clear()
            self._gateway_error(502, 'bad gateway', 'bad-gateway')

    head = post = put = patch = delete = options = get

    # -- building the request dict ---------------------------------------------------------

    def _request_dict(self, data: Optional[bytes]) -> Optional[Dict[str, Any]]:
        request = self.request
        target = request.uri or ''
        if not target.startswith('/'):
            # absolute-form (RFC 9112 §3.2.2): keep the path and query only, so the
            # upstream's host stays the one before_request() chooses.
            match = _ABSOLUTE_FORM.match(target)
            if match is None:
                self._gateway_error(400, 'bad request target', 'bad-request')
                return None
            target = target[match.end():]
            if not target.startswith('/'):
                target = '/' + target
        if '#' in target:
            self._gateway_error(400, 'bad request target', 'bad-request')
            return None
        if not target.isascii():
            # Raw octets above 0x7f (Tornado decodes them as Latin-1): percent-encode
            # each, so the upstream decodes the very same octets.
            target = _NOT_ASCII.sub(lambda match: '%%%02X' % ord(match.group()), target)
        path, _, query = target.partition('?')

        incoming = request.headers
        named = _connection_names(incoming.get_list('Connection'))
        trusted = self.trust_forwarded_headers
        headers = HTTPHeaderDict()
        forwarded_for = []
        for name, value in incoming.get_all():   # the one pass over the client's fields
            kind = _REQUEST_FIELDS.get(name)
            if kind == _DROP or (named and name in named):
                continue
            if kind == _FORWARDED_FOR:
                if trusted:
                    forwarded_for.append(value)
                continue
            if not trusted and (name.startswith('X-Forwarded-') or name in _UNTRUSTED_FIELDS):
                continue
            headers.add(name, value)
        remote_ip = request.remote_ip or 'unknown'
        forwarded_for.append(remote_ip)
        headers['X-Forwarded-For'] = ', '.join(forwarded_for)
        if 'X-Forwarded-Proto' not in headers:
            headers['X-Forwarded-Proto'] = request.protocol
        if 'X-Forwarded-Host' not in headers:
            headers['X-Forwarded-Host'] = request.host
        if self.via:
            headers.add('Via', '%s %s' % (request.version[5:], self.via))

        result = {
            'method': request.method,
            'path': path,
            'query': query,
            'params': urllib.parse.parse_qs(query, keep_blank_values=True) if query else {},
            'headers': headers,
            'data': data,
            'remote_ip': remote_ip,
            'url': None,
        }
        if self._upgrade:
            result['upgrade'] = self._upgrade
        return result

    # -- writing the response --------------------------------------------------------------

    async def _write_response(self, response: Mapping[str, Any]) -> None:
        status = int(response.get('status_code') or 200)
        body = response.get('body')
        if status == 101 and isinstance(body, _Tunnel):
            await self._relay_upgrade(response, body)
            return
        # An empty reason gets the standard one (Tornado refuses to send none).
        reason = response.get('reason') or None
        try:
            self.set_status(status, reason)
        except ValueError:
            self.set_status(status if 100 <= status <= 999 else 502)
        method = self.request.method
        length = self._add_fields(response.get('headers'))

        if method == 'HEAD' or status in _NO_BODY_STATUS or status < 200:
            # No body. HEAD keeps the upstream's length, as a 304 may; flushing before
            # finish() keeps Tornado from setting a length of 0 or dropping fields.
            _close_body(response)
            if length is not None and status != 204 and status >= 200:
                self._add_field('Content-Length', length)
            self.flush()
            self.finish()
            return
        content = response.get('content')
        if content is not None or body is None:
            _close_body(response)
            if content:
                if isinstance(content, str):
                    content = content.encode('utf-8')
                elif not isinstance(content, bytes):
                    content = bytes(content)   # a bytearray or memoryview from a fallback
                self.write(content)   # finish() sets Content-Length to its exact size
            self.finish()
            return
        if body.complete:   # it arrived whole: sent whole, with its exact length
            data = body.take_buffered()
            if data:
                self.write(data)
            self.finish()
            return
        await self._stream_response(body)

    async def _stream_response(self, body: UpstreamBody) -> None:
        """The body as it arrives; each part waits until the client took the last one."""
        if body.length is not None:
            self.set_header('Content-Length', body.length)
        try:
            data = body.take_buffered()
            if data:
                self.write(data)
            await self.flush()
            while True:
                data = await body.read()
                if not data:
                    break
                self.write(data)
                await self.flush()
        except tornado.iostream.StreamClosedError:
            body.close()   # the client left: the upstream read stops, its slot is freed
            return
        except UpstreamError:
            # The status is sent already: all the client can be told is a cut connection.
            body.close()
            self._abort()
            return
        self.finish()

    async def _relay_upgrade(self, response: Mapping[str, Any], tunnel: _Tunnel) -> None:
        """Send the upstream's 101 and relay the bytes both ways until either side closes."""
        reason = response.get('reason') or 'Switching Protocols'
        lines = ['HTTP/1.1 101 %s' % (_UNSAFE_IN_FIELD.sub(' ', reason),)]
        for name, value in _fields(response.get('headers')):
            lower = name.lower()
            if lower in _RESPONSE_FIELDS and lower not in _UPGRADE_FIELDS:
                continue
            value = _UNSAFE_IN_FIELD.sub(' ', str(value))
            lines.append('%s: %s' % (name, value))
        head = ('\r\n'.join(lines) + '\r\n\r\n').encode('latin-1', 'replace')
        self.set_status(101)   # for the access log
        client = self.detach()
        upstream = tunnel.connection.stream
        try:
            await client.write(head)
        except tornado.iostream.StreamClosedError:
            upstream.close()
            return
        await asyncio.gather(_relay(client, upstream), _relay(upstream, client))

    def _abort(self) -> None:
        try:
            self.detach().close()
        except Exception:   # already closed
            pass

    def _add_fields(self, headers: Any) -> Optional[str]:
        """Every end-to-end field of the upstream's answer (the one pass back); its length."""
        named = length = None
        for name, value in _fields(headers):
            kind = _RESPONSE_FIELDS.get(name.lower())
            if kind is None:
                self._add_field(name, value)
            elif kind == _CONNECTION:
                named = (named or []) + [token.strip() for token in value.split(',')]
            elif kind == _LENGTH:
                length = value
            elif kind == _DATE:
                self.clear_header('Date')   # the upstream's, not Tornado's
                self._add_field('Date', value)
        if named:
            for name in named:
                if name and name.lower() not in ('close', 'keep-alive'):
                    self.clear_header(name)
        return length

    def _add_field(self, name: str, value: Any) -> None:
        try:
            self.add_header(name, value)
        except (ValueError, tornado.httputil.HTTPInputError):
            # RFC 9110 §5.5: CR, LF and NUL become spaces; then it must be valid.
            value = _UNSAFE_IN_FIELD.sub(' ', str(value)).strip(' \t')
            try:
                self.add_header(name, value)
            except (ValueError, tornado.httputil.HTTPInputError):
                raise _MalformedField(name) from None

    # -- failures --------------------------------------------------------------------------

    def _failure_response(self, error: CommandError) -> Optional[Mapping[str, Any]]:
        """The upstream's own 5xx to send, or None once the gateway's own answer is sent."""
        cause = error.cause
        failure_type = error.failure_type
        if isinstance(cause, UpstreamServerError):
            return cause.response
        if self._answered:
            return None
        if failure_type in _REJECTED:
            if failure_type is FailureType.SHORTCIRCUIT:
                window = component.circuit_breaker(error.command_key).settings \
                    .circuit_breaker_sleep_window
                self._gateway_error(503, 'circuit breaker open', 'short-circuited',
                                    failure_type.value, max(1, math.ceil(window)))
            else:
                self._gateway_error(503, 'too many concurrent requests', 'rejected',
                                    failure_type.value, 1)
        elif failure_type is FailureType.TIMEOUT or isinstance(cause, UpstreamTimeout):
            self._gateway_error(504, 'upstream timed out', 'timeout', failure_type.value)
        else:
            self._gateway_error(502, 'bad gateway', 'bad-gateway', failure_type.value)
        return None

    def _gateway_error(self, status: int, error: str, marker: str,
                       failure_type: Optional[str] = None,
                       retry_after: Optional[int] = None) -> None:
        """Answer with the gateway's own short JSON error, marked ``X-Blackgate-Error``."""
        self._answered = True
        if self._client_gone:
            self.set_status(499, 'Client Closed Request')
            self.finish()
            return
        self.set_status(status)
        if retry_after is not None:
            self.set_header('Retry-After', retry_after)
        self._json_error(error, marker, failure_type)

    def _json_error(self, error: str, marker: str, failure_type: Optional[str]) -> None:
        command = getattr(self, 'command', None)
        _finish_json(self, error, marker, getattr(command, 'command_key', None), failure_type)

    def on_finish(self) -> None:
        pending = self._pending
        if pending is not None and not pending.done():
            # Answered before the command settled (a body over the limit): its outcome is
            # counted all the same; nobody waits for the future itself.
            pending.add_done_callback(_consume)


@tornado.web.stream_request_body
class GatewayNotFound(tornado.web.RequestHandler):
    """The gateway's JSON answer to a request that no route matches, for every method.

    A Tornado ``Application`` routes by path alone, so a target such as
    ``OPTIONS *`` or an absolute-form ``GET http://elsewhere/x`` matches no
    route and would get Tornado's HTML 404. Mount this as the application's
    default handler and they get the gateway's short JSON error instead::

        tornado.web.Application(routes, default_handler_class=GatewayNotFound)

    A target that is not a path (``*``, ``host:port``) is answered 400, any
    other 404. The request body is not read.
    """

    SUPPORTED_METHODS = HTTPProxy.SUPPORTED_METHODS

    def set_default_headers(self) -> None:
        self.clear_header('Server')

    def check_xsrf_cookie(self) -> None:
        """Nothing: there is nothing here to protect."""

    def compute_etag(self) -> Optional[str]:
        return None

    def prepare(self) -> None:
        target = self.request.uri or ''
        if target.startswith('/') or _ABSOLUTE_FORM.match(target):
            self.set_status(404)
            _finish_json(self, 'no route', 'no-route', None, None)
        else:
            self.set_status(400)
            _finish_json(self, 'bad request target', 'bad-request', None, None)

    def data_received(self, chunk: bytes) -> None:
        """Dropped: the answer does not depend on the body."""

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Tornado's own errors (405, or a bug: 500) as the same short JSON; no traceback."""
        if status_code == 405:
            self.set_header('Allow', ', '.join(self.SUPPORTED_METHODS))
        reason = tornado.httputil.responses.get(status_code, 'Unknown')
        _finish_json(self, reason.lower(), reason.lower().replace(' ', '-'), None, None)


@functools.lru_cache(maxsize=4096)
def _error_body(error: str, command_key: Optional[str], failure_type: Optional[str]) -> bytes:
    """The gateway's short JSON error: ``{"error", "command_key", "failure_type"}``.

    Built once per (error, command key, failure type), all from small fixed sets: a
    refusal under overload (a 503 per request) encodes no JSON.
    """
    return json.dumps({'error': error, 'command_key': command_key,
                       'failure_type': failure_type}).encode('ascii')


def _finish_json(handler: tornado.web.RequestHandler, error: str, marker: str,
                 command_key: Optional[str], failure_type: Optional[str]) -> None:
    handler.set_header('Content-Type', 'application/json')
    handler.set_header('Cache-Control', 'no-store')
    handler.set_header('X-Blackgate-Error', marker)
    handler.finish(_error_body(error, command_key, failure_type))


_SETTINGS = ('max_body_size', 'max_response_body_size', 'trust_forwarded_headers', 'via',
             'websocket')
_SETTING_RULES = {
    'max_body_size': (lambda v: v is None or _is_count(v, 0), 'a number of bytes, or None'),
    'max_response_body_size': (lambda v: v is None or _is_count(v, 1),
                               'a number of bytes above 0, or None'),
    'trust_forwarded_headers': (lambda v: isinstance(v, bool), 'True or False'),
    'via': (lambda v: v is None or (isinstance(v, str) and re.fullmatch(r'[!-~]+', v)),
            'a name without spaces, or None'),
    'websocket': (lambda v: isinstance(v, bool), 'True or False'),
}


def _is_count(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _route_problem(command: Any, settings: Mapping[str, Any]) -> Optional[str]:
    """What is wrong with an HTTPProxy route's dict, in one line; None if nothing."""
    if command is None:
        return 'no command: route it as dict(command=<a subclass of HTTPProxyCommand>)'
    if not (isinstance(command, type) and issubclass(command, HTTPProxyCommand)):
        kind = ('an instance of %s' % (type(command).__name__,)
                if isinstance(command, HTTPProxyCommand) else repr(command))
        return 'command=%s; expected a subclass of HTTPProxyCommand (the class itself)' % (kind,)
    for name, value in settings.items():
        rule = _SETTING_RULES.get(name)
        if rule is None:
            return 'unknown setting %r; it takes command and %s' % (name, ', '.join(_SETTINGS))
        if not rule[0](value):
            return '%s=%r; expected %s' % (name, value, rule[1])
    return None


class _MalformedField(Exception):
    """A response field Tornado cannot send, even cleaned."""


async def _relay(source: tornado.iostream.IOStream, sink: tornado.iostream.IOStream) -> None:
    """Copy ``source`` into ``sink`` until either closes; then close both."""
    try:
        while True:
            data = await source.read_bytes(transport.CHUNK_SIZE, partial=True)
            await sink.write(data)
    except tornado.iostream.StreamClosedError:
        pass
    finally:
        source.close()
        sink.close()


def _consume(future: 'asyncio.Future[Any]') -> None:
    if not future.cancelled():
        future.exception()


def _close_body(response: Any) -> None:
    if isinstance(response, Mapping):
        body = response.get('body')
        if body is not None and hasattr(body, 'close'):
            body.close()


def _wants_websocket(headers: tornado.httputil.HTTPHeaders) -> bool:
    """A WebSocket handshake: ``Upgrade: websocket`` named in ``Connection`` (RFC 6455 §4.1)."""
    upgrade = headers.get('Upgrade')
    if upgrade is None or 'websocket' not in upgrade.lower():
        return False
    return any(token.strip().lower() == 'upgrade'
               for value in headers.get_list('Connection') for token in value.split(','))


def _connection_names(values: List[str]) -> Optional[frozenset]:
    """The Tornado-normalized field names that ``Connection`` values name."""
    if not values:
        return None
    return frozenset(_normalize(token.strip())
                     for value in values for token in value.split(',') if token.strip())


def _fields(headers: Union[None, Mapping[str, Any], Iterable[Tuple[str, Any]]]
            ) -> Iterator[Tuple[str, Any]]:
    """(name, value) pairs from a list of pairs, or a dict of values or of lists."""
    if not headers:
        return iter(())
    if not isinstance(headers, Mapping):
        return iter(headers)
    if isinstance(headers, HTTPHeaderDict):
        return headers.iteritems()
    return _expand(headers)


def _expand(headers: Mapping[str, Any]) -> Iterator[Tuple[str, Any]]:
    for name, value in headers.items():
        if isinstance(value, (list, tuple)):
            for item in value:
                yield name, item
        else:
            yield name, value
