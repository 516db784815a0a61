"""The built-in dashboard page: served from the package, and read by a real browser.

The browser test starts an application on 127.0.0.1 in a thread of its own,
sends it traffic from a few client threads, and drives Debian's headless
Chromium over the DevTools protocol (with Tornado's own websocket client) to
read what the page shows: every command, its counts, and the breaker that the
traffic opened. It then takes a screenshot; with ``BLACKGATE_SCREENSHOT=path``
in the environment the screenshot is also written there (that is how
``docs/dashboard.png`` is made).

Chromium is needed: in CI (``CI`` set), where ``.ci/run`` installs it, a missing
Chromium fails the test; elsewhere it skips.
"""
import asyncio
import base64
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import tempfile
import threading
import time

import pytest
import requests
import tornado.web
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.websocket import websocket_connect

from blackgate import BadRequest, BreakerState, Command, CommandError, Event, component
from blackgate.web import routes

#: Real seconds: the longest the browser test waits for any one thing.
WAIT = 30.0


# -- the page as a file and as a response ------------------------------------------------

@pytest.fixture
def app():
    return tornado.web.Application(routes('/blackgate'))


@pytest.mark.gen_test
async def test_the_page_is_served_from_the_package_with_a_strict_policy(http_client, base_url):
    response = await http_client.fetch(base_url + '/blackgate/')
    assert response.code == 200
    assert response.headers['Content-Type'] == 'text/html; charset=UTF-8'
    page = response.body.decode()
    assert '<title>Blackgate dashboard</title>' in page
    assert "new EventSource(streamUrl)" in page and "'hystrix.stream'" in page
    policy = response.headers['Content-Security-Policy']
    assert "default-src 'none'" in policy
    assert "connect-src 'self'" in policy
    scripts = re.findall(r'<script>(.*?)</script>', page, re.S)
    assert len(scripts) == 1
    digest = base64.b64encode(hashlib.sha256(scripts[0].encode()).digest()).decode()
    assert "script-src 'sha256-%s'" % digest in policy


@pytest.mark.gen_test
async def test_the_prefix_without_its_slash_redirects_to_the_page(http_client, base_url):
    response = await http_client.fetch(base_url + '/blackgate?delay=250', follow_redirects=False,
                                       raise_error=False)
    assert response.code == 301
    assert response.headers['Location'] == '/blackgate/?delay=250'
    page = await http_client.fetch(base_url + '/blackgate')
    assert page.effective_url == base_url + '/blackgate/'
    assert '<title>Blackgate dashboard</title>' in page.body.decode()


def test_the_page_loads_nothing_from_elsewhere():
    from blackgate import web
    page = open(os.path.join(web._STATIC, 'dashboard.html'), encoding='utf-8').read()
    # no external script, style sheet, font or image: every src/href is in the page itself
    for attribute in re.findall(r'''(?:src|href)\s*=\s*["']([^"']*)''', page):
        assert attribute.startswith(('#', 'data:')), attribute
    assert not re.search(r'@import|url\(\s*["\']?(?!data:)', page)
    assert '//' not in re.sub(r'(?m)^\s*//.*$|\s//\s.*$|http://www\.w3\.org/2000/svg', '', page)


def test_the_page_is_shipped_in_the_package():
    setup = open(os.path.join(os.path.dirname(__file__), '..', 'setup.py')).read()
    assert "'static/*'" in setup


# -- a live application under load --------------------------------------------------------

class Endpoint(Command):
    """A dependency whose behaviour the subclasses set: latency, failures, bad requests."""

    latency = (0.001, 0.004)
    failure_rate = 0.0
    bad_request_rate = 0.0

    def run(self):
        time.sleep(random.uniform(*self.latency))
        roll = random.random()
        if roll < self.bad_request_rate:
            raise BadRequest('no such id')
        if roll < self.bad_request_rate + self.failure_rate:
            raise ConnectionError('upstream said 500')
        return 'ok'

    def fallback(self):
        return 'fallback'


class GetUser(Endpoint):
    group_key = 'users'
    command_key = 'get_user'
    latency = (0.002, 0.008)


