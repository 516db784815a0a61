"""Command configuration (docs/configuration.rst): defaults, precedence and ConfigError."""
import asyncio
import itertools
import math
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blackgate import (BlackgateError, BreakerState, Command, CommandError, ConfigError, Event,
                       FailureType, component)
from blackgate.testing import FakeClock
from support import FailsOnDemand, in_thread, run_async

BUILT_INS = {
    'group_key': 'default',
    'timeout': 1.0,
    'timeout_enabled': True,
    'fallback_enabled': True,
    'circuit_breaker_enabled': True,
    'circuit_breaker_request_volume_threshold': 20,
    'circuit_breaker_error_threshold_percentage': 50,
    'circuit_breaker_sleep_window': 5.0,
    'circuit_breaker_force_open': False,
    'circuit_breaker_force_closed': False,
    'metrics_rolling_window': 10.0,
    'metrics_rolling_buckets': 10,
    'metrics_health_snapshot_interval': 0.5,
    'max_concurrent_requests': 10,
    'fallback_max_concurrent_requests': 10,
}
KEYS = tuple(BUILT_INS)
WAIT = 5.0   # seconds: the bound on every wait between threads


def make_command(name='Probe', base=Command, **attributes):
    """A command class whose run() answers 'ran' and whose fallback() answers 'fallback'."""
    namespace = {'run': lambda self: 'ran', 'fallback': lambda self: 'fallback'}
    namespace.update(attributes)
    return type(name, (base,), namespace)


def settings_of(cls):
    """Run ``cls`` once and return the settings its command key resolved to."""
    try:
        cls().execute()
    except CommandError:    # e.g. forced open with fallback_max_concurrent_requests = 0
        pass
    return component.circuit_breaker(cls.command_key).settings


@pytest.fixture
def waiting_clock(clock):
    """The FakeClock, named for the tests that wait until execute() blocks on it."""
    return clock


@pytest.fixture
def gate():
    """An Event that held run()s wait on; set at teardown so no worker stays blocked."""
    event = threading.Event()
    yield event
    event.set()


@pytest.fixture
def pools():
    """Pools for the group keys that the tables below use."""
    for group_key in ('g1', 'g2', 'g3', 'g4'):
        component.add('executor_pool', {'group_key': group_key, 'max_workers': 1})
    component.install()


# -- built-in defaults ------------------------------------------------------------------

@pytest.mark.parametrize('key', KEYS)
def test_unset_key_resolves_to_its_built_in_default(key):
    assert getattr(settings_of(make_command()), key) == BUILT_INS[key]


def test_command_key_defaults_to_the_class_name():
    class GetCurrentUser(Command):
        def run(self):
            return 'ran'

    assert GetCurrentUser().execute() == 'ran'
    assert component.metrics('GetCurrentUser').rolling_count(Event.SUCCESS) == 1
    assert component.circuit_breaker('GetCurrentUser').settings.command_key == 'GetCurrentUser'


def test_subclass_without_command_key_gets_its_own_class_name():
    class Parent(Command):
        def run(self):
            return 'ran'

    class Child(Parent):
        pass

    Parent().execute()
    Child().execute()
    assert component.metrics('Parent').rolling_count(Event.SUCCESS) == 1
    assert component.metrics('Child').rolling_count(Event.SUCCESS) == 1


def test_subclass_inherits_a_command_key_set_on_its_parent():
    class Parent(Command):
        command_key = 'get_user'

        def run(self):
            return 'ran'

    class Child(Parent):
        pass

    Parent().execute()
    Child().execute()
    assert component.metrics('get_user').rolling_count(Event.SUCCESS) == 2


def test_group_key_defaults_to_the_default_pool():
    class WhereAmI(Command):
        def run(self):
            return threading.current_thread().name

    assert WhereAmI().execute().startswith('blackgate-default')
    assert component.pool('default').completed_count == 1


@pytest.mark.parametrize('advance, timed_out', [(0.9, False), (1.0, True)])
def test_default_timeout_of_execute_is_one_second(waiting_clock, gate, advance, timed_out):
    command = make_command(run=lambda self: gate.wait(WAIT) and 'ran')()
    result = in_thread(command.execute)
    assert waiting_clock.wait_for_waiters(1, WAIT)
    waiting_clock.advance(advance)
    if timed_out:
        assert result.result(WAIT) == 'fallback'     # while run() is still held
    gate.set()
    assert result.result(WAIT) == ('fallback' if timed_out else 'ran')
    assert command.is_response_timed_out is timed_out


