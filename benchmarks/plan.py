"""How much work each case does: the full run, and ``--quick`` (a smoke check, under a minute)."""
from dataclasses import dataclass, replace

__all__ = ('Plan', 'FULL', 'QUICK')


@dataclass(frozen=True)
class Plan:
    #: rounds of the per-call cases that stay on the thread (every candidate once per round)
    rounds: int
    #: rounds of the per-call cases that hop to a thread: more and shorter, because how
    #: long a hop takes drifts with the machine from one moment to the next
    pool_rounds: int
    #: calls per candidate per round, for calls that hop to a thread (tens of µs)
    pool_calls: int
    #: calls per candidate per round, for calls that stay on the thread (a few µs)
    fast_calls: int
    #: size and rounds of the "10,000 concurrent queue()" case
    crowd_size: int
    crowd_rounds: int
    #: rounds of the "100 concurrent 2 ms run()s" case
    blocking_rounds: int
    #: memory: command keys measured at once, and calls on one key for flatness
    memory_keys: int
    memory_calls: int
    #: gateway: rounds, seconds of load per gateway per round, connections
    proxy_rounds: int
    proxy_seconds: float
    proxy_connections: int = 32
    #: 'auto': wrk if installed, else the Python load generator; 'python': always the latter
    proxy_load: str = 'auto'

    def but(self, **changes) -> 'Plan':
        return replace(self, **changes)


FULL = Plan(rounds=15, pool_rounds=60, pool_calls=500, fast_calls=20000, crowd_size=10000, crowd_rounds=9,
            blocking_rounds=15, memory_keys=2000, memory_calls=1_000_000,
            proxy_rounds=5, proxy_seconds=5.0)

QUICK = Plan(rounds=3, pool_rounds=3, pool_calls=300, fast_calls=3000, crowd_size=2000, crowd_rounds=2,
             blocking_rounds=3, memory_keys=300, memory_calls=20_000,
             proxy_rounds=2, proxy_seconds=1.0)