class GetProfile(Endpoint):
    group_key = 'users'
    command_key = 'get_profile'
    bad_request_rate = 0.1


class GetAvatar(Endpoint):
    group_key = 'users'
    command_key = 'get_avatar'


class GetPrice(Endpoint):
    """Always fails: its breaker opens and stays open."""

    group_key = 'pricing'
    command_key = 'get_price'
    failure_rate = 1.0
    circuit_breaker_request_volume_threshold = 5
    circuit_breaker_sleep_window = 120.0
    metrics_health_snapshot_interval = 0


class GetDiscount(Endpoint):
    """Slower than its timeout now and then: timeouts, and a pool that fills up.

    Its breaker is forced closed, so that get_price stays the one open breaker.
    """

    group_key = 'pricing'
    command_key = 'get_discount'
    latency = (0.005, 0.060)
    timeout = 0.040
    circuit_breaker_force_closed = True


class Search(Command):
    """async def run(): semaphore isolation, at most 3 at once."""

    group_key = 'search'
    command_key = 'search'
    max_concurrent_requests = 3

    async def run(self):
        await asyncio.sleep(random.uniform(0.002, 0.010))
        return 'hits'

    def fallback(self):
        return 'no hits'


class GetRecommendations(Endpoint):
    group_key = 'recommendations'
    command_key = 'get_recommendations'
    latency = (0.005, 0.015)
    failure_rate = 0.15


class GetHistory(Endpoint):
    group_key = 'recommendations'
    command_key = 'get_history'


class GetConfig(Endpoint):
    command_key = 'get_config'
    latency = (0.0, 0.001)


class GetFlags(Endpoint):
    command_key = 'get_flags'
    latency = (0.0, 0.001)


class GetStock(Endpoint):
    group_key = 'inventory'
    command_key = 'get_stock'


class GetShipping(Endpoint):
    group_key = 'inventory'
    command_key = 'get_shipping'
    failure_rate = 0.05


class GetWarehouseStock(Endpoint):
    """A long command key and no fallback (like a proxy's): its failures count as missing."""

    group_key = 'inventory'
    command_key = 'inventory.warehouse-eu-west-1.get_stock_levels_by_sku'
    failure_rate = 0.2
    fallback = Command.fallback


COMMANDS = {cls.command_key: cls for cls in (
    GetUser, GetProfile, GetAvatar, GetPrice, GetDiscount, Search, GetRecommendations,
    GetHistory, GetConfig, GetFlags, GetStock, GetShipping, GetWarehouseStock)}
LONG_KEY = GetWarehouseStock.command_key


class CallHandler(tornado.web.RequestHandler):
    async def get(self, name):
        try:
            self.write({'result': await COMMANDS[name]().queue()})
        except BadRequest:
            self.set_status(400)
        except CommandError:      # no fallback: the caller hears of it
            self.set_status(503)


class LiveApp:
    """The application, served on 127.0.0.1 from a thread with its own event loop."""

    def __init__(self, **stream_options):
        self.stream_options = stream_options
        self._ready = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),),
                                        name='live-app', daemon=True)

    def start(self):
        self._thread.start()
        assert self._ready.wait(WAIT)
        return 'http://127.0.0.1:%d' % self.port

    def stop(self):
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(WAIT)

    async def _serve(self):
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        sockets = bind_sockets(0, '127.0.0.1')
        self.port = sockets[0].getsockname()[1]
        app = tornado.web.Application(
            routes('/blackgate', **self.stream_options) + [(r'/call/([\w.-]+)', CallHandler)],
            log_function=lambda handler: None)
        server = HTTPServer(app)
        server.add_sockets(sockets)
        self._ready.set()
        await self._stop.wait()
        server.stop()
        await server.close_all_connections()


