"""What Blackgate shows of itself over HTTP: a Hystrix metrics stream and a live dashboard.

Mount both in a Tornado application with :func:`routes`::

    app = tornado.web.Application(routes('/blackgate') + [...])
    # http://127.0.0.1:8888/blackgate/                the dashboard page
    # http://127.0.0.1:8888/blackgate/hystrix.stream  the stream, for Hystrix's dashboard too

:class:`MetricsStreamHandler` speaks the format of Hystrix's
``HystrixMetricsStreamServlet``: a ``text/event-stream`` with, every ``delay``
milliseconds, one ``data: {json}`` event per command key (``"type":
"HystrixCommand"``), per executor pool (``"type": "HystrixThreadPool"``) and
per collapser key (``"type": "HystrixCollapser"``), so the Netflix Hystrix
dashboard, Turbine and their successors read it unchanged.
:class:`DashboardHandler` serves a page, shipped in the package and loading
nothing from elsewhere, that reads the same stream.

Mapping Blackgate onto Hystrix's fields (see :func:`command_sample` and
:func:`pool_sample`), with Java Hystrix 1.5's rules: latencies are whole
milliseconds; a command whose ``run()`` is ``async def`` reports
``"SEMAPHORE"`` isolation, any other ``"THREAD"``;
``rollingCountExceptionsThrown`` counts the calls that raised to their caller
(``BAD_REQUEST``, ``FALLBACK_FAILURE``, ``FALLBACK_MISSING``,
``FALLBACK_REJECTION``, Hystrix's ``EXCEPTION_PRODUCING_EVENT_TYPES``); a
pool's rolling executions, rejections and ``rollingMaxActiveThreads`` come
from the thread-isolated commands of its group (the last, as in Hystrix, is
the largest of their rolling maxima of concurrent executions, sampled as each
``run()`` starts); ``currentPoolSize`` is the worker threads the pool has
started, and a pool is streamed only once some work was submitted to it.

.. warning::

   The handlers run on the IOLoop. A sample reads every command key's metrics,
   each under its own short lock; the samples are shared by all the clients of
   one registry, and a client that reads slower than the stream is written
   skips beats instead of piling up data in memory.
"""
import asyncio
import base64
import hashlib
import inspect
import json
import logging
import os
import re
from typing import Any, Dict, Iterable, List, Optional, Set, Tuple

import tornado.ioloop
import tornado.iostream
import tornado.web

from .command import Command
from .config import DEFAULT_ROLLING_WINDOW
from .events import Event
from .registry import Component, component

__all__ = ('MetricsStreamHandler', 'DashboardHandler', 'routes', 'command_sample',
           'pool_sample', 'collapser_sample', 'stream_samples')

log = logging.getLogger('blackgate')

#: The latency percentiles of ``latencyExecute`` and ``latencyTotal``, as Hystrix sends them.
PERCENTILES = (0, 25, 50, 75, 90, 95, 99, 99.5, 100)
_PERCENTILE_NAMES = tuple((p, '%g' % p) for p in PERCENTILES)

#: The batch-size percentiles of a ``HystrixCollapser`` event's ``batchSize``, as Hystrix
#: sends them.
BATCH_SIZE_PERCENTILES = (25, 50, 75, 90, 95, 99, 99.5, 100)
_BATCH_SIZE_NAMES = tuple((p, '%g' % p) for p in BATCH_SIZE_PERCENTILES)

#: Milliseconds between samples when the client does not ask (``?delay=``).
DEFAULT_DELAY = 500
#: The shortest and longest ``delay`` a client may ask for, in milliseconds.
MIN_DELAY, MAX_DELAY = 10, 60_000
#: Stream clients served at once by default; one more gets 503.
DEFAULT_MAX_CLIENTS = 5

#: The SSE comment-like keep-alive line of Hystrix's stream: EventSource ignores it.
PING = b'ping: \n\n'

# Hystrix 1.5's EXCEPTION_PRODUCING_EVENT_TYPES (its FALLBACK_DISABLED is our FALLBACK_MISSING)
_EXCEPTION_THROWN = (Event.BAD_REQUEST, Event.FALLBACK_FAILURE, Event.FALLBACK_MISSING,
                     Event.FALLBACK_REJECTION)

