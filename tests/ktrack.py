"""Test support for connection tracking: the kernel's nf_conntrack as a
reference tracker (``KernelCt``, for the differential tests) and the TCP
transition matrix shared by unit and differential tests (the packet
builders and the fake clock are tests/helpers.py's).

``KernelCt`` builds two network namespaces joined by a veth pair: frames
crafted by the test are written with an AF_PACKET socket on the sender's
end and arrive at the other end, in a namespace where IP forwarding sends
them on out of a second veth pair to a MAC nobody owns.  Conntrack runs there
because of iptables rules in mangle PREROUTING that count packets per
``--ctstate``/``--ctdir``; the forwarded packet is confirmed at
POSTROUTING like any forwarded packet, and no local socket ever sees or
answers it, so only the crafted packets drive the state.

Per packet, ``send`` returns the class the kernel gave it (INVALID, NEW,
EST-O, EST-R, REL-O, REL-R, UNTRACKED): each class's rule is preceded by
an NFLOG rule whose prefix is the class, read from a netlink socket in
that namespace (an event per packet, where reading the rule counters cost
two execs per poll: 24 ms a packet here, seconds in an emulated guest).
``entries`` parses ``conntrack -L`` (accounting is on in that namespace).

Addresses: clients live in 10.1.0.0/24 and fd01::/64, servers in
10.2.0.0/24 and fd02::/64; both are routed out of a second veth pair to a
gateway MAC that nobody owns.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import select
import socket
import struct
import subprocess
import time

from pyroute2 import netns as pr_netns

CLASSES = [
    ("INVALID", ["-m", "conntrack", "--ctstate", "INVALID"]),
    ("UNTRACKED", ["-m", "conntrack", "--ctstate", "UNTRACKED"]),
    ("NEW", ["-m", "conntrack", "--ctstate", "NEW"]),
    ("EST-O", ["-m", "conntrack", "--ctstate", "ESTABLISHED", "--ctdir", "ORIGINAL"]),
    ("EST-R", ["-m", "conntrack", "--ctstate", "ESTABLISHED", "--ctdir", "REPLY"]),
    ("REL-O", ["-m", "conntrack", "--ctstate", "RELATED", "--ctdir", "ORIGINAL"]),
    ("REL-R", ["-m", "conntrack", "--ctstate", "RELATED", "--ctdir", "REPLY"]),
    ("OTHER", []),
]

NFLOG_GROUP = 7


class NflogSocket:
    """nfnetlink_log, bound to one group in the namespace it is made in:
    the prefix of every packet an NFLOG rule of that group logs."""

    NETLINK_NETFILTER = 12
    MSG_CONFIG, MSG_PACKET = (4 << 8) | 1, (4 << 8) | 0     # NFNL_SUBSYS_ULOG
    CFG_CMD, CFG_MODE, CFG_QTHRESH, CMD_BIND, COPY_NONE = 1, 2, 5, 1, 0
    ATTR_PREFIX = 10

    def __init__(self, netns: str, group: int):
        pr_netns.pushns(netns)
        try:
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, self.NETLINK_NETFILTER)
        finally:
            pr_netns.popns()
        try:
            self.sock.bind((0, 0))
            self._config(group, struct.pack("=HHB3x", 5, self.CFG_CMD, self.CMD_BIND))
            self._config(group, struct.pack("=HHIBx2x", 10, self.CFG_MODE, 0, self.COPY_NONE))
            # One packet per message, sent at once: the default batches up
            # to 100 for a second (and iptables-nft drops NFLOG's own
            # --nflog-threshold).
            self._config(group, struct.pack("=HH", 8, self.CFG_QTHRESH) + struct.pack(">I", 1))
        except BaseException:
            self.sock.close()
            raise

    def _config(self, group: int, attr: bytes) -> None:
        body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(group)) + attr
        self.sock.send(struct.pack("=IHHII", 16 + len(body), self.MSG_CONFIG, 0x1 | 0x4, 1, 0) + body)
        reply = self.sock.recv(65536)
        _len, typ, _f, _seq, _pid, err = struct.unpack_from("=IHHIIi", reply)
        if typ == 2 and err:   # NLMSG_ERROR with an errno
            raise OSError(-err, f"nfnetlink_log config: {os.strerror(-err)}")

    def prefixes(self, timeout: float) -> list[str]:
        """The prefixes logged so far; waits up to `timeout` for the first."""
        out: list[str] = []
        wait = timeout
        while select.select([self.sock], [], [], wait)[0]:
            data = self.sock.recv(65536)
            off = 0
            while off + 16 <= len(data):
                mlen, typ = struct.unpack_from("=IH", data, off)
                if typ == self.MSG_PACKET:
                    a = off + 20                      # nlmsghdr, nfgenmsg
                    while a + 4 <= off + mlen:
                        alen, atype = struct.unpack_from("=HH", data, a)
                        if atype & 0x7FFF == self.ATTR_PREFIX:
                            out.append(data[a + 4:a + alen].split(b"\0")[0].decode())
                        a += (alen + 3) & ~3
                off += (mlen + 3) & ~3
            wait = 0
        return out

    def close(self) -> None:
        self.sock.close()


def packet_socket(netns: str, dev: str, proto: int = 0) -> socket.socket:
    """An AF_PACKET socket bound to `dev` of `netns` (a socket stays in the
    namespace it was created in); protocol 0 receives nothing."""
    pr_netns.pushns(netns)
    try:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(proto))
        try:
            s.bind((dev, 0))
        except BaseException:
            s.close()
            raise
        return s
    finally:
        pr_netns.popns()


def run(*args: str, check: bool = True) -> str:
    p = subprocess.run(args, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({p.returncode}): {p.stderr.strip()}")
    return p.stdout


_LINE = re.compile(r"^(?P<l4>\w+)\s+(?P<num>\d+)\s+(?P<timeout>\d+)\s+(?P<rest>.*)$")


def parse_conntrack_line(line: str) -> dict:
    """One ``conntrack -L`` line to a dict: proto, timeout, state, orig and
    reply tuples (dicts), per-direction packets/bytes, flags, mark, zone."""
    m = _LINE.match(line.strip())
    if not m:
        raise ValueError(f"unparsable conntrack line: {line!r}")
    out = {"proto": m["l4"], "timeout": int(m["timeout"]), "state": None, "flags": set(),
           "mark": 0, "zone": 0, "packets": [0, 0], "bytes": [0, 0]}
    tuples: list[dict] = []
    for tok in m["rest"].split():
        if tok.startswith("["):
            out["flags"].add(tok.strip("[]"))
        elif "=" in tok:
            k, v = tok.split("=", 1)
            if k == "src":
                tuples.append({})
            if k in ("packets", "bytes"):
                out[k][len(tuples) - 1] = int(v)
            elif k in ("mark", "zone", "use"):
                out[k] = int(v)
            else:
                tuples[-1][k] = v
        elif not tuples:
            out["state"] = tok
    out["orig"], out["reply"] = tuples[0], tuples[1]
    return out


class KernelCt:
    """Context manager owning two namespaces; removed on exit, also after
    a failure."""

    def __init__(self):
        suffix = secrets.token_hex(3)
        self.tx = f"ctk-tx-{suffix}"
        self.ct = f"ctk-ct-{suffix}"
        self.sock: socket.socket | None = None
        self.log: NflogSocket | None = None
        self.dst_mac = None
        self._created: list[str] = []

    # -- setup -----------------------------------------------------------

    def __enter__(self) -> "KernelCt":
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def ns(self, *args: str, check: bool = True) -> str:
        return run("ip", "netns", "exec", self.ct, *args, check=check)

    def _setup(self) -> None:
        for name in (self.tx, self.ct):
            run("ip", "netns", "add", name)
            self._created.append(name)
        # The sender's stack must stay quiet (no IPv6 ND/MLD/RS of its own
        # reaching the counters): only crafted frames leave it.
        for k in ("all", "default"):
            run("ip", "netns", "exec", self.tx, "sysctl", "-qw", f"net.ipv6.conf.{k}.disable_ipv6=1")
        run("ip", "-n", self.tx, "link", "add", "a0", "type", "veth", "peer", "name", "b0",
            "netns", self.ct)
        for dev in ("lo", "a0"):
            run("ip", "-n", self.tx, "link", "set", dev, "up")
        sysctls = {
            "net.ipv4.ip_forward": "1", "net.ipv4.conf.all.rp_filter": "0",
            "net.ipv4.conf.default.rp_filter": "0", "net.ipv4.conf.all.send_redirects": "0",
            "net.ipv4.conf.default.send_redirects": "0", "net.ipv6.conf.all.forwarding": "1",
            "net.ipv6.conf.default.accept_dad": "0", "net.ipv6.conf.all.accept_dad": "0",
        }
        for k, v in sysctls.items():
            self.ns("sysctl", "-qw", f"{k}={v}")
        # The way out: a second veth pair towards a gateway whose MAC
        # nobody has, so forwarded frames die at the far end (no dummy
        # module on every kernel).
        run("ip", "-n", self.tx, "link", "add", "c1", "type", "veth", "peer", "name", "c0",
            "netns", self.ct)
        run("ip", "-n", self.tx, "link", "set", "c1", "up")
        for dev in ("lo", "b0", "c0"):
            run("ip", "-n", self.ct, "link", "set", dev, "up")
        self.ns("sysctl", "-qw", "net.ipv4.conf.b0.rp_filter=0")
        run("ip", "-n", self.ct, "addr", "add", "10.9.0.1/24", "dev", "b0")
        run("ip", "-n", self.ct, "addr", "add", "10.8.0.1/24", "dev", "c0")
        run("ip", "-n", self.ct, "-6", "addr", "add", "fd08::1/64", "dev", "c0", "nodad")
        for gw in ("10.8.0.2", "fd08::2"):
            run("ip", "-n", self.ct, "neigh", "replace", gw, "lladdr", "02:00:00:00:00:99",
                "dev", "c0", "nud", "permanent")
        for net, gw in (("10.1.0.0/24", "10.8.0.2"), ("10.2.0.0/24", "10.8.0.2"),
                        ("fd01::/64", "fd08::2"), ("fd02::/64", "fd08::2")):
            run("ip", "-n", self.ct, "route", "add", net, "via", gw, "dev", "c0")
        for fam in ("iptables", "ip6tables"):
            self.ns(fam, "-t", "mangle", "-N", "CTSTATE")
            self.ns(fam, "-t", "mangle", "-A", "PREROUTING", "-i", "b0", "-j", "CTSTATE")
            for name, match in CLASSES:
                self.ns(fam, "-t", "mangle", "-A", "CTSTATE", *match, "-j", "NFLOG",
                        "--nflog-group", str(NFLOG_GROUP), "--nflog-prefix", name)
                self.ns(fam, "-t", "mangle", "-A", "CTSTATE", *match, "-j", "RETURN")
        # Accounting per entry, so packets/bytes can be compared too; the
        # file exists once conntrack is loaded in this namespace.
        self.ns("sysctl", "-qw", "net.netfilter.nf_conntrack_acct=1")
        mac = run("ip", "-n", self.ct, "-j", "link", "show", "b0")
        self.dst_mac = json.loads(mac)[0]["address"]
        self.src_mac = json.loads(run("ip", "-n", self.tx, "-j", "link", "show", "a0"))[0]["address"]
        self.sock = packet_socket(self.tx, "a0")
        self.log = NflogSocket(self.ct, NFLOG_GROUP)

    def close(self) -> None:
        for s in (self.sock, self.log):
            if s is not None:
                s.close()
        self.sock = self.log = None
        for name in reversed(self._created):
            run("ip", "netns", "del", name, check=False)
        self._created.clear()

    # -- use -------------------------------------------------------------

    def sysctl(self, key: str, value) -> None:
        self.ns("sysctl", "-qw", f"{key}={value}")

    def flush(self) -> None:
        self.ns("conntrack", "-F", check=False)
        self.log.prefixes(0)

    def send(self, frame: bytes, family: int, timeout: float = 5.0) -> str:
        """Send one Ethernet frame and return the class conntrack gave it.
        (`family` is the frame's; each family's chain logs its classes.)"""
        self.sock.send(frame)
        seen = self.log.prefixes(timeout)
        if not seen:
            raise TimeoutError("the kernel did not see the frame")
        # Anything else logged by now would be a stray packet counted in.
        seen += self.log.prefixes(0.002)
        if len(seen) != 1:
            raise RuntimeError(f"expected one logged packet, got {seen}")
        return seen[0]

    def entries(self, family: int | None = None) -> list[dict]:
        args = ["conntrack", "-L"]
        if family == 6:
            args += ["-f", "ipv6"]
        out = self.ns(*args, check=False)
        return [parse_conntrack_line(ln) for ln in out.splitlines() if ln.strip()]


# ----------------------------------------------------------------------
# The TCP transition matrix: a connection driven into each state, then one
# probe segment of each flag class in each direction, in window.  Shared by
# the unit test (expected outcomes from the kernel's table) and the
# differential test (expected outcomes from the kernel itself).

MATRIX_STATES = ["NONE", "SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT",
                 "LAST_ACK", "TIME_WAIT", "CLOSE", "SYN_SENT2"]
MATRIX_CLASSES = ["syn", "synack", "fin", "ack", "rst", "none"]
M_CISN, M_SISN = 1000, 5000


def tcp_path(state: str, make):
    """Segments that bring a connection to ``state`` and the next sequence
    numbers (client, server) after them.  ``make(d, flags, seq, ack)``
    builds one segment, d='o' (client to server) or 'r'."""
    c1, s1 = M_CISN + 1, M_SISN + 1
    syn = make("o", "S", M_CISN, 0)
    synack = make("r", "SA", M_SISN, c1)
    ack = make("o", "A", c1, s1)
    est = [syn, synack, ack]
    paths = {
        "NONE": ([], M_CISN, M_SISN),
        "SYN_SENT": ([syn], c1, M_SISN),
        "SYN_SENT2": ([syn, make("r", "S", M_SISN, 0)], c1, s1),
        "SYN_RECV": ([syn, synack], c1, s1),
        "ESTABLISHED": (est, c1, s1),
        "FIN_WAIT": (est + [make("o", "FA", c1, s1)], c1 + 1, s1),
        "CLOSE_WAIT": (est + [make("o", "FA", c1, s1), make("r", "A", s1, c1 + 1)], c1 + 1, s1),
        "LAST_ACK": (est + [make("o", "FA", c1, s1), make("r", "A", s1, c1 + 1),
                            make("r", "FA", s1, c1 + 1)], c1 + 1, s1 + 1),
        "TIME_WAIT": (est + [make("o", "FA", c1, s1), make("r", "A", s1, c1 + 1),
                             make("r", "FA", s1, c1 + 1), make("o", "A", c1 + 1, s1 + 1)],
                      c1 + 1, s1 + 1),
        "CLOSE": (est + [make("o", "R", c1, 0)], c1, s1),
    }
    return paths[state]


def tcp_probe(state: str, d: str, cls: str, cnext: int, snext: int, make):
    """One in-window segment of flag class ``cls`` sent in direction ``d``."""
    nxt, other = (cnext, snext) if d == "o" else (snext, cnext)
    isn = M_CISN if d == "o" else M_SISN
    if cls == "syn":
        fresh = state in ("TIME_WAIT", "CLOSE", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT", "LAST_ACK")
        return make(d, "S", nxt + 100000 if fresh else isn, 0)
    if cls == "synack":
        return make(d, "SA", isn, other)
    if cls == "fin":
        return make(d, "FA", nxt, other)
    if cls == "ack":
        return make(d, "A", nxt, other)
    if cls == "rst":
        return make(d, "R", nxt, 0)
    return make(d, "", nxt, other)


def tcp_matrix(make):
    """name -> (state, direction, class, segments) for every cell."""
    out = {}
    for state in MATRIX_STATES:
        for d in ("o", "r"):
            if state == "NONE" and d == "r":
                continue  # no entry has a reply direction yet
            for cls in MATRIX_CLASSES:
                path, cn, sn = tcp_path(state, make)
                out[f"tcp {state} {'orig' if d == 'o' else 'reply'} {cls}"] = (
                    state, d, cls, path + [tcp_probe(state, d, cls, cn, sn, make)])
    return out


class KernelNat(KernelCt):
    """KernelCt plus iptables NAT rules, capturing what the kernel forwards
    (on the far end of the way-out veth) so that rewritten packets can be
    compared byte-for-field with ctctl's."""

    SNAT_TO = "192.0.2.1"
    VIP, DNAT_TO, DNAT_PORT = "10.2.0.100", "10.2.0.9", 8080

    def _setup(self) -> None:
        super()._setup()
        # DNAT clients live in 10.3.0.0/24, out of reach of the SNAT rule.
        run("ip", "-n", self.ct, "route", "add", "10.3.0.0/24", "via", "10.8.0.2", "dev", "c0")
        self.ns("iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "c0", "-s", "10.1.0.0/24",
                "-j", "SNAT", "--to-source", self.SNAT_TO)
        for proto in ("tcp", "udp"):
            self.ns("iptables", "-t", "nat", "-A", "PREROUTING", "-i", "b0", "-d", self.VIP, "-p", proto,
                    "--dport", "80", "-j", "DNAT", "--to-destination", f"{self.DNAT_TO}:{self.DNAT_PORT}")
        self.cap = packet_socket(self.tx, "c1", proto=0x0003)   # ETH_P_ALL
        self.cap.settimeout(0.05)

    def close(self) -> None:
        cap = getattr(self, "cap", None)
        if cap is not None:
            cap.close()
            self.cap = None
        super().close()

    def drain(self) -> None:
        while True:
            try:
                self.cap.recv(65535)
            except (TimeoutError, socket.timeout):
                return

    def forwarded(self, want, timeout: float = 5.0) -> bytes:
        """The first frame forwarded out of the box for which ``want(frame)``
        is true."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = self.cap.recv(65535)
            except (TimeoutError, socket.timeout):
                continue
            if want(data):
                return data
        raise TimeoutError("the kernel forwarded no matching frame")
