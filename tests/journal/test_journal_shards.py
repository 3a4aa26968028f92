"""The journal keeps credentials in shard records: one write per shard a batch touches,
a revision per credential, check-and-set per shard, nothing re-sealed that did not change."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from ca_daemon.anchor.local import LocalAnchor, load_or_create_passphrase
from ca_daemon.config.settings import Settings
from ca_daemon.errors import JournalConflict, JournalCorrupt, MigrationRefused, NewerJournal
from ca_daemon.journal import journal as journal_module
from ca_daemon.journal.format import CA_KEY, SHARDS, check_version, shard_of
from ca_daemon.journal.journal import Journal
from ca_daemon.journal.open import file_journal
from ca_daemon.journal.store.records import FileRecordStore, Record, RecordConflict
from ca_daemon.model.state import (
    CA_FEATURES_VERSION,
    STATE_VERSION,
    CaRecord,
    IssuedEntry,
    Operation,
    Rotation,
    SealedKey,
    ca_from_json,
    ca_to_json,
    client_key,
    credential_to_json,
    issuer_key,
)
from ca_daemon.pki.bundle import certificate_pem
from ca_daemon.pki.keys import KeyMaterialError
from ca_daemon.rotation.engine import Engine
from tests.support.clock import NOW
from tests.support.pki import issued_entry

pytestmark = pytest.mark.usefixtures("clean_env")


class DictStore:
    """A record store in memory with the contract's check-and-set; counts its writes."""

    description = "records in memory"

    def __init__(self) -> None:
        self.records: dict[str, tuple[Record, int]] = {}
        self.writes: Counter[str] = Counter()

    def read(self, key: str) -> tuple[Record, int] | None:
        return self.records.get(key)

    def write(self, key: str, record: Record, version: int) -> int:
        stored = self.records.get(key)
        if (stored[1] if stored else 0) != version:
            raise RecordConflict(f"{key}: version {stored[1] if stored else 0}, not {version}")
        self.records[key] = (record, version + 1)
        self.writes[key] += 1
        return version + 1

    def delete(self, key: str) -> None:
        self.records.pop(key, None)

    def list(self, folder: str) -> list[str]:
        prefix = f"{folder}/"
        return sorted(k.removeprefix(prefix) for k in self.records if k.startswith(prefix))


def _counting(counter: Counter[str], name: str) -> Callable[[bytes], bytes]:
    def codec(data: bytes) -> bytes:
        counter[name] += 1
        return data

    return codec


def _two_in_one_shard() -> tuple[str, str]:
    seen: dict[str, str] = {}
    for i in range(1000):
        key = client_key(f"c{i}")
        if (other := seen.get(shard_of(key))) is not None:
            return other, key
        seen[shard_of(key)] = key
    raise AssertionError("no two ids share a shard")


def test_the_shard_of_a_credential_never_changes() -> None:
    # A different hash in a later release would leave every credential where the new
    # release does not look for it: all would be issued anew. These are fixed.
    assert [shard_of(k) for k in ("linkerd-issuer", "kong/example", "kong/payments")] == [
        "shards/19",
        "shards/34",
        "shards/24",
    ]


def test_5000_clients_spread_evenly_over_the_shards() -> None:
    sizes = Counter(shard_of(client_key(f"client-{i}")) for i in range(5000))
    assert len(sizes) == SHARDS
    assert max(sizes.values()) < 2 * 5000 / SHARDS


def test_revisions_move_per_credential_and_unchanged_keys_are_not_sealed_again() -> None:
    store, calls = DictStore(), Counter[str]()
    journal = Journal(store, _counting(calls, "seal"), _counting(calls, "unseal"))
    one, two = _two_in_one_shard()
    shard = shard_of(one)
    version, revisions = journal.save_credentials(
        shard, 0, {one: issued_entry("a"), two: issued_entry("b")}
    )
    assert (version, revisions) == (1, {one: 1, two: 1})
    assert calls["seal"] == 2
    version, revisions = journal.save_credentials(shard, version, {one: issued_entry("a2")})
    assert (version, revisions) == (2, {one: 2})
    assert calls["seal"] == 3  # only the changed one
    loaded = journal.load()
    assert dict(loaded.credential_versions) == {one: 2, two: 1}
    assert dict(loaded.shard_versions) == {shard: 2}
    assert store.writes == Counter({shard: 2})


