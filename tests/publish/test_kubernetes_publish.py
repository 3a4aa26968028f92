"""Publishing into a real kube-apiserver, as the least-privilege ServiceAccount the
`ca-daemon config rbac` Roles allow, and checking the result as Linkerd, KIC and an
mTLS upstream (nginx) see it."""

from __future__ import annotations

import base64
import hashlib
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509

from ca_daemon.journal.open import build_anchor_and_journal
from ca_daemon.model.world import desired_world
from ca_daemon.pki.bundle import fingerprint, stable_id
from ca_daemon.publish.k8s_objects import kong_ca_secret_name
from ca_daemon.publish.kubernetes import KubernetesPublisher
from ca_daemon.rotation.engine import Engine
from ca_daemon.service.metrics import Metrics
from ca_daemon.util.kube import api_client
from tests.support.kube_cluster import Cluster, await_rbac, b64, make_cluster, published_cluster
from tests.support.pki import issue, make_ca, self_signed_root
from tests.support.servers.kube import Kube
from tests.support.servers.linkerd import LinkerdCheck
from tests.support.servers.nginx import NginxFactory
from tests.support.servers.tools import free_port

pytestmark = pytest.mark.integration


def _certs(pem: str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem.encode())


@pytest.fixture(scope="module")
def cluster(kube: Kube, tmp_path_factory: pytest.TempPathFactory) -> Cluster:
    return published_cluster(kube, tmp_path_factory.mktemp("k8s"), "pub")


def _managed(obj: Any) -> None:
    assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "ca-daemon"


def _identity(obj: Any, cert: x509.Certificate) -> None:
    annotations = obj["metadata"]["annotations"]
    assert annotations["ca-daemon.io/fingerprint-sha256"] == fingerprint(cert)
    expected = cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert annotations["ca-daemon.io/not-after"] == expected


def test_every_object_has_the_exact_shape(cluster: Cluster) -> None:
    c = cluster
    issuer = c.secret(c.linkerd_ns, "linkerd-identity-issuer")
    assert issuer["type"] == "kubernetes.io/tls"
    assert set(issuer["data"]) == {"tls.crt", "tls.key", "ca.crt"}
    _managed(issuer)
    issuer_certs = _certs(b64(issuer, "tls.crt"))
    assert len(issuer_certs) == 1
    _identity(issuer, issuer_certs[0])

    roots = c.configmap(c.linkerd_ns, "linkerd-identity-trust-roots")
    _managed(roots)
    bundle = roots["data"]["ca-bundle.crt"]
    assert set(roots["data"]) == {"ca-bundle.crt"}
    assert b64(issuer, "ca.crt") == bundle
    bundle_annotation = roots["metadata"]["annotations"]["ca-daemon.io/fingerprint-sha256"]
    assert bundle_annotation == hashlib.sha256(bundle.encode()).hexdigest()

    # KIC reads a client-cert Secret only from the Service's namespace.
    client = c.secret(c.app_ns, "kong-upstream-payments")
    assert client["type"] == "kubernetes.io/tls"
    assert set(client["data"]) == {"tls.crt", "tls.key"}
    _managed(client)
    # Kong Operator / newer KIC ignore a Secret without this label, even when referenced.
    assert client["metadata"]["labels"]["konghq.com/secret"] == "true"
    chain = _certs(b64(client, "tls.crt"))
    assert len(chain) == 2
    _identity(client, chain[0])
    assert c.secret(c.kong_ns, "kong-upstream-payments") is None
    orders = c.secret(c.kong_ns, "kong-upstream-orders")  # no service: kong.namespace
    assert orders["type"] == "kubernetes.io/tls"
    assert orders["metadata"]["labels"]["konghq.com/secret"] == "true"

    service = c.get(f"/api/v1/namespaces/{c.app_ns}/services/payments-api")
    annotations = service["metadata"]["annotations"]
    assert annotations["konghq.com/client-cert"] == "kong-upstream-payments"
    assert annotations["konghq.com/protocol"] == "https"
    assert annotations["team"] == "payments"  # never clobbered

    (root,) = _certs(bundle)
    ca = c.secret(c.kong_ns, f"kong-upstream-ca-{fingerprint(root)[:8]}")
    assert ca is not None
    _managed(ca)
    assert ca["metadata"]["labels"]["konghq.com/ca-cert"] == "true"
    assert ca["metadata"]["labels"]["konghq.com/secret"] == "true"
    assert ca["metadata"]["annotations"]["kubernetes.io/ingress.class"] == "kong"
    assert set(ca["data"]) == {"cert", "id"}
    assert _certs(b64(ca, "cert")) == [root]
    assert b64(ca, "id") == stable_id(root)
    _identity(ca, root)

    extra = c.configmap(c.bundle_ns, "upstream-trust")
    _managed(extra)
    assert extra["data"] == {"ca-bundle.crt": bundle}


