"""Per-call overhead of Command.execute() and await Command.queue() over a bare pool hop.

Interleaves the candidates in rounds so that machine noise hits them alike, and
reports medians of per-round means and the ratio to the baseline of the same run.

    python -m benchmarks.overhead [--calls 2000] [--rounds 15]
"""
import argparse
import asyncio
import concurrent.futures
import statistics
import time

from tornado.ioloop import IOLoop

from blackgate import Command, component


def trivial():
    return 1


class Trivial(Command):
    command_key = 'bench_trivial'

    def run(self):
        return 1

    def fallback(self):
        return 0


def _time_sync(fn, calls):
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


async def _time_async(fn, calls):
    start = time.perf_counter()
    for _ in range(calls):
        await fn()
    return (time.perf_counter() - start) / calls


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--calls', type=int, default=2000)
    parser.add_argument('--rounds', type=int, default=15)
    args = parser.parse_args(argv)

    component.reset()
    component.add('executor_pool', {'group_key': 'default', 'max_workers': 10})
    component.install()
    pool = concurrent.futures.ThreadPoolExecutor(10)

    sync_cases = {
        'pool.submit(f).result(timeout=1)': lambda: pool.submit(trivial).result(timeout=1),
        'Command.execute()': lambda: Trivial().execute(),
    }

    async def async_rounds():
        loop = IOLoop.current()
        cases = {
            'await IOLoop.run_in_executor(pool, f)': lambda: loop.run_in_executor(pool, trivial),
            'await Command.queue()': lambda: Trivial().queue(),
        }
        results = {name: [] for name in cases}
        for name, fn in cases.items():   # warm up
            await _time_async(fn, args.calls // 10)
        for _ in range(args.rounds):
            for name, fn in cases.items():
                results[name].append(await _time_async(fn, args.calls))
        return results

    results = {name: [] for name in sync_cases}
    for name, fn in sync_cases.items():
        _time_sync(fn, args.calls // 10)
    for _ in range(args.rounds):
        for name, fn in sync_cases.items():
            results[name].append(_time_sync(fn, args.calls))
    results.update(asyncio.run(async_rounds()))
    pool.shutdown()
    component.reset()

    medians = {name: statistics.median(values) for name, values in results.items()}
    pairs = [('Command.execute()', 'pool.submit(f).result(timeout=1)'),
             ('await Command.queue()', 'await IOLoop.run_in_executor(pool, f)')]
    print('%-40s %12s %12s %8s' % ('case', 'median/call', 'overhead', 'ratio'))
    for case, base in pairs:
        print('%-40s %10.2f us' % (base, medians[base] * 1e6))
        print('%-40s %10.2f us %+10.2f us %7.3fx' % (
            case, medians[case] * 1e6, (medians[case] - medians[base]) * 1e6,
            medians[case] / medians[base]))


if __name__ == '__main__':
    main()
