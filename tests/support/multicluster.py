"""Two clusters served from one root: ``west`` (home) on the session's kube-apiserver and
``east`` (linked) on a second kube-apiserver with its own etcd, certificates and tokens.

Each cluster has its own Linkerd namespace, Kong namespace and clients (the same names
in both: each cluster's are its own credentials), control plane made of Deployments, meshed
app Pods (``Mesh``: the test plays the controllers, the kubelet and Linkerd's injector)
and the daemon's ServiceAccount bound by what ``config rbac`` (``--cluster east``)
prints. The daemon runs in-process on the wiring ``run`` uses (``build_runtime``), with
one more publisher after the real ones, ``Observer``, that publishes nothing: it reads
both clusters back and checks, at every publish,

- the SPEC's invariants with every cluster's bundles as one set of bundles: an issuer
  or Kong intermediate of either cluster must be signed by a root that has been in
  *every* cluster's bundle for the propagation delay (the lockstep invariant), and every
  published chain of either cluster must verify under every bundle of both, and
- Linkerd's validation (tests/linkerd-check) of each cluster's issuer under its own
  bundle *and under the other cluster's*: an issuer of west, and a proxy leaf it
  issues, verify under east's trust roots at every moment, and the other way round.

A cluster whose API server is stopped cannot change, so while it is down the observer
keeps checking with what it last read there.
"""

from __future__ import annotations

import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ca_daemon.config.loading import load_settings
from ca_daemon.config.settings import Settings
from ca_daemon.model.world import TrustWorld
from ca_daemon.publish.base import PublishReport
from ca_daemon.report.rbac import manifests
from ca_daemon.rotation.engine import Engine
from ca_daemon.service.wiring import build_runtime
from tests.support.cluster_rotation import (
    HOUR,
    VAULT_BACKDATE,
    Mesh,
    RotationCluster,
    VaultAdmin,
    make_rotation_cluster,
    wall_clock,
)
from tests.support.invariants import InvariantChecker, Published
from tests.support.kube_cluster import await_rbac
from tests.support.rotation_harness import Clock, LinkerdView
from tests.support.servers.kube import Kube
from tests.support.servers.linkerd import LinkerdCheck
from tests.support.servers.openbao import OpenBao
from tests.support.servers.tools import unique

HOME = "west"
LINKED = "east"


@dataclass
class TwoClusters:
    home: RotationCluster
    linked: RotationCluster
    config: Path
    meshes: dict[str, Mesh]

    @property
    def settings(self) -> Settings:
        return load_settings(self.config)

    def cluster(self, name: str) -> RotationCluster:
        return self.home if name == HOME else self.linked

    def clusters(self) -> list[tuple[str, RotationCluster]]:
        return [(HOME, self.home), (LINKED, self.linked)]

    def follow_restarts(self) -> dict[str, list[str]]:
        """Both clusters' Deployment controllers: rolled control planes get new Pods (the
        Pods made, by cluster)."""
        return {
            name: self.meshes[name].follow_restarts(cluster.restarted_at())
            for name, cluster in self.clusters()
        }


def make_two_clusters(
    kube: Kube,
    kube_b: Kube,
    openbao: OpenBao,
    workdir: Path,
    prefix: str,
    east_linkerd: dict[str, Any] | None = None,
    **extra: Any,
) -> TwoClusters:
    """west as tests/support/cluster_rotation.py makes a cluster (Vault anchor, Kong, pods
    gate), east linked to it with Linkerd only (``east_linkerd`` changes its settings);
    ``extra`` goes into the configuration."""
    vault = VaultAdmin(openbao.address, openbao.token)
    (workdir / "home").mkdir()
    home = make_rotation_cluster(kube, vault, workdir / "home", prefix)
    linkerd_ns, kong_ns, app_ns, sa_ns = (
        unique(f"{prefix}-e-{n}") for n in ("linkerd", "kong", "app", "cad")
    )
    for ns in (linkerd_ns, kong_ns, app_ns, sa_ns):
        kube_b.create_namespace(ns)
    kube_b.create_service_account(sa_ns, "ca-daemon")
    kube_b.apply(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "payments-api", "namespace": app_ns},
            "spec": {"ports": [{"port": 443}], "selector": {"app": "payments"}},
        }
    )

    doc = yaml.safe_load(home.config.read_text())
    home_kubeconfig = kube.write_kubeconfig(home.token, workdir / "west.kubeconfig")
    linked_kubeconfig = workdir / "east.kubeconfig"
    linkerd = {k: v for k, v in doc["linkerd"].items() if k != "namespace"}
    # east's Kong: clients of the same names as west's, its own credentials and objects.
    clients = [dict(c) for c in doc["kong"]["clients"]]
    for client in clients:
        if "service" in client:
            client["service"] = f"{app_ns}/payments-api"
    doc["clusters"] = [
        {"name": HOME, "kubeconfig": str(home_kubeconfig)},
        {
            "name": LINKED,
            "kubeconfig": str(linked_kubeconfig),
            "linkerd": {**linkerd, "namespace": linkerd_ns, **(east_linkerd or {})},
            "kong": {"namespace": kong_ns, "clients": clients},
        },
    ]
    doc.update(extra)
    config = workdir / "config.yaml"
    config.write_text(yaml.safe_dump(doc))
    settings = load_settings(config)
    for obj in manifests(settings.for_cluster(settings.linked(LINKED)), sa_ns, "ca-daemon"):
        kube_b.apply(obj)
    token = kube_b.service_account_token(sa_ns, "ca-daemon")
    kube_b.write_kubeconfig(token, linked_kubeconfig)
    await_rbac(kube_b, token, "/api/v1/pods?limit=1", allowed=True)
    await_rbac(kube_b, token, f"/apis/apps/v1/namespaces/{linkerd_ns}/deployments", allowed=True)
    await_rbac(kube_b, token, f"/api/v1/namespaces/{kong_ns}/secrets", allowed=True)
    linked = RotationCluster(
        kube_b,
        vault,
        workdir,
        config,
        linkerd_ns,
        kong_ns,
        app_ns,
        token,
        home.root_mount,
        home.kong_mount,
        sa_ns,
    )
    meshes = {
        HOME: Mesh(kube, home.linkerd_ns, home.app_ns),
        LINKED: Mesh(kube_b, linkerd_ns, app_ns),
    }
    return TwoClusters(home, linked, config, meshes)


