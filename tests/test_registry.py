"""The registry (docs/api.rst, Component; listeners, the clock): every ``component`` method."""
import asyncio
import http.server
import logging
import threading

import pytest
import requests

from blackgate import (BlackgateError, BreakerState, Command, CommandError, Component,
                       ConfigError, Event, PoolNotRegistered, component)
from blackgate.clock import SystemClock
from blackgate.testing import FakeClock
from support import FailsOnDemand, in_thread

WAIT = 5.0   # seconds: the bound on every wait between threads


class Echo(Command):
    """Answers the name of the worker thread it ran on."""

    def run(self):
        return threading.current_thread().name

    def fallback(self):
        return 'fallback'


def command_in(group_key, name='InGroup'):
    return type(name, (Echo,), {'group_key': group_key})


class Flaky(FailsOnDemand):
    """Fails on demand (``Flaky(fail=True)``); trips at one request."""

    circuit_breaker_request_volume_threshold = 1
    metrics_health_snapshot_interval = 0


def blackgate_threads():
    return [t.name for t in threading.enumerate() if t.name.startswith('blackgate-')]


class Recorder:
    def __init__(self):
        self.calls = []

    def on_event(self, command_key, event):
        self.calls.append(('event', command_key, event))

    def on_state_change(self, command_key, old, new):
        self.calls.append(('state', command_key, old, new))


@pytest.fixture
def gate():
    """An Event that held run()s wait on; set at teardown so no worker stays blocked."""
    event = threading.Event()
    yield event
    event.set()


# -- set / add / delete -----------------------------------------------------------------

def test_set_command_defaults_reaches_every_command():
    component.set('command_defaults', {'fallback_enabled': False})
    component.install()
    command = Flaky(fail=True)
    with pytest.raises(CommandError):
        command.execute()
    assert command.events == (Event.FAILURE, Event.FALLBACK_MISSING)


@pytest.mark.parametrize('key, hint', [
    ('executor_pool', "component.add('executor_pool'"),
    ('command', "component.add('command'"),
    ('commands_defaults', "'command_defaults'"),
])
def test_set_refuses_keys_other_than_command_defaults(key, hint):
    with pytest.raises(ConfigError) as caught:
        component.set(key, {})
    message = str(caught.value)
    assert repr(key) in message
    assert hint in message


@pytest.mark.parametrize('key, hint', [
    ('command_defaults', "component.set('command_defaults'"),
    ('executor_pools', "'executor_pool', 'command'"),
])
def test_add_refuses_keys_other_than_executor_pool_and_command(key, hint):
    with pytest.raises(ConfigError) as caught:
        component.add(key, {'group_key': 'g'})
    message = str(caught.value)
    assert repr(key) in message
    assert hint in message


def test_add_command_overrides_the_class_at_install():
    component.add('command', {'command_key': 'Flaky', 'fallback_enabled': False})
    component.install()
    with pytest.raises(CommandError):
        Flaky(fail=True).execute()


def test_add_executor_pool_then_install_runs_commands_on_it():
    component.add('executor_pool', {'group_key': 'service.session', 'max_workers': 3,
                                    'max_queue_size': 4})
    component.install()
    pool = component.pool('service.session')
    assert (pool.group_key, pool.max_workers, pool.max_queue_size) == ('service.session', 3, 4)
    assert command_in('service.session')().execute().startswith('blackgate-service.session')


def test_executor_pool_has_ten_workers_and_no_queue_by_default():
    component.add('executor_pool', {'group_key': 'g'})
    component.install()
    assert (component.pool('g').max_workers, component.pool('g').max_queue_size) == (10, 0)


def test_executor_pool_without_group_key_is_refused():
    with pytest.raises(ConfigError) as caught:
        component.add('executor_pool', {'max_workers': 3})
    assert 'group_key' in str(caught.value)


