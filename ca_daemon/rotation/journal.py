"""Persisting the state with check-and-set, so two writers can never both win.

The engine saves the state *before* it publishes anything derived from it; a crash
between the two is repaired by publishing again from the saved state.
"""

from __future__ import annotations

import fcntl
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ca_daemon.anchor.base import AnchorError
from ca_daemon.anchor.vault import VaultClient, VaultNotFound
from ca_daemon.files import ensure_private_dir, write_atomic
from ca_daemon.pki.keys import load_private_key, private_key_pem
from ca_daemon.rotation.state import State, from_json, to_json


class JournalError(Exception):
    pass


class JournalConflict(JournalError):
    """Someone else saved a newer state; reload and decide again."""


@dataclass(frozen=True)
class Versioned:
    state: State
    version: int  # 0: nothing saved yet


class Journal(Protocol):
    description: str

    def load(self) -> Versioned: ...

    def save(self, state: State, version: int) -> int:
        """Save if the stored version is still ``version``; return the new version."""


class FileJournal:
    """State in one JSON file (mode 0600); issued keys inside it are encrypted."""

    def __init__(self, path: Path, passphrase: bytes) -> None:
        self.path = path
        self._passphrase = passphrase
        self.description = f"state file {path}"

    def _seal(self, key_pem: bytes) -> bytes:
        return private_key_pem(load_private_key(key_pem), self._passphrase)

    def _unseal(self, sealed: bytes) -> bytes:
        return private_key_pem(load_private_key(sealed, self._passphrase))

    @contextmanager
    def _locked(self) -> Iterator[None]:
        ensure_private_dir(self.path.parent)
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _read(self) -> tuple[dict[str, Any] | None, int]:
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None, 0
        except (OSError, ValueError) as exc:
            raise JournalError(f"{self.description}: unreadable: {exc}") from exc
        return doc["state"], int(doc["version"])

    def load(self) -> Versioned:
        data, version = self._read()
        if data is None:
            return Versioned(State(), 0)
        try:
            return Versioned(from_json(data, self._unseal), version)
        except (KeyError, ValueError) as exc:
            raise JournalError(f"{self.description}: invalid content: {exc}") from exc

    def save(self, state: State, version: int) -> int:
        with self._locked():
            _, current = self._read()
            if current != version:
                raise JournalConflict(f"{self.description}: version {current}, expected {version}")
            doc = {"version": version + 1, "state": to_json(state, self._seal)}
            write_atomic(self.path, json.dumps(doc, indent=1).encode(), mode=0o600)
        return version + 1


class VaultJournal:
    """State in a Vault KV v2 secret, written with ``cas`` (0 = create only)."""

    def __init__(self, client: VaultClient, mount: str, path: str) -> None:
        self.client = client
        self._data_path = f"{mount}/data/{path}"
        self.description = f"Vault KV {mount}/{path}"

    def load(self) -> Versioned:
        try:
            response = self.client.request("GET", self._data_path, "read the state")
        except VaultNotFound:
            return Versioned(State(), 0)
        body = (response or {}).get("data") or {}
        data = body.get("data")
        version = int((body.get("metadata") or {}).get("version") or 0)
        if not data:  # deleted version
            return Versioned(State(), version)
        try:
            return Versioned(from_json(data["state"]), version)
        except (KeyError, ValueError) as exc:
            raise JournalError(f"{self.description}: invalid content: {exc}") from exc

    def save(self, state: State, version: int) -> int:
        try:
            response = self.client.request(
                "POST",
                self._data_path,
                "save the state",
                {"options": {"cas": version}, "data": {"state": to_json(state)}},
            )
        except AnchorError as exc:
            if "check-and-set" in str(exc):
                raise JournalConflict(
                    f"{self.description}: changed since version {version}"
                ) from None
            raise
        return int(((response or {}).get("data") or {}).get("version") or version + 1)
