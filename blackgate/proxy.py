"""HTTPProxy: an API gateway whose every upstream call is a command.

:class:`HTTPProxy` is a Tornado request handler. For each request it builds a
``request`` dict, runs ``command(request).queue()`` (an
:class:`HTTPProxyCommand` subclass: breaker, bulkhead, timeout, fallback) and
writes the answer back::

    class APIService(HTTPProxyCommand):
        group_key = 'api.v1'
        command_key = 'proxy_v1_traffic'

        def before_request(self):
            path = self.request['path'].replace('/api', '')
            self.request['url'] = 'http://intra.service.com' + path

    app = tornado.web.Application([(r'/api/v1/(.*)', HTTPProxy, dict(command=APIService))])

The handler does what a careful reverse proxy does (RFC 9110 and 9112): it
drops hop-by-hop fields both ways, adds ``X-Forwarded-*`` and ``Via``, sends
the path and query byte for byte, passes the response's status, fields and
body bytes through unchanged, and answers failures with 502, 503 or 504.

.. warning::

   ``run()``, and so ``before_request()`` and ``after_response()``, run on a
   worker thread of the command's executor pool; the handler and a
   synchronous ``fallback()`` run on the IOLoop thread. The one
   ``requests.Session`` (``component.session``) is shared by every worker:
   use it, do not change it, from those hooks.
"""
import http.client
import json
import math
import re
import threading
import urllib.parse
import weakref
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Union

import requests
import tornado.httputil
import tornado.web
import urllib3
import urllib3.connection
import urllib3.connectionpool
import urllib3.exceptions
import urllib3.poolmanager
from urllib3.util import SKIP_HEADER

from .command import Command
from .errors import BadRequest, BlackgateError, CommandError
from .events import Event, FailureType
from .registry import component

try:
    from urllib3 import HTTPHeaderDict
except ImportError:  # urllib3 1.26
    from urllib3._collections import HTTPHeaderDict

__all__ = ('HTTPProxy', 'HTTPProxyCommand', 'UpstreamError', 'UpstreamTimeout',
           'UpstreamServerError')

#: Fields that describe one connection, not the message (RFC 9110 §7.6.1), and the
#: proxy credentials meant for this hop only. Dropped both ways, with every field
#: that a ``Connection`` field names.
HOP_BY_HOP = ('Connection', 'Keep-Alive', 'Proxy-Connection', 'TE', 'Trailer',
              'Transfer-Encoding', 'Upgrade', 'Proxy-Authorization', 'Proxy-Authenticate')

_BODY_METHODS = frozenset(('POST', 'PUT', 'PATCH'))
_NO_BODY_STATUS = frozenset((204, 304))
_REJECTED = frozenset((FailureType.SHORTCIRCUIT, FailureType.REJECTED_THREAD_EXECUTION,
                       FailureType.REJECTED_SEMAPHORE_EXECUTION,
                       FailureType.REJECTED_SEMAPHORE_FALLBACK))
_ABSOLUTE_FORM = re.compile(r'[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*')
_NOT_ASCII = re.compile(r'[^\x00-\x7f]')
_AUTHORITY_END = re.compile(r'[/?#]')
_VERBATIM_TARGET = re.compile(r'/[\x21\x22\x24-\x7e]*')   # visible ASCII, no '#'
_OBS_FOLD = re.compile(r'\r?\n[ \t]*')
_UNSAFE_IN_FIELD = re.compile(r'[\r\n\x00]')


def _normalize(name: str) -> str:
    """``Http-Header-Case``, as Tornado spells the names of the fields it received."""
    return '-'.join([word.capitalize() for word in name.split('-')])


# What the request pass does with a field, by Tornado's normalized name; the rest are kept.
_DROP, _FORWARDED_FOR = 'drop', 'forwarded-for'
_REQUEST_FIELDS = {_normalize(name): _DROP
                   for name in HOP_BY_HOP + ('Host', 'Expect', 'Content-Length')}
_REQUEST_FIELDS['X-Forwarded-For'] = _FORWARDED_FOR
# Fields only a trusted peer may set; an edge gateway drops what the client sent.
_UNTRUSTED_FIELDS = frozenset(('Forwarded', 'X-Real-Ip'))

