"""(4b) The process: `ca-daemon --help` time and start-up to /readyz 200, versus the
bare interpreter's start-up (`python -c pass`) in the same run; idle CPU and RSS of
`ca-daemon run` over BENCH_IDLE seconds (default 60) on the embedded default with N
clients already issued, versus the targets (0.5% of one core, 110 MiB), a bare
interpreter's RSS and one that imported what the daemon imports; at 500 and 5,000
clients (BENCH_10000=1 adds 10,000).

    .venv/bin/python -m bench.daemon          # BENCH_SIZES=500
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from bench.lib import ROOT, repeats, save, workdir
from bench.steady import steady_sizes
from tests.support.servers.tools import free_port

CA_DAEMON = str(ROOT / ".venv/bin/ca-daemon")
TICK = os.sysconf("SC_CLK_TCK")


def seconds(*argv: str) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    return time.perf_counter() - start


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


# What `ca-daemon run` imports before it reads anything: the floor of its RSS.
IMPORTS = "import ca_daemon.daemon, ca_daemon.cli, ca_daemon.api.server, ca_daemon.service.wiring\n"


def rss_of(code: str) -> float:
    """RSS of an interpreter that ran ``code`` and sleeps."""
    sleeper = subprocess.Popen(
        [sys.executable, "-c", f"{code}import sys, time; print(flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE,
    )
    assert sleeper.stdout is not None
    sleeper.stdout.readline()
    rss = rss_mib(sleeper.pid)
    sleeper.kill()
    sleeper.wait()
    return rss


def main() -> None:
    idle = float(os.environ.get("BENCH_IDLE", "60"))
    rows = []
    for r in range(repeats()):
        bare = seconds(sys.executable, "-c", "pass")
        helptime = seconds(CA_DAEMON, "--help")
        rows.append(
            {
                "bench": "help",
                "repeat": r,
                "help_s": round(helptime, 3),
                "python_s": round(bare, 3),
                "ratio": round(bare / helptime, 3),
            }
        )
        print(rows[-1], flush=True)
    for n in steady_sizes():
        with workdir("daemon") as wd:
            port = free_port()
            config = wd / "config.yaml"
            config.write_text(
                yaml.safe_dump(
                    {
                        "anchor": {"local": {"dir": str(wd / "data")}},
                        "publish": {"kubernetes": {"enabled": False}},
                        "server": {"address": f"127.0.0.1:{port}"},
                        "kong": {
                            "clients": [
                                {"name": f"c{i:04d}", "common_name": f"kong.c{i:04d}.upstream"}
                                for i in range(n)
                            ]
                        },
                    }
                )
            )
            subprocess.run(
                [CA_DAEMON, "run", "--once", "--config", str(config)],
                check=True,
                capture_output=True,
                cwd=wd,
            )
            bare = seconds(sys.executable, "-c", "pass")
            start = time.perf_counter()
            proc = subprocess.Popen(
                [CA_DAEMON, "run", "--config", str(config)],
                cwd=wd,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                while True:
                    try:
                        if (
                            httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code
                            == 200
                        ):
                            break
                    except httpx.HTTPError:
                        pass
                    assert proc.poll() is None, "ca-daemon run exited"
                    time.sleep(0.02)
                ready = time.perf_counter() - start
                time.sleep(5)  # the first pass (nothing due) settles
                cpu0, t0 = cpu_s(proc.pid), time.perf_counter()
                time.sleep(idle)
                cpu = (cpu_s(proc.pid) - cpu0) / (time.perf_counter() - t0)
                rss = rss_mib(proc.pid)
            finally:
                proc.terminate()
                proc.wait(30)
            bare_rss, imports_rss = (rss_of(code) for code in ("", IMPORTS))
            rows.append(
                {
                    "bench": "daemon",
                    "clients": n,
                    "readyz_s": round(ready, 3),
                    "python_s": round(bare, 3),
                    "readyz_ratio": round(bare / ready, 3),
                    "idle_cpu_pct": round(100 * cpu, 3),
                    "idle_s": idle,
                    "rss_mib": round(rss, 1),
                    "python_rss_mib": round(bare_rss, 1),
                    "imports_rss_mib": round(imports_rss, 1),
                    "rss_over_imports_mib": round(rss - imports_rss, 1),
                    "rss_ratio_to_target": round(rss / 110, 3),
                }
            )
            print(rows[-1], flush=True)
    save("daemon", ".venv/bin/python -m bench.daemon", rows)


if __name__ == "__main__":
    main()
