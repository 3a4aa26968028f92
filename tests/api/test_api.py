"""The HTTP API served by real uvicorn on loopback: every status code, and its audit line.

The daemon's parts are the embedded default's (local anchor, files); the Kubernetes
authentication case runs against the real kube-apiserver, and the unreachable journal
is a real OpenBao's KV, stopped under the running API.
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from ca_daemon.api.audit import AuditLog, AuditRecord
from ca_daemon.api.auth import Authenticator, KubernetesAuth, StaticTokenAuth, ensure_token_file
from ca_daemon.api.client import Client
from ca_daemon.api.server import ServerThread, build_app
from ca_daemon.config.loading import load_settings
from ca_daemon.config.settings import ServerSar, Settings
from ca_daemon.model.state import OpState
from ca_daemon.report.forecast import ROTATION_PATH
from ca_daemon.report.rbac import manifests
from ca_daemon.service.metrics import Metrics
from ca_daemon.service.service import DaemonService, Leadership
from ca_daemon.service.wiring import build_engine
from tests.support.fault_kinds import RaftOpenBao
from tests.support.rotation_configs import T0, short_lifetimes
from tests.support.rotation_harness import Clock
from tests.support.servers.kube import Kube
from tests.support.servers.openbao import own_openbao
from tests.support.servers.tools import free_port, unique

pytestmark = pytest.mark.integration


@dataclass
class Served:
    url: str
    token: str
    service: DaemonService
    settings: Settings
    audit_file: Path
    clock: Clock

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def audit(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit_file.read_text().splitlines()]


def _serve(
    tmp_path: Path,
    auth: Authenticator | None = None,
    config_doc: dict[str, Any] | None = None,
    start: datetime = T0,
) -> Iterator[Served]:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(config_doc or short_lifetimes(tmp_path)))
    settings = load_settings(config)
    clock = Clock(start)
    engine = build_engine(settings)
    engine.clock = clock
    service = DaemonService(settings, engine, Metrics(), clock)
    ensure_token_file(settings.api_token_file)
    audit_file = tmp_path / "audit.log"
    app = build_app(service, auth or StaticTokenAuth(settings.api_token_file), AuditLog(audit_file))
    address = f"127.0.0.1:{free_port()}"
    server = ServerThread(app, address)
    server.start()
    url = f"http://{address}"
    for _ in range(100):
        try:
            httpx.get(f"{url}/healthz", timeout=1)
            break
        except httpx.TransportError:
            time.sleep(0.05)
    try:
        yield Served(
            url, settings.api_token_file.read_text().strip(), service, settings, audit_file, clock
        )
    finally:
        server.stop()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    yield from _serve(tmp_path)


def test_health_and_readiness(served: Served, promtool: str) -> None:
    with served.client() as http:
        assert http.get("/healthz").status_code == 200
        not_ready = http.get("/readyz")
        assert not_ready.status_code == 503 and "first pass" in not_ready.text
        served.service.tick()
        assert http.get("/readyz").status_code == 200
        metrics = http.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain; version=")
    assert "ca_daemon_trust_bundle_roots 1.0" in metrics.text
    assert 'ca_daemon_build_info{version="' in metrics.text
    # promtool's linter is clean on exactly what is served.
    lint = subprocess.run(
        [promtool, "check", "metrics"], input=metrics.text, capture_output=True, text=True
    )
    assert lint.returncode == 0 and not lint.stdout.strip(), lint.stdout + lint.stderr


def test_status_needs_the_token(served: Served) -> None:
    served.service.tick()
    with served.client() as anonymous:
        refused = anonymous.get("/v1/status")
        assert refused.status_code == 401
        assert refused.headers["WWW-Authenticate"] == "Bearer"  # RFC 6750
    with served.client("not-the-token") as wrong:
        refused = wrong.get("/v1/status")
        assert refused.status_code == 401
        assert refused.json() == {"error": "invalid token"}
    with served.client(served.token) as http:
        status = http.get("/v1/status")
    assert status.status_code == 200
    view = status.json()
    assert view["phase"] == "steady" and view["leader"] == "self"
    assert [r["name"] for r in view["roots"]] == ["root-1"]
    assert {c["name"] for c in view["clients"]} == {"payments", "orders"}
    lines = served.audit()
    assert [(line["status"], line["caller"]) for line in lines] == [
        (401, "anonymous"),
        (401, "unknown"),
        (200, "static-token"),
    ]
    assert all(served.token not in json.dumps(line) for line in lines)
    assert all(line["source"] == "127.0.0.1" and line["path"] == "/v1/status" for line in lines)


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"not json", 400, "JSON object"),
        (b"[1]", 400, "JSON object"),
        (b"{}", 400, "target is required"),
        (b'{"target": "kong/payments", "colour": "red"}', 400, "unknown field"),
        (b'{"target": "kong/nobody"}', 400, "unknown target"),
        (b'{"target": "kong", "dry_run": "yes"}', 400, "dry_run"),
        (b'{"target": "kong", "reason": "' + b"x" * (70 * 1024) + b'"}', 413, "over 65536"),
    ],
)
def test_bad_rotate_requests(served: Served, body: bytes, status: int, message: str) -> None:
    served.service.tick()
    with served.client(served.token) as http:
        response = http.post("/v1/rotate", content=body)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    (line,) = served.audit()
    assert line["status"] == status and line["caller"] == "static-token"
    record, _ = served.service.engine.journal.load_ca()
    assert record.operations == ()  # nothing was journaled


def test_rotate_journals_then_answers_and_coalesces(served: Served) -> None:
    served.service.tick()
    served.clock.now = T0 + _minutes(1)
    woken: list[int] = []
    served.service.on_wake(lambda: woken.append(1))
    with served.client(served.token) as http:
        first = http.post("/v1/rotate", json={"target": "kong/payments", "reason": "leaked"})
        assert first.status_code == 202
        op_id = first.json()["operation"]
        # Journaled before the answer: a fresh read of the journal already has it.
        record, _ = served.service.engine.journal.load_ca()
        assert record.operation(op_id) is not None
        again = http.post("/v1/rotate", json={"target": "kong/payments"})
        assert again.status_code == 202 and again.json()["operation"] == op_id
        assert woken == [1, 1]
        queued = http.get(f"/v1/operations/{op_id}").json()
        assert queued["state"] == "queued" and queued["target"] == "kong/payments"
        served.clock.now = T0 + _minutes(2)
        result = served.service.tick()
        assert [s.name for s in result.steps if s.action == "IssueKongClient"] == ["payments"]
        done = http.get(f"/v1/operations/{op_id}").json()
        assert done["state"] == "succeeded"
        assert http.get("/v1/operations/nope").status_code == 404
    lines = served.audit()
    assert lines[0]["target"] == "kong/payments" and lines[0]["reason"] == "leaked"
    assert lines[0]["operation"] == op_id and lines[0]["status"] == 202


def test_concurrent_identical_requests_give_one_operation(served: Served) -> None:
    served.service.tick()

    def post(_: int) -> str:
        with served.client(served.token) as http:
            response = http.post("/v1/rotate", json={"target": "kong"})
            assert response.status_code == 202, response.text
            op: str = response.json()["operation"]
            return op

    with ThreadPoolExecutor(max_workers=20) as pool:
        ids = set(pool.map(post, range(100)))
    assert len(ids) == 1
    record, _ = served.service.engine.journal.load_ca()
    assert [o.target for o in record.operations] == ["kong"]


def test_root_rotation_conflict_dry_run_and_standby(served: Served) -> None:
    served.service.tick()
    with served.client(served.token) as http:
        dry = http.post("/v1/rotate", json={"target": "trust-anchor", "dry_run": True})
        assert dry.status_code == 200
        assert [s["action"] for s in dry.json()["steps"]][:1] == ["PrepareRoot"]
        # The whole path, dated: activation after the propagation delay, retirement once
        # everything under the old root has expired.
        path = dry.json()["path"]
        assert [p["action"] for p in path] == [
            "PrepareRoot",
            "Propagate",
            "ConfirmBundle",
            "Activate",
            "Reissue",
            "StartRetiring",
            "Retire",
        ]
        at = {p["action"]: datetime.fromisoformat(p["at"]) for p in path}
        delay = served.service.settings.rotation.propagation_delay
        assert at["Activate"] == at["ConfirmBundle"] + delay
        assert at["Retire"] > at["Activate"] + delay
        assert served.service.engine.journal.load_ca()[0].operations == ()
        started = http.post("/v1/rotate", json={"target": "trust-anchor", "reason": "drill"})
        assert started.status_code == 202
        served.clock.now = T0 + _minutes(1)
        served.service.tick()
        conflict = http.post("/v1/rotate", json={"target": "all"})
        assert conflict.status_code == 409 and "in progress" in conflict.json()["error"]
        # Other targets are fine during a rotation.
        assert http.post("/v1/rotate", json={"target": "linkerd-issuer"}).status_code == 202
        # A standby (the Service routed here): it answers as the leader would, journaling
        # the request for the leader's next pass; it wakes no pass of its own.
        served.service.leadership = Leadership(leader=False, holder="ca-daemon-7d9f-b")
        woken: list[int] = []
        served.service.on_wake(lambda: woken.append(1))
        dry = http.post("/v1/rotate", json={"target": "kong", "dry_run": True})
        assert dry.status_code == 200, dry.text
        assert {"payments", "orders"} <= {s["name"] for s in dry.json()["steps"]}
        standby = http.post("/v1/rotate", json={"target": "kong", "reason": "via standby"})
        assert standby.status_code == 202, standby.text
        op_id = standby.json()["operation"]
        assert served.service.engine.journal.load_ca()[0].operation(op_id) is not None
        assert http.get(f"/v1/operations/{op_id}").json()["state"] == "queued"
        assert http.get("/v1/status").json()["leader"] == "ca-daemon-7d9f-b"
        assert woken == []
        served.service.leadership = Leadership(leader=True)
        served.clock.now = T0 + _minutes(2)
        served.service.tick()
        assert http.get(f"/v1/operations/{op_id}").json()["state"] == "succeeded"
    statuses = [line["status"] for line in served.audit()]
    assert statuses == [200, 202, 409, 202, 200, 202, 200, 200, 200]


def _vault_journal_config(tmp_path: Path, address: str, token: str) -> dict[str, Any]:
    """Linkerd only, with the anchor and the journal in the Vault at ``address``."""
    token_file = tmp_path / "vault-token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    config = short_lifetimes(tmp_path, kong={"enabled": False})
    config["anchor"] = {
        "backend": "vault",
        "local": {"dir": str(tmp_path / "data")},  # the API token's default home
        "vault": {
            "address": address,
            "auth": {"method": "token", "token_file": str(token_file)},
            "timeout": "3s",
        },
    }
    return config


def test_an_unreachable_journal_is_a_503_naming_it(tmp_path: Path) -> None:
    """OpenBao (anchor and journal) stopped under the running API: operations and
    requests answer 503 naming the journal, status falls back to the last pass."""
    with own_openbao(tmp_path, "bao (journal)") as bao:
        config = _vault_journal_config(tmp_path, bao.address, bao.token)
        gen = _serve(tmp_path, config_doc=config, start=datetime.now(UTC))
        served = next(gen)
        try:
            assert served.service.tick().ok
            with served.client(served.token) as http:
                accepted = http.post("/v1/rotate", json={"target": "linkerd-issuer"})
                assert accepted.status_code == 202, accepted.text
                op_id = accepted.json()["operation"]
                assert http.get(f"/v1/operations/{op_id}").status_code == 200
        except BaseException:
            gen.close()
            raise
    try:  # OpenBao is gone from here on
        journal = served.service.engine.journal.description
        with served.client(served.token) as http:
            gone = http.get(f"/v1/operations/{op_id}")
            refused = http.post("/v1/rotate", json={"target": "trust-anchor"})
            status = http.get("/v1/status")
    finally:
        gen.close()
    for response in (gone, refused):
        assert response.status_code == 503, response.text
        body = response.json()
        assert body["journal"] == journal and journal.startswith("Vault KV")
        assert body["error"].startswith(f"journal unavailable: {journal}: read the CA record")
        assert bao.address.removeprefix("http://") in body["error"]  # names the server
    assert status.status_code == 200  # from the last pass
    assert [r["name"] for r in status.json()["roots"]] == ["root-1"]
    lines = served.audit()
    assert [(line["path"], line["status"]) for line in lines] == [
        ("/v1/rotate", 202),
        (f"/v1/operations/{op_id}", 200),
        (f"/v1/operations/{op_id}", 503),
        ("/v1/rotate", 503),
        ("/v1/status", 200),
    ]
    assert lines[2]["operation"] == op_id and lines[3]["target"] == "trust-anchor"
    assert all(line["result"] == gone.json()["error"] for line in lines[2:3])
    assert lines[3]["result"] == refused.json()["error"]
    text = served.audit_file.read_text() + gone.text + refused.text
    assert bao.token not in text and served.token not in text


def _minutes(n: int) -> Any:
    from datetime import timedelta

    return timedelta(minutes=n)


def test_an_emergency_dry_run_shows_what_the_run_then_does(served: Served) -> None:
    """On the embedded default's parts: the dry run's dated path is the steps the real
    emergency then takes, and it refuses what a real request would refuse."""
    served.service.tick()
    leak = {"target": "trust-anchor", "reason": "issuer key leaked", "emergency": True}
    with served.client(served.token) as http:
        for body, status, said in (
            ({**leak, "reason": ""}, 400, "needs a reason"),
            ({**leak, "target": "kong"}, 400, "an emergency applies to"),
            ({**leak, "emergency": "yes"}, 400, "emergency must be true or false"),
        ):
            refused = http.post("/v1/rotate", json=body)
            assert refused.status_code == status and said in refused.json()["error"], refused.text
        dry = http.post("/v1/rotate", json={**leak, "dry_run": True})
        assert dry.status_code == 200, dry.text
        assert dry.json()["emergency"] is True
        path = [(p["action"], datetime.fromisoformat(p["at"])) for p in dry.json()["path"]]
        accepted = http.post("/v1/rotate", json=leak)
        assert accepted.status_code == 202
        again = http.post("/v1/rotate", json=leak)
        assert again.status_code == 409 and accepted.json()["operation"] in again.json()["error"]
        issuer = http.post("/v1/rotate", json={**leak, "target": "linkerd-issuer"})
        assert issuer.status_code == 202
        assert "only an emergency root rotation" in issuer.json()["advice"]
    op_id = accepted.json()["operation"]
    taken: list[tuple[str, datetime]] = []
    check = served.settings.rotation.check_interval
    for _ in range(60):
        result = served.service.tick()
        assert result.ok, result.errors
        taken += [(s.action, served.clock.now) for s in result.steps if s.action in ROTATION_PATH]
        record, _ = served.service.engine.journal.load_ca()
        op = record.operation(op_id)
        assert op is not None
        if not op.open:
            break
        served.clock.now += check
    assert op.state is OpState.SUCCEEDED, op
    shown = [(a, at) for a, at in path if a != "Reissue"]  # the dry run's summary line
    done = [(a, at) for a, at in taken if a != "StartOperation"]
    assert [a for a, _ in shown] == [a for a, _ in done]
    # Dated as the daemon acts: each at the first check at or after its date.
    for (_, planned), (_, at) in zip(shown, done, strict=True):
        assert planned <= at < planned + check, (shown, taken)
    lines = served.audit()
    assert [line["emergency"] for line in lines if line["status"] == 202] == [True, True]


def _kubernetes_auth(
    kube: Kube, verbs_of: dict[str, list[str]]
) -> tuple[str, KubernetesAuth, dict[str, str]]:
    """A namespace where each ServiceAccount of ``verbs_of`` may do those verbs on
    rotations.ca-daemon.io, and the daemon's KubernetesAuth asking as its own
    ServiceAccount (bound to what `config rbac` prints); the namespace, it and the tokens."""
    ns = unique("api")
    kube.create_namespace(ns)
    for name, verbs in verbs_of.items():
        kube.create_service_account(ns, name)
        if not verbs:
            continue
        kube.apply(
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": {"namespace": ns, "name": name},
                "rules": [
                    {"apiGroups": ["ca-daemon.io"], "resources": ["rotations"], "verbs": verbs}
                ],
            }
        )
        kube.apply(
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"namespace": ns, "name": name},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
                "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ns}],
            }
        )
    kube.create_service_account(ns, "daemon")
    rbac_settings = load_settings(
        None, {"server": {"auth": "kubernetes"}, "linkerd": {"enabled": False}}
    )
    for doc in manifests(rbac_settings, ns, "daemon"):
        if doc["kind"].startswith("Cluster"):
            kube.apply(doc)
    daemon = kube.api_client(kube.service_account_token(ns, "daemon"))
    auth = KubernetesAuth(daemon, ServerSar(), ns)
    tokens = {name: kube.service_account_token(ns, name) for name in verbs_of}
    first = next(name for name, verbs in verbs_of.items() if verbs)
    deadline = time.monotonic() + 30
    while auth.decide(tokens[first], True).status == 503 and time.monotonic() < deadline:
        time.sleep(0.2)  # the ClusterRoleBinding reaches the authorizer a moment later
    return ns, auth, tokens


def test_kubernetes_auth_against_the_real_apiserver(kube: Kube, tmp_path: Path) -> None:
    """TokenReview says who the caller is; SubjectAccessReview whether it may create
    rotations.ca-daemon.io in the daemon's namespace."""
    ns, auth, tokens = _kubernetes_auth(kube, {"operator": ["create", "get"], "bystander": []})
    operator, bystander = tokens["operator"], tokens["bystander"]
    gen = _serve(tmp_path, auth)
    served = next(gen)
    try:
        served.service.tick()
        with served.client(operator) as http:
            assert http.post("/v1/rotate", json={"target": "kong"}).status_code == 202
            assert http.get("/v1/status").status_code == 200
        with served.client(bystander) as http:
            refused = http.post("/v1/rotate", json={"target": "kong"})
            assert refused.status_code == 403
            assert "may not create rotations.ca-daemon.io" in refused.json()["error"]
        with served.client("garbage") as http:
            assert http.post("/v1/rotate", json={"target": "kong"}).status_code == 401
        callers = [(line["caller"], line["status"]) for line in served.audit()]
        assert callers == [
            (f"system:serviceaccount:{ns}:operator", 202),
            (f"system:serviceaccount:{ns}:operator", 200),
            (f"system:serviceaccount:{ns}:bystander", 403),
            ("unknown", 401),
        ]
        text = served.audit_file.read_text()
        assert operator not in text and bystander not in text
    finally:
        gen.close()