# What the response pass does with a field, by lower-case name; the rest are kept.
_CONNECTION, _LENGTH, _DATE = 'connection', 'length', 'date'
_RESPONSE_FIELDS = {name.lower(): _DROP for name in HOP_BY_HOP}
_RESPONSE_FIELDS.update({'connection': _CONNECTION, 'content-length': _LENGTH,
                         'date': _DATE})


class UpstreamError(BlackgateError):
    """The upstream could not be reached, or its answer was malformed or truncated.

    The cause of a ``FAILURE`` of :class:`HTTPProxyCommand`; :class:`HTTPProxy`
    answers 502.
    """

    #: Logged on one line: the message tells all, and the stack is Blackgate's own.
    log_traceback = False


class UpstreamTimeout(UpstreamError, TimeoutError):
    """The upstream did not connect or answer within the command's ``timeout``; 504."""


class UpstreamServerError(UpstreamError):
    """The upstream answered with a 5xx status: a failure for the circuit breaker.

    With no fallback, :class:`HTTPProxy` sends this response to the client as it is.
    """

    def __init__(self, response: Dict[str, Any]) -> None:
        #: the upstream's response dict, as :attr:`HTTPProxyCommand.response`
        self.response = response
        super().__init__('upstream answered %s %s'
                         % (response.get('status_code'), response.get('reason') or ''))


class HTTPProxyCommand(Command):
    """A command that forwards one HTTP request to an upstream and returns its response.

    Subclass it, set ``group_key`` and ``command_key``, and write
    :meth:`before_request` to choose the upstream URL. ``run()`` sends exactly
    one request with ``component.session``, with the command's ``timeout``,
    following no redirect, and returns :attr:`response`. An upstream 5xx is
    raised as :class:`UpstreamServerError`, so it counts as a failure and runs
    the fallback.
    """

    def __init__(self, request: Dict[str, Any]) -> None:
        #: What :class:`HTTPProxy` built from the client's request: ``method``,
        #: ``path`` and ``query`` (raw, as received), ``params`` (``{name: [values]}``),
        #: ``headers`` (a case-insensitive ``urllib3.HTTPHeaderDict`` that keeps repeated
        #: fields; ``add()`` appends, ``[name] =`` replaces), ``data`` (the body, bytes),
        #: ``remote_ip``, and ``url`` (None until :meth:`before_request` sets it).
        self.request = request
        #: The upstream's answer once ``run()`` has it: ``status_code``, ``reason``,
        #: ``headers`` (a list of ``(name, value)`` pairs, repeated fields kept) and
        #: ``content`` (the body bytes as the upstream encoded them).
        self.response: Optional[Dict[str, Any]] = None

    def before_request(self) -> None:
        """Set ``self.request['url']`` to the upstream URL; change the request if needed.

        Build the URL from a fixed base and the path, as in
        ``'http://users.internal' + self.request['path']``: the host is then yours
        whatever the client sent. When the URL has no query, the client's raw query
        is appended. Raise :class:`~blackgate.BadRequest` to answer 400.
        """

    def after_response(self) -> None:
        """Inspect or change ``self.response`` before it is returned (or judged a 5xx)."""

    def run(self) -> Dict[str, Any]:
        """``before_request()``, one upstream call, ``after_response()``; the response dict."""
        self.before_request()
        request = self.request
        url = request.get('url')
        if not url:
            raise BlackgateError("%s.before_request() must set self.request['url'] to the "
                                 "upstream URL" % (type(self).__name__,))
        query = request.get('query')
        if query and '?' not in url:
            url += '?' + query
        method = request['method']
        headers = request.get('headers')
        if not isinstance(headers, HTTPHeaderDict):
            headers = request['headers'] = HTTPHeaderDict(headers or {})
        body = request.get('data') or None
        if isinstance(body, str):
            body = body.encode('utf-8')
        if body is not None:
            headers['Content-Length'] = str(len(body))
        elif method in _BODY_METHODS:
            headers['Content-Length'] = '0'
        else:
            headers.discard('Content-Length')
        # Otherwise urllib3 and http.client add their own: a proxy adds no field the
        # client did not send (an Accept-Encoding would change what comes back).
        if 'User-Agent' not in headers:
            headers['User-Agent'] = SKIP_HEADER
        if 'Accept-Encoding' not in headers:
            headers['Accept-Encoding'] = SKIP_HEADER

        # A PreparedRequest built by hand: prepare() would re-quote the URL, remove dot
        # segments and merge the session's default headers.
        prepared = requests.PreparedRequest()
        prepared.method = method
        prepared.url = url
        prepared.headers = headers   # type: ignore[assignment]  # urllib3 sends repeats apart
        prepared.body = body
        session = _session()
        timeout = self._bg_timeout()
        _exact.target = _verbatim_target(url)
        try:
            # The session's adapter, directly: Session.send() would also parse every
            # Set-Cookie for a cookie jar that stores nothing.
            upstream = session.get_adapter(url).send(
                prepared, stream=True, timeout=timeout, verify=session.verify,
                cert=session.cert, proxies=session.proxies)
        except requests.Timeout:
            raise UpstreamTimeout('%s did not answer within %s s'
                                  % (_host(url), timeout)) from None
        except requests.ConnectionError as exc:
            raise UpstreamError('connection to %s failed: %s'
                                % (_host(url), _root_cause(exc))) from None
        except (requests.exceptions.InvalidHeader, urllib3.exceptions.HTTPError,
                http.client.HTTPException) as exc:   # e.g. two different Content-Lengths
            raise UpstreamError('%s sent a malformed response: %s'
                                % (_host(url), _root_cause(exc))) from None
        finally:
            _exact.target = None

        raw = upstream.raw
        status = upstream.status_code
        if status < 200:
            raw.close()   # the real answer may follow on this connection: never reuse it
            raise UpstreamError('%s sent an interim %d response as its final answer'
                                % (_host(url), status))
        try:
            content = raw.read(decode_content=False)   # the bytes as encoded upstream
        except urllib3.exceptions.ReadTimeoutError:
            raise UpstreamTimeout('%s did not send its body within %s s'
                                  % (_host(url), timeout)) from None
        except (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError) as exc:
            raise UpstreamError('the response of %s broke off: %s'
                                % (_host(url), _root_cause(exc))) from None
        self.response = {'status_code': status, 'reason': upstream.reason,
                         'headers': [(name, _unfolded(value))
                                     for name, value in raw.headers.iteritems()],
                         'content': content}
        self.after_response()
        if self.response['status_code'] >= 500:
            raise UpstreamServerError(self.response)
        return self.response


