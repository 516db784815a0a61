"""Adaptive concurrency limits: how much work a group may run at once, learned.

A fixed ``max_workers`` is a guess, too low while the dependency is healthy and
too high once it slows down (its queue grows, then everything times out). A
limit here is learned from what the pool sees: each admitted execution, when
it ends, gives a sample (when it started, how long it took, how many were in
flight when it was admitted, and whether it was dropped: timed out). Samples
are aggregated over a short window (Netflix's ``WindowedLimit``), and each
window moves the limit by one of the published algorithms:

- :class:`Gradient2Limit` (Netflix concurrency-limits ``Gradient2Limit``): the
  gradient of a long-window average RTT over the window's RTT;
- :class:`VegasLimit` (TCP Vegas, ``VegasLimit``): a queue-size estimate from
  the no-load RTT;
- :class:`AIMDLimit` (``AIMDLimit``): additive increase, multiplicative
  decrease on a drop.

Guards that their users learned the hard way (see docs/guide.rst):

- Gradient2 adds its ``queue_size`` headroom only while no queueing shows
  (gradient 1), and a drop halves the gradient, so that modest overload cannot
  make it grow without bound (Netflix/concurrency-limits #134);
- Vegas grows by ``beta`` at once while no queue shows, rather than by one
  (concurrency-limits #35: its slow ramp);
- a baseline (no-load RTT, long RTT) is re-measured after 5 consecutive windows
  at the floor (Envoy PR #10647), at a jittered interval (Envoy #8337), and
  samples of work admitted before the new baseline's epoch began are ignored
  (Envoy PR #11579); re-measuring never pins concurrency low (Envoy #8337,
  #18152): the floor is ``min``, and only ``min``.

A limit object has no lock, no thread and no clock of its own: the pool feeds
it under its lock, with times from the registry's clock, so tests drive it on
a :class:`~blackgate.testing.FakeClock` or with plain numbers.
"""
import math
import random
from typing import Callable, Optional

from .config import LimitSettings

__all__ = ('ConcurrencyLimit', 'Gradient2Limit', 'VegasLimit', 'AIMDLimit', 'new_limit',
           'FLOOR_WINDOWS')

#: Consecutive windows at the floor after which the baseline is measured again (Envoy's 5).
FLOOR_WINDOWS = 5


class ConcurrencyLimit:
    """The common part: the current limit, the sampling window, the floor and the epoch.

    :meth:`sample` is the one entry point; a subclass writes :meth:`_update`,
    which returns the new estimate from one window's aggregate, and may write
    :meth:`_rebase`, which forgets the baseline it measures latency against.
    """

    #: the name used in ``concurrency_limit``'s ``algorithm``
    algorithm = ''

    def __init__(self, settings: LimitSettings,
                 random: Callable[[], float] = random.random) -> None:
        self.settings = settings
        self.min = settings.min
        self.max = settings.max
        self._random = random
        self._estimate = float(settings.initial)
        #: the limit now: the pool admits at most this much work at once
        self.limit = settings.initial
        # the window being filled
        self._window_start: Optional[float] = None
        self._count = 0
        self._rtt_sum = 0.0
        self._inflight = 0
        self._dropped = False
        self._admitted = -math.inf
        self._at_floor = 0
        #: samples of work admitted before this time are ignored (a new baseline's epoch)
        self.epoch = -math.inf
        #: windows that moved the limit, and baselines re-measured (for tests and the docs)
        self.updates = 0
        self.rebases = 0

    def sample(self, now: float, start: float, rtt: float, inflight: int,
               dropped: bool = False) -> int:
        """Take one finished execution into account; returns the limit.

        ``start`` is when it was admitted and ``rtt`` how long it took (seconds,
        ``now - start`` as a rule), ``inflight`` how much work was admitted when
        it was, counting itself, ``dropped`` whether it timed out.
        """
        if start < self.epoch:
            return self.limit   # measured against the baseline before: it would skew the new one
        if self._window_start is None:
            self._window_start = now
        self._count += 1
        self._rtt_sum += rtt
        if inflight > self._inflight:
            self._inflight = inflight
        if start > self._admitted:
            self._admitted = start
        self._dropped = self._dropped or dropped
        settings = self.settings
        if now - self._window_start < settings.window:
            return self.limit
        count, average = self._count, self._rtt_sum / self._count
        inflight, dropped, admitted = self._inflight, self._dropped, self._admitted
        self._clear_window()
        if count < settings.window_size and not dropped:
            # Too few samples to speak for the dependency (health checks, a trickle):
            # discarded, as Netflix's WindowedLimit does. A drop always counts.
            return self.limit
        estimate = self._update(now, max(average, 1e-9), inflight, dropped, admitted)
        self.updates += 1
        self._estimate = min(float(self.max), max(float(self.min), estimate))
        self.limit = max(self.min, int(self._estimate))
        if self.limit <= self.min:
            self._at_floor += 1
            if self._at_floor >= FLOOR_WINDOWS:
                # Stuck at the floor: the baseline may be wrong (measured in a slow spell),
                # so measure it again, from work admitted from now on.
                self._at_floor = 0
                self.rebase(now)
        else:
            self._at_floor = 0
        return self.limit

    def rebase(self, now: float) -> None:
        """Forget the latency baseline; measure it again from work admitted from ``now`` on."""
        self.epoch = now
        self.rebases += 1
        self._clear_window()
        self._rebase()

    def _clear_window(self) -> None:
        self._window_start = None
        self._count, self._rtt_sum, self._inflight, self._dropped = 0, 0.0, 0, False
        self._admitted = -math.inf

    def _update(self, now: float, rtt: float, inflight: int, dropped: bool,
                admitted: float) -> float:
        """The new estimate from one window: its mean RTT, most in flight, any drop,
        and when the last of its samples' work was admitted."""
        raise NotImplementedError

    def _rebase(self) -> None:
        pass

    def __repr__(self) -> str:
        return '<%s limit=%d [%d..%d]>' % (type(self).__name__, self.limit, self.min, self.max)


