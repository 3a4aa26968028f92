"""Which answer of Linkerd's identity controller counts for an issuer (pure).

The Events and Pods are shaped as the API server returns them for what linkerd2's
identity controller records (client-go's recorder: core/v1, about the identity
Deployment, repeats folded into one Event with a count).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from ca_daemon.publish.linkerd_identity import IDENTITY_DEPLOYMENT, decide

PUBLISHED = datetime(2026, 12, 6, 12, 0, 5, 300000, tzinfo=UTC)
SKIP = "Skipping issuer update as certs could not be read from disk: x509: unknown authority"


def _stamp(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


def event(
    reason: str, at: datetime, first: datetime | None = None, name: str = IDENTITY_DEPLOYMENT
) -> dict[str, Any]:
    return {
        "involvedObject": {"kind": "Deployment", "name": name, "apiVersion": "apps/v1"},
        "reason": reason,
        "message": SKIP if reason == "IssuerUpdateSkipped" else "Updated identity issuer",
        "firstTimestamp": _stamp(first or at),
        "lastTimestamp": _stamp(at),
        "count": 1 if first is None else 3,
    }


def pod(started: datetime, ready: bool = True, deleting: bool = False) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": "linkerd-identity-5d8f9c-abcde"}
    if deleting:
        metadata["deletionTimestamp"] = _stamp(started + timedelta(minutes=1))
    return {
        "metadata": metadata,
        "status": {
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            "containerStatuses": [
                {"name": "identity", "state": {"running": {"startedAt": _stamp(started)}}}
            ],
        },
    }


def at(seconds: float) -> datetime:
    return PUBLISHED + timedelta(seconds=seconds)


def test_nothing_said_since_the_publish_is_no_answer() -> None:
    assert decide([], [], IDENTITY_DEPLOYMENT, PUBLISHED) is None


def test_a_reload_before_the_publish_is_not_about_this_issuer() -> None:
    # Before 12:00:05, the publish's own second: the Secret's previous contents (a new
    # ca.crt alone makes Linkerd reload, and announce, the old issuer).
    stale = [event("IssuerUpdated", at(-60)), event("IssuerUpdated", at(-1.3))]
    assert decide(stale, [], IDENTITY_DEPLOYMENT, PUBLISHED) is None
    # Event times have whole seconds: a reload in the publish's own second counts.
    same = event("IssuerUpdated", at(-0.3))
    answer = decide([*stale, same], [], IDENTITY_DEPLOYMENT, PUBLISHED)
    assert answer is not None and answer.loaded and answer.at == at(-0.3)


def test_a_folded_repeat_counts_by_its_last_time() -> None:
    repeat = event("IssuerUpdated", at(40), first=at(-3600))
    answer = decide([repeat], [], IDENTITY_DEPLOYMENT, PUBLISHED)
    assert answer is not None and answer.loaded


def test_events_about_other_objects_are_not_the_identity_controller_s() -> None:
    other = event("IssuerUpdated", at(10), name="linkerd-destination")
    assert decide([other], [], IDENTITY_DEPLOYMENT, PUBLISHED) is None


def test_a_refusal_outweighs_a_later_load_from_another_replica() -> None:
    events = [event("IssuerUpdateSkipped", at(10)), event("IssuerUpdated", at(20))]
    answer = decide(events, [pod(at(-600))], IDENTITY_DEPLOYMENT, PUBLISHED)
    assert answer is not None and not answer.loaded and answer.message == SKIP


def test_a_refusal_is_over_once_every_identity_pod_started_after_it() -> None:
    refused = [event("IssuerUpdateSkipped", at(10))]
    one_old = [pod(at(60)), pod(at(5))]
    answer = decide(refused, one_old, IDENTITY_DEPLOYMENT, PUBLISHED)
    assert answer is not None and not answer.loaded
    answer = decide(refused, [pod(at(60)), pod(at(61))], IDENTITY_DEPLOYMENT, PUBLISHED)
    assert answer is not None and answer.loaded and answer.at == at(61).replace(microsecond=0)


def test_a_pod_started_after_the_publish_loaded_it_if_ready_and_staying() -> None:
    assert decide([], [pod(at(30))], IDENTITY_DEPLOYMENT, PUBLISHED) is not None
    assert decide([], [pod(at(30), ready=False)], IDENTITY_DEPLOYMENT, PUBLISHED) is None
    # A terminating Pod is ignored; the one replacing it answers.
    pods = [pod(at(-600), deleting=True), pod(at(30))]
    assert decide([], pods, IDENTITY_DEPLOYMENT, PUBLISHED) is not None
    # One Pod from before the publish still runs the old issuer.
    assert decide([], [pod(at(-600)), pod(at(30))], IDENTITY_DEPLOYMENT, PUBLISHED) is None
