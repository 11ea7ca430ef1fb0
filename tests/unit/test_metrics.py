"""The Prometheus view of a box's stats (ctctl.box.metrics): every counter
of `stats --json` under its metric name, parsed back with
prometheus_client's own parser; the config's `metrics:` refused with the
reason and the position."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ctctl.box import config
from ctctl.box.metrics import exposition

STATS = {
    "box": "lab", "uptime_s": 12.5,
    "program": {"rx_packets": 420, "rx_bytes": 40120, "punted": 12, "perf_lost": 3, "too_big": 1,
                "flow_cache": {"hits": 300, "misses": 20, "stale": 2},
                "punts_by_reason": {"ct_miss": 9, "ct_flags": 3}},
    "software": {"received": 9, "ring_lost": 3, "drops": {"no_match": 2}, "csum_completed": 0},
    "conntrack": {"entries": 4},
    "offload": {"hardware": 2, "soft": 1, "pending": 0, "offloaded": 5, "table_full": 0,
                "removed_fin": 2, "removed_expired": 1, "punted_after_fin": 7,
                "latency": {"offloaded": 5, "p50_us": 250.0, "p99_us": 1500.0, "max_us": 1800.0}},
    "ports": {"eth5": {"rx_packets": 5, "rx_bytes": 500, "tx_packets": 4, "tx_bytes": 400},
              "eth6": {"rx_packets": 4, "rx_bytes": 400, "tx_packets": 5, "tx_bytes": 500}},
}


def samples(text: str) -> dict:
    """(sample name, sorted labels) -> value, through the reference parser."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_every_counter_of_stats_is_a_sample_with_its_labels():
    got = samples(exposition(STATS))
    want = {
        ("ctctl_uptime_seconds", ()): 12.5,
        ("ctctl_program_rx_packets_total", ()): 420,
        ("ctctl_program_rx_bytes_total", ()): 40120,
        ("ctctl_program_punts_total", (("reason", "ct_flags"),)): 3,
        ("ctctl_program_punts_total", (("reason", "ct_miss"),)): 9,
        ("ctctl_program_perf_lost_total", ()): 3,
        ("ctctl_program_too_big_total", ()): 1,
        ("ctctl_program_flow_cache_total", (("outcome", "hit"),)): 300,
        ("ctctl_program_flow_cache_total", (("outcome", "miss"),)): 20,
        ("ctctl_program_flow_cache_total", (("outcome", "stale"),)): 2,
        ("ctctl_software_received_total", ()): 9,
        ("ctctl_software_ring_lost_total", ()): 3,
        ("ctctl_software_drops_total", (("cause", "no_match"),)): 2,
        ("ctctl_conntrack_entries", ()): 4,
        ("ctctl_offload_connections", (("list", "hardware"),)): 2,
        ("ctctl_offload_connections", (("list", "soft"),)): 1,
        ("ctctl_offload_connections", (("list", "pending"),)): 0,
        ("ctctl_offload_offloaded_total", ()): 5,
        ("ctctl_offload_removed_total", (("why", "fin"),)): 2,
        ("ctctl_offload_removed_total", (("why", "expired"),)): 1,
        ("ctctl_offload_table_full_total", ()): 0,
        ("ctctl_offload_latency_seconds", (("quantile", "0.5"),)): 0.00025,
        ("ctctl_offload_latency_seconds", (("quantile", "0.99"),)): 0.0015,
    }
    for port in ("eth5", "eth6"):
        for key, v in STATS["ports"][port].items():
            want[(f"ctctl_port_{key}_total", (("port", port),))] = v
    created = {k for k in got if k[0].endswith("_created")}      # the library's own, per counter
    assert {k: v for k, v in got.items() if k not in created} == want


def test_pinned_counters_alone_still_make_metrics():
    """A box whose controller is gone: `stats` shows the program's pinned
    counters only, and so does the exposition."""
    names = {k[0] for k in samples(exposition({"box": "lab", "controller": None, "program": STATS["program"]}))}
    assert "ctctl_program_rx_packets_total" in names and not any(n.startswith("ctctl_software") for n in names)


@pytest.mark.parametrize("text, error", [
    ("metrics: {listen: '127.0.0.1:70000'}", "box.yaml:4:10: metrics listen '127.0.0.1:70000': port 70000"),
    ("metrics: {listen: 9464}", "box.yaml:4:10: metrics listen 9464: expected ADDR:PORT"),
    ("metrics: {listen: 'localhost'}", "box.yaml:4:10: metrics listen 'localhost': expected ADDR:PORT"),
    ("metrics: {port: 9464}", "box.yaml:4:10: metrics: unknown key 'port' (expected listen)"),
    ("metrics: [1]", "box.yaml:4:10: metrics must be a mapping"),
])
def test_a_bad_metrics_section_is_refused_with_its_position(text, error):
    with pytest.raises(config.ConfigError) as e:
        config.parse(f"name: m\nnetns: x\nports: [eth5]\n{text}\n", "box.yaml")
    assert str(e.value).startswith(error)


@pytest.mark.parametrize("listen, host, port", [("127.0.0.1:9464", "127.0.0.1", 9464), ("[::1]:0", "::1", 0),
                                                ("0.0.0.0:80", "0.0.0.0", 80)])
def test_metrics_listen(listen, host, port):
    cfg = config.parse(f"name: m\nnetns: x\nports: [eth5]\nmetrics: {{listen: '{listen}'}}\n", "box.yaml")
    assert (cfg.metrics.host, cfg.metrics.port, cfg.metrics.enabled) == (host, port, True)
    assert not config.parse("name: m\nnetns: x\nports: [eth5]\n", "box.yaml").metrics.enabled
