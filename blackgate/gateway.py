"""The gateway program: run an API gateway from a YAML file.

::

    python -m blackgate.gateway gateway.yaml        # or: blackgate-gateway gateway.yaml
    blackgate-gateway --check gateway.yaml           # validate only

The file is read with PyYAML's ``safe_load`` and checked as a whole before
anything listens: a bad file exits with status 2 and one line naming the
file, the key path (``routes[2].timeout``), the bad value and what is
allowed. ``docs/gateway.rst`` describes every key.

The process model: the first process (the supervisor) binds the listening
socket once, forks ``processes`` workers that share it, and restarts a worker
that dies. Each worker has its own IOLoop, registry, pools and breakers (fleet
mode, ``state_store``, shares the breakers through Redis). ``SIGHUP`` re-reads
the file: if it is valid every worker takes the new routes and settings for
its next requests, and in-flight requests finish under the old ones; if it is
not, the error is logged and the running configuration stays. ``SIGTERM`` or
``SIGINT`` drains: no new connections, in-flight requests finish (at most
``drain_timeout`` seconds), then every process exits, 0 when all went well.

.. warning::

   The supervisor starts no thread and no IOLoop: everything that does
   (pools, the fleet store, the server) is made in each worker after the fork.
"""
import argparse
import asyncio
import dataclasses
import difflib
import importlib.util
import json
import logging
import math
import os
import re
import signal
import socket
import sys
import time
import urllib.parse
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import tornado.httputil
import tornado.ioloop
import tornado.netutil
import tornado.web
import yaml  # type: ignore[import-untyped, unused-ignore]

from .config import COMMAND_DEFAULTS, check_value, resolve_command_settings
from .errors import BadRequest, ConfigError
from .proxy import GatewayNotFound, HTTPProxy, HTTPProxyCommand
from .registry import component
from .server import SERVER_SETTINGS, GatewayServer, ServerSettings
from .store import check_store_mapping

__all__ = ('GatewayConfig', 'Route', 'load_config', 'build_application', 'configure_component',
           'main')

log = logging.getLogger('blackgate')

#: Where the gateway listens when the file does not say.
DEFAULT_LISTEN = '127.0.0.1:8080'
#: Seconds a draining worker waits for in-flight requests before it closes them.
DEFAULT_DRAIN_TIMEOUT = 30.0
#: Seconds between two restarts of a worker that keeps dying at once.
RESTART_DELAY = 1.0
#: Exit status for a configuration error.
EXIT_CONFIG = 2

_ACCESS_LOGS = ('off', 'common', 'json')
_OBSERVABILITY = {'dashboard': '/blackgate', 'metrics': '/metrics',
                  'health': '/blackgate/health'}
_TOP_KEYS = ('listen', 'processes', 'drain_timeout') + tuple(SERVER_SETTINGS) + (
    'access_log', 'observability', 'command_defaults', 'pools', 'state_store', 'routes')
_POOL_KEYS = ('group_key', 'max_workers', 'max_queue_size')
_ROUTE_OWN_KEYS = ('prefix', 'upstream', 'group_key', 'command_key', 'strip_prefix',
                   'rewrite_prefix', 'websocket', 'trust_forwarded_headers', 'via',
                   'max_body_size', 'fallback') + ('buffer_body', 'body_idle_timeout',
                                                   'max_response_body_size')
#: The gateway's own defaults, under the file's command_defaults: as for HTTPProxyCommand,
#: a full pool is the callers' doing, so its rejections do not open the breaker.
_ROUTE_DEFAULTS = {'circuit_breaker_count_rejections': False}
_FALLBACK_KEYS = ('status', 'reason', 'headers', 'body')
_STORE_KEYS = ('backend', 'url', 'prefix', 'interval', 'socket_timeout')
_PREFIX = re.compile(r'/[A-Za-z0-9._~!$&\'()*+,;=:@%/-]*')
_DOT_SEGMENT = re.compile(r'(?:^|/)(?:\.|%2e){1,2}(?:/|$)', re.IGNORECASE)


class GatewayConfigError(ConfigError):
    """A gateway file that cannot be used: the message is one line, file and key path first."""


@dataclasses.dataclass(frozen=True)
class Fallback:
    """A route's fixed answer when its upstream fails."""

    status: int
    reason: Optional[str]
    headers: Tuple[Tuple[str, str], ...]
    body: bytes


@dataclasses.dataclass(frozen=True)
class Route:
    """One ``routes`` entry, validated."""

    prefix: str
    upstream: str
    command_key: str
    group_key: str
    strip_prefix: bool
    rewrite_prefix: Optional[str]
    websocket: bool
    trust_forwarded_headers: bool
    via: Optional[str]
    max_body_size: Optional[int]
    fallback: Optional[Fallback]
    #: HTTPProxyCommand's own attributes the route sets (buffer_body, body_idle_timeout, ...)
    proxy_attributes: Tuple[Tuple[str, Any], ...]
    #: every command setting, layered: the route's, then command_defaults, then built-ins
    settings: Tuple[Tuple[str, Any], ...]


