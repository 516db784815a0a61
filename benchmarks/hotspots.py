"""Where a Blackgate call spends its time: cProfile, and each pipeline step on its own.

    python -m benchmarks.hotspots open_execute          # cProfile of 200,000 calls
    python -m benchmarks.hotspots open_execute --steps  # each step timed in isolation

Cases: ``execute``, ``open_execute``, ``open_queue``, ``async_run``. cProfile
adds its own cost to every Python call, so its totals are inflated; read it
for the shape. ``--steps`` times each step of the pipeline alone with
``timeit`` (best of 7, ns per call), which is what the suggestions in the
performance notes are based on. The steps reach into Blackgate's private
helpers: a step whose helper has changed prints ``n/a`` instead of failing.
"""
import argparse
import asyncio
import cProfile
import concurrent.futures
import io
import pstats
import timeit
from typing import Any, Callable, Dict

from blackgate import Event, component

from .cases import AsyncRun, ForcedOpen, Trivial, _fill_pools, _fresh_component

CALLS = 200_000


def _setup(case: str) -> None:
    if case in ('open_execute', 'open_queue'):
        _fresh_component([{'group_key': 'bench_open', 'max_workers': 1}])
    else:
        _fresh_component([{'group_key': 'default', 'max_workers': 10}])
    if case == 'execute':
        _fill_pools(concurrent.futures.ThreadPoolExecutor(10))


def _sync_loop(call: Callable[[], Any], calls: int) -> None:
    for _ in range(calls):
        call()


def _async_loop(make: Callable[[], Any], calls: int) -> None:
    async def loop():
        for _ in range(calls):
            await make()
    asyncio.run(loop())


