"""Collapser: many small calls answered by one batch command (Hystrix's ``HystrixCollapser``).

The N+1 fix: instead of one call per item, every ``X(item).queue()`` (or
``.execute()``) made within ``timer_delay`` of the first joins a batch; the
batch is sent as one ordinary :class:`~blackgate.Command` (breaker, bulkhead,
timeout and fallback apply to it), and each caller gets its own part of the
answer::

    class GetUser(Collapser):
        collapser_key = 'get_user'

        def __init__(self, user_id):
            self.user_id = user_id

        def request_argument(self):
            return self.user_id

        def create_command(self, arguments):
            return GetUsers(arguments)                 # one Command for the whole batch

        def map_response(self, batch_result, arguments):
            return [batch_result[user_id] for user_id in arguments]   # one per argument

    users = await asyncio.gather(*(GetUser(i).queue() for i in ids))   # one GetUsers call

A batch is sent when ``timer_delay`` seconds have passed since its first
request, or at once when it holds ``max_requests_in_batch``. ``scope =
'request'`` (the default) gathers the calls of one request context only
(``with component.request_context():``); ``scope = 'global'`` gathers every
caller's. ``queue()`` calls gather on their IOLoop; ``execute()`` calls from
threads gather with each other (the first thread of a batch waits for the
timer, sends the batch and hands every other thread its answer).

.. warning::

   ``queue()`` runs on the IOLoop and never blocks it: the timer is an IOLoop
   timer and the batch is sent with the command's own ``queue()``.
   ``execute()`` blocks its thread until the batch answers. ``create_command()``
   and ``map_response()`` are user code: what they raise reaches every caller of
   the batch, and is logged once.
"""
import asyncio
import concurrent.futures
import contextvars
import difflib
import logging
import math
import threading
from typing import Any, List, Optional, Sequence, Tuple

from .clock import TimeoutError as _WaitTimeout
from .command import Command
from .context import current
from .errors import BlackgateError, ConfigError
from .registry import component

__all__ = ('Collapser', 'REQUEST', 'GLOBAL')

log = logging.getLogger('blackgate')

_get_running_loop = asyncio._get_running_loop   # as in blackgate.command: cheap, no raise

#: ``scope``: gather the calls of one request context (Hystrix's default).
REQUEST = 'request'
#: ``scope``: gather every caller's calls, whatever their request.
GLOBAL = 'global'
_SCOPES = (REQUEST, GLOBAL)

#: The longest a thread waits for its batch's answer (about 11.6 days: for ever); the
#: batch command's own timeout and fallback bound it long before.
_FOREVER = 1_000_000.0

_SETTINGS = ('collapser_key', 'scope', 'timer_delay', 'max_requests_in_batch')


def _check_settings(cls: type) -> None:
    owner = 'collapser class %s' % (cls.__qualname__,)
    key = cls.collapser_key   # type: ignore[attr-defined]
    if not isinstance(key, str) or not key or key.strip() != key:
        raise ConfigError('%s: collapser_key=%r has the wrong type; expected a non-empty '
                          'string without surrounding spaces' % (owner, key))
    scope = cls.scope   # type: ignore[attr-defined]
    if scope not in _SCOPES:
        raise ConfigError('%s: scope=%r is not a scope; expected %s'
                          % (owner, scope, ' or '.join(map(repr, _SCOPES))))
    delay = cls.timer_delay   # type: ignore[attr-defined]
    if isinstance(delay, bool) or not isinstance(delay, (int, float)) \
            or not 0 <= delay <= 60 or math.isnan(delay):
        raise ConfigError('%s: timer_delay=%r %s; expected a number of seconds from 0 to 60'
                          % (owner, delay, 'is out of range'
                             if isinstance(delay, (int, float)) and not isinstance(delay, bool)
                             else 'has the wrong type'))
    most = cls.max_requests_in_batch   # type: ignore[attr-defined]
    if isinstance(most, bool) or not isinstance(most, int) or not 1 <= most <= 1_000_000:
        raise ConfigError('%s: max_requests_in_batch=%r %s; expected a whole number from 1 '
                          'to 1000000' % (owner, most, 'is out of range'
                                          if isinstance(most, int) and not isinstance(most, bool)
                                          else 'has the wrong type'))
    for name, value in vars(cls).items():
        if name in _SETTINGS or name.startswith('_') or callable(value) \
                or hasattr(value, '__get__'):
            continue
        near = _near(name)
        if near is not None:
            raise ConfigError('%s: class attribute %r is not a setting (did you mean %r?); if '
                              'it is yours, name it %r or set it in __init__()'
                              % (owner, name, near, '_' + name))


