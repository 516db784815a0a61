"""Fleet mode: one circuit breaker per command key, shared through Redis.

With ``component.set('state_store', {'backend': 'redis', 'url': ...})`` every
process using the same Redis and prefix shares, per command key, the
breaker's state and the rolling counts it judges:

- each completion is appended to an in-process queue: commands never talk to
  Redis. A background thread drains the queue every ``interval`` seconds and,
  for the keys in use, reads the shared states, adds the counts (a batch
  applied once, by a Lua script, however often it is sent) and reads the
  merged window back, in two pipelined round trips;
- the thread judges the merged counts: when they cross a key's thresholds it
  opens the breaker in Redis, atomically (a Lua script), and every process
  follows the shared state at its next sync, so within one interval. A state
  Redis does not have is unknown, never "closed": an open breaker stays open
  and is written back;
- after the sleep window the thread claims the trial in Redis under an id
  (another Lua script); the one process that wins lets its next request
  through as the trial, and every other process stays short-circuited. The
  trial's outcome, fenced by that id (or a ``reset()``), is sent by the
  thread and closes (a new count generation starts) or re-opens the breaker
  for everyone. A claim nobody answers is given up after ``trial_lease``;
- every key expires on its own; idle keys cost no Redis call.

When Redis is unreachable or slow, each process carries on with its local
breaker (which keeps counting locally all along), logs it once, and rejoins
when Redis answers again. No command fails because Redis did.

Keys (``P`` is the prefix, ``K`` the command key, each with ``%`` and ``:``
escaped so that no prefix and key run into another pair)::

    P:K:state            hash: state, opened_at (epoch seconds), generation,
                         and for a claimed trial: trial (its id), trial_at, lease
    P:K:c:G:B            hash: event name -> count, for count generation G and
                         bucket B = floor(wall time / bucket width); with a quorum
                         also ~<process id> -> that process's errors
    P::batch:<id>:<n>    marks batch n of process <id> as applied

.. warning::

   The store's thread talks to Redis; command threads and the IOLoop only
   append to a deque. Listeners and log handlers run on the store's thread when
   it moves a breaker: whatever they raise is logged and contained, and a thread
   that dies anyway is started again by the next completion. Bucket indexes use
   wall-clock time, so the hosts' clocks should agree to well within a bucket
   (NTP does that).
"""
import collections
import importlib.util
import itertools
import logging
import math
import threading
import uuid
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Tuple

from .errors import ConfigError
from .events import ERROR_EVENTS, BreakerState, Event
from .metrics import HealthCounts

__all__ = ('RedisStateStore', 'check_store_mapping', 'DEFAULT_TRIAL_LEASE')

log = logging.getLogger('blackgate')

_ERROR_NAMES = frozenset(event.value for event in ERROR_EVENTS)
#: the errors without the two rejections (``circuit_breaker_count_rejections = False``)
_FAILURE_NAMES = _ERROR_NAMES - {'THREAD_POOL_REJECTED', 'SEMAPHORE_REJECTED'}
_SUCCESS_NAME = Event.SUCCESS.value
_REPORTER = '~'               # count field '~<process>': that process's errors (quorum)
_DEFAULT_INTERVAL = 0.5
_MIN_INTERVAL = 0.01          # for an explicit 'interval'
_MIN_DERIVED_INTERVAL = 0.1   # when derived from the commands' snapshot intervals (0 allowed)
_URL_SCHEMES = ('redis://', 'rediss://', 'unix://')
#: seconds a claimed fleet trial may go unanswered before another process may claim one
DEFAULT_TRIAL_LEASE = 5.0
#: command keys read and written per sync at most; more are taken in turns
MAX_KEYS_PER_SYNC = 500

