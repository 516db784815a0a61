"""Which HTTP client should carry the gateway's upstream calls? CPU per request, side by side.

Each candidate runs in a process of its own, pinned to one CPU, and keeps
``--concurrency`` requests in flight for ``--seconds`` against the same
minimal upstream (benchmarks.gateway's, pinned to the other CPU), over
keep-alive connections where the client offers them. The figure is the
client process's CPU time (user + system) per completed request: what the
gateway would pay per upstream call, the server side left out.

- ``blackgate.transport``: Blackgate's own, on an asyncio protocol;
- ``tornado simple_httpclient``: Tornado's AsyncHTTPClient (no keep-alive);
- ``tornado curl_httpclient``: AsyncHTTPClient on pycurl (libcurl), if installed;
- ``aiohttp``: its ClientSession with a TCPConnector, if installed;
- ``requests on threads``: requests.Session on a 10-thread pool, run_in_executor.

Run on its own::

    python -m benchmarks.transport [--seconds 3] [--concurrency 32] [--rounds 3]
"""
import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List

__all__ = ('CANDIDATES', 'run')

_PATH = '/items/42?fields=name,stock'


async def _drive(fetch: Callable[[], Any], seconds: float, concurrency: int) -> Dict[str, Any]:
    deadline = time.monotonic() + seconds
    done = [0]
    errors = [0]

    async def loop():
        while time.monotonic() < deadline:
            try:
                body = await fetch()
                assert body.startswith(b'{"item": 42'), body[:40]
                done[0] += 1
            except Exception:
                errors[0] += 1

    before = os.times()
    started = time.monotonic()
    await asyncio.gather(*[loop() for _ in range(concurrency)])
    elapsed = time.monotonic() - started
    after = os.times()
    cpu = (after.user - before.user) + (after.system - before.system)
    return {'requests': done[0], 'errors': errors[0], 'rps': done[0] / elapsed,
            'cpu_us_per_request': cpu / max(1, done[0]) * 1e6}


async def _blackgate(url: str, seconds: float, concurrency: int) -> Dict[str, Any]:
    from blackgate import transport
    where = transport.parse_url(url)
    pool = transport.pool()

    async def fetch():
        connection = pool.take(where.origin) or await pool.connect(where.origin, 10)
        transport.send_request(connection, 'GET', where.target, where.authority,
                               [('Accept', '*/*')], None)
        head = await transport.read_head(connection, 10)
        mode, length = transport.body_framing(head, 'GET')
        body = transport.ResponseBody(connection, pool, head, mode, length)
        parts = []
        while True:
            data = await body.read(10)
            if not data:
                return b''.join(parts)
            parts.append(data)

    return await _drive(fetch, seconds, concurrency)


async def _simple(url: str, seconds: float, concurrency: int) -> Dict[str, Any]:
    from tornado.httpclient import AsyncHTTPClient
    client = AsyncHTTPClient(force_instance=True, max_clients=concurrency)

    async def fetch():
        return (await client.fetch(url, decompress_response=False)).body

    return await _drive(fetch, seconds, concurrency)


async def _curl(url: str, seconds: float, concurrency: int) -> Dict[str, Any]:
    import pycurl  # noqa: F401  (the reason to skip, if missing)
    from tornado.curl_httpclient import CurlAsyncHTTPClient
    client = CurlAsyncHTTPClient(force_instance=True, max_clients=concurrency)

    async def fetch():
        return (await client.fetch(url, decompress_response=False)).body

    return await _drive(fetch, seconds, concurrency)


async def _aiohttp(url: str, seconds: float, concurrency: int) -> Dict[str, Any]:
    import aiohttp
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                     trust_env=False) as session:
        async def fetch():
            async with session.get(url) as response:
                return await response.read()

        return await _drive(fetch, seconds, concurrency)


