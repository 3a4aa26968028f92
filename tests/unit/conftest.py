"""Helpers for the pure unit tests: settings from YAML text, a fixed clock, local CAs."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from ca_daemon.config.settings import Settings, load_settings
from ca_daemon.pki.keys import generate_key
from ca_daemon.pki.profiles import Kind, Subject, capped_validity, sign_certificate

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's own CA_DAEMON_* or KUBECONFIG must not leak into unit tests."""
    import os

    for name in list(os.environ):
        if name.startswith("CA_DAEMON_") or name in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST"):
            monkeypatch.delenv(name)


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    def make(config: dict[str, Any] | None = None, **overrides: Any) -> Settings:
        data: dict[str, Any] = {
            "anchor": {"local": {"dir": str(tmp_path / "data")}},
            "publish": {"kubernetes": {"enabled": False}},
            "kong": {
                "clients": [
                    {
                        "name": "payments",
                        "common_name": "kong.payments.upstream",
                        "dns_names": ["kong.kong.svc.cluster.local"],
                    },
                ]
            },
        }
        data.update(config or {})
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(data))
        return load_settings(path, overrides)

    return make


def self_signed_root(cn: str = "root", now: datetime = NOW, days: int = 365) -> Any:
    key = generate_key()
    validity = capped_validity(now, timedelta(days=days), None)
    return key, sign_certificate(
        Kind.TRUST_ANCHOR, Subject(cn), key.public_key(), key, None, validity
    )
