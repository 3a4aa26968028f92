"""Linkerd's identity controller, as far as its issuer goes, in a process of its own.

Standard library only: it runs as the identity container of a real Pod on the node
(tests/support/chart_deployment.py mounts this file and the linkerd-check binary), and
tests/support/linkerd_identity.py imports what both write. What it does is what
linkerd2's controller does (``controller/cmd/identity/main.go``,
``pkg/identity/service.go``):

- at start it reads the trust anchors once, from the trust-roots ConfigMap mounted at
  ``/var/run/linkerd/identity/trust-roots``, and loads the issuer from the Secret mounted
  at ``/var/run/linkerd/identity/issuer``, with no Event;
- when the kubelet swaps the mounted issuer (its ``..data`` link), it checks the new issuer
  against the anchors it started with (tests/linkerd-check, the faithful re-implementation
  of Linkerd's checks) and records Normal ``IssuerUpdated`` or Warning
  ``IssuerUpdateSkipped`` about its Deployment, as client-go's EventBroadcaster does
  (``tools/record/event.go``): a new Event named ``<object>.<unix nanos, hex>``, or an
  identical repeat patched with count + 1 and a new lastTimestamp.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

DEPLOYMENT = "linkerd-identity"
UPDATED = ("Normal", "IssuerUpdated", "Updated identity issuer")
TRUST_ROOTS_FILE = Path("/var/run/linkerd/identity/trust-roots/ca-bundle.crt")
ISSUER_DIR = Path("/var/run/linkerd/identity/issuer")
CHECK = "/opt/linkerd-check"
_SA = Path("/var/run/secrets/kubernetes.io/serviceaccount")


def skipped(error: str) -> tuple[str, str, str]:
    return (
        "Warning",
        "IssuerUpdateSkipped",
        f"Skipping issuer update as certs could not be read from disk: {error}",
    )


def linkerd_error(output: str) -> str:
    """Linkerd's error text from linkerd-check's ``FAIL <stage>: <error>`` line."""
    failed = next((line for line in output.splitlines() if line.startswith("FAIL")), output)
    return failed.split(": ", 1)[-1].strip()


def stamp(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def event_body(
    namespace: str, kind: str, reason: str, message: str, at: datetime
) -> dict[str, Any]:
    """A new Event as client-go's recorder makes it (no uid in the object reference)."""
    nanos = int(at.timestamp() * 1e9)
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{DEPLOYMENT}.{nanos:x}", "namespace": namespace},
        "involvedObject": {
            "kind": "Deployment",
            "namespace": namespace,
            "name": DEPLOYMENT,
            "apiVersion": "apps/v1",
        },
        "reason": reason,
        "message": message,
        "source": {"component": DEPLOYMENT},
        "firstTimestamp": stamp(at),
        "lastTimestamp": stamp(at),
        "count": 1,
        "type": kind,
    }


def check(anchors: Path, crt: Path, key: Path) -> str | None:
    """Linkerd's error for the issuer files under ``anchors``, or None when it loads."""
    result = subprocess.run(
        [CHECK, f"--bundle={anchors}", f"--issuer-crt={crt}", f"--issuer-key={key}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return None if result.returncode == 0 else linkerd_error(result.stdout + result.stderr)


# --- in the Pod ------------------------------------------------------------------------------


def _api(method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"]
    token = (_SA / "token").read_text().strip()
    request = urllib.request.Request(
        f"https://{host}:{port}{path}",
        data=json.dumps(body).encode() if body is not None else None,
        method=method,
        headers={
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/merge-patch+json"
            if method == "PATCH"
            else "application/json",
        },
    )
    context = ssl.create_default_context(cafile=str(_SA / "ca.crt"))
    with urllib.request.urlopen(request, context=context, timeout=10) as response:
        answer: dict[str, Any] = json.loads(response.read())
        return answer


def main() -> None:
    namespace = os.environ["POD_NAMESPACE"]
    anchors = Path("/tmp/trust-anchors.pem")  # read once: Linkerd never reads them again
    anchors.write_bytes(TRUST_ROOTS_FILE.read_bytes())
    seen = os.readlink(ISSUER_DIR / "..data")
    print(f"identity: started with the issuer in {seen}", flush=True)
    last: tuple[str, str, str] | None = None  # (event name, reason, message)
    while True:
        time.sleep(0.5)
        current = os.readlink(ISSUER_DIR / "..data")
        if current == seen:
            continue
        seen = current
        error = check(anchors, ISSUER_DIR / "tls.crt", ISSUER_DIR / "tls.key")
        kind, reason, message = UPDATED if error is None else skipped(error)
        print(f"identity: {reason}: {message}", flush=True)
        now = datetime.now(UTC)
        events = f"/api/v1/namespaces/{namespace}/events"
        try:
            if last is not None and last[1:] == (reason, message):
                live = _api("GET", f"{events}/{last[0]}")
                patch = {"count": live["count"] + 1, "lastTimestamp": stamp(now)}
                _api("PATCH", f"{events}/{last[0]}", patch)
            else:
                body = event_body(namespace, kind, reason, message, now)
                _api("POST", events, body)
                last = (body["metadata"]["name"], reason, message)
        except OSError as exc:  # as client-go: an Event that cannot be written is dropped
            print(f"identity: could not record the event: {exc}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
