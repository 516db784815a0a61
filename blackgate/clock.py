"""The one source of time for breakers, metrics and timeouts.

Every time read in Blackgate goes through a clock object owned by the
registry (``component.clock``), so that tests can replace it with a
:class:`FakeClock` and move time forward without sleeping: rolling windows,
sleep windows, health snapshots and command timeouts all follow it.

A clock has four methods:

- ``monotonic()``: seconds, for measuring;
- ``wall()``: seconds since the epoch, for timestamps shown to people;
- ``call_later(loop, delay, callback)``: run ``callback`` on the asyncio
  ``loop`` after ``delay`` seconds, returning a handle with ``cancel()``;
- ``wait_until(future, deadline)``: block the calling thread until the
  ``concurrent.futures.Future`` is done and return its result, or raise
  :class:`TimeoutError` once ``monotonic()`` reaches ``deadline``.

.. warning::

   A :class:`FakeClock` may be advanced from any thread; the timers it fires
   run on their own loop through ``call_soon_threadsafe``.
"""
import concurrent.futures
import heapq
import itertools
import threading
import time
from typing import Any, Callable, List, Tuple

__all__ = ('SystemClock', 'FakeClock', 'TimeoutError')

#: What ``wait_until`` raises (an alias of the built-in on Python 3.11+).
TimeoutError = concurrent.futures.TimeoutError


class SystemClock:
    """The real clock: ``time.monotonic``, ``time.time`` and the loop's own timers."""

    __slots__ = ()

    #: Seconds from an arbitrary start, for measuring (``time.monotonic``).
    monotonic = staticmethod(time.monotonic)
    #: Seconds since the epoch, for timestamps (``time.time``).
    wall = staticmethod(time.time)

    @staticmethod
    def call_later(loop, delay: float, callback: Callable[[], Any]):
        """Run ``callback`` on ``loop`` after ``delay`` seconds; returns a cancellable handle."""
        return loop.call_later(delay, callback)

    @staticmethod
    def wait_until(future: concurrent.futures.Future, deadline: float,
                   _monotonic: Callable[[], float] = time.monotonic) -> Any:
        """The future's result, or :class:`TimeoutError` once ``monotonic()`` reaches ``deadline``."""
        return future.result(deadline - _monotonic())

    def __repr__(self) -> str:
        return '<SystemClock>'


class _FakeTimer:
    __slots__ = ('deadline', 'loop', 'callback', 'cancelled', 'clock')

    def __init__(self, clock: 'FakeClock', deadline: float, loop,
                 callback: Callable[[], Any]) -> None:
        self.clock = clock
        self.deadline = deadline
        self.loop = loop
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self.clock._timer_cancelled()


class FakeClock:
    """A clock that moves only when told to, for tests.

    ``advance(seconds)`` moves time forward, fires the loop timers that fall
    due and wakes the threads blocked in ``execute()`` whose timeout passed::

        clock = FakeClock()
        component.clock = clock
        clock.advance(5.0)   # the sleep window is over
    """

    def __init__(self, start: float = 1000.0, wall_start: float = 1_700_000_000.0) -> None:
        self._now = float(start)
        self._wall_offset = float(wall_start) - float(start)
        self._cond = threading.Condition(threading.RLock())
        self._timers: List[Tuple[float, int, _FakeTimer]] = []
        self._sequence = itertools.count()
        self._waiters = 0
        self._cancelled = 0

    def monotonic(self) -> float:
        """The fake time, in seconds; moves only with :meth:`advance`."""
        return self._now

    def wall(self) -> float:
        """The fake time as seconds since the epoch."""
        return self._now + self._wall_offset

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds`` (not negative) and fire what fell due."""
        if seconds < 0:
            raise ValueError('a FakeClock only moves forward; got advance(%r)' % (seconds,))
        with self._cond:
            self._now += seconds
            due = []
            while self._timers and self._timers[0][0] <= self._now:
                timer = heapq.heappop(self._timers)[2]
                if timer.cancelled:
                    self._cancelled -= 1
                else:
                    due.append(timer)
            self._cond.notify_all()
        for timer in due:
            if not timer.cancelled:
                try:
                    timer.loop.call_soon_threadsafe(_fire, timer)
                except RuntimeError:   # its loop is closed: nobody is waiting for it
                    pass

    def call_later(self, loop, delay: float, callback: Callable[[], Any]) -> _FakeTimer:
        """Run ``callback`` on ``loop`` once :meth:`advance` has moved ``delay`` seconds on."""
        with self._cond:
            timer = _FakeTimer(self, self._now + delay, loop, callback)
            if delay <= 0:
                loop.call_soon_threadsafe(_fire, timer)
            else:
                heapq.heappush(self._timers, (timer.deadline, next(self._sequence), timer))
        return timer

    def wait_until(self, future: concurrent.futures.Future, deadline: float) -> Any:
        """Block until the future is done, or :class:`TimeoutError` once advanced to ``deadline``."""
        future.add_done_callback(self._wake)
        with self._cond:
            self._waiters += 1
            self._cond.notify_all()
            try:
                while not future.done():
                    if self._now >= deadline:
                        raise TimeoutError()
                    self._cond.wait()
            finally:
                self._waiters -= 1
        return future.result()

    @property
    def waiters(self) -> int:
        """How many threads are blocked in ``execute()`` waiting on this clock."""
        return self._waiters

    def wait_for_waiters(self, count: int, timeout: float = 5.0) -> bool:
        """Block (in real time, at most ``timeout`` s) until ``count`` threads wait on this clock.

        A test calls it before ``advance()``, so that the ``execute()`` it started in
        another thread is surely waiting for its timeout.
        """
        with self._cond:
            return self._cond.wait_for(lambda: self._waiters >= count, timeout)

    def _timer_cancelled(self) -> None:
        # Drop cancelled timers once they are half the heap, so that many queue() calls
        # under a clock that is never advanced do not pile up.
        with self._cond:
            self._cancelled += 1
            if self._cancelled * 2 > len(self._timers):
                self._timers = [item for item in self._timers if not item[2].cancelled]
                heapq.heapify(self._timers)
                self._cancelled = 0

    def _wake(self, _future) -> None:
        with self._cond:
            self._cond.notify_all()

    def __repr__(self) -> str:
        return '<FakeClock %.3f>' % (self._now,)


def _fire(timer: _FakeTimer) -> None:
    if not timer.cancelled:
        timer.callback()