_COUNT_FIELDS = (
    ('rollingCountBadRequests', Event.BAD_REQUEST),
    ('rollingCountFailure', Event.FAILURE),
    ('rollingCountFallbackFailure', Event.FALLBACK_FAILURE),
    ('rollingCountFallbackMissing', Event.FALLBACK_MISSING),
    ('rollingCountFallbackRejection', Event.FALLBACK_REJECTION),
    ('rollingCountFallbackSuccess', Event.FALLBACK_SUCCESS),
    ('rollingCountSemaphoreRejected', Event.SEMAPHORE_REJECTED),
    ('rollingCountShortCircuited', Event.SHORT_CIRCUITED),
    ('rollingCountSuccess', Event.SUCCESS),
    ('rollingCountThreadPoolRejected', Event.THREAD_POOL_REJECTED),
    ('rollingCountTimeout', Event.TIMEOUT),
)


# -- samples: what one stream event says --------------------------------------------------

def _ms(seconds: float) -> int:
    return int(round(seconds * 1000.0))


def _number(value: float) -> Any:
    """A whole float as an int (``50`` rather than ``50.0``), as Hystrix's Java ints read."""
    return int(value) if float(value).is_integer() else value


def _isolation(registry: Component) -> Dict[str, str]:
    """``command_key -> 'THREAD' | 'SEMAPHORE'`` for every command class that has run."""
    strategies: Dict[str, str] = {}
    for cls, command_key in registry.command_classes.items():
        if inspect.iscoroutinefunction(getattr(cls, 'run', None)):
            strategies[command_key] = 'SEMAPHORE'
        else:
            strategies.setdefault(command_key, 'THREAD')
    return strategies


def _caching(registry: Component) -> Set[str]:
    """The command keys of which a class defines ``cache_key()``."""
    return {command_key for cls, command_key in registry.command_classes.items()
            if getattr(cls, 'cache_key', None) is not Command.cache_key}