class Gradient2Limit(ConcurrencyLimit):
    """Netflix's Gradient2: ``limit * gradient + queue_size``, smoothed.

    ``gradient = clamp(tolerance * long_rtt / rtt, 0.5, 1)``, where ``long_rtt``
    is an exponential average over ``long_window`` windows. While the pool is
    app-limited (less than half the limit in flight) the limit does not grow.
    """

    algorithm = 'gradient2'

    def __init__(self, settings: LimitSettings,
                 random: Callable[[], float] = random.random) -> None:
        super().__init__(settings, random)
        self.smoothing = settings.option('smoothing')
        self.queue_size = settings.option('queue_size')
        self.tolerance = settings.option('tolerance')
        self.long_window = settings.option('long_window')
        #: the long-window average RTT (seconds), None until measured
        self.long_rtt: Optional[float] = None
        #: the lowest window RTT since the baseline was last measured (seconds)
        self.min_rtt: Optional[float] = None
        self._long_count = 0

    def _update(self, now: float, rtt: float, inflight: int, dropped: bool,
                admitted: float) -> float:
        if self.min_rtt is None or rtt < self.min_rtt:
            self.min_rtt = rtt
        long_rtt = self._average(rtt)
        ceiling = self.tolerance * self.min_rtt
        if long_rtt > ceiling:
            # Under sustained overload the long average follows the slow RTT up, and with
            # it the limit, without bound (concurrency-limits #134): it may rise no higher
            # than tolerance x the epoch's lowest RTT. A dependency that really became
            # slower pins the limit to the floor, and 5 windows there measure it anew.
            long_rtt = self.long_rtt = ceiling
        if long_rtt / rtt > 2:
            # Latency is back to normal after a long slow spell: bring the baseline down
            # faster than the average would (as Netflix does).
            long_rtt = self.long_rtt = long_rtt * 0.9
        estimate = self._estimate
        if dropped:
            gradient = 0.5   # a drop is the strongest sign of overload (concurrency-limits #134)
        elif inflight < estimate / 2:
            return estimate   # app-limited: what it does now says nothing about more
        else:
            gradient = max(0.5, min(1.0, self.tolerance * long_rtt / rtt))
        # The headroom only while no queueing shows: with it under a gradient just below 1
        # the limit settles at queue_size / (1 - gradient) whatever the dependency can take,
        # and creeps up as the long average follows the slow RTT (#134).
        target = estimate * gradient + (self.queue_size if gradient >= 1.0 else 0)
        return estimate * (1 - self.smoothing) + target * self.smoothing

    def _average(self, rtt: float) -> float:
        # Netflix's ExpAvgMeasurement: a plain mean over the first windows, then exponential.
        self._long_count += 1
        if self.long_rtt is None:
            self.long_rtt = rtt
        elif self._long_count <= 10:
            self.long_rtt += (rtt - self.long_rtt) / self._long_count
        else:
            factor = 2.0 / (self.long_window + 1)
            self.long_rtt = self.long_rtt * (1 - factor) + rtt * factor
        return self.long_rtt

    def _rebase(self) -> None:
        self.long_rtt = None
        self.min_rtt = None
        self._long_count = 0


