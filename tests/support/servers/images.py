"""Container images for the test node, built on this machine: no registry is reachable.

``scripts/node-images`` (run by ``scripts/testenv``) writes the node's own images as
docker-archive tarballs under the testenv cache: pause (containerd's sandbox image),
busybox (for test Pods) and the Python base image the Dockerfile names, which it also keeps
in buildah's storage there. ``ca_daemon_image`` builds the product image from the shipped
Dockerfile on top of that base, once per source hash. The node imports the tarballs with
``ctr images import``; every name has a registry host and a tag other than ``latest``, so
the kubelet (``imagePullPolicy: IfNotPresent``) never pulls.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support.servers.tools import log_tail, missing, require_tool, testenv_dir

# The same names and layout as scripts/node-images.
IMAGES_DIR = "images-v1"
PAUSE_IMAGE = "example.local/pause:3.10"
BUSYBOX_IMAGE = "example.local/busybox:1.35"
PYTHON_BASE_IMAGE = "docker.io/library/python:3.11.11-slim-bookworm"  # the Dockerfile's FROM
CA_DAEMON_REPOSITORY = "example.local/ca-daemon"

# What goes into the image (.dockerignore lets in only these and ca_daemon/).
IMAGE_SOURCES = ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md")
IGNORED_PARTS = frozenset({"__pycache__"})
KEEP_CA_DAEMON_ARCHIVES = 2  # the current one and the one before (another checkout's)
BUILD_TIMEOUT = 1200.0  # a cold build downloads every dependency from PyPI

# buildah (1.28) as root always writes its blob-info cache here, whatever --root says.
VAR_LIB_CONTAINERS = Path("/var/lib/containers")


@dataclass(frozen=True)
class Image:
    """An image for the node: the name Pods use, and the docker-archive that holds it."""

    name: str
    archive: Path


def images_dir() -> Path:
    return testenv_dir() / IMAGES_DIR


def _built(file: str, name: str) -> Image:
    archive = images_dir() / file
    # The stamp is written after the tarball lands: both present means finished.
    if not (archive.is_file() and archive.with_suffix(".stamp").is_file()):
        missing(f"the node image {name} is not built ({archive}; scripts/node-images)")
    return Image(name, archive)


def node_images() -> list[Image]:
    """The images every node loads: the sandbox (pause) and busybox for test Pods."""
    return [_built("pause.tar", PAUSE_IMAGE), _built("busybox.tar", BUSYBOX_IMAGE)]


def python_base_image() -> Image:
    """The base image the Dockerfile names, as scripts/node-images built it."""
    return _built("python-base.tar", PYTHON_BASE_IMAGE)


def source_hash(repo: Path) -> str:
    """12 hex digits of a sha256 over every file the image is built from, names and contents.

    Sorted by path; ``__pycache__`` (and stray ``.pyc``) ignored, as .dockerignore does.
    """
    paths = [repo / name for name in IMAGE_SOURCES if (repo / name).is_file()]
    paths += [
        path
        for path in (repo / "ca_daemon").rglob("*")
        if path.is_file()
        and not IGNORED_PARTS & set(path.relative_to(repo).parts)
        and path.suffix != ".pyc"
    ]
    digest = hashlib.sha256()
    for path in sorted(paths, key=lambda p: p.relative_to(repo).as_posix()):
        data = path.read_bytes()
        digest.update(f"{path.relative_to(repo).as_posix()}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()[:12]


class ImageBuildError(RuntimeError):
    """buildah failed; the message ends with the tail of its output."""


class _Buildah:
    """buildah on the storage scripts/node-images made: vfs, under the cache."""

    def __init__(self, path: str, directory: Path) -> None:
        store = directory / "buildah"
        self.argv = [
            path,
            "--root",
            str(store / "root"),
            "--runroot",
            str(store / "runroot"),
            "--storage-driver",
            "vfs",
            "--registries-conf",
            str(store / "registries.conf"),
            "--registries-conf-dir",
            str(store / "registries.conf.d"),
            "--short-name-alias-conf",
            str(store / "short-name-aliases.conf"),
        ]
        self.log = directory / "ca-daemon-build.log"

    def ok(self, *args: str) -> bool:
        """Run quietly; True when it exits 0."""
        done = subprocess.run(
            [*self.argv, *args], capture_output=True, check=False, timeout=BUILD_TIMEOUT
        )
        return done.returncode == 0

    def run(self, *args: str, what: str) -> None:
        """Run with its output appended to the build log; raise with the log's tail."""
        with self.log.open("a") as log:
            log.write(f"\n$ buildah {' '.join(args)}\n")
            log.flush()
            try:
                done = subprocess.run(
                    [*self.argv, *args],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    check=False,
                    timeout=BUILD_TIMEOUT,
                )
                returncode = done.returncode
            except subprocess.TimeoutExpired:
                returncode = -1
        if returncode != 0:
            raise ImageBuildError(
                f"{what} failed (buildah exit {returncode}); the end of {self.log}:\n"
                f"{log_tail(self.log, 40)}"
            )


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """The lock scripts/node-images holds too: one builder per cache at a time."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def _no_blob_info_cache_left() -> Iterator[None]:
    """Remove the /var/lib/containers blob-info cache buildah makes, unless it was there."""
    existed = VAR_LIB_CONTAINERS.exists()
    try:
        yield
    finally:
        if not existed and VAR_LIB_CONTAINERS.is_dir():
            cache = VAR_LIB_CONTAINERS / "cache"
            (cache / "blob-info-cache-v1.boltdb").unlink(missing_ok=True)
            for directory in (cache, VAR_LIB_CONTAINERS):
                try:
                    directory.rmdir()
                except OSError:  # someone else's content: leave it
                    break


def _prune(directory: Path, keep: Path) -> None:
    """Keep the most recently used ca-daemon archives only (``keep`` among them)."""
    archives = sorted(
        directory.glob("ca-daemon-*.tar"), key=lambda p: p.stat().st_mtime, reverse=True
    )
    for old in [a for a in archives if a != keep][KEEP_CA_DAEMON_ARCHIVES - 1 :]:
        old.unlink(missing_ok=True)


def ca_daemon_image(repo: Path) -> Image:
    """The product image, built from ``repo``'s Dockerfile unchanged (``buildah bud``).

    Tagged ``example.local/ca-daemon:<source hash>`` and cached as a docker-archive under
    the testenv cache: an unchanged source costs nothing. Skips (or fails under
    CA_DAEMON_REQUIRE_ALL=1) when buildah or the base image is missing; raises
    ImageBuildError with buildah's output when the build fails.
    """
    tag = source_hash(repo)
    name = f"{CA_DAEMON_REPOSITORY}:{tag}"
    directory = images_dir()
    archive = directory / f"ca-daemon-{tag}.tar"
    if archive.is_file():
        os.utime(archive)  # most recently used: the last one pruning would remove
        return Image(name, archive)
    buildah = _Buildah(require_tool("buildah"), directory)
    base = python_base_image()
    if os.geteuid() != 0:
        missing("building the ca-daemon image needs root (buildah's vfs storage)")
    with _locked(directory / ".lock"), _no_blob_info_cache_left():
        if archive.is_file():  # another process built it while we waited
            return Image(name, archive)
        # What a killed build left: its working containers and unfinished archives.
        buildah.ok("rm", "--all")
        for stale in directory.glob(".ca-daemon-*.tar.tmp.*"):
            stale.unlink(missing_ok=True)
        buildah.log.write_text(f"ca-daemon image {name} from {repo}\n")
        if not buildah.ok("inspect", "--type", "image", PYTHON_BASE_IMAGE):
            buildah.run("pull", f"docker-archive:{base.archive}", what="loading the base image")
        buildah.run(
            "bud",
            "--pull=never",
            "--network=host",
            "--format=docker",
            "--file",
            str(repo / "Dockerfile"),
            "--tag",
            name,
            str(repo),
            what=f"building {name} from {repo / 'Dockerfile'}",
        )
        tmp = directory / f".ca-daemon-{tag}.tar.tmp.{os.getpid()}"
        try:
            buildah.run("push", name, f"docker-archive:{tmp}:{name}", what=f"exporting {name}")
            tmp.rename(archive)
        finally:
            tmp.unlink(missing_ok=True)
            # The archive is what the node loads; vfs keeps a full copy per layer, so the
            # storage keeps only the base image.
            buildah.ok("rmi", name)
            buildah.ok("rmi", "--prune")
        _prune(directory, keep=archive)
    return Image(name, archive)
