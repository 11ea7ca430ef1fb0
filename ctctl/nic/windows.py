"""TCP window contexts, the hardware's copy of what the tracker keeps per
TCP connection for tcp_in_window (struct ctctl_tcp_window, bpf/window.h):
seeded from the tracker's TcpInfo when a connection goes into hardware,
and the tracker's again when it needs them (a segment software must judge,
the connection leaving hardware).

Only the fields the program reads or writes cross: each direction's
td_end, td_maxend, td_maxwin, td_maxack, td_scale and flags, and the last_*
bookkeeping of an accepted ACK (retransmission counting).  The TCP state
goes along so that the program judges only ESTABLISHED connections.
"""

from __future__ import annotations

from ctctl import abi
from ctctl.kernel.conntrack.tcp import TcpInfo

_SEEN = ("td_end", "td_maxend", "td_maxwin", "td_maxack", "td_scale", "flags")
_LAST = ("last_seq", "last_ack", "last_end", "last_win")


def window_context(info: TcpInfo, check: abi.WindowCheck = abi.WindowCheck.ON) -> abi.TcpWindow:
    """The context for a connection whose tracking data is `info`."""
    w = abi.TcpWindow()
    w.state = int(info.state)
    w.check = int(check)
    w.last_dir = info.last_dir
    w.last_index = info.last_index
    for name in _LAST:
        setattr(w, name, getattr(info, name))
    w.retrans = min(info.retrans, 255)
    for d in (0, 1):
        for name in _SEEN:
            setattr(w.seen[d], name, getattr(info.seen[d], name))
    return w


def take_back(w: abi.TcpWindow, info: TcpInfo) -> None:
    """The context's windows and bookkeeping into the tracker's `info`.
    The state stays the tracker's: the program never changes it."""
    info.last_dir = w.last_dir
    info.last_index = w.last_index
    for name in _LAST:
        setattr(info, name, getattr(w, name))
    info.retrans = w.retrans
    for d in (0, 1):
        for name in _SEEN:
            setattr(info.seen[d], name, getattr(w.seen[d], name))


def merge_request(conn_id: int, taken: tuple, info: TcpInfo) -> abi.WindowMerge | None:
    """The NIC command that applies what software changed in the windows
    since it took them (`taken`: TcpInfo.windows() then) to the NIC's
    context as it is when the command runs (struct ctctl_window_merge:
    later edges, larger window, flag bits set and cleared); None when
    software changed nothing."""
    now = info.windows()
    if now == taken:
        return None
    m = abi.WindowMerge(conn_id=conn_id)
    if now[:7] != taken[:7]:
        m.changed |= abi.WMerge.LAST
        m.last_dir, m.last_index, m.last_seq, m.last_ack, m.last_end, m.last_win, retrans = now[:7]
        m.retrans = min(retrans, 255)
    bits = (abi.WMerge.END, abi.WMerge.MAXEND, abi.WMerge.MAXWIN, abi.WMerge.MAXACK, abi.WMerge.SCALE)
    for d in (0, 1):
        was, sw = taken[7 + d], now[7 + d]
        for i, (name, bit) in enumerate(zip(_SEEN[:5], bits)):
            setattr(m.seen[d], name, sw[i])
            if sw[i] != was[i]:
                m.changed |= int(bit) << (abi.WM_DIR_SHIFT * d)
        m.set_flags[d] = sw[5] & ~was[5] & 0xFF
        m.clear_flags[d] = was[5] & ~sw[5] & 0xFF
    return m
