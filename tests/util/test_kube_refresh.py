"""The Kubernetes client's token hook runs before every request; it is throttled to once
a second, so thousands of writes do not each re-apply the whole kubeconfig."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.config import kube_config

from ca_daemon.util.kube import api_client, throttled

pytestmark = pytest.mark.usefixtures("clean_env")


def test_the_hook_runs_at_most_once_a_second_and_again_after() -> None:
    moments = iter([0.0, 0.3, 0.99, 1.2, 1.5, 2.3])
    ran: list[Any] = []
    hook = throttled(ran.append, every=1.0, clock=lambda: next(moments))
    for i in range(6):
        hook(i)
    assert ran == [0, 3, 5]


def test_a_kubeconfig_client_re_applies_its_token_once_for_many_requests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
                "users": [{"name": "u", "user": {"token": "not-a-real-token"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    applied = []
    real = kube_config.KubeConfigLoader._set_config

    def counting(self: Any, configuration: Any) -> None:
        applied.append(1)
        real(self, configuration)

    monkeypatch.setattr(kube_config.KubeConfigLoader, "_set_config", counting)
    api = api_client(path)
    applied.clear()
    for _ in range(200):  # what update_params_for_auth does before each request
        settings = api.configuration.auth_settings()
    assert settings["BearerToken"]["value"] == "Bearer not-a-real-token"
    assert len(applied) <= 1
