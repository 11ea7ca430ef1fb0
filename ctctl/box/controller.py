"""The controller of one box: it wires the NIC side (program, driver,
punts, transmit) to the kernel side (pipeline, tracker, flowtable) and
runs the per-packet loop: read every punt, continue it where the program
stopped, transmit the result on the output port.  A box configured with a
static port map instead is a plain software switch.

It also serves the control socket (ctctl.box.requests answers) and keeps
the state file that lets `ctctl unload` clean up after it, with the record
of its offloaded connections that lets the next controller adopt its
running program if it dies (ctctl.box.adopt).  Leaving run() -- normally,
on an error, or on SIGINT/SIGTERM -- detaches and unpins everything it set
up (or adopted).
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import threading
import time
import traceback
from collections import Counter as Tally
from dataclasses import asdict

from ctctl import abi
from ctctl.box import adopt, control, metrics, requests, state
from ctctl.box.config import BoxConfig
from ctctl.box.journal import Journal, replay
from ctctl.kernel.conntrack import ConnTracker, EventLog, tuple_of
from ctctl.kernel.csum import complete_partial_checksum
from ctctl.kernel.offload import OffloadManager
from ctctl.kernel.offload.fastpath import FastPath
from ctctl.kernel.packet import ParseError, parse
from ctctl.kernel.pipeline import Pipeline, Resume
from ctctl.nic import loader
from ctctl.nic.driver import Device
from ctctl.nic.loader import Datapath, LoadError
from ctctl.nic.ports import PortWatch
from ctctl.nic.punts import Punt, PuntReader
from ctctl.nic.transmit import Transmitter
from ctctl.rules import RuleSet

POLL_MS = 100
# Punts that carry a resume point; the others (parse failures, a port
# without rules) start at chain 0.  A ct action's punts for software to
# judge (an invalid packet, a window the NIC cannot track) resume at that
# ct: started over, a packet the program rewrote (NAT, pedit) would be
# rewritten twice.
RESUMABLE = {abi.Reason.CT_MISS, abi.Reason.CT_FLAGS, abi.Reason.TRAP, abi.Reason.NO_MATCH,
             abi.Reason.CT_INVALID, abi.Reason.CT_WINDOW, abi.Reason.ENCAP}
SWEEP_EVERY_S = 1.0   # conntrack's periodic sweep, besides lazy expiry on lookup
STOP_WAIT_S = 10.0    # how long a stopping box waits for a request in progress


class Controller:
    def __init__(self, cfg: BoxConfig, clock=time.monotonic, ktime=time.monotonic_ns):
        self.cfg = cfg
        self.clock = clock         # the tracker's and the flowtable's (seconds)
        self.ktime = ktime         # the program's (bpf_ktime_get_ns: CLOCK_MONOTONIC, ns)
        self.stop_requested = False
        self.dp: Datapath | None = None
        self.transmitter: Transmitter | None = None
        self.reader: PuntReader | None = None
        self.port_by_ifindex: dict[int, str] = {}
        self.started = clock()
        # Software's own counters, next to the program's.
        self.rx = Tally()          # punts received, per ingress port
        self.rx_bytes = Tally()
        self.tx_pkts = Tally()     # transmitted, per output port
        self.tx_bytes = Tally()
        self.drops = Tally()       # software drops, per cause
        self.reasons = Tally()     # punts received, per abi.Reason value
        self.csum_completed = 0    # checksums a sender left to its NIC (kernel/csum.py)
        self.tracker = ConnTracker(clock=clock)
        self.ruleset = RuleSet(cfg.rules) if cfg.rules is not None else None
        self.pipeline = (Pipeline(self.ruleset, self.tracker, cfg.ports, tunnels=cfg.tunnels)
                         if self.ruleset is not None else None)
        self.device: Device | None = None
        self.offload: OffloadManager | None = None
        self.metrics: metrics.Endpoint | None = None   # /metrics, when the config asks for it
        self.control_server: control.Server | None = None
        self.ports_gone: list[str] = []     # ports deleted under the running box
        self.recorder: adopt.Recorder | None = None   # the journal of its connections in hardware
        self.adopted: dict | None = None    # what was taken over from a controller that died
        # The last events, conntrack -E style, with the offload decisions
        # between them: a connection's life as `ctctl events` shows it.
        self.events = EventLog(maxlen=4096)
        self.tracker.subscribe(lambda ev, conn: self.events.record(ev, conn, self.clock()))
        # The control thread changes rules while the data path runs them.
        self.lock = threading.Lock()

    # -- the data path ----------------------------------------------------
    def handle(self, punt: Punt) -> None:
        """One punted packet: decide and transmit.  Never raises: a packet
        software cannot handle is dropped and counted."""
        in_port = self.port_by_ifindex.get(punt.hdr.ifindex)
        self.reasons[punt.hdr.reason] += 1   # named when stats are asked for
        if in_port is None:
            self.drops["unknown_port"] += 1
            return
        self.rx[in_port] += 1
        self.rx_bytes[in_port] += len(punt.frame)
        try:
            pkt = parse(punt.frame)
            if complete_partial_checksum(pkt):
                self.csum_completed += 1
        except ParseError:
            pkt = None    # the pipeline counts it; a static port map forwards it
        except Exception as e:
            self._bug(e)
            return
        if self.pipeline is None:
            out = self.cfg.forward.get(in_port)
            frame = pkt.data if pkt is not None else punt.frame
            if out is None:
                self.drops["no_route"] += 1
                return
        else:
            decided = self._through_rules(punt, pkt, in_port)
            if decided is None:
                return
            out, frame = decided
        try:
            self.transmitter.send(out, frame)
        except OSError as e:
            why = "tx_" + errno.errorcode.get(e.errno, str(e.errno)).lower()
            if not self.drops[why]:
                print(f"ctctl: sending on {out}: {e.strerror or e}; the packet is dropped "
                      f"(counted in stats as {why}; logged once)", file=sys.stderr, flush=True)
            self.drops[why] += 1
            return
        self.tx_pkts[out] += 1
        self.tx_bytes[out] += len(frame)

    def _through_rules(self, punt: Punt, pkt, in_port: str):
        """(output port, frame) for a punted packet, or None when it is
        dropped (counted): the soft list's fast path when it knows the
        packet, else the tc software path, continued where the hardware
        stopped, with what it restored (a packet it could not parse starts
        from the beginning)."""
        resumable = punt.hdr.reason in RESUMABLE
        resume = Resume.from_punt(punt.hdr) if resumable else None
        # Decapsulated by the program: the tunnel device's packet, with its
        # metadata, never decapsulated again; the VTEP learned as it was.
        in_dev, tunnel = in_port, punt.tunnel()
        if punt.decapsulated:
            t = self.pipeline.tunnel_of_port.get(in_port)
            if t is None:
                self.drops["decap_no_tunnel"] += 1
                return None
            in_dev = t.name
            addr, mac = punt.vtep()
            t.neighbors[addr] = mac
        try:
            with self.lock:
                fkey = None
                if (self.offload is not None and self.offload.soft and pkt is not None and resumable
                        and tunnel is None):    # a shortcut replays no tunnel
                    fkey = FastPath.key(in_dev, punt.hdr, pkt)
                    if fkey is not None:
                        sc = self.offload.fast_forward(fkey, pkt)
                        if sc is not None:
                            return sc.output, pkt.data
                before = tuple_of(pkt, 0) if fkey is not None else None
                if self.offload is not None:
                    self.offload.windows.punted_ns = punt.hdr.tstamp_ns
                v = self.pipeline.process(pkt if pkt is not None else punt.frame, in_dev, resume, tunnel)
                if self.offload is not None and v.cts:
                    last = v.cts[-1].result
                    if last is not None and last.conn is not None:
                        # Its flow belongs to the rules it ran (the resumed one too).
                        self.offload.owners.ran(last.conn, 1 if last.reply else 0, [s.filter for s in v.trace])
                    conns = [c.result.conn for c in v.cts if c.result]
                    # Connections already in hardware: their record is written again after
                    # the packet (one that goes in now is written by its offload's event).
                    in_hw = [c for c in conns if c is not None and c.id in self.offload.hw]
                    self.offload.after_packet(conns, forwarded=v.kind == "output")
                    if in_hw and self.recorder is not None:
                        self.recorder.touched(in_hw)
                    # A shortcut replays NAT only: not a packet pedit, csum or a tunnel changed.
                    if fkey is not None and v.kind == "output" and not v.rewritten:
                        self.offload.learn(fkey, before, v, self.ruleset.stats)
        except Exception as e:
            self._bug(e)
            return None
        if v.kind != "output":
            self.drops[v.reason or v.kind] += 1
            return None
        return v.output, v.packet.data

    def _check_ports(self, watch: PortWatch) -> None:
        """A port deleted under the box (or its namespace): said once; then
        the box goes on with the others (`port_lost: keep`, what is sent
        there is dropped and counted), or stops and detaches everything
        (`port_lost: stop`)."""
        gone = [p for p in watch.missing() if p not in self.ports_gone]
        if not gone:
            return
        self.ports_gone += gone
        stop = self.cfg.port_lost == "stop"
        print(f"ctctl: port {', '.join(gone)} of netns {self.cfg.netns} is gone; "
              + ("stopping the box (port_lost: stop)" if stop else
                 "the box goes on with the others (port_lost: keep): what goes there is dropped and counted"),
              file=sys.stderr, flush=True)
        if stop:
            self.stop_requested = True

    def _bug(self, e: Exception) -> None:
        """A bug must cost one packet, not the box: count the drop by the
        exception's type, and log the first of each type."""
        key = "error_" + type(e).__name__
        if not self.drops[key]:
            traceback.print_exc(file=sys.stderr)
        self.drops[key] += 1

    # -- control ----------------------------------------------------------
    def dispatch(self, req: dict) -> dict:
        return requests.dispatch(self, req)

    # -- life cycle -------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        self.stop_requested = True

    def save_state(self) -> None:
        """The state file: what `ctctl unload` removes after a crash, and
        what the next controller adopts (ctctl.box.adopt); again after
        every rule change."""
        dp = self.dp
        state.write_state(self.cfg.name, {
            "pid": os.getpid(), "netns": self.cfg.netns,
            "attached": [asdict(a) for a in dp.attached], "pin_dir": str(dp.pin_dir),
            "program": loader.program_id(dp.cflags),
            "rules": adopt.rules_state(self.ruleset, self.device) if self.ruleset is not None else None,
        })

    def run(self, on_ready=None, fresh: bool = False) -> None:
        """Load the box and run it until stopped.  A box whose controller
        died is adopted (ctctl.box.adopt), unless `fresh`."""
        name = self.cfg.name
        old = state.read_state(name)
        if old and state.pid_alive(old.get("pid")):
            raise LoadError(f"box {name!r} is already loaded by pid {old['pid']}")
        cflags = self.cfg.hardware.cflags() + loader.hook_cflags(self.cfg.attach)
        if old and fresh:
            raise LoadError(f"box {name!r} left state behind (pid {old.get('pid')} is gone): "
                            f"run `ctctl unload --name {name}` first (without --fresh, "
                            "`ctctl load` adopts its running program)")
        if old:
            attached = adopt.check(old, name, self.cfg.netns, self.cfg.ports, loader.program_id(cflags),
                                   has_rules=self.ruleset is not None)
            dp = Datapath.adopting(name, self.cfg.netns, self.cfg.ports, cflags, attached)
        else:
            check_ports_free(name, self.cfg.netns, self.cfg.ports, self.cfg.attach)
            dp = Datapath(name, self.cfg.netns, self.cfg.ports, cflags)
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        server = watch = None
        locked = False
        owned = not old     # the state file is ours to remove (an adoption that fails leaves it)
        try:
            with dp:
                self.dp = dp
                # Reader and sockets first: the first packet after attach
                # already finds someone listening.
                self.reader = PuntReader(dp.bpf, self.handle, page_cnt=self.cfg.perf_pages)
                self.transmitter = Transmitter(self.cfg.netns, self.cfg.ports)
                if self.ruleset is not None:
                    self._start_offload(old)
                if old:
                    dp.take_over()
                    owned = True
                    self.save_state()
                else:
                    try:
                        dp.attach()
                    finally:
                        # Also after a partial attach: unload must find it.
                        self.save_state()
                self.port_by_ifindex = {a.ifindex: a.ifname for a in dp.attached}
                server = self.control_server = control.Server(name, self.dispatch)
                server.start()
                if self.cfg.metrics is not None and self.cfg.metrics.enabled:
                    self.metrics = metrics.Endpoint(self.cfg.metrics, lambda: requests.stats(self, {})["stats"])
                if on_ready:
                    on_ready()
                next_sweep = next_port_check = self.clock() + SWEEP_EVERY_S
                watch = PortWatch(self.cfg.netns, self.cfg.ports)
                try:
                    while not self.stop_requested:
                        self.reader.poll(POLL_MS)
                        with self.lock:
                            if self.offload:
                                self.offload.tick()      # the aging mode looks at what is due
                            if self.clock() >= next_sweep:
                                self.tracker.sweep()     # what is not in hardware
                                next_sweep = self.clock() + SWEEP_EVERY_S
                        if self.clock() >= next_port_check:
                            self._check_ports(watch)
                            next_port_check = self.clock() + SWEEP_EVERY_S
                finally:
                    # A request still running (a flush taking entries out of the
                    # maps, say) finishes before the maps go; a stuck one does not
                    # keep the box from stopping.
                    locked = self.lock.acquire(timeout=STOP_WAIT_S)
        finally:
            if watch is not None:
                watch.close()
            if self.offload:
                self.offload.close()                 # the NIC's aging timer, before its program goes
            if server:
                server.close()
            if self.metrics:
                self.metrics.close()
            if getattr(self, "transmitter", None):
                self.transmitter.close()
            if self.recorder is not None:
                self.recorder.journal.close()
            self.dp = None
            if owned:
                state.remove_state(name)
            for s, h in previous.items():
                signal.signal(s, h)
            if locked:
                self.lock.release()

    def _start_offload(self, old: dict | None) -> None:
        """The driver, its rules in the hardware before its first packet,
        the flowtable and its journal; with `old` (a dead controller's
        state), its rules, ids and connections taken over."""
        records = {}
        if old:
            filters, ids = adopt.rules(old)
            self.ruleset = RuleSet(filters)
            self.pipeline = Pipeline(self.ruleset, self.tracker, self.cfg.ports, tunnels=self.cfg.tunnels)
            records, unreadable = replay(state.journal_path(self.cfg.name))
        self.device = Device(self.dp.maps, self.dp.ifindexes(), self.cfg.hardware, ktime=self.ktime,
                             tunnels=self.cfg.tunnels)
        for t in self.cfg.tunnels:      # the outer source MAC of what it encapsulates
            t.mac = self.dp.mac(t.port)
        if old:
            self.device.adopt_ids(ids)
        self.device.set_caps()
        self.device.install(self.ruleset)
        self.offload = OffloadManager(self.tracker, self.device, self.cfg.offload,
                                      clock=self.clock, ktime=self.ktime,
                                      notify=lambda t: self.events.append(f"   [HW] {t}"),
                                      aging=self.cfg.aging, eviction=self.cfg.eviction,
                                      insert_rate=self.cfg.hardware.insert_rate)
        if old:
            self.adopted = {"pid": old.get("pid"), "unreadable_lines": unreadable,
                            **adopt.connections(records, self.offload, self.device, self.ktime())}
            self.events.append(f"   [HW] adopted the program of pid {old.get('pid')}: "
                               f"{self.adopted['adopted']} connection(s) in hardware")
        # A new journal, the adopted connections in it from the start (one
        # rename: the old journal until then).
        adopted = {cid: adopt.record(hc, self.offload.owners, self.device.rule_id)
                   for cid, hc in self.offload.hw.items()}
        self.recorder = adopt.Recorder(Journal(state.journal_path(self.cfg.name), records=adopted),
                                       self.offload, self.device.rule_id)