def command_sample(command_key: str, registry: Optional[Component] = None,
                   isolation: Optional[str] = None, now: Optional[float] = None,
                   caching: Optional[bool] = None) -> Dict[str, Any]:
    """The ``HystrixCommand`` event of ``command_key``: every field Hystrix's dashboard reads.

    :param isolation: ``'THREAD'`` or ``'SEMAPHORE'``; found from the command's class if None.
    :param now: the wall-clock time in seconds (``registry.clock.wall()`` if None).
    :param caching: whether a class of the key defines ``cache_key()``; found if None.
    """
    registry = registry if registry is not None else component
    if isolation is None:
        isolation = _isolation(registry).get(command_key, 'THREAD')
    if caching is None:
        caching = command_key in _caching(registry)
    breaker = registry.circuit_breaker(command_key)
    metrics = registry.metrics(command_key)
    settings = breaker.settings
    counts = metrics.rolling_counts()
    health = metrics.health()
    execution = metrics.latency_summary(PERCENTILES)
    total = metrics.total_latency_summary(PERCENTILES)
    state = breaker.state
    timeout = _ms(settings.timeout)
    sample: Dict[str, Any] = {
        'type': 'HystrixCommand',
        'name': command_key,
        'group': settings.group_key,
        'currentTime': _ms(registry.clock.wall() if now is None else now),
        'isCircuitBreakerOpen': breaker.is_open(),
        # Hystrix sends a whole percentage, rounded down
        'errorPercentage': int(health.error_percentage),
        'errorCount': health.error_count,
        'requestCount': health.total_requests,
        # the requests collapsed into this key's batches, as Hystrix counts COLLAPSED
        'rollingCountCollapsedRequests': counts[Event.COLLAPSED],
        'rollingCountEmit': 0,
        'rollingCountExceptionsThrown': sum(counts[event] for event in _EXCEPTION_THROWN),
        'rollingCountFallbackEmit': 0,
        'rollingCountResponsesFromCache': counts[Event.RESPONSE_FROM_CACHE],
    }
    for field, event in _COUNT_FIELDS:
        sample[field] = counts[event]
    sample['currentConcurrentExecutionCount'] = metrics.concurrent_executions
    sample['rollingMaxConcurrentExecutionCount'] = metrics.rolling_max_concurrent_executions
    sample['latencyExecute_mean'] = _ms(execution.mean)
    sample['latencyExecute'] = {name: _ms(execution.percentiles[p])
                                for p, name in _PERCENTILE_NAMES}
    sample['latencyTotal_mean'] = _ms(total.mean)
    sample['latencyTotal'] = {name: _ms(total.percentiles[p]) for p, name in _PERCENTILE_NAMES}
    sample.update({
        'propertyValue_circuitBreakerRequestVolumeThreshold':
            settings.circuit_breaker_request_volume_threshold,
        'propertyValue_circuitBreakerSleepWindowInMilliseconds':
            _ms(settings.circuit_breaker_sleep_window),
        'propertyValue_circuitBreakerErrorThresholdPercentage':
            _number(settings.circuit_breaker_error_threshold_percentage),
        'propertyValue_circuitBreakerForceOpen': breaker.force_open,
        'propertyValue_circuitBreakerForceClosed': breaker.force_closed,
        'propertyValue_circuitBreakerEnabled': settings.circuit_breaker_enabled,
        'propertyValue_executionIsolationStrategy': isolation,
        'propertyValue_executionIsolationThreadTimeoutInMilliseconds': timeout,
        'propertyValue_executionTimeoutInMilliseconds': timeout,
        'propertyValue_executionTimeoutEnabled': settings.timeout_enabled,
        # Python cannot interrupt a thread: a timed-out run() keeps its worker.
        'propertyValue_executionIsolationThreadInterruptOnTimeout': False,
        'propertyValue_executionIsolationThreadPoolKeyOverride': None,
        'propertyValue_executionIsolationSemaphoreMaxConcurrentRequests':
            settings.max_concurrent_requests,
        'propertyValue_fallbackIsolationSemaphoreMaxConcurrentRequests':
            settings.fallback_max_concurrent_requests,
        'propertyValue_fallbackEnabled': settings.fallback_enabled,
        'propertyValue_metricsRollingStatisticalWindowInMilliseconds':
            _ms(settings.metrics_rolling_window),
        # on where it can answer anything: cache_key() defined, request_cache_enabled
        'propertyValue_requestCacheEnabled': caching and settings.request_cache_enabled,
        # every command started in a request context is in its request log
        'propertyValue_requestLogEnabled': True,
        'reportingHosts': 1,
        'threadPool': settings.group_key,
        # Blackgate's own: Hystrix's boolean cannot tell HALF_OPEN (one trial out) from OPEN.
        'circuitBreakerState': state.value,
    })
    retried = counts[Event.RETRY]
    refused = counts[Event.RETRY_BUDGET_EXHAUSTED]
    if settings.retry_attempts or retried or refused:   # Blackgate's own: retries (§10)
        sample['rollingCountRetry'] = retried
        sample['rollingCountRetryBudgetExhausted'] = refused
        sample['propertyValue_retryAttempts'] = settings.retry_attempts
    return sample


