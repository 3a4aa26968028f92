"""docs/reference.md lists every command with exactly the options its --help shows."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from ca_daemon.cli import _parser

REFERENCE = Path(__file__).resolve().parents[2] / "docs" / "reference.md"
GLOBAL = {"--help", "--config", "-h", "--version"}


def _commands(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, set[str]]:
    """Command path ("config rbac") → its long options, from the parser itself."""
    found: dict[str, set[str]] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                path = f"{prefix} {name}".strip()
                children = _commands(sub, path)
                if children:
                    found.update(children)
                else:
                    found[path] = {
                        option
                        for a in sub._actions
                        for option in a.option_strings
                        if option.startswith("--") and option not in GLOBAL
                    }
    return found


def _documented() -> dict[str, set[str]]:
    text = REFERENCE.read_text().split("## Commands and exit codes", 1)[1].split("\n## ", 1)[0]
    entries = re.findall(r"^- `ca-daemon ([a-z ]+?)(?: [A-Z\[]([^`]*))?`", text, re.M)
    return {
        command.strip(): set(re.findall(r"--[a-z][-a-z]*", rest or "")) - GLOBAL
        for command, rest in ((m[0], m[1]) for m in entries)
    }


def test_every_command_is_documented_with_exactly_its_options() -> None:
    assert _commands(_parser()) == _documented()


def test_the_check_sees_a_missing_option() -> None:
    documented = _documented()
    assert "--dir" in documented["verify"]
    assert {"run", "status", "rotate", "plan", "config rbac"} <= set(documented)
