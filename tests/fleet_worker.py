"""One process of the fleet test (tests/test_fleet.py): calls a shared upstream until told to stop.

    python tests/fleet_worker.py REDIS_URL PREFIX INDEX

The "upstream" is a counter in Redis: every run() that reaches it increments
PREFIX:test:hits, and fails unless PREFIX:test:up is '1'. Each call's outcome
is logged with its wall time and pushed to PREFIX:test:results at the end.
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


if __name__ == '__main__':
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
