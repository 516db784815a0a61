"""Serve Blackgate's metrics to Prometheus from a Tornado application.

Starts an app on 127.0.0.1 (a free port, or ``--port``) with a page that calls
a dependency through a ``Command``, Prometheus' ``/metrics``, and Blackgate's
dashboard; sends it some traffic, prints what Prometheus would scrape, and
exits, or with ``--serve`` keeps serving until Ctrl-C::

    pip install -e '.[prometheus]'                 # in the checkout, never by name
    python examples/prometheus_metrics.py            # one scrape, printed
    python examples/prometheus_metrics.py --serve    # then scrape the URL it prints

A Prometheus job for it::

    scrape_configs:
      - job_name: my-service
        static_configs: [{targets: ['127.0.0.1:PORT']}]
"""
import argparse
import asyncio
import random
import sys

import tornado.httpclient
import tornado.web
from prometheus_client import REGISTRY
from prometheus_client.exposition import choose_encoder

from blackgate import Command, component
from blackgate.prometheus import register
from blackgate.web import routes


class GetQuote(Command):
    """A dependency that fails one call in five (the fallback answers then)."""

    group_key = 'quotes'
    command_key = 'get_quote'

    def run(self):
        if random.random() < 0.2:
            raise ConnectionError('quote service unavailable')
        return 'Simple is better than complex.'

    def fallback(self):
        return 'Errors should never pass silently.'


class QuoteHandler(tornado.web.RequestHandler):
    async def get(self):
        self.write({'quote': await GetQuote().queue()})


class MetricsHandler(tornado.web.RequestHandler):
    """A registry's exposition: OpenMetrics if the scraper asks for it, else Prometheus' text."""

    def initialize(self, registry=REGISTRY):
        self.registry = registry

    def get(self):
        encoder, content_type = choose_encoder(self.request.headers.get('Accept', ''))
        self.set_header('Content-Type', content_type)
        self.write(encoder(self.registry))


def make_app(registry=REGISTRY):
    return tornado.web.Application([
        (r'/quote', QuoteHandler),
        (r'/metrics', MetricsHandler, dict(registry=registry)),
    ] + routes('/blackgate'))


async def main(port, serve):
    component.add('executor_pool', {'group_key': 'quotes', 'max_workers': 4})
    component.install()
    register()   # once: a second call returns the collector already registered

    server = make_app().listen(port, '127.0.0.1')
    port = next(iter(server._sockets.values())).getsockname()[1]
    base = 'http://127.0.0.1:%d' % port

    client = tornado.httpclient.AsyncHTTPClient()
    for _ in range(50):
        await client.fetch(base + '/quote')
    if not serve:
        print((await client.fetch(base + '/metrics')).body.decode())
        server.stop()
        return
    print('metrics:   %s/metrics' % base, flush=True)
    print('dashboard: %s/blackgate/' % base, flush=True)
    print('Ctrl-C to stop', flush=True)
    await asyncio.Event().wait()


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--port', type=int, default=0, help='default: a free port')
    parser.add_argument('--serve', action='store_true', help='keep serving until Ctrl-C')
    args = parser.parse_args()
    try:
        asyncio.run(main(args.port, args.serve))
    except KeyboardInterrupt:
        pass
    finally:
        component.shutdown()
    sys.exit(0)
