"""The controller of one box: software's half of the data path.

It loads the program onto the box's ports, reads every punt, decides where
the packet goes and transmits it on the output port.  In this version the
decision is a static port map (the box is a software switch); the rule
pipeline and conntrack take that place as they arrive.

It also serves the control socket and keeps the state file that lets
`ctctl unload` clean up after it.  Leaving run() -- normally, on an error,
or on SIGINT/SIGTERM -- detaches and unpins everything it set up.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from collections import Counter as Tally
from dataclasses import asdict

from ctctl import abi, control
from ctctl.config import BoxConfig
from ctctl.loader import Datapath, LoadError
from ctctl.punts import Punt, PuntReader
from ctctl.transmit import Transmitter

POLL_MS = 100


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
        self.reasons = Tally()     # punts received, per reason

    # -- the data path ----------------------------------------------------
    def handle(self, punt: Punt) -> None:
        """One punted packet: decide and transmit.  Never raises: a packet
        software cannot handle is dropped and counted."""
        in_port = self.port_by_ifindex.get(punt.hdr.ifindex)
        reason = abi.Reason(punt.hdr.reason).label
        self.reasons[reason] += 1
        if in_port is None:
            self.drops["unknown_port"] += 1
            return
        self.rx[in_port] += 1
        self.rx_bytes[in_port] += len(punt.frame)
        out = self.cfg.forward.get(in_port)
        if out is None:
            self.drops["no_route"] += 1
            return
        try:
            self.transmitter.send(out, punt.frame)
        except OSError as e:
            self.drops["tx_" + (errno.errorcode.get(e.errno, str(e.errno)).lower())] += 1
            return
        self.tx_pkts[out] += 1
        self.tx_bytes[out] += len(punt.frame)

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
                "by_reason": dict(self.reasons),
                "drops": dict(self.drops),
            },
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
        raise control.ControlError(f"unknown request {op!r} (stats, ping, stop)")

    # -- life cycle -------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        self.stop_requested = True

    def run(self, on_ready=None) -> None:
        name = self.cfg.name
        old = control.read_state(name)
        if old and _alive(old.get("pid")):
            raise LoadError(f"box {name!r} is already loaded by pid {old['pid']}")
        if old:
            raise LoadError(f"box {name!r} left state behind (pid {old.get('pid')} is gone): "
                            f"run `ctctl unload --name {name}` first")
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        server = None
        try:
            with Datapath(name, self.cfg.netns, self.cfg.ports) as dp:
                self.dp = dp
                # Reader and sockets first: the first packet after attach
                # already finds someone listening.
                self.reader = PuntReader(dp.bpf, self.handle, page_cnt=self.cfg.perf_pages)
                self.transmitter = Transmitter(self.cfg.netns, self.cfg.ports)
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
                while not self.stop_requested:
                    self.reader.poll(POLL_MS)
        finally:
            if server:
                server.close()
            if getattr(self, "transmitter", None):
                self.transmitter.close()
            self.dp = None
            control.remove_state(name)
            for s, h in previous.items():
                signal.signal(s, h)


def program_stats(prog: list[int]) -> dict:
    """The program's counter array as the stats report names it."""
    return {
        "rx_packets": prog[abi.Counter.RX],
        "rx_bytes": prog[abi.Counter.RX_BYTES],
        "punted": prog[abi.Counter.PUNT],
        "perf_lost": prog[abi.Counter.PERF_LOST],
        "too_big": prog[abi.Counter.TOO_BIG],
        "punts_by_reason": {r.label: prog[r] for r in abi.Reason if r and prog[r]},
    }


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
