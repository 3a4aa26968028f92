"""The pods gate decides each Pod as `linkerd check --proxy` does (the proxy's
LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS, trimmed, against the bundle, trimmed), plus a
start-time rule for anchors read from the trust-roots ConfigMap."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from ca_daemon.pki.bundle import bundle_hash
from ca_daemon.publish.pods_gate import (
    Verdict,
    decide,
    is_meshed,
    pending_event_name,
    pending_pods,
)

pytestmark = pytest.mark.usefixtures("clean_env")

OLD = "-----BEGIN CERTIFICATE-----\nOLD\n-----END CERTIFICATE-----\n"
NEW = OLD + "-----BEGIN CERTIFICATE-----\nNEW\n-----END CERTIFICATE-----\n"
CONFIRMED = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)


def _stamp(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


def pod(
    name: str = "web-1",
    namespace: str = "shop",
    *,
    anchors: str | None = NEW,
    from_configmap: bool = False,
    started: datetime | None = None,
    label: str | None = "linkerd",
    annotation: str | None = None,
    proxy: bool = True,
    native_sidecar: bool = False,
    phase: str = "Running",
    deleting: bool = False,
) -> dict[str, Any]:
    """A Pod as Linkerd's injector makes it (label, annotation, proxy env)."""
    env: list[dict[str, Any]] = [{"name": "LINKERD2_PROXY_LOG", "value": "warn"}]
    if from_configmap:
        ref = {"name": "linkerd-identity-trust-roots", "key": "ca-bundle.crt"}
        env.append(
            {
                "name": "LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS",
                "valueFrom": {"configMapKeyRef": ref},
            }
        )
    elif anchors is not None:
        # _proxy.tpl: `value: |` + the trimmed bundle, so a trailing newline.
        env.append(
            {"name": "LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS", "value": anchors.strip() + "\n"}
        )
    containers: list[dict[str, Any]] = [{"name": "app", "image": "app"}]
    init: list[dict[str, Any]] = []
    if proxy:
        sidecar = {"name": "linkerd-proxy", "image": "proxy", "env": env}
        if native_sidecar:
            init.append({**sidecar, "restartPolicy": "Always"})
        else:
            containers.insert(0, sidecar)
    statuses = []
    if started is not None:
        statuses.append(
            {"name": "linkerd-proxy", "state": {"running": {"startedAt": _stamp(started)}}}
        )
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "labels": {} if label is None else {"linkerd.io/control-plane-ns": label},
        "annotations": {} if annotation is None else {"linkerd.io/trust-root-sha256": annotation},
    }
    if deleting:
        metadata["deletionTimestamp"] = _stamp(CONFIRMED)
    status: dict[str, Any] = {"phase": phase}
    status["initContainerStatuses" if native_sidecar else "containerStatuses"] = statuses
    return {
        "metadata": metadata,
        "spec": {"initContainers": init, "containers": containers},
        "status": status,
    }


def verdict(p: dict[str, Any]) -> Verdict:
    return decide(p, NEW, CONFIRMED, "linkerd").verdict


def test_literal_anchors_are_compared_trimmed() -> None:
    assert verdict(pod(anchors=NEW)) is Verdict.CURRENT
    assert verdict(pod(anchors="\n  " + NEW + "\n\n")) is Verdict.CURRENT
    assert verdict(pod(anchors=OLD)) is Verdict.PENDING
    # The bundle the daemon passes may itself carry surrounding whitespace.
    assert decide(pod(anchors=NEW), "\n" + NEW + "\n", CONFIRMED).verdict is Verdict.CURRENT


def test_a_bundle_in_another_order_is_another_bundle() -> None:
    """linkerd check compares text, not sets of roots; so does the gate."""
    first, second = NEW.split("-----END CERTIFICATE-----\n")[:2]
    swapped = second + "-----END CERTIFICATE-----\n" + first + "-----END CERTIFICATE-----\n"
    assert verdict(pod(anchors=swapped)) is Verdict.PENDING


def test_old_literal_anchors_are_pending_in_every_pod_state() -> None:
    """A Pod not yet started, or draining, holds (or will hold) only the old roots."""
    assert verdict(pod(anchors=OLD, phase="Pending")) is Verdict.PENDING
    assert verdict(pod(anchors=OLD, deleting=True)) is Verdict.PENDING
    assert verdict(pod(anchors=OLD, phase="Unknown")) is Verdict.PENDING
    del_status = pod(anchors=OLD)
    del del_status["status"]
    assert verdict(del_status) is Verdict.PENDING


def test_finished_pods_are_not_judged() -> None:
    """A completed Job's Pod runs no proxy; waiting for it would block forever."""
    assert verdict(pod(anchors=OLD, phase="Succeeded")) is Verdict.NOT_MESHED
    assert verdict(pod(anchors=OLD, phase="Failed")) is Verdict.NOT_MESHED


def test_configmap_anchors_are_decided_by_start_time() -> None:
    before = CONFIRMED - timedelta(minutes=5)
    after = CONFIRMED + timedelta(seconds=1)
    assert verdict(pod(from_configmap=True, started=before)) is Verdict.PENDING
    assert verdict(pod(from_configmap=True, started=after)) is Verdict.CURRENT
    # startedAt has whole seconds: the confirmation's own second cannot be told apart.
    assert verdict(pod(from_configmap=True, started=CONFIRMED)) is Verdict.PENDING


def test_configmap_anchors_not_running_resolve_the_new_bundle_when_they_start() -> None:
    assert verdict(pod(from_configmap=True, started=None)) is Verdict.CURRENT
    assert verdict(pod(from_configmap=True, started=None, phase="Pending")) is Verdict.CURRENT


