"""OpenTelemetry tracing of command executions (extra ``otel``).

Off until asked for::

    component.set('tracing', {'backend': 'otel'})
    component.install()

Then every execution, through ``execute()`` or ``queue()``, is one span named
after its command key, a child of whatever span is current where the command
was called. The span is current while the command runs, so a span that
``run()`` or ``fallback()`` starts is its child (on a worker thread too, as the
pool runs ``run()`` in a copy of the caller's context). Its attributes say
what happened: ``blackgate.command_key``, ``blackgate.group_key``,
``blackgate.events`` (``SUCCESS``, or ``FAILURE`` then ``FALLBACK_SUCCESS``,
...), ``blackgate.fallback`` (``successful``, ``failed``, ``rejected``,
``missing``: only when a fallback was wanted), ``blackgate.circuit_breaker.state``
and, for a command on a pool, ``blackgate.pool.active_workers`` and
``blackgate.pool.queued`` as the call came in. Every outcome but ``SUCCESS``
sets the span's status to error.

Spans go to the tracer provider the application set up with OpenTelemetry's
SDK (``opentelemetry.trace.set_tracer_provider``), or to the one given as
``{'backend': 'otel', 'tracer_provider': provider}``; Blackgate configures no
exporter. With tracing off, or without the ``opentelemetry-api`` package, the
commands pay two attribute reads and :func:`inject` and :func:`incoming` do
nothing.

For HTTP between services, :func:`inject` writes the current span's W3C
``traceparent`` and ``tracestate`` into outgoing headers, and :func:`incoming`
makes the trace of an incoming request current, so that the spans of a client,
a gateway and its upstream join one trace.

.. warning::

   Spans are started and ended on whichever thread runs the driver: the
   caller's for ``execute()``, the IOLoop's for ``queue()``. OpenTelemetry's
   spans are thread-safe; nothing here holds a lock.
"""
import contextlib
import threading
from typing import Any, Dict, Iterator, Mapping, MutableMapping, Optional

try:
    from opentelemetry import context as _context
    from opentelemetry import propagate as _propagate
    from opentelemetry import trace as _trace
except ImportError:  # the extra is not installed: tracing cannot be turned on
    _trace = None  # type: ignore[assignment]

from .errors import ConfigError
from .events import Event
from .registry import component

__all__ = ('OTelTracer', 'check_tracing_mapping', 'inject', 'incoming')

#: ``blackgate.fallback`` of a span: what the fallback did, by its event.
FALLBACK_KINDS = {
    Event.FALLBACK_SUCCESS: 'successful',
    Event.FALLBACK_FAILURE: 'failed',
    Event.FALLBACK_REJECTION: 'rejected',
    Event.FALLBACK_MISSING: 'missing',
}
_BACKENDS = ('otel',)


def check_tracing_mapping(value: Any) -> Dict[str, Any]:
    """The options of ``component.set('tracing', ...)``, checked; a ConfigError names the problem."""
    owner = "component.set('tracing', ...)"
    if not isinstance(value, Mapping):
        raise ConfigError("%s: expected a dict such as {'backend': 'otel'}, got %r"
                          % (owner, value))
    unknown = sorted(set(value) - {'backend', 'tracer_provider'})
    if unknown:
        raise ConfigError("%s: unknown key %s; the keys are 'backend' and 'tracer_provider'"
                          % (owner, ', '.join(map(repr, unknown))))
    backend = value.get('backend')
    if backend not in _BACKENDS:
        raise ConfigError("%s: backend=%r; expected one of %s"
                          % (owner, backend, ', '.join(map(repr, _BACKENDS))))
    if _trace is None:
        raise ConfigError("%s: backend 'otel' needs the opentelemetry-api package: pip install "
                          "opentelemetry-api (and opentelemetry-sdk to export spans), or pip "
                          "install -e '.[otel]' in Blackgate's checkout" % (owner,))
    provider = value.get('tracer_provider')
    if provider is not None and not callable(getattr(provider, 'get_tracer', None)):
        raise ConfigError('%s: tracer_provider=%r has no get_tracer() method; pass an '
                          'opentelemetry.sdk.trace.TracerProvider, or leave it out for the '
                          'global one' % (owner, provider))
    return dict(value)


