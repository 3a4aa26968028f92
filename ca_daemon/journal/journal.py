"""Persisting the state with check-and-set, so two writers can never both win.

The CA record is one record; the credentials live in ``SHARDS`` shard records, each
credential always in the same one (by a hash of its id). A batch of renewals writes
each shard it touched once, so issuing 1,000 clients costs 64 journal writes rather
than 1,000, a load reads 64 records whatever the number of clients, and no record
approaches a storage entry limit (Vault's integrated storage refuses entries over
1 MiB: a shard holds ~80 credentials at 5,000 clients, ~200 KiB).

Each credential in a shard carries its own ``revision``, raised only when that
credential changes: what is published is derived from (CA record version, revision),
so renewing one client never makes its shard neighbours look changed.

The engine saves the state *before* it publishes anything derived from it; a crash
between the two is repaired by publishing again from the saved state. Older states
(version 1: everything in one document; version 2: one record per credential) are
moved into shards by the first writer's load; other readers see them moved in memory.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from ca_daemon.errors import (
    AnchorError,
    JournalConflict,
    JournalCorrupt,
    JournalError,
    JournalUnavailable,
    MigrationRefused,
    PkiError,
    StoreError,
)
from ca_daemon.journal.format import (
    CA_KEY,
    SHARD_FOLDER,
    check_version,
    encode,
    shard_of,
    shard_record,
)
from ca_daemon.journal.migrate import Migration
from ca_daemon.journal.store.records import (
    ReadOnlyStore,
    RecordConflict,
    RecordInvalid,
    RecordStore,
)
from ca_daemon.model.state import (
    CaRecord,
    IssuedEntry,
    KeyCodec,
    SealedKey,
    State,
    ca_from_json,
    ca_to_json,
    credential_from_json,
    credential_to_json,
    is_credential_key,
    plain,
)

log = logging.getLogger(__name__)

# Records read at once by a load.
READ_CONCURRENCY = 8
RECOVERY = (
    "restore it from a backup, or move it aside so the next pass rebuilds the journal "
    "from the anchor's named CAs (docs/recovery.md)"
)


@dataclass
class Seen:
    """The versions one pass loaded, moved on by each of its own writes: the next write
    is checked against them, so a pass never overwrites what another writer saved."""

    version: int
    revisions: dict[str, int]
    shard_versions: dict[str, int]


@dataclass(frozen=True)
class Versioned:
    state: State
    version: int  # of the CA record; 0: nothing saved yet
    credential_versions: Mapping[str, int] = field(default_factory=dict)  # revisions
    shard_versions: Mapping[str, int] = field(default_factory=dict)

    def seen(self) -> Seen:
        return Seen(self.version, dict(self.credential_versions), dict(self.shard_versions))


@dataclass(frozen=True)
class _Shard:
    """A shard as last read or written: each credential's stored text (so an unchanged
    one is never unsealed, sealed or encoded again), its revision and what it parses to."""

    version: int
    stored: Mapping[str, str]
    revisions: Mapping[str, int]
    entries: Mapping[str, IssuedEntry]


_EMPTY = _Shard(0, {}, {}, {})


class Journal:
    def __init__(
        self, store: RecordStore, seal: KeyCodec = plain, unseal: KeyCodec = plain
    ) -> None:
        self.store = store
        self.description = store.description
        self._seal = seal
        self._unseal = unseal
        # By shard: a load re-parses only the shards that moved, and in those only the
        # credentials that did (unsealing may be slow: key derivation).
        self._shards: dict[str, _Shard] = {}
        self._lock = threading.Lock()
        self._migration = Migration(store, self.description, self._unseal)
        self._leftovers_checked = False
        # Keys stay sealed until used; one is unsealed at the first load all the same, so
        # a wrong passphrase shows at start, not at the first renewal.
        self._unseal_checked = False

    def _guard(self, what: str, action: Callable[[], Any]) -> Any:
        try:
            return action()
        except RecordConflict as exc:
            raise JournalConflict(str(exc)) from None
        except RecordInvalid as exc:
            raise JournalCorrupt(f"{self.description}: {what}: {exc}") from None
        except (StoreError, AnchorError) as exc:  # files unreadable, Vault down or refusing
            raise JournalUnavailable(f"{self.description}: {what}: {exc}") from None
        except (KeyError, ValueError, TypeError, AttributeError, PkiError) as exc:
            raise JournalCorrupt(
                f"{self.description}: {what}: invalid content ({type(exc).__name__}: {exc})"
            ) from None

    # --- reading ------------------------------------------------------------------------

    def load_ca(self, migrate: bool = True) -> tuple[CaRecord, int]:
        """The CA record and its version. An older layout is moved into shards first, by
        a writer (``migrate``); any other reader (a standby, the status API) sees it
        moved in memory only, so a rolling upgrade never has two processes moving it."""
        try:
            return self._load_ca(migrate)
        except _OlderLayout:
            return self._in_memory().load_ca()

    def load_ca_to_update(self, migrate: bool) -> tuple[CaRecord, int]:
        """The CA record and its version as stored, to write a change over (check-and-set).

        Without ``migrate`` (a standby) an older layout is refused: moved in memory only,
        it is no base for a write, and only the leader moves it (at its next pass)."""
        try:
            return self._load_ca(migrate)
        except _OlderLayout:
            raise JournalUnavailable(
                f"{self.description}: the journal is in an older layout, which only the "
                "leader moves into shards (at its next pass); ask again then"
            ) from None

    def _load_ca(self, migrate: bool) -> tuple[CaRecord, int]:
        def read() -> tuple[CaRecord, int]:
            found = self.store.read(CA_KEY)
            if found is None:
                return CaRecord(), 0
            data, version = found
            check_version(data, f"{self.description}: the CA record")
            if data.get("version") in (1, 2):
                if not migrate:
                    raise _OlderLayout
                self._migration.migrate(data, version)
                return self._load_ca(migrate)
            if migrate and not self._leftovers_checked:
                self._leftovers_checked = True
                self._migration.remove_legacy()
            return ca_from_json(data), version

        try:
            result: tuple[CaRecord, int] = self._guard("read the CA record", read)
        except MigrationRefused:
            raise
        except JournalCorrupt as exc:
            # Only for a record that is there and invalid: advising to move aside a journal
            # the store merely did not serve (Vault down) would throw a healthy one away.
            raise JournalCorrupt(f"{exc}: {RECOVERY}") from None
        return result

    def _in_memory(self) -> Journal:
        """This journal over a store whose writes stay in memory: the older layout moved
        there, nothing written."""
        return Journal(ReadOnlyStore(self.store), self._seal, self._unseal)

    def load(self, migrate: bool = True) -> Versioned:
        try:
            record, version = self._load_ca(migrate)
        except _OlderLayout:
            return self._in_memory().load()
        names: list[str] = self._guard("list credentials", lambda: self.store.list(SHARD_FOLDER))
        with ThreadPoolExecutor(max_workers=READ_CONCURRENCY) as pool:
            shards = list(pool.map(self._load_shard, (f"{SHARD_FOLDER}/{n}" for n in names)))
        with self._lock:  # a shard deleted since must not come back from the cache
            listed = {name for name, _ in shards}
            self._shards = {k: v for k, v in self._shards.items() if k in listed}
        revisions: dict[str, int] = {}
        shard_versions: dict[str, int] = {}
        for name, shard in shards:
            shard_versions[name] = shard.version
            revisions.update({key: shard.revisions[key] for key in shard.entries})
        state = State.of(record, (kv for _, shard in shards for kv in shard.entries.items()))
        if not self._unseal_checked:
            self._check_unseal(state)
        return Versioned(state, version, revisions, shard_versions)

    def _check_unseal(self, state: State) -> None:
        for key, entry in state.credentials():
            if isinstance(entry.key, SealedKey):
                self._guard(f"unseal the key of {key}", entry.key.content)
                break
        self._unseal_checked = True

    def load_credential(self, key: str) -> IssuedEntry | None:
        """One credential as stored, reading only its shard (the CA record's layout is
        current: read it first)."""
        _, shard = self._load_shard(shard_of(key))
        return shard.entries.get(key)

    def _load_shard(self, name: str) -> tuple[str, _Shard]:
        try:
            found = self._guard(f"read {name}", partial(self.store.read, name))
            if found is None:
                return name, _EMPTY
            data, version = found
            check_version(data, f"{self.description}: {name}")
            with self._lock:
                cached = self._shards.get(name)
            # Versions restart when a shard is deleted: the content must match too.
            if (
                cached is not None
                and cached.version == version
                and cached.stored == data.get("credentials")
            ):
                return name, cached
            shard = self._guard(f"read {name}", partial(self._parse_shard, data, version, cached))
        except JournalCorrupt as exc:
            raise JournalCorrupt(
                f"{exc}: restore it from a backup, or delete it so the credentials it holds "
                "are issued anew (nothing is overwritten while it is unreadable)"
            ) from None
        with self._lock:
            self._shards[name] = shard
        return name, shard

    def _parse_shard(
        self, data: Mapping[str, Any], version: int, previous: _Shard | None = None
    ) -> _Shard:
        """The shard in ``data``; a credential stored exactly as in ``previous`` is taken
        from there, not parsed and unsealed again."""
        stored = data["credentials"]
        if not isinstance(stored, dict):
            raise TypeError("'credentials' is not an object")
        before = previous or _EMPTY
        revisions = {}
        entries = {}
        for key, text in stored.items():
            if not is_credential_key(key):
                raise ValueError(f"unknown credential {key!r}")
            if not isinstance(text, str):
                raise TypeError(f"{key} is not a JSON text")
            if before.stored.get(key) == text:
                revisions[key], entries[key] = before.revisions[key], before.entries[key]
                continue
            doc = json.loads(text)
            revisions[key] = int(doc["revision"])
            entries[key] = credential_from_json(doc, self._unseal, key)
        return _Shard(version, stored, revisions, entries)

    # --- writing ------------------------------------------------------------------------

    def save_ca(self, record: CaRecord, version: int) -> int:
        new: int = self._guard(
            "save the CA record", lambda: self.store.write(CA_KEY, ca_to_json(record), version)
        )
        return new

    def save_credentials(
        self, shard: str, version: int, changes: Mapping[str, IssuedEntry | None]
    ) -> tuple[int, dict[str, int]]:
        """Write ``changes`` (None: remove) into ``shard``, saved at ``version`` as last
        loaded; its new version and each changed credential's new revision (0: removed).
        JournalConflict when the shard moved on since."""
        with self._lock:
            base = self._shards.get(shard, _EMPTY)
        if base.version != version:
            found = self._guard(f"read {shard}", partial(self.store.read, shard))
            current = found[1] if found else 0
            if current != version:
                raise JournalConflict(
                    f"{self.description}: {shard} is at version {current}, expected {version}"
                )
            base = _EMPTY if found is None else self._parse_shard(found[0], found[1], base)
        stored = dict(base.stored)
        all_revisions = dict(base.revisions)
        entries = dict(base.entries)
        revisions: dict[str, int] = {}
        for key, entry in changes.items():
            if shard_of(key) != shard:
                raise ValueError(f"{key} does not belong in {shard}")
            if entry is None:
                stored.pop(key, None)
                all_revisions.pop(key, None)
                entries.pop(key, None)
                revisions[key] = 0
                continue
            # Above the shard's own version too: a shard restored from a backup brings older
            # revisions back, and what is written after it must still be newer than
            # anything published before.
            revision = max(base.revisions.get(key, 0), version) + 1
            stored[key] = encode({**credential_to_json(entry, self._seal), "revision": revision})
            all_revisions[key] = revisions[key] = revision
            entries[key] = entry
        what = f"save {', '.join(sorted(changes)[:3])}{' …' if len(changes) > 3 else ''}"
        new: int = self._guard(what, lambda: self.store.write(shard, shard_record(stored), version))
        with self._lock:
            self._shards[shard] = _Shard(new, stored, all_revisions, entries)
        return new, revisions

    # --- transitions: what the engine journals ----------------------------------------

    def write_groups(self, keys: Iterable[str]) -> list[list[str]]:
        """``keys`` in the groups one write saves together: a batch that issues group by
        group journals each as soon as its last credential is issued."""
        groups: dict[str, list[str]] = {}
        for key in keys:
            groups.setdefault(shard_of(key), []).append(key)
        return list(groups.values())

    def record_ca(self, seen: Seen, record: CaRecord) -> None:
        """Journal a new CA record (a CA step, or a noted fact) over the version ``seen``
        holds; JournalConflict when another writer saved since."""
        seen.version = self.save_ca(record, seen.version)

    def record_credentials(
        self, seen: Seen, changes: Mapping[str, IssuedEntry | None]
    ) -> dict[str, int]:
        """Journal renewed (None: dropped) credentials of one write group over what
        ``seen`` holds; each one's new revision (0: dropped)."""
        shards = {shard_of(key) for key in changes}
        if len(shards) != 1:
            raise ValueError(f"not one write group: {sorted(changes)}")
        shard = shards.pop()
        version, revisions = self.save_credentials(
            shard, seen.shard_versions.get(shard, 0), changes
        )
        seen.shard_versions[shard] = version
        seen.revisions.update(revisions)
        return revisions


class _OlderLayout(JournalError):
    """The stored CA record is an older layout, and this reader must not move it."""
