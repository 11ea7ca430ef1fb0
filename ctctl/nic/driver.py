"""The driver of the "NIC" behind one box (the proposal's ndo_setup_tc):
it writes the box's tc rules into the program's chains, gives each counted
filter a hardware counter slot, writes and takes out the offloaded
connection directions the flowtable hands it, and reads back what the
hardware counted.

What it writes is encoded by ctctl.nic.encode within the declared
capabilities; every map access goes through ctctl.nic.maps.  Towards the
flowtable it is a ctctl.kernel.offload.hw.FlowDevice: connections in,
opaque keys and counters out.
"""

from __future__ import annotations

import time
from typing import Iterable

from ctctl import abi
from ctctl.kernel.conntrack import Conn
from ctctl.kernel.offload.hw import DeviceError, DeviceIO, EntryStats, Expired, TableSnapshot
from ctctl.kernel.tunnel import Tunnel
from ctctl.nic.caps import HwCaps
from ctctl.nic.encode import SCRATCH_ID, encode_chain, entry_record, flow_entry, hardware_filters, key_tuple
from ctctl.nic.maps import Maps
from ctctl.nic.progrun import prog_test_run
from ctctl.nic.tunnels import device_ifindex, encap_entry, tunnel_entry
from ctctl.nic.windows import merge_request, take_back, window_context
from ctctl.rules import Filter, GotoAction, RuleSet, TunnelKeyAction