def test_an_emergency_needs_its_own_verb_against_the_real_apiserver(
    kube: Kube, tmp_path: Path
) -> None:
    """May create rotations is not enough for an emergency: the SubjectAccessReview asks
    for the emergency verb too, and the audit line says EMERGENCY."""
    ns, auth, tokens = _kubernetes_auth(
        kube, {"operator": ["create", "get"], "responder": ["create", "get", "emergency"]}
    )
    emergency = {"target": "trust-anchor", "reason": "issuer key leaked", "emergency": True}
    gen = _serve(tmp_path, auth)
    served = next(gen)
    try:
        served.service.tick()
        with served.client(tokens["operator"]) as http:
            refused = http.post("/v1/rotate", json=emergency)
            assert refused.status_code == 403, refused.text
            assert "may not emergency rotations.ca-daemon.io" in refused.json()["error"]
            revoke = {"target": "kong/payments", "reason": "client key leaked", "revoke": True}
            assert http.post("/v1/rotate", json=revoke).status_code == 403  # the same verb
            assert http.post("/v1/rotate", json={"target": "kong"}).status_code == 202
        record, _ = served.service.engine.journal.load_ca()
        assert [o.target for o in record.operations] == ["kong"]  # the refusal journaled none
        with served.client(tokens["responder"]) as http:
            accepted = http.post("/v1/rotate", json=emergency)
            assert accepted.status_code == 202, accepted.text
        record, _ = served.service.engine.journal.load_ca()
        op = record.operation(accepted.json()["operation"])
        assert op is not None and op.emergency and op.target == "trust-anchor"
        lines = served.audit()
        who = f"system:serviceaccount:{ns}"
        assert [(line["caller"], line["status"], line["emergency"]) for line in lines] == [
            (f"{who}:operator", 403, True),
            (f"{who}:operator", 403, True),
            (f"{who}:operator", 202, False),
            (f"{who}:responder", 202, True),
        ]
    finally:
        gen.close()


