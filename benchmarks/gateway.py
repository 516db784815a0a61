"""Requests per second through an HTTPProxy gateway vs a raw Tornado proxy, same upstream.

Four kinds of process, all on 127.0.0.1, each bounded in time (a server
exits by itself after ``--lifetime`` seconds, the load stops after
``--seconds``):

- the *upstream*: a minimal asyncio HTTP/1.1 server answering every request
  with the same small JSON body, fast enough never to be the bottleneck;
- the *Blackgate gateway*: Tornado with ``HTTPProxy(command=...)``, an
  ``HTTPProxyCommand`` on an executor pool of 10 workers (with queue slots
  for every connection, so that no request is rejected);
- the *raw gateway*: Tornado with a handler that calls ``requests`` on a
  10-thread ``ThreadPoolExecutor`` (``run_in_executor``), copying status,
  fields and body back: what one would write without Blackgate;
- the *load*: ``wrk`` when it is installed, pinned with ``taskset`` (the
  gateways on CPU 0, upstream and load on CPU 1 when there are two CPUs),
  else a bounded asyncio load generator in Python.

Both gateways run at once; the load goes to one, then the other, in rounds
whose order alternates. Run on its own::

    python -m benchmarks.gateway [--rounds 5] [--seconds 5] [--connections 20]
"""
import argparse
import asyncio
import importlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

__all__ = ('case_gateway', 'proxy_import_error')

_BODY = json.dumps({'item': 42, 'name': 'widget', 'stock': 7, 'tags': ['a', 'b', 'c'],
                    'description': 'x' * 120}).encode()
_RESPONSE = (b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n'
             b'Cache-Control: no-store\r\nContent-Length: %d\r\n\r\n' % len(_BODY)) + _BODY
_PATH = '/items/42?fields=name,stock'
_HOP_BY_HOP = frozenset(('connection', 'keep-alive', 'proxy-connection', 'te', 'trailer',
                         'transfer-encoding', 'upgrade', 'proxy-authorization',
                         'proxy-authenticate', 'host', 'content-length'))
RAW = 'raw requests-on-10-threads Tornado proxy'
BLACKGATE = 'Blackgate HTTPProxy gateway'


# -- the servers (subprocesses) ------------------------------------------------------------

def _die_after(lifetime: float) -> None:
    signal.signal(signal.SIGALRM, lambda *_: os._exit(0))
    signal.alarm(max(1, int(lifetime)))


def _announce(server) -> None:
    """Print the port the server listens on: the parent reads it from the first line."""
    sockets = getattr(server, 'sockets', None) or server._sockets.values()
    print(next(iter(sockets)).getsockname()[1], flush=True)


class _Upstream(asyncio.Protocol):
    """Answers each request on a keep-alive connection with the same response."""

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.buffer = b''

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b'\r\n\r\n')
            if end < 0:
                return
            head = self.buffer[:end]
            length = re.search(rb'(?i)\r\ncontent-length:\s*(\d+)', head)
            total = end + 4 + (int(length.group(1)) if length else 0)
            if len(self.buffer) < total:
                return
            self.buffer = self.buffer[total:]
            self.transport.write(_RESPONSE)


async def serve_upstream() -> None:
    server = await asyncio.get_running_loop().create_server(_Upstream, '127.0.0.1', 0)
    _announce(server)
    await asyncio.Event().wait()


def _gateway_app(kind: str, upstream: str, connections: int):
    import tornado.web
    if kind == 'blackgate':
        return _blackgate_app(upstream, connections)
    return tornado.web.Application([(r'/(.*)', _raw_handler(upstream))],
                                   log_function=lambda handler: None)


def _blackgate_app(upstream: str, connections: int):
    import tornado.web

    from blackgate import HTTPProxy, HTTPProxyCommand, component

    class Upstream(HTTPProxyCommand):
        group_key = 'bench_gateway'
        command_key = 'bench_gateway'
        timeout = 10.0   # armed; a busy machine must not turn slow answers into 504s

        def before_request(self):
            self.request['url'] = upstream + self.request['path']

    component.add('executor_pool', {'group_key': 'bench_gateway', 'max_workers': 10,
                                    'max_queue_size': max(10, connections)})
    component.install()
    return tornado.web.Application([(r'/(.*)', HTTPProxy, dict(command=Upstream))],
                                   log_function=lambda handler: None)


