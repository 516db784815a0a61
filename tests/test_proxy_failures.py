"""HTTPProxy, failures: what the client gets when the upstream or the gateway cannot answer.

A fault-injecting upstream refuses, resets, stalls, truncates and talks garbage;
the gateway must answer 502, 503 or 504 with a short JSON body, log no traceback,
and leave no worker busy. Most tests run on the FakeClock (the command's own
timer never fires; the HTTP client's timeout is real seconds); the timeout tests
use real time.
"""
import asyncio
import json

import pytest

from blackgate import BadRequest, BreakerState, Event, HTTPProxyCommand, component
from proxy_upstream import (TEST_TIMEOUT, WAIT, Raw, Reply, Reset, Stall, answer,  # noqa: F401
                            closed_port, drained, forward_to, gateway, install_pool,
                            request_bytes, upstream)

pytestmark = pytest.mark.gen_test(timeout=TEST_TIMEOUT)

ERROR_FIELDS = {'error', 'command_key', 'failure_type'}


def assert_gateway_error(response, status, marker, failure_type):
    assert response.status == status
    assert response.header('X-Blackgate-Error') == marker
    assert response.header('Content-Type') == 'application/json'
    body = response.json()
    assert set(body) == ERROR_FIELDS
    assert body['failure_type'] == failure_type
    return body


def assert_no_crash_logged(caplog):
    assert [record for record in caplog.records if record.exc_info] == []
    assert 'Traceback' not in caplog.text
    assert [record for record in caplog.records
            if record.name in ('tornado.application', 'tornado.general', 'asyncio')] == []


