"""Bad clients for a box's control socket: malformed requests (not JSON,
not an object, wrong types, unknown ops, bytes that are not UTF-8,
oversized lines), sent one after another on fresh and reused connections.
Used by the control socket's test and by bench/bench_fuzz.py."""

from __future__ import annotations

import random
import socket
import time

from ctctl.box.state import sock_path

REQUESTS = [
    b"", b"\n", b"{", b"}", b"null\n", b"42\n", b'"op"\n', b'{"op": null}\n', b'{"op": []}\n',
    b'{"op": "conntrack", "action": 5}\n', b'{"op": "filter", "line": {"x": 1}}\n',
    b'{"op": "events", "since": -1}\n', b'{"op": "events", "since": "x"}\n',
    b'{"op": "offload", "action": "del", "id": "nope"}\n', b'{"op": "timeout", "changes": 3}\n',
    b'{"op": "aging", "mode": {"a": 1}}\n', b"\x00\x01\x02\n", b'{"op": "stats"' + b" " * 5000 + b"\n",
]


def connect(name: str, timeout: float = 10) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(sock_path(name)))
    return s


def fuzz(name: str, n: int, rng: random.Random, pause: float = 0.002) -> dict:
    """n bad requests to box `name`, a new connection every ten; how each
    ended: "replied" (an answer came) or "closed" (the box hung up).
    `pause` between requests makes a steady stream rather than a flood."""
    seen = {"replied": 0, "closed": 0}
    s = None
    try:
        for i in range(n):
            if s is None or i % 10 == 0:
                if s is not None:
                    s.close()
                s = connect(name)
            line = rng.choice(REQUESTS) + bytes(rng.randrange(256) for _ in range(rng.randrange(4)))
            try:
                s.sendall(line if line.endswith(b"\n") else line + b"\n")
                got = s.recv(65536)
            except OSError:
                got = b""
            if got:
                seen["replied"] += 1
            else:
                seen["closed"] += 1
                s.close()
                s = None
            time.sleep(pause)     # pacing of the stream, not a wait for a condition
    finally:
        if s is not None:
            s.close()
    return seen
