"""Fleet mode: per-call cost, and how the fleet behaves under faults (issue 20).

    python -m benchmarks.fleet [--calls 3000] [--rounds 9]
    python -m benchmarks.fleet --faults [--only flap,first_trial,holder,idle,late]

Starts throw-away redis-servers on 127.0.0.1 (redis-server must be installed).
The first form interleaves rounds of execute() with and without the store. The
second measures the figures of issue 20's "Done when" 2, each bounded in time:

- ``flap``: 4 processes call a failing upstream at ~100/s while Redis is
  stopped (SIGSTOP) and resumed every second: trials per sleep window,
  fleet-wide while Redis answers and per process while it does not;
- ``first_trial``: one process at one request per 1.5 s, fleet opened with a
  2 s sleep window: seconds from opening to the trial claim and to the trial;
- ``holder``: a process (timeouts off) claims the fleet's trial and is
  SIGKILLed: seconds the fleet stays half-open before another claims one;
- ``idle``: sync time and hot-path p99 of execute() with 0 and 10,000 idle keys;
- ``late``: calls made while a relay delays Redis's replies past
  ``socket_timeout``, against the SUCCESS count in Redis.

Run it against another checkout's package (e.g. the code before a change) with
``PYTHONPATH=/path/to/checkout python -m benchmarks.fleet --faults``.
"""
import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

import redis

from blackgate import Command, ConfigError, component


class Plain(Command):
    command_key = 'bench_plain'

    def run(self):
        return 1


def _per_call(cls, calls):
    start = time.perf_counter()
    for _ in range(calls):
        cls().execute()
    return (time.perf_counter() - start) / calls


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--calls', type=int, default=3000)
    parser.add_argument('--rounds', type=int, default=9)
    parser.add_argument('--faults', action='store_true', help="issue 20's figures")
    parser.add_argument('--only', default=','.join(FAULTS), help='comma-separated figures')
    parser.add_argument('--worker', nargs='+', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return WORKERS[args.worker[0]](*args.worker[1:])
    if args.faults:
        return faults([name.strip() for name in args.only.split(',') if name.strip()])
    if shutil.which('redis-server') is None:
        raise SystemExit('redis-server is not installed (apt-get install redis-server)')
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(['redis-server', '--port', str(port), '--bind', '127.0.0.1',
                               '--save', '', '--appendonly', 'no'], stdout=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port)
        for _ in range(200):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.02)
        component.reset()
        options = {'backend': 'redis', 'prefix': 'bench', 'url': 'redis://127.0.0.1:%d/0' % port}
        results = {'store off': [], 'store on': []}
        for _ in range(args.rounds):
            component.delete('state_store')
            component.install()
            results['store off'].append(_per_call(Plain, args.calls))
            component.set('state_store', options)
            component.install()
            results['store on'].append(_per_call(Plain, args.calls))
        component.reset()
    finally:
        server.terminate()
        server.wait(10)
    off = statistics.median(results['store off'])
    on = statistics.median(results['store on'])
    print('execute(), store off: %8.2f us/call' % (off * 1e6))
    print('execute(), store on:  %8.2f us/call  (%+.2f us, %.3fx)' % (
        on * 1e6, (on - off) * 1e6, on / off))



# -- issue 20's figures ----------------------------------------------------------------------

class _Redis:
    """A throw-away redis-server on a free port of 127.0.0.1."""

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
        for _ in range(500):
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                time.sleep(0.02)
        raise SystemExit('redis-server did not start on port %d' % self.port)

    def client(self):
        return redis.Redis(port=self.port, socket_timeout=10)

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)
            self.process.terminate()
            self.process.wait(10)


class _Relay:
    """A TCP relay before Redis that holds back replies of at least 20 bytes by ``delay``."""

    def __init__(self, port):
        self.target, self.delay = port, 0.0
        self._listener = socket.socket()
        self._listener.bind(('127.0.0.1', 0))
        self._listener.listen(16)
        self.url = 'redis://127.0.0.1:%d/0' % self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self._listener.accept()
                server = socket.create_connection(('127.0.0.1', self.target))
            except OSError:
                return
            for source, sink, replies in ((client, server, False), (server, client, True)):
                threading.Thread(target=self._pump, args=(source, sink, replies),
                                 daemon=True).start()

    def _pump(self, source, sink, replies):
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if replies and self.delay and len(data) >= 20:
                    time.sleep(self.delay)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                end.close()

    def close(self):
        self._listener.close()


def _store(url, prefix, **extra):
    """set('state_store'); settings the code under test does not know are left out."""
    options = {'backend': 'redis', 'url': url, 'prefix': prefix}
    for key, value in extra.items():
        try:
            component.set('state_store', dict(options, **{key: value}))
            options[key] = value
        except ConfigError:
            print('  (this version has no state_store setting %r)' % key)
    component.set('state_store', options)
    component.install()


def _wait(condition, timeout):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def _spawn(*args):
    return subprocess.Popen([sys.executable, '-m', 'benchmarks.fleet', '--worker']
                            + [str(arg) for arg in args],
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            stderr=subprocess.DEVNULL)


