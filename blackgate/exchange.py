"""One exchange with an upstream for HTTPProxyCommand.run(): the request out, the answer in.

:mod:`blackgate.proxy` decides what to send and what an answer means; this
module carries one exchange over :mod:`blackgate.transport`: the request's
fields and framing, a request body streaming from the client with flow
control (:class:`RequestBody`), the response head, then the body read whole,
read ahead to be sent whole, or handed over to stream, or an upgraded
connection (:class:`Tunnel`) relayed byte for byte.

.. warning::

   Everything here runs on the IOLoop's thread.
"""
import asyncio
import math
from typing import (Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple,
                    Union)

import tornado.iostream

from . import tracing, transport
from .command import Command
from .errors import BadRequest
from .registry import component
from .transport import WireError

try:
    from urllib3 import HTTPHeaderDict
except ImportError:  # urllib3 1.26
    from urllib3._collections import HTTPHeaderDict

__all__ = ('Exchange', 'RequestBody', 'Tunnel', 'relay', 'is_event_stream', 'field_pairs',
           'BUFFER_SIZE', 'BODY_METHODS', 'FRAMING_FIELDS')

#: A body up to this size that arrives whole at once is sent whole, with its length.
BUFFER_SIZE = transport.CHUNK_SIZE
#: Methods whose request always says how long its body is (``Content-Length: 0`` for none).
BODY_METHODS = frozenset(('POST', 'PUT', 'PATCH'))
#: Fields of the request dict that the transport writes itself, from the body's framing.
FRAMING_FIELDS = frozenset(('content-length', 'transfer-encoding', 'host'))


class Exchange:
    """One request and its response head over the transport, for HTTPProxyCommand.run()."""

    __slots__ = ('command', 'request', 'where', 'pool', 'connection', 'timeout', 'upgrade',
                 'buffer_body', 'max_response_body_size', 'body_idle_timeout',
                 'body_buffer_window', 'wrap_body')

    def __init__(self, command: Command, request: Dict[str, Any], where: transport.Target, *,
                 buffer_body: bool, max_response_body_size: Optional[int],
                 body_idle_timeout: Optional[float], body_buffer_window: float,
                 wrap_body: Callable[[transport.ResponseBody, str, Optional[float]], Any]
                 ) -> None:
        """``command`` is the HTTPProxyCommand whose run() this is; the rest its settings.

        ``wrap_body(body, host, idle_timeout)`` makes what ``response['body']`` holds
        while a body streams.
        """
        self.command = command
        self.buffer_body = buffer_body
        self.max_response_body_size = max_response_body_size
        self.body_idle_timeout = body_idle_timeout
        self.body_buffer_window = body_buffer_window
        self.wrap_body = wrap_body
        self.request = request
        self.where = where
        self.pool = transport.pool()
        self.connection: Optional[transport.Connection] = None
        self.timeout = command.resolved_timeout   # the armed timer's, not a fresh lookup
        self.upgrade = request.get('upgrade')

    async def send(self) -> transport.ResponseHead:
        """Send the request and its body (on a kept-alive connection if any); the head."""
        request = self.request
        method = request['method']
        headers = request.get('headers')
        authority = self.where.authority
        if component.tracer is not None and isinstance(headers, HTTPHeaderDict):
            tracing.inject(headers)   # the upstream's spans join this command's trace
        fields: List[Tuple[str, str]] = []
        for name, value in field_pairs(headers):
            lower = name.lower()
            if lower in FRAMING_FIELDS:
                if lower == 'host':
                    authority = str(value)   # before_request() chose the Host: its own
                continue
            fields.append((name, str(value)))
        if self.upgrade:
            fields.append(('Connection', 'Upgrade'))
            fields.append(('Upgrade', self.upgrade))
        streamed = request.get('body') if request.get('data') is None else None
        if not isinstance(streamed, RequestBody):
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
        elif method in BODY_METHODS:
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
        if isinstance(sent, RequestBody):
            sent.detach()

    async def receive(self, head: transport.ResponseHead) -> Dict[str, Any]:
        """The response dict for ``head``: its body read whole, read ahead, or to stream."""
        connection = self.connection
        assert connection is not None   # send() returned a head read from it
        method = self.request['method']
        status = head.status
        if status == 101:
            if not self.upgrade:
                connection.close()
                raise WireError('switched protocols (101) though no upgrade was asked for')
            body: Any = Tunnel(connection)
            return {'status_code': 101, 'reason': head.reason, 'headers': head.fields,
                    'content': None, 'body': body}
        mode, length = transport.body_framing(head, method)
        raw = transport.ResponseBody(connection, self.pool, head, mode, length)
        self.connection = None   # the body owns it now
        if self.buffer_body:
            limit = self.max_response_body_size
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
        event_stream = is_event_stream(head.fields)
        idle = self.body_idle_timeout
        if idle is None:
            idle = None if event_stream else self.timeout
        elif idle == math.inf:
            idle = None
        body = self.wrap_body(raw, self.where.authority, idle)
        if not event_stream:
            try:
                await raw.read_ahead(BUFFER_SIZE, self.body_buffer_window, self.timeout)
            except BaseException:
                raw.close()
                raise
        return {'status_code': status, 'reason': head.reason, 'headers': head.fields,
                'content': None, 'body': body}

    def abandon(self) -> None:
        """The exchange failed before its body took the connection over: close it."""
        if self.connection is not None:
            self.connection.close()
            self.connection = None


def is_event_stream(fields: List[Tuple[str, str]]) -> bool:
    """Whether a response's fields say ``Content-Type: text/event-stream``."""
    for name, value in fields:
        if name.lower() == 'content-type':
            return value.partition(';')[0].strip(' \t').lower() == 'text/event-stream'
    return False


class Tunnel:
    """The upstream side of an upgraded connection (a WebSocket), relayed byte for byte."""

    __slots__ = ('connection',)

    def __init__(self, connection: transport.Connection) -> None:
        self.connection = connection

    def close(self) -> None:
        self.connection.close()


class RequestBody:
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
        self._stream: Optional[transport.Stream] = None
        self._chunked = False
        self._command: Optional[Command] = None
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

    async def pump(self, command: Command, connection: transport.Connection,
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
            if isinstance(self._error, BadRequest):   # the client's doing: ClientGone
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


async def relay(source: Union[tornado.iostream.IOStream, transport.Stream],
                 sink: Union[tornado.iostream.IOStream, transport.Stream]) -> None:
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


def field_pairs(headers: Union[None, Mapping[str, Any], Iterable[Tuple[str, Any]]]
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
