"""publish.kubernetes.qps/burst and anchor.vault.qps/burst hold every request of the
daemon toward the real kube-apiserver and the real OpenBao: every request sent waited
its turn, and the apiserver's own count (``apiserver_request_total``, shared with other
tests) saw them all. Time is
a frozen clock: the waits are recorded, not slept."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from ca_daemon.anchor.vault.client import VaultClient
from ca_daemon.config.loading import load_settings
from ca_daemon.config.settings import VaultAnchor, VaultAuth
from ca_daemon.journal.open import build_anchor_and_journal
from ca_daemon.publish.kubernetes import KubernetesPublisher
from ca_daemon.rotation.engine import Engine
from ca_daemon.util.kube import api_client
from ca_daemon.util.ratelimit import TokenBucket
from tests.support.servers.kube import Kube, api_requests, total
from tests.support.servers.openbao import OpenBao
from tests.support.servers.tools import unique

pytestmark = pytest.mark.integration

CLIENTS = 12
QPS, BURST = 5.0, 3
_ALL = {"GET", "LIST", "POST", "PUT", "PATCH", "DELETE", "APPLY"}


def freeze(bucket: TokenBucket | None) -> list[float]:
    """Stop ``bucket``'s clock at 0 and record its waits instead of sleeping them."""
    assert bucket is not None, "the configured qps made no limiter"
    waits: list[float] = []
    bucket.clock = lambda: 0.0
    bucket.sleep = waits.append
    return waits


def test_the_publisher_waits_for_the_apiserver_limit_on_every_request(
    kube: Kube, tmp_path: Path
) -> None:
    linkerd_ns, kong_ns = unique("rl-linkerd"), unique("rl-kong")
    for ns in (linkerd_ns, kong_ns):
        kube.create_namespace(ns)
    clients = [{"name": f"c{i}", "common_name": f"kong.c{i}.upstream"} for i in range(CLIENTS)]
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "anchor": {"local": {"dir": str(tmp_path / "data")}},
                "publish": {"kubernetes": {"enabled": True, "qps": QPS, "burst": BURST}},
                "linkerd": {"namespace": linkerd_ns},
                "kong": {"namespace": kong_ns, "clients": clients},
            }
        )
    )
    settings = load_settings(config)
    anchor, journal = build_anchor_and_journal(settings)
    client = api_client(kube.admin_kubeconfig)
    sent = _count_requests(client)
    publisher = KubernetesPublisher(settings, client)
    waits = freeze(publisher.limiter)
    engine = Engine(settings, anchor, journal, [publisher])

    before = api_requests(kube)
    result = engine.reconcile()
    served = total(api_requests(kube) - before, _ALL)
    assert result.ok, result.errors[:3]
    assert len(result.reports[0].changed) == CLIENTS + 3  # the Secrets, Kong CA, Linkerd's 2
    # Every request the publisher sent took a token: the burst at once, then each one
    # more waited a further 1/qps (the last one (sent - burst) / qps, ~3 s here). The
    # apiserver's own count saw them all (and whatever else the shared server served).
    assert len(sent) >= CLIENTS + 3
    assert served >= len(sent)
    assert BURST + len(waits) == len(sent)
    assert max(waits) == pytest.approx((len(sent) - BURST) / QPS)


def _count_requests(client: Any) -> list[str]:
    """Every HTTP request ``client`` sends, as "METHOD url", counted at its connection pool."""
    sent: list[str] = []
    pool = client.rest_client.pool_manager
    request = pool.request

    def counted(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        sent.append(f"{method} {url}")
        return request(method, url, *args, **kwargs)

    pool.request = counted
    return sent


def test_the_vault_client_waits_for_its_limit_on_every_request(openbao: OpenBao) -> None:
    cfg = VaultAnchor(address=openbao.address, auth=VaultAuth(token=openbao.token), qps=2, burst=2)
    client = VaultClient(cfg)
    waits = freeze(client.limiter)
    for _ in range(6):
        assert client.read("sys/mounts", "list secret engines")
    # The token's own lookup (at login) does not count; the six reads do.
    assert waits == pytest.approx([0.5, 1.0, 1.5, 2.0])


def test_no_limit_is_the_default() -> None:
    cfg = VaultAnchor()
    assert (cfg.qps, VaultClient(cfg).limiter) == (0, None)
