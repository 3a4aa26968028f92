"""The pods gate: does a meshed Pod hold the trust bundle being propagated?

Pure functions over Pods as the API server returns them (JSON, camelCase keys), decided
the way ``linkerd check --proxy`` ("data plane proxies certificate match CA",
linkerd2 ``pkg/healthcheck/healthcheck.go`` ``checkPodsProxiesCertificate`` and
``GetMeshedPodsIdentityData``) decides, with two differences it needs:

- The control-plane namespace is judged too (``linkerd check`` skips it): the identity
  controller must hold the new bundle before an issuer under the new root is published.
- A proxy whose anchors come from a ``configMapKeyRef`` (control-plane pods; the chart's
  ``proxy.loadTrustBundleFromConfigMap``) has no value to compare. The kubelet resolves
  such an env var when it starts the container, and the proxy never re-reads it, so it
  holds the bundle iff it started after every publisher confirmed that bundle.

Which Pods are meshed: the injector labels every Pod it injects with
``linkerd.io/control-plane-ns: <namespace>`` (``pkg/inject/inject.go``
``NewResourceConfig``) and ``linkerd check`` lists Pods by that label; the chart puts the
same label on control-plane Pods. A Pod is judged when it carries that label (for our
control plane when one is named) and has a ``linkerd-proxy`` container, regular or
init (native sidecar), as ``GetMeshedPodsIdentityData`` walks both.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any

from ca_daemon.pki.bundle import bundle_hash

CONTROL_PLANE_NS_LABEL = "linkerd.io/control-plane-ns"
TRUST_ROOT_ANNOTATION = "linkerd.io/trust-root-sha256"
PROXY_CONTAINER = "linkerd-proxy"
TRUST_ANCHORS_ENV = "LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS"

Pod = Mapping[str, Any]

# Terminal phases: no container of such a Pod runs again, so it holds nothing.
_TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})


class Verdict(Enum):
    CURRENT = "current"
    PENDING = "pending"
    NOT_MESHED = "not-meshed"  # not judged: no Linkerd proxy, another control plane, or done


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    reason: str


def pod_ref(pod: Pod) -> str:
    meta = pod.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


def _proxy_containers(pod: Pod) -> list[Mapping[str, Any]]:
    spec = pod.get("spec") or {}
    containers = [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]
    return [c for c in containers if c.get("name") == PROXY_CONTAINER]


def _container_status(pod: Pod, name: str) -> Mapping[str, Any] | None:
    status = pod.get("status") or {}
    for entry in [
        *(status.get("initContainerStatuses") or []),
        *(status.get("containerStatuses") or []),
    ]:
        if entry.get("name") == name:
            found: Mapping[str, Any] = entry
            return found
    return None


def _started_at(pod: Pod, name: str) -> datetime | None:
    """When the container's current run started, or None when it is not running."""
    status = _container_status(pod, name)
    running = ((status or {}).get("state") or {}).get("running")
    if not running or not running.get("startedAt"):
        return None
    return datetime.fromisoformat(str(running["startedAt"]).replace("Z", "+00:00"))


def is_meshed(pod: Pod, control_plane_ns: str | None = None) -> bool:
    labels = (pod.get("metadata") or {}).get("labels") or {}
    if CONTROL_PLANE_NS_LABEL not in labels:
        return False
    # Pods of another control plane trust another bundle; they are not ours to wait for.
    if control_plane_ns is not None and labels[CONTROL_PLANE_NS_LABEL] != control_plane_ns:
        return False
    return bool(_proxy_containers(pod))


