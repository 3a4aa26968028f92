"""`ca-daemon verify --kubeconfig`: each finding about Linkerd, Kong and the two together,
seen (by id, in `--json`) on a cluster made wrong in exactly that one way, and none on a
clean one.

Pods are API objects only (no kubelet): what the checks read is what Linkerd's injector
writes into them (label, proxy container, annotations), which needs no running container.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from ca_daemon.pki.bundle import certificate_pem
from ca_daemon.pki.keys import generate_key, private_key_pem
from ca_daemon.pki.profiles import Kind, Subject, capped_validity, sign_certificate
from tests.support.cli import ca_daemon
from tests.support.kube_cluster import Cluster, b64, make_cluster, published_cluster
from tests.support.pki import self_signed_root
from tests.support.servers.kube import Kube
from tests.support.servers.linkerd import LinkerdCheck

pytestmark = pytest.mark.integration

TRUST_ROOTS = "linkerd-identity-trust-roots"
CP_LABEL = "linkerd.io/control-plane-ns"
SKIP_OUTBOUND = "config.linkerd.io/skip-outbound-ports"
SKIP_INBOUND = "config.linkerd.io/skip-inbound-ports"
TRUST_ROOT_SHA = "linkerd.io/trust-root-sha256"


def _verify(c: Cluster, config: Path | None = None) -> tuple[int, dict[str, Any]]:
    """`verify --json` as an administrator would run it: exit code and document."""
    result = ca_daemon(
        "verify",
        "--config",
        str(config or c.config),
        "--kubeconfig",
        str(c.kube.admin_kubeconfig),
        "--json",
        cwd=c.workdir,
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, json.loads(result.stdout)


def _found(doc: dict[str, Any]) -> dict[str, list[dict[str, str]]]:
    """Findings by id."""
    by_id: dict[str, list[dict[str, str]]] = {}
    for item in doc["findings"]:
        by_id.setdefault(item["id"], []).append(item)
    return by_id


def _only(c: Cluster, finding_id: str, config: Path | None = None) -> list[dict[str, str]]:
    """Verify fails with findings of ``finding_id`` and no other; they are returned."""
    code, doc = _verify(c, config)
    assert code == 1 and doc["ok"] is False, doc
    found = _found(doc)
    assert set(found) == {finding_id}, json.dumps(doc["findings"], indent=2)
    return found[finding_id]


def _patch(c: Cluster, path: str, body: dict[str, Any]) -> None:
    with c.kube.http() as http:
        http.patch(
            path, json=body, headers={"Content-Type": "application/merge-patch+json"}
        ).raise_for_status()


def _bundle(c: Cluster) -> str:
    data: str = c.configmap(c.linkerd_ns, TRUST_ROOTS)["data"]["ca-bundle.crt"]
    return data


def _pod(
    c: Cluster,
    namespace: str,
    name: str,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    meshed: bool = True,
    init_args: Sequence[str] = (),
) -> None:
    """A Pod as it is once admitted: with ``meshed``, as Linkerd's injector leaves it (our
    control plane's label and a linkerd-proxy container; ``init_args`` for linkerd-init)."""
    spec: dict[str, Any] = {"containers": [{"name": "app", "image": "app:1"}]}
    meta_labels = dict(labels or {})
    if meshed:
        meta_labels[CP_LABEL] = c.linkerd_ns
        spec["containers"].append({"name": "linkerd-proxy", "image": "proxy:1"})
        spec["initContainers"] = [
            {"name": "linkerd-init", "image": "proxy:1", "args": list(init_args)}
        ]
    c.kube.apply(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": meta_labels,
                "annotations": annotations or {},
            },
            "spec": spec,
        }
    )


def _kong_pod(c: Cluster, name: str, annotations: dict[str, str] | None = None) -> None:
    """Kong's proxy, meshed in ingress mode as Linkerd's guides mesh it."""
    _pod(
        c, c.kong_ns, name, {"app": "kong"}, {"linkerd.io/inject": "ingress", **(annotations or {})}
    )


def _upstream_pod(c: Cluster, name: str, annotations: dict[str, str] | None = None) -> None:
    """A meshed Pod behind the payments-api Service (selector app=payments, port 443)."""
    sha = hashlib.sha256(_bundle(c).encode()).hexdigest()
    _pod(c, c.app_ns, name, {"app": "payments"}, {TRUST_ROOT_SHA: sha, **(annotations or {})})


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
    _patch(
        c,
        f"/api/v1/namespaces/{c.linkerd_ns}/secrets/linkerd-identity-issuer",
        {"data": {k: base64.b64encode(v).decode() for k, v in data.items()}},
    )


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