@pytest.mark.parametrize('value, key', [
    ({'group_key': 'g', 'max_workers': 0}, 'max_workers=0'),
    ({'group_key': 'g', 'max_workers': 2.0}, 'max_workers=2.0'),
    ({'group_key': 'g', 'max_queue_size': -1}, 'max_queue_size=-1'),
    ({'group_key': '', 'max_workers': 2}, "group_key=''"),
])
def test_executor_pool_with_an_impossible_value_is_refused(value, key):
    with pytest.raises(ConfigError) as caught:
        component.add('executor_pool', value)
    assert key in str(caught.value)


def test_delete_command_defaults_forgets_them_at_install():
    component.set('command_defaults', {'fallback_enabled': False})
    component.delete('command_defaults')
    component.install()
    assert Flaky(fail=True).execute() == 'stale'


def test_delete_of_a_key_never_set_is_a_no_op():
    component.delete('command_defaults')
    component.install()
    assert Flaky(fail=False).execute() == 'fresh'


# -- install ----------------------------------------------------------------------------

def test_install_is_idempotent():
    component.add('executor_pool', {'group_key': 'g', 'max_workers': 2})
    component.install()
    pool = component.pool('g')
    default = component.pool('default')
    component.install()
    component.install()
    assert component.pool('g') is pool
    assert component.pool('default') is default
    assert command_in('g')().execute().startswith('blackgate-g')


def test_second_install_after_a_new_add_installs_the_new_pool():
    component.add('executor_pool', {'group_key': 'first'})
    component.install()
    first = component.pool('first')
    component.add('executor_pool', {'group_key': 'second', 'max_workers': 2})
    component.install()
    assert component.pool('first') is first
    assert component.pool('second').max_workers == 2
    assert command_in('second')().execute().startswith('blackgate-second')


def test_re_adding_a_pool_with_new_settings_replaces_it_at_install():
    component.add('executor_pool', {'group_key': 'g', 'max_workers': 2})
    component.install()
    component.add('executor_pool', {'group_key': 'g', 'max_workers': 5})
    assert component.pool('g').max_workers == 2
    component.install()
    assert component.pool('g').max_workers == 5


def test_default_pool_exists_without_any_configuration():
    pool = component.pool('default')
    assert (pool.max_workers, pool.max_queue_size) == (10, 0)
    assert Echo().execute().startswith('blackgate-default')


def test_default_pool_can_be_configured_like_any_other():
    component.add('executor_pool', {'group_key': 'default', 'max_workers': 3})
    component.install()
    assert component.pool('default').max_workers == 3


# -- shutdown ---------------------------------------------------------------------------

def test_shutdown_waits_for_running_work(gate):
    started, finished = threading.Event(), threading.Event()

    class Held(Command):
        def run(self):
            started.set()
            gate.wait(WAIT)
            finished.set()
            return 'done'

    result = in_thread(Held().execute)
    assert started.wait(WAIT)
    threading.Timer(0.05, gate.set).start()
    component.shutdown()
    assert finished.is_set()
    assert result.result(WAIT) == 'done'


def test_shutdown_leaves_no_blackgate_thread_alive():
    component.add('executor_pool', {'group_key': 'g', 'max_workers': 3})
    component.install()
    Echo().execute()
    command_in('g')().execute()
    assert blackgate_threads()
    component.shutdown()
    assert blackgate_threads() == []


@pytest.mark.parametrize('group_key', ['default', 'g'])
def test_command_after_shutdown_is_rejected_to_its_fallback(group_key):
    component.add('executor_pool', {'group_key': 'g'})
    component.install()
    command_in(group_key)().execute()
    component.shutdown()
    command = command_in(group_key)()
    assert command.execute() == 'fallback'
    assert command.events == (Event.THREAD_POOL_REJECTED, Event.FALLBACK_SUCCESS)
    assert command.is_response_rejected is True


def test_install_after_shutdown_starts_an_added_pool_again():
    component.add('executor_pool', {'group_key': 'g'})
    component.install()
    component.shutdown()
    component.install()
    command = command_in('g')()
    assert command.execute().startswith('blackgate-g')
    assert command.events == (Event.SUCCESS,)


