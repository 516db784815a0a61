"""blackgate.prometheus: the collector's exposition, scraped and parsed as Prometheus would."""
import importlib
import pathlib
import subprocess
import sys
import threading

import pytest

prometheus_client = pytest.importorskip('prometheus_client')
from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from blackgate import BadRequest, Command, CommandError, Event, component  # noqa: E402
from blackgate.prometheus import BlackgateCollector  # noqa: E402
from support import Lookup  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
WAIT = 5.0


class Sick(Command):
    command_key = 'sick'
    circuit_breaker_request_volume_threshold = 2
    metrics_health_snapshot_interval = 0

    def run(self):
        raise ConnectionError('upstream down')


class Held(Command):
    group_key = 'tight'
    command_key = 'held'

    def __init__(self, release):
        self.release = release

    def run(self):
        self.release.wait(WAIT)
        return 'late'

    def fallback(self):
        return 'stale'


@pytest.fixture
def scrape():
    """A collector on a fresh CollectorRegistry; scrape() returns {name: [(labels, value)]}."""
    registry = CollectorRegistry()
    collector = BlackgateCollector()
    registry.register(collector)

    def scrape():
        text = generate_latest(registry).decode()
        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples.setdefault(sample.name, []).append((sample.labels, sample.value))
        scrape.text = text
        return samples

    yield scrape
    collector.close()


def value(samples, name, **labels):
    matches = [v for found, v in samples[name] if found == labels]
    assert len(matches) == 1, (name, labels, samples.get(name))
    return matches[0]


def test_events_are_counted_by_command_group_and_event(clock, scrape):
    component.add('executor_pool', {'group_key': 'lookups', 'max_workers': 4})
    component.install()
    for _ in range(5):
        Lookup(clock).execute()
    for _ in range(2):
        Lookup(clock, fail=True).execute()
    with pytest.raises(BadRequest):
        Lookup(clock, bad=True).execute()

    samples = scrape()
    counts = {labels['event']: v for labels, v in samples['blackgate_command_events_total']
              if labels['command'] == 'lookup'}
    assert counts == {event.value: 0.0 for event in Event} | {
        'SUCCESS': 5.0, 'FAILURE': 2.0, 'FALLBACK_SUCCESS': 2.0, 'BAD_REQUEST': 1.0}
    assert value(samples, 'blackgate_command_events_total',
                 command='lookup', group='lookups', event='SUCCESS') == 5.0
    assert '# TYPE blackgate_command_events_total counter' in scrape.text


def test_event_counters_keep_counting_when_the_rolling_window_moves_on(clock, scrape):
    component.add('executor_pool', {'group_key': 'lookups', 'max_workers': 4})
    component.install()
    Lookup(clock).execute()
    clock.advance(60.0)
    Lookup(clock).execute()

    samples = scrape()
    assert value(samples, 'blackgate_command_events_total',
                 command='lookup', group='lookups', event='SUCCESS') == 2.0
    assert value(samples, 'blackgate_command_requests', command='lookup', group='lookups') == 1.0


def test_latency_quantiles_are_seconds_over_the_rolling_window(clock, scrape):
    component.add('executor_pool', {'group_key': 'lookups', 'max_workers': 4})
    component.install()
    for _ in range(9):
        Lookup(clock, 0.010).execute()
    Lookup(clock, 0.200).execute()

    samples = scrape()
    quantiles = {labels['quantile']: v for labels, v in samples['blackgate_command_latency_seconds']
                 if labels['command'] == 'lookup'}
    assert sorted(quantiles) == ['0.5', '0.9', '0.99', '0.995', '1']
    assert quantiles['0.5'] == pytest.approx(0.010, rel=0.04)
    assert quantiles['0.9'] == pytest.approx(0.010, rel=0.04)
    assert quantiles['0.99'] == pytest.approx(0.200, rel=0.04)
    assert quantiles['1'] == pytest.approx(0.200, rel=0.04)
    total = {labels['quantile']: v for labels, v in samples['blackgate_command_total_latency_seconds']
             if labels['command'] == 'lookup'}
    assert total['0.5'] == pytest.approx(0.010, rel=0.04)


