"""A pass that cannot reach the trust anchor still counts what was due as failed.

With Vault sealed the journal and the anchor are out at once: nothing is tried, yet a
renewal that was due must show in ca_daemon_rotations_total{result="failure"} (the alert
on failed rotations watches it), and the anchor must show down. Real OpenBao, sealed.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from ca_daemon.config.loading import load_settings
from ca_daemon.service.metrics import Metrics
from ca_daemon.service.wiring import build_engine
from tests.support.servers.openbao import own_openbao
from tests.support.servers.tools import unique
from tests.support.vault_helpers import vault_config

pytestmark = pytest.mark.integration


def _count(metrics: Metrics, result: str) -> float:
    value = metrics.registry.get_sample_value(
        "ca_daemon_rotations_total",
        {"kind": "kong-client", "trigger": "schedule", "result": result},
    )
    return value or 0.0


def test_a_due_renewal_with_vault_sealed_counts_as_a_failure(tmp_path: Path) -> None:
    with own_openbao(tmp_path) as bao:
        settings = load_settings(vault_config(tmp_path, bao, unique("sealed")))
        engine = build_engine(settings)
        metrics = Metrics()
        first = engine.reconcile()
        assert first.ok, first.errors
        metrics.observe(first, settings, engine.clock())
        issued = _count(metrics, "success")  # the first issue
        bao.cli("operator", "seal")

        later = engine.clock() + timedelta(days=60)  # the Kong client (30 days) is due
        result = engine.reconcile(now=later)
        metrics.observe(result, settings, later)
        assert not result.ok and not result.anchor_up
        assert metrics.registry.get_sample_value("ca_daemon_anchor_up") == 0
        assert _count(metrics, "failure") == 1
        assert _count(metrics, "success") == issued
        (failed,) = [s for s in result.steps if not s.ok and s.action == "IssueKongClient"]
        assert failed.name == "payments"
        assert "sealed" in (failed.error or "") or "503" in (failed.error or ""), failed.error
