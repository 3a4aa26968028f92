"""Smoke tests proving each fixture runs the real server, not a stand-in."""

from __future__ import annotations

import json
import re
import ssl
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from tests.support.pki import issue, make_ca
from tests.support.servers.helm import Helm
from tests.support.servers.kube import Kube
from tests.support.servers.linkerd import LinkerdCheck
from tests.support.servers.nginx import NginxFactory
from tests.support.servers.openbao import OpenBao
from tests.support.servers.prometheus import PrometheusFactory
from tests.support.servers.tools import free_port, require_tool

pytestmark = pytest.mark.integration


def test_openbao_is_real_dev_server(openbao: OpenBao, unique_name: str) -> None:
    version = openbao.cli("version").stdout
    assert version.startswith("OpenBao v2."), version

    with openbao.http() as http:
        health = http.get("/v1/sys/health").json()
    assert health["initialized"] is True
    assert health["sealed"] is False

    # The token really is root: it can mount an engine at a per-test path and see it listed.
    openbao.cli("secrets", "enable", f"-path={unique_name}", "kv")
    mounts = json.loads(openbao.cli("secrets", "list", "-format=json").stdout)
    assert f"{unique_name}/" in mounts
    assert "pki/" not in mounts  # the fixture leaves PKI to the daemon under test


def test_kube_apiserver_reports_v1_34(kube: Kube) -> None:
    with kube.http() as http:
        version = http.get("/version").json()
    assert version["major"] == "1"
    assert version["minor"] == "34"
    assert version["gitVersion"].startswith("v1.34."), version


def _secret_read_status(kube: Kube, token: str, namespace: str) -> int:
    with kube.http(token) as http:
        return http.get(f"/api/v1/namespaces/{namespace}/secrets/probe").status_code


def test_kube_rbac_denies_then_allows_service_account(kube: Kube, unique_name: str) -> None:
    ns = unique_name
    kube.create_namespace(ns)
    kube.create_service_account(ns, "reader")
    kube.apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"namespace": ns, "name": "probe"},
            "stringData": {"k": "v"},
        }
    )
    token = kube.service_account_token(ns, "reader")

    # Authenticated (TokenRequest token accepted) but not authorized: 403, not 401.
    assert _secret_read_status(kube, token, ns) == 403

    kube.apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"namespace": ns, "name": "read-secrets"},
            "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}],
        }
    )
    kube.apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"namespace": ns, "name": "reader-reads-secrets"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": "read-secrets",
            },
            "subjects": [{"kind": "ServiceAccount", "namespace": ns, "name": "reader"}],
        }
    )
    # The RBAC authorizer reads from an informer cache, so the grant lands a moment later.
    deadline = time.monotonic() + 10
    while _secret_read_status(kube, token, ns) != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _secret_read_status(kube, token, ns) == 200

    # The kubeconfig writer and the official client agree with raw HTTP.
    from kubernetes import client

    core = client.CoreV1Api(kube.api_client(token))
    secret = core.read_namespaced_secret("probe", ns)
    assert secret.data == {"k": "dg=="}  # base64("v")


def test_prometheus_scrapes_and_evaluates_rules(
    prometheus_factory: PrometheusFactory, promtool: str, tmp_path: Path
) -> None:
    rules = tmp_path / "rules.yml"
    rules.write_text(
        "groups:\n- name: smoke\n  rules:\n  - record: smoke:up:sum\n    expr: sum(up)\n"
    )
    checked = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True)
    assert checked.returncode == 0, checked.stderr

    prom = prometheus_factory(rule_files=[rules])
    assert httpx.get(f"{prom.url}/-/ready").status_code == 200
    up = prom.wait_for('up{job="self"} == 1')
    assert [s["metric"]["job"] for s in up] == ["self"]
    # Only a real rule evaluator produces the recorded series.
    recorded = prom.wait_for("smoke:up:sum")
    assert float(recorded[0]["value"][1]) >= 1

    broken = tmp_path / "broken.yml"
    broken.write_text("groups:\n- name: x\n  rules:\n  - record: bad\n    expr: sum(\n")
    rejected = subprocess.run([promtool, "check", "rules", str(broken)], capture_output=True)
    assert rejected.returncode != 0