@dataclasses.dataclass(frozen=True)
class GatewayConfig:
    """A whole gateway file, validated."""

    path: str
    host: str
    port: int
    processes: int
    drain_timeout: float
    server: ServerSettings
    access_log: str
    dashboard: Optional[str]
    metrics: Optional[str]
    health: Optional[str]
    pools: Tuple[Tuple[str, int, int], ...]   # (group_key, max_workers, max_queue_size)
    routes: Tuple[Route, ...]
    state_store: Optional[Tuple[Tuple[str, Any], ...]]


# -- reading the file ----------------------------------------------------------------------

class _Loader(yaml.SafeLoader):
    """``safe_load``, and a key given twice in one mapping is an error, not a silent overwrite."""


def _mapping_without_duplicates(loader: _Loader, node: yaml.MappingNode, deep: bool = False
                                ) -> Dict[Any, Any]:
    loader.flatten_mapping(node)
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:
            continue   # unhashable: construct_mapping says so
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, 'key %r is given twice' % (key,), key_node.start_mark)
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                        _mapping_without_duplicates)


def load_config(path: str, listen: Optional[str] = None) -> GatewayConfig:
    """Read and validate a gateway file; :class:`GatewayConfigError` says what is wrong.

    ``listen`` replaces the file's ``listen`` (the ``--listen`` option).
    """
    try:
        with open(path, 'rb') as stream:
            document = yaml.load(stream, Loader=_Loader)
    except OSError as exc:
        raise GatewayConfigError('%s: cannot read it: %s' % (path, exc.strerror or exc)) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = 'line %d, column %d' % (mark.line + 1, mark.column + 1) if mark else 'YAML'
        problem = ' '.join(str(exc.problem or exc.context or 'not valid YAML').split())
        raise GatewayConfigError('%s: %s: %s' % (path, where, problem)) from None
    except yaml.YAMLError as exc:
        raise GatewayConfigError('%s: not valid YAML: %s' % (path, ' '.join(str(exc).split()))) \
            from None
    return _Checker(path).config(document, listen)