@tornado.web.stream_request_body
class HTTPProxy(tornado.web.RequestHandler):
    """A request handler that forwards every request through an :class:`HTTPProxyCommand`.

    Route it with the command class: ``(r'/api/v1/(.*)', HTTPProxy,
    dict(command=APIService))``. The settings below are class attributes; a
    subclass may change them, and so may the route's dict (``dict(command=...,
    trust_forwarded_headers=False)``).
    """

    SUPPORTED_METHODS = ('GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE', 'OPTIONS')

    #: Largest request body in bytes; a larger one is answered 413 before it is read
    #: in full. None: only the HTTP server's own ``max_body_size`` applies.
    max_body_size: Optional[int] = 10 * 1024 * 1024
    #: Whether the peer is a proxy you run. True: an incoming ``X-Forwarded-For`` is
    #: appended to, and an incoming ``X-Forwarded-Proto`` or ``X-Forwarded-Host`` kept.
    #: False, for a gateway at the edge: every ``X-Forwarded-*``, ``Forwarded`` and
    #: ``X-Real-Ip`` field from the client is dropped and set from what the gateway saw.
    trust_forwarded_headers: bool = True
    #: The name this gateway gives itself in the ``Via`` field it adds to requests
    #: (RFC 9110 §7.6.3); None adds none.
    via: Optional[str] = 'blackgate'

    command: type

    def initialize(self, command: type, **settings: Any) -> None:
        """Take the :class:`HTTPProxyCommand` subclass, and any of the settings above."""
        if not (isinstance(command, type) and issubclass(command, HTTPProxyCommand)):
            raise TypeError('HTTPProxy needs command=<a subclass of HTTPProxyCommand>, got %r'
                            % (command,))
        self.command = command
        for name, value in settings.items():
            if name not in _SETTINGS:
                raise TypeError('HTTPProxy got an unknown setting %r; it takes command and %s'
                                % (name, ', '.join(_SETTINGS)))
            setattr(self, name, value)
        self._chunks: List[bytes] = []
        self._received = 0
        self._answered = False
        self._client_gone = False

    # -- what Tornado would otherwise add or check ----------------------------------------

    def set_default_headers(self) -> None:
        # No Server or Content-Type of Tornado's own on the upstream's answer.
        self.clear_header('Server')
        self.clear_header('Content-Type')

    def compute_etag(self) -> Optional[str]:
        """None: the upstream's ETag, or none; Tornado must not invent one (or a 304)."""
        return None

    def check_xsrf_cookie(self) -> None:
        """Nothing: a gateway forwards requests; XSRF is the upstream's business."""

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Tornado's own errors (405, or a bug: 500) as the same short JSON; no traceback."""
        if status_code == 405:
            self.set_header('Allow', ', '.join(self.SUPPORTED_METHODS))
        reason = tornado.httputil.responses.get(status_code, 'Unknown')
        self._json_error(reason.lower(), reason.lower().replace(' ', '-'), None)

    # -- the request body ------------------------------------------------------------------

    def prepare(self) -> None:
        limit = self.max_body_size
        if limit is not None:
            length = self.request.headers.get('Content-Length')
            # (a malformed length is Tornado's to refuse, with a 400)
            if length is not None and length.isdigit() and int(length) > limit:
                self._gateway_error(413, 'request body too large', 'body-too-large')

    def data_received(self, chunk: bytes) -> None:
        if self._answered:
            return
        self._received += len(chunk)
        limit = self.max_body_size
        if limit is not None and self._received > limit:   # a chunked body, too long
            self._chunks = []
            self._gateway_error(413, 'request body too large', 'body-too-large')
            return
        self._chunks.append(chunk)

    def on_connection_close(self) -> None:
        self._client_gone = True
        super().on_connection_close()

    # -- the methods -----------------------------------------------------------------------

    async def get(self, *args: str, **kwargs: str) -> None:
        """Forward the request (every supported method does the same)."""
        if self._answered:
            return
        request = self._request_dict()
        if request is None:
            return
        try:
            response = await self.command(request).queue()
        except CommandError as error:
            response = self._failure_response(error)
        except BadRequest:
            self._gateway_error(400, 'bad request', 'bad-request', Event.BAD_REQUEST.value)
            return
        if response is None:
            return
        if self._client_gone:
            self.set_status(499, 'Client Closed Request')   # for the access log
            self.finish()
            return
        try:
            self._write_response(response)
        except _MalformedField:
            self.clear()
            self._gateway_error(502, 'bad gateway', 'bad-gateway')

    head = post = put = patch = delete = options = get

    # -- building the request dict ---------------------------------------------------------

    def _request_dict(self) -> Optional[Dict[str, Any]]:
        request = self.request
        target = request.uri or ''
        if not target.startswith('/'):
            # absolute-form (RFC 9112 §3.2.2): keep the path and query only, so the
            # upstream's host stays the one before_request() chooses.
            match = _ABSOLUTE_FORM.match(target)
            if match is None:
                self._gateway_error(400, 'bad request target', 'bad-request')
                return None
            target = target[match.end():]
            if not target.startswith('/'):
                target = '/' + target
        if '#' in target:
            self._gateway_error(400, 'bad request target', 'bad-request')
            return None
        if not target.isascii():
            # Raw octets above 0x7f (Tornado decodes them as Latin-1): percent-encode
            # each, so the upstream decodes the very same octets.
            target = _NOT_ASCII.sub(lambda match: '%%%02X' % ord(match.group()), target)
        path, _, query = target.partition('?')

        incoming = request.headers
        named = _connection_names(incoming.get_list('Connection'))
        trusted = self.trust_forwarded_headers
        headers = HTTPHeaderDict()
        forwarded_for = []
        for name, value in incoming.get_all():   # the one pass over the client's fields
            kind = _REQUEST_FIELDS.get(name)
            if kind == _DROP or (named and name in named):
                continue
            if kind == _FORWARDED_FOR:
                if trusted:
                    forwarded_for.append(value)
                continue
            if not trusted and (name.startswith('X-Forwarded-') or name in _UNTRUSTED_FIELDS):
                continue
            headers.add(name, value)
        remote_ip = request.remote_ip or 'unknown'
        forwarded_for.append(remote_ip)
        headers['X-Forwarded-For'] = ', '.join(forwarded_for)
        if 'X-Forwarded-Proto' not in headers:
            headers['X-Forwarded-Proto'] = request.protocol
        if 'X-Forwarded-Host' not in headers:
            headers['X-Forwarded-Host'] = request.host
        if self.via:
            headers.add('Via', '%s %s' % (request.version[5:], self.via))

        chunks = self._chunks
        return {
            'method': request.method,
            'path': path,
            'query': query,
            'params': urllib.parse.parse_qs(query, keep_blank_values=True) if query else {},
            'headers': headers,
            'data': chunks[0] if len(chunks) == 1 else b''.join(chunks),
            'remote_ip': remote_ip,
            'url': None,
        }

    # -- writing the response --------------------------------------------------------------

    def _write_response(self, response: Mapping[str, Any]) -> None:
        status = int(response.get('status_code') or 200)
        # An empty reason gets the standard one (Tornado refuses to send none).
        self.set_status(status, response.get('reason') or None)
        method = self.request.method
        named = length = None
        for name, value in _fields(response.get('headers')):   # the one pass back
            kind = _RESPONSE_FIELDS.get(name.lower())
            if kind is None:
                self._add_field(name, value)
            elif kind == _CONNECTION:
                named = (named or []) + [token.strip() for token in value.split(',')]
            elif kind == _LENGTH:
                length = value
            elif kind == _DATE:
                self.clear_header('Date')   # the upstream's, not Tornado's
                self._add_field('Date', value)
        if named:
            for name in named:
                if name and name.lower() not in ('close', 'keep-alive'):
                    self.clear_header(name)

        if method == 'HEAD' or status in _NO_BODY_STATUS or status < 200:
            # No body. HEAD keeps the upstream's length, as a 304 may; flushing before
            # finish() keeps Tornado from setting a length of 0 or dropping fields.
            if length is not None and status != 204 and status >= 200:
                self._add_field('Content-Length', length)
            self.flush()
            self.finish()
            return
        content = response.get('content')
        if content:
            if isinstance(content, str):
                content = content.encode('utf-8')
            elif not isinstance(content, bytes):
                content = bytes(content)   # a bytearray or memoryview from a fallback
            self.write(content)   # finish() sets Content-Length to its exact size
        self.finish()

    def _add_field(self, name: str, value: Any) -> None:
        try:
            self.add_header(name, value)
        except (ValueError, tornado.httputil.HTTPInputError):
            # RFC 9110 §5.5: CR, LF and NUL become spaces; then it must be valid.
            value = _UNSAFE_IN_FIELD.sub(' ', str(value)).strip(' \t')
            try:
                self.add_header(name, value)
            except (ValueError, tornado.httputil.HTTPInputError):
                raise _MalformedField(name) from None

    # -- failures --------------------------------------------------------------------------

    def _failure_response(self, error: CommandError) -> Optional[Mapping[str, Any]]:
        """The upstream's own 5xx to send, or None once the gateway's own answer is sent."""
        cause = error.cause
        failure_type = error.failure_type
        if isinstance(cause, UpstreamServerError):
            return cause.response
        if failure_type in _REJECTED:
            if failure_type is FailureType.SHORTCIRCUIT:
                window = component.circuit_breaker(error.command_key).settings \
                    .circuit_breaker_sleep_window
                self._gateway_error(503, 'circuit breaker open', 'short-circuited',
                                    failure_type.value, max(1, math.ceil(window)))
            else:
                self._gateway_error(503, 'too many concurrent requests', 'rejected',
                                    failure_type.value, 1)
        elif failure_type is FailureType.TIMEOUT or isinstance(cause, UpstreamTimeout):
            self._gateway_error(504, 'upstream timed out', 'timeout', failure_type.value)
        else:
            self._gateway_error(502, 'bad gateway', 'bad-gateway', failure_type.value)
        return None

    def _gateway_error(self, status: int, error: str, marker: str,
                       failure_type: Optional[str] = None,
                       retry_after: Optional[int] = None) -> None:
        """Answer with the gateway's own short JSON error, marked ``X-Blackgate-Error``."""
        self._answered = True
        if self._client_gone:
            self.set_status(499, 'Client Closed Request')
            self.finish()
            return
        self.set_status(status)
        if retry_after is not None:
            self.set_header('Retry-After', retry_after)
        self._json_error(error, marker, failure_type)

    def _json_error(self, error: str, marker: str, failure_type: Optional[str]) -> None:
        self.set_header('Content-Type', 'application/json')
        self.set_header('Cache-Control', 'no-store')
        self.set_header('X-Blackgate-Error', marker)
        command = getattr(self, 'command', None)
        body = {'error': error, 'command_key': getattr(command, 'command_key', None),
                'failure_type': failure_type}
        self.finish(json.dumps(body).encode('ascii'))


