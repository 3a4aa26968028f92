"""How the journal lies in its store: record keys, shards, encoding, version checks.

The CA record is one record (key ``CA_KEY``); the credentials live in ``SHARDS`` shard
records under ``SHARD_FOLDER``, each credential always in the same one (by a hash of
its id), stored as one JSON text per credential. Version 2 kept one record per
credential under ``LEGACY_CREDENTIALS``.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from typing import Any

from ca_daemon.errors import NewerJournal
from ca_daemon.model.state import CA_FEATURES_VERSION, STATE_VERSION

CA_KEY = ""
SHARD_FOLDER = "shards"
SHARDS = 64
LEGACY_CREDENTIALS = "credentials"  # version 2: one record per credential


def check_version(data: Mapping[str, Any], what: str) -> None:
    version = data.get("version")
    if isinstance(version, int) and version > CA_FEATURES_VERSION:
        raise NewerJournal(
            f"{what} has state version {version}, written by a newer ca-daemon (this one "
            f"reads up to {CA_FEATURES_VERSION}): run that release again, or restore the backup "
            "taken before the upgrade; nothing was changed"
        )


def shard_of(credential: str) -> str:
    """The shard record that holds ``credential`` (stable: the id's CRC-32)."""
    return f"{SHARD_FOLDER}/{zlib.crc32(credential.encode()) % SHARDS:02d}"


def legacy_id(record_name: str) -> str:
    # Version-2 record names: "linkerd-issuer" or "kong.<dns label>".
    return record_name.replace(".", "/", 1)


def encode(doc: Mapping[str, Any]) -> str:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True)


def shard_record(stored: Mapping[str, str]) -> dict[str, Any]:
    # Each credential is one JSON text, not an object: OpenBao refuses a request body with
    # more than 1,000 strings (max_request_json_strings), and a credential as an object
    # is a dozen of them, so ~80 would already be too many. As text, 2 each.
    return {"version": STATE_VERSION, "credentials": dict(stored)}
