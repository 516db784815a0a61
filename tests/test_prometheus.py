"""blackgate.prometheus: the collector's exposition, checked by promtool and parsed as Prometheus would."""
import importlib
import importlib.util
import math
import os
import pathlib
import random
import shutil
import subprocess
import sys
import threading

import pytest

prometheus_client = pytest.importorskip('prometheus_client')
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest  # noqa: E402
from prometheus_client.openmetrics.parser import (  # noqa: E402
    text_string_to_metric_families as openmetrics_families)
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from blackgate import BadRequest, Command, CommandError, component  # noqa: E402
from blackgate.prometheus import DEFAULT_BUCKETS, BlackgateCollector, register  # noqa: E402
from blackgate.testing import force_closed, force_open  # noqa: E402
from support import Lookup, add_pool  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
WAIT = 5.0
#: A latency is counted in the bucket of its histogram bin's middle: within 2.2% of it.
PRECISION = 2 ** (1 / 32) - 1


class Sick(Command):
    command_key = 'sick'
    circuit_breaker_request_volume_threshold = 2
    circuit_breaker_sleep_window = 5.0
    metrics_health_snapshot_interval = 0

    def __init__(self, fail=True):
        self.fail = fail

    def run(self):
        if self.fail:
            raise ConnectionError('upstream down')
        return 'fresh'


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


class Quick(Command):
    def run(self):
        return 1


def parse(text):
    """{name: [(labels, value)]} of a text exposition."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


@pytest.fixture
def scrape():
    """A collector on a fresh CollectorRegistry; scrape() returns {name: [(labels, value)]}."""
    registry = CollectorRegistry()
    register(registry)

    def scrape():
        scrape.text = generate_latest(registry).decode()
        return parse(scrape.text)

    scrape.registry = registry
    return scrape


def value(samples, name, **labels):
    matches = [v for found, v in samples.get(name, []) if found == labels]
    assert len(matches) == 1, (name, labels, samples.get(name))
    return matches[0]


def by(samples, name, label, command):
    return {found[label]: v for found, v in samples.get(name, []) if found['command'] == command}


def buckets(samples, name, command):
    """[(le, cumulative count)] of one command's histogram, +Inf as math.inf."""
    found = [(float(labels['le']), v) for labels, v in samples[name + '_bucket']
             if labels['command'] == command]
    return sorted(found)


def histogram_quantile(q, cumulative):
    """Prometheus' histogram_quantile() over [(le, cumulative count)], as its docs define it."""
    total = cumulative[-1][1]
    rank = q * total
    lower, below = 0.0, 0.0
    for upper, count in cumulative:
        if count >= rank:
            if upper == math.inf:
                return lower
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    raise AssertionError('no bucket holds rank %r' % rank)


def mixed_traffic(clock):
    """Successes, failures that fell back, a bad request, breaker moves and a rejection."""
    add_pool('lookups', 4)
    for i in range(20):
        Lookup(clock, 0.002 * (i + 1)).execute()
    for _ in range(3):
        Lookup(clock, fail=True).execute()
    with pytest.raises(BadRequest):
        Lookup(clock, bad=True).execute()
    for _ in range(2):
        with pytest.raises(CommandError):
            Sick().execute()
    with pytest.raises(CommandError):
        Sick().execute()                      # short-circuited: no fallback, so it raises
    clock.advance(5.0)
    assert Sick(fail=False).execute() == 'fresh'   # the trial closes the breaker


# -- promtool ------------------------------------------------------------------------------

@pytest.fixture
def promtool():
    path = shutil.which('promtool')
    if path is None:
        if os.environ.get('CI'):
            pytest.fail('promtool is not installed; .ci/run installs Debian\'s prometheus')
        pytest.skip('promtool is not installed (apt-get install prometheus); CI runs this test')
    return path


