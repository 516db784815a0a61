"""Bytes held per command key (circuit breaker + rolling metrics + permits).

    python -m benchmarks.memory [--keys 2000] [--calls 100000]

Measures with tracemalloc, on an injected FakeClock so that windows can be
aged without waiting: (1) a key that ran once, its window still live; (2) the
same keys once their window has gone by and they were read (idle); (3) one key
before and after --calls executions, to show the footprint does not grow with
traffic.
"""
import argparse
import gc
import tracemalloc

from blackgate import Command, Event, component
from blackgate.testing import FakeClock


def _command_class(key):
    return type('Bench_%s' % key, (Command,), {
        'command_key': key,
        'run': lambda self: 1,
        'fallback': lambda self: 0,
    })


def _measure(fn):
    gc.collect()
    before = tracemalloc.get_traced_memory()[0]
    result = fn()
    gc.collect()
    return tracemalloc.get_traced_memory()[0] - before, result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--keys', type=int, default=2000)
    parser.add_argument('--calls', type=int, default=100_000)
    args = parser.parse_args(argv)

    component.reset()
    clock = component.clock = FakeClock()
    classes = [_command_class('k%d' % i) for i in range(args.keys)]
    _command_class('warm')().execute()   # one-off allocations (pool threads, caches)

    tracemalloc.start()
    live, _ = _measure(lambda: [cls().execute() for cls in classes])
    clock.advance(60.0)
    idle, _ = _measure(lambda: [component.metrics(cls.command_key).health() for cls in classes])
    print('per key, window live:  %6.0f bytes' % (live / args.keys))
    print('per key, idle:         %6.0f bytes' % ((live + idle) / args.keys))

    one = _command_class('busy')
    one().execute()
    def calls():
        for _ in range(args.calls):
            one().execute()
    grown, _ = _measure(calls)
    count = component.metrics('busy').rolling_count(Event.SUCCESS)
    clock.advance(60.0)
    print('one key after %d calls: %+d bytes (window holds %d)' % (args.calls, grown, count))
    tracemalloc.stop()
    component.reset()


if __name__ == '__main__':
    main()