def _near(name: str) -> Optional[str]:
    close = difflib.get_close_matches(name, _SETTINGS + ('timerDelayInMilliseconds',
                                                         'maxRequestsInBatch'), n=1, cutoff=0.8)
    if not close:
        return None
    return {'timerDelayInMilliseconds': 'timer_delay',
            'maxRequestsInBatch': 'max_requests_in_batch'}.get(close[0], close[0])


class _Request:
    """One caller's place in a batch: its argument and where its answer goes."""

    __slots__ = ('collapser', 'argument', 'future', 'loop')

    def __init__(self, collapser: 'Collapser', argument: Any, future: Any, loop: Any) -> None:
        self.collapser = collapser
        self.argument = argument
        self.future = future   # asyncio future (queue()) or concurrent future (execute())
        self.loop = loop

    def settle(self, value: Any, error: Optional[BaseException]) -> None:
        future = self.future
        if future.cancelled():   # the caller stopped waiting (queue()'s future)
            return
        if error is None:
            future.set_result(value)
        else:
            future.set_exception(error)


class _Batch:
    """The requests gathered so far; ``full`` wakes the thread waiting to send it."""

    __slots__ = ('requests', 'closed', 'full', 'timer')

    def __init__(self) -> None:
        self.requests: List[_Request] = []
        self.closed = False
        self.full: 'concurrent.futures.Future[None]' = concurrent.futures.Future()
        self.timer: Any = None


class _Collector:
    """The batch being gathered for one collapser class, in one scope, on one loop (or threads)."""

    __slots__ = ('lock', 'batch')

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.batch: Optional[_Batch] = None

    def join(self, request: _Request, most: int) -> Tuple[_Batch, bool, bool]:
        """Add ``request``: (its batch, whether it is the first, whether it filled the batch)."""
        with self.lock:
            batch = self.batch
            first = batch is None
            if batch is None:
                batch = self.batch = _Batch()
            batch.requests.append(request)
            full = len(batch.requests) >= most
            if full:
                batch.closed = True
                self.batch = None
            return batch, first, full

    def close(self, batch: _Batch) -> bool:
        """Stop ``batch`` taking requests; False if it was closed already (then it is sent)."""
        with self.lock:
            if batch.closed:
                return False
            batch.closed = True
            if self.batch is batch:
                self.batch = None
            return True


