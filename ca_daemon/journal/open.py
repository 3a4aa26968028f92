"""Open the anchor and the journal a configuration names (local files or Vault)."""

from __future__ import annotations

import os

from ca_daemon.anchor.base import Anchor
from ca_daemon.anchor.local import LocalAnchor, load_or_create_passphrase, read_passphrase
from ca_daemon.anchor.vault.client import VaultClient
from ca_daemon.anchor.vault.pki import VaultPkiAnchor
from ca_daemon.config.settings import Settings
from ca_daemon.journal.journal import Journal
from ca_daemon.journal.store.records import FileRecordStore, ReadOnlyStore, RecordStore
from ca_daemon.journal.store.vault_kv import VaultKvStore
from ca_daemon.pki.keys import load_private_key, private_key_pem


def file_journal(settings: Settings, passphrase: bytes, *, read_only: bool = False) -> Journal:
    """The local anchor's journal: records under anchor.local.dir, keys encrypted."""

    def seal(key_pem: bytes) -> bytes:
        return private_key_pem(load_private_key(key_pem), passphrase)

    def unseal(sealed: bytes) -> bytes:
        return private_key_pem(load_private_key(sealed, passphrase))

    store: RecordStore = FileRecordStore(settings.anchor.local.dir)
    if read_only:
        store = ReadOnlyStore(store)
    return Journal(store, seal, unseal)


def build_anchor_and_journal(settings: Settings, *, create: bool = True) -> tuple[Anchor, Journal]:
    """The anchor and journal; ``create=False`` for commands that must not write: the
    passphrase is only read (NoState when there is none yet) and nothing is saved."""
    if settings.anchor.backend == "local":
        local = settings.anchor.local
        path = local.effective_passphrase_file
        passphrase = (
            load_or_create_passphrase(path, local.dir)
            if create
            else read_passphrase(path, local.dir)
        )
        anchor = LocalAnchor(local.dir, passphrase, (path, settings.api_token_file))
        return anchor, file_journal(settings, passphrase, read_only=not create)
    vault = settings.anchor.vault
    env_token = os.environ.get("VAULT_TOKEN") or os.environ.get("BAO_TOKEN")
    client = VaultClient(vault, env_token=env_token, pool_size=settings.rotation.concurrency)
    store: RecordStore = VaultKvStore(client, vault.kv_mount, vault.state_path)
    if not create:
        store = ReadOnlyStore(store)
    return VaultPkiAnchor(client), Journal(store)
