"""Tornado ``@gen.coroutine`` handlers that yield ``queue()``.

Code written with ``tornado.gen`` (decorated generators rather than
``async def``) yields the future that ``queue()`` returns, alone or in a
list to run several commands at once. ``run()`` stays an ordinary blocking
function: it runs on a worker thread of the command's pool, so the IOLoop
goes on serving other requests meanwhile.

This example starts, on one IOLoop and on 127.0.0.1 (free ports), a catalog
service and a shop whose product page calls it through two commands:
``GetProduct`` (no fallback: without the product there is no page) and
``GetReviews`` (falls back to no reviews). It then asks for the page while
the catalog is healthy, while its reviews fail, and while everything fails.

Run it (under a second)::

    python examples/gen_coroutine.py
"""
import asyncio
import json

import requests
import tornado.web
from tornado import gen
from tornado.httpclient import AsyncHTTPClient
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from blackgate import Command, CommandError, component

# -- a catalog service ------------------------------------------------------------

PRODUCTS = {'1': {'name': 'lamp', 'price': 31.0}, '2': {'name': 'mug', 'price': 7.25},
            '3': {'name': 'book', 'price': 12.5}}
REVIEWS = {'1': ['bright', 'sturdy'], '2': ['holds a lot'], '3': []}
broken = set()      # the parts of the catalog that answer HTTP 500


class CatalogHandler(tornado.web.RequestHandler):
    def get(self, part, product_id):
        if part in broken:
            raise tornado.web.HTTPError(500)
        if part == 'products':
            self.write(PRODUCTS[product_id])
        else:
            self.write({'reviews': REVIEWS[product_id]})


# -- the commands -------------------------------------------------------------------

http = requests.Session()   # shared by the pool's worker threads
http.trust_env = False      # no proxy from the environment for 127.0.0.1


class GetProduct(Command):
    group_key = 'catalog'
    command_key = 'get_product'
    base_url = None         # set once the catalog has a port

    def __init__(self, product_id):
        self.product_id = product_id

    def run(self):          # blocking, on a worker thread
        resp = http.get('%s/products/%s' % (self.base_url, self.product_id), timeout=1)
        resp.raise_for_status()
        return resp.json()
    # No fallback(): a page with a made-up product is worse than an error page.


class GetReviews(Command):
    group_key = 'catalog'
    command_key = 'get_reviews'
    base_url = None

    def __init__(self, product_id):
        self.product_id = product_id

    def run(self):
        resp = http.get('%s/reviews/%s' % (self.base_url, self.product_id), timeout=1)
        resp.raise_for_status()
        return resp.json()['reviews']

    def fallback(self):     # runs on the IOLoop for queue(): keep it cheap
        return []


# -- the shop -----------------------------------------------------------------------

class ProductPage(tornado.web.RequestHandler):
    @gen.coroutine
    def get(self, product_id):
        product, reviews = GetProduct(product_id), GetReviews(product_id)
        try:
            # Both start at once; yielding the list waits for both.
            info, texts = yield [product.queue(), reviews.queue()]
        except CommandError as error:
            self.set_status(503)
            self.write({'error': 'the catalog is unavailable, try again soon'})
            print('   shop: %s failed (%s): 503' % (error.command_key, error.failure_type.name))
            return
        self.write({'product': info['name'], 'price': info['price'], 'reviews': texts})
        print('   shop: get_product %s, get_reviews %s' % (
            '+'.join(event.name for event in product.events),
            '+'.join(event.name for event in reviews.events)))


@gen.coroutine
def product_names(product_ids):
    """Not only handlers: any gen.coroutine can yield queue() futures."""
    products = yield [GetProduct(product_id).queue() for product_id in product_ids]
    return [product['name'] for product in products]


# -- the story ----------------------------------------------------------------------

def serve(app):
    sockets = bind_sockets(0, '127.0.0.1')
    server = HTTPServer(app)
    server.add_sockets(sockets)
    return server, 'http://127.0.0.1:%d' % sockets[0].getsockname()[1]


@gen.coroutine
def story():
    quiet = dict(log_function=lambda handler: None)   # no access log
    catalog, catalog_url = serve(tornado.web.Application(
        [(r'/(products|reviews)/(\w+)', CatalogHandler)], **quiet))
    shop, shop_url = serve(tornado.web.Application(
        [(r'/product/(\w+)', ProductPage)], **quiet))
    GetProduct.base_url = GetReviews.base_url = catalog_url
    print('catalog on %s, shop on %s' % (catalog_url, shop_url))

    component.add('executor_pool', {'group_key': 'catalog', 'max_workers': 4})
    component.install()
    browser = AsyncHTTPClient()
    try:
        for title, parts in [('1. everything is healthy', set()),
                             ('2. the reviews fail: a page without reviews', {'reviews'}),
                             ('3. the products fail too: no page', {'reviews', 'products'})]:
            print('\n%s' % title)
            broken.clear()
            broken.update(parts)
            response = yield browser.fetch(shop_url + '/product/1', raise_error=False)
            print('   GET /product/1 -> %d %s' % (response.code, response.body.decode()))

        broken.clear()
        names = yield product_names(['1', '2', '3'])
        print('\n4. product_names() yielded 3 queue() futures at once: %s' % json.dumps(names))
    finally:
        browser.close()
        shop.stop()
        catalog.stop()
        component.shutdown()


async def main():
    # Tornado 6 runs on asyncio: start the loop with asyncio.run(). Code written
    # with gen.coroutine runs on it unchanged, and native coroutines await it.
    await story()


if __name__ == '__main__':
    asyncio.run(main())