def _worker_caller(url, prefix, name, sleep_window, pace, seconds, lease=None):
    """Call a failing upstream every ``pace`` s; push (time, events) to PREFIX:log.

    With ``lease`` (the holder's case): timeouts off, as the holder has them.
    """
    client = redis.Redis.from_url(url)

    class Upstream(Command):
        command_key = 'upstream'
        timeout_enabled = not lease
        circuit_breaker_request_volume_threshold = 20
        circuit_breaker_sleep_window = float(sleep_window)
        metrics_health_snapshot_interval = 0.2

        def run(self):
            raise ConnectionError('upstream down')

        def fallback(self):
            return 'stale'

    _store(url, prefix, **({'trial_lease': float(lease)} if lease else {}))
    client.incr(prefix + ':ready')
    log = []
    deadline = time.time() + float(seconds)
    while time.time() < deadline:
        command = Upstream()
        command.execute()
        log.append((time.time(), [event.value for event in command.events]))
        time.sleep(float(pace))
    component.shutdown()
    for _ in range(100):
        try:
            client.rpush(prefix + ':log', json.dumps({'name': name, 'log': log}))
            return
        except redis.RedisError:
            time.sleep(0.1)


def _worker_holder(url, prefix, lease):
    """Take the fleet's trial of 'upstream' and never answer (the driver SIGKILLs it)."""
    client = redis.Redis.from_url(url)

    class Upstream(Command):
        command_key = 'upstream'
        timeout_enabled = False
        circuit_breaker_sleep_window = 1.0
        metrics_health_snapshot_interval = 0.2
        holding = False

        def run(self):
            if Upstream.holding:
                client.set(prefix + ':holding', '1')
                time.sleep(600)
            return 'fresh'

    _store(url, prefix, trial_lease=float(lease))
    Upstream().execute()
    Upstream.holding = True
    breaker = component.circuit_breaker('upstream')
    _wait(breaker.is_open, 30)          # the fleet's OPEN is adopted: the next run is a trial
    deadline = time.time() + 120
    while time.time() < deadline:
        Upstream().execute()
        time.sleep(0.01)


WORKERS = {'caller': _worker_caller, 'holder': _worker_holder}


def _logs(client, prefix, count):
    _wait(lambda: client.llen(prefix + ':log') >= count, 30)
    return [json.loads(item) for item in client.lrange(prefix + ':log', 0, -1)]


def _trials(log, after):
    return [t for t, events in log if t > after and events[0] == 'FAILURE']


