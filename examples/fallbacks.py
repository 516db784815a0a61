"""Fallbacks that degrade gracefully.

A fallback is what the caller gets instead of the real answer when ``run()``
fails, times out, is rejected or short-circuited. It runs exactly when
things are going wrong, often for many callers at once, so a good one is
cheap and local. This example shows three kinds:

- a **stale value**: the last price seen for the item, marked as stale;
- a **default value**: a shipping estimate that is always true;
- an **empty result**: no recommendations rather than no page;

and one command that has no fallback on purpose: for a gift card balance,
a made-up number is worse than "unavailable". What *not* to do in a fallback
(call another service) is explained in the comments below.

It starts a shop service on 127.0.0.1 (a free port), renders a product page
while the service is up, stops the service, and renders the page again.

Run it (well under a second)::

    python examples/fallbacks.py
"""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests

from blackgate import Command, CommandError, component

# -- a shop service on 127.0.0.1 --------------------------------------------------

ANSWERS = {
    '/price/lamp': {'price': 31.0}, '/price/mug': {'price': 7.25},
    '/shipping/lamp': {'estimate': 'tomorrow'},
    '/recommendations/lamp': {'items': ['bulb', 'desk']},
    '/balance/card-1': {'balance': 25.0},
}


class ShopHandler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps(ANSWERS[self.path]).encode()
        self.send_response(200)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass    # keep the output to what the example prints


def start_shop():
    server = ThreadingHTTPServer(('127.0.0.1', 0), ShopHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


http = requests.Session()   # shared by the pool's worker threads
http.trust_env = False      # no proxy from the environment for 127.0.0.1
SHOP_URL = None             # set once the shop has a port


def fetch(path):
    resp = http.get(SHOP_URL + path, timeout=1)
    resp.raise_for_status()
    return resp.json()


# -- the commands -------------------------------------------------------------------

class GetPrice(Command):
    """Stale value: the last price seen, which is usually still right."""
    group_key = 'shop'
    command_key = 'get_price'

    # sku -> (price, when it was seen). In production, bound it (an LRU of the
    # items people look at) and decide how old is too old to show.
    last_seen = {}

    def __init__(self, sku):
        self.sku = sku

    def run(self):
        price = fetch('/price/%s' % self.sku)['price']
        GetPrice.last_seen[self.sku] = (price, time.monotonic())
        return {'amount': price, 'age': None}

    def fallback(self):
        seen = GetPrice.last_seen.get(self.sku)
        if seen is None:
            return None                      # never seen: "price unavailable"
        price, when = seen
        return {'amount': price, 'age': time.monotonic() - when}

    # What not to do: a fallback that calls another service.
    #
    #     def fallback(self):
    #         return requests.get('http://pricing-replica/price/' + self.sku).json()
    #
    # The fallback runs when things already go wrong, for every failing caller
    # at once. That call would have no timeout from Blackgate, no bulkhead and
    # no circuit breaker, so a sick replica would hold every caller; under
    # queue() a synchronous fallback even runs on the IOLoop, where it would
    # block the whole process. If a second source really exists, wrap it in a
    # Command of its own (with its own group_key) and call that instead:
    # GetPriceFromReplica(self.sku).execute() from a def fallback() used with
    # execute(), or `await GetPriceFromReplica(self.sku).queue()` from an
    # async def fallback() used with queue().


class GetShippingEstimate(Command):
    """Default value: an answer that is always true, if less precise."""
    group_key = 'shop'
    command_key = 'get_shipping_estimate'

    def __init__(self, sku):
        self.sku = sku

    def run(self):
        return fetch('/shipping/%s' % self.sku)['estimate']

    def fallback(self):
        return '3 to 5 business days'


class GetRecommendations(Command):
    """Empty result: the page shows no recommendations rather than an error."""
    group_key = 'shop'
    command_key = 'get_recommendations'

    def __init__(self, sku):
        self.sku = sku

    def run(self):
        return fetch('/recommendations/%s' % self.sku)['items']

    def fallback(self):
        return []


class GetGiftCardBalance(Command):
    """No fallback on purpose: callers get CommandError and say "unavailable"."""
    group_key = 'shop'
    command_key = 'get_gift_card_balance'

    def __init__(self, card):
        self.card = card

    def run(self):
        return fetch('/balance/%s' % self.card)['balance']


# -- the page -----------------------------------------------------------------------

def show(label, text, cmd):
    print('   %-19s %-32s [%s]' % (label, text, ' -> '.join(event.name for event in cmd.events)))


def render_page(sku):
    cmd = GetPrice(sku)
    price = cmd.execute()
    if price is None:
        text = 'unavailable (never seen before)'
    elif price['age'] is None:
        text = '%.2f' % price['amount']
    else:
        text = '%.2f (as of %.1f s ago)' % (price['amount'], price['age'])
    show('price of %s:' % sku, text, cmd)
    if sku != 'lamp':
        return

    cmd = GetShippingEstimate(sku)
    show('shipping:', cmd.execute(), cmd)
    cmd = GetRecommendations(sku)
    show('you may also like:', ', '.join(cmd.execute()) or '(nothing)', cmd)
    cmd = GetGiftCardBalance('card-1')
    try:
        text = '%.2f' % cmd.execute()
    except CommandError as error:
        text = 'unavailable (%s)' % error.failure_type.name
    show('gift card balance:', text, cmd)


def main():
    global SHOP_URL
    server = start_shop()
    SHOP_URL = 'http://127.0.0.1:%d' % server.server_address[1]
    print('shop service listening on %s' % SHOP_URL)
    component.add('executor_pool', {'group_key': 'shop', 'max_workers': 4})
    component.install()
    try:
        print('\n1. the shop service is up')
        render_page('lamp')

        print('\n2. the shop service is down (connection refused)')
        server.shutdown()
        server.server_close()
        render_page('lamp')
        render_page('mug')
    finally:
        component.shutdown()


if __name__ == '__main__':
    main()
