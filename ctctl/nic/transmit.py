"""Send frames out of a box's ports: software's half of the data path.

One AF_PACKET socket per port, created inside the box's namespace (a socket
stays in the namespace it was created in).  Protocol 0 means the socket
receives nothing: the program's punts are our only input.
"""

from __future__ import annotations

import socket

from ctctl import netns


class Transmitter:
    def __init__(self, netns_name: str, ports: list[str]):
        self.socks: dict[str, socket.socket] = {}
        try:
            with netns.inside(netns_name):
                for port in ports:
                    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
                    s.bind((port, 0))
                    self.socks[port] = s
        except BaseException:
            self.close()
            raise

    def send(self, port: str, frame: bytes | bytearray) -> None:
        """Raises OSError (e.g. EMSGSIZE beyond the port's MTU)."""
        self.socks[port].send(frame)

    def close(self) -> None:
        for s in self.socks.values():
            s.close()
        self.socks.clear()
