"""Enter or open a named network namespace without ever creating it.

pyroute2 creates a namespace that does not exist when asked for a socket
in it (its `flags` default to O_CREAT), so a box whose namespace was
deleted under it would get an empty namespace of the same name back from
the first clean-up that looks there.  Everything in ctctl that works on an
existing namespace goes through here; only `ctctl topo create` makes them.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

from pyroute2 import IPRoute, netns as pr_netns

RUN_NETNS = "/run/netns"


class NoSuchNetns(FileNotFoundError):
    """The named namespace does not exist (and was not created)."""

    def __init__(self, name: str):
        super().__init__(2, f"netns {name!r} does not exist (ip netns list)", name)
        self.name = name


def exists(name: str) -> bool:
    return os.path.exists(os.path.join(RUN_NETNS, name))


def ipr(name: str) -> IPRoute:
    """An IPRoute socket inside `name`; NoSuchNetns when it is gone."""
    if not exists(name):
        raise NoSuchNetns(name)
    try:
        return IPRoute(netns=name, flags=0)
    except FileNotFoundError:
        raise NoSuchNetns(name) from None


@contextmanager
def inside(name: str):
    """Run the body in `name` (sockets made there stay there), and come
    back to the caller's namespace whatever happens."""
    if not exists(name):
        raise NoSuchNetns(name)
    pr_netns.pushns()
    try:
        try:
            pr_netns.setns(name, flags=0)
        except (FileNotFoundError, OSError) as e:
            if not exists(name):
                raise NoSuchNetns(name) from None
            raise e
        yield
    finally:
        pr_netns.popns()
