"""The helm binary (built by scripts/testenv), isolated from the user's helm config."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.servers.tools import require_tool


@dataclass(frozen=True)
class Helm:
    path: str
    home: Path  # HELM_CACHE_HOME/CONFIG_HOME/DATA_HOME live here, not in ~

    def run(
        self, *args: str, check: bool = True, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run `helm <args>`; add `--kubeconfig FILE` yourself to talk to the `kube` fixture."""
        env = {
            **os.environ,
            "HELM_CACHE_HOME": str(self.home / "cache"),
            "HELM_CONFIG_HOME": str(self.home / "config"),
            "HELM_DATA_HOME": str(self.home / "data"),
        }
        return subprocess.run(
            [self.path, *args],
            env=env,
            cwd=cwd,
            capture_output=True,
            text=True,
            check=check,
            timeout=120,
        )


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    return Helm(path=require_tool("helm"), home=tmp_path_factory.mktemp("helm-home"))
