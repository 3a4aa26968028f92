"""Configuration that would pass `config check` and then break `run` is refused at load time.

One row per bad configuration: `ca-daemon config check FILE` exits 2 with a line naming
the field (or the environment variable, or the file) and the rule. No traceback, and no
secret in the message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from ca_daemon.cli import main
from ca_daemon.config import ConfigError, load_settings
from ca_daemon.durations import parse_duration

FILE = "config file"  # the field of a row whose problem is the file itself
SECRET = "s.supersecret"

# (config, environment, field, rule); config is a mapping written as YAML, or raw bytes.
BAD: dict[str, tuple[dict[str, Any] | bytes, dict[str, str], str, str]] = {
    "overflowing duration": (
        {"root": {"lifetime": "100000000000h"}},
        {},
        "root.lifetime",
        "too long: at most 100 years",
    ),
    # The environment.
    "misspelt section in the environment": (
        {},
        {"CA_DAEMON_ANCHR__BACKEND": "vault"},
        "CA_DAEMON_ANCHR__BACKEND",
        "unknown setting ('anchr' is not a configuration key at the top level",
    ),
    "misspelt nested key in the environment": (
        {},
        {"CA_DAEMON_ANCHOR__VAULT__AUTH__TOKN": SECRET},
        "CA_DAEMON_ANCHOR__VAULT__AUTH__TOKN",
        "'tokn' is not a configuration key in anchor.vault.auth",
    ),
    "key below a plain value in the environment": (
        {},
        {"CA_DAEMON_TRUST_DOMAIN__NAME": "x"},
        "CA_DAEMON_TRUST_DOMAIN__NAME",
        "unknown setting",
    ),
    "malformed JSON list in the environment": (
        {},
        {"CA_DAEMON_KONG__CLIENTS": "[{"},
        "CA_DAEMON_KONG__CLIENTS",
        "kong.clients takes a JSON value, and this is not",
    ),
    "malformed JSON section holding a secret": (
        {},
        {"CA_DAEMON_ANCHOR__VAULT__AUTH": f'{{"token": "{SECRET}"'},
        "CA_DAEMON_ANCHOR__VAULT__AUTH",
        "takes a JSON value",
    ),
    # Files that are not YAML text.
    "random bytes": (
        b"\xff\xfe\x80\x81 binary",
        {},
        FILE,
        "not UTF-8 text (byte 0xff at offset 0)",
    ),
    "UTF-16": ("trust_domain: x\n".encode("utf-16"), {}, FILE, "not UTF-8 text"),
    "UTF-16 without a BOM": ("trust_domain: x\n".encode("utf-16-le"), {}, FILE, "NUL byte"),
    "NUL in the file": (b"trust_domain: x\0\n", {}, FILE, "binary content (NUL byte at offset 15)"),
    "unclosed quote around a secret": (
        f'anchor: {{vault: {{auth: {{token: "{SECRET}}}}}}}\n'.encode(),
        {},
        FILE,
        "not valid YAML: while scanning a quoted scalar; found unexpected end of stream",
    ),
    "nested too deeply": (b"[" * 5000, {}, FILE, "nested too deeply"),
    "a number as a section name": (b"1: 2\n", {}, FILE, "1: unknown key"),
}


def _write(tmp_path: Path, config: dict[str, Any] | bytes) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_bytes(config if isinstance(config, bytes) else yaml.safe_dump(config).encode())
    return path


@pytest.mark.parametrize(("config", "env", "field", "rule"), BAD.values(), ids=BAD.keys())
def test_bad_configuration_exits_2_naming_field_and_rule(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    config: dict[str, Any] | bytes,
    env: dict[str, str],
    field: str,
    rule: str,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    path = _write(tmp_path, config)
    assert main(["config", "check", str(path)]) == 2
    err = capsys.readouterr().err
    prefix = f"config file {path}" if field == FILE else field
    lines = [ln.strip().removeprefix("error: ") for ln in err.splitlines()]
    line = next((ln for ln in lines if ln.startswith(f"{prefix}:")), None)
    assert line is not None, err
    assert rule in line, err
    assert "Traceback" not in err
    assert SECRET not in err


def test_test_suite_and_config_file_variables_are_not_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CA_DAEMON_REQUIRE_ALL", "1")
    monkeypatch.setenv("CA_DAEMON_TESTENV", str(tmp_path))
    monkeypatch.setenv("CA_DAEMON_CONFIG", str(_write(tmp_path, {"trust_domain": "a.local"})))
    assert load_settings().trust_domain == "a.local"


def test_environment_as_the_daemon_loop_test_sets_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CA_DAEMON_ROTATION__CHECK_INTERVAL", "1s")
    monkeypatch.setenv("CA_DAEMON_LINKERD__ISSUER__LIFETIME", "8s")
    monkeypatch.setenv("CA_DAEMON_LINKERD__ISSUER__ROTATE_BEFORE", "6s")
    monkeypatch.setenv("CA_DAEMON_ROTATION__CLOCK_SKEW", "0s")
    monkeypatch.setenv("CA_DAEMON_KONG__CLIENTS", '[{"name": "a", "common_name": "kong.a"}]')
    settings = load_settings()
    assert settings.linkerd.issuer.lifetime.total_seconds() == 8
    assert [c.name for c in settings.kong.clients] == ["a"]


def test_environment_names_are_matched_without_case(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ca_daemon_anchr__backend", "vault")
    with pytest.raises(ConfigError, match="ca_daemon_anchr__backend: unknown setting"):
        load_settings()


def test_a_settings_error_left_over_is_still_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The environment checks come first; pydantic-settings' own error is the fallback.
    monkeypatch.setattr("ca_daemon.config._environment_problems", lambda environ: [])
    monkeypatch.setenv("CA_DAEMON_KONG__CLIENTS", "[{")
    with pytest.raises(ConfigError, match=r'field "kong" .*: Expecting property name'):
        load_settings()


@pytest.mark.parametrize("text", ["100000000000h", "876601h", "9" * 400 + "s"])
def test_durations_are_bounded(text: str) -> None:
    with pytest.raises(ValueError, match="at most 100 years"):
        parse_duration(text)
