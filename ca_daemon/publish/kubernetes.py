"""Publish the trust world into Kubernetes: reconcile, repair drift, never overreach.

For each desired object: read it; create it when missing; leave it alone (and say
so) when it exists but is not ours or has a type that cannot be changed in place;
replace its data in place (same UID) when it differs, with the resourceVersion read,
re-reading on a 409. Nothing is written when nothing changed.

Reading is one LIST per (namespace, kind) with the ``managed-by=ca-daemon`` selector
(and one per namespace for the Services to annotate), not one GET per object: a steady
pass with thousands of clients makes a handful of requests. A (namespace, kind) with
fewer than ``LIST_FROM`` objects is read by name (one request either way), so
its Role need not allow ``list`` there. A name the LIST did not
return is created; a 409 on that create (an unlabelled object of that name, or one
made meanwhile) re-reads it with a GET and decides as before. A name this process
wrote before and the LIST missed is read with a GET (deleted, or its label removed?).
When a LIST is refused (an older Role without ``list``), that namespace falls back to
one GET per object. Writes run in parallel, at most ``publish.kubernetes.concurrency``.
"""

from __future__ import annotations

import base64
import logging
import socket
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kubernetes import client
from kubernetes.client import rest

from ca_daemon.config.settings import Settings
from ca_daemon.errors import KubeError
from ca_daemon.model.generation import (
    UNKNOWN,
    Generation,
    format_generation,
    generation_of,
    parse_generation,
)
from ca_daemon.model.world import TrustWorld
from ca_daemon.publish.base import PublishReport
from ca_daemon.publish.k8s_objects import (
    CONTENT,
    GENERATION,
    LIST_FROM,
    MANAGED_BY,
    MANAGER,
    ROLE,
    DesiredObject,
    Role,
    ServicePatch,
    content_hash,
    desired_objects,
    desired_service_patches,
    named_cas,
    trust_annotations,
    verifying_namespaces,
    warning_event,
)
from ca_daemon.util.kube import KubeConflict, call
from ca_daemon.util.ratelimit import limit_kubernetes_client, limiter

log = logging.getLogger(__name__)

KUBERNETES = "kubernetes"  # this publisher's description, and its reports' target

_ATTEMPTS = 3
# Items per LIST page (client-go's pager uses the same).
_PAGE = 500
_MANAGED = f"{MANAGED_BY}={MANAGER}"
# What the LISTs of a pass found: (kind, namespace) -> name -> object. A pair missing
# from it was not listed (the LIST failed): its objects are read one GET at a time.
_Listed = dict[tuple[str, str], dict[str, Any]]
# Objects that carry the trust bundle: a root rotation waits until all of them hold it.
_BUNDLE_ROLES = {
    Role.LINKERD_ISSUER,
    Role.LINKERD_TRUST_ROOTS,
    Role.KONG_CA,
    Role.KONG_CA_REF,
    Role.BUNDLE,
}
# On a Service that verifies its upstream: the journal generation its trust annotations
# were written from, so that a deposed leader cannot name retired roots again.
TRUST_GENERATION = "ca-daemon.io/trust-generation"


def _decode(data: Mapping[str, str] | None) -> dict[str, str]:
    # Someone may have put bytes that are not text there: that is drift to repair, not a
    # reason to stop publishing.
    return {k: base64.b64decode(v).decode(errors="replace") for k, v in (data or {}).items()}


def _encode(data: Mapping[str, str]) -> dict[str, str]:
    return {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}


@dataclass(frozen=True)
class LiveMeta:
    name: str
    uid: str | None
    resource_version: str | None
    labels: dict[str, str] | None
    annotations: dict[str, str] | None


@dataclass(frozen=True)
class Live:
    """An object as the API server returned it: only the fields the publisher reads,
    from the JSON (``call(raw=True)``), with the client's attribute names."""

    metadata: LiveMeta
    type: str | None
    data: dict[str, str] | None


def _live(doc: Mapping[str, Any]) -> Live:
    meta = doc.get("metadata") or {}
    return Live(
        LiveMeta(
            name=meta.get("name", ""),
            uid=meta.get("uid"),
            resource_version=meta.get("resourceVersion"),
            labels=meta.get("labels"),
            annotations=meta.get("annotations"),
        ),
        type=doc.get("type"),
        data=doc.get("data"),
    )


