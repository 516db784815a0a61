"""Settings: the built-in defaults, their validation, and how layers combine.

A command's settings are resolved once per class, from four layers, highest
first::

    component.add('command', {'command_key': ..., ...})
    attributes defined on the subclass (or a class between it and Command)
    component.set('command_defaults', {...})
    the built-in DEFAULT_* values below

and kept as a frozen :class:`CommandSettings` for the hot path. Every value is
checked by :func:`check_value`, which raises :class:`~blackgate.ConfigError`
naming the key, the bad value and what is allowed.
"""
import dataclasses
import difflib
import math
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple

from .errors import BadRequest, ConfigError

__all__ = (
    'CommandSettings',
    'PoolSettings',
    'LimitSettings',
    'LIMIT_ALGORITHMS',
    'COMMAND_DEFAULTS',
    'SHARED_PER_KEY',
    'resolve_command_settings',
    'check_command_mapping',
    'check_pool_mapping',
    'check_limit_mapping',
    'RETRY_KEYS',
    'check_value',
    'check_class_attributes',
)

#: Seconds before the caller stops waiting and gets the fallback.
DEFAULT_TIMEOUT = 1.0
#: Minimum requests in the rolling window before the breaker may trip.
DEFAULT_REQUEST_VOLUME_THRESHOLD = 20
#: Error percentage at or above which the breaker trips.
DEFAULT_ERROR_THRESHOLD_PERCENTAGE = 50
#: Seconds the breaker stays open before it lets one trial request through.
DEFAULT_SLEEP_WINDOW = 5.0
#: Seconds covered by the rolling counters.
DEFAULT_ROLLING_WINDOW = 10.0
#: Buckets in the rolling window.
DEFAULT_ROLLING_BUCKETS = 10
#: Seconds between breaker re-evaluations; 0 re-evaluates on every completion.
DEFAULT_HEALTH_SNAPSHOT_INTERVAL = 0.5
#: Concurrent ``async def run()`` executions allowed per command key.
DEFAULT_MAX_CONCURRENT_REQUESTS = 10
#: Concurrent fallbacks allowed per command key.
DEFAULT_FALLBACK_MAX_CONCURRENT_REQUESTS = 10
#: The longest duration any setting takes (about 11.6 days); for no timeout at all,
#: set ``timeout_enabled = False``.
MAX_SECONDS = 1_000_000.0
#: The narrowest rolling-window bucket: one millisecond, as in Hystrix.
MIN_BUCKET_SECONDS = 0.001
#: Extra attempts after the first (0: no retries).
DEFAULT_RETRY_ATTEMPTS = 0
#: Seconds: the base of the exponential backoff with full jitter between attempts.
DEFAULT_RETRY_BACKOFF = 0.05
#: Retries may add at most this percentage of a command key's calls (Finagle, Envoy: 20).
DEFAULT_RETRY_BUDGET_PERCENT = 20
#: ... plus this many retries a second whatever the traffic (Finagle: 10).
DEFAULT_RETRY_BUDGET_MIN_PER_SECOND = 10
#: Workers of an executor pool.
DEFAULT_MAX_WORKERS = 10
#: Waiting slots of an executor pool; 0 rejects as soon as every worker is busy.
DEFAULT_MAX_QUEUE_SIZE = 0


@dataclasses.dataclass(frozen=True)
class CommandSettings:
    """The resolved, validated settings of one command class."""

    command_key: str
    group_key: str = 'default'
    timeout: float = DEFAULT_TIMEOUT
    timeout_enabled: bool = True
    fallback_enabled: bool = True
    circuit_breaker_enabled: bool = True
    circuit_breaker_request_volume_threshold: int = DEFAULT_REQUEST_VOLUME_THRESHOLD
    circuit_breaker_error_threshold_percentage: float = DEFAULT_ERROR_THRESHOLD_PERCENTAGE
    circuit_breaker_sleep_window: float = DEFAULT_SLEEP_WINDOW
    circuit_breaker_force_open: bool = False
    circuit_breaker_force_closed: bool = False
    circuit_breaker_count_rejections: bool = True
    metrics_rolling_window: float = DEFAULT_ROLLING_WINDOW
    metrics_rolling_buckets: int = DEFAULT_ROLLING_BUCKETS
    metrics_health_snapshot_interval: float = DEFAULT_HEALTH_SNAPSHOT_INTERVAL
    max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS
    fallback_max_concurrent_requests: int = DEFAULT_FALLBACK_MAX_CONCURRENT_REQUESTS
    request_cache_enabled: bool = True
    retry_attempts: int = DEFAULT_RETRY_ATTEMPTS
    retry_backoff: float = DEFAULT_RETRY_BACKOFF
    retry_on: Tuple[type, ...] = (Exception,)
    retry_on_timeout: bool = False
    retry_budget_percent: float = DEFAULT_RETRY_BUDGET_PERCENT
    retry_budget_min_per_second: float = DEFAULT_RETRY_BUDGET_MIN_PER_SECOND
    #: an adaptive limit on the ``async def run()`` semaphore (``max_concurrent_requests``
    #: is then its ceiling); a dict when set, resolved into LimitSettings
    concurrency_limit: Optional[Any] = None

    def replace(self, **changes: Any) -> 'CommandSettings':
        """A validated copy with ``changes`` applied."""
        for key, value in changes.items():
            check_value('command %r' % (self.command_key,), key, value)
        return dataclasses.replace(self, **changes)

    def shared_values(self) -> Tuple[Any, ...]:
        """The values that every class sharing this command key must agree on."""
        return tuple(getattr(self, name) for name in SHARED_PER_KEY)


