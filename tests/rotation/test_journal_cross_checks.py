"""A journal that contradicts itself or the anchor is never answered by minting a root,
signing with a key that is not its certificate's, or publishing a root the anchor does
not hold: the pass stops, says why and how to recover, and what is published stays."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from ca_daemon.anchor.base import CA
from ca_daemon.anchor.local import LocalAnchor, load_or_create_passphrase
from ca_daemon.config.settings import Settings
from ca_daemon.journal.open import file_journal
from ca_daemon.model.state import CaRecord, RootEntry, RootRole, State
from ca_daemon.model.world import TrustWorld
from ca_daemon.pki.keys import PrivateKey, generate_key, private_key_pem
from ca_daemon.pki.profiles import Subject, capped_validity
from ca_daemon.publish.base import PublishReport
from ca_daemon.publish.directory import DirectoryPublisher
from ca_daemon.rotation.checks import journal_problems
from ca_daemon.rotation.engine import Engine
from ca_daemon.rotation.plan import plan
from ca_daemon.rotation.steps import CreateRoot, Refuse
from tests.support.cli import ca_daemon
from tests.support.clock import NOW
from tests.support.pki import self_signed_root
from tests.support.published_files import documented_files
from tests.support.settings import two_clients

pytestmark = pytest.mark.usefixtures("clean_env")


class CountingAnchor(LocalAnchor):
    listed = 0

    def existing_cas(self) -> list[CA]:
        CountingAnchor.listed += 1
        return super().existing_cas()


def _engine(settings: Settings, anchor_cls: type[LocalAnchor] = LocalAnchor) -> Engine:
    passphrase = load_or_create_passphrase(settings.anchor.local.effective_passphrase_file)
    return Engine(
        settings,
        anchor_cls(settings.anchor.local.dir, passphrase),
        file_journal(settings, passphrase),
        [DirectoryPublisher(settings.publish_directory)],
    )


def _published(settings: Settings) -> dict[str, bytes]:
    out = settings.publish_directory
    return {rel: (out / rel).read_bytes() for rel in documented_files(out)}


def _edit_ca(settings: Settings, edit: Callable[[CaRecord], CaRecord]) -> None:
    passphrase = load_or_create_passphrase(settings.anchor.local.effective_passphrase_file)
    journal = file_journal(settings, passphrase)
    record, version = journal.load_ca()
    journal.save_ca(edit(record), version)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    settings = two_clients(tmp_path)
    assert _engine(settings).reconcile(now=NOW).ok
    return settings


def _refused(settings: Settings, expect: str) -> None:
    """A pass (as late as the issuer's renewal) is refused naming ``expect``; nothing is
    created in the anchor and nothing published changes."""
    anchor_files = sorted(p.name for p in (settings.anchor.local.dir / "anchor").iterdir())
    before = _published(settings)
    result = _engine(settings).reconcile(now=NOW + timedelta(hours=40))
    assert not result.ok
    assert any(e.startswith("journal: ") and expect in e for e in result.errors), result.errors
    assert "docs/recovery.md" in result.errors[0]
    assert [s for s in result.steps if s.ok] == []
    assert sorted(p.name for p in (settings.anchor.local.dir / "anchor").iterdir()) == (
        anchor_files
    )
    assert _published(settings) == before


def test_a_record_emptied_of_its_roots_mints_no_root(settings: Settings) -> None:
    _edit_ca(settings, lambda r: replace(r, roots=()))
    _refused(settings, "names no root, yet it has made CAs up to number 2")


def test_a_record_without_an_active_root_mints_no_root(settings: Settings) -> None:
    _edit_ca(
        settings,
        lambda r: replace(r, roots=tuple(replace(x, role=RootRole.RETIRING) for x in r.roots)),
    )
    _refused(settings, "holds roots (root-1 (retiring)) but none is active")


def test_a_foreign_root_in_the_journal_is_never_published(settings: Settings) -> None:
    _, foreign = self_signed_root("root", NOW)
    _edit_ca(settings, lambda r: replace(r, roots=tuple(replace(x, cert=foreign) for x in r.roots)))
    _refused(settings, "the journal's root-1 is not the certificate the anchor holds")


def test_a_journal_root_the_anchor_does_not_hold_is_refused(settings: Settings) -> None:
    (settings.anchor.local.dir / "anchor" / "kong-2.crt").unlink()
    _refused(settings, "kong-2 is in the journal but the anchor holds no such CA")


@pytest.mark.parametrize(("ref", "target"), [("root-1", "linkerd-issuer"), ("kong-2", "kong")])
def test_a_ca_key_replaced_in_the_anchor_signs_nothing(
    settings: Settings, ref: str, target: str
) -> None:
    passphrase = load_or_create_passphrase(settings.anchor.local.effective_passphrase_file)
    (settings.anchor.local.dir / "anchor" / f"{ref}.key").write_bytes(
        private_key_pem(generate_key(), passphrase)
    )
    before = _published(settings)
    engine = _engine(settings)
    engine.request_rotation(target, "test", now=NOW + timedelta(minutes=1))
    result = engine.reconcile(now=NOW + timedelta(minutes=1))
    assert not result.ok
    failed = [s for s in result.steps if not s.ok]
    assert failed and all("the key in" in (s.error or "") for s in failed), failed
    assert not [s for s in result.steps if s.ok and s.action.startswith("Issue")]
    assert _published(settings) == before


def test_the_anchor_is_listed_once_per_change_of_the_ca_record(settings: Settings) -> None:
    CountingAnchor.listed = 0
    engine = _engine(settings, CountingAnchor)
    assert engine.reconcile(now=NOW + timedelta(minutes=1)).ok
    assert engine.reconcile(now=NOW + timedelta(minutes=2)).ok
    assert CountingAnchor.listed == 1  # the steady record was checked once
    engine.request_rotation("kong-intermediate", "test", now=NOW + timedelta(minutes=3))
    assert engine.reconcile(now=NOW + timedelta(minutes=3)).ok
    assert CountingAnchor.listed == 2  # the request moved the record: checked again


def test_plan_refuses_rather_than_creating_a_root(tmp_path: Path) -> None:
    _, cert = self_signed_root("root", NOW)
    settings = two_clients(tmp_path)
    lost = State(ca=CaRecord(serial=4))
    steps = plan(lost, NOW, settings)
    assert [type(s) for s in steps] == [Refuse]
    fresh = State()
    assert isinstance(plan(fresh, NOW, settings)[0], CreateRoot)
    two_active = State(
        ca=CaRecord(
            serial=2,
            roots=(
                RootEntry("root-1", cert, RootRole.ACTIVE, NOW),
                RootEntry("root-2", cert, RootRole.ACTIVE, NOW),
            ),
        )
    )
    assert journal_problems(two_active) == ["the CA record has 2 active roots"]


def test_status_exits_1_and_names_the_problem(settings: Settings, tmp_path: Path) -> None:
    _edit_ca(settings, lambda r: replace(r, roots=()))
    run = ca_daemon("status", "--config", str(tmp_path / "config.yaml"), cwd=tmp_path)
    assert run.returncode == 1, run.stderr
    assert "error: journal: the CA record names no root" in run.stderr


class CountingPublisher(DirectoryPublisher):
    calls = 0

    def publish(self, world: TrustWorld) -> PublishReport:
        CountingPublisher.calls += 1
        return super().publish(world)


def test_a_newer_ca_record_saved_mid_pass_stops_the_publish(settings: Settings) -> None:
    """The engine's own fence: between deciding and publishing, another writer saves the
    CA record; the pass publishes nothing (not even to a publisher without a fence of its
    own) and says why."""
    passphrase = load_or_create_passphrase(settings.anchor.local.effective_passphrase_file)
    other = file_journal(settings, passphrase)

    class InterleavedAnchor(LocalAnchor):
        def sign_client(self, *args: Any, **kwargs: Any) -> x509.Certificate:
            record, version = other.load_ca()  # another writer moves the record on
            other.save_ca(replace(record, published_at=NOW + timedelta(minutes=5)), version)
            return super().sign_client(*args, **kwargs)

    before = _published(settings)
    CountingPublisher.calls = 0
    engine = Engine(
        settings,
        InterleavedAnchor(settings.anchor.local.dir, passphrase),
        file_journal(settings, passphrase),
        [CountingPublisher(settings.publish_directory)],
    )
    at = NOW + timedelta(minutes=1)
    engine.request_rotation("kong/payments", "test", now=at)
    result = engine.reconcile(now=at)
    assert [s.name for s in result.steps if s.action == "IssueKongClient"] == ["payments"]
    assert any(
        "was saved by another writer" in e and "not publishing an older state" in e
        for e in result.errors
    ), result.errors
    assert CountingPublisher.calls == 0
    assert _published(settings) == before


def test_a_certificate_the_anchor_signed_with_another_key_is_not_published(
    settings: Settings,
) -> None:
    """Whatever the anchor's reason (a Vault issuer's key replaced behind the daemon's
    back), a certificate that does not verify under the journal's CA is refused."""

    class WrongKeyAnchor(LocalAnchor):
        def _signer(self, ca: CA) -> PrivateKey:
            return generate_key()

    passphrase = load_or_create_passphrase(settings.anchor.local.effective_passphrase_file)
    engine = Engine(
        settings,
        WrongKeyAnchor(settings.anchor.local.dir, passphrase),
        file_journal(settings, passphrase),
        [DirectoryPublisher(settings.publish_directory)],
    )
    before = _published(settings)
    at = NOW + timedelta(minutes=1)
    engine.request_rotation("kong/payments", "test", now=at)
    result = engine.reconcile(now=at)
    (failed,) = [s for s in result.steps if not s.ok]
    assert failed.name == "payments"
    assert "not signed by the journal's CA certificate" in (failed.error or "")
    assert _published(settings) == before