def test_promtool_check_metrics_has_nothing_to_say_after_mixed_traffic(clock, scrape, promtool):
    mixed_traffic(clock)
    force_open('forced')
    Forced = type('Forced', (Quick,), {'command_key': 'forced', 'fallback': lambda self: 0})
    assert Forced().execute() == 0
    scrape()
    result = subprocess.run([promtool, 'check', 'metrics'], input=scrape.text,
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (0, '', '')
    assert 'blackgate_command_latency_seconds_bucket' in scrape.text


def test_openmetrics_exposition_parses_strictly(clock):
    mixed_traffic(clock)
    registry = CollectorRegistry()
    register(registry)
    from prometheus_client.openmetrics.exposition import generate_latest as openmetrics
    text = openmetrics(registry).decode()
    families = {family.name: family for family in openmetrics_families(text)}
    assert families['blackgate_command_latency_seconds'].type == 'histogram'
    assert families['blackgate_command_latency_seconds'].unit == 'seconds'
    assert families['blackgate_command_calls'].type == 'counter'
    assert text.endswith('# EOF\n')


# -- calls and fallbacks -------------------------------------------------------------------

def test_calls_count_each_call_once_and_fallbacks_apart(clock, scrape):
    mixed_traffic(clock)
    samples = scrape()
    calls = by(samples, 'blackgate_command_calls_total', 'kind', 'lookup')
    assert calls == {'successful': 20.0, 'failed': 3.0, 'timeout': 0.0, 'rejected': 0.0,
                     'short_circuited': 0.0, 'bad_request': 1.0}
    assert sum(calls.values()) == 24            # every call once, whatever its fallback did
    fallbacks = by(samples, 'blackgate_command_fallback_calls_total', 'kind', 'lookup')
    assert fallbacks == {'successful': 3.0, 'failed': 0.0, 'rejected': 0.0, 'missing': 0.0}
    sick = by(samples, 'blackgate_command_calls_total', 'kind', 'sick')
    assert (sick['failed'], sick['short_circuited'], sick['successful']) == (2.0, 1.0, 1.0)
    assert by(samples, 'blackgate_command_fallback_calls_total', 'kind', 'sick')['missing'] == 3.0


def test_counters_keep_counting_when_the_window_moves_on_and_the_breaker_closes(clock, scrape):
    mixed_traffic(clock)                        # the trial closed 'sick': its window was reset
    clock.advance(60.0)
    Lookup(clock).execute()
    samples = scrape()
    assert value(samples, 'blackgate_command_calls_total', command='lookup', group='lookups',
                 kind='successful') == 21.0
    assert value(samples, 'blackgate_command_calls_total', command='sick', group='default',
                 kind='failed') == 2.0
    assert value(samples, 'blackgate_command_requests', command='lookup', group='lookups') == 1.0


def test_a_rejected_call_counts_as_rejected_and_its_fallback_apart(clock, scrape):
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
        for _ in range(500):   # two running, one queued (the second thread counted)
            if (pool.in_flight, metrics.concurrent_executions, pool.pool_size) == (3, 2, 2):
                break
            pause.wait(0.01)
        assert (pool.in_flight, metrics.concurrent_executions) == (3, 2)
        assert Held(release).execute() == 'stale'        # rejected: 2 busy, 1 queued

        samples = scrape()
        assert value(samples, 'blackgate_pool_workers', group='tight') == 2.0
        assert value(samples, 'blackgate_pool_threads', group='tight') == 2.0
        assert value(samples, 'blackgate_pool_active_workers', group='tight') == 2.0
        assert value(samples, 'blackgate_pool_queue_capacity', group='tight') == 1.0
        assert value(samples, 'blackgate_pool_queued', group='tight') == 1.0
        assert value(samples, 'blackgate_pool_rejected_total', group='tight') == 1.0
        assert value(samples, 'blackgate_pool_completed_total', group='tight') == 0.0
        assert value(samples, 'blackgate_command_concurrent_executions',
                     command='held', group='tight') == 2.0
        assert value(samples, 'blackgate_command_calls_total', command='held', group='tight',
                     kind='rejected') == 1.0
        assert value(samples, 'blackgate_command_fallback_calls_total', command='held',
                     group='tight', kind='successful') == 1.0
    finally:
        release.set()
        for thread in threads:
            thread.join(WAIT)
    assert results == ['late'] * 3
    samples = scrape()
    assert value(samples, 'blackgate_pool_completed_total', group='tight') == 3.0
    assert value(samples, 'blackgate_pool_active_workers', group='tight') == 0.0
    assert value(samples, 'blackgate_command_rolling_max_concurrent_executions',
                 command='held', group='tight') == 2.0
    assert value(samples, 'blackgate_command_calls_total', command='held', group='tight',
                 kind='successful') == 3.0


# -- histograms ----------------------------------------------------------------------------

def test_latency_histogram_buckets_count_calls_at_or_under_each_bound(clock, scrape):
    add_pool('lookups', 4)
    latencies = [0.004] * 6 + [0.040] * 3 + [0.400]
    for seconds in latencies:
        Lookup(clock, seconds).execute()
    samples = scrape()
    found = dict(buckets(samples, 'blackgate_command_latency_seconds', 'lookup'))
    assert sorted(found) == sorted(DEFAULT_BUCKETS + (math.inf,))
    assert (found[0.0025], found[0.005], found[0.025], found[0.05], found[0.25],
            found[0.5], found[math.inf]) == (0, 6, 6, 9, 9, 10, 10)
    labels = dict(command='lookup', group='lookups')
    assert value(samples, 'blackgate_command_latency_seconds_count', **labels) == 10
    assert value(samples, 'blackgate_command_latency_seconds_sum', **labels) == pytest.approx(
        sum(latencies), rel=PRECISION)
    assert value(samples, 'blackgate_command_total_latency_seconds_count', **labels) == 10
    assert 'quantile=' not in scrape.text


def test_histogram_quantile_over_two_instances_finds_the_combined_quantile(clock):
    """Two processes' histograms, summed by bucket as PromQL's sum by (le) does."""
    rng = random.Random(17)
    instances = [[10 ** rng.uniform(-3, -1.5) for _ in range(400)],    # 1 ms to 32 ms
                 [10 ** rng.uniform(-2, -0.5) for _ in range(200)]]    # 10 ms to 320 ms
    scraped = []
    for latencies in instances:
        component.reset()                        # a fresh process, as far as Blackgate knows
        component.clock = clock
        add_pool('lookups', 4)
        registry = CollectorRegistry()
        register(registry)
        for seconds in latencies:
            Lookup(clock, seconds).execute()
        scraped.append(buckets(parse(generate_latest(registry).decode()),
                               'blackgate_command_latency_seconds', 'lookup'))
    combined = [(le, a + b) for (le, a), (le_b, b) in zip(*scraped) if le == le_b]
    assert len(combined) == len(DEFAULT_BUCKETS) + 1
    everything = sorted(instances[0] + instances[1])
    bounds = (0.0,) + DEFAULT_BUCKETS + (math.inf,)
    for q in (0.5, 0.9, 0.99):
        exact = everything[math.ceil(q * len(everything)) - 1]
        estimate = histogram_quantile(q, combined)
        upper = next(i for i, bound in enumerate(bounds) if bound >= exact)
        low, high = bounds[upper - 1], bounds[upper]
        # the estimate lies in the exact quantile's bucket (give or take a bin's 2.2%)
        assert low / (1 + PRECISION) <= estimate <= high * (1 + PRECISION), (q, exact, estimate)


def test_collector_buckets_can_be_chosen_and_are_checked_at_once(clock):
    add_pool('lookups', 4)
    Lookup(clock, 0.3).execute()
    registry = CollectorRegistry()
    registry.register(BlackgateCollector(buckets=(0.1, 1.0)))
    found = buckets(parse(generate_latest(registry).decode()),
                    'blackgate_command_latency_seconds', 'lookup')
    assert found == [(0.1, 0.0), (1.0, 1.0), (math.inf, 1.0)]
    with pytest.raises(ValueError, match=r'ascending, finite numbers of seconds.*\(1.0, 0.1\)'):
        BlackgateCollector(buckets=(1.0, 0.1))


# -- breaker states and transitions -----------------------------------------------------------

def states(samples, command):
    return by(samples, 'blackgate_circuit_breaker_state', 'state', command)


def test_breaker_state_tells_open_half_open_and_closed_apart(clock, scrape):
    for _ in range(2):
        with pytest.raises(CommandError):
            Sick().execute()
    samples = scrape()
    assert states(samples, 'sick') == {'closed': 0.0, 'open': 1.0, 'half_open': 0.0,
                                       'forced_open': 0.0, 'forced_closed': 0.0, 'disabled': 0.0}
    assert value(samples, 'blackgate_circuit_breaker_open', command='sick', group='default') == 1

    clock.advance(5.0)
    seen = []

    class Trial(Sick):
        def run(self):
            seen.append(states(scrape(), 'sick'))   # scraped while the trial is out
            return 'fresh'

    assert Trial(fail=False).execute() == 'fresh'
    assert seen[0]['half_open'] == 1.0 and sum(seen[0].values()) == 1.0
    samples = scrape()
    assert states(samples, 'sick')['closed'] == 1.0
    transitions = {(labels['from'], labels['to']): v for labels, v
                   in samples['blackgate_circuit_breaker_transitions_total']
                   if labels['command'] == 'sick'}
    assert transitions == {('closed', 'open'): 1.0, ('open', 'half_open'): 1.0,
                           ('half_open', 'closed'): 1.0}


@pytest.mark.parametrize('setup, state, is_open', [
    (lambda: force_open('switch'), 'forced_open', 1.0),
    (lambda: force_closed('switch'), 'forced_closed', 0.0),
    (lambda: component.add('command', {'command_key': 'switch',
                                       'circuit_breaker_enabled': False}), 'disabled', 0.0),
])
def test_forced_and_disabled_breakers_say_so(clock, scrape, setup, state, is_open):
    setup()
    component.install()
    Switch = type('Switch', (Quick,), {'command_key': 'switch', 'fallback': lambda self: 0})
    Switch().execute()
    samples = scrape()
    found = states(samples, 'switch')
    assert found[state] == 1.0 and sum(found.values()) == 1.0
    assert value(samples, 'blackgate_circuit_breaker_open', command='switch',
                 group='default') == is_open


# -- no data, no sample ----------------------------------------------------------------------

def test_no_error_ratio_without_requests_and_no_series_for_an_unused_pool(clock, scrape):
    add_pool('lookups', 4)
    add_pool('spare', 2)
    component.metrics('idle')                  # a key looked up, never called
    Lookup(clock).execute()
    samples = scrape()
    ratios = {labels['command']: v for labels, v in samples['blackgate_command_error_ratio']}
    assert ratios == {'lookup': 0.0}           # 'idle' had no request: no sample, not 0
    assert value(samples, 'blackgate_command_requests', command='idle', group='default') == 0
    pools = {labels['group'] for labels, _v in samples['blackgate_pool_workers']}
    assert pools == {'lookups'}                # neither 'spare' nor 'default' ran anything
    assert value(samples, 'blackgate_command_latency_seconds_count', command='idle',
                 group='default') == 0


def test_label_values_are_lower_snake_case(clock, scrape):
    mixed_traffic(clock)
    samples = scrape()
    for name in ('blackgate_command_calls_total', 'blackgate_command_fallback_calls_total',
                 'blackgate_circuit_breaker_state', 'blackgate_circuit_breaker_transitions_total'):
        for labels, _v in samples[name]:
            for label in ('kind', 'state', 'from', 'to'):
                if label in labels:
                    assert labels[label] == labels[label].lower() and ' ' not in labels[label]


# -- registration ----------------------------------------------------------------------------

def test_register_twice_returns_the_same_collector_and_one_set_of_series(clock):
    registry = CollectorRegistry()
    first = register(registry)
    assert register(registry) is first
    Quick().execute()
    samples = parse(generate_latest(registry).decode())
    assert len([1 for labels, _v in samples['blackgate_command_calls_total']
                if labels['kind'] == 'successful']) == 1


def test_component_reset_unregisters_the_collector_from_the_default_registry(clock):
    collector = register()
    assert register() is collector
    try:
        Quick().execute()
        assert 'blackgate_command_calls_total' in generate_latest(REGISTRY).decode()
        component.reset()
        assert 'blackgate_command' not in generate_latest(REGISTRY).decode()
        again = register()                     # what the next test does: no Duplicated error
        assert again is not collector
    finally:
        component.reset()
    assert 'blackgate_' not in generate_latest(REGISTRY).decode()


def test_close_stops_counting_transitions(clock):
    collector = BlackgateCollector()
    collector.close()
    for _ in range(2):
        with pytest.raises(CommandError):
            Sick().execute()
    registry = CollectorRegistry()
    registry.register(collector)
    samples = parse(generate_latest(registry).decode())
    assert 'blackgate_circuit_breaker_transitions_total' not in samples
    assert states(samples, 'sick')['open'] == 1.0


def test_without_prometheus_client_the_import_error_says_what_to_install(monkeypatch):
    monkeypatch.delitem(sys.modules, 'blackgate.prometheus')
    for name in [name for name in sys.modules if name.split('.')[0] == 'prometheus_client']:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, 'prometheus_client', None)
    monkeypatch.setitem(sys.modules, 'prometheus_client.core', None)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[prometheus\]'"):
        importlib.import_module('blackgate.prometheus')