# --- a clean cluster ---------------------------------------------------------------------------


def test_a_clean_cluster_with_kong_and_linkerd_meshed_has_no_findings(
    kube: Kube, tmp_path: Path
) -> None:
    c = published_cluster(kube, tmp_path, "vclean")
    # Kong meshed, its TLS to the upstream port skipping its proxy: once by annotation (a
    # list with a range, spaces and a trailing comma), once by the install-wide default
    # proxy-init got; the upstream meshed and injected with the current bundle; a
    # control-plane Pod whose hash is Helm's (never compared); a Pod of no mesh.
    _kong_pod(c, "kong-a", {SKIP_OUTBOUND: "4567,4568, 440-450,"})
    _pod(
        c,
        c.kong_ns,
        "kong-b",
        {"app": "kong"},
        init_args=["--outbound-ports-to-ignore", "443"],
    )
    _upstream_pod(c, "payments-1")
    _pod(c, c.linkerd_ns, "linkerd-identity-1", annotations={TRUST_ROOT_SHA: "0" * 64})
    _pod(c, c.app_ns, "batch-1", {"app": "payments"}, {TRUST_ROOT_SHA: "f" * 64}, meshed=False)

    code, doc = _verify(c)
    assert (code, doc["ok"], doc["findings"], doc["skipped"]) == (0, True, [], []), doc
    assert doc["version"] == 1 and doc["target"] == "cluster"
    assert "meshed Pods: 4, against the bundle's sha256" in doc["checked"]
    assert f"Kong's TLS to meshed upstreams: 2 meshed Pod(s) in {c.kong_ns}" in doc["checked"]

    text = c.run("verify", "--kubeconfig", str(kube.admin_kubeconfig))
    assert text.returncode == 0, text.stdout + text.stderr
    assert text.stdout.splitlines()[-1] == "cluster: OK"
    assert "PROBLEM" not in text.stdout and "SKIPPED" not in text.stdout

    # The daemon's own ServiceAccount may not list Services cluster-wide: its clients'
    # Services are read by name instead, and verify says what it did not see.
    as_daemon = c.run("verify", "--json")
    assert as_daemon.returncode == 0, as_daemon.stdout + as_daemon.stderr
    limited = json.loads(as_daemon.stdout)
    assert limited["ok"] is True and limited["findings"] == []
    assert [s.split(":")[0] for s in limited["skipped"]] == [
        f"Services in {c.app_ns} other than kong.clients' own"
    ]


# --- 1. one trust bundle ----------------------------------------------------------------------


@pytest.mark.parametrize("how", ["another root added", "same roots, other text"])
def test_an_issuer_ca_crt_that_is_not_the_trust_roots_bundle(
    kube: Kube, tmp_path: Path, how: str
) -> None:
    c = published_cluster(kube, tmp_path, "vcacrt")
    bundle = _bundle(c)
    if how == "another root added":
        _, foreign = self_signed_root("someone-elses-root", now=datetime.now(UTC))
        ca_crt = bundle + certificate_pem(foreign)
    else:
        ca_crt = bundle + "\n"
    issuer = f"/api/v1/namespaces/{c.linkerd_ns}/secrets/linkerd-identity-issuer"
    _patch(c, issuer, {"data": {"ca.crt": base64.b64encode(ca_crt.encode()).decode()}})

    (found,) = _only(c, "issuer-ca-mismatch")
    assert found["object"] == f"Secret {c.linkerd_ns}/linkerd-identity-issuer"
    assert found["severity"] == "error" and found["action"]


# --- 2. double encryption ----------------------------------------------------------------------


