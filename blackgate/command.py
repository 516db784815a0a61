"""Command: one decision core, two drivers.

Every execution goes through the same steps (docs/guide.rst, "The pipeline"):
the breaker gate, admission to a bulkhead, ``run()``, the outcome, the
fallback, and the bookkeeping (metrics, breaker, listeners, one log record).
One object per execution, ``_Execution``, holds its state and makes
every decision; ``execute()`` carries them out on the calling thread and
blocks, ``queue()`` on the IOLoop and returns a future at once.

.. warning::

   ``execute()`` blocks its thread, so it refuses to run on the thread of a
   running IOLoop: use ``await cmd.queue()`` there. A synchronous ``run()``
   always runs on a worker thread of its group's pool; an ``async def run()``
   runs on the IOLoop and needs ``queue()``. Python cannot interrupt a thread:
   after a timeout the caller gets the fallback at once, while the worker
   stays busy until ``run()`` returns and its late result is dropped.
"""
import asyncio
import concurrent.futures
import inspect
import logging
import sys
import threading
import types
from typing import Any, Callable, Dict, Optional, Tuple

from .breaker import DENY, TRIAL
from .clock import TimeoutError as _WaitTimeout
from .config import COMMAND_DEFAULTS, CommandSettings, check_class_attributes, check_value
from .context import REQUEST_CONTEXT, RequestContext
from .errors import (BadRequest, BlackgateError, CommandError, CommandTimeout, Rejected,
                     ShortCircuited)
from .events import FAILURE_TYPE_OF, Event, FailureType
from .logs import BUG_ATTRIBUTE, PROGRAMMING_ERRORS
from .pools import LimitedPermits
from .registry import component
from .retry import GIVE_UP, RetryPolicy

__all__ = ('Command', 'DeferredOutcome')

log = logging.getLogger('blackgate')

_get_running_loop = asyncio._get_running_loop   # public in asyncio.events.__all__; cheap, no raise
_EAGER = sys.version_info >= (3, 12)
_COROUTINE = types.CoroutineType

# Module constants: reading Event.X goes through the enum's metaclass (50 ns on 3.11).
SUCCESS = Event.SUCCESS
BAD_REQUEST = Event.BAD_REQUEST
FAILURE = Event.FAILURE
TIMEOUT = Event.TIMEOUT
SHORT_CIRCUITED = Event.SHORT_CIRCUITED
THREAD_POOL_REJECTED = Event.THREAD_POOL_REJECTED
SEMAPHORE_REJECTED = Event.SEMAPHORE_REJECTED
FALLBACK_SUCCESS = Event.FALLBACK_SUCCESS
FALLBACK_FAILURE = Event.FALLBACK_FAILURE
FALLBACK_MISSING = Event.FALLBACK_MISSING
FALLBACK_REJECTION = Event.FALLBACK_REJECTION
RESPONSE_FROM_CACHE = Event.RESPONSE_FROM_CACHE
COLLAPSED = Event.COLLAPSED
_FROM_CACHE_ONLY = (RESPONSE_FROM_CACHE,)
_COLLAPSED_ONLY = (COLLAPSED,)
_context_get = REQUEST_CONTEXT.get
#: The longest a cache hit waits for the call it shares (about 11.6 days: for ever); that
#: call's own timeout and fallback bound it long before.
_FOREVER = 1_000_000.0
RETRY = Event.RETRY
RETRY_BUDGET_EXHAUSTED = Event.RETRY_BUDGET_EXHAUSTED
_SUCCESS_ONLY = (SUCCESS,)
_BAD_REQUEST_ONLY = (BAD_REQUEST,)
_FAILED_LATE = (FAILURE,)   # after the caller had its answer: no fallback can run
# what a fallback (or an async def run()) raising goes on up, after it was recorded and answered
_ESCAPING = (KeyboardInterrupt, SystemExit)
_CAUSE_LOCK = threading.Lock()   # a cause built on first read: one object for every reader
_QUIET_PRIMARY = frozenset((SHORT_CIRCUITED, THREAD_POOL_REJECTED,
                            SEMAPHORE_REJECTED))
# the events whose cause is built from the runtime when first read (a rejection's is
# built at once: it tells how full the pool was then)
_BUILT_CAUSE = frozenset((SHORT_CIRCUITED, SEMAPHORE_REJECTED, TIMEOUT))
# primary event -> the events of an execution whose fallback then returned
_FELL_BACK = {event: (event, FALLBACK_SUCCESS) for event in Event}
# primary event -> what `events` reads while the fallback runs, so fallback() can see why
_PRIMARY = {event: (event,) for event in Event}


class _Runtime:
    """What the pipeline needs of a command class, resolved once per ``install()``."""

    __slots__ = ('command_key', 'name', 'settings', 'state', 'breaker', 'metrics', 'pool', 'clock',
                 'timeout', 'run_is_async', 'fallback_is_async', 'needs_loop', 'has_fallback',
                 'group_admission', 'component', 'store', 'caches', 'retry', 'emit')

    def __init__(self, cls: 'type[Command]', registry) -> None:
        command_key = cls.command_key
        check_value('command class %s' % (cls.__qualname__,), 'command_key', command_key)
        run_is_async = inspect.iscoroutinefunction(cls.run)
        group_admission = run_is_async and bool(cls.group_admission)
        settings, state, pool = registry.resolve(cls, command_key, _class_values(cls),
                                                 needs_pool=group_admission or not run_is_async)
        self.command_key = command_key
        self.name = cls.__name__
        self.settings: CommandSettings = settings
        self.state = state
        self.breaker = state.breaker
        self.metrics = state.metrics
        self.pool = pool
        self.clock = registry.clock
        self.timeout = settings.timeout if settings.timeout_enabled else None
        self.run_is_async = run_is_async
        self.fallback_is_async = inspect.iscoroutinefunction(cls.fallback)
        self.needs_loop = run_is_async or self.fallback_is_async   # so queue() only
        self.group_admission = group_admission
        self.has_fallback = settings.fallback_enabled and cls.fallback is not Command.fallback
        #: the retry policy, or None: no retries, and the pipeline takes no step for them
        self.retry = (RetryPolicy(settings.retry_attempts, settings.retry_backoff,
                                  settings.retry_on, settings.retry_on_timeout)
                      if settings.retry_attempts else None)
        self.component = registry
        self.store = registry.state_store   # fleet mode's state store, or None
        self.emit = registry.emitter        # to the listeners, or None if there are none
        #: answered from the request cache: cache_key() is defined and the cache is on
        self.caches = settings.request_cache_enabled and cls.cache_key is not Command.cache_key


def _class_values(cls: type) -> Dict[str, Any]:
    """Settings defined on ``cls`` or a class between it and Command: they count as set."""
    values: Dict[str, Any] = {}
    for klass in cls.__mro__:
        if klass is Command:
            break
        for name in COMMAND_DEFAULTS:
            if name not in values and name in vars(klass):
                values[name] = vars(klass)[name]
    return values


# class -> its runtime: the hot path's one lookup. Owned here; the registry says when it
# is stale (install(), shutdown(), reset(), a new clock, a listener added or removed).
_RUNTIMES: Dict[type, _Runtime] = {}
_RUNTIMES_LOCK = threading.Lock()   # one builder at a time; taken before the registry's
_cleared = [0]                      # how many times the registry cleared the cache


def _invalidate() -> None:
    """The registry's hook (called under its lock: takes no lock of its own)."""
    _cleared[0] += 1
    _RUNTIMES.clear()


