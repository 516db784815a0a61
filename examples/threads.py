"""Plain ``execute()`` from many threads, against a local upstream.

Code that is not on an IOLoop (a WSGI application, a worker, a script) calls
its dependencies from ordinary threads. ``execute()`` blocks the calling
thread until there is an answer, while ``run()`` itself runs on the worker
threads of the command's executor pool, the bulkhead. This example starts an
inventory service on 127.0.0.1 (a free port) and shows:

1. four caller threads making calls through a pool of four workers: all served;
2. the service hanging while eight callers arrive: four take the workers and
   get the fallback when the 0.5 s timeout passes, the other four are rejected
   at once (no free worker, no queue), also answered by the fallback;
3. the timed-out workers staying busy until the service answers (Python
   cannot interrupt a thread), their late results dropped;
4. everything served again once the workers are back.

Run it (about a second)::

    python examples/threads.py
"""
import concurrent.futures
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests

from blackgate import Command, Event, component

# -- an inventory service on 127.0.0.1 -------------------------------------------

answering = threading.Event()   # clear it and the service hangs
answering.set()


class InventoryHandler(BaseHTTPRequestHandler):
    def do_GET(self):
        answering.wait(10)
        sku = self.path.rsplit('/', 1)[-1]                 # /stock/sku-3
        count = 7 * int(sku.rpartition('-')[2])
        body = json.dumps({'sku': sku, 'count': count}).encode()
        self.send_response(200)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass    # keep the output to what the example prints


def start_inventory():
    server = ThreadingHTTPServer(('127.0.0.1', 0), InventoryHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


# -- the command -------------------------------------------------------------------

_local = threading.local()


def http():
    """A requests.Session per worker thread (a Session is not thread-safe)."""
    if not hasattr(_local, 'session'):
        _local.session = requests.Session()
        _local.session.trust_env = False   # no proxy from the environment for 127.0.0.1
    return _local.session


class GetStock(Command):
    group_key = 'inventory'      # runs on the 'inventory' pool's threads
    command_key = 'get_stock'
    timeout = 0.5                # seconds the caller waits

    base_url = None              # set once the service has a port

    def __init__(self, sku):
        self.sku = sku

    def run(self):
        # The client's own timeout frees the worker if the service never answers.
        resp = http().get('%s/stock/%s' % (self.base_url, self.sku), timeout=5)
        resp.raise_for_status()
        return resp.json()['count']

    def fallback(self):
        return None              # the page shows "stock unknown"


# -- callers -------------------------------------------------------------------------

def call(sku):
    """What a request thread does: one blocking execute()."""
    cmd = GetStock(sku)
    started = time.monotonic()
    count = cmd.execute()
    return sku, count, cmd, time.monotonic() - started


def show(answer):
    sku, count, cmd, elapsed = answer
    result = '%d in stock' % count if count is not None else 'stock unknown'
    print('   %-9s %-14s %-40s after %.2f s'
          % (sku, result, ' -> '.join(event.name for event in cmd.events), elapsed))


def main():
    server = start_inventory()
    GetStock.base_url = 'http://127.0.0.1:%d' % server.server_address[1]
    print('inventory service listening on %s' % GetStock.base_url)

    component.add('executor_pool', {'group_key': 'inventory', 'max_workers': 4,
                                    'max_queue_size': 0})
    component.install()
    pool = component.pool('inventory')
    metrics = component.metrics('get_stock')
    skus = ['sku-%d' % n for n in range(1, 9)]

    try:
        print('\n1. 4 caller threads, 12 calls, a pool of 4 workers')
        with concurrent.futures.ThreadPoolExecutor(4) as callers:
            answers = list(callers.map(call, skus + skus[:4]))
        fresh = sum(1 for _, _, cmd, _ in answers if cmd.is_successful_execution)
        print('   %d answers, %d of them fresh from the service' % (len(answers), fresh))

        print('\n2. the service hangs; 8 callers arrive at once')
        answering.clear()
        with concurrent.futures.ThreadPoolExecutor(8) as callers:
            answers = list(callers.map(call, skus))
        for answer in sorted(answers, key=lambda answer: answer[3]):
            show(answer)

        print('\n3. the callers have their answers, but the workers are still stuck')
        print('   busy workers: %d of %d' % (pool.active_count, pool.max_workers))
        answering.set()
        deadline = time.monotonic() + 5
        while pool.active_count and time.monotonic() < deadline:
            time.sleep(0.01)
        print('   the service answers; busy workers: %d; SUCCESS count still %d: the late '
              'results are dropped' % (pool.active_count, metrics.rolling_count(Event.SUCCESS)))

        print('\n4. served again')
        with concurrent.futures.ThreadPoolExecutor(4) as callers:
            for answer in callers.map(call, skus[:2]):
                show(answer)

        health = metrics.health()
        print('\nrolling window: %s' % ', '.join(
            '%s %d' % (event.name, count) for event, count in metrics.rolling_counts().items()
            if count))
        print('%d requests, %d errors (%.0f%%): the breaker stays %s (it opens at 50%% '
              'errors among 20 or more requests)'
              % (health.total_requests, health.error_count, health.error_percentage,
                 component.circuit_breaker('get_stock').state.name))
    finally:
        answering.set()
        component.shutdown()     # waits for the workers
        server.shutdown()
        server.server_close()


if __name__ == '__main__':
    main()
