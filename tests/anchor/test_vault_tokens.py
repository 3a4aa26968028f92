"""The Vault token's life while the daemon runs: renewal, new logins, a rewritten token
file, a replaced projected ServiceAccount token — on the shipped least-privilege policy.

Each test runs ``ca-daemon run`` for real against an OpenBao dev server of its own
(this module's), so the default mount names the policy is written for are free.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from ca_daemon.anchor.vault.client import VaultClient
from ca_daemon.anchor.vault.pki import VaultPkiAnchor
from ca_daemon.config.settings import VaultAnchor, VaultAuth
from tests.support.cli import daemon_env
from tests.support.servers.kube import Kube
from tests.support.servers.openbao import OpenBao, own_openbao
from tests.support.servers.tools import ServerProcess, log_tail, running, unique

pytestmark = pytest.mark.integration

POLICY = Path(__file__).resolve().parents[2] / "policies" / "vault-policy.hcl"
CLIENT = "payments"


@pytest.fixture(scope="module")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBao]:
    """An OpenBao of this module's own, set up once as an administrator would."""
    with own_openbao(tmp_path_factory.mktemp("openbao-tokens"), "bao (tokens)") as handle:
        address, token = handle.address, handle.token
        admin = VaultAnchor(address=address, auth=VaultAuth(token=token))
        VaultPkiAnchor(VaultClient(admin)).check()  # mounts and the kong-client role
        handle.cli("policy", "write", "ca-daemon", str(POLICY))
        yield handle


def daemon_config(workdir: Path, bao: OpenBao, auth: dict[str, Any]) -> Path:
    """The policy's default paths; the tests run one after another and share the CA."""
    short = {"lifetime": "10s", "rotate_before": "4s"}
    doc = {
        "anchor": {
            "backend": "vault",
            "local": {"dir": str(workdir / "data")},
            "vault": {
                "address": bao.address,
                "create_if_missing": False,
                "auth": auth,
            },
        },
        "publish": {"kubernetes": {"enabled": False}, "directory": str(workdir / "out")},
        "linkerd": {"enabled": False},
        "kong": {"clients": [{"name": CLIENT, "common_name": "kong.payments.upstream", **short}]},
        "rotation": {"check_interval": "1s", "clock_skew": "1s"},
    }
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def start(config: Path) -> ServerProcess:
    return ServerProcess(
        "ca-daemon run",
        [sys.executable, "-m", "ca_daemon", "run", "--config", str(config)],
        log_path=config.parent / "daemon.log",
        env=daemon_env(),
        cwd=config.parent,
    )


