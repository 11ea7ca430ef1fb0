"""Compile the program with BCC, attach it to the ports of a box, pin its
maps, and take back exactly what was attached (and nothing else: a filter
is ours by its priority and handle, an XDP program by its id).

A box runs at TC ingress (`attach: tc`, the default: cls_bpf on clsact)
or at XDP (`attach: xdp`: the same source built with -DCTCTL_XDP, in each
port's driver-mode XDP, redirecting through the `ports` devmap, with each
port's veth peer prepared by ctctl.nic.xdp).

A `Datapath` is a context manager: whatever fails half-way, leaving it
detaches the filters it added, deletes the clsact qdiscs it created (never
one that was already there) and removes its pins.

A box's maps are pinned by BCC as it compiles (bpf/maps.h, CTCTL_PIN_DIR):
they live until unpinned, so a program stays attached and keeps forwarding
when its controller dies.  `Datapath.adopting()` is the next controller's
way back in: it compiles the same source against the pinned maps, attaches
nothing (the running program stays), and takes the attachments and pins
over only once the caller says the adoption worked; before that, a failure
leaves the running box exactly as it was.
"""

from __future__ import annotations

import errno
import hashlib
import shutil
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

from pyroute2.netlink.exceptions import NetlinkError

from ctctl import abi, netns
from ctctl.nic import xdp
from ctctl.nic.maps import Maps

PROGRAM = abi.BPF_DIR / "ctctl.c"
FUNCTION = b"ctctl_ingress"
PEER_FUNCTION = b"ctctl_peer_pass"
# The `ports` devmap's slots (bpf/maps.h): a port's ifindex is its slot.
PORT_SLOTS = 65536
PIN_ROOT = Path("/sys/fs/bpf/ctctl")

INGRESS = "ffff:fff2"
INGRESS_PARENT = 0xFFFFFFF2
# Our filter's priority on clsact ingress: a fixed, unusual value, so that
# a ctctl program on a port is recognisable, also from another process.
FILTER_PRIO = 0xC7C7
# Controllers before per-box handles all used handle 1 (state files that
# carry no handle are theirs).
LEGACY_HANDLE = 1


class LoadError(Exception):
    """The data path could not be set up; nothing of ours is left behind."""


@dataclass
class Attachment:
    """One port a box's program is attached to: what to take back."""

    ifname: str
    ifindex: int
    created_qdisc: bool
    handle: int = LEGACY_HANDLE
    hook: str = "tc"
    prog_id: int = 0            # xdp: the program attached to the port (0: not yet)
    peer: dict | None = None    # xdp: the veth peer as prepared (ctctl.nic.xdp.Peer)


def filter_handle(box: str) -> int:
    """The handle of a box's filter on its ports: derived from the box's
    name, so that detaching removes that box's filter and never another's
    at the same priority (a filter is named by prio *and* handle)."""
    return zlib.crc32(box.encode()) or 1


def programs_on(netns_name: str, ports: list[str]) -> dict[str, list[int]]:
    """The ctctl filters (cls_bpf at FILTER_PRIO on clsact ingress) already
    on each port, by handle.  A port absent from the namespace is left out:
    the caller's own checks say so."""
    out: dict[str, list[int]] = {}
    with netns.ipr(netns_name) as ipr:
        for port in ports:
            idx = ipr.link_lookup(ifname=port)
            if not idx:
                continue
            try:
                msgs = ipr.get_filters(index=idx[0], parent=INGRESS_PARENT)
            except NetlinkError as e:
                if e.code in (errno.EINVAL, errno.ENOENT):   # no clsact: nothing attached
                    continue
                raise
            handles = sorted({m["handle"] for m in msgs
                              if m["info"] >> 16 == FILTER_PRIO and m["handle"]
                              and m.get_attr("TCA_KIND") == "bpf"})
            if handles:
                out[port] = handles
    return out


def hook_cflags(hook: str) -> list[str]:
    """The -D that builds the program for `hook` (part of its id)."""
    if hook not in abi.HOOKS:
        raise LoadError(f"attach must be one of {', '.join(abi.HOOKS)}, not {hook!r}")
    return ["-DCTCTL_XDP", f"-DCTCTL_PORT_SLOTS={PORT_SLOTS}"] if hook == "xdp" else []


def hook_of(cflags: list[str] | None) -> str:
    return "xdp" if "-DCTCTL_XDP" in (cflags or []) else "tc"


def xdp_programs_on(netns_name: str, ports: list[str]) -> dict[str, int]:
    """The id of the XDP program on each port that has one."""
    out = {}
    with netns.ipr(netns_name) as ipr:
        for port in ports:
            idx = ipr.link_lookup(ifname=port)
            pid = xdp.prog_id(ipr, idx[0]) if idx else 0
            if pid:
                out[port] = pid
    return out


def flow_table_cflags(size: int | None) -> list[str]:
    """The -D that sizes the offload table (`flows`), checked here so that
    a bad size is a LoadError, not a compiler message."""
    if size is None:
        return []
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise LoadError(f"flow table size must be a positive integer, not {size!r}")
    return [f"-DCTCTL_FLOW_TABLE_SIZE={size}"]


