"""Streaming through the gateway: peak memory for 200 MB each way, and event-stream latency.

Three processes on 127.0.0.1, each bounded in time: an upstream (Tornado,
streaming a body of N MB from memory-light blocks, taking uploads and
answering their sha256, and sending server-sent events), the gateway under
test, and this script as the client. Gateways: Blackgate's ``HTTPProxy`` (the
README's APIService route) and, when installed, nginx with its defaults for
a proxy (``proxy_buffering on``: it spills to temporary files, not memory).

Figures:

- the gateway's peak RSS growth (``VmHWM`` from /proc, after a warm-up
  request) over a 200 MB download and over a 200 MB chunked upload, with the
  body's sha256 checked at the far end;
- for 5 server-sent events 0.3 s apart: when each reached the client,
  relative to when the upstream sent it (the median delay, and the spread
  between the first and the last arrival).

Run::

    python -m benchmarks.streaming [--megabytes 200]
"""
import argparse
import asyncio
import hashlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

__all__ = ('run',)

MB = 1024 * 1024
_BLOCK = bytes(range(256)) * 4096   # 1 MB


def _blocks(megabytes: int):
    for number in range(megabytes):
        yield number.to_bytes(8, 'big') + _BLOCK[8:]


def _digest(megabytes: int) -> str:
    digest = hashlib.sha256()
    for block in _blocks(megabytes):
        digest.update(block)
    return digest.hexdigest()


# -- the servers -------------------------------------------------------------------------------

def _die_after(seconds: float) -> None:
    signal.signal(signal.SIGALRM, lambda *_: os._exit(0))
    signal.alarm(max(1, int(seconds)))


