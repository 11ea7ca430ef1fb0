"""The controller of one box: software's half of the data path.

It loads the program onto the box's ports, reads every punt, decides where
the packet goes and transmits it on the output port.  The decision is the
tc software path: the box's rules run by ctctl.pipeline with the conntrack
tracker; a box configured with a static port map instead is a plain
software switch.

It also serves the control socket and keeps the state file that lets
`ctctl unload` clean up after it.  Leaving run() -- normally, on an error,
or on SIGINT/SIGTERM -- detaches and unpins everything it set up.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import threading
import time
import traceback
from collections import Counter as Tally, deque
from dataclasses import asdict

from ctctl import abi, control
from ctctl.config import BoxConfig
from ctctl.conntrack import ConnTracker, format_conntrack, format_event
from ctctl.device import Device
from ctctl.offload import OffloadManager
from ctctl.packet import ParseError, complete_partial_checksum, parse
from ctctl.pipeline import Pipeline, Resume
from ctctl.rules import (AddCommand, MirredAction, RuleSet, RuleSyntaxError, execute, format_filter,
                         parse_command)
from ctctl import loader
from ctctl.loader import Datapath, LoadError
from ctctl.punts import Punt, PuntReader
from ctctl.transmit import Transmitter

POLL_MS = 100
# Punts that carry a resume point; the others (parse failures, a port
# without rules) start at chain 0.
RESUMABLE = {abi.Reason.CT_MISS, abi.Reason.CT_FLAGS, abi.Reason.TRAP, abi.Reason.NO_MATCH}
SWEEP_EVERY_S = 1.0   # conntrack's periodic sweep, besides lazy expiry on lookup


class Controller:
    def __init__(self, cfg: BoxConfig, clock=time.monotonic):
        self.cfg = cfg
        self.clock = clock
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
        self.csum_completed = 0    # checksums a sender left to its NIC (packet.py)
        self.tracker = ConnTracker(clock=clock)
        self.ruleset = RuleSet(cfg.rules) if cfg.rules is not None else None
        self.pipeline = Pipeline(self.ruleset, self.tracker, cfg.ports) if self.ruleset is not None else None
        self.device: Device | None = None
        self.offload: OffloadManager | None = None
        # The last events, conntrack -E style, with the offload decisions
        # between them: a connection's life as `ctctl events` shows it.
        self.events: deque[str] = deque(maxlen=4096)
        self.tracker.subscribe(lambda ev, conn: self.events.append(format_event(ev, conn, self.clock())))
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
            # Continue where the hardware stopped, with what it restored;
            # a packet it could not parse starts from the beginning.
            resume = Resume.from_punt(punt.hdr) if punt.hdr.reason in RESUMABLE else None
            try:
                with self.lock:
                    v = self.pipeline.process(pkt if pkt is not None else punt.frame, in_port, resume)
                    if self.offload is not None and v.cts:
                        self.offload.after_packet([c.result.conn for c in v.cts if c.result])
            except Exception as e:
                self._bug(e)
                return
            if v.kind != "output":
                self.drops[v.reason or v.kind] += 1
                return
            out, frame = v.output, v.packet.data
        try:
            self.transmitter.send(out, frame)
        except OSError as e:
            self.drops["tx_" + (errno.errorcode.get(e.errno, str(e.errno)).lower())] += 1
            return
        self.tx_pkts[out] += 1
        self.tx_bytes[out] += len(frame)

    def _bug(self, e: Exception) -> None:
        """A bug must cost one packet, not the box: count the drop by the
        exception's type, and log the first of each type."""
        key = "error_" + type(e).__name__
        if not self.drops[key]:
            traceback.print_exc(file=sys.stderr)
        self.drops[key] += 1

    # -- control ----------------------------------------------------------
    def stats(self) -> dict:
        prog = self.dp.counters() if self.dp else [0] * abi.COUNTER_MAX
        return {
            "box": self.cfg.name,
            "uptime_s": round(self.clock() - self.started, 3),
            "program": program_stats(prog),
            "software": {
                "received": sum(self.rx.values()),
                "ring_lost": self.reader.lost if self.reader else 0,
                "malformed_samples": self.reader.malformed if self.reader else 0,
                "by_reason": {abi.Reason(r).label: n for r, n in self.reasons.items()},
                "csum_completed": self.csum_completed,
                "drops": dict(self.drops),
            },
            "pipeline": dict(self.pipeline.counters) if self.pipeline else None,
            "conntrack": {"entries": len(self.tracker)},
            "offload": self.offload.stats() if self.offload else None,
            "ports": {
                p: {"rx_packets": self.rx[p], "rx_bytes": self.rx_bytes[p],
                    "tx_packets": self.tx_pkts[p], "tx_bytes": self.tx_bytes[p]}
                for p in self.cfg.ports
            },
        }

    def dispatch(self, req: dict) -> dict:
        op = req.get("op")
        if op == "stats":
            return {"stats": self.stats()}
        if op == "ping":
            return {"pid": os.getpid()}
        if op == "stop":
            self.stop_requested = True
            return {}
        if op == "filter":
            return self.filter_command(str(req.get("line", "")))
        if op == "conntrack":
            with self.lock:
                if self.offload:
                    self.offload.sync()
                now = self.clock()
                conns = self.tracker.entries()
                return {"lines": [format_conntrack(c, now) for c in conns], "ids": [c.id for c in conns]}
        if op == "offload":
            return self.offload_command(req)
        if op == "events":
            with self.lock:
                return {"lines": list(self.events)}
        if op == "dump-flows":
            from ctctl.dumpflows import dump_flows
            with self.lock:
                if self.offload:
                    self.offload.sync()
                return {"lines": dump_flows(self)}
        raise control.ControlError(f"unknown request {op!r} "
                                   "(stats, ping, stop, filter, conntrack, offload, events, dump-flows)")

    def offload_command(self, req: dict) -> dict:
        """List the hardware entries, or put a connection in or out by hand."""
        if self.offload is None:
            raise control.ControlError(f"box {self.cfg.name!r} has no offload (it runs `forward:`)")
        action = req.get("action", "list")
        with self.lock:
            if action == "list":
                self.offload.sync()
                return {"flows": [flow_record(k, f) for k, f in self.device.read_flows()],
                        "pending": [c.id for c in self.offload.pending]}
            conn = next((c for c in self.tracker.entries() if c.id == req.get("id")), None)
            if conn is None:
                raise control.ControlError(f"no connection with id {req.get('id')!r} (ctctl conntrack -L)")
            if action == "add":
                if conn.id in self.offload.hw:
                    raise control.ControlError(f"connection {conn.id} is already in hardware")
                if not self.offload.offload(conn):
                    raise control.ControlError(f"hardware table full: connection {conn.id} is pending")
                return {"added": conn.id}
            if action == "del":
                if conn.id not in self.offload.hw:
                    raise control.ControlError(f"connection {conn.id} is not in hardware")
                self.offload.remove(conn, "by_hand")
                return {"removed": conn.id}
        raise control.ControlError(f"offload: unknown action {action!r} (list, add, del)")

    def filter_command(self, line: str) -> dict:
        """One `filter add|del|show` line.  A refused line changes nothing:
        the reply carries the reason and the column."""
        if self.ruleset is None:
            raise control.ControlError(f"box {self.cfg.name!r} runs a static port map (forward:), "
                                       "not rules: give it `rules:` in its config")
        cmd = parse_command(line)   # RuleSyntaxError goes back to the caller as is
        if isinstance(cmd, AddCommand):
            f = cmd.filter
            for dev in [f.dev] + [a.dev for a in f.actions if isinstance(a, MirredAction)]:
                if dev not in self.cfg.ports:
                    col = line.find(f" {dev}") + 2 if f" {dev}" in line else None
                    raise RuleSyntaxError(f"dev {dev!r} is not a port of box {self.cfg.name!r} "
                                          f"(ports: {', '.join(self.cfg.ports)})", col, dev)
        with self.lock:
            out = execute(self.ruleset, line)
            if out.verb != "show" and self.device is not None:
                self.device.install(self.ruleset)   # ndo_setup_tc
        return {"verb": out.verb, "lines": out.lines,
                "filters": [format_filter(f) for f in out.filters]}

    # -- life cycle -------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        self.stop_requested = True

    def run(self, on_ready=None) -> None:
        name = self.cfg.name
        old = control.read_state(name)
        if old and control.pid_alive(old.get("pid")):
            raise LoadError(f"box {name!r} is already loaded by pid {old['pid']}")
        if old:
            raise LoadError(f"box {name!r} left state behind (pid {old.get('pid')} is gone): "
                            f"run `ctctl unload --name {name}` first")
        check_ports_free(name, self.cfg.netns, self.cfg.ports)
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        server = None
        try:
            with Datapath(name, self.cfg.netns, self.cfg.ports, self.cfg.hardware.table_size) as dp:
                self.dp = dp
                # Reader and sockets first: the first packet after attach
                # already finds someone listening.
                self.reader = PuntReader(dp.bpf, self.handle, page_cnt=self.cfg.perf_pages)
                self.transmitter = Transmitter(self.cfg.netns, self.cfg.ports)
                if self.ruleset is not None:
                    # The rules are in the hardware before its first packet.
                    self.device = Device(dp.bpf, dp.ifindexes(), self.cfg.hardware)
                    self.device.set_caps()
                    self.device.install(self.ruleset)
                    self.offload = OffloadManager(self.tracker, self.device, self.cfg.offload, self.clock,
                                                  notify=lambda t: self.events.append(f"   [HW] {t}"))
                try:
                    dp.attach()
                finally:
                    # Also after a partial attach: unload must find it.
                    control.write_state(name, {
                        "pid": os.getpid(), "netns": self.cfg.netns,
                        "attached": [asdict(a) for a in dp.attached],
                        "pin_dir": str(dp.pin_dir),
                    })
                self.port_by_ifindex = {a.ifindex: a.ifname for a in dp.attached}
                server = control.Server(name, self.dispatch)
                server.start()
                if on_ready:
                    on_ready()
                next_sweep = self.clock() + SWEEP_EVERY_S
                while not self.stop_requested:
                    self.reader.poll(POLL_MS)
                    if self.clock() >= next_sweep:
                        with self.lock:
                            if self.offload:
                                self.offload.sync()   # hardware last-used first: no early expiry
                            self.tracker.sweep()
                        next_sweep = self.clock() + SWEEP_EVERY_S
        finally:
            if server:
                server.close()
            if getattr(self, "transmitter", None):
                self.transmitter.close()
            self.dp = None
            control.remove_state(name)
            for s, h in previous.items():
                signal.signal(s, h)


