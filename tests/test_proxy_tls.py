"""HTTPProxy to an https:// upstream: verified TLS, kept-alive connections, no leak on failure.

The gateway runs in a process of its own (tests/streaming_gateway.py, the
README's route) so that it can trust the test's certificate the way a
deployment trusts an internal CA: through ``SSL_CERT_FILE``, which the
default SSL context reads. The certificate in tests/tls is self-signed, for
IP 127.0.0.1, made once with ``openssl req -x509 -newkey rsa:2048 -nodes
-days 36500 -subj "/CN=blackgate test upstream" -addext
"subjectAltName=IP:127.0.0.1"``.
"""
import asyncio
import json
import os
import ssl
import subprocess
import sys

import pytest
import tornado.web
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from proxy_upstream import TEST_TIMEOUT, WAIT

pytestmark = pytest.mark.gen_test(timeout=TEST_TIMEOUT * 4)

HERE = os.path.dirname(os.path.abspath(__file__))
CERT = os.path.join(HERE, 'tls', 'upstream.crt')
KEY = os.path.join(HERE, 'tls', 'upstream.key')


class Hello(tornado.web.RequestHandler):
    def initialize(self, streams):
        self.streams = streams

    def get(self, name):
        self.streams.append(self.request.connection.stream)   # kept: ids stay distinct
        self.set_header('Content-Type', 'application/json')
        self.finish(json.dumps({'hello': name, 'tls': self.request.protocol}))


@pytest.fixture
def tls_upstream(io_loop):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(CERT, KEY)
    streams = []
    sockets = bind_sockets(0, '127.0.0.1')
    server = HTTPServer(tornado.web.Application([(r'/v1/hello/(\w+)', Hello,
                                                  dict(streams=streams))]),
                        ssl_options=context)
    server.add_sockets(sockets)
    yield 'https://127.0.0.1:%d' % sockets[0].getsockname()[1], streams
    server.stop()
    io_loop.run_sync(server.close_all_connections, timeout=WAIT)


def _gateway(upstream_url, trust):
    env = dict(os.environ)
    env.pop('SSL_CERT_DIR', None)
    if trust:
        env['SSL_CERT_FILE'] = CERT
    else:
        env.pop('SSL_CERT_FILE', None)
    process = subprocess.Popen([sys.executable, os.path.join(HERE, 'streaming_gateway.py'),
                                upstream_url, '120'],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    process.port = int(process.stdout.readline())
    return process


def _stop(process):
    process.stdin.close()
    try:
        process.wait(WAIT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(WAIT)


async def _get(port, paths):
    """Each path on one kept-alive client connection: [(status, body)]."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection('127.0.0.1', port), WAIT)
    answers = []
    try:
        for path in paths:
            writer.write(('GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n'
                          % (path, port)).encode())
            head = await asyncio.wait_for(reader.readuntil(b'\r\n\r\n'), WAIT)
            lines = head.decode('latin-1').split('\r\n')
            length = next(int(line.split(':', 1)[1]) for line in lines
                          if line.lower().startswith('content-length:'))
            body = await asyncio.wait_for(reader.readexactly(length), WAIT)
            answers.append((int(lines[0].split(' ')[1]), body))
    finally:
        writer.close()
    return answers


async def test_an_https_upstream_is_verified_and_its_connection_kept_alive(tls_upstream):
    url, streams = tls_upstream
    gateway = _gateway(url, trust=True)
    try:
        answers = await _get(gateway.port, ['/api/v1/hello/%s' % name
                                            for name in ('ada', 'bob', 'cy')])
    finally:
        _stop(gateway)
    assert [status for status, _ in answers] == [200, 200, 200]
    assert [json.loads(body) for _, body in answers] == [
        {'hello': name, 'tls': 'https'} for name in ('ada', 'bob', 'cy')]
    # Three requests, one after another: one TLS connection carried them all.
    assert len(streams) == 3 and len({id(stream) for stream in streams}) == 1


async def test_an_https_upstream_the_gateway_cannot_verify_is_a_502_that_names_nothing(
        tls_upstream):
    url, streams = tls_upstream
    gateway = _gateway(url, trust=False)
    try:
        [(status, body)] = await _get(gateway.port, ['/api/v1/hello/ada'])
    finally:
        _stop(gateway)
    assert streams == []   # no request reached the upstream's application
    # The README route's fallback answers: the failure never shows the upstream's address.
    assert status == 500, body
    assert url.encode() not in body and b'127.0.0.1' not in body
    assert b'Traceback' not in body and b'certificate' not in body
