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
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from ca_daemon.anchor.base import AnchorError
from ca_daemon.anchor.records import RecordConflict, RecordStore
from ca_daemon.pki.bundle import BundleError
from ca_daemon.rotation.state import (
    KONG_PREFIX,
    LINKERD_ISSUER,
    CaRecord,
    IssuedEntry,
    KeyCodec,
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


class JournalError(Exception):
    pass


class JournalConflict(JournalError):
    """Someone else saved a newer record; reload and decide again."""


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
        except AnchorError as exc:
            raise JournalError(f"{self.description}: {what}: {exc}") from None
        except (KeyError, ValueError, TypeError, BundleError) as exc:
            raise JournalError(
                f"{self.description}: {what}: invalid content ({type(exc).__name__}: {exc})"
            ) from None

    # --- reading ------------------------------------------------------------------------

    def load_ca(self) -> tuple[CaRecord, int]:
        def read() -> tuple[CaRecord, int]:
            found = self.store.read(CA_KEY)
            if found is None:
                return CaRecord(), 0
            data, version = found
            if data.get("version") == 1:
                self._migrate(data, version)
                return self.load_ca()
            return ca_from_json(data), version

        result: tuple[CaRecord, int] = self._guard("read the CA record", read)
        return result

    def load(self) -> Versioned:
        record, version = self.load_ca()
        issuer: IssuedEntry | None = None
        clients: dict[str, IssuedEntry] = {}
        versions: dict[str, int] = {}
        names: list[str] = self._guard("list credentials", lambda: self.store.list(CREDENTIALS))
        for name in names:
            key = _credential_id(name)
            found = self._guard(f"read {key}", partial(self.store.read, f"{CREDENTIALS}/{name}"))
            if found is None:
                continue
            data, cred_version = found
            entry = self._guard(f"read {key}", partial(credential_from_json, data, self._unseal))
            versions[key] = cred_version
            if key == LINKERD_ISSUER:
                issuer = entry
            else:
                clients[key.removeprefix(KONG_PREFIX)] = entry
        state = State(ca=record, linkerd_issuer=issuer, kong_clients=clients)
        return Versioned(state, version, versions)

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
