"""The engine over the real local anchor and directory publisher: passes, failures, resume."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from ca_daemon.anchor.base import CA
from ca_daemon.anchor.local import LocalAnchor, load_or_create_passphrase
from ca_daemon.config.settings import Settings
from ca_daemon.errors import AnchorError
from ca_daemon.journal.open import file_journal
from ca_daemon.model.world import desired_world
from ca_daemon.pki.bundle import stable_id
from ca_daemon.pki.profiles import Kind, Subject, Validity
from ca_daemon.publish.directory import DirectoryPublisher
from ca_daemon.report.verify import verify_directory
from ca_daemon.rotation import engine as engine_module
from ca_daemon.rotation.engine import Engine
from tests.support.clock import NOW
from tests.support.journal_files import credential_docs, shard_files
from tests.support.pki import self_signed_root
from tests.support.published_files import documented_files
from tests.support.settings import two_clients

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return two_clients(tmp_path)


def _engine(settings: Settings, anchor_cls: type[LocalAnchor] = LocalAnchor) -> Engine:
    data = settings.anchor.local.dir
    passphrase = load_or_create_passphrase(settings.anchor.local.effective_passphrase_file)
    return Engine(
        settings,
        anchor_cls(data, passphrase),
        file_journal(settings, passphrase),
        [DirectoryPublisher(settings.publish_directory)],
    )


def _snapshot(directory: Path) -> dict[str, bytes]:
    """Every file reachable through the documented paths (they are symlinks into ..data)."""
    return {rel: (directory / rel).read_bytes() for rel in documented_files(directory)}


def test_first_pass_issues_everything_second_does_nothing(settings: Settings) -> None:
    engine = _engine(settings)
    first = engine.reconcile(now=NOW)
    assert first.ok, first.errors
    assert [(s.kind.value, s.name) for s in first.steps] == [
        ("trust-anchor", "root-1"),
        ("kong-intermediate", "kong-2"),
        ("linkerd-issuer", "linkerd-identity-issuer"),
        ("kong-client", "payments"),
        ("kong-client", "orders"),
    ]
    out = settings.publish_directory
    assert verify_directory(out, NOW).ok
    before = _snapshot(out)
    state_before = (settings.anchor.local.dir / "state.json").read_bytes()

    second = _engine(settings).reconcile(now=NOW + timedelta(hours=1))
    assert second.ok and second.steps == []
    assert second.published == {f"directory {out}": []}
    assert _snapshot(out) == before
    assert (settings.anchor.local.dir / "state.json").read_bytes() == state_before


def test_a_steady_pass_plans_once_and_unseals_no_key(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing due, nothing drifted: one plan (outside a root rotation a publish observes
    nothing it reads), and the keys stay sealed (the published ones match by digest)."""
    assert _engine(settings).reconcile(now=NOW).ok
    planned: list[int] = []
    real_plan = engine_module.plan

    def counting_plan(*args: Any, **kwargs: Any) -> Any:
        planned.append(1)
        return real_plan(*args, **kwargs)

    monkeypatch.setattr(engine_module, "plan", counting_plan)
    engine = _engine(settings)  # as after a restart: the keys are read sealed
    unseal = engine.journal._unseal
    unsealed: list[bytes] = []

    def counting_unseal(sealed: bytes) -> bytes:
        unsealed.append(sealed)
        return unseal(sealed)

    engine.journal._unseal = counting_unseal
    steady = engine.reconcile(now=NOW + timedelta(hours=1))
    assert steady.ok and steady.steps == []
    assert len(planned) == 1
    assert len(unsealed) == 1  # the first load's check of the passphrase, of 3 keys
    # A key file deleted meanwhile: restored, unsealing that key alone.
    (settings.publish_directory / "kong/clients/orders/tls.key").unlink()
    repaired = engine.reconcile(now=NOW + timedelta(hours=2))
    assert repaired.published == {
        f"directory {settings.publish_directory}": ["kong/clients/orders/tls.key"]
    }
    assert len(unsealed) == 2


