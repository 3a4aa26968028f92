"""`ca-daemon verify --kubeconfig`: an issuer that no longer chains to the trust roots."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ca_daemon.pki.bundle import certificate_pem
from ca_daemon.pki.keys import generate_key, private_key_pem
from ca_daemon.pki.profiles import Kind, Subject, capped_validity, sign_certificate
from tests.support.kube_cluster import Cluster, b64, make_cluster
from tests.support.pki import self_signed_root
from tests.support.servers.kube import Kube
from tests.support.servers.linkerd import LinkerdCheck

pytestmark = pytest.mark.integration


def _foreign_issuer() -> tuple[bytes, bytes, bytes]:
    """(root, issuer, key) PEM: a valid Linkerd issuer, but under a root of someone else's."""
    now = datetime.now(UTC)
    root_key, root = self_signed_root("foreign-root", now=now)
    key = generate_key()
    issuer = sign_certificate(
        Kind.LINKERD_ISSUER,
        Subject("identity.linkerd.cluster.local"),
        key.public_key(),
        root_key,
        root,
        capped_validity(now, timedelta(hours=48), root.not_valid_after_utc),
    )
    return certificate_pem(root).encode(), certificate_pem(issuer).encode(), private_key_pem(key)


def _patch_issuer(c: Cluster, data: dict[str, bytes]) -> None:
    with c.kube.http() as http:
        http.patch(
            f"/api/v1/namespaces/{c.linkerd_ns}/secrets/linkerd-identity-issuer",
            json={"data": {k: base64.b64encode(v).decode() for k, v in data.items()}},
            headers={"Content-Type": "application/merge-patch+json"},
        ).raise_for_status()


def _issuer_problems(stdout: str) -> list[str]:
    """verify's PROBLEM lines about the Linkerd issuer, without the prefix."""
    lines = [line.removeprefix("PROBLEM ") for line in stdout.splitlines()]
    return [line for line in lines if line.startswith("linkerd issuer")]


def test_an_issuer_under_a_foreign_root_fails_verify(
    kube: Kube, tmp_path: Path, linkerd_check: LinkerdCheck
) -> None:
    c = make_cluster(kube, tmp_path, "vissuer")
    assert c.run("run", "--once").returncode == 0
    ok = c.run("verify", "--kubeconfig", str(kube.admin_kubeconfig))
    assert ok.returncode == 0, ok.stdout + ok.stderr

    bundle = c.configmap(c.linkerd_ns, "linkerd-identity-trust-roots")["data"]["ca-bundle.crt"]
    foreign_root, issuer, key = _foreign_issuer()
    # Linkerd itself would refuse this issuer with the bundle it was given.
    files = {"bundle.pem": bundle.encode(), "tls.crt": issuer, "tls.key": key}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    code, said = linkerd_check(tmp_path / "bundle.pem", tmp_path / "tls.crt", tmp_path / "tls.key")
    assert code == 1 and "x509: certificate signed by unknown authority" in said, said

    # Only tls.crt and tls.key are replaced: the Secret's ca.crt and the ConfigMap stay.
    _patch_issuer(c, {"tls.crt": issuer, "tls.key": key})
    assert b64(c.secret(c.linkerd_ns, "linkerd-identity-issuer"), "ca.crt") == bundle
    bad = c.run("verify", "--kubeconfig", str(kube.admin_kubeconfig))
    assert bad.returncode == 1, bad.stdout
    problems = _issuer_problems(bad.stdout)
    assert any(
        p.startswith("linkerd issuer: is not signed by any root in the trust bundle")
        for p in problems
    ), bad.stdout
    # The key matches and the profile is Linkerd's: the chain is the only thing wrong.
    assert "private key does not match" not in bad.stdout
    assert "pathlen" not in bad.stdout and "keyUsage" not in bad.stdout

    # The whole Secret made consistent with the foreign root: the ConfigMap still decides.
    _patch_issuer(c, {"tls.crt": issuer, "tls.key": key, "ca.crt": foreign_root})
    worse = c.run("verify", "--kubeconfig", str(kube.admin_kubeconfig))
    assert worse.returncode == 1, worse.stdout
    assert any(
        p.startswith("linkerd issuer: is not signed by any root in the trust bundle")
        for p in _issuer_problems(worse.stdout)
    ), worse.stdout
    assert not any("linkerd issuer vs" in p for p in _issuer_problems(worse.stdout))
