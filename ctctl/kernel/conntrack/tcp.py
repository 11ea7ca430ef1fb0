"""TCP tracking as net/netfilter/nf_conntrack_proto_tcp.c does it: the
state table, window tracking (``tcp_in_window``), the ignore/invalid
outcomes and the timeout choice.

Sequence numbers are compared modulo 2**32 like the kernel's
``before``/``after``.  The functions here mutate a connection's
``TcpInfo`` and return an outcome for the tracker; they know nothing about
tables of connections.
"""

from __future__ import annotations

import enum

from ctctl.kernel.packet import TCP_ACK, TCP_CWR, TCP_ECE, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN, TCP_URG, Packet


class TcpState(enum.IntEnum):
    NONE = 0
    SYN_SENT = 1
    SYN_RECV = 2
    ESTABLISHED = 3
    FIN_WAIT = 4
    CLOSE_WAIT = 5
    LAST_ACK = 6
    TIME_WAIT = 7
    CLOSE = 8
    SYN_SENT2 = 9
    MAX = 10      # "invalid" in the table
    IGNORE = 11   # "ignore" in the table


STATE_NAMES = tuple(s.name for s in TcpState)

# Flag classes, in the kernel's precedence (get_conntrack_index).
SYN_SET, SYNACK_SET, FIN_SET, ACK_SET, RST_SET, NONE_SET = range(6)
INDEX_NAMES = ("syn", "synack", "fin", "ack", "rst", "none")

# ip_ct_tcp_state.flags
F_WINDOW_SCALE = 0x01
F_SACK_PERM = 0x02
F_CLOSE_INIT = 0x04
F_BE_LIBERAL = 0x08
F_DATA_UNACKNOWLEDGED = 0x10
F_MAXACK_SET = 0x20
F_EXP_CHALLENGE_ACK = 0x40
F_SIMULTANEOUS_OPEN = 0x80

MAX_WSCALE = 14
MAXACKWINCONST = 66000

_NO, _SS, _SR, _ES, _FW, _CW, _LA, _TW, _CL, _S2, _IV, _IG = range(12)

# TCP_TRANSITIONS[dir][index][old_state] -> new state; the table of
# nf_conntrack_proto_tcp.c (facts, re-typed).
TCP_TRANSITIONS = (
    (  # ORIGINAL
        # NO   SS   SR   ES   FW   CW   LA   TW   CL   S2
        (_SS, _SS, _IG, _IG, _IG, _IG, _IG, _SS, _SS, _S2),  # syn
        (_IV, _IV, _SR, _IV, _IV, _IV, _IV, _IV, _IV, _SR),  # synack
        (_IV, _IV, _FW, _FW, _LA, _LA, _LA, _TW, _CL, _IV),  # fin
        (_ES, _IV, _ES, _ES, _CW, _CW, _TW, _TW, _CL, _IV),  # ack
        (_IV, _CL, _CL, _CL, _CL, _CL, _CL, _CL, _CL, _CL),  # rst
        (_IV,) * 10,                                         # none
    ),
    (  # REPLY
        (_IV, _S2, _IV, _IV, _IV, _IV, _IV, _SS, _IV, _S2),  # syn
        (_IV, _SR, _IG, _IG, _IG, _IG, _IG, _IG, _IG, _SR),  # synack
        (_IV, _IV, _FW, _FW, _LA, _LA, _LA, _TW, _CL, _IV),  # fin
        (_IV, _IG, _SR, _ES, _CW, _CW, _TW, _TW, _CL, _IG),  # ack
        (_IV, _CL, _CL, _CL, _CL, _CL, _CL, _CL, _CL, _CL),  # rst
        (_IV,) * 10,                                         # none
    ),
)

# Valid combinations of FIN/SYN/RST/ACK/URG (PSH, ECE, CWR always allowed).
_VALID_FLAGS = frozenset({
    TCP_SYN, TCP_SYN | TCP_URG, TCP_SYN | TCP_ACK, TCP_RST, TCP_RST | TCP_ACK,
    TCP_FIN | TCP_ACK, TCP_FIN | TCP_ACK | TCP_URG, TCP_ACK, TCP_ACK | TCP_URG,
})

# Outcomes of tcp_packet.
ACCEPT = "accept"      # in window: state updated, timeout refreshed
IGNORE = "ignore"      # let through, no state change, no refresh
INVALID = "invalid"    # no conntrack for this packet
REPEAT = "repeat"      # entry killed (SYN re-opening it): look up again
KILL = "kill"          # accepted, then the entry is removed (RST without reply)

M32 = 0xFFFFFFFF


