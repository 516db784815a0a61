"""The testing kit: FakeClock, the pytest plugin's fixtures, and forcing a breaker."""
import subprocess
import sys
import textwrap

from blackgate import BreakerState, Command, Event, component
from blackgate.testing import FakeClock, force_closed, force_open, forced, unforce


class GetPrice(Command):
    command_key = 'get_price'
    circuit_breaker_request_volume_threshold = 1
    metrics_health_snapshot_interval = 0

    def __init__(self, fail=False):
        self.fail = fail

    def run(self):
        if self.fail:
            raise ConnectionError('pricing down')
        return 12.5

    def fallback(self):
        return 'price unavailable'


def test_force_open_short_circuits_until_unforced():
    force_open('get_price')
    command = GetPrice()
    assert command.execute() == 'price unavailable'
    assert command.events == (Event.SHORT_CIRCUITED, Event.FALLBACK_SUCCESS)
    unforce('get_price')
    assert GetPrice().execute() == 12.5


def test_force_closed_keeps_the_breaker_closed_through_failures():
    force_closed('get_price')
    for _ in range(5):
        assert GetPrice(fail=True).execute() == 'price unavailable'
    assert component.circuit_breaker('get_price').state is BreakerState.CLOSED
    assert component.metrics('get_price').rolling_count(Event.FAILURE) == 5


def test_forced_context_manager_restores_the_breaker():
    with forced('get_price'):
        assert component.circuit_breaker('get_price').state is BreakerState.OPEN
        assert GetPrice().execute() == 'price unavailable'
    assert component.circuit_breaker('get_price').state is BreakerState.CLOSED
    assert GetPrice().execute() == 12.5


def test_forced_closed_context_manager_holds_through_failures():
    with forced('get_price', open=False):
        GetPrice(fail=True).execute()
        GetPrice(fail=True).execute()
        assert not component.circuit_breaker('get_price').is_open()
    GetPrice(fail=True).execute()
    assert component.circuit_breaker('get_price').is_open()


def test_blackgate_clock_fixture_installs_a_fake_clock(blackgate_clock):
    assert component.clock is blackgate_clock
    assert isinstance(blackgate_clock, FakeClock)
    before = blackgate_clock.monotonic()
    blackgate_clock.advance(2.5)
    assert blackgate_clock.monotonic() == before + 2.5


def test_plugin_fixtures_reach_a_user_test_suite_through_the_entry_point(tmp_path):
    (tmp_path / 'test_user.py').write_text(textwrap.dedent('''
        from blackgate import BreakerState, Command, component

        class Flaky(Command):
            circuit_breaker_request_volume_threshold = 2
            metrics_health_snapshot_interval = 0

            def run(self):
                raise ConnectionError('down')

            def fallback(self):
                return 'stale'

        def test_opens_then_closes_after_the_sleep_window(blackgate_clock):
            Flaky().execute()
            Flaky().execute()
            assert component.circuit_breaker('Flaky').state is BreakerState.OPEN
            blackgate_clock.advance(5.0)
            Flaky.run = lambda self: 'fresh'
            assert Flaky().execute() == 'fresh'
            assert component.circuit_breaker('Flaky').state is BreakerState.CLOSED

        def test_each_test_starts_from_a_clean_component(blackgate_component):
            assert blackgate_component.command_keys == []
    '''))
    result = subprocess.run(
        [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert '2 passed' in result.stdout