def _versions(c: Cluster) -> dict[str, str]:
    paths = [
        f"/api/v1/namespaces/{c.linkerd_ns}/secrets/linkerd-identity-issuer",
        f"/api/v1/namespaces/{c.linkerd_ns}/configmaps/linkerd-identity-trust-roots",
        f"/api/v1/namespaces/{c.app_ns}/secrets/kong-upstream-payments",
        f"/api/v1/namespaces/{c.kong_ns}/secrets/kong-upstream-orders",
        f"/api/v1/namespaces/{c.app_ns}/services/payments-api",
        f"/api/v1/namespaces/{c.bundle_ns}/configmaps/upstream-trust",
    ]
    with c.kube.http() as http:
        listed = http.get(f"/api/v1/namespaces/{c.kong_ns}/secrets").json()["items"]
    versions = {p: c.get(p)["metadata"]["resourceVersion"] for p in paths}
    versions |= {s["metadata"]["name"]: s["metadata"]["resourceVersion"] for s in listed}
    return versions


def test_second_run_writes_nothing(cluster: Cluster) -> None:
    before = _versions(cluster)
    again = cluster.run("run", "--once")
    assert again.returncode == 0, again.stderr
    assert "published kubernetes: 0 change(s)" in again.stdout
    assert _versions(cluster) == before


def test_published_issuer_passes_linkerds_own_checks(
    cluster: Cluster, linkerd_check: LinkerdCheck, tmp_path: Path
) -> None:
    c = cluster
    issuer = c.secret(c.linkerd_ns, "linkerd-identity-issuer")
    roots = c.configmap(c.linkerd_ns, "linkerd-identity-trust-roots")
    bundle, crt, key = tmp_path / "bundle.pem", tmp_path / "tls.crt", tmp_path / "tls.key"
    bundle.write_text(roots["data"]["ca-bundle.crt"])
    crt.write_text(b64(issuer, "tls.crt"))
    key.write_text(b64(issuer, "tls.key"))
    code, output = linkerd_check(bundle, crt, key)
    assert code == 0, output
    # And Linkerd rejects a foreign bundle: the check has teeth.
    foreign = make_ca("foreign")
    bundle.write_bytes(foreign.cert_pem)
    code, output = linkerd_check(bundle, crt, key)
    assert code == 1
    assert "unknown authority" in output


def test_kong_client_rotation_updates_the_secret_in_place(cluster: Cluster) -> None:
    c = cluster
    before = c.secret(c.app_ns, "kong-upstream-payments")
    engine = c.engine()
    engine.request_rotation("kong/payments", "test")
    result = engine.reconcile()
    assert result.ok, result.errors
    after = c.secret(c.app_ns, "kong-upstream-payments")
    assert after["metadata"]["uid"] == before["metadata"]["uid"]
    assert b64(after, "tls.crt") != b64(before, "tls.crt")
    assert b64(after, "tls.key") != b64(before, "tls.key")
    assert f"secret/{c.app_ns}/kong-upstream-payments" in result.published["kubernetes"]


