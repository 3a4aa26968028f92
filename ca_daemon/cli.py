"""Commands: parse, call, print. No logic of its own.

Exit codes: 0 success, 1 a check or operation failed, 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ca_daemon import __version__
from ca_daemon.config.loading import effective_config, load_settings
from ca_daemon.config.settings import CONFIG_ENV, Settings
from ca_daemon.errors import CaDaemonError, ConfigError, ServiceError
from ca_daemon.report import forecast
from ca_daemon.rotation.results import PassResult
from ca_daemon.util import yamltext

if TYPE_CHECKING:
    from ca_daemon.api.client import Client as ApiClient

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130  # as a shell reports SIGINT


CONFIG_HELP = "configuration file (default: $CA_DAEMON_CONFIG, else the embedded default)"


def _parser() -> argparse.ArgumentParser:
    # --config is taken before or after the command. Subcommands must not default it:
    # argparse would overwrite a --config given before the command with their None.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, default=argparse.SUPPRESS, help=CONFIG_HELP)
    parser = argparse.ArgumentParser(
        prog="ca-daemon",
        description="Certificate authority and rotation daemon for Linkerd and Kong.",
    )
    parser.add_argument("--config", type=Path, default=None, help=CONFIG_HELP)
    parser.add_argument("--version", action="version", version=f"ca-daemon {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run",
        parents=[common],
        help="run the daemon",
        description="Run the daemon. Configured by --config (or $CA_DAEMON_CONFIG) and "
        "CA_DAEMON_* environment variables (nested keys joined by __), which override the file.",
    )
    run.add_argument(
        "--once", action="store_true", help="bring everything up to date, publish, and exit"
    )

    api = argparse.ArgumentParser(add_help=False)
    api.add_argument("--token-file", type=Path, help="bearer token (default: server.token_file)")

    status = commands.add_parser(
        "status", parents=[common, api], help="show certificates and times"
    )
    status.add_argument(
        "--url", help="ask the running daemon's API at URL (default: read the journal directly)"
    )
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")

    rotate = commands.add_parser(
        "rotate", parents=[common, api], help="ask the running daemon to rotate"
    )
    rotate.add_argument(
        "--url",
        help="the running daemon's API (default: http://<server.address> of --config, so "
        "pass the daemon's own configuration, or --url)",
    )
    rotate.add_argument(
        "target",
        help="trust-anchor, linkerd-issuer, kong-intermediate, kong, kong/<name> or all; with "
        "linked clusters also linkerd-issuer/<cluster> and kong/<cluster>/<name>",
    )
    rotate.add_argument("--reason", default="", help="why (kept in the journal and audit log)")
    rotate.add_argument(
        "--wait",
        nargs="?",
        const="effect",
        choices=["effect", "retired"],
        help="follow the operation: until it is in effect (default; for a root rotation,"
        " once the new root signs everything), or with --wait=retired until the old root"
        " has left every bundle too",
    )
    rotate.add_argument(
        "--dry-run", action="store_true", help="show the steps it would take; change nothing"
    )
    rotate.add_argument(
        "--emergency",
        action="store_true",
        help="a key leaked: for trust-anchor, a root rotation whose old root leaves every "
        "bundle once proven unused (not at expiry); for linkerd-issuer, a new issuer key now. "
        "Needs --reason, and a permission of its own",
    )
    rotate.add_argument(
        "--revoke",
        action="store_true",
        help="kong/<name> only: a client key leaked; re-issue it, then revoke the certificate "
        "it replaced and publish the CRLs beside the trust bundle (crl.pem). Needs --reason, "
        "and the emergency permission",
    )

    verify = commands.add_parser(
        "verify", parents=[common], help="check what is published as Linkerd and Kong would"
    )
    verify.add_argument("--dir", type=Path, help="published directory (default: publish.directory)")
    verify.add_argument(
        "--kubeconfig",
        type=Path,
        action="append",
        help="check the live cluster instead (default when Kubernetes publishing is on); "
        "given again, the next cluster (in the order of clusters[]): every one is checked, "
        "then that they all trust the same roots",
    )
    verify.add_argument(
        "--json",
        action="store_true",
        help="print the findings as JSON (docs/reference.md has the schema)",
    )

    forecast.add_parser(commands)
    config = commands.add_parser("config", parents=[common], help="configuration tools")
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    check = config_commands.add_parser(
        "check", parents=[common], help="validate and print the effective configuration"
    )
    check.add_argument("file", nargs="?", type=Path, help="configuration file to check")
    rbac = config_commands.add_parser(
        "rbac", parents=[common], help="print the least-privilege Roles this configuration needs"
    )
    rbac.add_argument("file", nargs="?", type=Path, help="configuration file")
    rbac.add_argument(
        "--service-account",
        default="ca-daemon/ca-daemon",
        help="namespace/name of the daemon's ServiceAccount (default: ca-daemon/ca-daemon)",
    )
    rbac.add_argument(
        "--cluster",
        metavar="NAME",
        help="the Roles to apply in this linked cluster (clusters[].name), for the identity "
        "its kubeconfig names; default: the home cluster",
    )
    schema = config_commands.add_parser(
        "schema", parents=[common], help="print the configuration's JSON Schema"
    )
    schema.add_argument(
        "--helm-values",
        action="store_true",
        help="the Helm chart's values.schema.json (the configuration under `config`)",
    )
    return parser


# Commands whose answer depends on which configuration they judge against.
JUDGING = frozenset({"status", "verify", "plan"})


def _settings_path(args: argparse.Namespace) -> Path | None:
    path: Path | None = getattr(args, "file", None) or args.config
    if path is None and os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV])
    return path


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(_settings_path(args))


def _print_pass(result: PassResult) -> None:
    for step in result.steps:
        outcome = "ok" if step.ok else f"FAILED: {step.error}"
        print(f"{step.action} {step.kind.value} {step.name} ({step.reason}): {outcome}")
    for target, changed in result.published.items():
        print(f"published {target}: {len(changed)} change(s)")


ONCE_LOCK_WAIT = 60.0  # seconds `run --once` waits for another process's pass


def _owned(settings: Settings, wait: float) -> AbstractContextManager[None]:
    """The local data directory's lock; the Vault journal is guarded by check-and-set."""
    if settings.anchor.backend != "local":
        return nullcontext()
    # local import: start-up time, each command loads only what it runs
    from ca_daemon.service.datalock import owning

    return owning(
        settings.anchor.local.dir, wait=wait, say=lambda line: print(line, file=sys.stderr)
    )


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    # local import: start-up time, each command loads only what it runs
    from ca_daemon.service.datalock import DataDirBusy

    try:
        with _owned(settings, ONCE_LOCK_WAIT if args.once else 0.0):
            return _run(args, settings)
    except DataDirBusy as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:  # at start-up: a data directory that cannot be made, a full disk
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"error: cannot start: {exc.strerror or exc}{where}", file=sys.stderr)
        return EXIT_FAILED
    except CaDaemonError as exc:  # at start-up: e.g. a lost passphrase, an unusable anchor
        print(f"error: cannot start: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _run(args: argparse.Namespace, settings: Settings) -> int:
    # local import: start-up time, each command loads only what it runs
    from ca_daemon.daemon import run_forever
    from ca_daemon.report.status import expired
    from ca_daemon.service.wiring import build_engine

    engine = build_engine(settings)
    if args.once:
        result = engine.reconcile()
        _print_pass(result)
        errors = list(result.errors)
        if result.state is not None:
            errors += expired(result.state, settings, datetime.now(UTC))
        for error in errors:
            print(f"error: {error}", file=sys.stderr)
        return EXIT_OK if not errors else EXIT_FAILED
    try:
        run_forever(settings, engine, server_address=settings.server.address)
    except ServiceError as exc:  # the API could not start: no daemon without it
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _unreachable_hint(args: argparse.Namespace) -> str:
    """Where a default URL came from, for a daemon that did not answer there."""
    if args.url:
        return ""
    config = args.config or os.environ.get(CONFIG_ENV)
    source = f"the configuration {config}" if config else "the embedded default (no --config)"
    return (
        f" (the URL is http://<server.address> of {source}; pass --url, or the daemon's "
        "own configuration with --config)"
    )


def _client(args: argparse.Namespace, settings: Settings) -> ApiClient:
    # local import: start-up time, each command loads only what it runs
    from ca_daemon.api.client import Client, default_url, read_token

    return Client(
        args.url or default_url(settings),
        read_token(args.token_file or settings.api_token_file),
        expect_proof=settings.server.auth == "static",
    )


def _print_touches(answer: dict[str, Any]) -> None:
    """What a root rotation's dry run says it would touch."""
    rolls = answer.get("rolls")
    if rolls:
        print(
            f"would roll Linkerd ({rolls['scope']}) {rolls['times']} time(s), each time "
            f"{len(rolls['workloads'])} workload(s): {', '.join(rolls['workloads']) or 'none'}"
        )
    if "pods" in answer:
        pods = answer["pods"]
        print(f"would wait for {len(pods)} meshed Pod(s): {', '.join(pods) or 'none'}")
    if answer.get("objects"):
        print(f"would write {len(answer['objects'])} object(s): {', '.join(answer['objects'])}")


def cmd_rotate(args: argparse.Namespace, settings: Settings) -> int:
    # local import: start-up time, each command loads only what it runs
    from ca_daemon.api.client import DaemonUnreachable
    from ca_daemon.errors import ApiError

    try:
        client = _client(args, settings)
        answer = client.rotate(args.target, args.reason, args.dry_run, args.emergency, args.revoke)
        if args.dry_run:
            steps = answer["steps"]
            for step in steps:
                print(f"would {step['action']} {step['kind']} {step['name']} ({step['reason']})")
            if answer.get("revokes"):
                print(f"would then revoke serial {', '.join(answer['revokes'])}")
            _print_touches(answer)
            if answer.get("path"):
                print("the whole rotation, at the earliest (each at the first check after):")
                for event in answer["path"]:
                    approx = "" if event["exact"] else "~"
                    print(f"  {approx}{event['at']}  {event['action']}: {event['reason']}")
            if answer.get("operation"):
                print(f"already requested: operation {answer['operation']} (a request joins it)")
            elif not steps:
                print("nothing to do")
            return EXIT_OK
        op_id = answer["operation"]
        print(f"operation {op_id}: {args.target}" + (" (EMERGENCY)" if args.emergency else ""))
        if answer.get("advice"):
            print(f"note: {answer['advice']}")
        if not args.wait:
            return EXIT_OK
        try:
            view = client.follow(op_id, print, until=args.wait if args.wait else "end")
            view = _in_effect(view, args.wait)
        except KeyboardInterrupt:  # only the waiting stops: the operation is journaled
            print(
                f"\nstopped waiting; operation {op_id} goes on in the daemon. Follow it with "
                f"`ca-daemon status --url {client.url}` or GET {client.url}/v1/operations/{op_id}",
                file=sys.stderr,
            )
            return EXIT_INTERRUPTED
    except DaemonUnreachable as exc:
        print(f"error: {exc}{_unreachable_hint(args)}", file=sys.stderr)
        return EXIT_FAILED
    except ApiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK if view["state"] in ("succeeded", "in effect") else EXIT_FAILED


def _in_effect(view: dict[str, Any], wait: str) -> dict[str, Any]:
    """Say what a root rotation followed until it took effect still has ahead of it."""
    if wait != "effect" or view["state"] != "running" or view.get("phase") != "retiring":
        return view
    retire = view.get("retire_after") or "when nothing under it can still be valid"
    print(
        f"{view['target']}: in effect since {view.get('activated_at')}: the new root signs "
        f"everything; the old root stays in every bundle until {retire} (follow it with "
        "--wait=retired, or `ca-daemon status`)"
    )
    return {**view, "state": "in effect"}


def _remote_status(args: argparse.Namespace, settings: Settings) -> int:
    # local import: start-up time, each command loads only what it runs
    from ca_daemon.errors import ApiError
    from ca_daemon.report.status import render_table

    try:
        view = _client(args, settings).status()
    except ApiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(view, indent=2) if args.json else render_table(view))
    return EXIT_OK


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    if args.url:
        return _remote_status(args, settings)
    # local import: start-up time, each command loads only what it runs
    from ca_daemon.anchor.local import NoState
    from ca_daemon.errors import AnchorError, JournalError
    from ca_daemon.journal.open import build_anchor_and_journal
    from ca_daemon.report.status import expired, render_table, status_view, waiting_for, warnings
    from ca_daemon.rotation.checks import journal_problems

    try:  # read-only: never creates a passphrase, never saves
        _, journal = build_anchor_and_journal(settings, create=False)
        state = journal.load().state
    except NoState as exc:
        print(f"error: no state yet ({exc}): run `ca-daemon run --once` first", file=sys.stderr)
        return EXIT_FAILED
    except (JournalError, AnchorError) as exc:
        print(f"error: reading state: {exc}", file=sys.stderr)
        return EXIT_FAILED
    now = datetime.now(UTC)
    view = status_view(state, settings, now, waiting=waiting_for(state, settings, now))
    print(json.dumps(view, indent=2) if args.json else render_table(view))
    for line in warnings(state, settings, now):
        print(f"warning: {line}", file=sys.stderr)
    problems = [f"journal: {p}" for p in journal_problems(state)]
    problems += expired(state, settings, now)
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    return EXIT_FAILED if problems else EXIT_OK


