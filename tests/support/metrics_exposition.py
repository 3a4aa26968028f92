"""What the daemon exports on /metrics after one engine pass on the embedded default's parts.

``exposition(settings, troubled=...)`` renders a fresh registry after a clean pass, or a
troubled one (a refused issuance, a publish error, drift) where every metric has samples;
``samples`` parses it back; ``values``/``metric`` read one metric from a registry;
``METRIC_NAME`` finds metric names in PromQL.
"""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import yaml
from cryptography import x509
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ca_daemon.anchor.local import LocalAnchor, load_or_create_passphrase
from ca_daemon.config.loading import embedded_default, load_settings
from ca_daemon.config.settings import ClusterConfig, Settings
from ca_daemon.errors import AnchorError
from ca_daemon.journal.open import file_journal
from ca_daemon.model.state import IssuerAnswer
from ca_daemon.model.world import TrustWorld
from ca_daemon.publish.base import Publisher, PublishReport
from ca_daemon.publish.directory import DirectoryPublisher
from ca_daemon.rotation.engine import Engine
from ca_daemon.rotation.issuer_confirmation import issuer_serial
from ca_daemon.rotation.results import PassResult
from ca_daemon.service.metrics import Metrics

NOW = datetime(2026, 1, 1, tzinfo=UTC)

METRIC_NAME = re.compile(r"\bca_daemon_[a-z_]+\b")


class _RefusingClients(LocalAnchor):
    """Refuses to sign Kong client certificates: the pass records a failed issuance."""

    def sign_client(self, *args: object, **kwargs: object) -> x509.Certificate:
        raise AnchorError("local anchor: signing refused (test)")


class _TroubledPublisher:
    """Reports one object it could not write and one someone else changed."""

    description = "troubled (test)"

    def publish(self, world: TrustWorld) -> PublishReport:
        return PublishReport(
            self.description,
            drifted=["configmap/linkerd/linkerd-identity-trust-roots (keys changed: ca.crt)"],
            errors={"secret/kong/kong-client-example": "forbidden (test)"},
        )


def default_settings(tmp_path: Path) -> Settings:
    """The embedded default, with its data under tmp_path."""
    config = embedded_default()
    config["anchor"]["local"]["dir"] = str(tmp_path / "data")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    settings = load_settings(path)
    assert not settings.kubernetes_enabled
    return settings


def exposition(settings: Settings, *, troubled: bool) -> str:
    """One engine pass on the default parts, observed into a fresh registry, rendered."""
    local = settings.anchor.local
    passphrase = load_or_create_passphrase(local.effective_passphrase_file)
    anchor_cls = _RefusingClients if troubled else LocalAnchor
    publishers: list[Publisher] = [DirectoryPublisher(settings.publish_directory)]
    if troubled:
        publishers.append(_TroubledPublisher())
    engine = Engine(
        settings, anchor_cls(local.dir, passphrase), file_journal(settings, passphrase), publishers
    )
    result = engine.reconcile(now=NOW)
    assert result.ok is not troubled, result.errors
    metrics = Metrics()
    metrics.observe(result, settings, NOW)
    state = result.state
    if troubled and state is not None and state.linkerd_issuer is not None:
        # As a daemon publishing to a cluster sees the issuer it put out while Linkerd has
        # not said it loaded it (the directory-only default never asks): the issuer gauges.
        publish = settings.publish.model_copy(
            update={"kubernetes": settings.publish.kubernetes.model_copy(update={"enabled": True})}
        )
        clustered = settings.model_copy(update={"publish": publish})
        out = IssuerAnswer(issuer_serial(state.linkerd_issuer.cert), NOW)
        metrics.observe_state(
            replace(state, ca=replace(state.ca, issuer_answer=out)), clustered, NOW
        )
    if troubled:
        # A linked cluster that cannot be reached: the per-cluster gauges.
        linked = [ClusterConfig(name="home"), ClusterConfig(name="east", kubeconfig=Path("/k"))]
        unreached = PublishReport(
            "kubernetes/east",
            errors={"*": "API server unreachable (test)"},
            cluster="east",
            holds=True,
            reached_at=NOW,
        )
        clusters = settings.model_copy(update={"clusters": linked})
        metrics.observe(PassResult(reports=[unreached], pending_pods=()), clusters, NOW)
    return generate_latest(metrics.registry).decode()


def values(metrics: Metrics, name: str, **labels: str) -> list[float]:
    """The values of ``name``'s samples with ``labels``, read from the /metrics text."""
    text = generate_latest(metrics.registry).decode()
    return [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    ]


def metric(metrics: Metrics, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples with ``labels`` (0 when there is none)."""
    return sum(values(metrics, name, **labels))


def samples(text: str) -> dict[str, list[dict[str, str]]]:
    """Sample name -> the label sets it was exported with."""
    found: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append(dict(sample.labels))
    return found