class Collapser:
    """Gather single-item calls into batches: subclass it, write the three methods.

    Settings are class attributes: ``collapser_key`` (default: the class's
    ``__name__``), ``scope`` (``'request'`` or ``'global'``), ``timer_delay``
    (seconds, default 0.01) and ``max_requests_in_batch`` (default 100). An
    instance runs once, through :meth:`execute` or :meth:`queue`.
    """

    #: defaults to the class's ``__name__``; names the collapser's metrics
    collapser_key: str = 'Collapser'
    #: ``'request'``: gather the calls of one request context; ``'global'``: everyone's
    scope: str = REQUEST
    #: seconds a batch waits for more requests after its first one
    timer_delay: float = 0.01
    #: a batch holding this many requests is sent at once
    max_requests_in_batch: int = 100

    _bg_command: Optional[Command] = None
    _bg_explicit_key = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if 'collapser_key' in vars(cls):
            cls._bg_explicit_key = True
        elif not cls._bg_explicit_key:
            cls.collapser_key = cls.__name__
        _check_settings(cls)

    # -- what subclasses write -------------------------------------------------------

    def request_argument(self) -> Any:
        """What this call adds to the batch (an id, a key, a tuple of them)."""
        raise NotImplementedError('%s must define request_argument()' % (type(self).__name__,))

    def create_command(self, arguments: List[Any]) -> Command:
        """The one :class:`~blackgate.Command` that answers the batch's ``arguments``."""
        raise NotImplementedError('%s must define create_command(arguments)'
                                  % (type(self).__name__,))

    def map_response(self, batch_result: Any, arguments: List[Any]) -> Sequence[Any]:
        """The batch command's result split into one result per argument, in their order."""
        raise NotImplementedError('%s must define map_response(batch_result, arguments)'
                                  % (type(self).__name__,))

    # -- the drivers -----------------------------------------------------------------

    def queue(self) -> 'Any':
        """Join a batch and return a future of this call's own result; never blocks the IOLoop.

        The future fails as the batch command failed (:class:`~blackgate.CommandError`
        when it had no usable fallback), or with what ``create_command()`` or
        ``map_response()`` raised.
        """
        loop = _get_running_loop()
        if loop is None:
            raise BlackgateError(
                '%s.queue() needs a running IOLoop on this thread; from a plain thread use '
                '%s(...).execute()' % (type(self).__name__, type(self).__name__))
        collector, scope_context = self._bg_join_scope(loop)
        argument = self.request_argument()
        future = loop.create_future()
        request = _Request(self, argument, future, loop)
        batch, first, full = collector.join(request, type(self).max_requests_in_batch)
        if full:
            if batch.timer is not None:
                batch.timer.cancel()
            _in(scope_context, _send_async, batch)
        elif first:
            batch.timer = component.clock.call_later(
                loop, type(self).timer_delay,
                lambda: _in(scope_context, _send_when_due, collector, batch))
        return future

    def execute(self) -> Any:
        """Join a batch and block until this call's own result is known.

        Threads calling it at once gather into one batch; the first of them sends
        it once ``timer_delay`` has passed (or the batch is full).
        """
        if _get_running_loop() is not None:
            raise BlackgateError(
                '%s.execute() was called on the thread of a running IOLoop and would block it; '
                'use `await %s(...).queue()` instead' % (type(self).__name__,
                                                          type(self).__name__))
        collector, scope_context = self._bg_join_scope(None)
        argument = self.request_argument()
        future: 'concurrent.futures.Future[Any]' = concurrent.futures.Future()
        request = _Request(self, argument, future, None)
        clock = component.clock
        start = clock.monotonic()
        batch, first, full = collector.join(request, type(self).max_requests_in_batch)
        if full and not first:
            batch.full.set_result(None)   # wakes the batch's first thread: it sends now
        if first:
            if not full:
                try:
                    clock.wait_until(batch.full, start + type(self).timer_delay)
                except _WaitTimeout:
                    pass
                collector.close(batch)
            _in(scope_context, _send_sync, batch)
        return clock.wait_until(future, clock.monotonic() + _FOREVER)

    def _bg_join_scope(self, loop: Any) -> Tuple[_Collector, Any]:
        """Claim the instance; the collector of its batch, and the context to send it in."""
        marker: list = []
        if self.__dict__.setdefault('_bg_used', marker) is not marker:
            raise BlackgateError('this %s instance has already run; a collapser instance runs '
                                 'once: create a new one for each call' % (type(self).__name__,))
        cls = type(self)
        if cls.scope == GLOBAL:
            scope, context = component.global_scope, None
        else:
            context = current()
            if context is None:
                raise BlackgateError(
                    "%s has scope 'request' but was called outside any request context; "
                    "call it inside `with component.request_context():` (HTTPProxy and "
                    "RequestContextMixin open one per request; a thread of yours gets the "
                    "caller's with context.wrap()), or set scope = 'global'"
                    % (cls.__name__,))
            scope = context.scope
        collector = scope.get((Collapser, cls, loop), _Collector)
        return collector, context

    # -- what happened -----------------------------------------------------------------

    @property
    def batch_command(self) -> Optional[Command]:
        """The batch command that answered this call (its ``events``); None before it was sent."""
        return self._bg_command

    def __repr__(self) -> str:
        command = self._bg_command
        return '<%s %s %s>' % (type(self).__name__, type(self).collapser_key,
                               'not sent' if command is None else repr(command))


