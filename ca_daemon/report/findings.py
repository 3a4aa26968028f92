"""What ``ca-daemon verify`` reports: findings, each with a stable id, and how they print.

A finding is one problem Linkerd or Kong would run into: its ``id`` (from CATALOG, never
renamed: pipelines match on it), a ``severity``, the ``object`` it is about, a
``message`` that names that object and reads alone, and the ``action`` that fixes it.
Every finding fails ``verify``; the severity only says how urgent it is. docs/reference.md
lists the same ids (tests/report/test_verify_findings.py keeps the two equal).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

# The version of the JSON document ``verify --json`` prints; raised only when a field
# changes meaning or goes away (new fields and new ids do not raise it).
JSON_VERSION = 1


class Severity(StrEnum):
    ERROR = "error"  # Linkerd or Kong refuses it, or traffic fails, now
    WARNING = "warning"  # works now, but fails later or not as intended


@dataclass(frozen=True)
class Kind:
    severity: Severity
    action: str


_E, _W = Severity.ERROR, Severity.WARNING
_REPUBLISH = "let the daemon rewrite it (`ca-daemon run --once`) and find out who changed it"

CATALOG: Mapping[str, Kind] = {
    # the trust bundle and its roots
    "bundle-missing": Kind(_E, "publish it (`ca-daemon run --once`); read the daemon's errors"),
    "bundle-unreadable": Kind(_E, _REPUBLISH),
    "bundle-copy-differs": Kind(_E, _REPUBLISH),
    "root-invalid": Kind(_E, "rotate to a root Linkerd accepts: `ca-daemon rotate trust-anchor`"),
    "root-expired": Kind(_E, "rotate the trust anchor now: `ca-daemon rotate trust-anchor`"),
    # what the daemon's journal holds
    "journal-unavailable": Kind(
        _E, "run `ca-daemon run --once` first, or pass verify the daemon's --config"
    ),
    "journal-mismatch": Kind(_E, _REPUBLISH),
    # the published directory
    "file-missing": Kind(_E, "publish again: `ca-daemon run --once`"),
    "file-unreadable": Kind(_E, "make it a regular file the daemon can read, or remove it"),
    "secret-mode": Kind(_E, "`ca-daemon run --once` takes group and other access away"),
    # the Linkerd issuer
    "issuer-missing": Kind(_E, "publish it: `ca-daemon run --once`"),
    "issuer-wrong-type": Kind(
        _E,
        "delete that Secret (Linkerd's linkerd.io/tls scheme) so that the daemon publishes "
        "its kubernetes.io/tls one, and install Linkerd with "
        "identity.issuer.scheme=kubernetes.io/tls",
    ),
    "issuer-invalid": Kind(_E, "re-issue it: `ca-daemon rotate linkerd-issuer`"),
    "issuer-untrusted": Kind(
        _E, "re-issue it under a root of the bundle: `ca-daemon rotate linkerd-issuer`"
    ),
    "issuer-ca-mismatch": Kind(
        _E,
        "make the issuer Secret's ca.crt the trust-roots ConfigMap's ca-bundle.crt again: "
        + _REPUBLISH,
    ),
    "key-unreadable": Kind(_E, "re-issue it: `ca-daemon rotate linkerd-issuer` or `kong/<name>`"),
    "key-mismatch": Kind(_E, "re-issue it: `ca-daemon rotate linkerd-issuer` or `kong/<name>`"),
    # Kong
    "kong-ca-invalid": Kind(_E, _REPUBLISH),
    "kong-ca-missing": Kind(
        _E, "publish it (`ca-daemon run --once`): until then Kong rejects upstreams under it"
    ),
    "kong-ca-extra": Kind(
        _E, "delete it: Kong trusts a root that Linkerd and the trust bundle do not"
    ),
    "client-missing": Kind(_E, "publish it: `ca-daemon run --once`"),
    "client-invalid": Kind(_E, "re-issue it: `ca-daemon rotate kong/<name>`"),
    "client-untrusted": Kind(
        _E, "re-issue it under a root of the bundle: `ca-daemon rotate kong/<name>`"
    ),
    "client-not-configured": Kind(_W, "remove it, or add the client to kong.clients"),
    "kong-secret-unlabelled": Kind(
        _E, 'label it konghq.com/secret="true": Kong Operator reads no Secret without it'
    ),
    # KIC before 3.4 ingests only the CA Secrets of its own class (internal/store/store.go
    # ListCACerts at v3.3.0); 3.4 and later select by the ca-cert label alone.
    "kong-ca-ingress-class": Kind(
        _E, "annotate it kubernetes.io/ingress.class with the class Kong's controller serves"
    ),
    "client-cert-missing": Kind(
        _E,
        "create that kubernetes.io/tls Secret in the Service's own namespace (KIC looks "
        "nowhere else), or correct the annotation",
    ),
    "client-cert-not-tls": Kind(
        _E, "make it a Secret of type kubernetes.io/tls with tls.crt and tls.key"
    ),
    # Kong and Linkerd together
    "double-encryption": Kind(
        _W,
        "let Kong's TLS skip Linkerd's proxy on that port: config.linkerd.io/skip-outbound-ports "
        "on Kong's Pods, or config.linkerd.io/skip-inbound-ports on the upstream's Pods, "
        "then restart those Pods",
    ),
    "stale-trust-root": Kind(
        _W,
        "restart those workloads (kubectl rollout restart) so that Linkerd's injector gives "
        "them the current bundle",
    ),
    # time
    "renewal-overdue": Kind(
        _W,
        "renewal is failing: read the daemon's log and `ca-daemon status`, then "
        "`ca-daemon rotate` that target",
    ),
    "clusters-roots-differ": Kind(
        _E,
        "let the daemon publish to every cluster (`ca-daemon run --once`; `ca-daemon status` "
        "names a cluster it cannot reach), and publish nothing else to the trust roots there",
    ),
    "cluster-unreadable": Kind(
        _E, "check the kubeconfig, and that it may read what `ca-daemon config rbac` grants"
    ),
}


@dataclass(frozen=True)
class Finding:
    id: str
    severity: Severity
    object: str
    message: str
    action: str

    @property
    def line(self) -> str:
        """One line for a person: the message (which names the object), id, what to do."""
        return f"{self.message} [{self.id}] fix: {self.action}"

    def as_json(self) -> dict[str, str]:
        return {
            "id": self.id,
            "severity": self.severity.value,
            "object": self.object,
            "message": self.message,
            "action": self.action,
        }


def finding(id: str, object: str, message: str, action: str | None = None) -> Finding:
    """A finding of a CATALOG id; ``action`` when the fix can be said more precisely."""
    kind = CATALOG[id]
    return Finding(id, kind.severity, object, message, action or kind.action)


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)
    # Checks not made, with why (say, RBAC refused to list Pods): not a finding, but said.
    skipped: list[str] = field(default_factory=list)

    def add(self, id: str, object: str, message: str, action: str | None = None) -> None:
        self.extend([finding(id, object, message, action)])

    def extend(self, found: Iterable[Finding]) -> None:
        # Several routes lead to one fact (an intermediate in every client's chain): once.
        for item in found:
            if item not in self.findings:
                self.findings.append(item)

    @property
    def problems(self) -> list[str]:
        return [f.message for f in self.findings]

    @property
    def ok(self) -> bool:
        return not self.findings

    def as_json(self, target: str) -> dict[str, Any]:
        return {
            "version": JSON_VERSION,
            "target": target,
            "ok": self.ok,
            "findings": [f.as_json() for f in self.findings],
            "checked": list(self.checked),
            "skipped": list(self.skipped),
        }
