"""BPF_PROG_TEST_RUN: run a loaded program on a frame, once or `repeat`
times, from Python.  The driver runs the NIC's own aging this way (its
firmware timer), and the bpf test tier runs the data path on crafted frames.

BCC 0.26 has no Python binding for it.  libbcc links libbpf (Debian's
libbpf1 1.1), whose `bpf_prog_test_run_opts()` is reachable through
`bcc.libbcc.lib`; the options struct is declared here with ctypes as
libbpf's bpf.h lays it out (sz = sizeof, so libbpf knows which fields
exist).
"""

from __future__ import annotations

import ctypes
import os


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


class XdpMd(ctypes.Structure):
    """struct xdp_md, the context an XDP test run may take: data 0,
    data_end the frame's length, and an ingress device whose receive
    queue is registered for XDP (one with an XDP program attached)."""

    _fields_ = [
        ("data", ctypes.c_uint32),
        ("data_end", ctypes.c_uint32),
        ("data_meta", ctypes.c_uint32),
        ("ingress_ifindex", ctypes.c_uint32),
        ("rx_queue_index", ctypes.c_uint32),
        ("egress_ifindex", ctypes.c_uint32),
    ]


class Refused(OSError):
    """The kernel refused the test run (the program never ran)."""


def _test_run_fn():
    from bcc import libbcc  # imported late: unit tests run without BCC

    fn = libbcc.lib.bpf_prog_test_run_opts
    fn.argtypes = [ctypes.c_int, ctypes.POINTER(BpfTestRunOpts)]
    fn.restype = ctypes.c_int
    return fn


def prog_test_run(prog_fd: int, frame: bytes, repeat: int = 1, ifindex: int | None = None,
                  out_size: int = 0, xdp: bool = False) -> tuple[BpfTestRunOpts, bytes]:
    """One BPF_PROG_TEST_RUN: the filled-in opts (retval of the last run,
    average duration) and, with `out_size`, the packet the program left
    (data_out).  With `ifindex` (a device of the calling thread's
    namespace) the packet comes from that device.  `xdp`: the program is
    an XDP one (its context is struct xdp_md).  Raises Refused when the
    kernel does not run it."""
    data = ctypes.create_string_buffer(bytes(frame), len(frame))
    opts = BpfTestRunOpts(sz=ctypes.sizeof(BpfTestRunOpts), data_in=ctypes.cast(data, ctypes.c_void_p),
                          data_size_in=len(frame), repeat=repeat)
    out = ctypes.create_string_buffer(out_size) if out_size else None
    if out is not None:
        opts.data_out = ctypes.cast(out, ctypes.c_void_p)
        opts.data_size_out = out_size
    if ifindex is not None:
        ctx = XdpMd(data_end=len(frame), ingress_ifindex=ifindex) if xdp else SkBuff(ifindex=ifindex)
        opts.ctx_in = ctypes.cast(ctypes.pointer(ctx), ctypes.c_void_p)
        opts.ctx_size_in = ctypes.sizeof(ctx)
    rc = _test_run_fn()(prog_fd, ctypes.byref(opts))
    if rc < 0:
        raise Refused(-rc, f"BPF_PROG_TEST_RUN: {os.strerror(-rc)} ({len(frame)}-byte frame)")
    return opts, bytes(out.raw[:opts.data_size_out]) if out is not None else b""
