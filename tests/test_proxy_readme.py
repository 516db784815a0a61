"""The README's gateway example, run as written, against a local upstream that echoes.

Only the upstream's address changes: ``http://intra.service.com`` becomes the
echo upstream on 127.0.0.1 (``INTRA_SERVICE``, set by the fixture). The
application is built and served exactly as the example builds it.
"""
import base64
import json

import pytest
import tornado.web
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from blackgate import Event, HTTPProxy, HTTPProxyCommand, component
from proxy_upstream import (TEST_TIMEOUT, WAIT, Gateway, Reply, Upstream,  # noqa: F401
                            closed_port)

pytestmark = pytest.mark.gen_test(timeout=TEST_TIMEOUT)

#: Where intra.service.com is, for these tests.
INTRA_SERVICE = 'http://intra.service.com'


# -- the example, as written in the README (only the upstream's address differs) -----------

class APIService(HTTPProxyCommand):
    group_key = 'api.v1'
    command_key = 'proxy_v1_traffic'

    def before_request(self):
        path = self.request['path'].replace('/api', '')
        self.request['url'] = INTRA_SERVICE + path

    def fallback(self):
        return dict(status_code=500, reason='Internal Server Error', headers={},
                    content=json.dumps({'code': 500, 'message': 'internal server error', 'error': {}}))


def make_app():
    component.add('executor_pool', {'group_key': 'api.v1', 'max_workers': 10})
    component.install()
    app = tornado.web.Application([(r'/api/v1/(.*)', HTTPProxy, dict(command=APIService))])
    return app


# -- serving it ---------------------------------------------------------------------------------

@pytest.fixture
def intra_service(monkeypatch):
    with Upstream() as server:
        monkeypatch.setitem(globals(), 'INTRA_SERVICE', server.url)
        yield server


@pytest.fixture
def service_down(monkeypatch):
    monkeypatch.setitem(globals(), 'INTRA_SERVICE',
                        'http://127.0.0.1:%d' % closed_port())


@pytest.fixture
def api(io_loop):
    sockets = bind_sockets(0, '127.0.0.1')
    server = HTTPServer(make_app())
    server.add_sockets(sockets)
    yield Gateway(sockets[0].getsockname()[1])
    server.stop()
    io_loop.run_sync(server.close_all_connections, timeout=WAIT)


async def test_the_example_forwards_to_the_upstream_without_the_api_prefix(intra_service, api):
    response = await api.fetch('GET', '/api/v1/users/42?expand=profile&expand=roles',
                               [('Accept', 'application/json'), ('X-Request-Id', 'r-1')])
    assert response.status == 200
    echoed = response.json()   # what the upstream received, as it echoes it
    assert echoed['method'] == 'GET'
    assert echoed['target'] == '/v1/users/42?expand=profile&expand=roles'
    fields = [tuple(field) for field in echoed['headers']]
    assert ('Accept', 'application/json') in fields and ('X-Request-Id', 'r-1') in fields
    assert ('X-Forwarded-For', '127.0.0.1') in fields
    assert ('Host', '127.0.0.1:%d' % intra_service.port) in fields
    assert component.metrics('proxy_v1_traffic').rolling_count(Event.SUCCESS) == 1


async def test_the_example_forwards_a_request_body(intra_service, api):
    body = b'{"name": "Ada", "role": "admin"}'
    response = await api.fetch('POST', '/api/v1/users', [('Content-Type', 'application/json')],
                               body)
    echoed = response.json()
    assert (echoed['method'], echoed['target']) == ('POST', '/v1/users')
    assert base64.b64decode(echoed['body']) == body


async def test_the_examples_fallback_answers_when_the_upstream_is_down(service_down, api):
    response = await api.fetch('GET', '/api/v1/users/42')
    assert (response.status, response.reason) == (500, 'Internal Server Error')
    assert response.json() == {'code': 500, 'message': 'internal server error', 'error': {}}
    assert response.values('X-Blackgate-Error') == []
    events = component.metrics('proxy_v1_traffic')
    assert events.rolling_count(Event.FAILURE) == 1
    assert events.rolling_count(Event.FALLBACK_SUCCESS) == 1


async def test_the_examples_fallback_answers_an_upstream_5xx(intra_service, api):
    intra_service.respond = lambda received: Reply(502, 'Bad Gateway', body=b'upstream of upstream')
    response = await api.fetch('GET', '/api/v1/users/42')
    assert response.status == 500
    assert response.json()['message'] == 'internal server error'


# -- the prefix-safe rewrite the README shows next to it ---------------------------------------

class PrefixSafe(HTTPProxyCommand):
    group_key = 'api.v1'
    command_key = 'proxy_v1_prefix_safe'

    def before_request(self):
        path = self.request['path']
        if path.startswith('/api/'):
            path = path[len('/api'):]          # /api/v1/apiary/3 -> /v1/apiary/3
        self.request['url'] = INTRA_SERVICE + path


@pytest.fixture
def prefix_safe_api(io_loop):
    component.add('executor_pool', {'group_key': 'api.v1', 'max_workers': 10})
    component.install()
    sockets = bind_sockets(0, '127.0.0.1')
    server = HTTPServer(tornado.web.Application([HTTPProxy.route(r'/api/v1/.*', PrefixSafe)]))
    server.add_sockets(sockets)
    yield Gateway(sockets[0].getsockname()[1])
    server.stop()
    io_loop.run_sync(server.close_all_connections, timeout=WAIT)


async def test_the_seed_rewrite_mangles_a_path_with_api_inside_it(intra_service, api):
    response = await api.fetch('GET', '/api/v1/apiary/3')
    assert response.json()['target'] == '/v1ary/3'   # why the README shows the next one


async def test_the_prefix_safe_rewrite_keeps_the_rest_of_the_path(intra_service,
                                                                 prefix_safe_api):
    response = await prefix_safe_api.fetch('GET', '/api/v1/apiary/3?q=/api')
    assert response.status == 200
    assert response.json()['target'] == '/v1/apiary/3?q=/api'