def test_error_ratio_and_breaker_state(clock, scrape):
    for _ in range(2):
        with pytest.raises(CommandError):
            Sick().execute()

    samples = scrape()
    labels = dict(command='sick', group='default')
    assert value(samples, 'blackgate_command_error_ratio', **labels) == 1.0
    assert value(samples, 'blackgate_command_requests', **labels) == 2.0
    assert value(samples, 'blackgate_circuit_breaker_open', **labels) == 1.0
    states = {found['state']: v for found, v in samples['blackgate_circuit_breaker_state']
              if found['command'] == 'sick'}
    assert states == {'closed': 0.0, 'open': 1.0, 'half_open': 0.0}

    component.circuit_breaker('sick').reset()
    samples = scrape()
    assert value(samples, 'blackgate_circuit_breaker_open', **labels) == 0.0
    assert value(samples, 'blackgate_circuit_breaker_state', state='closed', **labels) == 1.0


def test_pool_occupancy_and_rejections(clock, scrape):
    component.add('executor_pool', {'group_key': 'tight', 'max_workers': 2, 'max_queue_size': 1})
    component.add('command', {'command_key': 'held', 'timeout_enabled': False})
    component.install()
    release = threading.Event()
    results = []
    threads = [threading.Thread(target=lambda: results.append(Held(release).execute()))
               for _ in range(3)]
    try:
        for thread in threads:
            thread.start()
        pool, metrics = component.pool('tight'), component.metrics('held')
        pause = threading.Event()
        for _ in range(500):   # two running, one queued
            if pool.in_flight == 3 and metrics.concurrent_executions == 2:
                break
            pause.wait(0.01)
        assert (pool.in_flight, metrics.concurrent_executions) == (3, 2)
        assert Held(release).execute() == 'stale'        # rejected: 2 busy, 1 queued

        samples = scrape()
        assert value(samples, 'blackgate_pool_workers', group='tight') == 2.0
        assert value(samples, 'blackgate_pool_active_workers', group='tight') == 2.0
        assert value(samples, 'blackgate_pool_queue_capacity', group='tight') == 1.0
        assert value(samples, 'blackgate_pool_queued', group='tight') == 1.0
        assert value(samples, 'blackgate_pool_rejected_total', group='tight') == 1.0
        assert value(samples, 'blackgate_pool_completed_total', group='tight') == 0.0
        assert value(samples, 'blackgate_command_concurrent_executions',
                     command='held', group='tight') == 2.0
        assert value(samples, 'blackgate_command_rolling_max_concurrent_executions',
                     command='held', group='tight') == 2.0
        assert value(samples, 'blackgate_command_events_total', command='held', group='tight',
                     event='THREAD_POOL_REJECTED') == 1.0
    finally:
        release.set()
        for thread in threads:
            thread.join(WAIT)
    assert results == ['late'] * 3
    samples = scrape()
    assert value(samples, 'blackgate_pool_completed_total', group='tight') == 3.0
    assert value(samples, 'blackgate_pool_active_workers', group='tight') == 0.0
    assert value(samples, 'blackgate_command_concurrent_executions',
                 command='held', group='tight') == 0.0
    # three ran, never more than two at once (the third was queued)
    assert value(samples, 'blackgate_command_rolling_max_concurrent_executions',
                 command='held', group='tight') == 2.0
    assert '# TYPE blackgate_pool_rejected_total counter' in scrape.text


def test_close_stops_counting():
    collector = BlackgateCollector()
    collector.close()

    class Quick(Command):
        def run(self):
            return 1

    Quick().execute()
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    assert 'blackgate_command_events_total{command="Quick",event="SUCCESS",group="default"} 0.0' \
        in text


def test_quantiles_outside_0_to_1_are_refused():
    with pytest.raises(ValueError, match='fractions from 0 to 1'):
        BlackgateCollector(quantiles=(50, 99))


def test_without_prometheus_client_the_import_error_says_what_to_install(monkeypatch):
    monkeypatch.delitem(sys.modules, 'blackgate.prometheus')
    for name in [name for name in sys.modules if name.split('.')[0] == 'prometheus_client']:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, 'prometheus_client', None)
    monkeypatch.setitem(sys.modules, 'prometheus_client.core', None)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[prometheus\]'"):
        importlib.import_module('blackgate.prometheus')


def test_the_example_serves_metrics_from_a_tornado_app():
    result = subprocess.run([sys.executable, str(ROOT / 'examples' / 'prometheus_metrics.py')],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    samples = {}
    for family in text_string_to_metric_families(result.stdout):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    counts = {labels['event']: v for labels, v in samples['blackgate_command_events_total']
              if labels['command'] == 'get_quote'}
    assert counts['SUCCESS'] + counts['FAILURE'] == 50
    assert counts['FAILURE'] == counts['FALLBACK_SUCCESS']
    assert value(samples, 'blackgate_pool_completed_total', group='quotes') == 50
