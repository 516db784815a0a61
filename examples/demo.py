"""Blackgate in five seconds: a flaky upstream, a breaker that opens and closes.

Starts a small pricing service on 127.0.0.1 (a free port), wraps calls to it
in a ``Command``, and breaks the service on purpose while printing what every
call got and what the circuit breaker did::

    python examples/demo.py            # add -v to also see Blackgate's log

It prints the URL of Blackgate's live dashboard (``blackgate.web.routes``),
which shows the same story as it happens and stays up ten seconds after it
(``--linger SECONDS`` to change; no lingering when the output is not a
terminal).

The story, with thresholds shrunk so that it plays fast:

1. the upstream is healthy: calls succeed (``execute()`` from threads and
   ``await queue()`` on the IOLoop);
2. it starts failing (HTTP 500s and a stall longer than the timeout): callers
   get the last known price from ``fallback()``, and the breaker opens;
3. while the breaker is open calls are short-circuited: fallback at once, the
   upstream is not called;
4. after the sleep window exactly one trial call goes through; the upstream is
   still down, so the breaker opens again;
5. the upstream heals; the next trial succeeds and the breaker closes.
"""
import asyncio
import collections
import concurrent.futures
import logging
import sys
import threading
import time

import requests
import tornado.web
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from blackgate import BreakerState, Command, Event, component
from blackgate.web import routes

TIMEOUT = 0.5        # the command's timeout, seconds
STALL = 0.8          # how long a stalled upstream request takes, seconds
SLEEP_WINDOW = 2.0   # seconds the breaker stays open before a trial

START = time.monotonic()
_print_lock = threading.Lock()


def say(message, *args):
    """Print one line, stamped with the seconds since the demo started."""
    with _print_lock:
        print('[%5.2fs] %s' % (time.monotonic() - START, message % args if args else message),
              flush=True)


def heading(title):
    with _print_lock:
        print('\n--- %s ---' % title, flush=True)


# -- the flaky upstream ------------------------------------------------------

class Upstream:
    """A pricing service on 127.0.0.1 whose health the demo switches."""

    def __init__(self):
        self.mode = 'healthy'      # 'healthy' or 'sick'
        self.hits = 0
        self._sick_hits = 0
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),),
                                        name='upstream', daemon=True)

    def start(self):
        self._thread.start()
        self._ready.wait(10)
        return 'http://127.0.0.1:%d' % self.port

    def stop(self):
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)

    def answer(self):
        """Decide how to answer one request: 'ok', 'error' or 'stall'."""
        with self._lock:
            self.hits += 1
            if self.mode == 'healthy':
                return 'ok'
            self._sick_hits += 1
            # When sick, every third request hangs instead of failing fast.
            return 'stall' if self._sick_hits % 3 == 2 else 'error'

    async def _serve(self):
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        sockets = bind_sockets(0, '127.0.0.1')
        self.port = sockets[0].getsockname()[1]
        app = tornado.web.Application([(r'/price/(\w+)', PriceHandler, {'upstream': self})],
                                      log_function=lambda handler: None)  # 500s on purpose
        server = HTTPServer(app)
        server.add_sockets(sockets)
        self._ready.set()
        await self._stop.wait()
        server.stop()
        await server.close_all_connections()


PRICES = {'book': 12.50, 'lamp': 31.00, 'mug': 7.25}


class PriceHandler(tornado.web.RequestHandler):
    def initialize(self, upstream):
        self.upstream = upstream

    async def get(self, item):
        how = self.upstream.answer()
        if how == 'error':
            self.set_status(500)
            self.write({'error': 'pricing database unavailable'})
            return
        if how == 'stall':
            await asyncio.sleep(STALL)
            say('   upstream: a stalled request answered after %.1fs; its caller '
                'had its fallback at %.1fs, and the worker thread was busy until now',
                STALL, TIMEOUT)
        self.write({'item': item, 'price': PRICES[item]})


# -- the command -------------------------------------------------------------

_sessions = threading.local()


def http():
    # One requests.Session per thread (a Session is not thread-safe); ignore
    # proxy settings from the environment: the upstream is on 127.0.0.1.
    if not hasattr(_sessions, 's'):
        _sessions.s = requests.Session()
        _sessions.s.trust_env = False
    return _sessions.s


class GetPrice(Command):
    group_key = 'pricing'
    command_key = 'get_price'
    timeout = TIMEOUT

    base_url = None            # set once the upstream has a port
    last_known = {}            # item -> last fresh price: what the fallback serves

    def __init__(self, item):
        self.item = item

    def run(self):
        resp = http().get('%s/price/%s' % (self.base_url, self.item), timeout=2 * STALL)
        resp.raise_for_status()
        price = resp.json()['price']
        GetPrice.last_known[self.item] = price
        return price

    def fallback(self):
        # Runs on the IOLoop thread for queue(): a dict lookup is cheap enough.
        return GetPrice.last_known.get(self.item)


