"""Retries: when to try again, how long to wait, and the budget that bounds them.

Three small pieces, none with a thread or a loop of its own, so that the
command pipeline (its ``execute()`` and ``queue()`` drivers) carries them out
and tests drive them on a :class:`~blackgate.testing.FakeClock`:

- :class:`RetryPolicy` decides, after a failed attempt, whether another one
  goes, and after how long (:meth:`RetryPolicy.decide`, a pure function of the
  attempt, what it raised and the time left);
- :func:`full_jitter` is the backoff: exponential, with full jitter (a delay
  drawn uniformly from 0 to ``base * 2 ** attempt``), so that clients that
  failed together do not retry together;
- :class:`RetryBudget` is the token bucket per command key that Finagle's
  ``RetryBudget`` and Envoy's ``retry_budget`` describe: every call deposits
  ``percent`` / 100 of a token, every retry withdraws one, and a floor of
  ``min_per_second`` retries is always allowed, so that retries add at most
  that share of the traffic and cannot multiply an outage.

.. warning::

   A budget is shared by every thread and coroutine of its command key; its
   lock guards a few additions, never user code. A policy is immutable and a
   decision's state (the attempt number) lives with the call, never in the
   policy (tenacity #93: retry state shared between concurrent calls).
"""
import collections
import math
import random
import threading
from typing import Any, Callable, Deque, List, NamedTuple, Optional, Tuple, Type

from .errors import BadRequest

__all__ = ('RetryPolicy', 'RetryBudget', 'Decision', 'full_jitter', 'retry_after_of',
           'RETRY', 'GIVE_UP', 'BUDGET_EXHAUSTED', 'NEVER_RETRIED')

#: What :meth:`RetryPolicy.decide` answers.
RETRY, GIVE_UP, BUDGET_EXHAUSTED = 'retry', 'give up', 'budget exhausted'

#: Raised by run(), never retried: a caller's mistake, or the program being stopped
#: (tenacity #186, #529: cancellation and Ctrl-C must end the call at once).
NEVER_RETRIED: Tuple[Type[BaseException], ...] = (BadRequest,)


class Decision(NamedTuple):
    """What to do after a failed attempt: ``action`` and, for RETRY, the ``delay`` in seconds."""

    action: str
    delay: float = 0.0


def full_jitter(base: float, attempt: int, random: Callable[[], float] = random.random,
                cap: float = math.inf) -> float:
    """The wait before retry number ``attempt`` (0 for the first): uniform in [0, base * 2**attempt].

    "Full jitter" (AWS Architecture Blog, *Exponential Backoff And Jitter*), capped by ``cap``.
    """
    return random() * min(cap, base * 2.0 ** min(attempt, 62))


def retry_after_of(error: BaseException) -> Optional[float]:
    """The seconds an upstream asked to wait (its ``Retry-After``), if ``error`` carries one.

    Any exception with a numeric ``retry_after`` attribute (seconds) counts; the
    proxy's upstream errors set it from the response header.
    """
    value = getattr(error, 'retry_after', None)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)
    return None


class RetryPolicy:
    """A command's retry settings, and the decision after each failed attempt."""

    __slots__ = ('attempts', 'backoff', 'retry_on', 'retry_on_timeout', '_random')

    def __init__(self, attempts: int, backoff: float,
                 retry_on: Tuple[Type[BaseException], ...] = (Exception,),
                 retry_on_timeout: bool = False,
                 random: Callable[[], float] = random.random) -> None:
        #: extra attempts after the first
        self.attempts = attempts
        #: the backoff's base, seconds
        self.backoff = backoff
        self.retry_on = retry_on
        self.retry_on_timeout = retry_on_timeout
        self._random = random

    def retries(self, error: Optional[BaseException], timed_out: bool) -> bool:
        """Whether this outcome of an attempt is one to retry at all (budget and time aside)."""
        if timed_out:
            return self.retry_on_timeout
        if error is None or isinstance(error, NEVER_RETRIED):
            return False
        if not isinstance(error, Exception):   # CancelledError, KeyboardInterrupt, SystemExit
            return False
        return isinstance(error, self.retry_on)

    def decide(self, retries_done: int, error: Optional[BaseException], timed_out: bool,
               remaining: Optional[float], budget: Optional['RetryBudget'] = None) -> Decision:
        """After a failed attempt: RETRY (after ``delay`` s), GIVE_UP or BUDGET_EXHAUSTED.

        ``retries_done`` is how many retries this call made already; ``remaining``
        the seconds left of its timeout (None: no timeout). The budget is asked
        last, so that a retry that would not go anyway costs no token.
        """
        if retries_done >= self.attempts or not self.retries(error, timed_out):
            return Decision(GIVE_UP)
        if remaining is not None and remaining <= 0:
            return Decision(GIVE_UP)
        delay = full_jitter(self.backoff, retries_done, self._random)
        asked = retry_after_of(error) if error is not None else None
        if asked is not None:
            delay = max(delay, asked)   # Polly #414: the upstream knows when it can take more
        if remaining is not None:
            if asked is not None and asked >= remaining:
                return Decision(GIVE_UP)   # it asked for longer than the call has left
            # The whole call lives within one timeout: the wait leaves room for the attempt.
            delay = min(delay, remaining / 2)
        if budget is not None and not budget.try_withdraw():
            return Decision(BUDGET_EXHAUSTED)
        return Decision(RETRY, delay)

    def __repr__(self) -> str:
        return '<RetryPolicy %d attempts, backoff %gs%s>' % (
            self.attempts, self.backoff, ', timeouts too' if self.retry_on_timeout else '')