def before(a: int, b: int) -> bool:
    return ((a - b) & M32) >= 0x80000000


def after(a: int, b: int) -> bool:
    return ((b - a) & M32) >= 0x80000000


class TcpSeen:
    """ip_ct_tcp_state: what one direction has sent."""

    __slots__ = ("td_end", "td_maxend", "td_maxwin", "td_maxack", "td_scale", "flags")

    def __init__(self):
        self.td_end = self.td_maxend = self.td_maxwin = self.td_maxack = 0
        self.td_scale = 0
        self.flags = 0

    def reset(self) -> None:
        self.td_end = self.td_maxend = self.td_maxwin = self.td_maxack = 0
        self.td_scale = 0
        self.flags &= F_BE_LIBERAL

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__slots__}

    def __repr__(self) -> str:
        return ("TcpSeen(end=%d maxend=%d maxwin=%d maxack=%d scale=%d flags=0x%x)"
                % (self.td_end, self.td_maxend, self.td_maxwin, self.td_maxack,
                   self.td_scale, self.flags))


class TcpInfo:
    """ip_ct_tcp: the per-connection TCP tracking data."""

    __slots__ = ("state", "seen", "last_dir", "last_index", "last_seq", "last_ack",
                 "last_end", "last_win", "last_wscale", "last_flags", "retrans")

    def __init__(self):
        self.state = TcpState.NONE
        self.seen = (TcpSeen(), TcpSeen())
        self.last_dir = 0
        self.last_index = NONE_SET
        self.last_seq = self.last_ack = self.last_end = 0
        self.last_win = 0
        self.last_wscale = 0
        self.last_flags = 0
        self.retrans = 0

    def windows(self) -> tuple:
        """What window tracking keeps, both directions: to tell a change."""
        return (self.last_dir, self.last_index, self.last_seq, self.last_ack, self.last_end,
                self.last_win, self.retrans,
                *((s.td_end, s.td_maxend, s.td_maxwin, s.td_maxack, s.td_scale, s.flags) for s in self.seen))


def conntrack_index(flags: int) -> int:
    if flags & TCP_RST:
        return RST_SET
    if flags & TCP_SYN:
        return SYNACK_SET if flags & TCP_ACK else SYN_SET
    if flags & TCP_FIN:
        return FIN_SET
    if flags & TCP_ACK:
        return ACK_SET
    return NONE_SET


def tcp_error(pkt: Packet) -> str | None:
    """Why the kernel's tcp_error() would call this packet invalid before
    any lookup, or None."""
    if pkt.tcp_doff < 20 or pkt.l4_len < pkt.tcp_doff:
        return "truncated packet"
    if pkt.tcp_flags & ~(TCP_ECE | TCP_CWR | TCP_PSH) & 0xFF not in _VALID_FLAGS:
        return "invalid tcp flag combination"
    return None


def segment_end(pkt: Packet) -> int:
    f = pkt.tcp_flags
    return (pkt.seq + pkt.payload_len + (1 if f & TCP_SYN else 0) + (1 if f & TCP_FIN else 0)) & M32


def _options(pkt: Packet, seen: TcpSeen) -> None:
    """tcp_options(): window scale and SACK-permitted into ``seen`` (left
    untouched when the segment carries no options at all)."""
    if pkt.tcp_doff <= 20:
        return
    seen.td_scale = 0
    seen.flags &= F_BE_LIBERAL
    if pkt.sack_perm:
        seen.flags |= F_SACK_PERM
    wscale = pkt.wscale
    if wscale is not None:
        seen.td_scale = min(wscale, MAX_WSCALE)
        seen.flags |= F_WINDOW_SCALE


def _sack(pkt: Packet, sack: int) -> int:
    """tcp_sack(): the highest right edge of the first SACK option."""
    for _left, right in pkt.sack_blocks:
        if after(right, sack):
            sack = right
    return sack


def _init_sender(sender: TcpSeen, receiver: TcpSeen, pkt: Packet, end: int, win: int,
                 direction: int) -> None:
    sender.td_end = sender.td_maxend = end
    sender.td_maxwin = win or 1
    _options(pkt, sender)
    # RFC 1323: scaling is on only when both ends offered it.
    if direction == 1 and not (sender.flags & F_WINDOW_SCALE and receiver.flags & F_WINDOW_SCALE):
        sender.td_scale = 0
        receiver.td_scale = 0


