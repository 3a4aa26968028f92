"""The images the test node runs, checked without a cluster: what their docker-archives say.

The ca-daemon image is built from the shipped Dockerfile (tests/support/servers/images.py,
cached by source hash, so this is quick the second time); pause, busybox and the Python
base come from scripts/node-images.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest

from tests.support.servers.images import (
    BUSYBOX_IMAGE,
    CA_DAEMON_REPOSITORY,
    PAUSE_IMAGE,
    PYTHON_BASE_IMAGE,
    Image,
    ca_daemon_image,
    node_images,
    python_base_image,
    source_hash,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
UID = 10001  # the Dockerfile's USER and the chart's runAsUser


@dataclass
class Archive:
    """One image of a docker-archive: its tags, its config, and each layer's members."""

    tags: list[str]
    config: dict[str, Any]
    layers: list[dict[str, tarfile.TarInfo]]
    path: Path

    def read(self, layer: int, member: str) -> bytes:
        with tarfile.open(self.path) as outer:
            names = json.load(_extract(outer, "manifest.json"))[0]["Layers"]
            with tarfile.open(fileobj=_extract(outer, names[layer])) as inner:
                return _extract(inner, self.layers[layer][member].name).read()


def _extract(archive: tarfile.TarFile, name: str) -> IO[bytes]:
    handle = archive.extractfile(name)
    assert handle is not None, f"{name} is not a file in the archive"
    return handle


def _open(image: Image) -> Archive:
    with tarfile.open(image.archive) as outer:
        (entry,) = json.load(_extract(outer, "manifest.json"))
        config = json.load(_extract(outer, entry["Config"]))
        layers = []
        for name in entry["Layers"]:
            # Streamed: a layer of the ca-daemon image is a few hundred MB.
            with tarfile.open(fileobj=_extract(outer, name), mode="r|") as inner:
                layers.append({m.name.removeprefix("./"): m for m in inner})
    return Archive(entry["RepoTags"], config, layers, image.archive)


def _never_pulled(name: str) -> bool:
    registry, _, rest = name.partition("/")
    return "." in registry and ":" in rest and not rest.endswith(":latest")


@pytest.mark.timeout(1500)  # a cold build fetches every dependency from PyPI
def test_ca_daemon_image_is_what_the_chart_runs() -> None:
    image = ca_daemon_image(ROOT)
    assert re.fullmatch(rf"{re.escape(CA_DAEMON_REPOSITORY)}:[0-9a-f]{{12}}", image.name)
    assert _never_pulled(image.name)
    archive = _open(image)
    assert archive.tags == [image.name]
    config = archive.config["config"]
    assert config["User"] == f"{UID}:{UID}"
    assert config["Entrypoint"] == ["ca-daemon"]
    assert config["Cmd"] == ["run"]
    assert config["WorkingDir"] == "/var/lib/ca-daemon"
    assert "8080/tcp" in config["ExposedPorts"]
    assert any(e.startswith("PATH=/opt/ca-daemon/bin:") for e in config["Env"]), config["Env"]

    entry = "opt/ca-daemon/bin/ca-daemon"
    (top,) = [i for i, layer in enumerate(archive.layers) if entry in layer]
    assert archive.layers[top][entry].mode & 0o111
    assert archive.read(top, entry).startswith(b"#!/opt/ca-daemon/bin/python")
    passwd = archive.read(top, "etc/passwd").decode()
    assert re.search(rf"^ca-daemon:x:{UID}:{UID}:", passwd, re.M), passwd
    # The wheels were removed in the step that installed them: in no layer at all.
    assert not any(name.startswith("wheels/") for layer in archive.layers for name in layer)


def test_source_hash_covers_what_goes_into_the_image(tmp_path: Path) -> None:
    for name in ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, tmp_path / name)
    shutil.copytree(
        ROOT / "ca_daemon", tmp_path / "ca_daemon", ignore=shutil.ignore_patterns("__pycache__")
    )
    assert source_hash(tmp_path) == source_hash(ROOT)
    cache = tmp_path / "ca_daemon" / "__pycache__"
    cache.mkdir(exist_ok=True)
    (cache / "x.cpython-311.pyc").write_bytes(b"compiled")
    assert source_hash(tmp_path) == source_hash(ROOT)
    with (tmp_path / "ca_daemon" / "__init__.py").open("a") as source:
        source.write("\n")
    assert source_hash(tmp_path) != source_hash(ROOT)


def test_pause_and_busybox_are_one_layer_each_with_their_binary(tmp_path: Path) -> None:
    pause, busybox = node_images()
    assert (pause.name, busybox.name) == (PAUSE_IMAGE, BUSYBOX_IMAGE)
    assert _never_pulled(PAUSE_IMAGE) and _never_pulled(BUSYBOX_IMAGE)

    archive = _open(pause)
    assert archive.tags == [PAUSE_IMAGE] and len(archive.layers) == 1
    assert archive.config["config"]["Entrypoint"] == ["/pause"]
    assert archive.layers[0]["pause"].mode & 0o111
    # The binary itself: exits 0 on SIGTERM, as the kubelet stops a sandbox.
    binary = tmp_path / "pause"
    binary.write_bytes(archive.read(0, "pause"))
    binary.chmod(0o755)
    assert subprocess.run([binary, "-v"], capture_output=True, timeout=10).returncode == 0
    proc = subprocess.Popen([binary], stderr=subprocess.DEVNULL)
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0

    archive = _open(busybox)
    assert archive.tags == [BUSYBOX_IMAGE] and len(archive.layers) == 1
    assert archive.config["config"]["Cmd"] == ["sh"]
    layer = archive.layers[0]
    assert layer["bin/busybox"].isfile() and layer["bin/busybox"].mode & 0o111
    for applet in ("sh", "sleep", "cat", "env"):
        assert layer[f"bin/{applet}"].linkname == "busybox", applet
    assert b"root:x:0:0:" in archive.read(0, "etc/passwd")
    assert "etc/group" in layer


def test_python_base_is_what_the_dockerfile_names() -> None:
    froms = set(re.findall(r"^FROM\s+(\S+)", (ROOT / "Dockerfile").read_text(), re.M))
    assert {f"docker.io/library/{name}" for name in froms} == {PYTHON_BASE_IMAGE}
    archive = _open(python_base_image())
    assert archive.tags == [PYTHON_BASE_IMAGE]
    assert "usr/local/bin/python" in archive.layers[-1]
    assert not any(
        name.endswith("EXTERNALLY-MANAGED") for layer in archive.layers for name in layer
    )
