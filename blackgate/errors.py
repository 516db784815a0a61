"""Exceptions raised by Blackgate.

One root, :class:`BlackgateError`, so callers can catch everything the library
raises; the configuration and lookup errors also derive from the built-in they
resemble (``ValueError``, ``KeyError``) so callers can catch them by intent.
"""
from typing import Optional

__all__ = (
    'BlackgateError',
    'CommandError',
    'BadRequest',
    'PoolNotRegistered',
    'ConfigError',
    'CommandTimeout',
    'ShortCircuited',
    'Rejected',
)


class BlackgateError(Exception):
    """Base class of every exception Blackgate raises."""


class BadRequest(BlackgateError):
    """Raised by user code inside ``run()`` when the arguments are invalid.

    It reaches the caller unchanged, is not counted as a failure by the circuit
    breaker, and triggers no fallback.
    """


class ConfigError(BlackgateError, ValueError):
    """A configuration key, type or value is not allowed."""


class PoolNotRegistered(BlackgateError, KeyError):
    """A command's ``group_key`` has no executor pool."""

    def __str__(self) -> str:
        # KeyError.__str__ would repr() the message and add quotes.
        return str(self.args[0]) if self.args else ''


class CommandTimeout(BlackgateError, TimeoutError):
    """The cause of a ``TIMEOUT``: ``run()`` did not finish within ``timeout``."""


class ShortCircuited(BlackgateError):
    """The cause of a ``SHORT_CIRCUITED``: the circuit breaker is open."""


class Rejected(BlackgateError):
    """The cause of a rejection: no worker, queue slot or permit was free."""


class CommandError(BlackgateError):
    """A command failed and there is no usable fallback.

    Raised by ``execute()`` and set on the future of ``queue()``.
    """

    def __init__(self, command_key: str, failure_type, cause: Optional[BaseException],
                 fallback_exception: Optional[BaseException] = None,
                 fallback_problem: str = '') -> None:
        #: the command key of the command that failed
        self.command_key = command_key
        #: a :class:`~blackgate.FailureType`
        self.failure_type = failure_type
        #: the exception from ``run()``, or the timeout, rejection or short-circuit
        self.cause = cause
        #: the exception raised by ``fallback()``, or None
        self.fallback_exception = fallback_exception
        message = '%s failed (%s: %s)' % (command_key, failure_type.value, _describe(cause))
        if fallback_problem:
            message += ' and ' + fallback_problem
        super().__init__(message)

    def __reduce__(self):
        return (_rebuild_command_error, (self.command_key, self.failure_type, self.cause,
                                         self.fallback_exception, self.args[0]))


def _rebuild_command_error(command_key, failure_type, cause, fallback_exception, message):
    error = CommandError.__new__(CommandError)
    BlackgateError.__init__(error, message)
    error.command_key = command_key
    error.failure_type = failure_type
    error.cause = cause
    error.fallback_exception = fallback_exception
    return error


def _describe(exc: Optional[BaseException]) -> str:
    if exc is None:
        return 'no cause'
    text = str(exc)
    name = type(exc).__name__
    return '%s: %s' % (name, text) if text else name
