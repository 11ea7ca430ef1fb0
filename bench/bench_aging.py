#!/usr/bin/env python3
"""The cost of aging a full offload table, the three modes of
ctctl.kernel.offload.aging measured on the real program's maps:

  full      one pass of nf_flowtable's way: read every entry (a batch walk
            of the flows map) and look at every connection in hardware
  sample    one tick of the proposal's sampling for each k: the entries of
            the connections of part t mod 2^k, read one lookup each; entries
            read against N/2^k
  hardware  the NIC's own aging pass (bpf ctctl_age run by the driver's
            firmware timer, BPF_PROG_TEST_RUN repeat = the connection
            contexts in use) over the whole table, and what software did
            for it: no table read, only the expiry events drained from the
            ring buffer

The table is filled with --entries entries (two per connection: UDP
connections set up through the tracker with real frames, offloaded by the
OffloadManager through the driver into the flows map).  Some connections
are idle past the offload timeout so that each pass has something to
expire; the counts are checked.  Wall times are time.perf_counter; entries
read and syscalls are the driver's DeviceIO counters (what the modes are
compared by).  The maps' memory is the kernel's own figure (memlock in
/proc/self/fdinfo of each map).

Needs root and BCC (one compile of bpf/ctctl.c with the table sized to
--entries).  The default (1,000,000 entries) takes about 3 minutes and
2 GB of memory, most of both the fill.

examples:
  sudo .venv/bin/python bench/bench_aging.py
  sudo .venv/bin/python bench/bench_aging.py --entries 100000 --k 6,8,10
  sudo .venv/bin/python bench/bench_aging.py --profile      # cProfile of the full pass
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import functools
import io
import json
import operator
import os
import pstats
import random
import resource
import shlex
import statistics
import struct
import sys
import time
from pathlib import Path

from common import RESULTS, ROOT, machine  # noqa: E402  (bench/ is the script's own directory)
sys.path.insert(0, str(ROOT))

from ctctl import abi  # noqa: E402
from ctctl.kernel.conntrack import ConnTracker  # noqa: E402
from ctctl.kernel.csum import checksum  # noqa: E402
from ctctl.kernel.offload import OffloadManager, OffloadPolicy  # noqa: E402
from ctctl.kernel.offload.aging import AgingConfig, ByConnection, gc_paused  # noqa: E402
from ctctl.kernel.packet import parse  # noqa: E402
from ctctl.nic.caps import HwCaps  # noqa: E402
from ctctl.nic.driver import Device  # noqa: E402
from ctctl.nic.loader import compile_program  # noqa: E402
from ctctl.nic.maps import Maps  # noqa: E402

SERVER = bytes([192, 0, 2, 2])
ETH_OUT = b"\x02\0\0\0\0\x02\x02\0\0\0\0\x01\x08\x00"
ETH_BACK = b"\x02\0\0\0\0\x01\x02\0\0\0\0\x02\x08\x00"


class Clock:
    """The tracker's and the flowtable's clock (seconds), and the flowtable's
    view of the device clock (ns), moved by hand: the bench's timeline
    (offload times, passes) is set, not waited for.  It starts at the real
    CLOCK_MONOTONIC, which the program's bpf_ktime_get_ns also reads, so
    that hits written into entries and the NIC's own pass (real time) agree
    with it.

    Reading it costs what time.monotonic() costs in a real box (one C
    call): `now` and `ns` are partial(getitem) on a one-item list, not
    Python methods, which would add a third of a microsecond to each
    connection a pass looks at (the manager reads both clocks per look)."""

    def __init__(self):
        self.base = time.monotonic()
        self._s, self._ns = [0.0], [0]
        self.now = functools.partial(operator.getitem, self._s, 0)
        self.ns = functools.partial(operator.getitem, self._ns, 0)
        self._set(self.base)

    def _set(self, t: float) -> None:
        self._s[0] = t
        self._ns[0] = int(round(t * 1e9))

    def at(self, offset_s: float) -> None:
        self._set(self.base + offset_s)

    def advance(self, dt_s: float) -> None:
        # Added, not recomputed from base: a mode's next tick is "now +
        # period" in the same float arithmetic, so it is due exactly.
        self._set(self._s[0] + dt_s)


def udp_frame(eth: bytes, src: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> bytearray:
    """Ethernet/IPv4/UDP, built without scapy (scapy would take longer than
    the tracker).  UDP checksum 0: none, valid for IPv4."""
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, 17, 0, src, dst)
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return bytearray(eth + ip + udp)


def client_of(i: int) -> tuple[bytes, int]:
    """Connection i's client: 10.0.0.0/8 holds 16M addresses, one each."""
    return bytes([10, (i >> 16) & 0xFF, (i >> 8) & 0xFF, i & 0xFF]), 1024 + i % 60000


