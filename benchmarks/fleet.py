"""Per-call cost of fleet mode: execute() with the Redis state store off and on, in one run.

    python -m benchmarks.fleet [--calls 3000] [--rounds 9]

Starts a throw-away redis-server on 127.0.0.1 (it must be installed), then
interleaves rounds of execute() on a command with and without the store.
"""
import argparse
import shutil
import socket
import statistics
import subprocess
import time

import redis

from blackgate import Command, component


class Plain(Command):
    command_key = 'bench_plain'

    def run(self):
        return 1


def _per_call(cls, calls):
    start = time.perf_counter()
    for _ in range(calls):
        cls().execute()
    return (time.perf_counter() - start) / calls


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--calls', type=int, default=3000)
    parser.add_argument('--rounds', type=int, default=9)
    args = parser.parse_args(argv)
    if shutil.which('redis-server') is None:
        raise SystemExit('redis-server is not installed (apt-get install redis-server)')
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(['redis-server', '--port', str(port), '--bind', '127.0.0.1',
                               '--save', '', '--appendonly', 'no'], stdout=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port)
        for _ in range(200):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.02)
        component.reset()
        options = {'backend': 'redis', 'prefix': 'bench', 'url': 'redis://127.0.0.1:%d/0' % port}
        results = {'store off': [], 'store on': []}
        for _ in range(args.rounds):
            component.delete('state_store')
            component.install()
            results['store off'].append(_per_call(Plain, args.calls))
            component.set('state_store', options)
            component.install()
            results['store on'].append(_per_call(Plain, args.calls))
        component.reset()
    finally:
        server.terminate()
        server.wait(10)
    off = statistics.median(results['store off'])
    on = statistics.median(results['store on'])
    print('execute(), store off: %8.2f us/call' % (off * 1e6))
    print('execute(), store on:  %8.2f us/call  (%+.2f us, %.3fx)' % (
        on * 1e6, (on - off) * 1e6, on / off))


if __name__ == '__main__':
    main()
