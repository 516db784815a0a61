"""The peer libraries, wired to do what each case's Blackgate candidate does.

pybreaker, circuitbreaker, aiobreaker and purgatory are circuit breakers
only: none has a bulkhead, a timeout or a fallback pipeline of its own. So a
peer candidate is the case's baseline wrapped in the peer's breaker, the way
its documentation shows, with the rest written by hand:

- on a thread pool: the breaker guards ``pool.submit(f).result(timeout=1)``
  (sync) or ``asyncio.wait_for(loop.run_in_executor(pool, f), 1)`` (async);
- forced open: the breaker is opened (``open()``, or enough failures with a
  one-hour reset timeout), and the caller catches the peer's error and calls
  ``fallback()`` (circuitbreaker calls its ``fallback_function`` itself);
- ``async def`` work: the breaker guards ``await coro()``.

A peer that is not installed, or fails its smoke call on this Python, is left
out with the reason (``install -r benchmarks/requirements.txt`` brings them).
"""
import asyncio
import importlib
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Dict, Optional

__all__ = ('PEERS', 'Limited', 'status', 'versions', 'sync_pool', 'async_pool', 'open_sync',
           'open_async', 'async_work', 'breaker_footprints')

PEERS = ('pybreaker', 'circuitbreaker', 'aiobreaker', 'purgatory')

_RESET = 3600          # seconds: an opened peer breaker stays open for the whole run


@dataclass
class Limited:
    """A peer call that makes only ``share`` of a round's calls, and why."""

    call: Callable[[], Any]
    share: float
    note: str
_status: Dict[str, Optional[str]] = {}


def _smoke(name: str) -> None:
    """One closed call through the peer's breaker, so that 'installed' means 'works here'."""
    if name == 'pybreaker':
        import pybreaker
        assert pybreaker.CircuitBreaker().call(lambda: 1) == 1
    elif name == 'circuitbreaker':
        import circuitbreaker
        assert circuitbreaker.CircuitBreaker(name='bench_smoke').decorate(lambda: 1)() == 1
    elif name == 'aiobreaker':
        import aiobreaker
        assert aiobreaker.CircuitBreaker().call(lambda: 1) == 1
    elif name == 'purgatory':
        import purgatory
        assert purgatory.SyncCircuitBreakerFactory()('bench_smoke')(lambda: 1)() == 1


def status() -> Dict[str, Optional[str]]:
    """Peer name -> None if usable, else why it is left out."""
    if not _status:
        for name in PEERS:
            try:
                importlib.import_module(name)
            except ImportError as exc:
                _status[name] = 'not installed (%s); pip install -r benchmarks/requirements.txt' % (
                    exc,)
                continue
            try:
                _smoke(name)
            except Exception as exc:   # a peer broken on this Python: say so, go on
                _status[name] = 'does not work on this Python: %s: %s' % (
                    type(exc).__name__, exc)
            else:
                _status[name] = None
    return _status


def versions() -> Dict[str, str]:
    """Installed version of each usable peer."""
    from importlib import metadata
    out = {}
    for name, reason in status().items():
        if reason is None:
            try:
                out[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                out[name] = '?'
    return out


def _usable(builders: Dict[str, Callable[[], Any]]) -> Dict[str, Any]:
    return {name: build() for name, build in builders.items() if status().get(name) is None}


# -- a breaker-wrapped call on a thread pool (execute() and its 10 k / 2 ms cases) --------

def sync_pool(pool, fn: Callable[[], Any]) -> Dict[str, Callable[[], Any]]:
    """Peer name -> ``call()`` that runs ``fn`` on ``pool`` under the breaker, timeout 1 s."""
    def hop():
        return pool.submit(fn).result(timeout=1)

    def pybreaker_():
        import pybreaker
        breaker = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=_RESET)
        return lambda: breaker.call(hop)

    def circuitbreaker_():
        import circuitbreaker
        return circuitbreaker.CircuitBreaker(
            failure_threshold=5, recovery_timeout=_RESET, name='bench_sync_pool').decorate(hop)

    def aiobreaker_():
        import aiobreaker
        breaker = aiobreaker.CircuitBreaker(fail_max=5, timeout_duration=timedelta(seconds=_RESET))
        return lambda: breaker.call(hop)

    def purgatory_():
        import purgatory
        return purgatory.SyncCircuitBreakerFactory(default_threshold=5, default_ttl=_RESET)(
            'bench_sync_pool')(hop)

    return _usable({'pybreaker': pybreaker_, 'circuitbreaker': circuitbreaker_,
                    'aiobreaker': aiobreaker_, 'purgatory': purgatory_})