def test_nginx_upstream_accepts_the_published_client_cert_only(
    cluster: Cluster, nginx_factory: NginxFactory, tmp_path: Path
) -> None:
    """nginx as the upstream (ssl_verify_client on, the published bundle) and as the
    proxy presenting the client certificate with proxy_ssl_certificate, as Kong does."""
    c = cluster
    client = c.secret(c.app_ns, "kong-upstream-payments")
    bundle = c.configmap(c.bundle_ns, "upstream-trust")["data"]["ca-bundle.crt"]
    files = {
        "bundle.pem": bundle,
        "client.crt": b64(client, "tls.crt"),
        "client.key": b64(client, "tls.key"),
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "client.key").chmod(0o600)
    server_ca = make_ca("upstream-server-ca")
    server = issue(server_ca, "upstream.local", server=True, dns_names=("upstream.local",))
    server_crt, server_key = server.write(tmp_path, "server")
    foreign_ca = make_ca("foreign")
    foreign = issue(foreign_ca, "intruder", client=True, dns_names=("intruder.local",))
    foreign_crt, foreign_key = foreign.write(tmp_path, "foreign")

    upstream_port, proxy_port = free_port(), free_port()
    servers = f"""
    server {{
        listen 127.0.0.1:{upstream_port} ssl;
        ssl_certificate {server_crt};
        ssl_certificate_key {server_key};
        ssl_client_certificate {tmp_path / "bundle.pem"};
        ssl_verify_client on;
        ssl_verify_depth 2;
        location / {{ return 200 "hello $ssl_client_s_dn\\n"; }}
    }}
    server {{
        listen 127.0.0.1:{proxy_port};
        # Both locations share one implicit upstream: a resumed session would skip the
        # client-certificate check, so each request makes a full handshake.
        proxy_ssl_session_reuse off;
        location /kong/ {{
            proxy_pass https://127.0.0.1:{upstream_port}/;
            proxy_ssl_certificate {tmp_path / "client.crt"};
            proxy_ssl_certificate_key {tmp_path / "client.key"};
        }}
        location /foreign/ {{
            proxy_pass https://127.0.0.1:{upstream_port}/;
            proxy_ssl_certificate {foreign_crt};
            proxy_ssl_certificate_key {foreign_key};
        }}
    }}
    """
    nginx_factory(servers)
    accepted = httpx.get(f"http://127.0.0.1:{proxy_port}/kong/", timeout=10)
    assert accepted.status_code == 200
    assert "CN=kong.payments.upstream" in accepted.text
    refused = httpx.get(f"http://127.0.0.1:{proxy_port}/foreign/", timeout=10)
    assert refused.status_code == 400
    assert "SSL certificate error" in refused.text