def _runtime(cls: type) -> _Runtime:
    runtime = _RUNTIMES.get(cls)
    if runtime is None:
        with _RUNTIMES_LOCK:
            runtime = _RUNTIMES.get(cls)
            if runtime is None:
                seen = _cleared[0]
                runtime = _RUNTIMES[cls] = _Runtime(cls, component)
                if _cleared[0] != seen and _RUNTIMES.get(cls) is runtime:
                    # An install() ran while it was built: it may hold the old pool or
                    # settings, so this call uses it and nobody keeps it. (One that runs
                    # after this check clears it itself.)
                    del _RUNTIMES[cls]
    return runtime


component.add_invalidation_hook(_invalidate)



def _cause(rt: _Runtime, event: Event, raised: Optional[BaseException] = None
           ) -> BaseException:
    """What made the execution fail: ``raised`` (what run() raised), or one built for ``event``."""
    if raised is not None:
        return raised
    key = rt.command_key
    if event is SHORT_CIRCUITED:
        if rt.breaker.force_open:
            return ShortCircuited('%s: circuit breaker forced open' % (key,))
        return ShortCircuited('%s: circuit breaker is open' % (key,))
    if event is THREAD_POOL_REJECTED:
        pool = rt.pool
        while pool.successor is not None:   # replaced by install(): the one that refused
            pool = pool.successor
        if pool.is_shut_down:
            return Rejected('%s: executor pool %r is shut down' % (key, pool.group_key))
        if pool.limit is not None:
            return Rejected('%s: executor pool %r is at its adaptive concurrency limit (%d '
                            'running, limit %d of %d workers)' % (key, pool.group_key,
                                                                  pool.in_flight, pool.limit,
                                                                  pool.max_workers))
        return Rejected('%s: executor pool %r is full (%d workers busy, %d of %d queue slots '
                        'taken)' % (key, pool.group_key, pool.active_count, pool.queue_size,
                                    pool.max_queue_size))
    if event is SEMAPHORE_REJECTED:
        permits = rt.state.run_permits
        if isinstance(permits, LimitedPermits):
            return Rejected('%s: %d concurrent executions already running (its adaptive '
                            'concurrency limit, of max_concurrent_requests %d)'
                            % (key, permits.limit, permits.limiter.max))
        return Rejected('%s: %d concurrent executions already running (max_concurrent_requests)'
                        % (key, permits.limit))
    return CommandTimeout('%s: run() did not finish within %.3f s' % (key, rt.timeout or 0.0))


def _log_failure(rt: _Runtime, events: Tuple[Event, ...], cause: Optional[BaseException],
                 error: Optional[CommandError]) -> None:
    primary = events[0]
    level = logging.INFO if primary in _QUIET_PRIMARY and error is None else logging.WARNING
    if not log.isEnabledFor(level):
        return
    exc_info = None
    if primary is FAILURE and getattr(cause, 'log_traceback', True):
        # A cause whose class sets log_traceback = False (the proxy's UpstreamError:
        # refused, reset, timed out, 5xx) says all in its message: one line, no stack.
        exc_info = cause
    elif error is not None and error.fallback_exception is not None:
        exc_info = error.fallback_exception
    outcome = ', '.join(event.value for event in events[1:])
    if error is not None and error.fallback_exception is not None:
        fallback_error = error.fallback_exception
        outcome += ' (%s: %s)' % (type(fallback_error).__name__, fallback_error)
    # A bug in run() is marked, so that a program that configured no logging still sees it
    # once per command key (blackgate/logs.py); configured logging is not affected.
    extra = ({BUG_ATTRIBUTE: rt.command_key}
             if primary is FAILURE and isinstance(cause, PROGRAMMING_ERRORS) else None)
    log.log(level, '%s %s: %s -> %s', rt.command_key, primary.value,
            '%s: %s' % (type(cause).__name__, cause) if cause is not None else '-',
            outcome, exc_info=exc_info, extra=extra)




# -- the decision core --------------------------------------------------------------------

def _classify(error: Optional[BaseException], finished: float,
              deadline: Optional[float]) -> Event:
    """What one run() produced, as the event it counts as: the one classification.

    ``deadline`` None: nothing to check (no timeout, or the timer interrupts the
    run itself, as for an ``async def run()``); an answer at or after it came too late.
    """
    if deadline is not None and finished >= deadline:
        return TIMEOUT
    if error is None:
        return SUCCESS
    if isinstance(error, BadRequest):
        return BAD_REQUEST
    return FAILURE


#: what a worker hands back: the event run() counts as (see _classify), its value, its
#: exception, and the seconds it took
_Outcome = Tuple[Event, Any, Optional[BaseException], float]
_SKIPPED: Any = (None, None, None, 0.0)   # a run() skipped: its caller had its answer
_CALL_DEADLINE: Any = object()   # work(): classify by the call's own deadline


