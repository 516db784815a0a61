"""Fleet mode: one circuit breaker per command key, shared through Redis.

With ``component.set('state_store', {'backend': 'redis', 'url': ...})`` every
process using the same Redis and prefix shares, per command key, the
breaker's state and the rolling counts it judges:

- each completion is appended to an in-process queue: commands never talk to
  Redis. A background thread drains the queue every ``interval`` seconds,
  adds the counts to per-bucket Redis hashes and reads the merged window and
  the shared state back, in two pipelined round trips;
- the thread judges the merged counts: when they cross a key's thresholds it
  opens the breaker in Redis, atomically (a Lua script), and every process
  adopts the shared state at its next sync, so within one interval;
- after the sleep window the thread claims the trial in Redis (another Lua
  script); the one process that wins lets its next request through as the
  trial, and every other process stays short-circuited. The trial's outcome
  (or a ``reset()``) is sent by the thread and closes (a new count generation
  starts) or re-opens the breaker for everyone;
- every key expires on its own.

When Redis is unreachable or slow, each process carries on with its local
breaker (which keeps counting locally all along), logs it once, and rejoins
when Redis answers again. No command fails because Redis did.

Keys (``P`` is the prefix, ``K`` the command key)::

    P:K:state            hash: state, opened_at (epoch seconds), generation,
                         trial_at
    P:K:c:G:B            hash: event name -> count, for count generation G and
                         bucket B = floor(wall time / bucket width)

.. warning::

   The store's thread talks to Redis; command threads and the IOLoop only
   append to a deque and, once per sleep window, claim a trial. Bucket indexes
   use wall-clock time, so the hosts' clocks should agree to well within a
   bucket (NTP does that).
"""
import collections
import importlib.util
import logging
import math
import threading
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .errors import ConfigError
from .events import ERROR_EVENTS, BreakerState, Event
from .metrics import HealthCounts

__all__ = ('RedisStateStore', 'check_store_mapping')

log = logging.getLogger('blackgate')

_ERROR_NAMES = frozenset(event.value for event in ERROR_EVENTS)
_SUCCESS_NAME = Event.SUCCESS.value
_DEFAULT_INTERVAL = 0.5
_MIN_INTERVAL = 0.01          # for an explicit 'interval'
_MIN_DERIVED_INTERVAL = 0.1   # when derived from the commands' snapshot intervals (0 allowed)
_URL_SCHEMES = ('redis://', 'rediss://', 'unix://')

# Open the breaker if it is still closed in the generation that was judged.
_TRIP = """
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
local generation = tonumber(redis.call('HGET', KEYS[1], 'generation') or '0')
if state ~= 'closed' or generation ~= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', ARGV[2], 'generation', generation)
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""

# Claim the one trial: the sleep window is over (or a claimed trial's lease ran out).
_CLAIM = """
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
local now = tonumber(ARGV[1])
if state == 'open' and now >= tonumber(redis.call('HGET', KEYS[1], 'opened_at')) + tonumber(ARGV[2])
   or state == 'half_open' and now >= tonumber(redis.call('HGET', KEYS[1], 'trial_at')) + tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], 'state', 'half_open', 'trial_at', ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  return 1
end
return 0
"""

# The trial answered ('success' closes, with a new count generation; 'failure' re-opens
# for a new sleep window), or someone called reset() ('reset' closes from any state).
_SETTLE = """
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
if ARGV[1] ~= 'reset' and state ~= 'half_open' then return 0 end
if ARGV[1] == 'failure' then
  redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', ARGV[2])
else
  redis.call('HSET', KEYS[1], 'state', 'closed')
  redis.call('HINCRBY', KEYS[1], 'generation', 1)
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""


