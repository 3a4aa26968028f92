"""A stand-in for Linkerd's identity controller on the real kube-apiserver: what it reads,
when, and the Events it records, as linkerd2's controller does. Linkerd's own controller
cannot run here (the module proxy refuses Linkerd's module); what it decides is decided
by tests/linkerd-check, the faithful re-implementation of its checks.

- ``restart()``: a new identity Pod. It reads the trust anchors once
  (``controller/cmd/identity/main.go``: the trust-roots ConfigMap's ``ca-bundle.crt``, as
  the chart mounts it) and loads the issuer Secret's files, with no Event
  (``Service.Initialize``). Its Pod is labelled as Linkerd's chart labels it
  (``linkerd.io/control-plane-component: identity``, container ``identity``), ready, with
  the container's start time set through pods/status as the kubelet would.
- ``sync()``: the kubelet updated the mounted Secret and fsnotify fired
  (``Service.Run``, on any change of the Secret's files, a new ``ca.crt`` alone too): the
  issuer is checked against the anchors read at start; Normal ``IssuerUpdated``
  "Updated identity issuer" when it loads, else Warning ``IssuerUpdateSkipped``
  "Skipping issuer update as certs could not be read from disk: <Linkerd's error>", and
  the old issuer stays.

Events are recorded as client-go's EventBroadcaster does (``tools/record/event.go``
``makeEvent``, the correlator): core/v1, named ``<object>.<unix nanos in hex>``, about
``{apps/v1 Deployment <ns>/linkerd-identity}`` with no uid, source component
``linkerd-identity``, count 1 and first/last timestamps; an identical repeat is the same
Event patched with count + 1 and a new lastTimestamp.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.support.identity_controller import (
    UPDATED,
    event_body,
    linkerd_error,
    skipped,
    stamp,
)
from tests.support.servers.kube import Kube
from tests.support.servers.linkerd import LinkerdCheck

TRUST_ROOTS = "linkerd-identity-trust-roots"
ISSUER_SECRET = "linkerd-identity-issuer"
_MERGE = {"Content-Type": "application/merge-patch+json"}


@dataclass
class IdentityStandIn:
    kube: Kube
    namespace: str
    linkerd_check: LinkerdCheck
    workdir: Path
    now: Callable[[], datetime] = lambda: datetime.now(UTC)
    anchors: bytes = b""
    issuer: tuple[bytes, ...] | None = None  # tls.crt, tls.key as loaded
    seen: tuple[bytes, ...] | None = None  # the mounted files as last synced
    events: list[dict[str, Any]] = field(default_factory=list)
    restarts: int = 0
    _last: tuple[str, str, str] | None = None  # (name, reason, message) last recorded

    def _files(self) -> tuple[bytes, ...] | None:
        """tls.crt, tls.key and ca.crt: Linkerd reloads when any of the mounted files
        changes (a new ca.crt alone too), though it reads only the first two."""
        secret = self.kube.get(f"/api/v1/namespaces/{self.namespace}/secrets/{ISSUER_SECRET}")
        if secret is None:
            return None
        data = secret["data"]
        return tuple(base64.b64decode(data[k]) for k in ("tls.crt", "tls.key", "ca.crt"))

    def restart(self) -> None:
        cm = self.kube.get(f"/api/v1/namespaces/{self.namespace}/configmaps/{TRUST_ROOTS}")
        self.anchors = cm["data"]["ca-bundle.crt"].encode()
        self.seen = self._files()
        self.issuer = self.seen[:2] if self.seen else None
        self._last = None  # a new process: a new correlator cache
        self.restarts += 1
        self._pod()

    def sync(self) -> str | None:
        """Deliver the mounted issuer's change, if any; the Event's reason, or None."""
        files = self._files()
        if files is None or files == self.seen:
            return None
        self.seen = files
        error = self._check(files[:2])
        kind, reason, message = UPDATED if error is None else skipped(error)
        if error is None:
            self.issuer = files[:2]
        self._record(kind, reason, message)
        return reason

    def _check(self, files: tuple[bytes, ...]) -> str | None:
        """Linkerd's error for these issuer files under the anchors read at start."""
        crt, key = files[0], files[1]
        paths = {}
        for name, data in (("ca.crt", self.anchors), ("tls.crt", crt), ("tls.key", key)):
            paths[name] = self.workdir / f"identity-{name}"
            paths[name].write_bytes(data)
        code, output = self.linkerd_check(
            paths["ca.crt"], paths["tls.crt"], paths["tls.key"], now=self.now()
        )
        return None if code == 0 else linkerd_error(output)

    def _record(self, kind: str, reason: str, message: str) -> None:
        at = stamp(self.now())
        with self.kube.http() as http:
            if self._last is not None and self._last[1:] == (reason, message):
                name = self._last[0]
                live = http.get(f"/api/v1/namespaces/{self.namespace}/events/{name}").json()
                patched = http.patch(
                    f"/api/v1/namespaces/{self.namespace}/events/{name}",
                    json={"count": live["count"] + 1, "lastTimestamp": at},
                    headers=_MERGE,
                )
                patched.raise_for_status()
                self.events.append(patched.json())
                return
            event = event_body(self.namespace, kind, reason, message, self.now())
            name = event["metadata"]["name"]
            created = http.post(f"/api/v1/namespaces/{self.namespace}/events", json=event)
            created.raise_for_status()
        self._last = (name, reason, message)
        self.events.append(created.json())

    def _pod(self) -> None:
        """The identity Pod this start runs in, replacing the one before."""
        name = f"linkerd-identity-stand-in-{self.restarts}"
        labels = {"linkerd.io/control-plane-component": "identity"}
        with self.kube.http() as http:
            old = http.get(
                f"/api/v1/namespaces/{self.namespace}/pods",
                params={"labelSelector": "linkerd.io/control-plane-component=identity"},
            ).json()
            for pod in old["items"]:
                http.delete(
                    f"/api/v1/namespaces/{self.namespace}/pods/{pod['metadata']['name']}",
                    params={"gracePeriodSeconds": 0},
                ).raise_for_status()
            http.post(
                f"/api/v1/namespaces/{self.namespace}/pods",
                json={
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": name, "labels": labels},
                    "spec": {"containers": [{"name": "identity", "image": "cr.l5d.io/identity"}]},
                },
            ).raise_for_status()
            started = stamp(self.now())
            status = {
                "phase": "Running",
                "conditions": [{"type": "Ready", "status": "True"}],
                "containerStatuses": [
                    {
                        "name": "identity",
                        "image": "cr.l5d.io/identity",
                        "imageID": "",
                        "ready": True,
                        "restartCount": 0,
                        "state": {"running": {"startedAt": started}},
                    }
                ],
            }
            http.patch(
                f"/api/v1/namespaces/{self.namespace}/pods/{name}/status",
                json={"status": status},
                headers=_MERGE,
            ).raise_for_status()
