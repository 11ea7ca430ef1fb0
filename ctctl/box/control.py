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
import threading
from typing import Callable

from . import state
from .state import RUN_DIR, sock_path


class ControlError(Exception):
    def __init__(self, msg: str, column: int | None = None):
        super().__init__(msg)
        self.column = column


class Server:
    """Serves requests {"op": ..., ...} with `dispatch(request) -> dict` in
    a thread of its own; the reply gets "ok": true, or "ok": false and
    "error" when dispatch raised."""

    def __init__(self, name: str, dispatch: Callable[[dict], dict]):
        RUN_DIR.mkdir(parents=True, exist_ok=True)
        path = sock_path(name)
        if path.exists():
            path.unlink()  # stale: the state file check ran before us

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                for line in self.rfile:
                    try:
                        req = json.loads(line)
                        if not isinstance(req, dict):
                            raise ValueError("request must be a JSON object")
                        reply = {"ok": True, **dispatch(req)}
                    except (ControlError, ValueError) as e:  # the caller's mistake: say what
                        reply = {"ok": False, "error": str(e), "column": getattr(e, "column", None)}
                    except Exception as e:  # our bug: the reply carries it, the box goes on
                        reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
                    self.wfile.write((json.dumps(reply) + "\n").encode())
                    self.wfile.flush()

        class UnixServer(socketserver.ThreadingUnixStreamServer):
            daemon_threads = True

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
            f"`ctctl unload --name {name}` cleans up, then `ctctl load` starts it again")


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
