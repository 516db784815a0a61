"""Blackgate's metrics for Prometheus: a ``prometheus_client`` collector.

Needs the ``prometheus`` extra (``pip install -e '.[prometheus]'`` in a checkout)::

    from blackgate.prometheus import register

    register()   # a BlackgateCollector in prometheus_client's default REGISTRY, once

and any way of serving the registry (``prometheus_client.start_http_server``, or
a Tornado handler: see ``examples/prometheus_metrics.py`` and
``docs/observability.rst``). What it exports, with labels ``command`` and
``group`` (the command and group keys):

=========================================================  =========  ============================
``blackgate_command_calls_total{kind}``                    counter    calls by outcome:
                                                                      ``successful``, ``failed``,
                                                                      ``timeout``, ``rejected``,
                                                                      ``short_circuited``,
                                                                      ``bad_request``
``blackgate_command_fallback_calls_total{kind}``           counter    what the fallbacks did:
                                                                      ``successful``, ``failed``,
                                                                      ``rejected``, ``missing``
``blackgate_command_responses_from_cache_total``            counter    calls answered from the
                                                                      request cache
``blackgate_command_collapsed_requests_total``             counter    requests its batches
                                                                      answered (a Collapser's)
``blackgate_command_latency_seconds``                      histogram  ``run()`` time
``blackgate_command_total_latency_seconds``                histogram  call-to-answer time
``blackgate_command_requests``                             gauge      requests in the rolling
                                                                      window, as the breaker
                                                                      counts them
``blackgate_command_error_ratio``                          gauge      their error ratio (no sample
                                                                      without requests)
``blackgate_command_concurrent_executions``                gauge      ``run()`` calls running now
``blackgate_command_rolling_max_concurrent_executions``    gauge      the most at once in the
                                                                      rolling window
``blackgate_circuit_breaker_open``                         gauge      1 while short-circuiting
``blackgate_circuit_breaker_state{state}``                 gauge      1 for the current state
``blackgate_circuit_breaker_transitions_total{from,to}``   counter    the breaker's moves
``blackgate_command_retries_total{kind}``                  counter    retries, and those the
                                                                      budget refused
``blackgate_pool_*``                                       (several)  the executor pools
``blackgate_collapser_batches_total``                      counter    batches sent (label
                                                                      ``collapser``)
``blackgate_collapser_requests_batched_total``             counter    requests they answered
``blackgate_collapser_batch_size``                         histogram  requests per batch
=========================================================  =========  ============================

The call counters and histograms are cumulative since the command key's
metrics were created (:meth:`blackgate.metrics.RollingMetrics.cumulative`),
the histograms' buckets are :data:`DEFAULT_BUCKETS`; the transitions are
counted from the collector's creation on, by a registry listener.

.. warning::

   ``collect()`` runs on the scraping thread (the IOLoop, when a Tornado handler
   serves ``/metrics``); it reads each command key's metrics under that key's
   short lock. The listener runs on whichever thread moved a breaker and only
   increments a counter under a lock of its own.
"""
import math
import threading
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

try:
    from prometheus_client import REGISTRY
    from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                        HistogramMetricFamily)
except ImportError as exc:  # pragma: no cover - exercised by a test that hides the package
    raise ImportError(
        'blackgate.prometheus needs the prometheus_client package: '
        "pip install -e '.[prometheus]' in the Blackgate checkout (the package index's "
        "'blackgate' is another project)") from exc

from .events import BreakerState, Event
from .metrics import LatencyHistogram, check_bounds
from .registry import Component, component

__all__ = ('BlackgateCollector', 'register', 'DEFAULT_BUCKETS', 'DEFAULT_BATCH_SIZE_BUCKETS')

#: The latency histograms' bucket bounds, in seconds (and an ``+Inf`` bucket).
DEFAULT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

#: The batch-size histogram's bucket bounds, in requests (and an ``+Inf`` bucket).
DEFAULT_BATCH_SIZE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)

