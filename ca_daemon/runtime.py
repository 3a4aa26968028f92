"""Wiring: the anchor, journal and publishers a configuration asks for."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ca_daemon.anchor.base import Anchor
from ca_daemon.anchor.local import LocalAnchor, load_or_create_passphrase
from ca_daemon.anchor.vault import VaultClient, VaultPkiAnchor
from ca_daemon.config import Settings
from ca_daemon.kube import api_client
from ca_daemon.publish.base import Publisher
from ca_daemon.publish.directory import DirectoryPublisher
from ca_daemon.publish.kong_admin import KongAdminPublisher
from ca_daemon.publish.kubernetes import KubernetesPublisher
from ca_daemon.rotation.engine import Engine
from ca_daemon.rotation.journal import FileJournal, Journal, VaultJournal

STATE_FILE = "state.json"


@dataclass(frozen=True)
class Runtime:
    anchor: Anchor
    journal: Journal
    publishers: list[Publisher]


def directory_publishing(settings: Settings) -> bool:
    return settings.publish.directory is not None or not settings.kubernetes_enabled


def build_anchor_and_journal(settings: Settings) -> tuple[Anchor, Journal]:
    if settings.anchor.backend == "local":
        local = settings.anchor.local
        passphrase = load_or_create_passphrase(local.effective_passphrase_file)
        return LocalAnchor(local.dir, passphrase), FileJournal(local.dir / STATE_FILE, passphrase)
    vault = settings.anchor.vault
    env_token = os.environ.get("VAULT_TOKEN") or os.environ.get("BAO_TOKEN")
    client = VaultClient(vault, env_token=env_token)
    return VaultPkiAnchor(client), VaultJournal(client, vault.kv_mount, vault.state_path)


def build_runtime(settings: Settings) -> Runtime:
    anchor, journal = build_anchor_and_journal(settings)
    publishers: list[Publisher] = []
    if directory_publishing(settings):
        publishers.append(DirectoryPublisher(settings.publish_directory))
    if settings.kubernetes_enabled:
        publishers.append(KubernetesPublisher(settings, api_client()))
    if settings.kong.enabled and settings.kong.delivery == "admin-api":
        publishers.append(KongAdminPublisher(settings.kong))
    return Runtime(anchor=anchor, journal=journal, publishers=publishers)


def build_engine(settings: Settings) -> Engine:
    runtime = build_runtime(settings)
    return Engine(settings, runtime.anchor, runtime.journal, runtime.publishers)