class _Execution:
    """One execution of one command instance: its state, and its decisions.

    This class is an ``execute()``'s; :class:`_QueuedExecution` adds what a
    ``queue()`` needs (the future, the timer, the IOLoop steps).

    The drivers (:meth:`Command.execute`, :meth:`Command.queue`) only start the
    work and wait for it; every decision is one method here, whichever driver
    waits:

    * :meth:`decide`: the gate: the first outcome (the answer, the timeout) wins,
      and it cancels the timer and the task the others would have come from;
    * :func:`_classify`: what ``run()`` produced, as an event;
    * :meth:`settle`: that event, to the answer or to the fallback;
    * :meth:`fall_back` and :meth:`fallback_ended`: the fallback policy (whether
      one may run, what its value or exception becomes, which exceptions escape);
    * :meth:`record`: the record step (events, metrics, breaker, fleet, listeners,
      one log record);
    * :meth:`answer`: hands the outcome to the caller (returns or raises here; sets
      the future unless cancelled in :class:`_QueuedExecution`).

    Where the next outcomes hook in: a retry loop goes in :meth:`settle`, where a
    retryable event would start another attempt (breaker check, admission, its
    share of the timeout: what the drivers do before they wait) instead of calling
    :meth:`fall_back`; between attempts ``execute()`` sleeps and ``queue()`` arms an
    IOLoop timer, and one overall deadline bounds them all. An answer served from
    a cache or shared with another execution is a short path in the drivers, before
    ``allow_request()``: it calls :meth:`record` with its own event and
    :meth:`answer`, and never reaches the pool.
    """

    __slots__ = ('rt', 'start', 'token', 'events', 'exception', 'execution_time', 'decided')

    # what a queued execution has in slots; an execute() has none of them
    future: Optional['asyncio.Future[Any]'] = None
    timer: Any = None
    task: Optional['asyncio.Future[Any]'] = None
    run_started: Optional[float] = None

    # No __init__: on Python 3.11 calling one costs a short-circuit a tenth of its
    # bookkeeping. Made by _begin() (execute() does the same inline), or by
    # _QueuedExecution's __init__.
    rt: _Runtime
    start: float
    token: int
    events: Tuple[Event, ...]
    exception: Optional[BaseException]
    execution_time: Optional[float]
    decided: bool

    # -- the gate ------------------------------------------------------------------

    def decide(self) -> bool:
        """True for the first outcome to arrive, False for any later one.

        Called on the thread that waits (the caller's in ``execute()``, the IOLoop's in
        ``queue()``). The winner stops what the losers would come from: the timer,
        and a coroutine's task (which, unlike a thread, can be interrupted).
        """
        if self.decided:
            return False
        self.decided = True
        timer = self.timer
        if timer is not None:
            timer.cancel()
        task = self.task
        if task is not None:
            task.cancel()
        return True

    # -- on a worker thread --------------------------------------------------------

    def work(self, release: Callable[[], Any], command: 'Command',
             hand_over: Optional[Callable[['_Outcome'], None]] = None,
             deadline: Any = _CALL_DEADLINE) -> '_Outcome':
        """On a worker thread: run(), classified, with its value or exception and its time.

        An answer after ``deadline`` (by default the call's: its start plus ``timeout``)
        is a ``TIMEOUT``; a retried attempt passes its own.

        Frees the pool slot (``release``) before ``hand_over`` wakes the IOLoop, so that
        whoever the result wakes finds the pool free again. (Classified here, off the
        waiting thread: right after its wake-up every step costs it three times as much.)
        """
        if self.decided:
            # Timed out while waiting in the pool's queue: the caller has its answer, and
            # nobody wants this call made any more (Hystrix skips it too).
            release()
            return _SKIPPED
        rt = self.rt
        metrics = rt.metrics
        monotonic = rt.clock.monotonic
        metrics.execution_started()
        started = monotonic()
        try:
            value, error = command.run(), None
        except BaseException as exc:  # handed to the caller, never lost in the pool
            value, error = None, exc
        finished = monotonic()
        metrics.execution_finished()
        release()
        if deadline is _CALL_DEADLINE:
            timeout = rt.timeout
            deadline = None if timeout is None else self.start + timeout
        outcome = (_classify(error, finished, deadline), value, error, finished - started)
        if hand_over is not None:
            hand_over(outcome)
        return outcome

    # -- the outcome of an attempt -------------------------------------------------

    def settle(self, command: 'Command', event: Event, value: Any,
               error: Optional[BaseException], elapsed: float) -> Any:
        """What ``run()`` produced (classified as ``event``) becomes the answer or the fallback.

        (A retry loop would go here: a retryable event starts another attempt.)
        """
        if event is SUCCESS:
            self.record(_SUCCESS_ONLY, elapsed, None)
            return self.answer(value, None)
        if event is BAD_REQUEST:
            self.record(_BAD_REQUEST_ONLY, elapsed, error)
            return self.answer(None, error)
        if event is TIMEOUT:   # answered, but after the deadline: as if the timer had fired
            return self.fall_back(command, TIMEOUT, self.rt.clock.monotonic() - self.start,
                                  None)
        return self.fall_back(command, FAILURE, elapsed, error)

    # -- the fallback policy -------------------------------------------------------
    #
    # The usual outcome (the fallback ran and returned) takes no lock, builds no
    # exception and makes no log call when INFO is off: a short-circuit must cost
    # little more than calling fallback() directly. The rest is the slow path.

    def fall_back(self, command: 'Command', event: Event, elapsed: Optional[float],
                  error: Optional[BaseException]) -> Any:
        """The execution failed as ``event``: run the fallback if one may, and answer.

        ``error`` is what ``run()`` raised; None means the cause is built from
        ``event``, and only when somebody reads it.
        """
        rt = self.rt
        permits = rt.state.fallback_permits
        if not (rt.has_fallback and permits.try_acquire()):
            cause = _cause(rt, event, error)
            if not rt.has_fallback:
                events = (event, FALLBACK_MISSING)
                denied = CommandError(rt.command_key, FAILURE_TYPE_OF[event], cause, None,
                                      'no fallback is available (FALLBACK_MISSING)')
            else:
                events = (event, FALLBACK_REJECTION)
                denied = CommandError(
                    rt.command_key, FailureType.REJECTED_SEMAPHORE_FALLBACK, cause, None,
                    'the fallback was rejected: %d fallbacks already running '
                    '(FALLBACK_REJECTION)' % (permits.limit,))
            denied.__cause__ = cause
            self.record(events, elapsed, cause, denied)
            return self.answer(None, denied)
        # What fallback() may read (Hystrix's getExecutionException()): the primary event,
        # and the cause (built from the event on first read when `error` is None).
        self.events = _PRIMARY[event]
        if error is not None:
            self.exception = error
        try:
            value = command.fallback()
        except BaseException as exc:   # counted and answered whatever it is
            return self.fallback_ended(event, elapsed, error, None, exc)
        if type(value) is _COROUTINE or rt.fallback_is_async:
            return self.await_fallback(command, event, elapsed, error, value)
        permits.release()   # the usual end, as fallback_ended() would: one frame less
        self.record(_FELL_BACK[event], elapsed, error)
        return self.answer(value, None)

    def await_fallback(self, command: 'Command', event: Event, elapsed: Optional[float],
                       error: Optional[BaseException], value: Any) -> Any:
        """fallback() gave a coroutine, which execute() cannot await: a FALLBACK_FAILURE."""
        value.close()
        return self.fallback_ended(event, elapsed, error, None, TypeError(
            '%s.fallback() returned a coroutine, which execute() cannot await; make '
            'fallback() return its value, or use `await cmd.queue()`'
            % (type(command).__name__,)))

    def fallback_ended(self, event: Event, elapsed: Optional[float],
                       error: Optional[BaseException], value: Any,
                       exc: Optional[BaseException], escape: bool = True) -> Any:
        """The fallback returned ``value`` or raised ``exc``: record it and answer.

        The exception rule, the same for both drivers: whatever the fallback raised is a
        FALLBACK_FAILURE and the caller gets a :class:`CommandError` carrying it;
        KeyboardInterrupt and SystemExit then go on up (``escape``: unless they already
        did, out of a fallback's task), after the outcome was recorded and answered.
        """
        rt = self.rt
        rt.state.fallback_permits.release()
        if exc is None:
            self.record(_FELL_BACK[event], elapsed, error)
            return self.answer(value, None)
        cause = _cause(rt, event, error)
        failed = CommandError(rt.command_key, FAILURE_TYPE_OF[event], cause, exc,
                              'the fallback failed (FALLBACK_FAILURE: %s: %s)'
                              % (type(exc).__name__, exc))
        failed.__cause__ = exc
        self.record((event, FALLBACK_FAILURE), elapsed, cause, failed)
        return self.answer(None, failed, exc if escape and isinstance(exc, _ESCAPING) else None)

    # -- the record step -----------------------------------------------------------

    def record(self, events: Tuple[Event, ...], elapsed: Optional[float],
               cause: Optional[BaseException], error: Optional[CommandError] = None) -> None:
        """Record the outcome: its state here, metrics, breaker, listeners, one log record.

        ``cause`` None on a failed outcome means it is built from the event when read.
        """
        self.events = events
        if cause is not None:
            self.exception = cause
        self.execution_time = elapsed
        rt = self.rt
        now = rt.clock.monotonic()
        total = now - self.start
        if self.token == TRIAL:
            # Decide first, so that a successful trial's own success starts the fresh window.
            rt.breaker.trial_finished(events[0] is SUCCESS)
            rt.metrics.record(events, elapsed, total, now)
        else:
            health = rt.metrics.record(events, elapsed, total, now)
            if health is not None:
                rt.breaker.evaluate(health)
        store = rt.store
        if store is not None:   # fleet mode: counted here, sent in batches by its thread
            store.pending.append((rt.command_key, events, rt.clock.wall()))
        emit = rt.emit
        if emit is not None:
            emit(rt.command_key, events)
        primary = events[0]
        if primary is SUCCESS or primary is BAD_REQUEST:
            return
        if error is None and primary in _QUIET_PRIMARY and not log.isEnabledFor(logging.INFO):
            return   # a short-circuit or rejection that fell back: logged at INFO
        _log_failure(rt, events, self.cause(), error)

    def from_cache(self, first: 'Command') -> None:
        """A cache hit's short path: the first call's events and cause, plus RESPONSE_FROM_CACHE.

        Counted as Hystrix counts a hit: ``RESPONSE_FROM_CACHE`` alone, with no execution,
        so that the breaker's counts see only the call that ran.
        """
        self.events = first.events + _FROM_CACHE_ONLY
        self.exception = first.execution_exception
        rt = self.rt
        now = rt.clock.monotonic()
        health = rt.metrics.record(_FROM_CACHE_ONLY, None, now - self.start, now)
        if health is not None:
            rt.breaker.evaluate(health)
        self.note(_FROM_CACHE_ONLY)

    def collapsed(self, requests: int) -> None:
        """After it ran: this execution answered a batch of ``requests`` collapsed requests."""
        self.events = self.events + _COLLAPSED_ONLY
        self.rt.metrics.count(COLLAPSED, requests)   # Hystrix counts the requests
        self.note(_COLLAPSED_ONLY)

    def note(self, events: Tuple[Event, ...]) -> None:
        """Tell the fleet store and the listeners of ``events`` (counted by the caller)."""
        rt = self.rt
        store = rt.store
        if store is not None:
            store.pending.append((rt.command_key, events, rt.clock.wall()))
        emit = rt.emit
        if emit is not None:
            emit(rt.command_key, events)

    # -- the answer ----------------------------------------------------------------

    def answer(self, value: Any, failure: Optional[BaseException],
               escaping: Optional[BaseException] = None) -> Any:
        """Hand the outcome to the caller of ``execute()``: return it, or raise."""
        if escaping is not None:
            raise escaping
        if failure is not None:
            raise failure
        return value

    # -- what the public properties read -------------------------------------------

    def cause(self) -> Optional[BaseException]:
        """What made run() fail; a timeout's, rejection's or short-circuit's built on first read.

        (Nobody reads most short-circuits' causes; the lock makes two threads reading at
        once agree on one object.)
        """
        cause = self.exception
        if cause is None and self.events and self.events[0] in _BUILT_CAUSE:
            with _CAUSE_LOCK:
                cause = self.exception
                if cause is None:
                    cause = self.exception = _cause(self.rt, self.events[0])
        return cause

    def __repr__(self) -> str:   # as its command's: what shutdown() names a stuck worker by
        if self.rt is None:
            return '<not run>'
        return '<%s %s %s>' % (self.rt.name, self.rt.command_key,
                               '/'.join(event.value for event in self.events) or 'not run')