def tcp_new(info: TcpInfo, pkt: Packet, loose: bool) -> bool:
    """tcp_new(): set up tracking for the first packet; False = invalid."""
    new_state = TCP_TRANSITIONS[0][conntrack_index(pkt.tcp_flags)][_NO]
    if new_state >= _IV:
        return False
    s0 = info.seen[0]
    if new_state == _SS:
        s0.td_end = segment_end(pkt)
        s0.td_maxwin = pkt.window or 1
        s0.td_maxend = s0.td_end
        _options(pkt, s0)
    elif not loose:
        return False
    else:
        # Picked up mid-stream: history is lost, trust the packet and be
        # liberal in both directions (window scale is unknown).
        s0.td_end = segment_end(pkt)
        s0.td_maxwin = pkt.window or 1
        s0.td_maxend = (s0.td_end + s0.td_maxwin) & M32
        info.seen[0].flags = info.seen[1].flags = F_SACK_PERM | F_BE_LIBERAL
    info.last_index = NONE_SET
    return True


def _liberal(sender: TcpSeen, cfg) -> bool:
    return bool(sender.flags & F_BE_LIBERAL) or cfg.tcp_be_liberal


def in_window(info: TcpInfo, direction: int, index: int, pkt: Packet, cfg, notes: list) -> str:
    """tcp_in_window(): ACCEPT, IGNORE or INVALID (a failure turns into
    ACCEPT when the sender is liberal)."""
    if cfg.tcp_no_window_check:
        return ACCEPT
    sender = info.seen[direction]
    receiver = info.seen[1 - direction]
    flags = pkt.tcp_flags
    seq = pkt.seq
    ack = sack = pkt.ack
    win_raw = pkt.window
    win = win_raw
    end = segment_end(pkt)

    if receiver.flags & F_SACK_PERM:
        sack = _sack(pkt, sack)

    if sender.td_maxwin == 0:
        if flags & TCP_SYN:
            _init_sender(sender, receiver, pkt, end, win, direction)
            if not flags & TCP_ACK:
                return ACCEPT  # simultaneous open
        else:
            # Mid-stream in this direction: take the packet's word for it.
            sender.td_end = end
            swin = (win << sender.td_scale) & M32
            sender.td_maxwin = swin or 1
            sender.td_maxend = (end + sender.td_maxwin) & M32
            if receiver.td_maxwin == 0:
                receiver.td_end = receiver.td_maxend = sack
            elif sack == (receiver.td_end + 1) & M32:
                receiver.td_end = (receiver.td_end + 1) & M32  # keepalive reply
    elif (flags & TCP_SYN and after(end, sender.td_end)
          and info.state in (TcpState.SYN_SENT, TcpState.SYN_RECV)):
        # A re-initialised SYN(-ACK) with a higher sequence (RFC 793).
        _init_sender(sender, receiver, pkt, end, win, direction)
        if direction == 1 and not flags & TCP_ACK:
            return ACCEPT

    if not flags & TCP_ACK:
        ack = sack = receiver.td_end
    elif flags & (TCP_ACK | TCP_RST) == (TCP_ACK | TCP_RST) and ack == 0:
        ack = sack = receiver.td_end  # broken stacks: RST+ACK with ack 0

    if flags & TCP_RST and seq == 0 and info.state == TcpState.SYN_SENT:
        seq = end = sender.td_end  # RST answering a SYN

    maxackwin = max(sender.td_maxwin, MAXACKWINCONST)
    if not before(seq, (sender.td_maxend + 1) & M32):
        overshot = (end - sender.td_maxend + 1) & M32
        ack_ok = after(sack, (receiver.td_end - maxackwin - 1) & M32)
        in_recv = receiver.td_maxwin and after(end, (sender.td_end - receiver.td_maxwin - 1) & M32)
        if in_recv and ack_ok and overshot <= receiver.td_maxwin and before(sack, (receiver.td_end + 1) & M32):
            # More data than the window allows: remember it so that its ACK
            # does not fail check III later.
            sender.td_end = end
            sender.flags |= F_DATA_UNACKNOWLEDGED
            notes.append(f"{overshot} bytes more than expected")
            return ACCEPT if _liberal(sender, cfg) else IGNORE
        notes.append("SEQ is over upper bound (over the window of the receiver)")
        return ACCEPT if _liberal(sender, cfg) else INVALID
    if not before(sack, (receiver.td_end + 1) & M32):
        notes.append("ACK is over upper bound (ACKed data not seen yet)")
        return ACCEPT if _liberal(sender, cfg) else INVALID
    if receiver.td_maxwin and not after(end, (sender.td_end - receiver.td_maxwin - 1) & M32):
        notes.append("SEQ is under lower bound (already ACKed data retransmitted)")
        return ACCEPT if _liberal(sender, cfg) else IGNORE
    if not after(sack, (receiver.td_end - maxackwin - 1) & M32):
        notes.append("ignored ACK under lower bound (possible overly delayed)")
        return ACCEPT if _liberal(sender, cfg) else IGNORE
    # A liberal sender's failed check above is accepted without updating
    # the window data, as nf_tcp_log_invalid() makes tcp_in_window() do.

    if not flags & TCP_SYN:
        win = (win << sender.td_scale) & M32

    swin = (win + ((sack - ack) & M32)) & M32
    if sender.td_maxwin < swin:
        sender.td_maxwin = swin
    if after(end, sender.td_end):
        sender.td_end = end
        sender.flags |= F_DATA_UNACKNOWLEDGED
    if flags & TCP_ACK:
        if not sender.flags & F_MAXACK_SET:
            sender.td_maxack = ack
            sender.flags |= F_MAXACK_SET
        elif after(ack, sender.td_maxack):
            sender.td_maxack = ack

    if receiver.td_maxwin != 0 and after(end, sender.td_maxend):
        receiver.td_maxwin = (receiver.td_maxwin + ((end - sender.td_maxend) & M32)) & M32
    if after((sack + win) & M32, (receiver.td_maxend - 1) & M32):
        receiver.td_maxend = (sack + win) & M32
        if win == 0:
            receiver.td_maxend = (receiver.td_maxend + 1) & M32
    if ack == receiver.td_end:
        receiver.flags &= ~F_DATA_UNACKNOWLEDGED

    if index == ACK_SET:
        if (info.last_dir == direction and info.last_seq == seq and info.last_ack == ack
                and info.last_end == end and info.last_win == win_raw):
            info.retrans += 1
        else:
            info.last_dir = direction
            info.last_seq = seq
            info.last_ack = ack
            info.last_end = end
            info.last_win = win_raw
            info.retrans = 0
    return ACCEPT


