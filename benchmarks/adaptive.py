"""Why adaptive limits and budgeted retries: one run against simulated upstreams (issue 15).

    python -m benchmarks.adaptive              # about a minute and a half
    python -m benchmarks.adaptive --quick      # a smoke check, about 20 s

Three parts, each printed as a table (reStructuredText, as docs/performance.rst
shows it):

1. **Limits.** An upstream whose latency grows with its concurrency beyond 16
   (:class:`~benchmarks.upstreams.QueueingUpstream`: 20 ms, shared beyond 16
   calls at once), 60 closed-loop clients, a 60 ms timeout: fixed bulkheads of
   4, 16 and 64 workers, then 64 workers under each limit algorithm.
2. **Retries.** An upstream that fails 20 % of its calls, then all of them for a
   while (:class:`~benchmarks.upstreams.FlakyUpstream`): no retry, a naive
   retry (up to 3 more attempts inside ``run()``, tenacity-style, no budget)
   and Blackgate's budgeted retry (``retry_attempts = 3``).
3. **Overhead.** ``execute()`` of a trivial command with each feature off and
   on, interleaved rounds, medians.

The circuit breaker is off in parts 1 and 2 so that the bulkhead and the
retries are what is measured (with it on, an outage opens it for every
variant alike). Figures are from this machine in this run: read them as
ratios between rows, not as absolute speeds.
"""
import argparse
import statistics
import time
from typing import Any, Callable, Dict, List, Optional

from blackgate import Command, component
from blackgate.clock import SystemClock

from .upstreams import FlakyUpstream, QueueingUpstream, closed_loop

CLIENTS = 60


def _command(name: str, group_key: str, call: Callable[[], Any], timeout: float,
             **settings: Any) -> type:
    attributes = dict(group_key=group_key, command_key=name, timeout=timeout,
                      circuit_breaker_enabled=False, run=lambda self: call(),
                      fallback=lambda self: None, **settings)
    return type(name, (Command,), attributes)


def _fresh() -> None:
    component.reset()
    component.clock = SystemClock()


# -- 1. limits ------------------------------------------------------------------------------

LIMIT_CASES = [
    ('fixed, 4 workers', {'max_workers': 4}),
    ('fixed, 16 workers', {'max_workers': 16}),
    ('fixed, 64 workers', {'max_workers': 64}),
    ('gradient2 (64 workers)', {'max_workers': 64, 'concurrency_limit': {
        'algorithm': 'gradient2', 'initial': 10, 'window': 0.1}}),
    ('vegas (64 workers)', {'max_workers': 64, 'concurrency_limit': {
        'algorithm': 'vegas', 'initial': 10, 'window': 0.1}}),
    ('aimd (64 workers)', {'max_workers': 64, 'concurrency_limit': {
        'algorithm': 'aimd', 'initial': 10, 'window': 0.1}}),
]


def limits(duration: float) -> List[Dict[str, Any]]:
    rows = []
    for label, pool in LIMIT_CASES:
        _fresh()
        upstream = QueueingUpstream(base=0.02, knee=16)
        group = 'limits'
        component.add('executor_pool', dict(group_key=group, **pool))
        component.install()
        cls = _command('limited_call', group, upstream.call, timeout=0.06)

        def one() -> bool:
            return cls().execute() is not None

        if 'concurrency_limit' in pool:
            closed_loop(one, CLIENTS, duration)   # learning, not counted
        calls_before = upstream.calls
        upstream.peak = 0
        result = closed_loop(one, CLIENTS, duration)
        limit = component.pool(group).limit
        rows.append({
            'case': label,
            'goodput': result.goodput,
            'p99_ms': None if result.p99 is None else result.p99 * 1000,
            'upstream_per_s': (upstream.calls - calls_before) / duration,
            'upstream_peak': upstream.peak,
            'limit': limit,
        })
        component.reset()
    return rows


# -- 2. retries -------------------------------------------------------------------------------

def _naive(call: Callable[[], Any], retries: int = 3, backoff: float = 0.01
           ) -> Callable[[], Any]:
    """What a tenacity-decorated call inside run() does: retry, back off, no budget."""
    import random

    def attempt() -> Any:
        for tried in range(retries + 1):
            try:
                return call()
            except ConnectionError:
                if tried == retries:
                    raise
                time.sleep(random.random() * backoff * 2 ** tried)
        return None

    return attempt