def compile_program(extra_cflags: list[str] | None = None, pin_dir: Path | None = None):
    """Compile bpf/ctctl.c; returns the bcc.BPF object.  With `pin_dir`
    (which exists), its maps are the ones pinned there, made and pinned
    there when absent."""
    from bcc import BPF  # imported late: unit tests run without BCC

    cflags = [f"-I{abi.BPF_DIR}"] + list(extra_cflags or [])
    if pin_dir is not None:
        cflags.append(f'-DCTCTL_PIN_DIR="{pin_dir}"')
    try:
        return BPF(src_file=str(PROGRAM).encode(), cflags=cflags)
    except Exception as e:  # BCC raises bare Exception on compile errors
        raise LoadError(f"cannot compile {PROGRAM}: {e}") from e


def program_id(extra_cflags: list[str] | None = None) -> str:
    """What the program is: its source and the -D that size its maps.  A
    controller adopts only a program with the same id (the maps' layout
    and sizes are the source's and the flags')."""
    h = hashlib.sha256(source_text().encode())
    h.update("\0".join(extra_cflags or []).encode())
    return h.hexdigest()[:16]


def source_text() -> str:
    """The C source as BCC sees it, for `ctctl load --ebpf`."""
    parts = []
    for name in ("ctctl_abi.h", "hook.h", "parse.h", "key.h", "maps.h", "csum.h", "nat.h", "pedit.h",
                 "tunnel.h", "window.h", "rules.h", "ctctl.c"):
        parts.append(f"/* ---- bpf/{name} ---- */\n" + (abi.BPF_DIR / name).read_text())
    return "\n".join(parts)


class Datapath:
    """The program attached to `ports` inside `netns`, at the hook its
    cflags build it for (hook_cflags())."""

    def __init__(self, name: str, netns_name: str, ports: list[str], cflags: list[str] | None = None):
        self.name = name
        self.cflags = list(cflags or [])     # the maps' sizes (HwCaps.cflags()) and the hook
        self.hook = hook_of(self.cflags)
        self.netns = netns_name
        self.handle = filter_handle(name)
        self.ports = list(ports)
        self.bpf = None
        self.maps: Maps | None = None
        self.attached: list[Attachment] = []
        self.pin_dir = PIN_ROOT / name
        self._pinned = False
        self._adopt: list[Attachment] | None = None   # a running program's, until take_over()

    @classmethod
    def adopting(cls, name: str, netns_name: str, ports: list[str], cflags: list[str] | None,
                 attached: list[Attachment]) -> "Datapath":
        """The data path of a box whose controller died: its program stays
        attached to `attached`, its maps pinned."""
        dp = cls(name, netns_name, ports, cflags)
        dp._adopt = list(attached)
        return dp

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
        """Compile against the pins (made now, or a running program's when
        adopting); attaching is a separate step so that the caller can open
        the perf buffer first and lose no packet."""
        if self._adopt is not None:
            missing = Maps.missing_pins(self.pin_dir, self.hook)
            if missing:
                raise LoadError(f"cannot adopt box {self.name!r}: its pinned maps {', '.join(missing)} "
                                f"are gone from {self.pin_dir}")
            self.bpf = compile_program(self.cflags, self.pin_dir)
            self.maps = Maps(self.bpf)
            return
        if self.pin_dir.exists():
            raise LoadError(
                f"{self.pin_dir} exists: a box named {self.name!r} is loaded "
                f"(or was not unloaded: `ctctl unload --name {self.name}`)")
        self.pin_dir.mkdir(parents=True, exist_ok=False)
        self._pinned = True
        self.bpf = compile_program(self.cflags, self.pin_dir)
        self.maps = Maps(self.bpf)

    def take_over(self) -> None:
        """The adoption worked: from now on leaving this Datapath detaches
        the running program and unpins, as for one loaded here."""
        if self._adopt is None:
            return
        self.attached, self._adopt = self._adopt, None
        self._pinned = True

    def ifindexes(self) -> dict[str, int]:
        """The ports' ifindexes in the box namespace (before attaching: the
        driver writes rules keyed by them)."""
        out = {}
        with netns.ipr(self.netns) as ipr:
            for port in self.ports:
                idx = ipr.link_lookup(ifname=port)
                if not idx:
                    raise LoadError(f"port {port!r}: no such interface in netns {self.netns!r}")
                out[port] = idx[0]
        return out

    def mac(self, port: str) -> bytes:
        """A port's MAC address (a tunnel's outer source MAC)."""
        with netns.ipr(self.netns) as ipr:
            idx = ipr.link_lookup(ifname=port)
            if not idx:
                raise LoadError(f"port {port!r}: no such interface in netns {self.netns!r}")
            return bytes.fromhex(ipr.get_links(idx[0])[0].get_attr("IFLA_ADDRESS").replace(":", ""))

    def attach(self) -> None:
        if self.hook == "xdp":
            self._attach_xdp()
            return
        fn = self.bpf.load_func(FUNCTION, self.bpf.SCHED_CLS)
        with netns.ipr(self.netns) as ipr:
            for port in self.ports:
                self._attach(ipr, port, fn)

    def _attach_xdp(self) -> None:
        """Every port in the devmap first (a frame may go to any of them as
        soon as one port runs the program), then port by port: its peer
        prepared, the program attached.  Each step is recorded before it is
        taken, so that a failure takes back exactly what was done."""
        fn = self.bpf.load_func(FUNCTION, self.bpf.XDP)
        peer_fn = self.bpf.load_func(PEER_FUNCTION, self.bpf.XDP)
        idx = self.ifindexes()
        for port, i in idx.items():
            if i >= PORT_SLOTS:
                raise LoadError(f"port {port!r}: ifindex {i} is beyond the {PORT_SLOTS} slots of the "
                                "ports devmap")
        self.maps.set_ports(self.netns, idx.values())
        with netns.ipr(self.netns) as ipr:
            for port in self.ports:
                att = Attachment(port, idx[port], False, handle=0, hook="xdp")
                self.attached.append(att)
                peer = None
                try:
                    peer = xdp.find_peer(ipr, self.netns, idx[port])
                    xdp.prepare_peer(peer, peer_fn.fd)
                    att.prog_id = xdp.attach(ipr, idx[port], fn.fd)
                except (xdp.XdpError, NetlinkError, OSError) as e:
                    raise LoadError(f"port {port!r}: cannot attach at XDP: {e}") from None
                finally:
                    # What was done to the peer, also half-way: detach() undoes it.
                    if peer is not None:
                        att.peer = asdict(peer)

    def _attach(self, ipr, port: str, fn) -> None:
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
        try:
            ipr.tc("add-filter", "bpf", idx, self.handle, fd=fn.fd, name=fn.name,
                   parent=INGRESS, prio=FILTER_PRIO, classid=1, direct_action=True)
        except NetlinkError as e:
            # Nothing of ours is on the port but maybe the clsact: take
            # back only that.  Whatever filter was there stays.
            if created:
                detach(self.netns, [Attachment(port, idx, True, handle=0)])
            raise LoadError(f"port {port!r}: cannot attach the program: {e}") from e
        self.attached.append(Attachment(port, idx, created, self.handle))

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
            self.maps = None