#: What a sick upstream can do, and what the gateway answers for it.
FAULTS = {
    'resets before answering': (Reset(), 502),
    'closes without answering': (Raw(b''), 502),
    'resets mid-response': (Raw(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial', reset=True), 502),
    'truncates its body': (Raw(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this'), 502),
    'truncates a chunked body': (Raw(b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n'
                                     b'5\r\nhello\r\n9\r\nwor'), 502),
    'sends a garbage status line': (Raw(b'SSH-2.0-OpenSSH_9.6\r\n\r\n'), 502),
    'sends a malformed status code': (Raw(b'HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n'), 502),
    'sends two different lengths': (Raw(b'HTTP/1.1 200 OK\r\nContent-Length: 3\r\n'
                                        b'Content-Length: 5\r\n\r\nabcde'), 502),
    'sends a line that is no field': (Raw(b'HTTP/1.1 200 OK\r\nthis is not a field\r\n'
                                          b'Content-Length: 2\r\n\r\nok'), 502),
}


@pytest.mark.parametrize('fault', sorted(FAULTS))
async def test_a_broken_upstream_gets_502_and_no_traceback(upstream, gateway, caplog, fault):
    install_pool('proxy')
    action, status = FAULTS[fault]
    upstream.respond = answer(action)
    proxy = gateway(forward_to(upstream.url))
    response = await proxy.fetch('GET', '/')
    assert_gateway_error(response, status, 'bad-gateway', 'COMMAND_EXCEPTION')
    assert response.json()['command_key'] == 'Forward'
    await drained('proxy')
    assert_no_crash_logged(caplog)
    assert component.metrics('Forward').rolling_count(Event.FAILURE) == 1


async def test_a_refused_connection_gets_502(gateway, caplog):
    install_pool('proxy')
    proxy = gateway(forward_to('http://127.0.0.1:%d' % closed_port()))
    response = await proxy.fetch('GET', '/')
    body = assert_gateway_error(response, 502, 'bad-gateway', 'COMMAND_EXCEPTION')
    assert body == {'error': 'bad gateway', 'command_key': 'Forward',
                    'failure_type': 'COMMAND_EXCEPTION'}
    assert_no_crash_logged(caplog)
    # logged once, on one line, naming the key, the event and the cause
    [record] = [record for record in caplog.records if record.name == 'blackgate']
    assert 'Forward FAILURE' in record.getMessage()
    assert 'ConnectionRefusedError' in record.getMessage()


async def test_a_slow_upstream_gets_504_at_the_commands_timeout(upstream, gateway, system_clock,
                                                                caplog):
    install_pool('proxy')
    upstream.respond = answer(Stall(3.0))
    proxy = gateway(forward_to(upstream.url, timeout=0.3))
    started = system_clock.monotonic()
    response = await proxy.fetch('GET', '/')
    assert system_clock.monotonic() - started < 2.5
    assert_gateway_error(response, 504, 'timeout', 'TIMEOUT')
    await drained('proxy')   # the worker's own read timeout frees it soon after
    assert_no_crash_logged(caplog)


async def test_the_http_clients_read_timeout_also_gives_504(upstream, gateway, caplog):
    # On the FakeClock the command's timer never fires: the HTTP client's does.
    install_pool('proxy')
    upstream.respond = answer(Stall(3.0))
    proxy = gateway(forward_to(upstream.url, timeout=0.3))
    response = await proxy.fetch('GET', '/')
    assert_gateway_error(response, 504, 'timeout', 'COMMAND_EXCEPTION')
    assert_no_crash_logged(caplog)


async def test_a_body_that_stalls_midway_gets_504(upstream, gateway, caplog):
    install_pool('proxy')
    upstream.respond = answer(Raw(b'HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf', hold=3.0))
    proxy = gateway(forward_to(upstream.url, timeout=0.3))
    response = await proxy.fetch('GET', '/')
    assert_gateway_error(response, 504, 'timeout', 'COMMAND_EXCEPTION')
    assert_no_crash_logged(caplog)


async def test_the_fault_injecting_upstream_gets_only_502_503_504(upstream, gateway, caplog,
                                                                  system_clock):
    """Done-when 3: every fault in turn, then together; never a 500, no traceback, no busy worker."""
    install_pool('proxy', max_workers=3)
    actions = [action for action, _ in FAULTS.values()] + [Stall(3.0)]
    upstream.respond = lambda received: actions[int(received.target.strip('/')) % len(actions)]
    refused = forward_to('http://127.0.0.1:%d' % closed_port(), 'Refused', timeout=0.5)
    sick = gateway(forward_to(upstream.url, 'Sick', timeout=0.5))
    down = gateway(refused)
    statuses = set()
    for round_ in range(2):   # one by one, then all at once (the pool rejects some: 503)
        requests = [sick.fetch('GET', '/%d' % n) for n in range(len(actions))]
        requests += [down.fetch('GET', '/') for _ in range(2)]
        if round_ == 0:
            responses = [await request for request in requests]
        else:
            responses = await asyncio.gather(*requests)
        for response in responses:
            statuses.add(response.status)
            assert response.status in (502, 503, 504), response
            assert set(response.json()) == ERROR_FIELDS
            assert response.header('X-Blackgate-Error') is not None
            assert b'Traceback' not in response.body and b'127.0.0.1' not in response.body
    assert {502, 504} <= statuses
    await drained('proxy')
    assert_no_crash_logged(caplog)


async def test_an_upstream_answering_503s_trips_the_breaker_until_it_recovers(upstream, gateway,
                                                                            clock):
    """Done-when 4: 503s open the breaker; the gateway answers for it; the trial closes it."""
    install_pool('proxy')
    upstream.respond = answer(Reply(503, 'Service Unavailable', body=b'sick'))
    command = forward_to(upstream.url, 'Flaky', circuit_breaker_request_volume_threshold=4,
                         circuit_breaker_sleep_window=5.0, metrics_health_snapshot_interval=0)
    proxy = gateway(command)
    for _ in range(4):
        response = await proxy.fetch('GET', '/')
        assert (response.status, response.body) == (503, b'sick')   # the upstream's own
    breaker = component.circuit_breaker('Flaky')
    assert breaker.state is BreakerState.OPEN

    hits = len(upstream.received)
    for _ in range(3):
        response = await proxy.fetch('GET', '/')
        assert_gateway_error(response, 503, 'short-circuited', 'SHORTCIRCUIT')
        assert response.header('Retry-After') == '5'
    assert len(upstream.received) == hits   # the upstream was left alone

    upstream.respond = answer(Reply(body=b'healthy'))
    clock.advance(5.0)
    response = await proxy.fetch('GET', '/')   # the one trial
    assert (response.status, response.body) == (200, b'healthy')
    assert breaker.state is BreakerState.CLOSED
    assert (await proxy.fetch('GET', '/')).status == 200


async def test_a_full_pool_gets_503_with_retry_after(upstream, gateway):
    install_pool('proxy', max_workers=1)
    upstream.respond = lambda received: Stall(1.0) if received.target == '/slow' else Reply()
    proxy = gateway(forward_to(upstream.url))
    slow = asyncio.ensure_future(proxy.fetch('GET', '/slow'))
    for _ in range(int(WAIT / 0.01)):
        if upstream.received:
            break
        await asyncio.sleep(0.01)
    response = await proxy.fetch('GET', '/fast')
    assert_gateway_error(response, 503, 'rejected', 'REJECTED_THREAD_EXECUTION')
    assert response.header('Retry-After') == '1'
    assert (await slow).status == 200
    assert [received.target for received in upstream.received] == ['/slow']


async def test_bad_request_from_before_request_gets_400(upstream, gateway):
    install_pool('proxy')

    class Versioned(HTTPProxyCommand):
        group_key = 'proxy'

        def before_request(self):
            if not self.request['path'].startswith('/v1/'):
                raise BadRequest('unknown API version in %s' % self.request['path'])
            self.request['url'] = upstream.url + self.request['path']

    proxy = gateway(Versioned)
    response = await proxy.fetch('GET', '/v9/users')
    body = assert_gateway_error(response, 400, 'bad-request', 'BAD_REQUEST')
    assert 'unknown API version' not in response.body.decode()
    assert body['command_key'] == 'Versioned'
    assert upstream.received == []
    assert component.metrics('Versioned').rolling_count(Event.BAD_REQUEST) == 1
    assert (await proxy.fetch('GET', '/v1/users')).status == 200


async def test_a_client_that_leaves_mid_request_frees_its_slot_quietly(upstream, gateway, caplog):
    install_pool('proxy', max_workers=1)
    upstream.respond = answer(Stall(0.5))
    proxy = gateway(forward_to(upstream.url))
    reader, writer = await asyncio.open_connection('127.0.0.1', proxy.port)
    writer.write(request_bytes('GET', '/leaving', port=proxy.port))
    await writer.drain()
    for _ in range(int(WAIT / 0.01)):
        if upstream.received:
            break
        await asyncio.sleep(0.01)
    writer.close()   # gone before the upstream answers
    await drained('proxy')
    await asyncio.sleep(0.05)   # let the gateway finish the request it was serving
    assert_no_crash_logged(caplog)
    assert component.metrics('Forward').rolling_count(Event.SUCCESS) == 1
    upstream.respond = answer(Reply(body=b'next'))
    response = await proxy.fetch('GET', '/')   # the one worker is free again
    assert (response.status, response.body) == (200, b'next')


async def test_a_client_that_leaves_mid_body_is_not_forwarded_and_not_logged(upstream, gateway,
                                                                              caplog):
    install_pool('proxy')
    proxy = gateway(forward_to(upstream.url))
    reader, writer = await asyncio.open_connection('127.0.0.1', proxy.port)
    writer.write(request_bytes('POST', '/', [('Content-Length', '1000')], port=proxy.port)
                 + b'only the first bytes')
    await writer.drain()
    writer.close()
    await asyncio.sleep(0.2)
    assert (await proxy.fetch('GET', '/')).status == 200   # the gateway serves on
    assert [received.method for received in upstream.received] == ['GET']
    assert_no_crash_logged(caplog)


async def test_error_bodies_name_no_url_and_no_exception_text(gateway):
    install_pool('proxy')
    port = closed_port()
    proxy = gateway(forward_to('http://127.0.0.1:%d/secret-internal-path' % port))
    response = await proxy.fetch('GET', '/x?token=abc')
    text = response.body.decode()
    for leak in (str(port), 'secret-internal-path', 'token', 'Refused', 'Errno', 'Traceback',
                 'urllib3', 'requests'):
        assert leak not in text, leak
    assert json.loads(text)['error'] == 'bad gateway'