def _raw_handler(upstream: str):
    import concurrent.futures
    import functools

    import requests
    import requests.adapters
    import tornado.web
    from tornado.ioloop import IOLoop

    pool = concurrent.futures.ThreadPoolExecutor(10)
    session = requests.Session()
    session.trust_env = False
    session.mount('http://', requests.adapters.HTTPAdapter(pool_connections=10, pool_maxsize=10))

    class RawProxy(tornado.web.RequestHandler):
        def set_default_headers(self):
            self.clear_header('Server')
            self.clear_header('Content-Type')

        async def get(self, path):
            headers = {name: value for name, value in self.request.headers.get_all()
                       if name.lower() not in _HOP_BY_HOP}
            url = upstream + self.request.uri
            response = await IOLoop.current().run_in_executor(pool, functools.partial(
                session.get, url, headers=headers, timeout=10, allow_redirects=False))
            self.set_status(response.status_code, response.reason)
            for name, value in response.headers.items():
                if name.lower() not in _HOP_BY_HOP and name.lower() != 'content-encoding':
                    self.add_header(name, value)
            self.finish(response.content)

    return RawProxy


async def serve_gateway(kind: str, upstream_port: int, connections: int) -> None:
    app = _gateway_app(kind, 'http://127.0.0.1:%d' % (upstream_port,), connections)
    server = app.listen(0, '127.0.0.1')
    _announce(server)
    await asyncio.Event().wait()


# -- the Python load generator (a subprocess) ----------------------------------------------

