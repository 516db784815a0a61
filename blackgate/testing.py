"""Helpers for testing code that uses Blackgate.

``FakeClock`` drives rolling windows, sleep windows and timeouts without
sleeping::

    from blackgate import component
    from blackgate.testing import FakeClock

    component.reset()
    clock = component.clock = FakeClock()
    clock.advance(5.0)
"""
from .clock import FakeClock

__all__ = ('FakeClock',)
