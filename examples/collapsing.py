"""The N+1 problem, and a Collapser fixing it, in a Tornado handler.

A feed page shows 30 posts, each with its author's name. Looking the authors
up one by one costs 30 calls to the user service per page; a ``Collapser``
gathers the lookups made while the page is built (for ``timer_delay``, 10 ms)
into one batch call. This example starts a user service on 127.0.0.1 (a free
port) that counts its calls, serves the feed page from a Tornado application
whose handler opens a request context per request (``RequestContextMixin``),
and prints what each page cost the user service, and the request log.

Run it (under a second)::

    python examples/collapsing.py
"""
import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import tornado.httpclient
import tornado.web

from blackgate import Collapser, Command, component
from blackgate.context import RequestContextMixin

# -- a user service on 127.0.0.1 ---------------------------------------------------------

calls = []   # the ids asked for in each call the service served


class UsersHandler(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'   # keep-alive: the commands' session reuses connections

    def do_GET(self):
        ids = parse_qs(urlparse(self.path).query)['ids'][0].split(',')
        calls.append(ids)
        body = json.dumps({user_id: 'user %s' % user_id for user_id in ids}).encode()
        # head and body in one write: two small writes would wait for a delayed ACK
        self.wfile.write(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n'
                         b'Content-Length: %d\r\n\r\n%s' % (len(body), body))

    def log_message(self, format, *args):
        pass


def start_user_service():
    server = ThreadingHTTPServer(('127.0.0.1', 0), UsersHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return 'http://127.0.0.1:%d' % (server.server_address[1],)


USERS = start_user_service()


# -- one command for many users, and the collapser in front of it -------------------------

class GetUsers(Command):
    group_key = 'users'
    command_key = 'get_users'
    timeout = 5.0

    def __init__(self, user_ids):
        self.user_ids = user_ids

    def run(self):
        response = component.session.get(USERS + '/users',
                                         params={'ids': ','.join(self.user_ids)}, timeout=5)
        response.raise_for_status()
        return response.json()

    def fallback(self):
        return {user_id: 'someone' for user_id in self.user_ids}


class GetUser(Collapser):
    collapser_key = 'get_user'

    def __init__(self, user_id):
        self.user_id = user_id

    def request_argument(self):
        return self.user_id

    def create_command(self, arguments):
        return GetUsers(sorted(set(arguments)))   # each id once, however many asked

    def map_response(self, batch_result, arguments):
        return [batch_result[user_id] for user_id in arguments]


class GetUserOneByOne(Command):
    group_key = 'users'
    command_key = 'get_user_one_by_one'
    timeout = 5.0   # 30 calls through 10 workers: the last ones wait for a worker

    def __init__(self, user_id):
        self.user_id = user_id

    def run(self):
        response = component.session.get(USERS + '/users', params={'ids': self.user_id},
                                         timeout=5)
        return response.json()[self.user_id]

    def fallback(self):
        return 'someone'


# -- the feed page -------------------------------------------------------------------------

POSTS = [{'title': 'post %d' % i, 'author': str(i % 12)} for i in range(30)]


class FeedHandler(RequestContextMixin, tornado.web.RequestHandler):
    def initialize(self, lookup):
        self.lookup = lookup

    async def get(self):
        names = await asyncio.gather(*(self.lookup(post['author']).queue() for post in POSTS))
        self.write({'posts': [dict(post, author_name=name) for post, name in zip(POSTS, names)],
                    'log': str(self.request_context.log)})


async def main():
    component.add('executor_pool', {'group_key': 'users', 'max_workers': 10,
                                    'max_queue_size': 30})
    component.install()
    app = tornado.web.Application([
        ('/feed/one-by-one', FeedHandler, dict(lookup=GetUserOneByOne)),
        ('/feed/collapsed', FeedHandler, dict(lookup=GetUser)),
    ])
    server = app.listen(0, '127.0.0.1')
    port = next(iter(server._sockets.values())).getsockname()[1]
    client = tornado.httpclient.AsyncHTTPClient()
    for path in ('/feed/one-by-one', '/feed/collapsed'):
        del calls[:]
        page = json.loads((await client.fetch('http://127.0.0.1:%d%s' % (port, path))).body)
        assert len(page['posts']) == 30
        print('%-17s 30 posts, %2d calls to the user service' % (path, len(calls)))
        print('                  request log: %s' % (page['log'][:110],))
    server.stop()
    metrics = component.collapser_metrics('get_user').rolling_batch_sizes((50,))
    print('batches sent by get_user: %d, median size %d' % (metrics.batches,
                                                            metrics.percentiles[50]))
    component.shutdown()


if __name__ == '__main__':
    asyncio.run(main())