def test_a_load_parses_only_the_shards_that_moved(monkeypatch: pytest.MonkeyPatch) -> None:
    store = DictStore()
    journal = Journal(store)
    keys = [client_key(f"c{i}") for i in range(40)]
    for key in keys:
        shard = shard_of(key)
        found = store.read(shard)
        journal.save_credentials(shard, found[1] if found else 0, {key: issued_entry(key[5:])})
    parsed = Counter[str]()
    real = journal_module.credential_from_json

    def counting(data: Any, unseal: Any, credential: str) -> IssuedEntry:
        parsed["n"] += 1
        return real(data, unseal, credential)

    monkeypatch.setattr(journal_module, "credential_from_json", counting)
    fresh = Journal(store)
    assert len(fresh.load().state.kong_clients) == 40
    assert parsed["n"] == 40
    assert len(fresh.load().state.kong_clients) == 40
    assert parsed["n"] == 40  # nothing moved: nothing parsed again
    shard = shard_of(keys[0])
    Journal(store).save_credentials(shard, store.records[shard][1], {keys[0]: issued_entry("x")})
    parsed.clear()
    fresh.load()
    assert parsed["n"] == len(store.records[shard][0]["credentials"])  # that shard only


def test_a_shard_saved_by_someone_else_since_the_load_is_a_conflict() -> None:
    store = DictStore()
    one, two = Journal(store), Journal(store)
    key = client_key("payments")
    shard = shard_of(key)
    one.save_credentials(shard, 0, {key: issued_entry("payments")})
    loaded = two.load()
    one.save_credentials(shard, 1, {key: issued_entry("payments")})
    before = store.records[shard]
    with pytest.raises(JournalConflict):
        two.save_credentials(shard, loaded.shard_versions[shard], {key: issued_entry("payments")})
    assert store.records[shard] == before


def test_a_credential_cannot_be_saved_into_another_shard() -> None:
    key = client_key("payments")
    other = next(f"shards/{i:02d}" for i in range(SHARDS) if f"shards/{i:02d}" != shard_of(key))
    with pytest.raises(ValueError, match="does not belong"):
        Journal(DictStore()).save_credentials(other, 0, {key: issued_entry("payments")})


def test_a_removed_credential_leaves_its_shard_and_its_neighbours() -> None:
    store = DictStore()
    journal = Journal(store)
    one, two = _two_in_one_shard()
    shard = shard_of(one)
    journal.save_credentials(shard, 0, {one: issued_entry("a"), two: issued_entry("b")})
    assert journal.save_credentials(shard, 1, {one: None}) == (2, {one: 0})
    assert list(journal.load().credential_versions) == [two]


def test_a_shard_that_is_not_a_shard_record_names_itself_and_the_recovery() -> None:
    store = DictStore()
    store.records["shards/07"] = ({"version": 3, "credentials": ["not", "an", "object"]}, 1)
    with pytest.raises(JournalCorrupt, match=r"shards/07.*issued anew"):
        Journal(store).load()