class Progress:
    def __init__(self, what: str, total: int, every: float = 5.0):
        self.what, self.total, self.every = what, total, every
        self.t0 = self.last = time.perf_counter()

    def __call__(self, done: int) -> None:
        now = time.perf_counter()
        if now - self.last < self.every and done != self.total:
            return
        self.last = now
        rate = done / max(now - self.t0, 1e-9)
        eta = (self.total - done) / rate if rate else 0
        print(f"    {self.what}: {done:,}/{self.total:,}  {rate:,.0f}/s  eta {eta:.0f} s", flush=True)


# -- the box under test -----------------------------------------------------------

class Box:
    def __init__(self, entries: int, timeout_s: float):
        self.caps = HwCaps(table_size=entries)
        t0 = time.perf_counter()
        self.bpf = compile_program(self.caps.cflags())
        self.compile_s = time.perf_counter() - t0
        self.dev = Device(Maps(self.bpf), {"lo": 1}, self.caps)
        self.dev.set_caps()
        self.clock = Clock()
        self.tracker = ConnTracker(clock=self.clock.now)
        # udp=replied: a connection goes to hardware on its first reply, so
        # two packets set one up.  The manager starts in full mode with a
        # pass due in an hour: nothing runs until the bench says so.
        self.policy = OffloadPolicy(udp="replied", udp_timeout=timeout_s)
        self.mgr = OffloadManager(self.tracker, self.dev, self.policy, clock=self.clock.now, ktime=self.clock.ns,
                                  aging=AgingConfig(mode="full", interval=3600.0))
        self.made = 0

    def connect(self, n: int, progress: Progress | None = None, done0: int = 0) -> list:
        """n new UDP connections, request and reply through the tracker as
        the controller does it, each offloaded by the manager (both entries
        written into the flows map)."""
        conns = []
        tr, mgr = self.tracker, self.mgr
        for j in range(n):
            i = self.made
            self.made += 1
            cip, cport = client_of(i)
            q = udp_frame(ETH_OUT, cip, SERVER, cport, 53, b"q")
            a = udp_frame(ETH_BACK, SERVER, cip, 53, cport, b"a")
            r = tr.ct(parse(q), commit=True)
            mgr.after_packet([r.conn])
            r = tr.ct(parse(a), commit=True)
            mgr.after_packet([r.conn])
            conns.append(r.conn)
            if progress is not None and ((j & 0x3FFF) == 0x3FFF or j == n - 1):
                progress(done0 + j + 1)
        return conns

    def hit(self, conns, ago_s: float, packets: int = 3, progress: Progress | None = None) -> None:
        """What the program leaves in both entries of these connections
        after `packets` packets, the last `ago_s` ago (real device time), as
        tests/bpf/test_nic_aging.py writes it: the hardware's counters."""
        when = time.monotonic_ns() - int(ago_s * 1e9)
        maps = self.dev.maps
        for j, c in enumerate(conns):
            for key in self.mgr.hw[c.id].keys:
                k = abi.Tuple.from_buffer_copy(key)
                f = maps.read_flow(k)
                f.packets, f.bytes, f.last_used_ns = packets, 60 * packets, when
                maps.insert_flow(k, f, replace=True)
            if progress is not None and ((j & 0x3FFF) == 0x3FFF or j == len(conns) - 1):
                progress(j + 1)

    def counter(self, c: abi.Counter) -> int:
        return self.dev.maps.counters()[c]

    def close(self) -> None:
        self.mgr.close()
        self.bpf.cleanup()


