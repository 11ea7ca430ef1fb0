"""`ctctl stats` as text: the program's counters, software's, the
flowtable's (what went into hardware, what took it out and why), the
ports'."""

from __future__ import annotations

from .aging import aging_lines, settings


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
    if s.get("hook"):
        head += f", program at {'XDP (driver mode)' if s['hook'] == 'xdp' else 'TC ingress'}"
    out = [head,
           f"program:  rx {prog['rx_packets']} packets ({human_bytes(prog['rx_bytes'])}), "
           f"punted {prog['punted']}, perf_lost {prog['perf_lost']}, too_big {prog['too_big']}"]
    fc = prog.get("flow_cache") or {}
    if any(fc.values()):
        looked = sum(fc.values())
        out.append(f"flow cache: {fc['hits']} hits, {fc['misses']} misses, {fc['stale']} stale "
                   f"(walked again after a rule or caps change); {fc['hits'] / looked:.1%} of lookups hit")
    if prog.get("csum_completed"):
        out.append(f"at XDP: {prog['csum_completed']} partial checksums completed (a local sender's, "
                   "which no receiver completes after a redirect)")
    judged = {k: prog.get(k, 0) for k in ("window_invalid", "window_ignored", "csum_invalid")}
    if any(judged.values()):
        out.append(f"judged in hardware: {judged['window_invalid']} outside the TCP window, "
                   f"{judged['window_ignored']} let through unrecorded (conntrack's ignore), "
                   f"{judged['csum_invalid']} with a wrong checksum")
    rw = prog.get("rewrites") or {}
    if any(rw.values()):
        out.append(f"rewritten in hardware: {rw['pedit']} pedit actions ({rw['pedit_short']} cut short "
                   f"by a key outside the packet), {rw['csum']} csum actions")
    tun = prog.get("tunnels") or {}
    if any(tun.values()):
        out.append(f"tunnels in hardware: {tun['decapsulated']} VXLAN frames decapsulated, "
                   f"{tun['encapsulated']} packets encapsulated")
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
    out += _offload(s.get("offload"))
    bad = {k: v for k, v in (s.get("control") or {}).items() if k != "requests" and v}
    if bad:
        out.append("control:  " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in sorted(bad.items()))
                   + f" (of {s['control']['requests']} requests)")
    if s.get("ports_gone"):
        out.append(f"gone:     port {', '.join(s['ports_gone'])} was deleted under the box")
    a = s.get("adopted")
    if a:
        dropped = a["entries_without_record"] + a["records_without_entries"] + a["bad_records"]
        out.append(f"adopted:  the running program of pid {a['pid']}, {a['adopted']} connections in hardware"
                   + (f" ({dropped} half-written ones dropped: stats --json)" if dropped else ""))
    if s.get("metrics"):
        out.append(f"metrics:  {s['metrics']}")
    out.append(f"{'port':<10}{'rx_packets':>12}{'rx_bytes':>14}{'tx_packets':>12}{'tx_bytes':>14}")
    for p, c in s["ports"].items():
        out.append(f"{p:<10}{c['rx_packets']:>12}{c['rx_bytes']:>14}{c['tx_packets']:>12}{c['tx_bytes']:>14}")
    return "\n".join(out)


REMOVED = ("fin", "rst", "expired", "by_hand", "deleted", "flushed")
SOFT_REMOVED = ("fin", "rst", "expired", "destroyed")


def _offload(o: dict | None) -> list[str]:
    """The flowtable's line, and what took connections out of hardware.  A
    FIN takes a flow out at once; what the connection still sends then
    crosses software, which the count after `fin` shows (a server that
    half-closes early, as `nc -N` does, sends most of a transfer that way)."""
    if o is None:
        return []
    out = [f"offload:  {o['hardware']} connections in hardware, {o.get('soft', 0)} on the soft list "
           f"({o['pending']} pending); offloaded {o.get('offloaded', 0)}, table full {o.get('table_full', 0)} "
           f"(from pending {o.get('from_pending', 0)})"]
    lat = o.get("latency") or {}
    if lat.get("offloaded"):
        out.append(f"latency:  eligible packet punted -> both entries in hardware, {lat['offloaded']} connections: "
                   f"p50 {lat['p50_us']:,.0f} µs, p99 {lat['p99_us']:,.0f} µs, max {lat['max_us']:,.0f} µs")
    fp = o.get("fastpath") or {}
    if fp.get("learned"):
        out.append(f"fast path: {fp.get('hits', 0)} packets forwarded, {fp.get('shortcuts', 0)} shortcuts "
                   f"(learned {fp['learned']}, stale {fp.get('stale', 0)})")
    removed = []
    for why in REMOVED:
        n = o.get(f"removed_{why}", 0)
        if not n:
            continue
        text = f"{why.replace('_', ' ')} {n}"
        if why == "fin":
            text += f" ({o.get('punted_after_fin', 0)} packets through software after it)"
        removed.append(text)
    if removed:
        out.append("removed:  " + ", ".join(removed))
    if o.get("to_soft"):
        left = [f"{why} {o[f'soft_removed_{why}']}" for why in SOFT_REMOVED if o.get(f"soft_removed_{why}")]
        out.append(f"soft:     {o['to_soft']} joined the soft list"
                   + (f"; left it: {', '.join(left)}" if left else "")
                   + (f"; {o['from_pending']} went on to hardware" if o.get("from_pending") else ""))
    w = o.get("pending_wait") or {}
    if w.get("went_in") or o.get("insert_rate"):
        rate = f" (insert rate {o['insert_rate']:g} entries/s: {o.get('rate_limited', 0)} offloads waited)" \
            if o.get("insert_rate") else ""
        waited = (f"waited p50 {w['p50_s']:.3f} s, p99 {w['p99_s']:.3f} s, max {w['max_s']:.3f} s"
                  if w.get("went_in") else "none went in yet")
        out.append(f"pending:  {o['pending']} waiting, {w.get('went_in', 0)} went in from it; {waited}{rate}")
    if o.get("aging"):
        out.append("aging:    " + settings(o["aging"]))
        out += aging_lines(o["aging"], " " * 10)
    return out