def test_install_after_shutdown_starts_the_default_pool_again():
    Echo().execute()
    component.shutdown()
    component.install()
    command = Echo()
    assert command.execute().startswith('blackgate-default')
    assert command.events == (Event.SUCCESS,)


# -- reset ------------------------------------------------------------------------------

def test_reset_forgets_pools():
    component.add('executor_pool', {'group_key': 'g'})
    component.install()
    component.reset()
    with pytest.raises(PoolNotRegistered):
        component.pool('g')


def test_reset_forgets_command_defaults_and_overrides():
    component.set('command_defaults', {'timeout': 2.0})
    component.add('command', {'command_key': 'Flaky', 'circuit_breaker_sleep_window': 9.0})
    component.install()
    Flaky(fail=False).execute()
    component.reset()
    Flaky(fail=False).execute()
    settings = component.circuit_breaker('Flaky').settings
    assert (settings.timeout, settings.circuit_breaker_sleep_window) == (1.0, 5.0)


def test_reset_forgets_breakers_and_metrics():
    Flaky(fail=True).execute()
    old_breaker, old_metrics = component.circuit_breaker('Flaky'), component.metrics('Flaky')
    assert old_breaker.state is BreakerState.OPEN
    component.reset()
    assert component.circuit_breaker('Flaky') is not old_breaker
    assert component.metrics('Flaky') is not old_metrics
    assert Flaky(fail=False).execute() == 'fresh'     # a new, closed breaker
    assert component.circuit_breaker('Flaky').state is BreakerState.CLOSED
    assert component.metrics('Flaky').rolling_count(Event.FAILURE) == 0


def test_reset_forgets_listeners():
    recorder = Recorder()
    component.add_listener(recorder)
    component.reset()
    Flaky(fail=True).execute()
    assert recorder.calls == []


def test_reset_calls_on_reset_of_each_listener_once_it_is_forgotten():
    told = []

    class Exporter:
        def on_reset(self):
            told.append(component_has_listener())

    def component_has_listener():
        Flaky(fail=True).execute()      # would reach a listener still registered
        return recorder.calls

    recorder = Recorder()
    component.add_listener(Exporter())  # a listener with on_reset() alone is accepted
    component.add_listener(recorder)
    component.reset()
    assert told == [[]]


def test_reset_puts_a_system_clock_back(clock):
    component.reset()
    assert component.clock is not clock
    assert isinstance(component.clock, SystemClock)


def test_reset_keeps_the_default_pool_available():
    component.reset()
    assert Echo().execute().startswith('blackgate-default')


# -- circuit_breaker / metrics ----------------------------------------------------------

def test_circuit_breaker_is_the_breaker_of_that_command_key():
    Flaky(fail=True).execute()
    breaker = component.circuit_breaker('Flaky')
    assert breaker.state is BreakerState.OPEN
    assert breaker.is_open() is True
    breaker.reset()
    assert breaker.state is BreakerState.CLOSED
    assert Flaky(fail=False).execute() == 'fresh'


def test_circuit_breaker_is_the_same_object_for_every_lookup():
    Flaky(fail=False).execute()
    assert component.circuit_breaker('Flaky') is component.circuit_breaker('Flaky')


def test_metrics_count_the_executions_of_that_command_key():
    Flaky(fail=False).execute()
    Flaky(fail=True).execute()
    metrics = component.metrics('Flaky')
    assert metrics.rolling_count(Event.SUCCESS) == 1
    assert metrics.rolling_count(Event.FAILURE) == 1
    assert metrics.rolling_count(Event.FALLBACK_SUCCESS) == 1
    assert metrics.health().total_requests == 2