def test_kong_tls_through_both_proxies_is_double_encryption_until_one_side_skips(
    kube: Kube, tmp_path: Path
) -> None:
    c = published_cluster(kube, tmp_path, "vdouble")
    service = f"Service {c.app_ns}/payments-api port 443"
    _kong_pod(c, "kong-1")
    _upstream_pod(c, "payments-1")
    (found,) = _only(c, "double-encryption")
    assert found["object"] == service
    assert f"{c.kong_ns}/kong-1" in found["message"]
    assert f"{c.app_ns}/payments-1" in found["message"]
    text = c.run("verify", "--kubeconfig", str(kube.admin_kubeconfig))
    assert text.returncode == 1
    assert f"PROBLEM {service}: Kong's TLS to it" in text.stdout
    assert f"[double-encryption] fix: add 443 to {SKIP_OUTBOUND} on Kong's Pods" in text.stdout

    pod = f"/api/v1/namespaces/{c.app_ns}/pods/payments-1"
    _patch(c, pod, {"metadata": {"annotations": {SKIP_INBOUND: "4000-5000"}}})
    assert _only(c, "double-encryption")[0]["object"] == service  # 443 is not in that range
    _patch(c, pod, {"metadata": {"annotations": {SKIP_INBOUND: "80, 400-500,"}}})
    code, doc = _verify(c)
    assert (code, doc["findings"]) == (0, []), doc  # 443 is in 400-500

    _patch(c, pod, {"metadata": {"annotations": {SKIP_INBOUND: None}}})
    kong = f"/api/v1/namespaces/{c.kong_ns}/pods/kong-1"
    _patch(c, kong, {"metadata": {"annotations": {SKIP_OUTBOUND: "443"}}})
    code, doc = _verify(c)
    assert (code, doc["findings"]) == (0, []), doc


# --- 3. what Kong's controllers filter on -----------------------------------------------------


@pytest.mark.parametrize("secret", ["kong CA", "kong client"])
def test_a_kong_secret_without_kongs_label(kube: Kube, tmp_path: Path, secret: str) -> None:
    c = published_cluster(kube, tmp_path, "vlabel")
    if secret == "kong CA":
        listed = c.get(
            f"/api/v1/namespaces/{c.kong_ns}/secrets?labelSelector=konghq.com/ca-cert=true"
        )
        namespace, name = c.kong_ns, listed["items"][0]["metadata"]["name"]
    else:
        namespace, name = c.app_ns, "kong-upstream-payments"
    path = f"/api/v1/namespaces/{namespace}/secrets/{name}"
    _patch(c, path, {"metadata": {"labels": {"konghq.com/secret": None}}})
    (found,) = _only(c, "kong-secret-unlabelled")
    assert found["object"] == f"Secret {namespace}/{name}"


def test_a_users_own_client_secret_without_kongs_label_is_not_a_finding(
    kube: Kube, tmp_path: Path
) -> None:
    """KIC reads a Secret a Service names whatever its labels: only the daemon's own Secrets
    must carry the label Kong Operator filters on."""
    c = published_cluster(kube, tmp_path, "vuser")
    kube.apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "shop-cert", "namespace": c.app_ns},
            "type": "kubernetes.io/tls",
            "stringData": {"tls.crt": "", "tls.key": ""},
        }
    )
    kube.apply(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": "shop-api",
                "namespace": c.app_ns,
                "annotations": {"konghq.com/client-cert": "shop-cert"},
            },
            "spec": {"ports": [{"port": 443}]},
        }
    )
    code, doc = _verify(c)
    assert (code, doc["findings"]) == (0, []), doc


def test_a_kong_ca_secret_of_another_ingress_class(kube: Kube, tmp_path: Path) -> None:
    c = make_cluster(kube, tmp_path, "vclass")
    config = yaml.safe_load(c.config.read_text())
    config["kong"]["ingress_class"] = "kong-internal"
    c.config.write_text(yaml.safe_dump(config))
    assert c.run("run", "--once").returncode == 0
    assert _verify(c)[0] == 0  # published with the configured class

    listed = c.get(f"/api/v1/namespaces/{c.kong_ns}/secrets?labelSelector=konghq.com/ca-cert=true")
    name = listed["items"][0]["metadata"]["name"]
    path = f"/api/v1/namespaces/{c.kong_ns}/secrets/{name}"
    _patch(c, path, {"metadata": {"annotations": {"kubernetes.io/ingress.class": "kong"}}})
    (found,) = _only(c, "kong-ca-ingress-class")
    assert found["object"] == f"Secret {c.kong_ns}/{name}"
    assert "kong-internal" in found["message"]