class _Checker:
    """Validation of one file's document; every error names the file and the key path."""

    def __init__(self, path: str) -> None:
        self.path = path

    def fail(self, where: str, message: str) -> GatewayConfigError:
        return GatewayConfigError('%s: %s: %s' % (self.path, where, message))

    def keys(self, where: str, mapping: Any, allowed: Sequence[str], what: str) -> None:
        if not isinstance(mapping, Mapping):
            raise self.fail(where, 'expected %s, got %s' % (what, _kind(mapping)))
        for key in mapping:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=1)
                hint = ' (did you mean %r?)' % (close[0],) if close else ''
                raise self.fail(_join(where, key), 'unknown key%s; allowed: %s'
                                % (hint, ', '.join(allowed)))

    def value(self, where: str, value: Any, accepts: Any, expected: str) -> Any:
        if not accepts(value):
            raise self.fail(where, '%s is not allowed; expected %s' % (_show(value), expected))
        return value

    def setting(self, where: str, key: str, value: Any) -> Any:
        """A command or pool setting, checked by the library's own rules."""
        try:
            check_value('', key, value)
        except ConfigError as exc:
            text = str(exc)
            marker = '%s=%r ' % (key, value)
            detail = text.split(marker, 1)[1] if marker in text else text
            raise self.fail(where, '%s %s' % (_show(value), detail)) from None
        return value

    # -- the sections ---------------------------------------------------------------------

    def config(self, document: Any, listen: Optional[str]) -> GatewayConfig:
        if document is None:
            raise self.fail('routes', 'the file is empty; it needs at least routes')
        self.keys('(top level)', document, _TOP_KEYS, 'a mapping of settings')
        host, port = self.listen('listen' if listen is None else '--listen',
                                 document.get('listen', DEFAULT_LISTEN) if listen is None
                                 else listen)
        processes = self.processes(document.get('processes', 1))
        drain = self.value('drain_timeout', document.get('drain_timeout', DEFAULT_DRAIN_TIMEOUT),
                           lambda v: _is_number(v) and 0 <= v <= 86400,
                           'a number of seconds from 0 to 86400')
        server = {}
        for key, (accepts, expected) in SERVER_SETTINGS.items():
            if key in document:
                server[key] = self.value(key, document[key], accepts, expected)
        access_log = self.value('access_log', document.get('access_log', 'common'),
                                lambda v: v in _ACCESS_LOGS or v is False,
                                'one of %s' % (', '.join(_ACCESS_LOGS),))
        mounts = self.observability(document.get('observability', {}))
        defaults = self.command_defaults(document.get('command_defaults', {}))
        pools = self.pools(document.get('pools', []))
        store = self.state_store(document.get('state_store'))
        if 'routes' not in document:
            raise self.fail('routes', 'missing; the gateway needs at least one route')
        routes = self.routes(document['routes'], defaults, {name for name, _, _ in pools},
                             mounts)
        return GatewayConfig(
            path=self.path, host=host, port=port, processes=processes, drain_timeout=float(drain),
            server=ServerSettings(**server),
            access_log='off' if access_log is False else access_log,
            dashboard=mounts['dashboard'], metrics=mounts['metrics'], health=mounts['health'],
            pools=tuple(pools), routes=routes, state_store=store)

    def listen(self, where: str, value: Any) -> Tuple[str, int]:
        expected = "a port, or 'host:port' as in '127.0.0.1:8080', ':8080' or '[::1]:8080'"
        if isinstance(value, int) and not isinstance(value, bool):
            host, port = '', value
        elif isinstance(value, str):
            match = re.fullmatch(r'(?:\[([0-9A-Fa-f:.]+)\]|([^:\[\]]*)):(\d{1,5})', value.strip())
            if match is None:
                raise self.fail(where, '%s is not allowed; expected %s' % (_show(value), expected))
            host = match.group(1) or match.group(2) or ''
            port = int(match.group(3))
        else:
            raise self.fail(where, '%s is not allowed; expected %s' % (_show(value), expected))
        if not 0 <= port <= 65535:
            raise self.fail(where, 'port %d is out of range; expected 0 to 65535 (0: any free '
                                   'port)' % (port,))
        return host, port

    def processes(self, value: Any) -> int:
        if value == 'auto':
            return os.cpu_count() or 1
        return self.value('processes', value,
                          lambda v: isinstance(v, int) and not isinstance(v, bool)
                          and 1 <= v <= 256, "a whole number from 1 to 256, or 'auto' (one per "
                                             "core)")

    def observability(self, value: Any) -> Dict[str, Optional[str]]:
        self.keys('observability', value, tuple(_OBSERVABILITY), 'a mapping')
        mounts: Dict[str, Optional[str]] = {}
        for key, default in _OBSERVABILITY.items():
            item = value.get(key, default)
            where = 'observability.' + key
            if item is False or item is None:
                mounts[key] = None
                continue
            if not (isinstance(item, str) and _PREFIX.fullmatch(item) and item != '/'):
                raise self.fail(where, '%s is not allowed; expected a path such as %r, or false '
                                       '(off)' % (_show(item), default))
            mounts[key] = item.rstrip('/')
        if mounts['metrics'] is not None and importlib.util.find_spec('prometheus_client') is None:
            if 'metrics' in value:
                raise self.fail('observability.metrics', "/metrics needs prometheus-client: "
                                "pip install prometheus-client (in a checkout: pip install "
                                "-e '.[prometheus]'), or set it to false")
            mounts['metrics'] = None   # the default, without the package: said at start-up
        return mounts

    def command_defaults(self, value: Any) -> Dict[str, Any]:
        if isinstance(value, Mapping) and 'group_key' in value:
            raise self.fail('command_defaults.group_key', 'a route without a group_key gets a '
                            'pool of its own; set group_key on the routes instead')
        allowed = tuple(key for key in COMMAND_DEFAULTS if key != 'group_key')
        self.keys('command_defaults', value, allowed, 'a mapping of command settings')
        for key, item in value.items():
            self.setting('command_defaults.' + key, key, item)
        return dict(value)

    def pools(self, value: Any) -> List[Tuple[str, int, int]]:
        if not isinstance(value, list):
            raise self.fail('pools', 'expected a list of executor pools, got %s' % (_kind(value),))
        pools: List[Tuple[str, int, int]] = []
        for index, item in enumerate(value):
            where = 'pools[%d]' % (index,)
            self.keys(where, item, _POOL_KEYS,
                      'a mapping such as {group_key: api, max_workers: 10}')
            if 'group_key' not in item:
                raise self.fail(where + '.group_key', 'missing')
            for key, setting in item.items():
                self.setting(where + '.' + key, key, setting)
            if any(name == item['group_key'] for name, _, _ in pools):
                raise self.fail(where + '.group_key', '%r is given twice' % (item['group_key'],))
            pools.append((item['group_key'], item.get('max_workers', 10),
                          item.get('max_queue_size', 0)))
        return pools

    def state_store(self, value: Any) -> Optional[Tuple[Tuple[str, Any], ...]]:
        if value is None:
            return None
        self.keys('state_store', value, _STORE_KEYS,
                  'a mapping such as {backend: redis, url: "redis://127.0.0.1:6379/0"}')
        try:
            checked = check_store_mapping(value)
        except ConfigError as exc:
            detail = str(exc).split(': ', 1)[-1]
            raise self.fail('state_store', detail) from None
        try:
            import redis   # check_store_mapping made sure it is there
            redis.Redis.from_url(checked['url'])   # parses only: no connection, no thread
        except ValueError as exc:
            raise self.fail('state_store.url', '%s: %s' % (_show(checked['url']), exc)) from None
        return tuple(sorted(checked.items()))

    def routes(self, value: Any, defaults: Mapping[str, Any], pools: set,
               mounts: Mapping[str, Optional[str]]) -> Tuple[Route, ...]:
        if not isinstance(value, list) or not value:
            raise self.fail('routes', 'expected a non-empty list of routes, got %s'
                            % (_kind(value),))
        routes: List[Route] = []
        reserved = {path: 'observability.' + key for key, path in mounts.items() if path}
        for index, item in enumerate(value):
            route = self.route('routes[%d]' % (index,), item, defaults, pools)
            for other_index, other in enumerate(routes):
                if other.prefix == route.prefix:
                    raise self.fail('routes[%d].prefix' % (index,), '%r is the prefix of '
                                    'routes[%d] too' % (route.prefix, other_index))
                if other.command_key == route.command_key:
                    raise self.fail('routes[%d].command_key' % (index,), '%r is the command_key '
                                    'of routes[%d] too; give each route its own'
                                    % (route.command_key, other_index))
            for path, key in reserved.items():
                if route.prefix == path or route.prefix.startswith(path + '/') or \
                        path.startswith(route.prefix + '/') and route.prefix != '/':
                    raise self.fail('routes[%d].prefix' % (index,), '%r overlaps %s (%r); move '
                                    'one of them' % (route.prefix, key, path))
            routes.append(route)
        # The longest prefix wins, whatever the order in the file.
        return tuple(sorted(routes, key=lambda r: len(r.prefix), reverse=True))

    def route(self, where: str, item: Any, defaults: Mapping[str, Any], pools: set) -> Route:
        command_keys = tuple(key for key in COMMAND_DEFAULTS if key != 'group_key')
        self.keys(where, item, _ROUTE_OWN_KEYS + command_keys,
                  'a mapping such as {prefix: /api, upstream: "http://127.0.0.1:9000"}')
        for key in ('prefix', 'upstream'):
            if key not in item:
                raise self.fail(where + '.' + key, 'missing')
        prefix = item['prefix']
        if not (isinstance(prefix, str) and _PREFIX.fullmatch(prefix)) or \
                _DOT_SEGMENT.search(prefix):
            raise self.fail(where + '.prefix', '%s is not allowed; expected a path starting with '
                                               "'/', such as '/api/users'" % (_show(prefix),))
        prefix = prefix.rstrip('/') or '/'
        upstream = self.upstream(where + '.upstream', item['upstream'])
        command_key = item.get('command_key', _key_from_prefix(prefix))
        self.setting(where + '.command_key', 'command_key', command_key)
        group_key = item.get('group_key', command_key)
        self.setting(where + '.group_key', 'group_key', group_key)
        if 'group_key' in item and group_key not in pools and group_key != 'default':
            close = difflib.get_close_matches(group_key, sorted(pools), n=1)
            hint = ' (did you mean %r?)' % (close[0],) if close else ''
            raise self.fail(where + '.group_key', '%r has no entry in pools%s; add {group_key: '
                            '%s} to pools, or leave group_key out for a pool of its own'
                            % (group_key, hint, group_key))
        flags = {}
        for key, default in (('strip_prefix', True), ('websocket', False),
                             ('trust_forwarded_headers', False)):
            flags[key] = self.value(where + '.' + key, item.get(key, default),
                                    lambda v: isinstance(v, bool), 'true or false')
        if flags['websocket'] and not hasattr(HTTPProxy, 'websocket'):
            raise self.fail(where + '.websocket', 'true needs an HTTPProxy that relays '
                                                  'WebSocket, which this Blackgate has not')
        rewrite = item.get('rewrite_prefix')
        if rewrite is not None:
            if not (isinstance(rewrite, str) and _PREFIX.fullmatch(rewrite)) or \
                    _DOT_SEGMENT.search(rewrite):
                raise self.fail(where + '.rewrite_prefix', "%s is not allowed; expected a path "
                                "starting with '/'" % (_show(rewrite),))
            if not flags['strip_prefix']:
                raise self.fail(where + '.rewrite_prefix', 'replaces the prefix, so it needs '
                                                           'strip_prefix: true')
            rewrite = rewrite.rstrip('/')
        via = self.value(where + '.via', item.get('via', 'blackgate'),
                         lambda v: v is None or v is False or (
                             isinstance(v, str) and re.fullmatch(r'[!-~]+', v) is not None),
                         'a name without spaces, or false (no Via field)')
        max_body = self.value(where + '.max_body_size', item.get('max_body_size',
                                                                 HTTPProxy.max_body_size),
                              lambda v: v is None or (isinstance(v, int) and not isinstance(
                                  v, bool) and v >= 0), 'a number of bytes, or null (no limit)')
        fallback = self.fallback(where + '.fallback', item['fallback']) \
            if 'fallback' in item else None
        proxy_attributes = []
        if 'buffer_body' in item:
            proxy_attributes.append(('buffer_body', self.value(
                where + '.buffer_body', item['buffer_body'], lambda v: isinstance(v, bool),
                'true or false')))
        for key, what in (('body_idle_timeout', 'seconds above 0, or null (the timeout; none '
                                                'for an event stream)'),
                          ('max_response_body_size', 'a number of bytes above 0, or null')):
            if key in item:
                proxy_attributes.append((key, self.value(
                    where + '.' + key, item[key], lambda v: v is None or (
                        isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0),
                    what)))
        own = {}
        for key in command_keys:
            if key in item:
                own[key] = self.setting(where + '.' + key, key, item[key])
        try:
            resolved = resolve_command_settings(command_key, {},
                                                dict(_ROUTE_DEFAULTS, **defaults),
                                                dict(own, group_key=group_key))
        except ConfigError as exc:
            raise self.fail(where, str(exc).split(': ', 1)[-1]) from None
        settings = tuple((key, getattr(resolved, key)) for key in COMMAND_DEFAULTS)
        return Route(prefix=prefix, upstream=upstream, command_key=command_key,
                     group_key=group_key, strip_prefix=flags['strip_prefix'],
                     rewrite_prefix=rewrite, websocket=flags['websocket'],
                     trust_forwarded_headers=flags['trust_forwarded_headers'],
                     via=via or None, max_body_size=max_body, fallback=fallback,
                     proxy_attributes=tuple(proxy_attributes), settings=settings)

    def upstream(self, where: str, value: Any) -> str:
        expected = "an http:// or https:// URL with a host, such as 'http://127.0.0.1:9000'"
        if not isinstance(value, str):
            raise self.fail(where, '%s is not allowed; expected %s' % (_show(value), expected))
        try:
            parts = urllib.parse.urlsplit(value)
            port = parts.port
        except ValueError as exc:
            raise self.fail(where, '%s is not a URL (%s); expected %s'
                            % (_show(value), exc, expected)) from None
        problem = None
        if parts.scheme not in ('http', 'https') or not parts.hostname:
            problem = 'is not a URL the gateway can call'
        elif parts.username is not None or parts.password is not None:
            problem = 'has credentials in it; send them as a header upstream instead'
        elif parts.query or parts.fragment or '?' in value or '#' in value:
            problem = 'has a query or fragment; the client\'s query is sent'
        elif re.search(r'\s', value):
            problem = 'has whitespace in it'
        elif port == 0:
            problem = 'has port 0'
        if problem:
            raise self.fail(where, '%s %s; expected %s' % (_show(value), problem, expected))
        return value.rstrip('/')

    def fallback(self, where: str, value: Any) -> Fallback:
        self.keys(where, value, _FALLBACK_KEYS, 'a mapping such as {status: 503, body: "..."}')
        if 'status' not in value:
            raise self.fail(where + '.status', 'missing')
        status = self.value(where + '.status', value['status'],
                            lambda v: isinstance(v, int) and not isinstance(v, bool)
                            and 200 <= v <= 599, 'an HTTP status from 200 to 599')
        reason = self.value(where + '.reason', value.get('reason'),
                            lambda v: v is None or (isinstance(v, str) and '\n' not in v
                                                    and '\r' not in v), 'a one-line string')
        headers = value.get('headers', {})
        self.value(where + '.headers', headers, lambda v: isinstance(v, Mapping),
                   'a mapping of field names to values')
        pairs = []
        for name, item in headers.items():
            items = item if isinstance(item, list) else [item]
            for one in items:
                if not (isinstance(name, str) and re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+",
                                                               name)):
                    raise self.fail(_join(where + '.headers', name), 'not a field name')
                if isinstance(one, bool) or not isinstance(one, (str, int, float)) or \
                        re.search(r'[\r\n\x00]', str(one)):
                    raise self.fail(_join(where + '.headers', name), '%s is not allowed; '
                                    'expected a one-line string, or a list of them' % (_show(one),))
                pairs.append((name, str(one)))
        body = value.get('body', '')
        self.value(where + '.body', body, lambda v: isinstance(v, str), 'a string')
        return Fallback(status=status, reason=reason, headers=tuple(pairs),
                        body=body.encode('utf-8'))


