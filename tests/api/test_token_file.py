"""The static API token's file is trusted only as the daemon made it, and a file that
disappears or turns untrusted is said in the log while the token read before stays in
force; a caller is never told more than that its token is invalid."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from ca_daemon.api.auth import StaticTokenAuth, ensure_token_file

pytestmark = pytest.mark.usefixtures("clean_env")


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "api-token"
    assert ensure_token_file(path)
    assert path.stat().st_mode & 0o777 == 0o600
    return path


def test_the_token_in_a_file_the_daemon_made_is_accepted(token_file: Path) -> None:
    auth = StaticTokenAuth(token_file)
    token = token_file.read_text().strip()
    assert auth.decide(token, write=True).status == 200
    refused = auth.decide("guess", write=False)
    assert (refused.status, refused.reason) == (401, "invalid token")


def test_a_deleted_file_is_logged_once_and_the_token_read_before_still_works(
    token_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    auth = StaticTokenAuth(token_file)
    token = token_file.read_text().strip()
    assert auth.decide(token, write=False).status == 200
    token_file.unlink()
    with caplog.at_level(logging.INFO, logger="ca_daemon.api.auth"):
        for _ in range(5):
            assert auth.decide(token, write=False).status == 200
        assert auth.decide("guess", write=False).reason == "invalid token"
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1
        assert "No such file" in errors[0].getMessage()
        assert "keeping the token read before" in errors[0].getMessage()
        ensure_token_file(token_file)  # back: the new token is read from here on
        fresh = token_file.read_text().strip()
        assert auth.decide(fresh, write=False).status == 200
        assert auth.decide(token, write=False).status == 401
    assert "usable again" in caplog.text


@pytest.mark.parametrize("how", ["another-owner", "group-readable", "symlink", "directory"])
def test_an_untrusted_file_is_not_read(token_file: Path, tmp_path: Path, how: str) -> None:
    auth = StaticTokenAuth(token_file)
    token = token_file.read_text().strip()
    assert auth.decide(token, write=False).status == 200
    planted = "planted-by-someone-else"
    token_file.unlink()
    if how == "symlink":
        target = tmp_path / "elsewhere"
        target.write_text(planted)
        target.chmod(0o600)
        token_file.symlink_to(target)
    elif how == "directory":
        token_file.mkdir()
    else:
        token_file.write_text(planted)
        token_file.chmod(0o640 if how == "group-readable" else 0o600)
        if how == "another-owner":
            os.chown(token_file, 12345, 12345)
    assert auth.decide(planted, write=True).status == 401
    assert auth.decide(token, write=True).status == 200


def test_without_any_trusted_file_every_call_is_refused(tmp_path: Path) -> None:
    auth = StaticTokenAuth(tmp_path / "missing")
    refused = auth.decide("anything", write=False)
    assert (refused.status, refused.reason) == (401, "invalid token")
