"""A real Prometheus server (Debian package) per test configuration, plus promtool."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
import pytest

from tests.support.servers.tools import ServerProcess, free_port, require_tool


@dataclass(frozen=True)
class Prometheus:
    url: str  # http://127.0.0.1:PORT
    config_file: Path

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Instant query; returns the `result` list (vector samples) or raises on error."""
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=30)
        body = response.json()
        if body.get("status") != "success":
            raise AssertionError(f"query {promql!r} failed: {body}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def wait_for(self, promql: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Poll `promql` until it returns a non-empty result (scrapes and rules take a moment)."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(promql)
            if result or time.monotonic() > deadline:
                return result
            time.sleep(0.25)

    def reload(self) -> None:
        """Re-read config and rule files (the server runs with --web.enable-lifecycle)."""
        httpx.post(f"{self.url}/-/reload", timeout=30).raise_for_status()

    def rules(self) -> list[dict[str, Any]]:
        """Loaded rule groups, as /api/v1/rules reports them."""
        groups: list[dict[str, Any]] = httpx.get(f"{self.url}/api/v1/rules").json()["data"][
            "groups"
        ]
        return groups


class PrometheusFactory(Protocol):
    def __call__(
        self,
        scrape_configs: list[dict[str, Any]] | None = None,
        rule_files: list[Path] | None = None,
        *,
        scrape_interval: str = "1s",
        self_scrape: bool = True,
    ) -> Prometheus: ...


@pytest.fixture(scope="session")
def prometheus_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusFactory]:
    """Start Prometheus servers: `prometheus_factory(scrape_configs=[...], rule_files=[...])`.

    Each call starts its own server (tmp storage, free port); all are stopped at session end.
    With `self_scrape` (default) a job named `self` scrapes the server itself, so there is
    always one real target. Scrape and evaluation run every second to keep tests quick.
    """
    binary = require_tool("prometheus")
    servers: list[ServerProcess] = []

    def start(
        scrape_configs: list[dict[str, Any]] | None = None,
        rule_files: list[Path] | None = None,
        *,
        scrape_interval: str = "1s",
        self_scrape: bool = True,
    ) -> Prometheus:
        workdir = tmp_path_factory.mktemp("prometheus")
        port = free_port()
        jobs = list(scrape_configs or [])
        if self_scrape:
            jobs.append(
                {"job_name": "self", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
            )
        config = {
            "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
            "rule_files": [str(Path(f).resolve()) for f in rule_files or []],
            "scrape_configs": jobs,
        }
        config_file = workdir / "prometheus.yml"
        config_file.write_text(json.dumps(config, indent=2))  # JSON is valid YAML
        server = ServerProcess(
            "prometheus",
            [
                binary,
                f"--config.file={config_file}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--web.enable-lifecycle",
                "--log.level=warn",
            ],
            log_path=workdir / "prometheus.log",
        )
        servers.append(server)
        url = f"http://127.0.0.1:{port}"
        server.wait_ready(lambda: httpx.get(f"{url}/-/ready").status_code == 200)
        return Prometheus(url=url, config_file=config_file)

    try:
        yield start
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="session")
def promtool() -> str:
    """Path of promtool, for `promtool check rules FILE` and `promtool test rules FILE`."""
    return require_tool("promtool")
