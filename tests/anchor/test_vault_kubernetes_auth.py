"""Vault's kubernetes auth, for real: OpenBao reviews the daemon's ServiceAccount token
with the real kube-apiserver's TokenReview API."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.servers.kube import Kube
from tests.support.servers.openbao import OpenBao
from tests.support.servers.tools import unique
from tests.support.vault_helpers import run_daemon, vault_config

pytestmark = pytest.mark.integration


def test_daemon_logs_in_with_its_service_account(
    openbao: OpenBao, kube: Kube, tmp_path: Path
) -> None:
    mount = unique("k8s")
    ns = unique("vault-auth")
    kube.create_namespace(ns)
    kube.create_service_account(ns, "ca-daemon")
    kube.create_service_account(ns, "intruder")
    openbao.cli("auth", "enable", f"-path={mount}", "kubernetes")
    openbao.cli(
        "write",
        f"auth/{mount}/config",
        f"kubernetes_host={kube.server}",
        f"kubernetes_ca_cert=@{kube.ca_file}",
        # The reviewer token may call TokenReview (here: the test cluster's admin).
        f"token_reviewer_jwt={kube.admin_token}",
    )
    # Broad on purpose: this test is about logging in; the policy has its own test.
    everything = 'path "*" { capabilities = ["create", "read", "update", "patch", "list"] }'
    openbao.cli("policy", "write", mount, "-", input=everything)
    openbao.cli(
        "write",
        f"auth/{mount}/role/ca-daemon",
        "bound_service_account_names=ca-daemon",
        f"bound_service_account_namespaces={ns}",
        f"token_policies={mount}",
        "token_ttl=10m",
    )

    def run_as(sa: str) -> tuple[int, str]:
        jwt = tmp_path / f"{sa}.jwt"
        jwt.write_text(kube.service_account_token(ns, sa))
        workdir = tmp_path / sa
        workdir.mkdir()
        config = vault_config(
            workdir,
            openbao,
            unique("k8sauth"),
            vault={
                "auth": {
                    "method": "kubernetes",
                    "role": "ca-daemon",
                    "mount": mount,
                    "jwt_file": str(jwt),
                }
            },
        )
        result = run_daemon(config, "run", "--once")
        return result.returncode, result.stdout + result.stderr

    code, output = run_as("ca-daemon")
    assert code == 0, output
    assert "CreateRoot trust-anchor root-1" in output

    code, output = run_as("intruder")
    assert code == 1
    assert "kubernetes login" in output
    assert "service account name not authorized" in output or "permission denied" in output
