"""Persisting the state with check-and-set, so two writers can never both win.

The CA record is one record; each credential is a record of its own, written only
when it changes, so a step writes O(1) data and 5,000 clients never approach a
storage entry limit (Vault's integrated storage refuses entries over 1 MiB).

The engine saves the state *before* it publishes anything derived from it; a crash
between the two is repaired by publishing again from the saved state. A version-1
state (everything in one document) is split into records on first load.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from ca_daemon.anchor.base import CA, AnchorError
from ca_daemon.anchor.records import RecordConflict, RecordInvalid, RecordStore
from ca_daemon.pki.bundle import BundleError
from ca_daemon.pki.chain import directly_issued_by
from ca_daemon.rotation.state import (
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

log = logging.getLogger(__name__)

CA_KEY = ""
CREDENTIALS = "credentials"
# Credential records read at once by a load.
READ_CONCURRENCY = 8
RECOVERY = (
    "restore it from a backup, or move it aside so the next pass rebuilds the journal "
    "from the anchor's named CAs (docs/recovery.md)"
)


class JournalError(Exception):
    pass


class JournalConflict(JournalError):
    """Someone else saved a newer record; reload and decide again."""


class JournalCorrupt(JournalError):
    """The store answered with something that is not a valid record."""


class JournalUnavailable(JournalError):
    """The store did not answer (down, sealed, refusing the token): nothing is known of
    the records, so nothing about them may be advised or done."""


class NewerJournal(JournalError):
    """A record written by a newer ca-daemon: this one must not touch it."""


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
    credential_versions: Mapping[str, int] = field(default_factory=dict)


def _record_key(credential: str) -> str:
    # Credential ids are "linkerd-issuer" or "kong/<dns label>"; a dot cannot clash.
    return f"{CREDENTIALS}/{credential.replace('/', '.')}"


def _credential_id(record_name: str) -> str:
    return record_name.replace(".", "/", 1)


def _plain(data: bytes) -> bytes:
    return data


class Journal:
    def __init__(
        self, store: RecordStore, seal: KeyCodec = _plain, unseal: KeyCodec = _plain
    ) -> None:
        self.store = store
        self.description = store.description
        self._seal = seal
        self._unseal_raw = unseal
        # Unsealing may be slow (key derivation); a key's sealed text never changes.
        self._unsealed: dict[bytes, bytes] = {}
        self._lock = threading.Lock()

    def _unseal(self, sealed: bytes) -> bytes:
        with self._lock:
            cached = self._unsealed.get(sealed)
        if cached is None:
            cached = self._unseal_raw(sealed)
            with self._lock:
                self._unsealed[sealed] = cached
        return cached

    def _guard(self, what: str, action: Callable[[], Any]) -> Any:
        try:
            return action()
        except RecordConflict as exc:
            raise JournalConflict(str(exc)) from None
        except RecordInvalid as exc:
            raise JournalCorrupt(f"{self.description}: {what}: {exc}") from None
        except AnchorError as exc:
            raise JournalUnavailable(f"{self.description}: {what}: {exc}") from None
        except (KeyError, ValueError, TypeError, BundleError) as exc:
            raise JournalCorrupt(
                f"{self.description}: {what}: invalid content ({type(exc).__name__}: {exc})"
            ) from None

    # --- reading ------------------------------------------------------------------------

    def load_ca(self) -> tuple[CaRecord, int]:
        def read() -> tuple[CaRecord, int]:
            found = self.store.read(CA_KEY)
            if found is None:
                return CaRecord(), 0
            data, version = found
            _check_version(data, f"{self.description}: the CA record")
            if data.get("version") == 1:
                self._migrate(data, version)
                return self.load_ca()
            return ca_from_json(data), version

        try:
            result: tuple[CaRecord, int] = self._guard("read the CA record", read)
        except JournalCorrupt as exc:
            # Only for a record that is there and invalid: advising to move aside a journal
            # the store merely did not serve (Vault down) would throw a healthy one away.
            raise JournalCorrupt(f"{exc}: {RECOVERY}") from None
        return result

    def load(self) -> Versioned:
        record, version = self.load_ca()
        issuer: IssuedEntry | None = None
        clients: dict[str, IssuedEntry] = {}
        versions: dict[str, int] = {}
        names: list[str] = self._guard("list credentials", lambda: self.store.list(CREDENTIALS))
        # One record per credential: read them in parallel, or a pass over thousands of
        # clients waits for thousands of round trips to Vault one after the other.
        with ThreadPoolExecutor(max_workers=READ_CONCURRENCY) as pool:
            found = list(pool.map(self._load_credential, names))
        for loaded in found:
            if loaded is None:
                continue
            key, entry, cred_version = loaded
            versions[key] = cred_version
            if key == LINKERD_ISSUER:
                issuer = entry
            else:
                clients[key.removeprefix(KONG_PREFIX)] = entry
        state = State(ca=record, linkerd_issuer=issuer, kong_clients=clients)
        return Versioned(state, version, versions)

    def _load_credential(self, name: str) -> tuple[str, IssuedEntry, int] | None:
        key = _credential_id(name)
        try:
            found = self._guard(f"read {key}", partial(self.store.read, f"{CREDENTIALS}/{name}"))
            if found is None:
                return None
            data, cred_version = found
            _check_version(data, f"{self.description}: credential {key}")
            entry = self._guard(f"read {key}", partial(credential_from_json, data, self._unseal))
        except JournalCorrupt as exc:
            raise JournalCorrupt(
                f"{exc}: restore it from a backup, or delete it so that credential is "
                "issued anew (nothing is overwritten while it is unreadable)"
            ) from None
        return key, entry, cred_version

    # --- writing ------------------------------------------------------------------------

    def save_ca(self, record: CaRecord, version: int) -> int:
        new: int = self._guard(
            "save the CA record", lambda: self.store.write(CA_KEY, ca_to_json(record), version)
        )
        return new

    def save_credential(self, key: str, entry: IssuedEntry | None, version: int) -> int:
        """Write (or, for None, delete) one credential; its new version (0 when deleted)."""
        record_key = _record_key(key)
        if entry is None:
            self._guard(f"delete {key}", lambda: self.store.delete(record_key))
            return 0
        doc = credential_to_json(entry, self._seal)
        new: int = self._guard(f"save {key}", lambda: self.store.write(record_key, doc, version))
        with self._lock:
            self._unsealed[doc["key"].encode()] = entry.key_pem
        return new

    # --- migration ----------------------------------------------------------------------

    def _migrate(self, data: dict[str, Any], version: int) -> None:
        """Version 1 → 2: credentials first, then the CA record (check-and-set on the old
        version), so a crash in between only repeats the migration."""
        ca, credentials = migrate_v1(data)
        for key, doc in credentials.items():
            record_key = _record_key(key)
            found = self.store.read(record_key)
            self.store.write(record_key, doc, found[1] if found else 0)
        self.store.write(CA_KEY, ca, version)
        log.info(
            "%s: migrated the state from version 1 to 2 (%d credentials)",
            self.description,
            len(credentials),
        )


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