def fault_flap():
    server = _Redis().start()
    client = server.client()
    sleep_window, seconds = 3.0, 16.0
    try:
        workers = [_spawn('caller', server.url, 'flap', 'p%d' % i, sleep_window, 0.01, seconds)
                   for i in range(4)]
        _wait(lambda: int(client.get('flap:ready') or 0) == 4, 60)
        _wait(lambda: client.hget('flap:upstream:state', 'state') == b'open', 10)
        opened = float(client.hget('flap:upstream:state', 'opened_at') or time.time())
        stopped = []                                  # (from, to): Redis not answering
        end = time.time() + seconds - 4.0
        while time.time() < end:
            time.sleep(1.0)
            begin = time.time()
            os.kill(server.process.pid, signal.SIGSTOP)
            time.sleep(1.0)
            os.kill(server.process.pid, signal.SIGCONT)
            stopped.append((begin, time.time() + 0.3))   # + the time to notice it answers
        logs = _logs(client, 'flap', 4)
        for worker in workers:
            worker.wait(30)
    finally:
        server.stop()
    windows = {}
    answering_windows = {}
    for item in logs:
        for t in _trials(item['log'], opened + 0.5):
            window = int((t - opened) // sleep_window)
            away = any(start <= t <= stop for start, stop in stopped)
            if away:
                windows.setdefault((item['name'], window), []).append(t)
            else:
                answering_windows.setdefault(window, []).append(t)
    per_process = max((len(v) for v in windows.values()), default=0)
    fleet = max((len(v) for v in answering_windows.values()), default=0)
    total = sum(len(_trials(item['log'], opened + 0.5)) for item in logs)
    span = int((max(t for item in logs for t, _ in item['log']) - opened) // sleep_window) + 1
    print('flap: %d trials in %d sleep windows of %.0f s (4 processes, Redis stopped 1 s of '
          'every 2); most in one window: %d fleet-wide while Redis answered, %d by one '
          'process while it did not' % (total, span, sleep_window, fleet, per_process))


def fault_first_trial():
    server = _Redis().start()
    client = server.client()
    sleep_window = 2.0
    try:
        worker = _spawn('caller', server.url, 'first', 'p0', sleep_window, 1.5, 24.0)
        _wait(lambda: int(client.get('first:ready') or 0) == 1, 60)
        time.sleep(2.0)                               # a call or two: the key is in use
        opened = time.time()
        client.hset('first:upstream:state', mapping={'state': 'open', 'opened_at': opened,
                                                     'generation': 0})
        claimed = None
        deadline = time.time() + 20
        while time.time() < deadline and claimed is None:
            trial_at = client.hget('first:upstream:state', 'trial_at')
            claimed = float(trial_at) if trial_at else None
            time.sleep(0.01)
        logs = _logs(client, 'first', 1)
        worker.wait(30)
    finally:
        server.stop()
    trials = _trials(logs[0]['log'], opened)
    print('first_trial: sleep window %.0f s, one request per 1.5 s: claimed %s, first trial '
          'request %s after opening' % (
              sleep_window, '%.2f s' % (claimed - opened) if claimed else 'never (20 s)',
              '%.2f s' % (trials[0] - opened) if trials else 'none'))


def fault_holder():
    server = _Redis().start()
    client = server.client()
    lease = 5.0
    try:
        client.hset('hold:upstream:state', mapping={'state': 'open',
                                                    'opened_at': time.time() - 60,
                                                    'generation': 0})
        holder = _spawn('holder', server.url, 'hold', lease)
        # Killed as soon as it holds the claim (whether its trial request started or not).
        if not _wait(lambda: client.hget('hold:upstream:state', 'trial_at'), 60):
            print('holder: the holder never claimed the trial')
            return
        holder.kill()
        killed = time.time()
        first = client.hgetall('hold:upstream:state')
        other = _spawn('caller', server.url, 'hold', 'p1', 1.0, 0.05, 80.0, lease)  # the rest
        moved = _wait(lambda: client.hget('hold:upstream:state', 'trial_at')
                      != first.get(b'trial_at'), 75)
        second = time.time()
        other.kill()
    finally:
        server.stop()
    if moved:
        print('holder: trial_lease %.0f s (where the version has it): the fleet stayed '
              'half-open %.2f s after the holder claimed (%.2f s after SIGKILL)'
              % (lease, second - float(first[b'trial_at']), second - killed))
    else:
        print('holder: still half-open 75 s after the holder was killed')


def fault_idle():
    server = _Redis().start()
    try:
        results = {}
        for idle in (0, 10000):
            component.reset()
            _store(server.url, 'idle%d' % idle, interval=0.5)

            class Hot(Command):
                command_key = 'hot'

                def run(self):
                    return 1

            classes = [type('Idle%d' % i, (Command,), {'command_key': 'idle%d' % i,
                                                       'metrics_rolling_window': 2.0,
                                                       'run': lambda self: 1})
                       for i in range(idle)]
            for cls in classes:
                cls().execute()
            store = getattr(component, 'state_store', None) or component._store  # before 0.2
            durations = []
            sync = store.sync

            def timed():
                start = time.perf_counter()
                try:
                    sync()
                finally:
                    durations.append(time.perf_counter() - start)

            store.sync = timed
            time.sleep(4.0)                     # idle keys: no call for a whole window
            durations.clear()
            latencies = []
            end = time.monotonic() + 5.0
            while time.monotonic() < end:
                start = time.perf_counter()
                Hot().execute()
                latencies.append(time.perf_counter() - start)
                time.sleep(0.001)
            latencies.sort()
            results[idle] = (statistics.median(durations) if durations else 0.0,
                             max(durations, default=0.0),
                             latencies[int(len(latencies) * 0.99)], latencies[-1])
            component.reset()
    finally:
        server.stop()
    for idle, (median, worst, p99, top) in results.items():
        print('idle: %5d idle keys: sync median %.4f s, max %.4f s; execute() p99 %.3f ms, '
              'max %.3f ms' % (idle, median, worst, p99 * 1e3, top * 1e3))


def fault_late():
    server = _Redis().start()
    relay = _Relay(server.port)
    client = server.client()
    try:
        component.reset()
        _store(relay.url, 'late', interval=0.05, socket_timeout=0.2)

        class Fine(Command):
            command_key = 'fine'

            def run(self):
                return 1

        calls = 0
        end = time.monotonic() + 6.0
        delayed = False
        while time.monotonic() < end:
            left = end - time.monotonic()
            relay.delay = 0.3 if 1.0 < left < 5.0 else 0.0   # late replies for 4 s
            delayed = delayed or relay.delay > 0
            Fine().execute()
            calls += 1
            time.sleep(0.01)
        relay.delay = 0.0
        time.sleep(2.0)
        counted = sum(int(client.hget(key, 'SUCCESS') or 0)
                      for key in client.keys('late:fine:c:*'))
        component.reset()
    finally:
        relay.close()
        server.stop()
    print('late: %d calls made, %d SUCCESS in Redis after 4 s of replies delayed past '
          'socket_timeout' % (calls, counted))


FAULTS = {'flap': fault_flap, 'first_trial': fault_first_trial, 'holder': fault_holder,
          'idle': fault_idle, 'late': fault_late}


def faults(names):
    if shutil.which('redis-server') is None:
        raise SystemExit('redis-server is not installed (apt-get install redis-server)')
    import blackgate
    print('blackgate from %s' % os.path.dirname(blackgate.__file__))
    for name in names:
        FAULTS[name]()


if __name__ == '__main__':
    main()
