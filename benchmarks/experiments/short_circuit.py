"""A leaner forced-open ``execute()``: what each suggested change saves (timeit, best of 7).

    python -m benchmarks.experiments.short_circuit

v1: one constant events tuple instead of a list turned into a tuple; the
    ShortCircuited cause built only when someone reads it; no _log_failure()
    call when the fallback succeeded and INFO is off.
v2: v1 + a record() that takes the caller's clock reading and the events'
    precomputed positions.
v3: v2 + fallback permits without a lock (list.append/pop are atomic; two
    threads racing for the last permit may both be refused, never both admitted).
v4: v3 + deferred recording: the outcome is appended to a lock-free list that
    whoever reads the counts next (health snapshot, rolling_count, the stream)
    folds into the buckets; only the snapshot check stays on the hot path.
"""
import math
import timeit

from blackgate import Event
from blackgate import command as C
from blackgate.breaker import DENY
from blackgate.metrics import _INDEX

from ..cases import ForcedOpen, _fresh_component

SC_FB = (Event.SHORT_CIRCUITED, Event.FALLBACK_SUCCESS)
POSITIONS = tuple(_INDEX[event] for event in SC_FB)
N = 200_000


def record_lean(metrics, positions, total, now):
    """record() for a caller that has ``now`` and the positions already."""
    if total > 0:
        mantissa, exponent = math.frexp(total)
        key = exponent * 32 + int(mantissa * 32)
    else:
        key = -1
    index = int(now // metrics._width)
    ring = metrics._ring
    if not ring or ring[-1].index < index:
        return metrics.record(SC_FB, None, total, now)   # a new bucket: the usual path
    with metrics._lock:
        bucket = ring[-1]
        counts = bucket.counts
        for position in positions:
            counts[position] += 1
        histogram = bucket.total
        histogram[key] = histogram.get(key, 0) + 1
        if now < metrics._snapshot_due:
            return None
        metrics._snapshot = metrics._health(now)
        metrics._snapshot_due = now + metrics._interval
        return metrics._snapshot


class ListPermits:
    """try_acquire()/release() with no lock."""

    def __init__(self, limit):
        self.limit, self._held, self.rejected = limit, [], 0

    def try_acquire(self):
        held = self._held
        held.append(None)
        if len(held) > self.limit:
            held.pop()
            self.rejected += 1
            return False
        return True

    def release(self):
        self._held.pop()


LIST_PERMITS = ListPermits(10)
PENDING = []


def _fast(self, permits, record):
    if C._get_running_loop() is not None:
        raise RuntimeError('not on a loop thread')
    rt = C._runtime(type(self))
    if rt.run_is_async or rt.fallback_is_async:
        raise RuntimeError('async')
    self._bg_claim()
    clock = rt.clock
    start = clock.monotonic()
    if rt.breaker.allow_request() != DENY or not rt.has_fallback:
        raise RuntimeError('the prototype covers the short-circuit path only')
    permits = permits or rt.state.fallback_permits
    if not permits.try_acquire():
        raise RuntimeError('the prototype covers the short-circuit path only')
    try:
        value = self.fallback()
    finally:
        permits.release()
    self._bg_events = SC_FB
    now = clock.monotonic()
    health = record(rt, now - start, now)
    if health is not None:
        rt.breaker.evaluate(health)
    return value


def _record_today(rt, total, now):
    return rt.metrics.record(SC_FB, None, total, now)


def _record_lean(rt, total, now):
    return record_lean(rt.metrics, POSITIONS, total, now)


def _record_deferred(rt, total, now):
    PENDING.append((now, POSITIONS, total))
    if now >= rt.metrics._snapshot_due:
        del PENDING[:]   # the fold and the snapshot would go here
    return None


VARIANTS = (
    ('library today: ForcedOpen().execute()', lambda: ForcedOpen().execute()),
    ('v1 constant events, lazy cause, no log call',
     lambda: _fast(ForcedOpen(), None, _record_today)),
    ('v2 = v1 + lean record', lambda: _fast(ForcedOpen(), None, _record_lean)),
    ('v3 = v2 + lock-free permits', lambda: _fast(ForcedOpen(), LIST_PERMITS, _record_lean)),
    ('v4 = v3 + deferred recording', lambda: _fast(ForcedOpen(), LIST_PERMITS, _record_deferred)),
)


def _best(call) -> float:
    return min(timeit.repeat(call, number=N, repeat=7)) / N * 1e9


def main() -> None:
    _fresh_component([{'group_key': 'bench_open', 'max_workers': 1}])
    ForcedOpen().execute()
    base = _best(lambda: ForcedOpen().fallback())
    print('%-48s %6.0f ns' % ('baseline: ForcedOpen().fallback()', base))
    for label, call in VARIANTS:
        assert call() == 0
        value = _best(call)
        print('%-48s %6.0f ns  (%+5.0f ns over the baseline)' % (label, value, value - base))
        del PENDING[:]


if __name__ == '__main__':
    main()