def test_breaker_of_a_key_that_never_ran_is_closed_with_the_configured_settings():
    component.add('command', {'command_key': 'later', 'circuit_breaker_sleep_window': 8.0})
    component.install()
    breaker = component.circuit_breaker('later')
    assert breaker.state is BreakerState.CLOSED
    assert breaker.is_open() is False
    assert breaker.settings.circuit_breaker_sleep_window == 8.0


def test_metrics_of_a_key_that_never_ran_are_empty():
    metrics = component.metrics('later')
    assert metrics.rolling_count(Event.SUCCESS) == 0
    assert metrics.health().total_requests == 0


def test_breaker_looked_up_before_the_first_run_is_the_one_the_command_then_uses():
    breaker = component.circuit_breaker('Flaky')
    Flaky(fail=True).execute()              # the class's volume threshold of 1 applies
    assert breaker.state is BreakerState.OPEN
    assert component.circuit_breaker('Flaky') is breaker


def test_metrics_looked_up_before_the_first_run_count_that_run():
    metrics = component.metrics('Echo')
    Echo().execute()
    assert metrics.rolling_count(Event.SUCCESS) == 1


def test_metrics_looked_up_before_the_first_run_count_it_whatever_the_class_settings():
    metrics = component.metrics('Flaky')    # Flaky sets metrics_health_snapshot_interval = 0
    Flaky(fail=True).execute()
    assert metrics.rolling_count(Event.FAILURE) == 1


@pytest.mark.parametrize('lookup', ['circuit_breaker', 'metrics'])
@pytest.mark.parametrize('command_key', ['', 42, None])
def test_lookup_with_an_invalid_command_key_is_refused(lookup, command_key):
    with pytest.raises(BlackgateError) as caught:
        getattr(component, lookup)(command_key)
    assert repr(command_key) in str(caught.value)


# -- listeners --------------------------------------------------------------------------

def test_listener_receives_each_event_of_each_execution_in_order():
    recorder = Recorder()
    component.add_listener(recorder)

    class Steady(Flaky):
        circuit_breaker_enabled = False

    Steady(fail=False).execute()
    Steady(fail=True).execute()
    assert recorder.calls == [
        ('event', 'Steady', Event.SUCCESS),
        ('event', 'Steady', Event.FAILURE),
        ('event', 'Steady', Event.FALLBACK_SUCCESS),
    ]


def test_listener_receives_breaker_state_changes():
    recorder = Recorder()
    component.add_listener(recorder)
    Flaky(fail=True).execute()
    assert ('state', 'Flaky', BreakerState.CLOSED, BreakerState.OPEN) in recorder.calls


def test_listener_also_hears_queue_executions():
    recorder = Recorder()
    component.add_listener(recorder)

    async def scenario():
        return await Flaky(fail=False).queue()

    assert asyncio.run(asyncio.wait_for(scenario(), WAIT)) == 'fresh'
    assert recorder.calls == [('event', 'Flaky', Event.SUCCESS)]


def test_every_listener_is_called():
    first, second = Recorder(), Recorder()
    component.add_listener(first)
    component.add_listener(second)
    Flaky(fail=False).execute()
    assert first.calls == second.calls == [('event', 'Flaky', Event.SUCCESS)]


def test_listener_with_only_on_state_change_is_accepted():
    changes = []

    class StateOnly:
        def on_state_change(self, command_key, old, new):
            changes.append((old, new))

    component.add_listener(StateOnly())
    Flaky(fail=True).execute()
    assert changes == [(BreakerState.CLOSED, BreakerState.OPEN)]


def test_removed_listener_hears_nothing_more():
    recorder = Recorder()
    component.add_listener(recorder)
    Flaky(fail=False).execute()
    component.remove_listener(recorder)
    Flaky(fail=False).execute()
    assert recorder.calls == [('event', 'Flaky', Event.SUCCESS)]


def test_removing_a_listener_never_added_is_a_no_op():
    component.remove_listener(Recorder())
    assert Flaky(fail=False).execute() == 'fresh'