@pytest.mark.parametrize('advance, timed_out', [(0.9, False), (1.0, True)])
def test_default_timeout_of_queue_is_one_second(clock, gate, advance, timed_out):
    command = make_command(run=lambda self: gate.wait(WAIT) and 'ran')()

    async def scenario():
        future = command.queue()
        clock.advance(advance)
        await asyncio.sleep(0)      # let a due timer fire
        await asyncio.sleep(0)
        assert future.done() is timed_out
        gate.set()
        return await future

    assert run_async(scenario()) == ('fallback' if timed_out else 'ran')
    assert command.is_response_timed_out is timed_out


@pytest.mark.parametrize('timeout_enabled, events', [
    (True, (Event.TIMEOUT, Event.FALLBACK_SUCCESS)),
    (False, (Event.SUCCESS,)),
])
def test_timeout_enabled_decides_whether_the_timeout_fires(clock, gate, timeout_enabled, events):
    command = make_command(timeout_enabled=timeout_enabled,
                           run=lambda self: gate.wait(WAIT) and 'ran')()

    async def scenario():
        future = command.queue()
        clock.advance(100.0)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        gate.set()
        return await future

    run_async(scenario())
    assert command.events == events


def failing_command(**attributes):
    def run(self):
        raise ConnectionError('upstream down')
    return make_command('Failing', run=run, **attributes)


def test_fallback_is_enabled_by_default():
    command = failing_command()()
    assert command.execute() == 'fallback'
    assert command.events == (Event.FAILURE, Event.FALLBACK_SUCCESS)


def test_fallback_enabled_false_skips_the_fallback():
    command = failing_command(fallback_enabled=False)()
    with pytest.raises(CommandError):
        command.execute()
    assert command.events == (Event.FAILURE, Event.FALLBACK_MISSING)


@pytest.mark.parametrize('requests, state', [(19, BreakerState.CLOSED), (20, BreakerState.OPEN)])
def test_default_request_volume_threshold_is_twenty(requests, state):
    cls = failing_command(metrics_health_snapshot_interval=0)
    for _ in range(requests):
        cls().execute()
    assert component.circuit_breaker('Failing').state is state


@pytest.mark.parametrize('failures, state', [
    (9, BreakerState.CLOSED),     # 45 %
    (10, BreakerState.OPEN),      # 50 %: at the threshold trips
    (11, BreakerState.OPEN),
])
def test_default_error_threshold_is_fifty_percent(failures, state):
    class Mixed(FailsOnDemand):
        metrics_health_snapshot_interval = 0

    # Only the 20th completion reaches the default volume threshold.
    for fail in [False] * (20 - failures) + [True] * failures:
        Mixed(fail).execute()
    assert component.circuit_breaker('Mixed').state is state


def test_circuit_breaker_is_enabled_by_default():
    cls = failing_command(circuit_breaker_request_volume_threshold=1,
                          metrics_health_snapshot_interval=0)
    cls().execute()
    command = cls()
    assert command.execute() == 'fallback'
    assert command.events == (Event.SHORT_CIRCUITED, Event.FALLBACK_SUCCESS)


def test_circuit_breaker_is_not_forced_by_default():
    cls = make_command()
    assert cls().execute() == 'ran'            # not forced open
    breaker = component.circuit_breaker('Probe')
    assert breaker.state is BreakerState.CLOSED
    assert breaker.is_open() is False


@pytest.mark.parametrize('advance, events', [
    (4.9, (Event.SHORT_CIRCUITED, Event.FALLBACK_SUCCESS)),
    (5.0, (Event.SUCCESS,)),
])
def test_default_sleep_window_is_five_seconds(clock, advance, events):
    class Flaky(FailsOnDemand):
        circuit_breaker_request_volume_threshold = 1
        metrics_health_snapshot_interval = 0

    Flaky(fail=True).execute()
    assert component.circuit_breaker('Flaky').state is BreakerState.OPEN
    clock.advance(advance)
    trial = Flaky(fail=False)
    trial.execute()
    assert trial.events == events


@pytest.mark.parametrize('advance, count', [
    (9.4, 1),     # 1009.9: still in the window
    (9.5, 0),     # 1010.0: the 1-second bucket that opened at 1000.0 fell out
])
def test_default_rolling_window_is_ten_buckets_of_one_second(clock, advance, count):
    clock.advance(0.5)                 # 1000.5, inside the bucket [1000, 1001)
    make_command()().execute()
    clock.advance(advance)
    assert component.metrics('Probe').rolling_count(Event.SUCCESS) == count