class OTelTracer:
    """Turns command executions into OpenTelemetry spans; ``component.tracer`` when on."""

    def __init__(self, options: Mapping[str, Any]) -> None:
        self.options = check_tracing_mapping(options)
        from . import __version__
        self._tracer = _trace.get_tracer('blackgate', __version__,
                                         tracer_provider=self.options.get('tracer_provider'))
        # The command a driver of this thread is re-entering, traced already (see wants()).
        self._entering = threading.local()

    def wants(self, command: Any) -> bool:
        """Whether a driver of ``command`` should hand it to this tracer (not when it is re-entered)."""
        return getattr(self._entering, 'command', None) is not command

    def execute(self, command: Any) -> Any:
        """``command.execute()`` inside its span."""
        span, token = self._start(command)
        self._entering.command = command
        try:
            value = command.execute()
        except BaseException as exc:
            self._finish(span, command, exc)
            raise
        finally:
            self._entering.command = None
            _context.detach(token)
        self._finish(span, command, None)
        return value

    def queue(self, command: Any) -> Any:
        """``command.queue()`` inside its span; the span ends when the future resolves."""
        span, token = self._start(command)
        self._entering.command = command
        try:
            future = command.queue()
        except BaseException as exc:
            self._finish(span, command, exc)
            raise
        finally:
            self._entering.command = None
            _context.detach(token)

        def done(future: Any) -> None:
            error = None if future.cancelled() else future.exception()
            self._finish(span, command, error, cancelled=future.cancelled())

        future.add_done_callback(done)
        return future

    def _start(self, command: Any) -> Any:
        key = command.command_key
        attributes: Dict[str, Any] = {'blackgate.command_key': key}
        try:
            breaker = component.circuit_breaker(key)
            group = breaker.settings.group_key
            attributes['blackgate.group_key'] = group
            pool = component.pools.get(group)
            if pool is not None:
                attributes['blackgate.pool.active_workers'] = pool.active_count
                attributes['blackgate.pool.queued'] = pool.queue_size
        except Exception:   # a bad key: the driver itself will say what is wrong
            pass
        span = self._tracer.start_span(key, kind=_trace.SpanKind.INTERNAL,
                                       attributes=attributes)
        return span, _context.attach(_trace.set_span_in_context(span))

    def _finish(self, span: Any, command: Any, error: Optional[BaseException],
                cancelled: bool = False) -> None:
        try:
            events = tuple(command.events)
            span.set_attribute('blackgate.events', [event.value for event in events])
            for event in events:
                if event in FALLBACK_KINDS:
                    span.set_attribute('blackgate.fallback', FALLBACK_KINDS[event])
            try:
                span.set_attribute('blackgate.circuit_breaker.state',
                                   component.circuit_breaker(command.command_key).state.value)
            except Exception:
                pass
            if cancelled:
                span.set_status(_trace.Status(_trace.StatusCode.ERROR, 'cancelled by the caller'))
            elif not events or events[0] is not Event.SUCCESS:
                cause = command.execution_exception if events else error
                if cause is not None:
                    span.record_exception(cause)
                span.set_status(_trace.Status(
                    _trace.StatusCode.ERROR,
                    ' '.join(event.value for event in events) or type(error).__name__))
        finally:
            span.end()

    def __repr__(self) -> str:
        return '<OTelTracer %r>' % (self.options,)


def inject(headers: MutableMapping[str, str]) -> None:
    """Add the current span's ``traceparent`` (and ``tracestate``) to outgoing ``headers``.

    For the request a ``run()`` makes to its dependency: the dependency's spans then
    join the caller's trace, under the command's span. Does nothing with tracing off.
    """
    if component.tracer is None:
        return
    _propagate.inject(headers)


@contextlib.contextmanager
def incoming(headers: Mapping[str, str]) -> Iterator[None]:
    """Within the block, the trace of an incoming request (its W3C headers) is current.

    A command called in it is a child of the client's span. Does nothing with
    tracing off, or when the headers carry no trace.
    """
    if component.tracer is None:
        yield
        return
    token = _context.attach(_propagate.extract(headers))
    try:
        yield
    finally:
        _context.detach(token)
