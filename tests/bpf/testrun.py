"""Run the TC-ingress program on one frame with BPF_PROG_TEST_RUN and
collect what it did: its verdict, the punts it sent, the counters it moved.

BCC 0.26 has no Python binding for BPF_PROG_TEST_RUN.  libbcc links
libbpf (Debian's libbpf1 1.1), whose `bpf_prog_test_run_opts()` is reachable
through `bcc.libbcc.lib`; the options struct is declared here with ctypes as
libbpf's bpf.h lays it out (sz = sizeof, so libbpf knows which fields exist).

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

import ctypes
import os
import struct
from dataclasses import dataclass

from ctctl import abi
from ctctl.nic.punts import Punt, PuntReader

TC_ACT_OK = 0
TC_ACT_SHOT = 2

# Frame sizes BPF_PROG_TEST_RUN accepts for a SCHED_CLS program (see above).
MIN_FRAME = 14
MIN_IPV4_FRAME = 14 + 20
MIN_IPV6_FRAME = 14 + 40
MAX_FRAME = 3712


class BpfTestRunOpts(ctypes.Structure):
    """struct bpf_test_run_opts of libbpf 1.1 (src/bpf.h)."""

    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p),
        ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p),
        ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


class SkBuff(ctypes.Structure):
    """struct __sk_buff (uapi/linux/bpf.h), the context a test run may take.
    The kernel accepts only mark, priority, ingress_ifindex, ifindex, cb[],
    tstamp, wire_len, gso_segs and gso_size set; everything else zero."""

    _fields_ = [
        ("len", ctypes.c_uint32),
        ("pkt_type", ctypes.c_uint32),
        ("mark", ctypes.c_uint32),
        ("queue_mapping", ctypes.c_uint32),
        ("protocol", ctypes.c_uint32),
        ("vlan_present", ctypes.c_uint32),
        ("vlan_tci", ctypes.c_uint32),
        ("vlan_proto", ctypes.c_uint32),
        ("priority", ctypes.c_uint32),
        ("ingress_ifindex", ctypes.c_uint32),
        ("ifindex", ctypes.c_uint32),
        ("tc_index", ctypes.c_uint32),
        ("cb", ctypes.c_uint32 * 5),
        ("hash", ctypes.c_uint32),
        ("tc_classid", ctypes.c_uint32),
        ("data", ctypes.c_uint32),
        ("data_end", ctypes.c_uint32),
        ("napi_id", ctypes.c_uint32),
        ("family", ctypes.c_uint32),
        ("remote_ip4", ctypes.c_uint32),
        ("local_ip4", ctypes.c_uint32),
        ("remote_ip6", ctypes.c_uint32 * 4),
        ("local_ip6", ctypes.c_uint32 * 4),
        ("remote_port", ctypes.c_uint32),
        ("local_port", ctypes.c_uint32),
        ("data_meta", ctypes.c_uint32),
        ("flow_keys", ctypes.c_uint64),
        ("tstamp", ctypes.c_uint64),
        ("wire_len", ctypes.c_uint32),
        ("gso_segs", ctypes.c_uint32),
        ("sk", ctypes.c_uint64),
        ("gso_size", ctypes.c_uint32),
        ("tstamp_type", ctypes.c_uint8),
        ("_pad", ctypes.c_uint8 * 3),
        ("hwtstamp", ctypes.c_uint64),
    ]


def _test_run_fn():
    from bcc import libbcc  # imported late: collection works without BCC

    fn = libbcc.lib.bpf_prog_test_run_opts
    fn.argtypes = [ctypes.c_int, ctypes.POINTER(BpfTestRunOpts)]
    fn.restype = ctypes.c_int
    return fn


class Refused(OSError):
    """The kernel refused the test run (the program never ran)."""


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
    """The compiled program `bpf`, its loaded SCHED_CLS function `fn`, and
    its perf buffer, open for as long as this object lives."""

    def __init__(self, bpf, fn):
        self.bpf = bpf
        self.fn = fn
        self._run = _test_run_fn()
        self._got: list[Punt] = []
        self.reader = PuntReader(bpf, self._got.append, page_cnt=64)
        self._table = bpf[b"counters"]

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

    def run(self, frame: bytes, ifindex: int | None = None) -> Result:
        """Run the program once on `frame`.  Raises Refused when the kernel
        does not run it (the errno says why).  With `ifindex` (a device of
        the calling thread's namespace) the skb comes from that device."""
        stale = self.drain()
        if stale:
            raise AssertionError(f"{len(stale)} punts pending before the run: {stale}")
        malformed0 = self.reader.malformed
        before = self.counters()
        opts, _ = self.prog_test_run(frame, ifindex)
        punts = self.drain()
        after = self.counters()
        delta = {COUNTER_NAMES[i]: a - b for i, (a, b) in enumerate(zip(after, before)) if a != b}
        return Result(opts.retval, punts, delta,
                      malformed_samples=self.reader.malformed - malformed0,
                      duration_ns=opts.duration)


    def prog_test_run(self, frame: bytes, ifindex: int | None = None,
                      out_size: int = 0) -> tuple[BpfTestRunOpts, bytes]:
        """One BPF_PROG_TEST_RUN, nothing around it: the filled-in opts
        (retval, duration) and, with `out_size`, the packet the program
        left (data_out).  Raises Refused when the kernel does not run it."""
        data = ctypes.create_string_buffer(bytes(frame), len(frame))
        opts = BpfTestRunOpts(sz=ctypes.sizeof(BpfTestRunOpts),
                              data_in=ctypes.cast(data, ctypes.c_void_p),
                              data_size_in=len(frame), repeat=1)
        out = ctypes.create_string_buffer(out_size) if out_size else None
        if out is not None:
            opts.data_out = ctypes.cast(out, ctypes.c_void_p)
            opts.data_size_out = out_size
        if ifindex is not None:
            ctx = SkBuff(ifindex=ifindex)
            opts.ctx_in = ctypes.cast(ctypes.pointer(ctx), ctypes.c_void_p)
            opts.ctx_size_in = ctypes.sizeof(ctx)
        rc = self._run(self.fn.fd, ctypes.byref(opts))
        if rc < 0:
            # The kernel may still have run the program: what it counted
            # and sent is not this caller's to leave for the next run.
            self.drain()
            raise Refused(-rc, f"BPF_PROG_TEST_RUN: {os.strerror(-rc)} "
                               f"({len(frame)}-byte frame)")
        return opts, bytes(out.raw[:opts.data_size_out]) if out is not None else b""


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

