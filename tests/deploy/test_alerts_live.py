"""The shipped alert rules against a real Prometheus scraping a running daemon.

A Kong client certificate lives 30 s and the daemon checks only hourly, so nothing
renews it: it passes 80% of its lifetime and the renewal-overdue warning fires in
Prometheus. `ca-daemon rotate kong/payments --wait` re-issues it and the alert resolves.
The rule file is the shipped one with every `for:` set to 0s (a test cannot wait 15m);
the expressions are exactly those operators load. The clock skew (by which not-before
is backdated) is 1 s, or a 30 s certificate would start life already "old".
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support.cli import ca_daemon, daemon_env
from tests.support.servers.prometheus import Prometheus, PrometheusFactory
from tests.support.servers.tools import ServerProcess, free_port, log_tail

pytestmark = pytest.mark.integration

RULES = Path(__file__).resolve().parents[2] / "policies" / "prometheus" / "ca-daemon.rules.yaml"
ALERT = "CaDaemonCertificateRenewalOverdue"


def _alerts(prometheus: Prometheus, name: str) -> list[dict[str, object]]:
    data = httpx.get(f"{prometheus.url}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
    return [a for a in data if a["labels"]["alertname"] == name]  # type: ignore[index]


def _until(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_renewal_overdue_fires_and_resolves_after_a_manual_rotation(
    tmp_path: Path, prometheus_factory: PrometheusFactory
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(re.sub(r"(?m)^(\s*)for: .*$", r"\1for: 0s", RULES.read_text()))
    address = f"127.0.0.1:{free_port()}"
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "anchor": {"local": {"dir": str(tmp_path / "data")}},
                "publish": {"kubernetes": {"enabled": False}},
                "server": {"address": address},
                "rotation": {"check_interval": "1h", "clock_skew": "1s"},
                "kong": {
                    "clients": [
                        {
                            "name": "payments",
                            "common_name": "kong.payments.upstream",
                            "lifetime": "30s",
                            "rotate_before": "1s",
                        }
                    ]
                },
            }
        )
    )
    env = daemon_env({"CA_DAEMON_SERVER__ADDRESS": address})
    daemon = ServerProcess(
        "ca-daemon run",
        [sys.executable, "-m", "ca_daemon", "run", "--config", str(config)],
        log_path=tmp_path / "daemon.log",
        env=env,
        cwd=tmp_path,
    )
    try:
        daemon.wait_ready(lambda: _ready(address))
        prometheus = prometheus_factory(
            scrape_configs=[{"job_name": "ca-daemon", "static_configs": [{"targets": [address]}]}],
            rule_files=[rules],
        )
        prometheus.wait_for('ca_daemon_certificate_not_after_timestamp_seconds{kind="kong-client"}')
        # Not yet at 80%: the warning is not there.
        assert not [a for a in _alerts(prometheus, ALERT) if a["state"] == "firing"]

        def firing() -> bool:
            return any(
                a["state"] == "firing" and a["labels"]["name"] == "payments"  # type: ignore[index]
                for a in _alerts(prometheus, ALERT)
            )

        _until(firing, 60, f"{ALERT} to fire")
        (alert,) = [a for a in _alerts(prometheus, ALERT) if a["state"] == "firing"]
        assert alert["labels"]["severity"] == "warning"  # type: ignore[index]
        assert "kong/payments" in alert["annotations"]["runbook"]  # type: ignore[index]

        rotated = ca_daemon(
            "rotate", "kong/payments", "--wait", "--config", str(config), "--url",
            f"http://{address}", cwd=tmp_path, env=env,
        )  # fmt: skip
        assert rotated.returncode == 0, rotated.stdout + rotated.stderr
        assert "succeeded" in rotated.stdout
        _until(lambda: not _alerts(prometheus, ALERT), 30, f"{ALERT} to resolve")
    except AssertionError:
        print(log_tail(tmp_path / "daemon.log"))
        raise
    finally:
        daemon.stop()


def _ready(address: str) -> bool:
    try:
        return httpx.get(f"http://{address}/readyz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False