def test_rotate_wait_sees_the_operation_through_a_vault_restart(tmp_path: Path) -> None:
    """`rotate --wait` polls a journaled operation: while the journal's Vault is down the
    daemon answers 503, and the wait goes on until the operation ends. A real OpenBao on
    raft storage is killed and restarted on the same data."""
    bao = RaftOpenBao(tmp_path / "bao")
    try:
        config = _vault_journal_config(tmp_path, bao.address, bao.create_token())
        gen = _serve(tmp_path, config_doc=config, start=datetime.now(UTC))
        served = next(gen)
        try:
            assert served.service.tick().ok
            client = Client(served.url, served.token)
            op_id = client.rotate("linkerd-issuer", "test", dry_run=False)["operation"]
            bao.kill()
            said: list[str] = []

            def back(_: float) -> None:  # between polls: Vault returns, a pass runs
                if bao.running:
                    return
                bao.start()
                bao.unseal()
                assert served.service.tick().ok

            view = client.follow(op_id, said.append, sleep=back)
        finally:
            gen.close()
    finally:
        bao.stop()
    assert view["state"] == "succeeded", view
    assert any("503" in line and "still waiting" in line for line in said), said


def test_unknown_paths_and_methods_answer_json(served: Served) -> None:
    with served.client(served.token) as http:
        missing = http.get("/v1/nothing-here")
        wrong = http.get("/v1/rotate")
    assert (missing.status_code, missing.json()) == (404, {"error": "Not Found"})
    assert (wrong.status_code, wrong.json()) == (405, {"error": "Method Not Allowed"})
    assert wrong.headers["allow"] == "POST"