@pytest.mark.parametrize('advance, state', [(0.4, BreakerState.CLOSED), (0.5, BreakerState.OPEN)])
def test_default_health_snapshot_interval_is_half_a_second(clock, advance, state):
    class Flaky(FailsOnDemand):
        circuit_breaker_request_volume_threshold = 1

    Flaky(fail=False).execute()          # snapshot taken: 1 request, 0 % errors
    Flaky(fail=True).execute()
    clock.advance(advance)
    Flaky(fail=True).execute()
    assert component.circuit_breaker('Flaky').state is state


@pytest.mark.parametrize('running, admitted', [(9, True), (10, False)])
def test_default_max_concurrent_requests_is_ten(running, admitted):
    class Async(Command):
        def __init__(self, release):
            self.release = release

        async def run(self):
            await self.release.wait()
            return 'ran'

        def fallback(self):
            return 'fallback'

    async def scenario():
        release = asyncio.Event()
        futures = [Async(release).queue() for _ in range(running)]
        extra = Async(release)
        future = extra.queue()
        release.set()
        results = await asyncio.gather(*futures, future)
        assert results[:-1] == ['ran'] * running
        return extra, results[-1]

    extra, result = run_async(scenario())
    if admitted:
        assert (result, extra.events) == ('ran', (Event.SUCCESS,))
    else:
        assert (result, extra.events) == ('fallback', (Event.SEMAPHORE_REJECTED,
                                                       Event.FALLBACK_SUCCESS))


@pytest.mark.parametrize('running, admitted', [(9, True), (10, False)])
def test_default_fallback_max_concurrent_requests_is_ten(running, admitted):
    started = []

    class SlowFallback(Command):
        def __init__(self, release, all_started):
            self.release = release
            self.all_started = all_started

        async def run(self):
            raise ConnectionError('upstream down')

        async def fallback(self):
            started.append(self)
            if len(started) == running:
                self.all_started.set()
            await self.release.wait()
            return 'fallback'

    async def scenario():
        release, all_started = asyncio.Event(), asyncio.Event()
        futures = [SlowFallback(release, all_started).queue() for _ in range(running)]
        await all_started.wait()
        extra = SlowFallback(release, all_started)
        future = extra.queue()
        if admitted:
            release.set()
            assert await future == 'fallback'
        else:
            with pytest.raises(CommandError) as caught:
                await future
            assert caught.value.failure_type is FailureType.REJECTED_SEMAPHORE_FALLBACK
            release.set()
        assert await asyncio.gather(*futures) == ['fallback'] * running
        return extra

    extra = run_async(scenario())
    last = Event.FALLBACK_SUCCESS if admitted else Event.FALLBACK_REJECTION
    assert extra.events == (Event.FAILURE, last)


# -- precedence -------------------------------------------------------------------------

#: key -> (built-in, command_defaults, intermediate class, class, add('command'))
LAYERED_VALUES = {
    'group_key': ('default', 'g1', 'g2', 'g3', 'g4'),
    'timeout': (1.0, 2.0, 3.0, 4.0, 5.0),
    'circuit_breaker_request_volume_threshold': (20, 1, 2, 3, 4),
    'circuit_breaker_error_threshold_percentage': (50, 10, 20.5, 30, 40),
    'circuit_breaker_sleep_window': (5.0, 0.0, 6.0, 7.0, 8.0),
    'metrics_rolling_window': (10.0, 20.0, 30.0, 40.0, 60.0),
    'metrics_rolling_buckets': (10, 1, 2, 3, 4),
    'metrics_health_snapshot_interval': (0.5, 0, 1.0, 1.5, 2.0),
    'max_concurrent_requests': (10, 0, 1, 2, 3),
    'fallback_max_concurrent_requests': (10, 0, 1, 2, 3),
}
LAYERS = ('defaults', 'base', 'cls', 'override')
LAYER_SETS = [layers for n in range(len(LAYERS) + 1)
              for layers in itertools.combinations(LAYERS, n)]


def configure(layers, values_of):
    """Set each of ``layers`` (a subset of LAYERS) and return the command class.

    ``values_of(layer)`` -> the dict of settings for that layer.
    """
    if 'defaults' in layers:
        component.set('command_defaults', values_of('defaults'))
    base = make_command('Base', **(values_of('base') if 'base' in layers else {}))
    cls = make_command('Layered', base=base, command_key='layered',
                       **(values_of('cls') if 'cls' in layers else {}))
    if 'override' in layers:
        component.add('command', dict(values_of('override'), command_key='layered'))
    component.install()
    return cls


@pytest.mark.parametrize('layers', LAYER_SETS, ids=lambda layers: '+'.join(layers) or 'none')
@pytest.mark.parametrize('key', sorted(LAYERED_VALUES))
def test_highest_layer_that_sets_a_key_wins(pools, key, layers):
    values = dict(zip(('built_in',) + LAYERS, LAYERED_VALUES[key]))
    cls = configure(layers, lambda layer: {key: values[layer]})
    winner = layers[-1] if layers else 'built_in'
    assert getattr(settings_of(cls), key) == values[winner]


