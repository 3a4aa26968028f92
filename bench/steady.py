"""(25) Cheap when nothing happens: what a daemon running all year costs while nothing
is due, on the embedded default (local anchor, directory), at 500 and 5,000 clients
(BENCH_10000=1 adds 10,000). Each figure beside a baseline from the same run:

- configuration: ``load_settings`` of N clients vs a bare ``yaml.safe_load`` of the
  same file (in-process, best of 3); and ``config check`` vs ``ca-daemon --help``;
- ``run --once``: the steady pass (nothing due) vs the first one (issuing all), each
  net of start-up (``--help`` plus the configuration load);
- in the daemon: a steady pass's CPU with the engine kept between passes (as ``run``
  keeps it) vs the first one after start-up (which reads every file and record), and
  the files it opened;
- ``ca-daemon plan`` over a year: seconds, and vs one steady ``run --once``.

    .venv/bin/python -m bench.steady          # BENCH_SIZES=500 BENCH_REPEAT=1
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from bench.lib import ROOT, repeats, save, workdir

CA_DAEMON = str(ROOT / ".venv/bin/ca-daemon")


def steady_sizes() -> list[int]:
    if os.environ.get("BENCH_SIZES"):
        return [int(n) for n in os.environ["BENCH_SIZES"].split(",")]
    return [500, 5000, *([10000] if os.environ.get("BENCH_10000") else [])]


def seconds(*argv: str, cwd: Path | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, cwd=cwd)
    return time.perf_counter() - start


def best(*argv: str, cwd: Path | None = None, times: int = 2) -> float:
    return min(seconds(*argv, cwd=cwd) for _ in range(times))


def write_config(wd: Path, n: int) -> Path:
    config = wd / "config.yaml"
    clients = [{"name": f"c{i:05d}", "common_name": f"kong.c{i:05d}.upstream"} for i in range(n)]
    config.write_text(
        yaml.safe_dump(
            {
                "anchor": {"local": {"dir": str(wd / "data")}},
                "publish": {"kubernetes": {"enabled": False}},
                "kong": {"clients": clients},
            }
        )
    )
    return config


def fresh_interpreter(code: str, config: Path) -> list[float]:
    """Run ``code`` with the configuration's path as argv[1]; the numbers it prints."""
    out = subprocess.run(
        [sys.executable, "-c", code, str(config)], check=True, capture_output=True, text=True
    ).stdout.split()
    return [float(word) for word in out]


def loading(config: Path) -> tuple[float, float]:
    """(load_settings, bare yaml.safe_load) seconds, best of 3, in a fresh interpreter."""
    code = (
        "import sys, time, yaml\n"
        "from pathlib import Path\n"
        "from ca_daemon.config.loading import load_settings\n"
        "p = Path(sys.argv[1]); text = p.read_text()\n"
        "def t(f):\n"
        "    best = 1e9\n"
        "    for _ in range(3):\n"
        "        s = time.perf_counter(); f(); best = min(best, time.perf_counter() - s)\n"
        "    return best\n"
        "print(t(lambda: load_settings(p)), t(lambda: yaml.safe_load(text)))\n"
    )
    load_s, bare_s = fresh_interpreter(code, config)
    return load_s, bare_s


def in_daemon(config: Path) -> dict[str, float]:
    """A steady pass's CPU with the engine kept (as `run` keeps it) and what it opened."""
    code = (
        "import os, sys, time\n"
        "from pathlib import Path\n"
        "from ca_daemon.config.loading import load_settings\n"
        "from ca_daemon.service.wiring import build_engine\n"
        "s = load_settings(Path(sys.argv[1])); e = build_engine(s)\n"
        "c = time.process_time(); assert e.reconcile().ok; cold = time.process_time() - c\n"
        "e.reconcile()\n"  # the first load after start-up reads everything once
        "opened = []; real = os.open\n"
        "def counting(p, *a, **k):\n"
        "    opened.append(str(p)); return real(p, *a, **k)\n"
        "os.open = counting\n"
        "c = time.process_time(); r = e.reconcile(); steady = time.process_time() - c\n"
        "os.open = real\n"
        "assert r.ok and not r.steps, r.errors\n"
        "print(cold, steady, len(opened))\n"
    )
    cold, steady, opened = fresh_interpreter(code, config)
    return {"cold": cold, "steady": steady, "opened": opened}


def main() -> None:
    rows = []
    for n in steady_sizes():
        for r in range(repeats()):
            with workdir("steady") as wd:
                config = write_config(wd, n)
                load_s, bare_yaml_s = loading(config)
                help_s = best(CA_DAEMON, "--help")
                check_s = best(CA_DAEMON, "config", "check", "--config", str(config))
                first_s = seconds(CA_DAEMON, "run", "--once", "--config", str(config), cwd=wd)
                steady_s = best(CA_DAEMON, "run", "--once", "--config", str(config), cwd=wd)
                startup = help_s + load_s
                rows.append(
                    {
                        "bench": "steady",
                        "clients": n,
                        "repeat": r,
                        "load_s": round(load_s, 3),
                        "bare_yaml_s": round(bare_yaml_s, 3),
                        "load_ratio": round(load_s / bare_yaml_s, 3),
                        "config_check_s": round(check_s, 3),
                        "help_s": round(help_s, 3),
                        "first_once_s": round(first_s, 2),
                        "steady_once_s": round(steady_s, 2),
                        "steady_net_ratio": round((steady_s - startup) / (first_s - startup), 3),
                    }
                )
                print(rows[-1], flush=True)
                warm = in_daemon(config)
                rows.append(
                    {
                        "bench": "steady-in-daemon",
                        "clients": n,
                        "repeat": r,
                        "cold_pass_cpu_s": round(warm["cold"], 2),
                        "steady_pass_cpu_s": round(warm["steady"], 3),
                        "ratio": round(warm["steady"] / warm["cold"], 4),
                        "files_opened": int(warm["opened"]),
                    }
                )
                print(rows[-1], flush=True)
                if r == 0:  # a year of forecast is long at 5,000: once a size
                    plan_s = seconds(CA_DAEMON, "plan", "--config", str(config), cwd=wd)
                    rows.append(
                        {
                            "bench": "forecast",
                            "clients": n,
                            "plan_year_s": round(plan_s, 1),
                            "vs_steady_once": round(plan_s / steady_s, 1),
                        }
                    )
                    print(rows[-1], flush=True)
    save("steady", ".venv/bin/python -m bench.steady", rows)


if __name__ == "__main__":
    main()
