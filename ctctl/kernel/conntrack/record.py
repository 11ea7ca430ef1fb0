"""A conntrack entry as plain data (JSON-able) and back: what a controller
writes down about a connection it offloaded, so that the next one can
take it over (ctctl.box.adopt).

The record holds what the hardware does not: the tuples (with NAT), the
status bits, mark, label, the TCP state and windows, and the times.
Counters are not in it: the caller stores its own (software's part, the
hardware's being in the entries).  Times are the tracker's clock, which
for a box is CLOCK_MONOTONIC: the same in the next controller.
"""

from __future__ import annotations

import ipaddress

from . import tcp as tcpmod
from .conn import Conn
from .tuples import Tuple

_SEEN = ("td_end", "td_maxend", "td_maxwin", "td_maxack", "td_scale", "flags")
_TCP = ("last_dir", "last_index", "last_seq", "last_ack", "last_end", "last_win", "last_wscale",
        "last_flags", "retrans")


class RecordError(ValueError):
    """A record that does not describe a connection (the message says why)."""


def _tuple(t: Tuple) -> list:
    return [t.zone, t.l3, t.proto, str(t.src), str(t.dst), t.sport, t.dport, t.code]


def _untuple(v) -> Tuple:
    zone, l3, proto, src, dst, sport, dport, code = v
    return Tuple(int(zone), int(l3), int(proto), ipaddress.ip_address(src), ipaddress.ip_address(dst),
                 int(sport), int(dport), int(code))


def conn_record(conn: Conn) -> dict:
    out = {"id": conn.id, "orig": _tuple(conn.orig), "reply": _tuple(conn.reply), "bits": conn.bits,
           "mark": conn.mark, "label": conn.label, "created": conn.created, "last_seen": conn.last_seen,
           "udp_stream_ts": conn.udp_stream_ts}
    if conn.tcp is not None:
        t = conn.tcp
        out["tcp"] = {"state": int(t.state), **{k: getattr(t, k) for k in _TCP},
                      "seen": [[getattr(s, k) for k in _SEEN] for s in t.seen]}
    return out


def conn_from_record(rec: dict) -> Conn:
    """The Conn a record describes, with zero counters; RecordError when
    it is not one."""
    try:
        conn = Conn(int(rec["id"]), _untuple(rec["orig"]), _untuple(rec["reply"]), float(rec["created"]))
        conn.bits = int(rec["bits"])
        conn.mark = int(rec["mark"])
        conn.label = int(rec["label"])
        conn.last_seen = float(rec["last_seen"])
        conn.udp_stream_ts = float(rec["udp_stream_ts"])
        tcp = rec.get("tcp")
        if (tcp is None) != (conn.tcp is None):
            raise RecordError("TCP state on a connection that is not TCP, or none on one that is")
        if tcp is not None:
            conn.tcp.state = tcpmod.TcpState(int(tcp["state"]))
            for k in _TCP:
                setattr(conn.tcp, k, int(tcp[k]))
            for s, values in zip(conn.tcp.seen, tcp["seen"], strict=True):
                for k, v in zip(_SEEN, values, strict=True):
                    setattr(s, k, int(v))
    except RecordError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise RecordError(f"not a connection record: {type(e).__name__}: {e}") from None
    return conn
