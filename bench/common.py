"""What the benchmarks share: where results go, the machine a result was
measured on, and a comma-separated choice for argparse.  (Frames are
checksummed with ctctl.kernel.csum, the controller's own.)"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def machine() -> dict:
    """Host, kernel, CPUs, Python, load and the commit: what a figure
    needs next to it to be compared with another."""
    cpu = ""
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True)
    return {"host": platform.node(), "kernel": platform.release(), "cpus": os.cpu_count(), "cpu": cpu,
            "python": sys.version.split()[0], "loadavg": [round(x, 2) for x in os.getloadavg()],
            "git": git.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")}


def csv(choices):
    """An argparse type: a comma-separated subset of `choices`, not empty."""
    def parse(text):
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{', '.join(bad) or 'nothing'} not in {', '.join(choices)}")
        return items
    return parse
