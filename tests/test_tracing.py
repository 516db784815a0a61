"""blackgate.tracing: a span per execution, parented where the command was called.

Spans are read back from OpenTelemetry's SDK, with its in-memory exporter on a
tracer provider of the test's own (``{'backend': 'otel', 'tracer_provider': ...}``).
"""
import asyncio
import contextvars

import pytest

pytest.importorskip('opentelemetry.sdk')
from opentelemetry import trace  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter)
from opentelemetry.trace import StatusCode  # noqa: E402
import tornado.httpclient  # noqa: E402
import tornado.web  # noqa: E402

import blackgate.tracing  # noqa: E402
from blackgate import BadRequest, Command, CommandError, ConfigError, component  # noqa: E402
from blackgate.tracing import incoming, inject  # noqa: E402
from support import run_async  # noqa: E402

WAIT = 5.0


@pytest.fixture
def spans(clock):
    """Tracing on, into an in-memory exporter; spans() returns the finished spans by name."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    component.set('tracing', {'backend': 'otel', 'tracer_provider': provider})
    component.install()

    def finished():
        return {span.name: span for span in exporter.get_finished_spans()}

    finished.exporter = exporter
    finished.tracer = provider.get_tracer('tests')
    return finished


class Quote(Command):
    group_key = 'quotes'
    command_key = 'get_quote'

    def __init__(self, fail=False, inner=None):
        self.fail, self.inner = fail, inner

    def run(self):
        if self.inner is not None:
            with self.inner.start_as_current_span('inner'):
                pass
        if self.fail:
            raise ConnectionError('quote service down')
        return 'quote'

    def fallback(self):
        return 'cached quote'


class AsyncQuote(Command):
    command_key = 'get_quote_async'

    def __init__(self, inner=None):
        self.inner = inner

    async def run(self):
        if self.inner is not None:
            with self.inner.start_as_current_span('inner'):
                await asyncio.sleep(0)
        return 'quote'


def parent_of(span):
    return span.parent.span_id if span.parent is not None else None


def test_execute_is_a_span_child_of_the_callers_span(spans):
    component.add('executor_pool', {'group_key': 'quotes', 'max_workers': 2})
    component.install()
    with spans.tracer.start_as_current_span('request'):
        assert Quote().execute() == 'quote'
    found = spans()
    command, request = found['get_quote'], found['request']
    assert parent_of(command) == request.context.span_id
    assert command.context.trace_id == request.context.trace_id
    assert command.kind is trace.SpanKind.INTERNAL
    assert dict(command.attributes) == {
        'blackgate.command_key': 'get_quote', 'blackgate.group_key': 'quotes',
        'blackgate.pool.active_workers': 0, 'blackgate.pool.queued': 0,
        'blackgate.events': ('SUCCESS',), 'blackgate.circuit_breaker.state': 'closed'}
    assert command.status.status_code is StatusCode.UNSET


def test_a_failure_that_fell_back_is_an_error_span_that_says_so(spans):
    component.add('executor_pool', {'group_key': 'quotes', 'max_workers': 2})
    component.install()
    assert Quote(fail=True).execute() == 'cached quote'
    span = spans()['get_quote']
    assert span.attributes['blackgate.events'] == ('FAILURE', 'FALLBACK_SUCCESS')
    assert span.attributes['blackgate.fallback'] == 'successful'
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == 'FAILURE FALLBACK_SUCCESS'
    assert [event.name for event in span.events] == ['exception']
    assert span.events[0].attributes['exception.type'] == 'ConnectionError'


def test_a_short_circuited_call_without_fallback_shows_the_open_breaker(spans):
    class Closed(Command):
        command_key = 'closed_shop'
        circuit_breaker_force_open = True

        def run(self):
            return 'open'

    with pytest.raises(CommandError):
        Closed().execute()
    span = spans()['closed_shop']
    assert span.attributes['blackgate.events'] == ('SHORT_CIRCUITED', 'FALLBACK_MISSING')
    assert span.attributes['blackgate.fallback'] == 'missing'
    assert span.attributes['blackgate.circuit_breaker.state'] == 'open'
    assert span.status.status_code is StatusCode.ERROR


def test_a_bad_request_is_an_error_span_and_still_raises(spans):
    class Picky(Command):
        command_key = 'picky'

        def run(self):
            raise BadRequest('no such id')

    with pytest.raises(BadRequest):
        Picky().execute()
    span = spans()['picky']
    assert span.attributes['blackgate.events'] == ('BAD_REQUEST',)
    assert span.status.status_code is StatusCode.ERROR


def test_queue_is_a_span_child_of_the_current_span_and_parent_of_what_run_starts(spans):
    async def call():
        with spans.tracer.start_as_current_span('request'):
            return await AsyncQuote(inner=spans.tracer).queue()

    assert run_async(call()) == 'quote'
    found = spans()
    assert parent_of(found['get_quote_async']) == found['request'].context.span_id
    assert parent_of(found['inner']) == found['get_quote_async'].context.span_id
    assert found['get_quote_async'].attributes['blackgate.events'] == ('SUCCESS',)


def test_queue_on_a_pool_ends_its_span_when_the_future_resolves(spans):
    component.add('executor_pool', {'group_key': 'quotes', 'max_workers': 2})
    component.install()

    async def call():
        with spans.tracer.start_as_current_span('request'):
            future = Quote(fail=True).queue()
            assert 'get_quote' not in spans()     # still running
            return await future

    assert run_async(call()) == 'cached quote'
    found = spans()
    assert parent_of(found['get_quote']) == found['request'].context.span_id
    assert found['get_quote'].attributes['blackgate.fallback'] == 'successful'


_probe = contextvars.ContextVar('probe', default=None)


class Probe(Command):
    group_key = 'quotes'

    def run(self):
        return _probe.get()


def test_a_span_started_in_run_on_a_worker_thread_is_the_commands_child(spans):
    component.add('executor_pool', {'group_key': 'quotes', 'max_workers': 2})
    component.install()
    _probe.set('seen')
    if Probe().execute() != 'seen':
        pytest.skip("the pool does not run run() in a copy of the caller's context yet "
                    "(the pools' workers of issue 18 do)")
    with spans.tracer.start_as_current_span('request'):
        assert Quote(inner=spans.tracer).execute() == 'quote'
    found = spans()
    assert parent_of(found['inner']) == found['get_quote'].context.span_id
    assert parent_of(found['get_quote']) == found['request'].context.span_id


def test_with_tracing_off_no_span_is_made(clock):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    component.set('tracing', {'backend': 'otel', 'tracer_provider': provider})
    component.install()
    component.delete('tracing')
    component.install()
    assert component.tracer is None
    component.add('executor_pool', {'group_key': 'quotes', 'max_workers': 2})
    component.install()
    assert Quote().execute() == 'quote'
    headers = {}
    inject(headers)
    assert headers == {} and exporter.get_finished_spans() == ()


def test_tracing_is_applied_by_install_and_forgotten_by_reset(clock):
    component.set('tracing', {'backend': 'otel'})
    assert component.tracer is None
    component.install()
    assert isinstance(component.tracer, blackgate.tracing.OTelTracer)
    component.reset()
    assert component.tracer is None


@pytest.mark.parametrize('value, message', [
    ({'backend': 'zipkin'}, r"backend='zipkin'; expected one of 'otel'"),
    ({}, r"backend=None; expected one of 'otel'"),
    ({'backend': 'otel', 'sampler': 1}, r"unknown key 'sampler'"),
    ({'backend': 'otel', 'tracer_provider': object()}, r'has no get_tracer\(\) method'),
    ('otel', r"expected a dict such as \{'backend': 'otel'\}"),
])
def test_bad_tracing_settings_are_refused_at_once(value, message):
    with pytest.raises(ConfigError, match=message):
        component.set('tracing', value)


def test_without_opentelemetry_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setattr(blackgate.tracing, '_trace', None)
    with pytest.raises(ConfigError, match=r'needs the opentelemetry-api package'):
        component.set('tracing', {'backend': 'otel'})


# -- across HTTP: W3C traceparent ------------------------------------------------------------

class Upstream(tornado.web.RequestHandler):
    seen = []

    def get(self):
        Upstream.seen.append(self.request.headers.get('traceparent'))
        self.write('ok')


@pytest.fixture
def app():
    return tornado.web.Application([(r'/upstream', Upstream)])


class CallsUpstream(Command):
    command_key = 'calls_upstream'
    url = None

    async def run(self):
        headers = {}
        inject(headers)
        response = await tornado.httpclient.AsyncHTTPClient().fetch(self.url, headers=headers)
        return response.body.decode()


@pytest.mark.gen_test
async def test_inject_hands_the_commands_span_to_a_local_upstream(spans, http_server, http_port):
    Upstream.seen = []
    CallsUpstream.url = 'http://127.0.0.1:%d/upstream' % http_port
    with spans.tracer.start_as_current_span('request'):
        assert await CallsUpstream().queue() == 'ok'
    span = spans()['calls_upstream']
    [traceparent] = Upstream.seen
    version, trace_id, parent_id, flags = traceparent.split('-')
    assert version == '00' and int(flags, 16) & 1   # sampled
    assert int(trace_id, 16) == span.context.trace_id
    assert int(parent_id, 16) == span.context.span_id   # the upstream's parent: the command


def test_incoming_headers_make_the_clients_trace_the_commands_parent(spans):
    component.add('executor_pool', {'group_key': 'quotes', 'max_workers': 2})
    component.install()
    client = '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01'
    with incoming({'traceparent': client, 'tracestate': 'vendor=1'}):
        assert Quote().execute() == 'quote'
    span = spans()['get_quote']
    assert span.context.trace_id == 0x0af7651916cd43dd8448eb211c80319c
    assert parent_of(span) == 0xb7ad6b7169203331
    assert span.parent.is_remote
    assert span.context.trace_state.get('vendor') == '1'
    assert trace.get_current_span() is trace.INVALID_SPAN   # nothing left attached


@pytest.mark.gen_test
async def test_the_gateway_joins_the_clients_trace_and_passes_its_span_upstream(
        spans, http_server, http_port):
    from tornado.httpserver import HTTPServer
    from tornado.netutil import bind_sockets

    from blackgate import HTTPProxy, HTTPProxyCommand

    Upstream.seen = []
    component.add('executor_pool', {'group_key': 'traced', 'max_workers': 2})
    component.install()

    class Traced(HTTPProxyCommand):
        group_key = 'traced'
        command_key = 'traced_proxy'

        def before_request(self):
            self.request['url'] = 'http://127.0.0.1:%d%s' % (http_port, self.request['path'])

    sockets = bind_sockets(0, '127.0.0.1')
    server = HTTPServer(tornado.web.Application([(r'/(.*)', HTTPProxy, dict(command=Traced))]))
    server.add_sockets(sockets)
    client = '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01'
    try:
        response = await tornado.httpclient.AsyncHTTPClient().fetch(
            'http://127.0.0.1:%d/upstream' % sockets[0].getsockname()[1],
            headers={'traceparent': client})
    finally:
        server.stop()
    assert response.body == b'ok'
    span = spans()['traced_proxy']
    assert span.context.trace_id == 0x0af7651916cd43dd8448eb211c80319c   # the client's trace
    assert parent_of(span) == 0xb7ad6b7169203331
    [traceparent] = Upstream.seen
    _, trace_id, parent_id, _ = traceparent.split('-')
    assert int(trace_id, 16) == span.context.trace_id
    assert int(parent_id, 16) == span.context.span_id   # not the client's own span id
