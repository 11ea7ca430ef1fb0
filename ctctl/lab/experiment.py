"""Run an experiment's scenario (ctctl.lab.scenario): for each run of its
sweep, fresh namespaces, a box (a real `ctctl load`), the workload
(ctctl.lab.workload, real sockets in the hosts), a sample of the box's
state once a second, then everything removed again; the report
(ctctl.lab.report) is written as it goes.

A sample (one JSON line per second in the run's samples.jsonl) holds what
moved since the previous one, per second: packets into the box (`rx_pps`),
finished by the program (`hw_pps`) and punted (`punts_ps`), their ratio
(`hit_ratio`), offloads and removals by reason; and what is now: entries
in hardware, the soft and pending lists, conntrack's entries, losses so
far, the aging's cost and staleness, the offload latency, the
controller's CPU (share of one core) and resident memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ctctl.lab import topology
from ctctl.lab.boxproc import BoxProcess
from ctctl.lab.scenario import Run, Scenario
from ctctl.lab.topology import ns_exec, ns_popen
from ctctl.lab.waiting import Timeout, wait_until

PORT = 7200
SAMPLE_S = 1.0
TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class RunResult:
    run: Run
    dir: Path
    samples: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)


def link_counts(ns: str, dev: str) -> dict:
    r = ns_exec(ns, "ip", "-s", "-j", "link", "show", dev, capture_output=True, text=True, check=True)
    s = json.loads(r.stdout)[0]["stats64"]
    return {"tx": s["tx"]["packets"], "rx": s["rx"]["packets"], "tx_dropped": s["tx"]["dropped"],
            "rx_dropped": s["rx"]["dropped"]}


def proc_usage(pid: int) -> tuple[float, float]:
    """(CPU seconds so far, resident MB) of a process."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    cpu = (int(fields[11]) + int(fields[12])) / TICK           # utime + stime
    rss_pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return cpu, rss_pages * os.sysconf("SC_PAGE_SIZE") / 1e6


class Sampler:
    """Per-second records from successive `stats` of a box."""

    def __init__(self, pid: int):
        self.pid = pid
        self.prev = None
        self.t0 = time.monotonic()

    def sample(self, stats: dict) -> dict | None:
        now = time.monotonic()
        cpu, rss = proc_usage(self.pid)
        cur = (now, stats, cpu)
        prev, self.prev = self.prev, cur
        if prev is None:
            return None
        dt = now - prev[0]
        p0, p1 = prev[1]["program"], stats["program"]
        o0, o1 = prev[1].get("offload") or {}, stats.get("offload") or {}
        rx = p1["rx_packets"] - p0["rx_packets"]
        punted = p1["punted"] - p0["punted"]
        aging = o1.get("aging") or {}
        cost0, cost1 = (o0.get("aging") or {}).get("cost", {}), aging.get("cost", {})
        rec = {
            "t": round(now - self.t0, 2),
            "rx_pps": round(rx / dt, 1), "hw_pps": round((rx - punted) / dt, 1), "punts_ps": round(punted / dt, 1),
            "hit_ratio": round((rx - punted) / rx, 4) if rx else None,
            "hardware": o1.get("hardware", 0), "soft": o1.get("soft", 0), "pending": o1.get("pending", 0),
            "conntrack": stats["conntrack"]["entries"],
            "offloads_ps": round((o1.get("offloaded", 0) - o0.get("offloaded", 0)) / dt, 1),
            "removals_ps": {k[len("removed_"):]: round((v - o0.get(k, 0)) / dt, 1) for k, v in o1.items()
                            if k.startswith("removed_") and v - o0.get(k, 0)},
            "perf_lost": p1["perf_lost"], "ring_lost": stats["software"]["ring_lost"],
            "aging_cpu_s": round(cost1.get("cpu_s", 0.0) - cost0.get("cpu_s", 0.0), 4),
            "aging_entries_read": cost1.get("entries_read", 0) - cost0.get("entries_read", 0),
            "staleness_p99_s": (aging.get("staleness") or {}).get("p99_s"),
            "latency_p50_us": (o1.get("latency") or {}).get("p50_us"),
            "latency_p99_us": (o1.get("latency") or {}).get("p99_us"),
            "ctl_cpu": round((cpu - prev[2]) / dt, 3), "ctl_rss_mb": round(rss, 1),
        }
        return rec


