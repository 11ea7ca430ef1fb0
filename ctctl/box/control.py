"""The control socket of a running box: newline-delimited JSON requests
and replies on /run/ctctl/<name>.sock, served in a thread of the
controller, and the client side that the CLI and the lab use.  What each
request does is ctctl.box.requests'.
"""

from __future__ import annotations

import json
import os
import socket
import socketserver
import sys
import threading
from typing import Callable

from . import state
from .state import RUN_DIR, sock_path


class ControlError(Exception):
    def __init__(self, msg: str, column: int | None = None):
        super().__init__(msg)
        self.column = column


# What one client may ask of the controller: the control thread shares the
# interpreter with the packet path, so a bad client must cost little.
MAX_REQUEST = 1 << 20     # bytes in one request line
IDLE_S = 30.0             # a client that sends nothing for this long is dropped
MAX_CLIENTS = 32          # connections served at once; more are told to retry


class Server:
    """Serves requests {"op": ..., ...} with `dispatch(request) -> dict` in
    a thread of its own; the reply gets "ok": true, or "ok": false and
    "error" when dispatch raised.  Bad clients are answered and counted
    (`counters`), never let in the way: a line that is not a JSON object
    gets an error reply, one longer than MAX_REQUEST an error and the
    connection closed, an idle or half-open client is dropped after
    IDLE_S, and beyond MAX_CLIENTS at once a client is told to retry."""

    def __init__(self, name: str, dispatch: Callable[[dict], dict], log=None):
        RUN_DIR.mkdir(parents=True, exist_ok=True)
        path = sock_path(name)
        if path.exists():
            path.unlink()  # stale: the state file check ran before us
        self.counters = {"requests": 0, "malformed": 0, "oversized": 0, "idle_dropped": 0, "clients_refused": 0}
        self.log = log or (lambda text: print(f"ctctl: control socket: {text}", file=sys.stderr, flush=True))
        server = self
        lock = threading.Lock()      # client threads count side by side

        def count(what: str, text: str | None = None) -> None:
            with lock:
                first = not server.counters[what]
                server.counters[what] += 1
            if first and text:
                server.log(f"{text} (counted in stats as control.{what}; logged once)")

        class Handler(socketserver.StreamRequestHandler):
            timeout = IDLE_S      # applied to the socket by setup()

            def handle(self):
                while True:
                    try:
                        line = self.rfile.readline(MAX_REQUEST + 1)
                    except (TimeoutError, socket.timeout):
                        count("idle_dropped", f"a client sent nothing for {IDLE_S:g} s: dropped")
                        return
                    except OSError:
                        return
                    if not line:
                        return
                    if len(line) > MAX_REQUEST:
                        count("oversized", f"a request longer than {MAX_REQUEST} bytes: refused, connection closed")
                        self._reply({"ok": False, "error": f"request longer than {MAX_REQUEST} bytes"})
                        return
                    count("requests")
                    try:
                        req = json.loads(line)
                        if not isinstance(req, dict):
                            raise ValueError("request must be a JSON object")
                    except ValueError as e:      # also bytes that are not UTF-8
                        count("malformed", f"a request that is not a JSON object: {e}")
                        reply = {"ok": False, "error": f"not a request: {e}"}
                    else:
                        try:
                            reply = {"ok": True, **dispatch(req)}
                        except (ControlError, ValueError) as e:  # the caller's mistake: say what
                            reply = {"ok": False, "error": str(e), "column": getattr(e, "column", None)}
                        except Exception as e:  # our bug: the reply carries it, the box goes on
                            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
                    if not self._reply(reply):
                        return

            def _reply(self, reply: dict) -> bool:
                try:
                    self.wfile.write((json.dumps(reply) + "\n").encode())
                    self.wfile.flush()
                    return True
                except OSError:       # the client went away before its answer
                    return False

        class UnixServer(socketserver.ThreadingUnixStreamServer):
            daemon_threads = True
            request_queue_size = 128     # listen() backlog: clients arriving together are not refused by the kernel
            slots = threading.BoundedSemaphore(MAX_CLIENTS)

            def process_request(self, request, client_address):
                if not self.slots.acquire(blocking=False):
                    count("clients_refused", f"more than {MAX_CLIENTS} clients at once: one told to retry")
                    try:
                        request.sendall((json.dumps({"ok": False, "error": f"the box serves {MAX_CLIENTS} "
                                                     "clients at once: try again"}) + "\n").encode())
                    except OSError:
                        pass
                    self.shutdown_request(request)
                    return
                super().process_request(request, client_address)

            def process_request_thread(self, request, client_address):
                try:
                    super().process_request_thread(request, client_address)
                finally:
                    self.slots.release()

        self.path = path
        self.server = UnixServer(str(path), Handler)
        os.chmod(path, 0o600)
        self.thread = threading.Thread(target=self.server.serve_forever, name="ctctl-control", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def _why_no_answer(name: str, path, e: OSError) -> str:
    """What a user needs to hear when nobody listens on a box's socket:
    not loaded, or loaded by a controller that has died (its program may
    still run on the ports, and its state file says what to clean up)."""
    st = state.read_state(name)
    if st is None:
        return f"box {name!r} is not loaded (no {path})"
    pid = st.get("pid")
    if state.pid_alive(pid):
        return (f"box {name!r}: controller pid {pid} runs but does not answer on {path} "
                f"({e.strerror or e})")
    return (f"box {name!r}: its controller (pid {pid}) is gone; its program may still run on the ports. "
            f"`ctctl load` with its config adopts it (its traffic untouched); "
            f"`ctctl unload --name {name}` cleans up")


def request(name: str, op: str, timeout: float = 10.0, **args) -> dict:
    """One request to the box `name`; raises ControlError when the box does
    not answer or answers with an error."""
    path = sock_path(name)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            s.sendall((json.dumps({"op": op, **args}) + "\n").encode())
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
    except (FileNotFoundError, ConnectionRefusedError) as e:
        raise ControlError(_why_no_answer(name, path, e)) from None
    except OSError as e:
        raise ControlError(f"box {name!r} does not answer on {path}: {e.strerror or e}") from None
    if not buf:
        raise ControlError(f"box {name!r} closed the connection without a reply")
    reply = json.loads(buf)
    if not reply.pop("ok", False):
        raise ControlError(reply.get("error", "unknown error"), reply.get("column"))
    return reply
