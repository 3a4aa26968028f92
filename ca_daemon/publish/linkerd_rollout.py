"""Linkerd restarts after the trust bundle changes, and the pods gate's view of the cluster.

Linkerd's identity controller reads its trust anchors once at start, and every proxy
resolves ``LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS`` once at start, so a new root is
trusted only by what (re)started after the bundle held it. Restarting is done as
``kubectl rollout restart`` does it: the pod template annotation
``kubectl.kubernetes.io/restartedAt``, which the workload's controller then rolls out
with its own strategy (surge, PodDisruptionBudgets, readiness). Which Pods hold the
bundle is decided by ``pods_gate`` (pure); this module only lists and patches.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, Literal

from kubernetes import client

from ca_daemon.config.settings import Settings
from ca_daemon.errors import KubeError
from ca_daemon.publish.k8s_objects import warning_event
from ca_daemon.publish.linkerd_identity import (
    COMPONENT_LABEL,
    IDENTITY_DEPLOYMENT,
    Answer,
    decide,
)
from ca_daemon.publish.pods_gate import (
    CONTROL_PLANE_NS_LABEL,
    Pod,
    is_meshed,
    issuer_event_name,
    pending_event_name,
    pod_ref,
)
from ca_daemon.publish.pods_gate import pending_pods as decide_pending
from ca_daemon.util.kube import KubeConflict, call

log = logging.getLogger(__name__)

RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"
PENDING_REASON = "TrustBundlePending"
ISSUER_REASON = "IssuerNotConfirmed"
# How many pod names the Event spells out; the rest is a count (status lists them all).
EVENT_NAMES = 10
_MESSAGE_LIMIT = 1024  # the API server's limit for an Event note
_MERGE_PATCH = "application/merge-patch+json"

Scope = Literal["control-plane", "all"]


def rfc3339(at: datetime) -> str:
    """``at`` as kubectl writes restartedAt; a naive datetime is taken as UTC."""
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _template_annotations(workload: Any) -> dict[str, str]:
    template = workload.spec.template
    return dict((template.metadata.annotations if template.metadata else None) or {})


def _controller(owner_refs: list[dict[str, Any]] | None) -> tuple[str, str] | None:
    """(kind, name) of the controlling owner, from ownerReferences as JSON."""
    for ref in owner_refs or []:
        if ref.get("controller"):
            return str(ref.get("kind")), str(ref.get("name"))
    return None


class LinkerdRollout:
    # Pods per list request: bounds the memory of one page on a large cluster.
    page_size = 500

    def __init__(self, settings: Settings, api: client.ApiClient) -> None:
        self.settings = settings
        self.core = client.CoreV1Api(api)
        self.apps = client.AppsV1Api(api)
        self.description = "linkerd-rollout"
        # The last (bundle hash, pods) reported, so an unchanged set writes nothing.
        self._reported: tuple[str, tuple[str, ...]] | None = None
        self._issuer_reported: str | None = None  # the issuer problem last reported

    # --- restarts ----------------------------------------------------------------------------

    def restart(self, scope: Scope, at: datetime) -> list[str]:
        """Roll the control plane (every Deployment in the Linkerd namespace), then with
        ``all`` every Deployment/StatefulSet/DaemonSet whose Pods carry a Linkerd proxy.

        A workload whose template already says ``restartedAt == at`` is left alone, so a
        retry after a crash never rolls anything twice. Every workload is attempted even
        when one fails; then a KubeError names the failures (a retry skips the done ones).
        Returns the refs patched, e.g. ``deployment/linkerd/linkerd-identity``.
        """
        stamp = rfc3339(at)
        ns = self.settings.linkerd.namespace
        patched: list[str] = []
        errors: list[str] = []
        seen: set[tuple[str, str, str]] = set()
        listed = call(f"list deployments in {ns}", self.apps.list_namespaced_deployment, ns)
        for deployment in listed.items:
            key = ("deployment", ns, deployment.metadata.name)
            seen.add(key)
            self._roll(key, deployment, stamp, patched, errors)
        if scope == "all":
            for key in sorted(self._meshed_workloads() - seen):
                what = f"read {'/'.join(key)}"
                try:
                    live = call(what, self._reader(key[0]), key[2], key[1], missing_ok=True)
                except KubeError as exc:
                    errors.append(str(exc))
                    continue
                if live is not None:  # None: deleted since its Pods were listed
                    self._roll(key, live, stamp, patched, errors)
        if patched:
            log.info("restarted %d workload(s) at %s: %s", len(patched), stamp, ", ".join(patched))
        if errors:
            raise KubeError(f"restart {scope}: {len(errors)} failed: " + "; ".join(errors))
        return patched

    def would_touch(self, scope: Scope) -> tuple[list[str], list[str]]:
        """What ``restart(scope)`` would roll now (``deployment/<ns>/<name>``, ...) and the
        meshed Pods (``namespace/name``) a root rotation's gate then waits for; reads only."""
        ns = self.settings.linkerd.namespace
        listed = call(f"list deployments in {ns}", self.apps.list_namespaced_deployment, ns)
        keys = {("deployment", ns, d.metadata.name) for d in listed.items}
        if scope == "all":
            keys |= self._meshed_workloads()
        pods = sorted(pod_ref(p) for p in self._meshed_pods() if is_meshed(p, ns))
        return sorted("/".join(k) for k in keys), pods

    def _roll(
        self,
        key: tuple[str, str, str],
        workload: Any,
        stamp: str,
        patched: list[str],
        errors: list[str],
    ) -> None:
        if _template_annotations(workload).get(RESTARTED_AT) == stamp:
            return
        kind, ns, name = key
        ref = f"{kind}/{ns}/{name}"
        body = {"spec": {"template": {"metadata": {"annotations": {RESTARTED_AT: stamp}}}}}
        try:
            call(f"restart {ref}", self._patcher(kind), name, ns, body, _content_type=_MERGE_PATCH)
        except KubeError as exc:
            errors.append(str(exc))
            return
        patched.append(ref)

    def _reader(self, kind: str) -> Callable[..., Any]:
        return {
            "deployment": self.apps.read_namespaced_deployment,
            "statefulset": self.apps.read_namespaced_stateful_set,
            "daemonset": self.apps.read_namespaced_daemon_set,
        }[kind]

    def _patcher(self, kind: str) -> Callable[..., Any]:
        return {
            "deployment": self.apps.patch_namespaced_deployment,
            "statefulset": self.apps.patch_namespaced_stateful_set,
            "daemonset": self.apps.patch_namespaced_daemon_set,
        }[kind]

    def _meshed_workloads(self) -> set[tuple[str, str, str]]:
        """(kind, namespace, name) of the workloads that own meshed Pods. A Deployment owns
        its Pods through a ReplicaSet; Pods of anything else (Jobs, bare Pods, other
        controllers) cannot be rolled by an annotation and are logged."""
        workloads: set[tuple[str, str, str]] = set()
        replica_sets: dict[tuple[str, str], tuple[str, str] | None] = {}
        unowned: list[str] = []
        for pod in self._meshed_pods():
            if not is_meshed(pod, self.settings.linkerd.namespace):
                continue
            ns = pod["metadata"]["namespace"]
            owner = _controller(pod["metadata"].get("ownerReferences"))
            if owner is not None and owner[0] == "ReplicaSet":
                if (ns, owner[1]) not in replica_sets:
                    rs = call(
                        f"read replicaset/{ns}/{owner[1]}",
                        self.apps.read_namespaced_replica_set,
                        owner[1],
                        ns,
                        missing_ok=True,
                    )
                    refs = (rs.metadata.owner_references or []) if rs is not None else []
                    replica_sets[ns, owner[1]] = _controller(
                        [{"controller": r.controller, "kind": r.kind, "name": r.name} for r in refs]
                    )
                owner = replica_sets[ns, owner[1]]
            if owner is not None and owner[0] in ("Deployment", "StatefulSet", "DaemonSet"):
                workloads.add((owner[0].lower(), ns, owner[1]))
            else:
                unowned.append(pod_ref(pod))
        if unowned:
            log.warning(
                "%d meshed pod(s) belong to no Deployment/StatefulSet/DaemonSet and must be "
                "restarted by their owner: %s",
                len(unowned),
                ", ".join(unowned[:EVENT_NAMES]),
            )
        return workloads

    # --- the identity controller's answer ----------------------------------------------------

    def issuer_answer(self, published_at: datetime) -> Answer | None:
        """What the identity controller said about the issuer first written at
        ``published_at``: its Events about its Deployment, and its Pods (decided by
        ``linkerd_identity.decide``). None: no answer yet."""
        ns = self.settings.linkerd.namespace
        events = call(
            f"list events in {ns}",
            self.core.list_namespaced_event,
            ns,
            field_selector=f"involvedObject.name={IDENTITY_DEPLOYMENT}",
            raw=True,
        )
        pods = call(
            f"list identity pods in {ns}",
            self.core.list_namespaced_pod,
            ns,
            label_selector=f"{COMPONENT_LABEL}=identity",
            raw=True,
        )
        return decide(
            events.get("items") or [], pods.get("items") or [], IDENTITY_DEPLOYMENT, published_at
        )

    # --- the pods gate -----------------------------------------------------------------------

    def _meshed_pods(self) -> Iterator[Pod]:
        """Every Pod labelled for this control plane, one page at a time. Pages are read as
        raw JSON: deserializing thousands of V1Pod objects costs more than the request."""
        selector = f"{CONTROL_PLANE_NS_LABEL}={self.settings.linkerd.namespace}"
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"label_selector": selector, "limit": self.page_size}
            if token:
                kwargs["_continue"] = token
            response = call(
                "list meshed pods",
                self.core.list_pod_for_all_namespaces,
                _preload_content=False,
                **kwargs,
            )
            try:
                page = json.loads(response.data)
            except ValueError:
                raise KubeError("list meshed pods: the API server sent no JSON") from None
            yield from page.get("items") or []
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return

    def pending_pods(
        self, bundle_pem: str, confirmed_at: datetime, restarted: bool = False
    ) -> list[str]:
        """Meshed Pods (``namespace/name``, sorted) that do not hold ``bundle_pem``, decided
        as ``linkerd check --proxy`` decides (see ``pods_gate``); the control-plane
        namespace included. ``restarted``: also those not restarted since."""
        if confirmed_at.tzinfo is None:
            confirmed_at = confirmed_at.replace(tzinfo=UTC)
        namespace = self.settings.linkerd.namespace
        return decide_pending(self._meshed_pods(), bundle_pem, confirmed_at, namespace, restarted)

    def report_pending(self, pods: list[str], bundle_hash: str) -> None:
        """One Warning Event on the trust-roots ConfigMap naming the laggards, updated in
        place (count, lastTimestamp) when the set changes; nothing when it did not.
        Best effort: a failure is logged, never raised."""
        if not pods:
            self._reported = None
            return
        key = (bundle_hash, tuple(sorted(pods)))
        if key == self._reported:
            return
        shown = ", ".join(key[1][:EVENT_NAMES])
        more = f" (and {len(pods) - EVENT_NAMES} more)" if len(pods) > EVENT_NAMES else ""
        message = (
            f"{len(pods)} meshed pod(s) must be restarted before the root rotation goes on "
            f"(published trust bundle sha256:{bundle_hash[:16]}): {shown}{more}"
        )[:_MESSAGE_LIMIT]
        linkerd = self.settings.linkerd
        name = pending_event_name(linkerd.trust_roots_configmap)
        try:
            self._write_event(
                name, PENDING_REASON, message, "ConfigMap", linkerd.trust_roots_configmap
            )
        except KubeError as exc:
            log.warning("could not record event %s: %s", PENDING_REASON, exc)
            return
        self._reported = key

    def report_issuer(self, problem: str | None) -> None:
        """One Warning Event on the issuer Secret while Linkerd refused the issuer, or said
        nothing about it for ``linkerd.confirm_timeout``; written when the problem changes.
        Best effort: a failure is logged, never raised."""
        if problem is None or problem == self._issuer_reported:
            self._issuer_reported = problem
            return
        linkerd = self.settings.linkerd
        name = issuer_event_name(linkerd.issuer_secret)
        try:
            self._write_event(
                name, ISSUER_REASON, problem[:_MESSAGE_LIMIT], "Secret", linkerd.issuer_secret
            )
        except KubeError as exc:
            log.warning("could not record event %s: %s", ISSUER_REASON, exc)
            return
        self._issuer_reported = problem

    def _write_event(self, name: str, reason: str, message: str, kind: str, about: str) -> None:
        ns = self.settings.linkerd.namespace
        ref = f"event/{ns}/{name}"
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        live = call(f"read {ref}", self.core.read_namespaced_event, name, ns, missing_ok=True)
        if live is None:
            try:
                event = self._event(name, reason, message, kind, about)
                call(f"create {ref}", self.core.create_namespaced_event, ns, event)
                return
            except KubeConflict:  # created meanwhile (another replica): update it instead
                live = call(f"read {ref}", self.core.read_namespaced_event, name, ns)
        if live.message == message and live.type == "Warning":
            return  # e.g. reported by the process before a restart
        patch = {
            "type": "Warning",
            "reason": reason,
            "message": message,
            "count": (live.count or 1) + 1,
            "lastTimestamp": now,
        }
        call(
            f"update {ref}",
            self.core.patch_namespaced_event,
            name,
            ns,
            patch,
            _content_type=_MERGE_PATCH,
        )

    def _event(self, name: str, reason: str, message: str, kind: str, about: str) -> dict[str, Any]:
        ns = self.settings.linkerd.namespace
        involved: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": kind,
            "namespace": ns,
            "name": about,
        }
        read = (
            self.core.read_namespaced_config_map
            if kind == "ConfigMap"
            else self.core.read_namespaced_secret
        )
        try:
            live = call(f"read {kind.lower()}/{ns}/{about}", read, about, ns, missing_ok=True)
        except KubeError:
            live = None  # the Event is still useful without the uid
        if live is not None:
            involved["uid"] = live.metadata.uid
        metadata = {"name": name, "namespace": ns}
        return warning_event(
            metadata, involved, reason, message, datetime.now(UTC), socket.gethostname()
        )
