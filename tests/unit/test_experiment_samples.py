"""An experiment's per-second samples and run summary, from successive
`stats` of a box (plain data in, figures out: ctctl.lab.experiment), and
the report's table (ctctl.lab.report)."""

from __future__ import annotations

import os

from ctctl.lab import experiment, report, scenario


def stats(rx, punted, hw, offloaded, fin, received, cpu_s=0.0, entries_read=0):
    return {"program": {"rx_packets": rx, "punted": punted, "perf_lost": 0, "too_big": 0},
            "software": {"received": received, "ring_lost": 0, "malformed_samples": 0},
            "conntrack": {"entries": hw + 1},
            "offload": {"hardware": hw, "soft": 0, "pending": 0, "offloaded": offloaded, "removed_fin": fin,
                        "aging": {"cost": {"cpu_s": cpu_s, "entries_read": entries_read},
                                  "staleness": {"p99_s": 0.5}},
                        "latency": {"p50_us": 300.0, "p99_us": 900.0}}}


def test_a_sample_is_what_moved_in_the_second_before_it():
    s = experiment.Sampler(os.getpid())
    assert s.sample(stats(100, 40, 2, 3, 1, 40)) is None          # the first only sets the origin
    rec = s.sample(stats(1100, 140, 5, 9, 3, 140, cpu_s=0.01, entries_read=50))
    dt = 1000 / rec["rx_pps"]                                      # the interval it measured
    assert abs(rec["punts_ps"] * dt - 100) < 0.01 and abs(rec["hw_pps"] * dt - 900) < 0.01   # rounded to 0.1/s
    assert rec["hit_ratio"] == 0.9 and rec["hardware"] == 5 and rec["conntrack"] == 6
    assert abs(rec["offloads_ps"] * dt - 6) < 0.1 and set(rec["removals_ps"]) == {"fin"}
    assert rec["aging_cpu_s"] == 0.01 and rec["aging_entries_read"] == 50 and rec["staleness_p99_s"] == 0.5
    assert rec["latency_p50_us"] == 300.0 and 0 <= rec["ctl_cpu"] and rec["ctl_rss_mb"] > 0


def test_a_run_summary_counts_from_the_first_stats_and_averages_the_samples():
    first, final = stats(100, 40, 2, 3, 1, 40), stats(1100, 140, 5, 9, 3, 140)
    samples = [{"t": 1.0, "hardware": 2, "soft": 0, "pending": 1, "ctl_cpu": 0.2, "ctl_rss_mb": 90.0},
               {"t": 2.0, "hardware": 4, "soft": 0, "pending": 3, "ctl_cpu": 0.4, "ctl_rss_mb": 95.0}]
    hosts0 = {"a": {"tx": 10}, "b": {"tx": 20}}
    hosts1 = {"a": {"tx": 510}, "b": {"tx": 520}}
    s = experiment.summarize(samples, first, final, hosts0, hosts1)
    assert s["packets"] == {"hosts_sent": 1000, "box_rx": 1000, "hardware": 900, "punted": 100, "perf_lost": 0,
                            "too_big": 0, "software_received": 100, "ring_lost": 0, "malformed": 0}
    assert s["hit_ratio"] == 0.9 and s["hardware_mean"] == 3 and s["hardware_max"] == 4
    assert s["pending_max"] == 3 and s["ctl_cpu_mean"] == 0.3 and s["ctl_rss_max_mb"] == 95.0
    assert s["offloaded"] == 9 and s["removed"] == {"fin": 3} and s["seconds"] == 2.0


def test_the_summary_table_has_a_row_per_run_and_a_column_per_swept_key():
    sc = scenario.parse("duration: 2\nbox: {rules: firewall}\nworkload: {short: {rate: 1}}\n"
                        "sweep: {box.hardware.table_size: [64, 128]}\n", "s.yaml")
    s = experiment.summarize([], stats(0, 0, 0, 0, 0, 0), stats(10, 5, 1, 1, 0, 5), {"a": {"tx": 0}},
                             {"a": {"tx": 10}})
    results = [experiment.RunResult(r, None, [], dict(s)) for r in sc.runs]
    lines = report.table(sc, results).splitlines()
    assert lines[0].startswith("| run | box.hardware.table_size | hit ratio | in hw (mean) |")
    assert lines[2].startswith("| 1 | 64 | 50.0% | – |") and lines[3].startswith("| 2 | 128 | 50.0% |")
