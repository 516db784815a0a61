from blackgate import BreakerState, Command, component


class Flaky(Command):
    command_key = 'flaky'
    circuit_breaker_request_volume_threshold = 2
    metrics_health_snapshot_interval = 0

    def __init__(self, fail):
        self.fail = fail

    def run(self):
        if self.fail:
            raise ConnectionError('upstream down')
        return 'fresh'

    def fallback(self):
        return 'stale'


def test_success_after_sleep_window_closes_breaker(clock):
    for _ in range(2):
        assert Flaky(fail=True).execute() == 'stale'
    breaker = component.circuit_breaker('flaky')
    assert breaker.state is BreakerState.OPEN
    clock.advance(4.0)
    assert Flaky(fail=False).execute() == 'stale'   # still in the sleep window
    clock.advance(2.0)
    assert Flaky(fail=False).execute() == 'fresh'   # the one trial
    assert breaker.state is BreakerState.CLOSED
