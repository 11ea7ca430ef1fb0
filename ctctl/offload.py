"""The offload manager: which connections go to the "hardware", when they
leave it, and what they counted there (nf_flowtable's role, with the
proposal's soft and hardware lists).

- Policy as act_ct: TCP once ESTABLISHED and ASSURED, UDP once ASSURED;
  never with a helper.  ICMP echo, which act_ct never offloads, once it
  has seen a reply (the tool's choice, so that ping can be measured; set
  `icmp: never` for act_ct's behaviour).
- Both directions go in together, or neither.  A full table marks the
  connection "failed to offload" and queues it (the pending list); when a
  hardware entry leaves, the oldest queued connection that still qualifies
  takes its place.
- Termination is software's: a FIN or RST reaches software (the program
  punts them), and the connection leaves the hardware at once; software
  handles late packets.  With `closing` (the kernel's behaviour since
  2025) a FIN leaves the flow in hardware until TIME_WAIT or CLOSE.
- Offloaded connections get the offload timeouts (3600 s TCP, 180 s
  UDP/ICMP by default) refreshed by the hardware's last-used time; when
  they leave the hardware they get their state's timeout back.
- The hardware counters are folded into the connection's counters on every
  sync and when the entry leaves: nothing counted in hardware is lost.
"""

from __future__ import annotations

import time
from collections import Counter as Tally, deque
from dataclasses import dataclass, field

from ctctl.conntrack import Conn, ConnTracker, Status
from ctctl.device import Device, TableFull, flow_entry

IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP, IPPROTO_ICMPV6 = 6, 17, 1, 58
HW = Status.OFFLOAD | Status.HW_OFFLOAD
TERMINAL_STATES = ("TIME_WAIT", "CLOSE")


class PolicyError(ValueError):
    pass


@dataclass
class OffloadPolicy:
    tcp: str = "established"      # established | never
    udp: str = "assured"          # assured | replied | never
    icmp: str = "replied"         # replied | never
    closing: bool = False         # keep FIN'd TCP flows in hardware until TIME_WAIT/CLOSE
    tcp_timeout: float = 3600.0   # the proposal's suggested offload timeouts
    udp_timeout: float = 180.0
    icmp_timeout: float = 180.0

    CHOICES = {"tcp": ("established", "never"), "udp": ("assured", "replied", "never"),
               "icmp": ("replied", "never")}

    @classmethod
    def from_config(cls, d: dict) -> "OffloadPolicy":
        p = cls()
        for k, v in d.items():
            if k not in cls.__dataclass_fields__:
                raise PolicyError(f"unknown offload key {k!r} (expected {', '.join(cls.__dataclass_fields__)})")
            if k in cls.CHOICES and v not in cls.CHOICES[k]:
                raise PolicyError(f"offload {k}: {v!r} is not one of {', '.join(cls.CHOICES[k])}")
            if k == "closing" and not isinstance(v, bool):
                raise PolicyError(f"offload closing must be true or false, not {v!r}")
            if k.endswith("_timeout") and (not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0):
                raise PolicyError(f"offload {k} must be a number of seconds > 0, not {v!r}")
            setattr(p, k, v)
        return p


@dataclass
class HwConn:
    """A connection in hardware: its two table keys and what was already
    folded from each entry's counters."""

    conn: Conn
    keys: tuple                  # (orig key, reply key) as abi.Tuple
    folded: list = field(default_factory=lambda: [[0, 0], [0, 0]])  # [dir][packets, bytes]
    last_used_ns: int = 0
    written: tuple = (0, 0)      # the (mark, label) the entries carry


