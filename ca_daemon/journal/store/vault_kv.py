"""The journal's records in Vault KV v2, each written with check-and-set."""

from __future__ import annotations

import contextlib

from ca_daemon.anchor.vault.client import VaultClient, VaultInvalidRequest, VaultNotFound
from ca_daemon.journal.store.records import Record, RecordConflict, RecordInvalid, check_key


class VaultKvStore:
    """The journal's records in Vault KV v2 under ``state_path``, written with ``cas``."""

    def __init__(self, client: VaultClient, mount: str, path: str) -> None:
        self.client = client
        self.mount = mount
        self.base = path.strip("/")
        self.description = f"Vault KV {mount}/{self.base}"
        # Each record as last read or written, with its version and that version's
        # creation time (versions restart when a record is deleted and made again): a
        # record whose metadata names the same is not fetched again. A shard of 5,000
        # clients' is ~200 KB; its metadata, a few hundred bytes.
        self._known: dict[str, tuple[int, str, Record]] = {}

    def _path(self, key: str) -> str:
        parts = check_key(key)
        return "/".join([self.base, *parts])

    def _version(self, key: str) -> int:
        meta = self.client.read(f"{self.mount}/metadata/{self._path(key)}", "read state metadata")
        return int((meta or {}).get("current_version") or 0)

    def read(self, key: str) -> tuple[Record, int] | None:
        known = self._known.get(key) if key else None  # the CA record: always fetched
        if known is not None and self._current(key) == known[:2]:
            return known[2], known[0]
        data = self.client.read(f"{self.mount}/data/{self._path(key)}", "read the state")
        if not data or not data.get("data"):  # absent, or its latest version deleted
            self._known.pop(key, None)
            return None
        metadata = data.get("metadata") or {}
        version = int(metadata.get("version") or 0)
        record = data["data"].get("state")
        if not isinstance(record, dict):
            raise RecordInvalid(f"{self.description}: {key or 'state'}: no state in the secret")
        if key:
            self._known[key] = (version, str(metadata.get("created_time")), record)
        return record, version

    def _current(self, key: str) -> tuple[int, str] | None:
        """The record's current version and when it was made; None when that version is
        deleted or destroyed (then the data says what there is)."""
        meta = self.client.read(f"{self.mount}/metadata/{self._path(key)}", "read state metadata")
        if not meta:
            return None
        version = int(meta.get("current_version") or 0)
        made = ((meta.get("versions") or {}).get(str(version))) or {}
        if made.get("deletion_time") or made.get("destroyed"):
            return None
        return version, str(made.get("created_time"))

    def write(self, key: str, record: Record, version: int) -> int:
        try:
            return self._write(key, record, version)
        except VaultInvalidRequest:
            pass
        # KV v2 says a check-and-set mismatch only in prose; decide by the stored version.
        current = self._version(key)
        if version == 0 and current and self.read(key) is None:
            # "Does not exist" includes a secret whose latest version was deleted or
            # destroyed: KV keeps counting, so creating it names that version.
            return self._write(key, record, current)
        if current != version:
            raise RecordConflict(
                f"{self.description}: {key or 'state'} is at version {current}, expected {version}"
            )
        return self._write(key, record, version)  # a passing refusal: say it if it repeats

    def _write(self, key: str, record: Record, cas: int) -> int:
        """One write with ``cas``; the common case (a new or current record) costs one request."""
        path = f"{self.mount}/data/{self._path(key)}"
        body = {"options": {"cas": cas}, "data": {"state": record}}
        data = self.client.write(path, "save the state", body)
        version = int(data.get("version") or cas + 1)
        if key and data.get("created_time"):
            self._known[key] = (version, str(data["created_time"]), record)
        return version

    def delete(self, key: str) -> None:
        path = f"{self.mount}/metadata/{self._path(key)}"
        with contextlib.suppress(VaultNotFound):
            self.client.request("DELETE", path, "delete a state record")

    def list(self, folder: str) -> list[str]:
        path = f"{self.mount}/metadata/{self._path(folder)}/"
        try:
            response = self.client.request("LIST", path, "list state records")
        except VaultNotFound:
            return []
        keys = ((response or {}).get("data") or {}).get("keys") or []
        return sorted(k for k in keys if not k.endswith("/"))
