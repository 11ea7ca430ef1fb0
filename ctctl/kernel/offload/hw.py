"""The hardware as the flowtable sees it: what the offload manager asks of
a device, and how a device says no.

The manager knows connections, not map layouts (OVS keeps its dpif apart
from ofproto the same way): it hands the device a connection and a
direction and gets back an opaque key; it reads back only what the
hardware counted.  ctctl.nic.driver.Device implements this on the
program's maps; a unit test can put an in-memory table behind the same
calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Protocol

import numpy as np


class DeviceError(Exception):
    """The device refused an operation (the message says which and why)."""


class TableFull(DeviceError):
    """The offload table has no room for another entry."""


class FlowExists(DeviceError):
    """An entry for that key is already in the table."""


@dataclass(frozen=True)
class EntryStats:
    """What the hardware counted in one entry since it was written."""

    packets: int = 0
    bytes: int = 0
    last_used_ns: int = 0     # the device's clock (bpf_ktime_get_ns: CLOCK_MONOTONIC), 0 = never
    path: tuple = ()          # the rules (ctctl.rules.Filter) its packets ran, chain by chain


@dataclass(frozen=True)
class Expired:
    """The hardware aged a connection out by itself (its "callback into
    netfilter"): both its entries are gone, and this is what they held."""

    conn_id: int
    stats: tuple[EntryStats | None, EntryStats | None]   # original, reply
    at_ns: int                                            # when the hardware removed them (device clock)


@dataclass
class TableSnapshot:
    """The whole table at once, as columns (one row per entry, in the
    table's order): what a pass over a million entries can afford to
    read, with no object per entry.  `dir` is 0 original, 1 reply."""

    conn_id: np.ndarray        # uint32
    dir: np.ndarray            # uint8
    proto: np.ndarray          # uint8: the entry's IP protocol
    packets: np.ndarray        # uint64
    bytes: np.ndarray          # uint64
    last_used_ns: np.ndarray   # uint64, 0 = never hit
    path: np.ndarray | None = None    # [n, k] the device's rule ids, 0 = none
    rule_of: dict | None = None       # a rule id -> its rule (ctctl.rules.Filter)

    def __len__(self) -> int:
        return len(self.conn_id)

    def stats(self, i: int) -> EntryStats:
        path = ()
        if self.path is not None:
            rule_of = self.rule_of or {}
            path = tuple(rule_of[r] for r in self.path[i].tolist() if r in rule_of)
        return EntryStats(int(self.packets[i]), int(self.bytes[i]), int(self.last_used_ns[i]), path)


@dataclass
class DeviceIO:
    """What reading the table has cost so far: syscalls made and entries
    copied out.  The aging modes are compared by the growth of these."""

    syscalls: int = 0
    entries_read: int = 0


class FlowDevice(Protocol):
    """The calls the offload manager makes (nf_flow_table_offload.c's
    add, delete and stats, done synchronously here)."""

    io: DeviceIO

    def add_flow(self, conn, direction: int, replace: bool = False) -> Hashable:
        """Write one direction of `conn`; the entry's key.  TableFull or
        FlowExists (without replace) when it cannot."""

    def remove_flow(self, key: Hashable) -> EntryStats | None:
        """Take an entry out; what it counted, None when it was not there."""

    def read_flow(self, key: Hashable) -> EntryStats | None:
        """One entry's counters (one lookup)."""

    def read_flows(self) -> dict[Hashable, EntryStats]:
        """Every entry's counters, by key (a walk of the whole table)."""

    def read_table(self) -> TableSnapshot:
        """Every entry's counters as columns (a walk of the whole table)."""

    def expired(self) -> list[Expired]:
        """What the hardware aged out since the last call (hardware aging
        only; a device without it returns [])."""

    def start_aging(self, interval_s: float, timeouts_s: dict[str, float]) -> None:
        """Age the entries in the hardware from now on (DeviceError where
        the device cannot)."""

    def set_aging_timeouts(self, timeouts_s: dict[str, float]) -> None:
        """New offload timeouts for the hardware's own aging."""

    def stop_aging(self) -> None:
        """Stop the hardware's own aging."""

    # TCP window validation (slide 22), for a device whose caps have it:
    validates_windows: bool

    def seed_window(self, conn, check: str = "on") -> None:
        """Hand the tracker's windows of a TCP connection to the hardware
        (check: on, liberal or off, as the tracker's sysctls say)."""

    def pull_window(self, conn) -> bool:
        """The hardware's windows of `conn` into the tracker's data; False
        when it has none."""

    def merge_window(self, conn, taken: tuple) -> None:
        """What the tracker changed in `conn`'s windows since pull_window
        (`taken`: TcpInfo.windows() then) onto the hardware's current ones."""
