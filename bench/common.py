"""What the benchmarks share: where results go, the machine a result was
measured on, a process's CPU time, medians, a comma-separated choice for argparse,
and the signals that end a run through its clean-ups.  (Frames are
checksummed with ctctl.kernel.csum, the controller's own.)"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import platform
import signal
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


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (fields 14 and 15 of
    /proc/PID/stat; the command name, field 2, may hold spaces, hence the
    split after it)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def median(xs):
    """The median of the values that are there (None left out); None when
    there are none."""
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    m = len(xs) // 2
    return xs[m] if len(xs) % 2 else (xs[m - 1] + xs[m]) / 2


def csv(choices):
    """An argparse type: a comma-separated subset of `choices`, not empty."""
    def parse(text):
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{', '.join(bad) or 'nothing'} not in {', '.join(choices)}")
        return items
    return parse


def unwind_on_signals() -> None:
    """SIGTERM and SIGHUP unwind through the finally blocks as Ctrl-C does.
    Only in this process: pyroute2 forks helpers (netns.create) that
    inherit the handler and are ended with SIGTERM; unwinding there would
    run our clean-up in the child and delete the namespaces just made."""
    me = os.getpid()

    def stop(signum, _frame):
        if os.getpid() != me:
            os._exit(128 + signum)
        raise SystemExit(128 + signum)
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, stop)


def start_run(script: str, argv) -> tuple[dt.datetime, list[float], str]:
    """When the run started, the load then (said out loud: other work skews
    the numbers) and the command that reproduces it."""
    started = dt.datetime.now(dt.timezone.utc).astimezone()
    load0 = [round(x, 2) for x in os.getloadavg()]
    command = f".venv/bin/python bench/{script}" + "".join(
        f" {shlex.quote(a)}" for a in (sys.argv[1:] if argv is None else argv))
    print(f"load average {load0[0]:.2f} on {os.cpu_count()} CPUs (other work on the machine skews the numbers)")
    return started, load0, command


def write_results(doc: dict, output: Path | None, kind: str, started: dt.datetime, command: str) -> Path:
    """The run's JSON under bench/results/ (or `output`), and where it went."""
    out = output or RESULTS / f"{kind}-{started.strftime('%Y-%m-%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nresults: {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    print(f"reproduce: sudo {command}")
    return out
