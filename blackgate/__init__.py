"""Blackgate: Netflix Hystrix's latency and fault tolerance for Tornado.

Wrap each call to a dependency in a :class:`Command`; Blackgate runs it on a
bounded pool with a timeout, counts outcomes in rolling windows, opens a
circuit breaker when the dependency is sick, and answers from the command's
``fallback()``.
"""
from .command import Command
from .errors import BadRequest, BlackgateError, CommandError, ConfigError, PoolNotRegistered
from .events import BreakerState, Event, FailureType
from .registry import Component, component

__version__ = '0.2.0.dev0'

__all__ = (
    'Command',
    'component',
    'Component',
    'Event',
    'FailureType',
    'BreakerState',
    'BlackgateError',
    'CommandError',
    'BadRequest',
    'PoolNotRegistered',
    'ConfigError',
    '__version__',
)
