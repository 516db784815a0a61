"""The per-call cases of issue 6: Blackgate, its baseline and the peers, side by side.

Each ``case_*`` function sets up a fresh ``component``, builds its
candidates, checks once that each answers what it should (a fallback or a
rejection in place of ``run()`` would make a candidate look fast), times them
in interleaved rounds and returns a :class:`~benchmarks.results.CaseResult`.
"""
import asyncio
import concurrent.futures
import threading
import time
from typing import Any, Callable, Dict, List, Tuple

from tornado.ioloop import IOLoop

from blackgate import Command, Event, component

from . import peers
from .harness import Candidate, run_async, time_async, time_batches, time_sync
from .plan import Plan
from .results import CaseResult, Target, rows_from_timings

__all__ = ('CASES',)

BASELINE, BLACKGATE, PEER = 'baseline', 'blackgate', 'peer'
#: the baseline timed a second time, as if it were a candidate: how far apart two runs
#: of the very same call come out is the noise floor of a thread-hop case
CONTROL = 'control'
_CONTROL_NAME = 'the baseline again (control)'


def trivial() -> int:
    return 1


def blocking() -> int:
    time.sleep(0.002)
    return 1


async def coro() -> int:
    return 1


# -- the commands --------------------------------------------------------------------------

class Trivial(Command):
    command_key = 'bench_trivial'

    def run(self):
        return 1

    def fallback(self):
        return 0


class ForcedOpen(Command):
    group_key = 'bench_open'   # a pool of its own, to show that no work reaches it
    command_key = 'bench_forced_open'
    circuit_breaker_force_open = True

    def run(self):
        return 1

    def fallback(self):
        return 0


class AsyncRun(Command):
    command_key = 'bench_async_run'

    async def run(self):
        return 1

    def fallback(self):
        return 0


class Crowd(Command):
    group_key = 'bench_crowd'
    command_key = 'bench_crowd'
    timeout = 60.0   # armed, but 10,000 trivial calls must not time out on a busy machine

    def run(self):
        return 1

    def fallback(self):
        return 0


class Blocking(Command):
    group_key = 'bench_blocking'
    command_key = 'bench_blocking'
    timeout = 60.0

    def run(self):
        return blocking()

    def fallback(self):
        return 0


class _Fill(Command):
    """Holds a worker of the default pool until ten of them meet at the barrier."""

    command_key = 'bench_fill'
    timeout = 10.0

    def __init__(self, barrier):
        self.barrier = barrier

    def run(self):
        return self.barrier.wait(5)


# -- helpers -------------------------------------------------------------------------------

_FILLED = ('the baseline, the peers and Blackgate hop to the same 10 worker threads '
           "(Blackgate's pool), all started before timing (see _fill_pools)")


def _shared_executor(group_key: str) -> concurrent.futures.ThreadPoolExecutor:
    """The ThreadPoolExecutor inside Blackgate's pool ``group_key``, for the bare candidates.

    Two ThreadPoolExecutors of ten started threads each still differ: Blackgate's
    own hopped 5% faster than a second one made beside it, in each of three runs.
    Hopping to the same threads leaves only what each candidate adds to the hop.
    (It reaches into the pool on purpose: nothing else should bypass its admission.)
    """
    return component.pool(group_key)._executor


