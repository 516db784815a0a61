"""Changing timeouts and thresholds without changing code.

A command's class attributes are what its author chose. Operators change
them from outside, and ``component.install()`` applies the layers, highest
first:

1. ``component.add('command', {'command_key': ..., ...})``, for one command key;
2. the attributes set on the command's class;
3. ``component.set('command_defaults', {...})``, for every command;
4. the built-in defaults (Hystrix's).

This example reads overrides from a JSON file and then from an environment
variable, both of which it writes itself, and shows what each change does to
calls against a quote service it starts on 127.0.0.1 (a free port). The
service takes 0.4 s per quote, and its headlines are broken.

Run it (about two seconds)::

    python examples/overrides.py
"""
import json
import os
import pathlib
import tempfile
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests

from blackgate import Command, Component, ConfigError, component

# -- a quote service on 127.0.0.1 -------------------------------------------------

quote_requests = 0


class QuoteHandler(BaseHTTPRequestHandler):
    def do_GET(self):
        global quote_requests
        if self.path.startswith('/headlines'):
            self.send_error(500)                  # broken today
            return
        quote_requests += 1
        time.sleep(0.4)                           # slower than its author thought
        body = json.dumps({'price': 101.25}).encode()
        self.send_response(200)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass    # keep the output to what the example prints


def start_service():
    server = ThreadingHTTPServer(('127.0.0.1', 0), QuoteHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


http = requests.Session()   # shared by the pool's worker threads
http.trust_env = False      # no proxy from the environment for 127.0.0.1
SERVICE_URL = None          # set once the service has a port


# -- the commands, as their author wrote them -------------------------------------------

class GetQuote(Command):
    group_key = 'market'
    command_key = 'get_quote'
    timeout = 0.25               # the author expected quotes to be fast

    def __init__(self, symbol):
        self.symbol = symbol

    def run(self):
        resp = http.get('%s/quote/%s' % (SERVICE_URL, self.symbol), timeout=5)
        resp.raise_for_status()
        return resp.json()['price']

    def fallback(self):
        return None


class GetHeadlines(Command):    # no settings of its own: it follows the defaults
    group_key = 'market'
    command_key = 'get_headlines'

    def run(self):
        resp = http.get('%s/headlines' % (SERVICE_URL,), timeout=5)
        resp.raise_for_status()
        return resp.json()

    def fallback(self):
        return []


# -- reading overrides ---------------------------------------------------------------

def apply_overrides(config):
    """Apply {"command_defaults": {...}, "commands": {key: {...}}, "executor_pools": [...]}.

    Everything is checked on a scratch Component first, so that a typo raises
    ConfigError and changes nothing.
    """
    for registry in (Component(), component):
        if 'command_defaults' in config:
            registry.set('command_defaults', config['command_defaults'])
        for command_key, settings in config.get('commands', {}).items():
            registry.add('command', dict(settings, command_key=command_key))
        for pool in config.get('executor_pools', []):
            registry.add('executor_pool', pool)
    component.install()


# -- the story ---------------------------------------------------------------------------

def quote():
    cmd = GetQuote('ACME')
    started = time.monotonic()
    price = cmd.execute()
    print('   get_quote      %-10s %-36s after %.2f s' % (
        'no quote' if price is None else '%.2f' % price,
        ' -> '.join(event.name for event in cmd.events), time.monotonic() - started))


def headlines(calls):
    breaker = component.circuit_breaker('get_headlines')
    for _ in range(calls):
        cmd = GetHeadlines()
        cmd.execute()
        print('   get_headlines  %-47s breaker %s' % (
            ' -> '.join(event.name for event in cmd.events), breaker.state.name))


def main():
    global SERVICE_URL
    server = start_service()
    SERVICE_URL = 'http://127.0.0.1:%d' % server.server_address[1]
    print('quote service listening on %s' % SERVICE_URL)
    component.add('executor_pool', {'group_key': 'market', 'max_workers': 4})
    component.install()

    try:
        print('\n1. as coded: GetQuote.timeout = 0.25, everything else built in')
        quote()
        headlines(3)                    # the breaker needs 20 requests in 10 s to trip

        with tempfile.TemporaryDirectory() as folder:
            path = pathlib.Path(folder, 'blackgate.json')
            path.write_text(textwrap.dedent("""\
                {
                  "command_defaults": {"circuit_breaker_request_volume_threshold": 3,
                                       "metrics_health_snapshot_interval": 0},
                  "commands": {"get_quote": {"timeout": 2.0}},
                  "executor_pools": [{"group_key": "market", "max_workers": 8}]
                }
                """))
            print('\n2. %s says:' % path.name)
            print(textwrap.indent(path.read_text().rstrip(), '   '))
            with open(path) as config_file:
                apply_overrides(json.load(config_file))
        quote()                         # the file's timeout beats the class attribute
        headlines(4)                    # the defaults reach every command
        print("   pool 'market' now has %d workers" % component.pool('market').max_workers)

        # An operator's kill switch: short-circuit get_quote, leaving its service alone.
        os.environ['BLACKGATE_OVERRIDES'] = json.dumps(
            {'commands': {'get_quote': {'circuit_breaker_force_open': True}}})
        print('\n3. BLACKGATE_OVERRIDES=%s' % os.environ['BLACKGATE_OVERRIDES'])
        apply_overrides(json.loads(os.environ['BLACKGATE_OVERRIDES']))
        before = quote_requests
        quote()
        print('   quote requests that reached the service: %d' % (quote_requests - before))

        os.environ['BLACKGATE_OVERRIDES'] = json.dumps({'commands': {'get_quote': {'timout': 1}}})
        print('\n4. a typo: BLACKGATE_OVERRIDES=%s' % os.environ['BLACKGATE_OVERRIDES'])
        try:
            apply_overrides(json.loads(os.environ['BLACKGATE_OVERRIDES']))
        except ConfigError as error:
            print('   ConfigError: %s' % error)
        print('   nothing changed: get_quote is still forced open: %s'
              % component.circuit_breaker('get_quote').force_open)
    finally:
        component.shutdown()
        server.shutdown()
        server.server_close()


if __name__ == '__main__':
    main()
