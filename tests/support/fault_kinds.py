"""Real faults a test can inject into the daemon's surroundings and remove again.

Each fault changes a real server (or the network path to it) and never the daemon:

- ``openbao-stopped``: the OpenBao process is killed (SIGKILL), then restarted on the same
  raft storage and unsealed, as after a node failure.
- ``openbao-sealed``: ``bao operator seal``, then unsealed with the server's one key.
- ``token-revoked``: ``bao token revoke`` of the daemon's token; removed by writing a
  new token into the daemon's ``token_file``, as a Vault Agent sidecar would.
- ``apiserver-unreachable``: the daemon reaches the kube-apiserver through a TCP relay,
  which is cut (every connection reset, new ones refused) and opened again. The session's
  apiserver cannot be stopped without taking every other test with it; to the daemon a
  cut relay is the same as a stopped server (connection refused).
- ``rbac-denied``: the RoleBindings and the ClusterRoleBinding ``ca-daemon config rbac``
  printed for the daemon are deleted, so the apiserver answers 403; re-applied after.
- ``kong-stopped``: the Kong Admin API stand-in (tests/support/fake_kong_admin.py) is shut down,
  then started again on the same port with the same store (Kong's database).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
import pytest

from tests.support.fake_kong_admin import FakeKong, KongStore, serve
from tests.support.kube_cluster import await_rbac
from tests.support.relay import Relay
from tests.support.servers.kube import Kube, resource_path
from tests.support.servers.tools import ServerProcess, free_port, require_tool

# --- an OpenBao that survives being killed ----------------------------------------------------


class RaftOpenBao:
    """A real (not -dev) OpenBao server on raft storage under ``workdir``, initialised with
    one unseal key: it can be killed and restarted on the same data, and sealed and
    unsealed. A dev server keeps everything in memory, so it cannot come back."""

    def __init__(self, workdir: Path) -> None:
        self.bao = require_tool("bao")
        self.workdir = workdir
        port, cluster_port = free_port(), free_port()
        self.address = f"http://127.0.0.1:{port}"
        (workdir / "raft").mkdir(parents=True, exist_ok=True)
        self.config = workdir / "bao.hcl"
        self.config.write_text(
            f'storage "raft" {{\n  path = "{workdir / "raft"}"\n  node_id = "node-1"\n}}\n'
            f'listener "tcp" {{\n  address = "127.0.0.1:{port}"\n  tls_disable = true\n}}\n'
            f'api_addr = "{self.address}"\n'
            f'cluster_addr = "http://127.0.0.1:{cluster_port}"\n'
        )
        self._server: ServerProcess | None = None
        self.start()
        init = self._cli(
            "", "operator", "init", "-key-shares=1", "-key-threshold=1", "-format=json"
        )
        answer = json.loads(init.stdout)
        self.root_token: str = answer["root_token"]
        self._unseal_key: str = answer["unseal_keys_b64"][0]
        self.unseal()

    def _health(self) -> int:
        return httpx.get(f"{self.address}/v1/sys/health", timeout=2).status_code

    def _cli(self, token: str, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "BAO_ADDR": self.address, "HOME": str(self.workdir)}
        env.pop("VAULT_TOKEN", None)
        env["BAO_TOKEN"] = token
        return subprocess.run(
            [self.bao, *args],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``bao <args>`` as the root token."""
        return self._cli(self.root_token, *args)

    def start(self) -> None:
        self._server = ServerProcess(
            "bao server (raft)",
            [self.bao, "server", f"-config={self.config}"],
            log_path=self.workdir / "bao.log",
            env={**os.environ, "HOME": str(self.workdir)},
        )
        # 501: not initialised yet; 503: sealed (what a restarted server is).
        self._server.wait_ready(lambda: self._health() in (501, 503))

    def kill(self) -> None:
        """SIGKILL: no shutdown, no seal, as when a node dies."""
        server = self._server
        assert server is not None
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait()
        server.stop()  # closes its log
        self._server = None

    def seal(self) -> None:
        self.cli("operator", "seal")

    def unseal(self) -> None:
        self._cli("", "operator", "unseal", self._unseal_key)
        assert self._server is not None
        # 429 (standby) for a moment after unsealing, then 200: active.
        self._server.wait_ready(lambda: self._health() == 200)

    def create_token(self) -> str:
        """A child of the root token (root policy, default TTL): what the daemon runs with."""
        created = json.loads(self.cli("token", "create", "-policy=root", "-format=json").stdout)
        token: str = created["auth"]["client_token"]
        return token

    def revoke(self, token: str) -> None:
        self.cli("token", "revoke", token)

    @property
    def running(self) -> bool:
        return self._server is not None

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


