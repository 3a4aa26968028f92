"""Running the engine through root rotations on a simulated clock, checking after every publish.

A publisher wrapper reads back what was just published (files or the live cluster),
asserts the SPEC's invariants (tests/support/invariants.py) and runs Linkerd's validation
helper on the published issuer and bundle, at the simulated time.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from ca_daemon.config.settings import Settings
from ca_daemon.model.world import TrustWorld
from ca_daemon.publish.base import Publisher, PublishReport
from ca_daemon.publish.directory import DirectoryPublisher
from tests.support.invariants import InvariantChecker, Published, read_directory
from tests.support.servers.linkerd import LinkerdCheck


@dataclass
class Clock:
    now: datetime

    def __call__(self) -> datetime:
        return self.now


@dataclass
class LinkerdView:
    """The three files linkerd-check reads: bundle, issuer certificate, issuer key."""

    bundle: bytes
    crt: bytes
    key: bytes


@dataclass
class CheckedPublisher:
    """Publishes through ``inner``, then checks what a verifier would now see."""

    inner: Publisher
    clock: Clock
    checker: InvariantChecker
    read_back: Callable[[], Published]
    linkerd_view: Callable[[], LinkerdView | None]
    linkerd_check: LinkerdCheck
    # Whether the rotation in progress retires on proof (read from the journal): a root
    # may then leave while certificates it signed earlier are still valid.
    on_proof: Callable[[], bool] = lambda: False
    checks: int = 0
    linkerd_outputs: list[str] = field(default_factory=list)
    description: str = ""

    def __post_init__(self) -> None:
        self.description = self.inner.description

    def publish(self, world: TrustWorld) -> PublishReport:
        report = self.inner.publish(world)
        now = self.clock.now
        self.checker.observe(now, self.read_back(), on_proof=self.on_proof())
        view = self.linkerd_view()
        if view is not None:
            with tempfile.TemporaryDirectory() as tmp:
                bundle, crt, key = (Path(tmp) / n for n in ("ca.crt", "tls.crt", "tls.key"))
                bundle.write_bytes(view.bundle)
                crt.write_bytes(view.crt)
                key.write_bytes(view.key)
                code, output = self.linkerd_check(bundle, crt, key, now=now)
            assert code == 0, f"Linkerd rejects what was published at {now}:\n{output}"
            self.linkerd_outputs.append(output)
        self.checks += 1
        return report


def checked_directory_publisher(
    settings: Settings, clock: Clock, linkerd_check: LinkerdCheck
) -> CheckedPublisher:
    out = settings.publish_directory

    def linkerd_view() -> LinkerdView:
        return LinkerdView(
            (out / "linkerd" / "ca.crt").read_bytes(),
            (out / "linkerd" / "tls.crt").read_bytes(),
            (out / "linkerd" / "tls.key").read_bytes(),
        )

    return CheckedPublisher(
        DirectoryPublisher(out),
        clock,
        InvariantChecker(settings.rotation.propagation_delay, settings.rotation.clock_skew),
        lambda: read_directory(out),
        linkerd_view,
        linkerd_check,
    )