class Load:
    """Client threads calling every endpoint in turn until stopped (bounded in count)."""

    def __init__(self, base_url, threads=6, max_calls=3000):
        self.base_url = base_url
        self.calls = 0
        self._max = max_calls
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                         for i in range(threads)]

    def start(self):
        for thread in self._threads:
            thread.start()

    def stop(self):
        self._stop.set()
        for thread in self._threads:
            thread.join(WAIT)

    def _run(self, offset):
        names = list(COMMANDS)
        with requests.Session() as session:
            session.trust_env = False     # 127.0.0.1 only, whatever the proxy settings
            i = offset
            while not self._stop.is_set():
                with self._lock:
                    if self.calls >= self._max:
                        return
                    self.calls += 1
                session.get('%s/call/%s' % (self.base_url, names[i % len(names)]), timeout=10)
                i += 1


# -- Chromium over the DevTools protocol ---------------------------------------------------

@pytest.fixture
def chromium():
    path = shutil.which('chromium') or shutil.which('chromium-browser')
    if path is None:
        if os.environ.get('CI'):
            pytest.fail('chromium is not installed; .ci/run installs it with apt-get')
        pytest.skip('chromium is not installed (apt-get install chromium); CI runs this test')
    return path


class Browser:
    """Headless Chromium on a fresh profile, driven over its DevTools websocket."""

    def __init__(self, path):
        self.path = path
        self.events = []
        self._ids = iter(range(1, 1 << 30))

    async def start(self):
        self.profile = tempfile.mkdtemp(prefix='blackgate-chromium-')
        self.process = subprocess.Popen(
            [self.path, '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic',
             '--no-first-run', '--disable-background-networking', '--disable-component-update',
             '--disable-sync', '--disable-extensions', '--user-data-dir=' + self.profile,
             '--remote-debugging-address=127.0.0.1', '--remote-debugging-port=0',
             'about:blank'],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        url = await asyncio.get_running_loop().run_in_executor(None, self._devtools_url)
        self.connection = await websocket_connect(url, max_message_size=256 << 20)
        target = (await self.call('Target.createTarget', url='about:blank'))['targetId']
        self.session = (await self.call('Target.attachToTarget', targetId=target,
                                        flatten=True))['sessionId']
        await self.call('Runtime.enable', session=True)
        await self.call('Log.enable', session=True)
        await self.call('Emulation.setDeviceMetricsOverride', session=True, width=1360,
                        height=820, deviceScaleFactor=1, mobile=False)
        return self

    def _devtools_url(self):
        deadline = time.monotonic() + WAIT
        lines = []
        while time.monotonic() < deadline:
            line = self.process.stderr.readline().decode(errors='replace')
            if not line and self.process.poll() is not None:
                break
            lines.append(line)
            found = re.search(r'DevTools listening on (ws://\S+)', line)
            if found:
                # keep draining stderr, so that Chromium never blocks on a full pipe
                threading.Thread(target=self.process.stderr.read, daemon=True).start()
                return found.group(1)
        raise AssertionError('Chromium did not start:\n' + ''.join(lines[-20:]))

    async def call(self, method, session=False, **params):
        message = {'id': next(self._ids), 'method': method, 'params': params}
        if session:
            message['sessionId'] = self.session if session is True else session
        await self.connection.write_message(json.dumps(message))
        while True:
            raw = await asyncio.wait_for(self.connection.read_message(), WAIT)
            assert raw is not None, 'Chromium closed the DevTools connection'
            reply = json.loads(raw)
            if reply.get('id') == message['id']:
                assert 'error' not in reply, (method, reply['error'])
                return reply['result']
            if 'method' in reply:
                self.events.append(reply)

    async def new_page(self, url):
        """Open ``url`` in another tab; its session, for ``evaluate(..., session=)``."""
        target = (await self.call('Target.createTarget', url=url))['targetId']
        session = (await self.call('Target.attachToTarget', targetId=target,
                                   flatten=True))['sessionId']
        await self.call('Runtime.enable', session=session)
        return session

    async def evaluate(self, expression, session=True):
        result = await self.call('Runtime.evaluate', session=session, expression=expression,
                                 returnByValue=True)
        assert 'exceptionDetails' not in result, result
        return result['result'].get('value')

    async def wait_for(self, expression, timeout=WAIT, session=True):
        deadline = time.monotonic() + timeout
        while True:
            value = await self.evaluate(expression, session)
            if value:
                return value
            assert time.monotonic() < deadline, 'the page never showed: ' + expression
            await asyncio.sleep(0.1)

    async def close(self):
        try:
            await self.call('Browser.close')
        except Exception:
            pass
        self.connection.close()   # its socket, before this loop ends
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        shutil.rmtree(self.profile, ignore_errors=True)


# What the page shows, read from its DOM (numbers have thousands separators).
READ_PAGE = r'''JSON.stringify({
  status: document.getElementById('status').textContent,
  commandCount: document.querySelector('#summary .command-count').textContent,
  openCount: document.querySelector('#summary .open-count').textContent,
  commands: Array.from(document.querySelectorAll('article.command')).map(function (card) {
    function text(selector) { return card.querySelector(selector).textContent; }
    return {
      name: card.getAttribute('data-command'), state: card.getAttribute('data-state'),
      stateText: text('.state'), rate: text('.rate-value'), errorPercentage: text('.error-percentage'),
      SUCCESS: text('.count.success'), SHORT_CIRCUITED: text('.count.short-circuited'),
      BAD_REQUEST: text('.count.bad-request'), TIMEOUT: text('.count.timeout'),
      REJECTED: text('.count.rejected'), FAILURE: text('.count.failure'),
      median: text('.latency-50'), health: card.querySelector('.health').getAttribute('data-health'),
      FALLBACK_MISSING: text('.fallback-missing .n'), FALLBACK_SUCCESS: text('.fallback-served .n'),
      missingVisible: (function (node) {
        var box = node.getBoundingClientRect(), cardBox = card.getBoundingClientRect();
        return box.width > 0 && box.right <= cardBox.right && box.bottom <= cardBox.bottom;
      })(card.querySelector('.fallback-missing')),
      nameShown: (function (node) {   // the whole key, not cut off
        return node.textContent === card.getAttribute('data-command') &&
          node.scrollWidth <= node.clientWidth && node.scrollHeight <= node.clientHeight + 1;
      })(card.querySelector('.name'))
    };
  }),
  pools: Array.from(document.querySelectorAll('#pools tr.pool')).map(function (row) {
    return { name: row.getAttribute('data-pool'), busy: row.querySelector('.busy .value').textContent,
             rejections: row.querySelector('.rejections').textContent,
             executions: row.querySelector('.executions').textContent };
  })
})'''


def shown(text):
    return int(text.replace(',', '').split()[0])


def expected_page():
    """What the page must show once it caught up: the registry's own rolling counts."""
    expected = {}
    for name in COMMANDS:
        counts = component.metrics(name).rolling_counts()
        health = component.metrics(name).health()
        expected[name] = {
            'SUCCESS': counts[Event.SUCCESS], 'SHORT_CIRCUITED': counts[Event.SHORT_CIRCUITED],
            'BAD_REQUEST': counts[Event.BAD_REQUEST], 'TIMEOUT': counts[Event.TIMEOUT],
            'REJECTED': counts[Event.THREAD_POOL_REJECTED] + counts[Event.SEMAPHORE_REJECTED],
            'FAILURE': counts[Event.FAILURE], 'errorPercentage': int(health.error_percentage),
            'state': component.circuit_breaker(name).state.value,
            'FALLBACK_MISSING': counts[Event.FALLBACK_MISSING],
            'FALLBACK_SUCCESS': counts[Event.FALLBACK_SUCCESS],
        }
    return expected


def on_page(page):
    return {card['name']: {
        'SUCCESS': shown(card['SUCCESS']), 'SHORT_CIRCUITED': shown(card['SHORT_CIRCUITED']),
        'BAD_REQUEST': shown(card['BAD_REQUEST']), 'TIMEOUT': shown(card['TIMEOUT']),
        'REJECTED': shown(card['REJECTED']), 'FAILURE': shown(card['FAILURE']),
        'errorPercentage': shown(card['errorPercentage']), 'state': card['state'],
        'FALLBACK_MISSING': shown(card['FALLBACK_MISSING']),
        'FALLBACK_SUCCESS': shown(card['FALLBACK_SUCCESS']),
    } for card in page['commands']}


def test_the_dashboard_in_headless_chromium_shows_commands_counts_and_an_open_breaker(
        chromium, system_clock, tmp_path):
    # A minute-long window: nothing leaves it while the test runs, so once the traffic
    # stops the page must show exactly the registry's counts.
    component.set('command_defaults', {'metrics_rolling_window': 60.0,
                                       'metrics_rolling_buckets': 60})
    for group_key, workers, queue in (('users', 4, 0), ('pricing', 2, 1),
                                      ('recommendations', 3, 0), ('inventory', 2, 2)):
        component.add('executor_pool', {'group_key': group_key, 'max_workers': workers,
                                        'max_queue_size': queue})
    # one pool with an adaptive limit, which its row shows beside the workers
    component.add('executor_pool', {'group_key': 'recommendations', 'max_workers': 3,
                                    'concurrency_limit': {'algorithm': 'aimd', 'initial': 3}})
    component.install()
    random.seed(5)
    live = LiveApp()
    base_url = live.start()
    load = Load(base_url)
    try:
        load.start()
        page = asyncio.run(asyncio.wait_for(
            _browse(chromium, base_url + '/blackgate/?delay=100', load, tmp_path), 4 * WAIT))
    finally:
        load.stop()
        live.stop()
        component.shutdown()

    cards = {card['name']: card for card in page['commands']}
    assert sorted(cards) == sorted(COMMANDS)
    # the open breaker: shown open, counted in the header, sorted first
    assert cards['get_price']['state'] == 'open'
    assert cards['get_price']['stateText'] == 'Open'
    assert cards['get_price']['health'] == 'circuit open'
    assert page['commands'][0]['name'] == 'get_price'
    assert page['openCount'] == '1'
    assert shown(cards['get_price']['SHORT_CIRCUITED']) > 0
    assert shown(cards['get_price']['FAILURE']) > 0
    assert shown(cards['get_price']['errorPercentage']) == 100
    assert all(card['stateText'] == 'Closed' for name, card in cards.items() if name != 'get_price')
    assert shown(cards['get_user']['SUCCESS']) > 0
    assert page['status'] == 'live'
    # a long key is shown whole (it wraps), and so is the fallback line with its missing count
    assert all(card['nameShown'] and card['missingVisible'] for card in page['commands'])
    assert shown(cards[LONG_KEY]['FALLBACK_MISSING']) > 0
    pools = {pool['name']: pool for pool in page['pools']}
    assert {'default', 'users', 'pricing', 'recommendations', 'inventory'} <= set(pools)
    assert shown(pools['users']['executions']) > 0
    assert ' · limit ' in pools['recommendations']['busy']
    assert 'limit' not in pools['users']['busy']
    screenshot = (tmp_path / 'dashboard.png').read_bytes()
    assert screenshot.startswith(b'\x89PNG\r\n\x1a\n') and len(screenshot) > 20_000
    target = os.environ.get('BLACKGATE_SCREENSHOT')
    if target:
        shutil.copyfile(tmp_path / 'dashboard.png', target)


async def _browse(chromium, url, load, tmp_path):
    browser = await Browser(chromium).start()
    try:
        await browser.call('Page.navigate', session=True, url=url)
        # under load: every command shows up, and the sick one's breaker opens
        await browser.wait_for("document.querySelectorAll('article.command').length == %d"
                               % len(COMMANDS))
        await browser.wait_for("document.querySelector('article[data-command=\"get_price\"]')"
                               ".getAttribute('data-state') == 'open'")
        assert component.circuit_breaker('get_price').state is BreakerState.OPEN
        assert load.calls > 0
        if os.environ.get('BLACKGATE_SCREENSHOT'):
            await asyncio.sleep(8.0)   # for the docs: a sparkline with some history
        await asyncio.get_running_loop().run_in_executor(None, load.stop)
        # the traffic stopped: the page catches up with the registry's counts
        expected = expected_page()
        deadline = time.monotonic() + WAIT
        while True:
            page = json.loads(await browser.evaluate(READ_PAGE))
            if on_page(page) == expected:
                break
            assert time.monotonic() < deadline, (on_page(page), expected)
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)    # a few more samples, so that the sparklines have a line
        page = json.loads(await browser.evaluate(READ_PAGE))
        assert on_page(page) == expected
        shot = await browser.call('Page.captureScreenshot', session=True, format='png')
        (tmp_path / 'dashboard.png').write_bytes(base64.b64decode(shot['data']))
        # the page ran with no script error and no refused resource
        problems = [event for event in browser.events
                    if event['method'] == 'Runtime.exceptionThrown'
                    or (event['method'] == 'Log.entryAdded'
                        and event['params']['entry']['level'] == 'error')]
        assert problems == []
        return page
    finally:
        await browser.close()


