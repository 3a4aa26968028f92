"""Loading the configuration from its layers, and saying what is wrong in one message.

Precedence, highest first: CLI flags > ``CA_DAEMON_*`` environment (nested keys
joined by ``__``) > the YAML file (``--config`` or ``CA_DAEMON_CONFIG``) > defaults.
With no file at all the packaged embedded default stands in for the YAML layer.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any, get_origin

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_settings import SettingsError

from ca_daemon.config.service_links import is_service_link
from ca_daemon.config.settings import (
    CONFIG_ENV,
    ENV_PREFIX,
    NOT_CONFIG_ENV,
    YAML_LAYER,
    RuleError,
    Settings,
)
from ca_daemon.errors import ConfigError
from ca_daemon.util import yamltext


def embedded_default() -> dict[str, Any]:
    text = resources.files("ca_daemon.config").joinpath("default.yaml").read_text()
    data = yaml.safe_load(text)
    assert isinstance(data, dict)
    return data


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """What is wrong and where, without the quoted snippet of the file: it may hold a secret."""
    if not isinstance(exc, yaml.MarkedYAMLError):
        return str(exc)
    what = "; ".join(part for part in (exc.context, exc.problem) if part) or "syntax error"
    mark = exc.problem_mark or exc.context_mark
    return f"{what} (line {mark.line + 1}, column {mark.column + 1})" if mark else what


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror or exc}") from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
            f"{exc.start}); expected UTF-8 YAML text"
        ) from None
    if "\0" in text:
        raise ConfigError(
            f"config file {path}: binary content (NUL byte at offset {raw.index(0)}); "
            "expected UTF-8 YAML text"
        )
    try:
        data = yamltext.load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: not valid YAML: {_yaml_problem(exc)}") from None
    except RecursionError:
        raise ConfigError(f"config file {path}: not valid YAML: nested too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping of sections")
    odd = [repr(key) for key in data if not isinstance(key, str)]
    if odd:
        raise ConfigError(f"config file {path}: {', '.join(odd)}: unknown key (not a section name)")
    return data


def _field_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path or "(top level)"


def describe_validation_error(exc: ValidationError, more: Iterable[str] = ()) -> str:
    """One line per problem (``more`` after those of ``exc``), each once."""
    lines = [*(line for _, line in _located(exc)), *more]
    return "invalid configuration:\n  " + "\n  ".join(dict.fromkeys(lines))


def _located(exc: ValidationError) -> list[tuple[tuple[int | str, ...], str]]:
    """(location, line) for each problem, the location without pydantic's tags."""
    found = []
    for error in exc.errors():
        # Pydantic tags union members and validators into loc; drop those for a plain path.
        loc = tuple(
            p
            for p in error["loc"]
            if not (isinstance(p, str) and ("[" in p or p.startswith("function-")))
        )
        cause = error.get("ctx", {}).get("error")
        if isinstance(cause, RuleError):
            for path, rule in cause.problems:
                where = (*loc, *_parse_path(path))
                found.append((where, f"{_field_path(where)}: {rule}"))
            continue
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        found.append((loc, f"{_field_path(loc)}: {message}"))
    return found


def _parse_path(path: str) -> tuple[int | str, ...]:
    """``kong.clients[0].lifetime`` as ("kong", "clients", 0, "lifetime")."""
    return tuple(
        int(part[1:-1]) if part.startswith("[") else part
        for part in re.findall(r"\[\d+\]|[^.\[\]]+", path)
    )


# Rules across fields (unique names, renewal margins, name lengths) run only once every
# field they read is valid, so one check would report them only after the field errors
# were fixed. Later rounds drop the keys already found wrong and validate again.
_ROUNDS = 5


def _drop(layer: dict[str, Any], loc: tuple[int | str, ...]) -> bool:
    """Remove ``loc`` from ``layer``; False when it is not there (e.g. a missing key)."""
    node: Any = layer
    for part in loc[:-1]:
        in_list = isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
        if not (in_list or (isinstance(node, dict) and part in node)):
            return False
        node = node[part]
    last = loc[-1] if loc else None
    if isinstance(node, dict) and last in node:
        del node[last]
        return True
    return False


