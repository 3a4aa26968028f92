"""The parts the stateful rotation suite drives the real engine with.

Everything here stands in for what is outside the engine, never for the engine: call
boundaries that can crash a pass or let another engine run a whole pass in the middle of
one (``Boundaries``, ``Watched``), a second publish target with no generation check of
its own that fails or confirms late on demand (``MemoryTarget``), and meshed Pods that
restart when rolled, lag when told to, and hold whatever bundle was published when they
last started (``MeshedPods``, the engine's ``Rollout``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from cryptography import x509

from ca_daemon.model.generation import generation_of
from ca_daemon.model.world import TrustWorld
from ca_daemon.pki.bundle import fingerprint, parse_pem_certificates
from ca_daemon.publish.base import PublishReport
from ca_daemon.publish.linkerd_identity import Answer


class Crash(BaseException):
    """The process dies here. A BaseException: the engine contains every Exception, and a
    crash must not be contained."""


# The anchor calls that make a certificate: counted per pass to catch issuance storms.
ISSUING = ("create_root", "create_intermediate", "sign_ca", "sign_client")


@dataclass
class Boundaries:
    """Counts calls across the engine's edges (anchor, journal, publishers) and, when
    armed, acts at the N-th one: raise ``Crash``, or run another engine's pass."""

    calls: int = 0
    armed_at: int | None = None
    action: Callable[[str], None] | None = None
    fired: str | None = None  # where the action last fired
    issued: Counter[tuple[str, str]] = field(default_factory=Counter)

    def arm(self, at: int, action: Callable[[str], None]) -> None:
        self.calls, self.armed_at, self.action, self.fired = 0, at, action, None

    def disarm(self) -> None:
        self.armed_at = self.action = None

    def cross(self, where: str, args: tuple[Any, ...]) -> None:
        method = where.rsplit(".", 1)[-1]
        if method in ISSUING:
            # sign_*(ca, csr, subject, validity); create_*(ref, ...): what is made.
            what = args[2] if method in ("sign_ca", "sign_client") else args[0]
            self.issued[(method, repr(what))] += 1
        self.calls += 1
        if self.armed_at is not None and self.calls >= self.armed_at and self.action:
            action, self.armed_at, self.action, self.fired = self.action, None, None, where
            action(where)


class Watched:
    """``inner`` with every method call crossing ``boundaries`` first, and ``after(name)``
    called once it returned."""

    def __init__(
        self,
        inner: Any,
        label: str,
        boundaries: Boundaries,
        after: Callable[[str], None] | None = None,
    ) -> None:
        self._inner = inner
        self._label = label
        self._boundaries = boundaries
        self._after = after

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        def crossing(*args: Any, **kwargs: Any) -> Any:
            self._boundaries.cross(f"{self._label}.{name}", args)
            result = attr(*args, **kwargs)
            if self._after is not None:
                self._after(name)
            return result

        return crossing


Failure = Literal["raise", "refuse", "unconfirmed"]


@dataclass
class MemoryTarget:
    """A publish target that keeps the last world it accepted. Like every shipped
    publisher it refuses a world of an older journal generation than it holds, and it
    counts such stale offers: the engine's own fence should leave none but those from a
    pass paused between its check and the write (a window only the target can close).

    ``failing`` names how the next ``failing_for`` publishes fail: ``raise`` (the target is
    down), ``refuse`` (nothing written, errors reported) or ``unconfirmed`` (written, but
    the bundle cannot be confirmed: a late confirmation)."""

    description: str = "memory"
    world: TrustWorld | None = None
    failing: Failure = "raise"
    failing_for: int = 0
    accepted_last: bool = False
    on_published: Callable[[], None] | None = None
    stale_offers: int = 0

    def publish(self, world: TrustWorld) -> PublishReport:
        if self.world is not None and generation_of(world) < generation_of(self.world):
            self.stale_offers += 1
            self.accepted_last = False
            return PublishReport(self.description, errors={"world": "older generation"})
        failing = self.failing_for > 0
        if failing:
            self.failing_for -= 1
        self.accepted_last = False
        if failing and self.failing == "raise":
            raise ConnectionError("memory target unreachable (test)")
        if failing and self.failing == "refuse":
            return PublishReport(self.description, errors={"bundle": "refused (test)"})
        self.world = world
        report = PublishReport(self.description, changed=["world"])
        if failing:  # unconfirmed: written, but the bundle is not known to be there
            report.errors["bundle"] = "not confirmed yet (test)"
        else:
            self.accepted_last = True
        if self.on_published is not None:
            self.on_published()
        return report


