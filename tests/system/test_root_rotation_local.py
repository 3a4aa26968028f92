"""A whole root rotation on the embedded default's parts, on a simulated clock.

Local anchor, file journal, directory publisher: the clock moves an hour per pass
through a scheduled rotation, a manual one and the retirement of both old roots.
After every publish the invariants are checked on the files as published and
Linkerd's validation helper judges the issuer against the bundle.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import yaml

from ca_daemon.anchor.local import LocalAnchor, load_or_create_passphrase
from ca_daemon.config.loading import load_settings
from ca_daemon.config.settings import Settings
from ca_daemon.journal.open import file_journal
from ca_daemon.model.state import OpState, Phase
from ca_daemon.pki.bundle import fingerprint, parse_pem_certificates
from ca_daemon.pki.chain import verify_ca_under_roots, verify_client_chain
from ca_daemon.publish.directory import DirectoryPublisher
from ca_daemon.report.verify import verify_directory
from ca_daemon.rotation.engine import Engine
from ca_daemon.rotation.requests import RotationInProgress, UnknownTarget
from ca_daemon.service.metrics import Metrics
from tests.support.invariants import InvariantChecker, read_directory
from tests.support.rotation_configs import T0, short_lifetimes
from tests.support.rotation_harness import CheckedPublisher, Clock, LinkerdView
from tests.support.servers.linkerd import LinkerdCheck

pytestmark = pytest.mark.integration

HOUR = timedelta(hours=1)
ROTATION_STEPS = [
    "PrepareRoot",
    "Propagate",
    "ConfirmBundle",
    "Activate",
    "StartRetiring",
    "Retire",
]


def _settings(tmp_path: Path) -> Settings:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(short_lifetimes(tmp_path)))
    return load_settings(path)


def _engine(
    settings: Settings, clock: Clock, linkerd_check: LinkerdCheck
) -> tuple[Engine, CheckedPublisher]:
    data = settings.anchor.local.dir
    out = settings.publish_directory
    passphrase = load_or_create_passphrase(settings.anchor.local.effective_passphrase_file)

    def linkerd_view() -> LinkerdView:
        return LinkerdView(
            (out / "linkerd" / "ca.crt").read_bytes(),
            (out / "linkerd" / "tls.crt").read_bytes(),
            (out / "linkerd" / "tls.key").read_bytes(),
        )

    checked = CheckedPublisher(
        DirectoryPublisher(out),
        clock,
        InvariantChecker(settings.rotation.propagation_delay, settings.rotation.clock_skew),
        lambda: read_directory(out),
        linkerd_view,
        linkerd_check,
    )
    engine = Engine(
        settings,
        LocalAnchor(data, passphrase),
        file_journal(settings, passphrase),
        [checked],
        clock=clock,
    )
    checked.on_proof = lambda: _retiring_on_proof(engine)
    return engine, checked


def _retiring_on_proof(engine: Engine) -> bool:
    record, _ = engine.journal.load_ca()
    return record.rotation is not None and record.rotation.proof


def _bundle_fingerprints(out: Path) -> list[str]:
    pem = (out / "trust-bundle.pem").read_bytes()
    return [fingerprint(c) for c in parse_pem_certificates(pem)]


def test_scheduled_and_manual_root_rotations_keep_every_invariant(
    tmp_path: Path, linkerd_check: LinkerdCheck
) -> None:
    settings = _settings(tmp_path)
    clock = Clock(T0)
    engine, checked = _engine(settings, clock, linkerd_check)
    out = settings.publish_directory
    actions: list[str] = []
    phases: list[Phase] = []
    bundle_sizes: list[int] = []
    operation = None
    metrics = Metrics()
    value = metrics.registry.get_sample_value
    for hour in range(0, 300):
        clock.now = T0 + hour * HOUR
        if hour == 200:  # a manual rotation of the second root, well before it is due
            operation = engine.request_rotation("trust-anchor", "drill")
            assert engine.request_rotation("trust-anchor", "again") == operation  # coalesced
        result = engine.reconcile()
        assert result.ok, (clock.now, result.errors)
        assert result.state is not None
        metrics.observe(result, settings, clock.now)
        actions += [s.action for s in result.steps if s.action in ROTATION_STEPS]
        phases.append(result.state.ca.phase)
        bundle_sizes.append(len(_bundle_fingerprints(out)))
        if hour == 150:  # mid-rotation a root request conflicts, others are fine
            assert result.state.ca.phase is Phase.RETIRING
            assert value("ca_daemon_root_rotation_phase", {"phase": "retiring"}) == 1
            assert value("ca_daemon_trust_bundle_roots") == 2
            retiring = {"kind": "trust-anchor", "name": "root-1", "state": "retiring"}
            assert value("ca_daemon_certificate_not_after_timestamp_seconds", retiring)
            with pytest.raises(RotationInProgress):
                engine.request_rotation("all", "too early")

    # Root 1 was due at 120h: a scheduled rotation; root 2 was rotated by hand at 200h.
    assert actions == ROTATION_STEPS * 2, actions
    assert phases[0] is Phase.STEADY and phases[-1] is Phase.STEADY
    assert {Phase.PROPAGATING, Phase.RETIRING} <= set(phases)
    # One root, then two while rotating, then one again; never zero, never three.
    assert set(bundle_sizes) == {1, 2}
    assert bundle_sizes[0] == 1 and bundle_sizes[-1] == 1
    state = engine.journal.load().state
    (final,) = state.ca.roots
    assert final.ref == "root-7"  # root-1, then root-4 (scheduled), then root-7 (manual)
    assert _bundle_fingerprints(out) == [fingerprint(final.cert)]
    op = state.ca.operation(operation or "")
    assert op is not None and op.state is OpState.SUCCEEDED
    assert op.result == f"rotated to {final.ref}"
    # Every old root stays in the anchor; three roots were made in all, no extra one.
    anchor_roots = sorted(p.stem for p in (settings.anchor.local.dir / "anchor").glob("root-*.crt"))
    assert len(anchor_roots) == 3, anchor_roots
    # Kong CA files follow the bundle: only the final root is left.
    assert len(list((out / "kong" / "ca").glob("*.pem"))) == 1
    assert verify_directory(out, clock.now).ok
    # Roots issued: root-1 and root-4 on schedule, root-7 by hand; phase changes count nothing.
    issued = "ca_daemon_rotations_total"
    roots = {"kind": "trust-anchor", "result": "success"}
    assert value(issued, {**roots, "trigger": "schedule"}) == 2
    assert value(issued, {**roots, "trigger": "manual"}) == 1
    assert value("ca_daemon_root_rotation_phase", {"phase": "steady"}) == 1
    assert value("ca_daemon_operations", {"state": "succeeded"}) == 1
    assert value("ca_daemon_trust_bundle_roots") == 1
    assert checked.checks >= 300 and len(checked.linkerd_outputs) >= 300


def test_a_publisher_that_cannot_confirm_holds_the_rotation(
    tmp_path: Path, linkerd_check: LinkerdCheck
) -> None:
    settings = _settings(tmp_path)
    clock = Clock(T0)
    engine, _ = _engine(settings, clock, linkerd_check)
    assert engine.reconcile().ok

    class Refusing:
        description = "refusing"

        def publish(self, world: object) -> object:
            from ca_daemon.publish.base import PublishReport

            return PublishReport("refusing", errors={"configmap/x/bundle": "forbidden (test)"})

    engine.publishers.append(Refusing())  # type: ignore[arg-type]
    clock.now = T0 + 130 * HOUR  # the root is due
    for _ in range(5):
        result = engine.reconcile()
        clock.now += 10 * HOUR
        assert result.state is not None
        assert result.state.ca.phase is Phase.PROPAGATING
        assert result.state.ca.rotation is not None
        assert result.state.ca.rotation.confirmed_at is None
        assert result.waiting and "confirm" in result.waiting
    engine.publishers.pop()
    result = engine.reconcile()
    assert result.state is not None and result.state.ca.rotation is not None
    assert result.state.ca.rotation.confirmed_at == clock.now


def test_an_emergency_drill_on_files_ends_in_about_the_propagation_delay(
    tmp_path: Path, linkerd_check: LinkerdCheck
) -> None:
    """On the embedded default (no cluster to roll) proof is every credential replaced and
    republished: the old root leaves every file minutes after the request, not when
    everything it signed has expired (days here), and what the leaked chain signed no
    longer verifies anywhere."""
    settings = _settings(tmp_path)
    clock = Clock(T0)
    engine, checked = _engine(settings, clock, linkerd_check)
    out = settings.publish_directory
    assert engine.reconcile().ok
    before = read_directory(out)
    leaked_issuer, leaked_client = before.issuer, before.clients["payments"]
    assert leaked_issuer is not None
    with pytest.raises(UnknownTarget, match="an emergency applies to"):
        engine.request_rotation("kong", "leak", emergency=True)
    op_id = engine.request_rotation("trust-anchor", "issuer key leaked", emergency=True)
    with pytest.raises(RotationInProgress, match=op_id):
        engine.request_rotation("trust-anchor", "again", emergency=True)
    requested = clock.now
    metrics = Metrics()
    actions: list[str] = []
    stages: set[str] = set()
    while True:
        clock.now += settings.rotation.check_interval
        result = engine.reconcile()
        assert result.ok, (clock.now, result.errors)
        assert result.state is not None
        metrics.observe(result, settings, clock.now)
        actions += [s.action for s in result.steps if s.action in ROTATION_STEPS]
        rotation = result.state.ca.rotation
        if rotation is not None:
            assert rotation.emergency and rotation.retire_on == "proof"
            stages |= {k for k, v in _emergency_samples(metrics).items() if v == 1}
        op = result.state.ca.operation(op_id)
        assert op is not None
        if not op.open:
            break
        assert clock.now - requested < timedelta(hours=1), (result.waiting, actions)
    assert op.state is OpState.SUCCEEDED, op
    took = clock.now - requested
    # The propagation delay, then a check or two per stage: not the days to expiry.
    assert (
        settings.rotation.propagation_delay
        < took
        <= settings.rotation.propagation_delay + 5 * (settings.rotation.check_interval)
    ), took
    # Confirmed three times: the two-root bundle, again once re-issued, then the new one.
    assert actions == [
        "PrepareRoot",
        "Propagate",
        "ConfirmBundle",
        "Activate",
        "ConfirmBundle",
        "StartRetiring",
        "ConfirmBundle",
        "Retire",
    ], actions
    # The stages after activation need no wait on files: they end within the pass.
    assert "1" in stages, stages
    assert _emergency_samples(metrics) == {}
    after = read_directory(out)
    (root,) = engine.journal.load().state.ca.roots
    for where, roots in after.bundles.items():
        assert [fingerprint(r) for r in roots] == [fingerprint(root.cert)], where
        # What the leaked chain signed is valid for days still, and trusted nowhere.
        assert verify_ca_under_roots(leaked_issuer, list(roots), clock.now), where
        assert verify_client_chain(leaked_client[0], leaked_client[1:], list(roots), clock.now)
    assert leaked_issuer.not_valid_after_utc > clock.now + timedelta(hours=24)
    assert verify_directory(out, clock.now).ok
    assert checked.checks > 0 and checked.linkerd_outputs


def _emergency_samples(metrics: Metrics) -> dict[str, float]:
    return {
        s.labels["stage"]: s.value
        for family in metrics.registry.collect()
        if family.name == "ca_daemon_root_rotation_emergency"
        for s in family.samples
    }