def test_drift_is_reported_and_repaired(cluster: Cluster) -> None:
    c = cluster
    engine = c.engine()
    assert engine.reconcile().ok  # this process now knows what it wrote
    roots = c.configmap(c.linkerd_ns, "linkerd-identity-trust-roots")
    bundle = roots["data"]["ca-bundle.crt"]
    (root,) = _certs(bundle)
    ca_name = kong_ca_secret_name(root)
    with c.kube.http() as http:
        edited = http.patch(
            f"/api/v1/namespaces/{c.linkerd_ns}/configmaps/linkerd-identity-trust-roots",
            json={"data": {"ca-bundle.crt": make_ca("evil").cert_pem.decode()}},
            headers={"Content-Type": "application/merge-patch+json"},
        )
        edited.raise_for_status()
        http.delete(f"/api/v1/namespaces/{c.kong_ns}/secrets/{ca_name}").raise_for_status()

    metrics = Metrics()
    result = engine.reconcile()
    metrics.observe(result, c.settings, result_time())
    assert result.ok, result.errors
    (report,) = result.reports
    assert (
        f"configmap/{c.linkerd_ns}/linkerd-identity-trust-roots (keys changed: ca-bundle.crt)"
        in report.drifted
    )
    assert f"secret/{c.kong_ns}/{ca_name} (deleted)" in report.drifted
    assert (
        c.configmap(c.linkerd_ns, "linkerd-identity-trust-roots")["data"]["ca-bundle.crt"] == bundle
    )
    assert c.secret(c.kong_ns, ca_name) is not None
    for target in (
        f"configmap/{c.linkerd_ns}/linkerd-identity-trust-roots",
        f"secret/{c.kong_ns}/{ca_name}",
    ):
        assert metrics.registry.get_sample_value("ca_daemon_drift", {"target": target}) == 1
    events = c.get(f"/api/v1/namespaces/{c.linkerd_ns}/events")["items"]
    assert any(e["reason"] == "DriftRepaired" for e in events)

    quiet = engine.reconcile()
    metrics.observe(quiet, c.settings, result_time())
    assert quiet.reports[0].drifted == []
    target = f"configmap/{c.linkerd_ns}/linkerd-identity-trust-roots"
    assert metrics.registry.get_sample_value("ca_daemon_drift", {"target": target}) == 0


def result_time() -> datetime:
    return datetime.now(UTC)


def test_service_account_is_refused_everything_else(cluster: Cluster) -> None:
    c = cluster
    with c.kube.http(token=c.sa_token) as http:
        own = http.get(f"/api/v1/namespaces/{c.linkerd_ns}/secrets/linkerd-identity-issuer")
        assert own.status_code == 200
        for path in (
            f"/api/v1/namespaces/{c.linkerd_ns}/secrets",  # list
            f"/api/v1/namespaces/{c.linkerd_ns}/secrets/some-other-secret",
            f"/api/v1/namespaces/{c.app_ns}/secrets/some-other-secret",
            "/api/v1/namespaces/kube-system/secrets",
            "/api/v1/secrets",
            f"/api/v1/namespaces/{c.app_ns}/pods/some-pod/log",  # the gate lists pods, no more
            "/api/v1/nodes",
        ):
            assert http.get(path).status_code == 403, path
        deleted = http.delete(
            f"/api/v1/namespaces/{c.linkerd_ns}/configmaps/linkerd-identity-trust-roots"
        )
        assert deleted.status_code == 403


def test_wrong_type_or_unmanaged_objects_are_reported_not_replaced(
    kube: Kube, tmp_path: Path
) -> None:
    c = make_cluster(kube, tmp_path, "wrongtype")
    opaque = kube.apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {"name": "linkerd-identity-issuer", "namespace": c.linkerd_ns},
            "stringData": {"crt.pem": "left by linkerd.io/tls", "key.pem": "x"},
        }
    )
    theirs = kube.apply(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "upstream-trust", "namespace": c.bundle_ns},
            "data": {"ca-bundle.crt": "someone else's"},
        }
    )
    result = c.run("run", "--once")
    assert result.returncode == 1
    assert f"Secret {c.linkerd_ns}/linkerd-identity-issuer has type Opaque" in result.stderr
    assert f"ConfigMap {c.bundle_ns}/upstream-trust exists and is not managed by" in result.stderr
    unmanaged = c.configmap(c.bundle_ns, "upstream-trust")
    assert unmanaged["metadata"]["resourceVersion"] == theirs["metadata"]["resourceVersion"]
    assert "identity.issuer.scheme=kubernetes.io/tls" in result.stderr
    live = c.secret(c.linkerd_ns, "linkerd-identity-issuer")
    assert live["metadata"]["resourceVersion"] == opaque["metadata"]["resourceVersion"]
    assert live["type"] == "Opaque"
    # Everything else was still published.
    assert c.configmap(c.linkerd_ns, "linkerd-identity-trust-roots") is not None
    assert c.secret(c.app_ns, "kong-upstream-payments") is not None
    events = c.get(f"/api/v1/namespaces/{c.linkerd_ns}/events")["items"]
    assert any(
        e["reason"] == "WrongSecretType"
        and e["involvedObject"]["name"] == "linkerd-identity-issuer"
        for e in events
    )
    metrics = Metrics()
    again = c.engine().reconcile()
    metrics.observe(again, c.settings, result_time())
    target = f"secret/{c.linkerd_ns}/linkerd-identity-issuer"
    assert (
        metrics.registry.get_sample_value("ca_daemon_publish_errors_total", {"target": target}) == 1
    )