@pytest.mark.parametrize('key', sorted(KEYS))
@pytest.mark.parametrize('where', ['base', 'cls'])
def test_class_attribute_equal_to_the_built_in_still_beats_command_defaults(pools, key, where):
    built_in = BUILT_INS[key]
    other = LAYERED_VALUES[key][1] if key in LAYERED_VALUES else not built_in
    cls = configure(('defaults', where), lambda layer: {key: other if layer == 'defaults'
                                                        else built_in})
    assert getattr(settings_of(cls), key) == built_in


@pytest.mark.parametrize('key', [k for k in KEYS if isinstance(BUILT_INS[k], bool)])
@pytest.mark.parametrize('layers', [('defaults',), ('cls',), ('defaults', 'cls'),
                                    ('cls', 'override'), ('defaults', 'override')])
def test_boolean_key_takes_the_value_of_its_highest_layer(key, layers):
    # Alternate so that every layer differs from the one below it.
    flip = not BUILT_INS[key]
    values = {layer: flip if i % 2 == 0 else not flip for i, layer in enumerate(layers)}
    cls = configure(layers, lambda layer: {key: values[layer]})
    assert getattr(settings_of(cls), key) is values[layers[-1]]


def test_add_command_override_changes_behaviour_not_just_settings():
    cls = make_command(circuit_breaker_force_open=False)
    component.add('command', {'command_key': 'Probe', 'circuit_breaker_force_open': True})
    component.install()
    command = cls()
    assert command.execute() == 'fallback'
    assert command.events == (Event.SHORT_CIRCUITED, Event.FALLBACK_SUCCESS)


def test_command_defaults_change_behaviour_not_just_settings():
    component.set('command_defaults', {'fallback_enabled': False})
    component.install()
    with pytest.raises(CommandError):
        failing_command()().execute()


def test_override_applies_only_to_its_own_command_key():
    component.add('command', {'command_key': 'other', 'timeout': 9.0})
    component.install()
    assert settings_of(make_command()).timeout == 1.0


@pytest.mark.parametrize('configure_change', [
    lambda: component.add('command', {'command_key': 'Probe', 'timeout': 2.5}),
    lambda: component.set('command_defaults', {'timeout': 2.5}),
], ids=['add_command', 'set_command_defaults'])
def test_change_reaches_a_command_already_used_at_install(configure_change):
    cls = make_command()
    assert settings_of(cls).timeout == 1.0
    configure_change()
    assert settings_of(cls).timeout == 1.0      # not before install()
    component.install()
    assert settings_of(cls).timeout == 2.5


def test_override_installed_after_use_changes_the_behaviour_of_that_command():
    cls = make_command()
    assert cls().execute() == 'ran'
    component.add('command', {'command_key': 'Probe', 'circuit_breaker_force_open': True})
    component.install()
    command = cls()
    assert command.execute() == 'fallback'
    assert command.is_response_short_circuited is True


def test_set_command_defaults_replaces_the_previous_defaults():
    component.set('command_defaults', {'timeout': 2.0})
    component.set('command_defaults', {'circuit_breaker_sleep_window': 8.0})
    component.install()
    settings = settings_of(make_command())
    assert (settings.timeout, settings.circuit_breaker_sleep_window) == (1.0, 8.0)


def test_delete_command_defaults_takes_effect_at_install():
    component.set('command_defaults', {'timeout': 2.0})
    component.install()
    cls = make_command()
    assert settings_of(cls).timeout == 2.0
    component.delete('command_defaults')
    assert settings_of(cls).timeout == 2.0
    component.install()
    assert settings_of(cls).timeout == 1.0


def test_delete_command_defaults_keeps_add_command_overrides():
    component.set('command_defaults', {'timeout': 2.0})
    component.add('command', {'command_key': 'Probe', 'circuit_breaker_sleep_window': 8.0})
    component.delete('command_defaults')
    component.install()
    settings = settings_of(make_command())
    assert (settings.timeout, settings.circuit_breaker_sleep_window) == (1.0, 8.0)


@pytest.mark.parametrize('times', [1, 2])
def test_delete_of_command_defaults_never_set_is_a_no_op(times):
    component.add('command', {'command_key': 'Probe', 'timeout': 2.0})
    for _ in range(times):
        component.delete('command_defaults')
    component.install()
    assert settings_of(make_command()).timeout == 2.0


# -- ConfigError ------------------------------------------------------------------------