def async_pool(pool, fn: Callable[[], Any], timeout: float = 1.0
               ) -> Dict[str, Callable[[], Any]]:
    """Peer name -> ``call()`` returning an awaitable: ``fn`` on ``pool`` under the breaker,
    with ``asyncio.wait_for`` as the timeout. Call it on a running loop."""
    def work():
        return asyncio.wait_for(asyncio.get_running_loop().run_in_executor(pool, fn), timeout)

    async def awork():
        return await work()

    return _async_builders(awork, 'bench_async_pool')


def async_work(coro_fn: Callable[[], Any]) -> Dict[str, Callable[[], Any]]:
    """Peer name -> ``call()`` returning an awaitable of ``await coro_fn()`` under the breaker."""
    return _async_builders(coro_fn, 'bench_async_work')


def _async_builders(awork: Callable[[], Any], key: str) -> Dict[str, Callable[[], Any]]:
    def pybreaker_():
        import pybreaker   # call_async is a tornado gen.coroutine
        breaker = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=_RESET)
        return lambda: breaker.call_async(awork)

    def circuitbreaker_():
        import circuitbreaker
        return circuitbreaker.CircuitBreaker(failure_threshold=5, recovery_timeout=_RESET,
                                             name=key).decorate(awork)

    def aiobreaker_():
        import aiobreaker
        breaker = aiobreaker.CircuitBreaker(fail_max=5, timeout_duration=timedelta(seconds=_RESET))
        return lambda: breaker.call_async(awork)

    def purgatory_():
        import purgatory
        return purgatory.AsyncCircuitBreakerFactory(default_threshold=5, default_ttl=_RESET)(
            key)(awork)

    return _usable({'pybreaker': pybreaker_, 'circuitbreaker': circuitbreaker_,
                    'aiobreaker': aiobreaker_, 'purgatory': purgatory_})


# -- an open breaker answering with the fallback ---------------------------------------------

class _Boom(Exception):
    pass


def _boom():
    raise _Boom()


async def _aboom():
    raise _Boom()


def _fail(call: Callable[[], Any], times: int) -> None:
    for _ in range(times):
        try:
            call()
        except _Boom:
            pass


def _open_circuitbreaker(breaker) -> None:
    """One failure through circuitbreaker's context manager (its threshold is 1) opens it."""
    try:
        with breaker:
            raise _Boom()
    except _Boom:
        pass
    assert breaker.opened


def open_sync(fallback: Callable[[], Any]) -> Dict[str, Callable[[], Any]]:
    """Peer name -> ``call()`` through an open breaker, answered by ``fallback()``."""
    def pybreaker_():
        import pybreaker
        breaker = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=_RESET)
        breaker.open()
        error = pybreaker.CircuitBreakerError

        def call():
            try:
                return breaker.call(_boom)
            except error:
                return fallback()
        return call

    def circuitbreaker_():
        import circuitbreaker
        breaker = circuitbreaker.CircuitBreaker(
            failure_threshold=1, recovery_timeout=_RESET, name='bench_open_sync',
            fallback_function=fallback)
        _open_circuitbreaker(breaker)
        return breaker.decorate(_boom)

    def aiobreaker_():
        import aiobreaker
        breaker = aiobreaker.CircuitBreaker(fail_max=5, timeout_duration=timedelta(seconds=_RESET))
        breaker.open()
        error = aiobreaker.CircuitBreakerError

        def call():
            try:
                return breaker.call(_boom)
            except error:
                return fallback()
        return call

    def purgatory_():
        import purgatory
        from purgatory.domain.model import OpenedState
        guarded = purgatory.SyncCircuitBreakerFactory(default_threshold=1, default_ttl=_RESET)(
            'bench_open_sync')(_boom)
        _fail(guarded, 1)

        def call():
            try:
                return guarded()
            except OpenedState as exc:
                exc.__traceback__ = None   # one object re-raised: its traceback would grow
                return fallback()
        return call

    return _usable({'pybreaker': pybreaker_, 'circuitbreaker': circuitbreaker_,
                    'aiobreaker': aiobreaker_, 'purgatory': purgatory_})


