"""The forecast: the real engine run forward on a simulated clock over a state in memory."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from ca_daemon.config.settings import Settings
from ca_daemon.model.state import State
from ca_daemon.report.forecast import add_parser, command, forecast
from ca_daemon.report.simulation import Event, simulate
from ca_daemon.rotation.plan import renew_at, root_due_at
from tests.support.clock import NOW
from tests.support.states import steady_state

pytestmark = pytest.mark.usefixtures("clean_env")

MakeSettings = Callable[..., Settings]
HOUR = timedelta(hours=1)
ROOT_PHASES = ["PrepareRoot", "Propagate", "ConfirmBundle", "Activate", "StartRetiring", "Retire"]


def _ceil(at: datetime) -> datetime:
    whole = at.replace(microsecond=0)
    return whole if whole == at else whole + timedelta(seconds=1)


def _short(
    make_settings: MakeSettings, client_lifetime: str = "100h", **rotation: object
) -> Settings:
    """Root due 36h after NOW (the root of steady_state(days=10) ends at NOW + 240h)."""
    clients = [
        {
            "name": name,
            "common_name": f"kong.{name}.upstream",
            "lifetime": client_lifetime,
            "rotate_before": "10h",
        }
        for name in ("payments", "orders")
    ]
    return make_settings(
        {
            "root": {"lifetime": "240h", "rotate_before": "204h"},
            "linkerd": {"issuer": {"lifetime": "48h", "rotate_before": "16h"}},
            "kong": {
                "intermediate": {"lifetime": "200h", "rotate_before": "50h"},
                "clients": clients,
            },
            "rotation": {"jitter": 0.1, "propagation_delay": "10m", "clock_skew": "5m", **rotation},
        }
    )


def _first(events: list[Event], action: str, name: str | None = None) -> Event:
    return next(e for e in events if e.action == action and (name is None or e.name == name))


def test_renewals_and_every_root_phase_at_their_dates(make_settings: MakeSettings) -> None:
    settings = _short(make_settings, client_lifetime="30h")
    state = steady_state(settings, root_days=10)
    jitter = settings.rotation.jitter
    events = forecast(state, settings, NOW, NOW + 100 * HOUR)

    # Each credential from the journal renews exactly at its renew_at, jitter included.
    issuer = state.linkerd_issuer
    assert issuer is not None
    issuer_due = _ceil(renew_at(issuer.cert, 16 * HOUR, jitter))
    assert issuer_due != _ceil(renew_at(issuer.cert, 16 * HOUR, 0.0))  # the jitter matters
    renewed = _first(events, "IssueLinkerdIssuer")
    assert (renewed.at, renewed.kind, renewed.exact) == (issuer_due, "linkerd-issuer", True)
    assert renewed.reason.startswith("due: ")
    for name, entry in state.kong_clients.items():
        client = _first(events, "IssueKongClient", name)
        assert client.at == _ceil(renew_at(entry.cert, 10 * HOUR, jitter)), name
        assert (client.kind, client.exact) == ("kong-client", True)
        assert client.reason == "due: 10h left"

    # The root rotation: prepared when due, the bundle confirmed at once (every publisher
    # confirms), activated after the propagation delay, retired when what the old chain
    # published last (the issuer renewed above, 48h) has expired, plus the clock skew.
    phases = [e for e in events if e.action in ROOT_PHASES][:6]
    assert [e.action for e in phases] == ROOT_PHASES
    due = root_due_at(state.ca.roots[0].cert, settings)
    assert due == NOW + 36 * HOUR
    prepared, propagated, confirmed, activated, retiring, retired = phases
    assert prepared.name == "root-3" and prepared.reason.startswith("due: ")
    assert prepared.at == propagated.at == confirmed.at == due
    assert activated.at - confirmed.at == settings.rotation.propagation_delay
    assert retiring.at == activated.at
    assert retired.at == renewed.at + 48 * HOUR + settings.rotation.clock_skew
    assert all(e.exact for e in phases)
    # Everything is re-issued under the new root in the pass that activates it.
    reissued = [e for e in events if e.at == activated.at and e.reason.startswith("signed by")]
    assert {e.name for e in reissued} >= {"payments", "orders"}
    # After that, renewals of certificates the forecast itself issued carry an unknown
    # jitter: shown, but not as exact.
    later = [
        e
        for e in events
        if e.at > activated.at and e.reason.startswith("due") and e.kind == "kong-client"
    ]
    assert later and not any(e.exact for e in later)


def test_an_empty_state_forecasts_the_bootstrap_at_start(make_settings: MakeSettings) -> None:
    settings = _short(make_settings)
    events = forecast(State(), settings, NOW, NOW + HOUR)
    assert [(e.at, e.action) for e in events] == [
        (NOW, "CreateRoot"),
        (NOW, "IssueKongIntermediate"),
        (NOW, "IssueLinkerdIssuer"),
        (NOW, "IssueKongClient"),
        (NOW, "IssueKongClient"),
    ]


def test_loading_only_what_is_due_decides_as_loading_everything(
    make_settings: MakeSettings,
) -> None:
    """Without jitter every date is known, so the narrow passes can be compared with passes
    over the whole state across many renewals and two root rotations."""
    base = _short(make_settings, jitter=0.0)
    clients = [
        c.model_copy(update={"name": f"c{i}", "lifetime": (20 + 5 * i) * HOUR})
        for i, c in enumerate(base.kong.clients * 4)
    ]
    settings = base.model_copy(update={"kong": base.kong.model_copy(update={"clients": clients})})
    state = steady_state(settings, root_days=10)

    def run(narrow: bool) -> list[tuple[datetime, str, str, str]]:
        result = simulate(state, settings, NOW, NOW + 400 * HOUR, narrow=narrow)
        assert not result.errors and not result.truncated
        return sorted((e.at, e.action, e.name, e.reason) for e in result.events)

    narrow, full = run(True), run(False)
    assert narrow == full
    assert sum(1 for e in narrow if e[1] == "Retire") >= 2
    assert sum(1 for e in narrow if e[3].startswith("due")) > 40


def test_jittered_clients_are_grouped_but_exact_dates_are_not_moved(
    make_settings: MakeSettings,
) -> None:
    clients = [{"name": f"c{i:02d}", "common_name": f"kong.c{i:02d}.upstream"} for i in range(40)]
    settings = make_settings({"kong": {"clients": clients}, "linkerd": {"enabled": False}})
    state = steady_state(settings)
    start, year = NOW, NOW + 8760 * HOUR
    result = simulate(state, settings, start, year, resolution=HOUR)
    assert not result.truncated and not result.errors
    # 40 clients renewing every ~20 days is ~700 renewals; grouped, far fewer passes.
    renewals = [e for e in result.events if e.action == "IssueKongClient"]
    assert len(renewals) > 600
    assert result.passes < len(renewals) / 3
    # Each client's first renewal comes from its certificate in the journal: exact.
    for name, entry in state.kong_clients.items():
        first = _first(result.events, "IssueKongClient", name)
        assert first.exact
        assert first.at == _ceil(renew_at(entry.cert, 240 * HOUR, settings.rotation.jitter))


def test_the_pass_cap_is_said(make_settings: MakeSettings) -> None:
    settings = _short(make_settings)
    result = simulate(State(), settings, NOW, NOW + 8760 * HOUR, max_passes=3)
    assert result.truncated and result.passes == 3 and result.stopped_at is not None


def test_a_stop_ends_the_simulation_at_the_pass_that_records_it(
    make_settings: MakeSettings,
) -> None:
    """A dry run's path needs nothing after the retirement: with short lifetimes the
    renewals that follow it were most of the work (and made the API answer too late)."""
    settings = _short(make_settings, client_lifetime="30h")
    state = steady_state(settings, root_days=10)
    whole = simulate(state, settings, NOW, NOW + 400 * HOUR)
    retired = _first(whole.events, "Retire")
    stopped = simulate(state, settings, NOW, NOW + 400 * HOUR, stop=lambda e: e.action == "Retire")
    assert stopped.events[-1].at == retired.at
    assert not any(e.at > retired.at for e in stopped.events)

    # (Dates after a renewal the simulation signed itself vary run to run: compare the
    # root's phases, which are exact.)
    def phases(events: list[Event]) -> list[Event]:
        return [e for e in events if e.action in ROOT_PHASES and e.at <= retired.at]

    assert phases(stopped.events) == phases(whole.events)
    assert stopped.passes < whole.passes


def test_the_command_reads_the_journal_and_writes_nothing(
    make_settings: MakeSettings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = _short(make_settings)
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["plan", "--until", "48h", "--json"])
    assert command(args, settings) == 0
    assert "CreateRoot" in capsys.readouterr().out  # no state yet: the bootstrap
    assert not settings.anchor.local.dir.exists()  # not even the data directory
    with pytest.raises(SystemExit) as usage:
        parser.parse_args(["plan", "--until", "soon"])
    assert usage.value.code == 2


def test_the_command_filters_by_kind_and_target(
    make_settings: MakeSettings, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = _short(make_settings)
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))

    def events(*flags: str) -> list[dict[str, object]]:
        args = parser.parse_args(["plan", "--until", "96h", "--json", *flags])
        assert command(args, settings) == 0
        found: list[dict[str, object]] = json.loads(capsys.readouterr().out)
        return found

    everything = events()
    roots = events("--kind", "trust-anchor")
    payments = events("--target", "payments")
    assert roots and payments and len(roots) + len(payments) < len(everything)
    assert {e["kind"] for e in roots} == {"trust-anchor"}

    # Each run simulates anew (throwaway keys, so jittered dates may differ): compare what.
    def what(found: list[dict[str, object]]) -> list[tuple[object, ...]]:
        return [(e["kind"], e["name"], e["action"]) for e in found]

    assert what(roots) == what([e for e in everything if e["kind"] == "trust-anchor"])
    assert what(payments) == what([e for e in everything if e["name"] == "payments"])


def test_the_forecast_issues_without_a_key_or_csr_per_credential(
    make_settings: MakeSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A year at 5,000 clients is ~100,000 simulated renewals: each is one signature of
    the real order (signer, subject, validity), not a key, a CSR and checks as well."""
    from ca_daemon.rotation import renewals

    made: list[str] = []
    for name in ("generate_key", "build_csr"):
        real = getattr(renewals, name)
        monkeypatch.setattr(
            renewals, name, lambda *a, _n=name, _r=real, **k: made.append(_n) or _r(*a, **k)
        )
    settings = _short(make_settings, client_lifetime="30h")
    result = simulate(steady_state(settings, root_days=10), settings, NOW, NOW + 100 * HOUR)
    renewed = [e for e in result.events if e.action == "IssueKongClient"]
    assert len(renewed) > 4 and not result.errors
    assert made == []


