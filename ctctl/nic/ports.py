"""Which of a box's ports still exist: a port can be deleted, or its
namespace, under a running box (a NIC's port unplugged).  One netlink
socket in the box's namespace, kept open, asked for the links when the
controller looks (once a second)."""

from __future__ import annotations

from ctctl import netns


class PortWatch:
    def __init__(self, netns_name: str, ports: list[str]):
        self.netns = netns_name
        self.ports = list(ports)
        self._ipr = None

    def missing(self) -> list[str]:
        """The ports that are gone, in the config's order (all of them when
        the namespace is gone)."""
        if not netns.exists(self.netns):
            # Deleted (`ip netns del`): our open socket would keep it alive
            # and show its links; its name is what counts.
            self.close()
            return list(self.ports)
        try:
            if self._ipr is None:
                self._ipr = netns.ipr(self.netns)
            names = {link.get_attr("IFLA_IFNAME") for link in self._ipr.get_links()}
        except netns.NoSuchNetns:
            return list(self.ports)
        except OSError:
            # The namespace went away under an open socket: ask again next time.
            self.close()
            return list(self.ports) if not netns.exists(self.netns) else []
        return [p for p in self.ports if p not in names]

    def close(self) -> None:
        if self._ipr is not None:
            try:
                self._ipr.close()
            except OSError:
                pass
            self._ipr = None
