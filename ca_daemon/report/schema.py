"""JSON Schema of the configuration, from the models themselves (``ca-daemon config schema``).

The Helm chart's ``values.schema.json`` is :func:`values_schema`: the configuration's schema
under ``config``, so that ``helm install`` refuses a key or value the daemon would refuse.
Durations are the strings operators write (``48h``, ``1h30m``), not ISO 8601.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from pydantic.json_schema import GenerateJsonSchema
from pydantic_core import core_schema

from ca_daemon.config.settings import Settings
from ca_daemon.util.durations import format_duration

DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h|d))+$"
_DEFINITIONS = "definitions"


class _Generator(GenerateJsonSchema):
    def timedelta_schema(self, schema: core_schema.TimedeltaSchema) -> dict[str, Any]:
        return {"type": "string", "pattern": DURATION_PATTERN}

    def encode_default(self, dft: Any) -> Any:
        if isinstance(dft, timedelta):
            return format_duration(dft)
        return super().encode_default(dft)


def config_schema() -> dict[str, Any]:
    """The configuration file's schema (draft-07 layout: shared models under definitions)."""
    schema = Settings.model_json_schema(
        schema_generator=_Generator, ref_template=f"#/{_DEFINITIONS}/{{model}}"
    )
    definitions = schema.pop("$defs", {})
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        **schema,
        _DEFINITIONS: definitions,
    }


def values_schema() -> dict[str, Any]:
    """The Helm chart's values schema: the configuration under ``config``; the chart's own
    keys are checked where a mistake is easy, the rest is left to the templates."""
    config = config_schema()
    definitions = config.pop(_DEFINITIONS)
    config.pop("$schema")
    definitions["Settings"] = config
    flag = {"type": "object", "properties": {"enabled": {"type": "boolean"}}}
    # A misspelt timing would silently leave Kubernetes' default (1s timeout) in place.
    seconds = {"type": "integer", "minimum": 1}
    probe = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "initialDelaySeconds": {"type": "integer", "minimum": 0},
            "periodSeconds": seconds,
            "timeoutSeconds": seconds,
            "successThreshold": seconds,
            "failureThreshold": seconds,
            "terminationGracePeriodSeconds": seconds,
        },
    }
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "ca-daemon Helm chart values",
        "type": "object",
        "properties": {
            "config": {
                "description": "The daemon's configuration file, as it is (see "
                "docs/configuration.md); the chart sets publish.kubernetes, "
                "leader_election.enabled/namespace, anchor.local.dir and, with the "
                "kubernetes auth method, anchor.vault.auth.jwt_file.",
                "$ref": f"#/{_DEFINITIONS}/Settings",
            },
            "replicaCount": {"type": "integer", "minimum": 1},
            "image": {
                "type": "object",
                "properties": {
                    "repository": {"type": "string"},
                    "tag": {"type": "string"},
                    "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
                },
            },
            "vault": {
                "type": "object",
                "properties": {
                    "audience": {"type": "string", "minLength": 1},
                    "tokenExpirationSeconds": {"type": "integer", "minimum": 600},
                    "tokenReviewer": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {"create": {"type": "boolean"}},
                    },
                },
            },
            "enableServiceLinks": {"type": "boolean"},
            "hostNetwork": {"type": "boolean"},
            "dnsPolicy": {
                "enum": ["", "ClusterFirst", "ClusterFirstWithHostNet", "Default", "None"]
            },
            "probes": {
                "type": "object",
                "additionalProperties": False,
                "properties": {"startup": probe, "liveness": probe, "readiness": probe},
            },
            "serviceMonitor": flag,
            "prometheusRule": flag,
            "grafanaDashboard": flag,
            "networkPolicy": flag,
            "persistence": flag,
            "podDisruptionBudget": flag,
        },
        _DEFINITIONS: definitions,
    }


def dumps(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2) + "\n"


def _type_of(node: dict[str, Any], definitions: dict[str, Any]) -> str:
    if "$ref" in node:
        return "section"
    if "anyOf" in node:
        kinds = [_type_of(n, definitions) for n in node["anyOf"] if n.get("type") != "null"]
        text = " or ".join(kinds)
        return f"{text} (optional)" if len(kinds) < len(node["anyOf"]) else text
    if "const" in node:
        return f"`{node['const']}`"
    if "enum" in node:
        return " \\| ".join(f"`{v}`" for v in node["enum"])
    if node.get("pattern") == DURATION_PATTERN:
        return "duration"
    if node.get("type") == "array":
        items = node.get("items", {})
        return "list of " + ("entries (below)" if "$ref" in items else _type_of(items, definitions))
    return str(node.get("format") or node.get("type", "any"))


def reference_rows() -> list[tuple[str, str, str]]:
    """(key path, type, default) for every configuration key, in model order."""
    schema = config_schema()
    definitions = schema["definitions"]
    rows: list[tuple[str, str, str]] = []

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key, prop in node.get("properties", {}).items():
            path = f"{prefix}{key}"
            target = prop.get("$ref") or prop.get("items", {}).get("$ref")
            default = prop.get("default")
            if "$ref" in prop:
                walk(definitions[target.rsplit("/", 1)[1]], path + ".")
                continue
            shown = "" if "default" not in prop else f"`{json.dumps(default)}`"
            if key in node.get("required", []):
                shown = "required"
            rows.append((path, _type_of(prop, definitions), shown))
            if target:
                walk(definitions[target.rsplit("/", 1)[1]], path + "[].")

    walk(schema, "")
    return rows


def reference_markdown() -> str:
    """The key table of docs/configuration.md (between its BEGIN/END markers)."""
    lines = ["| key | type | default |", "|---|---|---|"]
    lines += [f"| `{path}` | {kind} | {default} |" for path, kind, default in reference_rows()]
    return "\n".join(lines) + "\n"
