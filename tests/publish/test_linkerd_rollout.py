"""Linkerd restarts and the pods gate against the real kube-apiserver, acting as the
ServiceAccount that `ca-daemon config rbac` binds.

There is no controller-manager or kubelet here: Deployments create no Pods. Pods are
created the way Linkerd's injector makes them (label linkerd.io/control-plane-ns,
annotation linkerd.io/trust-root-sha256, a linkerd-proxy container with the anchors
as a literal env value, or as a configMapKeyRef on control-plane Pods), owned by
hand-made ReplicaSets/StatefulSets, and their start times are set through the
pods/status subresource as the kubelet would.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from ca_daemon.config.loading import load_settings
from ca_daemon.config.settings import Settings
from ca_daemon.errors import KubeError
from ca_daemon.pki.bundle import bundle_hash
from ca_daemon.publish.linkerd_rollout import RESTARTED_AT, LinkerdRollout
from ca_daemon.publish.pods_gate import pending_event_name
from ca_daemon.report.rbac import manifests
from ca_daemon.util.kube import api_client
from tests.support.kube_cluster import await_rbac
from tests.support.pki import make_ca
from tests.support.servers.kube import Kube
from tests.support.servers.tools import unique

pytestmark = pytest.mark.integration

OLD = make_ca("root-old").cert_pem.decode()
NEW = OLD + make_ca("root-new").cert_pem.decode()
CONFIRMED = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)
BEFORE = CONFIRMED - timedelta(hours=1)
AFTER = CONFIRMED + timedelta(minutes=2)
TRUST_ANCHORS = "LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS"
LINKERD_DEPLOYMENTS = ("linkerd-destination", "linkerd-identity", "linkerd-proxy-injector")


def _stamp(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Env:
    kube: Kube
    linkerd_ns: str
    app_ns: str
    sa_ns: str
    settings: Settings  # gate: pods, restart: all
    token: str

    def rollout(self, token: str | None = None, settings: Settings | None = None) -> LinkerdRollout:
        kubeconfig = self.kube.write_kubeconfig(token or self.token)
        return LinkerdRollout(settings or self.settings, api_client(kubeconfig))

    def get(self, path: str) -> Any:
        with self.kube.http() as http:
            response = http.get(path)
        response.raise_for_status()
        return response.json()

    def workload(self, kind: str, ns: str, name: str) -> Any:
        return self.get(f"/apis/apps/v1/namespaces/{ns}/{kind}s/{name}")


def _settings(workdir: Path, linkerd_ns: str, **linkerd: str) -> Settings:
    path = workdir / f"config-{'-'.join(linkerd.values())}.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "anchor": {"local": {"dir": str(workdir / "data")}},
                "publish": {"kubernetes": {"enabled": True}},
                "linkerd": {"namespace": linkerd_ns, **linkerd},
                "kong": {"enabled": False},
            }
        )
    )
    return load_settings(path)


def _bind(kube: Kube, settings: Settings, sa_ns: str, name: str) -> str:
    kube.create_service_account(sa_ns, name)
    for doc in manifests(settings, sa_ns, name):
        kube.apply(doc)
    return kube.service_account_token(sa_ns, name)


def _workload(kube: Kube, kind: str, ns: str, name: str) -> dict[str, Any]:
    labels = {"app": name}
    template = {
        "metadata": {"labels": labels},
        "spec": {"containers": [{"name": "app", "image": "registry.invalid/app"}]},
    }
    spec: dict[str, Any] = {"selector": {"matchLabels": labels}, "template": template}
    if kind == "StatefulSet":
        spec["serviceName"] = name
    return kube.apply(
        {
            "apiVersion": "apps/v1",
            "kind": kind,
            "metadata": {"name": name, "namespace": ns},
            "spec": spec,
        }
    )


def _owner(obj: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": obj["apiVersion"],
        "kind": obj["kind"],
        "name": obj["metadata"]["name"],
        "uid": obj["metadata"]["uid"],
        "controller": True,
    }


def _replica_set(kube: Kube, deployment: dict[str, Any]) -> dict[str, Any]:
    ns, name = deployment["metadata"]["namespace"], deployment["metadata"]["name"]
    return kube.apply(
        {
            "apiVersion": "apps/v1",
            "kind": "ReplicaSet",
            "metadata": {
                "name": f"{name}-5d8f9c",
                "namespace": ns,
                "ownerReferences": [_owner(deployment)],
            },
            "spec": {
                "selector": deployment["spec"]["selector"],
                "template": deployment["spec"]["template"],
            },
        }
    )


def _pod(
    kube: Kube,
    ns: str,
    name: str,
    *,
    control_plane: str,
    owner: dict[str, Any] | None = None,
    anchors: str | None = None,
    from_configmap: bool = False,
    started: datetime | None = None,
    meshed: bool = True,
) -> None:
    """A Pod as Linkerd's injector (or, with from_configmap, its Helm chart) makes it."""
    containers: list[dict[str, Any]] = [{"name": "app", "image": "registry.invalid/app"}]
    metadata: dict[str, Any] = {"name": name, "namespace": ns}
    if owner is not None:
        metadata["ownerReferences"] = [_owner(owner)]
    if meshed:
        if from_configmap:
            ref = {"name": "linkerd-identity-trust-roots", "key": "ca-bundle.crt"}
            var: dict[str, Any] = {"name": TRUST_ANCHORS, "valueFrom": {"configMapKeyRef": ref}}
            hash_of = "helm's own value"  # control-plane Pods: Helm's hash, never comparable
        else:
            assert anchors is not None
            var = {"name": TRUST_ANCHORS, "value": anchors.strip() + "\n"}  # _proxy.tpl
            hash_of = anchors
        proxy = {"name": "linkerd-proxy", "image": "cr.l5d.io/linkerd/proxy", "env": [var]}
        containers.insert(0, proxy)
        metadata["labels"] = {"linkerd.io/control-plane-ns": control_plane}
        metadata["annotations"] = {"linkerd.io/trust-root-sha256": bundle_hash(hash_of)}
    kube.apply(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": metadata,
            "spec": {"containers": containers},
        }
    )
    if started is None:
        return  # never scheduled: no status, as a Pending Pod
    status = {
        "phase": "Running",
        "containerStatuses": [
            {
                "name": c["name"],
                "image": c["image"],
                "imageID": "",
                "ready": True,
                "restartCount": 0,
                "state": {"running": {"startedAt": _stamp(started)}},
            }
            for c in containers
        ],
    }
    with kube.http() as http:
        http.patch(
            f"/api/v1/namespaces/{ns}/pods/{name}/status",
            json={"status": status},
            headers={"Content-Type": "application/merge-patch+json"},
        ).raise_for_status()


