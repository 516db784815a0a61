"""Collapsers in the Hystrix stream (``"type": "HystrixCollapser"``) and in Prometheus.

The field names are those of Hystrix 1.5's serializer (``SerialHystrixDashboardData``
/ ``HystrixMetricsStreamServlet``'s collapser JSON): the dashboard's and
Turbine's readers look for exactly these.
"""
import asyncio

import pytest
import tornado.web

from blackgate import component
from blackgate.web import collapser_sample, routes, stream_samples
from test_collapser import GetUserInTens
from test_stream import StreamClient

WAIT = 5.0

#: Every field Hystrix's serializer writes for a collapser.
HYSTRIX_COLLAPSER_FIELDS = (
    'type', 'name', 'currentTime', 'rollingCountRequestsBatched', 'rollingCountBatches',
    'rollingCountResponsesFromCache', 'batchSize_mean', 'batchSize',
    'propertyValue_requestCacheEnabled', 'propertyValue_maxRequestsInBatch',
    'propertyValue_timerDelayInMilliseconds', 'reportingHosts',
)
BATCH_SIZE_KEYS = ('25', '50', '75', '90', '95', '99', '99.5', '100')


async def send_batches(clock, sizes):
    with component.request_context():
        for size in sizes:
            futures = [GetUserInTens(i).queue() for i in range(size)]
            clock.advance(0.01)
            await asyncio.wait_for(asyncio.gather(*futures), WAIT)


@pytest.mark.gen_test
async def test_collapser_sample_has_every_field_of_hystrix_serializer(clock):
    await send_batches(clock, [10, 3, 3, 1])
    sample = collapser_sample('get_user_in_tens')
    assert [field for field in HYSTRIX_COLLAPSER_FIELDS if sample.get(field) is None] == []
    assert sample['type'] == 'HystrixCollapser' and sample['name'] == 'get_user_in_tens'
    assert sample['currentTime'] == int(round(clock.wall() * 1000))
    assert sample['rollingCountRequestsBatched'] == 17
    assert sample['rollingCountBatches'] == 4
    assert sample['rollingCountResponsesFromCache'] == 0
    assert sample['batchSize_mean'] == 4   # 17 / 4, a whole number as Hystrix's int
    assert sorted(sample['batchSize']) == sorted(BATCH_SIZE_KEYS)
    assert sample['batchSize']['25'] == 1 and sample['batchSize']['50'] == 3
    assert sample['batchSize']['75'] == 3 and sample['batchSize']['100'] == 10
    assert sample['propertyValue_maxRequestsInBatch'] == 10
    assert sample['propertyValue_timerDelayInMilliseconds'] == 10
    assert sample['reportingHosts'] == 1
    assert sample['scope'] == 'request'


@pytest.mark.gen_test
async def test_the_stream_sends_collapsers_after_commands_and_pools(clock):
    await send_batches(clock, [2])
    types = [sample['type'] for sample in stream_samples()]
    assert types == ['HystrixCommand', 'HystrixThreadPool', 'HystrixCollapser']


@pytest.fixture
def app():
    return tornado.web.Application(routes('/blackgate'))


@pytest.mark.gen_test
async def test_the_hystrix_stream_carries_the_collapser_event(http_server, http_port, clock):
    await send_batches(clock, [5])
    client = await StreamClient(http_port).open('/blackgate/hystrix.stream?delay=20')
    try:
        data = await client.sample('get_user_in_tens', 'HystrixCollapser')
    finally:
        client.close()
    assert data['rollingCountBatches'] == 1 and data['rollingCountRequestsBatched'] == 5
    assert data['batchSize']['50'] == 5


def test_a_collapser_that_sent_nothing_has_zero_batch_sizes():
    sample = collapser_sample('never_used')
    assert sample['rollingCountBatches'] == 0 and sample['batchSize_mean'] == 0
    assert set(sample['batchSize'].values()) == {0}


# -- Prometheus ---------------------------------------------------------------------------

def prometheus_text():
    prometheus_client = pytest.importorskip('prometheus_client')
    from blackgate.prometheus import register
    registry = prometheus_client.CollectorRegistry()
    register(registry)
    return prometheus_client.generate_latest(registry).decode()


def samples_of(text):
    from prometheus_client.parser import text_string_to_metric_families
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


@pytest.mark.gen_test
async def test_prometheus_counts_batches_and_histograms_their_sizes(clock):
    await send_batches(clock, [10, 3, 3, 1])
    found = samples_of(prometheus_text())
    key = (('collapser', 'get_user_in_tens'),)
    assert found[('blackgate_collapser_batches_total', key)] == 4
    assert found[('blackgate_collapser_requests_batched_total', key)] == 17
    def bucket(le):
        return found[('blackgate_collapser_batch_size_bucket',
                      (('collapser', 'get_user_in_tens'), ('le', le)))]

    assert (bucket('1'), bucket('2'), bucket('5'), bucket('10'), bucket('+Inf')) \
        == (1, 1, 3, 4, 4)
    assert found[('blackgate_collapser_batch_size_count', key)] == 4
    assert found[('blackgate_collapser_batch_size_sum', key)] == 17


@pytest.mark.gen_test
async def test_promtool_has_nothing_to_say_about_the_collapser_series(clock):
    import os
    import shutil
    import subprocess
    await send_batches(clock, [4, 2])
    text = prometheus_text()
    promtool = shutil.which('promtool')
    if promtool is None:
        if os.environ.get('CI'):
            pytest.fail("promtool is not installed; .ci/run installs Debian's prometheus")
        pytest.skip('promtool is not installed (apt-get install prometheus)')
    result = subprocess.run([promtool, 'check', 'metrics'], input=text, capture_output=True,
                            text=True, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (0, '', '')
    assert 'blackgate_collapser_batch_size_bucket' in text


def test_a_collapser_that_sent_nothing_has_no_prometheus_series():
    component.collapser_metrics('looked_up_only')
    assert 'looked_up_only' not in prometheus_text()


@pytest.mark.gen_test
async def test_the_collapser_series_parse_strictly_as_openmetrics(clock):
    prometheus_client = pytest.importorskip('prometheus_client')
    from prometheus_client.openmetrics.exposition import generate_latest
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    from blackgate.prometheus import register
    await send_batches(clock, [3])
    registry = prometheus_client.CollectorRegistry()
    register(registry)
    text = generate_latest(registry).decode()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    assert families['blackgate_collapser_batch_size'].type == 'histogram'
    assert families['blackgate_collapser_batches'].type == 'counter'


@pytest.mark.gen_test
async def test_the_batch_commands_stream_counts_the_collapsed_requests(clock):
    from blackgate.web import command_sample
    await send_batches(clock, [10, 3])
    sample = command_sample('get_users')
    assert sample['rollingCountCollapsedRequests'] == 13
    assert sample['rollingCountSuccess'] == 2


@pytest.mark.gen_test
async def test_prometheus_counts_the_requests_a_command_answered_collapsed(clock):
    await send_batches(clock, [10, 3])
    found = samples_of(prometheus_text())
    labels = (('command', 'get_users'), ('group', 'default'))
    assert found[('blackgate_command_collapsed_requests_total', labels)] == 13