def retries(duration: float) -> List[Dict[str, Any]]:
    supported = hasattr(Command, 'retry_attempts')
    cases = [('no retry', 'none'), ('naive retry (3, no budget)', 'naive'),
             ('budgeted retry (3, 20 % + 10/s)', 'budget')]
    rows = []
    for label, kind in cases:
        if kind == 'budget' and not supported:
            rows.append({'case': label, 'skipped': 'Command has no retries in this revision'})
            continue
        row: Dict[str, Any] = {'case': label}
        for phase, failure_rate, down in (('flaky', 0.2, False), ('outage', 0.0, True)):
            _fresh()
            component.add('executor_pool', {'group_key': 'retries', 'max_workers': 32})
            component.install()
            upstream = FlakyUpstream(latency=0.005, failure_rate=failure_rate,
                                     down_from=0.0 if down else None)
            call = _naive(upstream.call) if kind == 'naive' else upstream.call
            settings = {'retry_attempts': 3, 'retry_backoff': 0.01} if kind == 'budget' else {}
            cls = _command('retried_call', 'retries', call, timeout=1.0, **settings)
            made = [0]

            def one() -> bool:
                made[0] += 1
                command = cls()
                return command.execute() is not None

            upstream.start()
            result = closed_loop(one, 16, duration)
            row[phase] = {
                'success': result.good / max(1, made[0]),
                'goodput': result.goodput,
                'amplification': upstream.calls / max(1, made[0]),
                'p99_ms': None if result.p99 is None else result.p99 * 1000,
            }
            component.reset()
        rows.append(row)
    return rows


# -- 3. overhead -------------------------------------------------------------------------------

def overhead(calls: int, rounds: int) -> List[Dict[str, Any]]:
    component.reset()
    component.add('executor_pool', {'group_key': 'plain', 'max_workers': 10})
    component.add('executor_pool', {'group_key': 'limited', 'max_workers': 10,
                                     'concurrency_limit': {'algorithm': 'gradient2'}})
    component.install()
    cases: Dict[str, type] = {
        'both off': _command('off', 'plain', lambda: 1, timeout=1.0),
        'adaptive limit on': _command('limit_on', 'limited', lambda: 1, timeout=1.0),
    }
    if hasattr(Command, 'retry_attempts'):
        cases['retries on (none needed)'] = _command('retry_on', 'plain', lambda: 1,
                                                     timeout=1.0, retry_attempts=2)
    for cls in cases.values():   # warm up
        for _ in range(200):
            cls().execute()
    samples: Dict[str, List[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, cls in cases.items():
            start = time.perf_counter()
            for _ in range(calls):
                cls().execute()
            samples[name].append((time.perf_counter() - start) / calls)
    component.reset()
    base = statistics.median(samples['both off'])
    return [{'case': name, 'us': statistics.median(values) * 1e6,
             'delta_us': (statistics.median(values) - base) * 1e6}
            for name, values in samples.items()]


# -- report ------------------------------------------------------------------------------------

def _table(header: List[str], rows: List[List[str]]) -> str:
    lines = ['.. list-table::', '   :header-rows: 1', '']
    for row in [header] + rows:
        lines.append('   * - ' + row[0])
        lines.extend('     - ' + cell for cell in row[1:])
    return '\n'.join(lines)


def _ms(value: Optional[float]) -> str:
    return '—' if value is None else '%.0f ms' % (value,)


def report(limit_rows: List[Dict[str, Any]], retry_rows: List[Dict[str, Any]],
           overhead_rows: List[Dict[str, Any]]) -> str:
    parts = [_table(['bulkhead', 'goodput', 'p99', 'upstream calls', 'upstream peak',
                     'limit at the end'],
                    [[row['case'], '%.0f /s' % row['goodput'], _ms(row['p99_ms']),
                      '%.0f /s' % row['upstream_per_s'], str(row['upstream_peak']),
                      '—' if row['limit'] is None else str(row['limit'])]
                     for row in limit_rows])]
    retry_table = []
    for row in retry_rows:
        if 'skipped' in row:
            retry_table.append([row['case']] + ['skipped: ' + row['skipped']] + [''] * 4)
            continue
        flaky, outage = row['flaky'], row['outage']
        retry_table.append([
            row['case'], '%.1f %%' % (100 * flaky['success']), '%.0f /s' % flaky['goodput'],
            '%.2f×' % flaky['amplification'], _ms(flaky['p99_ms']),
            '%.2f×' % outage['amplification']])
    parts.append(_table(['retries', 'answered (20 % failing)', 'goodput', 'upstream calls per '
                         'call', 'p99', 'upstream calls per call (outage)'], retry_table))
    parts.append(_table(['execute(), trivial run()', 'per call', 'over both off'],
                        [[row['case'], '%.2f µs' % row['us'], '%+.2f µs' % row['delta_us']]
                         for row in overhead_rows]))
    return '\n\n'.join(parts)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='shorter phases, fewer rounds')
    parser.add_argument('--duration', type=float, default=None,
                        help='seconds per measured phase (default 3, quick 0.8)')
    args = parser.parse_args(argv)
    duration = args.duration or (0.8 if args.quick else 3.0)
    started = time.monotonic()
    limit_rows = limits(duration)
    retry_rows = retries(duration)
    overhead_rows = overhead(500 if args.quick else 2000, 5 if args.quick else 15)
    print(report(limit_rows, retry_rows, overhead_rows))
    print('\n(%.0f s in all)' % (time.monotonic() - started,))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
