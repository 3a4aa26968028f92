"""The shipped Prometheus alert rules: promtool checks them and runs their unit tests, and
they name only metrics (and label values) that the daemon really exports."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.metrics_exposition import METRIC_NAME, default_settings, exposition, samples

pytestmark = pytest.mark.integration

POLICIES = Path(__file__).resolve().parents[2] / "policies" / "prometheus"
RULES = POLICIES / "ca-daemon.rules.yaml"
RULE_TESTS = POLICIES / "tests" / "ca-daemon.rules.test.yaml"

SELECTOR = re.compile(r"\b(ca_daemon_[a-z_]+)\s*\{([^}]*)\}")
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def _rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    assert set(document) == {"groups"}, "a plain Prometheus rule file: only `groups:`"
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_promtool_checks_the_rule_file(promtool: str) -> None:
    checked = _run(promtool, "check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in checked.stdout


def test_promtool_unit_tests_pass(promtool: str) -> None:
    tested = _run(promtool, "test", "rules", str(RULE_TESTS))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_every_alert_is_documented_and_tested_firing_and_not() -> None:
    cases: dict[str, list[list[Any]]] = {}
    for group in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for case in group.get("alert_rule_test", []):
            cases.setdefault(case["alertname"], []).append(case.get("exp_alerts") or [])
    alerts = [rule for rule in _rules() if "alert" in rule]
    assert len(alerts) == len({rule["alert"] for rule in alerts}), "alert names are unique"
    docs = (Path(__file__).resolve().parents[2] / "docs" / "alerts.md").read_text()
    for rule in alerts:
        name = rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        annotations = rule["annotations"]
        assert {"summary", "description", "runbook"} <= set(annotations), name
        assert "\n" not in annotations["runbook"], f"{name}: the runbook is one line"
        assert name in docs, f"{name} is not in docs/alerts.md"
        assert any(cases.get(name, [])), f"{name}: no test case where it fires"
        assert [] in cases.get(name, []), f"{name}: no test case where it does not fire"


# --- the rules against what the daemon exports ------------------------------------------


@pytest.fixture
def clean_exposition(tmp_path: Path) -> str:
    return exposition(default_settings(tmp_path), troubled=False)


@pytest.fixture
def troubled_exposition(tmp_path: Path) -> str:
    """A pass with a failed issuance, a publish error and drift: every metric has samples."""
    return exposition(default_settings(tmp_path), troubled=True)


@pytest.mark.parametrize("which", ["clean_exposition", "troubled_exposition"])
def test_promtool_check_metrics_is_clean(
    promtool: str, which: str, request: pytest.FixtureRequest
) -> None:
    text: str = request.getfixturevalue(which)
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0 and not (checked.stdout + checked.stderr).strip(), (
        checked.stdout + checked.stderr
    )


def test_rules_name_only_exported_metrics_and_label_values(troubled_exposition: str) -> None:
    exported = samples(troubled_exposition)
    expressions = [rule["expr"] for rule in _rules()]
    used = {name for expr in expressions for name in METRIC_NAME.findall(expr)}
    assert len(used) >= 10, used  # the regex finds the names at all
    missing = sorted(used - set(exported))
    assert not missing, f"rules use metrics the daemon does not export: {missing}"
    for expr in expressions:
        for metric, matchers in SELECTOR.findall(expr):
            for label, op, value in MATCHER.findall(matchers):
                present = {labels.get(label) for labels in exported[metric]}
                assert present - {None}, f"{metric} has no label {label!r}"
                if op in {"=", "=~"}:
                    wanted = value.split("|") if op == "=~" else [value]
                    absent = [v for v in wanted if v not in present]
                    assert not absent, f"{metric}{{{label}{op}{value!r}}}: never {absent}"
