"""Blackgate's metrics for Prometheus: a ``prometheus_client`` collector.

Needs the ``prometheus`` extra (``pip install -e '.[prometheus]'`` in a checkout)::

    from prometheus_client import REGISTRY
    from blackgate.prometheus import BlackgateCollector

    REGISTRY.register(BlackgateCollector())

and any way of serving the registry (``prometheus_client.start_http_server``, or
a Tornado handler writing ``generate_latest()``: see
``examples/prometheus_metrics.py``). What it exports, with labels ``command`` and
``group`` (the command and group keys):

==========================================================  ==========  =========================
``blackgate_command_events_total{event}``                   counter     every event (``SUCCESS``,
                                                                        ``TIMEOUT``, ...) since the
                                                                        collector was created
``blackgate_command_error_ratio``                           gauge       errors / requests in the
                                                                        rolling window (0 to 1)
``blackgate_command_requests``                              gauge       requests in the window, as
                                                                        the breaker counts them
``blackgate_command_latency_seconds{quantile}``             gauge       ``run()`` time in the window
``blackgate_command_total_latency_seconds{quantile}``       gauge       call-to-answer time in it
``blackgate_command_concurrent_executions``                 gauge       ``run()`` calls running now
``blackgate_command_rolling_max_concurrent_executions``     gauge       the most at once in the
                                                                        rolling window
``blackgate_circuit_breaker_open``                          gauge       1 while short-circuiting
``blackgate_circuit_breaker_state{state}``                  gauge       1 for the current state of
                                                                        ``closed``, ``open``,
                                                                        ``half_open``
``blackgate_pool_workers``                                  gauge       ``max_workers``
``blackgate_pool_active_workers``                           gauge       workers busy now
``blackgate_pool_queue_capacity``                           gauge       ``max_queue_size``
``blackgate_pool_queued``                                   gauge       work waiting now
``blackgate_pool_completed_total``                          counter     runs finished since the
                                                                        pool started
``blackgate_pool_rejected_total``                           counter     submissions refused since
                                                                        the pool started
==========================================================  ==========  =========================

Pools are labelled ``group`` only. The event counters come from a registry
listener that the collector adds when it is created (and :meth:`close` removes),
so they count from then on; latencies and the error ratio cover each command's
rolling window, as the circuit breaker sees them.

.. warning::

   ``collect()`` runs on the scraping thread (the IOLoop, when a Tornado handler
   serves ``/metrics``); it reads each command key's metrics under that key's
   short lock. The listener runs on whichever thread finished a command and
   only increments a counter under a lock of its own.
"""
import threading
from typing import Any, Dict, Iterable, Iterator, Optional, Tuple

try:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
except ImportError as exc:  # pragma: no cover - exercised by a test that hides the package
    raise ImportError(
        'blackgate.prometheus needs the prometheus_client package: '
        "pip install -e '.[prometheus]' in the Blackgate checkout (the package index's "
        "'blackgate' is another project)") from exc

from .events import BreakerState, Event
from .registry import Component, component

__all__ = ('BlackgateCollector',)

#: The latency quantiles exported, as fractions (Prometheus' convention).
DEFAULT_QUANTILES = (0.5, 0.9, 0.99, 0.995, 1.0)

_COMMAND_LABELS = ('command', 'group')