def _fingerprints(pem: str) -> frozenset[str]:
    return frozenset(fingerprint(c) for c in parse_pem_certificates(pem))


@dataclass
class Pod:
    name: str
    started: datetime
    bundle: str  # the trust bundle PEM it read when it started
    # The issuer its proxy's certificate came from: the one published when it started
    # (Linkerd's identity controller loads a new one within seconds; the model says at once).
    issuer: x509.Certificate | None = None


@dataclass
class MeshedPods:
    """Meshed Pods as Linkerd's proxies see trust: each holds the bundle published when it
    last started. ``restart("all")`` restarts every Pod that is not stuck; with
    ``control-plane`` only an operator (``operator_restarts``) restarts the data plane. A
    stuck Pod refuses restarts for its next N passes."""

    clock: Callable[[], datetime]
    read_bundle: Callable[[], str]
    read_issuer: Callable[[], x509.Certificate | None] = lambda: None
    names: tuple[str, ...] = ("web-0", "web-1", "api-0")
    description: str = "meshed pods (model)"
    pods: dict[str, Pod] = field(default_factory=dict)
    stuck: dict[str, int] = field(default_factory=dict)
    rolls: list[tuple[str, datetime]] = field(default_factory=list)
    reported: list[tuple[str, ...]] = field(default_factory=list)

    def start_all(self) -> None:
        now, bundle, issuer = self.clock(), self.read_bundle(), self.read_issuer()
        self.pods = {n: Pod(n, now, bundle, issuer) for n in self.names}

    def operator_restarts(self) -> list[str]:
        now, bundle, issuer = self.clock(), self.read_bundle(), self.read_issuer()
        moved = [n for n in self.pods if self.stuck.get(n, 0) == 0]
        for name in moved:
            self.pods[name] = Pod(name, now, bundle, issuer)
        return moved

    def tick(self) -> None:
        """One pass went by."""
        self.stuck = {n: left - 1 for n, left in self.stuck.items() if left > 1}

    def presented(self, now: datetime) -> dict[str, x509.Certificate]:
        """The issuer behind each Pod's proxy certificate, while that issuer is valid (a
        proxy renews its certificate within a day, from the issuer loaded then)."""
        return {
            f"pod {p.name}": p.issuer
            for p in self.pods.values()
            if p.issuer is not None and p.issuer.not_valid_after_utc > now
        }

    def bundles(self) -> dict[str, tuple[x509.Certificate, ...]]:
        return {
            f"pod {p.name}": tuple(parse_pem_certificates(p.bundle)) for p in self.pods.values()
        }

    # --- the engine's Rollout ---------------------------------------------------------------

    def restart(self, scope: Literal["control-plane", "all"], at: datetime) -> list[str]:
        self.rolls.append((scope, self.clock()))
        if scope == "all":
            return ["deployment/linkerd-identity", *self.operator_restarts()]
        return ["deployment/linkerd-identity"]

    def would_touch(self, scope: Literal["control-plane", "all"]) -> tuple[list[str], list[str]]:
        return ["deployment/linkerd-identity"], sorted(self.pods)

    def pending_pods(
        self, bundle_pem: str, confirmed_at: datetime, restarted: bool = False
    ) -> list[str]:
        # Every model Pod reads its bundle when it starts (as a configMapKeyRef does): one
        # started since the confirmation holds it, and was restarted since, too.
        want = _fingerprints(bundle_pem)
        return sorted(
            p.name
            for p in self.pods.values()
            if _fingerprints(p.bundle) != want or p.started <= confirmed_at
        )

    def report_pending(self, pods: list[str], bundle_hash: str) -> None:
        self.reported.append(tuple(pods))

    def issuer_answer(self, since: datetime) -> Answer | None:
        return None  # linkerd.confirm is none here: never asked

    def report_issuer(self, problem: str | None) -> None:
        pass