def _can_early_drop(state: int) -> bool:
    return state in (TcpState.FIN_WAIT, TcpState.LAST_ACK, TcpState.TIME_WAIT,
                     TcpState.CLOSE, TcpState.CLOSE_WAIT)


def _established(state: int) -> bool:
    return state == TcpState.ESTABLISHED


def tcp_packet(info: TcpInfo, pkt: Packet, direction: int, *, seen_reply: bool, assured: bool,
               cfg, notes: list) -> tuple[str, float | None, bool]:
    """nf_conntrack_tcp_packet() on a tracked connection.

    Returns (outcome, timeout, set_assured).  ``timeout`` is the refresh
    for ACCEPT (None: do not refresh, as for a SYN retransmission)."""
    timeouts = cfg.timeouts
    old_state = info.state
    index = conntrack_index(pkt.tcp_flags)
    new_state = TCP_TRANSITIONS[direction][index][old_state]
    ack_seq = pkt.ack
    skip_window = False

    if new_state == _SS and old_state >= _TW:
        seen = info.seen
        if ((seen[direction].flags | seen[1 - direction].flags) & F_CLOSE_INIT
                or (info.last_dir == direction and info.last_index == RST_SET)):
            notes.append("SYN re-opens a closed connection")
            return REPEAT, None, False
    if new_state == _IG or (new_state == _SS and old_state >= _TW):
        # Ignored packets: we may be out of sync with the endpoints.
        if (index == SYNACK_SET and info.last_index == SYN_SET and info.last_dir != direction
                and ack_seq == info.last_end):
            # This SYN-ACK answers a SYN we ignored: resync from it.
            old_state = TcpState.SYN_SENT
            new_state = _SR
            s = info.seen[info.last_dir]
            s.td_end = s.td_maxend = info.last_end
            s.td_maxwin = info.last_win or 1
            s.td_scale = info.last_wscale
            info.last_flags &= ~F_EXP_CHALLENGE_ACK
            s.flags = info.last_flags
            info.seen[direction].reset()
        else:
            info.last_index = index
            info.last_dir = direction
            info.last_seq = pkt.seq
            info.last_end = segment_end(pkt)
            info.last_win = pkt.window
            if index == SYN_SET and direction == 0:
                tmp = TcpSeen()
                info.last_flags = info.last_wscale = 0
                _options(pkt, tmp)
                if tmp.flags & F_WINDOW_SCALE:
                    info.last_flags |= F_WINDOW_SCALE
                    info.last_wscale = tmp.td_scale
                if tmp.flags & F_SACK_PERM:
                    info.last_flags |= F_SACK_PERM
                if old_state == TcpState.LAST_ACK:
                    info.last_flags |= F_EXP_CHALLENGE_ACK
            if old_state == TcpState.SYN_SENT and index == ACK_SET and direction == 1:
                info.last_ack = ack_seq
            notes.append(f"packet ({INDEX_NAMES[index]}) in dir {direction} ignored, "
                         f"state {TcpState(old_state).name}")
            return IGNORE, None, False
    elif new_state == _IV:
        notes.append(f"packet ({INDEX_NAMES[index]}) in dir {direction} invalid, "
                     f"state {TcpState(old_state).name}")
        return INVALID, None, False
    elif new_state == _TW:
        if (old_state == TcpState.LAST_ACK and index == ACK_SET and info.last_dir != direction
                and info.last_index == SYN_SET and info.last_flags & F_EXP_CHALLENGE_ACK):
            info.last_flags &= ~F_EXP_CHALLENGE_ACK
            notes.append("challenge-ack ignored")
            return IGNORE, None, False
    elif new_state == _S2:
        info.last_flags |= F_SIMULTANEOUS_OPEN
    elif new_state == _SR:
        if direction == 1 and index == ACK_SET and info.last_flags & F_SIMULTANEOUS_OPEN:
            new_state = _ES
    elif new_state == _CL and index == RST_SET:
        if _can_early_drop(old_state):
            skip_window = True
        else:
            peer = info.seen[1 - direction]
            if peer.flags & F_MAXACK_SET and info.last_index != SYN_SET:
                seq = pkt.seq
                if seq == 0 and not _established(old_state):
                    pass
                elif before(seq, peer.td_maxack) and not cfg.tcp_ignore_invalid_rst:
                    notes.append("invalid rst")
                    return INVALID, None, False
                elif not _established(old_state) or seq == peer.td_maxack:
                    pass
                elif (info.last_index == ACK_SET and info.last_dir == direction
                      and seq == info.last_end):
                    pass  # RST ending a train of data
                else:
                    # Not exactly at the expected sequence: keep the state
                    # and wait for a possible challenge ACK.
                    new_state = old_state
            if not skip_window:
                if (((seen_reply and info.last_index == SYN_SET)
                     or (not assured and info.last_index == ACK_SET))
                        and ack_seq == info.last_end):
                    skip_window = True  # RST to a SYN/ACK we let through
                elif (old_state == TcpState.SYN_SENT and info.last_index == ACK_SET
                      and info.last_dir == 1 and pkt.seq == info.last_ack):
                    skip_window = True  # RST after a challenge ACK

    if not skip_window:
        res = in_window(info, direction, index, pkt, cfg, notes)
        if res == IGNORE:
            return IGNORE, None, False
        if res == INVALID:
            _handle_invalid(info, direction, index, assured, notes)
            return INVALID, None, False

    info.last_index = index
    info.last_dir = direction
    info.state = new_state
    if old_state != new_state and new_state == _FW:
        info.seen[direction].flags |= F_CLOSE_INIT

    state_to = timeouts[STATE_NAMES[new_state]]
    if info.retrans >= cfg.tcp_max_retrans and state_to > timeouts["tcp_max_retrans"]:
        timeout = timeouts["tcp_max_retrans"]
    elif index == RST_SET:
        timeout = timeouts["CLOSE"]
    elif ((info.seen[0].flags | info.seen[1].flags) & F_DATA_UNACKNOWLEDGED
          and state_to > timeouts["tcp_unacked"]):
        timeout = timeouts["tcp_unacked"]
    elif (not cfg.tcp_no_window_check and info.last_win == 0
          and state_to > timeouts["tcp_max_retrans"]):
        timeout = timeouts["tcp_max_retrans"]
    else:
        timeout = state_to

    set_assured = False
    if not seen_reply:
        if pkt.tcp_flags & TCP_RST:
            notes.append("RST before any reply: entry removed")
            return KILL, timeout, False
        if index == SYN_SET and old_state == TcpState.SYN_SENT:
            return ACCEPT, None, False  # a SYN retransmission does not renew
        if new_state == _ES and timeout > timeouts["tcp_unacked"]:
            timeout = timeouts["tcp_unacked"]  # picked up mid-stream
    elif not assured and old_state in (TcpState.SYN_RECV, TcpState.ESTABLISHED) and new_state == _ES:
        set_assured = True
    return ACCEPT, timeout, set_assured


def _handle_invalid(info: TcpInfo, direction: int, index: int, assured: bool, notes: list) -> None:
    """nf_tcp_handle_invalid(): only bookkeeping here; the timeout shrink
    is applied by the tracker when ``notes`` asks for it."""
    if not assured or index not in (RST_SET, FIN_SET):
        return
    if info.last_dir != direction and info.last_index in (FIN_SET, RST_SET):
        notes.append("shrink-timeout")
    else:
        info.last_index = index
        info.last_dir = direction
