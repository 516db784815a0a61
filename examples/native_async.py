"""Native ``async def`` handlers that ``await queue()``, and an ``async def run()``.

A Tornado handler written with ``async def`` awaits ``cmd.queue()``. Two
kinds of command can be awaited there:

- ``GetAlerts`` has an ordinary ``def run()`` using requests: it runs on a
  worker thread of its group's pool (thread isolation);
- ``GetForecast`` has an ``async def run()`` using Tornado's
  ``AsyncHTTPClient``: it runs on the IOLoop itself, without a thread, and
  what bounds it is a semaphore of ``max_concurrent_requests`` permits per
  command key (semaphore isolation). The call past the limit is rejected at
  once (``SEMAPHORE_REJECTED``), and at the timeout the coroutine is
  cancelled, which frees its permit at once (a thread could not be stopped).

The example starts a weather service and a web site on 127.0.0.1 (free ports),
all on one IOLoop, then sends the site one request, six at once while the
weather service holds its answers, and one for a city whose forecast never
comes.

Run it (about a second)::

    python examples/native_async.py
"""
import asyncio
import json
import time

import requests
import tornado.web
from tornado.httpclient import AsyncHTTPClient
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from blackgate import Command, component

# -- a weather service ------------------------------------------------------------

FORECASTS = {'paris': 'sunny, 24 C', 'oslo': 'rain, 12 C', 'lima': 'cloudy, 19 C',
             'rome': 'sunny, 27 C', 'kyiv': 'windy, 15 C', 'quito': 'showers, 14 C'}


class WeatherService:
    """What the service's handlers share: whether it answers, and what is pending."""

    def __init__(self):
        self.answering = asyncio.Event()     # cleared: forecasts wait
        self.answering.set()
        self.shutting_down = asyncio.Event()
        self.pending = 0


class ForecastHandler(tornado.web.RequestHandler):
    def initialize(self, service):
        self.service = service

    async def get(self, city):
        self.service.pending += 1
        try:
            if city not in FORECASTS:            # a forecast that never comes
                await self.service.shutting_down.wait()
            await self.service.answering.wait()
            self.write({'city': city, 'forecast': FORECASTS.get(city, 'unknown')})
        finally:
            self.service.pending -= 1


class AlertsHandler(tornado.web.RequestHandler):
    def get(self, city):
        self.write({'alerts': ['heat'] if city == 'rome' else []})


# -- the commands -------------------------------------------------------------------

class GetForecast(Command):
    command_key = 'get_forecast'
    max_concurrent_requests = 3     # the semaphore: at most 3 running at once
    base_url = None                 # set once the service has a port

    def __init__(self, city):
        self.city = city

    async def run(self):            # on the IOLoop: must never block
        response = await AsyncHTTPClient().fetch(
            '%s/forecast/%s' % (self.base_url, self.city), request_timeout=5)
        return json.loads(response.body)['forecast']

    def fallback(self):
        return 'no forecast right now'


http = requests.Session()   # shared by the pool's worker threads
http.trust_env = False      # no proxy from the environment for 127.0.0.1


class GetAlerts(Command):
    group_key = 'alerts'            # runs on the 'alerts' pool's threads
    command_key = 'get_alerts'
    base_url = None

    def __init__(self, city):
        self.city = city

    def run(self):                  # blocking is fine here: this is a worker thread
        resp = http.get('%s/alerts/%s' % (self.base_url, self.city), timeout=1)
        resp.raise_for_status()
        return resp.json()['alerts']

    def fallback(self):
        return []


# -- the web site ----------------------------------------------------------------------

class CityPage(tornado.web.RequestHandler):
    async def get(self, city):
        forecast = GetForecast(city)
        weather, alerts = await asyncio.gather(forecast.queue(), GetAlerts(city).queue())
        # A header for the example's sake: how the forecast was obtained.
        self.set_header('X-Forecast', '+'.join(event.name for event in forecast.events))
        self.write({'city': city, 'weather': weather, 'alerts': alerts})


# -- the story -----------------------------------------------------------------------

def serve(app):
    sockets = bind_sockets(0, '127.0.0.1')
    server = HTTPServer(app)
    server.add_sockets(sockets)
    return server, 'http://127.0.0.1:%d' % sockets[0].getsockname()[1]


async def visit(browser, site_url, city):
    started = time.monotonic()
    response = await browser.fetch('%s/city/%s' % (site_url, city))
    page = json.loads(response.body)
    print('   %-8s %-22s alerts: %-5s %-36s %.2f s' % (
        city, page['weather'], ', '.join(page['alerts']) or 'none',
        response.headers['X-Forecast'], time.monotonic() - started))


async def main():
    service = WeatherService()
    quiet = dict(log_function=lambda handler: None)   # no access log
    weather, weather_url = serve(tornado.web.Application([
        (r'/forecast/(\w+)', ForecastHandler, dict(service=service)),
        (r'/alerts/(\w+)', AlertsHandler)], **quiet))
    site, site_url = serve(tornado.web.Application([(r'/city/(\w+)', CityPage)], **quiet))
    GetForecast.base_url = GetAlerts.base_url = weather_url
    print('weather service on %s, web site on %s' % (weather_url, site_url))

    component.add('executor_pool', {'group_key': 'alerts', 'max_workers': 8})
    component.install()
    metrics = component.metrics('get_forecast')
    # The visitor's own client, apart from the one the commands share.
    browser = AsyncHTTPClient(force_instance=True)
    try:
        print('\n1. one visitor')
        await visit(browser, site_url, 'rome')

        print('\n2. six visitors at once; the weather service holds its answers')
        service.answering.clear()
        visits = [visit(browser, site_url, city) for city in sorted(FORECASTS)]
        for done, next_visit in enumerate(asyncio.as_completed(visits), 1):
            await next_visit
            if done == 3:
                print('   -- %d forecasts are waiting on the IOLoop, no thread; '
                      'the service answers now --' % metrics.concurrent_executions)
                service.answering.set()

        print('\n3. a forecast that never comes: the coroutine is cancelled at the timeout')
        await visit(browser, site_url, 'atlantis')
        print('   forecasts running now: %d (its permit came back at once)'
              % metrics.concurrent_executions)

        print('\nget_forecast: %s' % ', '.join(
            '%s %d' % (event.name, count)
            for event, count in metrics.rolling_counts().items() if count))
        print("threads: get_forecast used none; get_alerts ran %d times on the 'alerts' pool"
              % component.pool('alerts').completed_count)
    finally:
        service.answering.set()           # let held requests finish
        service.shutting_down.set()
        while service.pending:
            await asyncio.sleep(0.01)
        browser.close()
        site.stop()
        weather.stop()
        component.shutdown()


if __name__ == '__main__':
    asyncio.run(main())