def live_data(kind: str, live: Any) -> dict[str, str]:
    return _decode(live.data) if kind == "Secret" else dict(live.data or {})


def _missing_or_different(want: Mapping[str, str], have: Mapping[str, str] | None) -> bool:
    have = have or {}
    return any(have.get(k) != v for k, v in want.items())


@dataclass(frozen=True)
class _KindApi:
    """The calls a Secret or ConfigMap reconciliation needs."""

    read: Callable[..., Any]
    create: Callable[..., Any]
    replace: Callable[..., Any]
    list: Callable[..., Any]


def _fence(obj: DesiredObject, live: Any) -> None:
    """Refuse to overwrite an object derived from a newer journal than this pass's: a
    deposed leader that resumes must not take the world back."""
    if obj.generation == UNKNOWN:
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


def _fence_service(patch: ServicePatch, live: Any) -> None:
    """As _fence, for the trust annotations of a verifying Service."""
    theirs = parse_generation((live.metadata.annotations or {}).get(TRUST_GENERATION))
    if patch.generation != UNKNOWN and theirs[:2] > patch.generation[:2]:
        raise KubeError(
            f"{patch.ref}: its CA certificates were named from journal generation "
            f"{format_generation(theirs)}, newer than this pass's "
            f"{format_generation(patch.generation)} (another replica leads now?); not going "
            f"back. If the journal was restored or rebuilt on purpose, remove the "
            f"{TRUST_GENERATION} annotation"
        )


class _ServiceMissing(KubeError):
    """The Service to annotate does not exist: nothing there can name a CA."""


@dataclass
class _Annotated:
    """What annotating one Service came to."""

    report: PublishReport
    missing: bool = False
    trusts_bundle: bool = True  # names every trusted root (or does not verify)


