"""A daemon that cannot start says why in one line and exits 1: no traceback, and it
never keeps keys in a directory another user owns or may write."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from tests.support.cli import ca_daemon

pytestmark = pytest.mark.usefixtures("clean_env")


def _config(tmp_path: Path, data: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump(
            {"anchor": {"local": {"dir": str(data)}}, "publish": {"kubernetes": {"enabled": False}}}
        )
    )
    return path


def _one_line_error(tmp_path: Path, data: Path) -> str:
    run = ca_daemon("run", "--once", "--config", str(_config(tmp_path, data)), cwd=tmp_path)
    assert run.returncode == 1, (run.stdout, run.stderr)
    assert "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, run.stderr
    return errors[0]


def test_a_data_directory_others_may_write_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o777)
    line = _one_line_error(tmp_path, data)
    assert line == (
        "error: cannot start: mode 0777 lets other users write there: refusing to keep keys "
        f"there (chmod go-w, or 0700) ({data})"
    )
    assert os.listdir(data) == []


def test_a_data_directory_another_user_owns_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    os.chown(data, 12345, 12345)
    line = _one_line_error(tmp_path, data)
    assert "owned by uid 12345, not this daemon's uid" in line
    assert os.listdir(data) == []


def test_a_data_directory_that_cannot_be_made_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    line = _one_line_error(tmp_path, tmp_path / "a-file" / "data")
    assert line == f"error: cannot start: Not a directory ({tmp_path / 'a-file' / 'data'})"


def test_a_lost_passphrase_is_never_made_anew(tmp_path: Path) -> None:
    """Keys and a journal sealed with it exist: a new passphrase could open none of them,
    and following a "move it aside" advice would take the published credentials down."""
    data = tmp_path / "data"
    config = _config(tmp_path, data)
    assert ca_daemon("run", "--once", "--config", str(config), cwd=tmp_path).returncode == 0
    published = {p: p.read_bytes() for p in (data / "out").rglob("*") if p.is_file()}
    (data / "passphrase").unlink()
    line = _one_line_error(tmp_path, data)
    assert line.startswith(f"error: cannot start: passphrase file {data / 'passphrase'} is missing")
    assert "restore the file from a backup" in line
    assert not (data / "passphrase").exists()
    assert {p: p.read_bytes() for p in (data / "out").rglob("*") if p.is_file()} == published
    status = ca_daemon("status", "--config", str(config), cwd=tmp_path)
    assert status.returncode == 1
    assert "is missing, but" in status.stderr and "no state yet" not in status.stderr
