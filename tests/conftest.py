"""Shared fixtures, on top of the testing kit's pytest plugin (blackgate.testing)."""
import pytest

from blackgate import component
from blackgate.clock import SystemClock
from support import Gate, gate_maker


@pytest.fixture(autouse=True)
def clock(blackgate_clock):
    """Every test starts on a freshly reset component with a FakeClock installed."""
    return blackgate_clock


@pytest.fixture
def system_clock(clock):
    """For the few tests that need real time (real timeouts between real threads)."""
    component.clock = SystemClock()
    return component.clock


@pytest.fixture
def gates(clock):
    """Make Gates; every one is opened at teardown, before the registry shuts down."""
    yield from gate_maker(Gate)