class BlackgateCollector:
    """A ``prometheus_client`` collector of a Blackgate registry's commands and pools.

    :param registry: the registry to read (default ``blackgate.component``).
    :param quantiles: the latency quantiles to export, fractions from 0 to 1.
    """

    def __init__(self, registry: Optional[Component] = None,
                 quantiles: Iterable[float] = DEFAULT_QUANTILES) -> None:
        self.registry = registry if registry is not None else component
        self.quantiles = tuple(quantiles)
        for quantile in self.quantiles:
            if not 0 <= quantile <= 1:
                raise ValueError('quantiles are fractions from 0 to 1 (0.99 for the 99th '
                                 'percentile); got %r' % (quantile,))
        self._lock = threading.Lock()
        self._events: Dict[Tuple[str, Event], int] = {}
        self.registry.add_listener(self)

    # -- the listener ----------------------------------------------------------------------

    def on_event(self, command_key: str, event: Event) -> None:
        """Count one event (called by the registry for every event of every command)."""
        key = (command_key, event)
        with self._lock:
            self._events[key] = self._events.get(key, 0) + 1

    def close(self) -> None:
        """Stop counting events (unregister it from Prometheus' registry too)."""
        self.registry.remove_listener(self)

    # -- the collector ---------------------------------------------------------------------

    def describe(self) -> Iterator[Any]:
        """The metric families, without samples (what ``REGISTRY.register()`` checks)."""
        return iter(self._families())

    def collect(self) -> Iterator[Any]:
        """Every metric, read now."""
        families = self._families()
        (events, error_ratio, requests, latency, total_latency, concurrent, peak,
         breaker_open, breaker_state, workers, active, queue_capacity, queued, completed,
         rejected) = families
        registry = self.registry
        with self._lock:
            counted = dict(self._events)
        keys = set(registry.command_keys) | {key for key, _event in counted}
        for command_key in sorted(keys):
            breaker = registry.circuit_breaker(command_key)
            metrics = registry.metrics(command_key)
            labels = [command_key, breaker.settings.group_key]
            for event in Event:
                events.add_metric(labels + [event.value], counted.get((command_key, event), 0))
            health = metrics.health()
            requests.add_metric(labels, health.total_requests)
            error_ratio.add_metric(labels, health.error_percentage / 100.0)
            percentiles = [quantile * 100.0 for quantile in self.quantiles]
            for family, summary in ((latency, metrics.latency_summary(percentiles)),
                                    (total_latency, metrics.total_latency_summary(percentiles))):
                for quantile, percentile in zip(self.quantiles, percentiles):
                    family.add_metric(labels + [_quantile_label(quantile)],
                                      summary.percentiles[percentile])
            concurrent.add_metric(labels, metrics.concurrent_executions)
            peak.add_metric(labels, metrics.rolling_max_concurrent_executions)
            state = breaker.state
            breaker_open.add_metric(labels, 1 if breaker.is_open() else 0)
            for each in BreakerState:
                breaker_state.add_metric(labels + [each.value], 1 if each is state else 0)
        for group_key, pool in sorted(registry.pools.items()):
            labels = [group_key]
            workers.add_metric(labels, pool.max_workers)
            active.add_metric(labels, pool.active_count)
            queue_capacity.add_metric(labels, pool.max_queue_size)
            queued.add_metric(labels, pool.queue_size)
            completed.add_metric(labels, pool.completed_count)
            rejected.add_metric(labels, pool.rejected_count)
        return iter(families)

    @staticmethod
    def _families() -> Tuple[Any, ...]:
        command, pool = list(_COMMAND_LABELS), ['group']
        return (
            CounterMetricFamily('blackgate_command_events',
                                'Events of Blackgate commands since the collector was created.',
                                labels=command + ['event']),
            GaugeMetricFamily('blackgate_command_error_ratio',
                              'Errors / requests in the rolling window, as the circuit breaker '
                              'counts them.', labels=command),
            GaugeMetricFamily('blackgate_command_requests',
                              'Requests (errors plus successes) in the rolling window.',
                              labels=command),
            GaugeMetricFamily('blackgate_command_latency_seconds',
                              'Execution time of run() in the rolling window.',
                              labels=command + ['quantile']),
            GaugeMetricFamily('blackgate_command_total_latency_seconds',
                              'Time from call to answer (fallback included) in the rolling '
                              'window.', labels=command + ['quantile']),
            GaugeMetricFamily('blackgate_command_concurrent_executions',
                              'run() calls executing now.', labels=command),
            GaugeMetricFamily('blackgate_command_rolling_max_concurrent_executions',
                              'The most run() calls executing at once in the rolling window.',
                              labels=command),
            GaugeMetricFamily('blackgate_circuit_breaker_open',
                              '1 while the circuit breaker short-circuits requests (open, '
                              'half-open or forced open).', labels=command),
            GaugeMetricFamily('blackgate_circuit_breaker_state',
                              '1 for the circuit breaker\'s current state.',
                              labels=command + ['state']),
            GaugeMetricFamily('blackgate_pool_workers', 'Worker threads of the executor pool.',
                              labels=pool),
            GaugeMetricFamily('blackgate_pool_active_workers', 'Workers busy now.',
                              labels=pool),
            GaugeMetricFamily('blackgate_pool_queue_capacity',
                              'Work that may wait for a worker before more is rejected.',
                              labels=pool),
            GaugeMetricFamily('blackgate_pool_queued', 'Work waiting for a worker now.',
                              labels=pool),
            CounterMetricFamily('blackgate_pool_completed',
                                'Runs finished since the pool started.', labels=pool),
            CounterMetricFamily('blackgate_pool_rejected',
                                'Submissions refused since the pool started.', labels=pool),
        )

    def __repr__(self) -> str:
        return '<BlackgateCollector %d command keys>' % (len(self.registry.command_keys),)


def _quantile_label(quantile: float) -> str:
    return format(quantile, 'g')   # '0.5', '0.995', '1': as Prometheus' own clients write them
