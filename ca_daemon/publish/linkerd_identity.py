"""What Linkerd's identity controller says about the issuer it runs with.

Linkerd's identity controller (linkerd2 ``pkg/identity/service.go``, ``Service.Run``)
reloads its issuer whenever the files of the mounted issuer Secret change, and records an
Event each time: Normal ``IssuerUpdated`` ("Updated identity issuer") when the new issuer
loaded, Warning ``IssuerUpdateSkipped`` ("Skipping issuer update as certs could not be
read from disk: <error>") when it did not, typically because it does not verify against
the trust anchors the controller read once at start; the old issuer stays in use then.
``Certify`` records Warning ``IssuerValidationFailed`` when the issuer in use no longer
verifies (expired, or not under the anchors). ``controller/cmd/identity/main.go`` records
them with client-go's EventBroadcaster as core/v1 Events, source component
``linkerd-identity``, about ``{apps/v1 Deployment <namespace>/linkerd-identity}`` with no
uid, in the control plane's namespace. client-go's correlator folds an identical repeat
into the same Event (``count`` + 1, a new ``lastTimestamp``), so an Event's time is its
``lastTimestamp`` (or ``eventTime``/``series`` when an events.k8s.io writer made it).

No Event is recorded at start (``Initialize`` loads the files without one): an identity
Pod whose container started, ready, after the issuer was made read that issuer then.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

LOADED = "IssuerUpdated"
SKIPPED = "IssuerUpdateSkipped"
FAILED = "IssuerValidationFailed"
# controller/cmd/identity/main.go names the object of its Events with this constant,
# whatever the Deployment is called.
IDENTITY_DEPLOYMENT = "linkerd-identity"
# The label Linkerd's control-plane chart puts on the identity controller's Pods.
COMPONENT_LABEL = "linkerd.io/control-plane-component"
IDENTITY_CONTAINER = "identity"


@dataclass(frozen=True)
class Answer:
    loaded: bool
    at: datetime
    message: str


def _time(value: Any) -> datetime | None:
    if not value:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def event_time(event: Mapping[str, Any]) -> datetime | None:
    """When an Event last happened, whichever API wrote it."""
    series = event.get("series") or {}
    times = [
        _time(event.get("lastTimestamp")),
        _time(series.get("lastObservedTime")),
        _time(event.get("eventTime")),
        _time(event.get("firstTimestamp")),
    ]
    found = [t for t in times if t is not None]
    return max(found) if found else None


def _whole_second(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(microsecond=0)


def _event_answers(
    events: Iterable[Mapping[str, Any]], deployment: str, start: datetime
) -> list[Answer]:
    found = []
    for event in events:
        involved = event.get("involvedObject") or {}
        if event.get("reason") not in (LOADED, SKIPPED, FAILED):
            continue
        if involved.get("kind") != "Deployment" or involved.get("name") != deployment:
            continue
        at = event_time(event)
        if at is not None and at >= start:
            found.append(Answer(event.get("reason") == LOADED, at, str(event.get("message") or "")))
    return found


def answer_from_pods(pods: Iterable[Mapping[str, Any]], after: datetime) -> Answer | None:
    """Every identity Pod ready with its container started after ``after``: each read the
    issuer from disk at start. None when there is no such Pod, or one runs from before."""
    started: list[datetime] = []
    for pod in pods:
        if (pod.get("metadata") or {}).get("deletionTimestamp"):
            continue
        status = pod.get("status") or {}
        ready = any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in status.get("conditions") or []
        )
        container = next(
            (
                c
                for c in status.get("containerStatuses") or []
                if c.get("name") == IDENTITY_CONTAINER
            ),
            None,
        )
        running = ((container or {}).get("state") or {}).get("running") or {}
        at = _time(running.get("startedAt"))
        if not ready or at is None or at <= after:
            return None
        started.append(at)
    if not started:
        return None
    return Answer(True, max(started), "identity controller started with it")


def decide(
    events: Iterable[Mapping[str, Any]],
    pods: Iterable[Mapping[str, Any]],
    deployment: str,
    published_at: datetime,
) -> Answer | None:
    """The identity controller's answer about the issuer first written to the cluster at
    ``published_at``; None: nothing yet.

    Only what happened from that second on counts (Event times have whole seconds): the
    controller reloads on any change of the mounted Secret, a new ``ca.crt`` included, so a
    reload before is of the Secret's previous contents. (Within the publish's own second
    it cannot be told apart; the daemon writes the issuer Secret once per change, and a
    kubelet that delivered the write as fast as that must be counted.) A refusal
    outweighs any load: the replicas of an HA control plane record
    Events that cannot be told apart, and one that refused keeps signing with the old
    issuer; it is over only when every identity Pod started after it."""
    start = _whole_second(published_at)
    answers = _event_answers(events, deployment, start)
    pods = list(pods)
    refusals = [a for a in answers if not a.loaded]
    if refusals:
        refusal = max(refusals, key=lambda a: a.at)
        return answer_from_pods(pods, refusal.at) or refusal
    loads = [a for a in answers if a.loaded]
    if loads:
        return max(loads, key=lambda a: a.at)
    return answer_from_pods(pods, start)
