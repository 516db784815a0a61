"""An API gateway in front of a flaky inventory service, in about three seconds.

Starts an inventory service and a Blackgate gateway (``HTTPProxy``) on
127.0.0.1 (free ports), sends requests through the gateway and prints what the
client got and what the service received:

1. a plain request: the path loses its ``/api`` prefix, the query is kept byte
   for byte, ``X-Forwarded-For`` and ``Via`` are added, both ``Set-Cookie``
   fields come back;
2. a slow answer: the gateway's own 504 after the command's timeout;
3. the service starts answering 503: clients get its 503s until the circuit
   breaker opens, then the gateway's own 503 with ``Retry-After``, and the
   service is left alone;
4. the service heals: after the sleep window one trial request goes through
   and closes the breaker;
5. the service is stopped: a route with a fallback serves a cached answer, a
   route without one answers 502.

Run it::

    python examples/gateway.py
"""
import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import tornado.web
from tornado.httpclient import AsyncHTTPClient
from blackgate import BreakerState, HTTPProxy, HTTPProxyCommand, component
from blackgate.server import listen

TIMEOUT = 0.5          # the commands' timeout, seconds
SLEEP_WINDOW = 1.0     # seconds the breaker stays open before a trial

START = time.monotonic()


def say(message, *args):
    print('[%4.2fs] %s' % (time.monotonic() - START, message % args), flush=True)


# -- the inventory service ----------------------------------------------------------------

class Inventory(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'   # keep-alive, so the gateway reuses its connections
    mode = 'healthy'                # 'sick': every answer is a 503; 'gone': no answer at all
    hits = 0
    last = None

    def do_GET(self):
        if Inventory.mode == 'gone':   # stopped: drop the connection without a word
            self.close_connection = True
            return
        Inventory.hits += 1
        Inventory.last = (self.path, self.headers.get('X-Forwarded-For'), self.headers.get('Via'))
        if self.path.startswith('/slow'):
            time.sleep(2 * TIMEOUT)
        if Inventory.mode == 'sick':
            self.answer(503, {'error': 'database unavailable'})
        else:
            self.answer(200, {'item': self.path.rsplit('/', 1)[-1].split('?')[0], 'stock': 7},
                        [('Set-Cookie', 'region=eu; Path=/'), ('Set-Cookie', 'ab=b; Path=/')])

    def answer(self, status, document, fields=()):
        body = json.dumps(document).encode()
        try:
            self.send_response(status)
            self.send_header('Content-Type', 'application/json')
            self.send_header('Content-Length', str(len(body)))
            for name, value in fields:
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass   # the gateway stopped waiting (the slow request): nobody to answer

    def log_message(self, format, *args):
        pass    # the example prints its own lines


def start_inventory():
    server = ThreadingHTTPServer(('127.0.0.1', 0), Inventory)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


# -- the gateway ---------------------------------------------------------------------------

class InventoryAPI(HTTPProxyCommand):
    """/api/items/... -> the inventory service's /items/...; no fallback."""

    group_key = 'inventory'
    command_key = 'inventory_api'
    timeout = TIMEOUT
    base_url = None   # set once the service has a port

    def before_request(self):
        path = self.request['path']   # the prefix off the front only
        self.request['url'] = self.base_url + (path[len('/api'):] if path.startswith('/api/')
                                               else path)


class CatalogAPI(InventoryAPI):
    """/catalog/... -> the same service, with a cached answer when it cannot answer."""

    command_key = 'catalog_api'

    def before_request(self):
        path = self.request['path']
        self.request['url'] = self.base_url + (path[len('/catalog'):]
                                               if path.startswith('/catalog/') else path)

    def fallback(self):
        return {'status_code': 200, 'reason': 'OK',
                'headers': [('Content-Type', 'application/json'), ('Warning', '110 - "stale"')],
                'content': json.dumps({'item': 'cached', 'stock': None})}


def start_gateway():
    component.add('executor_pool', {'group_key': 'inventory', 'max_workers': 8})
    component.add('command', {
        'command_key': 'inventory_api',
        'circuit_breaker_request_volume_threshold': 4,   # Hystrix's 20 would take longer
        'circuit_breaker_sleep_window': SLEEP_WINDOW,
        'metrics_health_snapshot_interval': 0,           # judge after every request
    })
    component.install()
    app = tornado.web.Application([
        HTTPProxy.route(r'/api/.*', InventoryAPI),       # checked now, not at the first request
        HTTPProxy.route(r'/catalog/.*', CatalogAPI),
    ], log_function=lambda handler: None)   # the example prints its own lines
    # listen(): Tornado's HTTPServer with nginx's limits for slow and idle clients
    server = listen(app, 0, '127.0.0.1')
    return server, 'http://127.0.0.1:%d' % server.bound_addresses[0][1]


# -- the client ----------------------------------------------------------------------------

async def get(gateway, path, show=''):
    client = AsyncHTTPClient()
    response = await client.fetch(gateway + path, raise_error=False, request_timeout=10,
                                  decompress_response=False)
    marker = response.headers.get('X-Blackgate-Error')
    if marker:
        who = 'the gateway (%s)' % marker
    elif 'Warning' in response.headers:
        who = "the command's fallback"
    else:
        who = 'the service'
    say('GET %-32s -> %d %s, from %s', path, response.code, response.reason, who)
    if show == 'body':
        say('    body: %s', response.body.decode())
    elif show == 'retry':
        say('    Retry-After: %s, body: %s', response.headers.get('Retry-After'),
            response.body.decode())
    return response


async def story(inventory, gateway):
    heading('1. a plain request')
    response = await get(gateway, '/api/items/42?fields=name,stock&fields=')
    path, forwarded_for, via = Inventory.last
    say('    the service received %s, X-Forwarded-For: %s, Via: %s', path, forwarded_for, via)
    say('    Set-Cookie fields back: %s', response.headers.get_list('Set-Cookie'))

    heading('2. a slow answer')
    await get(gateway, '/api/slow/7', show='body')

    heading('3. the service answers 503')
    Inventory.mode = 'sick'
    breaker = component.circuit_breaker('inventory_api')
    while breaker.state is BreakerState.CLOSED:
        await get(gateway, '/api/items/42')
    say('    *** the breaker is %s', breaker.state.name)
    hits = Inventory.hits
    await get(gateway, '/api/items/42', show='retry')
    await get(gateway, '/api/items/43')
    say('    service requests while the breaker was open: %d', Inventory.hits - hits)

    heading('4. the service heals')
    Inventory.mode = 'healthy'
    await asyncio.sleep(SLEEP_WINDOW + 0.1)
    await get(gateway, '/api/items/42')
    say('    *** the trial succeeded: the breaker is %s', breaker.state.name)

    heading('5. the service is stopped')
    Inventory.mode = 'gone'
    inventory.shutdown()
    inventory.server_close()
    await get(gateway, '/catalog/items/42', show='body')
    await get(gateway, '/api/items/42', show='body')


def heading(title):
    print('\n--- %s ---' % title, flush=True)


async def main():
    inventory = start_inventory()
    InventoryAPI.base_url = 'http://127.0.0.1:%d' % inventory.server_address[1]
    server, gateway = start_gateway()
    say('inventory service on %s, gateway on %s', InventoryAPI.base_url, gateway)
    try:
        await asyncio.wait_for(story(inventory, gateway), 20)
    finally:
        server.stop()
        await server.close_all_connections()
        component.shutdown()
    say('done')


if __name__ == '__main__':
    asyncio.run(main())
