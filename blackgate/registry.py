"""The registry: configuration, executor pools, and per-key breakers and metrics.

``component`` is the process-wide :class:`Component`. Configure it, then
``install()``::

    component.add('executor_pool', {'group_key': 'service.session', 'max_workers': 10})
    component.add('command', {'command_key': 'get_current_user', 'timeout': 2.0})
    component.set('command_defaults', {'circuit_breaker_sleep_window': 10.0})
    component.install()

A command class's settings are resolved once, on its first use, and kept
until the next ``install()``, which validates everything, starts new pools
and applies changed settings to the commands already in use.

.. warning::

   Configuration methods take a lock and may be called from any thread, but
   are meant for start-up and tests. The command hot path reads the registry
   without locking.
"""
import logging
import threading
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

from .breaker import CircuitBreaker
from .clock import SystemClock
from .collapser_metrics import CollapserMetrics
from .config import (CommandSettings, PoolSettings, SHARED_PER_KEY, check_command_mapping,
                     check_pool_mapping, resolve_command_settings)
from .context import RequestContext, RequestLog, Scope, current
from .errors import BlackgateError, ConfigError, PoolNotRegistered
from .events import BreakerState, Event
from .metrics import RollingMetrics
from .pools import ExecutorPool, LimitedPermits, Permits
from .retry import RetryBudget

__all__ = ('Component', 'component', 'KeyState')

log = logging.getLogger('blackgate')

DEFAULT_GROUP = 'default'
_SET_KEYS = ('command_defaults', 'state_store', 'tracing')
_ADD_KEYS = ('executor_pool', 'command')
_LISTENER_METHODS = ('on_event', 'on_state_change', 'on_reset')


class KeyState:
    """Everything one command key owns: settings, breaker, metrics and permits."""

    __slots__ = ('settings', 'breaker', 'metrics', 'run_permits', 'fallback_permits', 'owner',
                 'retry_budget', '_clock')

    def __init__(self, settings: CommandSettings, owner: Optional[str], clock,
                 notify: Callable[[str, BreakerState, BreakerState], None]) -> None:
        self.settings = settings
        self.owner = owner
        self.metrics = _new_metrics(settings, clock)
        self.breaker = CircuitBreaker(settings, self.metrics, clock, notify)
        self._clock = clock
        self.run_permits = self._new_run_permits(settings)
        self.fallback_permits = Permits(settings.fallback_max_concurrent_requests)
        #: the key's retry budget (blackgate.retry), or None while it makes no retries
        self.retry_budget: Optional[RetryBudget] = None
        self._apply_budget(settings)

    def _apply_budget(self, settings: CommandSettings) -> None:
        budget = self.retry_budget
        if not settings.retry_attempts:
            self.retry_budget = None
        elif (budget is None or budget.percent != settings.retry_budget_percent
              or budget.min_per_second != settings.retry_budget_min_per_second):
            self.retry_budget = RetryBudget(settings.retry_budget_percent,
                                            settings.retry_budget_min_per_second, self._clock)

    def _new_run_permits(self, settings: CommandSettings) -> Permits:
        if settings.concurrency_limit is None:
            return Permits(settings.max_concurrent_requests)
        return LimitedPermits(settings.concurrency_limit, self._clock,
                              settings.timeout if settings.timeout_enabled else None)

    def set_clock(self, clock) -> None:
        """Time the key's metrics, breaker and budget by ``clock`` from now on."""
        self._clock = clock
        self.metrics.clock = clock
        self.breaker.clock = clock
        if self.retry_budget is not None:
            self.retry_budget.clock = clock
        if isinstance(self.run_permits, LimitedPermits):
            self.run_permits.clock = clock

    def apply(self, settings: CommandSettings) -> None:
        """Take new settings, in place: the counts restart only if the window's shape changed."""
        self.settings = settings
        self.metrics.configure(settings.metrics_rolling_window, settings.metrics_rolling_buckets,
                               settings.metrics_health_snapshot_interval,
                               settings.circuit_breaker_count_rejections)
        self.breaker.settings = settings
        permits = self.run_permits
        limited = isinstance(permits, LimitedPermits)
        if limited or settings.concurrency_limit is not None:
            if not isinstance(permits, LimitedPermits) \
                    or permits.limiter.settings != settings.concurrency_limit:
                # a new learned limit (those holding the old permits give them back there)
                self.run_permits = self._new_run_permits(settings)
            else:
                permits.drop_after = (settings.timeout if settings.timeout_enabled
                                      else float('inf'))
        else:
            self.run_permits.limit = settings.max_concurrent_requests
        self.fallback_permits.limit = settings.fallback_max_concurrent_requests
        self._apply_budget(settings)