class _QueuedExecution(_Execution):
    """One execution under ``queue()``: its future, its timer, and the IOLoop steps."""

    __slots__ = ('command', 'loop', 'future', 'timer', 'task', 'run_started', 'release',
                 'later', 'timer_taken')

    def __init__(self, rt: _Runtime, start: float, command: 'Command', loop: Any) -> None:
        self.rt = rt
        self.start = start
        self.events = ()
        self.exception = self.execution_time = None
        self.decided = False
        self.command: Command = command
        self.loop = loop
        self.future: 'asyncio.Future[Any]' = loop.create_future()  # type: ignore[assignment]
        self.timer = None
        self.task = None
        self.run_started = None
        self.release: Callable[[], Any] = _nothing
        self.later: Optional[DeferredOutcome] = None
        self.timer_taken = False   # run() paused or restarted its timeout itself

    def answer(self, value: Any, failure: Optional[BaseException],
               escaping: Optional[BaseException] = None) -> None:
        """Resolve the future, unless its caller cancelled it; then let ``escaping`` go on."""
        # nothing after the answer needs it (it comes once: the gate saw to that), and a
        # command no longer kept by its execution is freed without the cycle collector
        self.command = None  # type: ignore[assignment]
        future = self.future
        if not future.cancelled():
            if failure is not None:
                future.set_exception(failure)
            else:
                future.set_result(value)
        if escaping is not None:
            raise escaping

    def await_fallback(self, command: 'Command', event: Event, elapsed: Optional[float],
                       error: Optional[BaseException], value: Any) -> None:
        """An ``async def fallback()`` (or one that returned a coroutine): answer when it ends."""

        def fallback_done(task: 'asyncio.Future[Any]') -> None:
            if task.cancelled():
                self.fallback_ended(event, elapsed, error, None, asyncio.CancelledError())
            else:
                exc = task.exception()
                self.fallback_ended(event, elapsed, error, None if exc else task.result(),
                                    exc, escape=False)

        asyncio.ensure_future(value).add_done_callback(fallback_done)

    # -- the timer -----------------------------------------------------------------

    def arm_timer(self, delay: float) -> None:
        self.timer = self.rt.clock.call_later(self.loop, delay, self.timed_out)

    def pause_timer(self) -> None:
        self.timer_taken = True
        timer = self.timer
        if timer is not None:
            timer.cancel()
        self.timer = None

    def timed_out(self) -> None:
        """On the IOLoop: the timer fired before run() answered."""
        if self.decide():
            self.fall_back(self.command, TIMEOUT, self.rt.clock.monotonic() - self.start, None)

    # -- a run() on a worker thread ------------------------------------------------

    def hand_over(self, outcome: '_Outcome') -> None:
        """On the worker, its pool slot already free: pass the outcome to the IOLoop."""
        try:
            self.loop.call_soon_threadsafe(self.run_returned, outcome)
        except RuntimeError:
            # The loop was closed while run() ran: nobody waits for the answer, but the
            # outcome still counts (and a trial must still close or re-open the breaker).
            if self.decide():
                event, value, error, elapsed = outcome
                self.record((event,), elapsed, error)

    def run_returned(self, outcome: '_Outcome') -> None:
        """On the IOLoop: the worker answered (perhaps after the timeout already fired)."""
        if self.decide():
            self.settle(self.command, *outcome)

    # -- an async def run() on the IOLoop ------------------------------------------

    def start_coroutine(self, command: 'Command') -> None:
        rt = self.rt
        if rt.group_admission:
            release = rt.pool.try_admit()
            if release is None:
                self.fall_back(command, THREAD_POOL_REJECTED, None,
                               _cause(rt, THREAD_POOL_REJECTED))
                return
        else:
            taken = rt.state.run_permits.try_take()   # (timed, under a learned limit)
            if taken is None:
                self.fall_back(command, SEMAPHORE_REJECTED, None, None)
                return
            release = taken
        self.release = release
        rt.metrics.execution_started()
        self.run_started = rt.clock.monotonic()
        try:
            coroutine = command.run()
        except BaseException:
            release()
            rt.metrics.execution_finished()
            raise
        loop = self.loop
        if _EAGER:   # run() starts now, and one that needs no I/O is settled with no loop pass
            task = asyncio.Task(self.drive(coroutine), loop=loop,  # type: ignore
                                eager_start=True)
        else:
            task = loop.create_task(self.drive(coroutine))
        if task.done():
            return
        self.task = task
        if rt.timeout is not None and not self.timer_taken:
            # (unless run() already paused or restarted it, in its first step)
            self.arm_timer(rt.timeout - (rt.clock.monotonic() - self.start))

    async def drive(self, coroutine: Any) -> None:
        """The task of an ``async def run()``: await it, then settle in the same step."""
        try:
            value, error = await coroutine, None
        except BaseException as exc:   # cancelled by our timeout, or anything run() raised
            value, error = None, exc
        self.task = None   # ending by itself: not to be cancelled by the gate
        later = self.later
        if later is not None:
            if error is None and not self.decided:
                self.hand_over_later(later, value)
                return
            later._void()   # run() failed or timed out after all: counted as usual
        self.release()
        rt = self.rt
        rt.metrics.execution_finished()
        if self.decide():
            finished = rt.clock.monotonic()
            self.settle(self.command, _classify(error, finished, None), value, error,
                        finished - self.run_started)   # type: ignore[operator]
        if isinstance(error, _ESCAPING):
            raise error

    def hand_over_later(self, later: 'DeferredOutcome', value: Any) -> None:
        """run() returned, but its execution goes on: answer now, count when it ends."""
        self.decide()
        rt = self.rt
        elapsed = rt.clock.monotonic() - self.run_started  # type: ignore[operator]
        if self.token == TRIAL:
            # A trial is judged by what run() returned: the breaker must not stay half-open
            # for as long as an event stream lasts.
            self.record(_SUCCESS_ONLY, elapsed, None)
            later._arm(self, elapsed, counted=True)
        else:
            later._arm(self, elapsed, counted=False)
        self.answer(value, None)

    def ended_later(self, elapsed: float, error: Optional[BaseException],
                    counted: bool) -> None:
        """On the IOLoop: the execution that outlived run() ended; free it and count it."""
        self.release()
        self.rt.metrics.execution_finished()
        if counted:
            return
        if error is None:
            self.record(_SUCCESS_ONLY, elapsed, None)
        else:
            self.record(_FAILED_LATE, elapsed, error)


