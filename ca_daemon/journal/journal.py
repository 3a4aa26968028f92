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
import re
import threading
import zlib
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from ca_daemon.anchor.base import CA
from ca_daemon.errors import AnchorError, JournalError, StoreError
from ca_daemon.journal.store.records import (
    ReadOnlyStore,
    RecordConflict,
    RecordInvalid,
    RecordStore,
)
from ca_daemon.model.state import (
    KONG_PREFIX,
    LINKERD_ISSUER,
    STATE_VERSION,
    CaRecord,
    IntermediateEntry,
    IssuedEntry,
    KeyCodec,
    Phase,
    RootEntry,
    RootRole,
    Rotation,
    State,
    ca_from_json,
    ca_to_json,
    credential_from_json,
    credential_to_json,
    migrate_v1,
)
from ca_daemon.pki.bundle import BundleError
from ca_daemon.pki.chain import directly_issued_by

log = logging.getLogger(__name__)

CA_KEY = ""
SHARD_FOLDER = "shards"
SHARDS = 64
LEGACY_CREDENTIALS = "credentials"  # version 2: one record per credential
# Records read at once by a load.
READ_CONCURRENCY = 8
RECOVERY = (
    "restore it from a backup, or move it aside so the next pass rebuilds the journal "
    "from the anchor's named CAs (docs/recovery.md)"
)


class JournalConflict(JournalError):
    """Someone else saved a newer record; reload and decide again."""


class JournalCorrupt(JournalError):
    """The store answered with something that is not a valid record."""


class JournalUnavailable(JournalError):
    """The store did not answer (down, sealed, refusing the token): nothing is known of
    the records, so nothing about them may be advised or done."""


class NewerJournal(JournalError):
    """A record written by a newer ca-daemon: this one must not touch it."""


class MigrationRefused(JournalCorrupt):
    """A record of an older layout cannot be moved: the move is not started."""


class RebuildRefused(JournalError):
    """A lost journal cannot be rebuilt safely from what the anchor holds."""


def _check_version(data: Mapping[str, Any], what: str) -> None:
    version = data.get("version")
    if isinstance(version, int) and version > STATE_VERSION:
        raise NewerJournal(
            f"{what} has state version {version}, written by a newer ca-daemon (this one "
            f"reads up to {STATE_VERSION}): run that release again, or restore the backup "
            "taken before the upgrade; nothing was changed"
        )


@dataclass(frozen=True)
class Versioned:
    state: State
    version: int  # of the CA record; 0: nothing saved yet
    credential_versions: Mapping[str, int] = field(default_factory=dict)  # revisions
    shard_versions: Mapping[str, int] = field(default_factory=dict)


def shard_of(credential: str) -> str:
    """The shard record that holds ``credential`` (stable: the id's CRC-32)."""
    return f"{SHARD_FOLDER}/{zlib.crc32(credential.encode()) % SHARDS:02d}"


def _legacy_id(record_name: str) -> str:
    # Version-2 record names: "linkerd-issuer" or "kong.<dns label>".
    return record_name.replace(".", "/", 1)


def _plain(data: bytes) -> bytes:
    return data


@dataclass(frozen=True)
class _Shard:
    """A shard as last read or written: each credential's stored text (so an unchanged
    one is never unsealed, sealed or encoded again), its revision and what it parses to."""

    version: int
    stored: Mapping[str, str]
    revisions: Mapping[str, int]
    entries: Mapping[str, IssuedEntry]


_EMPTY = _Shard(0, {}, {}, {})


def _encode(doc: Mapping[str, Any]) -> str:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True)


def _shard_record(stored: Mapping[str, str]) -> dict[str, Any]:
    # Each credential is one JSON text, not an object: OpenBao refuses a request body with
    # more than 1,000 strings (max_request_json_strings), and a credential as an object
    # is a dozen of them, so ~80 would already be too many. As text, 2 each.
    return {"version": STATE_VERSION, "credentials": dict(stored)}