def test_state_files_are_private_and_hold_no_plain_key(settings: Settings) -> None:
    assert _engine(settings).reconcile(now=NOW).ok
    state_file = settings.anchor.local.dir / "state.json"
    data = settings.anchor.local.dir
    assert sorted(credential_docs(data)) == ["kong/orders", "kong/payments", "linkerd-issuer"]
    texts = []
    for path in [state_file, *shard_files(data)]:
        assert path.stat().st_mode & 0o777 == 0o600
        texts.append(path.read_text())
    text = "".join(texts)
    assert "-----BEGIN PRIVATE KEY-----" not in text
    assert text.count("-----BEGIN ENCRYPTED PRIVATE KEY-----") == 3  # issuer + 2 clients
    assert "PRIVATE KEY" not in state_file.read_text()  # the CA record holds no key at all
    for key_file in (settings.anchor.local.dir / "anchor").glob("*.key"):
        assert key_file.stat().st_mode & 0o777 == 0o600
        assert key_file.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")


class _FailingClients(LocalAnchor):
    def sign_client(self, *args: object, **kwargs: object) -> x509.Certificate:
        raise AnchorError("local anchor: signing refused (test)")


def test_failed_renewal_keeps_previous_credentials_published(settings: Settings) -> None:
    assert _engine(settings).reconcile(now=NOW).ok
    out = settings.publish_directory
    old_clients = {k: v for k, v in _snapshot(out).items() if k.startswith("kong/clients/")}
    assert len(old_clients) == 6  # two clients, three files each

    later = NOW + timedelta(days=21)  # clients and the issuer are due
    result = _engine(settings, _FailingClients).reconcile(now=later)
    assert not result.ok
    assert {e.split(":")[0] for e in result.errors} == {
        "kong-client payments",
        "kong-client orders",
    }
    now_files = _snapshot(out)
    assert {k: v for k, v in now_files.items() if k.startswith("kong/clients/")} == old_clients
    # What did not fail went ahead: the issuer was renewed and published.
    assert [s.kind for s in result.steps if s.ok] == [Kind.LINKERD_ISSUER]
    assert verify_directory(out, later).ok

    healed = _engine(settings).reconcile(now=later)
    assert healed.ok
    assert {s.name for s in healed.steps} == {"payments", "orders"}


class _BadIssuer(LocalAnchor):
    """Answers the issuer CSR with a leaf: the engine must refuse to publish it."""

    def sign_ca(
        self, root: CA, csr: x509.CertificateSigningRequest, subject: Subject, validity: Validity
    ) -> x509.Certificate:
        return self.sign_client(root, csr, Subject(subject.common_name, ("x.example",)), validity)


def test_unusable_certificate_from_the_anchor_is_not_published(settings: Settings) -> None:
    result = _engine(settings, _BadIssuer).reconcile(now=NOW)
    assert any(e.startswith("linkerd-issuer") and "not a CA" in e for e in result.errors)
    assert not (settings.publish_directory / "linkerd" / "tls.crt").exists()
    assert sorted(credential_docs(settings.anchor.local.dir)) == ["kong/orders", "kong/payments"]


class _CrashAfterRoot(LocalAnchor):
    def sign_ca(self, *args: object, **kwargs: object) -> x509.Certificate:
        raise AnchorError("crash (test)")

    def create_intermediate(self, *args: object, **kwargs: object) -> CA:
        raise AnchorError("crash (test)")


def test_resume_after_partial_pass_keeps_the_root(settings: Settings) -> None:
    partial = _engine(settings, _CrashAfterRoot).reconcile(now=NOW)
    assert [s.kind for s in partial.steps if s.ok] == [Kind.TRUST_ANCHOR]
    root_before = (settings.anchor.local.dir / "anchor" / "root-1.crt").read_bytes()
    resumed = _engine(settings).reconcile(now=NOW)
    assert resumed.ok
    assert Kind.TRUST_ANCHOR not in {s.kind for s in resumed.steps}
    assert (settings.anchor.local.dir / "anchor" / "root-1.crt").read_bytes() == root_before
    assert verify_directory(settings.publish_directory, NOW).ok


def test_lost_journal_adopts_the_existing_root(settings: Settings) -> None:
    """Creating a CA is idempotent by name: a crash before the journal write leaves one root."""
    assert _engine(settings).reconcile(now=NOW).ok
    root_before = (settings.anchor.local.dir / "anchor" / "root-1.crt").read_bytes()
    (settings.anchor.local.dir / "state.json").unlink()
    again = _engine(settings).reconcile(now=NOW)
    assert again.ok
    assert sorted(p.name for p in (settings.anchor.local.dir / "anchor").glob("root-*.crt")) == [
        "root-1.crt"
    ]
    assert (settings.anchor.local.dir / "anchor" / "root-1.crt").read_bytes() == root_before


