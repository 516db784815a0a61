"""Bulkheads: executor pools and permit counters that admit now or reject.

A stock ``ThreadPoolExecutor`` queues without bound, so it cannot protect a
service from a slow dependency. :class:`ExecutorPool` counts its in-flight
work itself and refuses at once when ``max_workers`` are busy and
``max_queue_size`` are waiting, the way ``tornado.queues.Queue.put_nowait``
raises ``QueueFull``. :class:`Permits` does the same for ``async def run()``
commands and for fallbacks, which run on the IOLoop and need no thread.

.. warning::

   Admission and release may happen on any thread, and take no lock: each
   takes its place first and gives it back if that went over the limit, as
   Hystrix's semaphores do. A lock guards only the rare updates (a refusal, a
   new high-water mark), never the work itself.
"""
import concurrent.futures
import itertools
import threading
from typing import Any, Callable, List, Optional

from .config import LimitSettings, PoolSettings
from .limits import ConcurrencyLimit, new_limit
from .workers import Workers

__all__ = ('ExecutorPool', 'Permits', 'LimitedPermits')


class Permits:
    """A non-blocking counting semaphore: ``try_acquire()`` is True or False at once.

    Lock-free, like Hystrix's ``TryableSemaphore``: a thread takes a permit
    first and gives it back if that went over the limit, so two threads racing
    for the last permit may both be refused, but never both admitted.
    """

    __slots__ = ('limit', '_held', '_lock', 'rejected')

    def __init__(self, limit: int) -> None:
        self.limit = limit
        # One item per permit taken: list.append and list.pop are atomic.
        self._held: List[None] = []
        self._lock = threading.Lock()   # only for the rejection count
        #: how many acquisitions were refused since creation
        self.rejected = 0

    def try_acquire(self) -> bool:
        """Take a permit if one is free; never waits."""
        held = self._held
        held.append(None)
        if len(held) <= self.limit:
            return True
        held.pop()
        with self._lock:
            self.rejected += 1
        return False

    def release(self) -> None:
        """Give back a permit taken with :meth:`try_acquire`."""
        self._held.pop()

    def release_refused(self) -> None:
        """Give back a permit whose work could not start after all, and count a refusal."""
        self._held.pop()
        with self._lock:
            self.rejected += 1

    @property
    def in_use(self) -> int:
        """Permits taken now."""
        return min(len(self._held), self.limit)

    def try_take(self) -> Optional[Callable[[], None]]:
        """:meth:`try_acquire`, as the ``release`` to call once the work ends, or None."""
        return self.release if self.try_acquire() else None

    def __repr__(self) -> str:
        return '<Permits %d/%d>' % (len(self._held), self.limit)


class LimitedPermits(Permits):
    """Permits whose limit is learned: an ``async def run()``'s semaphore with a ``concurrency_limit``.

    :meth:`try_take` times each permit from when it is taken to when it is given
    back, and feeds the limit with it, as :class:`ExecutorPool` does for a pool.
    """

    __slots__ = ('limiter', 'clock', 'drop_after', '_limit_lock')

    def __init__(self, settings: LimitSettings, clock: Any,
                 drop_after: Optional[float] = None) -> None:
        self.limiter = new_limit(settings)
        super().__init__(self.limiter.limit)
        self.clock = clock
        #: a permit held this long (seconds: the command's timeout) counts as dropped
        self.drop_after = float('inf') if drop_after is None else drop_after
        self._limit_lock = threading.Lock()

    def try_take(self) -> Optional[Callable[[], None]]:
        if not self.try_acquire():
            return None
        clock = self.clock
        start = clock.monotonic()
        inflight = len(self._held)
        held = self._held

        def release() -> None:
            held.pop()
            now = clock.monotonic()
            rtt = now - start
            with self._limit_lock:
                self.limit = self.limiter.sample(now, start, rtt, inflight,
                                                 rtt >= self.drop_after)

        return release

    def __repr__(self) -> str:
        return '<LimitedPermits %d/%d, learned>' % (len(self._held), self.limit)