class Journal:
    def __init__(
        self, store: RecordStore, seal: KeyCodec = _plain, unseal: KeyCodec = _plain
    ) -> None:
        self.store = store
        self.description = store.description
        self._seal = seal
        self._unseal = unseal
        # By shard: a load re-parses only the shards that moved, and in those only the
        # credentials that did (unsealing may be slow: key derivation).
        self._shards: dict[str, _Shard] = {}
        self._lock = threading.Lock()
        self._migration = threading.Lock()
        self._leftovers_checked = False

    def _guard(self, what: str, action: Callable[[], Any]) -> Any:
        try:
            return action()
        except RecordConflict as exc:
            raise JournalConflict(str(exc)) from None
        except RecordInvalid as exc:
            raise JournalCorrupt(f"{self.description}: {what}: {exc}") from None
        except (StoreError, AnchorError) as exc:  # files unreadable, Vault down or refusing
            raise JournalUnavailable(f"{self.description}: {what}: {exc}") from None
        except (KeyError, ValueError, TypeError, AttributeError, BundleError) as exc:
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

    def _load_ca(self, migrate: bool) -> tuple[CaRecord, int]:
        def read() -> tuple[CaRecord, int]:
            found = self.store.read(CA_KEY)
            if found is None:
                return CaRecord(), 0
            data, version = found
            _check_version(data, f"{self.description}: the CA record")
            if data.get("version") in (1, 2):
                if not migrate:
                    raise _OlderLayout
                self._migrate(data, version)
                return self._load_ca(migrate)
            if migrate and not self._leftovers_checked:
                self._leftovers_checked = True
                self._remove_legacy()
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
        issuer: IssuedEntry | None = None
        clients: dict[str, IssuedEntry] = {}
        revisions: dict[str, int] = {}
        shard_versions: dict[str, int] = {}
        for name, shard in shards:
            shard_versions[name] = shard.version
            for key, entry in shard.entries.items():
                revisions[key] = shard.revisions[key]
                if key == LINKERD_ISSUER:
                    issuer = entry
                else:
                    clients[key.removeprefix(KONG_PREFIX)] = entry
        state = State(ca=record, linkerd_issuer=issuer, kong_clients=clients)
        return Versioned(state, version, revisions, shard_versions)

    def _load_shard(self, name: str) -> tuple[str, _Shard]:
        try:
            found = self._guard(f"read {name}", partial(self.store.read, name))
            if found is None:
                return name, _EMPTY
            data, version = found
            _check_version(data, f"{self.description}: {name}")
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
            if key != LINKERD_ISSUER and not key.startswith(KONG_PREFIX):
                raise ValueError(f"unknown credential {key!r}")
            if not isinstance(text, str):
                raise TypeError(f"{key} is not a JSON text")
            if before.stored.get(key) == text:
                revisions[key], entries[key] = before.revisions[key], before.entries[key]
                continue
            doc = json.loads(text)
            revisions[key] = int(doc["revision"])
            entries[key] = credential_from_json(doc, self._unseal)
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
            stored[key] = _encode({**credential_to_json(entry, self._seal), "revision": revision})
            all_revisions[key] = revisions[key] = revision
            entries[key] = entry
        what = f"save {', '.join(sorted(changes)[:3])}{' …' if len(changes) > 3 else ''}"
        new: int = self._guard(
            what, lambda: self.store.write(shard, _shard_record(stored), version)
        )
        with self._lock:
            self._shards[shard] = _Shard(new, stored, all_revisions, entries)
        return new, revisions

    # --- migration ----------------------------------------------------------------------

    def _migrate(self, data: dict[str, Any], version: int) -> None:
        """Version 1 or 2 → 3: the shards first, then the CA record (check-and-set on the
        old version), then the version-2 records are removed; a crash anywhere only
        repeats it. Every credential is checked before anything is written; keys stay
        sealed exactly as they were; a version-2 record's version becomes the credential's
        revision, so nothing published looks older than before."""
        with self._migration:
            found = self.store.read(CA_KEY)
            if found is None or found[1] != version:
                return  # moved on meanwhile (this process's other thread): read it again
            credentials: dict[str, dict[str, Any]] = {}
            if data.get("version") == 1:
                ca, split = migrate_v1(data)
                for key, doc in split.items():
                    credentials[key] = self._checked(key, {**doc, "revision": 1}, "state")
            else:
                ca = {**data, "version": STATE_VERSION}
                for name in self.store.list(LEGACY_CREDENTIALS):
                    read = self.store.read(f"{LEGACY_CREDENTIALS}/{name}")
                    if read is not None:
                        key = _legacy_id(name)
                        credentials[key] = self._legacy_doc(name, *read)
            self._merge_into_shards(credentials)
            self.store.write(CA_KEY, ca, version)
            self._remove_legacy()
        log.info(
            "%s: migrated the state from version %s to %d (%d credentials)",
            self.description,
            data.get("version"),
            STATE_VERSION,
            len(credentials),
        )

    def _checked(self, key: str, doc: dict[str, Any], where: str) -> dict[str, Any]:
        """``doc`` when it is a credential this release can load; else RecordInvalid
        naming it (and nothing is moved)."""
        try:
            if key != LINKERD_ISSUER and not key.startswith(KONG_PREFIX):
                raise ValueError(f"unknown credential id {key!r}")
            credential_from_json(doc, self._unseal)
        except (KeyError, ValueError, TypeError, AttributeError, BundleError) as exc:
            raise MigrationRefused(
                f"{self.description}: {where}: not a credential record "
                f"({type(exc).__name__}: {exc}); nothing was moved: restore it from a backup, "
                "or delete it so that credential is issued anew"
            ) from None
        return doc

    def _legacy_doc(self, name: str, doc: dict[str, Any], version: int) -> dict[str, Any]:
        where = f"{LEGACY_CREDENTIALS}/{name}"
        moved = {**doc, "version": STATE_VERSION, "revision": version}
        return self._checked(_legacy_id(name), moved, where)

    def _merge_into_shards(self, docs: Mapping[str, dict[str, Any]]) -> None:
        """Write ``docs`` into their shards; where a shard already holds a credential at
        the same or a higher revision (moved before, then renewed), that one stays."""
        by_shard: dict[str, dict[str, dict[str, Any]]] = {}
        for key, doc in docs.items():
            by_shard.setdefault(shard_of(key), {})[key] = doc
        for shard, moved in by_shard.items():
            found = self.store.read(shard)
            stored = (found[0].get("credentials") or {}) if found else {}
            merged = dict(stored)
            for key, doc in moved.items():
                there = json.loads(merged[key]) if key in merged else None
                if there is None or int(there["revision"]) < int(doc["revision"]):
                    merged[key] = _encode(doc)
            if found is None or merged != stored:
                self.store.write(shard, _shard_record(merged), found[1] if found else 0)

    def _remove_legacy(self) -> None:
        """Remove the version-2 records left after a move. One renewed since it was moved
        (by a writer of the previous release still finishing its pass) is moved again
        first: its version, and so its revision, is higher."""
        names = self.store.list(LEGACY_CREDENTIALS)
        docs = {}
        for name in names:
            read = self.store.read(f"{LEGACY_CREDENTIALS}/{name}")
            if read is not None:
                docs[_legacy_id(name)] = self._legacy_doc(name, *read)
        self._merge_into_shards(docs)
        for name in names:
            self.store.delete(f"{LEGACY_CREDENTIALS}/{name}")


