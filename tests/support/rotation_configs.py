"""Configurations for whole root rotations: short lifetimes, and the instants they start at.

On a simulated clock (``short_lifetimes``, ``short_rotation_settings``, from ``T0``), or in
real time for a running daemon (``real_time_config``: seconds-long certificates).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml

from ca_daemon.config.loading import load_settings
from ca_daemon.config.settings import Settings
from tests.support.servers.tools import free_port

T0 = datetime(2026, 12, 1, tzinfo=UTC)
# The manual request comes an hour after the bootstrap, so the two are separate passes.
REQUEST_AT = T0 + timedelta(hours=1)

PROPAGATION = timedelta(seconds=3)
SKEW = timedelta(seconds=1)


def short_lifetimes(tmp_path: Path, **extra: object) -> dict[str, object]:
    return {
        "anchor": {"local": {"dir": str(tmp_path / "data")}},
        "publish": {"kubernetes": {"enabled": False}},
        "root": {"lifetime": "240h", "rotate_before": "120h"},
        "linkerd": {"issuer": {"lifetime": "48h", "rotate_before": "16h"}},
        "kong": {
            "intermediate": {"lifetime": "100h", "rotate_before": "30h"},
            "clients": [
                {"name": "payments", "common_name": "kong.payments.upstream"},
                {"name": "orders", "common_name": "kong.orders.upstream"},
            ],
        },
        "rotation": {"propagation_delay": "10m", "clock_skew": "5m"},
        **extra,
    }


def short_rotation_config(tmp_path: Path) -> dict[str, object]:
    """Lifetimes short enough that retirement (old chain expired) comes a few hours in;
    the root itself is never due in this window, so the one rotation is the manual one."""
    renewal = {"lifetime": "4h", "rotate_before": "1h"}
    return {
        "anchor": {"local": {"dir": str(tmp_path / "data")}},
        "publish": {"kubernetes": {"enabled": False}},
        "root": {"lifetime": "240h", "rotate_before": "120h"},
        "linkerd": {"issuer": renewal},
        "kong": {
            "intermediate": {"lifetime": "100h", "rotate_before": "30h"},
            "clients": [
                {"name": n, "common_name": f"kong.{n}.upstream", **renewal}
                for n in ("payments", "orders")
            ],
        },
        # concurrency 1: the N-th call is the same call in every run.
        "rotation": {"propagation_delay": "10m", "clock_skew": "5m", "concurrency": 1},
    }


def short_rotation_settings(tmp_path: Path) -> Settings:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(short_rotation_config(tmp_path)))
    return load_settings(path)


def real_time_config(tmp_path: Path) -> Path:
    renewal = {"lifetime": "20s", "rotate_before": "8s"}
    doc = {
        "anchor": {"local": {"dir": str(tmp_path / "data")}},
        "publish": {"kubernetes": {"enabled": False}},
        "server": {"address": f"127.0.0.1:{free_port()}"},
        # The root is never due during the test: the one rotation is the manual one.
        "root": {"lifetime": "2h", "rotate_before": "1h"},
        "linkerd": {"issuer": renewal},
        "kong": {
            "intermediate": {"lifetime": "1h", "rotate_before": "20m"},
            "clients": [{"name": "payments", "common_name": "kong.payments.upstream", **renewal}],
        },
        "rotation": {
            "check_interval": "1s",
            "propagation_delay": f"{int(PROPAGATION.total_seconds())}s",
            "clock_skew": f"{int(SKEW.total_seconds())}s",
            # auto: the old root stays until the old chain (20 s certificates) expired.
            "retire_delay": "auto",
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path
