"""Rolling metrics: counts per event and latency histograms over a time window.

The window is a ring of buckets, each ``metrics_rolling_window /
metrics_rolling_buckets`` seconds wide. Recording an execution costs O(1):
find (or open) the newest bucket, add to a few counters and one histogram bin.
Buckets older than the window fall off as time passes, so an idle command key
holds no buckets at all once its window has gone by and it has been read.

Latency is kept in log-linear histograms (16 bins per power of two, so a
percentile is within about 3% of the true value), bounded in size whatever the
traffic.

This module knows nothing of circuit breakers: the breaker asks for a
:meth:`RollingMetrics.health_snapshot` and decides for itself.

.. warning::

   Every method may be called from any thread. The lock guards only counter
   updates and reads; no user code ever runs under it.
"""
import math
import threading
from typing import Dict, Iterable, List, NamedTuple, Optional, Tuple

from .events import ERROR_EVENTS, Event

__all__ = ('RollingMetrics', 'HealthCounts', 'LatencySummary')

_EVENTS = tuple(Event)
_INDEX = {event: i for i, event in enumerate(_EVENTS)}
_ERROR_INDEXES = tuple(_INDEX[e] for e in ERROR_EVENTS)
_SUCCESS_INDEX = _INDEX[Event.SUCCESS]
_SUB_BINS = 32          # mantissa in [0.5, 1) maps to bins 16..31: 16 bins per octave
_frexp = math.frexp


class HealthCounts(NamedTuple):
    """What the breaker looks at: requests, errors and the error percentage in the window."""

    #: errors plus successes (short-circuits and bad requests are not requests here)
    total_requests: int
    #: FAILURE + TIMEOUT + THREAD_POOL_REJECTED + SEMAPHORE_REJECTED
    error_count: int
    #: 100 * error_count / total_requests, 0.0 when there were no requests
    error_percentage: float


_NO_HEALTH = HealthCounts(0, 0, 0.0)


class LatencySummary(NamedTuple):
    """Latency in the window, read in one pass: for the metrics stream and exporters."""

    #: how many calls were timed
    measured: int
    #: their mean, in seconds (from the histogram: within about 3%, like the percentiles)
    mean: float
    #: percentile (0 to 100) -> seconds, for each percentile asked for
    percentiles: Dict[float, float]


_ZERO_BIN = -(1 << 30)
# events tuple -> positions in a bucket's counts; outcomes are few, so this stays tiny
_POSITIONS: Dict[Tuple[Event, ...], Tuple[int, ...]] = {}


def _bin_value(key: int) -> float:
    if key == _ZERO_BIN:
        return 0.0
    exponent, sub = divmod(key, _SUB_BINS)
    return math.ldexp((sub + 0.5) / _SUB_BINS, exponent)


class _Bucket:
    __slots__ = ('index', 'counts', 'execution', 'total')

    def __init__(self, index: int) -> None:
        self.index = index
        self.counts = [0] * len(_EVENTS)
        self.execution: Dict[int, int] = {}
        self.total: Dict[int, int] = {}