def _fill_pools(pool: concurrent.futures.ThreadPoolExecutor, workers: int = 10) -> None:
    """Start every worker thread of ``pool`` and of Blackgate's default pool (often the same).

    A ThreadPoolExecutor starts threads as work arrives. A caller that submits
    the next call at once (the bare baseline) finds the last worker not yet idle
    and makes the pool start another, up to ten, which then take turns; a caller
    that does a little more between calls keeps reusing one warm thread. Which
    of the two happens changes a thread hop's time by 2x, so the pools start
    every thread first, as a busy service's pools have.
    """
    barrier = threading.Barrier(workers)
    waits = [pool.submit(barrier.wait, 5) for _ in range(workers)]
    for wait in waits:
        wait.result(10)
    barrier = threading.Barrier(workers)
    callers = [threading.Thread(target=_Fill(barrier).execute) for _ in range(workers)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(10)


def _fresh_component(pools: List[Dict[str, Any]]) -> None:
    component.reset()
    for pool in pools:
        component.add('executor_pool', pool)
    component.install()


def _peer_candidates(calls: Dict[str, Any], note: str = '') -> List[Candidate]:
    candidates = []
    for name, call in calls.items():
        if isinstance(call, peers.Limited):
            candidates.append(Candidate(name, PEER, call.call, '%s; %s' % (note, call.note),
                                        share=call.share))
        else:
            candidates.append(Candidate(name, PEER, call, note))
    return candidates


def _left_out(case: CaseResult) -> None:
    for name, reason in peers.status().items():
        if reason is not None:
            case.notes.append('%s left out: %s' % (name, reason))


def _check_sync(candidates: List[Candidate], expected: Dict[str, Any]) -> Dict[str, bool]:
    return {'%s answers %r' % (c.name, expected[c.name]): c.call() == expected[c.name]
            for c in candidates if c.name in expected}


async def _check_async(candidates: List[Candidate], expected: Dict[str, Any]) -> Dict[str, bool]:
    checks = {}
    for c in candidates:
        if c.name in expected:
            answer = (await c.call()) if c.awaits else c.call()
            checks['%s answers %r' % (c.name, expected[c.name])] = answer == expected[c.name]
    return checks


def _events_check(cls: type, events: tuple) -> Dict[str, bool]:
    command = cls()
    if cls is AsyncRun:
        async def one():
            await command.queue()
        run_async(one)
    else:
        command.execute()
    return {'%s events are %s' % (cls.__name__, '+'.join(e.value for e in events)):
            command.events == events}


def _new_case(key: str, title: str, baseline: str, target: Target, method: str) -> CaseResult:
    case = CaseResult(key, title, baseline, target, method)
    _left_out(case)
    return case


def _hop_case(plan: Plan, key: str, title: str, base_name: str,
              target: Target) -> Tuple[CaseResult, concurrent.futures.ThreadPoolExecutor]:
    """A single-call case that hops to a thread: its result, and the executor for all."""
    case = _new_case(key, title, base_name, target, 'each call timed; %d rounds x %d calls'
                     % (plan.pool_rounds, plan.pool_calls))
    _fresh_component([{'group_key': 'default', 'max_workers': 10}])
    pool = _shared_executor('default')
    _fill_pools(pool)
    case.notes.append(_FILLED)
    return case, pool


def _with_control(base_name: str, base: Callable[[], Any], name: str,
                  blackgate: Callable[[], Any]) -> List[Candidate]:
    """The baseline, Blackgate, and the baseline once more as the control."""
    return [Candidate(base_name, BASELINE, base), Candidate(name, BLACKGATE, blackgate),
            Candidate(_CONTROL_NAME, CONTROL, base)]


# -- 1. execute() ----------------------------------------------------------------------------

def case_execute(plan: Plan) -> CaseResult:
    """``C().execute()``, breaker closed, trivial ``run()`` vs ``pool.submit(f).result(timeout=1)``."""
    base_name = 'pool.submit(f).result(timeout=1)'
    case, pool = _hop_case(plan, 'execute', 'C().execute(), breaker closed, trivial run()',
                           base_name, Target('ratio_max', 1.05, '<= 1.05x'))
    try:
        candidates = _with_control(base_name, lambda: pool.submit(trivial).result(timeout=1),
                                   'Blackgate execute()', lambda: Trivial().execute())
        candidates += _peer_candidates(peers.sync_pool(pool, trivial),
                                       'breaker.call(pool.submit(f).result(timeout=1))')
        case.checks.update(_check_sync(candidates, {c.name: 1 for c in candidates}))
        case.checks.update(_events_check(Trivial, (Event.SUCCESS,)))
        case.rows = rows_from_timings(time_sync(candidates, plan.pool_rounds, plan.pool_calls),
                                      base_name)
    finally:
        component.reset()
    return case


# -- 2. await queue() ------------------------------------------------------------------------

def case_queue(plan: Plan) -> CaseResult:
    """``await C().queue()``, timeout armed, vs bare ``await IOLoop.run_in_executor(pool, f)``."""
    base_name = 'await IOLoop.run_in_executor(pool, f)'
    case, pool = _hop_case(plan, 'queue', 'await C().queue(), timeout armed', base_name,
                           Target('ratio_max', 1.10, '<= 1.10x'))

    async def measure():
        loop = IOLoop.current()
        candidates = _with_control(base_name, lambda: loop.run_in_executor(pool, trivial),
                                   'Blackgate await queue()', lambda: Trivial().queue())
        candidates += _peer_candidates(peers.async_pool(pool, trivial),
                                       'breaker around wait_for(run_in_executor(pool, f), 1)')
        case.checks.update(await _check_async(candidates, {c.name: 1 for c in candidates}))
        return await time_async(candidates, plan.pool_rounds, plan.pool_calls)

    try:
        case.rows = rows_from_timings(run_async(measure), base_name)
    finally:
        component.reset()
    return case


# -- 3. forced-open execute() ----------------------------------------------------------------

def case_open_execute(plan: Plan) -> CaseResult:
    """Forced-open ``execute()`` -> fallback vs calling ``fallback()`` directly."""
    base_name = 'C().fallback()'
    case = _new_case('open_execute', 'forced-open execute() -> fallback', base_name,
                     Target('extra_us_max', 1.0, '<= 1.0 us more'),
                     'each call timed; %d rounds x %d calls' % (plan.rounds, plan.fast_calls))
    _fresh_component([{'group_key': 'bench_open', 'max_workers': 1}])
    try:
        fallback = lambda: ForcedOpen().fallback()   # noqa: E731 (the baseline, named in the table)
        candidates = [Candidate(base_name, BASELINE, fallback),
                      Candidate('Blackgate execute()', BLACKGATE, lambda: ForcedOpen().execute())]
        candidates += _peer_candidates(peers.open_sync(fallback),
                                       'open breaker; caller catches its error, calls fallback()')
        case.checks.update(_check_sync(candidates, {c.name: 0 for c in candidates}))
        case.checks.update(_events_check(ForcedOpen, (Event.SHORT_CIRCUITED,
                                                      Event.FALLBACK_SUCCESS)))
        case.rows = rows_from_timings(time_sync(candidates, plan.rounds, plan.fast_calls),
                                      base_name)
        case.checks['no work reached the pool'] = _pool_untouched('bench_open')
    finally:
        component.reset()
    return case


def _pool_untouched(group_key: str) -> bool:
    pool = component.pool(group_key)
    return pool.completed_count == 0 and pool.in_flight == 0


# -- 4. forced-open await queue() ------------------------------------------------------------

def case_open_queue(plan: Plan) -> CaseResult:
    """Forced-open ``await queue()`` -> fallback vs calling ``fallback()``: no thread, <= 5 µs."""
    base_name = 'C().fallback()'
    case = _new_case('open_queue', 'forced-open await queue() -> fallback', base_name,
                     Target('extra_us_max', 5.0, 'no thread, <= 5 us more'),
                     'each call timed; %d rounds x %d calls' % (plan.rounds, plan.fast_calls))
    _fresh_component([{'group_key': 'bench_open', 'max_workers': 1}])

    async def measure():
        fallback = lambda: ForcedOpen().fallback()   # noqa: E731
        candidates = [Candidate(base_name, BASELINE, fallback, 'called on the loop', awaits=False),
                      Candidate('Blackgate await queue()', BLACKGATE, lambda: ForcedOpen().queue())]
        candidates += _peer_candidates(peers.open_async(fallback),
                                       'open breaker; caller catches its error, calls fallback()')
        threads = threading.active_count()
        case.checks.update(await _check_async(candidates, {c.name: 0 for c in candidates}))
        timings = await time_async(candidates, plan.rounds, plan.fast_calls)
        case.checks['no thread started'] = threading.active_count() == threads
        return timings

    try:
        case.rows = rows_from_timings(run_async(measure), base_name)
        case.checks['no work reached the pool'] = _pool_untouched('bench_open')
    finally:
        component.reset()
    return case


# -- 5. async def run ------------------------------------------------------------------------

def case_async_run(plan: Plan) -> CaseResult:
    """An ``async def run`` command via ``await queue()`` vs bare ``await coro()``."""
    base_name = 'await coro()'
    case = _new_case('async_run', 'async def run command via await queue()', base_name,
                     Target('extra_us_max', 3.0, '<= 3 us more'),
                     'each call timed; %d rounds x %d calls' % (plan.rounds, plan.fast_calls))
    _fresh_component([])

    async def measure():
        candidates = [Candidate(base_name, BASELINE, coro),
                      Candidate('Blackgate await queue()', BLACKGATE, lambda: AsyncRun().queue())]
        candidates += _peer_candidates(peers.async_work(coro), 'breaker around await coro()')
        case.checks.update(await _check_async(candidates, {c.name: 1 for c in candidates}))
        return await time_async(candidates, plan.rounds, plan.fast_calls)

    try:
        case.checks.update(_events_check(AsyncRun, (Event.SUCCESS,)))
        case.rows = rows_from_timings(run_async(measure), base_name)
    finally:
        component.reset()
    return case


# -- 6 and 7. many concurrent calls ----------------------------------------------------------

def _gathered(make: Callable[[], Any], answers: List[int]):
    """``await batch(n)``: gather ``n`` calls of ``make()``; counts batches with a wrong answer."""
    async def batch(n):
        results = await asyncio.gather(*[make() for _ in range(n)])
        if results.count(1) != n:
            answers.append(n - results.count(1))
    return batch


def _batch_case(plan: Plan, case: CaseResult, cls: type, fn: Callable[[], Any],
                size: int, rounds: int, queue_size: int) -> CaseResult:
    _fresh_component([{'group_key': cls.group_key, 'max_workers': 10,
                       'max_queue_size': queue_size}])
    pool = _shared_executor(cls.group_key)
    wrong: Dict[str, List[int]] = {}

    async def measure():
        loop = IOLoop.current()
        makers = {case.baseline: (BASELINE, lambda: loop.run_in_executor(pool, fn), ''),
                  'Blackgate queue()': (BLACKGATE, lambda: cls().queue(), '')}
        note = 'gather(breaker around wait_for(run_in_executor(pool10, f), 60))'
        for name, call in peers.async_pool(pool, fn, timeout=60.0).items():
            makers[name] = (PEER, call, note)
        candidates = []
        for name, (role, make, note) in makers.items():
            wrong[name] = []
            candidates.append(Candidate(name, role, _gathered(make, wrong[name]), note))
        return await time_batches(candidates, rounds, size)

    try:
        case.rows = rows_from_timings(run_async(measure), case.baseline)
    finally:
        component.reset()
    for name, misses in wrong.items():
        case.checks['%s: every call answered by run()' % (name,)] = not misses
    return case


def case_crowd(plan: Plan) -> CaseResult:
    """10,000 concurrent ``queue()`` on a 10-worker pool vs bare ``gather(run_in_executor)``."""
    n = plan.crowd_size
    case = _new_case('crowd', '%s concurrent queue() on a 10-worker pool' % format(n, ','),
                     'gather(run_in_executor(pool10, f))', Target('ratio_max', 1.20, '<= 1.20x'),
                     'one gather of %d timed per round, / %d; %d rounds'
                     % (n, n, plan.crowd_rounds))
    case.notes.append('Blackgate pool: 10 workers, max_queue_size=%d (the default 0 would '
                      'reject all but 10); timeout armed at 60 s' % (n,))
    return _batch_case(plan, case, Crowd, trivial, n, plan.crowd_rounds, n)


def case_blocking(plan: Plan) -> CaseResult:
    """100 concurrent 2 ms blocking ``run()``s on 10 workers vs the same on a bare pool."""
    case = _new_case('blocking', '100 concurrent 2 ms blocking run()s on 10 workers',
                     'gather(run_in_executor(pool10, sleep 2 ms))',
                     Target('ratio_max', 1.05, '<= 1.05x'),
                     'one gather of 100 timed per round, / 100; %d rounds' % (plan.blocking_rounds,))
    case.notes.append('Blackgate pool: 10 workers, max_queue_size=100; timeout armed at 60 s')
    return _batch_case(plan, case, Blocking, blocking, 100, plan.blocking_rounds, 100)


#: key -> the function that runs the case, in the issue's order
CASES = {
    'execute': case_execute,
    'queue': case_queue,
    'open_execute': case_open_execute,
    'open_queue': case_open_queue,
    'async_run': case_async_run,
    'crowd': case_crowd,
    'blocking': case_blocking,
}