def _join(where: str, key: Any) -> str:
    return '%s.%s' % (where, key) if where != '(top level)' else str(key)


def _kind(value: Any) -> str:
    return {dict: 'a mapping', list: 'a list', str: 'a string', type(None): 'nothing'}.get(
        type(value), type(value).__name__)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + '...'


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


def _key_from_prefix(prefix: str) -> str:
    key = re.sub(r'[^A-Za-z0-9]+', '_', prefix).strip('_')
    return key or 'root'


# -- what a worker runs ------------------------------------------------------------------

def _route_command(route: Route) -> type:
    """An :class:`HTTPProxyCommand` subclass forwarding to the route's upstream."""
    attrs: Dict[str, Any] = {
        '__module__': __name__,
        '__doc__': 'Route %s -> %s' % (route.prefix, route.upstream),
        'group_key': route.group_key,
        'command_key': route.command_key,
        'route': route,
        'before_request': _before_request,
    }
    attrs.update(route.proxy_attributes)
    if route.fallback is not None:
        attrs['fallback'] = _fallback
    name = 'Route_' + re.sub(r'\W', '_', route.command_key)
    return type(name, (HTTPProxyCommand,), attrs)


def _before_request(self: Any) -> None:
    route: Route = self.route
    path = self.request['path']
    if _DOT_SEGMENT.search(path):
        # The prefix was matched as sent; '..' must not lead out of it upstream.
        raise BadRequest('dot segment in the path')
    if route.strip_prefix and route.prefix != '/':
        rest = path[len(route.prefix):] if path.startswith(route.prefix) else path
        path = (route.rewrite_prefix or '') + (rest or '/')
    elif route.rewrite_prefix is not None:   # prefix '/': rewrite puts the new one in front
        path = route.rewrite_prefix + path
    self.request['url'] = route.upstream + path