_SETTINGS = ('max_body_size', 'trust_forwarded_headers', 'via')


class _MalformedField(Exception):
    """A response field Tornado cannot send, even cleaned."""


def _connection_names(values: List[str]) -> Optional[frozenset]:
    """The Tornado-normalized field names that ``Connection`` values name."""
    if not values:
        return None
    return frozenset(_normalize(token.strip())
                     for value in values for token in value.split(',') if token.strip())


def _fields(headers: Union[None, Mapping[str, Any], Iterable[Tuple[str, Any]]]
            ) -> Iterator[Tuple[str, Any]]:
    """(name, value) pairs from a list of pairs, or a dict of values or of lists."""
    if not headers:
        return iter(())
    if not isinstance(headers, Mapping):
        return iter(headers)
    if isinstance(headers, HTTPHeaderDict):
        return headers.iteritems()
    return _expand(headers)


def _expand(headers: Mapping[str, Any]) -> Iterator[Tuple[str, Any]]:
    for name, value in headers.items():
        if isinstance(value, (list, tuple)):
            for item in value:
                yield name, item
        else:
            yield name, value


def _host(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc.rpartition('@')[2] or url


def _root_cause(exc: BaseException) -> str:
    """The innermost exception that urllib3 and requests wrapped, as ``Type: message``."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, 'reason', None)
        if not isinstance(inner, BaseException):
            inner = next((arg for arg in reversed(exc.args) if isinstance(arg, BaseException)),
                         None) or exc.__cause__ or exc.__context__
        if inner is None:
            break
        exc = inner
    text = ' '.join(str(exc).split())[:200]   # one line, whatever the upstream sent
    return '%s: %s' % (type(exc).__name__, text) if text else type(exc).__name__


# -- the wire: the request target as it is, the response head read strictly -------------------
#
# urllib3 re-encodes every request target (urlopen() calls _encode_target): %2f becomes
# %2F, and a '[' or a stray '%' gets percent-encoded, which also re-encodes every other
# '%' in the path. A gateway must send what the client sent. run() puts the target, as
# it appears in the URL, in a thread-local; the connections of the shared session's pools
# put it back in the request line. Both happen on the worker thread, inside one call.
#
# http.client hands the response's field lines to email.parser, which also ends a line at
# a bare CR: an upstream's "X-A: 1<CR>Set-Cookie: x" would reach the client as two fields,
# and a line it cannot parse drops the fields after it and makes urllib3 log a traceback.
# The same connections read the head through _StrictHead, which gives http.client only
# valid lines (RFC 9112 §2.2, §5.1): a bare CR becomes a space, whitespace before the colon
# goes, and a line that is no field at all makes the response malformed (502).

_exact = threading.local()

_FIELD_LINE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+:[^\r\n]*\r?\n")
_FIELD_NAME = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _verbatim_target(url: str) -> Optional[str]:
    """The path and query of ``url`` as they are, if they can go on the wire unchanged."""
    start = url.find('://')
    if start < 0:
        return None
    match = _AUTHORITY_END.search(url, start + 3)
    if match is None:
        return None
    target = url[match.start():]
    return target if _VERBATIM_TARGET.fullmatch(target) else None


class _MalformedHead(http.client.HTTPException):
    """The upstream's response head has a line that is not a field."""


class _StrictHead:
    """The socket file while http.client reads a response head: every line checked."""

    __slots__ = ('fp', '_in_fields')

    def __init__(self, fp: Any) -> None:
        self.fp = fp
        self._in_fields = False   # False: the next line is a status line

    def readline(self, limit: int = -1) -> bytes:
        line = self.fp.readline(limit)
        if not self._in_fields:
            self._in_fields = True
            return _without_bare_cr(line)
        if line in (b'\r\n', b'\n', b''):
            self._in_fields = False   # the end of this head (a 1xx is followed by another)
            return line
        if _FIELD_LINE.fullmatch(line):
            return line
        if line[:1] in (b' ', b'\t'):   # obs-fold: a continuation, unfolded later
            return _without_bare_cr(line)
        name, colon, value = _without_bare_cr(line).partition(b':')
        name = name.rstrip(b' \t')
        if not colon or not _FIELD_NAME.fullmatch(name):
            raise _MalformedHead('not a field line: %r' % (line[:100],))
        return name + b':' + value

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fp, name)