class Serials:
    """Distinct serials of the Kong client certificate seen in the published directory."""

    def __init__(self, out: Path) -> None:
        self.path = out / "kong" / "clients" / CLIENT / "tls.crt"
        self.seen: list[int] = []

    def poll(self) -> None:
        try:
            cert = x509.load_pem_x509_certificates(self.path.read_bytes())[0]
        except (OSError, ValueError, IndexError):
            return
        if cert.serial_number not in self.seen:
            self.seen.append(cert.serial_number)

    def watch(self, daemon: ServerProcess, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            assert daemon.proc.poll() is None, f"daemon exited:\n{log_tail(daemon.log_path)}"
            self.poll()
            time.sleep(0.3)

    def wait_first(self, daemon: ServerProcess, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not self.seen and time.monotonic() < deadline:
            self.watch(daemon, 0.5)
        assert self.seen, f"nothing published:\n{log_tail(daemon.log_path)}"


def write_secret(path: Path, value: str) -> None:
    """Replace the file by rename, as a Vault Agent or the kubelet does."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(value + "\n")
    tmp.chmod(0o600)
    tmp.replace(path)


def test_approle_tokens_of_8s_keep_a_short_lived_client_renewed(
    bao: OpenBao, tmp_path: Path
) -> None:
    mount = unique("approle")
    bao.cli("auth", "enable", f"-path={mount}", "approle")
    bao.cli(
        "write",
        f"auth/{mount}/role/ca-daemon",
        "token_policies=ca-daemon",
        "token_no_default_policy=true",
        "token_ttl=8s",
        # Renewal alone cannot carry a minute: the daemon must log in again.
        "token_max_ttl=20s",
    )
    role_id = bao.cli("read", "-field=role_id", f"auth/{mount}/role/ca-daemon/role-id")
    secret_id = bao.cli("write", "-f", "-field=secret_id", f"auth/{mount}/role/ca-daemon/secret-id")
    secret_file = tmp_path / "secret-id"
    write_secret(secret_file, secret_id.stdout.strip())
    auth = {
        "method": "approle",
        "mount": mount,
        "role_id": role_id.stdout.strip(),
        "secret_id_file": str(secret_file),
    }
    config = daemon_config(tmp_path, bao, auth)
    serials = Serials(tmp_path / "out")
    with running(start(config)) as daemon:
        serials.wait_first(daemon)
        serials.watch(daemon, 62)
    log = daemon.log_path.read_text()
    assert "permission denied" not in log, log_tail(daemon.log_path)
    assert len(serials.seen) >= 8, (serials.seen, log_tail(daemon.log_path))
    assert "logging in again" in log  # the max TTL was reached at least twice
    assert secret_id.stdout.strip() not in log


def test_a_rewritten_token_file_is_used_before_the_old_token_is_revoked(
    bao: OpenBao, tmp_path: Path
) -> None:
    def new_token() -> str:
        created = bao.cli(
            "token",
            "create",
            "-policy=ca-daemon",
            "-no-default-policy",
            "-ttl=10m",
            "-format=json",
        )
        token: str = json.loads(created.stdout)["auth"]["client_token"]
        return token

    old, new = new_token(), new_token()
    token_file = tmp_path / "vault-token"
    write_secret(token_file, old)
    auth = {"method": "token", "token_file": str(token_file)}
    config = daemon_config(tmp_path, bao, auth)
    serials = Serials(tmp_path / "out")
    with running(start(config)) as daemon:
        serials.wait_first(daemon)
        write_secret(token_file, new)  # the Vault Agent sidecar writes a new token
        serials.watch(daemon, 3)
        bao.cli("token", "revoke", old)
        before = len(serials.seen)
        serials.watch(daemon, 16)
    log = daemon.log_path.read_text()
    assert len(serials.seen) >= before + 2, (serials.seen, log_tail(daemon.log_path))
    assert "changed; using the new token" in log
    # Switched on the change itself, not by failing with the revoked token first.
    assert "no longer valid" not in log and "permission denied" not in log, log
    assert old not in log and new not in log


def test_kubernetes_auth_logs_in_again_with_the_replaced_projected_token(
    bao: OpenBao, kube: Kube, tmp_path: Path
) -> None:
    ns = unique("vault-k8s")
    kube.create_namespace(ns)
    kube.create_service_account(ns, "ca-daemon")
    mount = unique("k8s")
    bao.cli("auth", "enable", f"-path={mount}", "kubernetes")
    bao.cli(
        "write",
        f"auth/{mount}/config",
        f"kubernetes_host={kube.server}",
        f"kubernetes_ca_cert=@{kube.ca_file}",
        f"token_reviewer_jwt={kube.admin_token}",
    )
    bao.cli(
        "write",
        f"auth/{mount}/role/ca-daemon",
        "bound_service_account_names=ca-daemon",
        f"bound_service_account_namespaces={ns}",
        "audience=vault",
        "token_policies=ca-daemon",
        "token_no_default_policy=true",
        "token_ttl=8s",
        "token_max_ttl=8s",  # never renewable past its first TTL: every 8 s a new login
    )
    jwt_file = tmp_path / "token"
    write_secret(jwt_file, kube.service_account_token(ns, "ca-daemon", audiences=["vault"]))
    auth = {"method": "kubernetes", "role": "ca-daemon", "mount": mount, "jwt_file": str(jwt_file)}
    config = daemon_config(tmp_path, bao, auth)
    serials = Serials(tmp_path / "out")
    with running(start(config)) as daemon:
        serials.wait_first(daemon)
        # The ServiceAccount is re-created: its old token no longer passes a TokenReview;
        # the kubelet would now project a token of the new one.
        with kube.http() as http:
            http.delete(f"/api/v1/namespaces/{ns}/serviceaccounts/ca-daemon").raise_for_status()
        kube.create_service_account(ns, "ca-daemon")
        write_secret(jwt_file, kube.service_account_token(ns, "ca-daemon", audiences=["vault"]))
        replaced_at = daemon.log_path.read_text().count("logging in again")
        before = len(serials.seen)
        serials.watch(daemon, 24)
    log = daemon.log_path.read_text()
    assert log.count("logging in again") > replaced_at, log_tail(daemon.log_path)
    assert "kubernetes login" not in log, log_tail(daemon.log_path)
    assert len(serials.seen) >= before + 2, (serials.seen, log_tail(daemon.log_path))


def _approle_client(bao: OpenBao, tmp_path: Path, ttl: str, max_ttl: str) -> VaultClient:
    """A client of the shipped policy logging in with an AppRole of this test's own."""
    mount = unique("approle")
    bao.cli("auth", "enable", f"-path={mount}", "approle")
    bao.cli(
        "write",
        f"auth/{mount}/role/ca-daemon",
        "token_policies=ca-daemon",
        "token_no_default_policy=true",
        f"token_ttl={ttl}",
        f"token_max_ttl={max_ttl}",
    )
    role_id = bao.cli("read", "-field=role_id", f"auth/{mount}/role/ca-daemon/role-id")
    secret_id = bao.cli("write", "-f", "-field=secret_id", f"auth/{mount}/role/ca-daemon/secret-id")
    secret_file = tmp_path / "secret-id"
    write_secret(secret_file, secret_id.stdout.strip())
    auth = VaultAuth(
        method="approle",
        mount=mount,
        role_id=role_id.stdout.strip(),
        secret_id_file=secret_file,
    )
    return VaultClient(VaultAnchor(address=bao.address, auth=auth, create_if_missing=False))


def _accessor(bao: OpenBao, token: str) -> str:
    looked = bao.cli("token", "lookup", "-format=json", token)
    return str(json.loads(looked.stdout)["data"]["accessor"])


def _issuers(client: VaultClient) -> Any:
    # Authenticated (LIST issuers is not, on PKI mounts): a revoked token gets 403 here.
    return client.read("pki-root/config/issuers", "read the default issuer")


def test_a_token_revoked_mid_life_is_replaced_by_one_new_login(
    bao: OpenBao, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = _approle_client(bao, tmp_path, ttl="1h", max_ttl="2h")
    assert _issuers(client) is not None
    first = client.hvac.token
    bao.cli("token", "revoke", first)
    with caplog.at_level(logging.INFO, logger="ca_daemon.anchor.vault.client"):
        assert _issuers(client) is not None  # the same call succeeds, after one new login
    assert client.hvac.token != first
    logins = [r for r in caplog.records if "logging in again" in r.getMessage()]
    assert len(logins) == 1, caplog.text


def test_a_renewable_token_is_renewed_not_replaced(
    bao: OpenBao, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = _approle_client(bao, tmp_path, ttl="6s", max_ttl="1h")
    assert _issuers(client) is not None
    token = client.hvac.token
    accessor = _accessor(bao, token)
    with caplog.at_level(logging.DEBUG, logger="ca_daemon.anchor.vault.client"):
        for _ in range(5):  # 10 s: past the 6 s TTL, renewed each time a third is left
            time.sleep(2)
            assert _issuers(client) is not None
    assert client.hvac.token == token  # the same token, kept alive
    assert _accessor(bao, token) == accessor
    assert "token renewed" in caplog.text
    assert "logging in again" not in caplog.text