def _control_plane(kube: Kube, ns: str) -> None:
    """Linkerd's Deployments; their proxies read the anchors from the trust-roots
    ConfigMap. linkerd-identity started before the confirmation, the others after."""
    for name in LINKERD_DEPLOYMENTS:
        rs = _replica_set(kube, _workload(kube, "Deployment", ns, name))
        started = BEFORE if name == "linkerd-identity" else AFTER
        _pod(
            kube,
            ns,
            f"{rs['metadata']['name']}-a1",
            control_plane=ns,
            owner=rs,
            from_configmap=True,
            started=started,
        )


@pytest.fixture(scope="module")
def env(kube: Kube, tmp_path_factory: pytest.TempPathFactory) -> Env:
    workdir = tmp_path_factory.mktemp("rollout")
    linkerd_ns, app_ns, sa_ns = (unique(f"roll-{n}") for n in ("linkerd", "app", "cad"))
    for ns in (linkerd_ns, app_ns, sa_ns):
        kube.create_namespace(ns)
    settings = _settings(workdir, linkerd_ns, gate="pods", restart="all")
    token = _bind(kube, settings, sa_ns, "ca-daemon")
    kube.apply(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "linkerd-identity-trust-roots", "namespace": linkerd_ns},
            "data": {"ca-bundle.crt": NEW},
        }
    )

    _control_plane(kube, linkerd_ns)

    # Meshed apps: one Deployment with a lagging and a current Pod, a StatefulSet that is
    # current, a Pod not started yet that would start with the old bundle.
    web = _replica_set(kube, _workload(kube, "Deployment", app_ns, "web"))
    _pod(
        kube,
        app_ns,
        "web-5d8f9c-old",
        control_plane=linkerd_ns,
        owner=web,
        anchors=OLD,
        started=BEFORE,
    )
    _pod(
        kube,
        app_ns,
        "web-5d8f9c-new",
        control_plane=linkerd_ns,
        owner=web,
        anchors=NEW,
        started=AFTER,
    )
    _pod(kube, app_ns, "web-5d8f9c-unstarted", control_plane=linkerd_ns, owner=web, anchors=OLD)
    db = _workload(kube, "StatefulSet", app_ns, "db")
    _pod(kube, app_ns, "db-0", control_plane=linkerd_ns, owner=db, anchors=NEW, started=AFTER)
    # Not meshed: no proxy, no label. And one meshed to another control plane.
    plain = _replica_set(kube, _workload(kube, "Deployment", app_ns, "plain"))
    _pod(
        kube,
        app_ns,
        "plain-5d8f9c-a1",
        control_plane=linkerd_ns,
        owner=plain,
        meshed=False,
        started=BEFORE,
    )
    other = _replica_set(kube, _workload(kube, "Deployment", app_ns, "other-mesh"))
    _pod(
        kube,
        app_ns,
        "other-mesh-5d8f9c-a1",
        control_plane="linkerd-other",
        owner=other,
        anchors=OLD,
        started=BEFORE,
    )

    await_rbac(kube, token, "/api/v1/pods?limit=1", allowed=True)
    await_rbac(
        kube, token, f"/apis/apps/v1/namespaces/{app_ns}/replicasets/web-5d8f9c", allowed=True
    )
    return Env(kube, linkerd_ns, app_ns, sa_ns, settings, token)