def decide(
    pod: Pod,
    bundle_pem: str,
    confirmed_at: datetime,
    control_plane_ns: str | None = None,
    restarted: bool = False,
) -> Decision:
    """Whether ``pod`` holds ``bundle_pem`` (confirmed by every publisher at ``confirmed_at``).

    - Pods that are not meshed, or have finished (phase Succeeded/Failed), are not judged.
    - A literal env value is compared trimmed with the bundle trimmed, as ``linkerd
      check`` does. That holds for every other state too: a Pod still Pending, or
      terminating, with an old literal value is pending; if it starts, or while it
      drains, its proxy trusts only the old roots.
    - A ``configMapKeyRef`` value is current unless the container is running and started
      at or before ``confirmed_at`` (start times have whole seconds, so the same second
      counts as before). A container that is not running resolves the reference again when
      it starts, from the ConfigMap that now holds the bundle.
    - A proxy container without the env var (not how any Linkerd release injects, so we
      cannot tell what it trusts) is current only when the Pod's
      ``linkerd.io/trust-root-sha256`` equals the bundle's hash, else pending. That
      annotation is used nowhere else: it can be edited on a live Pod, on control-plane
      Pods it is Helm's hash of its own value, and the env is in the same object anyway.
    - With several proxy containers, every one must hold the bundle.
    - ``restarted`` (retiring a root on proof): a proxy container running since
      ``confirmed_at`` or before is pending whatever it holds. Its certificate may come
      from the old issuer; one started later got its certificate from the new issuer,
      which Linkerd had loaded before ``confirmed_at``.
    """
    if not is_meshed(pod, control_plane_ns):
        return Decision(Verdict.NOT_MESHED, "no linkerd-proxy container for this control plane")
    if (pod.get("status") or {}).get("phase") in _TERMINAL_PHASES:
        return Decision(Verdict.NOT_MESHED, "finished: no proxy runs")
    want = bundle_pem.strip()
    for container in _proxy_containers(pod):
        started = _started_at(pod, str(container.get("name")))
        if restarted and started is not None and started <= confirmed_at:
            return Decision(Verdict.PENDING, "proxy started before everything was re-issued")
        env = [e for e in container.get("env") or [] if e.get("name") == TRUST_ANCHORS_ENV]
        if not env:
            annotations = (pod.get("metadata") or {}).get("annotations") or {}
            if annotations.get(TRUST_ROOT_ANNOTATION) != bundle_hash(bundle_pem):
                return Decision(Verdict.PENDING, f"no {TRUST_ANCHORS_ENV} and an old hash")
            continue
        var = env[-1]  # as in Kubernetes, the last of duplicate names wins
        ref = (var.get("valueFrom") or {}).get("configMapKeyRef")
        if ref is not None:
            if started is not None and started <= confirmed_at:
                return Decision(Verdict.PENDING, "proxy started before the bundle was confirmed")
            continue
        if str(var.get("value") or "").strip() != want:
            return Decision(Verdict.PENDING, "proxy holds another trust bundle")
    return Decision(Verdict.CURRENT, "proxy holds the bundle")


def pending_pods(
    pods: Iterable[Pod],
    bundle_pem: str,
    confirmed_at: datetime,
    control_plane_ns: str | None = None,
    restarted: bool = False,
) -> list[str]:
    """``namespace/name`` of every meshed Pod that does not hold ``bundle_pem`` (or, with
    ``restarted``, was not restarted since ``confirmed_at``), sorted."""
    return sorted(
        pod_ref(pod)
        for pod in pods
        if decide(pod, bundle_pem, confirmed_at, control_plane_ns, restarted).verdict
        is Verdict.PENDING
    )


def pending_event_name(trust_roots_configmap: str) -> str:
    """The one Event that reports laggards (on the trust-roots ConfigMap): a fixed name,
    so that each pass updates it instead of adding another, and RBAC can pin it."""
    return f"{trust_roots_configmap}.ca-daemon-pods-pending"


def issuer_event_name(issuer_secret: str) -> str:
    """The one Event that reports an issuer Linkerd refused or never confirmed (on the
    issuer Secret): a fixed name, updated in place, that RBAC can pin."""
    return f"{issuer_secret}.ca-daemon-issuer-unconfirmed"