async def _requests(url: str, seconds: float, concurrency: int) -> Dict[str, Any]:
    import concurrent.futures

    import requests
    import requests.adapters
    executor = concurrent.futures.ThreadPoolExecutor(10)
    session = requests.Session()
    session.trust_env = False
    session.mount('http://', requests.adapters.HTTPAdapter(pool_maxsize=10))
    loop = asyncio.get_running_loop()

    async def fetch():
        return (await loop.run_in_executor(executor, session.get, url)).content

    return await _drive(fetch, seconds, concurrency)


CANDIDATES = {
    'blackgate.transport': _blackgate,
    'tornado simple_httpclient': _simple,
    'tornado curl_httpclient (pycurl)': _curl,
    'aiohttp': _aiohttp,
    'requests on 10 threads': _requests,
}


def _child(name: str, url: str, seconds: float, concurrency: int) -> None:
    try:
        result = asyncio.run(CANDIDATES[name](url, seconds, concurrency))
    except ImportError as exc:
        result = {'skipped': 'not installed (%s)' % (exc,)}
    print(json.dumps(result))


def run(seconds: float = 3.0, concurrency: int = 32, rounds: int = 3) -> Dict[str, Any]:
    """Every candidate, ``rounds`` times in turns; the median of each one's figures."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cpus = sorted(os.sched_getaffinity(0))
    pin_upstream = ['taskset', '-c', str(cpus[0])] if len(cpus) > 1 else []
    pin_client = ['taskset', '-c', str(cpus[-1])] if len(cpus) > 1 else []
    upstream = subprocess.Popen(pin_upstream + [sys.executable, '-m', 'benchmarks.gateway',
                                                'upstream', '--lifetime', '900'],
                                stdout=subprocess.PIPE, text=True, cwd=root)
    results: Dict[str, List[Dict[str, Any]]] = {name: [] for name in CANDIDATES}
    try:
        url = 'http://127.0.0.1:%d%s' % (int(upstream.stdout.readline()), _PATH)
        for _ in range(rounds):
            for name in CANDIDATES:
                done = subprocess.run(
                    pin_client + [sys.executable, '-m', 'benchmarks.transport', '--child', name,
                                  '--url', url, '--seconds', str(seconds),
                                  '--concurrency', str(concurrency)],
                    capture_output=True, text=True, cwd=root, timeout=seconds + 60)
                lines = done.stdout.strip().splitlines()
                results[name].append(json.loads(lines[-1]) if lines else
                                     {'skipped': 'failed: %s' % done.stderr[-300:]})
    finally:
        upstream.kill()
        upstream.wait(10)
    summary = {}
    for name, runs in results.items():
        measured = [run for run in runs if 'skipped' not in run]
        if not measured:
            summary[name] = {'skipped': runs[0].get('skipped')}
            continue
        summary[name] = {
            'cpu_us_per_request': statistics.median(r['cpu_us_per_request'] for r in measured),
            'rps': statistics.median(r['rps'] for r in measured),
            'errors': sum(r['errors'] for r in measured)}
    return summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--child')
    parser.add_argument('--url')
    parser.add_argument('--seconds', type=float, default=3.0)
    parser.add_argument('--concurrency', type=int, default=32)
    parser.add_argument('--rounds', type=int, default=3)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child, args.url, args.seconds, args.concurrency)
        return
    summary = run(args.seconds, args.concurrency, args.rounds)
    ours = summary['blackgate.transport'].get('cpu_us_per_request')
    print('%-34s %12s %10s %8s' % ('client', 'CPU us/req', 'req/s', 'vs ours'))
    for name, figures in summary.items():
        if 'skipped' in figures:
            print('%-34s %s' % (name, figures['skipped']))
            continue
        print('%-34s %12.1f %10.0f %7.2fx%s' % (
            name, figures['cpu_us_per_request'], figures['rps'],
            figures['cpu_us_per_request'] / ours if ours else float('nan'),
            '  (%d errors)' % figures['errors'] if figures['errors'] else ''))


if __name__ == '__main__':
    main()