#: (key, bad value, what the message says is allowed)
BAD_VALUES = [
    ('timeout', '1.0', 'number'),
    ('timeout', None, 'number'),
    ('timeout', -1.0, 'greater than 0'),
    ('timeout', 0, 'greater than 0'),
    ('timeout', 0.0, 'greater than 0'),
    ('timeout', math.nan, 'number'),
    ('timeout', math.inf, 'number'),
    ('timeout', True, 'number'),
    ('timeout_enabled', 'yes', 'True or False'),
    ('timeout_enabled', 1, 'True or False'),
    ('fallback_enabled', None, 'True or False'),
    ('circuit_breaker_enabled', 0, 'True or False'),
    ('circuit_breaker_request_volume_threshold', True, 'whole number'),
    ('circuit_breaker_request_volume_threshold', 20.0, 'whole number'),
    ('circuit_breaker_request_volume_threshold', -1, 'whole number'),
    ('circuit_breaker_request_volume_threshold', '20', 'whole number'),
    ('circuit_breaker_error_threshold_percentage', -1, 'from 0 to 100'),
    ('circuit_breaker_error_threshold_percentage', 100.5, 'from 0 to 100'),
    ('circuit_breaker_error_threshold_percentage', 150, 'from 0 to 100'),
    ('circuit_breaker_error_threshold_percentage', '50', 'from 0 to 100'),
    ('circuit_breaker_error_threshold_percentage', math.nan, 'from 0 to 100'),
    ('circuit_breaker_sleep_window', -0.1, 'at least 0'),
    ('circuit_breaker_sleep_window', math.inf, 'number'),
    ('circuit_breaker_force_open', 'False', 'True or False'),
    ('circuit_breaker_force_closed', 1, 'True or False'),
    ('metrics_rolling_window', 0, 'a number'),
    ('metrics_rolling_window', -10.0, 'a number'),
    ('metrics_rolling_window', -math.inf, 'number'),
    ('metrics_rolling_buckets', 0, 'whole number'),
    ('metrics_rolling_buckets', 10.0, 'whole number'),
    ('metrics_rolling_buckets', False, 'whole number'),
    ('metrics_health_snapshot_interval', -0.5, 'at least 0'),
    ('metrics_health_snapshot_interval', math.nan, 'number'),
    ('max_concurrent_requests', -1, 'whole number'),
    ('max_concurrent_requests', 1.5, 'whole number'),
    ('fallback_max_concurrent_requests', -1, 'whole number'),
    ('fallback_max_concurrent_requests', '10', 'whole number'),
    ('group_key', '', 'non-empty string'),
    ('group_key', 5, 'string'),
    ('group_key', ' padded ', 'string'),
    ('group_key', None, 'string'),
]
BAD_IDS = ['%s=%r' % (key, value) for key, value, _ in BAD_VALUES]


def raise_config_error_from(where, key, value):
    """Put ``key=value`` in ``where`` and return the ConfigError that it raises."""
    with pytest.raises(ConfigError) as caught:
        if where == 'add_command':
            component.add('command', {'command_key': 'Probe', key: value})
        elif where == 'set_command_defaults':
            component.set('command_defaults', {key: value})
        else:   # a class attribute: found at the command's first execute()
            make_command(**{key: value})().execute()
    return caught.value


@pytest.mark.parametrize('where', ['add_command', 'set_command_defaults', 'class_attribute'])
@pytest.mark.parametrize('key, value, allowed', BAD_VALUES, ids=BAD_IDS)
def test_invalid_value_raises_config_error_naming_key_value_and_allowed(where, key, value,
                                                                        allowed):
    error = raise_config_error_from(where, key, value)
    message = str(error)
    assert '%s=%r' % (key, value) in message
    assert 'expected' in message
    assert allowed in message


NUMERIC_KEYS = [key for key in KEYS if type(BUILT_INS[key]) in (int, float)]


@pytest.mark.parametrize('where', ['add_command', 'set_command_defaults', 'class_attribute'])
@pytest.mark.parametrize('key', NUMERIC_KEYS)
def test_int_too_large_for_a_float_is_a_config_error_not_an_overflow(where, key):
    error = raise_config_error_from(where, key, 10 ** 400)
    assert key in str(error) and 'out of range' in str(error)


@pytest.mark.parametrize('key', ['max_workers', 'max_queue_size'])
def test_pool_size_too_large_for_a_float_is_a_config_error_not_an_overflow(key):
    with pytest.raises(ConfigError, match='%s=.* is out of range' % (key,)):
        component.add('executor_pool', {'group_key': 'huge', key: 10 ** 400})


def test_config_error_is_a_value_error_and_a_blackgate_error():
    error = raise_config_error_from('add_command', 'timeout', -1.0)
    assert isinstance(error, ValueError)
    assert isinstance(error, BlackgateError)


