"""The circuit breaker: a small state machine over a command key's health.

::

    CLOSED --error threshold reached--> OPEN --sleep window over--> HALF_OPEN
      ^                                  ^                              |
      +-----------trial succeeded--------|------------------------------+
                                         +---------trial failed---------+

While CLOSED every request goes through and each completion may trip the
breaker, judged on the health snapshot of the rolling metrics (Hystrix 1.5:
at least ``request_volume_threshold`` requests and an error percentage at or
above ``error_threshold_percentage``). While OPEN every request is
short-circuited until the sleep window is over; then exactly one request, the
trial, is let through and the breaker is HALF_OPEN until it answers. A trial
that succeeds closes the breaker and resets the counts; any other outcome
re-opens it for a new sleep window. A trial that never answers (its IOLoop
stopped, say) is given up after its lease, the sleep window plus the command's
timeout (60 s when timeouts are off), and the next request is a new trial.

In fleet mode (``blackgate.store``) the store's thread decides CLOSED -> OPEN
on the fleet's merged counts, hands out the fleet's one trial, and makes the
breaker follow the state the fleet agreed on. Following the fleet takes moves of
its own (:data:`FLEET_MOVES`, e.g. OPEN -> CLOSED when a trial in another
process succeeded), checked and announced through the same gate as the rest.

.. warning::

   A breaker is shared by every thread and coroutine using its command key.
   Its lock guards only the state swap; listeners and logging run after the
   lock is released. Asking for ``state`` or ``is_open()`` never changes it.
   Lock order: the breaker's lock is taken before its rolling window's (a move
   to CLOSED resets the counts under it), never after; the window never calls
   the breaker (tests/test_breaker.py holds this order).
"""
import logging
import math
import threading
from typing import Any, Callable, List, NamedTuple, Optional, Tuple

from .config import CommandSettings
from .errors import BlackgateError
from .events import BreakerState
from .metrics import HealthCounts, RollingMetrics

__all__ = ('CircuitBreaker', 'DENY', 'ALLOW', 'TRIAL', 'FLEET_MOVES', 'FLEET_REASONS')

log = logging.getLogger('blackgate')

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN

#: What :meth:`CircuitBreaker.allow_request` answers.
DENY, ALLOW, TRIAL = 0, 1, 2



# How a move is announced: the log record's shape.
_PLAIN, _TRIPPED, _REOPENED = range(3)


class _Move(NamedTuple):
    """One legal move: why it happens, and how it is announced."""

    why: str
    #: _TRIPPED: with the counts that tripped it; _REOPENED: with the new sleep window
    log: int = _PLAIN


#: whose move it is: the breaker's own, or one that follows the fleet (the store names
#: which fleet reason; ``adopt(why=...)``)
_LOCAL = 'local'
_FLEET = 'fleet'

# Every legal move, and the only place moves are named: (from, to, cause) -> the move.
_MOVES = {
    (CLOSED, OPEN, _LOCAL): _Move('error threshold reached', _TRIPPED),
    (OPEN, HALF_OPEN, _LOCAL): _Move('sleep window over'),
    (HALF_OPEN, CLOSED, _LOCAL): _Move('trial succeeded'),
    (HALF_OPEN, OPEN, _LOCAL): _Move('trial failed', _REOPENED),
    (HALF_OPEN, HALF_OPEN, _LOCAL): _Move('trial lease over: a new trial'),
    # fleet mode: following the state the fleet agreed on
    (CLOSED, OPEN, _FLEET): _Move('opened by the fleet'),
    (OPEN, CLOSED, _FLEET): _Move('closed by the fleet'),
    (HALF_OPEN, CLOSED, _FLEET): _Move('closed by the fleet'),
    (HALF_OPEN, OPEN, _FLEET): _Move('opened by the fleet'),
    (CLOSED, OPEN, 'fleet tripped'): _Move('error threshold reached across the fleet'),
    (CLOSED, OPEN, 'trial elsewhere'): _Move('trial running elsewhere in the fleet'),
    (HALF_OPEN, OPEN, 'trial elsewhere'): _Move('trial running elsewhere in the fleet'),
}
_RESET = _Move('reset')   # the one move allowed from any state