class Device:
    """The device: its maps (None for one that only plans), the ports'
    ifindexes and what it can do."""

    def __init__(self, maps: Maps | None, ifindex_by_port: dict[str, int], caps: HwCaps | None = None,
                 ktime=time.monotonic_ns, tunnels: Iterable[Tunnel] = ()):
        self.maps = maps
        self.ifindex_by_port = dict(ifindex_by_port)
        self.caps = caps or HwCaps()
        # The box's VXLAN devices (ctctl.nic.tunnels).  A NIC with `tunnels`
        # decapsulates on the underlay port and classifies on the device's
        # own chains; one without keeps the underlay port's rules in
        # software (its frames punt no_offload, software decapsulates).
        self.tunnels = list(tunnels)
        self.software_ports: frozenset[str] = frozenset()
        if self.caps.tunnels:
            for slot, t in enumerate(self.tunnels):
                self.ifindex_by_port[t.name] = device_ifindex(slot)
        else:
            self.software_ports = frozenset(t.port for t in self.tunnels)
        self._encaps: dict[bytes, int] = {}   # an encaps value -> its slot
        self._tunnels_written: dict[int, bytes] | None = None
        self.ktime = ktime                   # the NIC's clock (bpf_ktime_get_ns)
        self._keys: dict[int, list] = {}     # conn id -> [original key, reply key] in the table
        self._conn_of: dict[bytes, int] = {}  # an entry's key -> its conn id
        self._ids: dict[Filter, int] = {}
        self._next_id = SCRATCH_ID + 1
        self._paths: dict[tuple[int, ...], tuple[Filter, ...]] = {}   # rule ids -> rules, as installed
        self._written: dict[tuple[int, int], bytes] = {}
        self.not_installed: list[str] = []   # devices of the last install without an ifindex
        self.ager = None                     # the NIC's own aging (ctctl.nic.aging), once started
        self.aging_on = False
        self._merge_fd = None                # the NIC's window merge command, once loaded

    def _maps(self) -> Maps:
        if self.maps is None:
            raise DeviceError("this Device has no program (built with maps=None): planning only")
        return self.maps

    # -- capabilities ---------------------------------------------------------
    def set_caps(self) -> None:
        """Write the run-time capabilities (hw_config) the program honours."""
        maps = self._maps()
        # The caps under the old generation first, then the new one: a
        # packet that reads the new generation finds the new caps too.
        caps = self.caps.program_caps
        if not self.tunnels:    # no map lookup per UDP packet for a box without tunnels
            caps &= ~abi.Cap.TUNNELS
        maps.write_hw_config(caps, maps.read_hw_config().gen)
        self.bump_generation()

    def bump_generation(self) -> int:
        """Make every verdict the flow cache holds stale: after the
        rules or caps changed.  Continues from the map's own (pinned)
        value, so that a controller adopting a box never brings an old
        generation back.  The new generation."""
        maps = self._maps()
        cfg = maps.read_hw_config()
        gen = (cfg.gen + 1) & 0xFFFFFFFF or 1
        maps.write_hw_config(cfg.caps, gen)
        return gen

    # -- rules ----------------------------------------------------------------
    def rule_id(self, f: Filter) -> int | None:
        """The filter's hardware rule id (None: not counted in hardware)."""
        return self._ids.get(f)

    def rule_ids(self) -> dict[Filter, int]:
        """Every counted filter's rule id."""
        return dict(self._ids)

    def assign_ids(self, counted: list[Filter]) -> list[int]:
        """Keep the ids of filters still present, free the others, give new
        filters the lowest free ids.  Returns the newly taken ids (their
        counter slots must be zeroed before a rule uses them)."""
        keep = set(counted)
        self._ids = {f: i for f, i in self._ids.items() if f in keep}
        used = set(self._ids.values())
        # Ids are handed out round the ring from the last one given, not
        # lowest first: an entry may still name a deleted rule's id in its
        # path until its next packet, and must not find a new rule there.
        ring = list(range(self._next_id, abi.MAX_RULE_IDS)) + list(range(SCRATCH_ID + 1, self._next_id))
        free = (i for i in ring if i not in used)
        new = []
        for f in counted:
            if f in self._ids:
                continue
            i = next(free, None)
            if i is None:
                raise DeviceError(f"more than {abi.MAX_RULE_IDS - 1} filters to count in hardware")
            self._ids[f] = i
            self._next_id = i + 1 if i + 1 < abi.MAX_RULE_IDS else SCRATCH_ID + 1
            new.append(i)
        self._paths = {}
        return new

    def adopt_ids(self, ids: dict[Filter, int]) -> None:
        """The rule ids a controller that died gave its filters (the
        program's chains and counters use them): install() keeps them."""
        self._ids = dict(ids)
        top = max(ids.values(), default=SCRATCH_ID)
        self._next_id = top + 1 if top + 1 < abi.MAX_RULE_IDS else SCRATCH_ID + 1
        self._paths = {}

    def path_rules(self, ids) -> tuple[Filter, ...]:
        """An entry's path (the program's rule ids, 0 = none) as the rules
        they are now; ids of rules that are gone are left out.  Paths
        repeat from entry to entry, so each is translated once per install."""
        ids = tuple(ids)
        rules = self._paths.get(ids)
        if rules is None:
            rule_of = {i: f for f, i in self._ids.items()}
            rules = self._paths[ids] = tuple(rule_of[i] for i in ids if i in rule_of)
        return rules

    def entry_stats(self, flow: abi.Flow) -> EntryStats:
        return EntryStats(flow.packets, flow.bytes, flow.last_used_ns, self.path_rules(flow.path))

    def plan(self, ruleset: RuleSet) -> dict[tuple[int, int], list[Filter]]:
        """(ifindex, chain) -> the chain's filters, for every chain install()
        writes: every chain of every device that is a port, plus an empty
        chain for every goto target the device has no filter in (so that a
        packet sent there ends as "no rule matched", exactly as in software,
        rather than on a chain the program does not know)."""
        out: dict[tuple[int, int], list[Filter]] = {}
        self.not_installed = []
        for dev in ruleset.devices():
            ifindex = self.ifindex_by_port.get(dev)
            if ifindex is None or dev in self.software_ports:
                self.not_installed.append(dev)
                continue
            chains = ruleset.chains(dev)
            targets = {a.chain for f in ruleset.filters(dev) for a in f.actions
                       if isinstance(a, GotoAction)}
            for n in sorted(set(chains) | targets):
                out[(ifindex, n)] = ruleset.chain(dev, n)
        return out

    def install(self, ruleset: RuleSet) -> None:
        """ndo_setup_tc: make the chains map hold exactly the ruleset's
        chains, in software's order.  Filters keep their rule ids (and
        counters) across installs for as long as they exist; a new filter's
        counter slot is zeroed before any rule points at it.  Chains that
        did not change are not rewritten; chains that no longer exist are
        deleted (also ones a previous controller left in pinned maps)."""
        plan = self.plan(ruleset)
        maps = self._maps()
        counted = [f for filters in plan.values() for f in hardware_filters(filters, self.caps)]
        for i in self.assign_ids(counted):
            maps.zero_rule_stats(i)
        changed = self._install_tunnels(ruleset)
        for (ifindex, n), filters in plan.items():
            enc = bytes(encode_chain(filters, self._ids, self.caps, self.ifindex_by_port, self._encap_slot))
            if self._written.get((ifindex, n)) == enc:
                continue
            maps.write_chain(ifindex, n, enc)
            self._written[(ifindex, n)] = enc
            changed = True
        for key in maps.chain_keys():
            if key not in plan:
                maps.delete_chain(*key)
                self._written.pop(key, None)
                changed = True
        if changed:     # after the chains: no verdict of the old rules survives them
            self.bump_generation()

    def _install_tunnels(self, ruleset: RuleSet) -> bool:
        """The `tunnels` map, and the `encaps` slots the rules' tunnel_key
        sets use (slots are kept for as long as some rule gives that
        metadata; the chains that use a new one are written after it).
        True when the map changed."""
        maps = self._maps()
        want = {}
        if self.caps.tunnels:
            for slot, t in enumerate(self.tunnels):
                port = self.ifindex_by_port.get(t.port)
                if port is not None:
                    want[port] = want[device_ifindex(slot)] = tunnel_entry(port, slot, t.local, t.dstport, t.mac)
        written = {k: bytes(v) for k, v in want.items()}
        changed = written != self._tunnels_written
        if changed:
            maps.write_tunnels(want)
            self._tunnels_written = written
        used = {bytes(e) for f in ruleset.filters() for a in f.actions
                if isinstance(a, TunnelKeyAction) and (e := encap_entry(a)) is not None}
        self._encaps = {k: v for k, v in self._encaps.items() if k in used}
        return changed

    def _encap_slot(self, e: abi.Encap) -> int | None:
        """The `encaps` slot holding e, written now if it is new; None when
        all are taken (the tunnel_key set traps)."""
        key = bytes(e)
        slot = self._encaps.get(key)
        if slot is None:
            free = sorted(set(range(abi.MAX_ENCAPS)) - set(self._encaps.values()))
            if not free:
                return None
            slot = self._encaps[key] = free[0]
            self._maps().write_encap(slot, e)
        return slot

    def uninstall(self) -> None:
        """Remove every chain: every port becomes forward-only again."""
        maps = self._maps()
        for key in maps.chain_keys():
            maps.delete_chain(*key)
        self._written.clear()
        self._ids.clear()
        self.bump_generation()

    def rule_counters(self) -> dict[Filter, tuple[int, int]]:
        """(packets, bytes) the hardware counted per filter, summed over
        CPUs, for every installed filter whose match the hardware evaluates
        (the others are counted by software when it matches them)."""
        maps = self._maps()
        return {f: maps.rule_stats(i) for f, i in self._ids.items()}

    # -- flows: the flowtable's device (kernel.offload.hw.FlowDevice) ----------
    def add_flow(self, conn: Conn, direction: int, replace: bool = False) -> bytes:
        """Write one direction of `conn`; its key (the entry's key bytes).
        Once both are in, a NIC that ages its own entries gets the
        connection's context."""
        key, flow = flow_entry(conn, direction)
        self._maps().insert_flow(key, flow, replace=replace)
        kb = bytes(key)
        keys = self._keys.setdefault(conn.id, [None, None])
        keys[direction] = key
        self._conn_of[kb] = conn.id
        if self.aging_on and all(k is not None for k in keys):
            self.ager.track(conn.id, keys[0], keys[1], self.ktime())
        return kb

    def adopt_flow(self, conn_id: int, direction: int, key: bytes) -> None:
        """An entry a controller that died wrote for this connection: the
        device knows it as one of its own (add_flow without the write)."""
        k = abi.Tuple.from_buffer_copy(key)
        keys = self._keys.setdefault(conn_id, [None, None])
        keys[direction] = k
        self._conn_of[bytes(key)] = conn_id
        if self.aging_on and all(x is not None for x in keys):
            self.ager.track(conn_id, keys[0], keys[1], self.ktime())

    # -- TCP window contexts (bpf/window.h) ----------------------------------------
    @property
    def validates_windows(self) -> bool:
        return self.caps.window

    def seed_window(self, conn: Conn, check: str = "on") -> None:
        """Give the hardware the tracker's windows of a TCP connection
        (check: on, liberal or off, the tracker's sysctls)."""
        if conn.tcp is None or not self.caps.window:
            return
        mode = {"on": abi.WindowCheck.ON, "liberal": abi.WindowCheck.LIBERAL, "off": abi.WindowCheck.OFF}[check]
        self._maps().write_window(conn.id, window_context(conn.tcp, mode))

    def pull_window(self, conn: Conn) -> bool:
        """The hardware's windows of `conn` into the tracker's data; False
        when the hardware has none for it."""
        if conn.tcp is None or not self.caps.window:
            return False
        w = self._maps().read_window(conn.id)
        if w is None:
            return False
        take_back(w, conn.tcp)
        return True

    def merge_window(self, conn: Conn, taken: tuple) -> None:
        """What software changed in `conn`'s windows since it took them
        (`taken`: TcpInfo.windows() then) into the NIC's context, by the
        NIC itself (bpf/ctctl.c ctctl_window_merge, under the context's
        lock): the segments it judges meanwhile keep their effect.  A plain
        write of the tracker's copy would move their edges back, and the
        next ACK would look like one of data never sent."""
        if conn.tcp is None or not self.caps.window:
            return
        m = merge_request(conn.id, taken, conn.tcp)
        if m is None:
            return
        maps = self._maps()
        if self._merge_fd is None:
            from bcc import BPF

            self._merge_fd = maps.bpf.load_func(b"ctctl_window_merge", BPF.SCHED_CLS).fd
        maps.write_window_merge(m)
        prog_test_run(self._merge_fd, bytes(64))

    def remove_flow(self, key: bytes) -> EntryStats | None:
        flow = self._maps().take_flow(abi.Tuple.from_buffer_copy(key))
        self._forget(key)
        return None if flow is None else self.entry_stats(flow)

    def _forget(self, key: bytes) -> None:
        cid = self._conn_of.pop(key, None)
        if cid is None:
            return
        keys = self._keys.get(cid)
        if keys is not None:
            keys[:] = [k if k is None or bytes(k) != key else None for k in keys]
            if all(k is None for k in keys):
                del self._keys[cid]
                if self.caps.window:
                    self._maps().delete_window(cid)
        if self.aging_on:
            self.ager.untrack(cid)

    # -- the NIC's own aging ---------------------------------------------------------
    def start_aging(self, interval_s: float, timeouts_s: dict[str, float]) -> None:
        """The NIC ages its own entries from now on: every connection in
        the table gets a context, the timer runs every `interval_s`."""
        if not self.caps.hw_aging:
            raise DeviceError("this NIC does not age its own entries (hardware: {hw_aging: false})")
        if self.ager is None:
            from ctctl.nic.aging import NicAger

            self.ager = NicAger(self._maps().bpf, self._maps(), self._maps().aging_slots())
        self.ager.set_timeouts(timeouts_s)
        self.aging_on = True
        now = self.ktime()
        for cid, keys in self._keys.items():
            if all(k is not None for k in keys):
                self.ager.track(cid, keys[0], keys[1], now)
        self.ager.start(interval_s)

    def set_aging_timeouts(self, timeouts_s: dict[str, float]) -> None:
        if self.ager is not None:
            self.ager.set_timeouts(timeouts_s)

    def stop_aging(self) -> None:
        if self.ager is None or not self.aging_on:
            return
        self.ager.stop()
        for cid in list(self._keys):
            self.ager.untrack(cid)
        self.aging_on = False

    def read_flow(self, key: bytes) -> EntryStats | None:
        flow = self._maps().read_flow(abi.Tuple.from_buffer_copy(key))
        return None if flow is None else self.entry_stats(flow)

    def read_flows(self) -> dict[bytes, EntryStats]:
        path = self.path_rules
        return {k: EntryStats(c.packets, c.bytes, c.last_used_ns, path(c.path))
                for k, c in self._maps().flow_counters().items()}

    def read_table(self) -> TableSnapshot:
        keys, vals = self._maps().flow_arrays()
        return TableSnapshot(conn_id=vals["conn_id"], dir=vals["dir"], proto=keys["proto"],
                             packets=vals["packets"], bytes=vals["bytes"], last_used_ns=vals["last_used_ns"],
                             path=vals["path"], rule_of={i: f for f, i in self._ids.items()})

    @property
    def io(self) -> DeviceIO:
        return self._maps().io

    def expired(self) -> list[Expired]:
        """What the NIC aged out (hardware aging, ctctl.nic.aging); []
        while it does not age."""
        if self.ager is None:
            return []
        events = self.ager.drain()
        for ev in events:       # its entries are gone from the table
            for k in self._keys.pop(ev.conn_id, ()):
                if k is not None:
                    self._conn_of.pop(bytes(k), None)
            if self.caps.window:
                self._maps().delete_window(ev.conn_id)
        return events

    def flush_flows(self) -> list[tuple[bytes, EntryStats]]:
        """Take every entry out; each with its final counters."""
        out = []
        maps = self._maps()
        for k, _ in maps.flows():
            flow = maps.take_flow(k)
            self._forget(bytes(k))
            if flow is not None:
                out.append((bytes(k), self.entry_stats(flow)))
        return out

    def table(self) -> list[tuple[bytes, int, int, EntryStats]]:
        """Every entry as (key, conn id, direction, counters): what a
        controller taking over from one that died finds in the table."""
        return [(bytes(k), f.conn_id, f.dir, self.entry_stats(f)) for k, f in self._maps().flows()]

    def entries(self) -> list[dict]:
        """Every entry decoded (ctctl.nic.encode.entry_record), for
        listings: by connection, the original direction first."""
        return sorted((entry_record(k, f) for k, f in self._maps().flows()),
                      key=lambda r: (r["conn_id"], r["dir"] != "original"))

    @staticmethod
    def describe_key(key: bytes) -> str:
        """A key as conntrack prints a tuple, for messages."""
        return key_tuple(abi.Tuple.from_buffer_copy(key)).fields()
