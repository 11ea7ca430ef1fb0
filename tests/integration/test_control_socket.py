"""The control socket under bad clients (issue 14): every malformed
request gets an error reply and is counted, an oversized one closes its
connection, idle and half-open clients are dropped, beyond MAX_CLIENTS a
client is told to retry; and a fuzzer's thousand bad requests while a
transfer crosses a real box leave the transfer intact and the controller
answering.  (The speed of that transfer under fuzzing is a benchmark's
figure, not this test's.)"""

from __future__ import annotations

import json
import os
import random
import socket
import threading

import pytest

from conftest import firewall_config, running
from ctctl.box import control
from ctctl.box.state import sock_path
from ctctl.lab import traffic
from ctctl.lab.fuzz import connect, fuzz
from ctctl.lab.waiting import wait_until

pytestmark = [pytest.mark.root, pytest.mark.integration]


@pytest.fixture
def served(monkeypatch):
    """A control Server with a dispatch that answers ping, on a unique name;
    IDLE_S short so that the idle test waits little."""
    monkeypatch.setattr(control, "IDLE_S", 1.0)
    name = f"ctctl-ctl-{os.getpid()}-{random.randrange(1 << 30):x}"
    logged = []

    def dispatch(req):
        if req.get("op") != "ping":
            raise ValueError(f"unknown op {req.get('op')!r}")
        return {"pong": True}
    srv = control.Server(name, dispatch, log=logged.append)
    srv.start()
    try:
        yield name, srv, logged
    finally:
        srv.close()


def replies(s: socket.socket, n: int) -> list[dict]:
    buf = b""
    while buf.count(b"\n") < n:
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    return [json.loads(x) for x in buf.splitlines()]


@pytest.mark.parametrize("line, error", [
    (b"not json\n", "not a request: Expecting value"),
    (b"[1, 2]\n", "not a request: request must be a JSON object"),
    (b"\xff\xfe\n", "not a request:"),
    (b'{"op": 7}\n', "unknown op 7"),
    (b'{"op": "nosuch"}\n', "unknown op 'nosuch'"),
])
def test_a_malformed_request_gets_an_error_and_the_connection_goes_on(served, line, error):
    name, srv, logged = served
    with connect(name) as s:
        s.sendall(line + b'{"op": "ping"}\n')
        bad, good = replies(s, 2)
    assert not bad["ok"] and bad["error"].startswith(error), bad
    assert good == {"ok": True, "pong": True}
    if error.startswith("not a request"):
        assert srv.counters["malformed"] == 1 and len(logged) == 1 and "control.malformed" in logged[0]


def test_an_oversized_request_is_refused_and_its_connection_closed(served):
    name, srv, _ = served
    with connect(name) as s:
        try:
            s.sendall(b"x" * (control.MAX_REQUEST + 10))
        except OSError:
            pass        # the server may close before it has read everything
        (reply,) = replies(s, 1)
        assert not reply["ok"] and "longer than" in reply["error"]
        assert s.recv(1) == b""           # closed
    assert srv.counters["oversized"] == 1
    assert control.request(name, "ping") == {"pong": True}


def test_idle_and_half_open_clients_are_dropped(served):
    name, srv, _ = served
    idle = connect(name)
    half = connect(name)
    half.sendall(b'{"op": "pi')             # half a request, then nothing
    try:
        wait_until(lambda: srv.counters["idle_dropped"] >= 2, 30, "both clients dropped")
        assert idle.recv(1) == b"" and half.recv(1) == b""
    finally:
        idle.close()
        half.close()


def test_beyond_max_clients_a_client_is_told_to_retry(served):
    name, srv, _ = served
    held = []
    try:
        # Each held client is served (in its thread) before the next comes.
        for _ in range(control.MAX_CLIENTS):
            held.append(connect(name))
            held[-1].sendall(b'{"op": "ping"}\n')
            assert replies(held[-1], 1)[0]["ok"]
        with connect(name) as extra:
            (reply,) = replies(extra, 1)
        assert not reply["ok"] and "try again" in reply["error"]
        assert srv.counters["clients_refused"] == 1
    finally:
        for s in held:
            s.close()
    # The held clients' threads give their slots back as they see the close:
    # until then a new client is told to retry, which is the behaviour here.
    def slot_free():
        try:
            return control.request(name, "ping") == {"pong": True}
        except control.ControlError as e:
            if "try again" not in str(e):
                raise
            return False
    wait_until(slot_free, 30, "a slot free again")


def test_a_thousand_bad_requests_during_a_transfer(topo):
    with running(firewall_config(topo), topo) as b:
        result = {}
        t = threading.Thread(target=lambda: result.update(fuzz(b.name, 1000, random.Random(7))))
        t.start()
        try:
            res = traffic.tcp_transfer(b.client.netns, b.server.netns, b.server.addr4, 50_000_000, port=5021)
        finally:
            t.join(timeout=300)
        assert res.ok, res
        assert result and result["replied"] + result["closed"] == 1000 and result["replied"] >= 900, result
        st = b.stats()
        assert st["control"]["malformed"] >= 100, st["control"]
        assert b.request("ping")["pid"] == b.proc.pid       # still answering, the same controller


def test_only_root_reaches_the_socket_and_the_pins(topo):
    """The socket is root's alone (0600), and so are the pinned maps; an
    unprivileged user (nobody, through setpriv) can open neither."""
    import stat
    import subprocess
    import sys
    from pathlib import Path

    from ctctl.box import state

    with running(firewall_config(topo), topo) as b:
        path = sock_path(b.name)
        st = os.stat(path)
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0, oct(st.st_mode)
        pins = [p for p in Path(state.read_state(b.name)["pin_dir"]).rglob("*") if p.is_file()]
        assert pins and all(stat.S_IMODE(p.stat().st_mode) & 0o077 == 0 for p in pins), \
            [(str(p), oct(p.stat().st_mode)) for p in pins]
        probe = ("import socket, sys\n"
                 "s = socket.socket(socket.AF_UNIX)\n"
                 "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    print('socket refused')\n"
                 "try:\n    open(sys.argv[2], 'rb')\nexcept PermissionError:\n    print('pin refused')\n")
        r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
                            "-c", probe, str(path), str(pins[0])], capture_output=True, text=True, timeout=60)
        assert r.stdout.split("\n")[:2] == ["socket refused", "pin refused"], (r.stdout, r.stderr)
