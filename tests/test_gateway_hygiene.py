"""The gateway program's connection hygiene keys, over real sockets (issue 21).

The same behaviours as ``test_server.py``, through a YAML file and the
program's worker process: small timeouts (1-2 s), one worker, and its file
descriptors read from /proc.
"""
import re

from test_gateway import eventually, gateway, upstreams  # noqa: F401  (fixtures)
from test_server import closed_within, connect, get, open_fds, read_response

HYGIENE = '''
    listen: 127.0.0.1:0
    access_log: off
    client_header_timeout: 1
    keepalive_timeout: 2
    client_body_timeout: 1
    max_connections: 4
    routes:
      - {prefix: /api, upstream: "%s", command_key: api}
'''


def test_slow_head_idle_keepalive_and_stalled_body_are_closed(gateway, upstreams):
    upstream = upstreams()
    program = gateway(HYGIENE % (upstream.url,))
    worker = program.worker_pids()[0]
    warm = connect(program.port)
    assert get(warm)[0] == 200
    warm.close()
    baseline = open_fds(worker)

    slow = connect(program.port)
    elapsed = closed_within(slow, 10, trickle=b'GET /api/x HTTP/1.1\r\nX-A: ' + b'a' * 100)
    assert elapsed is not None and 0.9 <= elapsed < 5, elapsed
    slow.close()

    idle = connect(program.port)
    assert get(idle)[0] == 200
    elapsed = closed_within(idle, 10)
    assert elapsed is not None and 1.8 <= elapsed < 6, elapsed
    idle.close()

    stalled = connect(program.port)
    stalled.sendall(b'POST /api/upload HTTP/1.1\r\nHost: g\r\nContent-Length: 50\r\n\r\nabc')
    elapsed = closed_within(stalled, 10)
    assert elapsed is not None and 0.9 <= elapsed < 5, elapsed
    stalled.close()
    assert upstream.paths() == ['/x', '/x']   # the stalled body never went upstream
    status, headers, body = program.get('/metrics')
    assert re.search(rb'blackgate_command_calls_total\{command="api",group="api",'
                     rb'kind="successful"\}', body)
    failures = re.search(rb'blackgate_command_calls_total\{command="api",group="api",'
                         rb'kind="failed"\} (\S+)', body)
    assert failures is None or float(failures.group(1)) == 0, failures   # not the upstream's fault

    assert eventually(lambda: open_fds(worker) <= baseline), (open_fds(worker), baseline)


def test_max_connections_refuses_the_excess_and_serves_the_rest(gateway, upstreams):
    upstream = upstreams()
    program = gateway(HYGIENE % (upstream.url,))
    worker = program.worker_pids()[0]
    warm = connect(program.port)
    assert get(warm)[0] == 200   # the upstream connection exists before the baseline
    warm.close()
    assert eventually(lambda: open_fds(worker) == open_fds(worker))
    baseline = open_fds(worker)
    clients = [connect(program.port) for _ in range(4)]
    for client in clients:
        assert get(client)[0] == 200
    extra = connect(program.port)
    status, head, body = read_response(extra)
    assert status == 503 and b'too-many-connections' in head
    extra.close()
    program.wait_for(r'refused 1 connection\(s\): max_connections=4 are open')
    for client in clients:
        assert get(client)[0] == 200
    for client in clients:
        client.close()
    assert eventually(lambda: open_fds(worker) <= baseline), (open_fds(worker), baseline)