def test_unreachable_apiserver_is_a_clear_error(cluster: Cluster, tmp_path: Path) -> None:
    before = _versions(cluster)
    dead = cluster.kube.write_kubeconfig(cluster.sa_token, tmp_path / "dead.kubeconfig")
    text = dead.read_text().replace(cluster.kube.server, f"https://127.0.0.1:{free_port()}")
    dead.write_text(text)
    result = cluster.run("run", "--once", kubeconfig=dead)
    assert result.returncode == 1
    assert "API server unreachable" in result.stderr
    assert "PRIVATE KEY" not in result.stderr + result.stdout
    assert _versions(cluster) == before


def test_rbac_denial_keeps_the_previous_credentials(kube: Kube, tmp_path: Path) -> None:
    c = make_cluster(kube, tmp_path, "rbacdeny")
    assert c.run("run", "--once").returncode == 0
    before = c.secret(c.app_ns, "kong-upstream-payments")
    with kube.http() as http:
        http.delete(
            f"/apis/rbac.authorization.k8s.io/v1/namespaces/{c.app_ns}/rolebindings/ca-daemon"
        ).raise_for_status()
    await_rbac(
        kube, c.sa_token, f"/api/v1/namespaces/{c.app_ns}/secrets/kong-upstream-payments", False
    )
    engine = c.engine()
    engine.request_rotation("kong/payments", "test")
    engine.request_rotation("linkerd-issuer", "test")
    result = engine.reconcile()
    assert not result.ok
    (error,) = [e for e in result.errors if "kong-upstream-payments" in e]
    assert "forbidden by RBAC" in error
    assert "PRIVATE KEY" not in error
    after = c.secret(c.app_ns, "kong-upstream-payments")
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    # The issuer, which RBAC still allows, was rotated and published.
    issuer = c.secret(c.linkerd_ns, "linkerd-identity-issuer")
    assert f"secret/{c.linkerd_ns}/linkerd-identity-issuer" in result.published["kubernetes"]
    assert issuer is not None


def test_verify_reads_the_live_cluster_and_names_each_problem(kube: Kube, tmp_path: Path) -> None:
    c = make_cluster(kube, tmp_path, "verify")
    assert c.run("run", "--once").returncode == 0
    ok = c.run("verify", "--kubeconfig", str(kube.admin_kubeconfig))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "cluster: OK" in ok.stdout
    assert "checked kong client payments" in ok.stdout

    foreign = make_ca("foreign-root")
    kube.apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": "someone-elses-ca",
                "namespace": c.kong_ns,
                "labels": {"konghq.com/ca-cert": "true"},
            },
            "stringData": {"cert": foreign.cert_pem.decode(), "id": "0000-foreign"},
        }
    )
    with kube.http() as http:
        http.patch(
            f"/api/v1/namespaces/{c.linkerd_ns}/secrets/linkerd-identity-issuer",
            json={"data": {"ca.crt": base64.b64encode(foreign.cert_pem).decode()}},
            headers={"Content-Type": "application/merge-patch+json"},
        ).raise_for_status()
        http.delete(
            f"/api/v1/namespaces/{c.kong_ns}/secrets/kong-upstream-orders"
        ).raise_for_status()
    bad = c.run("verify", "--kubeconfig", str(kube.admin_kubeconfig))
    assert bad.returncode == 1
    name = f"Secret {c.linkerd_ns}/linkerd-identity-issuer"
    for problem in (
        "is not a root of the trust bundle",  # Kong trusts a root Linkerd does not
        f"{name} ca.crt and the trust-roots ConfigMap hold different roots",
        f"linkerd issuer vs {name} ca.crt: is not signed by any root",
        f"kong client orders: Secret {c.kong_ns}/kong-upstream-orders is missing",
    ):
        assert problem in bad.stdout, bad.stdout