_LOOPS: Dict[str, Callable[[int], None]] = {
    'execute': lambda n: _sync_loop(lambda: Trivial().execute(), n // 10),
    'open_execute': lambda n: _sync_loop(lambda: ForcedOpen().execute(), n),
    'open_queue': lambda n: _async_loop(lambda: ForcedOpen().queue(), n),
    'async_run': lambda n: _async_loop(lambda: AsyncRun().queue(), n),
}


def profile(case: str, calls: int = CALLS, top: int = 20) -> str:
    """cProfile's table (by own time) of ``calls`` Blackgate calls of ``case``."""
    _setup(case)
    _LOOPS[case](calls // 20)   # warm up
    profiler = cProfile.Profile()
    profiler.enable()
    _LOOPS[case](calls)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats('tottime').print_stats(top)
    component.reset()
    return out.getvalue()


# -- steps in isolation --------------------------------------------------------------------

def _step(label: str, statement: str, namespace: Dict[str, Any], number: int = CALLS) -> None:
    try:
        best = min(timeit.repeat(statement, number=number, repeat=7, globals=namespace))
    except Exception as exc:   # a private helper changed: say so, go on
        print('%-64s     n/a (%s: %s)' % (label, type(exc).__name__, exc))
        return
    print('%-64s %7.0f ns' % (label, best / number * 1e9))


def steps(case: str) -> None:
    """Time each step of the Blackgate pipeline of ``case`` on its own."""
    from blackgate import command as C
    from blackgate.breaker import ALLOW, DENY
    _setup(case)
    cls = {'execute': Trivial, 'open_execute': ForcedOpen, 'open_queue': ForcedOpen,
           'async_run': AsyncRun}[case]
    if case in ('execute', 'open_execute'):
        cls().execute()
    rt = C._runtime(cls)
    ns = dict(C=C, cls=cls, rt=rt, cmd=cls(), Event=Event, ALLOW=ALLOW, DENY=DENY,
              SC=(Event.SHORT_CIRCUITED, Event.FALLBACK_SUCCESS), asyncio=asyncio)
    ns['cause'] = C._cause(rt, Event.SHORT_CIRCUITED)
    ns['ex'] = C._begin(rt, 0.0)
    ns['new_ex'] = lambda: C._begin(rt, 0.0)
    print('%s: steps of the pipeline, each alone (best of 7, per call)' % (case,))
    _step('cls()  (instance, as the baseline also makes)', 'cls()', ns)
    _step('cls().fallback()  (the baseline of the forced-open cases)', 'cls().fallback()', ns)
    _step('asyncio._get_running_loop()', 'C._get_running_loop()', ns)
    _step('_runtime(cls)', 'C._runtime(cls)', ns)
    _step('_Execution(rt, start)  (the per-execution state)', 'C._begin(rt, 0.0)', ns)
    _step('cls()._Command__claim(...)  (includes cls())',
          'cls()._Command__claim(C._begin(rt, 0.0))', ns)
    _step('clock.monotonic()', 'rt.clock.monotonic()', ns)
    _step('breaker.allow_request()', 'rt.breaker.allow_request()', ns)
    if case in ('open_execute', 'open_queue'):
        _step('_cause(rt, SHORT_CIRCUITED)  (a ShortCircuited, message formatted)',
              'C._cause(rt, Event.SHORT_CIRCUITED)', ns)
        _step('fallback_permits.try_acquire() + release()',
              'p = rt.state.fallback_permits; p.try_acquire(); p.release()', ns)
        _step('metrics.record((SHORT_CIRCUITED, FALLBACK_SUCCESS), None, t)',
              'rt.metrics.record(SC, None, 1e-6)', ns)
        _step('_log_failure()  (level disabled)', 'C._log_failure(rt, SC, cause, None)', ns)
        _step('_Execution.record(...)  (the record step: includes _log_failure)',
              'ex.record(SC, None, cause, None)', ns)
    if case == 'open_execute':
        _step('_Execution.fall_back(...)  (all of the above after allow_request)',
              'new_ex().fall_back(cls(), Event.SHORT_CIRCUITED, None, None)', ns)
        _step('cls().execute()  (the whole call)', 'cls().execute()', ns)
    if case == 'execute':
        _step('metrics.record((SUCCESS,), elapsed, total)',
              'rt.metrics.record(C._SUCCESS_ONLY, 1e-6, 2e-6)', ns)
        _step('_Execution.record((SUCCESS,), ...)  (the record step)',
              'ex.record(C._SUCCESS_ONLY, 1e-6, None)', ns)
        _step('_Execution.work(...)  (on the worker: metrics, 2 clock reads, run())',
              'ex.work(lambda: None, cmd)', ns)
    if case == 'async_run':
        _async_steps(ns)
    component.reset()


def _async_steps(ns: Dict[str, Any]) -> None:
    """Loop-bound steps: timed inside a running loop, per call."""
    async def coro():
        return 1

    async def measure():
        loop = asyncio.get_running_loop()
        namespace = dict(ns, loop=loop, coro=coro)
        for label, statement in (
                ('loop.create_future()', 'loop.create_future()'),
                ('run_permits.try_acquire() + release()',
                 'p = rt.state.run_permits; p.try_acquire(); p.release()'),
                ('loop.create_task(coro())  (no eager start before 3.12)',
                 'loop.create_task(coro()).cancel()'),
                ('clock.call_later(loop, 1.0, f).cancel()  (the timeout timer)',
                 'rt.clock.call_later(loop, 1.0, int).cancel()'),
                ('metrics.record((SUCCESS,), elapsed, total)',
                 'rt.metrics.record(C._SUCCESS_ONLY, 1e-6, 2e-6)')):
            _step(label, statement, namespace, number=CALLS // 4)
        calls = CALLS // 4
        for label, make in (('await coro()', coro), ('await loop.create_task(coro())',
                                                      lambda: loop.create_task(coro())),
                            ('await cls().queue()  (the whole call)', lambda: ns['cls']().queue())):
            best = None
            for _ in range(5):
                start = loop.time()
                for _ in range(calls):
                    await make()
                elapsed = (loop.time() - start) / calls
                best = elapsed if best is None else min(best, elapsed)
            print('%-64s %7.0f ns' % (label, best * 1e9))

    asyncio.run(measure())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('case', choices=sorted(_LOOPS))
    parser.add_argument('--steps', action='store_true', help='time each step on its own')
    parser.add_argument('--calls', type=int, default=CALLS)
    args = parser.parse_args(argv)
    if args.steps:
        steps(args.case)
    else:
        print(profile(args.case, args.calls))


if __name__ == '__main__':
    main()
