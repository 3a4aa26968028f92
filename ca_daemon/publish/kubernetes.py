"""Publish the trust world into Kubernetes: reconcile, repair drift, never overreach.

For each desired object: read it; create it when missing; leave it alone (and say
so) when it exists but is not ours or has a type that cannot be changed in place;
replace its data in place (same UID) when it differs, with the resourceVersion read,
re-reading on a 409. Nothing is written when nothing changed.
"""

from __future__ import annotations

import base64
import logging
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kubernetes import client

from ca_daemon.config import Settings
from ca_daemon.kube import KubeConflict, KubeError, call
from ca_daemon.publish.base import PublishReport
from ca_daemon.publish.k8s_objects import (
    CONTENT,
    GENERATION,
    MANAGED_BY,
    MANAGER,
    ROLE,
    DesiredObject,
    Role,
    ServicePatch,
    content_hash,
    desired_objects,
    desired_service_patches,
    format_generation,
    parse_generation,
    warning_event,
)
from ca_daemon.world import TrustWorld

log = logging.getLogger(__name__)

_ATTEMPTS = 3
# Objects that carry the trust bundle: a root rotation waits until all of them hold it.
_BUNDLE_ROLES = {Role.LINKERD_ISSUER, Role.LINKERD_TRUST_ROOTS, Role.KONG_CA, Role.BUNDLE}


def _decode(data: Mapping[str, str] | None) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in (data or {}).items()}


def _encode(data: Mapping[str, str]) -> dict[str, str]:
    return {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}


def live_data(kind: str, live: Any) -> dict[str, str]:
    return _decode(live.data) if kind == "Secret" else dict(live.data or {})


def _missing_or_different(want: Mapping[str, str], have: Mapping[str, str] | None) -> bool:
    have = have or {}
    return any(have.get(k) != v for k, v in want.items())


@dataclass(frozen=True)
class _KindApi:
    """The three calls a Secret or ConfigMap reconciliation needs."""

    read: Callable[..., Any]
    create: Callable[..., Any]
    replace: Callable[..., Any]


def _fence(obj: DesiredObject, live: Any) -> None:
    """Refuse to overwrite an object derived from a newer journal than this pass's: a
    deposed leader that resumes must not take the world back."""
    if obj.generation == (0, 0):
        return
    live_generation = parse_generation((live.metadata.annotations or {}).get(GENERATION))
    if live_generation > obj.generation:
        raise KubeError(
            f"{obj.ref} was published from journal generation "
            f"{format_generation(live_generation)}, newer than this pass's "
            f"{format_generation(obj.generation)} (another replica leads now?); not going "
            f"back. If the journal was restored or rebuilt on purpose, remove the "
            f"{GENERATION} annotation"
        )


