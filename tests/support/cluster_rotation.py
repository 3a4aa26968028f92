"""A root rotation on real OpenBao and the real kube-apiserver, with Kubernetes publishing.

The daemon runs in-process (``Engine``) as the ServiceAccount ``ca-daemon config rbac``
binds, with the Vault anchor on mounts unique to one test, the Kubernetes publisher and
``LinkerdRollout``. There is no controller-manager or kubelet, so the test plays their
part (``Mesh``): when the daemon rolls a Linkerd Deployment, that Deployment's Pod is
re-created with a container start time after the roll; meshed app Pods are re-created
with whatever bundle the test says, as Linkerd's injector would inject them.

The clock. Vault stamps ``not_before`` with its own wall clock (now - 30s), and the
invariant "nothing is signed by a root before it has been in every bundle for the
propagation delay" is judged from ``not_before``. So until a new root has signed, the
simulated clock must not run ahead of the wall clock: it follows it, whole seconds, and
the (short) propagation delay is really waited out. After activation nothing new is
first signed by a fresh root, and the clock jumps hours ahead to retire the old root.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import httpx
import yaml
from cryptography import x509

from ca_daemon.config.loading import load_settings
from ca_daemon.config.settings import Settings
from ca_daemon.journal.journal import Journal
from ca_daemon.journal.open import build_anchor_and_journal
from ca_daemon.model.world import TrustWorld
from ca_daemon.pki.bundle import bundle_hash, fingerprint, parse_pem_certificates
from ca_daemon.pki.chain import directly_issued_by
from ca_daemon.publish.base import Publisher, PublishReport
from ca_daemon.publish.kubernetes import KubernetesPublisher
from ca_daemon.publish.linkerd_identity import Answer
from ca_daemon.publish.linkerd_rollout import RESTARTED_AT, LinkerdRollout
from ca_daemon.report.rbac import manifests
from ca_daemon.rotation.engine import Engine
from ca_daemon.util.kube import api_client
from tests.support.invariants import InvariantChecker, Published, read_cluster
from tests.support.kube_cluster import await_rbac
from tests.support.rotation_harness import CheckedPublisher, Clock, LinkerdView
from tests.support.servers.kube import Kube
from tests.support.servers.linkerd import LinkerdCheck
from tests.support.servers.tools import unique

TRUST_ANCHORS = "LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS"
LINKERD_DEPLOYMENTS = ("linkerd-destination", "linkerd-identity", "linkerd-proxy-injector")
TRUST_ROOTS = "linkerd-identity-trust-roots"
ISSUER_SECRET = "linkerd-identity-issuer"
# OpenBao backdates every certificate's not_before by 30s (not_before_duration): that,
# not the daemon's rotation.clock_skew, is the gap between signing and not_before here.
VAULT_BACKDATE = timedelta(seconds=30)
PROPAGATION_DELAY = timedelta(seconds=3)
HOUR = timedelta(hours=1)


def wall_clock() -> datetime:
    """Now, in whole seconds: certificate and restartedAt times have no fractions."""
    return datetime.now(UTC).replace(microsecond=0)


def stamp(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_stamp(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def rotation_config(
    workdir: Path,
    vault: dict[str, Any],
    *,
    linkerd_ns: str | None = None,
    kong_ns: str = "kong",
    app_ns: str | None = None,
    confirm: str = "none",
) -> Path:
    """Short lifetimes (the old chain is retired ~60h after activation), a propagation
    delay of seconds, Kubernetes publishing when a Linkerd namespace is given.
    ``confirm``: whether retirement waits for Linkerd's identity controller to confirm
    the new issuer ("events"; tests that play it: tests/support/linkerd_identity.py)."""
    payments: dict[str, Any] = {
        "name": "payments",
        "common_name": "kong.payments.upstream",
        "dns_names": ["kong.kong.svc.cluster.local"],
        "secret": "kong-upstream-payments",
        "lifetime": "60h",
        "rotate_before": "20h",
    }
    if app_ns is not None:
        payments["service"] = f"{app_ns}/payments-api"
    config: dict[str, Any] = {
        "anchor": {"backend": "vault", "vault": vault, "local": {"dir": str(workdir / "data")}},
        "root": {"lifetime": "240h", "rotate_before": "120h"},
        "linkerd": {"issuer": {"lifetime": "48h", "rotate_before": "16h"}},
        "kong": {
            "namespace": kong_ns,
            "intermediate": {"lifetime": "100h", "rotate_before": "30h"},
            "clients": [
                payments,
                {
                    "name": "orders",
                    "common_name": "kong.orders.upstream",
                    "lifetime": "60h",
                    "rotate_before": "20h",
                },
            ],
        },
        "rotation": {"propagation_delay": "3s", "clock_skew": "5m"},
    }
    if linkerd_ns is None:
        config["publish"] = {"kubernetes": {"enabled": False}}
    else:
        config["publish"] = {"kubernetes": {"enabled": True}}
        config["linkerd"] |= {
            "namespace": linkerd_ns,
            "restart": "control-plane",
            # An emergency rolls the apps too (their Deployments, which the Mesh follows).
            "emergency_restart": "all",
            "gate": "pods",
            "confirm": confirm,
        }
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# --- Vault, as its administrator reads it ---------------------------------------------------


@dataclass(frozen=True)
class VaultAdmin:
    address: str
    token: str

    def _call(self, method: str, path: str) -> Any:
        with httpx.Client(
            base_url=self.address, headers={"X-Vault-Token": self.token}, timeout=30
        ) as http:
            response = http.request(method, f"/v1/{path}")
        response.raise_for_status()
        return response.json()["data"]

    def default_issuer(self, mount: str) -> str:
        """The name of ``mount``'s default issuer (config/issuers holds its id)."""
        issuer_id = self._call("GET", f"{mount}/config/issuers")["default"]
        name: str = self._call("GET", f"{mount}/issuer/{issuer_id}")["issuer_name"]
        return name

    def issuer_names(self, mount: str) -> list[str]:
        listed = self._call("LIST", f"{mount}/issuers")
        return sorted(info["issuer_name"] for info in listed["key_info"].values())

    def issuer_cert(self, mount: str, ref: str) -> x509.Certificate:
        pem = self._call("GET", f"{mount}/issuer/{ref}")["certificate"]
        return parse_pem_certificates(pem, what=f"{mount} issuer {ref}")[0]


