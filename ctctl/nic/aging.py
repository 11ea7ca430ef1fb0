"""The NIC's own aging, its firmware side: a connection context per
offloaded connection (the `aging_slots` map), the timeouts, a timer that
runs the program's aging pass (bpf/ctctl.c ctctl_age) every interval, and
the expiry events it sends back (the `expiries` ring buffer).

The decision and the removal are the program's, in the kernel: it reads
the entries, removes an idle connection's and reports it with their final
counters.  The driver only keeps the contexts (which slot holds which
connection) and the timer; it never reads the offload table.  The timer
is a thread: its one call, BPF_PROG_TEST_RUN with `repeat` = the slots in
use, runs in the kernel without the interpreter lock, as a NIC's own CPU
would run beside the host's.

Why a test run and not bpf_timer or bpf_for_each_map_elem: both take a
callback, and BCC 0.26 neither keeps a static callback's code in the
program nor relocates the pointer to it (the verifier sees r2 = 0 where
the callback should be); `repeat` needs no callback.
"""

from __future__ import annotations

import ctypes
import heapq
import threading

from ctctl import abi
from ctctl.kernel.offload.hw import EntryStats, Expired
from ctctl.nic.maps import Maps
from ctctl.nic.progrun import prog_test_run

FUNCTION = b"ctctl_age"
CLASSES = ("tcp", "udp", "icmp")    # abi.AGING_CLASSES, in the program's order


class NicAger:
    """The aging half of the "NIC" for one box's program."""

    def __init__(self, bpf, maps: Maps, slots: int):
        from bcc import BPF

        self.bpf = bpf
        self.maps = maps
        self.fn = bpf.load_func(FUNCTION, BPF.SCHED_CLS)
        self.slots = slots
        self._free = list(range(slots))          # a heap: the lowest free slot first
        self._slot_of: dict[int, int] = {}       # conn id -> slot
        self._high = 0                           # slots [0, high) may be in use
        self._events: list[Expired] = []
        self._lock = threading.Lock()            # the timer thread and the driver
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._slot: dict[int, abi.AgingSlot] = {}
        self.passes = 0
        self.pass_ns = 0                         # the program's time in its passes, summed
        self.set_timeouts({"tcp": 3600.0, "udp": 180.0, "icmp": 180.0})
        bpf[b"expiries"].open_ring_buffer(self._on_event)

    # -- connection contexts --------------------------------------------------
    def track(self, conn_id: int, key0: abi.Tuple, key1: abi.Tuple, since_ns: int) -> bool:
        """A connection whose two entries are in the table: the NIC ages it
        from now on.  False when every slot is taken (it is then not aged
        by the NIC)."""
        with self._lock:
            if conn_id in self._slot_of or not self._free:
                return conn_id in self._slot_of
            i = heapq.heappop(self._free)
            self._slot_of[conn_id] = i
            self._high = max(self._high, i + 1)
        slot = abi.AgingSlot(since_ns=since_ns)
        slot.key[0], slot.key[1] = key0, key1
        # The keys first, then the id: a pass that reads the slot between
        # the two writes sees a free slot, never an id with half its keys.
        self.maps.write_aging_slot(i, slot)
        slot.conn_id = conn_id
        self.maps.write_aging_slot(i, slot)
        self._slot[conn_id] = slot
        return True

    def untrack(self, conn_id: int) -> None:
        """Software took the connection out of the table itself."""
        with self._lock:
            i = self._slot_of.pop(conn_id, None)
            if i is None:
                return
            heapq.heappush(self._free, i)
        slot = self._slot.pop(conn_id)
        slot.conn_id = 0        # the keys stay: a pass reading it now sees them whole
        self.maps.write_aging_slot(i, slot)

    def set_timeouts(self, timeouts_s: dict[str, float]) -> None:
        self._timeouts = [int(timeouts_s[c] * 1e9) for c in CLASSES]

    # -- the firmware's pass ----------------------------------------------------
    def run_pass(self) -> int:
        """One aging pass over the slots in use: the program runs once per
        slot.  Returns the slots looked at."""
        with self._lock:
            n = self._high
        cfg = abi.AgingConfig(cursor=0)
        for c, ns in enumerate(self._timeouts):
            cfg.timeout_ns[c] = ns
        self.maps.write_aging_config(cfg)
        if n:
            opts, _ = prog_test_run(self.fn.fd, bytes(64), repeat=n)
            self.pass_ns += opts.duration * n
        self.passes += 1
        return n

    def start(self, interval_s: float) -> None:
        self.stop()
        self._stop.clear()

        def timer():
            while not self._stop.wait(interval_s):
                self.run_pass()
        self._thread = threading.Thread(target=timer, name="ctctl-nic-aging", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    # -- its reports ------------------------------------------------------------
    def _on_event(self, _ctx, data, size) -> None:
        if size < ctypes.sizeof(abi.Expiry):
            return
        ev = abi.Expiry.from_buffer_copy(ctypes.string_at(data, ctypes.sizeof(abi.Expiry)))
        with self._lock:
            i = self._slot_of.pop(ev.conn_id, None)
            if i is not None:
                heapq.heappush(self._free, i)   # the program cleared it
                self._slot.pop(ev.conn_id, None)
        stats = tuple(EntryStats(ev.packets[d], ev.bytes[d], ev.last_used_ns) if ev.present[d] else None
                      for d in (0, 1))
        self._events.append(Expired(ev.conn_id, stats, ev.at_ns))

    def drain(self) -> list[Expired]:
        """The connections the NIC aged out since the last call."""
        self.bpf.ring_buffer_consume()
        out, self._events = self._events, []
        return out