def _verified_clusters(
    settings: Settings, kubeconfigs: list[Path]
) -> list[tuple[str, Any, Settings]]:
    """(name, API client, settings as that cluster sees them) for each cluster verify
    reads: the configuration's clusters (each --kubeconfig in their order, else their own),
    or with one configured cluster, one per --kubeconfig (named by the file)."""
    # local import: start-up time, each command loads only what it runs
    from ca_daemon.errors import KubeError
    from ca_daemon.util.kube import api_client

    clusters = settings.clusters
    if len(clusters) < 2:
        if len(kubeconfigs) < 2:
            return [
                (
                    settings.home_cluster,
                    api_client(kubeconfigs[0] if kubeconfigs else None),
                    settings,
                )
            ]
        return [(path.stem, api_client(path), settings) for path in kubeconfigs]
    if len(kubeconfigs) > len(clusters):
        raise KubeError(
            f"{len(kubeconfigs)} --kubeconfig given, the configuration has {len(clusters)} clusters"
        )
    targets = []
    for i, cluster in enumerate(clusters):
        given = kubeconfigs[i] if i < len(kubeconfigs) else None
        own = settings if i == 0 else settings.for_cluster(cluster)
        path = given or cluster.kubeconfig
        targets.append(
            (cluster.name, api_client(path, context=None if given else cluster.context), own)
        )
    return targets


