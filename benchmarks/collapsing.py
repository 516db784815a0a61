"""The N+1 fix, measured: 1,000 single-item lookups, collapsed and not.

An upstream on 127.0.0.1 (its own process) answers ``GET /users?ids=1,2,...``
after a cost of ``--per-call`` ms plus ``--per-item`` ms for each id (a wait,
as a database's round trip and per-row work look to its caller), and counts the
calls and items it served. The client process makes ``--lookups`` single-item
lookups at once on its IOLoop, twice:

- *uncollapsed*: one ``Command`` per lookup (``GET /users?ids=<id>``), all
  ``queue()``d at once on a pool of ``--workers`` threads;
- *collapsed*: one ``Collapser`` per lookup (``timer_delay`` 10 ms,
  ``max_requests_in_batch`` ``--batch``), answered by batch commands on the same
  pool.

and then the same with ``execute()`` from ``--threads`` threads (global scope).
It prints, per mode, the upstream calls and items, the wall time from the
first lookup to the last answer, and the lookups per second.

    python -m benchmarks.collapsing [--lookups 1000] [--per-call 2] [--per-item 0.05]
"""
import argparse
import asyncio
import subprocess
import sys
import threading
import time

import requests


# -- the upstream (a subprocess) ------------------------------------------------------------

def serve(per_call_ms, per_item_ms):
    import tornado.web

    served = {'calls': 0, 'items': 0}

    class Users(tornado.web.RequestHandler):
        async def get(self):
            ids = self.get_query_argument('ids').split(',')
            served['calls'] += 1
            served['items'] += len(ids)
            await asyncio.sleep((per_call_ms + per_item_ms * len(ids)) / 1000.0)
            self.write({user_id: {'id': user_id, 'name': 'user %s' % user_id}
                        for user_id in ids})

    class Stats(tornado.web.RequestHandler):
        def get(self):
            self.write(dict(served))

        def delete(self):
            served.update(calls=0, items=0)

    async def main():
        app = tornado.web.Application([('/users', Users), ('/stats', Stats)],
                                      log_function=lambda handler: None)
        server = app.listen(0, '127.0.0.1')
        port = next(iter(server._sockets.values())).getsockname()[1]
        print(port, flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


# -- the client --------------------------------------------------------------------------------

def define(base, batch):
    from blackgate import Collapser, Command, component

    class GetUser(Command):
        group_key = 'users'
        command_key = 'get_user'
        timeout = 30.0

        def __init__(self, user_id):
            self.user_id = user_id

        def run(self):
            response = component.session.get(base + '/users', params={'ids': self.user_id},
                                             timeout=30)
            response.raise_for_status()
            return response.json()[str(self.user_id)]

    class GetUsers(Command):
        group_key = 'users'
        command_key = 'get_users'
        timeout = 30.0

        def __init__(self, user_ids):
            self.user_ids = user_ids

        def run(self):
            response = component.session.get(
                base + '/users', params={'ids': ','.join(map(str, self.user_ids))}, timeout=30)
            response.raise_for_status()
            return response.json()

    class CollapsedGetUser(Collapser):
        collapser_key = 'get_user_collapsed'
        max_requests_in_batch = batch
        timer_delay = 0.01

        def __init__(self, user_id):
            self.user_id = user_id

        def request_argument(self):
            return self.user_id

        def create_command(self, arguments):
            return GetUsers(arguments)

        def map_response(self, batch_result, arguments):
            return [batch_result[str(user_id)] for user_id in arguments]

    class GloballyCollapsedGetUser(CollapsedGetUser):
        collapser_key = 'get_user_collapsed_globally'
        scope = 'global'

    return GetUser, CollapsedGetUser, GloballyCollapsedGetUser


def measure(base, label, run):
    requests.delete(base + '/stats', timeout=5)
    started = time.perf_counter()
    answers = run()
    wall = time.perf_counter() - started
    stats = requests.get(base + '/stats', timeout=5).json()
    return {'mode': label, 'lookups': len(answers), 'upstream_calls': stats['calls'],
            'upstream_items': stats['items'], 'wall_s': wall,
            'lookups_per_s': len(answers) / wall,
            'correct': all(answer['id'] == str(i) for i, answer in enumerate(answers))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--lookups', type=int, default=1000)
    parser.add_argument('--per-call', type=float, default=2.0, help='upstream ms per call')
    parser.add_argument('--per-item', type=float, default=0.05, help='upstream ms per item')
    parser.add_argument('--workers', type=int, default=10, help='the pool\'s threads')
    parser.add_argument('--batch', type=int, default=100, help='max_requests_in_batch')
    parser.add_argument('--threads', type=int, default=50, help='threads calling execute()')
    parser.add_argument('--serve', nargs=2, type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        return serve(*args.serve)

    upstream = subprocess.Popen([sys.executable, '-m', 'benchmarks.collapsing', '--serve',
                                 str(args.per_call), str(args.per_item)],
                                stdout=subprocess.PIPE, text=True)
    try:
        base = 'http://127.0.0.1:%d' % (int(upstream.stdout.readline()),)
        rows = run_all(base, args)
    finally:
        upstream.kill()
        upstream.wait()
    print('upstream: %.2f ms per call + %.3f ms per item; client: pool of %d workers, '
          'batches of up to %d, timer_delay 10 ms' % (args.per_call, args.per_item,
                                                      args.workers, args.batch))
    print('%-34s %8s %9s %9s %9s %12s' % ('mode', 'lookups', 'up.calls', 'up.items',
                                          'wall ms', 'lookups/s'))
    for row in rows:
        print('%-34s %8d %9d %9d %9.0f %12.0f%s'
              % (row['mode'], row['lookups'], row['upstream_calls'], row['upstream_items'],
                 row['wall_s'] * 1000.0, row['lookups_per_s'],
                 '' if row['correct'] else '  WRONG ANSWERS'))
    return rows


def run_all(base, args):
    from blackgate import component

    component.add('executor_pool', {'group_key': 'users', 'max_workers': args.workers,
                                    'max_queue_size': args.lookups})
    component.install()
    GetUser, CollapsedGetUser, GloballyCollapsedGetUser = define(base, args.batch)
    lookups = range(args.lookups)

    async def on_the_loop(make):
        with component.request_context():
            return await asyncio.gather(*(make(i).queue() for i in lookups))

    def from_threads(make):
        answers = [None] * args.lookups

        def worker(start):
            for i in range(start, args.lookups, args.threads):
                answers[i] = make(i).execute()

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(args.threads)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return answers

    # warm up: connections, threads and command keys exist before anything is timed
    asyncio.run(on_the_loop(lambda i: GetUser(i % 10)))
    rows = [
        measure(base, 'queue(), uncollapsed', lambda: asyncio.run(on_the_loop(GetUser))),
        measure(base, 'queue(), collapsed (request scope)',
                lambda: asyncio.run(on_the_loop(CollapsedGetUser))),
        measure(base, 'execute() x%d threads, uncollapsed' % (args.threads,),
                lambda: from_threads(GetUser)),
        measure(base, 'execute() x%d threads, collapsed' % (args.threads,),
                lambda: from_threads(GloballyCollapsedGetUser)),
    ]
    component.shutdown()
    return rows


if __name__ == '__main__':
    main()