def test_a_journal_behind_the_anchors_count_counts_on_from_the_anchor(
    settings: Settings,
) -> None:
    """Restored from a backup older than root-4 (serial 2): the next root is root-5,
    never the root-4 the anchor already holds (it would come back as if new). The number
    right after the journal's (root-3) is what an interrupted step leaves for its retry:
    that one does not move the count."""
    passphrase = load_or_create_passphrase(settings.anchor.local.effective_passphrase_file)
    anchor = LocalAnchor(settings.anchor.local.dir, passphrase)
    validity = capped_validity(NOW, timedelta(days=300), None)
    interrupted = anchor.create_root("root-3", Subject("ca-daemon root"), "ec-p256", validity)
    first = _engine(settings).reconcile(now=NOW + timedelta(seconds=30))
    assert first.ok and first.steps == []  # root-3 waits for the step that made it
    stale = anchor.create_root("root-4", Subject("ca-daemon root"), "ec-p256", validity)
    engine = _engine(settings)
    at = NOW + timedelta(minutes=1)
    first = engine.reconcile(now=at)
    assert first.ok, first.errors
    assert [(s.action, s.name) for s in first.steps] == [("AdvanceSerial", "journal")]
    assert engine.journal.load_ca()[0].serial == 4
    engine.request_rotation("trust-anchor", "test", now=at)
    rotated = engine.reconcile(now=at)
    assert rotated.ok, rotated.errors
    record = engine.journal.load_ca()[0]
    assert [r.ref for r in record.roots] == ["root-1", "root-5"]
    assert all(r.cert not in (stale.cert, interrupted.cert) for r in record.roots)
