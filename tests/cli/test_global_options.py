"""--config counts wherever it stands: before the command, after it, or after a
sub-action; a file that does not exist is an error, never the embedded default."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.support.cli import ca_daemon

pytestmark = pytest.mark.usefixtures("clean_env")


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "anchor": {"local": {"dir": str(tmp_path / "data")}},
                "publish": {"kubernetes": {"enabled": False}},
                "kong": {"clients": [{"name": "billing", "common_name": "kong.billing.up"}]},
            }
        )
    )
    return path


@pytest.mark.parametrize(
    "where",
    [
        ["--config", "{c}", "config", "check"],
        ["config", "--config", "{c}", "check"],
        ["config", "check", "--config", "{c}"],
    ],
    ids=["before-the-command", "between", "after"],
)
def test_config_check_reads_the_file_wherever_config_stands(
    config: Path, tmp_path: Path, where: list[str]
) -> None:
    run = ca_daemon(*(a.format(c=config) for a in where), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    checked = yaml.safe_load(run.stdout)
    assert [c["name"] for c in checked["kong"]["clients"]] == ["billing"]


def test_run_once_with_config_before_the_command_uses_it(config: Path, tmp_path: Path) -> None:
    run = ca_daemon("--config", str(config), "run", "--once", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "data" / "out" / "kong" / "clients" / "billing").is_dir()
    assert not (tmp_path / "ca-daemon-data").exists()  # the embedded default's directory


@pytest.mark.parametrize("command", [["run", "--once"], ["plan"], ["config", "check"], ["status"]])
@pytest.mark.parametrize("before", [True, False], ids=["before", "after"])
def test_a_config_file_that_does_not_exist_exits_2_naming_it(
    tmp_path: Path, command: list[str], before: bool
) -> None:
    missing = str(tmp_path / "nope.yaml")
    args = ["--config", missing, *command] if before else [*command, "--config", missing]
    run = ca_daemon(*args, cwd=tmp_path)
    assert run.returncode == 2, (run.stdout, run.stderr)
    assert f"config file {missing}: No such file or directory" in run.stderr
    assert not (tmp_path / "ca-daemon-data").exists()


@pytest.mark.parametrize("command", [["status"], ["verify"], ["plan", "--until", "1h"]])
def test_judging_without_a_configuration_says_so(
    config: Path, tmp_path: Path, command: list[str]
) -> None:
    bare = ca_daemon(*command, cwd=tmp_path)
    note = "note: no --config and no $CA_DAEMON_CONFIG: judging against the embedded default"
    assert note in bare.stderr
    given = ca_daemon(*command, "--config", str(config), cwd=tmp_path)
    assert note not in given.stderr
    from_env = ca_daemon(*command, cwd=tmp_path, env={"CA_DAEMON_CONFIG": str(config)})
    assert note not in from_env.stderr