def test_class_attribute_error_names_the_command():
    error = raise_config_error_from('class_attribute', 'timeout', -1.0)
    assert 'Probe' in str(error)


def test_rejected_configuration_is_not_stored():
    with pytest.raises(ConfigError):
        component.set('command_defaults', {'timeout': 2.0, 'circuit_breaker_sleep_window': -1})
    with pytest.raises(ConfigError):
        component.add('command', {'command_key': 'Probe', 'timeout': 3.0,
                                  'metrics_rolling_buckets': 0})
    component.install()
    assert settings_of(make_command()).timeout == 1.0


@pytest.mark.parametrize('where, add_or_set, mapping, unknown, suggestion', [
    ('command', component.add, {'command_key': 'x', 'timout': 2.0}, 'timout', 'timeout'),
    ('command', component.add, {'command_key': 'x', 'circuit_breaker_sleepwindow': 1.0},
     'circuit_breaker_sleepwindow', 'circuit_breaker_sleep_window'),
    ('command_defaults', component.set, {'fallback_enable': False}, 'fallback_enable',
     'fallback_enabled'),
    ('command_defaults', component.set, {'max_concurent_requests': 2},
     'max_concurent_requests', 'max_concurrent_requests'),
    ('executor_pool', component.add, {'group_key': 'g', 'max_worker': 2}, 'max_worker',
     'max_workers'),
    ('executor_pool', component.add, {'group_key': 'g', 'queue_size': 2}, 'queue_size',
     'max_queue_size'),
])
def test_unknown_key_names_it_suggests_the_close_match_and_lists_allowed_keys(
        where, add_or_set, mapping, unknown, suggestion):
    with pytest.raises(ConfigError) as caught:
        add_or_set(where, mapping)
    message = str(caught.value)
    assert repr(unknown) in message
    assert 'did you mean %r' % (suggestion,) in message
    allowed = message.split('allowed keys')[1]
    expected = (('group_key', 'max_workers', 'max_queue_size') if where == 'executor_pool'
                else [key for key in KEYS])
    assert all(key in allowed for key in expected)


def test_unknown_key_without_a_close_match_still_lists_allowed_keys():
    with pytest.raises(ConfigError) as caught:
        component.set('command_defaults', {'zzz': 1})
    message = str(caught.value)
    assert "'zzz'" in message
    assert 'did you mean' not in message
    assert 'circuit_breaker_sleep_window' in message


@pytest.mark.parametrize('key, value, spelling', [
    ('executor_pool', {'group_key', 'x', 'max_workers', 10}, "{'group_key': "),
    ('executor_pool', [('group_key', 'x')], "{'group_key': "),
    ('command', {'command_key', 'x', 'timeout', 2.0}, "{'command_key': "),
    ('command', 'command_key=x', "{'command_key': "),
])
def test_add_value_that_is_not_a_mapping_asks_for_a_dict(key, value, spelling):
    with pytest.raises(ConfigError) as caught:
        component.add(key, value)
    message = str(caught.value)
    assert 'expected a dict' in message
    assert type(value).__name__ in message
    assert spelling in message


@pytest.mark.parametrize('value', [{'timeout', 2.0}, ('timeout', 2.0), None, 'timeout=2.0'])
def test_command_defaults_that_are_not_a_mapping_ask_for_a_dict(value):
    with pytest.raises(ConfigError) as caught:
        component.set('command_defaults', value)
    message = str(caught.value)
    assert 'expected a dict' in message
    assert "{'timeout': " in message


def test_command_key_in_command_defaults_is_refused():
    with pytest.raises(ConfigError) as caught:
        component.set('command_defaults', {'command_key': 'x', 'timeout': 2.0})
    message = str(caught.value)
    assert 'command_key' in message
    assert "component.add('command'" in message


def test_add_command_without_command_key_is_refused():
    with pytest.raises(ConfigError) as caught:
        component.add('command', {'timeout': 2.0})
    message = str(caught.value)
    assert 'missing command_key' in message
    assert "{'command_key': " in message


@pytest.mark.parametrize('command_key', ['', 42, None, ' padded '])
def test_add_command_with_an_invalid_command_key_is_refused(command_key):
    with pytest.raises(ConfigError) as caught:
        component.add('command', {'command_key': command_key, 'timeout': 2.0})
    assert 'command_key=%r' % (command_key,) in str(caught.value)


@pytest.mark.parametrize('command_key', ['', 42, None, ' padded '])
def test_class_with_an_invalid_command_key_raises_config_error_at_first_execute(command_key):
    with pytest.raises(ConfigError) as caught:
        make_command(command_key=command_key)().execute()
    assert 'command_key=%r' % (command_key,) in str(caught.value)


