from __future__ import annotations

from qmoi_sync.agent.rate import RateCounter, SpaceRates


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rate_is_window_mean_and_expires() -> None:
    clock = FakeClock()
    c = RateCounter(window=10.0, clock=clock)
    assert c.rate() == 0.0
    c.add(1000)
    clock.now += 5
    c.add(3000)
    assert c.rate() == 400.0
    clock.now += 6  # the first event is now older than the window
    assert c.rate() == 300.0
    clock.now += 10
    assert c.rate() == 0.0
    assert c.total == 4000


def test_zero_and_negative_ignored() -> None:
    r = SpaceRates(window=1.0, clock=FakeClock())
    r.up.add(0)
    r.down.add(-5)
    assert r.up.rate() == 0.0 and r.down.rate() == 0.0