def pool_sample(group_key: str, registry: Optional[Component] = None,
                commands: Iterable[Dict[str, Any]] = (), now: Optional[float] = None
                ) -> Dict[str, Any]:
    """The ``HystrixThreadPool`` event of the executor pool of ``group_key``.

    :param commands: :func:`command_sample` results; those of this group's
        thread-isolated commands give the rolling executions, rejections and
        maximum of active threads.
    """
    registry = registry if registry is not None else component
    pool = registry.pool(group_key)
    executed = rejected = most_active = 0
    window = None
    for sample in commands:
        if (sample['group'] != group_key
                or sample['propertyValue_executionIsolationStrategy'] != 'THREAD'):
            continue
        executed += (sample['rollingCountSuccess'] + sample['rollingCountFailure']
                     + sample['rollingCountTimeout'] + sample['rollingCountBadRequests'])
        rejected += sample['rollingCountThreadPoolRejected']
        # Hystrix 1.5 feeds a pool's rolling maximum with each starting command's own
        # concurrency: the pool's maximum is the largest of its commands' maxima.
        most_active = max(most_active, sample['rollingMaxConcurrentExecutionCount'])
        window = max(window or 0,
                     sample['propertyValue_metricsRollingStatisticalWindowInMilliseconds'])
    in_flight = pool.in_flight
    completed = pool.completed_count
    # A pool's Workers never stop a thread before shutdown: the threads they have
    # started are the pool's size now, and the largest it ever had.
    threads = pool.pool_size
    sample = {
        'type': 'HystrixThreadPool',
        'name': group_key,
        'currentTime': _ms(registry.clock.wall() if now is None else now),
        'currentActiveCount': pool.active_count,
        'currentCompletedTaskCount': completed,
        'currentCorePoolSize': pool.max_workers,
        'currentLargestPoolSize': threads,
        'currentMaximumPoolSize': pool.max_workers,
        'currentPoolSize': threads,
        'currentQueueSize': pool.queue_size,
        'currentTaskCount': completed + in_flight,
        'rollingCountThreadsExecuted': executed,
        'rollingMaxActiveThreads': most_active,
        'rollingCountCommandRejections': rejected,
        'propertyValue_queueSizeRejectionThreshold': pool.max_queue_size,
        'propertyValue_metricsRollingStatisticalWindowInMilliseconds':
            window if window is not None else _ms(DEFAULT_ROLLING_WINDOW),
        'reportingHosts': 1,
        # Blackgate's own: refusals since the pool started (full, or shut down).
        'cumulativeCountThreadPoolRejected': pool.rejected_count,
    }
    limit = pool.limit
    if limit is not None:   # Blackgate's own: the adaptive limit now (concurrency_limit)
        sample['currentConcurrencyLimit'] = limit
    return sample


def collapser_sample(collapser_key: str, registry: Optional[Component] = None,
                     now: Optional[float] = None) -> Dict[str, Any]:
    """The ``HystrixCollapser`` event of ``collapser_key``: the fields of Hystrix's serializer.

    ``rollingCountRequestsBatched`` and ``rollingCountBatches`` over the rolling
    window, the batch sizes' whole mean and percentiles (``batchSize``), and the
    collapser's settings in Hystrix's units.
    """
    registry = registry if registry is not None else component
    metrics = registry.collapser_metrics(collapser_key)
    counts = metrics.rolling_counts()
    sizes = metrics.rolling_batch_sizes(BATCH_SIZE_PERCENTILES)
    return {
        'type': 'HystrixCollapser',
        'name': collapser_key,
        'currentTime': _ms(registry.clock.wall() if now is None else now),
        'rollingCountRequestsBatched': counts['requests_batched'],
        'rollingCountBatches': counts['batches'],
        'rollingCountResponsesFromCache': counts['responses_from_cache'],
        'batchSize_mean': int(sizes.mean),   # Hystrix's is a Java int
        'batchSize': {name: sizes.percentiles[p] for p, name in _BATCH_SIZE_NAMES},
        'propertyValue_requestCacheEnabled': False,
        'propertyValue_maxRequestsInBatch': metrics.max_requests_in_batch,
        'propertyValue_timerDelayInMilliseconds': _ms(metrics.timer_delay),
        'propertyValue_metricsRollingStatisticalWindowInMilliseconds': _ms(metrics.window),
        'reportingHosts': 1,
        # Blackgate's own: whose calls a batch gathers ('request' or 'global')
        'scope': metrics.scope,
    }


def stream_samples(registry: Optional[Component] = None) -> List[Dict[str, Any]]:
    """One sample per command key, one per executor pool used, then one per collapser key."""
    registry = registry if registry is not None else component
    now = registry.clock.wall()
    isolation = _isolation(registry)
    caching = _caching(registry)
    commands = [command_sample(key, registry, isolation.get(key, 'THREAD'), now, key in caching)
                for key in registry.command_keys]
    pools = [pool_sample(group_key, registry, commands, now)
             for group_key, pool in sorted(registry.pools.items()) if pool.used]
    collapsers = [collapser_sample(key, registry, now) for key in registry.collapser_keys]
    return commands + pools + collapsers


