"""Stop a box: ask its controller, or clean up after one that died.

A controller that answers is asked to stop and waited for; it detaches and
unpins on its own.  When it is gone (killed, crashed) its state file says
what it attached and pinned, and that is removed here.
"""

from __future__ import annotations

import time
from pathlib import Path

from ctctl.box import control, state as boxstate
from ctctl.nic import loader


def unload(name: str, timeout: float = 10.0) -> list[str]:
    state = boxstate.read_state(name)
    if state is None:
        pin_dir = loader.PIN_ROOT / name
        if pin_dir.exists():
            loader.unpin(pin_dir)
            return [f"box {name}: no controller state; removed pins {pin_dir}"]
        raise control.ControlError(f"box {name!r} is not loaded")
    pid = state.get("pid")
    if boxstate.pid_alive(pid):
        try:
            control.request(name, "stop", timeout=timeout)
        except control.ControlError as e:
            raise control.ControlError(f"{e}; end it (kill {pid}), then `ctctl unload --name {name}` "
                                       "cleans up after it") from None
        deadline = time.monotonic() + timeout
        while boxstate.pid_alive(pid) and boxstate.read_state(name) is not None:
            if time.monotonic() > deadline:
                raise control.ControlError(f"box {name!r}: controller pid {pid} did not stop within {timeout:g} s")
            time.sleep(0.05)
        return [f"box {name} unloaded (controller pid {pid} stopped)"]
    # The controller died without cleaning up: do it from its state file.
    attached = [loader.Attachment(**a) for a in state.get("attached", [])]
    problems = loader.detach(state.get("netns", ""), attached)
    loader.unpin(Path(state.get("pin_dir") or loader.PIN_ROOT / name))
    boxstate.remove_state(name)
    lines = [f"box {name}: controller pid {pid} was gone; detached {len(attached)} port(s), removed pins"]
    lines += [f"  warning: {p}" for p in problems]
    return lines
