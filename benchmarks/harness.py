"""Timing primitives: candidates timed in interleaved rounds, and their statistics.

Every case of the suite is a set of candidates (a baseline, Blackgate, the
peers) that do the same thing. They are timed in rounds; in each round every
candidate runs once, in an order that rotates from round to round, so that
machine noise (other processes, frequency changes, a garbage collection)
falls on all of them alike. Only ratios and differences between candidates of
the same run are judged, never an absolute time.

Two ways to time a candidate:

- *per call*: each call is timed on its own with ``time.perf_counter_ns``;
  the samples of all rounds give the median and the 99th percentile;
- *per batch*: one batch (say 10,000 concurrent calls) is timed as a whole
  and divided by its size; the rounds give the median and the p99 (with few
  rounds, p99 is close to the slowest round).

Beside the wall-clock times, each round records the CPU time the whole
process (every thread) spent per call. Where a call waits for a worker thread,
its wall time is mostly the operating system waking threads up, which varies
with the interpreter and the machine; the CPU time shows what the code itself
costs.
"""
import asyncio
import gc
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Dict, List, Optional, Sequence

__all__ = ('Candidate', 'Timing', 'time_sync', 'time_async', 'time_batches', 'percentile')

_now = time.perf_counter_ns
_cpu = time.process_time_ns


@dataclass
class Candidate:
    """One way of doing a case's work: a baseline, Blackgate, or a peer library."""

    name: str
    #: 'baseline', 'blackgate' or 'peer'
    role: str
    #: sync: ``call()``; async: ``await call()``; batch: ``await call(n)``
    call: Callable[..., Any]
    #: a one-line remark shown in the table (how the peer was wired, say)
    note: str = ''
    #: in an async case, False for a plain function called (not awaited) on the loop
    awaits: bool = True
    #: the fraction of each round's calls this candidate makes (for one that leaks memory)
    share: float = 1.0


@dataclass
class Timing:
    """The samples of one candidate, in nanoseconds per call, and per round."""

    name: str
    role: str
    note: str = ''
    samples: List[float] = field(default_factory=list)
    rounds: List[List[float]] = field(default_factory=list)
    #: CPU time of the whole process (every thread) per call, one figure per round
    cpu: List[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def p99(self) -> float:
        return percentile(self.samples, 99)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu) if self.cpu else float('nan')

    def round_medians(self) -> List[float]:
        return [statistics.median(values) for values in self.rounds]


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (nearest rank) of ``values``."""
    ordered = sorted(values)
    rank = max(1, math.ceil(len(ordered) * p / 100.0))
    return ordered[rank - 1]


def _rotated(candidates: Sequence[Candidate], round_index: int) -> List[Candidate]:
    shift = round_index % len(candidates)
    order = list(candidates[shift:]) + list(candidates[:shift])
    return order if round_index % 2 == 0 else order[::-1]


def _new_timings(candidates: Sequence[Candidate]) -> Dict[str, Timing]:
    return {c.name: Timing(c.name, c.role, c.note) for c in candidates}


def _add(timing: Timing, values: List[float], cpu_ns: float) -> None:
    timing.samples.extend(values)
    timing.rounds.append(values)
    timing.cpu.append(cpu_ns / len(values))


def _count(candidate: Candidate, calls: int) -> int:
    return max(1, int(calls * candidate.share))


def _sync_calls(call: Callable[[], Any], calls: int) -> List[float]:
    out = [0] * calls
    now = _now
    for i in range(calls):
        start = now()
        call()
        out[i] = now() - start
    return out


async def _async_calls(candidate: Candidate, calls: int) -> List[float]:
    if not candidate.awaits:
        return _sync_calls(candidate.call, calls)
    out = [0] * calls
    now = _now
    call = candidate.call
    for i in range(calls):
        start = now()
        await call()
        out[i] = now() - start
    return out


def time_sync(candidates: Sequence[Candidate], rounds: int, calls: int,
              warmup: Optional[int] = None) -> List[Timing]:
    """Time each synchronous candidate ``calls`` times per round, call by call."""
    timings = _new_timings(candidates)
    for candidate in candidates:
        _sync_calls(candidate.call, _count(candidate, warmup if warmup is not None
                                           else max(1, calls // 10)))
    for r in range(rounds):
        for candidate in _rotated(candidates, r):
            gc.collect()
            cpu = _cpu()
            values = _sync_calls(candidate.call, _count(candidate, calls))
            _add(timings[candidate.name], values, _cpu() - cpu)
    return list(timings.values())


async def time_async(candidates: Sequence[Candidate], rounds: int, calls: int,
                     warmup: Optional[int] = None) -> List[Timing]:
    """Time each awaitable candidate ``calls`` times per round, call by call, on this loop."""
    timings = _new_timings(candidates)
    for candidate in candidates:
        await _async_calls(candidate, _count(candidate, warmup if warmup is not None
                                             else max(1, calls // 10)))
    for r in range(rounds):
        for candidate in _rotated(candidates, r):
            gc.collect()
            cpu = _cpu()
            values = await _async_calls(candidate, _count(candidate, calls))
            _add(timings[candidate.name], values, _cpu() - cpu)
    return list(timings.values())


async def time_batches(candidates: Sequence[Candidate], rounds: int, size: int,
                       warmup_rounds: int = 1) -> List[Timing]:
    """Time ``await call(size)`` per round; a sample is the batch's time divided by ``size``."""
    timings = _new_timings(candidates)
    for candidate in candidates:
        for _ in range(warmup_rounds):
            await candidate.call(size)
    for r in range(rounds):
        for candidate in _rotated(candidates, r):
            gc.collect()
            cpu, start = _cpu(), _now()
            await candidate.call(size)
            _add(timings[candidate.name], [(_now() - start) / size], (_cpu() - cpu) / size)
    return list(timings.values())


def run_async(coroutine_function: Callable[[], Awaitable[Any]]) -> Any:
    """Run ``coroutine_function()`` on a fresh asyncio loop (Tornado's IOLoop wraps it)."""
    return asyncio.run(coroutine_function())
