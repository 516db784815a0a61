"""blackgate.server: slow and idle clients closed, connections capped, over real sockets.

The server runs on an IOLoop in a thread of its own in front of an
``HTTPProxy`` route; the clients are raw sockets, so a test controls every
byte and every pause. Timeouts are 1-3 s (real time: the kernel and the
IOLoop keep it, no injected clock reaches them), and each bound is checked
with a wide margin. The raw-socket helpers are also used by
``test_gateway_hygiene.py``.
"""
import asyncio
import os
import select
import socket
import threading
import time

import pytest
import tornado.ioloop
import tornado.web

from blackgate import ConfigError, Event, HTTPProxy, HTTPProxyCommand, component
from blackgate.server import GatewayServer, ServerSettings, listen
from test_gateway import Upstream, eventually

WAIT = 20.0


# -- raw clients ------------------------------------------------------------------------------

def connect(port, host='127.0.0.1'):
    client = socket.create_connection((host, port), timeout=WAIT)
    client.setblocking(True)
    return client


def closed_within(client, timeout, trickle=None, every=0.2):
    """Seconds until the server closes ``client`` (None if it did not within ``timeout``).

    ``trickle``: bytes to send one at a time, one every ``every`` seconds, meanwhile.
    """
    start = time.monotonic()
    pending = list(trickle or b'')
    while time.monotonic() - start < timeout:
        readable, _, _ = select.select([client], [], [], every)
        if readable:
            try:
                data = client.recv(65536)
            except ConnectionResetError:
                return time.monotonic() - start
            if not data:
                return time.monotonic() - start
            continue   # an answer; the close comes after it
        if pending:
            try:
                client.send(bytes([pending.pop(0)]))
            except (BrokenPipeError, ConnectionResetError):
                return time.monotonic() - start
    return None


def read_response(client):
    """One response from ``client``: (status, head bytes, body bytes); needs Content-Length."""
    data = b''
    while b'\r\n\r\n' not in data:
        chunk = client.recv(65536)
        if not chunk:
            raise AssertionError('connection closed after %r' % (data,))
        data += chunk
    head, _, body = data.partition(b'\r\n\r\n')
    length = 0
    for line in head.split(b'\r\n')[1:]:
        name, _, value = line.partition(b':')
        if name.strip().lower() == b'content-length':
            length = int(value)
    while len(body) < length:
        chunk = client.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(head.split()[1]), head, body


def get(client, path='/api/x'):
    client.sendall(b'GET %s HTTP/1.1\r\nHost: gateway\r\n\r\n' % path.encode())
    return read_response(client)


def open_fds(pid='self'):
    return len(os.listdir('/proc/%s/fd' % (pid,)))


# -- a served HTTPProxy ------------------------------------------------------------------------

class API(HTTPProxyCommand):
    group_key = 'api'
    command_key = 'api'
    upstream = None

    def before_request(self):
        self.request['url'] = self.upstream + self.request['path']


class Served:
    """``listen(app, 0, '127.0.0.1', **settings)`` on an IOLoop in a thread."""

    def __init__(self, upstream, **settings):
        API.upstream = upstream.url
        component.add('executor_pool', {'group_key': 'api', 'max_workers': 4})
        component.install()
        self.app = tornado.web.Application([(r'/api/.*', HTTPProxy, dict(command=API))],
                                           log_function=lambda handler: None)
        self.settings = settings
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(WAIT)

    def _run(self):
        asyncio.set_event_loop(asyncio.new_event_loop())
        self.loop = tornado.ioloop.IOLoop.current()
        self.server = listen(self.app, 0, '127.0.0.1', **self.settings)
        self.port = self.server.bound_addresses[0][1]
        self.ready.set()
        self.loop.start()

    def call(self, fn):
        done = threading.Event()
        result = []

        async def run():
            try:
                value = fn()
                if asyncio.iscoroutine(value):
                    value = await value
                result.append(value)
            finally:
                done.set()

        self.loop.add_callback(run)
        assert done.wait(WAIT)
        return result[0] if result else None

    @property
    def connection_count(self):
        return self.call(lambda: self.server.connection_count)

    def stop(self):
        self.call(self.server.stop)
        self.call(self.server.close_all_connections)
        self.loop.add_callback(self.loop.stop)
        self.thread.join(WAIT)


@pytest.fixture
def serve(system_clock):
    made = []
    upstreams = []

    def start(**settings):
        upstreams.append(Upstream())
        made.append(Served(upstreams[-1], **settings))
        made[-1].upstream = upstreams[-1]
        return made[-1]

    yield start
    for served in made:
        served.stop()
    for upstream in upstreams:
        upstream.close()


# -- settings -------------------------------------------------------------------------------

def test_listen_has_nginxs_defaults_and_tells_its_port(serve):
    served = serve()
    assert served.server.settings == ServerSettings(
        client_header_timeout=60.0, client_body_timeout=60.0, keepalive_timeout=75.0,
        max_connections=1024, max_header_size=65536)
    client = connect(served.port)
    assert get(client)[0] == 200
    client.close()


