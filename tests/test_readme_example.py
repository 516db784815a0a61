"""The README's command example, run as written, against a local session service.

The upstream is a tiny ``http.server`` on 127.0.0.1 (a free port) standing in
for ``http://session-service``: ``GET /session`` answers
``{"user_id": "user-<session>", "cookie": "<the Cookie header>"}``. Real HTTP,
so these tests use real time (the ``system_clock`` fixture).
"""
import http.server
import json
import threading

import pytest
import requests
import tornado.gen

from blackgate import Command, Event, component

#: Real seconds: the longest a test waits for the upstream to stop.
WAIT = 5.0

#: The session service's base URL; set by the ``session_service`` fixture.
SESSION_SERVICE = 'http://session-service'


# -- the example, as written in the README (only the URL points at the local upstream) ---------

class GetCurrentUser(Command):
    group_key = 'service.session'
    command_key = 'get_current_user'

    def __init__(self, cookie):
        self.cookie = cookie

    def run(self):
        resp = requests.get(SESSION_SERVICE + '/session',
                            headers={'Cookie': self.cookie}, timeout=1)
        return resp.json()['user_id']

    def fallback(self):
        return None


def install():
    component.add('executor_pool', {'group_key': 'service.session', 'max_workers': 10})
    component.install()


# -- the upstream ---------------------------------------------------------------------------------

class SessionService(http.server.BaseHTTPRequestHandler):
    """Answers GET /session with the user id of the ``session`` cookie, echoing the Cookie."""

    def do_GET(self):
        if self.path != '/session':
            self.send_error(404)
            return
        cookie = self.headers.get('Cookie', '')
        self.server.cookies_seen.append(cookie)
        session = dict(part.strip().split('=', 1) for part in cookie.split(';')
                       if '=' in part).get('session')
        body = json.dumps({'user_id': 'user-' + session if session else None,
                           'cookie': cookie}).encode()
        self.send_response(200)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(body)))
        self.send_header('X-Cookie', cookie)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):   # keep the test output clean
        pass


class Upstream:
    def __init__(self):
        self.server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), SessionService)
        self.server.daemon_threads = True
        self.server.cookies_seen = []
        self.url = 'http://127.0.0.1:%d' % (self.server.server_address[1],)
        self._thread = threading.Thread(target=self.server.serve_forever,
                                        kwargs={'poll_interval': 0.05}, daemon=True)
        self._thread.start()
        self.running = True

    @property
    def cookies_seen(self):
        return self.server.cookies_seen

    def stop(self):
        if self.running:
            self.running = False
            self.server.shutdown()
            self.server.server_close()
            self._thread.join(WAIT)
            assert not self._thread.is_alive()


@pytest.fixture
def session_service(system_clock, monkeypatch):
    upstream = Upstream()
    monkeypatch.setitem(globals(), 'SESSION_SERVICE', upstream.url)
    install()
    yield upstream
    upstream.stop()


# -- the three ways of calling it --------------------------------------------------------------

def test_execute_returns_the_user_id(session_service):
    user_id = GetCurrentUser(cookie='session=alice').execute()          # synchronous
    assert user_id == 'user-alice'


def test_yield_queue_in_a_gen_coroutine_returns_the_user_id(session_service, io_loop):
    @tornado.gen.coroutine
    def handler_code():
        user_id = yield GetCurrentUser(cookie='session=bob').queue()   # asynchronous
        return user_id

    assert io_loop.run_sync(handler_code, timeout=WAIT) == 'user-bob'


@pytest.mark.gen_test
async def test_await_queue_in_a_native_coroutine_returns_the_user_id(session_service):
    user_id = await GetCurrentUser(cookie='session=carol').queue()
    assert user_id == 'user-carol'


@pytest.mark.gen_test
async def test_yield_queue_in_a_gen_coroutine_awaited_by_a_handler(session_service):
    @tornado.gen.coroutine
    def handler_code():
        user_id = yield GetCurrentUser(cookie='session=dave').queue()
        return user_id

    assert await handler_code() == 'user-dave'


# -- what went over the wire ---------------------------------------------------------------------

@pytest.mark.parametrize('cookie, user_id', [
    ('session=alice', 'user-alice'),
    ('theme=dark; session=s3cr3t-42', 'user-s3cr3t-42'),
    ('session=a%20b; lang=fr', 'user-a%20b'),
])
def test_cookie_round_trips_to_the_user_id(session_service, cookie, user_id):
    assert GetCurrentUser(cookie=cookie).execute() == user_id
    assert session_service.cookies_seen == [cookie]


def test_call_is_counted_as_a_success_of_get_current_user(session_service):
    cmd = GetCurrentUser(cookie='session=alice')
    cmd.execute()
    assert cmd.events == (Event.SUCCESS,)
    assert component.metrics('get_current_user').rolling_count(Event.SUCCESS) == 1


def test_run_executes_on_the_service_session_pool(session_service):
    threads = []

    class Recording(GetCurrentUser):
        def run(self):
            threads.append(threading.current_thread().name)
            return super().run()

    assert Recording(cookie='session=alice').execute() == 'user-alice'
    assert threads[0].startswith('blackgate-service.session')


# -- the upstream down -------------------------------------------------------------------------

def test_execute_answers_the_fallback_none_when_the_upstream_is_stopped(session_service):
    session_service.stop()
    cmd = GetCurrentUser(cookie='session=alice')
    assert cmd.execute() is None
    assert cmd.events == (Event.FAILURE, Event.FALLBACK_SUCCESS)
    assert isinstance(cmd.execution_exception, requests.ConnectionError)


@pytest.mark.gen_test
async def test_queue_answers_the_fallback_none_when_the_upstream_is_stopped(session_service):
    session_service.stop()
    cmd = GetCurrentUser(cookie='session=alice')
    assert await cmd.queue() is None
    assert cmd.events == (Event.FAILURE, Event.FALLBACK_SUCCESS)


def test_user_id_comes_back_once_the_upstream_answers_again(session_service, monkeypatch):
    session_service.stop()
    assert GetCurrentUser(cookie='session=alice').execute() is None
    upstream = Upstream()
    try:
        monkeypatch.setitem(globals(), 'SESSION_SERVICE', upstream.url)
        assert GetCurrentUser(cookie='session=alice').execute() == 'user-alice'
    finally:
        upstream.stop()
