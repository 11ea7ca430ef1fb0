"""Real traffic between hosts of a topology, made by real programs: ping,
nc (netcat-openbsd) for TCP, and a small UDP echo pair run as its own
process (`python -m ctctl.lab.traffic`).  Used by the demo, the tests and the
benchmarks.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from ctctl.lab.topology import ns_exec, ns_popen
from ctctl.lab.waiting import wait_until

# How long a server (nc, the Python echo servers) may take to start
# listening: a Python start under TCG in the VM stage takes far longer
# than here (vm/vm.mk raises it there).
START_TIMEOUT = float(os.environ.get("CTCTL_START_TIMEOUT", "30"))


@dataclass
class PingResult:
    sent: int
    received: int

    @property
    def ok(self) -> bool:
        return self.sent > 0 and self.received == self.sent


def ping(ns: str, addr: str, count: int = 5, timeout: float = 30, interval: float = 0.2) -> PingResult:
    r = ns_exec(ns, "ping", "-c", str(count), "-i", str(interval), "-W", "5", addr,
                capture_output=True, text=True, timeout=timeout)
    m = re.search(r"(\d+) packets transmitted, (\d+) received", r.stdout)
    return PingResult(int(m[1]), int(m[2])) if m else PingResult(count, 0)


@dataclass
class TransferResult:
    size: int
    sent_sha256: str
    received_sha256: str
    received_size: int
    seconds: float
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.sent_sha256 == self.received_sha256 and self.received_size == self.size


def listening(ns: str, proto: str, port: int) -> bool:
    flag = "-ltnH" if proto == "tcp" else "-lunH"
    r = ns_exec(ns, "ss", flag, f"sport = :{port}", capture_output=True, text=True)
    return bool(r.stdout.strip())


def tcp_transfer(client_ns: str, server_ns: str, server_addr: str, size: int,
                 port: int = 5001, timeout: float = 120,
                 server_half_close: int | None = None, rate: float | None = None,
                 idle: float = 10) -> TransferResult:
    """Send `size` random bytes with nc from client to server; compare
    SHA-256 of what was sent and what arrived.  IPv6 when `server_addr`
    is an IPv6 address (nc listens on IPv4 only unless told).  With
    `server_half_close=N` the server shuts its side down (a FIN) once N
    bytes have arrived, as servers with nothing to say do (`nc -l -N` does
    it when it notices its empty input, somewhere in the transfer), and the
    rest of the client's data follows that FIN: `python -m
    ctctl.lab.traffic tcp-sink --half-close-after N` is that server.
    With `rate` (bytes/s) the client's input is fed at that pace, so that
    an event in the middle of the transfer (that FIN) is in the middle of
    it in time too, whatever the machine's speed.  nc gives up silently
    (exit 0, the data cut short) after `idle` seconds without progress:
    raise it where TCP is expected to back off for long (retransmissions
    behind a flooded punt ring)."""
    family = ["-6"] if ":" in server_addr else []
    with tempfile.TemporaryDirectory(prefix="ctctl-tcp-") as d:
        src, dst = os.path.join(d, "sent"), os.path.join(d, "received")
        with open(src, "wb") as f:
            f.write(os.urandom(size))
        with open(dst, "wb") as out:
            if server_half_close is not None:
                server = ns_popen(server_ns, sys.executable, "-m", "ctctl.lab.traffic", "tcp-sink",
                                  "--port", str(port), "--half-close-after", str(server_half_close),
                                  *family, stdout=out,
                                  stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
            else:
                server = ns_popen(server_ns, "nc", "-l", "-n", *family, str(port), stdout=out,
                                  stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_until(lambda: listening(server_ns, "tcp", port) or server.poll() is not None,
                       START_TIMEOUT, f"nc to listen on {server_ns}:{port}")
            t0 = time.monotonic()
            with open(src, "rb") as inp:
                if rate is None:
                    client = ns_exec(client_ns, "nc", "-N", "-n", "-w", str(int(idle)), server_addr, str(port),
                                     stdin=inp, capture_output=True, timeout=timeout)
                else:
                    client = _paced_nc(client_ns, server_addr, port, inp, rate, timeout, idle)
            server.wait(timeout=timeout)
            secs = time.monotonic() - t0
            err = ""
            if client.returncode:
                err = f"nc client exited {client.returncode}: {client.stderr.decode().strip()}"
        except subprocess.TimeoutExpired as e:
            secs, err = timeout, f"timed out: {e}"
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
        return TransferResult(size, _sha(src), _sha(dst), os.path.getsize(dst), secs, err)


def _paced_nc(client_ns: str, server_addr: str, port: int, inp, rate: float,
              timeout: float, idle: float) -> subprocess.CompletedProcess:
    """nc with its input written at `rate` bytes/s, in slices of 10 ms (the
    traffic's own pacing)."""
    nc = ns_popen(client_ns, "nc", "-N", "-n", "-w", str(int(idle)), server_addr, str(port), bufsize=0,
                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    piece = max(1, int(rate / 100))
    start, sent = time.monotonic(), 0
    try:
        for chunk in iter(lambda: inp.read(piece), b""):
            nc.stdin.write(chunk)
            sent += len(chunk)
            time.sleep(max(0.0, start + sent / rate - time.monotonic()))
        out, err = nc.communicate(timeout=timeout)     # closes its input: nc sends its FIN
    except BaseException:
        nc.kill()
        nc.wait()
        raise
    return subprocess.CompletedProcess(nc.args, nc.returncode, out, err)


def tcp_connect_blocked(client_ns: str, server_ns: str, server_addr: str, port: int = 5003,
                        wait: float = 3) -> bool:
    """True when a TCP connection from client_ns to a listening nc on
    server_ns does not get through within `wait` seconds: a firewall's
    drop, told apart from "nobody listens" by the listener being there."""
    server = ns_popen(server_ns, "nc", "-l", "-n", str(port), stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: listening(server_ns, "tcp", port), START_TIMEOUT, f"nc to listen on {server_ns}:{port}")
        r = ns_exec(client_ns, "nc", "-z", "-n", "-w", str(int(wait)), server_addr, str(port),
                    capture_output=True, timeout=wait + 30)
        return r.returncode != 0
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()


def _sha(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class UdpResult:
    sent: int
    echoed: int

    @property
    def ok(self) -> bool:
        return self.sent > 0 and self.echoed == self.sent


def udp_exchange(client_ns: str, server_ns: str, server_addr: str, count: int = 20,
                 port: int = 5002, timeout: float = 60, interval: float = 0.0,
                 paced: int | None = None) -> UdpResult:
    """`count` datagrams from client to a UDP echo server, each echoed back
    and checked; each one is retried if lost (a lost punt would show in the
    counters, not as a failed exchange)."""
    me = [sys.executable, "-m", "ctctl.lab.traffic"]
    server = ns_popen(server_ns, *me, "udp-echo-server", "--port", str(port), "--count", str(count),
                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: listening(server_ns, "udp", port) or server.poll() is not None,
                   START_TIMEOUT, f"the UDP echo server on {server_ns}:{port}")
        r = ns_exec(client_ns, *me, "udp-echo-client", server_addr, "--port", str(port),
                    "--count", str(count), "--interval", str(interval),
                    "--paced", str(count if paced is None else paced),
                    capture_output=True, text=True, timeout=timeout)
        m = re.search(r"echoed (\d+)/(\d+)", r.stdout)
        return UdpResult(int(m[2]), int(m[1])) if m else UdpResult(count, 0)
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()


class TcpStream:
    """One TCP connection between two real processes that lives as long as
    the caller wants: the client sends `chunk` bytes every `every` seconds
    (every=None: once, then nothing: an idle connection), `total` bytes at
    most, until stop(),
    which closes it cleanly (FIN both ways) and waits for both ends.  Used
    as a context manager; a stream not stopped is killed on exit (by pid:
    only its own two processes)."""

    def __init__(self, client_ns: str, server_ns: str, server_addr: str, port: int,
                 chunk: int = 1000, every: float | None = 0.05, total: int | None = None):
        me = [sys.executable, "-m", "ctctl.lab.traffic"]
        self.server = ns_popen(server_ns, *me, "tcp-sink", "--port", str(port),
                               stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.client = None
        try:
            wait_until(lambda: listening(server_ns, "tcp", port) or self.server.poll() is not None,
                       START_TIMEOUT, f"the TCP sink to listen on {server_ns}:{port}")
            self.client = ns_popen(client_ns, *me, "tcp-send", server_addr, "--port", str(port),
                                   "--chunk", str(chunk), *(["--every", str(every)] if every else []),
                                   *(["--total", str(total)] if total else []),
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            # The client says "connected" once its first chunk is sent.
            line = self.client.stdout.readline()
            if not line.startswith(b"connected"):
                raise RuntimeError(f"tcp-send did not connect: {self.client.stderr.read().decode().strip()}")
        except BaseException:
            self._kill()
            raise

    def stop(self, timeout: float = 30) -> int:
        """Close the connection (the client's FIN, then the server's) and
        wait for both ends; the bytes the client sent."""
        out, _ = self.client.communicate(input=b"", timeout=timeout)   # EOF on its stdin: stop
        self.server.wait(timeout=timeout)
        m = re.search(rb"sent (\d+)", out)
        return int(m[1]) if m else -1

    def _kill(self) -> None:
        for p in (self.client, self.server):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()

    def __enter__(self) -> "TcpStream":
        return self

    def __exit__(self, *exc) -> None:
        self._kill()


# -- the programs themselves --------------------------------------------------

def _tcp_sink(port: int, half_close_after: int | None, v6: bool) -> int:
    """Accept one connection and write what arrives to stdout; send our FIN
    once `half_close_after` bytes have arrived (0: before reading any)."""
    with socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("::" if v6 else "0.0.0.0", port))
        s.listen(1)
        conn, _ = s.accept()
        with conn:
            out, got = sys.stdout.buffer, 0
            while True:
                if half_close_after is not None and got >= half_close_after:
                    conn.shutdown(socket.SHUT_WR)
                    half_close_after = None
                data = conn.recv(1 << 16)
                if not data:
                    break
                got += len(data)
                out.write(data)
                out.flush()     # what arrived is in the file: a test can watch it grow
    return 0


def _tcp_send(addr: str, port: int, chunk: int, every: float | None, total: int | None = None) -> int:
    """Connect, send `chunk` bytes (again every `every` seconds when
    given, `total` bytes at most) until stdin reaches EOF; then close our
    side and wait for the server's FIN.  The pacing is the traffic's own,
    not a wait."""
    import select

    sent = 0
    with socket.create_connection((addr, port), timeout=30) as s:
        s.sendall(os.urandom(chunk))
        sent += chunk
        print("connected", flush=True)
        while True:
            ready, _, _ = select.select([sys.stdin.buffer], [], [], every)
            if ready and not os.read(sys.stdin.fileno(), 1 << 12):
                break
            if not ready and (total is None or sent < total):
                s.sendall(os.urandom(chunk))
                sent += chunk
        s.shutdown(socket.SHUT_WR)
        while s.recv(1 << 16):
            pass
    print(f"sent {sent}", flush=True)
    return 0


def _tcp_send_steps(addr: str, port: int) -> int:
    """Connect; for each line of stdin (a byte count), send that many
    random bytes and say `sent TOTAL`; at EOF close our side, wait for the
    server's FIN and say `done TOTAL SHA256`.  The caller decides when
    each part of the stream goes (before, during and after an event)."""
    h, sent = hashlib.sha256(), 0
    with socket.create_connection((addr, port), timeout=60) as s:
        print("connected", flush=True)
        for line in sys.stdin:
            left = int(line)
            while left > 0:
                data = os.urandom(min(left, 1 << 20))
                s.sendall(data)
                h.update(data)
                left -= len(data)
                sent += len(data)
            print(f"sent {sent}", flush=True)
        s.shutdown(socket.SHUT_WR)
        while s.recv(1 << 16):
            pass
    print(f"done {sent} {h.hexdigest()}", flush=True)
    return 0


def _udp_server(port: int, count: int) -> int:
    fam = socket.AF_INET6
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind(("::", port))
        s.settimeout(60)
        seen = set()
        while len(seen) < count:
            data, peer = s.recvfrom(65535)
            s.sendto(data, peer)
            seen.add(data)
    return 0


def _udp_client(addr: str, port: int, count: int, interval: float = 0.0, paced: int | None = None) -> int:
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    echoed = 0
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        s.connect((addr, port))
        s.settimeout(1.0)
        for i in range(count):
            if interval and 0 < i < (count if paced is None else paced):
                # The traffic's own pacing (a flow that lasts), not a wait.
                time.sleep(interval)
            msg = f"ctctl-udp-{i}-".encode() + os.urandom(16).hex().encode()
            for _attempt in range(5):
                s.send(msg)
                try:
                    while s.recv(65535) != msg:
                        pass
                    echoed += 1
                    break
                except (socket.timeout, ConnectionRefusedError):
                    continue
    print(f"echoed {echoed}/{count}")
    return 0 if echoed == count else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ctctl.lab.traffic")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("udp-echo-server")
    s.add_argument("--port", type=int, default=5002)
    s.add_argument("--count", type=int, default=20)
    c = sub.add_parser("udp-echo-client")
    c.add_argument("addr")
    c.add_argument("--port", type=int, default=5002)
    c.add_argument("--count", type=int, default=20)
    c.add_argument("--interval", type=float, default=0.0, help="seconds between datagrams")
    c.add_argument("--paced", type=int, default=None, help="pace only the first N datagrams, then burst")
    t = sub.add_parser("tcp-sink", help="accept one TCP connection, copy it to stdout")
    t.add_argument("--port", type=int, default=5001)
    t.add_argument("--half-close-after", type=int, default=None, metavar="BYTES",
                   help="send our FIN once BYTES have arrived (0: at once), and read on")
    t.add_argument("-6", dest="v6", action="store_true", help="IPv6")
    t = sub.add_parser("tcp-send", help="send to a TCP sink until stdin closes")
    t.add_argument("addr")
    t.add_argument("--port", type=int, default=5001)
    t.add_argument("--chunk", type=int, default=1000, help="bytes per send")
    t.add_argument("--every", type=float, default=None, help="seconds between sends (default: send once)")
    t.add_argument("--total", type=int, default=None, help="bytes to send at most")
    t = sub.add_parser("tcp-send-steps", help="send to a TCP sink as many bytes as each stdin line says")
    t.add_argument("addr")
    t.add_argument("--port", type=int, default=5001)
    a = p.parse_args(argv)
    if a.cmd == "tcp-send-steps":
        return _tcp_send_steps(a.addr, a.port)
    if a.cmd == "tcp-send":
        return _tcp_send(a.addr, a.port, a.chunk, a.every, a.total)
    if a.cmd == "tcp-sink":
        return _tcp_sink(a.port, a.half_close_after, a.v6)
    if a.cmd == "udp-echo-server":
        return _udp_server(a.port, a.count)
    return _udp_client(a.addr, a.port, a.count, a.interval, a.paced)


if __name__ == "__main__":
    sys.exit(main())
