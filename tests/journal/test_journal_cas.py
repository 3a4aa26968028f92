"""Two writers of one journal can never both win: check-and-set, file and Vault.

Two engines on one data directory, interleaved at the step level: the first pauses
between its load and its save while the second runs a whole pass; the first's save is
refused as a conflict and it publishes nothing older over what the second published.
And the same at the record-store level, for ``FileRecordStore`` and for
``VaultKvStore`` on the real OpenBao: a write that names a stale version is refused.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from ca_daemon.anchor.local import LocalAnchor, load_or_create_passphrase
from ca_daemon.anchor.vault.client import VaultClient
from ca_daemon.config.settings import Settings, VaultAnchor, VaultAuth
from ca_daemon.journal.journal import Journal
from ca_daemon.journal.open import file_journal
from ca_daemon.journal.store.records import FileRecordStore, Record, RecordConflict, RecordStore
from ca_daemon.journal.store.vault_kv import VaultKvStore
from ca_daemon.model.state import Phase
from ca_daemon.pki.bundle import fingerprint, parse_pem_certificates
from ca_daemon.rotation.engine import Engine
from ca_daemon.rotation.results import PassResult
from tests.support.pki import issued_entry
from tests.support.rotation_configs import REQUEST_AT, T0, short_rotation_settings
from tests.support.rotation_harness import CheckedPublisher, Clock, checked_directory_publisher
from tests.support.servers.linkerd import LinkerdCheck
from tests.support.servers.openbao import OpenBao
from tests.support.servers.tools import unique

pytestmark = pytest.mark.integration

WAIT = 30.0  # seconds; only reached when the interleaving is broken


class PausingStore:
    """Holds the first save of the CA record until released: the engine has loaded,
    decided and acted (the anchor call is made), and is about to save."""

    def __init__(self, inner: RecordStore) -> None:
        self.inner = inner
        self.description = inner.description
        self.paused = threading.Event()
        self.release = threading.Event()
        self.writes: list[tuple[str, int]] = []

    def read(self, key: str) -> tuple[Record, int] | None:
        return self.inner.read(key)

    def write(self, key: str, record: Record, version: int) -> int:
        if key == "" and not self.paused.is_set():
            self.paused.set()
            assert self.release.wait(WAIT), "never released"
        self.writes.append((key, version))
        return self.inner.write(key, record, version)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def list(self, folder: str) -> list[str]:
        return self.inner.list(folder)


def _engine(settings: Settings, clock: Clock, publisher: CheckedPublisher) -> Engine:
    passphrase = load_or_create_passphrase(settings.anchor.local.effective_passphrase_file)
    return Engine(
        settings,
        LocalAnchor(settings.anchor.local.dir, passphrase),
        file_journal(settings, passphrase),
        [publisher],
        clock=clock,
    )


def _bundle(settings: Settings) -> list[str]:
    pem = (settings.publish_directory / "trust-bundle.pem").read_bytes()
    return [fingerprint(c) for c in parse_pem_certificates(pem)]


@dataclass
class Interleaved:
    settings: Settings
    clock: Clock
    publisher: CheckedPublisher
    operation: str
    loaded: int  # the CA record's version both engines loaded
    early: PassResult
    late: PassResult
    late_writes: list[tuple[str, int]]


def interleave(tmp_path: Path, linkerd_check: LinkerdCheck) -> Interleaved:
    """Bootstrap, request a root rotation, then: the late engine loads, decides and makes
    the next root, and is held before its save while the early engine runs a whole pass."""
    settings = short_rotation_settings(tmp_path)
    clock = Clock(T0)
    # One checker sees every publish of both engines, as a verifier would.
    publisher = checked_directory_publisher(settings, clock, linkerd_check)
    assert _engine(settings, clock, publisher).reconcile().ok
    clock.now = REQUEST_AT
    operation = _engine(settings, clock, publisher).request_rotation("trust-anchor", "drill")

    late = _engine(settings, clock, publisher)
    pausing = PausingStore(late.journal.store)
    late.journal.store = pausing
    early = _engine(settings, clock, publisher)
    _, loaded = early.journal.load_ca()

    late_result: list[PassResult] = []
    thread = threading.Thread(target=lambda: late_result.append(late.reconcile()))
    thread.start()
    try:
        assert pausing.paused.wait(WAIT), "the late engine never reached its save"
        early_result = early.reconcile()
    finally:
        pausing.release.set()
        thread.join(WAIT)
    assert not thread.is_alive()
    assert early_result.ok, early_result.errors
    (result,) = late_result
    return Interleaved(
        settings, clock, publisher, operation, loaded, early_result, result, pausing.writes
    )


def _journal(settings: Settings) -> Journal:
    passphrase = load_or_create_passphrase(settings.anchor.local.effective_passphrase_file)
    return file_journal(settings, passphrase)


def test_two_engines_on_one_journal_never_both_advance_a_phase(
    tmp_path: Path, linkerd_check: LinkerdCheck
) -> None:
    run = interleave(tmp_path, linkerd_check)
    # The late save was refused; the late engine said why and advanced nothing.
    errors = run.late.errors
    assert any("changed by another writer" in e for e in errors), errors
    assert [s.action for s in run.late.steps if s.ok] == []
    assert run.late_writes == [("", run.loaded)]  # one attempt, on the version it loaded
    # The journal holds the early engine's pass alone: one next root, one rotation.
    ca = _journal(run.settings).load().state.ca
    assert ca.phase is Phase.PROPAGATING
    assert ca.rotation is not None and ca.rotation.operation == run.operation
    assert ca.rotation.confirmed_at == run.clock.now
    assert [r.ref for r in ca.roots] == ["root-1", "root-3"]
    anchor_dir = run.settings.anchor.local.dir / "anchor"
    assert sorted(p.stem for p in anchor_dir.glob("root-*.crt")) == ["root-1", "root-3"]
    early_steps = [s.action for s in run.early.steps if s.ok]
    assert early_steps == ["PrepareRoot", "Propagate", "ConfirmBundle"], early_steps


# The engine checks the journal's version before it publishes: the losing engine must
# not put its older, one-root bundle back over the confirmed two-root one.
def test_the_engine_that_lost_the_race_publishes_nothing_older(
    tmp_path: Path, linkerd_check: LinkerdCheck
) -> None:
    run = interleave(tmp_path, linkerd_check)
    ca = _journal(run.settings).load().state.ca
    # Nothing older was published over the two-root bundle the early engine confirmed.
    assert _bundle(run.settings) == [fingerprint(r.cert) for r in ca.roots], "stale bundle"
    # The rotation goes on from the journal: activated once the propagation delay after
    # the confirmation is over. Had the late engine put its one-root bundle back, the
    # next root would now sign before it had been in every bundle that long (invariant 3).
    assert ca.rotation is not None and ca.rotation.confirmed_at is not None
    run.clock.now = ca.rotation.confirmed_at + run.settings.rotation.propagation_delay
    after = _engine(run.settings, run.clock, run.publisher).reconcile()
    assert after.ok, after.errors
    assert after.state is not None and after.state.ca.phase is Phase.RETIRING


# --- the stores themselves ----------------------------------------------------------------


def _two_writers_cannot_both_win(one: RecordStore, two: RecordStore, key: str) -> None:
    assert one.write(key, {"by": "one", "n": 1}, 0) == 1
    # Both "create" (version 0): the second one is refused.
    with pytest.raises(RecordConflict):
        two.write(key, {"by": "two", "n": 1}, 0)
    # Both read version 1; the first to write wins, the other is refused.
    found_one, found_two = one.read(key), two.read(key)
    assert found_one is not None and found_two is not None
    assert found_one[1] == found_two[1] == 1
    assert two.write(key, {"by": "two", "n": 2}, 1) == 2
    with pytest.raises(RecordConflict):
        one.write(key, {"by": "one", "n": 2}, 1)
    # A version from the future is refused too.
    with pytest.raises(RecordConflict):
        one.write(key, {"by": "one", "n": 9}, 9)
    assert one.read(key) == ({"by": "two", "n": 2}, 2)
    # Reloaded, the loser can write on the current version.
    assert one.write(key, {"by": "one", "n": 3}, 2) == 3
    assert two.read(key) == ({"by": "one", "n": 3}, 3)


@pytest.mark.parametrize("key", ["", "shards/24"])
def test_file_record_store_refuses_a_stale_version(tmp_path: Path, key: str) -> None:
    one, two = FileRecordStore(tmp_path / "data"), FileRecordStore(tmp_path / "data")
    _two_writers_cannot_both_win(one, two, key)


def _vault_store(openbao: OpenBao, path: str) -> VaultKvStore:
    cfg = VaultAnchor(address=openbao.address, auth=VaultAuth(token=openbao.token))
    return VaultKvStore(VaultClient(cfg), "secret", path)


@pytest.mark.parametrize("key", ["", "shards/24"])
def test_vault_kv_store_refuses_a_stale_version(openbao: OpenBao, key: str) -> None:
    path = f"ca-daemon/{unique('cas')}"
    one, two = _vault_store(openbao, path), _vault_store(openbao, path)
    _two_writers_cannot_both_win(one, two, key)


def test_two_vault_journals_on_one_path_cannot_both_save(openbao: OpenBao) -> None:
    """The journal over Vault: the second save of a loaded record is a JournalConflict."""
    from ca_daemon.errors import JournalConflict

    path = f"ca-daemon/{unique('cas-journal')}"
    one, two = Journal(_vault_store(openbao, path)), Journal(_vault_store(openbao, path))
    record, version = one.load_ca()
    assert version == 0
    version = one.save_ca(record, version)
    loaded_one, v_one = one.load_ca()
    loaded_two, v_two = two.load_ca()
    assert v_one == v_two == version
    one.save_ca(loaded_one, v_one)
    with pytest.raises(JournalConflict):
        two.save_ca(loaded_two, v_two)


def test_a_full_shard_stays_within_openbao_s_json_limits(openbao: OpenBao) -> None:
    """OpenBao refuses a request body with over 1,000 strings (max_request_json_strings,
    on by default): 300 credentials in one shard, more than 20,000 clients would put
    there, are one write it accepts, and read back whole."""
    from ca_daemon.journal.format import shard_of
    from ca_daemon.model.state import client_key

    keys = [k for k in (client_key(f"c{i}") for i in range(40000)) if shard_of(k) == "shards/00"]
    changes = {key: issued_entry(key[5:]) for key in keys[:300]}
    path = f"ca-daemon/{unique('full-shard')}"
    journal = Journal(_vault_store(openbao, path))
    version, revisions = journal.save_credentials("shards/00", 0, changes)
    assert version == 1 and set(revisions) == set(changes)
    loaded = Journal(_vault_store(openbao, path)).load()
    assert len(loaded.state.kong_clients) == 300
    assert all(loaded.state.kong_clients[k[5:]].cert == e.cert for k, e in changes.items())


def test_a_vault_shard_whose_version_did_not_move_is_not_fetched_again(
    openbao: OpenBao,
) -> None:
    """A steady load asks each shard's version (metadata, a few hundred bytes) and fetches
    the data only of those that moved, or were deleted and made again."""
    from ca_daemon.journal.format import shard_of
    from ca_daemon.model.state import client_key

    a, b = client_key("a"), client_key("b")
    assert len({shard_of(a), shard_of(b)}) == 2
    path = f"ca-daemon/{unique('steady-reads')}"
    writer, reader = _vault_store(openbao, path), _vault_store(openbao, path)
    Journal(writer).save_credentials(shard_of(a), 0, {a: issued_entry("a")})
    Journal(writer).save_credentials(shard_of(b), 0, {b: issued_entry("b")})
    journal = Journal(reader)
    fetched: list[str] = []
    read = reader.client.read

    def counting(where: str, what: str) -> dict[str, object] | None:
        if "/data/" in where:
            fetched.append(where.partition(f"/data/{path}")[2].lstrip("/"))
        return read(where, what)

    reader.client.read = counting  # type: ignore[method-assign]
    assert set(journal.load().state.kong_clients) == {"a", "b"}
    assert sorted(fetched) == sorted(["", shard_of(a), shard_of(b)])
    fetched.clear()
    journal.load()
    assert fetched == [""]  # the CA record, always fetched; no shard
    fetched.clear()
    Journal(writer).save_credentials(shard_of(b), 1, {b: issued_entry("b2")})
    loaded = journal.load().state
    assert fetched == ["", shard_of(b)]
    assert loaded.kong_clients["b"].cert.subject == issued_entry("b2").cert.subject
    # Deleted and made again: version 1 again, another record.
    writer.delete(shard_of(a))
    again = issued_entry("a-again")
    Journal(writer).save_credentials(shard_of(a), 0, {a: again})
    fetched.clear()
    assert journal.load().state.kong_clients["a"].cert == again.cert
    assert sorted(fetched) == sorted(["", shard_of(a)])