def cmd_verify(args: argparse.Namespace, settings: Settings) -> int:
    # local import: start-up time, each command loads only what it runs
    from ca_daemon.report.findings import Report
    from ca_daemon.report.verify import Thresholds, verify_published

    thresholds = Thresholds.from_settings(settings)
    now = datetime.now(UTC)
    if args.kubeconfig is not None or (args.dir is None and settings.kubernetes_enabled):
        # local import: start-up time, each command loads only what it runs
        from ca_daemon.errors import KubeError
        from ca_daemon.report.verify_cluster import verify_cluster, verify_clusters

        where = "cluster"
        try:
            targets = _verified_clusters(settings, args.kubeconfig or [])
            if len(targets) == 1:
                report = verify_cluster(targets[0][1], settings, now, thresholds)
            else:
                where = "clusters"
                report = verify_clusters(targets, now)
        except KubeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            if args.json:
                unread = Report()
                unread.add("cluster-unreadable", where, str(exc))
                print(json.dumps(unread.as_json(where), indent=2))
            return EXIT_FAILED
    else:
        where = str(args.dir or settings.publish_directory)
        report = verify_published(settings, Path(where), now)
    if args.json:
        print(json.dumps(report.as_json(where), indent=2))
        return EXIT_OK if report.ok else EXIT_FAILED
    for line in report.checked:
        print(f"checked {line}")
    for skipped in report.skipped:
        print(f"SKIPPED {skipped}")
    for found in report.findings:
        print(f"PROBLEM {found.line}")
    print(f"{where}: {'OK' if report.ok else f'{len(report.findings)} problem(s)'}")
    return EXIT_OK if report.ok else EXIT_FAILED