@pytest.fixture(scope="module")
def raft_bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RaftOpenBao]:
    """An OpenBao that can be killed and sealed, one per test module."""
    server = RaftOpenBao(tmp_path_factory.mktemp("raft-openbao"))
    try:
        yield server
    finally:
        server.stop()


def write_token_file(path: Path, token: str) -> None:
    """Replace the file by rename, as a Vault Agent sidecar (or the kubelet) does."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(token + "\n")
    tmp.chmod(0o600)
    os.replace(tmp, path)


# --- the faults -------------------------------------------------------------------------------


class Fault(Protocol):
    name: str
    vault: bool  # the anchor (and journal) is what fails: ca_daemon_anchor_up must drop
    symptom: str  # lowercase text the daemon's errors must contain while it lasts

    def inject(self) -> None: ...

    def heal(self) -> None: ...


@dataclass
class OpenBaoStopped:
    server: RaftOpenBao
    name: str = "openbao-stopped"
    vault: bool = True
    symptom: str = "unreachable"

    def inject(self) -> None:
        self.server.kill()

    def heal(self) -> None:
        self.server.start()
        self.server.unseal()


@dataclass
class OpenBaoSealed:
    server: RaftOpenBao
    name: str = "openbao-sealed"
    vault: bool = True
    symptom: str = "sealed"

    def inject(self) -> None:
        self.server.seal()

    def heal(self) -> None:
        self.server.unseal()


@dataclass
class TokenRevoked:
    server: RaftOpenBao
    token_file: Path
    name: str = "token-revoked"
    vault: bool = True
    symptom: str = "permission denied"
    tokens: list[str] = field(default_factory=list)  # every token the daemon was given

    def inject(self) -> None:
        self.server.revoke(self.token_file.read_text().strip())

    def heal(self) -> None:
        token = self.server.create_token()
        self.tokens.append(token)
        write_token_file(self.token_file, token)


@dataclass
class ApiserverUnreachable:
    relay: Relay
    name: str = "apiserver-unreachable"
    vault: bool = False
    symptom: str = "api server unreachable"

    def inject(self) -> None:
        self.relay.cut()

    def heal(self) -> None:
        self.relay.open()


@dataclass
class RbacDenied:
    kube: Kube
    token: str  # the daemon's ServiceAccount token
    bindings: list[dict[str, Any]]  # from `ca-daemon config rbac`
    probes: list[str]  # GETs the daemon's Roles allow
    name: str = "rbac-denied"
    vault: bool = False
    symptom: str = "forbidden"

    def inject(self) -> None:
        with self.kube.http() as http:
            for doc in self.bindings:
                http.delete(resource_path(doc)).raise_for_status()
        # The authorizer reads a cache: wait until the apiserver really says 403.
        for path in self.probes:
            await_rbac(self.kube, self.token, path, allowed=False)

    def heal(self) -> None:
        for doc in self.bindings:
            self.kube.apply(doc)
        for path in self.probes:
            await_rbac(self.kube, self.token, path, allowed=True)


class KongServer:
    """The Kong Admin API stand-in, stoppable and restartable on one port and store."""

    def __init__(self, store: KongStore) -> None:
        self.store = store
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._running: AbstractContextManager[FakeKong] | None = None
        self.start()

    def start(self) -> None:
        running = serve(self.store, port=self.port)
        running.__enter__()
        self._running = running

    def stop(self) -> None:
        if self._running is not None:
            self._running.__exit__(None, None, None)
            self._running = None


@dataclass
class KongStopped:
    kong: KongServer
    name: str = "kong-stopped"
    vault: bool = False
    symptom: str = "cannot reach the kong admin api"

    def inject(self) -> None:
        self.kong.stop()

    def heal(self) -> None:
        self.kong.start()


def bindings(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The (Cluster)RoleBindings among ``ca-daemon config rbac`` output."""
    return [d for d in docs if d["kind"] in ("RoleBinding", "ClusterRoleBinding")]