class OffloadManager:
    def __init__(self, tracker: ConnTracker, device: Device, policy: OffloadPolicy | None = None,
                 clock=time.monotonic, notify=None):
        self.tracker = tracker
        self.notify = notify or (lambda text: None)   # one line per decision, for event logs
        self.device = device
        self.policy = policy or OffloadPolicy()
        self.clock = clock
        self.hw: dict[int, HwConn] = {}           # the hardware list, by connection id
        self.pending: deque[Conn] = deque()        # failed to offload: table full
        self.counters = Tally()
        tracker.subscribe(self._on_event)

    # -- policy -------------------------------------------------------------
    def eligible(self, conn: Conn) -> bool:
        st = conn.status
        if not st & Status.CONFIRMED or st & (Status.HELPER | Status.DYING):
            return False
        p = self.policy
        if conn.proto == IPPROTO_TCP:
            return p.tcp == "established" and conn.state == "ESTABLISHED" and bool(st & Status.ASSURED)
        if conn.proto == IPPROTO_UDP:
            if p.udp == "assured":
                return bool(st & Status.ASSURED)
            return p.udp == "replied" and bool(st & Status.SEEN_REPLY)
        if conn.proto in (IPPROTO_ICMP, IPPROTO_ICMPV6):
            return p.icmp == "replied" and bool(st & Status.SEEN_REPLY)
        return False

    def _leaving(self, conn: Conn) -> str | None:
        """Why an offloaded connection must leave the hardware now."""
        if conn.proto != IPPROTO_TCP:
            return None
        state = conn.state
        if state == "ESTABLISHED":
            return None
        if state == "CLOSE":
            return "rst"
        if self.policy.closing and state not in TERMINAL_STATES:
            return None
        return "fin"

    def timeout_for(self, conn: Conn) -> float:
        p = self.policy
        if conn.proto == IPPROTO_TCP:
            return p.tcp_timeout
        if conn.proto == IPPROTO_UDP:
            return p.udp_timeout
        return p.icmp_timeout

    # -- after each packet software handled ----------------------------------
    def after_packet(self, conns) -> None:
        """The connections a packet touched in software (each ct action's
        result): offload the ones that now qualify, take out the ones that
        are terminating."""
        for conn in conns:
            if conn is None:
                continue
            if conn.id in self.hw:
                why = self._leaving(conn)
                if why:
                    self.remove(conn, why)
            elif self.eligible(conn) and conn not in self.pending:
                self.offload(conn)

    # -- the two lists ---------------------------------------------------------
    def offload(self, conn: Conn) -> bool:
        """Both directions into the table, or neither (then: pending)."""
        entries = [flow_entry(conn, d, conn.id) for d in (0, 1)]
        added = []
        try:
            for key, flow in entries:
                self.device.add_flow(key, flow)
                added.append(key)
        except TableFull:
            for key in added:
                self.device.remove_flow(key)
            self.counters["table_full"] += 1
            if conn not in self.pending:
                self.pending.append(conn)
                self.notify(f"conn {conn.id}: hardware table full, failed to offload: pending "
                            f"({len(self.pending)} queued)")
            return False
        self.hw[conn.id] = HwConn(conn, tuple(k for k, _ in entries), written=(conn.mark, conn.label))
        self.tracker.set_liberal(conn)
        self.tracker.set_status(conn, HW)
        self.tracker.set_timeout(conn, self.timeout_for(conn))
        self.counters["offloaded"] += 1
        self.notify(f"conn {conn.id}: offloaded, both directions in hardware")
        return True

    def remove(self, conn: Conn, why: str) -> None:
        hc = self.hw.pop(conn.id, None)
        if hc is None:
            return
        for d, key in enumerate(hc.keys):
            flow = self.device.remove_flow(key)
            if flow is not None:
                self._fold(hc, d, flow)
        if conn.status & Status.CONFIRMED and not conn.status & Status.DYING:
            self.tracker.set_status(conn, HW, on=False)
            # Back to software: the state's own timeout, as nf_flowtable does.
            self.tracker.set_timeout(conn, self._state_timeout(conn))
        self.counters["removed_" + why] += 1
        self.notify(f"conn {conn.id}: out of hardware ({why}); hardware counted "
                    f"{hc.folded[0][0]}+{hc.folded[1][0]} packets, folded into the connection")
        self._from_pending()

    def _from_pending(self) -> None:
        while self.pending:
            conn = self.pending.popleft()
            if self.eligible(conn) and conn.id not in self.hw and self.tracker.lookup(conn.orig) is conn:
                if self.offload(conn):
                    self.counters["from_pending"] += 1
                return

    def _state_timeout(self, conn: Conn) -> float:
        t = self.tracker.config.timeouts
        if conn.proto == IPPROTO_TCP:
            return t[conn.state]
        if conn.proto == IPPROTO_UDP:
            return t["udp_stream"] if conn.status & Status.ASSURED else t["udp"]
        return t["icmpv6" if conn.proto == IPPROTO_ICMPV6 else "icmp"]

    def _on_event(self, event: str, conn: Conn) -> None:
        hc = self.hw.get(conn.id)
        if event == "UPDATE" and hc is not None and hc.written != (conn.mark, conn.label):
            self._rewrite(hc)
        if event == "DESTROY":
            if conn.id in self.hw:
                self.remove(conn, "expired")
            try:
                self.pending.remove(conn)
            except ValueError:
                pass

    def _rewrite(self, hc: HwConn) -> None:
        """Software changed the mark or label (a `ct commit mark ...`): the
        entries must restore the new values.  Their counters are folded
        first, since a rewritten entry starts counting from zero."""
        for d, key in enumerate(hc.keys):
            _, flow = flow_entry(hc.conn, d, hc.conn.id)
            old = self.device.remove_flow(key)
            if old is not None:
                self._fold(hc, d, old)
            hc.folded[d] = [0, 0]
            self.device.add_flow(key, flow)
        hc.written = (hc.conn.mark, hc.conn.label)
        self.counters["rewritten"] += 1

    # -- counters and aging ---------------------------------------------------
    def _fold(self, hc: HwConn, d: int, flow) -> None:
        """Add what the entry counted since the last fold to the connection."""
        dp, db = flow.packets - hc.folded[d][0], flow.bytes - hc.folded[d][1]
        if dp > 0 or db > 0:
            hc.conn.packets[d] += dp
            hc.conn.bytes[d] += db
            hc.folded[d] = [flow.packets, flow.bytes]

    def sync(self) -> None:
        """Read every hardware entry: fold counters, and refresh the offload
        timeout of connections the hardware saw traffic for."""
        by_key = {bytes(k): f for k, f in self.device.read_flows()}
        now_ns = time.monotonic_ns()
        for hc in list(self.hw.values()):
            used = 0
            for d, key in enumerate(hc.keys):
                flow = by_key.get(bytes(key))
                if flow is None:
                    continue
                self._fold(hc, d, flow)
                used = max(used, flow.last_used_ns)
            if used > hc.last_used_ns:
                hc.last_used_ns = used
                # bpf_ktime_get_ns is CLOCK_MONOTONIC; the tracker's clock may
                # be another (tests inject one): carry the age, not the time.
                age = max(0.0, (now_ns - used) / 1e9)
                self.tracker.set_timeout(hc.conn, max(0.0, self.timeout_for(hc.conn) - age))
                hc.conn.last_seen = self.clock() - age
        self.counters["syncs"] += 1

    def stats(self) -> dict:
        return {"hardware": len(self.hw), "pending": len(self.pending), **dict(self.counters)}
