"""Run the TC-ingress program on one frame with BPF_PROG_TEST_RUN and
collect what it did: its verdict, the punts it sent, the counters it moved.

The run itself is ctctl.nic.progrun's (BPF_PROG_TEST_RUN through libbpf).

What the kernel (6.18) does with a test frame, found on this machine and
pinned by tests/bpf/test_parse.py:

- it builds the skb in the caller's network namespace; without a context the
  skb's device is that namespace's loopback, so a punt says ifindex 1;
- a context (`struct __sk_buff`) may name another device by ifindex, which
  must exist in the caller's namespace (ENODEV otherwise);
- it refuses (EINVAL) frames shorter than an Ethernet header (14 bytes),
  IPv4-ethertype frames shorter than 14 + 20 bytes, IPv6-ethertype frames
  shorter than 14 + 40 bytes, and frames longer than 3712 bytes (one page
  minus the skb's headroom and shared info).  Those inputs reach the program
  only from a real device: tests/integration/test_malformed.py.
- `perf_submit_skb` events of a test run are delivered to the perf buffer
  of the CPU that ran it, synchronously: a consume after the run sees them.
"""

from __future__ import annotations

import struct
from contextlib import contextmanager
from dataclasses import dataclass

from ctctl import abi
from ctctl.nic.progrun import BpfTestRunOpts, Refused, prog_test_run
from ctctl.nic.punts import Punt, PuntReader

TC_ACT_OK = 0
TC_ACT_SHOT = 2
# A finished packet's verdict, by hook (bpf/hook.h's CTCTL_REDIRECT, _SHOT, _OK).
VERDICTS = {"tc": {7: "output", TC_ACT_SHOT: "drop", TC_ACT_OK: "pass"},
            "xdp": {4: "output", 1: "drop", 2: "pass"}}
SHOT = {"tc": TC_ACT_SHOT, "xdp": 1}

# Frame sizes BPF_PROG_TEST_RUN accepts for a SCHED_CLS program (see above).
MIN_FRAME = 14
MIN_IPV4_FRAME = 14 + 20
MIN_IPV6_FRAME = 14 + 40
MAX_FRAME = 3712


def counter_names() -> list[str]:
    """Name of every counter slot: reason labels, then rx, rx_bytes, ..."""
    names = [""] * abi.COUNTER_MAX
    for r in abi.Reason:
        if r:
            names[r] = r.label
    for c in abi.Counter:
        names[c] = c.name.lower()
    return names


COUNTER_NAMES = counter_names()


@dataclass
class Result:
    retval: int
    punts: list[Punt]
    counters: dict[str, int]  # nonzero deltas only, by counter name
    malformed_samples: int = 0
    duration_ns: int = 0
    data_out: bytes = b""   # the packet the program left (run with out_size)

    @property
    def reasons(self) -> list[abi.Reason]:
        return [p.reason for p in self.punts]


def expected_counters(frame_len: int, reason: abi.Reason | None) -> dict[str, int]:
    """What one frame moves when the program punts it for `reason` (or,
    with reason None, drops it as too big)."""
    exp = {"rx": 1, "rx_bytes": frame_len}
    if reason is None:
        exp["too_big"] = 1
    else:
        exp.update({"punt": 1, reason.label: 1})
    return exp


