"""The gateway program in fleet mode: its workers share one breaker through a real redis-server."""
import json
import os
import shutil

import pytest

from test_gateway import gateway, upstreams  # noqa: F401  (fixtures)


@pytest.fixture
def redis_url():
    if shutil.which('redis-server') is None:
        if os.environ.get('CI'):
            pytest.fail('redis-server is missing: .ci/run installs it from Debian packages')
        pytest.skip('redis-server is not installed (apt-get install redis-server)')
    from test_fleet import RedisServer
    server = RedisServer()
    server.start()
    server.client().flushall()
    yield server
    server.stop()


def test_two_workers_trip_one_shared_breaker(gateway, upstreams, redis_url):
    upstream = upstreams()
    upstream.status = 500
    program = gateway('''
        listen: 127.0.0.1:0
        processes: 2
        access_log: json
        state_store: {backend: redis, url: "%s", prefix: gw, interval: 0.05}
        routes:
          - prefix: /down
            upstream: %s
            command_key: down
            circuit_breaker_request_volume_threshold: 10
            circuit_breaker_sleep_window: 60
            metrics_health_snapshot_interval: 0.05
    ''' % (redis_url.url, upstream.url), processes=2)
    pids = set(program.worker_pids())
    assert len(pids) == 2
    short_circuited_by = set()
    for _ in range(400):
        status, headers, body = program.get('/down/x')
        if status == 503 and headers.get('X-Blackgate-Error') == 'short-circuited':
            lines = [json.loads(line) for line in list(program.stdout) if line.startswith('{')]
            short_circuited_by = {line['pid'] for line in lines if line['status'] == 503}
            if short_circuited_by == pids:
                break
    assert short_circuited_by == pids
    assert redis_url.client().hget('gw:down:state', 'state') == b'open'
    # Alone, each worker's breaker needs 10 failures: 20 in all. Shared, the counts of
    # both make the 10 (a few more may pass while the workers learn it from Redis).
    assert len(upstream.requests) < 20, len(upstream.requests)
