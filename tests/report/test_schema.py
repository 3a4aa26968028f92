"""The configuration's JSON Schema and the chart's values.schema.json derived from it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ca_daemon.config.settings import Settings
from ca_daemon.report.schema import DURATION_PATTERN, config_schema, dumps, values_schema
from ca_daemon.util.durations import parse_duration

pytestmark = pytest.mark.usefixtures("clean_env")

VALUES_SCHEMA = Path(__file__).resolve().parents[2] / "charts" / "ca-daemon" / "values.schema.json"


def test_committed_values_schema_is_regenerated_unchanged() -> None:
    assert VALUES_SCHEMA.read_text() == dumps(values_schema()), (
        "regenerate: ca-daemon config schema --helm-values > charts/ca-daemon/values.schema.json"
    )


def test_the_command_prints_the_same() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ca_daemon", "config", "schema", "--helm-values"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert out.stdout == VALUES_SCHEMA.read_text()
    plain = subprocess.run(
        [sys.executable, "-m", "ca_daemon", "config", "schema"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert json.loads(plain.stdout) == config_schema()


def _walk(node: Any) -> list[dict[str, Any]]:
    found = []
    if isinstance(node, dict):
        found.append(node)
        for value in node.values():
            found += _walk(value)
    elif isinstance(node, list):
        for value in node:
            found += _walk(value)
    return found


def test_durations_are_strings_with_the_daemons_syntax() -> None:
    nodes = _walk(config_schema())
    assert not [n for n in nodes if n.get("format") == "duration"], "no ISO 8601 durations"
    durations = [n for n in nodes if n.get("pattern") == DURATION_PATTERN]
    assert len(durations) >= 10
    for text in ("48h", "1h30m", "90s", "0.5h", "250ms", "2d"):
        assert re.fullmatch(DURATION_PATTERN, text)
        parse_duration(text)
    for text in ("48", "h", "1 h", "P2D"):
        assert not re.fullmatch(DURATION_PATTERN, text)
    issuer = config_schema()["definitions"]["LinkerdIssuer"]["properties"]
    assert issuer["lifetime"]["default"] == "48h"
    assert issuer["rotate_before"]["default"] == "16h"


def test_every_section_and_field_is_in_the_schema_and_closed() -> None:
    schema = config_schema()
    assert set(schema["properties"]) == set(Settings.model_fields)
    assert schema["additionalProperties"] is False
    for name, definition in schema["definitions"].items():
        if definition.get("type") == "object":
            assert definition.get("additionalProperties") is False, name
    values = values_schema()
    assert values["properties"]["config"]["$ref"] == "#/definitions/Settings"
    refs = {n["$ref"] for n in _walk(values) if "$ref" in n}
    for ref in refs:
        assert ref.removeprefix("#/definitions/") in values["definitions"], ref


def test_the_configuration_reference_is_current() -> None:
    from ca_daemon.report.schema import reference_markdown

    doc = (VALUES_SCHEMA.parents[2] / "docs" / "configuration.md").read_text()
    begin, end = "<!-- BEGIN GENERATED: ca-daemon config schema -->\n", "<!-- END GENERATED -->"
    generated = doc.split(begin, 1)[1].split(end, 1)[0]
    assert generated == reference_markdown(), "regenerate the table in docs/configuration.md"
