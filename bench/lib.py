"""What every bench script shares: the real servers (OpenBao dev, kube-apiserver +
etcd, started as the test fixtures start them, outside pytest), the apiserver's own
request counters, the machine description and the results files.

Every figure is a ratio to a ceiling measured in the same run: these machines are
shared and noisy, a ratio much less so.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.servers.kube import (  # noqa: E402
    Kube,
    own_kube,
)
from tests.support.servers.openbao import OpenBao, own_openbao  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def tool(name: str) -> str:
    for d in (Path.home() / ".cache/ca-daemon-testenv/bin", ROOT / ".venv/bin"):
        if (d / name).exists():
            return str(d / name)
    found = shutil.which(name)
    if not found:
        raise SystemExit(f"{name} not found: run `make testenv`")
    return found


def sizes(default: Sequence[int]) -> list[int]:
    """Client counts: BENCH_SIZES=10,100 overrides; BENCH_5000=1 adds 5,000."""
    if os.environ.get("BENCH_SIZES"):
        out = [int(n) for n in os.environ["BENCH_SIZES"].split(",")]
    else:
        out = list(default)
    if os.environ.get("BENCH_5000") and 5000 not in out:
        out.append(5000)
    return out


BENCH_KNOBS = ("BENCH_SIZES", "BENCH_REPEAT", "BENCH_5000", "BENCH_10000")


def repeats() -> int:
    return int(os.environ.get("BENCH_REPEAT", "2"))


# --- servers ----------------------------------------------------------------------------


@contextmanager
def openbao(workdir: Path) -> Iterator[OpenBao]:
    tool("bao")  # a clear error outside pytest when it is missing
    with own_openbao(workdir) as server:
        yield server


@contextmanager
def kube(workdir: Path) -> Iterator[Kube]:
    """tests/support/servers/kube.py's server, without pytest."""
    with own_kube(workdir, tool("etcd"), tool("kube-apiserver")) as server:
        yield server


@contextmanager
def workdir(name: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as d:
        yield Path(d)


@contextmanager
def servers(
    name: str, want_kube: bool = True, want_bao: bool = True
) -> Iterator[tuple[Path, Kube | None, OpenBao | None]]:
    with ExitStack() as stack:
        wd = stack.enter_context(workdir(name))
        (wd / "kube").mkdir()
        (wd / "bao").mkdir()
        k = stack.enter_context(kube(wd / "kube")) if want_kube else None
        b = stack.enter_context(openbao(wd / "bao")) if want_bao else None
        yield wd, k, b


# --- apiserver counters -----------------------------------------------------------------


def parallel(work: Callable[[int], Any], n: int, concurrency: int = 8) -> float:
    """Run work(0..n-1) on `concurrency` threads; seconds taken."""
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for future in [pool.submit(work, i) for i in range(n)]:
            future.result()
    return time.perf_counter() - start


def headless_services(k: Kube, names: Sequence[tuple[str, str]]) -> None:
    """Services for Kong clients (headless: the apiserver's service IP range is small)."""
    with k.http() as http:

        def make(i: int) -> None:
            ns, name = names[i]
            body = {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": name, "namespace": ns},
                "spec": {"clusterIP": "None", "ports": [{"port": 443}]},
            }
            http.post(f"/api/v1/namespaces/{ns}/services", json=body).raise_for_status()

        parallel(make, len(names))


# --- results ----------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem_kb = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal")
    )
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "ram_gib": round(mem_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
    }


def save(name: str, command: str, rows: list[dict[str, Any]]) -> None:
    RESULTS.mkdir(exist_ok=True)
    # The sizes and repeats are part of the command that produced the figures.
    knobs = " ".join(f"{k}={os.environ[k]}" for k in BENCH_KNOBS if os.environ.get(k))
    doc = {
        "command": f"{knobs} {command}".strip(),
        "machine": machine(),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "rows": rows,
    }
    (RESULTS / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    for row in rows:
        print(json.dumps(row), flush=True)