def check_ports_free(name: str, netns_name: str, ports: list[str], hook: str = "tc") -> None:
    """Refuse, before anything is compiled or attached, to load a box on a
    port that already runs a ctctl program (or, at XDP, any XDP program):
    a port runs one box, and the clean-up of a refused load must not touch
    the running one."""
    try:
        busy = loader.programs_on(netns_name, ports)
        on_xdp = loader.xdp_programs_on(netns_name, ports)
    except FileNotFoundError as e:    # netns.NoSuchNetns
        raise LoadError(str(e)) from None
    for port in on_xdp:
        busy.setdefault(port, [])
    for port, handles in busy.items():
        owner = state.port_owner(netns_name, port)
        if owner is not None:
            other, st = owner
            pid = st.get("pid")
            how = (f"controller pid {pid}" if state.pid_alive(pid)
                   else f"its controller, pid {pid}, is gone")
            raise LoadError(f"port {port!r} of netns {netns_name!r} already runs box {other!r} "
                            f"({how}): a port runs one box; `ctctl unload --name {other}` first, "
                            f"or give box {name!r} other ports")
        if not handles:
            if hook != "xdp":
                continue    # someone's XDP program: a TC box runs after it
            raise LoadError(f"port {port!r} of netns {netns_name!r} already has an XDP program "
                            f"(id {on_xdp[port]}) that no loaded box claims: a port runs one at XDP; "
                            f"`ip netns exec {netns_name} ip link set dev {port} xdp off` removes it, "
                            "or load the box with attach: tc")
        hs = ", ".join(f"{h:#x}" for h in handles)
        raise LoadError(f"port {port!r} of netns {netns_name!r} already has a ctctl program "
                        f"(tc filter prio {loader.FILTER_PRIO} handle {hs}) that no loaded box claims; "
                        f"remove it with `ip netns exec {netns_name} tc filter del dev {port} ingress "
                        f"prio {loader.FILTER_PRIO}`")
