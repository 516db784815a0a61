"""Rolling metrics: counts per event and latency histograms over a time window.

The window is a ring of buckets, each ``metrics_rolling_window /
metrics_rolling_buckets`` seconds wide. Recording an execution takes no lock:
its outcome is appended to a list, and whoever reads next (a health snapshot,
a reader such as the metrics stream, or the recording thread once
:data:`FOLD_AT` outcomes wait) folds the list into the buckets under the lock,
in O(1) per outcome. Every read therefore sees every outcome recorded before
it. Buckets older than the window fall off as time passes, so an idle command key
holds no buckets at all once its window has gone by and it has been read.

Latency is kept in logarithmic histograms (16 bins per power of two, so a
percentile is within 2.2% of the true value), bounded in size whatever the
traffic.

Besides the window, :meth:`RollingMetrics.cumulative` counts every event and
latency since the metrics were created, for exporters whose counters must only
grow (Prometheus): a bucket that leaves the window, or is cleared when the
breaker closes, is added to a running total first, so that costs nothing per
execution.

This module knows nothing of circuit breakers: the breaker asks for a
:meth:`RollingMetrics.health_snapshot` and decides for itself.

.. warning::

   Every method may be called from any thread. The lock guards only the fold
   and the reads; no user code ever runs under it.
"""
import bisect
import math
import threading
from typing import Dict, Iterable, List, NamedTuple, Optional, Tuple

from .events import ERROR_EVENTS, Event

__all__ = ('RollingMetrics', 'HealthCounts', 'LatencySummary', 'LatencyHistogram',
           'Cumulative', 'check_bounds')

_EVENTS = tuple(Event)
_INDEX = {event: i for i, event in enumerate(_EVENTS)}
_ERROR_INDEXES = tuple(_INDEX[e] for e in ERROR_EVENTS)
_REJECTION_EVENTS = frozenset((Event.THREAD_POOL_REJECTED, Event.SEMAPHORE_REJECTED))
_FAILURE_INDEXES = tuple(_INDEX[e] for e in ERROR_EVENTS - _REJECTION_EVENTS)
_SUCCESS_INDEX = _INDEX[Event.SUCCESS]
_BINS_PER_OCTAVE = 16   # bin k holds [2**(j/16), 2**((j+1)/16)) seconds, j = k - _KEY_OFFSET
# Keeps keys positive for any time from 2**-64 s up, so that int() is floor(): cheaper.
_KEY_OFFSET = 64 * _BINS_PER_OCTAVE
_log2 = math.log2


class HealthCounts(NamedTuple):
    """What the breaker looks at: requests, errors and the error percentage in the window."""

    #: errors plus successes (short-circuits and bad requests are not requests here)
    total_requests: int
    #: FAILURE + TIMEOUT + THREAD_POOL_REJECTED + SEMAPHORE_REJECTED (the two
    #: rejections only while ``circuit_breaker_count_rejections`` is True)
    error_count: int
    #: 100 * error_count / total_requests, 0.0 when there were no requests
    error_percentage: float


_NO_HEALTH = HealthCounts(0, 0, 0.0)


class LatencySummary(NamedTuple):
    """Latency in the window, read in one pass: for the metrics stream and exporters."""

    #: how many calls were timed
    measured: int
    #: their mean, in seconds (from the histogram: within 2.2%, like the percentiles)
    mean: float
    #: percentile (0 to 100) -> seconds, for each percentile asked for
    percentiles: Dict[float, float]


class LatencyHistogram(NamedTuple):
    """Latencies counted into fixed buckets, for exporters (Prometheus' ``le`` buckets)."""

    #: how many calls were timed
    measured: int
    #: their total time, in seconds (from the histogram's bins: within 2.2%)
    seconds: float
    #: ``(upper bound in seconds, calls at or under it)`` for each bound, ascending,
    #: the last bound ``inf``
    buckets: Tuple[Tuple[float, int], ...]


class Cumulative(NamedTuple):
    """Every event and latency since the metrics were created: see :meth:`RollingMetrics.cumulative`."""

    #: every event's count
    counts: Dict[Event, int]
    #: ``run()``'s execution time
    latency: LatencyHistogram
    #: the time from call to answer, fallback included
    total_latency: LatencyHistogram


_ZERO_BIN = -(1 << 30)
#: outcomes recorded without the lock before the recording thread folds them itself
FOLD_AT = 32
# events tuple -> positions in a bucket's counts; outcomes are few, so this stays tiny
_POSITIONS: Dict[Tuple[Event, ...], Tuple[int, ...]] = {}