def _fallback(self: Any) -> Dict[str, Any]:
    answer: Fallback = self.route.fallback
    return {'status_code': answer.status, 'reason': answer.reason,
            'headers': list(answer.headers), 'content': answer.body}


def configure_component(config: GatewayConfig) -> None:
    """Put the file's pools, route settings and state store into ``component``; install."""
    declared = {name for name, _, _ in config.pools}
    for name, workers, queue in config.pools:
        component.add('executor_pool', {'group_key': name, 'max_workers': workers,
                                        'max_queue_size': queue})
    for route in config.routes:
        if route.group_key not in declared and route.group_key != 'default':
            component.add('executor_pool', {'group_key': route.group_key})
        # Every setting, as an override: a reload that changes or removes one applies
        # it to the route's breaker too.
        component.add('command', dict(route.settings, command_key=route.command_key))
    if config.state_store is None:
        component.delete('state_store')
    else:
        component.set('state_store', dict(config.state_store))
    component.install()


class _Health(tornado.web.RequestHandler):
    def initialize(self, worker: '_Worker') -> None:
        self.worker = worker

    def set_default_headers(self) -> None:
        self.clear_header('Server')

    def get(self) -> None:
        draining = self.worker.draining
        self.set_status(503 if draining else 200)
        self.set_header('Cache-Control', 'no-store')
        self.finish({'status': 'draining' if draining else 'ok', 'pid': os.getpid(),
                     'generation': self.worker.generation,
                     'routes': len(self.worker.config.routes)})

    head = get