def check_store_mapping(value: Any) -> Dict[str, Any]:
    """Validate ``set('state_store', ...)``'s value; ConfigError names what is wrong."""
    owner = "component.set('state_store', ...)"
    example = ("{'backend': 'redis', 'url': 'redis://127.0.0.1:6379/0', "
               "'prefix': 'blackgate'}")
    if not isinstance(value, Mapping):
        raise ConfigError('%s: expected a dict, got %s %r; write it as %s'
                          % (owner, type(value).__name__, value, example))
    allowed = ('backend', 'url', 'prefix', 'interval', 'socket_timeout')
    for key in value:
        if key not in allowed:
            raise ConfigError('%s: unknown key %r; allowed keys: %s'
                              % (owner, key, ', '.join(allowed)))
    if value.get('backend') != 'redis':
        raise ConfigError("%s: backend=%r is not supported; expected 'redis'"
                          % (owner, value.get('backend')))
    for key in ('url', 'prefix'):
        item = value.get(key, 'blackgate' if key == 'prefix' else None)
        if not isinstance(item, str) or not item:
            raise ConfigError('%s: %s=%r has the wrong type; expected a non-empty string, '
                              'as in %s' % (owner, key, item, example))
    if not value['url'].startswith(_URL_SCHEMES):
        raise ConfigError('%s: url=%r is not a Redis URL; expected one starting with %s'
                          % (owner, value['url'], ', '.join(_URL_SCHEMES)))
    for key, low in (('interval', _MIN_INTERVAL), ('socket_timeout', 0.001)):
        if key in value:
            item = value[key]
            if (isinstance(item, bool) or not isinstance(item, (int, float))
                    or not math.isfinite(item) or not low <= item <= 60):
                raise ConfigError('%s: %s=%r is out of range; expected a number of seconds '
                                  'from %g to 60' % (owner, key, item, low))
    if importlib.util.find_spec('redis') is None:
        raise ConfigError("%s: the redis backend needs redis-py: pip install 'blackgate[redis]'"
                          % (owner,))
    return dict(value)