@pytest.mark.parametrize(
    ("secret_type", "finding_id"),
    [(None, "client-cert-missing"), ("Opaque", "client-cert-not-tls")],
    ids=["missing", "not-tls"],
)
def test_a_client_cert_annotation_naming_no_tls_secret_of_its_namespace(
    kube: Kube, tmp_path: Path, secret_type: str | None, finding_id: str
) -> None:
    """A Service of no configured client, beside one that is: every Service of the
    clients' namespaces is looked at."""
    c = published_cluster(kube, tmp_path, "vclientcert")
    shop = c.app_ns
    if secret_type is not None:
        kube.apply(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {
                    "name": "shop-cert",
                    "namespace": shop,
                    "labels": {"konghq.com/secret": "true"},
                },
                "type": secret_type,
                "stringData": {"cert": "not used"},
            }
        )
    kube.apply(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": "shop-api",
                "namespace": shop,
                "annotations": {
                    "konghq.com/client-cert": "shop-cert",
                    "konghq.com/protocol": "https",
                },
            },
            "spec": {"ports": [{"port": 443}]},
        }
    )
    (found,) = _only(c, finding_id)
    where = f"Service {shop}/shop-api" if secret_type is None else f"Secret {shop}/shop-cert"
    assert found["object"] == where


# --- 4. Pods injected with another trust bundle ------------------------------------------------


def test_meshed_pods_injected_with_another_bundle_are_counted_and_the_oldest_named(
    kube: Kube, tmp_path: Path
) -> None:
    c = published_cluster(kube, tmp_path, "vstale")
    bundle = _bundle(c)
    assert bundle != bundle.strip()  # else the trimmed case below proves nothing
    _upstream_pod(c, "current")  # the sha256 of the exact ca-bundle.crt bytes
    # The injector hashes the bytes untrimmed: a hash of the trimmed text is another bundle.
    trimmed = hashlib.sha256(bundle.strip().encode()).hexdigest()
    _pod(c, c.app_ns, "trimmed", {"app": "payments"}, {TRUST_ROOT_SHA: trimmed})
    _pod(c, c.app_ns, "older-bundle", {"app": "orders"}, {TRUST_ROOT_SHA: "0" * 64})

    (found,) = _only(c, "stale-trust-root")
    assert found["message"].startswith("2 meshed Pod(s) were injected with another trust bundle")
    stale = [c.get(f"/api/v1/namespaces/{c.app_ns}/pods/{n}") for n in ("trimmed", "older-bundle")]
    oldest = min(stale, key=lambda p: (p["metadata"]["creationTimestamp"], p["metadata"]["name"]))
    assert found["object"] == f"Pod {c.app_ns}/{oldest['metadata']['name']}"


# --- 5. less than half of rotate_before left ---------------------------------------------------

# Settings that want each kind renewed earlier than what `run --once` just published allows
# for: the published certificate has less than half of that rotate_before left.
OVERDUE: dict[str, Any] = {
    "linkerd issuer": ("linkerd", "issuer", {"lifetime": "400h", "rotate_before": "100h"}),
    "kong intermediate": ("kong", "intermediate", {"lifetime": "10000h", "rotate_before": "4400h"}),
    "trust anchor": ("root", None, {"lifetime": "87600h", "rotate_before": "17600h"}),
    "kong client": ("kong", "clients", {"lifetime": "3000h", "rotate_before": "1500h"}),
}


@pytest.mark.parametrize("kind", OVERDUE)
def test_a_certificate_with_less_than_half_its_rotate_before_left(
    kube: Kube, tmp_path: Path, kind: str
) -> None:
    c = published_cluster(kube, tmp_path, "voverdue")
    config = yaml.safe_load(c.config.read_text())
    section, key, times = OVERDUE[kind]
    if key is None:
        config[section] = times
    elif key == "clients":
        config[section][key][0].update(times)  # payments
    else:
        config.setdefault(section, {})[key] = times
    judged = tmp_path / "judged.yaml"
    judged.write_text(yaml.safe_dump(config))

    (found,) = _only(c, "renewal-overdue", judged)
    where = {
        "linkerd issuer": "linkerd issuer",
        "kong intermediate": "kong intermediate ",
        "trust anchor": f"ConfigMap {c.linkerd_ns}/{TRUST_ROOTS}: root ",
        "kong client": "kong client payments",
    }[kind]
    assert found["object"].startswith(where), found
    assert found["message"].endswith("renewal is failing")


def test_an_api_server_that_refuses_verify_is_a_finding_in_json(kube: Kube, tmp_path: Path) -> None:
    c = make_cluster(kube, tmp_path, "vrefused")
    stranger = kube.write_kubeconfig("not-a-token", tmp_path / "stranger.kubeconfig")
    result = c.run("verify", "--kubeconfig", str(stranger), "--json")
    assert result.returncode == 1
    assert result.stderr.startswith("error: read ConfigMap"), result.stderr
    doc = json.loads(result.stdout)
    assert doc["ok"] is False
    assert [f["id"] for f in doc["findings"]] == ["cluster-unreadable"]
