"""Command: one pipeline, two drivers.

Every execution goes through the same steps (DESIGN.md §5): the breaker gate,
admission to a bulkhead, ``run()``, the outcome, the fallback, and the
bookkeeping (metrics, breaker, listeners, one log record). ``execute()``
carries them out on the calling thread and blocks; ``queue()`` carries them
out on the IOLoop and returns a future at once.

.. warning::

   ``execute()`` blocks its thread, so it refuses to run on the thread of a
   running IOLoop: use ``await cmd.queue()`` there. A synchronous ``run()``
   always runs on a worker thread of its group's pool; an ``async def run()``
   runs on the IOLoop and needs ``queue()``. Python cannot interrupt a thread:
   after a timeout the caller gets the fallback at once, while the worker
   stays busy until ``run()`` returns and its late result is dropped.
"""
import asyncio
import inspect
import logging
import sys
import types
from typing import Any, Callable, Dict, Optional, Tuple

from .breaker import DENY, TRIAL
from .clock import TimeoutError as _WaitTimeout
from .config import COMMAND_DEFAULTS, CommandSettings, check_class_attributes, check_value
from .errors import (BadRequest, BlackgateError, CommandError, CommandTimeout, Rejected,
                     ShortCircuited)
from .events import FAILURE_TYPE_OF, Event, FailureType
from .logs import BUG_ATTRIBUTE, PROGRAMMING_ERRORS
from .registry import component

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
_SUCCESS_ONLY = (SUCCESS,)
_BAD_REQUEST_ONLY = (BAD_REQUEST,)
_FAILED_LATE = (FAILURE,)   # after the caller had its answer: no fallback can run
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

    __slots__ = ('command_key', 'settings', 'state', 'breaker', 'metrics', 'pool', 'clock',
                 'timeout', 'run_is_async', 'fallback_is_async', 'needs_loop', 'has_fallback',
                 'group_admission', 'component', 'store')

    def __init__(self, cls: 'type[Command]', registry) -> None:
        command_key = cls.command_key
        check_value('command class %s' % (cls.__qualname__,), 'command_key', command_key)
        run_is_async = inspect.iscoroutinefunction(cls.run)
        group_admission = run_is_async and bool(cls.group_admission)
        settings, state, pool = registry.resolve(cls, command_key, _class_values(cls),
                                                 needs_pool=group_admission or not run_is_async)
        self.command_key = command_key
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
        self.component = registry
        self.store = registry._store   # fleet mode's state store, or None


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


