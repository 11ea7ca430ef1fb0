"""The XDP hook (`attach: xdp`): the program in each port's driver-mode XDP,
and each port's veth peer made ready to be the wire of such a NIC.

What veth asks of the peer, and why the loader does it (bpf/hook.h says
what the program does for the rest):

- a frame a port's XDP program redirects to another port leaves by that
  port's ndo_xdp_xmit, which queues it to the port's *peer*, and only to a
  peer that runs NAPI: one with an XDP program attached (or GRO on).
  Without it the frame is dropped where no counter of ours sees it.  The
  loader attaches a pass-everything program (ctctl_peer_pass) to each
  peer that has no XDP program of its own; one that has keeps it.
- a peer that offloads VLAN insertion gives the frame to the port with
  its tag beside it, in the skb, where XDP cannot see it and a redirect
  loses it.  The loader turns tx-vlan-hw-insert and tx-vlan-stag-hw-insert
  off on the peer, so that the tag is in the frame, as on a wire.
- veth itself takes segmentation offload (TSO and the rest of
  NETIF_F_GSO_SOFTWARE) from the peer while a port has an XDP program, so
  the peer's stack segments before veth, and refuses a program when the
  peer's MTU does not fit a page.

Everything is put back at detach, and only what the loader changed: the
peer's pass program by its id, the features it turned off.  The peer is
found through the port's IFLA_LINK and IFLA_LINK_NETNSID, among the
namespaces named in /run/netns.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from pyroute2 import netns as pr_netns
from pyroute2.ethtool import Ethtool
from pyroute2.netlink.exceptions import NetlinkError

from ctctl import netns

XDP_FLAGS_UPDATE_IF_NOEXIST = 1
XDP_FLAGS_DRV_MODE = 4
# What a wire carries in the frame that veth would otherwise keep in the skb.
VLAN_INSERT = ("tx-vlan-hw-insert", "tx-vlan-stag-hw-insert")


class XdpError(Exception):
    """The XDP hook cannot be set up on a port (the reason says why)."""


@dataclass
class Peer:
    """A port's veth peer, and what the loader changed on it."""

    netns: str
    ifname: str
    ifindex: int
    prog_id: int = 0                     # our pass program; 0: the peer had its own
    features_off: list[str] = field(default_factory=list)


def prog_id(ipr, ifindex: int) -> int:
    """The id of the XDP program on a device, 0 when none."""
    links = ipr.get_links(ifindex)
    xdp = links[0].get_attr("IFLA_XDP") if links else None
    return (xdp.get_attr("IFLA_XDP_PROG_ID") or 0) if xdp else 0


def attach(ipr, ifindex: int, fd: int) -> int:
    """Put program `fd` in the device's driver-mode XDP, never over another
    program; returns its id."""
    try:
        ipr.link("set", index=ifindex, xdp={"attrs": [
            ("IFLA_XDP_FD", fd), ("IFLA_XDP_FLAGS", XDP_FLAGS_DRV_MODE | XDP_FLAGS_UPDATE_IF_NOEXIST)]})
    except NetlinkError as e:
        raise XdpError(_why(e)) from None
    return prog_id(ipr, ifindex)


def detach(ipr, ifindex: int, expect: int) -> bool:
    """Remove the device's XDP program if it is still `expect` (by id);
    False when another one is there now (then it stays)."""
    if not expect or prog_id(ipr, ifindex) != expect:
        return False
    ipr.link("set", index=ifindex, xdp={"attrs": [("IFLA_XDP_FD", -1), ("IFLA_XDP_FLAGS", XDP_FLAGS_DRV_MODE)]})
    return True


def _why(e: NetlinkError) -> str:
    msg = {16: "another XDP program is attached (EBUSY)",
           95: "the driver has no native XDP (EOPNOTSUPP): XDP needs veth or a NIC driver with it",
           34: "the peer's MTU does not fit a page (ERANGE): lower it to 3,498 or less",
           28: "the port has fewer RX queues than its peer TX queues (ENOSPC)"}.get(e.code)
    return msg or str(e)


def find_peer(ipr, box_netns: str, ifindex: int) -> Peer:
    """The veth peer of a port of the box (its socket `ipr`)."""
    link = ipr.get_links(ifindex)[0]
    info = link.get_attr("IFLA_LINKINFO")
    kind = info.get_attr("IFLA_INFO_KIND") if info else None
    name = link.get_attr("IFLA_IFNAME")
    if kind != "veth":
        raise XdpError(f"port {name!r} is a {kind or 'device without a kind'}, not a veth: "
                       "the XDP hook models a NIC on veth ports")
    peer_index = link.get_attr("IFLA_LINK")
    nsid = link.get_attr("IFLA_LINK_NETNSID")
    where = box_netns if nsid is None else _netns_by_id(ipr, nsid)
    if where is None:
        raise XdpError(f"port {name!r}: its peer is in a namespace that has no name in {netns.RUN_NETNS} "
                       "(the loader must reach it to let it take redirected frames)")
    with netns.ipr(where) as pipr:
        links = pipr.get_links(peer_index)
        return Peer(where, links[0].get_attr("IFLA_IFNAME"), peer_index)


def _netns_by_id(ipr, nsid: int) -> str | None:
    """The name of the namespace that `ipr`'s namespace knows as `nsid`."""
    for name in pr_netns.listnetns():
        try:
            fd = os.open(os.path.join(netns.RUN_NETNS, name), os.O_RDONLY)
        except OSError:
            continue
        try:
            got = ipr.get_netnsid(fd=fd)
        except NetlinkError:
            continue
        finally:
            os.close(fd)
        if got and got.get("nsid") == nsid:
            return name
    return None


def prepare_peer(peer: Peer, pass_fd: int) -> Peer:
    """Make the peer the port's wire (the top of this file); `peer` says
    what was changed, also when this fails half-way (then the caller
    restores it)."""
    with netns.ipr(peer.netns) as ipr:
        if not prog_id(ipr, peer.ifindex):
            peer.prog_id = attach(ipr, peer.ifindex, pass_fd)
    with netns.inside(peer.netns):
        eth = Ethtool()
        try:
            feats = eth.get_features(peer.ifname)
            on = [f for f in VLAN_INSERT if f in feats.features and feats.features[f].enable]
            for f in on:
                feats.features[f].enable = False
            if on:
                eth.set_features(peer.ifname, feats)
                peer.features_off = on
        finally:
            eth.close()
    return peer


def restore_peer(peer: Peer) -> list[str]:
    """Undo prepare_peer(); the problems met (a peer that is gone is none)."""
    problems = []
    try:
        ipr = netns.ipr(peer.netns)
    except netns.NoSuchNetns:
        return []
    with ipr:
        if not ipr.link_lookup(index=peer.ifindex):
            return []
        try:
            detach(ipr, peer.ifindex, peer.prog_id)
        except NetlinkError as e:
            problems.append(f"{peer.netns}/{peer.ifname}: remove the pass program: {e}")
    if peer.features_off:
        try:
            with netns.inside(peer.netns):
                eth = Ethtool()
                try:
                    feats = eth.get_features(peer.ifname)
                    for f in peer.features_off:
                        feats.features[f].enable = True
                    eth.set_features(peer.ifname, feats)
                finally:
                    eth.close()
        except Exception as e:    # pyroute2's ethtool raises plain errors
            problems.append(f"{peer.netns}/{peer.ifname}: turn {', '.join(peer.features_off)} back on: {e}")
    return problems