@pytest.mark.parametrize('key, first, second', [
    ('circuit_breaker_sleep_window', 5.0, 10.0),
    ('circuit_breaker_request_volume_threshold', 20, 5),
    ('circuit_breaker_force_open', False, True),
    ('metrics_rolling_window', 10.0, 20.0),
    ('metrics_rolling_buckets', 10, 20),
    ('max_concurrent_requests', 10, 3),
])
def test_classes_sharing_a_command_key_must_agree_on_breaker_and_metrics(key, first, second):
    one = make_command('FirstUser', command_key='shared', **{key: first})
    two = make_command('SecondUser', command_key='shared', **{key: second})
    one().execute()
    with pytest.raises(ConfigError) as caught:
        two().execute()
    message = str(caught.value)
    assert 'FirstUser' in message and 'SecondUser' in message
    assert key in message
    assert "'shared'" in message


def test_classes_sharing_a_command_key_may_differ_in_timeout_and_group():
    component.add('executor_pool', {'group_key': 'other'})
    component.install()
    one = make_command('FirstUser', command_key='shared', timeout=1.0)
    two = make_command('SecondUser', command_key='shared', timeout=2.0, group_key='other')
    assert one().execute() == 'ran'
    assert two().execute() == 'ran'
    assert component.metrics('shared').rolling_count(Event.SUCCESS) == 2


def test_install_refuses_a_change_that_makes_classes_sharing_a_key_disagree():
    component.set('command_defaults', {'circuit_breaker_sleep_window': 7.0})
    component.install()
    one = make_command('FirstUser', command_key='shared', circuit_breaker_sleep_window=7.0)
    two = make_command('SecondUser', command_key='shared')
    one().execute()
    two().execute()                          # they agree through command_defaults
    component.delete('command_defaults')
    with pytest.raises(ConfigError) as caught:
        component.install()
    message = str(caught.value)
    assert 'FirstUser' in message and 'SecondUser' in message


def test_tiny_positive_rolling_window_is_refused_or_works():
    cls = make_command(metrics_rolling_window=1e-320)
    try:
        result = cls().execute()
    except ConfigError:
        return
    assert result == 'ran'


def test_huge_timeout_is_refused_or_works(system_clock):
    slow = threading.Event()
    cls = make_command(timeout=1e10, run=lambda self: slow.wait(0.05) or 'ran')
    try:
        result = cls().execute()
    except ConfigError:
        return
    assert result == 'ran'


# -- properties -------------------------------------------------------------------------

def positive(high=1e6):
    return st.floats(min_value=1e-3, max_value=high, allow_nan=False, allow_infinity=False)


def non_negative(high=1e6):
    return st.floats(min_value=0, max_value=high, allow_nan=False, allow_infinity=False)


VALID = {
    'group_key': st.sampled_from(['default', 'g1', 'g2']),
    'timeout': positive(),
    'timeout_enabled': st.booleans(),
    'fallback_enabled': st.booleans(),
    'circuit_breaker_enabled': st.booleans(),
    'circuit_breaker_request_volume_threshold': st.integers(0, 2 ** 31 - 1),
    'circuit_breaker_error_threshold_percentage': st.one_of(st.integers(0, 100),
                                                            non_negative(100)),
    'circuit_breaker_sleep_window': non_negative(),
    'circuit_breaker_force_open': st.booleans(),
    'circuit_breaker_force_closed': st.booleans(),
    'metrics_rolling_window': st.floats(min_value=10.0, max_value=1e6),   # >= 1 ms buckets
    'metrics_rolling_buckets': st.integers(1, 10_000),
    'metrics_health_snapshot_interval': non_negative(),
    'max_concurrent_requests': st.integers(0, 10_000),
    'fallback_max_concurrent_requests': st.integers(0, 10_000),
}
assert set(VALID) == set(KEYS)


def some_settings():
    """Any subset of the keys, each with a valid value."""
    return st.fixed_dictionaries({}, optional=VALID)


def fresh_component():
    """The autouse fixture resets once per test; hypothesis runs many examples in one."""
    component.reset()
    component.clock = FakeClock()
    for group_key in ('g1', 'g2'):
        component.add('executor_pool', {'group_key': group_key, 'max_workers': 1})
    component.install()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(defaults=some_settings(), base=some_settings(), own=some_settings(),
       override=some_settings())