def _encode(samples: List[Dict[str, Any]]) -> bytes:
    return b''.join(b'data: %s\n\n' % json.dumps(sample, separators=(',', ':')).encode()
                    for sample in samples)


# -- the stream ---------------------------------------------------------------------------

class MetricsStreamHandler(tornado.web.RequestHandler):
    """``GET`` a Hystrix metrics stream (``text/event-stream``).

    ``?delay=`` sets the milliseconds between samples (default 500, from 10 to
    60000). Options, as route keyword arguments or class attributes of a
    subclass: ``max_clients`` (default 5: one more gets 503), ``delay`` (the
    default delay, ms) and ``registry`` (default ``blackgate.component``).
    """

    #: Streams served at once by this process; one more is answered 503.
    max_clients: int = DEFAULT_MAX_CLIENTS
    #: Milliseconds between samples when the client does not say.
    delay: int = DEFAULT_DELAY
    #: The registry whose commands and pools are streamed (None: ``blackgate.component``).
    registry: Optional[Component] = None

    # Every stream being served, whatever the subclass or application.
    _streams: Set['MetricsStreamHandler'] = set()
    # id(registry) -> (loop time, encoded samples): one sample serves every client.
    _shared: Dict[int, Tuple[float, bytes]] = {}

    def initialize(self, max_clients: Optional[int] = None, delay: Optional[int] = None,
                   registry: Optional[Component] = None) -> None:
        if max_clients is not None:
            self.max_clients = max_clients
        if delay is not None:
            self.delay = delay
        if registry is not None:
            self.registry = registry
        self._timer: Optional[tornado.ioloop.PeriodicCallback] = None
        self._writing: Optional['asyncio.Future[None]'] = None
        self._gone: Optional[asyncio.Event] = None

    @classmethod
    def client_count(cls) -> int:
        """How many streams are being served now."""
        return len(cls._streams)

    def compute_etag(self) -> None:
        return None

    async def get(self) -> None:
        delay = self._requested_delay()
        if delay is None:
            return
        if len(self._streams) >= self.max_clients:
            self.set_status(503)
            self.set_header('Content-Type', 'text/plain; charset=UTF-8')
            self.set_header('Retry-After', '5')
            self.finish('MaxConcurrentConnections reached: %d\n' % (self.max_clients,))
            return
        self._streams.add(self)
        self._gone = asyncio.Event()
        try:
            self.set_header('Content-Type', 'text/event-stream;charset=UTF-8')
            self.set_header('Cache-Control', 'no-cache, no-store, max-age=0, must-revalidate')
            self.set_header('Pragma', 'no-cache')
            self.set_header('X-Accel-Buffering', 'no')   # nginx: pass each event on at once
            self._send(PING)        # headers and a first line now: the client sees it is open
            self._timer = tornado.ioloop.PeriodicCallback(self._tick, delay)
            self._timer.start()
            self._tick(fresh=True)  # and the first sample without waiting a whole delay
            await self._gone.wait()
        finally:
            self._stop()

    def on_connection_close(self) -> None:
        self._stop()

    def on_finish(self) -> None:
        self._stop()

    def _requested_delay(self) -> Optional[int]:
        raw = self.get_query_argument('delay', None)
        if raw is None:
            return self.delay
        if re.fullmatch(r'[0-9]{1,9}', raw.strip()) and MIN_DELAY <= int(raw) <= MAX_DELAY:
            return int(raw)
        self.set_status(400)
        self.set_header('Content-Type', 'text/plain; charset=UTF-8')
        self.finish('delay=%s: expected a whole number of milliseconds from %d to %d, '
                    'e.g. ?delay=%d\n' % (raw[:20], MIN_DELAY, MAX_DELAY, DEFAULT_DELAY))
        return None

    def _tick(self, fresh: bool = False) -> None:
        if self._gone is None or self._gone.is_set():
            return
        if self._writing is not None and not self._writing.done():
            return   # the client has not taken the last sample yet: skip a beat
        try:
            payload = self._payload(fresh)
        except Exception:   # a broken sample must not kill the loop's timer quietly
            log.exception('blackgate metrics stream: could not sample the metrics')
            payload = b''
        self._send(payload or PING)

    def _payload(self, fresh: bool = False) -> bytes:
        registry = self.registry if self.registry is not None else component
        now = tornado.ioloop.IOLoop.current().time()
        key = id(registry)
        shared = self._shared.get(key)
        # A sample younger than half this client's delay is fresh enough for it; a new
        # client gets a sample of its own, taken now.
        if (not fresh and shared is not None
                and 0 <= now - shared[0] < self._timer_delay() / 2000.0):
            return shared[1]
        payload = _encode(stream_samples(registry))
        self._shared[key] = (now, payload)
        return payload

    def _timer_delay(self) -> float:
        return self._timer.callback_time if self._timer is not None else self.delay

    def _send(self, chunk: bytes) -> None:
        try:
            self.write(chunk)
            self._writing = self.flush()
        except (tornado.iostream.StreamClosedError, RuntimeError):
            self._stop()
            return
        self._writing.add_done_callback(self._written)

    def _written(self, future: 'asyncio.Future[None]') -> None:
        if future.cancelled() or future.exception() is not None:
            self._stop()   # the client went away mid-write

    def _stop(self) -> None:
        """Forget this client: stop its timer and let get() return. Safe to call twice."""
        if self._timer is not None:
            self._timer.stop()
            self._timer = None
        self._streams.discard(self)
        if self._gone is not None:
            self._gone.set()