# --- the cluster ----------------------------------------------------------------------------


@dataclass
class RotationCluster:
    kube: Kube
    vault: VaultAdmin
    workdir: Path
    config: Path
    linkerd_ns: str
    kong_ns: str
    app_ns: str
    token: str  # the daemon's ServiceAccount
    root_mount: str
    kong_mount: str
    sa_namespace: str  # the daemon's own: its ServiceAccount, Lease and Events

    @property
    def settings(self) -> Settings:
        return load_settings(self.config)

    @property
    def clients(self) -> dict[str, tuple[str, str]]:
        return {
            "payments": (self.app_ns, "kong-upstream-payments"),
            "orders": (self.kong_ns, "kong-upstream-orders"),
        }

    def get(self, path: str) -> Any:
        return self.kube.get(path)

    def secret(self, ns: str, name: str) -> Any:
        return self.get(f"/api/v1/namespaces/{ns}/secrets/{name}")

    def bundle_pem(self) -> str:
        cm = self.get(f"/api/v1/namespaces/{self.linkerd_ns}/configmaps/{TRUST_ROOTS}")
        pem: str = cm["data"]["ca-bundle.crt"]
        return pem

    def issuer_cert(self) -> x509.Certificate:
        issuer = self.secret(self.linkerd_ns, ISSUER_SECRET)
        data = base64.b64decode(issuer["data"]["tls.crt"])
        return parse_pem_certificates(data, what="issuer")[0]

    def issuer_cert_or_none(self) -> x509.Certificate | None:
        """The issuer, or None before the first publish."""
        if self.secret(self.linkerd_ns, ISSUER_SECRET) is None:
            return None
        return self.issuer_cert()

    def kong_ca_secrets(self) -> dict[str, str]:
        """Kong CA Secrets by name -> fingerprint of the root each holds."""
        listed = self.get(
            f"/api/v1/namespaces/{self.kong_ns}/secrets?labelSelector=konghq.com%2Fca-cert%3Dtrue"
        )
        found = {}
        for s in listed["items"]:
            cert = parse_pem_certificates(base64.b64decode(s["data"]["cert"]), what="kong ca")[0]
            found[s["metadata"]["name"]] = fingerprint(cert)
        return found

    def client_uids(self) -> dict[str, str]:
        return {
            name: self.secret(ns, secret)["metadata"]["uid"]
            for name, (ns, secret) in self.clients.items()
        }

    def restarted_at(self) -> dict[str, str | None]:
        """Each control-plane Deployment's pod-template restartedAt (None: never rolled)."""
        out: dict[str, str | None] = {}
        for name in LINKERD_DEPLOYMENTS:
            live = self.get(f"/apis/apps/v1/namespaces/{self.linkerd_ns}/deployments/{name}")
            annotations = live["spec"]["template"]["metadata"].get("annotations") or {}
            out[name] = annotations.get(RESTARTED_AT)
        return out

    def read_cluster(self) -> Published:
        return read_cluster(self.get, self.linkerd_ns, self.kong_ns, self.clients)

    def linkerd_view(self) -> LinkerdView | None:
        issuer = self.secret(self.linkerd_ns, ISSUER_SECRET)
        if issuer is None:
            return None
        data = {k: base64.b64decode(v) for k, v in issuer["data"].items()}
        return LinkerdView(data["ca.crt"], data["tls.crt"], data["tls.key"])