# -- a half-open breaker, and a viewer too many ---------------------------------------------

class Flaky(Command):
    """Fails until told otherwise; its trial call waits at a gate, so half-open lasts."""

    command_key = 'flaky'
    circuit_breaker_request_volume_threshold = 2
    circuit_breaker_sleep_window = 5.0
    metrics_health_snapshot_interval = 0
    timeout_enabled = False
    gate = None

    def run(self):
        if Flaky.gate is None:
            raise ConnectionError('upstream down')
        Flaky.gate.wait(WAIT)
        return 'fresh'

    def fallback(self):
        return 'stale'


def test_the_dashboard_shows_half_open_and_tells_a_viewer_too_many_why(chromium, clock):
    for _ in range(2):
        assert Flaky().execute() == 'stale'
    assert component.circuit_breaker('flaky').state is BreakerState.OPEN
    clock.advance(5.0)
    Flaky.gate = threading.Event()
    trial = threading.Thread(target=Flaky().execute, daemon=True)
    live = LiveApp(max_clients=1)
    base_url = live.start()
    try:
        trial.start()
        deadline = time.monotonic() + WAIT
        while component.circuit_breaker('flaky').state is not BreakerState.HALF_OPEN:
            assert time.monotonic() < deadline, 'the trial never started'
            time.sleep(0.01)
        found = asyncio.run(asyncio.wait_for(
            _half_open_and_refused(chromium, base_url), 4 * WAIT))
    finally:
        Flaky.gate.set()
        trial.join(WAIT)
        Flaky.gate = None
        live.stop()
    assert found['state'] == 'half_open'
    assert found['stateText'].startswith('Half-open')
    assert found['health'] == 'circuit half-open'
    assert found['openCount'] == '1'
    # the second page asked for /blackgate (no slash), was redirected, and was refused
    assert found['secondUrl'] == base_url + '/blackgate/'
    assert found['secondStatus'] == 'too many viewers (1 max), retrying…'
    assert found['secondMessage'].startswith('Too many viewers (1 max)')


