"""Leaks (issue 8): threads, file descriptors and memory.

- After ``component.shutdown()`` (and ``component.reset()``) the threads and
  the open file descriptors (``/proc/self/fd``) are those of before: pools,
  reconfigured pools, timed-out runs, event loops, all gone.
- Calls leave memory flat: with ``tracemalloc``, 100,000 calls of every kind
  (successes, failures, bad requests, short-circuits, timeouts, semaphore
  rejections, through ``execute()`` and ``queue()``) in phases of equal size;
  once warm, a phase must not grow the traced memory by more than a few
  kilobytes, far below what one kept object per call would cost. Set
  ``BLACKGATE_SOAK=1`` to make it a million calls.
"""
import asyncio
import gc
import logging
import os
import threading
import time
import tracemalloc

import pytest

from blackgate import BadRequest, Command, CommandError, component

SOAK = os.environ.get('BLACKGATE_SOAK', '') not in ('', '0')
#: Real seconds: the longest a test waits for threads to end or fds to close.
WAIT = 10.0

#: Figures for the report.
FIGURES = {}

pytestmark = pytest.mark.skipif(not os.path.isdir('/proc/self/fd'),
                                reason='needs /proc/self/fd (Linux)')


def open_fds():
    return len(os.listdir('/proc/self/fd'))


def settle(predicate, bound=WAIT):
    """Wait (bounded) for ``predicate()``; threads end and fds close a moment after shutdown."""
    deadline = time.monotonic() + bound
    while not predicate():
        if time.monotonic() > deadline:
            return False
        gc.collect()
        time.sleep(0.01)
    return True


def new_threads(before):
    return [t for t in threading.enumerate() if t not in before and t.is_alive()]


# -- commands --------------------------------------------------------------------------------

class Ok(Command):
    group_key = 'leaks.a'

    def run(self):
        return 'fresh'

    def fallback(self):
        return 'stale'


class Fail(Ok):
    group_key = 'leaks.b'

    def run(self):
        raise ConnectionError('upstream down')


class Bad(Ok):
    def run(self):
        raise BadRequest('no such user')


class Slow(Ok):
    """Times out (real time) while its worker waits for the gate."""

    timeout = 0.01

    def __init__(self, gate):
        self.gate = gate

    def run(self):
        self.gate.wait(WAIT)
        return 'late'


class AsyncOk(Ok):
    async def run(self):
        await asyncio.sleep(0)
        return 'fresh'


class AsyncRejected(Ok):
    max_concurrent_requests = 0

    async def run(self):  # pragma: no cover - always rejected
        return 'fresh'


class Open(Ok):
    circuit_breaker_force_open = True


def _answer(call):
    try:
        return call()
    except (CommandError, BadRequest) as exc:
        return type(exc).__name__


async def _queue_one(cls):
    return await asyncio.wait_for(cls().queue(), WAIT)


# -- threads and file descriptors ----------------------------------------------------------------

def test_shutdown_leaves_the_threads_and_file_descriptors_it_found(system_clock):
    threads_before = set(threading.enumerate())
    fds_before = open_fds()
    gate = threading.Event()
    try:
        for cycle in range(5):
            for group, workers in (('leaks.a', 3 + cycle), ('leaks.b', 2)):
                component.add('executor_pool', {'group_key': group, 'max_workers': workers,
                                                'max_queue_size': cycle})
            component.install()                # a changed pool replaces the old one
            answers = [_answer(cls().execute) for cls in (Ok, Fail, Bad, Open) * 25]
            assert answers.count('fresh') == 25 and answers.count('stale') == 50
            assert _answer(Slow(gate).execute) == 'stale'   # its worker stays busy

            async def queued():
                calls = [cls().queue() for cls in (Ok, Fail, AsyncOk, AsyncRejected) * 10]
                return await asyncio.gather(*calls, return_exceptions=True)

            assert asyncio.run(asyncio.wait_for(queued(), WAIT)).count('stale') >= 20
            assert new_threads(threads_before)   # the pools are running
            gate.set()                           # the timed-out run()s return
            component.shutdown()
            gate.clear()
    finally:
        gate.set()
        component.shutdown()
    assert settle(lambda: not new_threads(threads_before)), new_threads(threads_before)
    assert settle(lambda: open_fds() <= fds_before), (open_fds(), fds_before)
    FIGURES['threads and fds'] = dict(threads_left=len(new_threads(threads_before)),
                                      fds_left=open_fds() - fds_before)