class _OlderLayout(JournalError):
    """The stored CA record is an older layout, and this reader must not move it."""


# --- rebuilding a lost CA record from the anchor ------------------------------------------

_NAMED = re.compile(r"^(root|kong)-([0-9]+)$")


def _number(ref: str) -> int:
    found = _NAMED.match(ref)
    return int(found.group(2)) if found else 0


def rebuild_ca_record(
    cas: Iterable[CA],
    credentials: Iterable[tuple[str, IssuedEntry]],
    now: datetime,
    keep_old_for: timedelta,
) -> CaRecord:
    """A CA record from the anchor's named CAs (``root-N``, ``kong-N``) and the credential
    records that survived, for a journal whose CA record was lost.

    The active root is the anchor's default issuer (every activation makes the new root
    the default), else the newest still-valid root that signed a surviving credential
    (directly, or through its Kong intermediate), else the only still-valid root. With
    several valid roots and none of that evidence the rebuild is refused: the newest may
    be a prepared root no verifier trusts yet, the oldest one retired long ago, and
    issuing under the wrong one is an outage. Every
    other still-valid root stays trusted as ``retiring`` (phase retiring) until
    ``keep_old_for`` from now or the last surviving credential under it expired,
    whichever is later: nothing published under it drops out of the bundle. Each root
    gets its newest still-valid Kong intermediate. ``serial`` is the highest N, so no
    name is ever made twice. No still-valid root: no roots (a new one is created, under
    a new name). The record starts a new ``epoch`` (``now`` in seconds): the store's
    versions may have restarted, and what is published from here must still be newer.
    """
    named = [ca for ca in cas if _NAMED.match(ca.ref)]
    roots = sorted(
        (ca for ca in named if ca.ref.startswith("root-") and directly_issued_by(ca.cert, ca.cert)),
        key=lambda ca: _number(ca.ref),
    )
    valid_roots = [r for r in roots if r.cert.not_valid_after_utc > now]
    intermediates: dict[str, CA] = {}
    for ca in sorted((c for c in named if c.ref.startswith("kong-")), key=lambda c: _number(c.ref)):
        if ca.cert.not_valid_after_utc <= now:
            continue
        for root in valid_roots:
            if directly_issued_by(ca.cert, root.cert):
                intermediates[root.ref] = ca  # the newest wins
    creds = list(credentials)

    def signed(root: CA) -> list[IssuedEntry]:
        mine = {root.ref} | {i.ref for r, i in intermediates.items() if r == root.ref}
        found = []
        for _, entry in creds:
            parent = entry.chain[0] if entry.chain else root.cert
            if entry.signer_ref in mine and (
                directly_issued_by(entry.cert, root.cert)
                or (entry.chain and directly_issued_by(parent, root.cert))
            ):
                found.append(entry)
        return found

    in_use = [r for r in valid_roots if signed(r)]
    serial = max((_number(ca.ref) for ca in named), default=0)
    epoch = max(1, int(now.timestamp()))
    if not valid_roots:
        return CaRecord(serial=serial, phase_since=now, epoch=epoch)
    defaults = [r for r in valid_roots if r.default]
    if defaults or in_use or len(valid_roots) == 1:
        active = (defaults or in_use or valid_roots)[-1]
    else:
        raise RebuildRefused(
            f"the journal is lost and the anchor holds {len(valid_roots)} valid roots "
            f"({', '.join(r.ref for r in valid_roots)}) with no sign of which was active: "
            "it is not the default issuer and no surviving credential chains to it. "
            "Nothing was changed. Name the root that signs today (the one in every "
            "published bundle since longest): with Vault, make it the default issuer of the "
            "root mount (config/issuers); with the local anchor, write its name into "
            "anchor/default-root. See docs/recovery.md"
        )
    others = [r for r in valid_roots if r.ref != active.ref]
    entries = [
        RootEntry(r.ref, r.cert, RootRole.RETIRING if r in others else RootRole.ACTIVE, now)
        for r in valid_roots
    ]
    inters = tuple(
        IntermediateEntry(i.ref, i.cert, root_ref, now) for root_ref, i in intermediates.items()
    )
    if not others:
        return CaRecord(
            phase=Phase.STEADY,
            phase_since=now,
            serial=serial,
            roots=tuple(entries),
            intermediates=inters,
            epoch=epoch,
        )
    until = max(
        [now + keep_old_for, *(e.cert.not_valid_after_utc for r in others for e in signed(r))]
    )
    rotation = Rotation(
        started_at=now,
        trigger="rebuild",
        activated_at=now,
        old_chain_until=until,
        retire_after=until,
    )
    return CaRecord(
        phase=Phase.RETIRING,
        phase_since=now,
        serial=serial,
        roots=tuple(entries),
        intermediates=inters,
        rotation=rotation,
        epoch=epoch,
    )
