"""The aging report as text (`ctctl aging`, and a table in `ctctl
stats`): the mode and its settings, how late the connections it removed
left after their timeout, and what finding them cost."""

from __future__ import annotations

COST = (("ticks", "ticks"), ("looked", "looked at"), ("entries_read", "entries read"),
        ("syscalls", "syscalls"), ("cpu_s", "CPU s"), ("events", "expiry events"), ("expired", "expired"))


def settings(r: dict) -> str:
    """What the mode does, in the seed's words where it has them."""
    if r["mode"] == "full":
        return f"full: every entry read every {r['interval']:g} s"
    if r["mode"] == "sample":
        k = r["k"]
        period = ", ".join(f"{p} {s:g} s" for p, s in r["period"].items())
        return f"sample: 1/2^{k} = 1/{1 << k} of the connections every K s (K: {period})"
    if r["mode"] == "timeout":
        return (f"timeout: every {r['interval']:g} s, back to software at the offload timeout since "
                "software saw it (no flow counters)")
    return f"hardware: the NIC ages its entries every {r['hw_interval']:g} s and reports each removal"


def aging_lines(r: dict, indent: str = "") -> list[str]:
    """How late the removals were, then the cost as a table: totals and
    per minute."""
    st = r["staleness"]
    if st["removed"]:
        out = [f"{indent}removed {st['removed']}, after their timeout by: p50 {st['p50_s']:.3f} s, "
               f"p99 {st['p99_s']:.3f} s, max {st['max_s']:.3f} s"]
    else:
        out = [f"{indent}removed none yet"]
    widths = [max(len(label), 7) for _, label in COST]
    out.append(f"{indent}{'':<10}" + "".join(f"  {label:>{w}}" for (_, label), w in zip(COST, widths)))
    for row, data in (("total", r["cost"]), ("per minute", r["per_minute"])):
        cells = [f"{data[key]:.3f}" if key == "cpu_s" else f"{data[key]:.1f}" if row != "total"
                 else str(data[key]) for key, _ in COST]
        out.append(f"{indent}{row:<10}" + "".join(f"  {c:>{w}}" for c, w in zip(cells, widths)))
    return out


def format_aging(reply: dict) -> str:
    r = reply["aging"]
    n = reply["hardware"]
    out = [f"aging of {n} connection{'' if n == 1 else 's'} in hardware: {settings(r)}"] + aging_lines(r, "  ")
    for earlier in reply.get("earlier", []):
        out.append(f"before: {settings(earlier)}")
        out += aging_lines(earlier, "  ")
    return "\n".join(out)
