"""Settings for tests: from YAML text, and an environment cleaned of the developer's own.

A pytest plugin (``tests/conftest.py`` loads it): ``make_settings`` is a fixture, and
``clean_env`` is one that the server-free test modules ask for with
``pytestmark = pytest.mark.usefixtures("clean_env")``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from ca_daemon.config.loading import load_settings
from ca_daemon.config.settings import Settings


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
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


def local_config(tmp_path: Path, **sections: Any) -> Path:
    """config.yaml in ``tmp_path``: the embedded default's local anchor (in ``data``) and
    directory publishing, Kubernetes off, plus ``sections``."""
    path = tmp_path / "config.yaml"
    data = {
        "anchor": {"local": {"dir": str(tmp_path / "data")}},
        "publish": {"kubernetes": {"enabled": False}},
        **sections,
    }
    path.write_text(yaml.safe_dump(data))
    return path


def numbered_clients(count: int) -> dict[str, Any]:
    """A ``kong`` section with ``count`` clients, c0000 to c<count-1>."""
    return {
        "clients": [
            {"name": f"c{i:04d}", "common_name": f"kong.c{i:04d}.upstream"} for i in range(count)
        ]
    }


def two_clients(tmp_path: Path) -> Settings:
    """The embedded default's local anchor and directory with two Kong clients."""
    clients = [
        {"name": "payments", "common_name": "kong.payments.upstream"},
        {"name": "orders", "common_name": "kong.orders.upstream"},
    ]
    return load_settings(local_config(tmp_path, kong={"clients": clients}))