async def _serve_upstream() -> None:
    import tornado.web
    from tornado.httpserver import HTTPServer
    from tornado.netutil import bind_sockets

    class Download(tornado.web.RequestHandler):
        async def get(self, megabytes):
            self.set_header('Content-Length', int(megabytes) * MB)
            for block in _blocks(int(megabytes)):
                self.write(block)
                await self.flush()

    @tornado.web.stream_request_body
    class Upload(tornado.web.RequestHandler):
        def prepare(self):
            self.request.connection.set_max_body_size(1 << 40)
            self.digest = hashlib.sha256()

        def data_received(self, chunk):
            self.digest.update(chunk)

        def post(self):
            self.write({'sha256': self.digest.hexdigest()})

    class Events(tornado.web.RequestHandler):
        async def get(self):
            self.set_header('Content-Type', 'text/event-stream')
            for number in range(5):
                if number:
                    await asyncio.sleep(0.3)
                self.write('data: %d %.6f\n\n' % (number, time.time()))
                await self.flush()

    app = tornado.web.Application([(r'(?:/v1)?/download/(\d+)', Download),
                                   (r'(?:/v1)?/upload', Upload), (r'(?:/v1)?/events', Events)])
    sockets = bind_sockets(0, '127.0.0.1')
    HTTPServer(app, max_body_size=1 << 40).add_sockets(sockets)
    print(sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()


async def _serve_blackgate(upstream: str) -> None:
    import tornado.web
    from tornado.httpserver import HTTPServer
    from tornado.netutil import bind_sockets

    from blackgate import HTTPProxy, HTTPProxyCommand, component

    class APIService(HTTPProxyCommand):
        group_key = 'api.v1'
        command_key = 'proxy_v1_traffic'

        def before_request(self):
            path = self.request['path'].replace('/api', '')
            self.request['url'] = upstream + path

    component.add('executor_pool', {'group_key': 'api.v1', 'max_workers': 10})
    component.install()
    app = tornado.web.Application([(r'/api/v1/(.*)', HTTPProxy,
                                    dict(command=APIService, max_body_size=None))],
                                  log_function=lambda handler: None)
    sockets = bind_sockets(0, '127.0.0.1')
    HTTPServer(app).add_sockets(sockets)
    print(sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()




# -- the client --------------------------------------------------------------------------------

def _peak_rss(pid: int) -> int:
    with open('/proc/%d/status' % pid) as status:
        return int(re.search(r'VmHWM:\s+(\d+)', status.read()).group(1)) * 1024


async def _head(reader) -> int:
    head = await asyncio.wait_for(reader.readuntil(b'\r\n\r\n'), 30)
    return int(head.split(b' ', 2)[1])


def _request(method: str, target: str, port: int, fields: str = '') -> bytes:
    return ('%s %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n%sConnection: close\r\n\r\n'
            % (method, target, port, fields)).encode()


async def _download(port: int, megabytes: int) -> bool:
    reader, writer = await asyncio.open_connection('127.0.0.1', port)
    writer.write(_request('GET', '/api/v1/download/%d' % megabytes, port))
    status = await _head(reader)
    digest, size = hashlib.sha256(), 0
    while True:
        data = await asyncio.wait_for(reader.read(MB), 30)
        if not data:
            break
        digest.update(data)
        size += len(data)
    writer.close()
    return status == 200 and size == megabytes * MB and digest.hexdigest() == _digest(megabytes)


async def _upload(port: int, megabytes: int) -> bool:
    reader, writer = await asyncio.open_connection('127.0.0.1', port)
    writer.write(_request('POST', '/api/v1/upload', port, 'Transfer-Encoding: chunked\r\n'))
    for block in _blocks(megabytes):
        writer.write(b'%x\r\n%s\r\n' % (len(block), block))
        await asyncio.wait_for(writer.drain(), 30)
    writer.write(b'0\r\n\r\n')
    status = await _head(reader)
    body = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    answer = body[body.find(b'{'):body.rfind(b'}') + 1]
    return status == 200 and json.loads(answer)['sha256'] == _digest(megabytes)


async def _events(port: int, target: str) -> List[float]:
    """Seconds from each event's sending (upstream clock) to its arrival here."""
    reader, writer = await asyncio.open_connection('127.0.0.1', port)
    writer.write(_request('GET', target, port))
    await _head(reader)
    delays, text = [], b''
    while len(delays) < 5:
        data = await asyncio.wait_for(reader.read(4096), 30)
        if not data:
            break
        now = time.time()
        text += data
        for sent in re.findall(rb'data: \d+ ([\d.]+)\n\n', text)[len(delays):]:
            delays.append(now - float(sent))
    writer.close()
    return delays


def _gateway_figures(name: str, pid: int, port: int, megabytes: int,
                     events_target: str) -> Dict[str, Any]:
    async def measure() -> Dict[str, Any]:
        await _download(port, 1)   # warm up
        figures: Dict[str, Any] = {'gateway': name}
        for case, transfer in (('download', _download), ('upload', _upload)):
            before = _peak_rss(pid)
            figures[case + '_intact'] = await transfer(port, megabytes)
            figures[case + '_rss_growth_mb'] = (_peak_rss(pid) - before) / MB
        delays = await _events(port, events_target)
        figures['events_received'] = len(delays)
        figures['event_delay_ms_median'] = statistics.median(delays) * 1e3 if delays else None
        figures['event_delay_ms_max'] = max(delays) * 1e3 if delays else None
        return figures
    return asyncio.run(measure())


def _start(args: List[str]) -> subprocess.Popen:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.Popen([sys.executable, '-m', 'benchmarks.streaming'] + args,
                            stdout=subprocess.PIPE, text=True, cwd=root)


def run(megabytes: int = 200) -> List[Dict[str, Any]]:
    """Figures for Blackgate's gateway, nginx (if installed) and none (direct)."""
    from .gateway import _Processes
    processes = []
    results = []
    try:
        with _Processes() as others, tempfile.TemporaryDirectory() as workdir:
            upstream = _start(['--role', 'upstream'])
            processes.append(upstream)
            upstream_port = int(upstream.stdout.readline())
            blackgate = _start(['--role', 'blackgate', '--upstream-port', str(upstream_port)])
            processes.append(blackgate)
            results.append(_gateway_figures('Blackgate HTTPProxy', blackgate.pid,
                                            int(blackgate.stdout.readline()), megabytes,
                                            '/api/v1/events'))
            port = others.start_nginx([], upstream_port, workdir)   # with its defaults
            if port is not None:
                results.append(_gateway_figures('nginx (defaults)', others.pids[port], port,
                                                megabytes, '/api/v1/events'))
            delays = asyncio.run(_events(upstream_port, '/events'))
            results.append({'gateway': 'direct (no gateway)', 'events_received': len(delays),
                            'event_delay_ms_median': statistics.median(delays) * 1e3,
                            'event_delay_ms_max': max(delays) * 1e3})
    finally:
        for process in processes:
            process.kill()
            process.wait(10)
    return results


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--role', choices=('upstream', 'blackgate'))
    parser.add_argument('--upstream-port', type=int)
    parser.add_argument('--megabytes', type=int, default=200)
    args = parser.parse_args(argv)
    if args.role == 'upstream':
        _die_after(600)
        asyncio.run(_serve_upstream())
    elif args.role == 'blackgate':
        _die_after(600)
        asyncio.run(_serve_blackgate('http://127.0.0.1:%d' % args.upstream_port))
    else:
        for figures in run(args.megabytes):
            print(json.dumps(figures))


if __name__ == '__main__':
    main()
