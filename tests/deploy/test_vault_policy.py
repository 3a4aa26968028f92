"""The shipped Vault policy is enough for the daemon, and refuses everything else.

Runs the daemon with an AppRole login bound only to policies/vault-policy.hcl, on the
default mount names, after an administrator's one-time set-up.
"""

from __future__ import annotations

from pathlib import Path

import hvac
import hvac.exceptions
import pytest
import yaml

from ca_daemon.anchor.vault.client import VaultClient
from ca_daemon.anchor.vault.pki import VaultPkiAnchor
from ca_daemon.config.settings import VaultAnchor, VaultAuth
from tests.support.servers.openbao import OpenBao
from tests.support.vault_helpers import run_daemon

pytestmark = pytest.mark.integration

POLICY = Path(__file__).resolve().parents[2] / "policies" / "vault-policy.hcl"


@pytest.fixture(scope="module")
def approle(openbao: OpenBao, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    # Administrator's one-time set-up: mounts and role (what create_if_missing would do).
    admin = VaultAnchor(address=openbao.address, auth=VaultAuth(token=openbao.token))
    VaultPkiAnchor(VaultClient(admin)).check()
    openbao.cli("policy", "write", "ca-daemon", str(POLICY))
    openbao.cli("auth", "enable", "approle")
    openbao.cli(
        "write",
        "auth/approle/role/ca-daemon",
        "token_policies=ca-daemon",
        "token_no_default_policy=true",
        "token_ttl=10m",
    )
    role_id = openbao.cli(
        "read", "-field=role_id", "auth/approle/role/ca-daemon/role-id"
    ).stdout.strip()
    secret_id = openbao.cli(
        "write", "-f", "-field=secret_id", "auth/approle/role/ca-daemon/secret-id"
    ).stdout.strip()
    secret_file = tmp_path_factory.mktemp("approle") / "secret-id"
    secret_file.write_text(secret_id + "\n")
    secret_file.chmod(0o600)
    return role_id, secret_file


def test_daemon_runs_on_the_least_privilege_policy(
    openbao: OpenBao, approle: tuple[str, Path], tmp_path: Path
) -> None:
    role_id, secret_file = approle
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "anchor": {
                    "backend": "vault",
                    "local": {"dir": str(tmp_path / "data")},
                    "vault": {
                        "address": openbao.address,
                        "create_if_missing": False,
                        "auth": {
                            "method": "approle",
                            "role_id": role_id,
                            "secret_id_file": str(secret_file),
                        },
                    },
                },
                "publish": {"kubernetes": {"enabled": False}},
                "kong": {"clients": [{"name": "pay", "common_name": "kong.pay.upstream"}]},
            }
        )
    )
    first = run_daemon(config, "run", "--once")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "IssueKongClient kong-client pay (missing): ok" in first.stdout
    verified = run_daemon(config, "verify")
    assert verified.returncode == 0, verified.stdout


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "sys/mounts/evil", {"type": "pki"}),
        ("POST", "pki-root/root/generate/exported", {"common_name": "x"}),
        ("POST", "pki-root/issuer/default/sign-verbatim", {"csr": "x"}),
        ("POST", "pki-root/issuer/default/sign-self-issued", {"certificate": "x"}),
        ("POST", "pki-kong/roles/anything", {"allow_any_name": True}),
        ("GET", "secret/data/someone-else", None),
        ("POST", "sys/policies/acl/ca-daemon", {"policy": 'path "*" {}'}),
    ],
)
def test_policy_refuses_everything_else(
    openbao: OpenBao, approle: tuple[str, Path], method: str, path: str, body: object
) -> None:
    role_id, secret_file = approle
    client = hvac.Client(url=openbao.address)
    client.auth.approle.login(role_id=role_id, secret_id=secret_file.read_text().strip())
    with pytest.raises(hvac.exceptions.Forbidden):
        client.adapter.request(method, f"/v1/{path}", json=body)