class _Metrics(tornado.web.RequestHandler):
    def initialize(self, registry: Any) -> None:
        self.registry = registry

    def set_default_headers(self) -> None:
        self.clear_header('Server')

    def get(self) -> None:
        from prometheus_client import exposition
        encoder, content_type = exposition.choose_encoder(self.request.headers.get('Accept', ''))
        self.set_header('Content-Type', content_type)
        self.finish(encoder(self.registry))


def _access_logger(kind: str) -> Any:
    pid = os.getpid()

    def write(line: str) -> None:
        try:
            os.write(1, line.encode('utf-8', 'replace') + b'\n')   # one write: lines never mix
        except OSError:
            pass

    def common(handler: tornado.web.RequestHandler) -> None:
        request = handler.request
        write('%s - - [%s] "%s %s %s" %d -' % (
            request.remote_ip, time.strftime('%d/%b/%Y:%H:%M:%S %z'), request.method,
            request.uri, request.version, handler.get_status()))

    def as_json(handler: tornado.web.RequestHandler) -> None:
        request = handler.request
        command = getattr(handler, 'command', None)
        write(json.dumps({
            'time': time.strftime('%Y-%m-%dT%H:%M:%S%z'), 'pid': pid,
            'remote': request.remote_ip, 'method': request.method, 'uri': request.uri,
            'version': request.version, 'status': handler.get_status(),
            'duration_ms': round(request.request_time() * 1000, 3),
            'route': getattr(command, 'command_key', None)}, separators=(',', ':')))

    if kind == 'common':
        return common
    if kind == 'json':
        return as_json
    return lambda handler: None


def build_application(config: GatewayConfig, worker: Optional['_Worker'] = None,
                      metrics_registry: Any = None) -> tornado.web.Application:
    """The Tornado application of a configuration: mounts first, then routes by prefix."""
    handlers: List[Any] = []
    if config.health and worker is not None:
        handlers.append((re.escape(config.health), _Health, dict(worker=worker)))
    if config.dashboard:
        from .web import routes as dashboard_routes
        handlers.extend(dashboard_routes(config.dashboard))
    if config.metrics and metrics_registry is not None:
        handlers.append((re.escape(config.metrics), _Metrics, dict(registry=metrics_registry)))
    for route in config.routes:
        settings: Dict[str, Any] = dict(command=_route_command(route),
                                        trust_forwarded_headers=route.trust_forwarded_headers,
                                        via=route.via, max_body_size=route.max_body_size)
        if route.websocket:
            settings['websocket'] = True
        pattern = '/.*' if route.prefix == '/' else re.escape(route.prefix) + '(?:/.*)?'
        handlers.append((pattern, HTTPProxy, settings))
    return tornado.web.Application(handlers, log_function=_access_logger(config.access_log),
                                   default_handler_class=GatewayNotFound)


