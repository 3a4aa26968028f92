"""Vault goes away under a running daemon: passes are retried sooner than the interval
and then later and later (2s doubling, jittered, capped at ``check_interval``), the
published credentials stay as they were, the failure and the backoff show in /metrics
(``ca_daemon_consecutive_failures``, ``ca_daemon_backoff_seconds``) and /v1/status, and
the work resumes by itself when Vault answers again.

``ca-daemon run`` on real OpenBao (mounts and journal unique to the test), reached
through a TCP relay this test owns: closing the relay (and every connection through
it) is Vault down for the daemon; opening it again is Vault back.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest
import yaml

from ca_daemon.anchor.local import LocalAnchor, load_or_create_passphrase
from ca_daemon.config.loading import load_settings
from ca_daemon.errors import AnchorError
from ca_daemon.journal.open import file_journal
from ca_daemon.publish.directory import DirectoryPublisher
from ca_daemon.publish.kong_admin import KongAdminPublisher
from ca_daemon.rotation.engine import Engine
from tests.support.cli import daemon_env
from tests.support.clock import NOW
from tests.support.fake_kong_admin import FakeKong, serve
from tests.support.relay import Relay
from tests.support.servers.openbao import OpenBao
from tests.support.servers.tools import ServerProcess, log_tail, unique

pytestmark = pytest.mark.integration

CHECK_INTERVAL = 10


def _events(log: Path) -> list[dict[str, Any]]:
    events = []
    for line in log.read_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and "message" in event:
            events.append(event)
    return events


def _at(event: dict[str, Any]) -> float:
    return datetime.strptime(event["time"], "%Y-%m-%dT%H:%M:%S.%fZ").timestamp()


FAILURES = "ca_daemon_consecutive_failures"
BACKOFF = "ca_daemon_backoff_seconds"


def _retry_line(message: str) -> tuple[float, float]:
    """(failures in a row, delay) from "pass failed (N in a row); retrying in D.Ds"."""
    in_a_row = message.split(" (", 1)[1].split(" ", 1)[0]
    delay = message.rsplit("retrying in ", 1)[1].removesuffix("s")
    return float(in_a_row), float(delay)


def _metric(url: str, name: str) -> float | None:
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rpartition(" ")[2])
    return None


def test_vault_down_retries_back_off_credentials_stay_and_work_resumes(
    openbao: OpenBao, tmp_path: Path
) -> None:
    bao = urlparse(openbao.address)
    relay = Relay((bao.hostname or "127.0.0.1", bao.port or 8200))
    relay.open()
    token_file = tmp_path / "vault-token"
    token_file.write_text(openbao.token + "\n")
    token_file.chmod(0o600)
    mounts = unique("backoff")
    # The issuer falls due 15s after it is issued: while Vault is down.
    config = {
        "anchor": {
            "backend": "vault",
            "local": {"dir": str(tmp_path / "data")},
            "vault": {
                "address": f"http://127.0.0.1:{relay.port}",
                "auth": {"method": "token", "token_file": str(token_file)},
                "root_mount": f"{mounts}-root",
                "kong_mount": f"{mounts}-kong",
                "state_path": f"ca-daemon/{mounts}",
                "timeout": "3s",
            },
        },
        "publish": {"kubernetes": {"enabled": False}, "directory": str(tmp_path / "out")},
        "server": {"token_file": str(tmp_path / "api-token")},
        "kong": {"enabled": False},
        "linkerd": {"issuer": {"lifetime": "40s", "rotate_before": "25s"}},
        "rotation": {"check_interval": f"{CHECK_INTERVAL}s", "clock_skew": "1s"},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    settings = load_settings(path)
    out = settings.publish_directory
    env = daemon_env()
    url = "http://" + env["CA_DAEMON_SERVER__ADDRESS"]
    log = tmp_path / "daemon.log"
    daemon = ServerProcess(
        "ca-daemon run",
        [sys.executable, "-m", "ca_daemon", "run", "--config", str(path)],
        log_path=log,
        env=env,
        cwd=tmp_path,
    )
    try:
        daemon.wait_ready(lambda: (out / "linkerd" / "tls.crt").exists(), timeout=60)
        issued = (out / "linkerd" / "tls.crt").read_bytes()
        daemon.wait_ready(lambda: _metric(url, "ca_daemon_anchor_up") == 1.0)
        assert _metric(url, FAILURES) == 0.0 and _metric(url, BACKOFF) == 0.0

        relay.cut()  # Vault down from the next pass on
        cut_at = time.time()

        def retries() -> list[dict[str, Any]]:
            return [
                e
                for e in _events(log)
                if e["message"].startswith("pass failed") and _at(e) >= cut_at
            ]

        daemon.wait_ready(lambda: len(retries()) >= 4, timeout=CHECK_INTERVAL + 30)
        failed = retries()
        times = [_at(e) for e in failed]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        # 2s, 4s, 8s, each jittered down by at most a fifth; then capped at the interval.
        for gap, nominal in zip(gaps, (2, 4, 8), strict=False):
            assert nominal * 0.8 - 0.2 <= gap <= nominal + 1.0, (gaps, log_tail(log))
        assert gaps == sorted(gaps), gaps
        assert [e["message"].split(" (")[1].split(" ")[0] for e in failed[:4]] == [
            "1",
            "2",
            "3",
            "4",
        ]
        assert "retrying in" in failed[0]["message"]
        # The gauges say what the last retry line says: how many in a row, how long.
        shown: list[tuple[str, float | None, float | None]] = []

        def gauges_agree_with_the_log() -> bool:
            last = retries()[-1]["message"]
            failures, backoff = _metric(url, FAILURES), _metric(url, BACKOFF)
            shown[:] = [(last, failures, backoff)]
            if retries()[-1]["message"] != last or failures is None or backoff is None:
                return False  # a retry in between: look again
            in_a_row, delay = _retry_line(last)
            return failures == in_a_row and abs(backoff - delay) <= 0.05  # logged as %.1f

        daemon.wait_ready(gauges_agree_with_the_log, timeout=CHECK_INTERVAL + 5)
        ((_, failures, backoff),) = shown
        assert failures is not None and failures >= 4, shown
        assert backoff is not None and 0 < backoff <= CHECK_INTERVAL, shown
        # Visible while it lasts, and nothing published was touched.
        assert _metric(url, "ca_daemon_anchor_up") == 0.0
        token = (tmp_path / "api-token").read_text().strip()
        status = httpx.get(
            f"{url}/v1/status", headers={"Authorization": f"Bearer {token}"}, timeout=10
        ).json()
        assert status["last_pass"]["ok"] is False and status["last_pass"]["errors"], status
        assert (out / "linkerd" / "tls.crt").read_bytes() == issued

        relay.open()  # Vault back: the next retry (at most the interval away) succeeds
        restored = time.time()
        daemon.wait_ready(
            lambda: (out / "linkerd" / "tls.crt").read_bytes() != issued,
            timeout=CHECK_INTERVAL + 10,
        )

        def recoveries() -> list[dict[str, Any]]:
            return [e for e in _events(log) if e["message"].startswith("pass succeeded after")]

        # The pass logs its success a moment after it published.
        daemon.wait_ready(lambda: bool(recoveries()), timeout=10)
        recovered = recoveries()
        assert _at(recovered[-1]) - restored <= CHECK_INTERVAL + 1, recovered
        assert _metric(url, "ca_daemon_anchor_up") == 1.0
        # Set after the pass that published: wait for it, then both are back to 0.
        daemon.wait_ready(lambda: _metric(url, FAILURES) == 0.0, timeout=5)
        assert _metric(url, BACKOFF) == 0.0
        # Back to the interval: no retry after the recovery.
        time.sleep(3)
        assert not [e for e in retries() if _at(e) > _at(recovered[-1])]
    finally:
        relay.cut()
        daemon.stop()


# --- one target failing never blocks the other ----------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


class _NoIssuerSigning:
    """The local anchor, except that signing the Linkerd issuer (a CA) fails."""

    def __init__(self, inner: LocalAnchor) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def sign_ca(self, *args: Any, **kwargs: Any) -> Any:
        raise AnchorError("sign the Linkerd issuer: permission denied (injected)")


def _containment_engine(
    tmp_path: Path, kong_url: str, anchor_wrapper: Any = None
) -> tuple[Engine, _Clock, Path]:
    token_file = tmp_path / "kong-token"
    token_file.write_text("kong-token\n")
    renewal = {"lifetime": "48h", "rotate_before": "16h"}
    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "anchor": {"local": {"dir": str(tmp_path / "data")}},
                "publish": {"kubernetes": {"enabled": False}, "directory": str(tmp_path / "out")},
                "linkerd": {"issuer": renewal},
                "kong": {
                    "delivery": "admin-api",
                    "admin_api": {"url": kong_url, "token_file": str(token_file)},
                    "clients": [
                        {
                            "name": "payments",
                            "common_name": "kong.payments.upstream",
                            "service": "payments-api",
                            **renewal,
                        }
                    ],
                },
                "rotation": {"clock_skew": "0s", "jitter": 0.0},
            }
        )
    )
    settings = load_settings(path)
    passphrase = load_or_create_passphrase(settings.anchor.local.effective_passphrase_file)
    anchor: Any = LocalAnchor(settings.anchor.local.dir, passphrase)
    if anchor_wrapper is not None:
        anchor = anchor_wrapper(anchor)
    clock = _Clock()
    publishers = [
        DirectoryPublisher(settings.publish_directory),
        KongAdminPublisher(settings.kong),
    ]
    engine = Engine(settings, anchor, file_journal(settings, passphrase), publishers, clock=clock)
    return engine, clock, settings.publish_directory


def _kong_certs(kong: FakeKong) -> set[str]:
    return {e["cert"] for e in kong.store.table("certificates").values()}


def _fake_kong() -> Any:
    fake = serve()
    kong = fake.__enter__()
    kong.store.token = "kong-token"
    kong.store.clock = lambda: NOW
    kong.store.add_service("payments-api", protocol="https")
    return fake, kong


def test_kong_admin_down_does_not_block_the_linkerd_issuer_renewal(tmp_path: Path) -> None:
    fake, kong = _fake_kong()
    try:
        engine, clock, out = _containment_engine(tmp_path, kong.url)
        first = engine.reconcile()
        assert first.ok, first.errors
        in_kong = _kong_certs(kong)
    finally:
        fake.__exit__(None, None, None)  # the Kong Admin API is gone
    issuer = (out / "linkerd" / "tls.crt").read_bytes()
    clock.now += timedelta(hours=33)  # the issuer and the Kong client are both due
    result = engine.reconcile()
    assert not result.ok and any("kong" in e.lower() for e in result.errors), result.errors
    renewed = {s.action: s.ok for s in result.steps}
    assert renewed.get("IssueLinkerdIssuer") is True, result.steps
    assert (out / "linkerd" / "tls.crt").read_bytes() != issuer  # published all the same
    state = engine.journal.load().state
    assert state.linkerd_issuer is not None
    assert state.linkerd_issuer.cert.not_valid_before_utc == clock.now
    assert in_kong  # what Kong had is untouched (it was not there to change)


def test_a_failing_issuer_signing_does_not_block_a_kong_client_renewal(tmp_path: Path) -> None:
    fake, kong = _fake_kong()
    try:
        engine, clock, out = _containment_engine(tmp_path, kong.url)
        first = engine.reconcile()
        assert first.ok, first.errors
        in_kong = _kong_certs(kong)
        issuer = (out / "linkerd" / "tls.crt").read_bytes()
        # The same data, through an anchor that cannot sign the issuer any more.
        failing, _, _ = _containment_engine(tmp_path, kong.url, _NoIssuerSigning)
        failing.clock = clock
        clock.now += timedelta(hours=33)
        result = failing.reconcile()
        steps = {s.action: s.ok for s in result.steps}
        assert steps.get("IssueLinkerdIssuer") is False, result.steps
        assert steps.get("IssueKongClient") is True, result.steps
        assert _kong_certs(kong) != in_kong  # the renewed client reached Kong
        assert (out / "linkerd" / "tls.crt").read_bytes() == issuer  # the last valid one stays
    finally:
        fake.__exit__(None, None, None)
