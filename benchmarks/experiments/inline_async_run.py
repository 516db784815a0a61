"""Start an ``async def run()`` inline and settle at once if it finishes without suspending.

    python -m benchmarks.experiments.inline_async_run

What Python 3.12's eager tasks do, for every version: ``queue()`` steps the
coroutine once itself. If it returns, the outcome is recorded and the future
resolved there and then: no Task, no timer, no pass of the event loop. If it
suspends, a Task carries it on from where it stopped (``_Resumed``) and the
timer is armed, as today.
"""
import asyncio
import time

from blackgate import Event
from blackgate import command as C

from ..cases import AsyncRun, _fresh_component

CALLS = 50_000


def _drive(coroutine, yielded):
    """Go on driving ``coroutine``, which already yielded ``yielded``."""
    while True:
        try:
            value = yield yielded
        except BaseException as exc:
            try:
                yielded = coroutine.throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                yielded = coroutine.send(value)
            except StopIteration as stop:
                return stop.value


class _Resumed:
    def __init__(self, coroutine, yielded):
        self.coroutine, self.yielded = coroutine, yielded

    def __await__(self):
        return _drive(self.coroutine, self.yielded)


async def _resume(coroutine, yielded):
    return await _Resumed(coroutine, yielded)


class Inline(AsyncRun):
    command_key = AsyncRun.command_key

    def queue(self):
        loop = C._get_running_loop()
        self._bg_claim()
        self._bg_rt = rt = C._runtime(AsyncRun)
        self._bg_loop = loop
        self._bg_future = future = loop.create_future()
        self._bg_start = rt.clock.monotonic()
        self._bg_token = rt.breaker.allow_request()
        permits = rt.state.run_permits
        if not permits.try_acquire():
            raise RuntimeError('the prototype covers the admitted path only')
        rt.metrics.execution_started()
        self._bg_run_started = started = rt.clock.monotonic()
        coroutine = self.run()
        try:
            yielded = coroutine.send(None)
        except StopIteration as stop:          # finished without suspending
            permits.release()
            rt.metrics.execution_finished()
            self._bg_decided = True
            self._bg_settle_async(rt, stop.value, None, rt.clock.monotonic() - started)
            return future
        task = loop.create_task(_resume(coroutine, yielded))
        self._bg_task = task
        task.add_done_callback(self._bg_task_done)
        if rt.timeout is not None:
            self._bg_timer = rt.clock.call_later(loop, rt.timeout, self._bg_timed_out)
        return future


class InlineSuspending(Inline):
    async def run(self):
        await asyncio.sleep(0)
        return 1


class Suspending(AsyncRun):
    async def run(self):
        await asyncio.sleep(0)
        return 1


async def coro():
    return 1


async def _best(make) -> float:
    best = None
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(CALLS):
            await make()
        elapsed = (time.perf_counter() - start) / CALLS
        best = elapsed if best is None else min(best, elapsed)
    return best * 1e6


async def _main() -> None:
    for cls in (Inline, InlineSuspending):
        command = cls()
        assert await command.queue() == 1 and command.events == (Event.SUCCESS,)
    base = await _best(coro)
    print('%-44s %6.2f us' % ('await coro()', base))
    for label, make in (('library today: await AsyncRun().queue()', lambda: AsyncRun().queue()),
                        ('prototype: await Inline().queue()', lambda: Inline().queue()),
                        ('suspending run(), library today', lambda: Suspending().queue()),
                        ('suspending run(), prototype', lambda: InlineSuspending().queue())):
        value = await _best(make)
        print('%-44s %6.2f us  (%+5.2f us over the baseline)' % (label, value, value - base))


def main() -> None:
    _fresh_component([])
    asyncio.run(_main())


if __name__ == '__main__':
    main()
