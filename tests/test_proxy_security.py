"""HTTPProxy, security: the client cannot pick the host, smuggle, inject or share state.

A second upstream plays the host an attacker would like to reach: it must never
receive anything.
"""
import pytest

from blackgate import HTTPProxyCommand, component
from proxy_upstream import (TEST_TIMEOUT, Raw, Reply, Upstream, closed_port,  # noqa: F401
                            gateway, install_pool, upstream)

pytestmark = pytest.mark.gen_test(timeout=TEST_TIMEOUT)


@pytest.fixture
def elsewhere():
    """The host an attacker would like the gateway to call."""
    with Upstream() as server:
        yield server


class ApiV1(HTTPProxyCommand):
    """The README's way: a fixed base plus the path."""

    group_key = 'proxy'
    base = ''

    def before_request(self):
        path = self.request['path'].replace('/api', '')
        self.request['url'] = self.base + path


@pytest.fixture
def api(upstream, gateway):
    install_pool('proxy')
    ApiV1.base = upstream.url
    return gateway(ApiV1, r'(.*)')   # a catch-all route: even odd targets reach the handler


async def test_an_absolute_form_target_cannot_change_the_upstream_host(api, upstream, elsewhere):
    raw = ('GET http://127.0.0.1:%d/api/v1/steal?x=1 HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n'
           'Connection: close\r\n\r\n' % (elsewhere.port, elsewhere.port)).encode()
    response = await api.fetch(raw=raw)
    assert response.status == 200
    assert [received.target for received in upstream.received] == ['/v1/steal?x=1']
    assert upstream.received[-1].header('Host') == '127.0.0.1:%d' % upstream.port
    assert elsewhere.received == []


@pytest.mark.parametrize('target', [
    '//127.0.0.1:{port}/steal',
    '/@127.0.0.1:{port}/steal',
    '/..//127.0.0.1:{port}/steal',
    '/%2F%2F127.0.0.1:{port}/steal',
    '/\\\\127.0.0.1:{port}/steal',
])
async def test_a_path_that_looks_like_a_host_stays_a_path(api, upstream, elsewhere, target):
    target = target.format(port=elsewhere.port)
    response = await api.fetch('GET', target)
    assert response.status == 200
    assert upstream.received[-1].target == target
    assert elsewhere.received == []


@pytest.mark.parametrize('target', ['*', 'example.com:443', '/page#fragment'])
async def test_targets_that_are_not_paths_are_refused_400(api, upstream, target):
    response = await api.fetch('OPTIONS', target)
    assert response.status == 400
    assert response.header('X-Blackgate-Error') == 'bad-request'
    assert upstream.received == []


@pytest.mark.parametrize('method', ['TRACE', 'CONNECT', 'PROPFIND'])
async def test_methods_outside_the_list_are_not_forwarded(api, upstream, method):
    response = await api.fetch(method, '/api/v1/x')
    assert response.status == 405
    assert response.header('Allow') == 'GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS'
    assert response.json() == {'error': 'method not allowed', 'command_key': 'ApiV1',
                               'failure_type': None}
    assert upstream.received == []


async def test_both_content_length_and_transfer_encoding_are_refused(api, upstream):
    # the classic request-smuggling shape: never forwarded, whatever the framing chosen
    raw = (b'POST /api/v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n'
           b'Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /api/v1/admin HTTP/1.1\r\nHost: x\r\n\r\n')
    response = await api.fetch(raw=raw)
    assert response.status == 400
    assert upstream.received == []


async def test_no_cookie_passes_from_one_client_to_another(api, upstream):
    upstream.respond = lambda received: Reply(headers=[
        ('Set-Cookie', 'session=alice-secret; Path=/'),
        ('Set-Cookie', 'session=alice-secret; Domain=127.0.0.1; Path=/')])
    response = await api.fetch('GET', '/api/v1/login')
    assert len(response.values('Set-Cookie')) == 2
    upstream.respond = lambda received: Reply()
    await api.fetch('GET', '/api/v1/profile')   # another client, no Cookie of its own
    assert upstream.received[-1].values('Cookie') == []
    assert len(component.session.cookies) == 0


async def test_proxy_and_netrc_settings_from_the_environment_are_ignored(api, upstream, tmp_path,
                                                                        monkeypatch):
    netrc = tmp_path / 'netrc'
    netrc.write_text('machine 127.0.0.1 login leaked password hunter2\n')
    netrc.chmod(0o600)
    monkeypatch.setenv('NETRC', str(netrc))
    bogus_proxy = 'http://127.0.0.1:%d' % closed_port()
    for name in ('HTTP_PROXY', 'http_proxy', 'HTTPS_PROXY', 'ALL_PROXY', 'all_proxy'):
        monkeypatch.setenv(name, bogus_proxy)
    monkeypatch.delenv('NO_PROXY', raising=False)
    monkeypatch.delenv('no_proxy', raising=False)
    response = await api.fetch('GET', '/api/v1/x')
    assert response.status == 200   # sent straight to the upstream, not to the "proxy"
    assert upstream.received[-1].values('Authorization') == []


async def test_line_breaks_in_a_response_field_cannot_split_the_response(upstream, gateway):
    install_pool('proxy')

    class Injected(HTTPProxyCommand):
        group_key = 'proxy'

        def before_request(self):
            self.request['url'] = 'http://127.0.0.1:%d/' % closed_port()

        def fallback(self):
            return {'status_code': 200, 'reason': 'OK',
                    'headers': [('X-Note', 'a\r\nSet-Cookie: injected=1\r\n\r\n<html>')],
                    'content': b'fallback'}

    proxy = gateway(Injected)
    response = await proxy.fetch('GET', '/')
    assert response.status == 200
    assert response.values('Set-Cookie') == []
    assert response.header('X-Note') == 'a  Set-Cookie: injected=1    <html>'
    assert response.body == b'fallback' and response.extra == b''


async def test_a_folded_upstream_field_is_unfolded_not_passed_raw(api, upstream):
    upstream.respond = lambda received: Raw(
        b'HTTP/1.1 200 OK\r\nX-Folded: first\r\n second\r\nContent-Length: 2\r\n\r\nok')
    response = await api.fetch('GET', '/api/v1/x')
    assert response.status == 200
    assert response.header('X-Folded') == 'first second'
    assert response.body == b'ok' and response.extra == b''


async def test_a_bare_cr_in_an_upstream_field_cannot_inject_a_field(api, upstream, caplog):
    # email.parser, under http.client, would end the line at the bare CR (RFC 9112 §2.2)
    upstream.respond = lambda received: Raw(
        b'HTTP/1.1 200 OK\r\nX-Note: a\rSet-Cookie: session=attacker\r\n'
        b'Content-Type: \r\r\nContent-Length: 2\r\n\r\nok')
    response = await api.fetch('GET', '/api/v1/x')
    assert response.status == 200
    assert response.values('Set-Cookie') == []
    assert response.header('X-Note') == 'a Set-Cookie: session=attacker'
    assert response.body == b'ok' and response.extra == b''
    assert 'Traceback' not in caplog.text and 'Failed to parse headers' not in caplog.text


async def test_whitespace_before_an_upstream_fields_colon_is_removed(api, upstream):
    # RFC 9112 §5.1: a proxy removes it before forwarding
    upstream.respond = lambda received: Raw(
        b'HTTP/1.1 200 OK\r\nX-Spaced : yes\r\nContent-Length: 2\r\n\r\nok')
    response = await api.fetch('GET', '/api/v1/x')
    assert response.status == 200
    assert response.header('X-Spaced') == 'yes'
    assert response.body == b'ok'