class RollingMetrics:
    """Rolling counts, latency percentiles and health of one command key."""

    __slots__ = ('command_key', 'clock', '_lock', '_ring', '_running', '_shape', '_window',
                 '_width', '_interval', '_buckets', '_snapshot', '_snapshot_due')

    def __init__(self, command_key: str, window: float, buckets: int,
                 snapshot_interval: float, clock) -> None:
        self.command_key = command_key
        self.clock = clock
        self._lock = threading.Lock()
        # Oldest bucket first; at most metrics_rolling_buckets long, so a list (far smaller
        # than a deque when idle) is as quick.
        self._ring: List[_Bucket] = []
        self._running: List[None] = []   # one item per run() in progress
        self._shape: Optional[Tuple[float, int, float]] = None
        self._window = self._width = self._interval = 0.0
        self._buckets = 0
        self._snapshot = _NO_HEALTH
        self._snapshot_due = -math.inf
        self.configure(window, buckets, snapshot_interval)

    # -- recording (hot path) -------------------------------------------------------

    def execution_started(self) -> None:
        # list.append and list.pop are atomic: no lock on the worker thread.
        self._running.append(None)

    def execution_finished(self) -> None:
        self._running.pop()

    def record(self, events: Tuple[Event, ...], execution_time: Optional[float],
               total_time: float, now: Optional[float] = None) -> Optional[HealthCounts]:
        """Count one completed command: its events and, where ``run()`` ran, its latency.

        Returns a new health snapshot when one fell due (every ``snapshot_interval``),
        else None: whoever judges health need look only then.
        """
        positions = _POSITIONS.get(events)
        if positions is None:
            positions = tuple(_INDEX[event] for event in events)
            if len(_POSITIONS) < 4096:
                _POSITIONS[tuple(events)] = positions
        if execution_time is None:
            execution_key = None
        elif execution_time > 0:
            mantissa, exponent = _frexp(execution_time)
            execution_key = exponent * _SUB_BINS + int(mantissa * _SUB_BINS)
        else:
            execution_key = _ZERO_BIN
        if total_time > 0:
            mantissa, exponent = _frexp(total_time)
            total_key = exponent * _SUB_BINS + int(mantissa * _SUB_BINS)
        else:
            total_key = _ZERO_BIN
        if now is None:
            now = self.clock.monotonic()
        index = int(now // self._width)
        with self._lock:
            ring = self._ring
            if ring and ring[-1].index >= index:
                bucket = ring[-1]
            else:
                bucket = _Bucket(index)
                ring.append(bucket)
                oldest = index - self._buckets
                while ring[0].index <= oldest:
                    del ring[0]
            counts = bucket.counts
            for position in positions:
                counts[position] += 1
            if execution_key is not None:
                histogram = bucket.execution
                histogram[execution_key] = histogram.get(execution_key, 0) + 1
            histogram = bucket.total
            histogram[total_key] = histogram.get(total_key, 0) + 1
            if now < self._snapshot_due:
                return None
            self._snapshot = self._health(now)
            self._snapshot_due = now + self._interval
            return self._snapshot

    def configure(self, window: float, buckets: int, snapshot_interval: float) -> None:
        """Take a new window shape; the counts restart if it changed."""
        with self._lock:
            shape = (float(window), int(buckets), float(snapshot_interval))
            if shape == self._shape:
                return
            self._shape = shape
            self._window, self._buckets, self._interval = shape
            self._width = self._window / self._buckets
            self._ring.clear()
            self._snapshot = _NO_HEALTH
            self._snapshot_due = -math.inf

    def reset(self) -> None:
        """Forget every bucket (the breaker does this when it closes)."""
        with self._lock:
            self._ring.clear()
            self._snapshot = _NO_HEALTH
            self._snapshot_due = -math.inf

    # -- reading --------------------------------------------------------------------

    def _live(self, now: Optional[float] = None) -> List[_Bucket]:
        # Caller holds the lock. Drops buckets that fell out of the window.
        if now is None:
            now = self.clock.monotonic()
        oldest = int(now // self._width) - self._buckets
        ring = self._ring
        while ring and ring[0].index <= oldest:
            del ring[0]
        return list(ring)

    def rolling_count(self, event: Event) -> int:
        """How many times ``event`` happened in the rolling window."""
        position = _INDEX[Event(event)]
        with self._lock:
            return sum(bucket.counts[position] for bucket in self._live())

    def rolling_counts(self) -> Dict[Event, int]:
        """Every event's count in the rolling window."""
        with self._lock:
            live = self._live()
            return {event: sum(b.counts[i] for b in live) for i, event in enumerate(_EVENTS)}

    def health(self) -> HealthCounts:
        """Requests, errors and error percentage in the window, as of now."""
        with self._lock:
            return self._health()

    def _health(self, now: Optional[float] = None) -> HealthCounts:
        errors = successes = 0
        for bucket in self._live(now):
            counts = bucket.counts
            successes += counts[_SUCCESS_INDEX]
            for i in _ERROR_INDEXES:
                errors += counts[i]
        total = errors + successes
        return HealthCounts(total, errors, 100.0 * errors / total if total else 0.0)

    @property
    def last_snapshot(self) -> HealthCounts:
        """The most recent health snapshot (empty again after :meth:`reset`)."""
        return self._snapshot

    def health_snapshot(self) -> HealthCounts:
        """The health as of the last snapshot, refreshed every ``snapshot_interval``."""
        now = self.clock.monotonic()
        if now < self._snapshot_due:
            return self._snapshot
        with self._lock:
            if now >= self._snapshot_due:
                self._snapshot = self._health(now)
                self._snapshot_due = now + self._interval
            return self._snapshot

    def latency_percentile(self, percentile: float) -> float:
        """Execution time of ``run()`` at ``percentile`` (0 to 100) in the window, in seconds."""
        return self._percentile('execution', percentile)

    def total_latency_percentile(self, percentile: float) -> float:
        """Time from call to answer (fallback included) at ``percentile``, in seconds."""
        return self._percentile('total', percentile)

    def latency_summary(self, percentiles: Iterable[float] = ()) -> LatencySummary:
        """Count, mean and ``percentiles`` of ``run()``'s execution time, in one pass."""
        return self._summary('execution', percentiles)

    def total_latency_summary(self, percentiles: Iterable[float] = ()) -> LatencySummary:
        """Count, mean and ``percentiles`` of the time from call to answer, in one pass."""
        return self._summary('total', percentiles)

    def _summary(self, which: str, percentiles: Iterable[float]) -> LatencySummary:
        # One merge of the histograms for many percentiles: the metrics stream reads
        # nine of them twice per command every half second.
        wanted = sorted(set(percentiles))
        for percentile in wanted:
            if not 0 <= percentile <= 100:
                raise ValueError('percentile must be from 0 to 100, got %r' % (percentile,))
        merged: Dict[int, int] = {}
        with self._lock:
            for bucket in self._live():
                for key, count in getattr(bucket, which).items():
                    merged[key] = merged.get(key, 0) + count
        total = sum(merged.values())
        if not total:
            return LatencySummary(0, 0.0, {p: 0.0 for p in wanted})
        keys = sorted(merged)
        values = {}
        seen, position = 0, 0
        for percentile in wanted:
            rank = max(1, math.ceil(total * percentile / 100.0))
            while seen < rank:
                seen += merged[keys[position]]
                position += 1
            values[percentile] = _bin_value(keys[position - 1])
        mean = sum(_bin_value(key) * count for key, count in merged.items()) / total
        return LatencySummary(total, mean, values)

    def _percentile(self, which: str, percentile: float) -> float:
        if not 0 <= percentile <= 100:
            raise ValueError('percentile must be from 0 to 100, got %r' % (percentile,))
        return self._summary(which, (percentile,)).percentiles[percentile]

    @property
    def concurrent_executions(self) -> int:
        """How many ``run()`` calls of this key are executing right now."""
        return len(self._running)

    def __repr__(self) -> str:
        health = self.health()
        return '<RollingMetrics %s %d requests %d errors>' % (
            self.command_key, health.total_requests, health.error_count)
