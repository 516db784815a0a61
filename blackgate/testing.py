"""A testing kit for code that uses Blackgate.

- :class:`FakeClock` drives rolling windows, sleep windows and timeouts
  without sleeping;
- a pytest plugin, loaded automatically once Blackgate is installed, with the
  fixtures ``blackgate_component`` (the global ``component``, reset before and
  after the test) and ``blackgate_clock`` (the same, with a ``FakeClock``
  installed);
- :func:`force_open`, :func:`force_closed` and :func:`unforce`, to put a
  command's breaker in a state for a test.

A user's test::

    from blackgate.testing import force_open

    def test_price_page_survives_an_open_breaker(blackgate_clock):
        force_open('get_price')
        assert GetPrice('book').execute() == 'price unavailable'
"""
import contextlib
from typing import Iterator, Optional

from .clock import FakeClock
from .registry import Component, component

__all__ = ('FakeClock', 'force_open', 'force_closed', 'unforce', 'forced')


def force_open(command_key: str, registry: Optional[Component] = None) -> None:
    """Short-circuit every call of ``command_key`` until :func:`unforce`."""
    _force(command_key, True, False, registry)


def force_closed(command_key: str, registry: Optional[Component] = None) -> None:
    """Never let ``command_key``'s breaker trip (metrics still count) until :func:`unforce`."""
    _force(command_key, False, True, registry)


def unforce(command_key: str, registry: Optional[Component] = None) -> None:
    """Take back :func:`force_open` / :func:`force_closed`: the class's own settings apply again."""
    _restore(command_key, {}, registry)


@contextlib.contextmanager
def forced(command_key: str, open: bool = True,
           registry: Optional[Component] = None) -> Iterator[None]:
    """``with forced('get_price'):`` forces the breaker open (or closed) for the block.

    On the way out the overrides are put back exactly as they were.
    """
    registry = component if registry is None else registry
    before = {key: value for key, value in registry.command_override(command_key).items()
              if key in _FORCE_KEYS}
    _force(command_key, open, not open, registry)
    try:
        yield
    finally:
        _restore(command_key, before, registry)


_FORCE_KEYS = ('circuit_breaker_force_open', 'circuit_breaker_force_closed')


def _restore(command_key: str, values: dict, registry: Optional[Component]) -> None:
    registry = component if registry is None else registry
    registry.forget_override(command_key, *_FORCE_KEYS)
    if values:
        registry.add('command', dict(values, command_key=command_key))
    registry.install()


def _force(command_key: str, force_open: bool, force_closed: bool,
           registry: Optional[Component]) -> None:
    registry = component if registry is None else registry
    registry.add('command', {'command_key': command_key,
                             'circuit_breaker_force_open': force_open,
                             'circuit_breaker_force_closed': force_closed})
    registry.install()


try:
    import pytest
except ImportError:  # pragma: no cover - the plugin is for pytest users only
    pass
else:
    @pytest.fixture
    def blackgate_component() -> Iterator[Component]:
        """The global ``component``, reset before and after the test."""
        component.reset()
        try:
            yield component
        finally:
            component.reset()

    @pytest.fixture
    def blackgate_clock(blackgate_component: Component) -> FakeClock:
        """A :class:`FakeClock` installed on a freshly reset ``component``."""
        clock = blackgate_component.clock = FakeClock()
        return clock