class _Switch(tornado.httputil.HTTPServerConnectionDelegate):
    """The server's one delegate: new requests go to the current application."""

    def __init__(self, app: tornado.web.Application) -> None:
        self.app = app

    def start_request(self, server_conn: object, request_conn: Any) -> Any:
        return self.app.start_request(server_conn, request_conn)

    def on_close(self, server_conn: object) -> None:
        self.app.on_close(server_conn)


class _Worker:
    """One worker process: a server on the shared sockets, reloads, drains."""

    def __init__(self, config: GatewayConfig, sockets: List[socket.socket],
                 listen: Optional[str]) -> None:
        self.config = config
        self.sockets = sockets
        self.listen = listen
        self.generation = 1
        self.draining = False
        self.metrics_registry: Any = None
        self.server: Optional[GatewayServer] = None
        self.switch: Optional[_Switch] = None

    def _metrics_registry(self, config: GatewayConfig) -> Any:
        if config.metrics and self.metrics_registry is None:
            from prometheus_client import CollectorRegistry

            from .prometheus import BlackgateCollector
            self.metrics_registry = CollectorRegistry()
            self.metrics_registry.register(BlackgateCollector())
        return self.metrics_registry

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        configure_component(self.config)
        self.switch = _Switch(build_application(self.config, self,
                                                self._metrics_registry(self.config)))
        self.server = GatewayServer(self.switch, **dataclasses.asdict(self.config.server))
        self.server.add_sockets(self.sockets)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
        # A supervisor killed outright (SIGKILL) cannot pass SIGTERM on: drain when it is gone.
        supervisor = os.getppid()
        orphan_check = tornado.ioloop.PeriodicCallback(
            lambda: stop.set() if os.getppid() != supervisor else None, 1000)
        orphan_check.start()
        log.info('worker %d serving %d route(s)', os.getpid(), len(self.config.routes))
        await stop.wait()
        orphan_check.stop()
        return await self.drain()

    def reload(self) -> None:
        try:
            config = load_config(self.config.path, self.listen)
            if (config.host, config.port) != (self.config.host, self.config.port):
                log.warning('%s: listen changed to %s:%d; that takes a restart, the socket '
                            'stays %s:%d', config.path, config.host, config.port,
                            self.config.host, self.config.port)
            configure_component(config)
            app = build_application(config, self, self._metrics_registry(config))
        except ConfigError as exc:
            log.error('%s; keeping the running configuration', exc)
            return
        assert self.switch is not None and self.server is not None
        self.switch.app = app
        self.server.apply_settings(config.server)
        self.config = config
        self.generation += 1
        log.info('worker %d reloaded %s: %d route(s), generation %d', os.getpid(),
                 config.path, len(config.routes), self.generation)

    async def drain(self) -> int:
        server = self.server
        assert server is not None
        self.draining = True
        streams = (self.config.dashboard + '/hystrix.stream',) if self.config.dashboard else ()
        server.drain(close_paths=streams)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.drain_timeout
        while server.connection_count and loop.time() < deadline:
            await asyncio.sleep(0.02)
        status = 0
        if server.connection_count:
            log.warning('worker %d: drain_timeout=%g s over; closing %d connection(s)',
                        os.getpid(), self.config.drain_timeout, server.connection_count)
            await server.close_all_connections()
            status = 1
        component.shutdown()
        return status


def _worker_main(config: GatewayConfig, sockets: List[socket.socket],
                 listen: Optional[str]) -> int:
    # The signals stay blocked (as in the supervisor) until the worker's handlers are in:
    # one sent while it starts waits for them instead of killing it.
    return asyncio.run(_Worker(config, sockets, listen).run())


# -- the supervisor ------------------------------------------------------------------------

_SIGNALS = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD}


