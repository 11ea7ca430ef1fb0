"""Human-readable renderings of a box's statistics."""

from __future__ import annotations


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def format_stats(s: dict) -> str:
    prog = s["program"]
    head = f"box {s['box']}, up {s['uptime_s']:.1f} s" if "uptime_s" in s else \
        f"box {s['box']}, controller not running (pinned counters)"
    out = [head,
           f"program:  rx {prog['rx_packets']} packets ({human_bytes(prog['rx_bytes'])}), "
           f"punted {prog['punted']}, perf_lost {prog['perf_lost']}, too_big {prog['too_big']}"]
    if prog["punts_by_reason"]:
        out.append("punts by reason:")
        width = max(len(r) for r in prog["punts_by_reason"])
        out += [f"  {r:<{width}}  {n}" for r, n in sorted(prog["punts_by_reason"].items(), key=lambda x: -x[1])]
    sw = s.get("software")
    if sw is None:
        return "\n".join(out)
    out.append(f"software: received {sw['received']}, ring_lost {sw['ring_lost']}, "
               f"drops {sum(sw['drops'].values())}"
               + (" (" + ", ".join(f"{k} {v}" for k, v in sorted(sw['drops'].items())) + ")" if sw["drops"] else "")
               + (f", checksums completed {sw['csum_completed']}" if sw.get("csum_completed") else ""))
    out.append(f"{'port':<10}{'rx_packets':>12}{'rx_bytes':>14}{'tx_packets':>12}{'tx_bytes':>14}")
    for p, c in s["ports"].items():
        out.append(f"{p:<10}{c['rx_packets']:>12}{c['rx_bytes']:>14}{c['tx_packets']:>12}{c['tx_bytes']:>14}")
    return "\n".join(out)


def _proto(n: int) -> str:
    return {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6"}.get(n, str(n))


def format_offload(reply: dict) -> str:
    """The hardware table, one line per direction."""
    flows = reply["flows"]
    out = []
    for f in sorted(flows, key=lambda f: (f["conn_id"], f["dir"] != "original")):
        nat = "".join(f" {k}={f[k]}" for k in ("nat_src", "nat_dst") if k in f)
        if "type" in f:
            l4 = f"type={f['type']} code={f['code']} id={f['id']}"
        else:
            l4 = f"sport={f['sport']} dport={f['dport']}"
        out.append(f"{_proto(f['proto']):<7} zone={f['zone']} src={f['src']} dst={f['dst']} "
                   f"{l4} {f['dir']:<8} conn={f['conn_id']} "
                   f"packets={f['packets']} bytes={f['bytes']}{nat}")
    out.append(f"{len(flows)} hardware entries ({len(flows) // 2} connections), "
               f"{len(reply['pending'])} pending")
    return "\n".join(out)