def map_memory(bpf) -> list[dict]:
    """Each map of the program: its kind, max_entries and the memory the
    kernel charges for it (memlock in fdinfo, bytes)."""
    out = []
    for name in abi.MAPS:
        try:
            fd = bpf[name.encode()].map_fd
        except KeyError:
            continue
        info = {}
        for line in open(f"/proc/self/fdinfo/{fd}"):
            k, _, v = line.partition(":")
            info[k.strip()] = v.strip()
        out.append({"map": name, "type": int(info.get("map_type", -1)),
                    "max_entries": int(info.get("max_entries", 0)),
                    "key_size": int(info.get("key_size", 0)), "value_size": int(info.get("value_size", 0)),
                    "memlock_bytes": int(info.get("memlock", 0))})
    return out


def io_now(box: Box) -> tuple[int, int]:
    io_ = box.dev.io
    return io_.syscalls, io_.entries_read


def cost_delta(box: Box, before) -> dict:
    s, e = io_now(box)
    return {"syscalls": s - before[0], "entries_read": e - before[1]}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- the three modes ----------------------------------------------------------------

def measure_hardware(box: Box, idle_hw: list, say) -> dict:
    """Switch the NIC's aging on (every connection gets a context), run its
    pass until it finds nothing more, draining the events with the
    manager's tick in between, as its timer and the controller's loop do.
    Then a pass over the same table with nothing to expire."""
    mgr, dev = box.mgr, box.dev
    t0 = time.perf_counter()
    mgr.set_aging(AgingConfig(mode="hardware", hw_interval=3600.0))   # the timer never fires: passes by hand
    switch_on_s = time.perf_counter() - t0
    say(f"    hardware aging on: {len(mgr.hw):,} connection contexts written in {switch_on_s:.1f} s")
    aged0, lost0 = box.counter(abi.Counter.AGED), box.counter(abi.Counter.AGING_LOST)
    hw_before = len(mgr.hw)
    passes = []
    for n in range(10):
        ager = dev.ager
        io0, ns0 = io_now(box), ager.pass_ns
        t0 = time.perf_counter()
        slots = ager.run_pass()
        pass_s = time.perf_counter() - t0
        prog_ns = ager.pass_ns - ns0
        io_pass = cost_delta(box, io0)
        io0 = io_now(box)
        cost0 = (mgr.aging.cost.events, mgr.aging.cost.expired)
        cpu0 = time.thread_time()
        t0 = time.perf_counter()
        mgr.tick()                     # drain the ring: hardware_expired() for each event
        tick_s = time.perf_counter() - t0
        p = {"pass": n + 1, "slots_run": slots, "pass_wall_s": round(pass_s, 4),
             "program_s": round(prog_ns / 1e9, 4), "software_during_pass": io_pass,
             "events": mgr.aging.cost.events - cost0[0], "expired": mgr.aging.cost.expired - cost0[1],
             "drain_tick_wall_s": round(tick_s, 4), "drain_tick_cpu_s": round(time.thread_time() - cpu0, 4),
             "software_during_drain": cost_delta(box, io0)}
        passes.append(p)
        say(f"    NIC pass {n + 1}: {slots:,} contexts in {pass_s:.3f} s (program {prog_ns / 1e9:.3f} s), "
            f"{p['events']:,} expiry events, drained in {tick_s:.3f} s; software read "
            f"{p['software_during_drain']['entries_read']} entries")
        if p["events"] == 0:
            break
    left = [c for c in idle_hw if c.id in mgr.hw]
    res = {
        "switch_on_s": round(switch_on_s, 2),
        "passes": passes,
        "idle_connections": len(idle_hw),
        "expired_total": sum(p["expired"] for p in passes),
        "idle_left_in_hardware": len(left),
        "busy_expired": hw_before - len(mgr.hw) - (len(idle_hw) - len(left)),
        "program_counter_aged": box.counter(abi.Counter.AGED) - aged0,
        "program_counter_aging_lost": box.counter(abi.Counter.AGING_LOST) - lost0,
        "cost": dict(vars(mgr.aging.cost)),
        "staleness": mgr.aging.staleness.summary(),
    }
    t0 = time.perf_counter()
    mgr.set_aging(AgingConfig(mode="full", interval=3600.0))      # contexts freed again
    res["switch_off_s"] = round(time.perf_counter() - t0, 2)
    return res


