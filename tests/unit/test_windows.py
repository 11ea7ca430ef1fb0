"""The window contexts that cross to the NIC (ctctl.nic.windows): seeded
from the tracker's TcpInfo, taken back into it, and the merge request that
carries what software changed (applied by the NIC: tests/bpf/test_window.py)."""

from ctctl import abi
from ctctl.kernel.conntrack.tcp import F_DATA_UNACKNOWLEDGED, F_MAXACK_SET, F_SACK_PERM, TcpInfo, TcpState
from ctctl.nic.windows import merge_request, take_back, window_context


def info() -> TcpInfo:
    t = TcpInfo()
    t.state = TcpState.ESTABLISHED
    for d, base in ((0, 1000), (1, 5000)):
        s = t.seen[d]
        s.td_end, s.td_maxend, s.td_maxwin, s.td_maxack = base, base + 64000, 64000, base
        s.td_scale, s.flags = 7, F_SACK_PERM | F_MAXACK_SET
    t.last_dir, t.last_seq, t.retrans = 1, 5000, 3
    return t


def test_seed_and_take_back_are_inverse():
    t = info()
    w = window_context(t, abi.WindowCheck.LIBERAL)
    assert (w.state, w.check, w.seen[1].td_maxend, w.seen[0].td_scale) == (3, 1, 69000, 7)
    back = TcpInfo()
    take_back(w, back)
    assert back.windows() == t.windows()
    t.retrans = 1000                       # the context keeps a byte: saturated
    assert window_context(t).retrans == 255


def test_the_merge_request_says_what_software_changed():
    t = info()
    taken = t.windows()
    assert merge_request(7, taken, t) is None          # nothing changed: no command
    t.seen[1].td_maxack = 5500
    t.seen[1].flags &= ~F_SACK_PERM
    t.seen[0].flags |= F_DATA_UNACKNOWLEDGED
    m = merge_request(7, taken, t)
    assert m.conn_id == 7
    assert m.changed == abi.WMerge.MAXACK << abi.WM_DIR_SHIFT      # only the reply direction's td_maxack
    assert m.seen[1].td_maxack == 5500 and m.seen[0].td_end == 1000
    assert (m.set_flags[0], m.clear_flags[0]) == (F_DATA_UNACKNOWLEDGED, 0)
    assert (m.set_flags[1], m.clear_flags[1]) == (0, F_SACK_PERM)
    t.seen[0].td_end, t.last_seq, t.retrans = 2000, 1000, 300
    m = merge_request(7, taken, t)
    assert m.changed & abi.WMerge.END and m.changed & abi.WMerge.LAST and m.retrans == 255