def make_rotation_cluster(
    kube: Kube, vault: VaultAdmin, workdir: Path, prefix: str, confirm: str = "none"
) -> RotationCluster:
    """Namespaces, Vault mounts named for this test, the daemon's ServiceAccount bound to
    `config rbac` output, and a Linkerd control plane made of Deployments."""
    linkerd_ns, kong_ns, app_ns, sa_ns = (
        unique(f"{prefix}-{n}") for n in ("linkerd", "kong", "app", "cad")
    )
    for ns in (linkerd_ns, kong_ns, app_ns, sa_ns):
        kube.create_namespace(ns)
    kube.apply(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "payments-api", "namespace": app_ns},
            "spec": {"ports": [{"port": 443}], "selector": {"app": "payments"}},
        }
    )
    mounts = unique(prefix)
    token_file = workdir / "vault-token"
    token_file.write_text(vault.token + "\n")
    token_file.chmod(0o600)
    config = rotation_config(
        workdir,
        {
            "address": vault.address,
            "auth": {"method": "token", "token_file": str(token_file)},
            "root_mount": f"{mounts}-root",
            "kong_mount": f"{mounts}-kong",
            "state_path": f"ca-daemon/{mounts}",
        },
        linkerd_ns=linkerd_ns,
        kong_ns=kong_ns,
        app_ns=app_ns,
        confirm=confirm,
    )
    kube.create_service_account(sa_ns, "ca-daemon")
    for doc in manifests(load_settings(config), sa_ns, "ca-daemon"):
        kube.apply(doc)
    token = kube.service_account_token(sa_ns, "ca-daemon")
    await_rbac(kube, token, "/api/v1/pods?limit=1", allowed=True)
    await_rbac(kube, token, f"/apis/apps/v1/namespaces/{linkerd_ns}/deployments", allowed=True)
    return RotationCluster(
        kube,
        vault,
        workdir,
        config,
        linkerd_ns,
        kong_ns,
        app_ns,
        token,
        f"{mounts}-root",
        f"{mounts}-kong",
        sa_ns,
    )


# --- what the kubelet, the controllers and Linkerd's injector would do ----------------------


def _owner(obj: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": obj["apiVersion"],
        "kind": obj["kind"],
        "name": obj["metadata"]["name"],
        "uid": obj["metadata"]["uid"],
        "controller": True,
    }