#: The moves a process makes to follow its fleet's shared state (fleet mode only),
#: with the reason listeners' logs give when the store names none.
FLEET_MOVES = {(old, new): move.why for (old, new, cause), move in _MOVES.items()
               if cause == _FLEET}
#: The reasons the store may name for a fleet move (``adopt(why=...)``), besides the default.
FLEET_REASONS = frozenset(cause for (_, _, cause) in _MOVES if cause not in (_LOCAL, _FLEET))

# How the settings make the breaker behave, worked out once per settings object.
_NORMAL, _DISABLED, _FORCED_OPEN, _FORCED_CLOSED = range(4)


def _mode(settings: CommandSettings) -> int:
    if not settings.circuit_breaker_enabled:
        return _DISABLED
    if settings.circuit_breaker_force_open:
        return _FORCED_OPEN       # wins over force_closed, as in Hystrix
    if settings.circuit_breaker_force_closed:
        return _FORCED_CLOSED
    return _NORMAL


class CircuitBreaker:
    """The circuit breaker of one command key; get it with ``component.circuit_breaker(key)``."""

    __slots__ = ('command_key', 'metrics', 'clock', 'store', 'trial_lease', '_notify', '_lock',
                 '_announcements', '_announcing', '_state', '_opened_at', '_trial_started',
                 '_version', '_fleet_permit_until', '_fleet_claim', '_trial_claim', '_settings',
                 '_mode', '_volume', '_threshold', '_sleep_window')

    def __init__(self, settings: CommandSettings, metrics: RollingMetrics, clock,
                 notify: Optional[Callable[[str, BreakerState, BreakerState], None]] = None
                 ) -> None:
        self.command_key = settings.command_key
        self.metrics = metrics
        self.clock = clock
        self._notify = notify
        self._lock = threading.Lock()
        # Moves are announced (logged, told to listeners) after the lock is released, in
        # the order they happened: queued under the lock, delivered by one thread at a time.
        # (A list, not a deque: it is nearly always empty, and an empty deque costs 600 bytes.)
        self._announcements: List[Tuple[BreakerState, BreakerState, _Move]] = []
        self._announcing = threading.Lock()
        self._state = CLOSED
        self._opened_at = 0.0
        self._trial_started = 0.0
        self._version = 0                 # bumped by every change of state
        # fleet mode: the claim of the fleet's trial this process holds (its id in Redis),
        # unused until _fleet_permit_until, then carried by the running trial
        self._fleet_permit_until = -math.inf
        self._fleet_claim: Optional[str] = None
        self._trial_claim: Optional[str] = None
        #: a fleet-mode state store (``blackgate.store``) sharing this breaker, or None
        self.store: Optional[Any] = None
        self.settings = settings

    @property
    def settings(self) -> CommandSettings:
        return self._settings

    @settings.setter
    def settings(self, settings: CommandSettings) -> None:
        self._settings = settings
        self._mode = _mode(settings)
        self._volume = settings.circuit_breaker_request_volume_threshold
        self._threshold = settings.circuit_breaker_error_threshold_percentage
        self._sleep_window = settings.circuit_breaker_sleep_window
        #: how long a trial may go unanswered before another request becomes the trial
        self.trial_lease = settings.circuit_breaker_sleep_window + (
            settings.timeout if settings.timeout_enabled else 60.0)

    # -- what callers read ----------------------------------------------------------

    @property
    def state(self) -> BreakerState:
        """The state as callers see it: OPEN when forced open, CLOSED when forced closed or disabled."""
        mode = self._mode
        if mode == _NORMAL:
            return self._state
        return OPEN if mode == _FORCED_OPEN else CLOSED

    def is_open(self) -> bool:
        """True while requests are being short-circuited (OPEN, HALF_OPEN or forced open)."""
        return self.state is not CLOSED

    @property
    def force_open(self) -> bool:
        """``circuit_breaker_force_open`` is in effect: every request is short-circuited."""
        return self._mode == _FORCED_OPEN

    @property
    def force_closed(self) -> bool:
        """``circuit_breaker_force_closed`` is in effect: the breaker never trips."""
        return self._mode == _FORCED_CLOSED

    # -- what the command pipeline calls --------------------------------------------

    def allow_request(self) -> int:
        """``ALLOW``, ``TRIAL`` (this caller is the one trial) or ``DENY``."""
        mode = self._mode
        if mode != _NORMAL:
            return DENY if mode == _FORCED_OPEN else ALLOW
        state = self._state
        if state is CLOSED:
            return ALLOW
        now = self.clock.monotonic()
        if state is OPEN:
            due = now >= self._opened_at + self._sleep_window
        else:   # HALF_OPEN: a trial is out; give up on it once its lease is over
            due = now >= self._trial_started + self.trial_lease
        if due and self._transition(state, HALF_OPEN, now=now):
            return TRIAL
        return DENY

    def evaluate(self, health: HealthCounts) -> None:
        """Judge a fresh health snapshot: while CLOSED, trip if it crosses the thresholds."""
        store = self.store
        if store is not None and store.judges():
            return   # the fleet's merged counts are judged by the store instead
        if health is not self.metrics.last_snapshot:
            return   # overtaken: a newer snapshot, or the counts were reset (breaker closed)
        if self.judge(health):
            self._transition(CLOSED, OPEN)

    def reevaluate(self) -> None:
        """Judge the counts as they are now (the store calls it when Redis goes away)."""
        if self.judge(self.metrics.health()):
            self._transition(CLOSED, OPEN)

    def judge(self, health: HealthCounts) -> bool:
        """Whether ``health`` would trip this breaker now (it is CLOSED and not forced)."""
        return (self._state is CLOSED and self._mode == _NORMAL
                and health.total_requests >= self._volume
                and health.total_requests > 0
                and health.error_percentage >= self._threshold)

    def trial_finished(self, succeeded: bool) -> None:
        """The trial request answered: close on success, re-open on anything else."""
        claim = self._trial_claim
        moved = self._transition(HALF_OPEN, CLOSED if succeeded else OPEN)
        store = self.store
        if moved and claim is not None and store is not None:
            store.send(self.command_key, 'success' if succeeded else 'failure', claim)

    def reset(self) -> None:
        """Close the breaker and forget the rolling counts, whatever the state (fleet-wide in fleet mode)."""
        self._transition(None, CLOSED)
        store = self.store
        if store is not None:
            store.send(self.command_key, 'reset')

    # -- fleet mode (called by the store's thread) -------------------------------------

    @property
    def version(self) -> int:
        """A number that every change of state increases; :meth:`adopt` compares it."""
        return self._version

    @property
    def opened_at(self) -> float:
        """When it last opened (monotonic seconds): the sleep window counts from there."""
        return self._opened_at

    def is_tracking_open(self) -> bool:
        """Whether the state machine itself (forced flags aside) is OPEN or HALF_OPEN."""
        return self._state is not CLOSED

    def fleet_claim(self) -> Optional[str]:
        """The id of the fleet trial held here (an unused permit or the running trial), or None."""
        with self._lock:
            if self._state is HALF_OPEN:
                return self._trial_claim
            if self._state is OPEN and self.clock.monotonic() < self._fleet_permit_until:
                return self._fleet_claim
            return None

    def wants_trial(self) -> bool:
        """OPEN, its own sleep window over, and no fleet trial held."""
        now = self.clock.monotonic()
        return (self._state is OPEN and self._mode == _NORMAL
                and now >= self._opened_at + self._sleep_window
                and now >= self._fleet_permit_until)

    def grant_fleet_trial(self, permit: float, claim: str) -> None:
        """The fleet gave this process trial ``claim``: a request within ``permit`` s takes it."""
        with self._lock:
            if self._state is OPEN:
                self._fleet_permit_until = self.clock.monotonic() + permit
                self._fleet_claim = claim

    def revoke_fleet_trial(self) -> None:
        """The fleet no longer knows this process's claim: the permit is void."""
        with self._lock:
            self._fleet_permit_until = -math.inf
            self._fleet_claim = None

    def adopt(self, state: BreakerState, version: int, opened_at: Optional[float] = None,
              why: Optional[str] = None) -> bool:
        """Follow the fleet to ``state``, unless the breaker moved since ``version`` was read.

        ``opened_at`` is when the fleet opened it, on this process's monotonic clock: the
        local sleep window never starts earlier than it did, so a process that loses Redis
        keeps one trial per sleep window. Adopting the state it is in changes nothing else.
        ``why`` names the fleet's reason, one of :data:`FLEET_REASONS` (None: the move's
        own, as :data:`FLEET_MOVES` gives it).
        """
        if why is not None and why not in FLEET_REASONS:
            raise BlackgateError('adopt(why=%r): not a fleet reason; expected one of %s'
                                 % (why, ', '.join(sorted(map(repr, FLEET_REASONS)))))
        return self._transition(None, state, version=version, opened_at=opened_at,
                                cause=why or _FLEET)

    # -- the one way the state changes ----------------------------------------------

    def _transition(self, expected: Optional[BreakerState], to: BreakerState,
                    now: Optional[float] = None, version: Optional[int] = None,
                    opened_at: Optional[float] = None, cause: str = _LOCAL) -> bool:
        """Swap ``expected`` for ``to``, as the table allows; False if another caller moved first.

        ``expected=None`` is :meth:`reset`, the one move allowed from any state, or with
        ``version`` given, a fleet move (``cause`` the fleet's reason) made only if the
        breaker has not moved since ``version`` was read.
        A move to HALF_OPEN (``now`` given) is a trial: with a healthy fleet store it
        needs the fleet's permit, and from HALF_OPEN it needs the old trial's lease over.
        """
        if expected is not None and (expected, to, cause) not in _MOVES:
            raise BlackgateError('illegal circuit breaker transition %s -> %s' % (expected, to))
        with self._lock:
            old = self._state
            if version is not None:
                if self._version != version:
                    return False
                if old is to:   # already there: only the sleep window may start later
                    if to is OPEN and opened_at is not None and opened_at > self._opened_at:
                        self._opened_at = opened_at
                    return True
                move = _MOVES.get((old, to, cause))
                if move is None:
                    raise BlackgateError('illegal fleet transition %s -> %s (%s)'
                                         % (old, to, cause))
            elif expected is None:
                move = _RESET
            else:
                if old is not expected:
                    return False
                move = _MOVES[old, to, cause]
            if to is HALF_OPEN:
                if now is None:
                    now = self.clock.monotonic()
                if old is HALF_OPEN and now < self._trial_started + self.trial_lease:
                    return False
                store = self.store
                fleet = store is not None and store.healthy
                if fleet and now >= self._fleet_permit_until:
                    return False   # the store's thread hands out the fleet's one trial
                self._trial_claim = self._fleet_claim if fleet else None
                self._trial_started = now
            self._fleet_permit_until = -math.inf
            self._fleet_claim = None
            self._state = to
            self._version += 1
            if to is OPEN:
                if opened_at is None:
                    self._opened_at = self.clock.monotonic()
                elif old is HALF_OPEN:   # a trial ran here: its window counts from it
                    self._opened_at = max(opened_at, self._trial_started)
                else:
                    self._opened_at = opened_at
            elif to is CLOSED:
                self.metrics.reset()
            if old is not to or to is HALF_OPEN:
                self._announcements.append((old, to, move))
        self._deliver()
        return True

    def _deliver(self) -> None:
        # Whoever holds _announcing delivers every queued move, in order; a thread that
        # finds it taken leaves its moves to that thread instead of waiting.
        while self._announcements:
            if not self._announcing.acquire(blocking=False):
                return
            try:
                while self._announcements:
                    self._announce(*self._announcements.pop(0))
            finally:
                self._announcing.release()

    def _announce(self, old: BreakerState, new: BreakerState, move: _Move) -> None:
        if move.log == _TRIPPED:
            health = self.metrics.health()
            log.warning('circuit %s opened (%s): %d errors in %d requests', self.command_key,
                        move.why, health.error_count, health.total_requests)
        elif move.log == _REOPENED:
            log.warning('circuit %s re-opened (%s) for %.3g s', self.command_key, move.why,
                        self._sleep_window)
        elif new is OPEN:
            log.warning('circuit %s opened (%s)', self.command_key, move.why)
        else:
            log.info('circuit %s %s (%s)', self.command_key, new.value.replace('_', '-'),
                     move.why)
        if self._notify is not None and old is not new:
            self._notify(self.command_key, old, new)

    def __repr__(self) -> str:
        health = self.metrics.health()
        return '<CircuitBreaker %s %s %d/%d>' % (self.command_key, self.state.value,
                                                 health.error_count, health.total_requests)
