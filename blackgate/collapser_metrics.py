"""Metrics of one collapser key: batches, requests batched and the batch-size distribution.

Hystrix's ``HystrixCollapserMetrics``: rolling counts over a window of
buckets (as :mod:`blackgate.metrics` keeps for commands), the batch sizes in
that window (exact: a batch size is a small whole number, counted per size),
and the same since the metrics were made, for exporters whose counters only
grow (Prometheus).

.. warning::

   Any thread may record or read; one short lock guards the buckets. A batch is
   recorded once, when it is sent, not once per request.
"""
import math
import threading
from typing import Dict, Iterable, List, NamedTuple, Optional, Tuple

__all__ = ('CollapserMetrics', 'BatchSizes')

#: What a collapser counts, by the name of its stream field's event.
BATCHES = 'batches'
REQUESTS_BATCHED = 'requests_batched'
RESPONSES_FROM_CACHE = 'responses_from_cache'
_COUNTS = (BATCHES, REQUESTS_BATCHED, RESPONSES_FROM_CACHE)


class BatchSizes(NamedTuple):
    """Batch sizes read in one pass: for the stream and exporters."""

    #: how many batches
    batches: int
    #: their mean size (0.0 with no batch)
    mean: float
    #: percentile (0 to 100) -> size, for each percentile asked for
    percentiles: Dict[float, int]
    #: ``(size, batches of that size)``, ascending by size
    sizes: Tuple[Tuple[int, int], ...]


class _Bucket:
    __slots__ = ('index', 'counts', 'sizes')

    def __init__(self, index: int) -> None:
        self.index = index
        self.counts = dict.fromkeys(_COUNTS, 0)
        self.sizes: Dict[int, int] = {}


def _add(into: _Bucket, bucket: _Bucket) -> None:
    for name, count in bucket.counts.items():
        into.counts[name] += count
    for size, count in bucket.sizes.items():
        into.sizes[size] = into.sizes.get(size, 0) + count


def _sizes(sizes: Dict[int, int], percentiles: Iterable[float]) -> BatchSizes:
    wanted = sorted(set(percentiles))
    for percentile in wanted:
        if not 0 <= percentile <= 100:
            raise ValueError('percentile must be from 0 to 100, got %r' % (percentile,))
    ordered = sorted(sizes.items())
    batches = sum(count for _size, count in ordered)
    if not batches:
        return BatchSizes(0, 0.0, {p: 0 for p in wanted}, ())
    values: Dict[float, int] = {}
    seen, position = 0, 0
    for percentile in wanted:   # nearest rank, as the command latencies are read
        rank = max(1, math.ceil(batches * percentile / 100.0))
        while seen < rank:
            seen += ordered[position][1]
            position += 1
        values[percentile] = ordered[position - 1][0]
    mean = sum(size * count for size, count in ordered) / batches
    return BatchSizes(batches, mean, values, tuple(ordered))


class CollapserMetrics:
    """Rolling and cumulative counts of one collapser key."""

    __slots__ = ('collapser_key', 'clock', 'window', 'buckets', 'max_requests_in_batch',
                 'timer_delay', 'scope', '_width', '_lock', '_ring', '_past')

    def __init__(self, collapser_key: str, clock, window: float = 10.0,
                 buckets: int = 10) -> None:
        self.collapser_key = collapser_key
        self.clock = clock
        #: seconds covered by the rolling counts, and the buckets they are kept in
        self.window = float(window)
        self.buckets = int(buckets)
        #: the settings of the collapser class that sent the last batch (for the stream)
        self.max_requests_in_batch = 100
        self.timer_delay = 0.01
        self.scope = 'request'
        self._width = self.window / self.buckets
        self._lock = threading.Lock()
        self._ring: List[_Bucket] = []
        self._past = _Bucket(0)   # what left the window, summed

    # -- recording ---------------------------------------------------------------------

    def record_batch(self, size: int, settings: Optional[Tuple[int, float, str]] = None
                     ) -> None:
        """One batch of ``size`` requests was sent.

        :param settings: ``(max_requests_in_batch, timer_delay, scope)`` of its collapser.
        """
        if settings is not None:
            self.max_requests_in_batch, self.timer_delay, self.scope = settings
        with self._lock:
            bucket = self._bucket()
            bucket.counts[BATCHES] += 1
            bucket.counts[REQUESTS_BATCHED] += size
            bucket.sizes[size] = bucket.sizes.get(size, 0) + 1

    def record_from_cache(self, count: int = 1) -> None:
        """``count`` requests were answered from the request cache, not batched."""
        with self._lock:
            self._bucket().counts[RESPONSES_FROM_CACHE] += count

    def _bucket(self, now: Optional[float] = None) -> _Bucket:
        index = int((self.clock.monotonic() if now is None else now) // self._width)
        ring = self._ring
        self._drop_old(index)
        if ring and ring[-1].index >= index:
            return ring[-1]   # (a clock that went back a little: the newest bucket)
        bucket = _Bucket(index)
        ring.append(bucket)
        return bucket

    def _drop_old(self, index: int) -> None:
        ring = self._ring
        oldest = index - self.buckets
        while ring and ring[0].index <= oldest:
            _add(self._past, ring.pop(0))

    # -- reading -----------------------------------------------------------------------

    def _live(self) -> List[_Bucket]:
        self._drop_old(int(self.clock.monotonic() // self._width))
        return list(self._ring)

    def rolling_counts(self) -> Dict[str, int]:
        """``batches``, ``requests_batched`` and ``responses_from_cache`` in the window."""
        with self._lock:
            totals = dict.fromkeys(_COUNTS, 0)
            for bucket in self._live():
                for name, count in bucket.counts.items():
                    totals[name] += count
            return totals

    def rolling_batch_sizes(self, percentiles: Iterable[float] = ()) -> BatchSizes:
        """The batch sizes in the window: count, mean and ``percentiles``."""
        merged = _Bucket(0)
        with self._lock:
            for bucket in self._live():
                _add(merged, bucket)
        return _sizes(merged.sizes, percentiles)

    def batch_size_percentile(self, percentile: float) -> int:
        """The batch size at ``percentile`` (0 to 100) in the window; 0 with no batch."""
        return self.rolling_batch_sizes((percentile,)).percentiles[percentile]

    def cumulative(self) -> Tuple[Dict[str, int], BatchSizes]:
        """The counts and batch sizes since the metrics were made (they only grow)."""
        merged = _Bucket(0)
        with self._lock:
            for bucket in self._live():
                _add(merged, bucket)
            _add(merged, self._past)
        return dict(merged.counts), _sizes(merged.sizes, ())

    def __repr__(self) -> str:
        counts = self.rolling_counts()
        return '<CollapserMetrics %s %d batches %d requests>' % (
            self.collapser_key, counts[BATCHES], counts[REQUESTS_BATCHED])
