"""What the metrics stream costs a loaded app: requests per second with 0 and with 5 stream clients.

Three processes on 127.0.0.1: the app (Tornado, ``routes()`` plus an endpoint
that runs one of ``--commands`` commands over 4 pools through ``await
Command.queue()``); a load generator (threads with keep-alive sessions, calling
the endpoint as fast as the app answers); and, for the measured case, a process
holding ``--clients`` streams open and reading them, as dashboards would. The
cases alternate in rounds so that machine noise hits them alike; the result is
the median of the rounds.

    python -m benchmarks.stream_cost [--rounds 5] [--seconds 5] [--delay 500]
"""
import argparse
import socket
import statistics
import subprocess
import sys
import threading
import time

import requests

GROUPS = ('users', 'pricing', 'search', 'inventory')


# -- the app (a subprocess) ----------------------------------------------------------------

def serve(commands):
    import asyncio

    import tornado.web

    from blackgate import Command, component
    from blackgate.web import routes

    classes = []
    for i in range(commands):
        classes.append(type('Dependency%d' % i, (Command,), {
            'group_key': GROUPS[i % len(GROUPS)], 'command_key': 'dependency_%02d' % i,
            'run': lambda self: 'ok', 'fallback': lambda self: 'fallback'}))
    for group_key in GROUPS:
        component.add('executor_pool', {'group_key': group_key, 'max_workers': 8})
    component.install()

    class Work(tornado.web.RequestHandler):
        async def get(self, i):
            self.write(await classes[int(i) % len(classes)]().queue())

    async def main():
        app = tornado.web.Application(routes('/blackgate') + [(r'/work/(\d+)', Work)],
                                      log_function=lambda handler: None)
        server = app.listen(0, '127.0.0.1')
        port = next(iter(server._sockets.values())).getsockname()[1]
        print(port, flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


# -- stream readers (a subprocess) ---------------------------------------------------------

def read_streams(port, clients, delay):
    """Hold ``clients`` streams open and read (and drop) everything they send."""
    received = [0] * clients

    def reader(i):
        with socket.create_connection(('127.0.0.1', port)) as sock:
            sock.sendall(b'GET /blackgate/hystrix.stream?delay=%d HTTP/1.1\r\n'
                         b'Host: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n' % delay)
            while True:
                data = sock.recv(65536)
                if not data:
                    return
                received[i] += len(data)

    for i in range(clients):
        threading.Thread(target=reader, args=(i,), daemon=True).start()
    time.sleep(1.0)
    # tell the parent how much one stream carries, then read until killed
    print(min(received), flush=True)
    while True:
        time.sleep(3600)


# -- the load --------------------------------------------------------------------------------

def load(port, seconds, threads=8):
    """Requests per second that ``threads`` keep-alive clients get for ``seconds``."""
    done = [0] * threads
    stop = time.monotonic() + seconds

    def client(i):
        with requests.Session() as session:
            session.trust_env = False
            n = i
            while time.monotonic() < stop:
                session.get('http://127.0.0.1:%d/work/%d' % (port, n), timeout=10).raise_for_status()
                done[i] += 1
                n += threads

    workers = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
    started = time.monotonic()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(done) / (time.monotonic() - started)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--seconds', type=float, default=5.0, help='per measurement')
    parser.add_argument('--clients', type=int, default=5, help='stream clients (default 5)')
    parser.add_argument('--delay', type=int, default=500, help='stream delay, ms')
    parser.add_argument('--commands', type=int, default=24, help='command keys in the app')
    parser.add_argument('--serve', type=int, help=argparse.SUPPRESS)
    parser.add_argument('--read', nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        return serve(args.serve)
    if args.read is not None:
        return read_streams(*args.read)

    me = [sys.executable, '-m', 'benchmarks.stream_cost']
    app = subprocess.Popen(me + ['--serve', str(args.commands)], stdout=subprocess.PIPE, text=True)
    try:
        port = int(app.stdout.readline())
        load(port, 1.0)   # warm up: every command key and pool exists from here on
        results = {0: [], args.clients: []}
        stream_bytes = None
        for _ in range(args.rounds):
            results[0].append(load(port, args.seconds))
            readers = subprocess.Popen(
                me + ['--read', str(port), str(args.clients), str(args.delay)],
                stdout=subprocess.PIPE, text=True)
            try:
                stream_bytes = int(readers.stdout.readline())
                results[args.clients].append(load(port, args.seconds))
            finally:
                readers.kill()
                readers.wait()
            time.sleep(0.5)   # let the app notice that the streams went away
    finally:
        app.kill()
        app.wait()

    base = statistics.median(results[0])
    print('app: %d command keys in %d pools; load: 8 keep-alive clients, %d rounds of %.0f s'
          % (args.commands, len(GROUPS), args.rounds, args.seconds))
    print('one stream carries about %.1f KB/s at delay=%d ms'
          % (stream_bytes / 1000.0, args.delay))
    for clients, values in results.items():
        median = statistics.median(values)
        print('%d stream clients: %7.0f requests/s  (median; rounds: %s)  %+.1f%%'
              % (clients, median, ', '.join('%.0f' % v for v in values),
                 100.0 * (median - base) / base))


if __name__ == '__main__':
    main()
