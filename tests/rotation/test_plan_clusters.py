"""Several clusters from one root, as plan() decides it: each linked cluster's issuer on
its own schedule, and a root rotation held for a cluster that did not confirm."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest

from ca_daemon.config.settings import Settings
from ca_daemon.model.state import (
    CaRecord,
    IssuedEntry,
    IssuerAnswer,
    Phase,
    RootRole,
    State,
    issuer_key,
)
from ca_daemon.model.world import cluster_world, desired_world
from ca_daemon.pki.keys import private_key_pem
from ca_daemon.pki.profiles import Kind, Subject
from ca_daemon.report.status import warnings
from ca_daemon.rotation.issuer_confirmation import confirmation
from ca_daemon.rotation.plan import Observations, plan, renew_at
from ca_daemon.rotation.requests import (
    LEAKED_ISSUER_ADVICE,
    UnknownTarget,
    advice,
    check_target,
    ensure_can_start_emergency,
)
from ca_daemon.rotation.steps import (
    Activate,
    DropKongClient,
    IssueKongClient,
    IssueLinkerdIssuer,
    Retire,
    StartRetiring,
    Wait,
)
from tests.support.clock import NOW
from tests.support.pki import issue_profiled, self_signed_root
from tests.support.states import steady_state, with_next_root

pytestmark = pytest.mark.usefixtures("clean_env")

MakeSettings = Callable[..., Settings]
HOUR = timedelta(hours=1)


def _clusters(**east: Any) -> dict[str, Any]:
    linked = {"name": "east", "kubeconfig": "/etc/east.kubeconfig", **east}
    return {"publish": {"kubernetes": {"enabled": True}}, "clusters": [{"name": "west"}, linked]}


def _with_east_issuer(state: State, settings: Settings, lifetime: timedelta) -> State:
    root = state.ca.active_root
    assert root is not None
    key, root_cert = self_signed_root()  # stands in: only the issuer's dates matter here
    issuer_key_, cert = issue_profiled(
        Kind.LINKERD_ISSUER, Subject(settings.issuer_common_name("east")), key, root_cert, lifetime
    )
    entry = IssuedEntry(cert, private_key_pem(issuer_key_), root.ref, (), NOW)
    return state.with_credentials({issuer_key("east"): entry})


def test_a_linked_cluster_gets_an_issuer_of_its_own(make_settings: MakeSettings) -> None:
    settings = make_settings(_clusters(linkerd={"namespace": "l5d"}))
    steps = plan(steady_state(settings), NOW, settings)
    assert steps == [IssueLinkerdIssuer("missing", cluster="east")]
    assert settings.issuer_common_name("east") == "identity.l5d.cluster.local"
    assert settings.issuer_common_name(None) == "identity.linkerd.cluster.local"


def test_each_cluster_s_issuer_is_renewed_on_its_own_schedule(
    make_settings: MakeSettings,
) -> None:
    settings = make_settings(
        _clusters(linkerd={"issuer": {"lifetime": "10h", "rotate_before": "2h"}})
    )
    state = _with_east_issuer(steady_state(settings), settings, timedelta(hours=10))
    east = state.issuer("east")
    assert east is not None
    assert plan(state, NOW, settings) == []
    due = renew_at(east.cert, timedelta(hours=2), settings.rotation.jitter)
    steps = plan(state, due, settings)
    # Only east's issuer: home's (48h) is far from due, and neither waits on the other.
    assert [type(s) for s in steps] == [IssueLinkerdIssuer]
    assert steps[0].cluster == "east"


def test_a_linked_cluster_with_linkerd_off_gets_no_issuer(make_settings: MakeSettings) -> None:
    settings = make_settings(_clusters(linkerd={"enabled": False}))
    assert plan(steady_state(settings), NOW, settings) == []


def _propagating(settings: Settings) -> State:
    state = _with_east_issuer(steady_state(settings), settings, timedelta(hours=48))
    return with_next_root(state, Phase.PROPAGATING, confirmed_at=NOW, restarted=True)


def test_an_unreachable_cluster_holds_every_move_of_a_root_rotation(
    make_settings: MakeSettings,
) -> None:
    settings = make_settings(_clusters())
    state = _propagating(settings)
    later = NOW + timedelta(hours=1)
    ready = Observations(cluster=True, pending_pods=())
    assert Activate("kong-4") in plan(state, later, settings, ready)
    held = plan(state, later, settings, replace(ready, unconfirmed=("east",)))
    assert not any(isinstance(s, Activate) for s in held)
    waits = [s for s in held if isinstance(s, Wait)]
    assert len(waits) == 1 and "east" in waits[0].reason
    # Before this pass published, what east shows is not known: publish first.
    first = plan(state, later, settings, replace(ready, before_publish=True))
    assert not any(isinstance(s, Activate) for s in first)
    assert [s.after_publish for s in first if isinstance(s, Wait)] == [True]
    # Retiring too: nothing leaves the bundles while a cluster cannot be told.
    retiring = replace(
        state,
        ca=replace(
            state.ca,
            phase=Phase.RETIRING,
            rotation=replace(state.ca.rotation, retire_after=NOW),  # type: ignore[type-var]
        ),
    )
    assert any(isinstance(s, Retire) for s in plan(retiring, later, settings, ready))
    held = plan(retiring, later, settings, replace(ready, unconfirmed=("east",)))
    assert not any(isinstance(s, Retire) for s in held)


def test_a_lagging_pod_of_a_linked_cluster_gates_activation(make_settings: MakeSettings) -> None:
    # Home's gate is time, east's is pods: east's Pods are still waited for.
    settings = make_settings({"linkerd": {"gate": "time"}, **_clusters(linkerd={"gate": "pods"})})
    state = _propagating(settings)
    later = NOW + timedelta(hours=1)
    lagging = Observations(cluster=True, pending_pods=("east/shop/web-1",))
    steps = plan(state, later, settings, lagging)
    assert not any(isinstance(s, Activate) for s in steps)
    assert any(isinstance(s, Wait) and "east/shop/web-1" in s.reason for s in steps)
    # Left out of rotations explicitly: its gate is not asked for.
    out = make_settings({"linkerd": {"gate": "time"}, **_clusters(in_rotation=False)})
    assert Activate("kong-4") in plan(state, later, out, Observations(cluster=True))


def test_a_linked_cluster_is_shown_its_own_issuer_and_the_shared_bundle(
    make_settings: MakeSettings,
) -> None:
    settings = make_settings(_clusters())
    state = _with_east_issuer(steady_state(settings), settings, timedelta(hours=48))
    world = desired_world(state, settings, versions={issuer_key("east"): 7, "kong/payments": 3})
    east = cluster_world(world, "east")
    assert east.roots == world.roots
    assert east.linkerd_issuer == state.issuer("east") != world.linkerd_issuer
    assert east.kong_clients == {} and east.cluster_issuers == {}
    assert east.versions == {"linkerd-issuer": 7}
    # A linked issuer not issued yet: east's publish has none, home's keeps nothing of it.
    home = desired_world(steady_state(settings), settings)
    missing = cluster_world(home, "east")
    assert missing.linkerd_issuer is None and missing.kept == frozenset()
    assert home.kept == frozenset()  # east's missing issuer is nothing home's publishers keep


def test_a_cluster_added_during_a_rotation_gets_its_issuer_once_it_ended(
    make_settings: MakeSettings,
) -> None:
    settings = make_settings(_clusters())
    steady = steady_state(settings)  # no issuer for east: it was just added
    state = replace(steady, ca=_propagating(settings).ca)
    later = NOW + timedelta(hours=1)
    ready = Observations(cluster=True, pending_pods=())
    steps = plan(state, later, settings, ready)
    assert not any(isinstance(s, IssueLinkerdIssuer) and s.cluster == "east" for s in steps)
    assert Activate("kong-4") in steps  # it does not hold activation for want of an issuer
    assert IssueLinkerdIssuer("missing", cluster="east") in plan(steady, later, settings)


def test_a_linked_cluster_s_issuer_may_be_replaced_in_an_emergency(
    make_settings: MakeSettings,
) -> None:
    settings = make_settings(_clusters())
    check_target(settings, "linkerd-issuer/east")
    ensure_can_start_emergency(CaRecord(), "linkerd-issuer/east")
    assert advice("linkerd-issuer/east", emergency=True) == LEAKED_ISSUER_ADVICE
    with pytest.raises(UnknownTarget, match="linkerd-issuer/south"):
        check_target(settings, "linkerd-issuer/south")


def test_a_linked_cluster_s_kong_clients_are_its_own(make_settings: MakeSettings) -> None:
    kong = {"namespace": "edge", "clients": [{"name": "payments", "common_name": "kong.pay.e"}]}
    settings = make_settings(_clusters(kong=kong))
    state = steady_state(settings)  # home's payments only
    steps = plan(state, NOW, settings)
    # Home's client of the same name is another credential: east's is issued on its own.
    assert IssueKongClient("east/payments", "missing") in steps
    assert not any(isinstance(s, IssueKongClient) and s.name == "payments" for s in steps)
    inter = state.ca.active_intermediate
    assert inter is not None
    _, cert = issue_profiled(Kind.KONG_CLIENT, Subject("kong.pay.e"), *self_signed_root(), HOUR)
    entry = IssuedEntry(cert, b"key", inter.ref, (inter.cert,), NOW)
    issued = state.with_credentials({"kong/east/payments": entry})
    world = desired_world(issued, settings, versions={"kong/east/payments": 4})
    assert set(world.kong_clients) == {"payments"}  # home's
    assert world.kong_clients["payments"] != entry
    east = cluster_world(world, "east")
    assert dict(east.kong_clients) == {"payments": entry}
    assert east.versions == {"kong/payments": 4}
    # Taken out of east's configuration: dropped, home's untouched.
    gone = make_settings(_clusters(kong={"namespace": "edge", "clients": []}))
    assert [s for s in plan(issued, NOW, gone) if isinstance(s, DropKongClient)] == [
        DropKongClient("east/payments", "no longer configured")
    ]
    assert cluster_world(desired_world(state, settings), "east").kong_clients == {}


def test_retirement_waits_for_a_linked_issuer_still_under_the_old_root(
    make_settings: MakeSettings,
) -> None:
    settings = make_settings({"kong": {"enabled": False}, **_clusters()})
    activated = _activated(settings)  # everything re-issued under root-3, east's too
    later = NOW + timedelta(hours=1)
    ready = Observations(cluster=True, pending_pods=())
    assert any(isinstance(s, StartRetiring) for s in plan(activated, later, settings, ready))
    east = activated.issuer("east")
    assert east is not None
    behind = activated.with_credentials({issuer_key("east"): replace(east, signer_ref="root-1")})
    steps = plan(behind, later, settings, ready)
    assert not any(isinstance(s, StartRetiring) for s in steps)
    assert IssueLinkerdIssuer("signed by root-1, not root-3", cluster="east") in steps
    assert any(isinstance(s, Wait) and "1 credential(s) to go" in s.reason for s in steps)


def _activated(settings: Settings) -> State:
    """root-3 active, root-1 retiring, every credential (east's issuer too) under root-3."""
    state = _propagating(settings)
    record = state.ca
    roots = tuple(
        replace(r, role=RootRole.ACTIVE if r.ref == "root-3" else RootRole.RETIRING)
        for r in record.roots
    )
    rotation = replace(record.rotation, activated_at=NOW, old_chain_until=NOW)  # type: ignore[type-var]
    state = replace(
        state, ca=replace(record, roots=roots, phase=Phase.ACTIVATED, rotation=rotation)
    )
    moved = {key: replace(entry, signer_ref="root-3") for key, entry in state.credentials()}
    return state.with_credentials(moved)


def test_a_cluster_left_out_of_rotations_is_not_asked_about_its_issuer(
    make_settings: MakeSettings,
) -> None:
    """An answer journaled while it took part must not turn into an 'overdue' alarm once
    it is left out and its issuer renewed (nothing asks there any more)."""
    events = {"linkerd": {"confirm": "events"}}
    settings = make_settings(_clusters(**events))
    state = _with_east_issuer(steady_state(settings), settings, timedelta(hours=48))
    old = IssuerAnswer("0abc", NOW - timedelta(days=1), True, NOW - timedelta(days=1))
    state = replace(state, ca=state.ca.with_answer("east", old))
    later = NOW + timedelta(hours=1)
    asked = confirmation(state, settings, later, True, "east")
    assert asked is not None and asked.state == "overdue"
    out = make_settings(_clusters(in_rotation=False, **events))
    assert confirmation(state, out, later, True, "east") is None
    assert not any("east" in w for w in warnings(state, out, later))