class _Supervisor:
    """Forks the workers, restarts one that dies, passes SIGHUP on, drains on SIGTERM."""

    def __init__(self, config: GatewayConfig, sockets: List[socket.socket],
                 listen: Optional[str]) -> None:
        self.config = config
        self.sockets = sockets
        self.listen = listen
        self.workers: Dict[int, float] = {}   # pid -> when it started
        self.restarts: List[float] = []        # when to start a replacement
        self.stopping = False
        self.failed = False

    def spawn(self) -> None:
        try:
            pid = os.fork()
        except OSError as exc:
            log.error('cannot start a worker: %s; trying again in %g s', exc, RESTART_DELAY)
            self.restarts.append(time.monotonic() + RESTART_DELAY)
            return
        if pid == 0:
            status = 1
            try:
                status = _worker_main(self.config, self.sockets, self.listen)
            except BaseException:   # a bug: say it, then go
                log.exception('worker %d failed', os.getpid())
            finally:
                logging.shutdown()
                os._exit(status)
        self.workers[pid] = time.monotonic()
        log.info('started worker %d', pid)

    def run(self) -> int:
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        for _ in range(self.config.processes):
            self.spawn()
        deadline = None
        while self.workers or self.restarts:
            now = time.monotonic()
            wait = 1.0
            if self.restarts:
                wait = max(0.0, min(self.restarts) - now)
            if deadline is not None:
                wait = min(wait, max(0.0, deadline - now))
            info = signal.sigtimedwait(_SIGNALS, wait) if wait > 0 else None
            if info is not None:
                if info.si_signo == signal.SIGHUP:
                    self.reload()
                elif info.si_signo in (signal.SIGTERM, signal.SIGINT) and not self.stopping:
                    self.stopping = True
                    self.restarts = []
                    deadline = time.monotonic() + self.config.drain_timeout + 5.0
                    log.info('draining (at most %g s)', self.config.drain_timeout)
                    self.signal_all(signal.SIGTERM)
                    for sock in self.sockets:
                        sock.close()   # kept for replacements until now; new clients are refused
            self.reap()
            now = time.monotonic()
            if not self.stopping:
                due = [when for when in self.restarts if when <= now]
                self.restarts = [when for when in self.restarts if when > now]
                for _ in due:
                    self.spawn()
            elif deadline is not None and now >= deadline and self.workers:
                log.error('workers %s did not drain in time; killing them',
                          ', '.join(map(str, sorted(self.workers))))
                self.signal_all(signal.SIGKILL)
                self.failed = True
                deadline = None
        log.info('stopped')
        return 1 if self.failed else 0

    def signal_all(self, signum: int) -> None:
        for pid in list(self.workers):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def reap(self) -> None:
        while self.workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.workers.clear()
                return
            if pid == 0:
                return
            started = self.workers.pop(pid, None)
            if started is None:
                continue
            code = os.waitstatus_to_exitcode(status) if hasattr(os, 'waitstatus_to_exitcode') \
                else status
            if self.stopping:
                if code != 0:
                    self.failed = True
                    log.warning('worker %d exited with %s while draining', pid, code)
                continue
            lived = time.monotonic() - started
            log.error('worker %d exited with %s; starting another', pid, code)
            self.restarts.append(time.monotonic() + (RESTART_DELAY if lived < RESTART_DELAY
                                                     else 0.0))

    def reload(self) -> None:
        if self.stopping:
            return
        try:
            config = load_config(self.config.path, self.listen)
        except ConfigError as exc:
            log.error('%s; keeping the running configuration', exc)
            return
        log.info('reloading %s', config.path)
        self.signal_all(signal.SIGHUP)
        if config.processes != self.config.processes:
            log.warning('%s: processes changed to %d; that takes a restart, %d keep running',
                        config.path, config.processes, self.config.processes)
            config = dataclasses.replace(config, processes=self.config.processes)
        self.config = dataclasses.replace(config, host=self.config.host, port=self.config.port)


#: Connections the kernel queues before a worker accepts them: nginx's default on Linux
#: (Tornado's is 128, which a burst of a few hundred clients overflows).
LISTEN_BACKLOG = 511


def _bind(config: GatewayConfig) -> List[socket.socket]:
    return tornado.netutil.bind_sockets(config.port, config.host or None,
                                        backlog=LISTEN_BACKLOG)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The ``blackgate-gateway`` command; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog='blackgate-gateway', description='Run a Blackgate API gateway from a YAML file.')
    parser.add_argument('config', metavar='FILE', help='the gateway file (YAML)')
    parser.add_argument('--check', action='store_true',
                        help='validate the file and exit (0: valid, 2: not)')
    parser.add_argument('--listen', metavar='HOST:PORT',
                        help="listen here instead of the file's listen (port 0: any free port)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format='%(asctime)s blackgate-gateway[%(process)d] %(levelname)s '
                               '%(message)s')
    try:
        config = load_config(args.config, args.listen)
    except ConfigError as exc:
        print('blackgate-gateway: %s' % (exc,), file=sys.stderr)
        return EXIT_CONFIG
    if args.check:
        print('blackgate-gateway: %s is valid: %d route(s)' % (config.path, len(config.routes)))
        return 0
    if config.metrics is None and importlib.util.find_spec('prometheus_client') is None:
        log.info('prometheus-client is not installed: no /metrics')
    try:
        sockets = _bind(config)
    except OSError as exc:
        print('blackgate-gateway: cannot listen on %s:%d: %s'
              % (config.host or '*', config.port, exc.strerror or exc), file=sys.stderr)
        return 1
    host, port = sockets[0].getsockname()[:2]
    shown = '[%s]' % host if ':' in host else host
    print('blackgate-gateway: listening on http://%s:%d with %d process(es)'
          % (shown, port, config.processes), flush=True)
    return _Supervisor(config, sockets, args.listen).run()


if __name__ == '__main__':
    sys.exit(main())
