"""The long-running daemon: it renews on its schedule with a new key, and stops cleanly.

Renewal is tested in-process on a simulated clock (the loop's scheduler and clock are
injected), so two days of schedule take a moment and the renewing pass is known
exactly. The real process is started once, for start-up and SIGTERM.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from ca_daemon.config.loading import load_settings
from ca_daemon.config.settings import Settings
from ca_daemon.daemon import run_forever
from ca_daemon.pki.bundle import parse_pem_certificates
from ca_daemon.pki.keys import key_matches_certificate, load_private_key
from ca_daemon.rotation.results import PassResult
from ca_daemon.service.metrics import Metrics
from ca_daemon.service.wiring import build_engine
from tests.support.cli import daemon_env
from tests.support.clock import NOW

pytestmark = pytest.mark.integration

INTERVAL = timedelta(hours=1)
LIFETIME = timedelta(hours=48)
ROTATE_BEFORE = timedelta(hours=16)


@dataclass
class SimulatedClock:
    now: datetime = NOW

    def __call__(self) -> datetime:
        return self.now


@dataclass
class SteppingScheduler:
    """Runs the job ``passes`` times, moving the clock one interval between passes."""

    clock: SimulatedClock
    passes: int
    after_pass: Callable[[], None]
    intervals: list[float] = field(default_factory=list)
    stopped: bool = False

    def add_job(self, func: Callable[[], None], trigger: str, **kwargs: Any) -> None:
        assert trigger == "interval"
        self.intervals.append(kwargs["seconds"])
        self.job = func

    def start(self) -> None:
        for _ in range(self.passes):
            if self.stopped:
                return
            self.job()
            self.after_pass()
            self.clock.now += timedelta(seconds=self.intervals[0])

    def shutdown(self, wait: bool = True) -> None:
        self.stopped = True


class RecordingMetrics(Metrics):
    def __init__(self) -> None:
        super().__init__()
        self.times: list[datetime] = []
        self.results: list[PassResult] = []

    def observe(
        self, result: PassResult, settings: Settings, now: datetime, *args: Any, **kwargs: Any
    ) -> None:
        self.times.append(now)
        self.results.append(result)
        super().observe(result, settings, now, *args, **kwargs)


def _settings(tmp_path: Path) -> Settings:
    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "anchor": {"local": {"dir": str(tmp_path / "data")}},
                "publish": {"kubernetes": {"enabled": False}},
                "kong": {"enabled": False},
                "rotation": {
                    "check_interval": f"{int(INTERVAL.total_seconds())}s",
                    "jitter": 0.0,
                    "clock_skew": "0s",
                },
                "linkerd": {"issuer": {"lifetime": "48h", "rotate_before": "16h"}},
            }
        )
    )
    return load_settings(path)


def _read_issuer(out: Path) -> tuple[bytes, bytes]:
    """tls.crt and tls.key of one published set (same ..data before and after)."""
    while True:
        before = os.readlink(out / "..data")
        pair = (out / "linkerd/tls.crt").read_bytes(), (out / "linkerd/tls.key").read_bytes()
        if os.readlink(out / "..data") == before:
            return pair


def test_the_loop_renews_the_issuer_when_due_on_its_clock(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    out = settings.publish_directory
    clock = SimulatedClock()
    seen: list[tuple[datetime, bytes, bytes]] = []
    metrics = RecordingMetrics()
    not_after: list[float | None] = []  # the exported metric after each pass

    def after_pass() -> None:
        seen.append((clock.now, *_read_issuer(out)))
        not_after.append(
            metrics.registry.get_sample_value(
                "ca_daemon_certificate_not_after_timestamp_seconds",
                {"kind": "linkerd-issuer", "name": "linkerd-identity-issuer", "state": "active"},
            )
        )

    scheduler = SteppingScheduler(clock, passes=40, after_pass=after_pass)
    run_forever(settings, build_engine(settings), metrics, clock=clock, scheduler=scheduler)

    assert scheduler.intervals == [INTERVAL.total_seconds()]
    # Every pass decided and reported on the simulated clock, one interval apart.
    assert metrics.times == [NOW + n * INTERVAL for n in range(40)]
    assert all(r.ok for r in metrics.results), [r.errors for r in metrics.results]

    # The issuer changes exactly twice: issued on the first pass, renewed on the first
    # pass at or after not_after - rotate_before (32h later), and never otherwise.
    changes = [i for i in range(1, len(seen)) if seen[i][1] != seen[i - 1][1]]
    due = int((LIFETIME - ROTATE_BEFORE) / INTERVAL)
    assert changes == [due], changes
    first_crt, first_key = seen[0][1], seen[0][2]
    renewed_at, crt, key = seen[due]
    assert key != first_key  # a new key with every renewal
    (cert,) = parse_pem_certificates(crt)
    (first,) = parse_pem_certificates(first_crt)
    assert first.not_valid_before_utc == NOW
    assert cert.not_valid_before_utc == renewed_at
    assert cert.not_valid_after_utc == renewed_at + LIFETIME
    for at, crt, key in seen:
        assert key_matches_certificate(load_private_key(key), parse_pem_certificates(crt)[0]), at
    assert (out / "linkerd/tls.key").stat().st_mode & 0o777 == 0o600
    # The running daemon's not-after metric follows the renewal.
    assert not_after[:due] == [first.not_valid_after_utc.timestamp()] * due
    assert not_after[due:] == [cert.not_valid_after_utc.timestamp()] * (len(seen) - due)


def test_a_sigterm_stops_the_loop_in_process(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    clock = SimulatedClock()
    passes: list[datetime] = []

    def after_pass() -> None:
        passes.append(clock.now)
        if len(passes) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # handled by run_forever's handler

    scheduler = SteppingScheduler(clock, passes=10, after_pass=after_pass)
    before = signal.getsignal(signal.SIGTERM)
    run_forever(settings, build_engine(settings), clock=clock, scheduler=scheduler)
    assert scheduler.stopped and len(passes) == 3
    assert signal.getsignal(signal.SIGTERM) == before  # handlers are given back


def _wait_for(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError("condition not reached")


def test_the_real_daemon_starts_publishes_and_stops_on_sigterm(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "ca_daemon", "run"],
        cwd=tmp_path,
        env=daemon_env({"CA_DAEMON_ROTATION__CHECK_INTERVAL": "1s"}),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out = tmp_path / "ca-daemon-data" / "out"
    try:
        _wait_for((out / "..data").exists)
        crt, key = _read_issuer(out)
        assert key_matches_certificate(load_private_key(key), parse_pem_certificates(crt)[0])
        assert (out / "linkerd/tls.key").stat().st_mode & 0o777 == 0o600
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output
    assert "IssueLinkerdIssuer linkerd-identity-issuer: missing" in output
    assert "signal SIGTERM: stopping" in output
    assert "PRIVATE KEY" not in output