# -- watching it -------------------------------------------------------------

class Watcher:
    """A Blackgate listener: prints breaker changes, tallies every event."""

    def __init__(self):
        self.events = collections.Counter()
        self.opened_at = None
        self._lock = threading.Lock()

    def on_event(self, command_key, event):
        with self._lock:
            self.events[event] += 1

    def on_state_change(self, command_key, old, new):
        notes = {
            BreakerState.OPEN: 'calls are short-circuited to the fallback',
            BreakerState.HALF_OPEN: 'sleep window over: one trial call may go through',
            BreakerState.CLOSED: 'the trial succeeded: traffic flows again',
        }
        say('*** breaker %s: %s -> %s (%s)', command_key, old.name, new.name, notes[new])
        if new is BreakerState.OPEN:
            self.opened_at = time.monotonic()


def report(n, how, cmd, result):
    if cmd.is_successful_execution:
        outcome = 'fresh price %.2f' % result
    elif result is not None:
        outcome = 'fallback: stale price %.2f' % result
    else:
        outcome = 'fallback: no price known'
    why = ''
    exc = cmd.execution_exception
    if cmd.is_response_short_circuited:
        why = ' - short-circuited, upstream not called'
    elif cmd.is_response_timed_out:
        why = ' - no answer within %.1fs' % TIMEOUT
    elif cmd.is_response_rejected:
        why = ' - no free worker'
    elif isinstance(exc, requests.HTTPError) and exc.response is not None:
        why = ' - upstream said HTTP %d' % exc.response.status_code
    elif exc is not None:
        why = ' - %s' % type(exc).__name__
    say('call %2d  %-17s %-28s %s%s', n, how, outcome,
        ','.join(e.name for e in cmd.events), why)


class Caller:
    """Makes numbered calls, with execute() on caller threads or await queue()."""

    def __init__(self):
        self.n = 0
        self.threads = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix='caller')

    def _next(self):
        self.n += 1
        return self.n

    async def execute(self, item):
        n, cmd = self._next(), GetPrice(item)
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(self.threads, cmd.execute)
        report(n, 'execute() thread', cmd, result)
        return cmd

    async def queue(self, item):
        n, cmd = self._next(), GetPrice(item)
        result = await cmd.queue()
        report(n, 'await queue()', cmd, result)
        return cmd


async def wait_for_sleep_window(watcher):
    # Blackgate measures the sleep window from the moment the breaker opened.
    delay = watcher.opened_at + SLEEP_WINDOW + 0.1 - time.monotonic()
    say('waiting %.1fs for the sleep window to pass ...', max(delay, 0))
    await asyncio.sleep(max(delay, 0))


#: the settings the demo shrinks, with Hystrix's default of each
SHRUNK = [('circuit_breaker_request_volume_threshold', 20),
          ('circuit_breaker_sleep_window', 5.0),
          ('metrics_rolling_window', 10.0),
          ('metrics_health_snapshot_interval', 0.5)]


def configure(base_url, watcher):
    GetPrice.base_url = base_url
    component.add('executor_pool', {'group_key': 'pricing', 'max_workers': 4})
    # Hystrix's defaults want 20 requests in a 10 s window and sleep 5 s; shrink
    # them without touching the class (this layer overrides class attributes).
    component.add('command', {
        'command_key': 'get_price',
        'circuit_breaker_request_volume_threshold': 5,
        'circuit_breaker_error_threshold_percentage': 50,
        'circuit_breaker_sleep_window': SLEEP_WINDOW,
        'metrics_rolling_window': 5.0,
        'metrics_rolling_buckets': 5,
        'metrics_health_snapshot_interval': 0,    # re-evaluate after every call
    })
    component.add_listener(watcher)
    component.install()
    settings = component.circuit_breaker('get_price').settings
    say('thresholds shrunk so that the story plays fast (Hystrix defaults in brackets): '
        + ', '.join('%s=%g [%g]' % (name, getattr(settings, name), default)
                    for name, default in SHRUNK))


