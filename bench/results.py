"""Each benchmark owns one section of bench/RESULTS.md and rewrites only that section."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
HEADER = "# Benchmark results\n\nEach section is rewritten by the benchmark named in its heading; see `make help`.\n"


def machine_line() -> str:
    """One line naming the machine a figure came from (cores, CPU model, Python)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}"


def update_section(name: str, body: str, path: Path = RESULTS) -> None:
    """Replace (or append) the section delimited by BEGIN/END markers for `name`."""
    text = path.read_text() if path.exists() else HEADER
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def checkouts(baseline: str | None) -> dict[str, str]:
    """{"this": this checkout's root, "baseline": DIR's (when given)}: the code each child process runs."""
    this = str(Path(__file__).resolve().parents[1])
    return {"this": this, **({"baseline": str(Path(baseline).resolve())} if baseline else {})}


def run_alternately(script: str, child: list[str], variants: dict[str, str], repeats: int) -> dict[str, list[dict]]:
    """Run `script --child ...` in a fresh process per variant (its checkout first on PYTHONPATH, one torch
    thread), alternating `repeats` times so every variant sees the same load; each run's last stdout line
    is its JSON result."""
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, path in variants.items():
            env = os.environ | {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
            out = subprocess.run([sys.executable, script, "--child", *child], env=env, capture_output=True,
                                 text=True, check=True).stdout
            runs[name].append(json.loads(out.splitlines()[-1]))
            print(name, {k: round(v, 3) for k, v in runs[name][-1].items()}, flush=True)
    return runs
