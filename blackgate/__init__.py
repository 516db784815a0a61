"""Blackgate: Netflix Hystrix's latency and fault tolerance for Tornado.

Wrap each call to a dependency in a :class:`Command`; Blackgate runs it on a
bounded pool with a timeout, counts outcomes in rolling windows, opens a
circuit breaker when the dependency is sick, and answers from the command's
``fallback()``.
"""
import logging

from .collapser import Collapser
from .command import Command
from .errors import BadRequest, BlackgateError, CommandError, ConfigError, PoolNotRegistered
from .events import BreakerState, Event, FailureType
from .logs import BugReporter
from .proxy import HTTPProxy, HTTPProxyCommand
from .registry import Component, component

__version__ = '1.0.0.dev0'

# A library logs; the application decides where records go. Nothing reaches stderr
# when it has not configured logging, except the first bug in each command's run()
# (see blackgate/logs.py): a NameError answered by the fallback must not vanish.
logging.getLogger('blackgate').addHandler(BugReporter())

__all__ = (
    'Command',
    'HTTPProxyCommand',
    'HTTPProxy',
    'Collapser',
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
