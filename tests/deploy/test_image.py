"""What the container image does, without building one (no container daemon here): the
Dockerfile is hadolint-clean and shaped as the chart expects, and the wheel installed
into a clean virtualenv with no dev dependencies runs `ca-daemon run --once` as an
unprivileged UID with everything read-only but the data volume."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.support.cli import daemon_env
from tests.support.servers import tools
from tests.support.servers.tools import free_port, require_tool

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
UID = 10001  # the Dockerfile's USER and the chart's runAsUser


def test_hadolint_passes() -> None:
    hadolint = require_tool("hadolint")
    out = subprocess.run(
        [hadolint, "--failure-threshold", "info", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_matches_the_chart() -> None:
    text = (ROOT / "Dockerfile").read_text()
    bases = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert len(bases) >= 2, "multi-stage"
    assert all(
        re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", b) for b in bases
    ), bases
    assert re.search(rf"^USER {UID}:{UID}$", text, re.M), "numeric non-root user"
    assert 'ENTRYPOINT ["ca-daemon"]' in text and 'CMD ["run"]' in text
    final = text.split("\nFROM ")[-1]
    assert "--no-index" in final, "the final stage installs only the built wheels"
    assert not re.search(r"\b(gcc|build-essential|apt-get install)\b", final)
    values = yaml.safe_load((ROOT / "charts" / "ca-daemon" / "values.yaml").read_text())
    assert values["podSecurityContext"]["runAsUser"] == UID
    assert (ROOT / ".dockerignore").is_file()


def _dependency_wheels() -> Path:
    """Wheels of the runtime dependencies, downloaded once per pyproject.toml."""
    key = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:16]
    cache = tools.testenv_dir() / "wheels" / key
    if not cache.is_dir():
        staging = Path(tempfile.mkdtemp(dir=tools.testenv_dir()))
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", str(ROOT), "-w", str(staging)],
            check=True,
            timeout=600,
        )
        for own in staging.glob("ca_daemon-*.whl"):
            own.unlink()
        cache.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(cache)
    return cache


@pytest.fixture
def image_root() -> Iterator[Path]:
    # Not under pytest's tmp_path: that is 0700 root, which UID 10001 cannot enter.
    root = Path(tempfile.mkdtemp(prefix="ca-daemon-image-"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_wheel_runs_once_as_an_unprivileged_uid_in_a_clean_venv(image_root: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to UID 10001")
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv is not installed")
    deps = _dependency_wheels()
    dist = image_root / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(ROOT), "-w", str(dist)],
        check=True,
        timeout=300,
    )
    (wheel,) = dist.glob("ca_daemon-*.whl")

    venv = image_root / "opt" / "ca-daemon"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run(
        [
            str(venv / "bin" / "pip"),
            "install",
            "-q",
            "--no-index",
            "--find-links",
            str(deps),
            str(wheel),
        ],
        check=True,
        timeout=300,
    )
    frozen = subprocess.run(
        [str(venv / "bin" / "pip"), "freeze"], capture_output=True, text=True, check=True
    ).stdout.lower()
    for dev in ("pytest", "ruff", "mypy", "hadolint"):
        assert dev not in frozen, f"{dev} is a dev dependency, not in the image"

    volume = image_root / "var" / "lib" / "ca-daemon"
    volume.mkdir(parents=True)
    os.chown(volume, UID, UID)
    volume.chmod(0o700)
    config = image_root / "etc" / "config.yaml"
    config.parent.mkdir()
    config.write_text(
        yaml.safe_dump(
            {
                "anchor": {"backend": "local", "local": {"dir": str(volume / "data")}},
                "publish": {"kubernetes": {"enabled": False}},
                "server": {"address": f"127.0.0.1:{free_port()}"},
                "kong": {"clients": [{"name": "example", "common_name": "kong.example.upstream"}]},
            }
        )
    )
    env = daemon_env({"HOME": str(volume), "PATH": f"{venv / 'bin'}:/usr/bin:/bin"})
    env.pop("VIRTUAL_ENV", None)
    env.pop("PYTHONPATH", None)

    def as_uid(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [setpriv, f"--reuid={UID}", f"--regid={UID}", "--clear-groups", *argv],
            cwd=volume,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )

    # Only the volume is writable by the daemon's UID: not the venv, not its config.
    refused = as_uid("sh", "-c", f"touch {venv}/bin/x || touch {config.parent}/x")
    assert refused.returncode != 0
    assert as_uid("id", "-u").stdout.strip() == str(UID)

    ran = as_uid(str(venv / "bin" / "ca-daemon"), "run", "--once", "--config", str(config))
    assert ran.returncode == 0, ran.stdout + ran.stderr
    verified = as_uid(str(venv / "bin" / "ca-daemon"), "verify", "--config", str(config))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    # It imported the installed package, not the source tree.
    where = as_uid(
        str(venv / "bin" / "python"), "-c", "import ca_daemon; print(ca_daemon.__file__)"
    )
    assert where.stdout.startswith(str(venv)), where.stdout + where.stderr
    out = volume / "data" / "out"
    assert (out / "linkerd" / "tls.crt").is_file()
    assert (out / "linkerd" / "tls.key").stat().st_uid == UID
    assert (out / "linkerd" / "tls.key").stat().st_mode & 0o077 == 0