class RetryBudget:
    """Retries may add ``percent`` % of the calls, plus ``min_per_second`` a second.

    :meth:`deposit` once per call, :meth:`try_withdraw` before each retry.
    Deposits expire after ``ttl`` seconds (Finagle's 10), so that a quiet hour
    does not store up a storm; the floor is a bucket refilled at
    ``min_per_second`` and holding at most one second of it, so that a command
    with little traffic can still retry. Over any run of ``T`` seconds with
    ``N`` calls, retries are at most ``percent / 100 * N + min_per_second * (T + 1)``.
    """

    __slots__ = ('percent', 'min_per_second', 'ttl', 'clock', '_lock', '_deposits', '_total',
                 '_floor', '_floor_at', 'withdrawn', 'refused')

    def __init__(self, percent: float, min_per_second: float, clock: Any,
                 ttl: float = 10.0) -> None:
        self.percent = float(percent)
        self.min_per_second = float(min_per_second)
        self.ttl = ttl
        self.clock = clock
        self._lock = threading.Lock()
        # [second, hundredths of a token left] for each second with deposits, oldest first:
        # a whole percent deposits a whole number of hundredths, so no rounding creeps in.
        self._deposits: Deque[List[float]] = collections.deque()
        self._total = 0.0
        self._floor = self.min_per_second
        self._floor_at: Optional[float] = None
        #: retries allowed and refused since the budget was made
        self.withdrawn = 0
        self.refused = 0

    def deposit(self) -> None:
        """A call was made: it earns ``percent`` / 100 of a retry."""
        if not self.percent:
            return
        second = math.floor(self.clock.monotonic())
        with self._lock:
            deposits = self._deposits
            if deposits and deposits[-1][0] == second:
                deposits[-1][1] += self.percent
            else:
                deposits.append([second, self.percent])
            self._total += self.percent

    def try_withdraw(self) -> bool:
        """Take a retry from the budget if it has one; never waits."""
        now = self.clock.monotonic()
        with self._lock:
            self._expire(now)
            if self._total >= 100.0:
                self._take(100.0)
                self.withdrawn += 1
                return True
            self._refill(now)
            if self._floor >= 1.0:
                self._floor -= 1.0
                self.withdrawn += 1
                return True
            self.refused += 1
            return False

    @property
    def balance(self) -> float:
        """Retries the budget would allow now (deposits and floor)."""
        now = self.clock.monotonic()
        with self._lock:
            self._expire(now)
            self._refill(now)
            return math.floor(self._total / 100.0) + math.floor(self._floor)

    def _expire(self, now: float) -> None:
        deposits, oldest = self._deposits, math.floor(now) - self.ttl
        while deposits and deposits[0][0] <= oldest:
            self._total -= deposits.popleft()[1]
        if not deposits:
            self._total = 0.0

    def _take(self, amount: float) -> None:
        deposits = self._deposits
        self._total -= amount
        while amount > 0 and deposits:
            slot = deposits[0]
            if slot[1] > amount:
                slot[1] -= amount
                return
            amount -= slot[1]
            deposits.popleft()

    def _refill(self, now: float) -> None:
        if self._floor_at is not None:
            self._floor = min(self.min_per_second,
                              self._floor + (now - self._floor_at) * self.min_per_second)
        self._floor_at = now

    def __repr__(self) -> str:
        return '<RetryBudget %g%% + %g/s, %d allowed, %d refused>' % (
            self.percent, self.min_per_second, self.withdrawn, self.refused)
