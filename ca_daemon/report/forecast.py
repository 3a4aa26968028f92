"""The forecast (`ca-daemon plan`): every renewal and root-rotation phase, with its date.

Nothing here decides anything. The real :class:`~ca_daemon.rotation.engine.Engine`,
with the real ``plan()``, is run forward on a simulated clock over a copy of the
journal, so the forecast cannot drift from what the daemon does. Only its
surroundings are simulated, in memory:

- the journal (:class:`MemoryJournal`): the state as objects, with check-and-set
  versions as the real one has, and no serialization;
- the anchor (:class:`SimulatedAnchor`): signs with throwaway keys, honouring the
  requested validity exactly (the dates are what matter);
- one publisher that always confirms, and (when the daemon would roll Linkerd) a
  rollout that restarts at once and reports every Pod current.

So the dates are the *earliest possible* ones: the daemon acts at its first check at
or after each date (up to ``rotation.check_interval`` later), a publisher that
confirms late moves the propagation clock, lagging Pods hold back activation.

The clock moves from event to event, never by fixed steps: after each pass the next
time anything can happen is the earliest of every certificate's ``renew_at`` (with
its ``rotate_before`` and jitter), the active root's due time and any ``Wait.until``
the planner returns, rounded up to the second, so everything due in the same second
is one pass.

A certificate the forecast itself issues has a throwaway key, and the renewal jitter
comes from the certificate's fingerprint: its renewal date is one possible date
within the jitter window, not *the* date. Such dates (and everything that follows
from them) are marked not ``exact``; dates that follow only from certificates in the
journal, and from fixed delays, are exact.

The journal is only read (:func:`load_state`): for the local anchor the records are
read from their files (the passphrase is neither needed nor created: keys stay sealed,
they are never used); for Vault from KV, read-only. No state at all forecasts the
bootstrap at ``start``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from ca_daemon.config.settings import Settings
from ca_daemon.errors import AnchorError, JournalError
from ca_daemon.journal.format import CA_KEY, LEGACY_CREDENTIALS, SHARD_FOLDER
from ca_daemon.journal.journal import Journal
from ca_daemon.journal.store.records import FileRecordStore, Record, RecordConflict
from ca_daemon.model.state import (
    State,
)
from ca_daemon.pki.profiles import Kind
from ca_daemon.report.simulation import DEFAULT_RESOLUTION, Event, ceil_second, simulate
from ca_daemon.util.durations import format_duration, parse_duration

EXIT_OK, EXIT_USAGE = 0, 2
DEFAULT_UNTIL = timedelta(hours=8760)


def forecast(state: State, settings: Settings, start: datetime, until: datetime) -> list[Event]:
    """Every step the daemon will take from ``start`` to ``until``, each with its date."""
    return simulate(state, settings, start, until).events


# The root rotation's own steps, in the order they come (`rotate --dry-run` shows them).
ROTATION_PATH = (
    "StartOperation",
    "PrepareRoot",
    "Propagate",
    "ConfirmBundle",
    "NoteRestart",
    "RestartLinkerd",
    "Activate",
    "StartRetiring",
    "Retire",
)


def _retires_root(event: Event) -> bool:
    return event.action == "Retire" and event.kind == "trust-anchor"


def rotation_path(state: State, settings: Settings, start: datetime) -> list[Event]:
    """The whole root rotation queued in ``state``: each of its steps with its earliest
    date (as ``plan`` dates are: the daemon acts at its first check after each), up to
    the old root's retirement, and the credentials re-issued under the new root at
    activation, as one ``Reissue`` event."""
    s = settings
    lifetimes = [s.linkerd.issuer.lifetime, s.kong.intermediate.lifetime]
    lifetimes += s.credential_lifetimes()
    delay = s.rotation.retire_delay
    # The old root retires once everything under it has expired (or after retire_delay).
    horizon = s.rotation.propagation_delay + s.rotation.clock_skew + max(lifetimes)
    if isinstance(delay, timedelta):
        horizon = max(horizon, s.rotation.propagation_delay + delay)
    until = start + horizon + timedelta(days=1)
    # Nothing after the retirement belongs to the path: simulating the renewals that
    # follow it (a day of them, with short lifetimes) only costs time.
    events = simulate(
        state, settings, start, until, resolution=DEFAULT_RESOLUTION, stop=_retires_root
    ).events
    path: list[Event] = []
    activated: Event | None = None
    reissued = 0
    for event in events:
        if event.action in ROTATION_PATH and event.kind == "trust-anchor":
            path.append(event)
            if event.action == "Activate":
                activated = event
            if event.action == "Retire":
                break
        elif (
            activated is not None and event.at == activated.at and event.action.startswith("Issue")
        ):
            reissued += 1
    if activated is not None and reissued:
        path.insert(
            path.index(activated) + 1,
            Event(
                activated.at,
                "trust-anchor",
                activated.name,
                "Reissue",
                f"{reissued} certificate(s) re-issued under the new root",
                activated.exact,
            ),
        )
    return path


# --- reading the journal, without writing ----------------------------------------------


class _CopiedStore:
    """Records copied out of the real store into memory; writes (an older layout is
    moved into shards on first load) stay here."""

    def __init__(self, description: str, records: Mapping[str, tuple[Record, int]]) -> None:
        self.description = description
        self._records = dict(records)

    def read(self, key: str) -> tuple[Record, int] | None:
        return self._records.get(key)

    def write(self, key: str, record: Record, version: int) -> int:
        stored = self._records.get(key)
        if (stored[1] if stored else 0) != version:
            raise RecordConflict(f"{key!r} changed")
        self._records[key] = (record, version + 1)
        return version + 1

    def delete(self, key: str) -> None:
        self._records.pop(key, None)

    def list(self, folder: str) -> list[str]:
        prefix = f"{folder}/"
        names = (k.removeprefix(prefix) for k in self._records if k.startswith(prefix))
        return sorted(n for n in names if "/" not in n)


def load_state(settings: Settings) -> State:
    """The current state, read only.

    Local anchor: the records are read from their files and their keys stay sealed (the
    forecast never uses them), so the passphrase is neither needed nor created, and
    thousands of keys are not decrypted for nothing; a data directory not created yet
    is no state. Vault: the journal as ``runtime`` opens it read-only, from KV.
    """
    if settings.anchor.backend != "local":
        # local import: start-up time, the Vault client (hvac) only when Vault is the anchor
        from ca_daemon.journal.open import build_anchor_and_journal

        return build_anchor_and_journal(settings, create=False)[1].load().state

    source = FileRecordStore(settings.anchor.local.dir)
    records: dict[str, tuple[Record, int]] = {}
    found = source.read(CA_KEY)
    if found is not None:
        records[CA_KEY] = found
        for folder in (SHARD_FOLDER, LEGACY_CREDENTIALS):  # none in a version-1 state
            for name in source.list(folder):
                key = f"{folder}/{name}"
                if (record := source.read(key)) is not None:
                    records[key] = record
    # An older state is moved into shards by the journal, here in memory.
    return Journal(_CopiedStore(source.description, records)).load().state


# --- the command -----------------------------------------------------------------------


def render_table(events: list[Event]) -> str:
    header = ("TIME", "KIND", "NAME", "ACTION", "REASON")
    rows = [
        (
            ("" if e.exact else "~") + e.at.strftime("%Y-%m-%dT%H:%M:%SZ"),
            e.kind,
            e.name,
            e.action,
            e.reason + (f" (FAILED: {e.error})" if e.error else ""),
        )
        for e in events
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    return "\n".join(
        "  ".join([*(cell.ljust(w) for cell, w in zip(row[:4], widths, strict=True)), row[4]])
        for row in [header, *rows]
    )


def _duration(text: str) -> timedelta:
    try:
        value = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value <= timedelta(0):
        raise argparse.ArgumentTypeError("must be positive")
    return value


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Register ``plan`` on the CLI's subparsers; the handler is :func:`command`."""
    parser: argparse.ArgumentParser = commands.add_parser(
        "plan", help="forecast every renewal and root-rotation phase, with dates; writes nothing"
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=argparse.SUPPRESS,  # `ca-daemon --config F plan` must keep F
        help="configuration file (default: $CA_DAEMON_CONFIG, else the embedded default)",
    )
    parser.add_argument(
        "--until",
        type=_duration,
        default=DEFAULT_UNTIL,
        metavar="DURATION",
        help=f"how far ahead (default: {format_duration(DEFAULT_UNTIL)})",
    )
    parser.add_argument(
        "--kind",
        choices=[k.value for k in Kind],
        help="only events of this kind (e.g. trust-anchor for the root rotation's phases)",
    )
    parser.add_argument(
        "--target", metavar="NAME", help="only events of this name (e.g. a Kong client)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def _wanted(event: Event, args: argparse.Namespace) -> bool:
    kind, target = getattr(args, "kind", None), getattr(args, "target", None)
    return (kind is None or event.kind == kind) and (target is None or event.name == target)


def command(args: argparse.Namespace, settings: Settings) -> int:

    start = ceil_second(datetime.now(UTC))
    until: timedelta = args.until
    try:
        state = load_state(settings)
    except (JournalError, AnchorError) as exc:
        print(f"error: reading state: {exc}", file=sys.stderr)
        return 1
    result = simulate(state, settings, start, start + until, resolution=DEFAULT_RESOLUTION)
    events = [e for e in result.events if _wanted(e, args)]
    if args.json:
        print(json.dumps([e.to_json() for e in events], indent=2))
    else:
        print(render_table(events))
        if any(not e.exact for e in events):
            print(
                "~ the date depends on a certificate not issued yet: its renewal jitter "
                f"(up to {settings.rotation.jitter:.0%} of rotate_before) is not known; "
                f"such renewals are shown grouped by {format_duration(DEFAULT_RESOLUTION)}"
            )
        print(
            f"earliest possible dates: every publisher confirming at once, every Pod current; "
            f"the daemon acts at its first check after each (every "
            f"{format_duration(settings.rotation.check_interval)})"
        )
    if result.truncated:
        print(
            f"warning: stopped after {result.passes} passes at {result.stopped_at}: "
            "later events are not shown (use a shorter --until)",
            file=sys.stderr,
        )
    for error in result.errors[:20]:
        print(f"warning: simulated step failed: {error}", file=sys.stderr)
    return EXIT_OK