# Open the breaker if it is still closed in the generation that was judged.
_TRIP = """
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
local generation = tonumber(redis.call('HGET', KEYS[1], 'generation') or '0')
if state ~= 'closed' or generation ~= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', ARGV[2], 'generation', generation)
redis.call('HDEL', KEYS[1], 'trial')
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""

# Claim the one trial, under the id ARGV[5]: the sleep window is over (or the claimed
# trial's lease ran out). A key Redis does not have is never claimed.
_CLAIM = """
local state = redis.call('HGET', KEYS[1], 'state')
local now = tonumber(ARGV[1])
if state == 'open' and now >= tonumber(redis.call('HGET', KEYS[1], 'opened_at')) + tonumber(ARGV[2])
   or state == 'half_open' and now >= tonumber(redis.call('HGET', KEYS[1], 'trial_at'))
                                       + tonumber(redis.call('HGET', KEYS[1], 'lease') or ARGV[3]) then
  redis.call('HSET', KEYS[1], 'state', 'half_open', 'trial_at', ARGV[1], 'lease', ARGV[3],
             'trial', ARGV[5])
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  return 1
end
return 0
"""

# The trial with id ARGV[4] answered ('success' closes, with a new count generation;
# 'failure' re-opens for a new sleep window): only if it is still the claimed trial, so a
# late answer never settles a newer trial. Or someone called reset(): closes from any state.
_SETTLE = """
local state = redis.call('HGET', KEYS[1], 'state')
if ARGV[1] ~= 'reset' and (state ~= 'half_open' or redis.call('HGET', KEYS[1], 'trial') ~= ARGV[4]) then
  return 0
end
if ARGV[1] == 'failure' then
  redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', ARGV[2])
else
  redis.call('HSET', KEYS[1], 'state', 'closed')
  redis.call('HINCRBY', KEYS[1], 'generation', 1)
end
redis.call('HDEL', KEYS[1], 'trial')
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""

# Redis lost the state (a restart, an eviction) while this process's breaker is open:
# put it back as open, since it was; never read a missing state as closed.
_PUBLISH = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', ARGV[1], 'generation', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""

# Add one batch of counts exactly once: KEYS[1] marks the batch (process id, sequence) as
# applied; a batch sent again (its reply was late, so it was retried) changes nothing.
# ARGV: marker ttl, then per count key: its ttl, n, then n (field, count) pairs.
_ADD = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return 0 end
local a = 2
for i = 2, #KEYS do
  local ttl, n = ARGV[a], tonumber(ARGV[a + 1])
  a = a + 2
  for _ = 1, n do
    redis.call('HINCRBY', KEYS[i], ARGV[a], ARGV[a + 1])
    a = a + 2
  end
  redis.call('EXPIRE', KEYS[i], ttl)
end
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
    allowed = ('backend', 'url', 'prefix', 'interval', 'socket_timeout', 'trial_lease',
               'min_reporting_processes')
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
    for key, low, high in (('interval', _MIN_INTERVAL, 60), ('socket_timeout', 0.001, 60),
                           ('trial_lease', 0.01, 3600)):
        if key in value:
            item = value[key]
            if (isinstance(item, bool) or not isinstance(item, (int, float))
                    or not math.isfinite(item) or not low <= item <= high):
                raise ConfigError('%s: %s=%r is out of range; expected a number of seconds '
                                  'from %g to %g' % (owner, key, item, low, high))
    if 'min_reporting_processes' in value:
        item = value['min_reporting_processes']
        if isinstance(item, bool) or not isinstance(item, int) or not 1 <= item <= 10000:
            raise ConfigError('%s: min_reporting_processes=%r is out of range; expected a '
                              'whole number of processes from 1 to 10000' % (owner, item))
    if importlib.util.find_spec('redis') is None:
        raise ConfigError("%s: the redis backend needs redis-py: pip install redis (in a "
                          "checkout: pip install -e '.[redis]')" % (owner,))
    return dict(value)


class _View(NamedTuple):
    """What Redis holds for one command key."""

    state: Optional[str]      # None: Redis has no state for it (never written, or lost)
    opened_at: float          # wall seconds
    generation: int
    claim: Optional[str]      # the id of the claimed trial
    claim_ends: float         # wall seconds: when its lease is over
    health: HealthCounts      # the fleet's merged window
    reporters: int            # processes with errors in that window (when counted)


class _Entry(NamedTuple):
    name: str                 # the count key
    ttl: int
    until: float              # wall time after which the bucket is out of every window
    counts: Dict[str, int]