async def _half_open_and_refused(chromium, base_url):
    browser = await Browser(chromium).start()
    try:
        await browser.call('Page.navigate', session=True, url=base_url + '/blackgate/?delay=100')
        card = "document.querySelector('article[data-command=\"flaky\"]')"
        await browser.wait_for(card + " && %s.getAttribute('data-state') == 'half_open'" % card)
        found = json.loads(await browser.evaluate(
            '''JSON.stringify({state: %s.getAttribute('data-state'),
                               stateText: %s.querySelector('.state').textContent,
                               health: %s.querySelector('.health').getAttribute('data-health'),
                               openCount: document.querySelector('#summary .open-count').textContent})'''
            % (card, card, card)))
        # this page holds the one stream allowed: a second viewer is refused, and told why
        second = await browser.new_page(base_url + '/blackgate')
        await browser.wait_for("(document.getElementById('status') || {}).className == 'full'"
                               " && document.getElementById('no-commands').textContent"
                               ".indexOf('Too many') == 0", session=second)
        found.update(json.loads(await browser.evaluate(
            '''JSON.stringify({secondUrl: location.href,
                               secondStatus: document.getElementById('status').textContent,
                               secondMessage: document.getElementById('no-commands').textContent})''',
            session=second)))
        return found
    finally:
        await browser.close()
