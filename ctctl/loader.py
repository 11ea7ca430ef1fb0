"""Compile the TC-ingress program with BCC, attach it to the ports of a box,
pin its maps, and take back exactly what was attached.

A `Datapath` is a context manager: whatever fails half-way, leaving it
detaches the filters it added, deletes the clsact qdiscs it created (never
one that was already there) and removes its pins.
"""

from __future__ import annotations

import ctypes
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ctctl import abi

PROGRAM = abi.BPF_DIR / "ctctl.c"
FUNCTION = b"ctctl_ingress"
PIN_ROOT = Path("/sys/fs/bpf/ctctl")
# Maps pinned for tools that read the data path without the controller:
# its counters, and the "hardware" tables the driver writes (bpf/maps.h).
PINNED_MAPS = ("counters", "chains", "flows", "rule_stats", "hw_config")

INGRESS = "ffff:fff2"
# Our filter's priority on clsact ingress.  A fixed, unusual value makes
# "our filter" unambiguous when detaching, also from another process.
FILTER_PRIO = 0xC7C7
FILTER_HANDLE = 1


class LoadError(Exception):
    """The data path could not be set up; nothing of ours is left behind."""


@dataclass
class Attachment:
    ifname: str
    ifindex: int
    created_qdisc: bool


def flow_table_cflags(size: int | None) -> list[str]:
    """The -D that sizes the offload table (`flows`), checked here so that
    a bad size is a LoadError, not a compiler message."""
    if size is None:
        return []
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise LoadError(f"flow table size must be a positive integer, not {size!r}")
    return [f"-DCTCTL_FLOW_TABLE_SIZE={size}"]


def compile_program(extra_cflags: list[str] | None = None):
    """Compile bpf/ctctl.c; returns the bcc.BPF object."""
    from bcc import BPF  # imported late: unit tests run without BCC

    cflags = [f"-I{abi.BPF_DIR}"] + list(extra_cflags or [])
    try:
        return BPF(src_file=str(PROGRAM).encode(), cflags=cflags)
    except Exception as e:  # BCC raises bare Exception on compile errors
        raise LoadError(f"cannot compile {PROGRAM}: {e}") from e


def source_text() -> str:
    """The C source as BCC sees it, for `ctctl load --ebpf`."""
    parts = []
    for name in ("ctctl_abi.h", "parse.h", "key.h", "maps.h", "nat.h", "rules.h", "ctctl.c"):
        parts.append(f"/* ---- bpf/{name} ---- */\n" + (abi.BPF_DIR / name).read_text())
    return "\n".join(parts)


def _pin(fd: int, path: Path) -> None:
    from bcc import libbcc

    if libbcc.lib.bpf_obj_pin(fd, str(path).encode()) != 0:
        err = ctypes.get_errno() or 1
        raise LoadError(f"cannot pin {path}: {os.strerror(err)}")


class Datapath:
    """The program attached to clsact ingress of `ports` inside `netns`."""

    def __init__(self, name: str, netns: str, ports: list[str],
                 flow_table_size: int | None = None):
        self.name = name
        self.flow_table_size = flow_table_size
        self.netns = netns
        self.ports = list(ports)
        self.bpf = None
        self.attached: list[Attachment] = []
        self.pin_dir = PIN_ROOT / name
        self._pinned = False

    # -- set-up -----------------------------------------------------------
    def __enter__(self) -> "Datapath":
        try:
            self.load()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def load(self) -> None:
        """Compile and pin; attaching is a separate step so that the caller
        can open the perf buffer first and lose no packet."""
        if self.pin_dir.exists():
            raise LoadError(
                f"{self.pin_dir} exists: a box named {self.name!r} is loaded "
                f"(or was not unloaded: `ctctl unload --name {self.name}`)")
        self.bpf = compile_program(flow_table_cflags(self.flow_table_size))
        self._pin_maps()

    def ifindexes(self) -> dict[str, int]:
        """The ports' ifindexes in the box namespace (before attaching: the
        driver writes rules keyed by them)."""
        out = {}
        with IPRoute(netns=self.netns) as ipr:
            for port in self.ports:
                idx = ipr.link_lookup(ifname=port)
                if not idx:
                    raise LoadError(f"port {port!r}: no such interface in netns {self.netns!r}")
                out[port] = idx[0]
        return out

    def attach(self) -> None:
        fn = self.bpf.load_func(FUNCTION, self.bpf.SCHED_CLS)
        with IPRoute(netns=self.netns) as ipr:
            for port in self.ports:
                self._attach(ipr, port, fn)

    def _attach(self, ipr: IPRoute, port: str, fn) -> None:
        idx = ipr.link_lookup(ifname=port)
        if not idx:
            raise LoadError(f"port {port!r}: no such interface in netns {self.netns!r}")
        idx = idx[0]
        created = False
        try:
            ipr.tc("add", "clsact", idx)
            created = True
        except NetlinkError as e:
            if e.code != 17:  # EEXIST: someone's clsact, we share it
                raise LoadError(f"port {port!r}: cannot add clsact: {e}") from e
        att = Attachment(port, idx, created)
        self.attached.append(att)
        try:
            ipr.tc("add-filter", "bpf", idx, FILTER_HANDLE, fd=fn.fd, name=fn.name,
                   parent=INGRESS, prio=FILTER_PRIO, classid=1, direct_action=True)
        except NetlinkError as e:
            raise LoadError(f"port {port!r}: cannot attach the program: {e}") from e

    def _pin_maps(self) -> None:
        self.pin_dir.mkdir(parents=True, exist_ok=False)
        self._pinned = True
        for m in PINNED_MAPS:
            _pin(self.bpf[m.encode()].map_fd, self.pin_dir / m)

    # -- take-down --------------------------------------------------------
    def close(self) -> None:
        """Detach and unpin what this object attached and pinned."""
        if self.attached:
            detach(self.netns, self.attached)
            self.attached = []
        if self._pinned:
            unpin(self.pin_dir)
            self._pinned = False
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None

    # -- reading ----------------------------------------------------------
    def counters(self) -> list[int]:
        """The program's counters, summed over CPUs."""
        table = self.bpf[b"counters"]
        return [int(sum(table[table.Key(i)])) for i in range(abi.COUNTER_MAX)]


def unpin(pin_dir: Path) -> None:
    """Remove a box's pins, and the ctctl pin root once no box is left."""
    shutil.rmtree(pin_dir, ignore_errors=True)
    try:
        pin_dir.parent.rmdir()
    except OSError:
        pass  # another box still pinned, or already gone


def detach(netns: str, attached: list[Attachment]) -> list[str]:
    """Remove our filter from each port, and the clsact qdisc where we
    created it.  Returns the problems met; a port that vanished meanwhile
    (its namespace deleted) is not one."""
    problems = []
    try:
        ipr = IPRoute(netns=netns)
    except Exception as e:  # namespace gone: nothing left to detach
        return [f"netns {netns}: {e}"] if os.path.exists(f"/run/netns/{netns}") else []
    with ipr:
        for att in attached:
            if not ipr.link_lookup(index=att.ifindex):
                continue
            try:
                ipr.tc("del-filter", "bpf", att.ifindex, FILTER_HANDLE,
                       parent=INGRESS, prio=FILTER_PRIO)
            except NetlinkError as e:
                if e.code not in (2, 22):  # already gone
                    problems.append(f"{att.ifname}: del filter: {e}")
            if att.created_qdisc:
                try:
                    ipr.tc("del", "clsact", att.ifindex)
                except NetlinkError as e:
                    if e.code not in (2, 22):
                        problems.append(f"{att.ifname}: del clsact: {e}")
    return problems