@dataclass
class Seen:
    """What one cluster showed at the last read."""

    published: Published
    issuer: LinkerdView | None
    bundle_pem: str


@dataclass
class Observer:
    """Publishes nothing; reads both clusters back after the real publishers and checks
    them (module docstring). A failed check is kept in ``failures`` (an exception from a
    publisher would only count as a publish error to the engine)."""

    two: TwoClusters
    clock: Clock
    linkerd_check: LinkerdCheck
    checker: InvariantChecker
    down: set[str] = field(default_factory=set)  # clusters whose API server is stopped
    seen: dict[str, Seen] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    # rotation.retire_delay forced short (to end a test in real time): the old root may
    # leave while certificates under it are still valid, as on proof.
    retire_early: bool = False
    polls: int = 0
    linkerd_checks: int = 0
    description: str = "multicluster-checks"

    def publish(self, world: TrustWorld | None) -> PublishReport:
        """After the real publishers (``world`` unused), or on its own when polled."""
        try:
            self._check()
        except Exception:
            self.failures.append(f"at {self.clock.now}:\n{traceback.format_exc()}")
        return PublishReport(self.description)

    def _check(self) -> None:
        for name, cluster in self.two.clusters():
            if name not in self.down:
                self.seen[name] = Seen(
                    cluster.read_cluster(), cluster.linkerd_view(), cluster.bundle_pem()
                )
        every = {
            f"{name}: {where}": roots
            for name, seen in self.seen.items()
            for where, roots in seen.published.bundles.items()
        }
        now = self.clock.now
        for seen in self.seen.values():
            published = Published(every, seen.published.issuer, seen.published.clients)
            self.checker.observe(now, published, on_proof=self.retire_early)
        for issuer_of, seen in self.seen.items():
            if seen.issuer is None:
                continue
            for bundle_of, other in self.seen.items():
                self._linkerd(issuer_of, seen.issuer, bundle_of, other.bundle_pem)
        self.polls += 1

    def _linkerd(self, issuer_of: str, issuer: LinkerdView, bundle_of: str, bundle: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            roots, crt, key = (Path(tmp) / n for n in ("bundle.pem", "tls.crt", "tls.key"))
            roots.write_text(bundle)
            crt.write_bytes(issuer.crt)
            key.write_bytes(issuer.key)
            code, output = self.linkerd_check(roots, crt, key, now=self.clock.now)
        assert code == 0, (
            f"Linkerd rejects the issuer of {issuer_of} under the trust roots of {bundle_of} "
            f"at {self.clock.now}:\n{output}"
        )
        self.linkerd_checks += 1


@dataclass
class Daemon:
    engine: Engine
    clock: Clock
    observer: Observer
    settings: Settings


def daemon(two: TwoClusters, linkerd_check: LinkerdCheck) -> Daemon:
    """The daemon in-process on the wiring ``run`` uses, the observer after its publishers."""
    settings = two.settings
    clock = Clock(wall_clock())
    runtime = build_runtime(settings)
    checker = InvariantChecker(settings.rotation.propagation_delay, VAULT_BACKDATE)
    observer = Observer(two, clock, linkerd_check, checker)
    engine = Engine(
        settings,
        runtime.anchor,
        runtime.journal,
        [*runtime.publishers, observer],
        clock=clock,
        rollout=runtime.rollout,
    )
    for mesh in two.meshes.values():
        mesh.control_plane(started=clock.now - HOUR)
    return Daemon(engine, clock, observer, settings)
