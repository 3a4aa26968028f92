"""The long-running daemon: it renews on its schedule with a new key, and stops cleanly."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.cli import daemon_env

pytestmark = pytest.mark.integration


def _wait_for(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError("condition not reached")


def test_running_daemon_renews_the_issuer_and_stops_on_sigterm(tmp_path: Path) -> None:
    # A tiny issuer lifetime so that renewal comes due while the test watches.
    env = daemon_env(
        {
            "CA_DAEMON_ROTATION__CHECK_INTERVAL": "1s",
            "CA_DAEMON_LINKERD__ISSUER__LIFETIME": "8s",
            "CA_DAEMON_LINKERD__ISSUER__ROTATE_BEFORE": "6s",
            "CA_DAEMON_ROTATION__CLOCK_SKEW": "0s",
        }
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "ca_daemon", "run"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    crt = tmp_path / "ca-daemon-data" / "out" / "linkerd" / "tls.crt"
    key = crt.with_name("tls.key")
    try:
        _wait_for(crt.exists)
        first_crt, first_key = crt.read_bytes(), key.read_bytes()
        _wait_for(lambda: crt.read_bytes() != first_crt)
        assert key.read_bytes() != first_key  # a new key with every renewal
        assert key.stat().st_mode & 0o777 == 0o600
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output
    assert "IssueLinkerdIssuer linkerd-identity-issuer: due" in output
    assert "signal SIGTERM: stopping" in output
    assert "PRIVATE KEY" not in output