@dataclasses.dataclass(frozen=True)
class LimitSettings:
    """The validated ``concurrency_limit`` of an executor pool: an adaptive limit.

    ``options`` holds the algorithm's own parameters, every one of them
    (defaults filled in), as sorted ``(name, value)`` pairs.
    """

    algorithm: str
    initial: int
    min: int
    max: int
    #: seconds of samples aggregated into one update; 0 updates on every sample
    window: float
    #: samples a window needs before it counts (a quieter window is discarded)
    window_size: int
    options: Tuple[Tuple[str, Any], ...] = ()

    def option(self, name: str) -> Any:
        """One of the algorithm's parameters."""
        return dict(self.options)[name]


@dataclasses.dataclass(frozen=True)
class PoolSettings:
    """The validated settings of one executor pool (bulkhead)."""

    group_key: str
    max_workers: int = DEFAULT_MAX_WORKERS
    max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE
    #: an adaptive limit on the work admitted at once, or None for ``max_workers``
    concurrency_limit: Optional[LimitSettings] = None


#: The built-in value of every command setting except ``command_key``.
COMMAND_DEFAULTS: Dict[str, Any] = {
    field.name: field.default
    for field in dataclasses.fields(CommandSettings) if field.name != 'command_key'
}

#: Settings that belong to the command key (its breaker, metrics and semaphores)
#: rather than to one class: classes sharing a key must agree on them.
SHARED_PER_KEY = tuple(
    name for name in COMMAND_DEFAULTS
    if name.startswith(('circuit_breaker_', 'metrics_', 'retry_budget_'))
    or name.endswith('max_concurrent_requests') or name == 'concurrency_limit'
)

#: The retry settings, checked as soon as a class defining them is (see check_class_attributes).
RETRY_KEYS = tuple(name for name in COMMAND_DEFAULTS if name.startswith('retry_'))


# -- validation ---------------------------------------------------------------------------