def test_conflicting_write_is_reread_and_retried(cluster: Cluster) -> None:
    """Someone writes between the daemon's read and its update: the API server answers
    409, and the daemon reads again and decides on the fresh object."""
    c = cluster
    path = f"/api/v1/namespaces/{c.bundle_ns}/configmaps/upstream-trust"
    raced: list[str] = []

    class Racing(KubernetesPublisher):
        def _read(self, obj: Any) -> Any:
            live = super()._read(obj)
            if obj.name == "upstream-trust" and not raced:
                with c.kube.http() as http:
                    response = http.patch(
                        path,
                        json={"metadata": {"labels": {"touched": "by-someone"}}},
                        headers={"Content-Type": "application/merge-patch+json"},
                    )
                    response.raise_for_status()
                raced.append(response.json()["metadata"]["resourceVersion"])
            return live

    settings = c.settings
    with c.kube.http() as http:  # make the daemon's next pass want to write
        http.patch(
            path,
            json={"data": {"ca-bundle.crt": "stale"}},
            headers={"Content-Type": "application/merge-patch+json"},
        ).raise_for_status()
    anchor, journal = build_anchor_and_journal(settings)
    publisher = Racing(settings, api_client(c.kube.write_kubeconfig(c.sa_token)))
    result = Engine(settings, anchor, journal, [publisher]).reconcile()
    assert result.ok, result.errors
    assert raced, "the race was not staged"
    live = c.configmap(c.bundle_ns, "upstream-trust")
    assert (
        live["data"]["ca-bundle.crt"]
        == c.configmap(c.linkerd_ns, "linkerd-identity-trust-roots")["data"]["ca-bundle.crt"]
    )
    assert live["metadata"]["labels"]["touched"] == "by-someone"  # their change survived
    assert int(live["metadata"]["resourceVersion"]) > int(raced[0])


def test_kong_ca_secret_follows_the_bundle_and_goes_when_its_root_retires(
    kube: Kube, tmp_path: Path
) -> None:
    """Bundle {old} → {old, new} → {new}: the CA Secret of a root exists exactly while the
    root is trusted (the root rotation's overlap, seen by the publisher)."""

    c = make_cluster(kube, tmp_path, "retire")
    engine = c.engine()
    first = engine.reconcile()
    assert first.ok and first.state is not None
    world = desired_world(first.state, c.settings)
    (old,) = world.roots
    _, new = self_signed_root("root.linkerd.next")
    (publisher,) = engine.publishers

    def ca_secrets() -> set[str]:
        with c.kube.http() as http:
            items = http.get(
                f"/api/v1/namespaces/{c.kong_ns}/secrets",
                params={"labelSelector": "konghq.com/ca-cert=true"},
            ).json()["items"]
        return {s["metadata"]["name"] for s in items}

    assert ca_secrets() == {kong_ca_secret_name(old)}
    overlap = publisher.publish(replace(world, roots=(old, new)))
    assert not overlap.errors
    assert ca_secrets() == {kong_ca_secret_name(old), kong_ca_secret_name(new)}
    retired = publisher.publish(replace(world, roots=(new,)))
    assert (
        f"secret/{c.kong_ns}/{kong_ca_secret_name(old)} (deleted: root retired)" in retired.changed
    )
    assert ca_secrets() == {kong_ca_secret_name(new)}
    bundle = c.configmap(c.linkerd_ns, "linkerd-identity-trust-roots")["data"]["ca-bundle.crt"]
    assert _certs(bundle) == [new]