def _within(loc: tuple[int | str, ...], removed: list[tuple[int | str, ...]]) -> bool:
    """``loc`` is in a section one of the ``removed`` keys belonged to: its check may now
    judge a default the file never set, so it is not reported."""
    return any(loc[: len(r) - 1] == r[:-1] for r in removed)


def _later_rounds(
    yaml_layer: Mapping[str, Any], overrides: Mapping[str, Any], first: ValidationError
) -> list[str]:
    layer = copy.deepcopy(dict(yaml_layer))
    errors, removed, lines = _located(first), [], []
    for _ in range(_ROUNDS):
        dropped = [loc for loc, _ in errors if _drop(layer, loc)]
        if not dropped:
            break
        removed += dropped
        token = YAML_LAYER.set(layer)
        try:
            Settings(**dict(overrides))
            break
        except ValidationError as exc:
            errors = _located(exc)
            lines += [line for loc, line in errors if not _within(loc, removed)]
        except SettingsError:
            break
        finally:
            YAML_LAYER.reset(token)
    return lines


def _environment_problems(environ: Mapping[str, str]) -> list[str]:
    """CA_DAEMON_* variables that name no field, or whose JSON value does not parse.

    A misspelt variable is an error like an unknown YAML key, never silently ignored.
    Names are matched without regard to case, as pydantic-settings does. The kubelet's
    service links of a Service named ``ca-daemon`` or ``ca-daemon-*`` are not settings,
    and neither layer reads them (config/service_links.py).
    """
    problems = []
    for name, value in sorted(environ.items()):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in NOT_CONFIG_ENV:
            continue
        if is_service_link(name, value):
            continue
        model: type[BaseModel] | None = Settings
        takes_json = False
        path = ""
        for key in upper.removeprefix(ENV_PREFIX).lower().split("__"):
            field = model.model_fields.get(key) if model is not None else None
            if field is None:
                where = f"in {path}" if path else "at the top level"
                problems.append(
                    f"{name}: unknown setting ({key!r} is not a configuration key {where}; "
                    f"variables are {ENV_PREFIX} + the key path joined by '__')"
                )
                break
            path = f"{path}.{key}" if path else key
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                model, takes_json = annotation, True
            else:
                model, takes_json = None, get_origin(annotation) in (list, dict)
        else:
            # pydantic-settings decodes sections and lists as JSON; say which variable failed.
            if takes_json:
                try:
                    json.loads(value)
                except ValueError as exc:
                    problems.append(f"{name}: {path} takes a JSON value, and this is not: {exc}")
    return problems


def load_settings(path: Path | None = None, overrides: Mapping[str, Any] | None = None) -> Settings:
    """Load configuration from every layer; raise ConfigError naming each bad field."""
    if path is None and os.environ.get(CONFIG_ENV):
        path = Path(os.environ[CONFIG_ENV])
    env_problems = _environment_problems(os.environ)
    if env_problems:
        raise ConfigError("invalid environment:\n  " + "\n  ".join(env_problems))
    yaml_layer = _read_yaml(path) if path is not None else embedded_default()
    token = YAML_LAYER.set(yaml_layer)
    try:
        return Settings(**dict(overrides or {}))
    except ValidationError as exc:
        later = _later_rounds(yaml_layer, overrides or {}, exc)
        raise ConfigError(describe_validation_error(exc, later)) from None
    except SettingsError as exc:  # the checks above should leave nothing for this
        raise ConfigError(f"invalid environment: {exc}: {exc.__cause__}") from None
    finally:
        YAML_LAYER.reset(token)


def effective_config(settings: Settings) -> dict[str, Any]:
    """The configuration as it is in force, secrets redacted, ready to print as YAML."""
    data = settings.model_dump(mode="json")
    data["root"]["common_name"] = settings.root_common_name
    data["publish"]["directory"] = str(settings.publish_directory)
    data["publish"]["kubernetes"]["enabled"] = settings.kubernetes_enabled
    data["server"]["token_file"] = str(settings.api_token_file)
    data["anchor"]["local"]["passphrase_file"] = str(
        settings.anchor.local.effective_passphrase_file
    )
    if data["leader_election"]["enabled"] is None:
        data["leader_election"]["enabled"] = settings.kubernetes_enabled
    for client, model in zip(data["kong"]["clients"], settings.kong.clients, strict=True):
        client["secret"] = model.secret_name
    return data