def _expected_pending(e: Env) -> list[str]:
    return [
        f"{e.app_ns}/web-5d8f9c-old",
        f"{e.app_ns}/web-5d8f9c-unstarted",
        f"{e.linkerd_ns}/linkerd-identity-5d8f9c-a1",
    ]


def test_pending_pods_names_exactly_the_pods_holding_an_old_bundle(env: Env) -> None:
    assert env.rollout().pending_pods(NEW, CONFIRMED) == sorted(_expected_pending(env))
    # The comparison is the value itself: judged against the old bundle, the Pods holding
    # the new one are the laggards.
    lagging_on_old = env.rollout().pending_pods(OLD, CONFIRMED)
    assert f"{env.app_ns}/web-5d8f9c-new" in lagging_on_old
    assert f"{env.app_ns}/web-5d8f9c-old" not in lagging_on_old


def test_pending_pods_reads_every_page(env: Env) -> None:
    rollout = env.rollout()
    rollout.page_size = 2  # 8 labelled Pods: four pages
    calls: list[dict[str, Any]] = []
    list_pods = rollout.core.list_pod_for_all_namespaces

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return list_pods(*args, **kwargs)

    rollout.core.list_pod_for_all_namespaces = counting  # type: ignore[method-assign]
    assert rollout.pending_pods(NEW, CONFIRMED) == sorted(_expected_pending(env))
    assert len(calls) >= 4
    assert all(c["limit"] == 2 for c in calls)
    assert [bool(c.get("_continue")) for c in calls] == [False] + [True] * (len(calls) - 1)


def test_restart_control_plane_rolls_every_linkerd_deployment_once(env: Env) -> None:
    at = datetime(2026, 12, 1, 8, 1, tzinfo=UTC)
    rollout = env.rollout()
    patched = rollout.restart("control-plane", at)
    ns = env.linkerd_ns
    assert patched == [f"deployment/{ns}/{name}" for name in LINKERD_DEPLOYMENTS]
    before = {}
    for name in LINKERD_DEPLOYMENTS:
        live = env.workload("deployment", ns, name)
        assert (
            live["spec"]["template"]["metadata"]["annotations"][RESTARTED_AT]
            == "2026-12-01T08:01:00Z"
        )
        before[name] = live["metadata"]["resourceVersion"]
    # The apps are not the control plane.
    web = env.workload("deployment", env.app_ns, "web")
    assert RESTARTED_AT not in (web["spec"]["template"]["metadata"].get("annotations") or {})

    # A retry after a crash (same journaled time, fresh process) restarts nothing.
    assert env.rollout().restart("control-plane", at) == []
    for name in LINKERD_DEPLOYMENTS:
        assert env.workload("deployment", ns, name)["metadata"]["resourceVersion"] == before[name]


def test_restart_all_rolls_meshed_workloads_and_not_the_others(env: Env) -> None:
    at = datetime(2026, 12, 1, 8, 2, tzinfo=UTC)
    patched = env.rollout().restart("all", at)
    app = env.app_ns
    assert set(patched) == {
        *(f"deployment/{env.linkerd_ns}/{name}" for name in LINKERD_DEPLOYMENTS),
        f"deployment/{app}/web",
        f"statefulset/{app}/db",
    }
    for kind, name in (("deployment", "web"), ("statefulset", "db")):
        annotations = env.workload(kind, app, name)["spec"]["template"]["metadata"]["annotations"]
        assert annotations[RESTARTED_AT] == "2026-12-01T08:02:00Z"
    for name in ("plain", "other-mesh"):  # unmeshed, or meshed to another control plane
        template = env.workload("deployment", app, name)["spec"]["template"]["metadata"]
        assert RESTARTED_AT not in (template.get("annotations") or {})
    version = env.workload("deployment", app, "web")["metadata"]["resourceVersion"]
    assert env.rollout().restart("all", at) == []
    assert env.workload("deployment", app, "web")["metadata"]["resourceVersion"] == version


