"""`ctctl timeout` as text: the offload timeouts by protocol, then the
tracker's, one protocol a line in nfct timeout's words (what `ctctl
timeout set` takes back)."""

from __future__ import annotations


def format_timeouts(reply: dict) -> str:
    out = []
    if reply.get("offload") is not None:
        out.append("offload " + " ".join(f"{p} {s:g}" for p, s in reply["offload"].items())
                   + "    # in hardware and on the soft list")
    for proto, names in reply["conntrack"].items():
        out.append(f"{proto} " + " ".join(f"{n} {s:g}" for n, s in names.items()))
    return "\n".join(out)


def format_reached(reply: dict) -> list[str]:
    """What a `timeout set` reached: connections retimed on each list."""
    out = []
    off = reply.get("offload_reached")
    if off is not None:
        out.append(f"offload timeouts set: {off['hardware']} connections in hardware, "
                   f"{off['soft']} on the soft list now live by them")
    n = reply.get("conntrack_reached")
    if n is not None:
        out.append(f"conntrack timeouts set: {n} connections retimed")
    return out