@pytest.mark.parametrize('listener', [object(), 42, 'on_event',
                                      type('NotCallable', (), {'on_event': 1})()])
def test_listener_without_either_method_is_refused(listener):
    with pytest.raises(TypeError) as caught:
        component.add_listener(listener)
    assert 'on_event' in str(caught.value)


def test_raising_listener_is_logged_and_ignored(caplog):
    class Broken:
        def on_event(self, command_key, event):
            raise RuntimeError('listener bug')

        def on_state_change(self, command_key, old, new):
            raise RuntimeError('listener bug')

    recorder = Recorder()
    component.add_listener(Broken())
    component.add_listener(recorder)
    with caplog.at_level(logging.ERROR, logger='blackgate'):
        assert Flaky(fail=False).execute() == 'fresh'
        assert Flaky(fail=True).execute() == 'stale'
    assert recorder.calls[0] == ('event', 'Flaky', Event.SUCCESS)
    assert len(recorder.calls) == 4      # 3 events and the breaker opening
    broken = [r for r in caplog.records if r.name == 'blackgate' and r.exc_info
              and isinstance(r.exc_info[1], RuntimeError)]
    assert len(broken) == 4


# -- clock ------------------------------------------------------------------------------

def test_clock_can_be_replaced_and_read_back():
    replacement = FakeClock(start=50.0)
    component.clock = replacement
    assert component.clock is replacement


def test_replaced_clock_drives_breakers_that_already_exist(clock):
    Flaky(fail=True).execute()                           # opened at 1000.0
    replacement = component.clock = FakeClock(start=1000.0)
    clock.advance(60.0)                                  # the old clock no longer counts
    assert Flaky(fail=False).execute() == 'stale'
    replacement.advance(5.0)
    assert Flaky(fail=False).execute() == 'fresh'


@pytest.mark.parametrize('not_a_clock', [object(), 1000.0, SystemClock.monotonic,
                                         type('HalfClock', (), {'monotonic': lambda self: 0.0,
                                                                'wall': lambda self: 0.0})()])
def test_clock_without_the_clock_methods_is_refused(clock, not_a_clock):
    with pytest.raises(ConfigError) as caught:
        component.clock = not_a_clock
    assert 'component.clock' in str(caught.value)
    assert component.clock is clock


# -- session ----------------------------------------------------------------------------

class _SetsCookie(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = (self.headers.get('Cookie') or '-').encode()
        self.send_response(200)
        self.send_header('Set-Cookie', 'session=abc; Path=/')
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def cookie_server():
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _SetsCookie)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield 'http://127.0.0.1:%d/' % (server.server_address[1],)
    server.shutdown()
    server.server_close()
    thread.join(WAIT)


def test_session_is_one_shared_requests_session():
    session = component.session
    assert isinstance(session, requests.Session)
    assert component.session is session


def test_session_takes_no_settings_from_the_environment():
    assert component.session.trust_env is False


def test_session_stores_no_cookies(cookie_server):
    session = component.session
    first = session.get(cookie_server, timeout=WAIT)
    assert first.headers['Set-Cookie'].startswith('session=abc')
    second = session.get(cookie_server, timeout=WAIT)
    assert second.text == '-'           # the cookie was not sent back
    assert len(session.cookies) == 0


def test_reset_gives_a_new_session():
    session = component.session
    component.reset()
    assert component.session is not session


# -- pool -------------------------------------------------------------------------------

def test_pool_is_the_pool_of_that_group_key():
    component.add('executor_pool', {'group_key': 'a', 'max_workers': 1})
    component.add('executor_pool', {'group_key': 'b', 'max_workers': 2})
    component.install()
    assert component.pool('a').group_key == 'a'
    assert component.pool('b').max_workers == 2
    command_in('b')().execute()
    assert (component.pool('a').completed_count, component.pool('b').completed_count) == (0, 1)


def test_pool_of_an_unknown_group_key_raises_pool_not_registered():
    with pytest.raises(PoolNotRegistered) as caught:
        component.pool('nope')
    assert "'nope'" in str(caught.value)


