"""The request context: what the commands run for one incoming request share.

Hystrix's ``HystrixRequestContext``, built on :mod:`contextvars`: open one per
incoming request, and the commands run inside it share a request cache
(a command with ``cache_key()`` runs once per key), request-scoped collapsers
(many small calls gathered into one batch) and a request log (what ran, with
its events and times)::

    with component.request_context():          # or: async with
        user = GetUser(42).execute()
        again = GetUser(42).execute()          # from the cache: RESPONSE_FROM_CACHE
        print(component.request_log())         # GetUser[SUCCESS][3ms], GetUser[...]

A context variable follows coroutines and the tasks they start (each task
starts with a copy of its creator's context), and ``asyncio.to_thread`` copies
it to its thread. A plain ``threading.Thread`` or an executor starts with an
empty context: hand it the request's with :meth:`RequestContext.wrap`::

    with component.request_context() as context:
        thread = threading.Thread(target=context.wrap(work))

Tornado handlers get one per request from :class:`RequestContextMixin`, and
:class:`~blackgate.HTTPProxy` opens one itself.

.. warning::

   One context may be used by many threads and coroutines at once (the commands
   of one request, run in parallel): its cache, scopes and log are guarded by a
   lock of its own, held only to look up or add an entry; no user code runs
   under it. Enter a context object once (``with`` or ``async with``); lend it
   to threads with :meth:`~RequestContext.wrap` or :meth:`~RequestContext.run`.
"""
import concurrent.futures
import contextvars
import threading
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, TypeVar

__all__ = ('RequestContext', 'RequestLog', 'RequestContextMixin', 'Scope', 'current',
           'REQUEST_CONTEXT', 'MAX_LOGGED_COMMANDS')

_T = TypeVar('_T')

#: Commands a request log keeps; later ones are counted in ``RequestLog.dropped``
#: (Hystrix's limit: a context held open by mistake must not grow without end).
MAX_LOGGED_COMMANDS = 1000

#: The context variable holding the current :class:`RequestContext` (None outside any);
#: ``REQUEST_CONTEXT.get()`` is what :func:`current` returns, for hot paths.
REQUEST_CONTEXT: 'contextvars.ContextVar[Optional[RequestContext]]' = contextvars.ContextVar(
    'blackgate_request_context', default=None)
_current = REQUEST_CONTEXT


def current() -> Optional['RequestContext']:
    """The request context of the calling code, or None outside any."""
    return _current.get()


class Scope:
    """Named state that lives as long as its owner (a request context, or the registry).

    ``get(key, factory)`` returns the object stored under ``key``, made by
    ``factory()`` the first time: collapsers keep their pending batches here.
    """

    __slots__ = ('_lock', '_items')

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: Dict[Any, Any] = {}

    def get(self, key: Any, factory: Callable[[], _T]) -> _T:
        """The object under ``key``; ``factory()`` makes it (under the lock) if there is none."""
        item = self._items.get(key)
        if item is None:
            with self._lock:
                item = self._items.get(key)
                if item is None:
                    item = self._items[key] = factory()
        return item

    def __len__(self) -> int:
        return len(self._items)


class CachedOutcome:
    """The outcome of the first command run for one cache key, shared by the later ones.

    ``future`` is a ``concurrent.futures.Future`` of ``run``'s value (or error);
    ``command`` the instance that ran. Thread-safe, as its future is.
    """

    __slots__ = ('command', 'future')

    def __init__(self, command: Any) -> None:
        self.command = command
        self.future: 'concurrent.futures.Future[Any]' = concurrent.futures.Future()

    def __repr__(self) -> str:
        return '<CachedOutcome %r %s>' % (self.command,
                                          'done' if self.future.done() else 'pending')


class RequestLog:
    """The commands started in one request context, in the order they started.

    Hystrix's ``HystrixRequestLog``: ``str(log)`` (or :meth:`summary`) is one line
    for an access log, ``GetUser[SUCCESS][3ms], GetUser[SUCCESS, RESPONSE_FROM_CACHE][0ms]x2``:
    commands with the same key and events are grouped, their ``run()`` times
    summed, and ``xN`` tells how many. A command still running shows
    ``[Executed]``.
    """

    __slots__ = ('_commands', 'dropped')

    def __init__(self) -> None:
        self._commands: List[Any] = []
        #: commands started after the log held :data:`MAX_LOGGED_COMMANDS`
        self.dropped = 0

    def add(self, command: Any) -> None:
        """Note one command (called by the pipeline as the command starts)."""
        commands = self._commands
        if len(commands) < MAX_LOGGED_COMMANDS:
            commands.append(command)   # list.append is atomic: no lock
        else:
            self.dropped += 1

    @property
    def commands(self) -> Tuple[Any, ...]:
        """The command instances, in the order they started."""
        return tuple(self._commands)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.commands)

    def __len__(self) -> int:
        return len(self._commands)

    def __bool__(self) -> bool:
        return True   # an empty log is still a log (``if log:`` means "in a context")

    def summary(self) -> str:
        """The log as one line, in Hystrix's ``getExecutedCommandsAsString()`` format."""
        counts: Dict[str, int] = {}
        times: Dict[str, float] = {}
        for command in self.commands:
            events = command.events
            display = '%s[%s]' % (type(command).command_key,
                                  ', '.join(event.value for event in events) if events
                                  else 'Executed')
            counts[display] = counts.get(display, 0) + 1
            times[display] = times.get(display, 0.0) + (command.execution_time or 0.0)
        parts = []
        for display, count in counts.items():
            part = '%s[%dms]' % (display, round(times[display] * 1000.0))
            parts.append(part + ('x%d' % (count,) if count > 1 else ''))
        if self.dropped:
            parts.append('... %d more' % (self.dropped,))
        return ', '.join(parts)

    __str__ = summary

    def __repr__(self) -> str:
        return '<RequestLog %d commands>' % (len(self._commands) + self.dropped,)