def test_a_linked_cluster_s_issuer_is_forecast_on_its_own_schedule(
    make_settings: MakeSettings,
) -> None:
    """Narrow passes too (a root rotation in the window): east's issuer is renewed when
    due and re-issued at activation, never found missing."""
    base = _short(make_settings, jitter=0.0)
    east = {"issuer": {"lifetime": "30h", "rotate_before": "10h"}}
    settings = make_settings(
        {
            **base.model_dump(mode="json", include={"root", "linkerd", "kong", "rotation"}),
            "publish": {"kubernetes": {"enabled": True}},
            "linkerd": {"issuer": {"lifetime": "48h", "rotate_before": "16h"}, "gate": "time"},
            "clusters": [{"name": "west"}, {"name": "east", "kubeconfig": "/k", "linkerd": east}],
        }
    )
    state = steady_state(settings, root_days=10)
    for narrow in (True, False):
        result = simulate(state, settings, NOW, NOW + 100 * HOUR, narrow=narrow)
        assert not result.errors
        issued = [e for e in result.events if e.name == "linkerd-issuer/east"]
        assert [e.reason for e in issued][:1] == ["missing"]  # the first pass issues it
        assert not any(e.reason == "missing" for e in issued[1:]), issued
        assert any(e.reason.startswith("due") for e in issued), issued
        assert any(e.reason.startswith("signed by") for e in issued), issued
