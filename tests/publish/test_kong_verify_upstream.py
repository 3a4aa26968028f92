"""``verify_upstream`` with the Kong Ingress Controller, on the real kube-apiserver.

The daemon runs in-process as the ServiceAccount ``ca-daemon config rbac`` binds. What
KIC would make of the cluster is read back the way KIC 3.5 reads it (kic_view): a Kong CA
entity from every Secret or ConfigMap labelled ``konghq.com/ca-cert: "true"``
(internal/store/store.go ListCACerts, translate_cacerts.go), and for a Service the ``id``
of each ConfigMap its ``konghq.com/ca-certificates-configmaps`` names, looked up in the
Service's own namespace only (ingressrules.go handleServiceCACertificates). Kong refuses
a whole configuration with two CA entities of one id or one certificate (cert_digest is
unique), and builds a Service's CA store from nothing when one listed id is missing.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from ca_daemon.config.loading import load_settings
from ca_daemon.config.settings import Settings
from ca_daemon.journal.open import build_anchor_and_journal
from ca_daemon.model.state import Phase, trusted_roots
from ca_daemon.model.world import desired_world
from ca_daemon.pki.bundle import stable_id
from ca_daemon.publish.k8s_objects import kong_ca_secret_name
from ca_daemon.publish.kubernetes import KubernetesPublisher
from ca_daemon.report.rbac import manifests
from ca_daemon.rotation.engine import Engine
from ca_daemon.util.kube import api_client
from tests.support.kube_cluster import await_rbac
from tests.support.pki import self_signed_root
from tests.support.rotation_configs import T0
from tests.support.servers.helm import Helm
from tests.support.servers.kube import Kube
from tests.support.servers.tools import unique

pytestmark = pytest.mark.integration

CA_CONFIGMAPS = "konghq.com/ca-certificates-configmaps"
TLS_VERIFY = "konghq.com/tls-verify"
REF_ROLE = "ca-daemon.io%2Frole%3Dkong-ca-ref"
# Verifying Services: two in one namespace (they share its references), one in another.
VERIFYING = {
    "payments": "pay/payments-api",
    "refunds": "pay/refunds-api",
    "orders": "ord/orders-api",
}
PLAIN = {"search": "ord/search-api"}  # a client whose Service does not verify


@dataclass
class Setup:
    kube: Kube
    config: Path
    token: str
    kong_ns: str
    namespaces: dict[str, str]  # "pay"/"ord" -> the real namespace
    sa_namespace: str  # the daemon's ServiceAccount's

    @property
    def settings(self) -> Settings:
        return load_settings(self.config)

    def service(self, short: str) -> Any:
        ns, name = short.split("/")
        return self.kube.get(f"/api/v1/namespaces/{self.namespaces[ns]}/services/{name}")

    def references(self, short_ns: str) -> list[Any]:
        ns = self.namespaces[short_ns]
        found = self.kube.get(f"/api/v1/namespaces/{ns}/configmaps?labelSelector={REF_ROLE}")
        return list(found["items"])

    def engine(self) -> Engine:
        settings = self.settings
        anchor, journal = build_anchor_and_journal(settings)
        publisher = KubernetesPublisher(
            settings, api_client(self.kube.write_kubeconfig(self.token))
        )
        return Engine(settings, anchor, journal, [publisher])


def _config(workdir: Path, kong_ns: str, namespaces: dict[str, str]) -> dict[str, Any]:
    renewal = {"lifetime": "4h", "rotate_before": "1h"}

    def client(name: str, service: str, verify: bool) -> dict[str, Any]:
        ns, svc = service.split("/")
        return {
            "name": name,
            "common_name": f"kong.{name}.upstream",
            "service": f"{namespaces[ns]}/{svc}",
            "verify_upstream": verify,
            **renewal,
        }

    return {
        "anchor": {"local": {"dir": str(workdir / "data")}},
        "publish": {"kubernetes": {"enabled": True}},
        "linkerd": {"enabled": False},
        "root": {"lifetime": "240h", "rotate_before": "120h"},
        "kong": {
            "namespace": kong_ns,
            "ingress_class": "kong-internal",
            "intermediate": {"lifetime": "10h", "rotate_before": "3h"},
            "clients": [
                *(client(n, s, True) for n, s in VERIFYING.items()),
                *(client(n, s, False) for n, s in PLAIN.items()),
            ],
        },
        "rotation": {"propagation_delay": "10m", "clock_skew": "5m"},
    }


def _setup(kube: Kube, workdir: Path, prefix: str) -> Setup:
    kong_ns, sa_ns = unique(f"{prefix}-kong"), unique(f"{prefix}-cad")
    namespaces = {short: unique(f"{prefix}-{short}") for short in ("pay", "ord")}
    for ns in (kong_ns, sa_ns, *namespaces.values()):
        kube.create_namespace(ns)
    for short in (*VERIFYING.values(), *PLAIN.values()):
        ns, name = short.split("/")
        kube.apply(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {
                    "name": name,
                    "namespace": namespaces[ns],
                    "annotations": {"team": name},
                },
                "spec": {"ports": [{"port": 443}], "selector": {"app": name}},
            }
        )
    config = workdir / "config.yaml"
    config.write_text(yaml.safe_dump(_config(workdir, kong_ns, namespaces)))
    kube.create_service_account(sa_ns, "ca-daemon")
    for doc in manifests(load_settings(config), sa_ns, "ca-daemon"):
        kube.apply(doc)
    token = kube.service_account_token(sa_ns, "ca-daemon")
    for short in VERIFYING.values():  # each namespace's Role is in force
        ns, name = short.split("/")
        path = f"/api/v1/namespaces/{namespaces[ns]}/services/{name}"
        await_rbac(kube, token, path, allowed=True)
    return Setup(kube, config, token, kong_ns, namespaces, sa_ns)


# --- what KIC would see -------------------------------------------------------------------


def _data(obj: Any) -> dict[str, str]:
    data = obj.get("data") or {}
    if obj["kind"] == "Secret":
        return {k: base64.b64decode(v).decode() for k, v in data.items()}
    return dict(data)


def _digest(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


@dataclass
class KicView:
    entities: dict[str, x509.Certificate]  # CA entity id -> its certificate
    named: dict[str, list[str]]  # verifying Service (namespace/name) -> CA ids it lists


def kic_view(kube: Kube, namespaces: list[str]) -> KicView:
    """The CA entities and the Services' CA lists KIC would send Kong, asserting on the
    way everything that would make Kong refuse the configuration or a Service verify
    against nothing of ours."""
    entities: dict[str, x509.Certificate] = {}
    digests: set[str] = set()
    for ns in namespaces:
        for plural, kind in (("secrets", "Secret"), ("configmaps", "ConfigMap")):
            listed = kube.get(
                f"/api/v1/namespaces/{ns}/{plural}?labelSelector=konghq.com%2Fca-cert%3Dtrue"
            )
            for item in listed["items"]:
                data = _data({**item, "kind": kind})
                where = f"{ns}/{item['metadata']['name']}"
                pem = data.get("cert") or data.get("ca.crt")
                assert pem, f"{where}: labelled a CA certificate, holds none (KIC reports it)"
                (cert,) = x509.load_pem_x509_certificates(pem.encode())
                assert data["id"] not in entities, f"{where}: a second CA entity with one id"
                assert _digest(cert) not in digests, f"{where}: a second entity of one cert"
                entities[data["id"]] = cert
                digests.add(_digest(cert))
    named: dict[str, list[str]] = {}
    for ns in namespaces:
        for service in kube.get(f"/api/v1/namespaces/{ns}/services")["items"]:
            annotations = service["metadata"].get("annotations") or {}
            names = [n.strip() for n in annotations.get(CA_CONFIGMAPS, "").split(",") if n]
            if not names:
                continue
            where = f"{ns}/{service['metadata']['name']}"
            assert annotations.get(TLS_VERIFY) == "true", where
            assert annotations.get("konghq.com/protocol") == "https", where
            ids = []
            for name in names:
                ref = kube.get(f"/api/v1/namespaces/{ns}/configmaps/{name}")
                assert ref is not None, f"{where} names {name}, absent from its namespace"
                labels = ref["metadata"].get("labels") or {}
                assert labels.get("konghq.com/configmap") == "true", f"KIC ignores {name}"
                ids.append(ref["data"]["id"])
            assert set(ids) <= set(entities), f"{where} lists a CA Kong does not have"
            named[where] = ids
    return KicView(entities, named)


# --- the tests ------------------------------------------------------------------------------


def test_verifying_services_name_one_kong_ca_entity_per_root(kube: Kube, tmp_path: Path) -> None:
    s = _setup(kube, tmp_path, "verify")
    engine = s.engine()
    watched = [s.kong_ns, *s.namespaces.values()]

    first = engine.reconcile(now=T0)
    assert first.ok, first.errors
    assert first.state is not None
    (root,) = trusted_roots(first.state.ca)
    name = kong_ca_secret_name(root)
    # The Kong CA Secret and the references were made by this pass: no Service names
    # them until KIC has had a sync to see them, and the bundle is not confirmed yet.
    for short in VERIFYING.values():
        annotations = s.service(short)["metadata"]["annotations"]
        assert annotations["konghq.com/client-cert"].startswith("kong-upstream-")
        assert CA_CONFIGMAPS not in annotations and TLS_VERIFY not in annotations
    (report,) = first.reports
    assert not report.bundle_confirmed

    second = engine.reconcile(now=T0 + timedelta(minutes=1))
    assert second.ok, second.errors
    assert second.reports[0].bundle_confirmed
    view = kic_view(kube, watched)
    assert view.entities == {stable_id(root): root}  # one entity for the one root
    assert view.named == {
        f"{s.namespaces[ns]}/{svc}": [stable_id(root)]
        for ns, svc in (v.split("/") for v in VERIFYING.values())
    }
    for short in VERIFYING.values():
        annotations = s.service(short)["metadata"]["annotations"]
        assert annotations[CA_CONFIGMAPS] == name
        assert annotations["team"] == short.split("/")[1]  # never clobbered
    search = s.service(PLAIN["search"])["metadata"]["annotations"]
    assert CA_CONFIGMAPS not in search and TLS_VERIFY not in search
    # Two verifying Services in one namespace share its one reference per root.
    for short_ns in ("pay", "ord"):
        (ref,) = s.references(short_ns)
        assert ref["metadata"]["name"] == name
        assert ref["data"] == {"id": stable_id(root)}
        assert "konghq.com/ca-cert" not in ref["metadata"]["labels"]  # not an entity

    # References are ConfigMaps so that the daemon needs no access to the namespace's
    # other Secrets by name: it is refused them, beyond its clients' own.
    with kube.http(token=s.token) as http:
        for ns in s.namespaces.values():
            assert http.get(f"/api/v1/namespaces/{ns}/secrets/app-db").status_code == 403
            assert http.delete(f"/api/v1/namespaces/{ns}/secrets/app-db").status_code == 403

    ca = kube.get(f"/api/v1/namespaces/{s.kong_ns}/secrets/{name}")
    assert ca["metadata"]["annotations"]["kubernetes.io/ingress.class"] == "kong-internal"
    assert ca["metadata"]["labels"]["konghq.com/secret"] == "true"

    third = engine.reconcile(now=T0 + timedelta(minutes=2))
    assert third.ok and third.reports[0].changed == []  # settled: nothing to write

    # A verifying Service that does not exist is an error, but it trusts nothing, so it
    # does not hold a root rotation up.
    ns, svc = VERIFYING["orders"].split("/")
    with kube.http() as http:
        http.delete(f"/api/v1/namespaces/{s.namespaces[ns]}/services/{svc}").raise_for_status()
    fourth = engine.reconcile(now=T0 + timedelta(minutes=3))
    (report,) = fourth.reports
    assert "Service not found" in report.errors[f"service/{s.namespaces[ns]}/{svc}"]
    assert report.bundle_confirmed


def test_a_root_rotation_never_gives_kic_a_duplicate_or_a_missing_ca(
    kube: Kube, tmp_path: Path
) -> None:
    """A manual root rotation, an hour per pass, to the old root's retirement; after every
    pass the cluster is read as KIC reads it."""
    s = _setup(kube, tmp_path, "verifyrot")
    engine = s.engine()
    watched = [s.kong_ns, *s.namespaces.values()]
    services = [
        f"{s.namespaces[ns]}/{svc}" for ns, svc in (v.split("/") for v in VERIFYING.values())
    ]
    history: list[tuple[Phase, int, int, int]] = []  # phase, bundle, entities, named by all
    old = None
    for hour in range(60):
        now = T0 + timedelta(hours=hour)
        if hour == 2:
            engine.request_rotation("trust-anchor", "test", now=now)
        result = engine.reconcile(now=now)
        assert result.ok, (hour, result.errors)
        assert result.state is not None
        bundle = trusted_roots(result.state.ca)
        old = old or bundle[0]
        view = kic_view(kube, watched)
        named = {tuple(view.named.get(svc, ())) for svc in services}
        assert len(named) == 1, f"hour {hour}: verifying Services disagree: {named}"
        (ids,) = named
        # Everything listed is trusted, and once the bundle is confirmed, all of it is.
        assert set(ids) <= {stable_id(r) for r in bundle}, hour
        if hour > 0 and result.reports[-1].bundle_confirmed:
            assert list(ids) == [stable_id(r) for r in bundle], hour
        history.append((result.state.ca.phase, len(bundle), len(view.entities), len(ids)))
        if hour > 2 and result.state.ca.phase is Phase.STEADY and len(view.entities) == 1:
            break
    assert old is not None
    (new,) = bundle
    assert new != old
    assert view.entities == {stable_id(new): new}
    for short_ns in ("pay", "ord"):
        assert [r["metadata"]["name"] for r in s.references(short_ns)] == [kong_ca_secret_name(new)]
    # The new root: its Kong CA Secret and references first, and the Services name it
    # only on the pass after (KIC has seen them by then).
    added = next(i for i, h in enumerate(history) if h[1] == 2)
    assert history[added][2:] == (2, 1), history
    assert history[added + 1][2:] == (2, 2), history
    # The old root: the Services stop naming it and its references go in one pass; its
    # Kong CA Secret stays one pass longer (KIC may see it go first).
    retired = next(i for i, h in enumerate(history) if i > added and h[1] == 1)
    assert history[retired][2:] == (2, 1), history
    assert history[retired + 1][2:] == (1, 1), history


def _may_patch(kube: Kube, setup: Setup, short: str) -> bool:
    """What the apiserver's authorizer now says of the daemon patching that Service."""
    ns, name = short.split("/")
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {
            "user": f"system:serviceaccount:{setup.sa_namespace}:ca-daemon",
            "resourceAttributes": {
                "namespace": setup.namespaces[ns],
                "verb": "patch",
                "resource": "services",
                "name": name,
            },
        },
    }
    with kube.http() as http:
        answer = http.post("/apis/authorization.k8s.io/v1/subjectaccessreviews", json=review)
    answer.raise_for_status()
    return bool(answer.json()["status"].get("allowed"))