class RedisStateStore:
    """Shares breakers and rolling counts among processes through Redis."""

    def __init__(self, options: Mapping[str, Any], clock) -> None:
        import redis

        self._redis_errors = (redis.RedisError, OSError)
        self._no_script = redis.exceptions.NoScriptError
        #: the options it was built from (``component.set('state_store', ...)``'s value)
        self.options = dict(options)
        self.url = options['url']
        self.prefix = options.get('prefix', 'blackgate')
        self.clock = clock
        self._fixed_interval = options.get('interval')
        self._trial_lease = float(options.get('trial_lease', DEFAULT_TRIAL_LEASE))
        self._quorum = int(options.get('min_reporting_processes', 1))
        timeout = options.get('socket_timeout', 0.25)
        self._client = redis.Redis.from_url(self.url, socket_timeout=timeout,
                                            socket_connect_timeout=timeout)
        self._trip = self._client.register_script(_TRIP)
        self._claim = self._client.register_script(_CLAIM)
        self._settle = self._client.register_script(_SETTLE)
        self._publish = self._client.register_script(_PUBLISH)
        self._add = self._client.register_script(_ADD)
        #: this process's name in Redis: batch markers, trial claims, quorum reporters
        self.process_id = uuid.uuid4().hex[:16]
        self._batch_numbers = itertools.count(1)
        self._claim_numbers = itertools.count(1)
        #: completions not yet sent: (command_key, events, wall time); deque ops are atomic
        self.pending: 'collections.deque[Tuple[str, Tuple[Event, ...], float]]' = \
            collections.deque()
        self._outbox: 'collections.deque[Tuple[str, str, Optional[str]]]' = collections.deque()
        self._breakers: Dict[str, Any] = {}
        self._attached_interval = math.inf
        # command key -> bucket -> event name -> count: drained, not yet in a batch
        self._fresh: Dict[str, Dict[int, Dict[str, int]]] = {}
        # batches built but not known to be applied: (marker key, entries), oldest first
        self._batches: List[Tuple[str, List[_Entry]]] = []
        # command key -> wall time until which it is synced (its last use + one window)
        self._active: Dict[str, float] = {}
        self._turn = 0
        self._healthy = True
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._revive_lock = threading.Lock()
        #: how many times a dead store thread was found and started again
        self.restarts = 0
        self._thread = self._start_thread()

    def _start_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self._loop, name='blackgate-state-store', daemon=True)
        thread.start()
        return thread

    # -- what breakers and the pipeline call -------------------------------------------

    def attach(self, breaker) -> None:
        """Share ``breaker``'s state and counts with the fleet."""
        self._breakers[breaker.command_key] = breaker
        self._attached_interval = min(self._attached_interval,
                                      breaker.settings.metrics_health_snapshot_interval)
        breaker.store = self
        self._wake.set()

    def send(self, command_key: str, action: str, claim: Optional[str] = None) -> None:
        """Tell the fleet trial ``claim``'s outcome (``'success'``, ``'failure'``) or a ``'reset'``.

        Sent by the store's thread, woken at once: the caller never waits on Redis.
        """
        self._outbox.append((command_key, action, claim))
        self._wake.set()

    @property
    def healthy(self) -> bool:
        """True while Redis answers and the store's thread runs: the fleet decides."""
        return self._healthy and self._thread.is_alive()

    def judges(self) -> bool:
        """Whether the store judges the counts (it is :attr:`healthy`); restarts a dead thread."""
        if self._thread.is_alive():
            return self._healthy
        self._revive()
        return False

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

    def _revive(self) -> None:
        with self._revive_lock:
            if self._thread.is_alive() or self._stopped.is_set():
                return
            self.restarts += 1
            if self.restarts == 1:   # logged once: a thread that keeps dying must not flood
                log.error('blackgate state store %s: its thread died; started it again '
                          '(local breakers judged meanwhile)', self._where())
            self._thread = self._start_thread()

    def _interval(self) -> float:
        if self._fixed_interval is not None:
            return float(self._fixed_interval)
        breakers = self._breakers
        intervals = [breakers[command_key].settings.metrics_health_snapshot_interval
                     for command_key in list(self._active) if command_key in breakers]
        smallest = min(intervals, default=self._attached_interval)
        if not math.isfinite(smallest):
            smallest = _DEFAULT_INTERVAL
        return max(_MIN_DERIVED_INTERVAL, smallest)

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
        keys = self._keys_to_sync()
        if not keys and not self._outbox and not self._batches:
            return
        # What each breaker looked like before Redis was read: a view is adopted only
        # if the breaker has not moved since (a trial started or answered meanwhile).
        versions = [self._breakers[command_key].version for command_key in keys]
        try:
            self._send_outbox()
            try:
                views = self._exchange(keys)
            except self._no_script:   # a new or restarted Redis: load it, send again
                self._client.script_load(_ADD)
                views = self._exchange(keys)
        except self._redis_errors as exc:
            self._lost(exc)
            return
        if not self._healthy:
            self._healthy = True
            log.warning('blackgate state store %s answers again: breakers are shared '
                        'once more', self._where())
        for command_key, version, view in zip(keys, versions, views):
            try:
                self._reconcile(command_key, version, view)
            except self._redis_errors as exc:
                self._lost(exc)
                return

    def _drain(self) -> None:
        pending, breakers, fresh, active = self.pending, self._breakers, self._fresh, self._active
        while pending:
            command_key, events, wall = pending.popleft()
            breaker = breakers.get(command_key)
            if breaker is None:
                continue
            settings = breaker.settings
            width = self._width(breaker)
            bucket = fresh.setdefault(command_key, {}).setdefault(int(wall // width), {})
            for event in events:
                bucket[event.value] = bucket.get(event.value, 0) + 1
            until = wall + settings.metrics_rolling_window + width
            if active.get(command_key, 0.0) < until:
                active[command_key] = until
        # While Redis is away, keep only what still fits in the window.
        now = self.clock.wall()
        for command_key, buckets in list(fresh.items()):
            breaker = breakers[command_key]
            oldest = int(now // self._width(breaker)) - breaker.settings.metrics_rolling_buckets
            for index in [index for index in buckets if index <= oldest]:
                del buckets[index]
            if not buckets:
                del fresh[command_key]
        for _marker, entries in self._batches:
            entries[:] = [entry for entry in entries if entry.until > now]
        self._batches = [batch for batch in self._batches if batch[1]]

    def _keys_to_sync(self) -> List[str]:
        """The keys in use (used within a window, open, or with counts to send), in turns."""
        now = self.clock.wall()
        active = self._active
        for command_key in [key for key, until in active.items() if until <= now]:
            breaker = self._breakers.get(command_key)
            if (breaker is None or not breaker.is_tracking_open()) \
                    and command_key not in self._fresh:
                del active[command_key]   # idle: no reads, no writes, its keys expire
        keys = list(active)
        if len(keys) > MAX_KEYS_PER_SYNC:
            start = self._turn % len(keys)
            keys = (keys[start:] + keys[:start])[:MAX_KEYS_PER_SYNC]
            self._turn = start + MAX_KEYS_PER_SYNC
        return keys

    def _send_outbox(self) -> None:
        while self._outbox:
            command_key, action, claim = self._outbox[0]
            if command_key in self._breakers:
                self._settle(keys=[self._state_key(command_key)],
                             args=[action, self.clock.wall(), self._ttl(command_key),
                                   claim or ''])
            self._outbox.popleft()

    def _exchange(self, keys: List[str]) -> List[_View]:
        # Round trip 1: the shared states (their generation names the count keys).
        pipe = self._client.pipeline(transaction=False)
        for command_key in keys:
            pipe.hgetall(self._state_key(command_key))
        states = pipe.execute() if keys else []
        generations = [int(state.get(b'generation', 0)) for state in states]
        # This sync's counts become a batch with fixed names, sent until applied once.
        now = self.clock.wall()
        self._batch(keys, generations, now)
        # Round trip 2: add the batches, read the merged windows.
        position = 0
        for marker, entries in self._batches:
            # EVALSHA, not the Script helper: a pipeline's Script asks SCRIPT EXISTS first,
            # a third round trip every sync (sync() loads it when Redis lost it).
            pipe.evalsha(self._add.sha, 1 + len(entries), marker,
                         *[entry.name for entry in entries], *self._batch_args(entries))
            position += 1
        windows = []
        for command_key, state, generation in zip(keys, states, generations):
            breaker = self._breakers[command_key]
            width = self._width(breaker)
            buckets = breaker.settings.metrics_rolling_buckets
            if state:   # keep the shared state alive while processes use it
                pipe.expire(self._state_key(command_key), self._ttl(command_key))
                position += 1
            newest = int(now // width)
            for index in range(newest - buckets + 1, newest + 1):
                pipe.hgetall(self._count_key(command_key, generation, index))
            windows.append((position, buckets))
            position += buckets
        replies = pipe.execute()
        self._batches.clear()
        views = []
        for command_key, state, generation, (start, count) in zip(keys, states, generations,
                                                                   windows):
            errors = (_ERROR_NAMES if self._breakers[command_key].settings
                      .circuit_breaker_count_rejections else _FAILURE_NAMES)
            health, reporters = _merge(replies[start:start + count], errors)
            claim = state.get(b'trial')
            claim_ends = float(state.get(b'trial_at', 0.0)) + float(state.get(b'lease', 0.0))
            views.append(_View(state[b'state'].decode() if b'state' in state else None,
                               float(state.get(b'opened_at', 0.0)), generation,
                               claim.decode() if claim is not None else None, claim_ends,
                               health, reporters))
        return views

    def _batch(self, keys: List[str], generations: List[int], now: float) -> None:
        entries = []
        for command_key, generation in zip(keys, generations):
            buckets = self._fresh.pop(command_key, None)
            if not buckets:
                continue
            breaker = self._breakers[command_key]
            settings = breaker.settings
            width = self._width(breaker)
            ttl = int(math.ceil(settings.metrics_rolling_window + 2 * width)) + 1
            for index, counts in buckets.items():
                if self._quorum > 1:
                    names = (_ERROR_NAMES if settings.circuit_breaker_count_rejections
                             else _FAILURE_NAMES)
                    errors = sum(count for name, count in counts.items() if name in names)
                    if errors:
                        counts[_REPORTER + self.process_id] = errors
                entries.append(_Entry(self._count_key(command_key, generation, index), ttl,
                                      (index + 1) * width + settings.metrics_rolling_window,
                                      counts))
        if entries:
            marker = '%s::batch:%s:%d' % (_encode(self.prefix), self.process_id,
                                          next(self._batch_numbers))
            self._batches.append((marker, entries))

    @staticmethod
    def _batch_args(entries: List[_Entry]) -> List[Any]:
        args: List[Any] = [max(entry.ttl for entry in entries) + 60]
        for entry in entries:
            args += [entry.ttl, len(entry.counts)]
            for name, count in entry.counts.items():
                args += [name, count]
        return args

    def _reconcile(self, command_key: str, version: int, view: _View) -> None:
        breaker = self._breakers[command_key]
        state = view.state
        if state is None:
            if breaker.is_tracking_open():
                # Redis forgot this breaker (a restart, a lost key): that is not "closed".
                # Keep the local state and put it back for the fleet.
                wall = self.clock.wall() - max(0.0, self.clock.monotonic() - breaker.opened_at)
                self._publish(keys=[self._state_key(command_key)],
                              args=[wall, view.generation, self._ttl(command_key)])
                return
            state = 'closed'
        if state == 'closed':
            if breaker.is_tracking_open():
                # Closed by the fleet (a trial elsewhere succeeded, a reset, or the fleet
                # did not agree with a local trip made while Redis was away).
                _contained(breaker.adopt, BreakerState.CLOSED, version)
            elif (breaker.judge(view.health)
                    and (self._quorum == 1 or view.reporters >= self._quorum)
                    and self._trip_in_redis(command_key, view.generation)):
                _contained(breaker.adopt, BreakerState.OPEN, version, None, 'fleet tripped')
            return
        claim = breaker.fleet_claim()
        if claim is not None:
            if state == 'half_open' and claim == view.claim:
                return   # this process holds the fleet's trial: keep it
            breaker.revoke_fleet_trial()   # the fleet moved on (its lease ran out)
        opened_at = self._local_time(view.opened_at)
        why = None if state == 'open' else 'trial elsewhere'   # breaker.FLEET_REASONS
        if not _contained(breaker.adopt, BreakerState.OPEN, version, opened_at, why):
            return
        settings = breaker.settings
        wall = self.clock.wall()
        due = (wall >= view.opened_at + settings.circuit_breaker_sleep_window if state == 'open'
               else wall >= view.claim_ends)   # a claimed trial whose lease is over
        if due and breaker.wants_trial():
            lease, permit = self._lease(breaker)
            claim = '%s:%d' % (self.process_id, next(self._claim_numbers))
            if self._claim(keys=[self._state_key(command_key)],
                           args=[wall, settings.circuit_breaker_sleep_window, lease,
                                 self._ttl(command_key), claim]):
                breaker.grant_fleet_trial(permit, claim)

    def _lease(self, breaker) -> Tuple[float, float]:
        """The fleet trial's lease, and how long the permit waits for a request within it.

        The lease covers the permit and the trial's own run (its timeout), so a trial that
        may still answer is never doubled; at least one interval is left for the permit.
        """
        settings = breaker.settings
        run = settings.timeout if settings.timeout_enabled else 0.0
        lease = max(self._trial_lease, run + self._interval())
        return lease, lease - run

    def _trip_in_redis(self, command_key: str, generation: int) -> bool:
        try:
            return bool(self._trip(keys=[self._state_key(command_key)],
                                   args=[generation, self.clock.wall(),
                                         self._ttl(command_key)]))
        except self._redis_errors as exc:
            self._lost(exc)
            return False

    def _local_time(self, opened_at: float) -> float:
        """A wall-clock moment of the fleet as a reading of this process's monotonic clock."""
        return self.clock.monotonic() - max(0.0, self.clock.wall() - opened_at)

    def _lost(self, exc: BaseException) -> None:
        if not self._healthy:
            return
        self._healthy = False
        log.warning('blackgate state store %s is unreachable (%s: %s): each process '
                    'uses its local breakers until it answers again', self._where(),
                    type(exc).__name__, exc)
        for command_key in list(self._active):
            breaker = self._breakers.get(command_key)
            if breaker is not None:
                # The local counts were kept all along: judge them now, not at the next call.
                _contained(breaker.reevaluate)

    # -- names ---------------------------------------------------------------------------

    def _where(self) -> str:
        return '%s (prefix %r)' % (self._client.connection_pool.connection_kwargs.get(
            'host', '?'), self.prefix)

    def _state_key(self, command_key: str) -> str:
        return '%s:%s:state' % (_encode(self.prefix), _encode(command_key))

    def _count_key(self, command_key: str, generation: int, index: int) -> str:
        return '%s:%s:c:%d:%d' % (_encode(self.prefix), _encode(command_key), generation, index)

    def _ttl(self, command_key: str) -> int:
        settings = self._breakers[command_key].settings
        return int(math.ceil(4 * (settings.circuit_breaker_sleep_window
                                  + settings.metrics_rolling_window))) + 60

    @staticmethod
    def _width(breaker) -> float:
        settings = breaker.settings
        return settings.metrics_rolling_window / settings.metrics_rolling_buckets


def _encode(name: str) -> str:
    """A prefix or command key as one segment of a Redis key: ``%`` and ``:`` escaped."""
    return name.replace('%', '%25').replace(':', '%3A')


def _contained(method, *args: Any) -> Any:
    """Call a breaker move from the store's thread: listeners and log handlers run in it,
    and whatever they raise (even a BaseException) must not end the thread."""
    try:
        return method(*args)
    except BaseException:
        log.exception('blackgate state store: a listener or log handler raised on the '
                      "store's thread; ignored")
        return False


def _merge(replies: List[Dict[bytes, bytes]], error_names: frozenset = _ERROR_NAMES
           ) -> Tuple[HealthCounts, int]:
    errors = successes = 0
    reporters = set()
    for counts in replies:
        for raw_name, count in counts.items():
            name = raw_name.decode()
            if name == _SUCCESS_NAME:
                successes += int(count)
            elif name in error_names:
                errors += int(count)
            elif name.startswith(_REPORTER) and int(count) > 0:
                reporters.add(name)
    total = errors + successes
    return HealthCounts(total, errors, 100.0 * errors / total if total else 0.0), len(reporters)
