"""status says until when each wait of a root rotation lasts, and that a retiring root's
next date is its retirement, not a rotation that will never come."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta

import pytest

from ca_daemon.config.settings import Settings
from ca_daemon.model.state import CaRecord, Phase, RootEntry, RootRole, Rotation, State
from ca_daemon.report.status import render_table, status_view, waiting_for
from tests.support.clock import NOW
from tests.support.pki import self_signed_root
from tests.support.states import steady_state

pytestmark = pytest.mark.usefixtures("clean_env")

MakeSettings = Callable[..., Settings]


def _new_root_active(state: State, phase: Phase, rotation: Rotation) -> CaRecord:
    """``state``'s CA record with its root retiring and root-3 active, in ``phase``."""
    _, new = self_signed_root("new")
    return replace(
        state.ca,
        serial=3,
        roots=(
            replace(state.ca.roots[0], role=RootRole.RETIRING),
            RootEntry("root-3", new, RootRole.ACTIVE, NOW),
        ),
        phase=phase,
        rotation=rotation,
    )


def test_the_propagation_wait_names_its_end(make_settings: MakeSettings) -> None:
    settings = make_settings({"rotation": {"propagation_delay": "10m"}})
    state = steady_state(settings)
    _, nxt = self_signed_root("next")
    record = replace(
        state.ca,
        serial=3,
        roots=(*state.ca.roots, RootEntry("root-3", nxt, RootRole.NEXT, NOW)),
        phase=Phase.PROPAGATING,
        rotation=Rotation(started_at=NOW, trigger="manual", confirmed_at=NOW),
    )
    propagating = replace(state, ca=record)
    assert waiting_for(propagating, settings, NOW) == (
        f"propagation delay (until {NOW + timedelta(minutes=10):%Y-%m-%dT%H:%M:%SZ})"
    )


def test_a_retiring_root_shows_when_it_retires(make_settings: MakeSettings) -> None:
    settings = make_settings()
    state = steady_state(settings)
    retire = NOW + timedelta(days=30)
    record = _new_root_active(
        state,
        Phase.RETIRING,
        Rotation(started_at=NOW, trigger="manual", activated_at=NOW, retire_after=retire),
    )
    retiring = replace(state, ca=record)
    view = status_view(retiring, settings, NOW, waiting=waiting_for(retiring, settings, NOW))
    old, _ = view["roots"]
    assert old["state"] == "retiring" and old["next_rotation"] == f"{retire:%Y-%m-%dT%H:%M:%SZ}"
    table = render_table(view)
    assert f"retires {retire:%Y-%m-%dT%H:%M:%SZ}" in table
    assert f"(until {retire:%Y-%m-%dT%H:%M:%SZ})" in table  # the wait says it too


def test_an_emergency_shows_as_such_with_its_stage_and_the_pods_it_waits_for(
    make_settings: MakeSettings,
) -> None:
    settings = make_settings()
    state = steady_state(settings)
    record = _new_root_active(
        state,
        Phase.ACTIVATED,
        Rotation(
            started_at=NOW,
            trigger="manual",
            emergency=True,
            retire_on="proof",
            activated_at=NOW,
            pending_pods=("shop/web-1",),
            pending_count=1,
        ),
    )
    view = status_view(replace(state, ca=record), settings, NOW)
    rotation = view["rotation"]
    assert rotation["emergency"] is True and rotation["retire_on"] == "proof"
    assert rotation["stage"].startswith("2 of 3: everything re-issued")
    table = render_table(view)
    assert "EMERGENCY root rotation" in table
    assert "pods it waits for (1): shop/web-1" in table
    # A scheduled rotation that retires on expiry has no stage.
    scheduled = replace(record, rotation=Rotation(started_at=NOW, trigger="schedule"))
    assert status_view(replace(state, ca=scheduled), settings, NOW)["rotation"]["stage"] is None
