"""Helpers shared by several test modules: gates, threads, pools and command classes.

Plain functions and classes (the fixtures are in conftest.py). A module that
needs a helper imports it by name (``from support import Gate, in_thread``), so
that a reader sees where it comes from. Every wait here is bounded by ``WAIT``.
"""
import asyncio
import concurrent.futures
import threading

from blackgate import BadRequest, Command, component

#: Real seconds: the longest a helper waits for a thread or an Event before it gives up.
WAIT = 5.0


# -- gates and threads ---------------------------------------------------------------------

class Gate:
    """A point where run() or fallback() waits (at most WAIT) until the test opens it."""

    def __init__(self):
        self.entered = threading.Event()
        self.opened = threading.Event()

    def hold(self):
        self.entered.set()
        self.opened.wait(WAIT)

    def open(self):
        self.opened.set()

    def wait_entered(self):
        assert self.entered.wait(WAIT), 'nothing reached the gate'


def gate_maker(gate_class):
    """The body of a ``gates`` fixture: yields ``make()``; opens every gate made at teardown."""
    made = []

    def make():
        made.append(gate_class())
        return made[-1]

    yield make
    for gate in made:
        gate.open()


def in_thread(fn, *args):
    """Call ``fn(*args)`` on a daemon thread; a concurrent Future of its result."""
    future = concurrent.futures.Future()

    def target():
        try:
            future.set_result(fn(*args))
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=target, daemon=True).start()
    return future


def run_async(coroutine, timeout=WAIT):
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


def start(target):
    """Run ``target`` on a new thread; its return value lands in ``thread.results``."""
    thread = threading.Thread(target=lambda: thread.results.append(target()), daemon=True)
    thread.results = []
    thread.start()
    return thread


def finish(thread):
    thread.join(WAIT)
    assert not thread.is_alive()
    return thread.results


def held(release, entered=None, value='fresh'):
    """An outcome whose run() signals ``entered`` and waits for ``release`` (at most WAIT).

    Then it answers ``value``, or raises it if it is an exception.
    """
    def outcome():
        if entered is not None:
            entered.set()
        if not release.wait(WAIT):
            raise AssertionError('run() was never released')
        if isinstance(value, BaseException):
            raise value
        return value
    return outcome


# -- pools ---------------------------------------------------------------------------------

def add_pool(group_key, max_workers, max_queue_size=0):
    """Register the executor pool ``group_key``, install it and return it."""
    component.add('executor_pool', {'group_key': group_key, 'max_workers': max_workers,
                                    'max_queue_size': max_queue_size})
    component.install()
    return component.pool(group_key)


# -- command classes -----------------------------------------------------------------------
# The command key of each is its class name (or the key it names), as if the
# test module had defined it.

class FailsOnDemand(Command):
    """``FailsOnDemand(fail)``: run() raises ConnectionError if ``fail``, else answers 'fresh'.

    fallback() answers 'stale'. Subclasses set the breaker's thresholds.
    """

    def __init__(self, fail):
        self.fail = fail

    def run(self):
        if self.fail:
            raise ConnectionError('upstream down')
        return 'fresh'

    def fallback(self):
        return 'stale'


class Held(Command):
    """run() waits at its gate, then answers 'late'; fallback() answers 'stale'."""

    def __init__(self, gate):
        self.gate = gate
        self.ran = threading.Event()

    def run(self):
        self.ran.set()
        self.gate.hold()
        return 'late'

    def fallback(self):
        return 'stale'


class HeldNoFallback(Command):
    def __init__(self, gate):
        self.gate = gate

    def run(self):
        self.gate.hold()
        return 'late'


class ForcedOpenNoFallback(Command):
    circuit_breaker_force_open = True

    def run(self):
        return 'fresh'


class Tiny(Command):
    """Runs on the one-worker pool 'tiny'; held at its gate if it has one."""

    group_key = 'tiny'
    timeout_enabled = False

    def __init__(self, gate=None):
        self.gate = gate

    def run(self):
        if self.gate is not None:
            self.gate.hold()
        return 'fresh'

    def fallback(self):
        return 'stale'


class TinyNoFallback(Command):
    group_key = 'tiny'

    def run(self):
        return 'fresh'


class Lookup(Command):
    """Takes exactly ``seconds`` of FakeClock time; fails or rejects on demand."""

    group_key = 'lookups'
    command_key = 'lookup'

    def __init__(self, clock, seconds=0.02, fail=False, bad=False):
        self.clock, self.seconds, self.fail, self.bad = clock, seconds, fail, bad

    def run(self):
        self.clock.advance(self.seconds)
        if self.bad:
            raise BadRequest('no such id')
        if self.fail:
            raise ConnectionError('upstream down')
        return 'fresh'

    def fallback(self):
        return 'stale'
