"""The gateway program, run as users run it: a subprocess started from a YAML file.

Each test writes a file, starts ``python -m blackgate.gateway FILE`` on a free
port of 127.0.0.1 (``listen: 127.0.0.1:0``; the program prints where it
listens) in front of upstreams running in this process, and talks HTTP to it.
The helpers here are also used by ``test_gateway_hygiene.py``.
"""
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

#: Real seconds: the longest any wait here lasts before the test fails.
WAIT = 20.0


# -- upstreams -------------------------------------------------------------------------------

class Upstream:
    """An HTTP/1.1 service on a free port that records what it receives.

    ``status`` is what it answers; a path starting with ``/slow`` waits ``slow`` seconds.
    ``gateway_pids`` (set by the test) lets it tell which worker sent each request.
    """

    def __init__(self, name='a'):
        self.name = name
        self.status = 200
        self.slow = 1.5
        self.requests = []          # (path, headers, worker pid or None)
        self.gateway_pids = ()
        self.received = threading.Event()
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = 'HTTP/1.1'

            def do_GET(self):
                length = int(self.headers.get('Content-Length') or 0)
                if length:
                    self.rfile.read(length)
                pid = _pid_of_peer(self.client_address[1], upstream.port,
                                   upstream.gateway_pids) if upstream.gateway_pids else None
                upstream.requests.append((self.path, dict(self.headers), pid))
                upstream.received.set()
                if self.path.startswith('/slow'):
                    time.sleep(upstream.slow)
                body = json.dumps({'upstream': upstream.name, 'path': self.path}).encode()
                try:
                    self.send_response(upstream.status)
                    self.send_header('Content-Type', 'application/json')
                    self.send_header('Content-Length', str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass

            do_POST = do_GET

            def log_message(self, format, *args):
                pass

        self.server = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = 'http://127.0.0.1:%d' % self.port
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def paths(self):
        return [path for path, _, _ in self.requests]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def upstreams():
    made = []

    def make(name='a'):
        made.append(Upstream(name))
        return made[-1]

    yield make
    for upstream in made:
        upstream.close()


def _pid_of_peer(peer_port, upstream_port, pids):
    """Which of ``pids`` owns the socket 127.0.0.1:peer_port -> :upstream_port (Linux /proc)."""
    wanted = ':%04X' % peer_port
    inode = None
    for table in ('/proc/net/tcp', '/proc/net/tcp6'):
        try:
            with open(table) as lines:
                next(lines)
                for line in lines:
                    fields = line.split()
                    if fields[1].endswith(wanted) and fields[2].endswith(':%04X' % upstream_port):
                        inode = fields[9]
        except OSError:
            continue
    if inode is None:
        return None
    target = 'socket:[%s]' % inode
    for pid in pids:
        try:
            for fd in os.listdir('/proc/%d/fd' % pid):
                try:
                    if os.readlink('/proc/%d/fd/%s' % (pid, fd)) == target:
                        return pid
                except OSError:
                    continue
        except OSError:
            continue
    return None


# -- the program ----------------------------------------------------------------------------

class Gateway:
    """``python -m blackgate.gateway FILE`` as a subprocess, its output collected as it comes."""

    def __init__(self, path, *args):
        self.path = path
        self.stdout, self.stderr = [], []
        env = dict(os.environ, PYTHONUNBUFFERED='1')
        self.process = subprocess.Popen(
            [sys.executable, '-m', 'blackgate.gateway', str(path)] + list(args),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env)
        self._readers = [threading.Thread(target=self._read, args=(stream, lines), daemon=True)
                         for stream, lines in ((self.process.stdout, self.stdout),
                                               (self.process.stderr, self.stderr))]
        for reader in self._readers:
            reader.start()
        self.url = self.host = self.port = None

    def _read(self, stream, lines):
        for line in iter(stream.readline, b''):
            lines.append(line.decode('utf-8', 'replace').rstrip('\n'))
        stream.close()

    def wait_for(self, pattern, lines=None, count=1, timeout=WAIT):
        """The first ``count`` lines matching ``pattern`` (a regex), waiting for them."""
        lines = self.stderr if lines is None else lines
        deadline = time.monotonic() + timeout
        while True:
            found = [line for line in list(lines) if re.search(pattern, line)]
            if len(found) >= count:
                return found
            if time.monotonic() > deadline or self.process.poll() is not None and \
                    not any(reader.is_alive() for reader in self._readers):
                raise AssertionError('no %d line(s) matching %r; stdout:\n%s\nstderr:\n%s'
                                     % (count, pattern, '\n'.join(self.stdout),
                                        '\n'.join(self.stderr)))
            time.sleep(0.02)

    def start(self, processes=1):
        line = self.wait_for(r'listening on http://', self.stdout)[0]
        self.url = re.search(r'http://\S+', line).group()
        self.host, port = self.url[len('http://'):].rsplit(':', 1)
        self.port = int(port)
        self.wait_for(r'worker \d+ serving', count=processes)
        return self

    def worker_pids(self):
        return [int(re.search(r'started worker (\d+)', line).group(1))
                for line in self.wait_for(r'started worker \d+')]

    def request(self, method, path, body=None, headers=None, timeout=10):
        connection = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    def get(self, path, **kwargs):
        return self.request('GET', path, **kwargs)

    def signal(self, signum):
        self.process.send_signal(signum)

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(WAIT)
        for reader in self._readers:
            reader.join(WAIT)
        return self.process.returncode


@pytest.fixture
def gateway(tmp_path):
    """``gateway(yaml_text, *args, processes=1)``: a started program; stopped at teardown."""
    started = []

    def start(text, *args, processes=1, name='gateway.yaml'):
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        started.append(Gateway(path, *args))
        return started[-1].start(processes)

    yield start
    for program in started:
        program.stop()


def alive(pid):
    """Whether ``pid`` still runs (a zombie, exited but not yet reaped, does not)."""
    try:
        with open('/proc/%d/stat' % pid) as stat:
            return stat.read().rpartition(')')[2].split()[0] != 'Z'
    except OSError:
        return False


def eventually(condition, timeout=WAIT, pause=0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            return value
        time.sleep(pause)


# -- routing ----------------------------------------------------------------------------------

def test_requests_are_routed_by_the_longest_prefix_with_the_prefix_stripped(gateway, upstreams):
    users, api, legacy = upstreams('users'), upstreams('api'), upstreams('legacy')
    program = gateway('''
        listen: 127.0.0.1:0
        routes:
          - prefix: /api
            upstream: %s
          - prefix: /api/users/
            upstream: %s/base
          - prefix: /old
            upstream: %s
            rewrite_prefix: /v2
          - prefix: /keep
            upstream: %s
            strip_prefix: false
    ''' % (api.url, users.url, legacy.url, legacy.url))
    assert program.get('/api/users/42?fields=a&fields=')[0] == 200
    assert program.get('/api/users')[0] == 200
    assert program.get('/api/orders/7')[0] == 200
    assert program.get('/api/usersX')[0] == 200       # not under /api/users: /api's
    assert program.get('/old/items/1')[0] == 200
    assert program.get('/keep/me')[0] == 200
    assert users.paths() == ['/base/42?fields=a&fields=', '/base/']
    assert api.paths() == ['/orders/7', '/usersX']
    assert legacy.paths() == ['/v2/items/1', '/keep/me']
    status, headers, body = program.get('/nowhere')
    assert status == 404


def test_a_dot_segment_cannot_leave_the_routes_prefix(gateway, upstreams):
    users = upstreams()
    program = gateway('''
        listen: 127.0.0.1:0
        routes:
          - {prefix: /users, upstream: "%s/users"}
    ''' % (users.url,))
    for path in ('/users/../admin', '/users/%2e%2E/admin', '/users/./x'):
        status, headers, body = program.get(path)
        assert status == 400, path
    assert users.requests == []


def test_both_workers_serve(gateway, upstreams):
    upstream = upstreams()
    program = gateway('''
        listen: 127.0.0.1:0
        processes: 2
        access_log: off
        routes:
          - {prefix: /svc, upstream: "%s"}
    ''' % (upstream.url,), processes=2)
    pids = program.worker_pids()
    assert len(set(pids)) == 2
    upstream.gateway_pids = pids

    def both_seen():
        # Many at once: the kernel hands the new connections to whichever worker accepts.
        threads = [threading.Thread(target=program.get, args=('/svc/x',)) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT)
        return {pid for _, _, pid in upstream.requests} >= set(pids)

    assert eventually(both_seen, pause=0), {pid for _, _, pid in upstream.requests}


def test_health_dashboard_stream_and_metrics_are_mounted(gateway, upstreams):
    upstream = upstreams()
    program = gateway('''
        listen: 127.0.0.1:0
        routes:
          - {prefix: /svc, upstream: "%s", command_key: svc}
    ''' % (upstream.url,))
    status, headers, body = program.get('/blackgate/health')
    assert status == 200 and json.loads(body)['status'] == 'ok'
    assert program.get('/svc/1')[0] == 200
    status, headers, body = program.get('/blackgate/')
    assert status == 200 and headers['Content-Type'].startswith('text/html')
    connection = http.client.HTTPConnection(program.host, program.port, timeout=10)
    connection.request('GET', '/blackgate/hystrix.stream?delay=50')
    response = connection.getresponse()
    assert response.status == 200
    assert response.getheader('Content-Type').startswith('text/event-stream')
    first = response.readline()   # http.client undoes the chunked framing
    assert first.startswith((b'data:', b'ping:')), first
    connection.close()
    status, headers, body = program.get('/metrics')
    assert status == 200
    assert b'blackgate_command_calls_total{command="svc",group="svc",kind="successful"} 1.0' \
        in body, body


def test_a_routes_breaker_opens_and_answers_503(gateway, upstreams):
    upstream = upstreams()
    upstream.status = 500
    program = gateway('''
        listen: 127.0.0.1:0
        processes: 2
        access_log: off
        routes:
          - prefix: /flaky
            upstream: %s
            circuit_breaker_request_volume_threshold: 4
            circuit_breaker_sleep_window: 60
            metrics_health_snapshot_interval: 0
    ''' % (upstream.url,), processes=2)
    statuses = []
    in_a_row = 0
    for _ in range(300):
        status, headers, body = program.get('/flaky/x')
        statuses.append(status)
        if status == 503:
            assert headers['X-Blackgate-Error'] == 'short-circuited'
            assert headers['Retry-After'] == '60'
            assert json.loads(body)['failure_type'] == 'SHORTCIRCUIT'
            in_a_row += 1
            if in_a_row == 10:
                break
        else:
            assert status == 500   # the upstream's own answer, until the breaker opens
            in_a_row = 0
    assert in_a_row == 10, statuses
    # Each worker has its own breaker: at most 4 failures each reached the upstream.
    assert len(upstream.requests) <= 8


def test_a_route_fallback_answers_when_the_upstream_is_down(gateway, upstreams):
    upstream = upstreams()
    url = upstream.url
    upstream.close()
    program = gateway('''
        listen: 127.0.0.1:0
        routes:
          - prefix: /cached
            upstream: %s
            fallback:
              status: 200
              headers: {Content-Type: application/json, Warning: '110 - "stale"'}
              body: '{"items": []}'
          - {prefix: /plain, upstream: "%s"}
    ''' % (url, url))
    status, headers, body = program.get('/cached/items')
    assert (status, headers['Warning'], body) == (200, '110 - "stale"', b'{"items": []}')
    status, headers, body = program.get('/plain/items')
    assert status == 502 and headers['X-Blackgate-Error'] == 'bad-gateway'
    assert url.encode() not in body


def test_json_access_log_names_the_worker_and_route(gateway, upstreams):
    upstream = upstreams()
    program = gateway('''
        listen: 127.0.0.1:0
        access_log: json
        routes:
          - {prefix: /svc, upstream: "%s", command_key: svc}
    ''' % (upstream.url,))
    program.get('/svc/a?b=1')
    line = program.wait_for(r'"uri":"/svc/a\?b=1"', program.stdout)[0]
    record = json.loads(line)
    assert record['status'] == 200 and record['route'] == 'svc' and record['method'] == 'GET'
    assert record['pid'] in program.worker_pids()


# -- bad files ---------------------------------------------------------------------------------

GOOD_ROUTE = '{prefix: /a, upstream: "http://127.0.0.1:9000"}'


@pytest.mark.parametrize('text, message', [
    ('listen: 127.0.0.1:0\nroutes: [%s]\ntimeout: 1\n' % GOOD_ROUTE,
     r'\(top level\)\.timeout|timeout: unknown key'),
    ('routes:\n  - {prefix: /a, upstream: "http://127.0.0.1:9000", timout: 1}\n',
     r"routes\[0\]\.timout: unknown key \(did you mean 'timeout'\?\)"),
    ('processes: two\nroutes: [%s]\n' % GOOD_ROUTE,
     r"processes: 'two' is not allowed; expected a whole number"),
    ('routes:\n  - %s\n  - {prefix: /b, upstream: "http://127.0.0.1:9000", timeout: -1}\n'
     % GOOD_ROUTE, r'routes\[1\]\.timeout: -1 is out of range; expected a number greater than 0'),
    ('routes:\n  - {prefix: /a, upstream: "ftp://files.internal"}\n',
     r"routes\[0\]\.upstream: 'ftp://files.internal' is not a URL the gateway can call"),
    ('routes:\n  - {prefix: /a, upstream: "http://127.0.0.1:99999"}\n',
     r'routes\[0\]\.upstream: .* is not a URL'),
    ('routes:\n  - %s\n  - {prefix: /a/, upstream: "http://127.0.0.1:9001"}\n' % GOOD_ROUTE,
     r"routes\[1\]\.prefix: '/a' is the prefix of routes\[0\] too"),
    ('routes:\n  - {prefix: /a, upstream: "http://127.0.0.1:9000", group_key: apii}\n'
     'pools: [{group_key: api}]\n',
     r"routes\[0\]\.group_key: 'apii' has no entry in pools \(did you mean 'api'\?\)"),
    ('client_header_timeout: 0\nroutes: [%s]\n' % GOOD_ROUTE,
     r'client_header_timeout: 0 is not allowed; expected a number of seconds greater than 0'),
    ('routes: [%s]\nroutes: []\n' % GOOD_ROUTE, r"line 2, column 1: key 'routes' is given twice"),
    ('routes: [%s\n' % GOOD_ROUTE, r'line \d+, column \d+: '),
    ('listen: 127.0.0.1:0\n', r'routes: missing'),
    ('routes:\n  - {prefix: /a, upstream: "http://127.0.0.1:9000", body_idle_timeout: -1}\n',
     r'routes\[0\]\.body_idle_timeout: -1 is not allowed; expected seconds above 0'),
    ('routes:\n  - {prefix: /a, upstream: "http://127.0.0.1:9000", buffer_body: 1}\n',
     r'routes\[0\]\.buffer_body: 1 is not allowed; expected true or false'),
    ('routes:\n  - {prefix: /blackgate, upstream: "http://127.0.0.1:9000"}\n',
     r"routes\[0\]\.prefix: '/blackgate' overlaps observability\.dashboard"),
    ('state_store: {backend: redis, url: "localhost:6379"}\nroutes: [%s]\n' % GOOD_ROUTE,
     r"state_store: url='localhost:6379' is not a Redis URL"),
    ('state_store: {backend: redis, url: "redis://127.0.0.1:notaport/0"}\nroutes: [%s]\n'
     % GOOD_ROUTE, r"state_store\.url: 'redis://127.0.0.1:notaport/0': Port could not be cast"),
    ('routes:\n  - {prefix: /a, upstream: "http://127.0.0.1:9000", fallback: {body: x}}\n',
     r'routes\[0\]\.fallback\.status: missing'),
    ('command_defaults: {group_key: api}\nroutes: [%s]\n' % GOOD_ROUTE,
     r'command_defaults\.group_key: a route without a group_key gets a pool of its own'),
    ('command_defaults: {circuit_breaker_error_threshold_percentage: 150}\nroutes: [%s]\n'
     % GOOD_ROUTE, r'command_defaults\.circuit_breaker_error_threshold_percentage: 150 is out '
                   r'of range; expected a number from 0 to 100'),
    ('routes:\n  - {prefix: /a, upstream: "http://127.0.0.1:9000", '
     'metrics_rolling_window: 1, metrics_rolling_buckets: 5000}\n',
     r'routes\[0\]: metrics_rolling_window=1 split into metrics_rolling_buckets=5000'),
])
def test_a_bad_file_exits_non_zero_with_one_line_naming_file_and_key(tmp_path, text, message):
    path = tmp_path / 'bad.yaml'
    path.write_text(text)
    result = subprocess.run([sys.executable, '-m', 'blackgate.gateway', str(path)],
                            capture_output=True, text=True, timeout=WAIT)
    assert result.returncode == 2, result
    assert result.stdout == ''   # nothing listened
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert 'Traceback' not in result.stderr
    assert lines[0].startswith('blackgate-gateway: %s: ' % (path,)), lines[0]
    assert re.search(message, lines[0]), lines[0]


def test_check_validates_without_listening(tmp_path):
    path = tmp_path / 'good.yaml'
    path.write_text('listen: 127.0.0.1:1\nroutes: [%s]\n' % GOOD_ROUTE)
    result = subprocess.run([sys.executable, '-m', 'blackgate.gateway', '--check', str(path)],
                            capture_output=True, text=True, timeout=WAIT)
    assert (result.returncode, result.stderr) == (0, '')
    assert 'is valid: 1 route(s)' in result.stdout


def test_a_missing_file_is_one_line_too(tmp_path):
    path = tmp_path / 'absent.yaml'
    result = subprocess.run([sys.executable, '-m', 'blackgate.gateway', str(path)],
                            capture_output=True, text=True, timeout=WAIT)
    assert result.returncode == 2
    assert result.stderr.strip() == ('blackgate-gateway: %s: cannot read it: No such file or '
                                     'directory' % (path,))


# -- reload, drain, restart ----------------------------------------------------------------------

ROUTE_TO = '''
    listen: 127.0.0.1:0
    processes: 2
    access_log: off
    drain_timeout: 10
    routes:
      - {prefix: /svc, upstream: "%s", timeout: 5}
'''


def test_sighup_moves_traffic_to_a_new_upstream_without_a_failed_request(gateway, upstreams):
    old, new = upstreams('old'), upstreams('new')
    program = gateway(ROUTE_TO % (old.url,), processes=2)
    results = []
    stop = threading.Event()

    def client(keep_alive):
        connection = None
        while not stop.is_set():
            try:
                if connection is None or not keep_alive:
                    connection = http.client.HTTPConnection(program.host, program.port,
                                                            timeout=10)
                connection.request('GET', '/svc/x')
                response = connection.getresponse()
                results.append((response.status, json.loads(response.read())['upstream']))
            except Exception as exc:   # a failed request is what the test looks for
                results.append((type(exc).__name__, None))
                connection = None
            if not keep_alive and connection is not None:
                connection.close()

    clients = [threading.Thread(target=client, args=(keep,), daemon=True)
               for keep in (True, False)]
    for thread in clients:
        thread.start()
    assert eventually(lambda: len(results) > 20)
    program.path.write_text(textwrap.dedent(ROUTE_TO % (new.url,)))
    sent = time.monotonic()
    program.signal(signal.SIGHUP)
    assert eventually(lambda: new.requests)
    program.wait_for(r'reloaded .*generation 2', count=2)
    moved = time.monotonic() - sent
    count = len(results)
    assert eventually(lambda: len(results) > count + 20)
    stop.set()
    for thread in clients:
        thread.join(WAIT)
    assert moved < 2.0
    assert {status for status, _ in results} == {200}, [r for r in results if r[0] != 200]
    # Once both workers reloaded, nothing new goes to the old upstream (each client may
    # have had one request in flight, which finishes under the old configuration).
    tail = results[count + len(clients):]
    assert {name for _, name in tail} == {'new'}


def test_sighup_with_a_broken_file_keeps_the_old_configuration(gateway, upstreams):
    old = upstreams('old')
    program = gateway(ROUTE_TO % (old.url,), processes=2)
    program.path.write_text('routes:\n  - {prefix: /svc, upstream: "http://127.0.0.1:9000", '
                            'timeout: -1}\n')
    program.signal(signal.SIGHUP)
    line = program.wait_for(r'keeping the running configuration')[0]
    assert 'routes[0].timeout: -1 is out of range' in line
    for _ in range(6):
        status, headers, body = program.get('/svc/y')
        assert status == 200 and json.loads(body)['upstream'] == 'old'


def test_sigterm_drains_an_in_flight_request_and_exits_0(gateway, upstreams):
    upstream = upstreams()
    upstream.slow = 1.5
    program = gateway(ROUTE_TO % (upstream.url,), processes=2)
    pids = program.worker_pids()
    answer = []
    thread = threading.Thread(target=lambda: answer.append(program.get('/svc/slow')))
    thread.start()
    assert upstream.received.wait(WAIT)
    program.signal(signal.SIGTERM)
    thread.join(WAIT)
    assert program.process.wait(WAIT) == 0
    assert answer and answer[0][0] == 200, answer
    assert json.loads(answer[0][2])['path'] == '/slow'
    assert not [pid for pid in pids if alive(pid)]
    with pytest.raises(OSError):   # nobody listens any more
        socket.create_connection((program.host, program.port), timeout=2).close()


def test_workers_drain_and_exit_when_the_supervisor_is_killed(gateway, upstreams):
    upstream = upstreams()
    program = gateway(ROUTE_TO % (upstream.url,), processes=2)
    pids = program.worker_pids()
    program.process.kill()   # SIGKILL: no SIGTERM reaches the workers
    program.process.wait(WAIT)
    assert eventually(lambda: not [pid for pid in pids if alive(pid)])


def test_a_worker_that_dies_is_replaced(gateway, upstreams):
    upstream = upstreams()
    program = gateway(ROUTE_TO % (upstream.url,), processes=2)
    first = program.worker_pids()
    os.kill(first[0], signal.SIGKILL)
    program.wait_for(r'worker %d exited with -9; starting another' % first[0])
    program.wait_for(r'worker \d+ serving', count=3)
    replacement = set(program.worker_pids()) - set(first)
    assert len(replacement) == 1
    for _ in range(6):
        assert program.get('/svc/z')[0] == 200
    assert program.stop() == 0
    assert not [pid for pid in program.worker_pids() if alive(pid)]


def test_a_routes_streaming_keys_become_its_commands_attributes(tmp_path):
    from blackgate.gateway import _route_command, load_config
    path = tmp_path / 'gateway.yaml'
    path.write_text('routes:\n'
                    '  - {prefix: /files, upstream: "http://127.0.0.1:9000", buffer_body: true,\n'
                    '     body_idle_timeout: 30, max_response_body_size: 1024}\n'
                    '  - {prefix: /live, upstream: "http://127.0.0.1:9001", websocket: true}\n')
    config = load_config(str(path))
    files, live = (_route_command(route) for route in sorted(config.routes,
                                                             key=lambda r: r.prefix))
    assert (files.buffer_body, files.body_idle_timeout, files.max_response_body_size) == \
        (True, 30, 1024)
    assert live.buffer_body is False and live.body_idle_timeout is None


def test_a_routes_rejections_do_not_count_for_its_breaker_unless_the_file_says_so(tmp_path):
    from blackgate import ConfigError
    from blackgate.gateway import load_config
    path = tmp_path / 'gateway.yaml'
    path.write_text('routes:\n'
                    '  - {prefix: /a, upstream: "http://127.0.0.1:9000"}\n'
                    '  - {prefix: /b, upstream: "http://127.0.0.1:9001",\n'
                    '     circuit_breaker_count_rejections: true}\n')
    routes = {route.prefix: dict(route.settings) for route in load_config(str(path)).routes}
    assert routes['/a']['circuit_breaker_count_rejections'] is False
    assert routes['/b']['circuit_breaker_count_rejections'] is True
    path.write_text('command_defaults: {circuit_breaker_count_rejections: true}\n'
                    'routes:\n  - {prefix: /a, upstream: "http://127.0.0.1:9000"}\n')
    (route,) = load_config(str(path)).routes
    assert dict(route.settings)['circuit_breaker_count_rejections'] is True
    path.write_text('routes:\n  - {prefix: /a, upstream: "http://127.0.0.1:9000",\n'
                    '     circuit_breaker_count_rejections: 1}\n')
    with pytest.raises(ConfigError, match='circuit_breaker_count_rejections'):
        load_config(str(path))