def measure_full(box: Box, idle: list, busy: list, at_s: float, profile: bool, say) -> list[dict]:
    """Three full passes of one full mode, as its timer runs them: the
    first after the mode is set (every connection new to it: all looked at
    and folded; the idle ones past their deadline expire), the second with
    nothing counted since (a quiet table), the third after 1 % of the busy
    connections counted packets (a table under light traffic)."""
    mgr = box.mgr
    # What the read alone costs (outside the passes' counts): the kernel's
    # batch walk copying the table out, then the same walk viewed as
    # columns and grouped by connection in numpy.
    io0 = io_now(box)
    t0 = time.perf_counter()
    box.dev.maps._walk_flows()
    walk_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    n_read = len(ByConnection(box.dev.read_table()).ids)
    read_s = time.perf_counter() - t0
    box.dev.io.syscalls, box.dev.io.entries_read = io0
    say(f"    the read alone: kernel batch walk {walk_s:.3f} s; walk and grouping by connection "
        f"({n_read:,} connections) {read_s:.3f} s")
    out = [{"read_only": True, "kernel_walk_s": round(walk_s, 3), "walk_and_group_s": round(read_s, 3),
            "connections": n_read}]
    mgr.set_aging(AgingConfig(mode="full", interval=1.0))
    moved = busy[: max(1, len(busy) // 100)]
    for n, t in enumerate((at_s, at_s + 1.0, at_s + 2.0)):
        if n == 2:
            box.hit(moved, 0.0, packets=5)
        box.clock.at(t)
        mgr.aging.next = box.clock.now()      # due now
        entries = 2 * len(mgr.hw)
        io0, hw0 = io_now(box), len(mgr.hw)
        looked0, expired0 = mgr.aging.cost.looked, mgr.aging.cost.expired
        prof = cProfile.Profile() if profile and n == 0 else None
        cpu0 = time.thread_time()
        t0 = time.perf_counter()
        if prof:
            prof.enable()
        mgr.tick()
        if prof:
            prof.disable()
        wall = time.perf_counter() - t0
        cost = mgr.aging.cost
        r = {"pass": n + 1, "connections": hw0, "entries_in_table": entries, "wall_s": round(wall, 3),
             "cpu_s": round(time.thread_time() - cpu0, 3), "looked": cost.looked - looked0,
             "expired": cost.expired - expired0, **cost_delta(box, io0)}
        if n == 0:
            left = sum(1 for c in idle if c.id in mgr.hw)
            r["idle_connections"], r["idle_left_in_hardware"] = len(idle), left
        if n == 2:
            r["moved"] = len(moved)
            r["moved_folded"] = all(c.packets == [1 + 5, 1 + 5] for c in moved)
        if prof:
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(18)
            r["profile_top"] = s.getvalue()
            say(s.getvalue())
        say(f"    full pass {n + 1}: {hw0:,} connections ({entries:,} entries) in {wall:.3f} s; "
            f"read {r['entries_read']:,} entries in {r['syscalls']:,} syscalls, looked at {r['looked']:,}, "
            f"expired {r['expired']:,}")
        out.append(r)
    return out


def measure_sample(box: Box, ks: list[int], idle: list, start_s: float, period_s: float, ticks: int,
                   say) -> list[dict]:
    """For each k a fresh sampling mode (as `aging set` makes it) and
    `ticks` consecutive ticks of its UDP lane (parts 0, 1, ...).  Larger k
    first: part 0 of a smaller k contains part 0 of a larger one, so going
    the other way the larger k would find its idle connections already
    expired."""
    mgr = box.mgr
    idle_ids = {c.id for c in idle}
    out = []
    box.clock.at(start_s)
    for k in sorted(ks, reverse=True):
        mgr.set_aging(AgingConfig(mode="sample", k=k, period={"tcp": period_s, "udp": period_s,
                                                               "icmp": period_s}))
        parts = 1 << k
        rows = []
        for tick in range(ticks):
            box.clock.advance(period_s)
            part = tick % parts
            in_part = [cid for cid in mgr.hw if cid % parts == part]
            expect_expired = sum(1 for cid in in_part if cid in idle_ids)
            entries = 2 * len(mgr.hw)
            c0 = dict(vars(mgr.aging.cost))
            io0 = io_now(box)
            t0 = time.perf_counter()
            mgr.tick()
            wall = time.perf_counter() - t0
            c1 = vars(mgr.aging.cost)
            d = cost_delta(box, io0)
            nominal = entries / parts
            r = {"k": k, "tick": tick + 1, "part": part, "entries_in_table": entries,
                 "n_over_2k": round(nominal, 1), "connections_in_part": len(in_part),
                 "looked": c1["looked"] - c0["looked"], "expired": c1["expired"] - c0["expired"],
                 "expected_expired": expect_expired, **d,
                 "entries_read_over_n_2k": round(d["entries_read"] / nominal, 3),
                 "lanes_ticked": c1["ticks"] - c0["ticks"],
                 "wall_s": round(wall, 5), "cpu_s": round(c1["cpu_s"] - c0["cpu_s"], 5)}
            rows.append(r)
            say(f"    k={k} tick {tick + 1}: looked {r['looked']:,} of part {part}, read {d['entries_read']:,} "
                f"entries (N/2^k = {nominal:,.0f}, x{r['entries_read_over_n_2k']}), expired {r['expired']} "
                f"(expected {expect_expired}), {wall * 1e3:.1f} ms")
        out.append({"k": k, "ticks": rows,
                    "median_wall_s": round(statistics.median(r["wall_s"] for r in rows), 5),
                    "median_entries_read": statistics.median(r["entries_read"] for r in rows),
                    "median_ratio": statistics.median(r["entries_read_over_n_2k"] for r in rows)})
    out.sort(key=lambda x: ks.index(x["k"]))
    return out


# -- report ---------------------------------------------------------------------------

def random_access_ns(n: int = 1_000_000) -> float:
    """What one dict lookup at a random key of a million costs here, in
    ns: the pass's per-connection work is such lookups and the objects
    they lead to, so on a machine whose memory is slow (a VM under nested
    paging) the pass is slow in proportion."""
    d = {os.urandom(40): i for i in range(n)}
    keys = list(d)[: n // 2]
    random.Random(1).shuffle(keys)
    get = d.get
    with gc_paused():
        t0 = time.perf_counter()
        for k in keys:
            get(k)
        return round((time.perf_counter() - t0) / len(keys) * 1e9, 1)


def table(doc: dict) -> str:
    lines = [f"{'measurement':34} {'wall s':>9} {'entries read':>13} {'syscalls':>9} {'expired':>8}  note",
             "-" * 100]
    notes = {1: "the mode's first pass: every connection looked at and folded; idle ones expire",
             2: "nothing counted since: only the never-hit ones looked at",
             3: "1 % of the connections counted since: those looked at and folded"}
    for r in doc["full"]:
        note = notes[r["pass"]] + f" ({r['looked']:,} looked at)"
        lines.append(f"{'full pass %d (%s conns)' % (r['pass'], format(r['connections'], ',')):34} "
                     f"{r['wall_s']:>9.3f} {r['entries_read']:>13,} {r['syscalls']:>9,} {r['expired']:>8,}  {note}")
    ro = doc["full_read_alone"]
    lines.append(f"{'  of which the read alone':34} {ro['walk_and_group_s']:>9.3f} {'':>13} "
                 f"{'':>9} {'':>8}  kernel batch walk {ro['kernel_walk_s']:.3f} s, the rest numpy")
    for s in doc["sample"]:
        r0 = s["ticks"][0]
        lines.append(f"{'sampling tick, k=%d (median of %d)' % (s['k'], len(s['ticks'])):34} "
                     f"{s['median_wall_s']:>9.4f} {s['median_entries_read']:>13,.0f} "
                     f"{statistics.median(r['syscalls'] for r in s['ticks']):>9,.0f} "
                     f"{sum(r['expired'] for r in s['ticks']):>8,}  "
                     f"N/2^k = {r0['n_over_2k']:,.0f}: x{s['median_ratio']}")
    h = doc["hardware"]
    for p in h["passes"]:
        lines.append(f"{'NIC pass %d (%s contexts)' % (p['pass'], format(p['slots_run'], ',')):34} "
                     f"{p['pass_wall_s']:>9.3f} {p['software_during_drain']['entries_read']:>13,} "
                     f"{p['software_during_drain']['syscalls']:>9,} {p['expired']:>8,}  "
                     f"program {p['program_s']:.3f} s; drain {p['drain_tick_wall_s']:.4f} s, "
                     f"{p['events']:,} events (ring buffer)")
    mem = doc["maps"]
    lines.append("")
    lines.append("maps (kernel memlock): " + ", ".join(
        f"{m['map']} {m['memlock_bytes'] / 2**20:,.1f} MiB" for m in mem if m["memlock_bytes"] >= 2**20)
        + f"; all maps {sum(m['memlock_bytes'] for m in mem) / 2**20:,.1f} MiB")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entries", type=int, default=1_000_000,
                    help="offload table size, filled to the last entry (default 1000000: 500000 connections)")
    ap.add_argument("--k", default="6,8,10", help="sampling k values (default 6,8,10)")
    ap.add_argument("--ticks", type=int, default=3, help="sampling ticks per k (default 3)")
    ap.add_argument("--idle", type=float, default=0.005,
                    help="fraction of the connections idle past the timeout, for each mode (default 0.005)")
    ap.add_argument("--timeout", type=float, default=180.0, help="UDP offload timeout, seconds (default 180)")
    ap.add_argument("--profile", action="store_true", help="cProfile the first full pass, print and store it")
    ap.add_argument("--note", default="", help="free text stored in the JSON")
    ap.add_argument("--output", type=Path, help="JSON file (default bench/results/aging-<date>-<time>.json)")
    args = ap.parse_args(argv)
    try:
        ks = [int(x) for x in args.k.split(",") if x.strip()]
    except ValueError:
        ap.error("--k is a comma-separated list of integers")
    if not ks or any(not 0 <= k <= 20 for k in ks):
        ap.error("--k values must be in 0..20")
    if args.entries < 8 or args.entries % 2:
        ap.error("--entries must be an even number >= 8 (two entries per connection)")
    if not 0 < args.idle < 0.3:
        ap.error("--idle must be in (0, 0.3)")
    if args.ticks < 1:
        ap.error("--ticks must be at least 1")
    if os.geteuid() != 0:
        ap.error("needs root (BPF maps)")

    started = dt.datetime.now(dt.timezone.utc).astimezone()
    command = ".venv/bin/python bench/bench_aging.py" + "".join(
        f" {shlex.quote(a)}" for a in (sys.argv[1:] if argv is None else argv))

    def say(s):
        print(s, flush=True)

    T = args.timeout
    conns_n = args.entries // 2
    n_idle = max(1, int(conns_n * args.idle))
    n_busy = conns_n - 3 * n_idle
    # The timeline (offsets from the bench's start on the hand-moved clock,
    # in units of the UDP offload timeout T):
    #   hw-idle   offloaded at -2T, last hit (written in the entries) -1.5T:
    #             idle past T for the NIC's pass, which runs on real time
    #             and so has to come first
    #   full-idle offloaded at -0.85T, never hit: deadline +0.15T
    #   sample-idle offloaded at -0.7T, never hit: deadline +0.3T
    #   busy      offloaded at 0: deadline +T
    # full passes at +0.2T (full-idle expires, sample-idle not yet);
    # sampling ticks from +0.35T, every T/100, all before +T.
    period = T / 100
    if 0.35 * T + (len(ks) * args.ticks + 1) * period >= T:
        ap.error("too many sampling ticks for the timeline (--ticks)")
    say(f"bench_aging: {args.entries:,} entries ({conns_n:,} UDP connections), idle per mode {n_idle:,}, "
        f"UDP offload timeout {T:g} s; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    say(f"  compiling bpf/ctctl.c with {' '.join(HwCaps(table_size=args.entries).cflags())} ...")
    box = Box(args.entries, T)
    say(f"  compiled in {box.compile_s:.1f} s; table_size {box.dev.maps.table_size():,}, "
        f"aging_slots {box.dev.maps.aging_slots():,}")
    doc: dict = {}
    try:
        mem = map_memory(box.bpf)
        say("  fill: " + f"{conns_n:,} connections, two packets each through the tracker, offloaded on the reply")
        t0 = time.perf_counter()
        prog = Progress("connections", conns_n)
        groups = {}
        done = 0
        for name, offset, n in (("hw_idle", -2.0 * T, n_idle), ("full_idle", -0.85 * T, n_idle),
                                ("sample_idle", -0.7 * T, n_idle), ("busy", 0.0, n_busy)):
            box.clock.at(offset)
            groups[name] = box.connect(n, prog, done)
            done += n
        fill_s = time.perf_counter() - t0
        in_hw = len(box.mgr.hw)
        say(f"  filled in {fill_s:.1f} s: {in_hw:,} connections in hardware, table_full "
            f"{box.mgr.counters['table_full']}, max RSS {rss_mb():,.0f} MB")
        if in_hw != conns_n:
            raise RuntimeError(f"only {in_hw:,} of {conns_n:,} connections made it into the table")
        # Counters in the entries: the hw-idle ones were last hit 1.5T ago;
        # every busy one has just counted packets, so the first full pass
        # folds every busy entry (a table under traffic), the second none
        # (a quiet one).
        box.hit(groups["hw_idle"], 1.5 * T)
        t0 = time.perf_counter()
        say(f"  hits: {2 * n_busy:,} busy entries get counters (read and rewritten, as the program's hits leave them)")
        box.hit(groups["busy"], 0.0, progress=Progress("connections", n_busy))
        hits_s = time.perf_counter() - t0
        box.clock.at(0.0)

        say("  hardware mode (the NIC's own pass):")
        hw = measure_hardware(box, groups["hw_idle"], say)
        say("  full mode:")
        full_all = measure_full(box, groups["full_idle"], groups["busy"], 0.2 * T, args.profile, say)
        read_only, full = full_all[0], full_all[1:]
        say("  sample mode:")
        sample = measure_sample(box, ks, groups["sample_idle"], 0.35 * T, period, args.ticks, say)
        checks = {
            "hardware: every idle connection expired": hw["idle_left_in_hardware"] == 0,
            "hardware: no busy connection expired": hw["busy_expired"] == 0,
            "hardware: software read no table entry": all(
                p["software_during_drain"]["entries_read"] == 0 and p["software_during_pass"]["entries_read"] == 0
                for p in hw["passes"]),
            "full: pass 1 expired exactly the idle": (full[0]["expired"] == n_idle
                                                      and full[0]["idle_left_in_hardware"] == 0),
            "full: passes 2 and 3 expired nothing": full[1]["expired"] == full[2]["expired"] == 0,
            "full: pass 1 looked at every connection": full[0]["looked"] == full[0]["connections"],
            # (and, for each expired connection, its two entries once more as they are taken out)
            "full: every pass read every entry": all(r["entries_read"] == r["entries_in_table"] + 2 * r["expired"]
                                                     for r in full),
            "full: pass 2 looked at the never-hit ones only": full[1]["looked"] == n_idle,
            "full: pass 3 looked at those and the ones that moved": full[2]["looked"] == n_idle + full[2]["moved"],
            "full: what moved was folded exactly": full[2]["moved_folded"],
            "sample: expired exactly the idle ones of each part": all(
                r["expired"] == r["expected_expired"] for s in sample for r in s["ticks"]),
            "sample: looked at exactly the part": all(
                r["looked"] == r["connections_in_part"] for s in sample for r in s["ticks"]),
            "sample: every tick ran (all three lanes due)": all(
                r["lanes_ticked"] == 3 for s in sample for r in s["ticks"]),
        }
        doc = {
            "benchmark": "aging",
            "date": started.isoformat(timespec="seconds"),
            "command": command,
            "argv": sys.argv if argv is None else argv,
            "machine": {**machine(), "dict_random_lookup_ns": random_access_ns()},
            "note": args.note,
            "entries": args.entries,
            "connections": conns_n,
            "idle_per_mode": n_idle,
            "udp_offload_timeout_s": T,
            "sampling_period_s": period,
            "compile_s": round(box.compile_s, 1),
            "fill_s": round(fill_s, 1),
            "hits_s": round(hits_s, 1),
            "max_rss_mb": round(rss_mb()),
            "maps": mem,
            "maps_memlock_total_bytes": sum(m["memlock_bytes"] for m in mem),
            "hardware": hw,
            "full_read_alone": read_only,
            "full": full,
            "sample": sample,
            "checks": checks,
        }
    finally:
        box.close()
    say("")
    say(table(doc))
    say("")
    for what, ok in doc["checks"].items():
        say(f"  {'ok  ' if ok else 'FAIL'} {what}")
    out = args.output or RESULTS / f"aging-{started.strftime('%Y-%m-%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    say(f"\nresults: {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    say(f"reproduce: sudo {command}")
    return 0 if all(doc["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
