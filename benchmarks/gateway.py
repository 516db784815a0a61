"""Requests per second through an HTTPProxy gateway vs a raw Tornado proxy, nginx and none.

Five kinds of process, all on 127.0.0.1, each bounded in time (a server
exits by itself after ``--lifetime`` seconds, the load stops after
``--seconds``):

- the *upstream*: a minimal asyncio HTTP/1.1 server answering every request
  with the same small JSON body, fast enough never to be the bottleneck;
- the *Blackgate gateway*: Tornado with ``HTTPProxy(command=...)``, an
  ``HTTPProxyCommand`` whose group is sized for every connection (10
  "workers" and a queue slot per connection: no request is rejected);
- the *raw gateway*: Tornado with a handler that calls ``requests`` on a
  10-thread ``ThreadPoolExecutor`` (``run_in_executor``), copying status,
  fields and body back: what one would write without Blackgate;
- *nginx* (when installed), one worker with a keep-alive upstream pool, the
  same role as the gateways: the peer every gateway is held against;
- the *load*: ``wrk`` when it is installed, pinned with ``taskset`` (the
  gateways on CPU 0, upstream and load on CPU 1 when there are two CPUs),
  else a bounded asyncio load generator in Python. ``direct`` is the load
  straight at the upstream: the ceiling of the set-up.

All gateways run at once; the load goes to one at a time, in rounds whose
order rotates. Each gateway's CPU time per request (user + system, from
/proc) is read around each of its runs. Run on its own::

    python -m benchmarks.gateway [--rounds 5] [--seconds 5] [--connections 32]
    python -m benchmarks.gateway profile    # where the Blackgate gateway's CPU goes
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
NGINX = 'nginx 1 worker, keep-alive upstream'
DIRECT = 'direct to the upstream (no gateway)'


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


# -- nginx ---------------------------------------------------------------------------------

_NGINX_CONF = """
worker_processes 1;
daemon off;
pid %(dir)s/nginx.pid;
error_log %(dir)s/error.log error;
events { worker_connections 1024; }
http {
    access_log off;
    client_max_body_size 0;
    client_body_temp_path %(dir)s/body;
    proxy_temp_path %(dir)s/proxy;
    fastcgi_temp_path %(dir)s/fastcgi;
    uwsgi_temp_path %(dir)s/uwsgi;
    scgi_temp_path %(dir)s/scgi;
    upstream backend { server 127.0.0.1:%(upstream)d; keepalive 64; }
    server {
        listen 127.0.0.1:%(port)d;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
        location /api/ {   # benchmarks.streaming: the README route's /api/v1/x -> /v1/x
            proxy_pass http://backend/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
"""


def _nginx() -> Optional[str]:
    return shutil.which('nginx') or next(
        (path for path in ('/usr/sbin/nginx', '/usr/local/sbin/nginx') if os.path.exists(path)),
        None)


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


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
        self.pids: Dict[int, int] = {}   # port -> pid of the process serving it

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
        self.pids[int(line)] = process.pid
        return int(line)

    def start_nginx(self, prefix: List[str], upstream: int, workdir: str) -> Optional[int]:
        """nginx in front of ``upstream``, or None when it is not installed."""
        binary = _nginx()
        if binary is None:
            return None
        port = _free_port()
        conf = os.path.join(workdir, 'nginx.conf')
        with open(conf, 'w') as out:
            out.write(_NGINX_CONF % {'dir': workdir, 'upstream': upstream, 'port': port})
        process = subprocess.Popen(prefix + [binary, '-c', conf, '-p', workdir],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.running.append(process)
        os.chmod(workdir, 0o777)   # its workers (another user) spill large bodies there
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                import socket
                socket.create_connection(('127.0.0.1', port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        else:
            return None
        # the worker, not the master, does the work
        children = subprocess.run(['pgrep', '-P', str(process.pid)], capture_output=True,
                                  text=True).stdout.split()
        self.pids[port] = int(children[0]) if children else process.pid
        return port

    def __enter__(self) -> '_Processes':
        return self

    def __exit__(self, *exc_info) -> None:
        # SIGTERM first: nginx's master then stops its worker (SIGKILL would orphan it).
        for process in self.running:
            process.terminate()
        for process in self.running:
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
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


def _cpu_seconds(pid: Optional[int]) -> Optional[float]:
    """User + system CPU seconds of ``pid`` so far (all its threads), from /proc."""
    if pid is None:
        return None
    try:
        with open('/proc/%d/stat' % pid) as stat:
            fields = stat.read().rpartition(')')[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def run_rounds(rounds: int, seconds: float, connections: int, load: str = 'auto'
               ) -> Dict[str, Any]:
    """Start everything, rotate the load among the gateways; per-gateway runs."""
    import tempfile
    gateway_pin, load_pin = _pinning()
    lifetime = str(60 + (rounds + 1) * 4 * (seconds + 10))
    with _Processes() as processes, tempfile.TemporaryDirectory() as workdir:
        upstream = processes.start(load_pin, 'upstream', '--lifetime', lifetime)
        ports = {name: processes.start(gateway_pin, 'serve', kind, '--upstream-port',
                                       str(upstream), '--connections', str(connections),
                                       '--lifetime', lifetime)
                 for name, kind in ((BLACKGATE, 'blackgate'), (RAW, 'raw'))}
        nginx = processes.start_nginx(gateway_pin, upstream, workdir)
        if nginx is not None:
            ports[NGINX] = nginx
        ports[DIRECT] = upstream
        runs: Dict[str, List[Dict[str, Any]]] = {name: [] for name in ports}
        answers = {name: _check_answers(port) for name, port in ports.items()}
        for port in ports.values():   # warm up: connections, threads, caches
            try:
                _measure(port, 1.0, connections, load_pin, load)
            except ValueError:   # a warm-up's figures are not used; a round's are checked
                pass
        names = list(ports)
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                pid = processes.pids.get(ports[name]) if name != DIRECT else None
                before = _cpu_seconds(pid)
                run = _measure(ports[name], seconds, connections, load_pin, load)
                after = _cpu_seconds(pid)
                if before is not None and after is not None and run.get('requests'):
                    run['cpu_us_per_request'] = (after - before) / run['requests'] * 1e6
                runs[name].append(run)
    return {'runs': runs, 'answers': answers, 'pinned': bool(gateway_pin),
            'load': 'wrk' if _use_wrk(load) else 'python load generator'}


def case_gateway(plan) -> 'Any':
    """The gateway case: Blackgate's rps / the raw proxy's, >= 2.0 (1.9 at worst)."""
    from .results import CaseResult, Row, Target
    case = CaseResult('gateway', 'HTTPProxy gateway, requests per second', RAW,
                      Target('ratio_min', 2.0, '>= 2.0x (1.9x at worst)', floor=1.9),
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
    for name in [RAW, BLACKGATE] + [peer for peer in (NGINX, DIRECT) if peer in runs]:
        rps = statistics.median(run['rps'] for run in runs[name])
        cpus = [run['cpu_us_per_request'] for run in runs[name] if 'cpu_us_per_request' in run]
        role = {RAW: 'baseline', BLACKGATE: 'blackgate'}.get(name, 'peer')
        row = Row(name, role, rps,
                  median=statistics.median(run['p50_us'] for run in runs[name]),
                  p99=statistics.median(run['p99_us'] for run in runs[name]),
                  cpu=statistics.median(cpus) if cpus else None,
                  note='%.0f requests/s' % (rps,))
        if name != RAW:
            row.ratio = rps / base_rps
            row.round_ratios = [mine['rps'] / theirs['rps']
                                for mine, theirs in zip(runs[name], runs[RAW])]
        case.rows.append(row)
        if name in (RAW, BLACKGATE):
            case.checks['%s answers 200 with the upstream body' % (name,)] = \
                result['answers'][name]
            case.checks['%s: no error or non-2xx answer under load' % (name,)] = not any(
                run['non_2xx'] or run['errors'] for run in runs[name])
    case.method += '; load: %s%s; latency: median over rounds of each round\'s p50 / p99' % (
        result['load'], ', pinned with taskset' if result['pinned'] else '')
    case.details.update(result)
    return case


# -- command line ------------------------------------------------------------------------------

def profile(seconds: float = 5.0, connections: int = 32) -> str:
    """Where the Blackgate gateway's CPU goes under load: cProfile's own time, by module."""
    import cProfile
    import collections
    import pstats
    gateway_pin, load_pin = _pinning()
    cpus = sorted(os.sched_getaffinity(0))
    with _Processes() as processes:
        upstream = processes.start(load_pin, 'upstream', '--lifetime', str(seconds + 60))
        if gateway_pin:
            os.sched_setaffinity(0, {cpus[0]})
        profiler = cProfile.Profile()

        async def serve_and_load() -> Dict[str, Any]:
            app = _gateway_app('blackgate', 'http://127.0.0.1:%d' % (upstream,), connections)
            server = app.listen(0, '127.0.0.1')
            port = next(iter(server._sockets.values())).getsockname()[1]
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, _measure, port, 1.0, connections, load_pin,
                                       'auto')   # warm up
            profiler.enable()
            try:
                return await loop.run_in_executor(None, _measure, port, seconds, connections,
                                                  load_pin, 'auto')
            finally:
                profiler.disable()

        run = asyncio.run(serve_and_load())
    groups: Dict[str, float] = collections.Counter()
    stats = pstats.Stats(profiler).stats   # type: ignore[attr-defined]
    for (filename, _, name), (_, _, own, _, _) in stats.items():
        if filename == '~':
            group = name.strip('<>').replace('built-in method ', '')
        elif 'blackgate' + os.sep in filename:
            group = 'blackgate/' + os.path.basename(filename)
        elif 'tornado' + os.sep in filename:
            group = 'tornado/' + os.path.basename(filename)
        elif 'asyncio' + os.sep in filename:
            group = 'asyncio (the event loop)'
        else:
            group = os.path.basename(filename)
        groups[group] += own
    total = sum(groups.values()) or 1.0
    lines = ['Blackgate gateway under cProfile: %d requests (%.0f/s with the profiler on)'
             % (run.get('requests') or 0, run['rps']), 'share  where']
    for group, own in sorted(groups.items(), key=lambda item: -item[1])[:25]:
        lines.append('%5.1f%%  %s' % (100 * own / total, group))
    return '\n'.join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest='role')
    sub.add_parser('profile')
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
    parser.add_argument('--connections', type=int, default=32)
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
    elif args.role == 'profile':
        print(profile(args.seconds, args.connections))
    else:
        from .plan import FULL
        from .report import print_case
        print_case(case_gateway(FULL.but(proxy_rounds=args.rounds, proxy_seconds=args.seconds,
                                         proxy_connections=args.connections,
                                         proxy_load=args.load)))


if __name__ == '__main__':
    main()