# -- retries (the guide's "Retries with a budget") ---------------------------------------
#
# Only a command with retry_attempts takes these paths (its _Runtime has a policy); the
# others never reach them. The decision is the policy's (blackgate/retry.py); here it is
# carried out: each attempt goes through the breaker's check, admission and its share of
# the timeout, is counted as its own outcome, and the call's one deadline bounds them all.

class _Retries:
    """What a retried execution adds to the core: the attempts, and the decision after each.

    (No ``__slots__`` of its own: the two concrete classes below declare the names.)
    """

    rt: _Runtime
    start: float
    token: int
    events: Tuple[Event, ...]
    decided: bool
    # in the concrete classes' slots
    retries: int
    prior: Tuple[Event, ...]
    exhausted: bool
    last_error: Optional[BaseException]
    deadline: Optional[float]   # the current attempt's

    def begin_retries(self) -> None:
        self.retries = 0
        self.prior = ()
        self.exhausted = False
        self.last_error = None
        budget = self.rt.state.retry_budget
        if budget is not None:
            budget.deposit()   # every call earns its share of a retry

    def attempt_deadline(self) -> Optional[float]:
        """When this attempt times out: the call's deadline, or its share of what is left."""
        rt = self.rt
        if rt.timeout is None:
            return None
        end = self.start + rt.timeout
        policy = rt.retry
        left = policy.attempts - self.retries   # type: ignore[union-attr]
        if policy.retry_on_timeout and left > 0:   # type: ignore[union-attr]
            now = rt.clock.monotonic()
            return now + (end - now) / (left + 1)
        return end

    def after_attempt(self, command: 'Command', event: Event, error: Optional[BaseException],
                      elapsed: Optional[float]) -> Optional[float]:
        """After an attempt: the seconds to wait before the next, or None if this one is the last.

        A retried attempt is counted here, as ``(event, RETRY)``.
        """
        if event is not FAILURE and event is not TIMEOUT:
            return None
        rt = self.rt
        raised = error if event is FAILURE else None
        remaining = None if rt.timeout is None else \
            self.start + rt.timeout - rt.clock.monotonic()
        policy: RetryPolicy = rt.retry   # type: ignore[assignment]
        decision = policy.decide(self.retries, raised, event is TIMEOUT, remaining)
        if decision.action is GIVE_UP or not _may_retry(command, raised):
            return None
        budget = rt.state.retry_budget
        if budget is not None and not budget.try_withdraw():
            self.exhausted = True   # the last attempt's events say so (see record())
            return None
        self.record_attempt((event, RETRY), elapsed, raised)
        self.retries += 1
        if raised is not None:
            self.last_error = raised
        return decision.delay

    def record_attempt(self, events: Tuple[Event, ...], elapsed: Optional[float],
                       error: Optional[BaseException]) -> None:
        """Count an attempt that is retried: metrics, breaker, fleet, listeners; INFO."""
        rt = self.rt
        now = rt.clock.monotonic()
        if self.token == TRIAL:
            rt.breaker.trial_finished(False)   # the next attempt asks the breaker again
            rt.metrics.record(events, elapsed, now - self.start, now)
        else:
            health = rt.metrics.record(events, elapsed, now - self.start, now)
            if health is not None:
                rt.breaker.evaluate(health)
        self.note(events)   # type: ignore[attr-defined]   # (_Execution's, by the MRO)
        self.prior += events
        self.events = self.prior
        if log.isEnabledFor(logging.INFO):
            log.info('%s %s: %s -> RETRY (%d of %d)', rt.command_key, events[0].value,
                     '%s: %s' % (type(error).__name__, error) if error is not None else '-',
                     self.retries + 1, rt.retry.attempts)   # type: ignore[union-attr]

    def record(self, events: Tuple[Event, ...], elapsed: Optional[float],
               cause: Optional[BaseException], error: Optional[CommandError] = None) -> None:
        """The last attempt's record; the call's events are all its attempts'."""
        if self.exhausted and len(events) > 1:   # (events of one: a success, a bad request)
            events = (events[0], RETRY_BUDGET_EXHAUSTED) + events[1:]
        _Execution.record(self, events, elapsed, cause, error)  # type: ignore[arg-type]
        if self.prior:
            self.events = self.prior + self.events

    def work_attempt(self, release: Callable[[], Any], command: 'Command', attempt: int,
                     hand_over: Optional[Callable[[Any], None]] = None) -> Any:
        """:meth:`_Execution.work` for attempt number ``attempt``; a stale one is skipped."""
        if attempt != self.retries:   # queued while its attempt timed out, and another began
            release()
            return _SKIPPED
        return _Execution.work(self, release, command, hand_over,  # type: ignore[arg-type]
                               self.deadline)


def _may_retry(command: 'Command', error: Optional[BaseException]) -> bool:
    try:
        return bool(command.may_retry(error))
    except Exception:   # a bug in the hook must not vanish: logged, and no retry
        log.exception('%s.may_retry() raised; not retried', type(command).__name__)
        return False


def _pause(clock: Any, until: float) -> None:
    """Wait on ``clock`` until ``until`` (a FakeClock's advance() wakes it), on this thread."""
    if until > clock.monotonic():
        try:
            clock.wait_until(concurrent.futures.Future(), until)
        except _WaitTimeout:
            pass


class _RetriedExecution(_Retries, _Execution):
    """An ``execute()`` that may retry: :meth:`Command.execute` loops over its attempts."""

    __slots__ = ('retries', 'prior', 'exhausted', 'last_error', 'deadline')

    def run_attempts(self, command: 'Command') -> Any:
        """The driver's loop: each attempt as ``execute()`` runs one, then the decision."""
        rt = self.rt
        clock = rt.clock
        self.begin_retries()
        while True:
            self.decided = False
            token = self.token = rt.breaker.allow_request()
            if token == DENY:   # an open breaker stops the retries; the cause is the last error
                return self.fall_back(command, SHORT_CIRCUITED, None, self.last_error)
            deadline = self.deadline = self.attempt_deadline()
            future = rt.pool.try_submit(self.work_attempt, command, self.retries)
            if future is None:
                return self.fall_back(command, THREAD_POOL_REJECTED, None,
                                      _cause(rt, THREAD_POOL_REJECTED))
            try:
                if deadline is None:
                    event, value, error, elapsed = future.result()
                else:
                    event, value, error, elapsed = clock.wait_until(future, deadline)
                finished = clock.monotonic()
            except _WaitTimeout:
                self.decide()   # a run() still waiting in the queue is skipped
                value, error, event = None, None, TIMEOUT
                finished = clock.monotonic()
            if event is TIMEOUT:
                elapsed = clock.monotonic() - self.start
            delay = self.after_attempt(command, event, error, elapsed)
            if delay is None:
                return self.settle(command, event, value, error, elapsed)
            _pause(clock, finished + delay)


