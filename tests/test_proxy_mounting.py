"""Mounting HTTPProxy: a wrong route fails at start-up with HTTPProxy.route(), and
answers a clean 500 (one log line, no traceback) when mounted by hand; a
before_request() that sets no URL is the gateway's fault, not the upstream's.
"""
import logging

import pytest
import tornado.web
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from blackgate import BreakerState, Command, ConfigError, Event, HTTPProxy, HTTPProxyCommand, \
    component
from proxy_upstream import TEST_TIMEOUT, fetch, gateway, install_pool  # noqa: F401

pytestmark = pytest.mark.gen_test(timeout=TEST_TIMEOUT)


class Plain(Command):
    def run(self):
        return 'not a proxy'


class Forward(HTTPProxyCommand):
    group_key = 'proxy'

    def before_request(self):
        self.request['url'] = 'http://127.0.0.1:9/' + self.request['path']


@pytest.mark.parametrize('command, settings, message', [
    (Plain, {}, r'command=<class .*Plain.*>; expected a subclass of HTTPProxyCommand'),
    (Forward({}), {}, r'command=an instance of Forward; expected a subclass'),
    (None, {}, r'no command: route it as dict\(command='),
    (Forward, {'max_bdy_size': 10}, r"unknown setting 'max_bdy_size'"),
    (Forward, {'websocket': 'yes'}, r"websocket='yes'; expected True or False"),
    (Forward, {'max_body_size': -1}, r'max_body_size=-1; expected a number of bytes'),
])
def test_route_refuses_a_wrong_mount_at_start_up(command, settings, message):
    with pytest.raises(ConfigError, match=message):
        HTTPProxy.route(r'/api/(.*)', command, **settings)


def test_route_builds_the_same_route_as_the_dict():
    assert HTTPProxy.route(r'/api/(.*)', Forward, websocket=True) == \
        (r'/api/(.*)', HTTPProxy, {'command': Forward, 'websocket': True})


@pytest.mark.parametrize('kwargs', [dict(command=Plain), dict(command=Forward({})), dict()])
async def test_a_wrong_mount_answers_500_with_one_log_line(io_loop, caplog, kwargs):
    app = tornado.web.Application([(r'/(.*)', HTTPProxy, kwargs)])
    sockets = bind_sockets(0, '127.0.0.1')
    server = HTTPServer(app)
    server.add_sockets(sockets)
    try:
        response = await fetch(sockets[0].getsockname()[1], 'GET', '/x')
    finally:
        server.stop()
    assert response.status == 500
    assert response.json()['error'] == 'gateway misconfigured'
    assert response.header('X-Blackgate-Error') == 'misconfigured'
    assert 'Traceback' not in caplog.text
    records = [r for r in caplog.records if r.name == 'blackgate']
    assert len(records) == 1 and records[0].levelno == logging.ERROR
    assert 'HTTPProxyCommand' in records[0].getMessage()
    assert [r for r in caplog.records if r.name in ('tornado.application', 'tornado.general')] == []


async def test_before_request_without_a_url_is_a_500_not_counted_against_the_breaker(
        gateway, caplog):
    install_pool('proxy')

    class NoURL(HTTPProxyCommand):
        group_key = 'proxy'
        circuit_breaker_request_volume_threshold = 2
        metrics_health_snapshot_interval = 0

        def before_request(self):
            pass   # forgot to set self.request['url']

    proxy = gateway(NoURL)
    for _ in range(5):
        response = await proxy.fetch('GET', '/x')
        assert response.status == 500
        assert response.header('X-Blackgate-Error') == 'misconfigured'
    metrics = component.metrics('NoURL')
    assert metrics.rolling_count(Event.BAD_REQUEST) == 5
    assert metrics.rolling_count(Event.FAILURE) == 0
    assert component.circuit_breaker('NoURL').state is BreakerState.CLOSED
    records = [r for r in caplog.records if r.name == 'blackgate']
    assert len(records) == 5 and all("must set self.request['url']" in r.getMessage()
                                     for r in records)
    assert 'Traceback' not in caplog.text