# -- the documented handler ---------------------------------------------------------------------

def _example():
    spec = importlib.util.spec_from_file_location(
        'prometheus_metrics_example', ROOT / 'examples' / 'prometheus_metrics.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.gen_test
def test_the_example_handler_answers_openmetrics_when_prometheus_asks(clock, http_client,
                                                                      base_url):
    Quick().execute()
    accept = ('application/openmetrics-text;version=1.0.0,application/openmetrics-text;'
              'version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1')   # Prometheus 2.42
    openmetrics = yield http_client.fetch(base_url + '/metrics', headers={'Accept': accept})
    assert openmetrics.headers['Content-Type'].startswith('application/openmetrics-text')
    assert openmetrics.body.decode().endswith('# EOF\n')
    plain = yield http_client.fetch(base_url + '/metrics')
    assert plain.headers['Content-Type'].startswith('text/plain; version=0.0.4')
    assert 'blackgate_command_calls_total{command="Quick"' in plain.body.decode()


@pytest.fixture
def app():
    registry = CollectorRegistry()
    register(registry)
    return _example().make_app(registry)


def test_the_example_serves_metrics_from_a_tornado_app():
    result = subprocess.run([sys.executable, str(ROOT / 'examples' / 'prometheus_metrics.py')],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    samples = parse(result.stdout)
    calls = by(samples, 'blackgate_command_calls_total', 'kind', 'get_quote')
    assert calls['successful'] + calls['failed'] == 50
    assert calls['failed'] == by(samples, 'blackgate_command_fallback_calls_total', 'kind',
                                 'get_quote')['successful']
    assert value(samples, 'blackgate_pool_completed_total', group='quotes') == 50