class Harness:
    """The compiled program `bpf`, its loaded function `fn` (SCHED_CLS, or
    XDP for `hook` xdp), and its perf buffer, open for as long as this
    object lives."""

    def __init__(self, bpf, fn, hook: str = "tc"):
        self.bpf = bpf
        self.fn = fn
        self.hook = hook
        self.shot = SHOT[hook]
        self._got: list[Punt] = []
        self.reader = PuntReader(bpf, self._got.append, page_cnt=64)
        self._table = bpf[b"counters"]

    def verdict(self, retval: int) -> str | None:
        """output, drop or pass: what a finished packet's retval means."""
        return VERDICTS[self.hook].get(retval)

    def counters(self) -> list[int]:
        """Every counter slot, summed over CPUs."""
        t = self._table
        return [int(sum(t.getvalue(t.Key(i)))) for i in range(abi.COUNTER_MAX)]

    def drain(self) -> list[Punt]:
        """Whatever the perf buffer holds now."""
        self.bpf.perf_buffer_consume()
        got = list(self._got)
        self._got.clear()
        return got

    def run(self, frame: bytes, ifindex: int | None = None, out_size: int = 0) -> Result:
        """Run the program once on `frame`.  Raises Refused when the kernel
        does not run it (the errno says why).  With `ifindex` (a device of
        the calling thread's namespace) the skb comes from that device;
        with `out_size`, the packet it leaves is in data_out."""
        stale = self.drain()
        if stale:
            raise AssertionError(f"{len(stale)} punts pending before the run: {stale}")
        malformed0 = self.reader.malformed
        before = self.counters()
        opts, out = self.prog_test_run(frame, ifindex, out_size=out_size)
        punts = self.drain()
        after = self.counters()
        delta = {COUNTER_NAMES[i]: a - b for i, (a, b) in enumerate(zip(after, before)) if a != b}
        return Result(opts.retval, punts, delta,
                      malformed_samples=self.reader.malformed - malformed0,
                      duration_ns=opts.duration, data_out=out)


    def prog_test_run(self, frame: bytes, ifindex: int | None = None,
                      out_size: int = 0, repeat: int = 1) -> tuple[BpfTestRunOpts, bytes]:
        """One BPF_PROG_TEST_RUN, nothing around it: the filled-in opts
        (retval, duration) and, with `out_size`, the packet the program
        left (data_out).  Raises Refused when the kernel does not run it."""
        try:
            return prog_test_run(self.fn.fd, frame, repeat=repeat, ifindex=ifindex, out_size=out_size,
                                 xdp=self.hook == "xdp")
        except Refused:
            # The kernel may still have run the program: what it counted
            # and sent is not this caller's to leave for the next run.
            self.drain()
            raise


def compiled(caps):
    """The program built for `caps` (ctctl.nic.caps.HwCaps) with a Harness
    on its ingress function, for a module's fixture: yields (bpf, harness),
    and cleans the program up after."""
    from ctctl.nic.loader import compile_program

    bpf = compile_program(caps.cflags())
    try:
        yield bpf, Harness(bpf, bpf.load_func(b"ctctl_ingress", bpf.SCHED_CLS))
    finally:
        bpf.cleanup()


@contextmanager
def in_a_box(tag: str, harness=Harness, hook: str = "tc"):
    """The program on real ports, for a module's fixture: a topology
    (box namespace with eth5 and eth6), the program compiled for `hook`
    with default caps and a `harness` on it, this thread inside the box
    (test runs name a port by its ifindex there).  At XDP the ports carry
    the peers' pass program (an XDP test run's ingress device must have
    its receive queue registered for XDP, which an attached program does)
    and are in the devmap.  Gives (topology, bpf, harness, {port:
    ifindex}); everything is removed after."""
    from pyroute2 import netns as pr_netns

    from ctctl import netns
    from ctctl.lab import topology
    from ctctl.nic import xdp
    from ctctl.nic.loader import FUNCTION, PEER_FUNCTION, compile_program, hook_cflags
    from ctctl.nic.maps import Maps

    topo = topology.build(topology.unique_tag(tag), ["eth5", "eth6"], ["client", "server"])
    bpf = None
    try:
        bpf = compile_program(hook_cflags(hook))
        kind = bpf.XDP if hook == "xdp" else bpf.SCHED_CLS
        h = harness(bpf, bpf.load_func(FUNCTION, kind), hook)
        ifindex = {p.name: p.ifindex for p in topo.ports}
        if hook == "xdp":
            up = bpf.load_func(PEER_FUNCTION, bpf.XDP)
            with netns.ipr(topo.box) as ipr:
                for i in ifindex.values():
                    xdp.attach(ipr, i, up.fd)
            Maps(bpf).set_ports(topo.box, ifindex.values())
        pr_netns.pushns(topo.box)
        try:
            yield topo, bpf, h, ifindex
        finally:
            pr_netns.popns()
    finally:
        if bpf is not None:
            bpf.cleanup()
        topo.destroy()


def refused_by_kernel(frame: bytes) -> bool:
    """Whether BPF_PROG_TEST_RUN refuses this frame on this kernel, by the
    rules listed at the top of this module."""
    n = len(frame)
    if n < MIN_FRAME or n > MAX_FRAME:
        return True
    (ethertype,) = struct.unpack_from("!H", frame, 12)
    if ethertype == 0x0800 and n < MIN_IPV4_FRAME:
        return True
    if ethertype == 0x86DD and n < MIN_IPV6_FRAME:
        return True
    return False

