"""What a refusal costs the gateway: CPU µs per refused vs per forwarded request.

Pinned, one run, bounded in time: an upstream (Tornado) and wrk on CPU 0, the
gateway under test (one process) on CPU 1. Each case runs ``wrk -t1 -c8`` for
a few seconds against one route, and the figure is the gateway process's CPU
time (user + system, from /proc) over that run divided by the requests wrk
completed:

- ``forwarded``: a fast upstream answering 2 bytes;
- ``short-circuited``: a route whose breaker is forced open (503);
- ``rejected``: a route whose pool has 1 slot, held by an upstream taking 2 s,
  so the other 7 connections loop on instant 503s;
- ``tornado floor``: a plain Tornado handler answering the same 503 and fields
  from a constant, in the same process: what any refusal through a Tornado
  ``RequestHandler`` costs before Blackgate does anything;
- ``tornado connection floor``: the same answer written by an
  ``HTTPMessageDelegate`` straight onto Tornado's ``HTTP1Connection``, no
  ``Application`` and no handler: the least a refusal costs on Tornado's
  HTTP server at all;
- ``asyncio protocol floor``: the same bytes from a bare asyncio protocol
  that only looks for the end of each request head: what is left without
  Tornado's server;
- ``nginx 502`` (if nginx is installed): nginx 1.x proxying to a closed port,
  its worker's CPU per answer, for scale.

Run::

    python -m benchmarks.refusals [--seconds 3]
"""
import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

__all__ = ('run',)

_TICKS = os.sysconf('SC_CLK_TCK')


def _cpu_seconds(pid: int) -> float:
    with open('/proc/%d/stat' % pid) as stat:
        fields = stat.read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _wrk(url: str, seconds: float) -> int:
    out = subprocess.run(['taskset', '-c', '0', 'wrk', '-t1', '-c8', '-d%ds' % seconds, url],
                         capture_output=True, text=True, timeout=seconds + 30).stdout
    match = re.search(r'(\d+) requests in', out)
    if not match:
        raise RuntimeError('wrk said: %s' % (out,))
    return int(match.group(1))


def _measure(pid: int, url: str, seconds: float) -> Dict[str, float]:
    _wrk(url, 1)   # warm-up
    before = _cpu_seconds(pid)
    requests = _wrk(url, seconds)
    used = _cpu_seconds(pid) - before
    return {'requests': requests, 'cpu_seconds': round(used, 3),
            'cpu_us_per_request': round(used / requests * 1e6, 1) if requests else None}