def _runtime(cls: type) -> _Runtime:
    runtime = component._runtimes.get(cls)
    if runtime is None:
        # Built and published under the registry's lock, so that an install() running
        # at the same moment cannot leave a runtime with its old pool and settings behind.
        with component._lock:
            runtime = component._runtimes.get(cls)
            if runtime is None:
                runtime = component._runtimes[cls] = _Runtime(cls, component)
    return runtime


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

    # Per-execution state. Class-level defaults, so that a subclass __init__ that never
    # calls super().__init__() still leaves a usable instance.
    _bg_events: Tuple[Event, ...] = ()
    _bg_exception: Optional[BaseException] = None
    _bg_execution_time: Optional[float] = None
    _bg_decided = False
    # set by queue() and by the record step; None only before an execute() records
    _bg_rt: _Runtime = None  # type: ignore[assignment]

    _bg_explicit_key = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        check_class_attributes('command class %s' % (cls.__qualname__,), vars(cls))
        if 'command_key' in vars(cls):
            cls._bg_explicit_key = True
        elif not cls._bg_explicit_key:
            cls.command_key = cls.__name__

    # -- what subclasses write -------------------------------------------------------

    def run(self) -> Any:
        """Call the dependency; runs on a worker thread (or on the IOLoop if ``async def``)."""
        raise NotImplementedError('%s must define run()' % (type(self).__name__,))

    def fallback(self) -> Any:
        """The answer when ``run()`` fails, times out, is rejected or short-circuited."""
        raise NotImplementedError  # never called: a command without one has FALLBACK_MISSING

    # -- the drivers -----------------------------------------------------------------

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
        self._bg_claim()
        clock = rt.clock
        start = clock.monotonic()
        token = rt.breaker.allow_request()
        if token == DENY:
            return self._bg_fail_sync(rt, token, SHORT_CIRCUITED, start, None)
        future = rt.pool.try_submit(self._bg_work, rt)
        if future is None:
            return self._bg_fail_sync(rt, token, THREAD_POOL_REJECTED, start, None,
                                      _cause(rt, THREAD_POOL_REJECTED))
        try:
            if rt.timeout is None:
                value, error, elapsed, finished = future.result()
            else:
                deadline = start + rt.timeout
                value, error, elapsed, finished = clock.wait_until(future, deadline)
                if finished >= deadline:   # answered, but not within the timeout
                    raise _WaitTimeout()
        except _WaitTimeout:
            self._bg_decided = True   # a run() still waiting in the queue is skipped
            return self._bg_fail_sync(rt, token, TIMEOUT, start,
                                      clock.monotonic() - start)
        if error is None:
            self._bg_finish(rt, token, _SUCCESS_ONLY, start, elapsed, None)
            return value
        if isinstance(error, BadRequest):
            self._bg_finish(rt, token, _BAD_REQUEST_ONLY, start, elapsed, error)
            raise error
        return self._bg_fail_sync(rt, token, FAILURE, start, elapsed, error)

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
        self._bg_claim()
        self._bg_rt = rt = _runtime(type(self))
        self._bg_loop = loop
        self._bg_future = future = loop.create_future()
        self._bg_start = rt.clock.monotonic()
        self._bg_token = token = rt.breaker.allow_request()
        if token == DENY:
            self._bg_fail_async(rt, SHORT_CIRCUITED, None)
        elif rt.run_is_async:
            self._bg_start_coroutine(rt, loop)
        elif rt.pool.try_submit(self._bg_work, rt, self._bg_hand_over) is None:
            self._bg_fail_async(rt, THREAD_POOL_REJECTED, None,
                                _cause(rt, THREAD_POOL_REJECTED))
        elif rt.timeout is not None:
            remaining = self._bg_start + rt.timeout - rt.clock.monotonic()
            self._bg_timer = rt.clock.call_later(loop, remaining, self._bg_timed_out)
        return future

    # -- the pipeline's steps --------------------------------------------------------

    def _bg_timeout(self) -> Optional[float]:
        """The timeout this command's class runs under, as resolved; None if disabled."""
        return _runtime(type(self)).timeout

    def _bg_claim(self) -> None:
        # dict.setdefault is atomic: of two threads racing on one instance, one wins.
        marker: list = []
        if self.__dict__.setdefault('_bg_used', marker) is not marker:
            raise BlackgateError('this %s instance has already run; a command instance runs '
                                 'once: create a new one for each call' % (type(self).__name__,))

    def _bg_work(self, release: Callable[[], Any], rt: _Runtime,
                 hand_over: Optional[Callable[[Any], None]] = None
                 ) -> Tuple[Any, Optional[BaseException], float, float]:
        """On a worker thread: run(), and how long it took and when it finished.

        Frees the pool slot (``release``) before ``hand_over`` wakes the IOLoop, so that
        whoever the result wakes finds the pool free again.
        """
        if self._bg_decided:
            # Timed out while waiting in the pool's queue: the caller has its answer, and
            # nobody wants this call made any more (Hystrix skips it too).
            release()
            return None, None, 0.0, 0.0
        metrics = rt.metrics
        monotonic = rt.clock.monotonic
        metrics.execution_started()
        started = monotonic()
        try:
            value, error = self.run(), None
        except BaseException as exc:  # handed to the caller, never lost in the pool
            value, error = None, exc
        finished = monotonic()
        metrics.execution_finished()
        release()
        outcome = value, error, finished - started, finished
        if hand_over is not None:
            hand_over(outcome)
        return outcome

    def _bg_hand_over(self, outcome) -> None:
        """On the worker, its pool slot already free: pass the outcome to the IOLoop."""
        try:
            self._bg_loop.call_soon_threadsafe(self._bg_run_returned, outcome)
        except RuntimeError:
            # The loop was closed while run() ran: nobody waits for the answer, but the
            # outcome still counts (and a trial must still close or re-open the breaker).
            if not self._bg_decided:
                self._bg_decided = True
                value, error, elapsed, _ = outcome
                events = (_SUCCESS_ONLY if error is None else _BAD_REQUEST_ONLY
                          if isinstance(error, BadRequest) else (FAILURE,))
                self._bg_finish(self._bg_rt, self._bg_token, events, self._bg_start, elapsed,
                                error)

    def _bg_run_returned(self, outcome) -> None:
        """On the IOLoop: the worker answered (perhaps after the timeout already fired)."""
        if self._bg_decided:
            return
        value, error, elapsed, finished = outcome
        rt = self._bg_rt
        if rt.timeout is not None and finished >= self._bg_start + rt.timeout:
            self._bg_timed_out()   # answered, but after the deadline: its timer is due
            return
        self._bg_decided = True
        timer = self.__dict__.get('_bg_timer')
        if timer is not None:
            timer.cancel()
        self._bg_settle_async(rt, value, error, elapsed)

    def _bg_settle_async(self, rt: _Runtime, value: Any, error: Optional[BaseException],
                         elapsed: float) -> None:
        future = self._bg_future
        if error is None:
            self._bg_finish(rt, self._bg_token, _SUCCESS_ONLY, self._bg_start, elapsed, None)
            if not future.cancelled():
                future.set_result(value)
        elif isinstance(error, BadRequest):
            self._bg_finish(rt, self._bg_token, _BAD_REQUEST_ONLY, self._bg_start, elapsed,
                            error)
            if not future.cancelled():
                future.set_exception(error)
        else:
            self._bg_fail_async(rt, FAILURE, elapsed, error)

    def _bg_timed_out(self) -> None:
        """On the IOLoop: the timer fired before run() answered."""
        if self._bg_decided:
            return
        self._bg_decided = True
        rt = self._bg_rt
        timer = self.__dict__.get('_bg_timer')
        if timer is not None:
            timer.cancel()
        task = self.__dict__.get('_bg_task')
        if task is not None:
            task.cancel()   # a coroutine, unlike a thread, can be interrupted
        self._bg_fail_async(rt, TIMEOUT, rt.clock.monotonic() - self._bg_start)

    def _bg_start_coroutine(self, rt: _Runtime, loop) -> None:
        if rt.group_admission:
            release = rt.pool.try_admit()
            if release is None:
                self._bg_fail_async(rt, THREAD_POOL_REJECTED, None,
                                    _cause(rt, THREAD_POOL_REJECTED))
                return
        else:
            permits = rt.state.run_permits
            if not permits.try_acquire():
                self._bg_fail_async(rt, SEMAPHORE_REJECTED, None)
                return
            release = permits.release
        self._bg_release = release
        rt.metrics.execution_started()
        self._bg_run_started = rt.clock.monotonic()
        try:
            coroutine = self.run()
        except BaseException:
            release()
            rt.metrics.execution_finished()
            raise
        if _EAGER:   # run() starts now, and one that needs no I/O is settled with no loop pass
            task = asyncio.Task(self._bg_drive(rt, coroutine), loop=loop,  # type: ignore
                                eager_start=True)
        else:
            task = loop.create_task(self._bg_drive(rt, coroutine))
        if task.done():
            return
        self._bg_task = task
        if rt.timeout is not None and '_bg_timer' not in self.__dict__:
            # (unless run() already paused or restarted it, in its first step)
            remaining = rt.timeout - (rt.clock.monotonic() - self._bg_start)
            self._bg_timer = rt.clock.call_later(loop, remaining, self._bg_timed_out)

    async def _bg_drive(self, rt: _Runtime, coroutine) -> None:
        """The task of an ``async def run()``: await it, then settle in the same step."""
        try:
            value, error = await coroutine, None
        except BaseException as exc:   # cancelled by our timeout, or anything run() raised
            value, error = None, exc
        later = self.__dict__.get('_bg_later')
        if later is not None:
            if error is None and not self._bg_decided:
                self._bg_hand_over_later(rt, later, value)
                return
            later._void()   # run() failed or timed out after all: counted as usual
        self._bg_release()
        rt.metrics.execution_finished()
        if not self._bg_decided:
            self._bg_decided = True
            timer = self.__dict__.get('_bg_timer')
            if timer is not None:
                timer.cancel()
            self._bg_settle_async(rt, value, error, rt.clock.monotonic() - self._bg_run_started)
        if isinstance(error, (KeyboardInterrupt, SystemExit)):
            raise error

    def _bg_hand_over_later(self, rt: _Runtime, later: 'DeferredOutcome', value: Any) -> None:
        """run() returned, but its execution goes on: answer now, count when it ends."""
        self._bg_decided = True
        timer = self.__dict__.get('_bg_timer')
        if timer is not None:
            timer.cancel()
        elapsed = rt.clock.monotonic() - self._bg_run_started
        if self._bg_token == TRIAL:
            # A trial is judged by what run() returned: the breaker must not stay half-open
            # for as long as an event stream lasts.
            self._bg_finish(rt, TRIAL, _SUCCESS_ONLY, self._bg_start, elapsed, None)
            later._arm(self, elapsed, counted=True)
        else:
            later._arm(self, elapsed, counted=False)
        future = self._bg_future
        if not future.cancelled():
            future.set_result(value)

    def _bg_ended_later(self, elapsed: float, error: Optional[BaseException],
                        counted: bool) -> None:
        """On the IOLoop: the execution that outlived run() ended; free it and count it."""
        rt = self._bg_rt
        self._bg_release()
        rt.metrics.execution_finished()
        if counted:
            return
        if error is None:
            self._bg_finish(rt, self._bg_token, _SUCCESS_ONLY, self._bg_start, elapsed, None)
        else:
            self._bg_finish(rt, self._bg_token, _FAILED_LATE, self._bg_start, elapsed, error)

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
        self._bg_check_async_run('defer_outcome')
        later = self.__dict__.get('_bg_later')
        if later is None:
            later = self._bg_later = DeferredOutcome()
        return later

    def refresh_timeout(self) -> None:
        """From inside an ``async def run()``: start the command's ``timeout`` again from now.

        For work whose progress shows (a request body streaming upstream), so that
        the timeout bounds a silence rather than the whole transfer.
        """
        self._bg_check_async_run('refresh_timeout')
        self.pause_timeout()
        rt = self._bg_rt
        if rt.timeout is not None and not self._bg_decided:
            self._bg_timer = rt.clock.call_later(self._bg_loop, rt.timeout, self._bg_timed_out)

    def pause_timeout(self) -> None:
        """From inside an ``async def run()``: stop the timeout until :meth:`refresh_timeout`.

        For waits that are not the dependency's (the client sending the next part
        of a request body).
        """
        self._bg_check_async_run('pause_timeout')
        timer = self.__dict__.get('_bg_timer')
        if timer is not None:
            timer.cancel()
        self._bg_timer = None

    def _bg_check_async_run(self, name: str) -> None:
        rt = self.__dict__.get('_bg_rt')
        if rt is None or not rt.run_is_async or '_bg_run_started' not in self.__dict__:
            raise BlackgateError('%s.%s() may only be called from inside its own async def '
                                 'run(), while it runs under queue()' % (type(self).__name__,
                                                                           name))

    # -- fallback --------------------------------------------------------------------
    #
    # The usual outcome (the fallback ran and returned) takes no lock, builds no
    # exception and makes no log call when INFO is off: a short-circuit must cost
    # little more than calling fallback() directly. The rest is the slow path.

    def _bg_fallback_denied(self, rt: _Runtime, event: Event, cause: BaseException
                            ) -> Tuple[Tuple[Event, ...], CommandError]:
        """No fallback may run (none, or no permit): the events and the error to raise."""
        if not rt.has_fallback:
            return (event, FALLBACK_MISSING), CommandError(
                rt.command_key, FAILURE_TYPE_OF[event], cause, None,
                'no fallback is available (FALLBACK_MISSING)')
        return (event, FALLBACK_REJECTION), CommandError(
            rt.command_key, FailureType.REJECTED_SEMAPHORE_FALLBACK, cause, None,
            'the fallback was rejected: %d fallbacks already running (FALLBACK_REJECTION)'
            % (rt.state.fallback_permits.limit,))

    def _bg_fallback_failed(self, rt: _Runtime, event: Event, cause: BaseException,
                            error: BaseException) -> Tuple[Tuple[Event, ...], CommandError]:
        failed = CommandError(rt.command_key, FAILURE_TYPE_OF[event], cause, error,
                              'the fallback failed (FALLBACK_FAILURE: %s: %s)'
                              % (type(error).__name__, error))
        failed.__cause__ = error
        return (event, FALLBACK_FAILURE), failed

    def _bg_before_fallback(self, rt: _Runtime, event: Event,
                            error: Optional[BaseException]) -> None:
        # What fallback() may read (Hystrix's getExecutionException()): the primary event,
        # and the cause (built from the event on first read when `error` is None).
        self._bg_events = _PRIMARY[event]
        if error is not None:
            self._bg_exception = error

    def _bg_fail_sync(self, rt: _Runtime, token: int, event: Event, start: float,
                      elapsed: Optional[float], error: Optional[BaseException] = None) -> Any:
        # `error` is what run() raised; None means the cause is built from `event`,
        # and only when somebody needs it.
        permits = rt.state.fallback_permits
        if rt.has_fallback and permits.try_acquire():
            # what fallback() may read of why it runs (inline: this is the forced-open path)
            self._bg_events = _PRIMARY[event]
            if error is not None:
                self._bg_exception = error
            try:
                value = self.fallback()
                if type(value) is _COROUTINE:   # from a plain def: nothing here can await it
                    value.close()
                    raise TypeError(
                        '%s.fallback() returned a coroutine, which execute() cannot await; make '
                        'fallback() return its value, or use `await cmd.queue()`'
                        % (type(self).__name__,))
            except BaseException as exc:   # counted even if it is KeyboardInterrupt
                permits.release()
                cause = _cause(rt, event, error)
                events, failed = self._bg_fallback_failed(rt, event, cause, exc)
                self._bg_finish(rt, token, events, start, elapsed, cause, failed)
                if not isinstance(exc, Exception):
                    raise
                raise failed from exc
            permits.release()
            self._bg_finish(rt, token, _FELL_BACK[event], start, elapsed, error)
            return value
        cause = _cause(rt, event, error)
        events, denied = self._bg_fallback_denied(rt, event, cause)
        self._bg_finish(rt, token, events, start, elapsed, cause, denied)
        raise denied from cause

    def _bg_fail_async(self, rt: _Runtime, event: Event, elapsed: Optional[float],
                       error: Optional[BaseException] = None) -> None:
        permits = rt.state.fallback_permits
        if not (rt.has_fallback and permits.try_acquire()):
            cause = _cause(rt, event, error)
            events, denied = self._bg_fallback_denied(rt, event, cause)
            denied.__cause__ = cause
            self._bg_resolve(rt, events, denied, elapsed, cause)
            return
        self._bg_before_fallback(rt, event, error)
        try:
            value = self.fallback()
        except BaseException as exc:   # the future must resolve whatever the fallback raised
            permits.release()
            cause = _cause(rt, event, error)
            self._bg_resolve(rt, *self._bg_fallback_failed(rt, event, cause, exc),
                             elapsed=elapsed, cause=cause, value=None)
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            return
        if not rt.fallback_is_async and type(value) is not _COROUTINE:
            permits.release()
            self._bg_resolve(rt, _FELL_BACK[event], None, elapsed, error, value)
            return

        def fallback_done(task: 'asyncio.Future[Any]') -> None:
            permits.release()
            exc = asyncio.CancelledError() if task.cancelled() else task.exception()
            if exc is not None:
                cause = _cause(rt, event, error)
                self._bg_resolve(rt, *self._bg_fallback_failed(rt, event, cause, exc),
                                 elapsed=elapsed, cause=cause, value=None)
            else:
                self._bg_resolve(rt, _FELL_BACK[event], None, elapsed, error, task.result())

        asyncio.ensure_future(value).add_done_callback(fallback_done)

    def _bg_resolve(self, rt: _Runtime, events: Tuple[Event, ...], error: Optional[CommandError],
                    elapsed: Optional[float], cause: Optional[BaseException],
                    value: Any = None) -> None:
        self._bg_finish(rt, self._bg_token, events, self._bg_start, elapsed, cause, error)
        future = self._bg_future
        if future.cancelled():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)

    # -- bookkeeping -----------------------------------------------------------------

    def _bg_finish(self, rt: _Runtime, token: int, events: Tuple[Event, ...], start: float,
                   elapsed: Optional[float], cause: Optional[BaseException],
                   error: Optional[CommandError] = None) -> None:
        """Record the outcome: instance state, metrics, breaker, listeners, one log record.

        ``cause`` None on a failed outcome means it is built from the event when read.
        """
        self._bg_events = events
        if cause is not None:
            self._bg_exception = cause
        self._bg_execution_time = elapsed
        self._bg_rt = rt
        now = rt.clock.monotonic()
        total = now - start
        if token == TRIAL:
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
        if rt.component._listeners:
            rt.component._emit(rt.command_key, events)
        primary = events[0]
        if primary is SUCCESS or primary is BAD_REQUEST:
            return
        if error is None and primary in _QUIET_PRIMARY and not log.isEnabledFor(logging.INFO):
            return   # a short-circuit or rejection that fell back: logged at INFO
        _log_failure(rt, events, self.execution_exception, error)

    # -- what happened (DESIGN.md §5.8) --------------------------------------------------

    @property
    def events(self) -> Tuple[Event, ...]:
        """The events of this execution, in order; empty before it ran."""
        return self._bg_events

    @property
    def is_successful_execution(self) -> bool:
        """``run()`` returned a result (``SUCCESS``)."""
        return SUCCESS in self._bg_events

    @property
    def is_failed_execution(self) -> bool:
        """``run()`` raised (``FAILURE``); a timeout or rejection is not a failed execution."""
        return FAILURE in self._bg_events

    @property
    def is_response_from_fallback(self) -> bool:
        """The answer came from ``fallback()`` (``FALLBACK_SUCCESS``)."""
        return FALLBACK_SUCCESS in self._bg_events

    @property
    def is_response_timed_out(self) -> bool:
        """``run()`` did not answer within ``timeout`` (``TIMEOUT``)."""
        return TIMEOUT in self._bg_events

    @property
    def is_response_short_circuited(self) -> bool:
        """The breaker was open, so ``run()`` was not called (``SHORT_CIRCUITED``)."""
        return SHORT_CIRCUITED in self._bg_events

    @property
    def is_response_rejected(self) -> bool:
        """No worker, queue slot or semaphore permit was free (``*_REJECTED``)."""
        events = self._bg_events
        return THREAD_POOL_REJECTED in events or SEMAPHORE_REJECTED in events

    @property
    def execution_exception(self) -> Optional[BaseException]:
        """What made ``run()`` fail: its exception, or the timeout, rejection or short-circuit."""
        cause = self._bg_exception
        if cause is None and self._bg_events and self._bg_events[0] in _BUILT_CAUSE:
            # Built on first read (nobody reads most short-circuits' causes); setdefault
            # makes two threads reading at once agree on one object.
            # (read inside an execute() fallback, before the record step set _bg_rt)
            rt = self._bg_rt or _runtime(type(self))
            cause = self.__dict__.setdefault('_bg_exception', _cause(rt, self._bg_events[0]))
        return cause

    @property
    def execution_time(self) -> Optional[float]:
        """Seconds ``run()`` took; None if it never ran.

        After a timeout, the seconds from the call to the timeout, time waiting for a
        worker included.
        """
        return self._bg_execution_time

    @property
    def is_circuit_breaker_open(self) -> bool:
        """Whether this command's breaker is open now (True when forced open)."""
        return _runtime(type(self)).breaker.is_open()

    def __repr__(self) -> str:
        state = '/'.join(event.value for event in self._bg_events) or 'not run'
        return '<%s %s %s>' % (type(self).__name__, type(self).command_key, state)


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
        return Rejected('%s: executor pool %r is full (%d workers busy, %d of %d queue slots '
                        'taken)' % (key, pool.group_key, pool.active_count, pool.queue_size,
                                    pool.max_queue_size))
    if event is SEMAPHORE_REJECTED:
        return Rejected('%s: %d concurrent executions already running (max_concurrent_requests)'
                        % (key, rt.state.run_permits.limit))
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


class DeferredOutcome:
    """The end of an execution that outlives its ``run()``: see :meth:`Command.defer_outcome`.

    Settle it once, on the IOLoop thread: :meth:`success` or :meth:`failure`.
    Settling it before ``run()`` returns is allowed (the outcome is then counted
    as soon as it does); a second settle, or one after ``run()`` failed, does nothing.
    """

    __slots__ = ('_command', '_elapsed', '_counted', '_ended', '_error')

    def __init__(self) -> None:
        self._command: Optional[Command] = None   # set when run() returns
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
        command = self._command
        if command is not None:
            self._command = None
            command._bg_ended_later(self._elapsed, error, self._counted)

    def _arm(self, command: Command, elapsed: float, counted: bool) -> None:
        self._elapsed = elapsed
        self._counted = counted
        if self._ended:   # settled while run() still ran
            command._bg_ended_later(elapsed, self._error, counted)
        else:
            self._command = command

    def _void(self) -> None:
        self._ended = True
        self._command = None

    def __repr__(self) -> str:
        return '<DeferredOutcome %s>' % ('settled' if self._ended else 'open')
