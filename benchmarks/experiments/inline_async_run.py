"""Why ``queue()`` does not step an ``async def run()`` inline before Python 3.12.

    python -m benchmarks.experiments.inline_async_run

On Python 3.12+ ``queue()`` starts run()'s task eagerly: a run() that needs no
I/O is settled with no pass of the event loop. Before 3.12 a task always
waits for the loop, so the only way to the same speed is to step the
coroutine once on the caller's own stack, and hand it to a task only if it
suspends. This prototype does only that (none of the pipeline's bookkeeping),
and shows both sides: what the step itself costs, and what it breaks. During that first step ``asyncio.current_task()`` is the
*caller's* task, so an ``asyncio.timeout()`` (or a TaskGroup, or an anyio
cancel scope) that run() enters before it first suspends belongs to the
caller: when it expires, it cancels the caller, not run().
"""
import asyncio
import contextvars
import sys
import time

from blackgate import Command

from ..cases import AsyncRun, _fresh_component

CALLS = 50_000


class _Resumed:
    """Awaitable that goes on driving ``coroutine``, which already yielded ``yielded``."""

    def __init__(self, coroutine, yielded):
        self.coroutine, self.yielded = coroutine, yielded

    def __await__(self):
        coroutine, yielded = self.coroutine, self.yielded
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


def inline_queue(command):
    """What queue() would do for an admitted async run(): first step on the caller's stack."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    context = contextvars.copy_context()
    coroutine = command.run()
    try:
        yielded = context.run(coroutine.send, None)
    except StopIteration as stop:
        future.set_result(stop.value)
        return future
    except BaseException as exc:
        future.set_exception(exc)
        return future

    async def rest():
        try:
            value = await _Resumed(coroutine, yielded)
        except BaseException as exc:
            if not future.done():
                future.set_exception(exc)
        else:
            if not future.done():
                future.set_result(value)

    loop.create_task(rest(), context=context)
    return future


class OwnTimeout(Command):
    async def run(self):
        async with asyncio.timeout(0.01):
            await asyncio.Event().wait()

    def fallback(self):
        return 0


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


async def _caller_of(make) -> str:
    """What the caller of ``make()`` sees when run()'s own asyncio.timeout() expires."""
    async def caller():
        try:
            await make()
        except asyncio.CancelledError:
            return 'the CALLER was cancelled'
        except BaseException as exc:
            return 'run() failed with %s, the caller goes on' % (type(exc).__name__,)
        return 'the caller got the fallback'
    return await asyncio.wait_for(caller(), 5)


async def _main() -> None:
    base = await _best(coro)
    print('%-44s %6.2f us' % ('await coro()', base))
    for label, make in (('library: await AsyncRun().queue()', lambda: AsyncRun().queue()),
                        ('inline first step alone (no bookkeeping)',
                         lambda: inline_queue(AsyncRun()))):
        value = await _best(make)
        print('%-44s %6.2f us  (%+5.2f us over the baseline)' % (label, value, value - base))
    if sys.version_info >= (3, 11):
        print('run() enters asyncio.timeout(0.01 s), then waits:')
        print('  library:', await _caller_of(lambda: OwnTimeout().queue()))
        print('  inline: ', await _caller_of(lambda: inline_queue(OwnTimeout())))


def main() -> None:
    _fresh_component([])
    asyncio.run(_main())


if __name__ == '__main__':
    main()