@dataclass
class Mesh:
    """Meshed Pods, re-created as Kubernetes would re-create them."""

    kube: Kube
    linkerd_ns: str
    app_ns: str
    replica_sets: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    pods: dict[tuple[str, str], str] = field(default_factory=dict)  # (ns, workload) -> Pod
    rolled: dict[str, str] = field(default_factory=dict)  # Deployment -> restartedAt seen
    generation: int = 0

    def _workload(self, ns: str, name: str) -> None:
        labels = {"app": name}
        template = {
            "metadata": {"labels": labels},
            "spec": {"containers": [{"name": "app", "image": "registry.invalid/app"}]},
        }
        deployment = self.kube.apply(
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": name, "namespace": ns},
                "spec": {"selector": {"matchLabels": labels}, "template": template},
            }
        )
        self.replica_sets[ns, name] = self.kube.apply(
            {
                "apiVersion": "apps/v1",
                "kind": "ReplicaSet",
                "metadata": {
                    "name": f"{name}-5d8f9c",
                    "namespace": ns,
                    "ownerReferences": [_owner(deployment)],
                },
                "spec": {"selector": {"matchLabels": labels}, "template": template},
            }
        )

    def _pod(self, ns: str, workload: str, started: datetime, anchors: str | None = None) -> str:
        """A Pod as Linkerd's injector makes it (literal anchors, hash of the exact bundle)
        or, with no anchors, as the control-plane chart does (configMapKeyRef)."""
        self.generation += 1
        rs = self.replica_sets[ns, workload]
        name = f"{rs['metadata']['name']}-{self.generation:05d}"
        if anchors is None:
            ref = {"name": TRUST_ROOTS, "key": "ca-bundle.crt"}
            var: dict[str, Any] = {"name": TRUST_ANCHORS, "valueFrom": {"configMapKeyRef": ref}}
            hashed = "helm's own value"  # control-plane Pods: Helm's hash, never comparable
        else:
            var = {"name": TRUST_ANCHORS, "value": anchors.strip() + "\n"}  # _proxy.tpl
            hashed = anchors
        containers: list[dict[str, Any]] = [
            {"name": "linkerd-proxy", "image": "cr.l5d.io/linkerd/proxy", "env": [var]},
            {"name": "app", "image": "registry.invalid/app"},
        ]
        self.kube.apply(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": name,
                    "namespace": ns,
                    "ownerReferences": [_owner(rs)],
                    "labels": {"linkerd.io/control-plane-ns": self.linkerd_ns, "app": workload},
                    "annotations": {"linkerd.io/trust-root-sha256": bundle_hash(hashed)},
                },
                "spec": {"containers": containers},
            }
        )
        status = {
            "phase": "Running",
            "containerStatuses": [
                {
                    "name": c["name"],
                    "image": c["image"],
                    "imageID": "",
                    "ready": True,
                    "restartCount": 0,
                    "state": {"running": {"startedAt": stamp(started)}},
                }
                for c in containers
            ],
        }
        with self.kube.http() as http:
            http.patch(
                f"/api/v1/namespaces/{ns}/pods/{name}/status",
                json={"status": status},
                headers={"Content-Type": "application/merge-patch+json"},
            ).raise_for_status()
        return f"{ns}/{name}"

    def _replace(
        self, ns: str, workload: str, started: datetime, anchors: str | None = None
    ) -> str:
        old = self.pods.get((ns, workload))
        if old is not None:
            # Never bound to a node, so the API server deletes it at once.
            with self.kube.http() as http:
                http.delete(
                    f"/api/v1/namespaces/{old.replace('/', '/pods/', 1)}",
                    params={"gracePeriodSeconds": 0},
                ).raise_for_status()
        self.pods[ns, workload] = self._pod(ns, workload, started, anchors)
        return self.pods[ns, workload]

    def control_plane(self, started: datetime) -> None:
        for name in LINKERD_DEPLOYMENTS:
            self._workload(self.linkerd_ns, name)
            self._replace(self.linkerd_ns, name, started)

    def app(self, workload: str, bundle: str, started: datetime) -> str:
        """A meshed app Pod injected with ``bundle``; re-injects it when it exists."""
        if (self.app_ns, workload) not in self.replica_sets:
            self._workload(self.app_ns, workload)
        return self._replace(self.app_ns, workload, started, bundle)

    def follow_app_restarts(self, bundle: str, stuck: frozenset[str] = frozenset()) -> list[str]:
        """The same for the apps' Deployments (``restart: all`` rolls them): a new Pod, its
        proxy injected with ``bundle`` (the trust-roots ConfigMap's now), for every rolled
        one that is not ``stuck`` (its new Pod never starts)."""
        replaced = []
        for ns, workload in list(self.replica_sets):
            if ns != self.app_ns or workload in stuck:
                continue
            live = self.kube.get(f"/apis/apps/v1/namespaces/{ns}/deployments/{workload}")
            annotations = live["spec"]["template"]["metadata"].get("annotations") or {}
            value = annotations.get(RESTARTED_AT)
            key = f"{ns}/{workload}"
            if value is None or self.rolled.get(key) == value:
                continue
            self.rolled[key] = value
            started = parse_stamp(value) + timedelta(seconds=1)
            replaced.append(self._replace(ns, workload, started, bundle))
        return replaced

    def follow_restarts(self, restarted_at: dict[str, str | None]) -> list[str]:
        """The Deployment controller and kubelet: a Deployment whose restartedAt changed gets
        a new Pod whose containers start a second after the roll."""
        replaced = []
        for name, value in restarted_at.items():
            if value is None or self.rolled.get(name) == value:
                continue
            self.rolled[name] = value
            started = parse_stamp(value) + timedelta(seconds=1)
            replaced.append(self._replace(self.linkerd_ns, name, started))
        return replaced