def test_time_gate_rbac_lists_pods_and_rolls_only_the_control_plane(
    env: Env, tmp_path: Path
) -> None:
    """gate: time still lists meshed Pods (an emergency waits on them whatever the gate
    says); with restart: control-plane and the default emergency_restart it may roll the
    control plane only."""
    # Its own control plane: `config rbac` names its Roles ca-daemon in each namespace, so
    # a second daemon's output would replace the first's Role there.
    ns = unique("roll-timegate")
    env.kube.create_namespace(ns)
    _control_plane(env.kube, ns)
    settings = _settings(tmp_path, ns, gate="time", restart="control-plane")
    token = _bind(env.kube, settings, env.sa_ns, "timegate")
    await_rbac(env.kube, token, f"/apis/apps/v1/namespaces/{ns}/deployments", allowed=True)
    rollout = env.rollout(token, settings)
    await_rbac(env.kube, token, "/api/v1/pods?limit=1", allowed=True)
    assert isinstance(rollout.pending_pods(NEW, CONFIRMED), list)
    # What it is granted works: rolling the control plane.
    at = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
    assert len(rollout.restart("control-plane", at)) == len(LINKERD_DEPLOYMENTS)
    # ... but not the meshed apps, which restart: all would need.
    with pytest.raises(KubeError, match="forbidden by RBAC"):
        rollout.restart("all", at + timedelta(minutes=1))


def _event(e: Env) -> Any:
    name = pending_event_name("linkerd-identity-trust-roots")
    with e.kube.http() as http:
        response = http.get(f"/api/v1/namespaces/{e.linkerd_ns}/events/{name}")
    return None if response.status_code == 404 else response.json()


def _our_events(e: Env) -> list[Any]:
    events = e.get(f"/api/v1/namespaces/{e.linkerd_ns}/events")["items"]
    return [ev for ev in events if ev["reason"] == "TrustBundlePending"]


def test_report_pending_keeps_one_warning_event_naming_the_pods(env: Env) -> None:
    rollout = env.rollout()
    pods = rollout.pending_pods(NEW, CONFIRMED)
    digest = bundle_hash(NEW)
    rollout.report_pending(pods, digest)
    event = _event(env)
    assert event is not None
    assert event["type"] == "Warning"
    assert event["count"] == 1
    for pod in pods:
        assert pod in event["message"]
    assert f"{len(pods)} meshed pod(s)" in event["message"]
    involved = event["involvedObject"]
    assert (involved["kind"], involved["name"]) == ("ConfigMap", "linkerd-identity-trust-roots")
    roots = env.get(f"/api/v1/namespaces/{env.linkerd_ns}/configmaps/linkerd-identity-trust-roots")
    assert involved["uid"] == roots["metadata"]["uid"]

    # The same set again, in this process or a restarted one: nothing is written.
    rollout.report_pending(pods, digest)
    env.rollout().report_pending(list(reversed(pods)), digest)
    assert _event(env)["metadata"]["resourceVersion"] == event["metadata"]["resourceVersion"]

    # One Pod caught up: the same Event says so, counted.
    rollout.report_pending(pods[1:], digest)
    updated = _event(env)
    assert updated["count"] == 2
    assert pods[0] not in updated["message"]
    assert f"{len(pods) - 1} meshed pod(s)" in updated["message"]
    assert len(_our_events(env)) == 1


def test_report_pending_is_best_effort(
    env: Env, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An identity without Event rights: logged, never raised."""
    settings = _settings(tmp_path, env.linkerd_ns, gate="pods", restart="none")
    env.kube.create_service_account(env.sa_ns, "no-rights")
    token = env.kube.service_account_token(env.sa_ns, "no-rights")
    env.rollout(token, settings).report_pending(["a/b"], bundle_hash(OLD))
    assert "could not record event TrustBundlePending" in caplog.text
    assert "forbidden by RBAC" in caplog.text


def test_the_event_summarizes_many_pods(env: Env) -> None:
    many = [f"ns/pod-{i:03}" for i in range(200)]
    env.rollout().report_pending(many, bundle_hash(OLD))
    message = _event(env)["message"]
    assert "200 meshed pod(s)" in message
    assert "ns/pod-000" in message
    assert "ns/pod-199" not in message
    assert "(and 190 more)" in message
    assert len(message) <= 1024