# -- the dashboard ------------------------------------------------------------------------

_STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'static')
_page: Optional[Tuple[bytes, str]] = None


def _dashboard_page() -> Tuple[bytes, str]:
    """The page and its Content-Security-Policy, which allows its own inline script only."""
    global _page
    if _page is None:
        with open(os.path.join(_STATIC, 'dashboard.html'), 'rb') as f:
            body = f.read()
        hashes = ' '.join(
            "'sha256-%s'" % base64.b64encode(hashlib.sha256(script).digest()).decode()
            for script in re.findall(rb'<script>(.*?)</script>', body, re.S))
        policy = ("default-src 'none'; script-src %s; style-src 'unsafe-inline'; "
                  "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
                  "frame-ancestors 'self'" % (hashes,))
        _page = (body, policy)
    return _page


class DashboardHandler(tornado.web.RequestHandler):
    """``GET`` the live dashboard: one page that reads ``hystrix.stream`` beside it.

    ``?delay=`` is passed on to the stream.
    """

    def get(self) -> None:
        body, policy = _dashboard_page()
        self.set_header('Content-Type', 'text/html; charset=UTF-8')
        self.set_header('Cache-Control', 'no-cache')
        self.set_header('Content-Security-Policy', policy)
        self.set_header('X-Content-Type-Options', 'nosniff')
        self.set_header('Referrer-Policy', 'no-referrer')
        self.finish(body)


def routes(prefix: str = '/blackgate', **stream_options: Any) -> List[tuple]:
    """The dashboard at ``prefix + '/'`` and the stream at ``prefix + '/hystrix.stream'``.

    ``prefix`` without the slash redirects to the dashboard (the page finds the
    stream beside it, so it must be served from ``prefix + '/'``).
    ``stream_options`` (``max_clients``, ``delay``, ``registry``) go to
    :class:`MetricsStreamHandler`::

        app = tornado.web.Application(routes('/blackgate', max_clients=10) + my_routes)
    """
    prefix = prefix.rstrip('/')
    stream: tuple = (prefix + '/hystrix.stream', MetricsStreamHandler)
    if stream_options:
        stream += (stream_options,)
    found = [(prefix + '/', DashboardHandler), stream]
    if prefix:
        found.append((prefix, tornado.web.RedirectHandler, {'url': prefix + '/'}))
    return found