class _RetriedQueuedExecution(_Retries, _QueuedExecution):
    """A ``queue()`` that may retry: between attempts an IOLoop timer, never a sleep."""

    __slots__ = ('retries', 'prior', 'exhausted', 'last_error', 'deadline')

    def run_attempt(self) -> None:
        """Start one attempt, as ``queue()`` starts the first."""
        command = self.command
        if command is None or self.future.cancelled():
            return   # answered already, or its caller gave up while it waited
        rt = self.rt
        self.decided = False
        self.timer = None
        self.timer_taken = False
        token = self.token = rt.breaker.allow_request()
        deadline = self.deadline = self.attempt_deadline()
        if token == DENY:
            self.fall_back(command, SHORT_CIRCUITED, None, self.last_error)
        elif rt.run_is_async:
            self.start_coroutine(command)
        elif rt.pool.try_submit(self.work_attempt, command, self.retries,
                                self.hand_over) is None:
            self.fall_back(command, THREAD_POOL_REJECTED, None,
                           _cause(rt, THREAD_POOL_REJECTED))
        elif deadline is not None:
            self.arm_timer(deadline - rt.clock.monotonic())

    def arm_timer(self, delay: float) -> None:
        # start_coroutine() arms the call's whole timeout: an attempt has its share of it
        deadline = self.deadline
        if deadline is not None:
            delay = min(delay, deadline - self.rt.clock.monotonic())
        _QueuedExecution.arm_timer(self, delay)

    def timed_out(self) -> None:
        if self.decide():
            self.settle(self.command, TIMEOUT, None, None,
                        self.rt.clock.monotonic() - self.start)

    def settle(self, command: 'Command', event: Event, value: Any,
               error: Optional[BaseException], elapsed: float) -> Any:
        delay = self.after_attempt(command, event, error, elapsed)
        if delay is None:
            return _QueuedExecution.settle(self, command, event, value, error, elapsed)
        self.timer = self.rt.clock.call_later(self.loop, delay, self.run_attempt)
        return None


def _nothing() -> None:
    pass


def _copy_outcome(source: Any, target: 'asyncio.Future[Any]') -> None:
    """Give ``target`` (an asyncio future) the outcome of the done ``source``, unless cancelled."""
    if target.cancelled():
        return
    error = source.exception()
    if error is None:
        target.set_result(source.result())
    else:
        target.set_exception(error)


def _begin(rt: _Runtime, start: float) -> _Execution:
    """A new execution of a command of ``rt``, started at ``start``."""
    ex = _Execution()
    ex.rt = rt
    ex.start = start
    ex.events = ()
    ex.exception = ex.execution_time = None
    ex.decided = False
    return ex


#: what a command that never ran reads: no events, no cause, no time
_NOT_RUN = _begin(None, 0.0)  # type: ignore[arg-type]