def run_one(sc: Scenario, run: Run, out: Path, progress=None) -> RunResult:
    """One run on fresh namespaces; everything it made is removed, also
    when it fails."""
    res = RunResult(run, out)
    out.mkdir(parents=True, exist_ok=True)
    tag = topology.unique_tag("ctctl-x")
    topo = topology.build(tag, sc.ports, sc.hosts)
    procs: list[subprocess.Popen] = []
    try:
        client_host, server_host = topo.ports[0].host, topo.ports[1].host
        cfg = {"name": tag, "netns": topo.box, "ports": list(sc.ports), **run.box}
        (out / "box.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        with BoxProcess(cfg) as box:
            server = ns_popen(server_host.netns, sys.executable, "-m", "ctctl.lab.workload", "server",
                              "--port", str(PORT), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            procs.append(server)
            wait_until(lambda: server.stdout.readline().strip() == "listening" or server.poll() is not None,
                       30, "the workload's server to listen")
            # The packets of the run are those after these reads (a host's
            # own packet, neighbour discovery say, may come at any time).
            hosts0, first = _settled(box, (client_host, server_host))
            pid = box.proc.pid
            sampler = Sampler(pid)
            sampler.sample(first)
            client = ns_popen(client_host.netns, sys.executable, "-m", "ctctl.lab.workload", "client",
                              "--addr", server_host.addr4, "--port", str(PORT), "--duration", str(run.duration),
                              "--mix", json.dumps(run.workload), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
            procs.append(client)
            t0 = time.monotonic()
            end = t0 + run.duration + run.settle
            next_at = t0 + SAMPLE_S
            with open(out / "samples.jsonl", "w") as f:
                while time.monotonic() < end or client.poll() is None:
                    time.sleep(max(0.0, next_at - time.monotonic()))     # the sampling period, not a wait on a condition
                    next_at += SAMPLE_S
                    rec = sampler.sample(box.stats())
                    if rec is not None:
                        res.samples.append(rec)
                        f.write(json.dumps(rec) + "\n")
                        f.flush()
                        if progress:
                            progress(rec["t"], run.duration + run.settle, rec)
                    if time.monotonic() > end + 60:
                        client.kill()            # a generator stuck a minute past its end
            cout, cerr = client.communicate(timeout=30)
            lines = [x for x in cout.splitlines() if x.startswith("{")]
            res.summary["workload"] = json.loads(lines[-1]) if lines else {"error": cerr.strip()[-500:]}
            hosts1, final = _settled(box, (client_host, server_host))
            res.summary.update(summarize(res.samples, first, final, hosts0, hosts1))
        res.summary["values"] = run.values
        (out / "summary.json").write_text(json.dumps(res.summary, indent=1))
        return res
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        topo.destroy()


def _settled(box, hosts) -> tuple[dict, dict]:
    """The hosts' link counters and the box's stats, read at one moment as
    far as packets go: the hosts quiet over two reads 0.2 s apart (nothing
    of theirs still in flight to the box), then the box read, then the
    hosts again, unchanged (nothing sent while the box was read, which it
    might or might not have counted yet).  Retried until so; after 20 s,
    the last reads."""
    last = None

    def read():
        nonlocal last
        a = {h.netns: link_counts(h.netns, h.ifname) for h in hosts}
        time.sleep(0.2)     # two reads apart in time: what "quiet" means
        b = {h.netns: link_counts(h.netns, h.ifname) for h in hosts}
        if a != b:
            return None
        stats = box.stats()
        c = {h.netns: link_counts(h.netns, h.ifname) for h in hosts}
        last = (c, stats)
        return last if c == b else None
    try:
        return wait_until(read, 20, "the hosts' links to go quiet around a read of the box", interval=0.1)
    except Timeout:
        return last or ({h.netns: link_counts(h.netns, h.ifname) for h in hosts}, box.stats())


def summarize(samples: list[dict], first: dict, final: dict, hosts0: dict, hosts1: dict) -> dict:
    """A run's figures: packets and where they went (from `first`, the
    box's stats when the hosts' counters were read, to `final`), occupancy,
    rates, aging, controller, latency."""
    off = final.get("offload") or {}
    aging = off.get("aging") or {}
    sent = sum(hosts1[n]["tx"] - hosts0[n]["tx"] for n in hosts0)
    p0, p1 = first["program"], final["program"]
    s0, s1 = first["software"], final["software"]
    prog = {k: p1[k] - p0[k] for k in ("rx_packets", "punted", "perf_lost", "too_big")}
    sw = {k: s1[k] - s0[k] for k in ("received", "ring_lost")}
    sw["malformed_samples"] = s1.get("malformed_samples", 0) - s0.get("malformed_samples", 0)
    rx = prog["rx_packets"]
    # What the program finished itself: every packet but those it posted to
    # software and those it could not (the ring full: perf_lost; too big).
    hw = rx - prog["punted"] - prog["perf_lost"] - prog["too_big"]

    def mean(key):
        xs = [s[key] for s in samples if s.get(key) is not None]
        return round(sum(xs) / len(xs), 3) if xs else None

    def peak(key):
        xs = [s[key] for s in samples if s.get(key) is not None]
        return max(xs) if xs else None

    removed = {k[len("removed_"):]: v for k, v in off.items() if k.startswith("removed_")}
    return {
        "packets": {"hosts_sent": sent, "box_rx": rx, "hardware": hw, "punted": prog["punted"],
                    "perf_lost": prog["perf_lost"], "too_big": prog["too_big"],
                    "software_received": sw["received"], "ring_lost": sw["ring_lost"],
                    "malformed": sw["malformed_samples"]},
        "hit_ratio": round(hw / rx, 4) if rx else None,
        "hardware_mean": mean("hardware"), "hardware_max": peak("hardware"),
        "hardware_end": samples[-1]["hardware"] if samples else None,
        "soft_mean": mean("soft"), "pending_max": peak("pending"),
        "offloaded": off.get("offloaded", 0), "removed": removed,
        "table_full": off.get("table_full", 0),
        "staleness": aging.get("staleness"), "aging_cpu_s": (aging.get("cost") or {}).get("cpu_s"),
        "aging_entries_read": (aging.get("cost") or {}).get("entries_read"),
        "ctl_cpu_mean": mean("ctl_cpu"), "ctl_rss_max_mb": peak("ctl_rss_mb"),
        "latency": off.get("latency"),
        "seconds": samples[-1]["t"] if samples else 0,
    }


def run(sc: Scenario, out: Path, progress=None) -> list[RunResult]:
    """Every run of the scenario, one after another; the report after each."""
    from ctctl.lab import report

    out.mkdir(parents=True, exist_ok=True)
    results = []
    for r in sc.runs:
        if progress:
            progress.start(r)
        res = run_one(sc, r, out / f"run-{r.index + 1:02d}", progress.tick if progress else None)
        results.append(res)
        report.write(sc, results, out)
        if progress:
            progress.done(res)
    return results