@pytest.mark.parametrize('key, value, expected', [
    ('client_header_timeout', 0, 'greater than 0'),
    ('client_body_timeout', -1, 'greater than 0'),
    ('keepalive_timeout', 'long', 'from 0 to 1000000'),
    ('max_connections', 0, 'whole number from 1'),
    ('max_header_size', 10, 'whole number from 1024'),
])
def test_a_bad_setting_raises_config_error_naming_it(key, value, expected):
    with pytest.raises(ConfigError) as caught:
        GatewayServer(tornado.web.Application(), **{key: value})
    assert '%s=%r' % (key, value) in str(caught.value)
    assert expected in str(caught.value)


def test_tornados_own_timeouts_are_refused_with_the_names_to_use():
    with pytest.raises(TypeError) as caught:
        GatewayServer(tornado.web.Application(), idle_connection_timeout=5)
    assert 'client_header_timeout' in str(caught.value)


# -- slow and idle clients ------------------------------------------------------------------------

def test_a_slow_request_head_is_closed_after_client_header_timeout(serve):
    served = serve(client_header_timeout=1.0)
    client = connect(served.port)
    # A byte every 0.2 s: never a whole head (slowloris).
    elapsed = closed_within(client, 10, trickle=b'GET /api/x HTTP/1.1\r\nX-A: ' + b'a' * 100)
    assert elapsed is not None and 0.9 <= elapsed < 5, elapsed
    assert served.upstream.requests == []
    client.close()


def test_an_idle_keepalive_connection_is_closed_after_keepalive_timeout(serve):
    served = serve(client_header_timeout=10.0, keepalive_timeout=1.5)
    client = connect(served.port)
    assert get(client)[0] == 200
    assert get(client)[0] == 200   # kept alive: a second request on the same connection
    elapsed = closed_within(client, 10)
    # the keep-alive timeout, not the header timeout of 10 s
    assert elapsed is not None and 1.3 <= elapsed < 8, elapsed
    client.close()


def test_keepalive_timeout_0_closes_after_each_response(serve):
    served = serve(keepalive_timeout=0)
    client = connect(served.port)
    status, head, body = get(client)
    assert status == 200 and b'Connection: close' in head
    assert closed_within(client, 5) is not None
    client.close()


def test_a_stalled_body_is_closed_and_not_counted_against_the_upstream(serve):
    served = serve(client_body_timeout=1.0)
    client = connect(served.port)
    client.sendall(b'POST /api/upload HTTP/1.1\r\nHost: gateway\r\nContent-Length: 100\r\n\r\n'
                   + b'x' * 10)
    elapsed = closed_within(client, 10)
    assert elapsed is not None and 0.9 <= elapsed < 5, elapsed
    client.close()
    assert served.upstream.requests == []
    metrics = component.metrics('api')
    assert metrics.rolling_count(Event.FAILURE) == 0
    assert metrics.health().total_requests == 0
    assert not component.circuit_breaker('api').is_open()


def test_a_body_that_keeps_coming_is_not_cut_by_client_body_timeout(serve):
    served = serve(client_body_timeout=1.0)
    client = connect(served.port)
    client.sendall(b'POST /api/upload HTTP/1.1\r\nHost: gateway\r\nContent-Length: 8\r\n\r\n')
    # 8 bytes over about 2.4 s: longer than the timeout in all, never silent that long
    for _ in range(8):
        time.sleep(0.3)
        client.send(b'y')
    status, head, body = read_response(client)
    assert status == 200
    assert served.upstream.paths() == ['/api/upload']
    client.close()


def test_beyond_max_connections_new_ones_get_503_and_open_ones_are_served(serve):
    served = serve(max_connections=3)
    clients = [connect(served.port) for _ in range(3)]
    for client in clients:
        assert get(client)[0] == 200
    extra = connect(served.port)
    status, head, body = read_response(extra)
    assert status == 503 and b'X-Blackgate-Error: too-many-connections' in head
    assert closed_within(extra, 5) is not None
    extra.close()
    for client in clients:
        assert get(client)[0] == 200   # the open ones are still served
    clients[0].close()
    assert eventually(lambda: served.connection_count == 2)
    again = connect(served.port)
    assert get(again)[0] == 200        # room again
    for client in clients[1:] + [again]:
        client.close()


def test_slow_and_idle_clients_leave_no_descriptor_behind(serve):
    served = serve(client_header_timeout=1.0, keepalive_timeout=1.0)
    warm = connect(served.port)
    assert get(warm)[0] == 200   # the upstream connection pool exists before the baseline
    warm.close()
    assert eventually(lambda: served.connection_count == 0)
    baseline = open_fds()
    slow = [connect(served.port) for _ in range(20)]
    idle = [connect(served.port) for _ in range(20)]
    for client in slow:
        client.sendall(b'GET /api/x HTTP/1.1\r\n')
    for client in idle:
        assert get(client)[0] == 200
    assert served.connection_count == 40
    for client in slow + idle:
        assert closed_within(client, 10) is not None
        client.close()
    assert eventually(lambda: served.connection_count == 0)
    assert eventually(lambda: open_fds() <= baseline), (open_fds(), baseline)