def _bin_value(key: int) -> float:
    """The middle of a bin, geometrically: within 2**(1/32) - 1 = 2.2% of all it holds."""
    if key == _ZERO_BIN:
        return 0.0
    return 2.0 ** ((key - _KEY_OFFSET + 0.5) / _BINS_PER_OCTAVE)


def _add_counts(bucket: Optional['_Bucket'], events: Tuple[Event, ...], times: int) -> None:
    if bucket is None:
        return
    positions = _POSITIONS.get(events)
    if positions is None:
        positions = tuple(_INDEX[event] for event in events)
        if len(_POSITIONS) < 4096:
            _POSITIONS[tuple(events)] = positions
    counts = bucket.counts
    for position in positions:
        counts[position] += times


class _Bucket:
    __slots__ = ('index', 'counts', 'execution', 'total', 'max_concurrent')

    def __init__(self, index: int) -> None:
        self.index = index
        self.max_concurrent = 0
        self.counts = [0] * len(_EVENTS)
        self.execution: Dict[int, int] = {}
        self.total: Dict[int, int] = {}


def _merge(into: _Bucket, bucket: _Bucket) -> None:
    counts = into.counts
    for i, count in enumerate(bucket.counts):
        counts[i] += count
    for mine, theirs in ((into.execution, bucket.execution), (into.total, bucket.total)):
        for key, count in theirs.items():
            mine[key] = mine.get(key, 0) + count


def check_bounds(bounds: Iterable[float]) -> Tuple[float, ...]:
    """Histogram bucket bounds as floats, or ValueError unless they ascend above 0, finite."""
    given = tuple(bounds)
    try:
        wanted = tuple(float(bound) for bound in given)
    except (TypeError, ValueError):
        wanted = (-1.0,)
    if any(not 0 < bound < math.inf for bound in wanted) \
            or any(a >= b for a, b in zip(wanted, wanted[1:])):
        raise ValueError('histogram bounds must be ascending, finite numbers of seconds above '
                         '0 (an inf bucket is always added), e.g. (0.01, 0.1, 1.0); got %r'
                         % (given,))
    return wanted


def _histogram(bins: Dict[int, int], bounds: Tuple[float, ...]) -> LatencyHistogram:
    # A bin goes to the first bound at or above its middle: a call within 2.2% of a
    # bound may land in the bucket next to its own.
    under = [0] * (len(bounds) + 1)
    total = 0.0
    count = 0
    for key, n in bins.items():
        value = _bin_value(key)
        total += value * n
        count += n
        under[bisect.bisect_left(bounds, value)] += n
    buckets = []
    seen = 0
    for bound, n in zip(bounds + (math.inf,), under):
        seen += n
        buckets.append((bound, seen))
    return LatencyHistogram(count, total, tuple(buckets))