def unpin(pin_dir: Path) -> None:
    """Remove a box's pins, and the ctctl pin root once no box is left."""
    shutil.rmtree(pin_dir, ignore_errors=True)
    try:
        pin_dir.parent.rmdir()
    except OSError:
        pass  # another box still pinned, or already gone


def detach(netns_name: str, attached: list[Attachment]) -> list[str]:
    """Remove our filter (prio and handle: ours, nobody else's) from each
    port, and the clsact qdisc where we created it; at XDP, our program
    (by its id) and what we changed on the port's peer.  Returns the
    problems met; a port or namespace that vanished meanwhile is not one,
    and a namespace that is gone is never created again by looking into it."""
    problems = []
    try:
        ipr = netns.ipr(netns_name)
    except netns.NoSuchNetns:
        return []    # deleted with everything in it: nothing left to detach
    except Exception as e:
        return [f"netns {netns_name}: {e}"]
    with ipr:
        for att in attached:
            if not ipr.link_lookup(index=att.ifindex):
                continue
            if att.hook == "xdp":
                try:
                    xdp.detach(ipr, att.ifindex, att.prog_id)
                except NetlinkError as e:
                    problems.append(f"{att.ifname}: remove the XDP program: {e}")
                continue
            if att.handle:
                try:
                    ipr.tc("del-filter", "bpf", att.ifindex, att.handle,
                           parent=INGRESS, prio=FILTER_PRIO)
                except NetlinkError as e:
                    if e.code not in (2, 22):  # already gone
                        problems.append(f"{att.ifname}: del filter: {e}")
            if att.created_qdisc:
                others = _filters_left(ipr, att.ifindex)
                if others:
                    # Someone put filters on the clsact we made: it is
                    # theirs now as much as ours.
                    problems.append(f"{att.ifname}: kept the clsact qdisc: {others} other "
                                    "filter(s) on it")
                    continue
                try:
                    ipr.tc("del", "clsact", att.ifindex)
                except NetlinkError as e:
                    if e.code not in (2, 22):
                        problems.append(f"{att.ifname}: del clsact: {e}")
    # The peers once no port redirects to them (a veth pair goes with
    # its namespace: a peer that is gone is not a problem).
    for att in attached:
        if att.hook == "xdp" and att.peer:
            problems += xdp.restore_peer(xdp.Peer(**att.peer))
    return problems


def _filters_left(ipr, ifindex: int) -> int:
    """Filters on a port's clsact, ingress and egress (0xfffffff3)."""
    n = 0
    for parent in (INGRESS_PARENT, 0xFFFFFFF3):
        try:
            n += sum(1 for m in ipr.get_filters(index=ifindex, parent=parent) if m["handle"])
        except NetlinkError:
            pass
    return n