async def story(upstream, watcher):
    calls = Caller()
    try:
        heading('1. the upstream is healthy')
        await asyncio.gather(calls.execute('book'), calls.execute('lamp'))
        await asyncio.gather(calls.queue('mug'), calls.queue('book'))
        # A command key's breaker and metrics exist from its first call on.
        breaker = component.circuit_breaker('get_price')
        say('breaker is %s', breaker.state.name)

        heading('2. the upstream starts failing')
        upstream.mode = 'sick'
        for item in ['book', 'lamp', 'mug'] * 4:
            await calls.execute(item)
            if breaker.state is BreakerState.OPEN:
                break
        health = component.metrics('get_price').health()
        say('health: %d requests, %d errors (%.0f%%) in the rolling window',
            health.total_requests, health.error_count, health.error_percentage)

        heading('3. breaker open: short-circuits, the upstream is left alone')
        hits = upstream.hits
        await calls.execute('book')
        await asyncio.gather(calls.queue('lamp'), calls.queue('mug'))
        say('upstream requests during these 3 calls: %d', upstream.hits - hits)

        heading('4. sleep window over, upstream still down: the trial fails')
        await wait_for_sleep_window(watcher)
        hits = upstream.hits
        await asyncio.gather(*[calls.queue(item) for item in ['book', 'lamp', 'mug', 'book']])
        say('4 concurrent calls, upstream requests: %d (the one trial)', upstream.hits - hits)

        heading('5. the upstream heals')
        upstream.mode = 'healthy'
        say('upstream is healthy again, but the breaker has not tried it yet')
        hits = upstream.hits
        await calls.execute('lamp')
        say('upstream requests: %d', upstream.hits - hits)
        await wait_for_sleep_window(watcher)
        await calls.execute('mug')
        say('breaker is %s', breaker.state.name)
        await asyncio.gather(calls.execute('book'), calls.execute('lamp'),
                             calls.queue('mug'), calls.queue('book'))
        return calls.n
    finally:
        calls.threads.shutdown(wait=True)


LINGER = 10.0   # seconds the dashboard stays up after the story (--linger N to change)


async def with_dashboard(story_coroutine, linger):
    """Serve Blackgate's live dashboard on 127.0.0.1 while the story runs, and a little after."""
    sockets = bind_sockets(0, '127.0.0.1')
    server = HTTPServer(tornado.web.Application(routes('/blackgate'),
                                                log_function=lambda handler: None))
    server.add_sockets(sockets)
    say('live dashboard: http://127.0.0.1:%d/blackgate/ (open it now: it follows the story)',
        sockets[0].getsockname()[1])
    try:
        n_calls = await asyncio.wait_for(story_coroutine, 25)
        if linger > 0:
            say('the dashboard stays up %.0f s more (--linger 0 to skip)', linger)
            await asyncio.sleep(linger)
        return n_calls
    finally:
        server.stop()
        await server.close_all_connections()


def summary(watcher, upstream, n_calls):
    heading('summary')
    tally = ', '.join('%s %d' % (event.name, watcher.events[event])
                      for event in Event if watcher.events[event])
    say('%d calls, %d reached the upstream', n_calls, upstream.hits)
    say('events seen by the listener: %s', tally)
    metrics = component.metrics('get_price')
    rolling = ', '.join('%s %d' % (event.name, metrics.rolling_count(event))
                        for event in Event if metrics.rolling_count(event))
    say('rolling window now (counts restart when the breaker closes): %s', rolling or 'empty')
    health = metrics.health()
    say('health: %d requests, %d errors (%.0f%%); run() latency p50 %.1f ms, p99 %.1f ms',
        health.total_requests, health.error_count, health.error_percentage,
        1000 * metrics.latency_percentile(50), 1000 * metrics.latency_percentile(99))
    say('breaker is %s', component.circuit_breaker('get_price').state.name)


def _linger():
    args = sys.argv[1:]
    if '--linger' in args:
        return float(args[args.index('--linger') + 1])
    return LINGER if sys.stdout.isatty() else 0.0   # nobody is looking at a pipe


class _OneLine(logging.Formatter):
    def format(self, record):
        return '[%5.2fs]    log %s: %s' % (time.monotonic() - START, record.levelname.lower(),
                                          record.getMessage())


def main():
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_OneLine())
    log = logging.getLogger('blackgate')
    log.addHandler(handler)
    log.propagate = False
    # Blackgate logs every failure; the demo prints its own line per call, so
    # its log is shown only with -v.
    log.setLevel(logging.INFO if '-v' in sys.argv[1:] else logging.CRITICAL)

    upstream = Upstream()
    base_url = upstream.start()
    say('flaky upstream listening on %s', base_url)
    watcher = Watcher()
    try:
        configure(base_url, watcher)
        n_calls = asyncio.run(with_dashboard(story(upstream, watcher), _linger()))
        summary(watcher, upstream, n_calls)
    finally:
        component.shutdown()
        upstream.stop()
    say('done')


if __name__ == '__main__':
    main()