def open_async(fallback: Callable[[], Any]) -> Dict[str, Callable[[], Any]]:
    """Peer name -> ``call()`` returning an awaitable through an open breaker -> ``fallback()``.

    purgatory's breaker opens on the first call, which fails (the warm-up makes it).
    """
    async def afallback():
        return fallback()

    def pybreaker_():
        import pybreaker
        breaker = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=_RESET)
        breaker.open()
        error = pybreaker.CircuitBreakerError

        async def call():
            try:
                return await breaker.call_async(_aboom)
            except error as exc:
                exc.__traceback__ = None
                return fallback()
        # Its tornado gen.coroutine path keeps memory for every call made while open
        # (6.6 KB, 1.3 KB with the traceback dropped): a full round would take gigabytes.
        return Limited(call, 0.05, 'keeps ~1.3 KB per call while open: 5% of the calls')

    def circuitbreaker_():
        import circuitbreaker
        breaker = circuitbreaker.CircuitBreaker(
            failure_threshold=1, recovery_timeout=_RESET, name='bench_open_async',
            fallback_function=afallback)
        _open_circuitbreaker(breaker)
        return breaker.decorate(_aboom)

    def aiobreaker_():
        import aiobreaker
        breaker = aiobreaker.CircuitBreaker(fail_max=5, timeout_duration=timedelta(seconds=_RESET))
        breaker.open()
        error = aiobreaker.CircuitBreakerError

        async def call():
            try:
                return await breaker.call_async(_aboom)
            except error:
                return fallback()
        return call

    def purgatory_():
        import purgatory
        from purgatory.domain.model import OpenedState
        guarded = purgatory.AsyncCircuitBreakerFactory(default_threshold=1, default_ttl=_RESET)(
            'bench_open_async')(_aboom)

        async def call():
            try:
                return await guarded()
            except OpenedState as exc:
                exc.__traceback__ = None   # one object re-raised: its traceback would grow
                return fallback()
            except _Boom:   # the first call: it fails and opens the breaker
                return fallback()
        return call

    return _usable({'pybreaker': pybreaker_, 'circuitbreaker': circuitbreaker_,
                    'aiobreaker': aiobreaker_, 'purgatory': purgatory_})


# -- memory: one breaker per key -------------------------------------------------------------

def breaker_footprints() -> Dict[str, Callable[[str], Any]]:
    """Peer name -> ``make(key)``: one breaker for ``key`` that has guarded one call."""
    def pybreaker_():
        import pybreaker

        def make(key):
            breaker = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=60, name=key)
            breaker.call(int)
            return breaker
        return make

    def circuitbreaker_():
        import circuitbreaker

        def make(key):
            breaker = circuitbreaker.CircuitBreaker(name=key)
            breaker.decorate(int)()
            return breaker
        return make

    def aiobreaker_():
        import aiobreaker

        def make(key):
            breaker = aiobreaker.CircuitBreaker(name=key)
            breaker.call(int)
            return breaker
        return make

    def purgatory_():
        import purgatory
        factory = purgatory.SyncCircuitBreakerFactory()

        def make(key):   # the factory keeps one context per circuit name
            factory(key)(int)()
            return factory
        return make

    return _usable({'pybreaker': pybreaker_, 'circuitbreaker': circuitbreaker_,
                    'aiobreaker': aiobreaker_, 'purgatory': purgatory_})