def test_wrong_passphrase_is_a_clear_error(settings: Settings, tmp_path: Path) -> None:
    assert _engine(settings).reconcile(now=NOW).ok
    settings.anchor.local.effective_passphrase_file.write_text("not-the-passphrase\n")
    result = _engine(settings).reconcile(now=NOW)
    assert not result.ok
    assert any("wrong passphrase or corrupt key" in e for e in result.errors)


def test_removed_client_is_unpublished(settings: Settings, tmp_path: Path) -> None:
    assert _engine(settings).reconcile(now=NOW).ok
    fewer = settings.model_copy(
        update={"kong": settings.kong.model_copy(update={"clients": settings.kong.clients[:1]})}
    )
    result = _engine(fewer).reconcile(now=NOW)
    assert result.ok
    assert not (settings.publish_directory / "kong" / "clients" / "orders").exists()
    assert (settings.publish_directory / "kong" / "clients" / "payments" / "tls.crt").exists()


def test_metrics_follow_the_pass(settings: Settings) -> None:
    from ca_daemon.service.metrics import Metrics

    metrics = Metrics()
    result = _engine(settings).reconcile(now=NOW)
    metrics.observe(result, settings, NOW)
    value = metrics.registry.get_sample_value
    assert value("ca_daemon_anchor_up") == 1
    assert value("ca_daemon_trust_bundle_roots") == 1
    assert value("ca_daemon_root_rotation_phase", {"phase": "steady"}) == 1
    assert value("ca_daemon_root_rotation_phase", {"phase": "propagating"}) == 0
    labels = {"kind": "kong-client", "trigger": "schedule", "result": "success"}
    assert value("ca_daemon_rotations_total", labels) == 2
    issuer = {"kind": "linkerd-issuer", "name": "linkerd-identity-issuer", "state": "active"}
    issuer_cert = result.state.linkerd_issuer.cert  # type: ignore[union-attr]
    assert value("ca_daemon_certificate_not_after_timestamp_seconds", issuer) == (
        issuer_cert.not_valid_after_utc.timestamp()
    )
    when = {"kind": "kong-client", "name": "payments"}
    assert value("ca_daemon_last_rotation_success_timestamp_seconds", when) == NOW.timestamp()
    assert value("ca_daemon_next_rotation_timestamp_seconds", when) is not None
    assert value("ca_daemon_build_info", {"version": "0.1.0"}) == 1

    failing = _engine(settings, _FailingClients).reconcile(now=NOW + timedelta(days=21))
    metrics.observe(failing, settings, NOW + timedelta(days=21))
    labels["result"] = "failure"
    assert value("ca_daemon_rotations_total", labels) == 2
    assert value("ca_daemon_last_rotation_success_timestamp_seconds", when) == NOW.timestamp()


def test_directory_follows_root_retirement(settings: Settings) -> None:

    result = _engine(settings).reconcile(now=NOW)
    assert result.state is not None
    world = desired_world(result.state, settings)
    (old,) = world.roots
    _, new = self_signed_root("next")
    publisher = DirectoryPublisher(settings.publish_directory)
    ca_dir = settings.publish_directory / "kong" / "ca"
    publisher.publish(replace(world, roots=(old, new)))
    assert {p.stem for p in ca_dir.glob("*.pem")} == {stable_id(old), stable_id(new)}
    assert (settings.publish_directory / "trust-bundle.pem").read_text().count("BEGIN") == 2
    report = publisher.publish(replace(world, roots=(new,)))
    assert f"kong/ca/{stable_id(old)}.pem" in report.changed
    assert {p.stem for p in ca_dir.glob("*.pem")} == {stable_id(new)}


def test_a_request_journaled_after_the_pass_clock_is_carried_out_once(settings: Settings) -> None:
    """A request saved a moment after the pass read its clock (or before a clock step
    back) is re-issued once, not once per round until the pass gives up."""
    engine = _engine(settings)
    assert engine.reconcile(now=NOW).ok
    later = NOW + timedelta(hours=1)
    op = engine.request_rotation("kong", "test", now=later + timedelta(milliseconds=5))
    result = engine.reconcile(now=later)
    assert result.ok, result.errors
    issued = [s.name for s in result.steps if s.action == "IssueKongClient"]
    assert sorted(issued) == ["orders", "payments"]
    record, _ = engine.journal.load_ca()
    done = record.operation(op)
    assert done is not None and done.state.value == "succeeded"
