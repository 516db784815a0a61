"""Worker threads for the executor pools.

:class:`Workers` is the part of a ``ThreadPoolExecutor`` that a pool needs,
with two differences that matter to a process calling dependencies:

- its threads are daemon threads and the interpreter does not join them at
  exit. A ``ThreadPoolExecutor`` joins its workers when the main program
  ends, so a single ``run()`` that never returns kept the whole process
  alive, Ctrl-C or not (Python cannot interrupt a thread). A stuck ``run()``
  whose caller long had its fallback no longer holds the process; a caller
  still waiting for its answer is a thread of the program, and holds it as
  any thread does.
- each piece of work runs in a copy of the :mod:`contextvars` context of the
  thread that submitted it, as an ``asyncio`` task does: what the caller set
  (a request id, a tracing span) is what ``run()`` sees, and what ``run()``
  sets stays in its copy.

Admission (how much work may be in flight) is the pool's business; this
queue is unbounded and ``submit()`` never refuses except after
``shutdown()``.

.. warning::

   ``submit()`` may be called from any thread. ``shutdown()`` stops the
   threads once the work submitted before it is done; with a ``timeout``
   it returns when that has passed, telling which workers are still busy.
"""
import concurrent.futures
import contextvars
import queue
import threading
from typing import Any, Callable, Dict, List, Optional

from .clock import SystemClock

__all__ = ('Workers',)


class Workers:
    """Up to ``max_workers`` daemon threads, started as work arrives, fed from one queue."""

    def __init__(self, max_workers: int, name: str) -> None:
        self.max_workers = max_workers
        self.name = name
        self._work: 'queue.SimpleQueue[Any]' = queue.SimpleQueue()
        # One item per thread waiting for work (list.append and list.pop are atomic): the
        # lock-free form of ThreadPoolExecutor's idle semaphore, which costs a Condition.
        self._idle: List[None] = []
        # Taken by submit() and shutdown(), so that no work lands behind the threads' stop.
        self._lock = threading.Lock()
        self._threads: List[threading.Thread] = []
        #: thread name -> the callable it is running now
        self._running: Dict[str, Callable[..., Any]] = {}
        self._shut_down = False

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        """Run ``fn(*args)`` on a worker, in a copy of the caller's context; its future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._shut_down:
                raise RuntimeError('cannot submit work to %s after shutdown' % (self.name,))
            self._work.put((future, contextvars.copy_context(), fn, args))
            try:
                self._idle.pop()   # a waiting thread will take it
            except IndexError:
                if len(self._threads) < self.max_workers:
                    self._start_thread()
        return future

    def _start_thread(self) -> None:
        thread = threading.Thread(target=self._serve, daemon=True,
                                  name='%s_%d' % (self.name, len(self._threads)))
        thread.start()
        self._threads.append(thread)

    def _serve(self) -> None:
        get, idle, running = self._work.get, self._idle.append, self._running
        name = threading.current_thread().name
        while True:
            item = get()
            if item is None:   # shutdown(): one stop per thread, after the work before it
                return
            future, context, fn, args = item
            if future.set_running_or_notify_cancel():
                running[name] = fn
                try:
                    result = context.run(fn, *args)
                except BaseException as exc:   # the submitter gets it, as from an executor
                    future.set_exception(exc)
                else:
                    future.set_result(result)
                    result = None
                del running[name]
            item = future = context = fn = args = None   # let go before waiting for more
            idle(None)

    def shutdown(self, wait: bool = True, timeout: Optional[float] = None) -> List[str]:
        """Refuse new work and stop the threads once the work already submitted is done.

        With ``wait``, block until they have stopped, or until ``timeout`` seconds
        passed. Returns the workers still busy then (``'name: callable'``); empty
        when everything finished.
        """
        with self._lock:
            already, self._shut_down = self._shut_down, True
            threads = list(self._threads)
            if not already:
                for _ in threads:
                    self._work.put(None)
        if not wait:
            return []
        monotonic = SystemClock.monotonic   # threads are joined in real time
        deadline = None if timeout is None else monotonic() + timeout
        for thread in threads:
            thread.join(None if deadline is None else max(0.0, deadline - monotonic()))
        return self.busy()

    def busy(self) -> List[str]:
        """The workers running something now, as ``'thread name: what it runs'``."""
        return ['%s: %s' % (name, _describe(fn)) for name, fn in list(self._running.items())]

    @property
    def thread_count(self) -> int:
        """Threads started so far (never more than ``max_workers``)."""
        return len(self._threads)

    def __repr__(self) -> str:
        return '<Workers %s %d/%d threads%s>' % (self.name, len(self._threads), self.max_workers,
                                                 ', shut down' if self._shut_down else '')


def _describe(fn: Callable[..., Any]) -> str:
    owner = getattr(fn, '__self__', None)   # a bound method: say whose (a command's repr)
    if owner is not None:
        return '%r.%s()' % (owner, getattr(fn, '__name__', 'call'))
    return repr(fn)
