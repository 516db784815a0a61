"""Shared fixtures: a clean registry and an injected clock for every test."""
import pytest

from blackgate import component
from blackgate.clock import SystemClock
from blackgate.testing import FakeClock


@pytest.fixture(autouse=True)
def clock():
    """A FakeClock installed on a freshly reset component; reset again afterwards."""
    component.reset()
    fake = component.clock = FakeClock()
    yield fake
    component.reset()


@pytest.fixture
def system_clock(clock):
    """For the few tests that need real time (real timeouts between real threads)."""
    component.clock = SystemClock()
    return component.clock
