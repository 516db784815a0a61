"""Memory per idle command key (breaker + metrics), and whether it stays flat under traffic.

Measured with ``tracemalloc``, which counts every Python allocation:

1. *per idle key*: ``--keys`` command classes run once each (their key's
   breaker, metrics, permits and resolved settings come to life), then their
   rolling window goes by and is read, so each key is idle; the bytes still
   held, divided by the number of keys;
2. *flat after N calls*: one key runs N ``execute()`` calls on the real clock;
   at 1 %, 10 % and 100 % of them its window is made to go by (the clock is
   shifted an hour ahead) and read, and the bytes held are compared with
   those after a warm-up of 10,000 calls. Flat means that the last 90 % of
   the calls added at most 1 KiB: the grain of the allocator (one block of
   the ring's deque is 528 bytes), while a leak of one byte per thousand
   calls would already add 900.

The peers keep no rolling metrics; their row is the bytes of one breaker that
guarded one call, for scale.
"""
import gc
import time
import tracemalloc
from typing import Any, Callable, List, Tuple

from blackgate import Command, component
from blackgate.testing import FakeClock

from . import peers
from .plan import Plan
from .results import CaseResult, Row, Target

__all__ = ('case_memory', 'FLAT_TOLERANCE')

#: bytes of growth after the warm-up still called flat
FLAT_TOLERANCE = 1024
_WARMUP_CALLS = 10_000


class _ShiftedClock:
    """The system clock, plus an offset that jumps forward to age rolling windows at once."""

    def __init__(self) -> None:
        self.offset = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.offset

    def wall(self) -> float:
        return time.time() + self.offset

    def call_later(self, loop, delay: float, callback: Callable[[], Any]):
        return loop.call_later(delay, callback)

    def wait_until(self, future, deadline: float) -> Any:
        return future.result(deadline - self.monotonic())


def _command_class(key: str) -> type:
    return type('Bench_%s' % (key,), (Command,), {
        'command_key': key, 'run': lambda self: 1, 'fallback': lambda self: 0})


def _traced() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def per_idle_key(keys: int) -> Tuple[float, float]:
    """(bytes per key with its window live, bytes per key once idle)."""
    component.reset()
    clock = component.clock = FakeClock()
    classes = [_command_class('bench_key_%d' % (i,)) for i in range(keys)]
    _command_class('bench_key_warm')().execute()   # one-off allocations: threads, caches
    tracemalloc.start()
    try:
        before = _traced()
        for cls in classes:
            cls().execute()
        live = _traced() - before
        clock.advance(3600.0)
        for cls in classes:
            component.metrics(cls.command_key).health()   # reading drops the stale buckets
        idle = _traced() - before
    finally:
        tracemalloc.stop()
        component.reset()
    return live / keys, idle / keys


def growth_under_traffic(calls: int) -> List[Tuple[int, int]]:
    """[(calls made, bytes held beyond the warm-up once idle)] at 1 %, 10 % and 100 % of ``calls``."""
    component.reset()
    clock = component.clock = _ShiftedClock()
    cls = _command_class('bench_flat')
    key = cls.command_key

    def idle_bytes() -> int:
        clock.offset += 3600.0
        component.metrics(key).health()
        return _traced()

    for _ in range(_WARMUP_CALLS):
        cls().execute()
    tracemalloc.start()
    series = []
    try:
        base = idle_bytes()
        done = 0
        for checkpoint in sorted({max(1, calls // 100), max(1, calls // 10), calls}):
            for _ in range(checkpoint - done):
                cls().execute()
            done = checkpoint
            series.append((done, idle_bytes() - base))
    finally:
        tracemalloc.stop()
        component.reset()
    return series


def peer_breaker_bytes(keys: int) -> List[Row]:
    """One row per usable peer: bytes per breaker that guarded one call."""
    rows = []
    for name, make in peers.breaker_footprints().items():
        tracemalloc.start()
        try:
            before = _traced()
            held = [make('bench_peer_%s_%d' % (name, i)) for i in range(keys)]
            size = (_traced() - before) / keys
        finally:
            tracemalloc.stop()
        del held
        rows.append(Row(name, 'peer', size, note='one breaker, no rolling metrics'))
    return rows


def case_memory(plan: Plan) -> CaseResult:
    """Bytes per idle command key, <= 4 KiB, and flat after ``plan.memory_calls`` calls."""
    calls = plan.memory_calls
    case = CaseResult('memory', 'memory per idle command key (breaker + metrics)', '-',
                      Target('bytes_max', 4096, '<= 4 KiB, flat after %s calls'
                             % format(calls, ',')),
                      'tracemalloc; %d keys run once then idle; one key, %s execute() calls'
                      % (plan.memory_keys, format(calls, ',')))
    live, idle = per_idle_key(plan.memory_keys)
    series = growth_under_traffic(calls)
    case.rows.append(Row('Blackgate, idle key', 'blackgate', idle,
                         note='%.0f B while its window is live' % (live,)))
    case.rows.extend(peer_breaker_bytes(plan.memory_keys))
    late = series[-1][1] - (series[-2][1] if len(series) > 1 else 0)
    case.checks['flat: %s; the last 90%% of the calls added %+d B (tolerance %d B)' % (
        ', '.join('%+d B after %s calls' % (grown, format(done, ','))
                  for done, grown in series), late, FLAT_TOLERANCE)] = late <= FLAT_TOLERANCE
    case.notes.append('bytes held beyond the warm-up once idle: ' + ', '.join(
        '%+d B after %s calls' % (grown, format(done, ',')) for done, grown in series))
    case.details['bytes_per_key_live'] = live
    case.details['growth_series'] = series
    for name, reason in peers.status().items():
        if reason is not None:
            case.notes.append('%s left out: %s' % (name, reason))
    return case