class Command:
    """Wrap a call to a dependency: subclass it, write ``run()`` and ``fallback()``.

    Settings are class attributes (see the configuration reference); an
    instance runs once, through ``execute()`` or ``queue()``. The subclass's
    ``__init__`` need not call ``super().__init__()``.
    """

    group_key: str = 'default'
    #: defaults to the class's ``__name__``
    command_key: str = 'Command'
    timeout: float = COMMAND_DEFAULTS['timeout']
    timeout_enabled: bool = True
    fallback_enabled: bool = True
    circuit_breaker_enabled: bool = True
    circuit_breaker_request_volume_threshold: int = \
        COMMAND_DEFAULTS['circuit_breaker_request_volume_threshold']
    circuit_breaker_error_threshold_percentage: float = \
        COMMAND_DEFAULTS['circuit_breaker_error_threshold_percentage']
    circuit_breaker_sleep_window: float = COMMAND_DEFAULTS['circuit_breaker_sleep_window']
    circuit_breaker_force_open: bool = False
    circuit_breaker_force_closed: bool = False
    #: Whether THREAD_POOL_REJECTED and SEMAPHORE_REJECTED count as errors for the
    #: breaker (Hystrix: yes). False: they are still counted in the metrics and still
    #: fall back, but move neither the error percentage nor the request volume.
    circuit_breaker_count_rejections: bool = True
    metrics_rolling_window: float = COMMAND_DEFAULTS['metrics_rolling_window']
    metrics_rolling_buckets: int = COMMAND_DEFAULTS['metrics_rolling_buckets']
    metrics_health_snapshot_interval: float = \
        COMMAND_DEFAULTS['metrics_health_snapshot_interval']
    max_concurrent_requests: int = COMMAND_DEFAULTS['max_concurrent_requests']
    fallback_max_concurrent_requests: int = COMMAND_DEFAULTS['fallback_max_concurrent_requests']
    #: An ``async def run()`` normally takes a permit of its command's own semaphore
    #: (``max_concurrent_requests``). True: it takes a slot of its group's executor pool
    #: instead, and no thread, so that ``max_workers + max_queue_size`` bound every such
    #: execution of the group together; a full group is ``THREAD_POOL_REJECTED``.
    #: :class:`~blackgate.HTTPProxyCommand` sets it: one slot per upstream exchange.
    group_admission: bool = False
    #: Whether a call whose :meth:`cache_key` returns a str is answered from the request
    #: cache (once per key per request context). False: every call runs, and none needs
    #: a request context. Only matters when the class defines ``cache_key()``.
    request_cache_enabled: bool = True
    #: Retries (see the guide's "Retries with a budget"): extra attempts after the first,
    #: the backoff's base in seconds (exponential, full jitter), what is retried, whether a
    #: timed-out attempt is, and the command key's budget.
    retry_attempts: int = COMMAND_DEFAULTS['retry_attempts']
    retry_backoff: float = COMMAND_DEFAULTS['retry_backoff']
    retry_on: Tuple[type, ...] = COMMAND_DEFAULTS['retry_on']
    retry_on_timeout: bool = False
    retry_budget_percent: float = COMMAND_DEFAULTS['retry_budget_percent']
    retry_budget_min_per_second: float = COMMAND_DEFAULTS['retry_budget_min_per_second']
    #: An adaptive limit for an ``async def run()``'s own semaphore (a dict, as an executor
    #: pool's ``concurrency_limit``); ``max_concurrent_requests`` is then its ceiling.
    concurrency_limit: Optional[Dict[str, Any]] = None

    # The one piece of the pipeline's state on the instance: its execution, once it ran
    # (name-mangled, so that a subclass's own attributes cannot meet it). The class-level
    # default is an execution that never ran, for what the public properties read before.
    __execution = _NOT_RUN
    __explicit_key = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        check_class_attributes('command class %s' % (cls.__qualname__,), vars(cls))
        if 'command_key' in vars(cls):
            cls.__explicit_key = True
        elif not cls.__explicit_key:
            cls.command_key = cls.__name__

    # -- what subclasses write -------------------------------------------------------

    def run(self) -> Any:
        """Call the dependency; runs on a worker thread (or on the IOLoop if ``async def``)."""
        raise NotImplementedError('%s must define run()' % (type(self).__name__,))

    def fallback(self) -> Any:
        """The answer when ``run()`` fails, times out, is rejected or short-circuited."""
        raise NotImplementedError  # never called: a command without one has FALLBACK_MISSING

    def cache_key(self) -> Optional[str]:
        """The request-cache key of this call; None (the default) for no caching.

        Within one request context (``with component.request_context():``), the
        first call of a key runs; the later ones answer its value, or raise its
        error, with ``RESPONSE_FROM_CACHE`` after its events, and those made while
        it runs wait for it. Called on the caller's thread before anything else.
        """
        return None
    def may_retry(self, error: Optional[BaseException]) -> bool:
        """Whether a failed attempt may be tried again (``error`` None: it timed out).

        Asked only when ``retry_attempts`` and ``retry_on`` would retry it; override to
        refuse what cannot be replayed (:class:`~blackgate.HTTPProxyCommand` does).
        """
        return True

    # -- the drivers: they only wait; the decisions are _Execution's ------------------

    def execute(self) -> Any:
        """Run the command on its pool and block until its result (or fallback) is known.

        Raises :class:`CommandError` when it fails with no usable fallback, and
        :class:`BadRequest` as ``run()`` raised it.
        """
        if _get_running_loop() is not None:
            raise BlackgateError(
                '%s.execute() was called on the thread of a running IOLoop and would block it; '
                'use `await %s(...).queue()` (or `yield` it in a gen.coroutine) instead'
                % (type(self).__name__, type(self).__name__))
        rt = _runtime(type(self))
        if rt.needs_loop:
            raise BlackgateError(
                '%s has an async def %s(), which runs on the IOLoop: use `await cmd.queue()`'
                % (type(self).__name__, 'run' if rt.run_is_async else 'fallback'))
        tracer = rt.component.tracer
        if tracer is not None and tracer.wants(self):   # blackgate.tracing: in a span
            return tracer.execute(self)
        context = _context_get()
        if context is not None or rt.caches:
            key = self.__in_context(rt, context)
            if key is not None:
                return self.__execute_cached(rt, context, key)  # type: ignore[arg-type]
        if rt.retry is not None:   # retry_attempts: the attempts' loop, in the core
            retried = _RetriedExecution()
            retried.rt, retried.start = rt, rt.clock.monotonic()
            retried.events, retried.exception, retried.execution_time = (), None, None
            retried.decided = False
            if self.__dict__.setdefault('_Command__execution', retried) is not retried:
                self.__ran_already()
            return retried.run_attempts(self)
        clock = rt.clock
        ex = _Execution()   # as _begin() makes one, without its frame
        ex.rt = rt
        ex.start = clock.monotonic()
        ex.events = ()
        ex.exception = ex.execution_time = None
        ex.decided = False
        if self.__dict__.setdefault('_Command__execution', ex) is not ex:   # atomic: one wins
            self.__ran_already()
        token = ex.token = rt.breaker.allow_request()
        if token == DENY:
            return ex.fall_back(self, SHORT_CIRCUITED, None, None)
        future = rt.pool.try_submit(ex.work, self)
        if future is None:
            return ex.fall_back(self, THREAD_POOL_REJECTED, None,
                                _cause(rt, THREAD_POOL_REJECTED))
        timeout = rt.timeout
        try:
            if timeout is None:
                event, value, error, elapsed = future.result()
            else:
                event, value, error, elapsed = clock.wait_until(future, ex.start + timeout)
        except _WaitTimeout:
            ex.decide()   # a run() still waiting in the queue is skipped
            return ex.fall_back(self, TIMEOUT, clock.monotonic() - ex.start, None)
        if event is SUCCESS:   # settle()'s first case, two frames shorter on the hot path
            ex.record(_SUCCESS_ONLY, elapsed, None)
            return value
        return ex.settle(self, event, value, error, elapsed)

    def queue(self) -> 'asyncio.Future[Any]':
        """Start the command and return a future of its result; never blocks the IOLoop.

        ``await`` it in a coroutine, or ``yield`` it in a ``gen.coroutine``.
        The future fails with :class:`CommandError` or :class:`BadRequest` as
        ``execute()`` would raise them.
        """
        loop = _get_running_loop()
        if loop is None:
            raise BlackgateError(
                '%s.queue() needs a running IOLoop on this thread; from a plain thread use '
                '%s(...).execute()' % (type(self).__name__, type(self).__name__))
        tracer = component.tracer
        if tracer is not None and tracer.wants(self):   # blackgate.tracing: in a span
            return tracer.queue(self)
        rt = _runtime(type(self))
        context = _context_get()
        if context is not None or rt.caches:
            key = self.__in_context(rt, context)
            if key is not None:
                return self.__queue_cached(rt, context, key, loop)  # type: ignore[arg-type]
        if rt.retry is not None:   # retry_attempts: attempts started by the core, timers between
            retried = _RetriedQueuedExecution(rt, rt.clock.monotonic(), self, loop)
            if self.__dict__.setdefault('_Command__execution', retried) is not retried:
                self.__ran_already()
            retried.begin_retries()
            retried.run_attempt()
            return retried.future
        ex = _QueuedExecution(rt, rt.clock.monotonic(), self, loop)
        if self.__dict__.setdefault('_Command__execution', ex) is not ex:   # atomic: one wins
            self.__ran_already()
        token = ex.token = rt.breaker.allow_request()
        if token == DENY:
            ex.fall_back(self, SHORT_CIRCUITED, None, None)
        elif rt.run_is_async:
            ex.start_coroutine(self)
        elif rt.pool.try_submit(ex.work, self, ex.hand_over) is None:
            ex.fall_back(self, THREAD_POOL_REJECTED, None, _cause(rt, THREAD_POOL_REJECTED))
        elif rt.timeout is not None:
            ex.arm_timer(ex.start + rt.timeout - rt.clock.monotonic())
        return ex.future

    # -- the request context: its log, and the short path of its cache ----------------

    def __in_context(self, rt: _Runtime, context: Optional[RequestContext]) -> Optional[str]:
        """Note the call in its request context; its cache key if the cache answers it, else None.

        A cached call outside any context is refused here, before the instance is
        claimed (so that it can still run inside one).
        """
        if '_Command__cached' in self.__dict__:
            return None   # re-entered by __execute_cached/__queue_cached: the first of its key
        if '_Command__execution' in self.__dict__:
            self.__ran_already()   # (before it is logged twice)
        key = self.cache_key() if rt.caches else None
        if key is not None:
            if type(key) is not str:
                raise TypeError('%s.cache_key() returned %r (%s); it must return a str, or None '
                                'for no caching' % (type(self).__name__, key, type(key).__name__))
            if context is None:
                raise BlackgateError(
                    '%s (command_key %r) has cache_key() %r but was called outside any request '
                    'context; call it inside `with component.request_context():` (HTTPProxy and '
                    'RequestContextMixin open one per request; a thread of yours gets the '
                    "caller's with context.wrap()), or set request_cache_enabled = False for no "
                    'caching' % (type(self).__name__, rt.command_key, key))
        if context is not None:
            context.log_command(self)
        return key

    def __execute_cached(self, rt: _Runtime, context: RequestContext, key: str) -> Any:
        outcome, first = context.cached(rt.command_key, key, self)
        shared = outcome.future
        if first:   # runs as any call, and leaves its outcome for the others
            self.__dict__['_Command__cached'] = outcome
            try:
                value = self.execute()
            except BaseException as exc:
                shared.set_exception(exc)
                raise
            shared.set_result(value)
            return value
        clock = rt.clock
        ex = _begin(rt, clock.monotonic())
        if self.__dict__.setdefault('_Command__execution', ex) is not ex:
            self.__ran_already()
        if not shared.done():   # the first still runs: wait for it (on the clock)
            try:
                clock.wait_until(shared, ex.start + _FOREVER)
            except BaseException:
                if not shared.done():
                    raise
                # (else it is the first's error: raised below, once counted)
        ex.decided = True
        ex.from_cache(outcome.command)
        error = shared.exception()
        return ex.answer(None, error) if error is not None else ex.answer(shared.result(), None)

    def __queue_cached(self, rt: _Runtime, context: RequestContext, key: str,
                       loop: Any) -> 'asyncio.Future[Any]':
        # Every caller gets a future of its own: one cancelled leaves the others theirs.
        outcome, first = context.cached(rt.command_key, key, self)
        shared = outcome.future
        mine = loop.create_future()
        if first:
            self.__dict__['_Command__cached'] = outcome

            def ran(future: 'asyncio.Future[Any]') -> None:
                error = asyncio.CancelledError() if future.cancelled() else future.exception()
                if error is None:
                    shared.set_result(future.result())
                else:
                    shared.set_exception(error)
                _copy_outcome(shared, mine)

            self.queue().add_done_callback(ran)
            return mine
        ex = _begin(rt, rt.clock.monotonic())
        if self.__dict__.setdefault('_Command__execution', ex) is not ex:
            self.__ran_already()

        def answered() -> None:   # on the loop
            ex.decided = True
            ex.from_cache(outcome.command)
            _copy_outcome(shared, mine)

        def wake(_future: Any) -> None:   # on whichever thread finished the first call
            try:
                loop.call_soon_threadsafe(answered)
            except RuntimeError:   # the loop is closed: nobody waits any more
                pass

        shared.add_done_callback(wake)
        return mine

    def mark_collapsed(self, requests: int) -> None:
        """After it ran: this command answered a batch of ``requests`` collapsed requests.

        :class:`~blackgate.Collapser` calls it on its batch command: its events then
        end with ``COLLAPSED``, its metrics count ``requests`` of them (Hystrix's
        ``rollingCountCollapsedRequests``) and listeners hear it once.
        """
        ex = self.__dict__.get('_Command__execution')
        if ex is None or not ex.events:
            raise BlackgateError('%s.mark_collapsed() is for a command that ran (the batch '
                                 'command of a Collapser, once it answered)'
                                 % (type(self).__name__,))
        ex.collapsed(requests)

    def __ran_already(self) -> None:
        raise BlackgateError('this %s instance has already run; a command instance runs '
                             'once: create a new one for each call' % (type(self).__name__,))

    # -- what an async def run() may ask of the pipeline -----------------------------

    def defer_outcome(self) -> 'DeferredOutcome':
        """From inside an ``async def run()``: the execution goes on after ``run()`` returns.

        The caller gets ``run()``'s result at once, but the permit (or pool slot)
        stays taken, and the outcome is counted, when the returned
        :class:`DeferredOutcome` is settled: ``success()`` counts ``SUCCESS``,
        ``failure(exc)`` a ``FAILURE`` (no fallback runs: the caller already has its
        answer). Settle it exactly once, on the IOLoop, whatever happens; if ``run()``
        raises or times out instead, the handle is void and settling it does nothing.
        :class:`~blackgate.HTTPProxyCommand` uses it for a response body that is
        still streaming when its head arrived.
        """
        ex = self.__running_async('defer_outcome')
        later = ex.later
        if later is None:
            later = ex.later = DeferredOutcome()
        return later

    def refresh_timeout(self) -> None:
        """From inside an ``async def run()``: start the command's ``timeout`` again from now.

        For work whose progress shows (a request body streaming upstream), so that
        the timeout bounds a silence rather than the whole transfer.
        """
        ex = self.__running_async('refresh_timeout')
        ex.pause_timer()
        timeout = ex.rt.timeout
        if timeout is not None and not ex.decided:
            ex.arm_timer(timeout)

    def pause_timeout(self) -> None:
        """From inside an ``async def run()``: stop the timeout until :meth:`refresh_timeout`.

        For waits that are not the dependency's (the client sending the next part
        of a request body).
        """
        self.__running_async('pause_timeout').pause_timer()

    def __running_async(self, name: str) -> '_QueuedExecution':
        ex = self.__dict__.get('_Command__execution')
        if not isinstance(ex, _QueuedExecution) or ex.run_started is None:
            raise BlackgateError('%s.%s() may only be called from inside its own async def '
                                 'run(), while it runs under queue()' % (type(self).__name__,
                                                                           name))
        return ex

    @property
    def resolved_timeout(self) -> Optional[float]:
        """The timeout, in seconds, this execution runs under; None if timeouts are off.

        As resolved when the execution started (an ``install()`` since does not change
        it: the timer already armed does not change either); before it starts, as its
        class would run now. For a ``run()`` that gives its own I/O a deadline.
        """
        rt = self.__execution.rt
        return (rt if rt is not None else _runtime(type(self))).timeout

    # -- what happened -----------------------------------------------------------------

    @property
    def events(self) -> Tuple[Event, ...]:
        """The events of this execution, in order; empty before it ran."""
        return self.__execution.events

    @property
    def is_successful_execution(self) -> bool:
        """``run()`` returned a result (``SUCCESS``)."""
        return SUCCESS in self.__execution.events

    @property
    def is_failed_execution(self) -> bool:
        """``run()`` raised (``FAILURE``); a timeout or rejection is not a failed execution."""
        return FAILURE in self.__execution.events

    @property
    def is_response_from_fallback(self) -> bool:
        """The answer came from ``fallback()`` (``FALLBACK_SUCCESS``)."""
        return FALLBACK_SUCCESS in self.__execution.events

    @property
    def is_response_timed_out(self) -> bool:
        """``run()`` did not answer within ``timeout`` (``TIMEOUT``)."""
        return TIMEOUT in self.__execution.events

    @property
    def is_response_short_circuited(self) -> bool:
        """The breaker was open, so ``run()`` was not called (``SHORT_CIRCUITED``)."""
        return SHORT_CIRCUITED in self.__execution.events

    @property
    def is_response_rejected(self) -> bool:
        """No worker, queue slot or semaphore permit was free (``*_REJECTED``)."""
        events = self.__execution.events
        return THREAD_POOL_REJECTED in events or SEMAPHORE_REJECTED in events

    @property
    def execution_exception(self) -> Optional[BaseException]:
        """What made ``run()`` fail: its exception, or the timeout, rejection or short-circuit."""
        return self.__execution.cause()

    @property
    def execution_time(self) -> Optional[float]:
        """Seconds ``run()`` took; None if it never ran.

        After a timeout, the seconds from the call to the timeout, time waiting for a
        worker included.
        """
        return self.__execution.execution_time

    @property
    def is_circuit_breaker_open(self) -> bool:
        """Whether this command's breaker is open now (True when forced open)."""
        return _runtime(type(self)).breaker.is_open()

    def __repr__(self) -> str:
        state = '/'.join(event.value for event in self.__execution.events) or 'not run'
        return '<%s %s %s>' % (type(self).__name__, type(self).command_key, state)