def _tls_get(port: int, ca_file: Path, client_crt: Path, client_key: Path) -> int:
    context = ssl.create_default_context(cafile=str(ca_file))
    context.load_cert_chain(str(client_crt), str(client_key))
    response = httpx.get(f"https://127.0.0.1:{port}/", verify=context, timeout=10)
    return response.status_code


def test_nginx_mtls_accepts_known_client_ca_only(
    nginx_factory: NginxFactory, tmp_path: Path
) -> None:
    server_ca, client_ca, other_ca = make_ca("server CA"), make_ca("client CA"), make_ca("other")
    server = issue(server_ca, "nginx", server=True, ips=("127.0.0.1",))
    good = issue(client_ca, "good-client", client=True)
    bad = issue(other_ca, "bad-client", client=True)
    server_ca_file, _ = server_ca.write(tmp_path, "server-ca")
    client_ca_file, _ = client_ca.write(tmp_path, "client-ca")
    server_crt, server_key = server.write(tmp_path, "server")
    good_crt, good_key = good.write(tmp_path, "good")
    bad_crt, bad_key = bad.write(tmp_path, "bad")

    port = free_port()
    nginx = nginx_factory(
        f"""
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {server_crt};
        ssl_certificate_key {server_key};
        ssl_client_certificate {client_ca_file};
        ssl_verify_client on;
        location / {{ return 200 "hello $ssl_client_s_dn\\n"; }}
    }}
"""
    )
    assert _tls_get(port, server_ca_file, good_crt, good_key) == 200
    # nginx answers an unverifiable client cert with 400 ("The SSL certificate error").
    assert _tls_get(port, server_ca_file, bad_crt, bad_key) == 400

    # reload() picks up a new client CA: now only the other CA's clients get in.
    other_ca_file, _ = other_ca.write(tmp_path, "other-ca")
    nginx.conf.write_text(nginx.conf.read_text().replace(str(client_ca_file), str(other_ca_file)))
    nginx.reload()
    assert _tls_get(port, server_ca_file, bad_crt, bad_key) == 200
    assert _tls_get(port, server_ca_file, good_crt, good_key) == 400


def test_helm_is_real_and_lints_a_chart(helm: Helm, tmp_path: Path) -> None:
    version = helm.run("version", "--short").stdout
    # An honest release version (scripts/testenv sets it at link time), not a dev default.
    assert re.match(r"v3\.\d+\.\d+", version), version
    helm.run("create", "smoke", cwd=tmp_path)
    linted = helm.run("lint", str(tmp_path / "smoke"))
    assert "1 chart(s) linted, 0 chart(s) failed" in linted.stdout

    (tmp_path / "smoke" / "Chart.yaml").write_text("name: smoke\n")  # no apiVersion/version
    failed = helm.run("lint", str(tmp_path / "smoke"), check=False)
    assert failed.returncode != 0
    assert "1 chart(s) failed" in failed.stdout + failed.stderr


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(
        [require_tool("openssl"), *args], cwd=cwd, check=True, capture_output=True, timeout=60
    )


def _openssl_key(cwd: Path, name: str, key: str) -> None:
    if key == "rsa":
        _openssl("genrsa", "-out", f"{name}.key", "2048", cwd=cwd)
    else:
        _openssl(
            "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}.key", cwd=cwd
        )


def _openssl_ca(cwd: Path, name: str, key: str = "ec") -> None:
    """Self-signed root `name.crt`/`name.key` (ECDSA P-256 unless key="rsa")."""
    _openssl_key(cwd, name, key)
    _openssl(
        "req", "-x509", "-new", "-key", f"{name}.key", "-subj", f"/CN={name}", "-days", "30",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-out", f"{name}.crt",
        cwd=cwd,
    )  # fmt: skip