# -- sending a batch ---------------------------------------------------------------------

def _in(context: Any, function: Any, *args: Any) -> None:
    """Run ``function`` in the request context of the batch; a global batch in none."""
    if context is None:
        contextvars.Context().run(function, *args)
    else:
        context.run(function, *args)


def _prepare(batch: _Batch) -> Optional[Command]:
    """The batch command, from the first request's collapser; None if that failed (all told)."""
    first = batch.requests[0].collapser
    arguments = [request.argument for request in batch.requests]
    cls = type(first)
    component.collapser_metrics(cls.collapser_key).record_batch(
        len(arguments), (cls.max_requests_in_batch, cls.timer_delay, cls.scope))
    try:
        command = first.create_command(arguments)
        if not isinstance(command, Command):
            raise TypeError('%s.create_command() returned %r; it must return a Command '
                            'instance for the batch' % (type(first).__name__, command))
    except BaseException as exc:
        _user_code_failed(first, 'create_command', exc)
        _answer_all(batch, None, exc)
        if not isinstance(exc, Exception):
            raise
        return None
    for request in batch.requests:
        request.collapser._bg_command = command
    return command


def _send_when_due(collector: _Collector, batch: _Batch) -> None:
    if collector.close(batch):   # else it filled up, and was sent then
        _send_async(batch)


def _send_async(batch: _Batch) -> None:
    """On the IOLoop: send the batch with the command's ``queue()``; answer everyone when done."""
    command = _prepare(batch)
    if command is None:
        return
    try:
        future = command.queue()
    except BaseException as exc:
        _answer_all(batch, None, exc)
        if not isinstance(exc, Exception):
            raise
        return

    def done(future: Any) -> None:
        if future.cancelled():
            _answer_all(batch, None, BlackgateError('the batch command was cancelled'))
            return
        command.mark_collapsed(len(batch.requests))
        error = future.exception()
        _finish(batch, None if error is not None else future.result(), error)

    future.add_done_callback(done)


def _send_sync(batch: _Batch) -> None:
    """On the batch's first thread: send it with the command's ``execute()``; answer everyone."""
    command = None
    try:
        command = _prepare(batch)
        if command is None:
            return
        try:
            value = command.execute()
        except Exception as exc:
            command.mark_collapsed(len(batch.requests))
            _finish(batch, None, exc)
        else:
            command.mark_collapsed(len(batch.requests))
            _finish(batch, value, None)
    except BaseException as exc:   # KeyboardInterrupt...: nobody may be left waiting
        _answer_all(batch, None, exc, only_pending=True)
        raise


def _finish(batch: _Batch, value: Any, error: Optional[BaseException]) -> None:
    if error is not None:
        _answer_all(batch, None, error)
        return
    first = batch.requests[0].collapser
    arguments = [request.argument for request in batch.requests]
    try:
        results = list(first.map_response(value, arguments))
    except BaseException as exc:
        _user_code_failed(first, 'map_response', exc)
        _answer_all(batch, None, exc)
        if not isinstance(exc, Exception):
            raise
        return
    if len(results) != len(arguments):
        error = BlackgateError(
            'collapser %r: map_response() returned %d results for a batch of %d requests; it '
            'must return one result per argument, in the order of `arguments`'
            % (type(first).collapser_key, len(results), len(arguments)))
        log.warning('%s', error)
        _answer_all(batch, None, error)
        return
    for request, result in zip(batch.requests, results):
        request.settle(result, None)


def _answer_all(batch: _Batch, value: Any, error: Optional[BaseException],
                only_pending: bool = False) -> None:
    for request in batch.requests:
        if only_pending and request.future.done():
            continue
        try:
            request.settle(value, error)
        except Exception:   # (InvalidStateError: answered already) one must not stop the rest
            log.debug('collapsed request answered twice', exc_info=True)


def _user_code_failed(collapser: Collapser, method: str, exc: BaseException) -> None:
    log.warning('collapser %s: %s() raised %s: %s; every request of the batch gets it',
                type(collapser).collapser_key, method, type(exc).__name__, exc, exc_info=exc)
