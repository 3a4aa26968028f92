"""plan() over the positions a state can be in, with time as a parameter."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta

import pytest
from cryptography import x509

from ca_daemon.config.settings import Settings
from ca_daemon.model.state import (
    State,
)
from ca_daemon.rotation.plan import client_subject, plan, renew_at
from ca_daemon.rotation.steps import (
    CreateRoot,
    DropKongClient,
    IssueKongClient,
    IssueKongIntermediate,
    IssueLinkerdIssuer,
)
from tests.support.clock import NOW
from tests.support.states import steady_state

pytestmark = pytest.mark.usefixtures("clean_env")

MakeSettings = Callable[..., Settings]


def test_empty_state_plans_the_whole_chain_in_order(make_settings: MakeSettings) -> None:
    steps = plan(State(), NOW, make_settings())
    assert steps == [
        CreateRoot("root-1", "no trust anchor yet"),
        IssueKongIntermediate("kong-2", "missing"),
        IssueLinkerdIssuer("missing"),
        IssueKongClient("payments", "missing"),
    ]


def test_disabled_parts_are_not_planned(make_settings: MakeSettings) -> None:
    settings = make_settings({"linkerd": {"enabled": False}, "kong": {"enabled": False}})
    assert plan(State(), NOW, settings) == [CreateRoot("root-1", "no trust anchor yet")]


def test_fresh_state_needs_nothing(make_settings: MakeSettings) -> None:
    settings = make_settings()
    assert plan(steady_state(settings), NOW, settings) == []
    assert plan(steady_state(settings), NOW + timedelta(hours=30), settings) == []


def test_issuer_is_renewed_once_rotate_before_is_reached(make_settings: MakeSettings) -> None:
    settings = make_settings()
    state = steady_state(settings)
    issuer = state.linkerd_issuer
    assert issuer is not None
    due = renew_at(issuer.cert, settings.linkerd.issuer.rotate_before, settings.rotation.jitter)
    # 48h lifetime, 16h before: due between 32h and 32h - 5% of 16h from issuance.
    assert NOW + timedelta(hours=31, minutes=12) <= due <= NOW + timedelta(hours=32)
    assert plan(state, due - timedelta(seconds=1), settings) == []
    steps = plan(state, due, settings)
    assert len(steps) == 1 and isinstance(steps[0], IssueLinkerdIssuer)
    assert steps[0].reason.startswith("due:")
    expired = plan(state, NOW + timedelta(hours=49), settings)
    assert IssueLinkerdIssuer("expired") in expired


def test_client_due_and_intermediate_due(make_settings: MakeSettings) -> None:
    settings = make_settings()
    state = steady_state(settings)
    at = NOW + timedelta(days=21)  # client: 720h lifetime, 240h before → due after 20 days
    kong_steps = [s for s in plan(state, at, settings) if not isinstance(s, IssueLinkerdIssuer)]
    assert [type(s) for s in kong_steps] == [IssueKongClient]
    at = NOW + timedelta(days=61)  # intermediate: 2160h, 720h before → due after 60 days
    steps = [s for s in plan(state, at, settings) if not isinstance(s, IssueLinkerdIssuer)]
    assert isinstance(steps[0], IssueKongIntermediate) and steps[0].ref == "kong-3"
    # Clients signed by the old intermediate follow it.
    assert IssueKongClient("payments", "signed by kong-2, not kong-3") in steps


def test_no_churn_when_capped_at_the_root(make_settings: MakeSettings) -> None:
    """An issuer already ending with its root cannot be improved: don't re-issue every tick."""
    settings = make_settings()
    state = steady_state(settings, root_days=1)  # root ends in 24h; issuer capped there
    assert state.linkerd_issuer is not None
    root = state.ca.active_root
    assert root is not None
    assert state.linkerd_issuer.cert.not_valid_after_utc == root.cert.not_valid_after_utc
    steps = plan(state, NOW + timedelta(hours=20), settings)
    assert not any(isinstance(s, IssueLinkerdIssuer) for s in steps)


def test_issuer_under_another_root_is_reissued(make_settings: MakeSettings) -> None:
    settings = make_settings()
    state = steady_state(settings)
    assert state.linkerd_issuer is not None
    moved = replace(state, linkerd_issuer=replace(state.linkerd_issuer, signer_ref="root-0"))
    assert plan(moved, NOW, settings) == [IssueLinkerdIssuer("signed by root-0, not root-1")]


def test_config_changes_reissue_and_drop(make_settings: MakeSettings) -> None:
    settings = make_settings()
    state = steady_state(settings)
    changed = make_settings(
        {
            "kong": {
                "clients": [
                    {
                        "name": "payments",
                        "common_name": "kong.payments.upstream",
                        "dns_names": ["other.example"],
                    },
                ]
            }
        }
    )
    assert plan(state, NOW, changed) == [
        IssueKongClient("payments", "subject changed in configuration")
    ]
    assert plan(state, NOW, make_settings({"kong": {"clients": []}})) == [
        DropKongClient("payments", "no longer configured")
    ]
    renamed = make_settings(trust_domain="example.org")
    assert IssueLinkerdIssuer("common name changed") in plan(state, NOW, renamed)


def test_jitter_is_stable_and_bounded(make_settings: MakeSettings) -> None:
    settings = make_settings()
    certs: list[x509.Certificate] = [steady_state(settings).kong_clients["payments"].cert]
    certs += [steady_state(settings).kong_clients["payments"].cert for _ in range(5)]
    before = timedelta(hours=240)
    times = [renew_at(c, before, 0.05) for c in certs]
    for cert, at in zip(certs, times, strict=True):
        assert renew_at(cert, before, 0.05) == at
        left = cert.not_valid_after_utc - at
        assert before <= left <= before * 1.05
    assert len(set(times)) > 1
    assert renew_at(certs[0], before, 0.0) == certs[0].not_valid_after_utc - before


def test_client_subject_adds_the_common_name_as_dns() -> None:
    from ca_daemon.config.settings import KongClient

    client = KongClient(name="a", common_name="kong.a.upstream", dns_names=["x.example"])
    assert client_subject(client).dns_names == ("x.example", "kong.a.upstream")
    odd = KongClient(name="b", common_name="Kong Client B", uris=["spiffe://td/b"])
    assert client_subject(odd).dns_names == ()