def test_an_engine_batch_writes_each_touched_shard_once(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    clients = [{"name": f"c{i}", "common_name": f"c{i}.upstream"} for i in range(300)]
    settings = make_settings({"kong": {"clients": clients}})
    passphrase = load_or_create_passphrase(settings.anchor.local.effective_passphrase_file)
    counted = Counter[str]()
    journal = file_journal(settings, passphrase)
    store = journal.store
    assert isinstance(store, FileRecordStore)
    write = store.write

    def counting_write(key: str, record: Record, version: int) -> int:
        counted[key] += 1
        return write(key, record, version)

    store.write = counting_write  # type: ignore[method-assign]
    engine = Engine(settings, LocalAnchor(settings.anchor.local.dir, passphrase), journal, [])
    result = engine.reconcile(now=NOW)
    assert result.ok, result.errors[:3]
    issued = [s for s in result.steps if s.action == "IssueKongClient"]
    assert len(issued) == 300
    shards = {shard_of(client_key(f"c{i}")) for i in range(300)} | {shard_of("linkerd-issuer")}
    assert {k for k in counted if k.startswith("shards/")} == shards
    assert all(counted[s] == 1 for s in shards), counted
    assert len(engine.journal.load().state.kong_clients) == 300


def test_a_revocation_request_reads_the_ca_record_and_one_shard(
    make_settings: Callable[..., Settings],
) -> None:
    """Noting the certificate to revoke must not load every credential (5,000 clients is
    a normal cluster): the request reads the CA record and the one client's shard."""
    clients = [{"name": f"c{i}", "common_name": f"c{i}.upstream"} for i in range(100)]
    settings = make_settings({"kong": {"clients": clients}})
    passphrase = load_or_create_passphrase(settings.anchor.local.effective_passphrase_file)
    journal = file_journal(settings, passphrase)
    engine = Engine(settings, LocalAnchor(settings.anchor.local.dir, passphrase), journal, [])
    assert engine.reconcile(now=NOW).ok
    store = journal.store
    assert isinstance(store, FileRecordStore)
    read, reads = store.read, Counter[str]()

    def counting_read(key: str) -> tuple[Record, int] | None:
        reads[key] += 1
        return read(key)

    store.read = counting_read  # type: ignore[method-assign]
    op_id = engine.request_rotation("kong/c7", "key leaked", now=NOW, revoke=True)
    assert set(reads) == {CA_KEY, shard_of(client_key("c7"))}, reads
    (op,) = [o for o in journal.load().state.ca.operations if o.id == op_id]
    noted = journal.load().state.credential(client_key("c7"))
    assert noted is not None
    assert op.revoking == (certificate_pem(noted.cert),)


def test_keys_stay_sealed_until_used_and_are_written_back_as_they_were() -> None:
    """Unsealing costs ~0.5 ms a key: a load of 5,000 clients unseals one (at the first
    load, so a wrong passphrase shows at start), and the digest beside each key tells a
    publisher whether its copy is current; a key is unsealed where it is used."""
    store, calls = DictStore(), Counter[str]()
    one, other = _two_in_one_shard()
    names = [one, other, *(client_key(f"x{i}") for i in range(38))]
    entries = {key: issued_entry(key) for key in names}
    for key, entry in entries.items():
        stored = store.records.get(shard_of(key))
        Journal(store).save_credentials(shard_of(key), stored[1] if stored else 0, {key: entry})
    reader = Journal(store, _counting(calls, "seal"), _counting(calls, "unseal"))
    loaded = reader.load().state
    assert calls["unseal"] == 1
    reader.load()
    assert calls["unseal"] == 1
    entry = loaded.credential(one)
    assert entry is not None and isinstance(entry.key, SealedKey)
    assert entry.key.sha256 == hashlib.sha256(entries[one].key_pem).digest()
    assert entry.key_pem == entries[one].key_pem and calls["unseal"] == 2
    # Saved again (its shard moved), the other is written as it was read: not resealed.
    version = store.records[shard_of(one)][1]
    reader.save_credentials(
        shard_of(one), version, {one: issued_entry("a2"), other: loaded.credential(other)}
    )
    assert calls["seal"] == 1 and calls["unseal"] == 2
    again = reader.load().state.credential(other)
    assert again is not None and again.key_pem == entries[other].key_pem


def test_a_key_stored_without_its_digest_is_unsealed_when_read() -> None:
    """Records written before the digest existed: the key is unsealed at load, as then."""
    store, calls = DictStore(), Counter[str]()
    one, _ = _two_in_one_shard()
    shard = shard_of(one)
    a = issued_entry("a")
    Journal(store).save_credentials(shard, 0, {one: a})
    (record, version) = store.records[shard]
    doc = json.loads(record["credentials"][one])
    del doc["key_sha256"]
    store.records[shard] = ({**record, "credentials": {one: json.dumps(doc)}}, version)
    entry = Journal(store, unseal=_counting(calls, "unseal")).load().state.credential(one)
    assert calls["unseal"] == 1
    assert entry is not None and entry.key == a.key_pem


# --- older layouts, read and moved ---------------------------------------------------------


def _version_2(store: DictStore, entries: dict[str, IssuedEntry], record_version: int) -> None:
    """What the previous release wrote: the CA record at state version 2, one record per
    credential (each written ``record_version`` times)."""
    store.write("", {**ca_to_json(CaRecord()), "version": 2}, 0)
    for key, entry in entries.items():
        doc = {**credential_to_json(entry), "version": 2}
        for version in range(record_version):
            store.write(f"credentials/{key.replace('/', '.')}", doc, version)


def test_a_reader_that_must_not_write_sees_an_older_layout_moved_in_memory() -> None:
    store = DictStore()
    entries = {
        client_key("payments"): issued_entry("payments"),
        "linkerd-issuer": issued_entry("issuer"),
    }
    _version_2(store, entries, record_version=3)
    before = dict(store.records)
    loaded = Journal(store).load(migrate=False)
    assert sorted(loaded.state.credentials()) == sorted(entries.items(), key=lambda kv: kv[0])
    assert dict(loaded.credential_versions) == dict.fromkeys(entries, 3)
    assert Journal(store).load_ca(migrate=False)[0] == CaRecord()
    assert store.records == before  # nothing moved, nothing written


def test_a_writer_moves_an_older_layout_and_a_record_renewed_since_is_moved_again() -> None:
    store = DictStore()
    key = client_key("payments")
    _version_2(store, {key: issued_entry("payments")}, record_version=3)
    journal = Journal(store)
    assert journal.load().credential_versions == {key: 3}
    assert store.list("credentials") == []
    assert store.read("")[0]["version"] == STATE_VERSION  # type: ignore[index]
    # A writer of the previous release, finishing its pass, renewed the record after it
    # was moved: the next process's first load moves that one too, newest first.
    renewed = issued_entry("payments-renewed")
    doc = {**credential_to_json(renewed), "version": 2}
    store.records[f"credentials/{key.replace('/', '.')}"] = (doc, 4)
    later = Journal(store).load()
    assert later.credential_versions == {key: 4}
    assert later.state.kong_clients["payments"].cert == renewed.cert
    assert store.list("credentials") == []


def test_a_record_of_an_older_layout_that_cannot_be_read_stops_the_move() -> None:
    store = DictStore()
    _version_2(store, {client_key("payments"): issued_entry("payments")}, record_version=1)
    store.records["credentials/kong.orders"] = ({"version": 2, "cert": "garbage"}, 1)
    before = dict(store.records)
    with pytest.raises(MigrationRefused, match=r"credentials/kong\.orders.*nothing was moved"):
        Journal(store).load()
    assert store.records == before


def test_a_shard_deleted_and_made_again_at_the_same_version_is_read_afresh() -> None:
    store = DictStore()
    key = client_key("payments")
    shard = shard_of(key)
    journal = Journal(store)
    journal.save_credentials(shard, 0, {key: issued_entry("first")})
    assert journal.load().shard_versions == {shard: 1}
    store.delete(shard)
    second = issued_entry("second")
    Journal(store).save_credentials(shard, 0, {key: second})  # version 1 again
    assert journal.load().state.kong_clients["payments"].cert == second.cert


def test_after_a_shard_is_restored_from_a_backup_new_revisions_outrank_the_old() -> None:
    store = DictStore()
    key = client_key("payments")
    shard = shard_of(key)
    journal = Journal(store)
    version = 0
    backup = None
    for i in range(6):
        if i == 2:
            backup = store.records[shard][0]
        version, revisions = journal.save_credentials(shard, version, {key: issued_entry(f"r{i}")})
    highest = revisions[key]
    assert backup is not None
    store.write(shard, backup, version)  # the operator restores the older content
    loaded = journal.load()
    assert loaded.credential_versions[key] < highest  # the restored one, older
    _, revisions = journal.save_credentials(
        shard, loaded.shard_versions[shard], {key: issued_entry("x")}
    )
    assert revisions[key] > highest


def test_a_record_using_an_emergency_or_a_revocation_is_written_as_newer() -> None:
    """An earlier release of version 3 would write such a record back without what it
    does not know (an emergency becoming a retirement on expiry, the CRLs dropped): it
    is written as version 4, which that release refuses as newer. Others stay 3."""
    plain = Operation("a", "kong", "", NOW)
    assert ca_to_json(CaRecord(operations=(plain,)))["version"] == STATE_VERSION == 3
    for record in (
        CaRecord(operations=(replace(plain, emergency=True),)),
        CaRecord(operations=(replace(plain, target="kong/x", revoke=True),)),
        CaRecord(rotation=Rotation(started_at=NOW, trigger="schedule", retire_on="proof")),
    ):
        doc = ca_to_json(record)
        assert doc["version"] == CA_FEATURES_VERSION == 4
        assert ca_from_json(doc) == record  # this release reads it back whole
    with pytest.raises(NewerJournal, match="reads up to 4"):
        check_version({"version": 5}, "the CA record")


def test_a_sealed_key_that_cannot_be_used_names_its_credential() -> None:
    """Keys are unsealed where they are used, so the error must say whose it is; one
    that does not match the digest beside it is refused, not published."""
    entry = issued_entry("a")
    digest = hashlib.sha256(entry.key_pem).digest()

    def wrong_passphrase(_sealed: bytes) -> bytes:
        raise KeyMaterialError("cannot load private key: wrong passphrase or corrupt key")

    broken = SealedKey(b"sealed", digest, wrong_passphrase, "kong/a")
    with pytest.raises(JournalCorrupt, match=r"the key of kong/a: cannot load private key"):
        broken.content()
    swapped = SealedKey(b"sealed", digest, lambda _: issued_entry("b").key_pem, "kong/a")
    with pytest.raises(JournalCorrupt, match="the key of kong/a is not the one its digest"):
        swapped.content()
    good = SealedKey(b"sealed", digest, lambda _: entry.key_pem, "kong/a")
    assert good.content() == entry.key_pem


def test_a_linked_cluster_s_issuer_is_journaled_by_its_own_key() -> None:
    store = DictStore()
    east = issuer_key("east")
    entry = issued_entry("east")
    Journal(store).save_credentials(shard_of(east), 0, {east: entry})
    loaded = Journal(store).load().state
    assert loaded.cluster_issuers == {"east": entry}
    assert loaded.linkerd_issuer is None and loaded.credential(east) == entry
    assert dict(loaded.credentials()) == {east: entry}


def test_a_credential_of_no_known_kind_names_itself() -> None:
    store = DictStore()
    text = json.dumps(credential_to_json(issued_entry("x")) | {"revision": 1})
    store.records["shards/03"] = ({"version": 3, "credentials": {"linkerd-issuers": text}}, 1)
    with pytest.raises(JournalCorrupt, match="unknown credential 'linkerd-issuers'"):
        Journal(store).load()
