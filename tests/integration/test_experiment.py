"""An experiment end to end (experiments/tiny.yaml: two runs of a few
seconds, real boxes, real sockets): the report's files are all there, the
samples are one per second, and the packets add up: what the hosts sent
is what entered the box, which the program finished, punted or counted as
lost, and every punt it posted reached software or was counted lost."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pyroute2 import netns

TINY = Path(__file__).resolve().parents[2] / "experiments" / "tiny.yaml"


def test_a_tiny_experiment_writes_its_report_and_the_packets_add_up(tmp_path):
    before = set(netns.listnetns())
    out = tmp_path / "report"
    r = subprocess.run([sys.executable, "-m", "ctctl", "experiment", "run", str(TINY), "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"report in {out}/report.md" in r.stdout
    assert "run 1/2" in r.stderr and "run 2/2" in r.stderr and r.stderr.count("done: hit ratio") == 2, r.stderr
    # Nothing of the runs is left: their namespaces (ctctl-x-*) are gone.
    assert {n for n in set(netns.listnetns()) - before if n.startswith("ctctl-x-")} == set()

    summary = json.loads((out / "summary.json").read_text())
    assert [s["run"] for s in summary] == [1, 2]
    assert [s["values"] for s in summary] == [{"box.offload": {"udp": "assured"}},
                                              {"box.offload": {"udp": "replied"}}]
    table = (out / "summary.md").read_text().splitlines()
    assert len(table) == 4 and table[0].startswith("| run | box.offload | hit ratio |")
    page = (out / "report.md").read_text()
    for f in ("sweep.png", "run-01/timeseries.png", "run-02/timeseries.png"):
        assert (out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f
        assert f"]({f})" in page
    for i, s in enumerate(summary, start=1):
        run = out / f"run-{i:02d}"
        samples = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
        # One a second over the 3 s of workload and 1 s of settling (the last waits for the client).
        assert 3 <= len(samples) <= 8, len(samples)
        assert all(0.5 < b["t"] - a["t"] < 1.6 for a, b in zip(samples, samples[1:])), [x["t"] for x in samples]
        assert all(x["hit_ratio"] is None or 0 <= x["hit_ratio"] <= 1 for x in samples)
        assert max(x["hardware"] for x in samples) > 0 and s["offloaded"] > 0
        p = s["packets"]
        why = (i, p)
        assert p["hosts_sent"] == p["box_rx"], why                    # no drop between the hosts and the box
        # Every punt the program posted reached the controller (or is a counted loss).
        assert p["punted"] == p["software_received"] + p["ring_lost"] + p["malformed"], why
        assert p["box_rx"] == p["hardware"] + p["punted"] + p["perf_lost"] + p["too_big"], why
        assert p["hardware"] > p["punted"] > 0, why
        w = s["workload"]
        assert w["short"]["done"] == w["short"]["started"] > 0 and w["udp"]["echoed"] == w["udp"]["sent"] > 0, w
        assert w["long"]["bytes"] > 0 and not any(part.get("failed") for part in w.values() if isinstance(part, dict))
        assert json.loads((run / "summary.json").read_text())["packets"] == p