async def _upstream() -> None:
    import tornado.web
    from tornado.httpserver import HTTPServer
    from tornado.netutil import bind_sockets

    class Fast(tornado.web.RequestHandler):
        def get(self) -> None:
            self.write(b'ok')

    class Slow(tornado.web.RequestHandler):
        async def get(self) -> None:
            await asyncio.sleep(2.0)
            self.write(b'slow')

    app = tornado.web.Application([('/fast', Fast), ('/slow', Slow)],
                                  log_function=lambda handler: None)
    sockets = bind_sockets(0, '127.0.0.1')
    HTTPServer(app).add_sockets(sockets)
    print(sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()


async def _gateway(upstream: int) -> None:
    import logging

    import tornado.web
    from tornado.httpserver import HTTPServer
    from tornado.netutil import bind_sockets

    from blackgate import HTTPProxy, HTTPProxyCommand, component

    logging.getLogger('blackgate').setLevel(logging.ERROR)
    base = 'http://127.0.0.1:%d' % upstream

    class Forward(HTTPProxyCommand):
        group_key = 'forward'
        command_key = 'forward'

        def before_request(self) -> None:
            self.request['url'] = base + '/fast'

    class Open(Forward):
        command_key = 'open'
        circuit_breaker_force_open = True

    class Full(Forward):
        group_key = 'full'
        command_key = 'full'
        timeout = 10.0

        def before_request(self) -> None:
            self.request['url'] = base + '/slow'

    class Floor(tornado.web.RequestHandler):
        body = (b'{"error": "circuit breaker open", "command_key": "open", '
                b'"failure_type": "SHORTCIRCUIT"}')

        def get(self) -> None:
            self.set_status(503)
            self.set_header('Retry-After', 5)
            self.set_header('Content-Type', 'application/json')
            self.set_header('Cache-Control', 'no-store')
            self.set_header('X-Blackgate-Error', 'short-circuited')
            self.finish(self.body)

    component.add('executor_pool', {'group_key': 'forward', 'max_workers': 32})
    component.add('executor_pool', {'group_key': 'full', 'max_workers': 1})
    component.install()
    app = tornado.web.Application([HTTPProxy.route('/fwd', Forward),
                                   HTTPProxy.route('/open', Open),
                                   HTTPProxy.route('/full', Full), ('/floor', Floor)],
                                  log_function=lambda handler: None)
    sockets = bind_sockets(0, '127.0.0.1')
    HTTPServer(app).add_sockets(sockets)
    floors = _floor_servers(Floor.body)
    connection_floor = bind_sockets(0, '127.0.0.1')
    HTTPServer(floors[0]).add_sockets(connection_floor)
    protocol_floor = await asyncio.get_running_loop().create_server(floors[1], '127.0.0.1', 0)
    print(sockets[0].getsockname()[1], connection_floor[0].getsockname()[1],
          protocol_floor.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()


def _floor_servers(body: bytes):
    """The two floors below a RequestHandler: Tornado's connection, and no Tornado at all."""
    import tornado.httputil

    fields = (('Retry-After', '5'), ('Content-Type', 'application/json'),
              ('Cache-Control', 'no-store'), ('X-Blackgate-Error', 'short-circuited'),
              ('Content-Length', str(len(body))))
    start = tornado.httputil.ResponseStartLine('HTTP/1.1', 503, 'Service Unavailable')

    class Answer(tornado.httputil.HTTPMessageDelegate):
        def __init__(self, connection) -> None:
            self.connection = connection

        def headers_received(self, start_line, headers) -> None:
            self.connection.write_headers(start, tornado.httputil.HTTPHeaders(fields), body)
            self.connection.finish()

    class Connections(tornado.httputil.HTTPServerConnectionDelegate):
        def start_request(self, server_conn, request_conn):
            return Answer(request_conn)

    answer = ('HTTP/1.1 503 Service Unavailable\r\n%s\r\n' % ''.join(
        '%s: %s\r\n' % field for field in fields)).encode('latin-1') + body

    class Bare(asyncio.Protocol):
        def connection_made(self, transport) -> None:
            self.transport = transport
            self.buffer = b''

        def data_received(self, data: bytes) -> None:
            self.buffer += data
            while b'\r\n\r\n' in self.buffer:
                self.buffer = self.buffer.partition(b'\r\n\r\n')[2]
                self.transport.write(answer)

    return Connections(), Bare


def _start(cpu: int, role: str, *args: str) -> 'tuple[subprocess.Popen, List[int]]':
    process = subprocess.Popen(['taskset', '-c', str(cpu), sys.executable, '-m',
                                'benchmarks.refusals', '--role', role, *args],
                               stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline()   # type: ignore[union-attr]
    if not line.split() or not all(word.isdigit() for word in line.split()):
        process.kill()
        raise RuntimeError('%s did not start' % (role,))
    return process, [int(word) for word in line.split()]


_NGINX_CONF = """
worker_processes 1;
daemon off;
pid %(dir)s/nginx.pid;
error_log %(dir)s/error.log crit;
events { worker_connections 256; }
http {
    access_log off;
    client_body_temp_path %(dir)s/body;
    proxy_temp_path %(dir)s/proxy;
    fastcgi_temp_path %(dir)s/fastcgi;
    uwsgi_temp_path %(dir)s/uwsgi;
    scgi_temp_path %(dir)s/scgi;
    server {
        listen 127.0.0.1:%(port)d;
        location / { proxy_pass http://127.0.0.1:%(closed)d; }
    }
}
"""


def _nginx_502(seconds: float) -> Optional[Dict[str, float]]:
    binary = shutil.which('nginx') or ('/usr/sbin/nginx' if os.path.exists('/usr/sbin/nginx')
                                       else None)
    if binary is None:
        return None
    import socket

    def free_port() -> int:
        with socket.socket() as sock:
            sock.bind(('127.0.0.1', 0))
            return sock.getsockname()[1]

    with tempfile.TemporaryDirectory() as workdir:
        port = free_port()
        conf = os.path.join(workdir, 'nginx.conf')
        with open(conf, 'w') as out:
            out.write(_NGINX_CONF % {'dir': workdir, 'port': port, 'closed': free_port()})
        nginx = subprocess.Popen(['taskset', '-c', '1', binary, '-c', conf, '-p', workdir],
                                 stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.5)
            children = subprocess.run(['pgrep', '-P', str(nginx.pid)], capture_output=True,
                                      text=True).stdout.split()
            worker = int(children[0]) if children else nginx.pid
            return _measure(worker, 'http://127.0.0.1:%d/' % port, seconds)
        finally:
            nginx.terminate()
            nginx.wait(10)


def run(seconds: float = 3.0) -> Dict[str, Optional[Dict[str, float]]]:
    """Every case's figures, in one pinned run."""
    processes: List[subprocess.Popen] = []
    try:
        upstream, [upstream_port] = _start(0, 'upstream')
        processes.append(upstream)
        gateway, [port, connection_floor, protocol_floor] = _start(
            1, 'gateway', '--upstream', str(upstream_port))
        processes.append(gateway)
        url = 'http://127.0.0.1:%d' % port
        results: Dict[str, Optional[Dict[str, float]]] = {}
        for name, path in (('forwarded', '/fwd'), ('short-circuited', '/open'),
                           ('rejected', '/full'), ('tornado floor', '/floor')):
            results[name] = _measure(gateway.pid, url + path, seconds)
        for name, floor_port in (('tornado connection floor', connection_floor),
                                 ('asyncio protocol floor', protocol_floor)):
            results[name] = _measure(gateway.pid, 'http://127.0.0.1:%d/' % floor_port,
                                     seconds)
    finally:
        for process in processes:
            process.terminate()
            process.wait(10)
    results['nginx 502'] = _nginx_502(seconds)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--seconds', type=float, default=3.0)
    parser.add_argument('--role', choices=('upstream', 'gateway'))
    parser.add_argument('--upstream', type=int)
    args = parser.parse_args()
    if args.role == 'upstream':
        asyncio.run(_upstream())
    elif args.role == 'gateway':
        asyncio.run(_gateway(args.upstream))
    else:
        results = run(args.seconds)
        forward = (results['forwarded'] or {}).get('cpu_us_per_request')
        for name, figures in results.items():
            if figures and forward:
                figures['vs_forward'] = round(figures['cpu_us_per_request'] / forward, 3)
        print(json.dumps(results, indent=2))


if __name__ == '__main__':
    main()
