"""Wiring: the anchor, journal, publishers and Linkerd rollout a configuration asks for."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ca_daemon.anchor.base import Anchor
from ca_daemon.anchor.local import LocalAnchor, load_or_create_passphrase, read_passphrase
from ca_daemon.anchor.records import FileRecordStore, ReadOnlyStore, RecordStore
from ca_daemon.anchor.vault import VaultClient, VaultKvStore, VaultPkiAnchor
from ca_daemon.config import Settings
from ca_daemon.kube import api_client
from ca_daemon.pki.keys import load_private_key, private_key_pem
from ca_daemon.publish.base import Publisher
from ca_daemon.publish.directory import DirectoryPublisher
from ca_daemon.publish.kong_admin import KongAdminPublisher
from ca_daemon.publish.kubernetes import KubernetesPublisher
from ca_daemon.rotation.engine import Engine, Rollout
from ca_daemon.rotation.journal import Journal


@dataclass(frozen=True)
class Runtime:
    anchor: Anchor
    journal: Journal
    publishers: list[Publisher]
    rollout: Rollout | None = None


def directory_publishing(settings: Settings) -> bool:
    return settings.publish.directory is not None or not settings.kubernetes_enabled


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
        passphrase = load_or_create_passphrase(path) if create else read_passphrase(path)
        anchor = LocalAnchor(local.dir, passphrase, (path, settings.api_token_file))
        return anchor, file_journal(settings, passphrase, read_only=not create)
    vault = settings.anchor.vault
    env_token = os.environ.get("VAULT_TOKEN") or os.environ.get("BAO_TOKEN")
    client = VaultClient(vault, env_token=env_token, pool_size=settings.rotation.concurrency)
    store: RecordStore = VaultKvStore(client, vault.kv_mount, vault.state_path)
    if not create:
        store = ReadOnlyStore(store)
    return VaultPkiAnchor(client), Journal(store)


def build_runtime(settings: Settings) -> Runtime:
    anchor, journal = build_anchor_and_journal(settings)
    publishers: list[Publisher] = []
    rollout: Rollout | None = None
    if directory_publishing(settings):
        publishers.append(DirectoryPublisher(settings.publish_directory))
    if settings.kubernetes_enabled:
        from ca_daemon.publish.linkerd_rollout import LinkerdRollout

        api = api_client()
        publishers.append(KubernetesPublisher(settings, api))
        if settings.linkerd.enabled:
            rollout = LinkerdRollout(settings, api)
    if settings.kong.enabled and settings.kong.delivery == "admin-api":
        publishers.append(KongAdminPublisher(settings.kong))
    return Runtime(anchor=anchor, journal=journal, publishers=publishers, rollout=rollout)


def build_engine(settings: Settings) -> Engine:
    runtime = build_runtime(settings)
    return Engine(
        settings, runtime.anchor, runtime.journal, runtime.publishers, rollout=runtime.rollout
    )
