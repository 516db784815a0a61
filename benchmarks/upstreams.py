"""Simulated upstreams for the adaptive-limit and retry benchmark (issue 15, point 3).

In-process and bounded: a ``call()`` sleeps for as long as the simulated
dependency would take, so a worker thread is held as it would be by a real
socket. Both keep their own counts (calls made, in flight), which is the
"upstream load" the benchmark reports.
"""
import random
import threading
import time
from typing import Callable, Optional

__all__ = ('QueueingUpstream', 'FlakyUpstream', 'UpstreamDown', 'LoadResult', 'closed_loop')


class UpstreamDown(ConnectionError):
    """What the flaky upstream raises for a failed call."""


class QueueingUpstream:
    """A dependency whose latency grows with its concurrency beyond ``knee``.

    Up to ``knee`` calls at once take ``base`` seconds each; beyond it they share
    the capacity, and each takes ``base * n / knee`` (processor sharing): its
    throughput stays at ``knee / base`` however many it is sent, and the rest
    is queueing, which shows as latency, then as timeouts.
    """

    def __init__(self, base: float = 0.02, knee: int = 16,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.base = base
        self.knee = knee
        self._sleep = sleep
        self._lock = threading.Lock()
        self.in_flight = 0
        #: the most calls in flight at once
        self.peak = 0
        #: calls started, whatever became of them
        self.calls = 0

    def latency(self, concurrency: int) -> float:
        """Seconds a call takes with ``concurrency`` calls in flight, itself counted."""
        return self.base * max(1.0, concurrency / self.knee)

    def call(self) -> str:
        with self._lock:
            self.in_flight += 1
            self.calls += 1
            current = self.in_flight
            if current > self.peak:
                self.peak = current
        try:
            self._sleep(self.latency(current))
        finally:
            with self._lock:
                self.in_flight -= 1
        return 'ok'


class FlakyUpstream:
    """A dependency that fails a share of its calls, and all of them while it is down.

    ``failure_rate`` of the calls fail at random (seeded); between ``down_from``
    and ``down_until`` (seconds after :meth:`start`) every call fails: an outage,
    the case a retry budget is for.
    """

    def __init__(self, latency: float = 0.005, failure_rate: float = 0.2,
                 down_from: Optional[float] = None, down_until: Optional[float] = None,
                 seed: int = 15, sleep: Callable[[float], None] = time.sleep) -> None:
        self.latency = latency
        self.failure_rate = failure_rate
        self.down_from = down_from
        self.down_until = down_until
        self._random = random.Random(seed)
        self._sleep = sleep
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self.calls = 0
        self.failures = 0

    def start(self) -> None:
        """Count the outage window from now."""
        self._started = time.monotonic()

    @property
    def is_down(self) -> bool:
        if self.down_from is None:
            return False
        elapsed = time.monotonic() - self._started
        return self.down_from <= elapsed < (self.down_until or float('inf'))

    def call(self) -> str:
        with self._lock:
            self.calls += 1
            failed = self.is_down or self._random.random() < self.failure_rate
            if failed:
                self.failures += 1
        self._sleep(self.latency)
        if failed:
            raise UpstreamDown('upstream failed the call')
        return 'ok'


class LoadResult:
    """What a closed-loop run measured."""

    def __init__(self, duration: float, good: int, failed: int, latencies: list) -> None:
        self.duration = duration
        #: answers from run() (not a fallback), per second
        self.goodput = good / duration
        self.good = good
        self.failed = failed
        latencies.sort()
        #: the 99th percentile of the answered calls' latency, seconds (None: none answered)
        self.p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] \
            if latencies else None


def closed_loop(call: Callable[[], bool], clients: int, duration: float,
                pause: float = 0.02) -> LoadResult:
    """``clients`` threads calling ``call()`` for ``duration`` seconds; True means a good answer.

    A client whose call was not good (rejected, failed, fell back) pauses
    ``pause`` seconds before its next call, as a caller that got an error page
    would, so that refusals do not turn into a busy loop on the test machine.
    """
    deadline = time.monotonic() + duration
    lock = threading.Lock()
    counts = [0, 0]
    latencies: list = []

    def client() -> None:
        good = failed = 0
        mine = []
        while True:
            started = time.monotonic()
            if started >= deadline:
                break
            ok = call()
            if ok:
                good += 1
                mine.append(time.monotonic() - started)
            else:
                failed += 1
                time.sleep(pause)
        with lock:
            counts[0] += good
            counts[1] += failed
            latencies.extend(mine)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(duration + 30)
    return LoadResult(duration, counts[0], counts[1], latencies)
