"""plan() as the root rotator: every phase, clock position and observation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta

import pytest

from ca_daemon.config.settings import Settings
from ca_daemon.errors import ConfigError
from ca_daemon.model.state import (
    Crls,
    IntermediateEntry,
    IssuedEntry,
    Operation,
    OpState,
    Phase,
    RootEntry,
    RootRole,
    Rotation,
    State,
    trusted_roots,
)
from ca_daemon.pki.bundle import bundle_hash, render_pem
from ca_daemon.pki.keys import private_key_pem
from ca_daemon.pki.profiles import Kind, Subject
from ca_daemon.rotation.plan import (
    PROVEN_UNUSED,
    GateQuery,
    Observations,
    client_subject,
    crl_issuers,
    gate_query,
    plan,
    retire_after,
)
from ca_daemon.rotation.steps import (
    Activate,
    ConfirmBundle,
    FinishOperation,
    IssueKongClient,
    IssueLinkerdIssuer,
    NoteRestart,
    PrepareRoot,
    Propagate,
    RefreshCrls,
    RestartLinkerd,
    Retire,
    Revoke,
    StartOperation,
    StartRetiring,
    Wait,
)
from tests.support.clock import NOW
from tests.support.pki import issue_profiled, self_signed_root
from tests.support.states import steady_state, with_next_root

pytestmark = pytest.mark.usefixtures("clean_env")

MakeSettings = Callable[..., Settings]
DAY = timedelta(days=1)


def _two_root_hash(state: State) -> str:
    return bundle_hash(render_pem(trusted_roots(state.ca)))


def _actions(steps: list[object]) -> list[object]:
    """The CA actions: no waits, no renewals (those are tested on their own)."""
    return [s for s in steps if not isinstance(s, Wait | IssueLinkerdIssuer | IssueKongClient)]


def _wait(steps: list[object]) -> Wait:
    waits = [s for s in steps if isinstance(s, Wait)]
    assert len(waits) == 1, steps
    return waits[0]


# --- starting a rotation -------------------------------------------------------------------


def test_rotation_starts_when_the_root_is_inside_rotate_before(
    make_settings: MakeSettings,
) -> None:
    settings = make_settings({"root": {"lifetime": "8760h", "rotate_before": "2920h"}})
    state = steady_state(settings)
    root = state.ca.active_root
    assert root is not None
    due = root.cert.not_valid_after_utc - timedelta(hours=2920)
    early = plan(state, due - timedelta(seconds=1), settings)
    assert not any(isinstance(s, PrepareRoot) for s in early)
    steps = plan(state, due, settings)
    assert isinstance(steps[0], PrepareRoot)
    assert steps[0].ref == "root-3" and steps[0].operation is None
    assert steps[0].reason.startswith("due:")


def test_root_due_while_the_issuer_is_due_plans_both(make_settings: MakeSettings) -> None:
    settings = make_settings()
    state = steady_state(settings, root_days=3)  # 72h left: inside rotate_before (2920h)
    at = NOW + timedelta(hours=40)  # the issuer (48h, 16h before) is due too
    steps = plan(state, at, settings)
    assert isinstance(steps[0], PrepareRoot)
    assert IssueLinkerdIssuer("due: 8h left") in steps


def test_a_queued_manual_request_starts_a_rotation(make_settings: MakeSettings) -> None:
    settings = make_settings()
    state = steady_state(settings)
    op = Operation("op1", "trust-anchor", "drill", NOW)
    state = replace(state, ca=state.ca.with_operation(op))
    steps = plan(state, NOW, settings)
    assert steps[0] == PrepareRoot("root-3", "manual: drill", "op1")


# --- propagating ---------------------------------------------------------------------------


def test_prepared_goes_on_to_propagate(make_settings: MakeSettings) -> None:
    settings = make_settings()
    state = with_next_root(steady_state(settings), Phase.PREPARED)
    assert _actions(plan(state, NOW, settings)) == [Propagate()]
    # Nothing is trusted in the prepared phase but the active root.
    assert len(trusted_roots(state.ca)) == 1


def test_propagation_waits_until_every_publisher_confirmed(make_settings: MakeSettings) -> None:
    settings = make_settings()
    state = with_next_root(steady_state(settings), Phase.PROPAGATING)
    assert len(trusted_roots(state.ca)) == 2
    unconfirmed = plan(state, NOW + 30 * DAY, settings, Observations(bundle=None))
    assert _actions(unconfirmed) == []
    assert "confirm" in _wait(unconfirmed).reason
    one_root = bundle_hash(render_pem(trusted_roots(steady_state(settings).ca)))
    stale = plan(state, NOW, settings, Observations(bundle=one_root))
    assert _actions(stale) == []
    confirmed = plan(state, NOW, settings, Observations(bundle=_two_root_hash(state)))
    assert _actions(confirmed) == [ConfirmBundle(_two_root_hash(state))]


def test_linkerd_is_rolled_after_confirmation_then_the_delay_runs(
    make_settings: MakeSettings,
) -> None:
    settings = make_settings({"rotation": {"propagation_delay": "10m"}})
    base = steady_state(settings)
    confirmed = with_next_root(base, Phase.PROPAGATING, confirmed_at=NOW)
    cluster = Observations(cluster=True, pending_pods=())
    # Not in the confirmation's second: a Pod started then would count as started before.
    same_second = plan(confirmed, NOW + timedelta(microseconds=999_999), settings, cluster)
    assert _actions(same_second) == []
    assert _wait(same_second).until == NOW.replace(microsecond=0) + timedelta(seconds=1)
    # The restartedAt is journaled first, then Linkerd is rolled with it.
    later = NOW.replace(microsecond=0) + timedelta(seconds=1)
    assert _actions(plan(confirmed, later, settings, cluster)) == [NoteRestart("control-plane")]
    noted = with_next_root(base, Phase.PROPAGATING, confirmed_at=NOW, restart_at=NOW)
    assert _actions(plan(noted, NOW, settings, cluster)) == [RestartLinkerd("control-plane")]
    restarted = with_next_root(base, Phase.PROPAGATING, confirmed_at=NOW, restarted=True)
    waiting = plan(restarted, NOW + timedelta(minutes=9), settings, cluster)
    assert _actions(waiting) == []
    assert _wait(waiting).until == NOW + timedelta(minutes=10)
    ready = plan(restarted, NOW + timedelta(minutes=10), settings, cluster)
    assert _actions(ready) == [Activate("kong-4")]


def test_restart_all_and_none(make_settings: MakeSettings) -> None:
    cluster = Observations(cluster=True, pending_pods=())
    for restart, want in (("all", [RestartLinkerd("all")]), ("none", [])):
        settings = make_settings({"linkerd": {"restart": restart}})
        state = with_next_root(
            steady_state(settings), Phase.PROPAGATING, confirmed_at=NOW, restart_at=NOW
        )
        assert _actions(plan(state, NOW, settings, cluster)) == want


def test_the_pods_gate_holds_activation_while_a_pod_lags(make_settings: MakeSettings) -> None:
    settings = make_settings({"linkerd": {"gate": "pods"}})
    state = with_next_root(
        steady_state(settings), Phase.PROPAGATING, confirmed_at=NOW, restarted=True
    )
    later = NOW + timedelta(hours=1)
    unknown = plan(state, later, settings, Observations(cluster=True, pending_pods=None))
    assert _actions(unknown) == []
    lagging = Observations(cluster=True, pending_pods=("shop/web-1",))
    closed = plan(state, later, settings, lagging)
    assert _actions(closed) == []
    assert "shop/web-1" in _wait(closed).reason
    opened = plan(state, later, settings, Observations(cluster=True, pending_pods=()))
    assert _actions(opened) == [Activate("kong-4")]
    # gate: time ignores the pods once the delay is over.
    timed = make_settings({"linkerd": {"gate": "time"}})
    assert _actions(plan(state, later, timed, lagging)) == [Activate("kong-4")]


def test_without_a_cluster_there_is_nothing_to_roll_or_gate(make_settings: MakeSettings) -> None:
    settings = make_settings()
    state = with_next_root(steady_state(settings), Phase.PROPAGATING, confirmed_at=NOW)
    files_only = Observations(cluster=False)
    assert _actions(plan(state, NOW + timedelta(hours=1), settings, files_only)) == [
        Activate("kong-4")
    ]


def test_renewals_go_on_under_the_old_root_while_propagating(make_settings: MakeSettings) -> None:
    settings = make_settings()
    state = with_next_root(steady_state(settings), Phase.PROPAGATING)
    steps = plan(state, NOW + timedelta(hours=40), settings)
    assert IssueLinkerdIssuer("due: 8h left") in steps  # signer root-1: not "signed by"


# --- activated, retiring -------------------------------------------------------------------


def _activated(settings: Settings, reissued: bool) -> State:
    """After activation: root-3 active with its intermediate kong-4; root-1 retiring."""
    old = steady_state(settings)
    new_key, new_root = self_signed_root("new")
    inter_key, inter = issue_profiled(
        Kind.KONG_INTERMEDIATE, Subject("kong"), new_key, new_root, timedelta(days=90)
    )
    record = replace(
        old.ca,
        serial=4,
        roots=(
            RootEntry("root-1", old.ca.roots[0].cert, RootRole.RETIRING),
            RootEntry("root-3", new_root, RootRole.ACTIVE, NOW),
        ),
        intermediates=(*old.ca.intermediates, IntermediateEntry("kong-4", inter, "root-3", NOW)),
        phase=Phase.ACTIVATED,
        rotation=Rotation(
            started_at=NOW,
            trigger="schedule",
            confirmed_at=NOW,
            activated_at=NOW,
            old_chain_until=NOW + 30 * DAY,
        ),
    )
    state = replace(old, ca=record)
    if not reissued:
        return state
    issuer_key, issuer = issue_profiled(
        Kind.LINKERD_ISSUER,
        Subject(settings.linkerd_issuer_common_name),
        new_key,
        new_root,
        timedelta(hours=48),
    )
    clients = {}
    for client in settings.kong.clients:
        key, cert = issue_profiled(
            Kind.KONG_CLIENT, client_subject(client), inter_key, inter, client.lifetime
        )
        clients[client.name] = IssuedEntry(cert, private_key_pem(key), "kong-4", (inter,), NOW)
    return replace(
        state,
        linkerd_issuer=IssuedEntry(issuer, private_key_pem(issuer_key), "root-3", (), NOW),
        kong_clients=clients,
    )


def test_activation_reissues_everything_under_the_new_root(make_settings: MakeSettings) -> None:
    settings = make_settings()
    steps = plan(_activated(settings, reissued=False), NOW, settings)
    assert [s for s in steps if not isinstance(s, Wait)] == [
        IssueLinkerdIssuer("signed by root-1, not root-3"),
        IssueKongClient("payments", "signed by kong-2, not kong-4"),
    ]
    assert "re-issuing" in _wait(steps).reason
    done = plan(_activated(settings, reissued=True), NOW, settings)
    assert _actions(done) == [StartRetiring()]


def test_a_client_that_fails_to_reissue_holds_retirement(make_settings: MakeSettings) -> None:
    settings = make_settings()
    state = _activated(settings, reissued=True)
    old = steady_state(settings).kong_clients["payments"]
    lagging = replace(state, kong_clients={"payments": old})
    assert not any(isinstance(s, StartRetiring) for s in plan(lagging, NOW, settings))


def test_retirement_waits_for_retire_after(make_settings: MakeSettings) -> None:
    settings = make_settings()
    state = _activated(settings, reissued=True)
    rotation = state.ca.rotation
    assert rotation is not None
    until = NOW + 31 * DAY
    retiring = replace(
        state,
        ca=replace(state.ca, phase=Phase.RETIRING, rotation=replace(rotation, retire_after=until)),
    )
    before = plan(retiring, until - timedelta(seconds=1), settings)
    assert _actions(before) == [] and _wait(before).until == until
    assert _actions(plan(retiring, until, settings)) == [Retire()]
    # The bundle still holds both roots while retiring.
    assert len(trusted_roots(retiring.ca)) == 2


def test_a_forced_retire_delay_says_the_old_chain_is_still_valid(
    make_settings: MakeSettings,
) -> None:
    """Retiring before the old chain expired (retire_delay shorter than it) is allowed,
    but the step says what is true rather than "nothing under the old root is valid"."""
    settings = make_settings({"rotation": {"retire_delay": "1m"}})
    state = _activated(settings, reissued=True)
    rotation = state.ca.rotation
    assert rotation is not None and rotation.old_chain_until is not None
    at = NOW + timedelta(minutes=1)
    retiring = replace(
        state,
        ca=replace(state.ca, phase=Phase.RETIRING, rotation=replace(rotation, retire_after=at)),
    )
    (step,) = _actions(plan(retiring, at, settings))
    assert isinstance(step, Retire)
    assert step.reason == (
        "rotation.retire_delay elapsed; certificates issued under the old root stay valid "
        f"until {rotation.old_chain_until:%Y-%m-%dT%H:%M:%SZ} but no verifier trusts them "
        "from now"
    )


def test_retire_after_auto_covers_everything_under_the_old_chain(
    make_settings: MakeSettings,
) -> None:
    settings = make_settings({"rotation": {"clock_skew": "5m"}})
    state = _activated(settings, reissued=True)
    # auto: the latest not-after published under the old chain, plus the skew.
    assert retire_after(state, NOW, settings) == NOW + 30 * DAY + timedelta(minutes=5)
    explicit = make_settings({"rotation": {"retire_delay": "48h"}})
    assert retire_after(state, NOW + DAY, explicit) == NOW + timedelta(hours=48)


# --- manual operations ---------------------------------------------------------------------


def test_manual_requests_during_a_rotation(make_settings: MakeSettings) -> None:
    settings = make_settings()
    state = with_next_root(steady_state(settings), Phase.PROPAGATING)
    root_op = Operation("r", "trust-anchor", "", NOW)
    issuer_op = Operation("i", "linkerd-issuer", "", NOW + timedelta(seconds=1))
    queued = replace(state, ca=state.ca.with_operation(root_op).with_operation(issuer_op))
    steps = plan(queued, NOW, settings)
    assert FinishOperation("r", False, "a root rotation was already in progress") in steps
    assert StartOperation("i") in steps
    assert not any(isinstance(s, PrepareRoot) for s in steps)
    running = replace(state, ca=state.ca.with_operation(replace(issuer_op, state=OpState.RUNNING)))
    steps = plan(running, NOW + timedelta(seconds=2), settings)
    # The issuer is re-issued now, still under the active (old) root.
    assert IssueLinkerdIssuer("manual rotation") in steps
    assert not any(isinstance(s, IssueKongClient) for s in steps)


def test_an_operation_finishes_once_its_targets_are_reissued(make_settings: MakeSettings) -> None:
    settings = make_settings()
    state = steady_state(settings)
    op = Operation("k", "kong", "", NOW - DAY, OpState.RUNNING)
    record = state.ca.with_operation(op)
    old = replace(state, ca=record)
    old_client = old.kong_clients["payments"]
    stale = replace(old, kong_clients={"payments": replace(old_client, issued_at=NOW - 2 * DAY)})
    assert IssueKongClient("payments", "manual rotation") in plan(stale, NOW, settings)
    fresh = replace(old, kong_clients={"payments": replace(old_client, issued_at=NOW)})
    steps = plan(fresh, NOW, settings)
    assert FinishOperation("k", True, "re-issued") in steps
    assert not any(isinstance(s, IssueKongClient) for s in steps)


# --- retiring on proof (an emergency) ------------------------------------------------------


def _proving(state: State, phase: Phase = Phase.ACTIVATED, **changes: object) -> State:
    """``state`` (after activation) retiring on proof, as an emergency; ``changes`` to its
    rotation record, whose confirmation and roll start afresh at activation."""
    rotation = state.ca.rotation
    assert rotation is not None
    proving = replace(rotation.next_stage(), emergency=True, retire_on="proof", **changes)  # type: ignore[arg-type]
    return replace(state, ca=replace(state.ca, phase=phase, rotation=proving))


def test_an_emergency_rolls_the_data_plane_and_gates_on_pods_whatever_is_configured(
    make_settings: MakeSettings,
) -> None:
    linkerd = {"restart": "none", "gate": "time", "emergency_restart": "all"}
    settings = make_settings({"linkerd": linkerd})
    state = with_next_root(
        steady_state(settings),
        Phase.PROPAGATING,
        confirmed_at=NOW,
        emergency=True,
        retire_on="proof",
    )
    later = NOW + timedelta(hours=1)
    lagging = Observations(cluster=True, pending_pods=("shop/web-1",))
    assert _actions(plan(state, later, settings, lagging)) == [NoteRestart("all")]
    rolled = with_next_root(
        steady_state(settings),
        Phase.PROPAGATING,
        confirmed_at=NOW,
        restarted=True,
        emergency=True,
        retire_on="proof",
    )
    assert _actions(plan(rolled, later, settings, lagging)) == []
    assert "shop/web-1" in _wait(plan(rolled, later, settings, lagging)).reason
    # The propagation delay still bounds it (where nothing is gated).
    early = plan(rolled, NOW + timedelta(minutes=1), settings, Observations(cluster=True))
    assert _wait(early).reason == "propagation delay"
    # as-restart (the default): only what linkerd.restart says is rolled, here nothing;
    # the gate still waits for the Pods, which the operator restarts.
    default = make_settings({"linkerd": {"restart": "none", "gate": "time"}})
    assert default.linkerd.emergency_restart == "as-restart"
    unrolled = with_next_root(
        steady_state(default),
        Phase.PROPAGATING,
        confirmed_at=NOW,
        emergency=True,
        retire_on="proof",
    )
    assert _actions(plan(unrolled, later, default, lagging)) == []
    assert "shop/web-1" in _wait(plan(unrolled, later, default, lagging)).reason


def test_proof_waits_until_everything_reissued_is_published(make_settings: MakeSettings) -> None:
    settings = make_settings({"linkerd": {"confirm": "none"}})
    reissued = _activated(settings, reissued=True)
    bundle = Observations(bundle=_two_root_hash(reissued), bundle_at=NOW)
    proving = _proving(reissued)
    unpublished = replace(proving, ca=replace(proving.ca, published_at=NOW - DAY))
    steps = plan(unpublished, NOW, settings, bundle)
    assert _actions(steps) == []
    assert _wait(steps).reason == "publishing everything re-issued under the new root"
    published = replace(unpublished, ca=replace(unpublished.ca, published_at=NOW))
    (confirm,) = _actions(plan(published, NOW, settings, bundle))
    assert isinstance(confirm, ConfirmBundle) and confirm.bundle == _two_root_hash(reissued)


def test_proof_rolls_again_after_the_reissue_and_waits_for_every_pod(
    make_settings: MakeSettings,
) -> None:
    settings = make_settings({"linkerd": {"confirm": "none", "restart": "all"}})
    reissued = _activated(settings, reissued=True)
    published = replace(reissued, ca=replace(reissued.ca, published_at=NOW))
    later = NOW + timedelta(seconds=2)
    confirmed = _proving(published, confirmed_at=NOW)
    assert _actions(plan(confirmed, later, settings, Observations(cluster=True))) == [
        NoteRestart("all")
    ]
    rolled = _proving(published, confirmed_at=NOW, restart_at=NOW, restarted=True)
    assert gate_query(rolled, settings) == GateQuery(NOW, restarted=True)
    lagging = plan(rolled, later, settings, Observations(cluster=True, pending_pods=("a/b",)))
    assert _actions(lagging) == []
    assert _wait(lagging).reason == (
        "1 meshed pod(s) still run a proxy started before everything was re-issued: a/b"
    )
    opened = plan(rolled, later, settings, Observations(cluster=True, pending_pods=()))
    assert _actions(opened) == [StartRetiring()]
    # On files only there is nothing to roll: the confirmation after the re-issue is the proof.
    files = plan(confirmed, later, settings, Observations(cluster=False))
    assert _actions(files) == [StartRetiring()]


def test_retiring_on_proof_drops_the_old_root_then_rolls_and_gates_before_retiring(
    make_settings: MakeSettings,
) -> None:
    settings = make_settings({"linkerd": {"confirm": "none", "restart": "all"}})
    reissued = _activated(settings, reissued=True)
    retiring = _proving(reissued, Phase.RETIRING, retire_after=NOW)
    roots = trusted_roots(retiring.ca)
    assert [r.role for r in retiring.ca.roots if r.cert in roots] == [RootRole.ACTIVE]
    new_only = bundle_hash(render_pem(roots))
    later = NOW + timedelta(seconds=2)
    waiting = plan(retiring, later, settings, Observations(bundle=_two_root_hash(reissued)))
    assert (
        _wait(waiting).reason
        == "waiting for every publisher to confirm the bundle without the old root"
    )
    (confirm,) = _actions(plan(retiring, later, settings, Observations(bundle=new_only)))
    assert isinstance(confirm, ConfirmBundle) and confirm.bundle == new_only
    rolled = _proving(reissued, Phase.RETIRING, retire_after=NOW, confirmed_at=NOW, restarted=True)
    assert gate_query(rolled, settings) == GateQuery(NOW, restarted=False)
    lagging = plan(rolled, later, settings, Observations(cluster=True, pending_pods=("a/b",)))
    assert _wait(lagging).reason == "1 meshed pod(s) still trust the old root: a/b"
    done = plan(rolled, later, settings, Observations(cluster=True, pending_pods=()))
    assert _actions(done) == [Retire(reason=PROVEN_UNUSED)]


def test_a_scheduled_rotation_may_retire_on_proof(make_settings: MakeSettings) -> None:
    settings = make_settings({"rotation": {"retire": "proof"}, "linkerd": {"restart": "all"}})
    assert settings.rotation.retire == "proof"
    with pytest.raises(ConfigError, match=r"rotation\.retire: proof") as refused:
        make_settings({"rotation": {"retire": "proof"}, "linkerd": {"restart": "control-plane"}})
    assert "linkerd.restart" in str(refused.value)


# --- revoking a Kong client, and the CRLs -------------------------------------------------


def test_a_revocation_waits_for_the_new_certificate_to_be_published(
    make_settings: MakeSettings,
) -> None:
    settings = make_settings()
    state = steady_state(settings)
    op = Operation("r", "kong/payments", "leaked", NOW - DAY, OpState.RUNNING, revoke=True)
    client = state.kong_clients["payments"]
    reissued = replace(
        state,
        ca=state.ca.with_operation(op),
        kong_clients={"payments": replace(client, issued_at=NOW)},
    )
    unpublished = replace(reissued, ca=replace(reissued.ca, published_at=NOW - DAY))
    steps = plan(unpublished, NOW, settings)
    assert not any(isinstance(s, Revoke | FinishOperation) for s in steps)
    published = replace(reissued, ca=replace(reissued.ca, published_at=NOW))
    assert Revoke("r") in plan(published, NOW, settings)
    # Without revoke the same operation just finishes.
    plain = replace(published, ca=published.ca.with_operation(replace(op, revoke=False)))
    assert FinishOperation("r", True, "re-issued") in plan(plain, NOW, settings)


def test_the_crls_are_made_anew_halfway_and_when_the_bundle_s_cas_change(
    make_settings: MakeSettings,
) -> None:
    settings = make_settings()
    state = steady_state(settings)
    issuers = crl_issuers(state.ca)
    assert issuers == ("kong-2", "root-1")
    hour = timedelta(hours=1)
    crls = Crls("pem", issuers, NOW, NOW + 3 * DAY, fetched_at=NOW)
    current = replace(state, ca=replace(state.ca, crls=crls))
    assert not any(isinstance(s, RefreshCrls) for s in plan(current, NOW + DAY, settings))
    halfway = [s for s in plan(current, NOW + 36 * hour, settings)]
    assert any(isinstance(s, RefreshCrls) for s in halfway), halfway
    # Fetched when already old (made 55 h before, 17 h left): made anew well before the end.
    old = replace(crls, this_update=NOW - 55 * hour, next_update=NOW + 17 * hour)
    assert old.refresh_at == NOW + 8.5 * hour
    # A next root joins the bundle (propagating): its CRL is wanted at once.
    propagating = with_next_root(current, Phase.PROPAGATING)
    assert crl_issuers(propagating.ca) == ("kong-2", "root-1", "root-3")
    assert RefreshCrls("the CAs in the bundle changed") in plan(propagating, NOW, settings)
    # Nothing revoked yet: no CRLs to keep.
    assert not any(isinstance(s, RefreshCrls) for s in plan(state, NOW + 30 * DAY, settings))