def _openssl_issuer(cwd: Path, name: str, root: str, *, is_ca: bool, key: str = "ec") -> None:
    """Issuer `name.crt`/`name.key` (ECDSA P-256 unless key="rsa") signed by `root`."""
    _openssl_key(cwd, name, key)
    _openssl(
        "req", "-new", "-key", f"{name}.key", "-subj", "/CN=identity.linkerd.cluster.local",
        "-out", f"{name}.csr",
        cwd=cwd,
    )  # fmt: skip
    ext = cwd / f"{name}.ext"
    ext.write_text(
        "basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\n"
        if is_ca
        else "basicConstraints=critical,CA:FALSE\n"
    )
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{root}.crt", "-CAkey", f"{root}.key",
        "-CAcreateserial", "-days", "7", "-extfile", ext.name, "-out", f"{name}.crt",
        cwd=cwd,
    )  # fmt: skip


def test_linkerd_check_accepts_valid_issuer_and_rejects_bad_ones(
    linkerd_check: LinkerdCheck, tmp_path: Path
) -> None:
    _openssl_ca(tmp_path, "root")
    _openssl_ca(tmp_path, "stranger")
    _openssl_issuer(tmp_path, "issuer", "root", is_ca=True)
    _openssl_issuer(tmp_path, "leafy", "root", is_ca=False)
    _openssl_issuer(tmp_path, "foreign", "stranger", is_ca=True)

    code, out = linkerd_check(
        tmp_path / "root.crt", tmp_path / "issuer.crt", tmp_path / "issuer.key"
    )
    assert code == 0, out
    assert "ok: identity controller loads the issuer" in out
    assert "ok: issued proxy cert" in out

    code, out = linkerd_check(tmp_path / "root.crt", tmp_path / "leafy.crt", tmp_path / "leafy.key")
    assert code == 1
    assert "issuer cert is not a CA" in out

    code, out = linkerd_check(
        tmp_path / "root.crt", tmp_path / "foreign.crt", tmp_path / "foreign.key"
    )
    assert code == 1
    assert "x509: certificate signed by unknown authority" in out

    # A key that does not belong to the certificate is refused before anything else.
    code, out = linkerd_check(
        tmp_path / "root.crt", tmp_path / "issuer.crt", tmp_path / "leafy.key"
    )
    assert code == 1
    assert "Public and private key do not match" in out

    # --now moves the checks' clock: years ahead the same issuer has expired.
    later = datetime.now(UTC) + timedelta(days=8)  # the issuer lives 7 days
    code, out = linkerd_check(
        tmp_path / "root.crt", tmp_path / "issuer.crt", tmp_path / "issuer.key", now=later
    )
    assert code == 1
    assert "expired" in out.lower() or "not valid anymore" in out


def test_linkerd_check_key_algorithm_rules(linkerd_check: LinkerdCheck, tmp_path: Path) -> None:
    # Linkerd signs proxy certs with ECDSA-SHA256 only, so the issuer key must be P-256;
    # the trust anchor above it may be RSA (linkerd2 #8868).
    _openssl_ca(tmp_path, "rsaroot", key="rsa")
    _openssl_issuer(tmp_path, "ecissuer", "rsaroot", is_ca=True)
    _openssl_issuer(tmp_path, "rsaissuer", "rsaroot", is_ca=True, key="rsa")

    code, out = linkerd_check(
        tmp_path / "rsaroot.crt", tmp_path / "ecissuer.crt", tmp_path / "ecissuer.key"
    )
    assert code == 0, out

    code, out = linkerd_check(
        tmp_path / "rsaroot.crt", tmp_path / "rsaissuer.crt", tmp_path / "rsaissuer.key"
    )
    assert code == 1
    assert "must use ECDSA for public key algorithm, instead RSA was used" in out
