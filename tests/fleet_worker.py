"""One process of the fleet test (tests/test_fleet.py): calls a shared upstream until told to stop.

    python tests/fleet_worker.py REDIS_URL PREFIX INDEX
    python tests/fleet_worker.py REDIS_URL PREFIX hold TRIAL_LEASE
    python tests/fleet_worker.py REDIS_URL PREFIX quorum INDEX BROKEN MIN_REPORTING

The "upstream" is a counter in Redis: every run() that reaches it increments
PREFIX:test:hits, and fails unless PREFIX:test:up is '1'. Each call's outcome
is logged with its wall time and pushed to PREFIX:test:results at the end.

``quorum``: call command key 'quorum_upstream' (trips at 10 % errors) until
PREFIX:test:stop; its upstream fails in the processes with INDEX < BROKEN only.

``hold``: wait for the fleet's trial of command key 'held', take it, set
PREFIX:test:holding and never answer (tests/test_fleet_faults.py kills it).
"""
import json
import sys
import time

import redis

from blackgate import Command, component

INTERVAL = 0.2       # metrics_health_snapshot_interval: the store syncs this often
SLEEP_WINDOW = 2.0
VOLUME = 40          # merged requests before the fleet's breaker may trip


def main(url, prefix, index):
    client = redis.Redis.from_url(url)

    class Upstream(Command):
        command_key = 'fleet_upstream'
        circuit_breaker_request_volume_threshold = VOLUME
        circuit_breaker_sleep_window = SLEEP_WINDOW
        metrics_health_snapshot_interval = INTERVAL
        timeout = 5.0

        def run(self):
            client.incr(prefix + ':test:hits')
            if client.get(prefix + ':test:up') != b'1':
                raise ConnectionError('upstream down')
            return 'fresh'

        def fallback(self):
            return 'stale'

    component.set('state_store', {'backend': 'redis', 'url': url, 'prefix': prefix})
    component.install()
    client.incr(prefix + ':test:ready')
    deadline = time.time() + 60
    while not client.exists(prefix + ':test:go') and time.time() < deadline:
        time.sleep(0.01)
    log = []
    while not client.exists(prefix + ':test:stop') and time.time() < deadline:
        command = Upstream()
        command.execute()
        log.append((time.time(), [event.value for event in command.events]))
        time.sleep(0.01)   # pacing: about 50 calls a second per process
    client.rpush(prefix + ':test:results', json.dumps({'index': index, 'log': log}))
    component.shutdown()


def hold(url, prefix, lease):
    client = redis.Redis.from_url(url)

    class Held(Command):
        command_key = 'held'
        timeout_enabled = False
        circuit_breaker_sleep_window = 1.0
        metrics_health_snapshot_interval = 0.05
        holding = False

        def run(self):
            if Held.holding:
                client.set(prefix + ':test:holding', '1')
                time.sleep(600)

    component.set('state_store', {'backend': 'redis', 'url': url, 'prefix': prefix,
                                  'trial_lease': lease})
    component.install()
    Held().execute()        # in use: the store reads its fleet state from now on
    Held.holding = True
    breaker = component.circuit_breaker('held')
    deadline = time.time() + 60
    while not breaker.is_open() and time.time() < deadline:
        time.sleep(0.01)    # adopt the fleet's OPEN before the first call
    while time.time() < deadline:
        Held().execute()    # short-circuited until the fleet's trial is this process's
        time.sleep(0.01)


def quorum(url, prefix, index, broken, min_reporting):
    client = redis.Redis.from_url(url)

    class Upstream(Command):
        command_key = 'quorum_upstream'
        circuit_breaker_request_volume_threshold = VOLUME
        circuit_breaker_error_threshold_percentage = 10
        metrics_health_snapshot_interval = INTERVAL

        def run(self):
            if index < broken:
                raise ConnectionError('this host cannot reach the upstream')
            return 'fresh'

        def fallback(self):
            return 'stale'

    component.set('state_store', {'backend': 'redis', 'url': url, 'prefix': prefix,
                                  'min_reporting_processes': min_reporting})
    component.install()
    client.incr(prefix + ':test:ready')
    deadline = time.time() + 60
    while not client.exists(prefix + ':test:go') and time.time() < deadline:
        time.sleep(0.01)
    while not client.exists(prefix + ':test:stop') and time.time() < deadline:
        Upstream().execute()
        time.sleep(0.01)
    component.shutdown()


if __name__ == '__main__':
    if sys.argv[3] == 'hold':
        hold(sys.argv[1], sys.argv[2], float(sys.argv[4]))
    elif sys.argv[3] == 'quorum':
        quorum(sys.argv[1], sys.argv[2], *map(int, sys.argv[4:7]))
    else:
        main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