class ExecutorPool:
    """The thread pool of one ``group_key``, with fail-fast admission."""

    def __init__(self, settings: PoolSettings, clock: Any = None) -> None:
        self.settings = settings
        #: the clock the adaptive limit's samples are timed by (the registry's)
        self.clock = clock
        #: the group whose commands this pool runs
        self.group_key = settings.group_key
        #: worker threads
        self.max_workers = settings.max_workers
        #: work that may wait for a worker before more is rejected
        self.max_queue_size = settings.max_queue_size
        self._capacity = settings.max_workers + settings.max_queue_size
        # Daemon threads that run work in its submitter's context (see workers.py).
        self._executor = Workers(settings.max_workers, 'blackgate-%s' % (settings.group_key,))
        self._lock = threading.Lock()   # only for the rare updates below, never per call
        # One slot per admitted, unfinished run, taken and given back without a lock.
        slots = self._slots = Permits(self._capacity)
        release_slot = slots._held.pop   # Permits.release, minus a frame on every run
        # next() on an itertools.count is one atomic step: a counter no thread can lose an
        # update of. Reading it also steps it, so completed_count counts its own reads.
        completions = self._completions = itertools.count()
        self._reads = 0

        def release() -> None:
            release_slot()
            next(completions)

        self._release = release
        #: the adaptive limit (``concurrency_limit``), or None: see :attr:`limit`
        self.limiter: Optional[ConcurrencyLimit] = None
        #: executions that take at least this long (seconds) count as dropped by the
        #: limit: the shortest timeout of the commands using the pool (see note_timeout)
        self.drop_after = float('inf')
        if settings.concurrency_limit is not None:
            self.limiter = new_limit(settings.concurrency_limit)
            slots.limit = self.limiter.limit
            self._limit_lock = threading.Lock()
        self._largest = 0
        #: True once shutdown() was called: every submission is refused (or passed on)
        self.is_shut_down = False
        #: the pool that replaced this one (see :meth:`retire`), or None
        self.successor: Optional['ExecutorPool'] = None

    def try_submit(self, fn: Callable[..., Any], *args: Any
                   ) -> Optional[concurrent.futures.Future]:
        """Run ``fn(release, *args)`` on a worker, or return None at once if the pool is full.

        ``fn`` must call ``release()`` exactly once, whatever happens, as soon as its
        slot may serve other work: before it wakes whoever waits for its result, so
        that they find the pool free again. (Handing ``release`` to ``fn`` spares a
        wrapper frame around every run on the worker.)

        Two callers racing for the last slot may both be refused, never both admitted.
        """
        if self.successor is not None:   # replaced by install(): the new pool decides
            return self.successor.try_submit(fn, *args)
        slots = self._slots
        if not slots.try_acquire():
            return None
        admitted = slots.in_use
        if admitted > self._largest:   # a new high-water mark: rare once warm
            with self._lock:
                if admitted > self._largest:
                    self._largest = admitted
        # (with an adaptive limit, a release per admission that times the work: see there)
        release = self._release if self.limiter is None else self._limited_release(admitted)
        try:
            return self._executor.submit(fn, release, *args)
        except RuntimeError:  # shut down: refuse like a full pool, unless replaced meanwhile
            if self.successor is not None:
                slots.release()
                return self.successor.try_submit(fn, *args)
            slots.release_refused()
            return None

    def try_admit(self) -> Optional[Callable[[], None]]:
        """Take a slot for work that needs no thread; its ``release``, or None if the pool is full.

        For an ``async def run()`` admitted by its group (``Command.group_admission``,
        as :class:`~blackgate.HTTPProxyCommand` is): it counts against ``max_workers +
        max_queue_size`` like a submission, runs on the IOLoop, and calls ``release()``
        exactly once when it ends.
        """
        if self.successor is not None:   # replaced by install(): the new pool decides
            return self.successor.try_admit()
        slots = self._slots
        if not slots.try_acquire():
            return None
        if self.is_shut_down:   # refused like a full pool, as try_submit() does
            if self.successor is not None:
                slots.release()
                return self.successor.try_admit()
            slots.release_refused()
            return None
        admitted = slots.in_use
        if admitted > self._largest:
            with self._lock:
                if admitted > self._largest:
                    self._largest = admitted
        if self.limiter is not None:
            return self._limited_release(admitted)
        return self._release

    # -- the adaptive limit ---------------------------------------------------------------

    @property
    def limit(self) -> Optional[int]:
        """The adaptive limit now: work admitted at once beyond it is rejected.

        None for a pool without ``concurrency_limit`` (its bound is ``max_workers +
        max_queue_size``). Never more than ``max_workers``.
        """
        limiter = self.limiter
        return None if limiter is None else limiter.limit

    def note_timeout(self, timeout: Optional[float]) -> None:
        """A command with this ``timeout`` (None: disabled) runs here; see :attr:`drop_after`."""
        if timeout is not None and timeout < self.drop_after:
            self.drop_after = timeout

    def _limited_release(self, inflight: int) -> Callable[[], None]:
        # One closure per admission, only for a pool with a limit: it knows when its work
        # was admitted, and feeds the limit when the work gives its slot back.
        clock = self.clock
        start = clock.monotonic()
        release_slot = self._slots._held.pop
        completions = self._completions

        def release() -> None:
            release_slot()
            next(completions)
            now = clock.monotonic()
            self.record(now, start, now - start, inflight)

        return release

    def record(self, now: float, start: float, rtt: float, inflight: int,
               dropped: Optional[bool] = None) -> None:
        """Feed the limit one finished execution (``dropped`` None: judged by ``drop_after``)."""
        limiter = self.limiter
        if limiter is None:
            return
        if dropped is None:
            dropped = rtt >= self.drop_after
        with self._limit_lock:   # short: arithmetic on a few floats, no user code
            self._slots.limit = limiter.sample(now, start, rtt, inflight, dropped)

    @property
    def rejected_count(self) -> int:
        """Submissions refused since the pool started."""
        return self._slots.rejected

    @property
    def used(self) -> bool:
        """Some work was submitted to the pool (admitted or refused) since it started."""
        return self._largest > 0 or self._slots.rejected > 0

    @property
    def pool_size(self) -> int:
        """Worker threads the pool has started, from 0 to ``max_workers``.

        Its executor starts one only when no idle one is left, and keeps it until shutdown.
        """
        executor = self._executor
        count = getattr(executor, 'thread_count', None)
        if count is None:   # concurrent.futures.ThreadPoolExecutor tells it nowhere public
            return len(executor._threads)
        return count

    @property
    def _occupied(self) -> int:
        # Slots taken now; not the permits' in_use, which an adaptive limit that just
        # shrank would cut short (work admitted under the old limit still runs).
        return min(len(self._slots._held), self._capacity)

    @property
    def in_flight(self) -> int:
        """Work admitted and not finished: running plus waiting."""
        return self._occupied

    @property
    def completed_count(self) -> int:
        """Runs finished since the pool started."""
        with self._lock:
            steps = next(self._completions)   # completions, plus the reads before this one
            self._reads += 1
            return steps - (self._reads - 1)

    @property
    def active_count(self) -> int:
        """Workers busy right now (a timed-out ``run()`` keeps its worker busy)."""
        return min(self._occupied, self.max_workers)

    @property
    def queue_size(self) -> int:
        """Work waiting for a worker."""
        return max(0, self._occupied - self.max_workers)

    @property
    def largest_active_count(self) -> int:
        """The most workers ever busy at once."""
        return min(self._largest, self.max_workers)

    def retire(self, successor: 'ExecutorPool') -> None:
        """Hand new work to ``successor`` from now on; finish what was admitted, then stop.

        ``install()`` replaces a pool this way when its settings change, so that a
        call that still holds this pool is never refused for it (its work goes to
        ``successor``), while the work it already runs drains on its own threads.
        """
        self.successor = successor   # first: a submission refused from here on is passed on
        self.shutdown(wait=False)

    def shutdown(self, wait: bool = True, timeout: Optional[float] = None) -> List[str]:
        """Refuse new work; with ``wait``, return when running and queued work has finished.

        With a ``timeout`` (seconds), return after it at the latest. Returns the
        workers still busy (``'thread name: what it runs'``), empty when all finished.
        """
        self.is_shut_down = True
        return self._executor.shutdown(wait=wait, timeout=timeout)

    def __repr__(self) -> str:
        if self.limiter is not None:
            return '<ExecutorPool %s %d/%d active, limit %d>' % (
                self.group_key, self.active_count, self.max_workers, self.limiter.limit)
        return '<ExecutorPool %s %d/%d active, %d/%d queued>' % (
            self.group_key, self.active_count, self.max_workers, self.queue_size,
            self.max_queue_size)