# --- watching the daemon --------------------------------------------------------------------


@dataclass
class Snapshot:
    """What the cluster showed right after one publish."""

    at: datetime
    issuer_root: str  # fingerprint of the root that signed the published issuer
    restarted_at: dict[str, str | None]


@dataclass
class Watch:
    """Publishes through ``inner``, then notes which root signed the issuer Secret and the
    control-plane Deployments' restartedAt, in publish order."""

    inner: Publisher
    cluster: RotationCluster
    clock: Clock
    snapshots: list[Snapshot] = field(default_factory=list)
    description: str = ""

    def __post_init__(self) -> None:
        self.description = self.inner.description

    def publish(self, world: TrustWorld) -> PublishReport:
        report = self.inner.publish(world)
        issuer = self.cluster.issuer_cert()
        roots = parse_pem_certificates(self.cluster.bundle_pem(), what="bundle")
        signer = next((fingerprint(r) for r in roots if directly_issued_by(issuer, r)), "?")
        self.snapshots.append(Snapshot(self.clock.now, signer, self.cluster.restarted_at()))
        return report


@dataclass
class Restart:
    at: datetime  # restartedAt the daemon asked for
    confirmed_at: datetime | None  # the journal's two-root confirmation at that moment
    publishes_before: int  # publishes seen before the roll
    rolled: list[str]


@dataclass
class RecordingRollout:
    """``LinkerdRollout``, noting each restart with what the journal said at that moment."""

    inner: LinkerdRollout
    journal: Journal
    watch: Watch
    restarts: list[Restart] = field(default_factory=list)
    description: str = "linkerd-rollout"

    def restart(self, scope: Literal["control-plane", "all"], at: datetime) -> list[str]:
        record, _ = self.journal.load_ca()
        confirmed = record.rotation.confirmed_at if record.rotation else None
        rolled = self.inner.restart(scope, at)
        self.restarts.append(Restart(at, confirmed, len(self.watch.snapshots), rolled))
        return rolled

    def pending_pods(
        self, bundle_pem: str, confirmed_at: datetime, restarted: bool = False
    ) -> list[str]:
        return self.inner.pending_pods(bundle_pem, confirmed_at, restarted)

    def would_touch(self, scope: Literal["control-plane", "all"]) -> tuple[list[str], list[str]]:
        return self.inner.would_touch(scope)

    def report_pending(self, pods: list[str], bundle_hash: str) -> None:
        self.inner.report_pending(pods, bundle_hash)

    def issuer_answer(self, since: datetime) -> Answer | None:
        return self.inner.issuer_answer(since)

    def report_issuer(self, problem: str | None) -> None:
        self.inner.report_issuer(problem)


@dataclass
class Daemon:
    engine: Engine
    clock: Clock
    checked: CheckedPublisher
    watch: Watch
    rollout: RecordingRollout


def daemon(cluster: RotationCluster, linkerd_check: LinkerdCheck) -> Daemon:
    """The daemon in-process as its ServiceAccount, every publish checked: the invariants
    on what the cluster shows, and Linkerd's validation of the published issuer."""
    settings = cluster.settings
    clock = Clock(wall_clock())
    anchor, journal = build_anchor_and_journal(settings)
    api = api_client(cluster.kube.write_kubeconfig(cluster.token))
    watch = Watch(KubernetesPublisher(settings, api), cluster, clock)
    checked = CheckedPublisher(
        watch,
        clock,
        InvariantChecker(settings.rotation.propagation_delay, VAULT_BACKDATE),
        cluster.read_cluster,
        cluster.linkerd_view,
        linkerd_check,
    )
    rollout = RecordingRollout(LinkerdRollout(settings, api), journal, watch)
    engine = Engine(settings, anchor, journal, [checked], clock=clock, rollout=rollout)
    return Daemon(engine, clock, checked, watch, rollout)


def follow_wall_clock(clock: Clock, pause: float = 0.5) -> None:
    """Let real time pass and bring the simulated clock to it (never backwards)."""
    time.sleep(pause)
    clock.now = max(clock.now, wall_clock())