def cmd_config(args: argparse.Namespace, settings: Settings) -> int:
    if args.config_command == "rbac":
        # local import: start-up time, each command loads only what it runs
        from ca_daemon.report.rbac import manifests

        namespace, _, name = args.service_account.rpartition("/")
        if not namespace or not name:
            print("error: --service-account must be namespace/name", file=sys.stderr)
            return EXIT_USAGE
        linked = {c.name: c for c in settings.linked_clusters}
        if args.cluster is not None and args.cluster != settings.home_cluster:
            if args.cluster not in linked:
                known = ", ".join([settings.home_cluster, *linked]) or settings.home_cluster
                print(
                    f"error: --cluster: no cluster {args.cluster!r} (one of: {known})",
                    file=sys.stderr,
                )
                return EXIT_USAGE
            settings = settings.for_cluster(linked[args.cluster])
        print(yaml.safe_dump_all(manifests(settings, namespace, name), sort_keys=False), end="")
        return EXIT_OK
    print(yamltext.dump(effective_config(settings)), end="")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # local import: start-up time, each command loads only what it runs
    from ca_daemon.util import logs

    logs.configure()
    if args.command == "config" and args.config_command == "schema":
        # local import: start-up time, each command loads only what it runs
        from ca_daemon.report import schema

        print(
            schema.dumps(schema.values_schema() if args.helm_values else schema.config_schema()),
            end="",
        )
        return EXIT_OK
    try:
        settings = _settings(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.command in JUDGING and _settings_path(args) is None:
        print(
            "note: no --config and no $CA_DAEMON_CONFIG: judging against the embedded default "
            "configuration",
            file=sys.stderr,
        )
    handlers = {
        "run": cmd_run,
        "status": cmd_status,
        "rotate": cmd_rotate,
        "verify": cmd_verify,
        "config": cmd_config,
        "plan": forecast.command,
    }
    return handlers[args.command](args, settings)