class KubernetesPublisher:
    def __init__(self, settings: Settings, api: client.ApiClient) -> None:
        self.settings = settings
        self.core = client.CoreV1Api(api)
        self.description = "kubernetes"
        # Objects this process created or updated: one found missing later was deleted.
        self._written: set[str] = set()

    # --- the pass ----------------------------------------------------------------------------

    def publish(self, world: TrustWorld) -> PublishReport:
        report = PublishReport(self.description)
        desired = desired_objects(world, self.settings)
        for obj in desired:
            try:
                self._reconcile(obj, report)
            except KubeError as exc:
                report.errors[obj.ref] = str(exc)
        for patch in desired_service_patches(world, self.settings):
            try:
                self._annotate_service(patch, report)
            except KubeError as exc:
                report.errors[patch.ref] = str(exc)
        self._retire_kong_cas(desired, report)
        carriers = {o.ref for o in desired if o.role in _BUNDLE_ROLES}
        report.bundle_errors = [ref for ref in report.errors if ref in carriers]
        return report

    # --- objects -----------------------------------------------------------------------------

    def _api(self, kind: str) -> _KindApi:
        core = self.core
        if kind == "Secret":
            return _KindApi(
                core.read_namespaced_secret,
                core.create_namespaced_secret,
                core.replace_namespaced_secret,
            )
        return _KindApi(
            core.read_namespaced_config_map,
            core.create_namespaced_config_map,
            core.replace_namespaced_config_map,
        )

    def _read(self, obj: DesiredObject) -> Any:
        read = self._api(obj.kind).read
        return call(f"read {obj.ref}", read, obj.name, obj.namespace, missing_ok=True)

    def _body(self, obj: DesiredObject, live: Any) -> dict[str, Any]:
        labels = dict((live.metadata.labels if live else None) or {})
        annotations = dict((live.metadata.annotations if live else None) or {})
        metadata: dict[str, Any] = {
            "name": obj.name,
            "namespace": obj.namespace,
            "labels": {**labels, **obj.labels},
            "annotations": {**annotations, **obj.annotations},
        }
        if obj.generation > (0, 0):
            metadata["annotations"][GENERATION] = format_generation(obj.generation)
        if live is not None:
            metadata["resourceVersion"] = live.metadata.resource_version
        body: dict[str, Any] = {"apiVersion": "v1", "kind": obj.kind, "metadata": metadata}
        if obj.kind == "Secret":
            body["type"] = obj.type
            body["data"] = _encode(obj.data)
        else:
            body["data"] = dict(obj.data)
        return body

    def _ownership_problem(self, obj: DesiredObject, live: Any) -> tuple[str, str] | None:
        """(reason, message) when ``live`` must not be overwritten, else None."""
        kind = f"{obj.kind} {obj.namespace}/{obj.name}"
        if obj.kind == "Secret" and live.type != obj.type:
            hint = (
                " (the linkerd.io/tls scheme); ca-daemon publishes the kubernetes.io/tls "
                "scheme. Delete it to hand it over, and install Linkerd with "
                "identity.issuer.scheme=kubernetes.io/tls"
                if obj.role == Role.LINKERD_ISSUER
                else "; a Secret's type cannot change in place. Delete it to hand it over"
            )
            return "WrongSecretType", f"{kind} has type {live.type}, expected {obj.type}{hint}"
        if (live.metadata.labels or {}).get(MANAGED_BY) != MANAGER:
            return (
                "NotManaged",
                f"{kind} exists and is not managed by ca-daemon (no label "
                f"{MANAGED_BY}={MANAGER}); not touching it. Label it to hand it over",
            )
        return None

    def _reconcile(self, obj: DesiredObject, report: PublishReport) -> None:
        for _ in range(_ATTEMPTS):
            live = self._read(obj)
            if live is None:
                if obj.ref in self._written:
                    report.drifted.append(f"{obj.ref} (deleted)")
                    self._event(obj, None, "DriftRepaired", f"{obj.ref} was deleted; recreated")
                create = self._api(obj.kind).create
                try:
                    call(f"create {obj.ref}", create, obj.namespace, self._body(obj, None))
                except KubeConflict:
                    continue  # created meanwhile: read it and compare
                self._written.add(obj.ref)
                report.changed.append(obj.ref)
                return
            problem = self._ownership_problem(obj, live)
            if problem is not None:
                reason, message = problem
                self._event(obj, live, reason, message)
                raise KubeError(message)
            _fence(obj, live)
            data = live_data(obj.kind, live)
            if (
                data == dict(obj.data)
                and not _missing_or_different(obj.labels, live.metadata.labels)
                and not _missing_or_different(obj.annotations, live.metadata.annotations)
            ):
                self._written.add(obj.ref)
                return
            recorded = (live.metadata.annotations or {}).get(CONTENT)
            if recorded is not None and recorded != content_hash(data):
                changed = sorted(
                    k for k in set(data) | set(obj.data) if data.get(k) != obj.data.get(k)
                )
                report.drifted.append(f"{obj.ref} (keys changed: {', '.join(changed)})")
                self._event(obj, live, "DriftRepaired", f"keys {', '.join(changed)} restored")
            replace = self._api(obj.kind).replace
            try:
                call(f"update {obj.ref}", replace, obj.name, obj.namespace, self._body(obj, live))
            except KubeConflict:
                continue
            self._written.add(obj.ref)
            report.changed.append(obj.ref)
            return
        raise KubeError(f"update {obj.ref}: it kept changing during {_ATTEMPTS} attempts")

    # --- services and retired CAs ----------------------------------------------------------

    def _annotate_service(self, patch: ServicePatch, report: PublishReport) -> None:
        what = f"annotate {patch.ref}"
        live = call(
            what, self.core.read_namespaced_service, patch.name, patch.namespace, missing_ok=True
        )
        if live is None:
            raise KubeError(
                f"{what}: Service not found; create it or fix kong.clients[].service "
                "(its client Secret is published anyway)"
            )
        if not _missing_or_different(patch.annotations, live.metadata.annotations):
            return
        call(
            what,
            self.core.patch_namespaced_service,
            patch.name,
            patch.namespace,
            {"metadata": {"annotations": dict(patch.annotations)}},
            _content_type="application/merge-patch+json",
        )
        report.changed.append(patch.ref)

    def _retire_kong_cas(self, desired: list[DesiredObject], report: PublishReport) -> None:
        kong = self.settings.kong
        if not (kong.enabled and kong.delivery == "kubernetes"):
            return
        keep = {o.name for o in desired if o.role == Role.KONG_CA}
        selector = f"{MANAGED_BY}={MANAGER},{ROLE}={Role.KONG_CA}"
        what = f"list Kong CA Secrets in {kong.namespace}"
        try:
            listed = call(
                what, self.core.list_namespaced_secret, kong.namespace, label_selector=selector
            )
            for secret in listed.items:
                name = secret.metadata.name
                if name in keep:
                    continue
                ref = f"secret/{kong.namespace}/{name}"
                call(f"delete {ref}", self.core.delete_namespaced_secret, name, kong.namespace)
                self._written.discard(ref)
                report.changed.append(f"{ref} (deleted: root retired)")
        except KubeError as exc:
            report.errors[f"secret/{kong.namespace}/kong-upstream-ca-*"] = str(exc)

    # --- events ------------------------------------------------------------------------------

    def _event(self, obj: DesiredObject, live: Any, reason: str, message: str) -> None:
        """A Warning Event on the object; best effort, since RBAC may not allow events."""
        involved: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": obj.kind,
            "namespace": obj.namespace,
            "name": obj.name,
        }
        if live is not None:
            involved["uid"] = live.metadata.uid
        metadata = {"generateName": f"{obj.name}.", "namespace": obj.namespace}
        body = warning_event(
            metadata, involved, reason, message, datetime.now(UTC), socket.gethostname()
        )
        try:
            call(f"event on {obj.ref}", self.core.create_namespaced_event, obj.namespace, body)
        except KubeError as exc:
            log.warning("could not record event %s on %s: %s", reason, obj.ref, exc)