def _log10(limit: float) -> int:
    return max(1, int(math.log10(max(1.0, limit))))


class VegasLimit(ConcurrencyLimit):
    """TCP Vegas: the queue is ``limit * (1 - rtt_noload / rtt)``; keep it between alpha and beta.

    ``alpha = 3 log10 L``, ``beta = 6 log10 L``, ``threshold = log10 L``: no queue
    (at most the threshold) grows by beta, a small one by log10 L, one beyond beta
    shrinks by log10 L, as does a drop. The no-load RTT is probed again every
    ``probe_multiplier * limit`` windows, jittered by a factor from 0.5 to 1.
    """

    algorithm = 'vegas'

    def __init__(self, settings: LimitSettings,
                 random: Callable[[], float] = random.random) -> None:
        super().__init__(settings, random)
        self.smoothing = settings.option('smoothing')
        self.probe_multiplier = settings.option('probe_multiplier')
        #: the lowest RTT seen since the last probe (seconds), None until measured
        self.rtt_noload: Optional[float] = None
        self._probe_count = 0
        self._new_jitter()

    def _new_jitter(self) -> None:
        # Probes of many pools (and processes) started together must not stay in step.
        self._probe_jitter = 0.5 + 0.5 * self._random()

    def _update(self, now: float, rtt: float, inflight: int, dropped: bool,
                admitted: float) -> float:
        estimate = self._estimate
        self._probe_count += 1
        if self._probe_jitter * self.probe_multiplier * estimate <= self._probe_count:
            # Probe: measure the no-load RTT again from work admitted from now on. The limit
            # stays where it is; nothing is pinned low while it is measured.
            self._new_jitter()
            self._probe_count = 0
            self.epoch = now
            self.rebases += 1
            self.rtt_noload = None
            return estimate
        if self.rtt_noload is None or rtt < self.rtt_noload:
            self.rtt_noload = rtt
            return estimate
        queue = math.ceil(estimate * (1 - self.rtt_noload / rtt))
        log_limit = _log10(estimate)
        if dropped:
            target = estimate - log_limit
        elif inflight * 2 < estimate:
            return estimate   # app-limited
        elif queue <= log_limit:
            target = estimate + 6 * log_limit   # no queue at all: grow fast (#35)
        elif queue < 3 * log_limit:
            target = estimate + log_limit
        elif queue > 6 * log_limit:
            target = estimate - log_limit
        else:
            return estimate
        target = max(1.0, min(float(self.max), target))
        return (1 - self.smoothing) * estimate + self.smoothing * target

    def _rebase(self) -> None:
        self.rtt_noload = None
        self._probe_count = 0


class AIMDLimit(ConcurrencyLimit):
    """Additive increase while busy and nothing drops, multiplicative decrease on a drop.

    One decrease per round: the drops of work admitted before the last decrease
    tell of the limit before it, already cut (as TCP cuts its window once per
    round trip); without this, the timeouts of one burst would each cut it again,
    down to the floor.
    """

    algorithm = 'aimd'

    def __init__(self, settings: LimitSettings,
                 random: Callable[[], float] = random.random) -> None:
        super().__init__(settings, random)
        self.backoff_ratio = settings.option('backoff_ratio')
        self._decreased_at = -math.inf

    def _update(self, now: float, rtt: float, inflight: int, dropped: bool,
                admitted: float) -> float:
        limit = self.limit
        if dropped:
            if admitted < self._decreased_at:
                return self._estimate   # of a round already answered for
            self._decreased_at = now
            return float(max(1, min(limit - 1, int(limit * self.backoff_ratio))))
        if inflight * 2 >= limit:
            return float(limit + 1)
        return self._estimate


_ALGORITHMS = {cls.algorithm: cls for cls in (Gradient2Limit, VegasLimit, AIMDLimit)}


def new_limit(settings: LimitSettings,
              random: Callable[[], float] = random.random) -> ConcurrencyLimit:
    """The limit object for a pool's validated ``concurrency_limit``."""
    return _ALGORITHMS[settings.algorithm](settings, random)
