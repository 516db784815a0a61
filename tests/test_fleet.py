"""Fleet mode: breakers and rolling counts shared through a real redis-server on 127.0.0.1."""
import json
import logging
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time

import pytest
import redis

from blackgate import BreakerState, Command, ConfigError, Event, component

WORKER = pathlib.Path(__file__).resolve().parent / 'fleet_worker.py'
WAIT = 20.0


class RedisServer:
    """A throw-away redis-server on a free port of 127.0.0.1, with no persistence."""

    def __init__(self):
        with socket.socket() as probe:
            probe.bind(('127.0.0.1', 0))
            self.port = probe.getsockname()[1]
        self.url = 'redis://127.0.0.1:%d/0' % self.port
        self.process = None

    def start(self):
        self.process = subprocess.Popen(
            ['redis-server', '--port', str(self.port), '--bind', '127.0.0.1', '--save', '',
             '--appendonly', 'no'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = self.client()
        deadline = time.monotonic() + WAIT
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError('redis-server did not start on port %d' % self.port)
                time.sleep(0.02)

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(WAIT)

    def client(self):
        return redis.Redis(host='127.0.0.1', port=self.port, socket_timeout=5)


@pytest.fixture
def redis_server():
    if shutil.which('redis-server') is None:
        if os.environ.get('CI'):
            pytest.fail('redis-server is missing: .ci/run installs it from Debian packages')
        pytest.skip('redis-server is not installed (apt-get install redis-server)')
    server = RedisServer()
    server.start()
    yield server
    component.reset()   # stops the store's thread before the server goes
    server.stop()


def use_store(server, prefix='t', **extra):
    component.set('state_store', dict({'backend': 'redis', 'url': server.url,
                                       'prefix': prefix}, **extra))
    component.install()


def eventually(condition, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


class Down(Command):
    command_key = 'down'
    circuit_breaker_request_volume_threshold = 10
    metrics_health_snapshot_interval = 0.05
    circuit_breaker_sleep_window = 30.0

    def run(self):
        raise ConnectionError('upstream down')

    def fallback(self):
        return 'stale'


@pytest.fixture
def real_time(system_clock):
    """The store speaks to another process: it runs on real time."""
    return system_clock


# -- configuration -------------------------------------------------------------------------

@pytest.mark.parametrize('value, message', [
    (['redis'], 'expected a dict'),
    ({'backend': 'memcached', 'url': 'x'}, "expected 'redis'"),
    ({'backend': 'redis'}, "url=None"),
    ({'backend': 'redis', 'url': 'redis://x', 'prefx': 'a'}, "unknown key 'prefx'"),
    ({'backend': 'redis', 'url': 'redis://x', 'interval': 0}, 'interval=0 is out of range'),
    ({'backend': 'redis', 'url': 'localhost:6379'}, 'is not a Redis URL'),
])
def test_bad_state_store_settings_raise_config_error(value, message):
    with pytest.raises(ConfigError) as caught:
        component.set('state_store', value)
    assert message in str(caught.value)


# -- sharing -------------------------------------------------------------------------------

def test_counts_from_other_processes_trip_this_processs_breaker(redis_server, real_time):
    use_store(redis_server)
    for _ in range(4):
        Down().execute()   # alone, 4 of the 10 requests the breaker needs
    client = redis_server.client()
    bucket = int(time.time() // 1.0)   # 10 s window / 10 buckets
    client.hincrby('t:down:c:0:%d' % bucket, 'FAILURE', 6)   # what the rest of the fleet saw
    assert eventually(lambda: component.circuit_breaker('down').state is BreakerState.OPEN)
    assert client.hget('t:down:state', 'state') == b'open'
    command = Down()
    command.execute()
    assert command.events == (Event.SHORT_CIRCUITED, Event.FALLBACK_SUCCESS)


def test_the_fleet_leaves_rejections_out_where_the_command_says_so(redis_server, real_time):
    class Crowded(Command):
        command_key = 'crowded'
        circuit_breaker_request_volume_threshold = 10
        circuit_breaker_count_rejections = False
        metrics_health_snapshot_interval = 0.05

        def run(self):
            return 'fine'

    use_store(redis_server)
    for _ in range(4):
        Crowded().execute()
    client = redis_server.client()
    bucket = int(time.time() // 1.0)
    # the rest of the fleet: full bulkheads, a healthy upstream
    client.hincrby('t:crowded:c:0:%d' % bucket, 'THREAD_POOL_REJECTED', 50)
    client.hincrby('t:crowded:c:0:%d' % bucket, 'SUCCESS', 6)
    time.sleep(0.5)   # several syncs
    Crowded().execute()
    assert component.circuit_breaker('crowded').state is BreakerState.CLOSED
    assert client.hget('t:crowded:state', 'state') in (None, b'closed')


def test_an_open_breaker_in_redis_is_adopted_within_an_interval(redis_server, real_time):
    use_store(redis_server)
    Down().execute()
    client = redis_server.client()
    client.hset('t:down:state', mapping={'state': 'open', 'opened_at': time.time(),
                                         'generation': 0})
    assert eventually(lambda: component.circuit_breaker('down').is_open(), timeout=2.0)


def test_while_another_process_holds_the_trial_this_one_is_short_circuited(
        redis_server, real_time):
    use_store(redis_server)
    Down().execute()
    client = redis_server.client()
    client.hset('t:down:state', mapping={'state': 'half_open', 'opened_at': time.time() - 60,
                                         'trial_at': time.time(), 'generation': 0})
    assert eventually(lambda: component.circuit_breaker('down').is_open())
    time.sleep(0.3)   # several syncs: each claims the trial and loses it
    command = Down()
    command.execute()
    assert command.events == (Event.SHORT_CIRCUITED, Event.FALLBACK_SUCCESS)


def test_the_process_that_wins_the_claim_sends_the_one_trial(redis_server, real_time):
    use_store(redis_server)
    Down().execute()
    client = redis_server.client()
    client.hset('t:down:state', mapping={'state': 'open', 'opened_at': time.time() - 60,
                                         'generation': 0})
    assert eventually(lambda: client.hget('t:down:state', 'state') == b'half_open')
    command = Down()     # the store's thread won the claim: the next request is the trial
    command.execute()
    assert command.events == (Event.FAILURE, Event.FALLBACK_SUCCESS)
    assert eventually(lambda: client.hget('t:down:state', 'state') == b'open')  # re-opened
    second = Down()
    second.execute()
    assert second.events == (Event.SHORT_CIRCUITED, Event.FALLBACK_SUCCESS)


def test_reset_closes_the_breaker_for_the_whole_fleet(redis_server, real_time):
    use_store(redis_server)
    Down().execute()
    client = redis_server.client()
    client.hset('t:down:state', mapping={'state': 'open', 'opened_at': time.time(),
                                         'generation': 0})
    assert eventually(lambda: component.circuit_breaker('down').is_open())
    component.circuit_breaker('down').reset()
    assert eventually(lambda: client.hget('t:down:state', 'state') == b'closed')
    assert client.hget('t:down:state', 'generation') == b'1'   # the old counts are left behind
    time.sleep(0.3)
    assert component.circuit_breaker('down').state is BreakerState.CLOSED


def test_the_hot_path_does_not_wait_on_redis(redis_server, real_time):
    use_store(redis_server, interval=1.0)

    class Fine(Command):
        def run(self):
            return 'fresh'

    Fine().execute()
    client = redis_server.client()
    before = int(client.info('stats')['total_commands_processed'])
    started = time.monotonic()
    for _ in range(500):
        Fine().execute()
    elapsed = time.monotonic() - started
    sent = int(client.info('stats')['total_commands_processed']) - before - 1
    syncs = int(elapsed / 1.0) + 2
    assert sent <= syncs * 20, 'the store sent %d commands for 500 calls' % sent


def test_keys_expire_on_their_own(redis_server, real_time):
    use_store(redis_server)
    for _ in range(10):
        Down().execute()
    client = redis_server.client()
    assert eventually(lambda: client.exists('t:down:state'))
    assert eventually(lambda: client.keys('t:down:c:*'))
    for key in client.keys('t:down:*'):
        assert 0 < client.ttl(key) <= 4 * (30 + 10) + 60, key


def test_commands_keep_working_on_local_breakers_while_redis_is_down_and_share_again_after(
        redis_server, real_time, caplog):
    caplog.set_level(logging.INFO, logger='blackgate')
    use_store(redis_server)
    Down().execute()
    redis_server.stop()
    answers = []

    def traffic_until_open():
        answers.append(Down().execute())
        return component.circuit_breaker('down').is_open()

    assert eventually(traffic_until_open)                 # the local breaker trips on its own
    assert set(answers) == {'stale'}                      # no command failed because Redis did
    unreachable = [r for r in caplog.records if 'unreachable' in r.getMessage()]
    assert len(unreachable) == 1                          # logged once
    redis_server.start()
    component.circuit_breaker('down').reset()
    Down().execute()
    assert eventually(lambda: any('answers again' in r.getMessage() for r in caplog.records))
    client = redis_server.client()
    assert eventually(lambda: client.keys('t:down:c:*'))  # counts shared again


# -- the fleet -----------------------------------------------------------------------------

def test_eight_processes_share_one_breaker(redis_server, real_time):
    """Done-when 2: merged threshold -> all short-circuit within an interval; one trial; recovery."""
    sys.path.insert(0, str(WORKER.parent))
    try:
        import fleet_worker
    finally:
        sys.path.pop(0)
    interval, sleep_window = fleet_worker.INTERVAL, fleet_worker.SLEEP_WINDOW
    client = redis_server.client()
    prefix = 'fleet'
    client.set(prefix + ':test:up', '0')
    processes = [subprocess.Popen([sys.executable, str(WORKER), redis_server.url, prefix, str(i)],
                                  stderr=subprocess.DEVNULL)
                 for i in range(8)]
    try:
        assert eventually(lambda: int(client.get(prefix + ':test:ready') or 0) == 8, 90)
        go = time.time()
        client.set(prefix + ':test:go', '1')
        state_key = prefix + ':fleet_upstream:state'
        assert eventually(lambda: client.hget(state_key, 'state') == b'open')
        opened_at = float(client.hget(state_key, 'opened_at'))
        time.sleep(interval + 0.3)                       # let every process adopt it
        hits_before = int(client.get(prefix + ':test:hits'))
        time.sleep(opened_at + sleep_window + 1.0 - time.time())
        hits_after_window = int(client.get(prefix + ':test:hits'))
        client.set(prefix + ':test:up', '1')             # the upstream heals
        assert eventually(lambda: client.hget(state_key, 'state') == b'closed',
                          2 * sleep_window + 5)
        closed_at = time.time()
        time.sleep(interval + 1.0)
        client.set(prefix + ':test:stop', '1')
        for process in processes:
            process.wait(WAIT)
        results = [json.loads(item) for item in client.lrange(prefix + ':test:results', 0, -1)]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    assert len(results) == 8
    # Exactly one trial reached the upstream in that sleep window (and it failed).
    assert hits_after_window - hits_before == 1
    lags = []
    for result in results:
        log = result['log']
        first_short = min(t for t, events in log if 'SHORT_CIRCUITED' in events)
        lags.append(first_short - opened_at)
        # After adopting OPEN, a process reaches the upstream only with a trial.
        late = [events for t, events in log
                if opened_at + interval + 0.3 < t < closed_at and 'SHORT_CIRCUITED' not in events]
        assert all(events[0] in ('FAILURE', 'SUCCESS') for events in late)
        # After the fleet closed, every process closes within an interval.
        after = [events for t, events in log if t > closed_at + interval + 0.3]
        assert after and all(events == ['SUCCESS'] for events in after), result['index']
    assert max(lags) <= interval + 0.3, lags
    print('fleet: opened %.3f s after go; slowest process adopted it %.3f s after it opened'
          % (opened_at - go, max(lags)))