#: ``kind`` of ``blackgate_command_calls_total``: each call has one of these events first.
CALL_KINDS = (
    (Event.SUCCESS, 'successful'),
    (Event.FAILURE, 'failed'),
    (Event.TIMEOUT, 'timeout'),
    (Event.THREAD_POOL_REJECTED, 'rejected'),
    (Event.SEMAPHORE_REJECTED, 'rejected'),
    (Event.SHORT_CIRCUITED, 'short_circuited'),
    (Event.BAD_REQUEST, 'bad_request'),
)
#: ``kind`` of ``blackgate_command_fallback_calls_total``.
FALLBACK_KINDS = (
    (Event.FALLBACK_SUCCESS, 'successful'),
    (Event.FALLBACK_FAILURE, 'failed'),
    (Event.FALLBACK_REJECTION, 'rejected'),
    (Event.FALLBACK_MISSING, 'missing'),
)
#: ``state`` of ``blackgate_circuit_breaker_state``: what the breaker does now.
STATES = ('closed', 'open', 'half_open', 'forced_open', 'forced_closed', 'disabled')

_COMMAND_LABELS = ['command', 'group']
_POOL_LABELS = ['group']
_COLLAPSER_LABELS = ['collapser']

# prometheus_client registry -> the collectors register() put in it
_registered: List[Tuple[Any, 'BlackgateCollector']] = []
_registering = threading.Lock()


def register(prometheus_registry: Any = None,
             registry: Optional[Component] = None) -> 'BlackgateCollector':
    """Register a collector of ``registry`` in ``prometheus_registry``, once.

    Calling it again returns the collector already there instead of raising
    ``Duplicated timeseries``; ``component.reset()`` (or :meth:`BlackgateCollector.close`)
    unregisters it.

    :param prometheus_registry: default ``prometheus_client.REGISTRY``.
    :param registry: the Blackgate registry to read, default ``blackgate.component``.
    """
    target = REGISTRY if prometheus_registry is None else prometheus_registry
    source = component if registry is None else registry
    with _registering:
        for where, collector in _registered:
            if where is target and collector.registry is source:
                return collector
        collector = BlackgateCollector(source)
        target.register(collector)
        _registered.append((target, collector))
        return collector


def _state_of(breaker: Any) -> str:
    if not breaker.settings.circuit_breaker_enabled:
        return 'disabled'
    if breaker.force_open:
        return 'forced_open'
    if breaker.force_closed:
        return 'forced_closed'
    return breaker.state.value


def _buckets(histogram: LatencyHistogram) -> List[Tuple[str, float]]:
    return [('+Inf' if bound == math.inf else format(bound, 'g'), count)
            for bound, count in histogram.buckets]


