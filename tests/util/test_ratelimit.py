"""The token bucket behind publish.kubernetes.qps/burst and anchor.vault.qps/burst, on a
clock the tests move (no test waits for real time)."""

from __future__ import annotations

import itertools
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from ca_daemon.cli import main
from ca_daemon.util.ratelimit import TokenBucket, limiter

pytestmark = pytest.mark.usefixtures("clean_env")


class FakeTime:
    """A clock that only moves when someone sleeps on it."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []
        self._lock = threading.Lock()

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.slept.append(seconds)
            self.now += seconds


def test_a_window_admits_the_burst_plus_qps_per_second() -> None:
    t = FakeTime()
    bucket = TokenBucket(qps=10, burst=5, clock=t.clock, sleep=t.sleep)
    admitted = 0
    for _ in range(1000):  # bounded: a bucket that never waits must fail, not hang
        bucket.acquire()
        if t.now > 2.05:
            break
        admitted += 1
    # 5 at once, then one every 0.1 s: at t = 0.1, 0.2, ..., 2.0.
    assert admitted == 5 + 20


def test_a_quiet_spell_saves_up_at_most_the_burst() -> None:
    t = FakeTime()
    bucket = TokenBucket(qps=10, burst=5, clock=t.clock, sleep=t.sleep)
    assert [bucket.try_acquire() for _ in range(6)] == [True] * 5 + [False]
    t.now += 1000.0  # 10,000 tokens' worth of waiting
    assert sum(bucket.try_acquire() for _ in range(100)) == 5


def test_threads_share_one_bucket_without_oversubscribing_it() -> None:
    t = FakeTime()  # frozen: nobody's sleep is real, so the clock stays at 0 below
    bucket = TokenBucket(qps=4, burst=3, clock=t.clock, sleep=lambda s: t.slept.append(s))
    granted: list[bool] = []
    lock = threading.Lock()

    def grab() -> None:
        for _ in range(25):
            ok = bucket.try_acquire()
            with lock:
                granted.append(ok)

    threads = [threading.Thread(target=grab) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(granted) == 3 and len(granted) == 200

    # Waiting callers reserve one token each, in turn: the k-th beyond the burst waits
    # k/qps, whichever thread it is on; no two share a slot.
    waiters = [threading.Thread(target=bucket.acquire) for _ in range(12)]
    for thread in waiters:
        thread.start()
    for thread in waiters:
        thread.join()
    assert sorted(t.slept) == pytest.approx([k / 4 for k in range(1, 13)])


def test_qps_zero_means_no_limit() -> None:
    assert limiter(0, 10) is None
    bucket = limiter(2.5, 4)
    assert bucket is not None and (bucket.qps, bucket.burst) == (2.5, 4)
    with pytest.raises(ValueError):
        TokenBucket(qps=0, burst=1)


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"publish": {"kubernetes": {"qps": -1}}}, "publish.kubernetes.qps"),
        ({"publish": {"kubernetes": {"qps": 5, "burst": 0}}}, "publish.kubernetes.burst"),
        ({"anchor": {"vault": {"qps": -0.5}}}, "anchor.vault.qps"),
    ],
)
def test_a_bad_limit_exits_2_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], config: dict[str, object], field: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["config", "check", str(path)]) == 2
    assert any(
        line.strip().startswith(f"{field}:") for line in capsys.readouterr().err.splitlines()
    )


def test_racing_threads_never_get_more_than_the_rate_makes() -> None:
    # A clock that moves a step on every reading: tokens trickle in while 8 threads
    # compete for them, and thread switches are forced as often as the interpreter can.
    ticks = itertools.count()
    step, qps, burst = 0.001, 250.0, 3
    bucket = TokenBucket(qps=qps, burst=burst, clock=lambda: next(ticks) * step)
    granted: list[int] = []

    def grab() -> None:
        granted.append(sum(bucket.try_acquire() for _ in range(20_000)))

    race(grab)
    made = burst + (next(ticks) - 1) * step * qps  # tokens the rate produced until the end
    assert made - 1 <= sum(granted) <= made

    # Waiting callers: each reservation is one token of debt; the last one waits for all.
    ticks = itertools.count()
    waits: list[float] = []
    bucket = TokenBucket(qps=qps, burst=burst, clock=lambda: next(ticks) * step, sleep=waits.append)
    race(lambda: [bucket.acquire() for _ in range(5_000)])
    made = burst + (next(ticks) - 1) * step * qps
    assert max(waits) == pytest.approx((8 * 5_000 - made) / qps, abs=1 / qps)


def race(work: Callable[[], object]) -> None:
    """``work`` on 8 threads, with thread switches forced as often as possible."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=work) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