def test_configmap_anchors_ignore_the_helm_annotation() -> None:
    """On control-plane Pods the annotation is Helm's hash; it cannot vouch for the env."""
    old_start = CONFIRMED - timedelta(hours=1)
    p = pod(from_configmap=True, started=old_start, annotation=bundle_hash(NEW))
    assert verdict(p) is Verdict.PENDING


def test_the_annotation_never_overrides_the_env() -> None:
    assert verdict(pod(anchors=OLD, annotation=bundle_hash(NEW))) is Verdict.PENDING
    assert verdict(pod(anchors=NEW, annotation=bundle_hash(OLD))) is Verdict.CURRENT


def test_without_the_env_only_a_matching_annotation_says_current() -> None:
    assert verdict(pod(anchors=None, annotation=bundle_hash(NEW))) is Verdict.CURRENT
    assert verdict(pod(anchors=None, annotation=bundle_hash(OLD))) is Verdict.PENDING
    assert verdict(pod(anchors=None)) is Verdict.PENDING
    # The hash is of the exact bytes, untrimmed, as the injector computes it.
    assert verdict(pod(anchors=None, annotation=bundle_hash(NEW.strip()))) is Verdict.PENDING


def test_native_sidecar_proxy_is_judged() -> None:
    """Linkerd can run the proxy as an init container with restartPolicy Always."""
    assert verdict(pod(anchors=OLD, native_sidecar=True)) is Verdict.PENDING
    assert verdict(pod(anchors=NEW, native_sidecar=True)) is Verdict.CURRENT
    before = CONFIRMED - timedelta(minutes=1)
    p = pod(from_configmap=True, native_sidecar=True, started=before)
    assert verdict(p) is Verdict.PENDING


@pytest.mark.parametrize(
    ("kwargs", "meshed"),
    [
        ({}, True),
        ({"label": None}, False),  # not injected (linkerd check lists by this label)
        ({"label": "linkerd-other"}, False),  # meshed to another control plane
        ({"proxy": False}, False),  # labelled but no proxy container
        ({"label": None, "annotation": bundle_hash(OLD)}, False),
    ],
)
def test_which_pods_are_meshed(kwargs: dict[str, Any], meshed: bool) -> None:
    assert is_meshed(pod(anchors=OLD, **kwargs), "linkerd") is meshed
    assert (verdict(pod(anchors=OLD, **kwargs)) is Verdict.PENDING) is meshed


def test_any_control_plane_when_none_is_named() -> None:
    assert is_meshed(pod(label="linkerd-other"))


def test_the_control_plane_namespace_is_judged_too() -> None:
    """Unlike linkerd check: identity must hold the bundle before the new issuer."""
    p = pod("linkerd-identity-1", "linkerd", from_configmap=True, started=CONFIRMED)
    assert verdict(p) is Verdict.PENDING


def test_pending_pods_names_exactly_the_laggards_sorted() -> None:
    pods = [
        pod("b", "shop", anchors=OLD),
        pod("a", "shop", anchors=NEW),
        pod("a", "billing", anchors=OLD),
        pod("plain", "shop", anchors=OLD, label=None),
        pod("id", "linkerd", from_configmap=True, started=CONFIRMED - timedelta(seconds=30)),
        pod("dst", "linkerd", from_configmap=True, started=CONFIRMED + timedelta(seconds=30)),
    ]
    assert pending_pods(pods, NEW, CONFIRMED, "linkerd") == [
        "billing/a",
        "linkerd/id",
        "shop/b",
    ]


def test_every_proxy_container_must_hold_the_bundle() -> None:
    p = pod(anchors=NEW)
    extra = {
        "name": "linkerd-proxy",
        "env": [{"name": "LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS", "value": OLD}],
    }
    p["spec"]["initContainers"].append(extra)
    assert verdict(p) is Verdict.PENDING


def test_event_name_is_fixed_per_configmap() -> None:
    name = pending_event_name("linkerd-identity-trust-roots")
    assert name == pending_event_name("linkerd-identity-trust-roots")
    assert name.startswith("linkerd-identity-trust-roots.")


def test_retiring_on_proof_every_proxy_must_have_restarted_since_the_confirmation() -> None:
    """After everything is re-issued, a proxy that holds the bundle but started before
    still presents a certificate from the old issuer: it lags, however it reads anchors."""
    before, after = CONFIRMED - timedelta(minutes=5), CONFIRMED + timedelta(seconds=1)
    for from_configmap in (False, True):
        old = pod(started=before, from_configmap=from_configmap)
        new = pod(started=after, from_configmap=from_configmap)
        assert decide(old, NEW, CONFIRMED, restarted=True).verdict is Verdict.PENDING
        assert decide(new, NEW, CONFIRMED, restarted=True).verdict is Verdict.CURRENT
    # Without it, a literal value equal to the bundle is enough, as linkerd check says.
    assert decide(pod(started=before), NEW, CONFIRMED).verdict is Verdict.CURRENT
    # A start in the confirmation's second counts as before it (whole seconds).
    same_second = pod(started=CONFIRMED.replace(microsecond=0))
    assert decide(same_second, NEW, CONFIRMED, restarted=True).verdict is Verdict.PENDING
    # A proxy not running yet starts under the new issuer.
    assert decide(pod(started=None), NEW, CONFIRMED, restarted=True).verdict is Verdict.CURRENT
    pods = [pod("a", started=before), pod("b", started=after)]
    assert pending_pods(pods, NEW, CONFIRMED, "linkerd", restarted=True) == ["shop/a"]