def _unfolded(value: str) -> str:
    """A field value with each obs-fold replaced by one space (RFC 9112 §5.2).

    What http.client leaves of a folded line differs between Python versions,
    and so would what Tornado then makes of it.
    """
    if '\n' not in value:
        return value
    return _OBS_FOLD.sub(' ', value)


def _without_bare_cr(line: bytes) -> bytes:
    end = len(line) - 2 if line.endswith(b'\r\n') else len(line)
    if b'\r' not in line[:end]:
        return line
    return line[:end].replace(b'\r', b' ') + line[end:]


class _StrictResponse(http.client.HTTPResponse):
    def begin(self) -> None:
        if self.headers is not None:
            return
        fp = self.fp
        self.fp = _StrictHead(fp)
        try:
            super().begin()
        finally:
            if isinstance(self.fp, _StrictHead):
                self.fp = fp   # the body is read from the socket file itself


class _GatewayConnection:
    response_class = _StrictResponse

    def putrequest(self, method: str, url: str, *args: Any, **kwargs: Any) -> None:
        target = getattr(_exact, 'target', None)
        super().putrequest(method, url if target is None else target,  # type: ignore[misc]
                           *args, **kwargs)


class _HTTPConnection(_GatewayConnection,  # type: ignore[misc]
                      urllib3.connection.HTTPConnection):
    pass


class _HTTPSConnection(_GatewayConnection,  # type: ignore[misc]
                       urllib3.connection.HTTPSConnection):
    pass


class _HTTPConnectionPool(urllib3.connectionpool.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSConnectionPool(urllib3.connectionpool.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


_GATEWAY_POOLS = {'http': _HTTPConnectionPool, 'https': _HTTPSConnectionPool}
_adopted: 'weakref.WeakSet[requests.Session]' = weakref.WeakSet()
_adopt_lock = threading.Lock()


def _session() -> requests.Session:
    """``component.session``, whose stock pools now use the connections above."""
    session = component.session
    if session not in _adopted:
        with _adopt_lock:
            for adapter in session.adapters.values():
                manager = getattr(adapter, 'poolmanager', None)
                # Only urllib3's own pool classes: an adapter with pools of its own keeps them.
                if manager is not None and \
                        manager.pool_classes_by_scheme is urllib3.poolmanager.pool_classes_by_scheme:
                    manager.pool_classes_by_scheme = _GATEWAY_POOLS
                    manager.clear()
            _adopted.add(session)
    return session