async def _read_response(reader) -> int:
    head = await reader.readuntil(b'\r\n\r\n')
    status = int(head.split(b' ', 2)[1])
    length = re.search(rb'(?i)\r\ncontent-length:\s*(\d+)', head)
    if length:
        await reader.readexactly(int(length.group(1)))
    elif re.search(rb'(?i)\r\ntransfer-encoding:\s*chunked', head):
        while True:
            size = int((await reader.readuntil(b'\r\n')).split(b';')[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return status


async def load(port: int, seconds: float, connections: int) -> Dict[str, Any]:
    """Keep ``connections`` keep-alive connections busy for ``seconds``; latencies and counts."""
    request = ('GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAccept: */*\r\n\r\n'
               % (_PATH, port)).encode()
    latencies: List[float] = []
    counts = {'non_2xx': 0, 'errors': 0}
    deadline = time.monotonic() + seconds

    async def connection():
        reader, writer = await asyncio.open_connection('127.0.0.1', port)
        try:
            while time.monotonic() < deadline:
                start = time.perf_counter()
                writer.write(request)
                status = await asyncio.wait_for(_read_response(reader), 10)
                latencies.append(time.perf_counter() - start)
                if not 200 <= status < 300:
                    counts['non_2xx'] += 1
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            counts['errors'] += 1
        finally:
            writer.close()

    started = time.monotonic()
    await asyncio.gather(*[connection() for _ in range(connections)])
    elapsed = time.monotonic() - started
    ordered = sorted(latencies) or [0.0]
    return {'requests': len(latencies), 'rps': len(latencies) / elapsed,
            'p50_us': ordered[len(ordered) // 2] * 1e6,
            'p99_us': ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e6, **counts}


# -- wrk ---------------------------------------------------------------------------------------

_UNITS = {'us': 1.0, 'ms': 1e3, 's': 1e6, 'm': 6e7, 'h': 3.6e9}


def _wrk_time(text: str) -> float:
    number, unit = re.fullmatch(r'([\d.]+)(us|ms|s|m|h)', text).groups()
    return float(number) * _UNITS[unit]


def parse_wrk(output: str) -> Dict[str, Any]:
    """Requests/s, p50 and p99 latency (µs), non-2xx and socket errors from ``wrk --latency``."""
    try:
        return _parse_wrk(output)
    except (AttributeError, KeyError, ValueError):
        raise ValueError('unexpected wrk output: %r' % (output[-600:],)) from None


def _parse_wrk(output: str) -> Dict[str, Any]:
    rps = float(re.search(r'Requests/sec:\s+([\d.]+)', output).group(1))
    # The distribution's lines only: "Latency ... 69.50%" above them ends in "50%" too.
    p50 = _wrk_time(re.search(r'^\s*50%\s+(\S+)', output, re.M).group(1))
    p99 = _wrk_time(re.search(r'^\s*99%\s+(\S+)', output, re.M).group(1))
    non_2xx = re.search(r'Non-2xx or 3xx responses:\s+(\d+)', output)
    errors = re.search(r'Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)',
                       output)
    requests = re.search(r'(\d+) requests in', output)
    return {'rps': rps, 'p50_us': p50, 'p99_us': p99,
            'requests': int(requests.group(1)) if requests else None,
            'non_2xx': int(non_2xx.group(1)) if non_2xx else 0,
            'errors': sum(int(n) for n in errors.groups()) if errors else 0}


# -- the parent: processes, rounds, result ------------------------------------------------------

def proxy_import_error() -> Optional[str]:
    """Why ``blackgate.HTTPProxy`` cannot be used yet, or None."""
    try:
        module = importlib.import_module('blackgate.proxy')
        for name in ('HTTPProxy', 'HTTPProxyCommand'):
            getattr(module, name)
    except Exception as exc:   # a module half written may raise anything on import
        return 'blackgate.proxy is not importable yet (%s: %s)' % (type(exc).__name__, exc)
    return None


def _pinning() -> Tuple[List[str], List[str]]:
    """taskset prefixes: (gateways, upstream and load); empty when not pinning."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else []
    if shutil.which('taskset') is None or len(cpus) < 2:
        return [], []
    return ['taskset', '-c', str(cpus[0])], ['taskset', '-c', str(cpus[1])]


class _Processes:
    """Start servers that print their port; kill them all on exit."""

    def __init__(self) -> None:
        self.running: List[subprocess.Popen] = []

    def start(self, prefix: List[str], *args: str) -> int:
        process = subprocess.Popen(
            prefix + [sys.executable, '-m', 'benchmarks.gateway'] + list(args),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        self.running.append(process)
        line = process.stdout.readline()
        if not line.strip().isdigit():
            process.kill()
            raise RuntimeError('%s did not start: %s' % (
                ' '.join(args[:2]), (line + process.stderr.read())[-800:].strip()))
        return int(line)

    def __enter__(self) -> '_Processes':
        return self

    def __exit__(self, *exc_info) -> None:
        for process in self.running:
            process.kill()
        for process in self.running:
            process.wait(10)
            for stream in (process.stdout, process.stderr):
                stream.close()


def _use_wrk(load: str) -> bool:
    return load == 'auto' and shutil.which('wrk') is not None


def _measure(port: int, seconds: float, connections: int, pin: List[str],
             load: str) -> Dict[str, Any]:
    """One load run against ``port``: wrk if installed, else the Python load generator."""
    url = 'http://127.0.0.1:%d%s' % (port, _PATH)
    if _use_wrk(load):
        command = pin + ['wrk', '-t1', '-c%d' % connections, '-d%ds' % max(1, round(seconds)),
                         '--latency', '--timeout', '10s', url]
        done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 30)
        return parse_wrk(done.stdout + done.stderr)
    command = pin + [sys.executable, '-m', 'benchmarks.gateway', 'load', '--port', str(port),
                     '--seconds', str(seconds), '--connections', str(connections)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 30,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return json.loads(done.stdout.strip().splitlines()[-1])


def _check_answers(port: int) -> bool:
    import requests
    with requests.Session() as session:
        session.trust_env = False
        response = session.get('http://127.0.0.1:%d%s' % (port, _PATH), timeout=10)
    return response.status_code == 200 and response.content == _BODY


def run_rounds(rounds: int, seconds: float, connections: int, load: str = 'auto'
               ) -> Dict[str, Any]:
    """Start everything, alternate the load between the gateways; per-gateway runs."""
    gateway_pin, load_pin = _pinning()
    lifetime = str(60 + (rounds + 1) * 2 * (seconds + 10))
    runs: Dict[str, List[Dict[str, Any]]] = {BLACKGATE: [], RAW: []}
    with _Processes() as processes:
        upstream = processes.start(load_pin, 'upstream', '--lifetime', lifetime)
        ports = {name: processes.start(gateway_pin, 'serve', kind, '--upstream-port',
                                       str(upstream), '--connections', str(connections),
                                       '--lifetime', lifetime)
                 for name, kind in ((BLACKGATE, 'blackgate'), (RAW, 'raw'))}
        answers = {name: _check_answers(port) for name, port in ports.items()}
        for port in ports.values():   # warm up: connections, threads, caches
            try:
                _measure(port, 1.0, connections, load_pin, load)
            except ValueError:   # a warm-up's figures are not used; a round's are checked
                pass
        for r in range(rounds):
            order = [BLACKGATE, RAW] if r % 2 == 0 else [RAW, BLACKGATE]
            for name in order:
                runs[name].append(_measure(ports[name], seconds, connections, load_pin, load))
    return {'runs': runs, 'answers': answers, 'pinned': bool(gateway_pin),
            'load': 'wrk' if _use_wrk(load) else 'python load generator'}


def case_gateway(plan) -> 'Any':
    """The issue's gateway case: Blackgate's rps / the raw proxy's, >= 0.90 (0.85 at worst)."""
    from .results import CaseResult, Row, Target
    case = CaseResult('gateway', 'HTTPProxy gateway, requests per second', RAW,
                      Target('ratio_min', 0.90, '>= 0.90x (0.85x at worst)', floor=0.85),
                      '%d rounds x %g s per gateway, %d keep-alive connections'
                      % (plan.proxy_rounds, plan.proxy_seconds, plan.proxy_connections))
    reason = proxy_import_error()
    if reason is not None:
        case.skipped = reason
        return case
    try:
        result = run_rounds(plan.proxy_rounds, plan.proxy_seconds, plan.proxy_connections,
                            plan.proxy_load)
    except (RuntimeError, OSError, subprocess.SubprocessError, ValueError, AttributeError) as exc:
        case.skipped = 'the gateway case could not run: %s: %s' % (type(exc).__name__, exc)
        return case
    runs = result['runs']
    base_rps = statistics.median(run['rps'] for run in runs[RAW])
    for name in (RAW, BLACKGATE):
        rps = statistics.median(run['rps'] for run in runs[name])
        row = Row(name, 'baseline' if name == RAW else 'blackgate', rps,
                  median=statistics.median(run['p50_us'] for run in runs[name]),
                  p99=statistics.median(run['p99_us'] for run in runs[name]),
                  note='%.0f requests/s' % (rps,))
        if name == BLACKGATE:
            row.ratio = rps / base_rps
            row.round_ratios = [mine['rps'] / theirs['rps']
                                for mine, theirs in zip(runs[BLACKGATE], runs[RAW])]
        case.rows.append(row)
        case.checks['%s answers 200 with the upstream body' % (name,)] = result['answers'][name]
        case.checks['%s: no error or non-2xx answer under load' % (name,)] = not any(
            run['non_2xx'] or run['errors'] for run in runs[name])
    case.method += '; load: %s%s; latency: median over rounds of each round\'s p50 / p99' % (
        result['load'], ', pinned with taskset' if result['pinned'] else '')
    case.details.update(result)
    return case


# -- command line ------------------------------------------------------------------------------

def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest='role')
    upstream = sub.add_parser('upstream')
    upstream.add_argument('--lifetime', type=float, default=600)
    serve = sub.add_parser('serve')
    serve.add_argument('kind', choices=('blackgate', 'raw'))
    serve.add_argument('--upstream-port', type=int, required=True)
    serve.add_argument('--connections', type=int, default=20)
    serve.add_argument('--lifetime', type=float, default=600)
    generate = sub.add_parser('load')
    generate.add_argument('--port', type=int, required=True)
    generate.add_argument('--seconds', type=float, default=5)
    generate.add_argument('--connections', type=int, default=20)
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--seconds', type=float, default=5.0)
    parser.add_argument('--connections', type=int, default=20)
    parser.add_argument('--load', choices=('auto', 'python'), default='auto',
                        help='auto: wrk if installed; python: the Python load generator')
    args = parser.parse_args(argv)

    if args.role == 'upstream':
        _die_after(args.lifetime)
        asyncio.run(serve_upstream())
    elif args.role == 'serve':
        _die_after(args.lifetime)
        asyncio.run(serve_gateway(args.kind, args.upstream_port, args.connections))
    elif args.role == 'load':
        print(json.dumps(asyncio.run(load(args.port, args.seconds, args.connections))))
    else:
        from .plan import FULL
        from .report import print_case
        print_case(case_gateway(FULL.but(proxy_rounds=args.rounds, proxy_seconds=args.seconds,
                                         proxy_connections=args.connections,
                                         proxy_load=args.load)))


if __name__ == '__main__':
    main()
