"""The vocabulary of outcomes: events, failure types and breaker states.

Values equal names, as in Hystrix, so they read the same in logs, metrics and
the Hystrix dashboard.
"""
import enum

__all__ = ('Event', 'FailureType', 'BreakerState')


class Event(str, enum.Enum):
    """What happened to one execution; several may apply (``FAILURE`` then ``FALLBACK_SUCCESS``)."""

    SUCCESS = 'SUCCESS'
    FAILURE = 'FAILURE'
    TIMEOUT = 'TIMEOUT'
    SHORT_CIRCUITED = 'SHORT_CIRCUITED'
    THREAD_POOL_REJECTED = 'THREAD_POOL_REJECTED'
    SEMAPHORE_REJECTED = 'SEMAPHORE_REJECTED'
    BAD_REQUEST = 'BAD_REQUEST'
    FALLBACK_SUCCESS = 'FALLBACK_SUCCESS'
    FALLBACK_FAILURE = 'FALLBACK_FAILURE'
    FALLBACK_REJECTION = 'FALLBACK_REJECTION'
    FALLBACK_MISSING = 'FALLBACK_MISSING'
    #: The answer came from the request cache: an earlier call with the same
    #: ``cache_key()`` in this request context ran (its events come first).
    RESPONSE_FROM_CACHE = 'RESPONSE_FROM_CACHE'
    #: This execution answered a batch of collapsed requests (see ``Collapser``);
    #: the rolling count is the number of requests, as in Hystrix.
    COLLAPSED = 'COLLAPSED'
    #: a failed attempt is tried again (one per extra attempt; see ``retry_attempts``)
    RETRY = 'RETRY'
    #: a retry was wanted, and the command key's retry budget refused it
    RETRY_BUDGET_EXHAUSTED = 'RETRY_BUDGET_EXHAUSTED'

    def __str__(self) -> str:
        return self.value

    # Enum hashes members in Python; the value's own hash is the same number, in C.
    __hash__ = str.__hash__


class FailureType(str, enum.Enum):
    """Why a command failed, as carried by :class:`~blackgate.CommandError`."""

    COMMAND_EXCEPTION = 'COMMAND_EXCEPTION'
    TIMEOUT = 'TIMEOUT'
    SHORTCIRCUIT = 'SHORTCIRCUIT'
    REJECTED_THREAD_EXECUTION = 'REJECTED_THREAD_EXECUTION'
    REJECTED_SEMAPHORE_EXECUTION = 'REJECTED_SEMAPHORE_EXECUTION'
    REJECTED_SEMAPHORE_FALLBACK = 'REJECTED_SEMAPHORE_FALLBACK'

    def __str__(self) -> str:
        return self.value

    # Enum hashes members in Python; the value's own hash is the same number, in C.
    __hash__ = str.__hash__


class BreakerState(str, enum.Enum):
    """The states of a circuit breaker."""

    CLOSED = 'closed'
    OPEN = 'open'
    HALF_OPEN = 'half_open'

    def __str__(self) -> str:
        return self.value

    # Enum hashes members in Python; the value's own hash is the same number, in C.
    __hash__ = str.__hash__


#: The events that count as errors for the circuit breaker (Hystrix 1.5).
ERROR_EVENTS = frozenset((Event.FAILURE, Event.TIMEOUT, Event.THREAD_POOL_REJECTED,
                          Event.SEMAPHORE_REJECTED))

#: The failure type that each failing primary event leads to.
FAILURE_TYPE_OF = {
    Event.FAILURE: FailureType.COMMAND_EXCEPTION,
    Event.TIMEOUT: FailureType.TIMEOUT,
    Event.SHORT_CIRCUITED: FailureType.SHORTCIRCUIT,
    Event.THREAD_POOL_REJECTED: FailureType.REJECTED_THREAD_EXECUTION,
    Event.SEMAPHORE_REJECTED: FailureType.REJECTED_SEMAPHORE_EXECUTION,
}