#: Guards the first use of a context's cache, scope or log (rare: once per context and kind).
_first_use = threading.Lock()


class RequestContext:
    """One request's shared state: its cache, its request-scoped collapsers, its log.

    Make one with ``component.request_context()``; use it as ``with`` or
    ``async with``. Inside, :func:`current` returns it. Making one costs
    little (its cache and scopes are made only when a command uses them).
    """

    __slots__ = ('_cache', '_scope', '_log', '_tokens', '__weakref__')

    def __init__(self) -> None:
        self._cache: Optional[Dict[Tuple[str, str], CachedOutcome]] = None
        self._scope: Optional[Scope] = None
        # made now: nearly every context logs a command (made on first use, it would take
        # a lock then, which costs more than the list)
        self._log = RequestLog()
        self._tokens: Optional[List['contextvars.Token[Optional[RequestContext]]']] = None

    # -- entering and leaving ------------------------------------------------------------

    def __enter__(self) -> 'RequestContext':
        token = _current.set(self)
        tokens = self._tokens
        if tokens is None:
            self._tokens = [token]
        else:
            tokens.append(token)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    async def __aenter__(self) -> 'RequestContext':
        return self.__enter__()

    async def __aexit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        """Leave the context: the code that entered it sees the one it was in before."""
        if not self._tokens:
            return
        token = self._tokens.pop()
        try:
            _current.reset(token)
        except ValueError:
            # Left from another contextvars.Context than the one that entered it (a
            # Tornado on_finish() run from a callback): that one is left as it is, and
            # the one here must not keep this context either.
            if _current.get() is self:
                _current.set(token.old_value if token.old_value is not token.MISSING
                             else None)

    def run(self, function: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """Call ``function(*args, **kwargs)`` with this context current, on this thread."""
        token = _current.set(self)
        try:
            return function(*args, **kwargs)
        finally:
            _current.reset(token)

    def wrap(self, function: Callable[..., _T]) -> Callable[..., _T]:
        """``function`` made to run in this context, wherever it is called (a thread's target)."""
        def in_context(*args: Any, **kwargs: Any) -> _T:
            return self.run(function, *args, **kwargs)
        in_context.__wrapped__ = function   # type: ignore[attr-defined]
        return in_context

    # -- what the pipeline and the collapsers use ----------------------------------------

    def cached(self, command_key: str, cache_key: str, command: Any
               ) -> Tuple[CachedOutcome, bool]:
        """The outcome cached for the key, and whether ``command`` is the first (it must run)."""
        cache = self._cache
        if cache is None:
            with _first_use:
                cache = self._cache
                if cache is None:
                    cache = self._cache = {}
        key = (command_key, cache_key)
        entry = cache.get(key)
        if entry is not None:
            return entry, False
        mine = CachedOutcome(command)
        # dict.setdefault is atomic (str keys): of two callers racing, one is first
        entry = cache.setdefault(key, mine)
        return entry, entry is mine

    @property
    def scope(self) -> Scope:
        """State kept for as long as this context: request-scoped collapsers use it."""
        scope = self._scope
        if scope is None:
            with _first_use:
                scope = self._scope
                if scope is None:
                    scope = self._scope = Scope()
        return scope

    @property
    def log(self) -> RequestLog:
        """The :class:`RequestLog` of the commands started in this context."""
        return self._log

    def log_command(self, command: Any) -> None:
        """Note a command started in this context (the pipeline calls it)."""
        self._log.add(command)

    @property
    def cache_size(self) -> int:
        """How many cache keys hold an outcome (or a call still running)."""
        cache = self._cache
        return 0 if cache is None else len(cache)

    def __repr__(self) -> str:
        log = self._log
        return '<RequestContext %d cached, %d logged>' % (self.cache_size,
                                                          len(log) + log.dropped)


class RequestContextMixin:
    """A Tornado ``RequestHandler`` mixin: one request context per incoming request.

    ::

        class UserHandler(RequestContextMixin, tornado.web.RequestHandler):
            async def get(self, user_id):
                user = await GetUser(user_id).queue()     # cached within this request
                ...

    The context opens in ``prepare()`` and closes in ``on_finish()``; a handler
    that defines either calls ``super()``. ``self.request_context`` is the context
    (for an access log: ``str(handler.request_context.log)``).
    """

    request_context: Optional[RequestContext] = None

    def prepare(self) -> Any:
        context = self.request_context = RequestContext()
        context.__enter__()
        return super().prepare()   # type: ignore[misc]

    def on_finish(self) -> None:
        context = self.request_context
        if context is not None:
            context.close()
        super().on_finish()   # type: ignore[misc]
