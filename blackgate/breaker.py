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
re-opens it for a new sleep window.

.. warning::

   A breaker is shared by every thread and coroutine using its command key.
   Its lock guards only the state swap; listeners and logging run after the
   lock is released. Asking for ``state`` or ``is_open()`` never changes it.
"""
import logging
import threading
from typing import Any, Callable, Optional

from .config import CommandSettings
from .errors import BlackgateError
from .events import BreakerState
from .metrics import HealthCounts, RollingMetrics

__all__ = ('CircuitBreaker', 'DENY', 'ALLOW', 'TRIAL')

log = logging.getLogger('blackgate')

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN

#: What :meth:`CircuitBreaker.allow_request` answers.
DENY, ALLOW, TRIAL = 0, 1, 2

_TRANSITIONS = {  # (from, to): why
    (CLOSED, OPEN): 'error threshold reached',
    (OPEN, HALF_OPEN): 'sleep window over',
    (HALF_OPEN, CLOSED): 'trial succeeded',
    (HALF_OPEN, OPEN): 'trial failed',
}

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

    def __init__(self, settings: CommandSettings, metrics: RollingMetrics, clock,
                 notify: Optional[Callable[[str, BreakerState, BreakerState], None]] = None
                 ) -> None:
        self.command_key = settings.command_key
        self.metrics = metrics
        self.clock = clock
        self._notify = notify
        self._lock = threading.Lock()
        self._state = CLOSED
        self._opened_at = 0.0
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
        if self._state is CLOSED:
            return ALLOW
        if self._state is OPEN and self.clock.monotonic() >= self._opened_at + self._sleep_window:
            store = self.store
            if store is not None and not store.claim_trial(self.command_key,
                                                           self._sleep_window):
                return DENY   # another process of the fleet has the trial
            if self._transition(OPEN, HALF_OPEN):
                return TRIAL
        return DENY

    def evaluate(self, health: HealthCounts) -> None:
        """Judge a fresh health snapshot: while CLOSED, trip if it crosses the thresholds."""
        store = self.store
        if store is not None and store.healthy:
            return   # the fleet's merged counts are judged by the store instead
        if self.judge(health):
            self._transition(CLOSED, OPEN)

    def judge(self, health: HealthCounts) -> bool:
        """Whether ``health`` would trip this breaker now (it is CLOSED and not forced)."""
        return (self._state is CLOSED and self._mode == _NORMAL
                and health.total_requests >= self._volume
                and health.total_requests > 0
                and health.error_percentage >= self._threshold)

    def trial_finished(self, succeeded: bool) -> None:
        """The trial request answered: close on success, re-open on anything else."""
        moved = self._transition(HALF_OPEN, CLOSED if succeeded else OPEN)
        store = self.store
        if moved and store is not None:
            store.trial_finished(self.command_key, succeeded)

    # -- fleet mode ----------------------------------------------------------------------

    def is_tracking_open(self) -> bool:
        """Whether the state machine itself (forced flags aside) is OPEN or HALF_OPEN."""
        return self._state is not CLOSED

    def holds_trial(self) -> bool:
        """Whether this process is running the trial (HALF_OPEN here)."""
        return self._state is HALF_OPEN

    def adopt(self, state: BreakerState, opened_at: Optional[float], why: str) -> None:
        """Take the fleet's state (fleet mode only); like :meth:`reset`, allowed from any state.

        ``opened_at`` is the moment it opened on this process's monotonic clock.
        """
        with self._lock:
            old = self._state
            self._state = state
            if state is OPEN and opened_at is not None:
                self._opened_at = opened_at
            elif state is CLOSED and old is not CLOSED:
                self.metrics.reset()
        if old is not state:
            self._announce(old, state, why)

    def reset(self) -> None:
        """Close the breaker and forget the rolling counts, whatever the state."""
        self._transition(None, CLOSED)

    # -- the one way the state changes ----------------------------------------------

    def _transition(self, expected: Optional[BreakerState], to: BreakerState) -> bool:
        """Swap ``expected`` for ``to``; False if another caller moved first.

        ``expected=None`` is :meth:`reset`, the one move allowed from any state.
        """
        if expected is not None and (expected, to) not in _TRANSITIONS:
            raise BlackgateError('illegal circuit breaker transition %s -> %s' % (expected, to))
        with self._lock:
            old = self._state
            if expected is not None and old is not expected:
                return False
            self._state = to
            if to is OPEN:
                self._opened_at = self.clock.monotonic()
            elif to is CLOSED:
                self.metrics.reset()
        if old is not to:
            self._announce(old, to, 'reset' if expected is None else _TRANSITIONS[old, to])
        return True

    def _announce(self, old: BreakerState, new: BreakerState, why: str) -> None:
        if new is OPEN and old is HALF_OPEN:
            log.warning('circuit %s re-opened (trial failed) for %.3g s', self.command_key,
                        self._sleep_window)
        elif new is OPEN:
            health = self.metrics.health()
            log.warning('circuit %s opened (%s): %d errors in %d requests', self.command_key,
                        why, health.error_count, health.total_requests)
        else:
            log.info('circuit %s %s (%s)', self.command_key, new.value.replace('_', '-'), why)
        if self._notify is not None:
            self._notify(self.command_key, old, new)

    def __repr__(self) -> str:
        health = self.metrics.health()
        return '<CircuitBreaker %s %s %d/%d>' % (self.command_key, self.state.value,
                                                 health.error_count, health.total_requests)
