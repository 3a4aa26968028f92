"""Running the ca-daemon command as a user would, in an environment of its own."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from tests.support.servers.tools import free_port

# The developer's own settings must not leak into a test's daemon.
_FOREIGN = ("CA_DAEMON_", "VAULT_", "BAO_")
_FOREIGN_NAMES = ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")


def daemon_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(_FOREIGN) and k not in _FOREIGN_NAMES
    }
    # Each daemon's API on a port of its own: tests run daemons side by side.
    env["CA_DAEMON_SERVER__ADDRESS"] = f"127.0.0.1:{free_port()}"
    return env | dict(extra or {})


def ca_daemon(
    *args: str, cwd: Path, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m ca_daemon ARGS`` in ``cwd``; ``env`` adds to the clean environment."""
    return subprocess.run(
        [sys.executable, "-m", "ca_daemon", *args],
        cwd=cwd,
        env=daemon_env(env),
        capture_output=True,
        text=True,
        timeout=120,
    )