def _set_service_patch(kube: Kube, setup: Setup, short: str, allowed: bool) -> None:
    """Take the daemon's right to patch one verifying Service away, or give it back."""
    ns = setup.namespaces[short.split("/")[0]]
    live = kube.get(f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles/ca-daemon")
    for rule in live["rules"]:
        if rule["resources"] == ["services"]:
            rule["verbs"] = ["get", "patch"] if allowed else ["get"]
    role = {k: live[k] for k in ("apiVersion", "kind", "rules")}
    kube.apply(role | {"metadata": {"name": "ca-daemon", "namespace": ns}})
    deadline = time.monotonic() + 30
    while _may_patch(kube, setup, short) != allowed:
        assert time.monotonic() < deadline, "RBAC never changed"
        time.sleep(0.1)


def test_a_service_not_updated_keeps_the_references_of_the_root_retiring(
    kube: Kube, tmp_path: Path
) -> None:
    """The pass that retires the old root cannot patch one verifying Service: that
    namespace keeps the old root's reference (the Service may still name it, and KIC would
    otherwise verify against nothing), and so does its Kong CA Secret; both go once the
    Service is up to date."""
    s = _setup(kube, tmp_path, "verifykeep")
    engine = s.engine()
    blocked = VERIFYING["payments"]
    old_name = None
    for hour in range(60):
        now = T0 + timedelta(hours=hour)
        if hour == 2:
            engine.request_rotation("trust-anchor", "test", now=now)
        record, _ = engine.journal.load_ca()
        if old_name is None and record.roots:
            old_name = kong_ca_secret_name(trusted_roots(record)[0])
        retire_after = record.rotation.retire_after if record.rotation else None
        if retire_after is not None and now >= retire_after:
            _set_service_patch(kube, s, blocked, allowed=False)
            result = engine.reconcile(now=now)
            break
        assert engine.reconcile(now=now).ok, hour
    else:
        raise AssertionError("never came to retire the old root")
    assert old_name is not None
    kept = [e for e in result.errors if "references of retired roots kept" in e]
    assert kept and s.namespaces["pay"] in kept[0], result.errors
    assert old_name in [r["metadata"]["name"] for r in s.references("pay")]
    assert old_name not in [r["metadata"]["name"] for r in s.references("ord")]
    old_secret = f"/api/v1/namespaces/{s.kong_ns}/secrets/{old_name}"
    assert kube.get(old_secret) is not None
    _set_service_patch(kube, s, blocked, allowed=True)
    for later in range(hour + 1, hour + 4):
        engine.reconcile(now=T0 + timedelta(hours=later))
    assert old_name not in [r["metadata"]["name"] for r in s.references("pay")]
    assert kube.get(old_secret) is None


def test_a_stale_writer_cannot_take_a_root_off_a_service(kube: Kube, tmp_path: Path) -> None:
    """A deposed leader still holding the one-root world of an older journal must not
    narrow what a newer leader's Services trust, nor delete the references they name."""
    s = _setup(kube, tmp_path, "verifyfence")
    engine = s.engine()
    assert engine.reconcile(now=T0).ok
    loaded = engine.journal.load()
    world = desired_world(loaded.state, s.settings, loaded.version)
    (old,) = world.roots
    _, new = self_signed_root("root.linkerd.next")
    publisher = KubernetesPublisher(s.settings, api_client(kube.write_kubeconfig(s.token)))
    newer = replace(world, roots=(old, new), generation=loaded.version + 5)
    for _ in range(2):  # the second names the new root
        assert not publisher.publish(newer).errors
    both = f"{kong_ca_secret_name(old)},{kong_ca_secret_name(new)}"
    payments = VERIFYING["payments"]
    assert s.service(payments)["metadata"]["annotations"][CA_CONFIGMAPS] == both

    stale = publisher.publish(replace(world, generation=loaded.version))
    assert not stale.bundle_confirmed  # what the Services trust is not this world's
    for short in VERIFYING.values():
        ns, name = short.split("/")
        assert "newer than this pass's" in stale.errors[f"service/{s.namespaces[ns]}/{name}"]
        assert s.service(short)["metadata"]["annotations"][CA_CONFIGMAPS] == both
    for short_ns in ("pay", "ord"):
        kept = stale.errors[f"configmap/{s.namespaces[short_ns]}/kong-upstream-ca-*"]
        assert "references of retired roots kept" in kept
        assert len(s.references(short_ns)) == 2
    view = kic_view(kube, [s.kong_ns, *s.namespaces.values()])
    assert set(view.entities) == {stable_id(old), stable_id(new)}


def test_the_chart_grants_what_config_rbac_prints_for_verifying_clients(
    helm: Helm, tmp_path: Path
) -> None:
    config = _config(tmp_path, "kong", {"pay": "payments", "ord": "orders"})
    del config["anchor"], config["publish"]
    chart = Path(__file__).resolve().parents[2] / "charts" / "ca-daemon"
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"config": config}))
    out = helm.run("template", "ca-daemon", str(chart), "-n", "cad", "--values", str(values))
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and "config.yaml" in d.get("data", {})]
    rendered = tmp_path / "chart-config.yaml"
    rendered.write_text(cm["data"]["config.yaml"])
    sa = next(d for d in docs if d["kind"] == "ServiceAccount")["metadata"]["name"]

    def roles(found: list[dict[str, Any]]) -> dict[str, list[str]]:
        return {
            d["metadata"]["namespace"]: sorted(json.dumps(r, sort_keys=True) for r in d["rules"])
            for d in found
            if d["kind"] == "Role"
        }

    expected = roles(manifests(load_settings(rendered), "cad", sa))
    assert roles(docs) == expected
    # The references are named after roots: their ConfigMaps cannot be pinned, and only
    # the verifying namespaces get them (Secrets there stay pinned to the client's).
    reference_rule = {"apiGroups": [""], "resources": ["configmaps"]}
    for ns in ("payments", "orders"):
        rules = [json.loads(r) for r in expected[ns]]
        assert {**reference_rule, "verbs": ["get", "list", "update", "delete"]} in rules
        secrets = [r for r in rules if r["resources"] == ["secrets"] and "get" in r["verbs"]]
        assert all("resourceNames" in r for r in secrets)
    kong_rules = [json.loads(r) for r in expected["kong"]]
    assert not any(r["resources"] == ["configmaps"] for r in kong_rules)