def test_an_audit_log_line_says_its_record_once(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    served.service.tick()
    with caplog.at_level(logging.INFO, logger="ca_daemon.audit"), served.client() as anonymous:
        anonymous.post("/v1/rotate", json={"target": "kong"})
    (record,) = [r for r in caplog.records if r.name == "ca_daemon.audit"]
    message = record.getMessage()
    assert message == "POST /v1/rotate 401 by anonymous from 127.0.0.1: no bearer token"
    assert "{" not in message  # the fields travel as fields, not again as JSON text
    fields = record.fields  # type: ignore[attr-defined]
    assert (fields["status"], fields["path"], fields["audit"]) == (401, "/v1/rotate", True)


def test_reads_can_be_left_out_of_the_log_but_never_writes_or_refusals(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    served.service.tick()
    quiet = AuditLog(served.audit_file, reads=False)
    with caplog.at_level(logging.INFO, logger="ca_daemon.audit"):
        for method, status in (("GET", 200), ("GET", 401), ("POST", 202), ("POST", 409)):
            quiet.write(AuditRecord("alice", "127.0.0.1", method, "/v1/x", status, "r"))
    logged = [(r.fields["method"], r.fields["status"]) for r in caplog.records]  # type: ignore[attr-defined]
    assert logged == [("GET", 401), ("POST", 202), ("POST", 409)]
    on_file = [(line["method"], line["status"]) for line in served.audit()[-4:]]
    assert on_file == [("GET", 200), ("GET", 401), ("POST", 202), ("POST", 409)]


def test_a_dry_run_for_an_already_requested_target_names_that_operation(
    served: Served,
) -> None:
    """A real request for a target with an open operation gets that operation (202); its
    dry run says the same instead of listing steps (or a 409 during a rotation)."""
    served.service.tick()
    with served.client(served.token) as http:
        first = http.post("/v1/rotate", json={"target": "trust-anchor", "reason": "drill"})
        assert first.status_code == 202
        op_id = first.json()["operation"]
        dry = http.post("/v1/rotate", json={"target": "trust-anchor", "dry_run": True})
        again = http.post("/v1/rotate", json={"target": "trust-anchor"})
    assert dry.status_code == 200
    assert dry.json() == {
        "dry_run": True,
        "target": "trust-anchor",
        "steps": [],
        "operation": op_id,
    }
    assert (again.status_code, again.json()["operation"]) == (202, op_id)