class BlackgateCollector:
    """A ``prometheus_client`` collector of a Blackgate registry's commands and pools.

    Most code calls :func:`register` instead of building one.

    :param registry: the registry to read (default ``blackgate.component``).
    :param buckets: the latency histograms' bucket bounds in seconds, ascending.
    """

    def __init__(self, registry: Optional[Component] = None,
                 buckets: Iterable[float] = DEFAULT_BUCKETS) -> None:
        self.registry = registry if registry is not None else component
        self.buckets = check_bounds(buckets)   # now, not at the first scrape
        self._lock = threading.Lock()
        self._transitions: Dict[Tuple[str, str, str], int] = {}
        self.registry.add_listener(self)

    # -- the listener ----------------------------------------------------------------------

    def on_state_change(self, command_key: str, old: BreakerState, new: BreakerState) -> None:
        """Count one move of a breaker (called by the registry)."""
        key = (command_key, old.value, new.value)
        with self._lock:
            self._transitions[key] = self._transitions.get(key, 0) + 1

    def on_reset(self) -> None:
        """``component.reset()`` forgets everything: so does the collector (see :meth:`close`)."""
        self.close()

    def close(self) -> None:
        """Stop counting transitions, and leave the registries :func:`register` put it in."""
        self.registry.remove_listener(self)
        with _registering:
            mine = [entry for entry in _registered if entry[1] is self]
            for entry in mine:
                _registered.remove(entry)
        for where, _collector in mine:
            try:
                where.unregister(self)
            except KeyError:   # the user unregistered it already
                pass

    # -- the collector ---------------------------------------------------------------------

    def describe(self) -> Iterator[Any]:
        """The metric families, without samples (what ``REGISTRY.register()`` checks)."""
        return iter(self._families().values())

    def collect(self) -> Iterator[Any]:
        """Every metric, read now."""
        families = self._families()
        registry = self.registry
        with self._lock:
            transitions = dict(self._transitions)
        keys = set(registry.command_keys) | {key for key, _old, _new in transitions}
        for command_key in sorted(keys):
            breaker = registry.circuit_breaker(command_key)
            metrics = registry.metrics(command_key)
            labels = [command_key, breaker.settings.group_key]
            cumulative = metrics.cumulative(self.buckets)
            for family, kinds in (('calls', CALL_KINDS), ('fallback_calls', FALLBACK_KINDS)):
                totals: Dict[str, int] = {}
                for event, kind in kinds:
                    totals[kind] = totals.get(kind, 0) + cumulative.counts[event]
                for kind, count in totals.items():
                    families[family].add_metric(labels + [kind], count)
            retried = cumulative.counts[Event.RETRY]
            refused = cumulative.counts[Event.RETRY_BUDGET_EXHAUSTED]
            if retried or refused or registry.retry_budget(command_key) is not None:
                families['retries'].add_metric(labels + ['retry'], retried)
                families['retries'].add_metric(labels + ['budget_exhausted'], refused)
            for family, histogram in (('latency', cumulative.latency),
                                      ('total_latency', cumulative.total_latency)):
                families[family].add_metric(labels, _buckets(histogram), histogram.seconds)
            health = metrics.health()
            counted = cumulative.counts
            families['from_cache'].add_metric(labels, counted[Event.RESPONSE_FROM_CACHE])
            families['collapsed'].add_metric(labels, counted[Event.COLLAPSED])
            families['requests'].add_metric(labels, health.total_requests)
            if health.total_requests:   # no requests, no ratio: never a 0 that reads healthy
                families['error_ratio'].add_metric(labels, health.error_percentage / 100.0)
            families['concurrent'].add_metric(labels, metrics.concurrent_executions)
            families['peak'].add_metric(labels, metrics.rolling_max_concurrent_executions)
            families['open'].add_metric(labels, 1 if breaker.is_open() else 0)
            state = _state_of(breaker)
            for each in STATES:
                families['state'].add_metric(labels + [each], 1 if each == state else 0)
            for (key, old, new), count in sorted(transitions.items()):
                if key == command_key:
                    families['transitions'].add_metric(labels + [old, new], count)
        for group_key, pool in sorted(registry.pools.items()):
            if not pool.used:   # a pool no command used has nothing to say
                continue
            labels = [group_key]
            families['workers'].add_metric(labels, pool.max_workers)
            families['threads'].add_metric(labels, pool.pool_size)
            families['active'].add_metric(labels, pool.active_count)
            families['queue_capacity'].add_metric(labels, pool.max_queue_size)
            families['queued'].add_metric(labels, pool.queue_size)
            families['completed'].add_metric(labels, pool.completed_count)
            families['rejected'].add_metric(labels, pool.rejected_count)
            if pool.limit is not None:   # only a pool with an adaptive limit has one
                families['limit'].add_metric(labels, pool.limit)
        for collapser_key in registry.collapser_keys:
            counts, sizes = registry.collapser_metrics(collapser_key).cumulative()
            if not counts['batches']:   # looked up, never sent a batch: nothing to say
                continue
            labels = [collapser_key]
            families['batches'].add_metric(labels, counts['batches'])
            families['batched'].add_metric(labels, counts['requests_batched'])
            under = []
            for bound in DEFAULT_BATCH_SIZE_BUCKETS + (math.inf,):
                seen = sum(count for size, count in sizes.sizes if size <= bound)
                under.append(('+Inf' if bound == math.inf else str(bound), seen))
            families['batch_size'].add_metric(labels, under, counts['requests_batched'])
        return iter(families.values())

    @staticmethod
    def _families() -> Dict[str, Any]:
        command, pool = _COMMAND_LABELS, _POOL_LABELS
        return {
            'calls': CounterMetricFamily(
                'blackgate_command_calls',
                'Calls of Blackgate commands by outcome (kind), since the command key was '
                'first used.', labels=command + ['kind']),
            'fallback_calls': CounterMetricFamily(
                'blackgate_command_fallback_calls',
                'What the fallbacks of failed calls did (kind), since the command key was '
                'first used.', labels=command + ['kind']),
            'retries': CounterMetricFamily(
                'blackgate_command_retries',
                'Failed attempts tried again (kind=retry), and retries the retry budget '
                'refused (kind=budget_exhausted), since the command key was first used; '
                'only for commands that retry.', labels=command + ['kind']),
            'latency': HistogramMetricFamily(
                'blackgate_command_latency_seconds', 'Execution time of run().',
                labels=command, unit='seconds'),
            'total_latency': HistogramMetricFamily(
                'blackgate_command_total_latency_seconds',
                'Time from call to answer, fallback included.', labels=command,
                unit='seconds'),
            'from_cache': CounterMetricFamily(
                'blackgate_command_responses_from_cache',
                'Calls answered from the request cache (RESPONSE_FROM_CACHE), since the command '
                'key was first used; not in blackgate_command_calls_total.', labels=command),
            'collapsed': CounterMetricFamily(
                'blackgate_command_collapsed_requests',
                'Requests collapsed into the batches this command answered (COLLAPSED).',
                labels=command),
            'requests': GaugeMetricFamily(
                'blackgate_command_requests',
                'Requests (errors plus successes) in the rolling window, as the circuit '
                'breaker counts them.', labels=command),
            'error_ratio': GaugeMetricFamily(
                'blackgate_command_error_ratio',
                'Errors / requests in the rolling window, as the circuit breaker counts '
                'them; no sample without requests.', labels=command),
            'concurrent': GaugeMetricFamily(
                'blackgate_command_concurrent_executions', 'run() calls executing now.',
                labels=command),
            'peak': GaugeMetricFamily(
                'blackgate_command_rolling_max_concurrent_executions',
                'The most run() calls executing at once in the rolling window.',
                labels=command),
            'open': GaugeMetricFamily(
                'blackgate_circuit_breaker_open',
                '1 while the circuit breaker short-circuits requests (open, half-open or '
                'forced open).', labels=command),
            'state': GaugeMetricFamily(
                'blackgate_circuit_breaker_state',
                "1 for the circuit breaker's current state, 0 for the others.",
                labels=command + ['state']),
            'transitions': CounterMetricFamily(
                'blackgate_circuit_breaker_transitions',
                'Moves of the circuit breaker since the collector was created.',
                labels=command + ['from', 'to']),
            'workers': GaugeMetricFamily(
                'blackgate_pool_workers', 'Worker threads the executor pool may run.',
                labels=pool),
            'threads': GaugeMetricFamily(
                'blackgate_pool_threads', 'Worker threads the executor pool has started.',
                labels=pool),
            'active': GaugeMetricFamily(
                'blackgate_pool_active_workers', 'Workers busy now.', labels=pool),
            'queue_capacity': GaugeMetricFamily(
                'blackgate_pool_queue_capacity',
                'Work that may wait for a worker before more is rejected.', labels=pool),
            'queued': GaugeMetricFamily(
                'blackgate_pool_queued', 'Work waiting for a worker now.', labels=pool),
            'completed': CounterMetricFamily(
                'blackgate_pool_completed', 'Runs finished since the pool started.',
                labels=pool),
            'rejected': CounterMetricFamily(
                'blackgate_pool_rejected', 'Submissions refused since the pool started.',
                labels=pool),
            'limit': GaugeMetricFamily(
                'blackgate_pool_concurrency_limit',
                'The adaptive concurrency limit now: work admitted at once beyond it is '
                'rejected (pools with a concurrency_limit only).', labels=pool),
            'batches': CounterMetricFamily(
                'blackgate_collapser_batches', 'Batches a collapser sent.',
                labels=_COLLAPSER_LABELS),
            'batched': CounterMetricFamily(
                'blackgate_collapser_requests_batched',
                'Requests answered by the batches a collapser sent.',
                labels=_COLLAPSER_LABELS),
            'batch_size': HistogramMetricFamily(
                'blackgate_collapser_batch_size', 'Requests per batch a collapser sent.',
                labels=_COLLAPSER_LABELS),
        }

    def __repr__(self) -> str:
        return '<BlackgateCollector %d command keys>' % (len(self.registry.command_keys),)
