"""Read a box's pinned maps without its controller: what `ctctl stats`
shows when only the data path is left (the controller was killed and the
program still runs on the ports)."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from ctctl import abi


def _possible_cpus() -> int:
    # Per-CPU map values are laid out for every possible CPU, not online.
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


def read_counters(pin_dir: Path) -> list[int]:
    """The program's counters, summed over CPUs, from the pinned map."""
    from bcc import libbcc

    path = pin_dir / "counters"
    fd = libbcc.lib.bpf_obj_get(str(path).encode())
    if fd < 0:
        raise OSError(ctypes.get_errno(), f"cannot open pinned map {path}")
    try:
        ncpu = _possible_cpus()
        values = (ctypes.c_uint64 * ncpu)()
        out = []
        for slot in range(abi.COUNTER_MAX):
            key = ctypes.c_uint32(slot)
            if libbcc.lib.bpf_lookup_elem(fd, ctypes.byref(key), ctypes.byref(values)) != 0:
                raise OSError(ctypes.get_errno(), f"lookup of slot {slot} in {path} failed")
            out.append(sum(values))
        return out
    finally:
        os.close(fd)