class DeferredOutcome:
    """The end of an execution that outlives its ``run()``: see :meth:`Command.defer_outcome`.

    Settle it once, on the IOLoop thread: :meth:`success` or :meth:`failure`.
    Settling it before ``run()`` returns is allowed (the outcome is then counted
    as soon as it does); a second settle, or one after ``run()`` failed, does nothing.
    """

    __slots__ = ('_execution', '_elapsed', '_counted', '_ended', '_error')

    def __init__(self) -> None:
        self._execution: Optional[_QueuedExecution] = None   # set when run() returns
        self._elapsed = 0.0
        self._counted = False
        self._ended = False   # settled (before or after run() returned), or void
        self._error: Optional[BaseException] = None

    def success(self) -> None:
        """The execution ended well: count ``SUCCESS`` and free its permit."""
        self._settle(None)

    def failure(self, error: BaseException) -> None:
        """The execution failed after its result was handed over: count ``FAILURE``."""
        self._settle(error)

    @property
    def settled(self) -> bool:
        """Whether :meth:`success` or :meth:`failure` was called (or the handle is void)."""
        return self._ended

    def _settle(self, error: Optional[BaseException]) -> None:
        if self._ended:
            return
        self._ended = True
        self._error = error
        execution = self._execution
        if execution is not None:
            self._execution = None
            execution.ended_later(self._elapsed, error, self._counted)

    def _arm(self, execution: _QueuedExecution, elapsed: float, counted: bool) -> None:
        self._elapsed = elapsed
        self._counted = counted
        if self._ended:   # settled while run() still ran
            execution.ended_later(elapsed, self._error, counted)
        else:
            self._execution = execution

    def _void(self) -> None:
        self._ended = True
        self._execution = None

    def __repr__(self) -> str:
        return '<DeferredOutcome %s>' % ('settled' if self._ended else 'open')