def check_ports_free(name: str, netns_name: str, ports: list[str]) -> None:
    """Refuse, before anything is compiled or attached, to load a box on a
    port that already runs a ctctl program: a port runs one box, and the
    clean-up of a refused load must not touch the running one."""
    try:
        busy = loader.programs_on(netns_name, ports)
    except FileNotFoundError as e:    # netns.NoSuchNetns
        raise LoadError(str(e)) from None
    for port, handles in busy.items():
        for other in control.boxes():
            st = control.read_state(other) or {}
            if st.get("netns") != netns_name:
                continue
            if any(a.get("ifname") == port for a in st.get("attached", [])):
                pid = st.get("pid")
                how = (f"controller pid {pid}" if control.pid_alive(pid)
                       else f"its controller, pid {pid}, is gone")
                raise LoadError(f"port {port!r} of netns {netns_name!r} already runs box {other!r} "
                                f"({how}): a port runs one box; `ctctl unload --name {other}` first, "
                                f"or give box {name!r} other ports")
        hs = ", ".join(f"{h:#x}" for h in handles)
        raise LoadError(f"port {port!r} of netns {netns_name!r} already has a ctctl program "
                        f"(tc filter prio {loader.FILTER_PRIO} handle {hs}) that no loaded box claims; "
                        f"remove it with `ip netns exec {netns_name} tc filter del dev {port} ingress "
                        f"prio {loader.FILTER_PRIO}`")


