"""A gateway process for the streaming tests: the README's APIService route, as written.

    python tests/streaming_gateway.py UPSTREAM_BASE_URL [LIFETIME_SECONDS]

Only the upstream's address differs from the example (and ``max_body_size=None``
on the route, so that a 200 MB upload may pass). It prints its port on the
first line, then serves until stdin closes or its lifetime ends, so that it
never outlives the test that started it.
"""
import asyncio
import json
import os
import signal
import sys

import tornado.web
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from blackgate import HTTPProxy, HTTPProxyCommand, component

UPSTREAM = sys.argv[1]


class APIService(HTTPProxyCommand):
    group_key = 'api.v1'
    command_key = 'proxy_v1_traffic'

    def before_request(self):
        path = self.request['path'].replace('/api', '')
        self.request['url'] = UPSTREAM + path

    def fallback(self):
        return dict(status_code=500, reason='Internal Server Error', headers={},
                    content=json.dumps({'code': 500, 'message': 'internal server error',
                                        'error': {}}))


async def main() -> None:
    component.add('executor_pool', {'group_key': 'api.v1', 'max_workers': 10})
    component.install()
    app = tornado.web.Application([(r'/api/v1/(.*)', HTTPProxy,
                                    dict(command=APIService, max_body_size=None))])
    sockets = bind_sockets(0, '127.0.0.1')
    HTTPServer(app).add_sockets(sockets)
    print(sockets[0].getsockname()[1], flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_reader(sys.stdin.fileno(), lambda: stop.set() if not os.read(0, 1) else None)
    await stop.wait()


if __name__ == '__main__':
    signal.signal(signal.SIGALRM, lambda *_: os._exit(0))
    signal.alarm(int(float(sys.argv[2])) if len(sys.argv) > 2 else 120)
    asyncio.run(main())