class KubernetesPublisher:
    def __init__(self, settings: Settings, api: client.ApiClient) -> None:
        self.settings = settings
        self.core = client.CoreV1Api(api)
        self.description = KUBERNETES
        self.concurrency = settings.publish.kubernetes.concurrency
        _pool_at_least(api, self.concurrency)
        k8s = settings.publish.kubernetes
        self.limiter = limiter(k8s.qps, k8s.burst)
        limit_kubernetes_client(api, self.limiter)
        # Objects this process created or updated or saw in place, beside those the journal
        # says a full publish carried (DesiredObject.published): one found missing later was
        # deleted.
        self._written: set[str] = set()

    # --- the pass ----------------------------------------------------------------------------

    def publish(self, world: TrustWorld) -> PublishReport:
        report = PublishReport(self.description)
        desired = desired_objects(world, self.settings)
        listed = self._list_all(_crowded((o.kind, o.namespace) for o in desired))
        # Each object reports into its own report, merged in order: the same report
        # whatever order the parallel writes finished in.
        own = [PublishReport(self.description) for _ in desired]
        self._parallel(
            lambda i: self._reconcile_guarded(desired[i], own[i], listed), range(len(desired))
        )
        # In place before this pass wrote anything: KIC has had a sync to see them.
        ready = {o.ref for o, r in zip(desired, own, strict=True) if not (r.changed or r.errors)}
        patches = desired_service_patches(world, self.settings)
        services = self._list_services(
            {ns for _, ns in _crowded(("", p.namespace) for p in patches)}
        )
        annotated = [_Annotated(PublishReport(self.description)) for _ in patches]
        self._parallel(
            lambda i: self._annotate_guarded(patches[i], annotated[i], services, ready),
            range(len(patches)),
        )
        for part in own + [a.report for a in annotated]:
            report.changed += part.changed
            report.drifted += part.drifted
            report.errors.update(part.errors)
        # A verifying Service not brought up to date may still name what retires now.
        unsettled = {
            p.namespace
            for p, a in zip(patches, annotated, strict=True)
            if p.trust and a.report.errors and not a.missing
        }
        lingering = self._retire_references(world, desired, report, listed, unsettled)
        self._retire_kong_cas(desired, report, listed, generation_of(world), lingering)
        carriers = {o.ref for o in desired if o.role in _BUNDLE_ROLES}
        # A verifying Service carries the bundle too (Kong trusts what it names); one that
        # does not exist trusts nothing and holds nothing up.
        carriers |= {
            p.ref for p, a in zip(patches, annotated, strict=True) if p.trust and not a.missing
        }
        report.bundle_errors = [ref for ref in report.errors if ref in carriers]
        # Not an error: the roots it does not name yet are named on the next pass.
        report.bundle_errors += [
            f"{p.ref} (names the new root on the next pass)"
            for p, a in zip(patches, annotated, strict=True)
            if not a.trusts_bundle and p.ref not in report.errors
        ]
        return report

    def _parallel(self, work: Callable[[int], None], items: Iterable[int]) -> None:
        todo = list(items)
        if self.concurrency == 1 or len(todo) < 2:
            for i in todo:
                work(i)
            return
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            for future in [pool.submit(work, i) for i in todo]:
                future.result()

    # --- reading: one LIST per (kind, namespace) ---------------------------------------------

    def _list(self, what: str, fn: Callable[..., Any], namespace: str, **kw: Any) -> dict[str, Any]:
        found: dict[str, Any] = {}
        token: str | None = None
        while True:
            page_kw = dict(kw, limit=_PAGE)
            if token:
                page_kw["_continue"] = token
            page = call(what, fn, namespace, raw=True, **page_kw) or {}
            for item in page.get("items") or []:
                live = _live(item)
                found[live.metadata.name] = live
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return found

    def _list_all(self, pairs: set[tuple[str, str]]) -> _Listed:
        listed: _Listed = {}
        for kind, namespace in sorted(pairs):
            what = f"list {kind}s in {namespace}"
            try:
                fn = self._api(kind).list
                listed[kind, namespace] = self._list(what, fn, namespace, label_selector=_MANAGED)
            except KubeError as exc:
                log.warning("%s (reading them one by one instead)", exc)
        return listed

    def _list_services(self, namespaces: set[str]) -> dict[str, dict[str, Any]]:
        """Services are not ours (no label to select on): all of a namespace's."""
        found: dict[str, dict[str, Any]] = {}
        for namespace in sorted(namespaces):
            what = f"list Services in {namespace}"
            try:
                found[namespace] = self._list(what, self.core.list_namespaced_service, namespace)
            except KubeError as exc:
                log.warning("%s (reading them one by one instead)", exc)
        return found

    # --- objects -----------------------------------------------------------------------------

    def _api(self, kind: str) -> _KindApi:
        core = self.core
        if kind == "Secret":
            return _KindApi(
                core.read_namespaced_secret,
                core.create_namespaced_secret,
                core.replace_namespaced_secret,
                core.list_namespaced_secret,
            )
        return _KindApi(
            core.read_namespaced_config_map,
            core.create_namespaced_config_map,
            core.replace_namespaced_config_map,
            core.list_namespaced_config_map,
        )

    def _read(self, obj: DesiredObject) -> Any:
        read = self._api(obj.kind).read
        found = call(f"read {obj.ref}", read, obj.name, obj.namespace, missing_ok=True, raw=True)
        return None if found is None else _live(found)

    def _body(self, obj: DesiredObject, live: Any) -> dict[str, Any]:
        labels = dict((live.metadata.labels if live else None) or {})
        annotations = dict((live.metadata.annotations if live else None) or {})
        metadata: dict[str, Any] = {
            "name": obj.name,
            "namespace": obj.namespace,
            "labels": {**labels, **obj.labels},
            "annotations": {**annotations, **obj.annotations},
        }
        if obj.generation != UNKNOWN:
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

    def _was_published(self, obj: DesiredObject) -> bool:
        return obj.published or obj.ref in self._written

    def _reconcile_guarded(
        self, obj: DesiredObject, report: PublishReport, listed: _Listed
    ) -> None:
        try:
            self._reconcile(obj, report, listed)
        except KubeError as exc:
            report.errors[obj.ref] = str(exc)

    def _first_read(self, obj: DesiredObject, listed: _Listed) -> Any:
        """The object as the pass's LIST saw it; a GET when it was not listed, or when
        this process wrote it and the LIST (by label) no longer returns it."""
        found = listed.get((obj.kind, obj.namespace))
        if found is None or (obj.name not in found and self._was_published(obj)):
            return self._read(obj)
        return found.get(obj.name)

    def _reconcile(self, obj: DesiredObject, report: PublishReport, listed: _Listed) -> None:
        for attempt in range(_ATTEMPTS):
            live = self._first_read(obj, listed) if attempt == 0 else self._read(obj)
            if live is None:
                if self._was_published(obj):
                    report.drifted.append(f"{obj.ref} (deleted)")
                    self._event(obj, None, "DriftRepaired", f"{obj.ref} was deleted; recreated")
                create = self._api(obj.kind).create
                try:
                    call(
                        f"create {obj.ref}", create, obj.namespace, self._body(obj, None), raw=True
                    )
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
                call(
                    f"update {obj.ref}",
                    replace,
                    obj.name,
                    obj.namespace,
                    self._body(obj, live),
                    raw=True,
                )
            except KubeConflict:
                continue
            self._written.add(obj.ref)
            report.changed.append(obj.ref)
            return
        raise KubeError(f"update {obj.ref}: it kept changing during {_ATTEMPTS} attempts")

    # --- services and retired CAs ----------------------------------------------------------

    def _annotate_guarded(
        self,
        patch: ServicePatch,
        out: _Annotated,
        listed: dict[str, dict[str, Any]],
        ready: set[str],
    ) -> None:
        try:
            out.trusts_bundle = self._annotate_service(patch, out.report, listed, ready)
        except KubeError as exc:
            out.report.errors[patch.ref] = str(exc)
            out.missing = isinstance(exc, _ServiceMissing)

    def _annotate_service(
        self,
        patch: ServicePatch,
        report: PublishReport,
        listed: dict[str, dict[str, Any]],
        ready: set[str],
    ) -> bool:
        """Annotate the Service; whether it names every trusted root (when it verifies)."""
        what = f"annotate {patch.ref}"
        found = listed.get(patch.namespace)
        if found is not None:
            live = found.get(patch.name)
        else:
            doc = call(
                what,
                self.core.read_namespaced_service,
                patch.name,
                patch.namespace,
                missing_ok=True,
                raw=True,
            )
            live = None if doc is None else _live(doc)
        if live is None:
            raise _ServiceMissing(
                f"{what}: Service not found; create it or fix kong.clients[].service "
                "(its client Secret is published anyway)"
            )
        annotations = dict(patch.annotations)
        trusts_bundle = True
        if patch.trust:
            kong_ns = self.settings.kong.namespace
            usable = {
                name
                for name in patch.trust
                if f"secret/{kong_ns}/{name}" in ready
                and f"configmap/{patch.namespace}/{name}" in ready
            }
            trust = trust_annotations(patch.trust, live.metadata.annotations, usable)
            trusts_bundle = named_cas(trust) == list(patch.trust)
            if _missing_or_different(trust, live.metadata.annotations):
                _fence_service(patch, live)
                annotations |= trust
                if patch.generation != UNKNOWN:
                    annotations[TRUST_GENERATION] = format_generation(patch.generation)
        if not _missing_or_different(annotations, live.metadata.annotations):
            return trusts_bundle
        call(
            what,
            self.core.patch_namespaced_service,
            patch.name,
            patch.namespace,
            {"metadata": {"annotations": annotations}},
            _content_type="application/merge-patch+json",
            raw=True,
        )
        report.changed.append(patch.ref)
        return trusts_bundle

    def _retire_references(
        self,
        world: TrustWorld,
        desired: list[DesiredObject],
        report: PublishReport,
        listed: _Listed,
        unsettled: set[str],
    ) -> set[str]:
        """Delete the CA references of retired roots in each verifying namespace; return
        the names of every one found (deleted or not): their roots' Kong CA Secrets stay
        one more pass, because KIC may see those go before it sees the Services stop
        naming them, and a Service naming a missing CA verifies against nothing of ours."""
        generation = generation_of(world)
        found: set[str] = set()
        for namespace in verifying_namespaces(world, self.settings):
            keep = {
                o.name for o in desired if o.role == Role.KONG_CA_REF and o.namespace == namespace
            }
            where = f"configmap/{namespace}/kong-upstream-ca-*"
            try:
                refs = self._managed_with_role("ConfigMap", namespace, Role.KONG_CA_REF, listed)
                stale = [r for r in refs if r.metadata.name not in keep]
                found |= {r.metadata.name for r in stale}
                if stale and namespace in unsettled:
                    report.errors[where] = (
                        f"references of retired roots kept: a verifying Service in {namespace} "
                        "could not be updated this pass and may still name them"
                    )
                    continue
                for ref in stale:
                    self._delete_retired(
                        "ConfigMap", namespace, ref, generation, report, "root retired"
                    )
            except KubeError as exc:
                report.errors[where] = str(exc)
        return found

    def _managed_with_role(
        self, kind: str, namespace: str, role: str, listed: _Listed
    ) -> list[Any]:
        """The objects of ``role`` in ``namespace``: from the pass's LIST of its managed
        objects when it was made (those this pass created are kept anyway), else listed."""
        known = listed.get((kind, namespace))
        if known is not None:
            return [o for o in known.values() if (o.metadata.labels or {}).get(ROLE) == role]
        selector = f"{MANAGED_BY}={MANAGER},{ROLE}={role}"
        what = f"list {kind}s of role {role} in {namespace}"
        found = self._list(what, self._api(kind).list, namespace, label_selector=selector)
        return list(found.values())

    def _delete_retired(
        self,
        kind: str,
        namespace: str,
        live: Any,
        generation: Generation,
        report: PublishReport,
        why: str,
    ) -> None:
        name = live.metadata.name
        ref = f"{kind.lower()}/{namespace}/{name}"
        theirs = parse_generation((live.metadata.annotations or {}).get(GENERATION))
        if generation != UNKNOWN and theirs[:2] > generation[:2]:
            # Written from a newer journal (another replica leads): not ours to drop.
            report.errors[ref] = (
                f"{ref} comes from journal generation {format_generation(theirs)}, "
                f"newer than this pass's {format_generation(generation)}; not deleting it"
            )
            return
        delete = (
            self.core.delete_namespaced_secret
            if kind == "Secret"
            else self.core.delete_namespaced_config_map
        )
        call(f"delete {ref}", delete, name, namespace, raw=True)
        self._written.discard(ref)
        report.changed.append(f"{ref} (deleted: {why})")

    def _retire_kong_cas(
        self,
        desired: list[DesiredObject],
        report: PublishReport,
        listed: _Listed,
        generation: Generation,
        lingering: set[str],
    ) -> None:
        kong = self.settings.kong
        if not (kong.enabled and kong.delivery == "kubernetes"):
            return
        # A root whose references were still found this pass keeps its Secret one more.
        keep = {o.name for o in desired if o.role == Role.KONG_CA} | lingering
        try:
            for secret in self._managed_with_role("Secret", kong.namespace, Role.KONG_CA, listed):
                if secret.metadata.name not in keep:
                    self._delete_retired(
                        "Secret", kong.namespace, secret, generation, report, "root retired"
                    )
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
            call(
                f"event on {obj.ref}",
                self.core.create_namespaced_event,
                obj.namespace,
                body,
                raw=True,
            )
        except KubeError as exc:
            log.warning("could not record event %s on %s: %s", reason, obj.ref, exc)


def _crowded(pairs: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
    """The (kind, namespace) pairs with LIST_FROM objects or more: read with a LIST."""
    counts = Counter(pairs)
    return {pair for pair, count in counts.items() if count >= LIST_FROM}


def _pool_at_least(api: client.ApiClient, size: int) -> None:
    """One connection pool toward the apiserver, big enough for the parallel writes
    (the client's default is 5 per CPU): else urllib3 discards connections."""
    configuration = api.configuration
    current = getattr(configuration, "connection_pool_maxsize", None)
    if current is None or current >= size:
        return
    configuration.connection_pool_maxsize = size
    api.rest_client = rest.RESTClientObject(configuration)
