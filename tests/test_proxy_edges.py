"""HTTPProxy and GatewayServer at the protocol's edges: every answer is the gateway's JSON.

No Tornado HTML page and no bare status line reaches a client: faulty framing,
targets no route matches, an over-long request head and a body over the
server's limit all get the short JSON error with ``X-Blackgate-Error``.
"""
import pytest
import tornado.web

from blackgate.gateway import build_application, load_config
from blackgate.proxy import GatewayNotFound, HTTPProxy
from blackgate.server import listen
from proxy_upstream import (TEST_TIMEOUT, WAIT, Gateway, fetch, forward_to,  # noqa: F401
                            install_pool, upstream)

pytestmark = pytest.mark.gen_test(timeout=TEST_TIMEOUT)


def assert_json_error(response, status, marker):
    assert response.status == status
    assert response.header('Content-Type') == 'application/json'
    assert response.header('X-Blackgate-Error') == marker
    body = response.json()
    assert set(body) == {'error', 'command_key', 'failure_type'}
    assert b'<html' not in response.body.lower()
    return body


@pytest.fixture
def served(io_loop):
    """Serve an application on a GatewayServer: ``served(app, **server settings)``."""
    servers = []

    def start(app, **settings):
        server = listen(app, 0, '127.0.0.1', **settings)
        servers.append(server)
        return Gateway(server.bound_addresses[0][1])

    yield start
    for server in servers:
        server.stop()
        io_loop.run_sync(server.close_all_connections, timeout=WAIT)


@pytest.fixture
def api(upstream, served):
    """A gateway with one prefix route, /api/, and the gateway's default handler."""
    install_pool('proxy')
    route = (r'/api/.*', HTTPProxy, dict(command=forward_to(upstream.url)))
    app = tornado.web.Application([route], default_handler_class=GatewayNotFound)
    return served(app, max_body_size=1000)


# -- framing -------------------------------------------------------------------------------

@pytest.mark.parametrize('fields', [
    'Transfer-Encoding: chunked\r\n',
    'Transfer-Encoding: chunked\r\nConnection: keep-alive\r\n',
], ids=['plain', 'keep-alive'])
async def test_chunked_framing_on_an_http_1_0_request_is_400_and_the_connection_closes(
        api, upstream, fields):
    raw = ('POST /api/x HTTP/1.0\r\nHost: gw\r\n%s\r\n5\r\nhello\r\n0\r\n\r\n'
           'GET /api/smuggled HTTP/1.0\r\n\r\n' % (fields,)).encode()
    response = await fetch(api.port, raw=raw)   # reads to the close: one answer only
    assert_json_error(response, 400, 'bad-request')
    assert response.extra == b''
    assert upstream.received == []


async def test_chunked_framing_on_an_http_1_1_request_is_forwarded(api, upstream):
    raw = (b'POST /api/x HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n'
           b'Connection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n')
    response = await fetch(api.port, raw=raw)
    assert response.status == 200
    assert upstream.received[-1].body == b'hello'


# -- targets no route matches --------------------------------------------------------------

async def test_options_asterisk_gets_the_gateways_json_400(api, upstream):
    response = await api.fetch('OPTIONS', '*')
    body = assert_json_error(response, 400, 'bad-request')
    assert body['error'] == 'bad request target'
    assert upstream.received == []


@pytest.mark.parametrize('target', ['http://elsewhere.example/api/x', '/nowhere'])
async def test_a_target_no_route_matches_gets_the_gateways_json_404(api, upstream, target):
    response = await api.fetch('GET', target)
    body = assert_json_error(response, 404, 'no-route')
    assert body == {'error': 'no route', 'command_key': None, 'failure_type': None}
    assert upstream.received == []


async def test_an_unroutable_post_is_answered_without_reading_its_body(api):
    response = await api.fetch('POST', '/nowhere', body=b'x' * 500)
    assert_json_error(response, 404, 'no-route')


async def test_the_gateway_program_answers_an_unrouted_target_with_json(tmp_path, served):
    path = tmp_path / 'gateway.yaml'
    path.write_text('routes:\n  - {prefix: /api, upstream: "http://127.0.0.1:9"}\n')
    config = load_config(str(path))
    gateway = served(build_application(config))
    for method, target, status in (('OPTIONS', '*', 400),
                                   ('GET', 'http://elsewhere.example/x', 404),
                                   ('GET', '/other', 404)):
        response = await gateway.fetch(method, target)
        assert_json_error(response, status, 'bad-request' if status == 400 else 'no-route')


# -- what Tornado answers before any handler runs ------------------------------------------

async def test_a_70_kb_request_target_is_answered_431_not_dropped(api, upstream):
    response = await api.fetch('GET', '/api/' + 'a' * 70 * 1024)
    body = assert_json_error(response, 431, 'head-too-large')
    assert body['error'] == 'request head too large'
    assert upstream.received == []


async def test_a_head_over_max_header_size_is_431(upstream, served):
    install_pool('proxy')
    route = (r'/api/.*', HTTPProxy, dict(command=forward_to(upstream.url)))
    gateway = served(tornado.web.Application([route]), max_header_size=4096)
    response = await gateway.fetch('GET', '/api/x', headers=[('X-Big', 'b' * 5000)])
    assert_json_error(response, 431, 'head-too-large')
    assert (await gateway.fetch('GET', '/api/x', headers=[('X-Small', 'b' * 100)])).status == 200


async def test_a_buffering_route_without_a_limit_of_its_own_gets_413_json_from_the_server(
        upstream, served):
    install_pool('proxy')
    command = forward_to(upstream.url, 'Buffered', buffer_body=True)
    app = tornado.web.Application([(r'/.*', HTTPProxy, dict(command=command, max_body_size=None))])
    gateway = served(app, max_body_size=1000)
    response = await gateway.fetch('POST', '/x', body=b'x' * 5000)
    assert_json_error(response, 413, 'body-too-large')
    assert upstream.received == []
    assert (await gateway.fetch('POST', '/x', body=b'x' * 500)).status == 200


async def test_a_malformed_content_length_is_400_json_not_a_bare_status_line(api, upstream):
    response = await api.fetch('POST', '/api/x', headers=[('Content-Length', 'abc')])
    assert_json_error(response, 400, 'bad-request')
    assert upstream.received == []


async def test_a_body_that_spells_tornados_bare_400_is_sent_unchanged(served):
    bare = b'HTTP/1.1 400 Bad Request\r\n\r\n'

    class Spells(tornado.web.RequestHandler):
        async def get(self):
            self.set_header('Content-Length', len(bare))
            await self.flush()   # the head goes alone; the body is a write of its own
            self.finish(bare)

    gateway = served(tornado.web.Application([('/spells', Spells)]))
    response = await gateway.fetch('GET', '/spells')
    assert (response.status, response.body) == (200, bare)