# -- PoolNotRegistered ------------------------------------------------------------------

def test_command_in_an_unregistered_group_raises_pool_not_registered_from_execute():
    component.add('executor_pool', {'group_key': 'service.session'})
    component.install()
    with pytest.raises(PoolNotRegistered) as caught:
        command_in('service.sesion')().execute()
    message = str(caught.value)
    assert "'service.sesion'" in message
    assert "'default'" in message and "'service.session'" in message
    assert "component.add('executor_pool', {'group_key': 'service.sesion'})" in message
    assert 'component.install()' in message


def test_command_in_an_unregistered_group_raises_pool_not_registered_from_queue():
    async def scenario():
        return await command_in('missing')().queue()

    with pytest.raises(PoolNotRegistered) as caught:
        asyncio.run(asyncio.wait_for(scenario(), WAIT))
    assert "'missing'" in str(caught.value)


def test_pool_added_but_not_installed_says_to_call_install():
    component.add('executor_pool', {'group_key': 'later'})
    with pytest.raises(PoolNotRegistered) as caught:
        command_in('later')().execute()
    message = str(caught.value)
    assert "'later'" in message
    assert 'component.install()' in message


def test_pool_not_registered_is_a_key_error_and_a_blackgate_error():
    with pytest.raises(KeyError) as caught:
        command_in('missing')().execute()
    assert isinstance(caught.value, BlackgateError)


def test_pool_not_registered_reads_as_its_message_not_a_quoted_repr():
    with pytest.raises(PoolNotRegistered) as caught:
        command_in('missing')().execute()
    text = str(caught.value)
    assert text.startswith('no executor pool')
    assert text == caught.value.args[0]


def test_pool_registered_after_the_error_lets_the_command_run():
    with pytest.raises(PoolNotRegistered):
        command_in('late')().execute()
    component.add('executor_pool', {'group_key': 'late'})
    component.install()
    assert command_in('late')().execute().startswith('blackgate-late')


# -- a separate Component ---------------------------------------------------------------

@pytest.fixture
def other():
    registry = Component()
    yield registry
    registry.reset()


def test_separate_component_keeps_its_own_pools(other):
    other.add('executor_pool', {'group_key': 'isolated', 'max_workers': 2})
    other.install()
    assert other.pool('isolated').max_workers == 2
    with pytest.raises(PoolNotRegistered):
        component.pool('isolated')
    with pytest.raises(PoolNotRegistered):
        command_in('isolated')().execute()


def test_separate_component_keeps_its_own_command_defaults(other):
    other.set('command_defaults', {'fallback_enabled': False})
    other.add('command', {'command_key': 'Flaky', 'circuit_breaker_force_open': True})
    other.install()
    assert Flaky(fail=True).execute() == 'stale'
    assert component.circuit_breaker('Flaky').settings.circuit_breaker_force_open is False


def test_separate_component_has_its_own_clock_and_listeners(other, clock):
    recorder = Recorder()
    other.add_listener(recorder)
    other.clock = FakeClock(start=5.0)
    Flaky(fail=False).execute()
    assert recorder.calls == []
    assert component.clock is clock


def test_global_reset_leaves_a_separate_component_alone(other):
    other.add('executor_pool', {'group_key': 'isolated'})
    other.install()
    component.reset()
    assert other.pool('isolated').group_key == 'isolated'


def test_command_classes_are_those_that_ran_with_their_keys():
    class Plain(Command):
        def run(self):
            return 1

    class Renamed(Command):
        command_key = 'renamed'

        async def run(self):
            return 2

    assert component.command_classes == {}
    assert Plain().execute() == 1
    async def queued():
        return await Renamed().queue()

    assert asyncio.run(queued()) == 2
    assert component.command_classes == {Plain: 'Plain', Renamed: 'renamed'}
    component.reset()
    assert component.command_classes == {}
