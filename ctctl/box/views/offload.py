"""`ctctl offload` as text: the hardware list (its entries, one line per
direction) and the soft list (one line per connection, with why it is not
in hardware)."""

from __future__ import annotations


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
        out.append(f"{f['proto']:<7} zone={f['zone']} src={f['src']} dst={f['dst']} "
                   f"{l4} {f['dir']:<8} conn={f['conn_id']} "
                   f"packets={f['packets']} bytes={f['bytes']}{nat}")
    soft = reply.get("soft", [])
    if soft:
        out.append("soft list (the software fast path):")
        for c in sorted(soft, key=lambda c: c["conn_id"]):
            out.append(f"  conn={c['conn_id']} {c['orig']} packets={c['packets'][0]}+{c['packets'][1]} "
                       f"({c['why']})")
    out.append(f"{len(flows)} hardware entries ({len(flows) // 2} connections), "
               f"{len(soft)} on the soft list, {len(reply['pending'])} of them pending")
    return "\n".join(out)
