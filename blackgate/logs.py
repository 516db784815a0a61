"""The ``blackgate`` logger's own handler: silent, except for a bug nobody would see.

A library logs and the application decides where records go, so the
``blackgate`` logger has a handler that writes nothing. One case is an
exception: a ``run()`` that raises a *programming error* (``NameError``,
``TypeError``, ``AttributeError``, ...) is answered by its fallback, so in a
program that configured no logging at all the bug would vanish without a
trace. :class:`BugReporter` writes the first such record of each command key
to ``logging.lastResort`` (stderr), as logging would with no handler at all.
As soon as the program configures any handler (``logging.basicConfig()``,
a framework's set-up, pytest), or sets ``propagate = False`` on the way,
it does nothing: configured logging is left exactly as it is.
"""
import copy
import logging
from typing import Set

__all__ = ('BugReporter', 'PROGRAMMING_ERRORS', 'BUG_ATTRIBUTE')

#: What a ``run()`` raises when its code, not its dependency, is wrong. An
#: ``OSError`` (refused, reset, timed out; requests' errors) is the dependency's.
PROGRAMMING_ERRORS = (NameError, AttributeError, TypeError, LookupError, ArithmeticError,
                      AssertionError, ImportError, SyntaxError, NotImplementedError,
                      RecursionError)

#: The record attribute (set through ``extra``) naming the command key whose run() has a bug.
BUG_ATTRIBUTE = 'blackgate_bug'

_NOTE = (' [blackgate: shown once per command key on stderr because this program configured '
         'no logging; configure logging to see every failure]')


class BugReporter(logging.NullHandler):
    """A ``NullHandler`` that passes the first bug of each command key to ``lastResort``."""

    def __init__(self) -> None:
        super().__init__()
        self.reported: Set[str] = set()

    def handle(self, record: logging.LogRecord) -> bool:   # type: ignore[override]
        key = getattr(record, BUG_ATTRIBUTE, None)
        if key is None or key in self.reported:
            return False
        last_resort = logging.lastResort
        if last_resort is None or _configured(logging.getLogger(record.name)):
            return False
        self.reported.add(key)   # a race may print one twice, never lose one
        shown = copy.copy(record)
        shown.msg = str(record.msg) + _NOTE.replace('%', '%%')
        last_resort.handle(shown)
        return True


def _configured(logger: logging.Logger) -> bool:
    """Whether the program routed records from ``logger`` anywhere (or chose not to)."""
    current = logger
    while current is not None:
        if any(not isinstance(handler, logging.NullHandler) for handler in current.handlers):
            return True
        if not current.propagate:
            return True   # a deliberate choice to keep them here
        current = current.parent   # type: ignore[assignment]
    return False