def test_any_valid_combination_resolves_to_the_highest_layer(defaults, base, own, override):
    fresh_component()
    component.set('command_defaults', defaults)
    base_cls = make_command('Base', **base)
    cls = make_command('Layered', base=base_cls, command_key='layered', **own)
    component.add('command', dict(override, command_key='layered'))
    component.install()
    expected = dict(BUILT_INS, **defaults)
    expected.update(base)
    expected.update(own)
    expected.update(override)
    resolved = settings_of(cls)
    assert {key: getattr(resolved, key) for key in KEYS} == expected


#: key -> strategy of values the key never accepts
INVALID = {
    'group_key': st.one_of(st.just(''), st.integers(), st.none(),
                           st.text(min_size=1).map(lambda s: ' ' + s)),
    'timeout': st.one_of(st.floats(max_value=0), st.just(math.inf), st.just(math.nan),
                         st.text(), st.booleans()),
    'timeout_enabled': st.one_of(st.integers(), st.text(), st.none()),
    'fallback_enabled': st.one_of(st.integers(), st.text(), st.none()),
    'circuit_breaker_enabled': st.one_of(st.integers(), st.floats()),
    'circuit_breaker_request_volume_threshold': st.one_of(
        st.integers(max_value=-1), st.floats(), st.booleans(), st.text()),
    'circuit_breaker_error_threshold_percentage': st.one_of(
        st.floats(max_value=-1e-9), st.floats(min_value=100.000001), st.just(math.nan),
        st.integers(min_value=101), st.text(), st.booleans()),
    'circuit_breaker_sleep_window': st.one_of(st.floats(max_value=-1e-9), st.just(math.inf),
                                              st.just(math.nan), st.text()),
    'circuit_breaker_force_open': st.one_of(st.integers(), st.text()),
    'circuit_breaker_force_closed': st.one_of(st.integers(), st.text()),
    'metrics_rolling_window': st.one_of(st.floats(max_value=0), st.just(math.nan),
                                        st.just(math.inf), st.text()),
    'metrics_rolling_buckets': st.one_of(st.integers(max_value=0), st.floats(), st.booleans()),
    'metrics_health_snapshot_interval': st.one_of(st.floats(max_value=-1e-9),
                                                  st.just(math.nan), st.text()),
    'max_concurrent_requests': st.one_of(st.integers(max_value=-1), st.floats(), st.text()),
    'fallback_max_concurrent_requests': st.one_of(st.integers(max_value=-1), st.floats(),
                                                  st.none()),
}
assert set(INVALID) == set(KEYS)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), key=st.sampled_from(KEYS),
       where=st.sampled_from(['add_command', 'set_command_defaults', 'class_attribute']))
def test_any_invalid_value_raises_config_error_naming_the_key(data, key, where):
    value = data.draw(INVALID[key], label='value')
    fresh_component()
    error = raise_config_error_from(where, key, value)
    assert key in str(error)


# -- misspelt class attributes (issue 18, point 4) ---------------------------------------------

@pytest.mark.parametrize('name, value, meant', [
    ('timout', 5, 'timeout'),
    ('fallback_enable', False, 'fallback_enabled'),
    ('groupKey', 'x', 'group_key'),
    ('commandKey', 'x', 'command_key'),
    ('circuit_breaker_sleep_windw', 1.0, 'circuit_breaker_sleep_window'),
    ('circuitBreakerForceOpen', True, 'circuit_breaker_force_open'),
    ('max_concurent_requests', 3, 'max_concurrent_requests'),
])
def test_class_attribute_close_to_a_setting_is_refused_at_class_definition(name, value, meant):
    with pytest.raises(ConfigError) as caught:
        make_command('Misspelt', **{name: value})
    message = str(caught.value)
    assert 'Misspelt' in message and repr(name) in message
    assert 'did you mean %r' % (meant,) in message
    assert repr('_' + name) in message   # the way out for an attribute that is the user's own


@pytest.mark.parametrize('name, value', [
    ('cookie', 'session=1'), ('retries', 3), ('timeout_ms', 300), ('_timout', 5),
    ('session_url', 'http://x'), ('group', 'admins'), ('commands', ('a', 'b')),
])
def test_class_attribute_unlike_any_setting_is_the_users_own(name, value):
    cls = make_command('OwnAttributes', **{name: value})
    assert cls().execute() == 'ran'
    assert getattr(cls, name) == value


def test_methods_and_properties_close_to_a_setting_are_not_checked():
    cls = make_command('Methods', timouts=lambda self: 1,
                       fallback_enable=property(lambda self: False))
    assert cls().execute() == 'ran'


def test_misspelt_attribute_of_an_intermediate_base_class_is_refused_too():
    base = make_command('Base')
    with pytest.raises(ConfigError, match="did you mean 'timeout'"):
        type('Middle', (base,), {'timout': 5})