class RollingMetrics:
    """Rolling counts, latency percentiles and health of one command key."""

    __slots__ = ('command_key', 'clock', '_lock', '_ring', '_pending', '_running', '_peak',
                 '_peak_at', '_shape', '_window', '_width', '_interval', '_buckets', '_snapshot',
                 '_snapshot_due', '_past', '_error_indexes')

    def __init__(self, command_key: str, window: float, buckets: int,
                 snapshot_interval: float, clock, count_rejections: bool = True) -> None:
        self.command_key = command_key
        self.clock = clock
        self._lock = threading.Lock()
        # Oldest bucket first; at most metrics_rolling_buckets long, so a list (far smaller
        # than a deque when idle) is as quick.
        self._ring: List[_Bucket] = []
        # (now, events, execution_time, total_time) of outcomes not yet in their bucket
        self._pending: List[Tuple[float, Tuple[Event, ...], Optional[float], float]] = []
        self._running: List[None] = []   # one item per run() in progress
        # The most run()s in progress at once since the last fold, and when: a start
        # that sets a new one takes the lock; the fold puts it in its bucket.
        self._peak = 0
        self._peak_at = 0.0
        self._shape: Optional[Tuple[float, int, float]] = None
        self._window = self._width = self._interval = 0.0
        self._buckets = 0
        self._snapshot = _NO_HEALTH
        self._snapshot_due = -math.inf
        # What left the ring (out of the window, or cleared), summed: made on first use.
        self._past: Optional[_Bucket] = None
        self._error_indexes = _ERROR_INDEXES
        self.configure(window, buckets, snapshot_interval, count_rejections)

    # -- recording (hot path) -------------------------------------------------------

    def execution_started(self) -> None:
        # list.append and list.pop are atomic: no lock on the worker thread.
        running = self._running
        running.append(None)
        concurrency = len(running)
        if concurrency > self._peak:   # rare: the lock only for a new peak since the fold
            with self._lock:
                if concurrency > self._peak:
                    self._peak = concurrency
                    self._peak_at = self.clock.monotonic()

    def execution_finished(self) -> None:
        self._running.pop()

    def record(self, events: Tuple[Event, ...], execution_time: Optional[float],
               total_time: float, now: Optional[float] = None) -> Optional[HealthCounts]:
        """Count one completed command: its events and, where ``run()`` ran, its latency.

        Returns a new health snapshot when one fell due (every ``snapshot_interval``),
        else None: whoever judges health need look only then.
        """
        if now is None:
            now = self.clock.monotonic()
        # No lock here: list.append is atomic, and the outcome waits in _pending until
        # whoever reads the counts next (a snapshot, a reader, or the FOLD_AT-th record)
        # folds it into its bucket. That is how Hystrix counts too: commands publish
        # their outcome, and the rolling windows are built from that stream.
        pending = self._pending
        pending.append((now, events, execution_time, total_time))
        if now < self._snapshot_due and len(pending) < FOLD_AT:
            return None
        with self._lock:
            self._fold(now)
            if now < self._snapshot_due:
                return None
            self._snapshot = self._health(now)
            self._snapshot_due = now + self._interval
            return self._snapshot

    def count(self, event: Event, times: int, now: Optional[float] = None) -> None:
        """Add ``times`` to ``event``'s count, with no execution or latency of its own.

        For counts that are not one per execution: a batch command's ``COLLAPSED``
        counts the requests it answered.
        """
        if now is None:
            now = self.clock.monotonic()
        position = _INDEX[Event(event)]
        with self._lock:
            self._fold(now)
            bucket = self._bucket(int(now // self._width))
            if bucket is None:
                bucket = self._past_bucket()
            bucket.counts[position] += times

    def _fold(self, now: float) -> None:
        """Move what was recorded since the last fold into the buckets (lock held).

        The outcomes go to the buckets of their own times, and so does the peak
        concurrency since the last fold.
        """
        if self._peak:
            self._note_concurrency(self._peak, self._peak_at)
            self._peak = 0
        running = len(self._running)
        if running:   # those still running are concurrent now too, however long ago they began
            self._note_concurrency(running, now)
        pending = self._pending
        taken = len(pending)
        if not taken:
            return
        # Records only ever append, so the first `taken` items are exactly what this fold
        # owns; anything appended meanwhile stays for the next one.
        batch = pending[:taken]
        del pending[:taken]
        width = self._width
        # Outcomes come in runs (one bucket, one tuple of events): the counts are added
        # once per run, and the bucket looked up only when a record's time leaves it.
        bucket: Optional[_Bucket] = None
        executions: Dict[int, int] = {}
        totals: Dict[int, int] = {}
        low = high = 0.0
        run_events: Tuple[Event, ...] = ()
        run = 0
        log2 = _log2
        for now, events, execution_time, total_time in batch:
            if not low <= now < high:
                if run:
                    _add_counts(bucket, run_events, run)
                    run = 0
                index = int(now // width)
                bucket = self._bucket(index)
                low = index * width
                high = low + width
                if bucket is not None:
                    executions, totals = bucket.execution, bucket.total
            if bucket is None:   # older than the window: only the running total takes it
                self._add_to_past(events, execution_time, total_time)
                continue
            if events is not run_events:
                if run:
                    _add_counts(bucket, run_events, run)
                run_events, run = events, 1
            else:
                run += 1
            if execution_time is not None:
                key = int(log2(execution_time) * _BINS_PER_OCTAVE + _KEY_OFFSET) \
                    if execution_time > 0 else _ZERO_BIN
                executions[key] = executions.get(key, 0) + 1
            key = int(log2(total_time) * _BINS_PER_OCTAVE + _KEY_OFFSET) if total_time > 0 \
                else _ZERO_BIN
            totals[key] = totals.get(key, 0) + 1
        if run:
            _add_counts(bucket, run_events, run)

    def _add_to_past(self, events: Tuple[Event, ...], execution_time: Optional[float],
                     total_time: float) -> None:
        past = self._past_bucket()
        _add_counts(past, events, 1)
        for bins, seconds in ((past.execution, execution_time), (past.total, total_time)):
            if seconds is not None:
                key = int(_log2(seconds) * _BINS_PER_OCTAVE + _KEY_OFFSET) if seconds > 0 \
                    else _ZERO_BIN
                bins[key] = bins.get(key, 0) + 1

    def _past_bucket(self) -> _Bucket:
        past = self._past
        if past is None:
            past = self._past = _Bucket(0)
        return past

    def _retire(self, bucket: _Bucket) -> None:
        """Add a bucket leaving the ring to the running total (lock held)."""
        if any(bucket.counts):
            _merge(self._past_bucket(), bucket)

    def _note_concurrency(self, concurrency: int, when: float) -> None:
        bucket = self._bucket(int(when // self._width))
        if bucket is not None and concurrency > bucket.max_concurrent:
            bucket.max_concurrent = concurrency

    def _bucket(self, index: int) -> Optional[_Bucket]:
        """The bucket numbered ``index``, opened if need be; None if it fell out of the window."""
        ring = self._ring
        if not ring or ring[-1].index < index:
            bucket = _Bucket(index)
            ring.append(bucket)
            oldest = index - self._buckets
            while ring[0].index <= oldest:
                self._retire(ring.pop(0))
            return bucket
        if index <= ring[-1].index - self._buckets:
            return None
        # An outcome recorded a little before one already folded (threads race to the
        # list): its bucket is near the end, or missing from a gap in the traffic.
        position = len(ring) - 1
        while position >= 0 and ring[position].index > index:
            position -= 1
        if position >= 0 and ring[position].index == index:
            return ring[position]
        bucket = _Bucket(index)
        ring.insert(position + 1, bucket)
        return bucket

    def configure(self, window: float, buckets: int, snapshot_interval: float,
                  count_rejections: bool = True) -> None:
        """Take a new window shape; the counts restart if it changed.

        ``count_rejections``: whether the two rejections count as errors (and so as
        requests) in :meth:`health`; they are counted as events either way.
        """
        with self._lock:
            indexes = _ERROR_INDEXES if count_rejections else _FAILURE_INDEXES
            if indexes is not self._error_indexes:
                self._error_indexes = indexes
                self._snapshot_due = -math.inf   # the next snapshot judges by the new rule
            shape = (float(window), int(buckets), float(snapshot_interval))
            if shape == self._shape:
                return
            if self._shape is not None:   # keep what the old shape counted in the total
                self._fold(self.clock.monotonic())
                for bucket in self._ring:
                    self._retire(bucket)
            self._shape = shape
            self._window, self._buckets, self._interval = shape
            self._width = self._window / self._buckets
            self._ring.clear()
            self._peak = 0   # the next fold counts those still running
            self._snapshot = _NO_HEALTH
            self._snapshot_due = -math.inf

    def reset(self) -> None:
        """Forget every bucket (the breaker does this when it closes)."""
        with self._lock:
            # What was recorded before the reset goes with it (into the running total
            # only); a record racing with it lands after, as if it came just after.
            self._fold(self.clock.monotonic())
            for bucket in self._ring:
                self._retire(bucket)
            self._ring.clear()
            self._peak = 0   # the next fold counts those still running
            self._snapshot = _NO_HEALTH
            self._snapshot_due = -math.inf

    # -- reading --------------------------------------------------------------------

    def _live(self, now: Optional[float] = None) -> List[_Bucket]:
        # Caller holds the lock. Folds what is pending, then drops buckets that fell out
        # of the window.
        if now is None:
            now = self.clock.monotonic()
        self._fold(now)
        oldest = int(now // self._width) - self._buckets
        ring = self._ring
        while ring and ring[0].index <= oldest:
            self._retire(ring.pop(0))
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
        error_indexes = self._error_indexes
        for bucket in self._live(now):
            counts = bucket.counts
            successes += counts[_SUCCESS_INDEX]
            for i in error_indexes:
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

    def cumulative(self, bounds: Iterable[float] = ()) -> Cumulative:
        """Every event's count and both latencies since the metrics were created.

        Unlike the rolling window these only grow: neither the window moving on,
        nor the breaker closing, nor new window settings take anything away.

        :param bounds: the histograms' bucket bounds in seconds, ascending; an ``inf``
            bucket is always added.
        """
        wanted = check_bounds(bounds)
        everything = _Bucket(0)
        with self._lock:
            for bucket in self._live():
                _merge(everything, bucket)
            if self._past is not None:
                _merge(everything, self._past)
        return Cumulative({event: everything.counts[i] for i, event in enumerate(_EVENTS)},
                          _histogram(everything.execution, wanted),
                          _histogram(everything.total, wanted))

    @property
    def concurrent_executions(self) -> int:
        """How many ``run()`` calls of this key are executing right now."""
        return len(self._running)

    @property
    def rolling_max_concurrent_executions(self) -> int:
        """The most ``run()`` calls of this key executing at once in the rolling window.

        As in Hystrix, concurrency is sampled when a ``run()`` starts, so a run that is
        still going counts from its start on, whether or not it ever finishes.
        """
        with self._lock:
            return max([bucket.max_concurrent for bucket in self._live()], default=0)

    def __repr__(self) -> str:
        health = self.health()
        return '<RollingMetrics %s %d requests %d errors>' % (
            self.command_key, health.total_requests, health.error_count)
