"""The tc software datapath: run a packet through a box's chains.

Given a parsed packet and its ingress port, Pipeline.process() evaluates
chain 0 of that port's filters (first match by prio), runs the matching
filter's actions in order, follows `goto chain`, and returns a Verdict: the
output port (mirred egress redirect), drop, or pass, with the packet as
rewritten (NAT) and the ct metadata it ends with.

It can also start in the middle: a Resume names the chain, the rule (index
in RuleSet.chain()) and the action where the "hardware" stopped, the ct
metadata it restored and what it already did to the packet (ctctl.abi.Done).

Semantics, and where they follow or leave tc (docs/rules.md has the list):
- a chain in which no filter matches ends the packet: verdict drop, reason
  "no_match" (the kernel would hand it to the stack; the box has none);
- an action list that ends without a verdict (e.g. `action ct` alone) is
  tc's TC_ACT_PIPE falling off the end, which the ingress hook treats as OK:
  verdict pass;
- `trap` is "send to software" in hardware; in software the packet is
  already there, so trap does nothing and the next action runs;
- `goto chain` and `reclassify` (back to chain 0) may loop: more than
  max_hops of them for one packet drop it (reason "goto_loop"), as the
  kernel's reclassify limit does for both;
- `continue` ends the filter's actions and classification goes on with
  the next prio of the chain (the next flower instance, as in the kernel,
  where one instance holds all filters of a prio);
- ct's control verb (`ct commit drop`) runs right after the ct as that
  gact action would;
- pedit rewrites header words and fixes no checksum, csum recomputes the
  ones it names (ctctl.kernel.rewrite); both end the list with pass unless
  their verb says otherwise (`pipe`), as in tc;
- filters marked skip_sw are not evaluated here;
- a frame on a tunnel device's underlay port that is VXLAN for it is
  decapsulated first and classified on the tunnel device with its
  metadata (enc_* keys), as the kernel's vxlan device does before tc sees
  it; `tunnel_key unset`/`set` drop and give metadata, and a mirred to the
  tunnel device encapsulates (ctctl.kernel.tunnel): drop `no_tunnel_key`
  without metadata, `no_neighbor` without a learned outer MAC,
  `outer_ipv6` for IPv6 outer addresses (not modelled).

The ct action goes to the conntrack tracker, with two things act_ct does
that the tracker's one-call API leaves to its caller:
- the per-packet cache (act_ct's tcf_ct_skb_nfct_cached): a second `ct`
  in the same zone on a packet whose connection is already confirmed does
  not run the packet through conntrack again (no double counting, no
  lookup of an already translated tuple); it only applies NAT and, with
  commit, mark and label;
- resuming after the hardware already NATed the packet: the packet's
  tuple is the translated one, which is in no table slot.  The pipeline
  finds the connection through the inverse of that tuple, rewrites the
  packet back to its untranslated tuple and lets the ct action run
  normally, so the translation is applied exactly once overall and
  conntrack sees the packet.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from ctctl.abi import MAX_HOPS, RESUME_MATCH, CtState, Done
from ctctl.kernel.conntrack import Conn, ConnTracker, CtResult, NatSpec, Status, nat_ct_state, tuple_of
from ctctl.kernel.conntrack.nat import rewrite
from ctctl.kernel.packet import Packet, ParseError, parse
from ctctl.kernel.rewrite import csum as run_csum, pedit as run_pedit
from ctctl.kernel.tunnel import Tunnel, TunnelInfo, decap, enc_matches, encap
from ctctl.rules import (
    ETH_P_ALL, ContinueAction, CsumAction, CtAction, DropAction, Filter, FlowerMatch, GotoAction,
    MirredAction, PassAction, PeditAction, PipeAction, ReclassifyAction, RuleSet, TrapAction, TunnelKeyAction,
)
from ctctl.rules.pedit import keys as pedit_keys

# Gotos one packet may take.  The hardware interpreter must stop at the same
# number (the kernel's own reclassify limit is 16).
MAX_GOTO_HOPS = MAX_HOPS

_NAT_STATUS = Status.SRC_NAT | Status.DST_NAT
# What ends a rule's actions without ending classification.
_GO_ON = (GotoAction, ContinueAction, ReclassifyAction)


@dataclass
class CtMeta:
    """The ct metadata a packet carries between actions (skb->_nfct)."""

    ct_state: CtState = CtState(0)
    zone: int = 0
    mark: int = 0
    label: int = 0
    conn: Conn | None = None
    reply: bool = False

    @classmethod
    def of(cls, res: CtResult) -> "CtMeta":
        return cls(res.ct_state, res.zone, res.mark, res.label, res.conn, res.reply)   # a CtState already


@dataclass(frozen=True)
class Resume:
    """Where software continues a packet the hardware could not finish.

    `action` is the index of the action to run next in rule `rule` of
    `chain`; RESUME_MATCH instead means the hardware did not decide whether
    that rule matches: software matches from rule `rule` on."""

    chain: int
    rule: int
    action: int
    ct_state: int = 0
    zone: int = 0
    mark: int = 0
    label: int = 0
    done: Done = Done(0)
    hops: int = 0

    @classmethod
    def from_punt(cls, hdr) -> "Resume":
        """From a ctctl.abi.PuntHdr.  The label bytes are read as one
        big-endian 128-bit number (byte 0 most significant)."""
        return cls(chain=hdr.chain, rule=hdr.rule, action=hdr.action,
                   ct_state=hdr.ct_state, zone=hdr.zone, mark=hdr.mark,
                   label=int.from_bytes(bytes(hdr.label), "big"),
                   done=Done(hdr.done), hops=hdr.hops)


@dataclass(frozen=True)
class Step:
    """One filter the packet went through."""

    chain: int
    rule: int
    filter: Filter
    resumed: bool = False


@dataclass(frozen=True)
class CtStep:
    """One ct action run on the packet (which filter, which action, what the
    tracker answered) — what the offload manager needs to decide."""

    filter: Filter
    action: int
    result: CtResult | None  # None for `ct clear`
    cached: bool = False


@dataclass
class Verdict:
    kind: str  # "output", "drop" or "pass"
    packet: Packet | None
    output: str | None = None
    reason: str | None = None
    meta: CtMeta = field(default_factory=CtMeta)
    hops: int = 0
    trace: list[Step] = field(default_factory=list)
    cts: list[CtStep] = field(default_factory=list)
    tunnel: TunnelInfo | None = None     # the packet's tunnel metadata as it ends
    in_dev: str | None = None            # the device it was classified on (a tunnel's, decapsulated)
    rewritten: bool = False              # pedit, csum or a tunnel changed it (beyond NAT)

    def __str__(self) -> str:
        where = f" {self.output}" if self.output else ""
        why = f" ({self.reason})" if self.reason else ""
        return f"{self.kind}{where}{why}"


def flower_matches(f: Filter, pkt: Packet, meta: CtMeta, tunnel: TunnelInfo | None = None) -> bool:
    """Does the packet, with its current ct and tunnel metadata, match the
    filter?  A key the packet does not have (ports of a non-first fragment,
    ICMP type of a TCP packet, enc_* without tunnel metadata) does not
    match, as in the flow dissector."""
    eth = f.effective_eth_type
    if eth != ETH_P_ALL and pkt.eth_type != eth:
        return False
    m: FlowerMatch = f.matches
    if m.ip_proto is not None and (pkt.ip_version is None or pkt.proto != m.ip_proto):
        return False
    if m.src_ip is not None and (pkt.src is None or pkt.src.version != m.src_ip.version
                                 or pkt.src not in m.src_ip):
        return False
    if m.dst_ip is not None and (pkt.dst is None or pkt.dst.version != m.dst_ip.version
                                 or pkt.dst not in m.dst_ip):
        return False
    if m.src_port is not None and (pkt.sport is None or pkt.sport not in m.src_port):
        return False
    if m.dst_port is not None and (pkt.dport is None or pkt.dport not in m.dst_port):
        return False
    if m.icmp_type is not None and pkt.icmp_type != m.icmp_type:
        return False
    if m.icmp_code is not None and pkt.icmp_code != m.icmp_code:
        return False
    if m.ct_state is not None and not m.ct_state.matches(int(meta.ct_state)):
        return False
    if m.has_enc and not enc_matches(m, tunnel):
        return False
    for key, have in ((m.ct_zone, meta.zone), (m.ct_mark, meta.mark), (m.ct_label, meta.label)):
        if key is not None and (have & key[1]) != key[0]:
            return False
    return True


def _natspec(a: CtAction) -> NatSpec | None:
    n = a.nat
    if n is None:
        return None
    return NatSpec(kind=n.kind, addr_min=n.addr_min, addr_max=n.addr_max,
                   port_min=n.port_min, port_max=n.port_max)


def _set_masked(old: int, v: tuple[int, int] | None) -> int:
    if v is None:
        return old
    value, mask = v
    return (old & ~mask) | (value & mask)


class Pipeline:
    def __init__(self, ruleset: RuleSet, tracker: ConnTracker, ports: Iterable[str],
                 max_hops: int = MAX_GOTO_HOPS, tunnels: Iterable[Tunnel] = ()):
        self.ruleset = ruleset
        self.tracker = tracker
        self.ports = frozenset(ports)
        self.max_hops = max_hops
        self.tunnels = {t.name: t for t in tunnels}
        self.tunnel_of_port = {t.port: t for t in self.tunnels.values()}   # underlay port -> its tunnel
        self.counters: dict[str, int] = {
            "packets": 0, "output": 0, "pass": 0, "drop": 0,
            "no_match": 0, "goto_loop": 0, "drop_action": 0, "unknown_port": 0,
            "stale_resume": 0, "parse_error": 0, "resume_nat_lost": 0, "ct_cached": 0,
            "pedit_failed": 0, "csum_failed": 0, "decapsulated": 0, "encapsulated": 0,
            "no_tunnel_key": 0, "no_neighbor": 0, "outer_ipv6": 0,
        }

    def unknown_ports(self) -> list[tuple[Filter, str]]:
        """mirred targets that are not ports of the box (tc refuses a
        redirect to a device that does not exist; here it is checked when
        the rules meet the box)."""
        out = []
        for f in self.ruleset.filters():
            for a in f.actions:
                if isinstance(a, MirredAction) and a.dev not in self.ports and a.dev not in self.tunnels:
                    out.append((f, a.dev))
        return out

    # ------------------------------------------------------------------
    def process(self, pkt: Packet | bytes | bytearray, in_dev: str,
                resume: Resume | None = None, tunnel: TunnelInfo | None = None) -> Verdict:
        """Classify a frame received on `in_dev` (a port, or a tunnel device
        with the frame's `tunnel` metadata), from the start or from `resume`."""
        self.counters["packets"] += 1
        t = self.tunnel_of_port.get(in_dev)
        if t is not None and (resume is None or (resume.chain, resume.rule, resume.action, resume.done)
                              == (0, 0, RESUME_MATCH, Done(0))):
            data = pkt.data if isinstance(pkt, Packet) else pkt
            inner = decap(t, data)
            if inner is not None:
                self.counters["decapsulated"] += 1
                pkt, tunnel = inner
                in_dev, resume = t.name, None
        if not isinstance(pkt, Packet):
            try:
                pkt = parse(pkt)
            except ParseError:
                return self._end(Verdict("drop", None, reason="parse_error"), CtMeta())
        nbytes = len(pkt.data)
        v = Verdict("drop", pkt, tunnel=tunnel, in_dev=in_dev, rewritten=tunnel is not None)
        meta = CtMeta()
        outcome = None
        chain, first = 0, 0   # where the next chain scan starts
        hit = -1              # the filter whose actions ran last
        if resume is not None:
            chain = resume.chain
            v.hops = resume.hops
            meta = CtMeta(CtState(resume.ct_state), resume.zone, resume.mark, resume.label)
            filters = self.ruleset.chain(in_dev, chain)
            if resume.action == RESUME_MATCH:
                if resume.rule > len(filters):
                    v.reason = "stale_resume"
                    return self._end(v, meta)
                first = resume.rule
                # Its connection, for a later ct in the same zone (act_ct's
                # per-packet cache), as when resuming at an action.
                self._restore_conn(pkt, meta, resume)
            else:
                rule = resume.rule
                if rule >= len(filters) or resume.action > len(filters[rule].actions):
                    v.reason = "stale_resume"
                    return self._end(v, meta)
                f, hit = filters[rule], rule
                self._restore(pkt, meta, resume, f)
                v.trace.append(Step(chain, rule, f, resumed=True))
                outcome = self._run_actions(f, resume.action, pkt, meta, v)

        while outcome is None or isinstance(outcome, _GO_ON):
            if isinstance(outcome, (GotoAction, ReclassifyAction)):
                if v.hops >= self.max_hops:
                    v.kind, v.reason = "drop", "goto_loop"
                    return self._end(v, meta)
                v.hops += 1
                chain, first = (outcome.chain if isinstance(outcome, GotoAction) else 0), 0
            elif isinstance(outcome, ContinueAction):
                # TC_ACT_UNSPEC: on to the next filter instance, i.e. the
                # next prio (one flower instance holds a prio's filters).
                filters = self.ruleset.chain(in_dev, chain)
                first = next((j for j in range(hit + 1, len(filters))
                              if filters[j].prio != filters[hit].prio), len(filters))
            filters = self.ruleset.chain(in_dev, chain)
            hit = None
            for i, f in enumerate(filters[first:], first):
                if not f.skip_sw and flower_matches(f, pkt, meta, v.tunnel):
                    hit = i
                    break
            if hit is None:
                v.kind, v.reason = "drop", "no_match"
                return self._end(v, meta)
            f = filters[hit]
            self.ruleset.record_hit(f, nbytes)
            v.trace.append(Step(chain, hit, f))
            outcome = self._run_actions(f, 0, pkt, meta, v)
        return self._end(v, meta)

    def _end(self, v: Verdict, meta: CtMeta) -> Verdict:
        v.meta = meta
        self.counters[v.kind] += 1
        if v.kind == "drop" and v.reason in self.counters:
            self.counters[v.reason] += 1
        return v

    def _run_actions(self, f: Filter, start: int, pkt: Packet, meta: CtMeta, v: Verdict):
        """Run f's actions from index start; returns what ends them: a
        GotoAction, ContinueAction or ReclassifyAction to follow, or a
        finished verdict marker (anything else)."""
        for i in range(start, len(f.actions)):
            a = f.actions[i]
            if isinstance(a, CtAction):
                self._ct(f, i, a, pkt, meta, v)
                if a.control is None:
                    continue
                a = a.control   # `ct ... drop`: the verb ends the list as its gact would
            elif isinstance(a, PeditAction):
                v.rewritten = True
                try:
                    if not run_pedit(pkt, pedit_keys(a)):
                        self.counters["pedit_failed"] += 1   # the kernel's overlimit; the packet goes on
                except ParseError:
                    # Rewritten into something that no longer reads as IP
                    # (an `ip` munge on an IPv6 packet): counted, dropped.
                    v.kind, v.reason = "drop", "parse_error"
                    return a
                a = a.control
            elif isinstance(a, CsumAction):
                v.rewritten = True
                if not run_csum(pkt, a.targets):
                    v.kind, v.reason = "drop", "csum_failed"
                    return a
                a = a.control
            elif isinstance(a, TunnelKeyAction):
                v.rewritten = True
                v.tunnel = None if a.unset else TunnelInfo(a.key_id or 0, a.src_ip, a.dst_ip,
                                                           a.dst_port or 0, a.csum)
                a = a.control
            if isinstance(a, (TrapAction, PipeAction)):
                continue
            if isinstance(a, (GotoAction, ContinueAction, ReclassifyAction)):
                return a
            if isinstance(a, MirredAction):
                if a.dev in self.tunnels:
                    self._encap(self.tunnels[a.dev], pkt, v)
                elif a.dev not in self.ports:
                    v.kind, v.reason = "drop", "unknown_port"
                else:
                    v.kind, v.output, v.reason = "output", a.dev, None
                return a
            if isinstance(a, DropAction):
                v.kind, v.reason = "drop", "drop_action"
                return a
            if isinstance(a, PassAction):
                v.kind, v.reason = "pass", "pass"
                return a
        v.kind, v.reason = "pass", "end_of_actions"
        return PassAction()

    # ------------------------------------------------------------------
    def _encap(self, t: Tunnel, pkt: Packet, v: Verdict) -> None:
        """mirred to a tunnel device: out of its underlay port, encapsulated
        with the packet's metadata (the kernel's vxlan device drops a packet
        that has none)."""
        info = v.tunnel
        frame = encap(t, pkt.data, info) if info is not None and info.src.version == 4 else None
        if frame is None:
            v.kind, v.reason = "drop", ("no_tunnel_key" if info is None else
                                        "outer_ipv6" if info.src.version != 4 else "no_neighbor")
            return
        self.counters["encapsulated"] += 1
        v.kind, v.output, v.reason = "output", t.port, None
        v.packet = parse(frame)

    def _ct(self, f: Filter, i: int, a: CtAction, pkt: Packet, meta: CtMeta, v: Verdict) -> None:
        if a.clear:
            self._assign(meta, CtMeta())
            v.cts.append(CtStep(f, i, None))
            return
        conn = meta.conn
        cached = (conn is not None and conn.confirmed and not conn.status & Status.DYING
                  and meta.zone == a.zone and not (a.force and meta.reply))
        if cached:
            self.counters["ct_cached"] += 1
            res = self._ct_cached(a, pkt, meta)
            v.cts.append(CtStep(f, i, res, cached=True))
        else:
            res = self.tracker.ct(pkt, zone=a.zone, commit=a.commit, force=a.force,
                                  nat=_natspec(a), mark=a.mark, label=a.label)
            v.cts.append(CtStep(f, i, res))
        self._assign(meta, CtMeta.of(res))

    def _ct_cached(self, a: CtAction, pkt: Packet, meta: CtMeta) -> CtResult:
        """act_ct on a packet that already has its confirmed connection."""
        conn = meta.conn
        direction = 1 if meta.reply else 0
        state = CtState(meta.ct_state)
        if a.nat is not None and conn.status & _NAT_STATUS:
            cur = tuple_of(pkt, a.zone)
            target = conn.tuple(1 - direction).invert()
            if cur is not None and target is not None:
                rewrite(pkt, cur, target)
                state |= nat_ct_state(conn.bits, direction)
        if a.commit:
            # act_ct sets mark and label on commit even for a confirmed
            # entry; the tracker has no call for "commit what you already
            # looked up", so it is done on the entry here.
            conn.mark = _set_masked(conn.mark, a.mark)
            conn.label = _set_masked(conn.label, a.label)
        return CtResult(state, conn=conn, reply=meta.reply, zone=a.zone,
                        mark=conn.mark, label=conn.label)

    @staticmethod
    def _assign(meta: CtMeta, new: CtMeta) -> None:
        meta.ct_state, meta.zone, meta.mark, meta.label = new.ct_state, new.zone, new.mark, new.label
        meta.conn, meta.reply = new.conn, new.reply

    def _restore(self, pkt: Packet, meta: CtMeta, resume: Resume, f: Filter) -> None:
        """The driver's part of a miss: give the packet its connection back.

        The program stops at a ct action before that action does anything
        (a miss, a FIN, a force on a reply): software runs it.  What `done`
        says was done came from an earlier ct.  If that ct ran in the same
        zone, this one is act_ct's per-packet cache, as it would have been
        in software from the start.  In another zone, a packet translated
        by the earlier ct is rewritten back first, so the tracker finds its
        entry and the packet leaves translated exactly once.  Resuming
        elsewhere restores the connection for later ct actions (the cache)."""
        a = f.actions[resume.action] if resume.action < len(f.actions) else None
        if (isinstance(a, CtAction) and not a.clear and resume.done & Done.CT
                and meta.ct_state & CtState.TRK and meta.zone == a.zone):
            # The hardware already ran a ct in this zone on this packet (and
            # maybe its NAT): this one is act_ct's per-packet cache, as it
            # would have been in software from the start.  _ct decides.
            found = self._find_conn(pkt, meta.zone)
            if found is not None:
                meta.conn, meta.reply = found[0], found[1] == 1
            return
        if isinstance(a, CtAction):
            if a.nat is not None and resume.done & (Done.SNAT | Done.DNAT):
                found = self._find_conn(pkt, a.zone)
                if found is None:
                    self.counters["resume_nat_lost"] += 1
                elif found[2]:
                    conn, direction, _, cur = found
                    rewrite(pkt, cur, conn.tuple(direction))
            return
        self._restore_conn(pkt, meta, resume)

    def _restore_conn(self, pkt: Packet, meta: CtMeta, resume: Resume) -> None:
        if meta.ct_state & CtState.TRK or resume.done & Done.CT:
            found = self._find_conn(pkt, meta.zone)
            if found is not None:
                meta.conn, meta.reply = found[0], found[1] == 1

    def _find_conn(self, pkt: Packet, zone: int):
        """(conn, direction of the packet, translated?, packet's tuple)."""
        t = tuple_of(pkt, zone)
        if t is None:
            return None
        conn = self.tracker.lookup(t)
        if conn is not None:
            return conn, (1 if t == conn.reply else 0), False, t
        inv = t.invert()
        conn = self.tracker.lookup(inv) if inv is not None else None
        if conn is None:
            return None
        # A translated packet's tuple is the inverse of the *other*
        # direction's tuple.
        return conn, (0 if inv == conn.reply else 1), True, t