class RedisStateStore:
    """Shares breakers and rolling counts among processes through Redis."""

    def __init__(self, options: Mapping[str, Any], clock) -> None:
        import redis

        self._redis_errors = (redis.RedisError, OSError)
        #: the options it was built from (``component.set('state_store', ...)``'s value)
        self.options = dict(options)
        self.url = options['url']
        self.prefix = options.get('prefix', 'blackgate')
        self.clock = clock
        self._fixed_interval = options.get('interval')
        timeout = options.get('socket_timeout', 0.25)
        self._client = redis.Redis.from_url(self.url, socket_timeout=timeout,
                                            socket_connect_timeout=timeout)
        self._trip = self._client.register_script(_TRIP)
        self._claim = self._client.register_script(_CLAIM)
        self._settle = self._client.register_script(_SETTLE)
        #: completions not yet sent: (command_key, events, wall time); deque ops are atomic
        self.pending: 'collections.deque[Tuple[str, Tuple[Event, ...], float]]' = \
            collections.deque()
        self._outbox: 'collections.deque[Tuple[str, str]]' = collections.deque()
        self._breakers: Dict[str, Any] = {}
        self._unsent: Dict[str, Dict[int, Dict[str, int]]] = {}
        #: False while Redis does not answer: the breakers judge their local counts
        self.healthy = True
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name='blackgate-state-store',
                                        daemon=True)
        self._thread.start()

    # -- what breakers and the pipeline call -------------------------------------------

    def attach(self, breaker) -> None:
        """Share ``breaker``'s state and counts with the fleet."""
        self._breakers[breaker.command_key] = breaker
        breaker.store = self
        self._wake.set()

    def send(self, command_key: str, action: str) -> None:
        """Tell the fleet a trial's outcome (``'success'``, ``'failure'``) or a ``'reset'``.

        Sent by the store's thread, woken at once: the caller never waits on Redis.
        """
        self._outbox.append((command_key, action))
        self._wake.set()

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._stopped.is_set()

    def stop(self) -> None:
        """Send what is pending, then stop the thread."""
        self._stopped.set()
        self._wake.set()
        self._thread.join(5.0)
        self._client.close()

    # -- the thread ----------------------------------------------------------------------

    def _interval(self) -> float:
        if self._fixed_interval is not None:
            return float(self._fixed_interval)
        intervals = [breaker.settings.metrics_health_snapshot_interval
                     for breaker in list(self._breakers.values())]
        return max(_MIN_DERIVED_INTERVAL, min(intervals, default=_DEFAULT_INTERVAL))

    def _loop(self) -> None:
        while True:
            self._wake.wait(self._interval())
            self._wake.clear()
            stopping = self._stopped.is_set()
            try:
                self.sync()
            except Exception:  # never let the thread die: the breakers must go on
                log.exception('blackgate state store: sync failed; retrying')
            if stopping:
                return

    def sync(self) -> None:
        """One round trip: send counts and trial outcomes, read the fleet's view, adopt it."""
        self._drain()
        keys = list(self._breakers)
        if not keys:
            return
        # What each breaker looked like before Redis was read: a view is adopted only
        # if the breaker has not moved since (a trial started or answered meanwhile).
        versions = [self._breakers[command_key].version for command_key in keys]
        try:
            self._send_outbox()
            views = self._exchange(keys)
        except self._redis_errors as exc:
            self._lost(exc)
            return
        if not self.healthy:
            self.healthy = True
            log.warning('blackgate state store %s answers again: breakers are shared '
                        'once more', self._where())
        for command_key, version, view in zip(keys, versions, views):
            try:
                self._reconcile(command_key, version, *view)
            except self._redis_errors as exc:
                self._lost(exc)
                return

    def _drain(self) -> None:
        pending = self.pending
        while pending:
            command_key, events, wall = pending.popleft()
            breaker = self._breakers.get(command_key)
            if breaker is None:
                continue
            width = self._width(breaker)
            bucket = self._unsent.setdefault(command_key, {}).setdefault(int(wall // width), {})
            for event in events:
                bucket[event.value] = bucket.get(event.value, 0) + 1
        # While Redis is away, keep only what still fits in the window.
        now = self.clock.wall()
        for command_key, buckets in self._unsent.items():
            breaker = self._breakers[command_key]
            oldest = int(now // self._width(breaker)) - breaker.settings.metrics_rolling_buckets
            for index in [index for index in buckets if index <= oldest]:
                del buckets[index]

    def _send_outbox(self) -> None:
        while self._outbox:
            command_key, action = self._outbox[0]
            if command_key in self._breakers:
                self._settle(keys=[self._state_key(command_key)],
                             args=[action, self.clock.wall(), self._ttl(command_key)])
            self._outbox.popleft()

    def _exchange(self, keys: List[str]) -> List[Tuple[str, float, int, HealthCounts]]:
        # Round trip 1: the shared states (their generation names the count keys).
        pipe = self._client.pipeline(transaction=False)
        for command_key in keys:
            pipe.hgetall(self._state_key(command_key))
        states = pipe.execute()
        generations = [int(state.get(b'generation', 0)) for state in states]
        # Round trip 2: add our counts, read the merged window.
        now = self.clock.wall()
        windows = []
        position = 0
        for command_key, state, generation in zip(keys, states, generations):
            breaker = self._breakers[command_key]
            width = self._width(breaker)
            buckets = breaker.settings.metrics_rolling_buckets
            expire = int(math.ceil(breaker.settings.metrics_rolling_window + 2 * width)) + 1
            for index, counts in self._unsent.get(command_key, {}).items():
                name = self._count_key(command_key, generation, index)
                for event_name, count in counts.items():
                    pipe.hincrby(name, event_name, count)
                pipe.expire(name, expire)
                position += len(counts) + 1
            if state:   # keep the shared state alive while processes use it
                pipe.expire(self._state_key(command_key), self._ttl(command_key))
                position += 1
            newest = int(now // width)
            for index in range(newest - buckets + 1, newest + 1):
                pipe.hgetall(self._count_key(command_key, generation, index))
            windows.append((position, buckets))
            position += buckets
        replies = pipe.execute()
        self._unsent.clear()
        return [(state.get(b'state', b'closed').decode(), float(state.get(b'opened_at', 0.0)),
                 generation, _merge(replies[start:start + count]))
                for state, generation, (start, count) in zip(states, generations, windows)]

    def _reconcile(self, command_key: str, version: int, state: str, opened_at: float,
                   generation: int, health: HealthCounts) -> None:
        breaker = self._breakers[command_key]
        if state == 'closed':
            if breaker.is_tracking_open():
                # Closed by the fleet (a trial elsewhere, a reset, an expired key, or a
                # local trip while Redis was away): the fleet's state wins.
                breaker.adopt(BreakerState.CLOSED, None, 'closed by the fleet', version)
            elif breaker.judge(health) and self._trip_in_redis(command_key, generation):
                breaker.adopt(BreakerState.OPEN, self._local_time(None),
                              'error threshold reached across the fleet', version)
            return
        if state == 'open' or not breaker.holds_trial():
            # Open, or a trial runs in another process: short-circuit here.
            if not breaker.adopt(BreakerState.OPEN, self._local_time(opened_at),
                                 'opened by the fleet' if state == 'open'
                                 else 'trial running elsewhere in the fleet', version):
                return
        if breaker.wants_trial():
            settings = breaker.settings
            if self._claim(keys=[self._state_key(command_key)],
                           args=[self.clock.wall(), settings.circuit_breaker_sleep_window,
                                 breaker.trial_lease, self._ttl(command_key)]):
                breaker.grant_fleet_trial(breaker.trial_lease)

    def _trip_in_redis(self, command_key: str, generation: int) -> bool:
        try:
            return bool(self._trip(keys=[self._state_key(command_key)],
                                   args=[generation, self.clock.wall(),
                                         self._ttl(command_key)]))
        except self._redis_errors as exc:
            self._lost(exc)
            return False

    def _local_time(self, opened_at: Optional[float]) -> float:
        """A wall-clock moment of the fleet as a reading of this process's monotonic clock."""
        now = self.clock.monotonic()
        if opened_at is None:
            return now
        return now - max(0.0, self.clock.wall() - opened_at)

    def _lost(self, exc: BaseException) -> None:
        if not self.healthy:
            return
        self.healthy = False
        log.warning('blackgate state store %s is unreachable (%s: %s): each process '
                    'uses its local breakers until it answers again', self._where(),
                    type(exc).__name__, exc)
        for breaker in list(self._breakers.values()):
            # The local counts were kept all along: judge them now, not at the next call.
            breaker.reevaluate()

    # -- names ---------------------------------------------------------------------------

    def _where(self) -> str:
        return '%s (prefix %r)' % (self._client.connection_pool.connection_kwargs.get(
            'host', '?'), self.prefix)

    def _state_key(self, command_key: str) -> str:
        return '%s:%s:state' % (self.prefix, command_key)

    def _count_key(self, command_key: str, generation: int, index: int) -> str:
        return '%s:%s:c:%d:%d' % (self.prefix, command_key, generation, index)

    def _ttl(self, command_key: str) -> int:
        settings = self._breakers[command_key].settings
        return int(math.ceil(4 * (settings.circuit_breaker_sleep_window
                                  + settings.metrics_rolling_window))) + 60

    @staticmethod
    def _width(breaker) -> float:
        settings = breaker.settings
        return settings.metrics_rolling_window / settings.metrics_rolling_buckets


def _merge(replies: List[Dict[bytes, bytes]]) -> HealthCounts:
    errors = successes = 0
    for counts in replies:
        for raw_name, count in counts.items():
            name = raw_name.decode()
            if name == _SUCCESS_NAME:
                successes += int(count)
            elif name in _ERROR_NAMES:
                errors += int(count)
    total = errors + successes
    return HealthCounts(total, errors, 100.0 * errors / total if total else 0.0)
