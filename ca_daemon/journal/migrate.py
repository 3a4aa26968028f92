"""Moving an older journal layout into shards (version 1: one document; version 2: one
record per credential). Only a writer moves it; every credential is checked before
anything is written, and a crash anywhere only repeats the move."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

from ca_daemon.errors import MigrationRefused, PkiError
from ca_daemon.journal.format import (
    CA_KEY,
    LEGACY_CREDENTIALS,
    encode,
    legacy_id,
    shard_of,
    shard_record,
)
from ca_daemon.journal.store.records import RecordStore
from ca_daemon.model.state import (
    KONG_PREFIX,
    LINKERD_ISSUER,
    STATE_VERSION,
    credential_from_json,
    migrate_v1,
)

log = logging.getLogger(__name__)


class Migration:
    """The move of one store's older layout; ``unseal`` checks each key can be read."""

    def __init__(self, store: RecordStore, description: str, unseal: Callable[[bytes], bytes]):
        self.store = store
        self.description = description
        self._unseal = unseal
        self._lock = threading.Lock()  # one move at a time in this process

    def migrate(self, data: dict[str, Any], version: int) -> None:
        """Version 1 or 2 → 3: the shards first, then the CA record (check-and-set on the
        old version), then the version-2 records are removed; a crash anywhere only
        repeats it. Every credential is checked before anything is written; keys stay
        sealed exactly as they were; a version-2 record's version becomes the credential's
        revision, so nothing published looks older than before."""
        with self._lock:
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
                        key = legacy_id(name)
                        credentials[key] = self._legacy_doc(name, *read)
            self._merge_into_shards(credentials)
            self.store.write(CA_KEY, ca, version)
            self.remove_legacy()
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
        except (KeyError, ValueError, TypeError, AttributeError, PkiError) as exc:
            raise MigrationRefused(
                f"{self.description}: {where}: not a credential record "
                f"({type(exc).__name__}: {exc}); nothing was moved: restore it from a backup, "
                "or delete it so that credential is issued anew"
            ) from None
        return doc

    def _legacy_doc(self, name: str, doc: dict[str, Any], version: int) -> dict[str, Any]:
        where = f"{LEGACY_CREDENTIALS}/{name}"
        moved = {**doc, "version": STATE_VERSION, "revision": version}
        return self._checked(legacy_id(name), moved, where)

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
                    merged[key] = encode(doc)
            if found is None or merged != stored:
                self.store.write(shard, shard_record(merged), found[1] if found else 0)

    def remove_legacy(self) -> None:
        """Remove the version-2 records left after a move. One renewed since it was moved
        (by a writer of the previous release still finishing its pass) is moved again
        first: its version, and so its revision, is higher."""
        names = self.store.list(LEGACY_CREDENTIALS)
        docs = {}
        for name in names:
            read = self.store.read(f"{LEGACY_CREDENTIALS}/{name}")
            if read is not None:
                docs[legacy_id(name)] = self._legacy_doc(name, *read)
        self._merge_into_shards(docs)
        for name in names:
            self.store.delete(f"{LEGACY_CREDENTIALS}/{name}")
