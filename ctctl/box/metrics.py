"""A box's counters for Prometheus: `ctctl stats --prometheus` prints them
in the text exposition format, and `metrics: {listen: ADDR:PORT}` in the
config serves them on /metrics while the box runs.  Both are built from
the same stats dict as `ctctl stats --json` (ctctl.box.requests.stats) by
the prometheus_client library: one metric family per kind of counter,
labelled by reason, cause, port or direction where stats has a breakdown.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "ctctl"
_LISTEN = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:\[\]]+)):(?P<port>\d{1,5})$")


@dataclass
class MetricsConfig:
    """`metrics: {listen: 127.0.0.1:9464}`: where /metrics is served (None:
    nowhere, the default)."""

    host: str | None = None
    port: int | None = None

    @classmethod
    def from_config(cls, d: dict) -> "MetricsConfig":
        unknown = set(d) - {"listen"}
        if unknown:
            raise ValueError(f"metrics: unknown key {sorted(unknown)[0]!r} (expected listen)")
        listen = d.get("listen")
        if listen is None:
            return cls()
        m = _LISTEN.match(str(listen)) if isinstance(listen, str) else None
        if m is None:
            raise ValueError(f"metrics listen {listen!r}: expected ADDR:PORT, e.g. 127.0.0.1:9464 or [::1]:9464")
        port = int(m["port"])
        if port > 65535:
            raise ValueError(f"metrics listen {listen!r}: port {port} is not in 0-65535 (0: any free port, "
                             "which `ctctl stats` names)")
        return cls(m["v6"] or m["host"], port)

    @property
    def enabled(self) -> bool:
        return self.port is not None


def families(s: dict) -> list:
    """The stats dict as metric families.  Counters are totals since the
    box started; gauges are what is there now."""
    out = []

    def counter(name, doc, value, labels=None, samples=None):
        m = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=list(labels or ()))
        for lv, v in (samples if samples is not None else [((), value)]):
            m.add_metric(list(lv), v)
        out.append(m)

    def gauge(name, doc, value, labels=None, samples=None):
        m = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=list(labels or ()))
        for lv, v in (samples if samples is not None else [((), value)]):
            m.add_metric(list(lv), v)
        out.append(m)

    if "uptime_s" in s:
        gauge("uptime_seconds", "Seconds since the controller started.", s["uptime_s"])
    p = s["program"]
    counter("program_rx_packets", "Packets the program saw on the box's ports.", p["rx_packets"])
    counter("program_rx_bytes", "Bytes the program saw on the box's ports.", p["rx_bytes"])
    counter("program_punts", "Packets the program handed to software, by reason.", None, ["reason"],
            sorted(((r,), n) for r, n in p["punts_by_reason"].items()))
    counter("program_perf_lost", "Punts the program could not submit (perf ring full).", p["perf_lost"])
    counter("program_too_big", "Packets too big to punt.", p["too_big"])
    fc = p.get("flow_cache")
    if fc is not None:
        counter("program_flow_cache", "Packets that looked in the flow cache, by outcome (hit, miss, "
                "stale: a verdict older than the rules or caps).", None, ["outcome"],
                [(("hit",), fc["hits"]), (("miss",), fc["misses"]), (("stale",), fc["stale"])])
    sw = s.get("software")
    if sw is not None:
        counter("software_received", "Punts the controller read.", sw["received"])
        counter("software_ring_lost", "Punts the perf ring dropped before the controller read them.",
                sw["ring_lost"])
        counter("software_drops", "Packets software dropped, by cause.", None, ["cause"],
                sorted(((c,), n) for c, n in sw["drops"].items()))
    ct = s.get("conntrack")
    if ct is not None:
        gauge("conntrack_entries", "Connections in the tracker.", ct["entries"])
    o = s.get("offload")
    if o is not None:
        gauge("offload_connections", "Connections on the flowtable's lists, by list.", None, ["list"],
              [(("hardware",), o["hardware"]), (("soft",), o.get("soft", 0)), (("pending",), o["pending"])])
        counter("offload_offloaded", "Connections that went into hardware.", o.get("offloaded", 0))
        counter("offload_removed", "Connections taken out of hardware, by why.", None, ["why"],
                sorted(((k[len("removed_"):],), v) for k, v in o.items()
                       if k.startswith("removed_") and isinstance(v, int)))
        counter("offload_table_full", "Offloads refused for a full table.", o.get("table_full", 0))
        lat = o.get("latency") or {}
        if lat.get("offloaded"):
            gauge("offload_latency_seconds", "Eligible packet punted -> both entries in hardware, over "
                  "the last 100,000 connections offloaded on their eligible packet.", None, ["quantile"],
                  [(("0.5",), lat["p50_us"] / 1e6), (("0.99",), lat["p99_us"] / 1e6)])
    ctl = s.get("control")
    if ctl:
        counter("control", "The control socket: requests served, and bad clients answered or dropped, by what.",
                None, ["what"], sorted(((k,), v) for k, v in ctl.items()))
    ports = s.get("ports") or {}
    for key, doc in (("rx_packets", "Punts software received, by port."),
                     ("rx_bytes", "Bytes of the punts software received, by port."),
                     ("tx_packets", "Packets software sent, by port."),
                     ("tx_bytes", "Bytes software sent, by port.")):
        counter(f"port_{key}", doc, None, ["port"], sorted(((port,), c[key]) for port, c in ports.items()))
    return out


class _Collector:
    """prometheus_client's collector protocol around a stats source."""

    def __init__(self, get_stats: Callable[[], dict]):
        self.get_stats = get_stats

    def collect(self):
        return families(self.get_stats())


def registry(get_stats: Callable[[], dict]) -> CollectorRegistry:
    r = CollectorRegistry(auto_describe=False)
    r.register(_Collector(get_stats))
    return r


def exposition(s: dict) -> str:
    """The text exposition format of one stats dict."""
    return generate_latest(registry(lambda: s)).decode()


class Endpoint:
    """/metrics over HTTP (prometheus_client's own server) in a thread of
    the controller, read from `get_stats` at every scrape."""

    def __init__(self, cfg: MetricsConfig, get_stats: Callable[[], dict]):
        from prometheus_client import start_http_server

        self.server, self.thread = start_http_server(cfg.port, addr=cfg.host, registry=registry(get_stats))

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