def _new_metrics(settings: CommandSettings, clock) -> RollingMetrics:
    return RollingMetrics(settings.command_key, settings.metrics_rolling_window,
                          settings.metrics_rolling_buckets,
                          settings.metrics_health_snapshot_interval, clock,
                          settings.circuit_breaker_count_rejections)


class Component:
    """A registry of configuration, pools, breakers and metrics.

    ``blackgate.component`` is the one commands use; build another only to
    inspect configuration in isolation.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._clock: Any = SystemClock()
        self._listeners: Tuple[Any, ...] = ()
        self._session = None
        # called whenever what commands resolved may be stale (the command layer's cache)
        self._invalidation_hooks: Tuple[Callable[[], None], ...] = ()
        self._forget()

    def _forget(self) -> None:
        self._defaults: Dict[str, Any] = {}
        self._overrides: Dict[str, Dict[str, Any]] = {}
        self._pool_settings: Dict[str, PoolSettings] = {}
        self._pools: Dict[str, ExecutorPool] = {}
        self._keys: Dict[str, KeyState] = {}
        # class -> (command_key, class attribute values): what install() re-resolves
        self._classes: Dict[type, Tuple[str, Dict[str, Any]]] = {}
        # fleet mode: what set('state_store') asked for, and the running store
        self._store_options: Optional[Dict[str, Any]] = None
        self._store: Optional[Any] = None
        # tracing: what set('tracing') built, and what install() made current
        self._tracing: Optional[Any] = None
        #: the tracer commands hand their executions to (``blackgate.tracing``), or None
        self.tracer: Optional[Any] = None
        # collapsers: metrics per collapser key, and the pending batches of global scope
        self._collapser_metrics: Dict[str, CollapserMetrics] = {}
        self._global_scope = Scope()

    # -- configuration ---------------------------------------------------------------

    def set(self, key: str, value: Any) -> None:
        """Store a setting, applied by ``install()``.

        ``'command_defaults'``: a dict of command settings for every command;
        ``'state_store'``: fleet mode, e.g. ``{'backend': 'redis', 'url':
        'redis://127.0.0.1:6379/0', 'prefix': 'blackgate'}``; ``'tracing'``:
        ``{'backend': 'otel'}``, a span per execution (``blackgate.tracing``).
        """
        if key not in _SET_KEYS:
            hint = ("; use component.add(%r, ...) for that" % (key,)) if key in _ADD_KEYS else ''
            raise ConfigError('component.set(%r, ...): unknown key%s; set() takes %s'
                              % (key, hint, ', '.join(map(repr, _SET_KEYS))))
        if key == 'state_store':
            from .store import check_store_mapping
            options = check_store_mapping(value)
            with self._lock:
                self._store_options = options
            return
        if key == 'tracing':
            from .tracing import OTelTracer
            tracer = OTelTracer(value)
            with self._lock:
                self._tracing = tracer
            return
        checked = check_command_mapping("component.set('command_defaults', ...)", value,
                                        needs_key=False)
        with self._lock:
            self._defaults = checked

    def add(self, key: str, value: Any) -> None:
        """Add an ``'executor_pool'`` or a ``'command'`` override; applied by ``install()``."""
        owner = 'component.add(%r, ...)' % (key,)
        if key == 'executor_pool':
            settings = check_pool_mapping(owner, value)
            with self._lock:
                self._pool_settings[settings.group_key] = settings
        elif key == 'command':
            checked = check_command_mapping(owner, value, needs_key=True)
            with self._lock:
                self._overrides.setdefault(checked['command_key'], {}).update(checked)
        else:
            hint = ("; use component.set(%r, ...) for that" % (key,)) if key in _SET_KEYS else ''
            raise ConfigError('%s: unknown key%s; add() takes %s'
                              % (owner, hint, ', '.join(map(repr, _ADD_KEYS))))

    def delete(self, key: str) -> None:
        """Forget what ``set(key, ...)`` stored; a key never set is a no-op."""
        if key not in _SET_KEYS:
            raise ConfigError('component.delete(%r): unknown key; delete() takes %s'
                              % (key, ', '.join(map(repr, _SET_KEYS))))
        with self._lock:
            if key == 'state_store':
                self._store_options = None
            elif key == 'tracing':
                self._tracing = None
            else:
                self._defaults = {}

    def command_override(self, command_key: str) -> Dict[str, Any]:
        """A copy of what ``add('command', ...)`` stored for ``command_key`` (empty if nothing)."""
        with self._lock:
            return dict(self._overrides.get(command_key, {}))

    def forget_override(self, command_key: str, *names: str) -> None:
        """Take back the settings ``names`` (all, if none named) that ``add('command', ...)``
        stored for ``command_key``; applied by ``install()``. A setting never added is a no-op.
        """
        with self._lock:
            override = self._overrides.get(command_key)
            if override is None:
                return
            for name in names or list(override):
                if name != 'command_key':
                    override.pop(name, None)
            if set(override) <= {'command_key'}:
                del self._overrides[command_key]

    def install(self) -> None:
        """Validate the configuration, start new pools and apply settings (idempotent)."""
        with self._lock:
            # Everything that can fail comes first, so that a bad configuration changes nothing.
            resolved = {cls: self._resolve(cls, key, values)
                        for cls, (key, values) in self._classes.items()}
            known = {settings.command_key for settings in resolved.values()}
            for command_key in self._overrides:   # also those of commands yet to run
                if command_key not in known:
                    self._resolve(None, command_key, {})
            self._check_agreement(resolved)
            new_store = self._new_store()
            for pool_settings in self._pool_settings.values():
                self._start_pool(pool_settings)
            if DEFAULT_GROUP not in self._pool_settings:
                self._start_pool(PoolSettings(DEFAULT_GROUP))
            for settings in resolved.values():
                state = self._keys.get(settings.command_key)
                if state is not None:
                    state.apply(settings)
            for command_key, state in self._keys.items():
                if state.owner is None:   # looked up, never run: follow the configuration
                    state.apply(self._resolve(None, command_key, {}))
            if new_store is not False:
                self._stop_store()
                self._store = new_store
                for state in self._keys.values():
                    if new_store is not None:
                        new_store.attach(state.breaker)
            self.tracer = self._tracing
            self._invalidate()

    def _new_store(self) -> Any:
        """The fleet-mode store install() should run: False to keep the current one."""
        store = self._store
        if store is not None and store.options == self._store_options and store.running:
            return False
        if self._store_options is None:
            return None if store is not None else False
        from .store import RedisStateStore
        try:
            return RedisStateStore(self._store_options, self._clock)
        except ValueError as exc:   # redis-py's word on a URL it cannot use
            raise ConfigError("component.set('state_store', ...): url=%r: %s"
                              % (self._store_options['url'], exc)) from None

    def _stop_store(self) -> None:
        store, self._store = self._store, None
        if store is not None:
            for state in self._keys.values():
                state.breaker.store = None
            store.stop()

    def shutdown(self, timeout: Optional[float] = None) -> List[str]:
        """Stop every pool, waiting for running and queued work; ``install()`` starts them again.

        A ``run()`` cannot be interrupted, so one that never returns would keep this
        waiting: with ``timeout`` (seconds for the whole shutdown) it returns after that
        at the latest, logs a warning naming the workers still busy and returns them
        (``'thread name: what it runs'``); empty when everything finished.
        """
        with self._lock:
            pools = list(self._pools.values())
            self._invalidate()
            self._stop_store()
        for pool in pools:
            pool.shutdown(wait=False)   # every pool stops admitting at once
        # Threads are joined in real time, whatever clock the component has.
        monotonic = SystemClock.monotonic
        deadline = None if timeout is None else monotonic() + timeout
        stuck: List[str] = []
        for pool in pools:
            left = None if deadline is None else max(0.0, deadline - monotonic())
            stuck += pool.shutdown(wait=True, timeout=left)
        if stuck:
            log.warning('component.shutdown(timeout=%s): %d worker(s) still busy, left running '
                        '(daemon threads: they do not keep the process alive): %s',
                        timeout, len(stuck), '; '.join(stuck))
        return stuck

    def reset(self) -> None:
        """Shut down, then forget all configuration, pools, breakers, metrics and listeners.

        The clock goes back to the system clock; each listener's ``on_reset()``, if it
        has one, is called once it is forgotten. Meant for tests.
        """
        self.shutdown()
        with self._lock:
            self._forget()
            self._clock = SystemClock()
            listeners, self._listeners = self._listeners, ()
            session, self._session = self._session, None
            self._invalidate()
        if session is not None:
            session.close()
        for listener in listeners:
            on_reset = getattr(listener, 'on_reset', None)
            if on_reset is not None:
                _call_listener(on_reset)

    # -- what commands and users look up ----------------------------------------------

    def circuit_breaker(self, command_key: str) -> CircuitBreaker:
        """The circuit breaker of ``command_key``."""
        return self._key_state(command_key).breaker

    def metrics(self, command_key: str) -> RollingMetrics:
        """The rolling metrics of ``command_key``."""
        return self._key_state(command_key).metrics

    def retry_budget(self, command_key: str) -> Optional[RetryBudget]:
        """The retry budget of ``command_key``, or None while it makes no retries."""
        return self._key_state(command_key).retry_budget

    def pool(self, group_key: str) -> ExecutorPool:
        """The executor pool of ``group_key``."""
        with self._lock:
            return self._pool_for(group_key)

    @property
    def command_keys(self) -> List[str]:
        """Every command key that has run or been resolved, sorted."""
        return sorted(self._keys)

    @property
    def command_classes(self) -> Dict[type, str]:
        """Every command class that has run or been resolved, with its command key."""
        with self._lock:
            return {cls: command_key for cls, (command_key, _) in self._classes.items()}

    @property
    def state_store(self) -> Optional[Any]:
        """The running fleet-mode store (``blackgate.store.RedisStateStore``), or None."""
        return self._store

    @property
    def pools(self) -> Dict[str, ExecutorPool]:
        """The running pools by group key."""
        return dict(self._pools)

    def _key_state(self, command_key: str) -> KeyState:
        state = self._keys.get(command_key)
        if state is not None:
            return state
        if not isinstance(command_key, str) or not command_key:
            raise BlackgateError('command_key must be a non-empty string, got %r'
                                 % (command_key,))
        with self._lock:
            state = self._keys.get(command_key)
            if state is None:
                # Looked up before any class with this key ran: build it from the
                # configuration; the first class to run takes it over (see resolve()).
                settings = resolve_command_settings(command_key, {}, self._defaults,
                                                    self._overrides.get(command_key, {}))
                state = KeyState(settings, None, self._clock, self._state_changed)
                self._keys[command_key] = state
                if self._store is not None:
                    self._store.attach(state.breaker)
            return state

    # -- request contexts and collapsers -----------------------------------------------

    def request_context(self) -> RequestContext:
        """A new request context, for ``with`` or ``async with`` (see :mod:`blackgate.context`).

        Inside it, a command with ``cache_key()`` runs once per key, request-scoped
        collapsers gather their batches, and :meth:`request_log` lists what ran.
        """
        return RequestContext()

    def request_log(self) -> Optional[RequestLog]:
        """The log of the commands started in the current request context; None outside one."""
        context = current()
        return None if context is None else context.log

    @property
    def global_scope(self) -> Scope:
        """State shared by every caller until :meth:`reset`: global-scope collapsers use it."""
        return self._global_scope

    def collapser_metrics(self, collapser_key: str) -> CollapserMetrics:
        """The metrics of ``collapser_key`` (batches, requests batched, batch sizes)."""
        metrics = self._collapser_metrics.get(collapser_key)
        if metrics is not None:
            return metrics
        if not isinstance(collapser_key, str) or not collapser_key:
            raise BlackgateError('collapser_key must be a non-empty string, got %r'
                                 % (collapser_key,))
        with self._lock:
            metrics = self._collapser_metrics.get(collapser_key)
            if metrics is None:
                metrics = self._collapser_metrics[collapser_key] = CollapserMetrics(
                    collapser_key, self._clock)
            return metrics

    @property
    def collapser_keys(self) -> List[str]:
        """Every collapser key that has sent a batch or been looked up, sorted."""
        return sorted(self._collapser_metrics)

    # -- the clock ---------------------------------------------------------------------

    @property
    def clock(self):
        """The clock every time read goes through; tests set a ``FakeClock``."""
        return self._clock

    @clock.setter
    def clock(self, clock) -> None:
        for name in ('monotonic', 'wall', 'call_later', 'wait_until'):
            if not callable(getattr(clock, name, None)):
                raise ConfigError('component.clock: %r has no %s() method; use '
                                  'blackgate.clock.SystemClock or blackgate.testing.FakeClock'
                                  % (clock, name))
        with self._lock:
            self._clock = clock
            for state in self._keys.values():
                state.set_clock(clock)
            for metrics in self._collapser_metrics.values():
                metrics.clock = clock
            for pool in self._pools.values():
                pool.clock = clock
            if self._store is not None:
                self._store.clock = clock
            self._invalidate()

    # -- listeners ---------------------------------------------------------------------

    def add_listener(self, listener: Any) -> None:
        """Call ``listener.on_event(command_key, event)`` and ``on_state_change(command_key, old, new)``.

        And ``on_reset()`` when :meth:`reset` forgets it; a listener may have any of the three.
        """
        if not any(callable(getattr(listener, name, None)) for name in _LISTENER_METHODS):
            raise TypeError('a listener needs an on_event(command_key, event), an '
                            'on_state_change(command_key, old, new) or an on_reset() method; '
                            'got %r' % (listener,))
        with self._lock:
            self._listeners += (listener,)
            self._invalidate()

    def remove_listener(self, listener: Any) -> None:
        """Stop calling ``listener``; one never added is a no-op."""
        with self._lock:
            self._listeners = tuple(item for item in self._listeners if item is not listener)
            self._invalidate()

    @property
    def emitter(self) -> Optional[Callable[[str, Iterable[Event]], None]]:
        """What a command hands each execution's events to, ``(command_key, events)``.

        None while no listener is added, so that the hot path skips the call; adding or
        removing a listener makes commands ask again (see :meth:`add_invalidation_hook`).
        """
        return self._emit if self._listeners else None

    def _emit(self, command_key: str, events: Iterable[Event]) -> None:
        for listener in self._listeners:
            on_event = getattr(listener, 'on_event', None)
            if on_event is not None:
                for event in events:
                    _call_listener(on_event, command_key, event)

    def _state_changed(self, command_key: str, old: BreakerState, new: BreakerState) -> None:
        for listener in self._listeners:
            on_state_change = getattr(listener, 'on_state_change', None)
            if on_state_change is not None:
                _call_listener(on_state_change, command_key, old, new)

    # -- the shared HTTP session --------------------------------------------------------

    @property
    def session(self):
        """The ``requests.Session`` shared by ``HTTPProxyCommand`` instances.

        It takes no proxy or netrc settings from the environment, stores no cookies
        between requests, and keeps a connection pool at least as large as the
        largest executor pool.
        """
        with self._lock:
            if self._session is None:
                self._session = _new_session(max(
                    [10] + [pool.max_workers for pool in self._pools.values()]))
            return self._session

    # -- resolution (called by the command module) -------------------------------------

    def add_invalidation_hook(self, hook: Callable[[], None]) -> None:
        """Call ``hook()`` whenever what :meth:`resolve` gave may be stale.

        That is after ``install()``, ``shutdown()``, ``reset()``, a new ``clock``, and a
        listener added or removed. It is called under the registry's lock: it must be
        quick and take no lock of its own. The command layer clears its cache of
        resolved command classes with it; a hook stays through ``reset()``.
        """
        with self._lock:
            self._invalidation_hooks += (hook,)

    def _invalidate(self) -> None:
        for hook in self._invalidation_hooks:
            hook()

    def resolve(self, cls: type, command_key: str, class_values: Mapping[str, Any],
                needs_pool: bool = True) -> Tuple[CommandSettings, KeyState,
                                                  Optional[ExecutorPool]]:
        """Settings, key state and pool of a command class; remembered for ``install()``.

        ``needs_pool=False`` (an ``async def run()``, which takes no thread) skips the pool.
        """
        with self._lock:
            settings = self._resolve(cls, command_key, class_values)
            state = self._keys.get(command_key)
            if state is None:
                state = KeyState(settings, cls.__qualname__, self._clock, self._state_changed)
                self._keys[command_key] = state
                if self._store is not None:
                    self._store.attach(state.breaker)
            elif state.owner is None:
                state.owner = cls.__qualname__
                state.apply(settings)
            else:
                _check_same_key(state.owner, state.settings, cls.__qualname__, settings)
            pool = self._pool_for(settings.group_key) if needs_pool else None
            if pool is not None and pool.limiter is not None:
                # its adaptive limit counts an execution this long as dropped (a TIMEOUT)
                pool.note_timeout(settings.timeout if settings.timeout_enabled else None)
            self._classes[cls] = (command_key, dict(class_values))
            return settings, state, pool

    def _resolve(self, cls: Optional[type], command_key: str,
                 class_values: Mapping[str, Any]) -> CommandSettings:
        return resolve_command_settings(command_key, class_values, self._defaults,
                                        self._overrides.get(command_key, {}))

    def _check_agreement(self, resolved: Mapping[type, CommandSettings]) -> None:
        first: Dict[str, Tuple[str, CommandSettings]] = {}
        for cls, settings in resolved.items():
            seen = first.setdefault(settings.command_key, (cls.__qualname__, settings))
            _check_same_key(seen[0], seen[1], cls.__qualname__, settings)

    def _pool_for(self, group_key: str) -> ExecutorPool:
        pool = self._pools.get(group_key)
        if pool is not None:
            return pool
        if group_key == DEFAULT_GROUP:
            return self._start_pool(self._pool_settings.get(DEFAULT_GROUP)
                                    or PoolSettings(DEFAULT_GROUP))
        registered = sorted(set(self._pools) | {DEFAULT_GROUP})
        if group_key in self._pool_settings:
            raise PoolNotRegistered('executor pool %r was added but not installed; call '
                                    'component.install()' % (group_key,))
        raise PoolNotRegistered(
            "no executor pool for group_key %r (registered: %s); add it with "
            "component.add('executor_pool', {'group_key': %r}), then component.install()"
            % (group_key, ', '.join(map(repr, registered)), group_key))

    def _start_pool(self, settings: PoolSettings) -> ExecutorPool:
        old = self._pools.get(settings.group_key)
        if old is not None and old.settings == settings and not old.is_shut_down:
            return old
        pool = self._pools[settings.group_key] = ExecutorPool(settings, self._clock)
        if old is not None:
            old.retire(pool)   # calls still holding it are passed on; its work drains
        return pool

    def __repr__(self) -> str:
        return '<Component %d pools, %d command keys>' % (len(self._pools), len(self._keys))


def _check_same_key(owner: str, settings: CommandSettings, other_owner: str,
                    other: CommandSettings) -> None:
    if settings.shared_values() == other.shared_values():
        return
    for name in SHARED_PER_KEY:
        if getattr(settings, name) != getattr(other, name):
            raise ConfigError(
                'command_key %r is shared by %s and %s, which disagree on %s (%r and %r); '
                'a command key has one breaker and one set of metrics, so give them the '
                'same value or different command keys'
                % (settings.command_key, owner, other_owner, name, getattr(settings, name),
                   getattr(other, name)))


def _call_listener(method: Callable[..., Any], *args: Any) -> None:
    # Whatever a listener raises, a BaseException too (CancelledError, SystemExit, ...), stays
    # here: escaping, it would break the command that called it or leave a future pending.
    try:
        method(*args)
    except BaseException:
        log.exception('blackgate listener %r raised; ignored', method)


def _new_session(pool_size: int):
    import http.cookiejar

    import requests
    import requests.adapters

    session = requests.Session()
    session.trust_env = False   # no proxy or netrc settings from the environment
    session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
    adapter = requests.adapters.HTTPAdapter(pool_connections=pool_size, pool_maxsize=pool_size)
    session.mount('http://', adapter)
    session.mount('https://', adapter)
    return session


#: The registry that commands use.
component = Component()