def flow_record(key, flow) -> dict:
    """One hardware entry for `ctctl offload --json`."""
    import ipaddress

    n = 4 if key.l3 == 4 else 16
    addr = (lambda b: str(ipaddress.ip_address(bytes(b)[:n])))
    rec = {"zone": key.zone, "l3": key.l3, "proto": key.proto, "src": addr(key.src), "dst": addr(key.dst),
           "sport": int.from_bytes(key.sport.to_bytes(2, "little"), "big"),
           "dport": int.from_bytes(key.dport.to_bytes(2, "little"), "big"),
           "dir": "reply" if flow.dir else "original", "conn_id": flow.conn_id,
           "packets": flow.packets, "bytes": flow.bytes, "last_used_ns": flow.last_used_ns,
           "ct_state": int(flow.ct_state), "mark": flow.mark}
    if key.proto in (1, 58):   # the key carries the echo id and the (type, code) bytes
        rec.update(id=rec["sport"], type=rec["dport"] >> 8, code=rec["dport"] & 0xFF)
    if flow.nat & abi.Nat.SRC:
        rec["nat_src"] = f"{addr(flow.nat_src)}:{int.from_bytes(flow.nat_sport.to_bytes(2, 'little'), 'big')}"
    if flow.nat & abi.Nat.DST:
        rec["nat_dst"] = f"{addr(flow.nat_dst)}:{int.from_bytes(flow.nat_dport.to_bytes(2, 'little'), 'big')}"
    return rec


def program_stats(prog: list[int]) -> dict:
    """The program's counter array as the stats report names it."""
    return {
        "rx_packets": prog[abi.Counter.RX],
        "rx_bytes": prog[abi.Counter.RX_BYTES],
        "punted": prog[abi.Counter.PUNT],
        "perf_lost": prog[abi.Counter.PERF_LOST],
        "too_big": prog[abi.Counter.TOO_BIG],
        "ct_hits": prog[abi.Counter.CT_HIT],
        "redirected": prog[abi.Counter.REDIRECT],
        "dropped": prog[abi.Counter.DROP],
        "passed": prog[abi.Counter.PASS],
        "goto_loop": prog[abi.Counter.GOTO_LOOP],
        "nat": prog[abi.Counter.NAT],
        "punts_by_reason": {r.label: prog[r] for r in abi.Reason if r and prog[r]},
    }