def _is_number(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    # Any int is finite; math.isfinite() would raise OverflowError on one beyond a float.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _retry_classes(value: Any) -> Any:
    """``retry_on`` as a tuple of exception classes, or None if it is not one."""
    classes = value if isinstance(value, tuple) else (value,)
    for item in classes:
        if not (isinstance(item, type) and issubclass(item, Exception)) \
                or issubclass(item, BadRequest):
            return None
    return classes if classes else None


def _rule(accepts: Callable[[Any], bool], expected: str) -> Tuple[Callable[[Any], bool], str]:
    return accepts, expected


def _boolean():
    return _rule(lambda v: isinstance(v, bool), 'True or False')


def _number(low: float, high: float = math.inf, low_open: bool = False):
    if low_open:
        expected = 'a number greater than %g' % (low,)
    else:
        expected = 'a number of at least %g' % (low,)
    if high == 100:
        expected = 'a number from %g to %g' % (low, high)
    elif high != math.inf:
        expected += ' and at most %d' % (high,)
    return _rule(lambda v: _is_number(v) and (v > low if low_open else v >= low) and v <= high,
                 expected)


def _integer(low: int, high: int = 2 ** 31 - 1):
    return _rule(lambda v: _is_int(v) and low <= v <= high,
                 'a whole number from %d to %d' % (low, high))


def _name():
    return _rule(lambda v: isinstance(v, str) and v.strip() == v and v != '',
                 'a non-empty string without surrounding spaces')


_RULES: Dict[str, Tuple[Callable[[Any], bool], str]] = {
    'command_key': _name(),
    'group_key': _name(),
    'timeout': _number(0, MAX_SECONDS, low_open=True),
    'timeout_enabled': _boolean(),
    'fallback_enabled': _boolean(),
    'circuit_breaker_enabled': _boolean(),
    'circuit_breaker_request_volume_threshold': _integer(0),
    'circuit_breaker_error_threshold_percentage': _number(0, 100),
    'circuit_breaker_sleep_window': _number(0, MAX_SECONDS),
    'circuit_breaker_force_open': _boolean(),
    'circuit_breaker_force_closed': _boolean(),
    'circuit_breaker_count_rejections': _boolean(),
    'metrics_rolling_window': _number(0.001, MAX_SECONDS),
    'metrics_rolling_buckets': _integer(1, 10_000),
    'metrics_health_snapshot_interval': _number(0, MAX_SECONDS),
    'max_concurrent_requests': _integer(0),
    'fallback_max_concurrent_requests': _integer(0),
    'request_cache_enabled': _boolean(),
    'max_workers': _integer(1, 10_000),
    'max_queue_size': _integer(0),
    'retry_attempts': _integer(0, 100),
    'retry_backoff': _number(0, MAX_SECONDS),
    'retry_on': _rule(lambda v: _retry_classes(v) is not None,
                      'an exception class, or a tuple of them, subclasses of Exception and '
                      'not of BadRequest (never retried)'),
    'retry_on_timeout': _boolean(),
    'retry_budget_percent': _number(0, 100),
    'retry_budget_min_per_second': _number(0, 1_000_000),
    'concurrency_limit': _rule(lambda v: v is None or isinstance(v, (Mapping, LimitSettings)),
                               "None or a dict such as {'algorithm': 'gradient2'}"),
}

_COMMAND_KEYS = ('command_key',) + tuple(COMMAND_DEFAULTS)
_POOL_KEYS = tuple(field.name for field in dataclasses.fields(PoolSettings))

#: The adaptive limit algorithms and their own parameters' defaults (see limits.py
#: and docs/guide.rst for where each comes from and where Blackgate's differ).
LIMIT_ALGORITHMS: Dict[str, Dict[str, Any]] = {
    # Netflix concurrency-limits Gradient2Limit: smoothing 0.2, queueSize 4,
    # longWindow 600, rttTolerance 1.5.
    'gradient2': {'smoothing': 0.2, 'queue_size': 4, 'long_window': 600, 'tolerance': 1.5,
                  'window': 1.0, 'window_size': 10},
    # VegasLimit: smoothing 1.0, probeMultiplier 30 (alpha 3·log10 L, beta 6·log10 L).
    'vegas': {'smoothing': 1.0, 'probe_multiplier': 30, 'window': 1.0, 'window_size': 10},
    # AIMDLimit: backoffRatio 0.9. Netflix judges it on every sample; here it is windowed
    # like the others: at hundreds of calls a second, +1 per sample outruns every cut.
    'aimd': {'backoff_ratio': 0.9, 'window': 1.0, 'window_size': 10},
}
#: Keys every algorithm takes besides its own.
_LIMIT_COMMON = ('algorithm', 'initial', 'min', 'max', 'window', 'window_size')
#: The initial limit when none is given (Netflix's), capped by ``max``.
DEFAULT_LIMIT_INITIAL = 20
#: The floor when none is given: 1, so that a sick dependency may be shed to a trickle
#: (Netflix's Gradient2 floor is its initial 20, as many as our default pool's workers).
DEFAULT_LIMIT_MIN = 1

_LIMIT_RULES: Dict[str, Tuple[Callable[[Any], bool], str]] = {
    'initial': _integer(1, 10_000),
    'min': _integer(1, 10_000),
    'max': _integer(1, 10_000),
    'window': _number(0, 60),
    'window_size': _integer(1, 100_000),
    'smoothing': _rule(lambda v: _is_number(v) and 0 < v <= 1, 'a number greater than 0 and '
                       'at most 1'),
    'queue_size': _integer(0, 10_000),
    'long_window': _integer(1, 1_000_000),
    'tolerance': _number(1, 100),
    'probe_multiplier': _integer(1, 1_000_000),
    'backoff_ratio': _rule(lambda v: _is_number(v) and 0.5 <= v < 1, 'a number from 0.5 to '
                           'below 1'),
}


def check_value(owner: str, key: str, value: Any) -> None:
    """Raise :class:`ConfigError` unless ``value`` is allowed for ``key``."""
    accepts, expected = _RULES[key]
    if not accepts(value):
        problem = 'is out of range' if _looks_like(value, expected) else 'has the wrong type'
        raise ConfigError('%s: %s=%r %s; expected %s' % (owner, key, value, problem, expected))


def _looks_like(value: Any, expected: str) -> bool:
    if 'number' in expected:
        return _is_number(value) and ('whole' not in expected or _is_int(value))
    return False


def _check_keys(owner: str, mapping: Mapping[str, Any], allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    for key in mapping:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = ' (did you mean %r?)' % (close[0],) if close else ''
            raise ConfigError('%s: unknown key %r%s; allowed keys: %s'
                              % (owner, key, hint, ', '.join(allowed)))


def _edit_distance(a: str, b: str) -> int:
    """Insertions, deletions, substitutions and swaps of neighbours turning ``a`` into ``b``."""
    previous, current = None, list(range(len(b) + 1))
    for i, char in enumerate(a, 1):
        before, previous, current = previous, current, [i] + [0] * len(b)
        for j, other in enumerate(b, 1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1,
                             previous[j - 1] + (char != other))
            if (i > 1 and j > 1 and char == b[j - 2] and a[i - 2] == other
                    and before is not None):
                current[j] = min(current[j], before[j - 2] + 1)
    return current[-1]


def _snake_case(name: str) -> str:
    return ''.join('_' + char.lower() if char.isupper() else char for char in name).lstrip('_')


def _near_setting(name: str) -> Any:
    """The setting that ``name`` looks like a misspelling of, or None."""
    snake = _snake_case(name)
    if snake in _COMMAND_KEYS:
        return snake   # groupKey, circuitBreakerSleepWindow: Hystrix's spelling
    budget = 1 if len(name) < 8 else 2
    best = min(_COMMAND_KEYS, key=lambda key: _edit_distance(snake, key))
    return best if _edit_distance(snake, best) <= budget else None


def check_class_attributes(owner: str, attributes: Mapping[str, Any]) -> None:
    """Raise :class:`ConfigError` for a class attribute that looks like a misspelt setting.

    ``timout = 5`` or ``groupKey = 'x'`` would otherwise be ignored. Names starting
    with ``_``, methods and descriptors are not checked.
    """
    for name, value in attributes.items():
        if name in RETRY_KEYS:
            check_value(owner, name, value)   # checked now: a bad one would show at the first failure
            continue
        if name.startswith('_') or name in _COMMAND_KEYS:
            continue
        if callable(value) or hasattr(value, '__get__'):   # methods, properties, classmethods
            continue
        close = _near_setting(name)
        if close is not None:
            raise ConfigError(
                '%s: class attribute %r is not a setting (did you mean %r?); if it is yours, '
                'not a misspelt setting, name it %r or set it in __init__()'
                % (owner, name, close, '_' + name))


def _require_mapping(owner: str, value: Any, example: str) -> None:
    if not isinstance(value, Mapping):
        shown = repr(value)
        if isinstance(value, (set, frozenset)):   # in a stable order, not the hashes' order
            shown = '{%s}' % (', '.join(sorted(map(repr, value))),)
        raise ConfigError('%s: expected a dict, got %s %s; write it as %s'
                          % (owner, type(value).__name__, shown, example))


def check_command_mapping(owner: str, value: Any, *, needs_key: bool) -> Dict[str, Any]:
    """Validate a mapping of command settings and return it as a plain dict.

    ``needs_key``: an override (``add('command', ...)``) names its
    ``command_key``; ``command_defaults`` must not.
    """
    if needs_key:
        example = "{'command_key': 'get_user', 'timeout': 2.0}"
    else:
        example = "{'timeout': 2.0, 'circuit_breaker_sleep_window': 10.0}"
    _require_mapping(owner, value, example)
    allowed = _COMMAND_KEYS if needs_key else tuple(COMMAND_DEFAULTS)
    if not needs_key and 'command_key' in value:
        raise ConfigError('%s: command_key cannot have a default; name it in '
                          "component.add('command', {'command_key': ..., ...}) instead" % (owner,))
    _check_keys(owner, value, allowed)
    if needs_key and 'command_key' not in value:
        raise ConfigError('%s: missing command_key; write it as %s' % (owner, example))
    for key, item in value.items():
        check_value(owner, key, item)
    return dict(value)


def check_pool_mapping(owner: str, value: Any) -> PoolSettings:
    """Validate ``add('executor_pool', ...)``'s value and return its settings."""
    example = "{'group_key': 'service.session', 'max_workers': 10}"
    _require_mapping(owner, value, example)
    _check_keys(owner, value, _POOL_KEYS)
    if 'group_key' not in value:
        raise ConfigError('%s: missing group_key; write it as %s' % (owner, example))
    values = dict(value)
    limit = values.pop('concurrency_limit', None)
    for key, item in values.items():
        check_value(owner, key, item)
    settings = PoolSettings(**values)
    if limit is None:
        return settings
    owner = '%s: executor pool %r' % (owner, settings.group_key)
    return dataclasses.replace(settings, concurrency_limit=check_limit_mapping(
        owner, limit, settings.max_workers, settings.max_queue_size))


def check_limit_mapping(owner: str, value: Any, max_workers: int,
                        max_queue_size: int = 0,
                        ceiling: str = "the pool's max_workers") -> LimitSettings:
    """Validate a ``concurrency_limit`` and return its settings.

    ``max_workers`` is the most it may admit (a command's: ``max_concurrent_requests``,
    named by ``ceiling`` in the error).
    """
    example = "{'algorithm': 'gradient2', 'initial': 10, 'min': 1, 'max': %d}" % (max_workers,)
    owner = '%s: concurrency_limit' % (owner,)
    _require_mapping(owner, value, example)
    algorithm = value.get('algorithm', 'gradient2')
    if algorithm not in LIMIT_ALGORITHMS:
        raise ConfigError('%s: algorithm=%r is not known; expected one of %s'
                          % (owner, algorithm, ', '.join(map(repr, LIMIT_ALGORITHMS))))
    own = LIMIT_ALGORITHMS[algorithm]
    allowed = _LIMIT_COMMON + tuple(name for name in own if name not in _LIMIT_COMMON)
    _check_keys('%s (algorithm %r)' % (owner, algorithm), value, allowed)
    for key, item in value.items():
        if key != 'algorithm':
            accepts, expected = _LIMIT_RULES[key]
            if not accepts(item):
                problem = ('is out of range' if _looks_like(item, expected)
                           else 'has the wrong type')
                raise ConfigError('%s: %s=%r %s; expected %s'
                                  % (owner, key, item, problem, expected))
    if max_queue_size:
        raise ConfigError(
            '%s: an adaptive limit learns from the latency of what it admits, and a queue in '
            'front of the workers hides it; remove max_queue_size=%r (or the limit)'
            % (owner, max_queue_size))
    high = value.get('max', max_workers)
    if high > max_workers:
        name = ceiling.split()[-1]
        raise ConfigError('%s: max=%r is more than %s=%r; the limit never admits more than '
                          'that: raise %s or lower max' % (owner, high, ceiling, max_workers,
                                                            name))
    low = value.get('min', min(DEFAULT_LIMIT_MIN, high))
    initial = value.get('initial', max(low, min(DEFAULT_LIMIT_INITIAL, high)))
    if not low <= initial <= high:
        raise ConfigError('%s: expected min <= initial <= max, got min=%r, initial=%r, max=%r'
                          % (owner, low, initial, high))
    options = {name: value.get(name, default) for name, default in own.items()
               if name not in _LIMIT_COMMON}
    return LimitSettings(algorithm, initial, low, high, value.get('window', own['window']),
                         value.get('window_size', own['window_size']),
                         tuple(sorted(options.items())))


def resolve_command_settings(command_key: str, class_values: Mapping[str, Any],
                             defaults: Mapping[str, Any],
                             overrides: Mapping[str, Any]) -> CommandSettings:
    """Layer overrides > class attributes > command defaults > built-ins, and validate."""
    owner = 'command %r' % (command_key,)
    for key, value in class_values.items():
        check_value(owner, key, value)
    values = dict(COMMAND_DEFAULTS)
    values.update(defaults)
    values.update(class_values)
    values.update((k, v) for k, v in overrides.items() if k != 'command_key')
    values['retry_on'] = _retry_classes(values['retry_on'])   # one class -> a tuple of it
    limit = values['concurrency_limit']
    if limit is not None and not isinstance(limit, LimitSettings):
        # the async def run() semaphore's: max_concurrent_requests is its ceiling
        values['concurrency_limit'] = check_limit_mapping(
            owner, limit, values['max_concurrent_requests'],
            ceiling='max_concurrent_requests')
    window, buckets = values['metrics_rolling_window'], values['metrics_rolling_buckets']
    if window / buckets < MIN_BUCKET_SECONDS:
        raise ConfigError('%s: metrics_rolling_window=%r split into metrics_rolling_buckets=%r '
                          'gives buckets narrower than %g s; use fewer buckets or a longer '
                          'window' % (owner, window, buckets, MIN_BUCKET_SECONDS))
    return CommandSettings(command_key=command_key, **values)
