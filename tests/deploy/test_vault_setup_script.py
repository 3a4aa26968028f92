"""scripts/vault-setup.sh, run as an administrator against a fresh OpenBao, leaves exactly
what the daemon needs: it then runs on a token holding only the shipped policy, with
`create_if_missing: false`, and the script can be run again.

Its Kubernetes auth method, with the real kube-apiserver and OpenBao outside the cluster
(as Vault outside a real one): logins of the chart's `vault`-audience token work with the
chart's token reviewer (vault.tokenReviewer), fail without one, and the script refuses
the configuration that would fail, and a reviewer token that may not review."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.cli import ca_daemon
from tests.support.servers.helm import Helm
from tests.support.servers.kube import Kube
from tests.support.servers.openbao import OpenBao, own_openbao
from tests.support.servers.tools import require_tool, unique

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "vault-setup.sh"
CHART = ROOT / "charts" / "ca-daemon"


def _admin_env(bao: OpenBao, home: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "VAULT_CLI": bao.bao,
        "VAULT_ADDR": bao.address,
        "VAULT_TOKEN": bao.token,
        "BAO_ADDR": bao.address,
        "BAO_TOKEN": bao.token,
        "HOME": str(home),
        **extra,
    }


def _setup(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120
    )


def test_the_setup_script_prepares_vault_for_the_daemon(tmp_path: Path) -> None:
    with own_openbao(tmp_path, "bao (setup script)") as bao:
        env = _admin_env(bao, tmp_path)
        for attempt in (1, 2):  # idempotent: an administrator may run it again
            run = _setup(env)
            assert run.returncode == 0, f"run {attempt}: {run.stdout}{run.stderr}"
        role = bao.cli("read", "-format=json", "auth/kubernetes/role/ca-daemon").stdout
        assert '"ca-daemon"' in role and '"vault"' in role  # bound SA and audience
        token = bao.cli(
            "token", "create", "-policy=ca-daemon", "-no-default-policy", "-field=token"
        ).stdout.strip()
        token_file = tmp_path / "vault-token"
        token_file.write_text(token + "\n")
        config = tmp_path / "config.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "anchor": {
                        "backend": "vault",
                        "local": {"dir": str(tmp_path / "data")},
                        "vault": {
                            "address": bao.address,
                            "create_if_missing": False,
                            "auth": {"method": "token", "token_file": str(token_file)},
                        },
                    },
                    "publish": {"kubernetes": {"enabled": False}},
                    "kong": {"clients": [{"name": "pay", "common_name": "kong.pay.upstream"}]},
                }
            )
        )
        first = ca_daemon("run", "--once", "--config", str(config), cwd=tmp_path)
        assert first.returncode == 0, first.stdout + first.stderr
        assert "IssueKongClient kong-client pay (missing): ok" in first.stdout
        verified = ca_daemon("verify", "--config", str(config), cwd=tmp_path)
        assert verified.returncode == 0, verified.stdout


def _login(bao: OpenBao, jwt: str) -> subprocess.CompletedProcess[str]:
    """A login as the daemon makes it (auth/kubernetes/login, role ca-daemon), no token."""
    env = {k: v for k, v in bao.env().items() if k not in ("VAULT_TOKEN", "BAO_TOKEN")}
    return subprocess.run(
        [bao.bao, "write", "-format=json", "auth/kubernetes/login", "role=ca-daemon", "jwt=-"],
        env=env,
        input=jwt,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _reviewer_set(bao: OpenBao) -> bool:
    config = json.loads(bao.cli("read", "-format=json", "auth/kubernetes/config").stdout)
    return bool(config["data"]["token_reviewer_jwt_set"])


def _reviewer_objects(helm: Helm, namespace: str) -> dict[str, dict[str, Any]]:
    """The chart's token reviewer (vault.tokenReviewer.create), by kind."""
    out = helm.run(
        "template",
        "ca-daemon",
        str(CHART),
        "--namespace",
        namespace,
        "--set",
        "vault.tokenReviewer.create=true",
    )
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    return {d["kind"]: d for d in docs if "vault-reviewer" in d["metadata"]["name"]}


def test_kubernetes_auth_from_outside_the_cluster_needs_the_token_reviewer(
    tmp_path: Path, kube: Kube, helm: Helm
) -> None:
    require_tool("curl")  # the script checks the reviewer token with it
    ns = unique("vault-review")
    kube.create_namespace(ns)
    kube.create_service_account(ns, "ca-daemon")  # the chart's ServiceAccount
    reviewer = _reviewer_objects(helm, ns)
    assert sorted(reviewer) == ["ClusterRoleBinding", "Secret", "ServiceAccount"]
    binding = reviewer["ClusterRoleBinding"]
    assert binding["roleRef"]["name"] == "system:auth-delegator"  # and nothing more
    sa = reviewer["ServiceAccount"]["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": ns}]
    secret = reviewer["Secret"]
    assert secret["type"] == "kubernetes.io/service-account-token"
    assert secret["metadata"]["annotations"] == {"kubernetes.io/service-account.name": sa}
    for obj in reviewer.values():
        kube.apply(obj)
    # The token controller (absent from this apiserver-only cluster) would fill the Secret;
    # a TokenRequest gives the same ServiceAccount's token.
    reviewer_jwt = tmp_path / "reviewer.jwt"
    reviewer_jwt.write_text(kube.service_account_token(ns, sa, expiration_seconds=3600) + "\n")
    # A token as the chart projects it for the daemon: audience `vault`.
    daemon_jwt = kube.service_account_token(ns, "ca-daemon", audiences=["vault"])

    with own_openbao(tmp_path, "bao (kubernetes auth)") as bao:
        base = _admin_env(
            bao,
            tmp_path,
            KUBERNETES_HOST=kube.server,
            KUBERNETES_CA_CERT=str(kube.ca_file),
            SA_NAMESPACE=ns,
        )
        # Without a reviewer the script stops before writing anything.
        refused = _setup(base)
        assert refused.returncode != 0
        assert "TOKEN_REVIEWER_JWT" in refused.stderr and "audience vault" in refused.stderr
        assert "kubernetes/" not in bao.cli("auth", "list", "-format=json").stdout

        # A token that may not review (the daemon's own ServiceAccount has no binding).
        unbound = tmp_path / "unbound.jwt"
        unbound.write_text(kube.service_account_token(ns, "ca-daemon"))
        denied = _setup({**base, "TOKEN_REVIEWER_JWT": str(unbound)})
        assert denied.returncode != 0 and "system:auth-delegator" in denied.stderr
        assert unbound.read_text() not in denied.stdout + denied.stderr

        done = _setup({**base, "TOKEN_REVIEWER_JWT": str(reviewer_jwt)})
        assert done.returncode == 0, done.stdout + done.stderr
        assert reviewer_jwt.read_text().strip() not in done.stdout + done.stderr
        assert _reviewer_set(bao)
        login = _login(bao, daemon_jwt)
        assert login.returncode == 0, login.stderr
        auth = json.loads(login.stdout)["auth"]
        assert "ca-daemon" in auth["policies"]
        assert auth["metadata"]["service_account_namespace"] == ns

        # What the report saw: the same auth config without the reviewer, as the script
        # wrote it before; Vault sends the daemon's own token to review itself.
        bao.cli(
            "write",
            "auth/kubernetes/config",
            f"kubernetes_host={kube.server}",
            f"kubernetes_ca_cert=@{kube.ca_file}",
        )
        assert not _reviewer_set(bao)
        broken = _login(bao, daemon_jwt)
        assert broken.returncode != 0 and "permission denied" in broken.stderr
