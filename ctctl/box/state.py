"""The files a loaded box keeps under /run/ctctl/: <name>.json, the state
that lets `ctctl unload` clean up after a controller that died, and the
next `ctctl load` adopt its program (pid, namespace, what was attached,
pins, the program's id, the rules and their hardware ids); <name>.conns,
the record of its offloaded connections (ctctl.box.journal); and
<name>.sock, its control socket.  The state is written atomically: a crash
at any moment leaves the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
from pathlib import Path

RUN_DIR = Path(os.environ.get("CTCTL_RUN_DIR", "/run/ctctl"))


def sock_path(name: str) -> Path:
    return RUN_DIR / f"{name}.sock"


def state_path(name: str) -> Path:
    return RUN_DIR / f"{name}.json"


def journal_path(name: str) -> Path:
    return RUN_DIR / f"{name}.conns"


def write_state(name: str, state: dict) -> None:
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    tmp = state_path(name).with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(state_path(name))


def read_state(name: str) -> dict | None:
    try:
        return json.loads(state_path(name).read_text())
    except FileNotFoundError:
        return None


def remove_state(name: str) -> None:
    for p in (state_path(name), sock_path(name), journal_path(name)):
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def pid_alive(pid) -> bool:
    """Does the process the state file names still run?  A zombie (killed,
    not yet reaped by its parent) does not."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)   # signal 0: a check, delivers nothing
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        # /proc/PID/stat: "pid (comm) state ..."; comm may hold spaces.
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] not in "ZX"
    except (OSError, ValueError, IndexError):
        return True


def boxes() -> list[str]:
    """The names of the boxes that have a state file (loaded, or left
    behind by a controller that died)."""
    if not RUN_DIR.is_dir():
        return []
    return sorted(p.stem for p in RUN_DIR.glob("*.json"))


def boxes_in(namespaces) -> list[tuple[str, dict]]:
    """The boxes (name, state) whose namespace is one of `namespaces`."""
    out = []
    for name in boxes():
        st = read_state(name) or {}
        if st.get("netns") in namespaces:
            out.append((name, st))
    return out


def port_owner(netns_name: str, port: str) -> tuple[str, dict] | None:
    """The box (name, state) whose program is attached to `port` of
    `netns_name`, if one has a state file."""
    for name, st in boxes_in([netns_name]):
        if any(a.get("ifname") == port for a in st.get("attached", [])):
            return name, st
    return None
