"""Running the ca-daemon command as a user would, in an environment of its own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.servers.tools import ServerProcess, free_port, log_tail

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


@dataclass
class DaemonProcess:
    """``python -m ca_daemon run --config CONFIG`` as a process of its own (log in ``log``),
    started again after each SIGKILL, for the kill -9 tests."""

    config: Path
    log: Path
    process: ServerProcess | None = None
    kills: list[str] = field(default_factory=list)

    def start(self) -> None:
        self.process = ServerProcess(
            "ca-daemon run",
            [sys.executable, "-m", "ca_daemon", "run", "--config", str(self.config)],
            log_path=self.log,
            env=daemon_env(),
            cwd=self.config.parent,
        )

    def kill9(self, why: str) -> None:
        assert self.process is not None
        proc = self.process.proc
        assert proc.poll() is None, f"the daemon had exited:\n{log_tail(self.log)}"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
        self.process.stop()  # closes the log
        self.kills.append(why)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def alive(self) -> None:
        assert self.process is not None
        assert self.process.proc.poll() is None, f"the daemon exited:\n{log_tail(self.log)}"