def test_reset_after_use_leaves_the_threads_and_file_descriptors_it_found(system_clock):
    threads_before = set(threading.enumerate())
    fds_before = open_fds()
    for _ in range(10):
        component.add('executor_pool', {'group_key': 'leaks.a', 'max_workers': 4})
        component.install()
        assert [Ok().execute() for _ in range(20)] == ['fresh'] * 20
        assert asyncio.run(_queue_one(AsyncOk)) == 'fresh'
        component.reset()
    assert settle(lambda: not new_threads(threads_before)), new_threads(threads_before)
    assert settle(lambda: open_fds() <= fds_before), (open_fds(), fds_before)


# -- memory ------------------------------------------------------------------------------------

class Counting:
    """An on_event listener that keeps nothing."""

    def __init__(self):
        self.n = 0

    def on_event(self, command_key, event):
        self.n += 1


class Discard(logging.Handler):
    """Takes every record the library logs and keeps none."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def emit(self, record):
        self.n += 1


class Late(Ok):
    """Times out under the FakeClock: run() moves the clock past its own deadline."""

    def run(self):
        component.clock.advance(1.5)
        return 'late'


SYNC_MIX = (Ok, Ok, Ok, Fail, Bad, Open, Late)
ASYNC_MIX = (Ok, Fail, AsyncOk, AsyncRejected, Open, Late)


def _calls(n, clock):
    """``n`` calls: about two thirds execute(), one third queue(); time moves on."""
    sync_n = n * 2 // 3
    for i in range(sync_n):
        _answer(SYNC_MIX[i % len(SYNC_MIX)]().execute)
        if i % 1000 == 999:
            clock.advance(0.3)            # buckets roll over, as in real life

    async def queued(count):
        for i in range(count):
            try:
                await ASYNC_MIX[i % len(ASYNC_MIX)]().queue()
            except (CommandError, BadRequest):
                pass

    asyncio.run(queued(n - sync_n))


def test_calls_leave_memory_flat(clock):
    for group in ('leaks.a', 'leaks.b'):
        component.add('executor_pool', {'group_key': group, 'max_workers': 2})
    component.install()
    listener = Counting()
    component.add_listener(listener)
    logger = logging.getLogger('blackgate')
    handler = Discard()
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False   # pytest's log capture keeps every record: that would grow
    phase = 250_000 if SOAK else 25_000
    try:
        _calls(5_000, clock)            # warm up: caches, buckets, pools, dict sizes
        gc.collect()
        tracemalloc.start()
        try:
            readings = []
            for _ in range(4):
                _calls(phase, clock)
                gc.collect()
                readings.append(tracemalloc.get_traced_memory()[0])
        finally:
            tracemalloc.stop()
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
    calls = 4 * phase
    growth = [b - a for a, b in zip(readings, readings[1:])]
    FIGURES['memory'] = dict(calls=calls + 5_000, readings=readings, growth_per_phase=growth)
    print('\nmemory figures:', FIGURES['memory'])
    assert listener.n >= calls
    assert handler.n > calls // 4      # the failures were logged
    # One kept object per call would be >= 48 bytes * phase (1.2 MB a phase); allow
    # 64 KB of noise per phase (dict resizes, interned strings) and no steady growth.
    assert all(g < 64 * 1024 for g in growth), growth
    assert readings[-1] - readings[0] < 128 * 1024, readings
    for key in ('Ok', 'Fail', 'Late'):
        metrics = component.metrics(key)
        assert metrics.concurrent_executions == 0
        assert sum(metrics.rolling_counts().values()) > 0
