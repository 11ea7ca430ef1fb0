"""The one owner of every access to the program's maps (bpf/maps.h): reads
and writes of a loaded program's tables, batch walks, pinning, and the
pinned counters of a program whose controller is gone.

Names, keys and values are ctctl.abi's (MAPS).  BCC builds its own ctypes
types for keys and values from the C source, so every value crosses as
bytes (from_buffer_copy), after a size check against ctctl.abi at first
use.  Calls go to libbcc directly where BCC 0.26's Python binding cannot
say why a call failed (a full table, an existing key) or gets the batch
API wrong.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ctctl import abi, netns
from ctctl.kernel.offload.hw import DeviceError, DeviceIO, FlowExists, TableFull

BPF_ANY, BPF_NOEXIST, BPF_F_LOCK = 0, 1, 4
ENOTSUPP = 524  # the kernel's internal "operation not supported" (not in errno)
_UNSUPPORTED = (errno.EINVAL, ENOTSUPP, errno.EOPNOTSUPP)


def _errno(res: int) -> int:
    """libbcc returns -1 with errno set, or (through libbpf 1.x) -errno."""
    return -res if res < -1 else (ctypes.get_errno() or errno.EIO)


def _lib():
    from bcc import libbcc  # imported late: unit tests run without BCC

    return libbcc.lib


@functools.cache
def _libbpf():
    """libbpf, which libbcc itself links: the one with the _flags calls
    (BPF_F_LOCK) that libbcc does not export."""
    _lib()
    return ctypes.CDLL("libbpf.so.1", use_errno=True)


class _NoBatch(Exception):
    pass


class Maps:
    """The maps of one compiled program (a bcc.BPF)."""

    def __init__(self, bpf):
        if bpf is None:
            raise DeviceError("no program: maps need a compiled program (bcc.BPF)")
        self.bpf = bpf
        self._tables: dict[str, object] = {}
        self.io = DeviceIO()     # what reading the offload table has cost

    def _table(self, name: str):
        t = self._tables.get(name)
        if t is not None:
            return t
        spec = abi.MAPS[name]
        try:
            t = self.bpf[name.encode()]
        except KeyError:
            raise DeviceError(f"the program has no map {name!r} (bpf/maps.h)") from None
        leaf = getattr(t, "sLeaf", t.Leaf)  # per-CPU tables: one CPU's value
        if spec.key is not None and (ctypes.sizeof(t.Key) != ctypes.sizeof(spec.key)
                                     or ctypes.sizeof(leaf) != ctypes.sizeof(spec.value)):
            raise DeviceError(
                f"map {name}: key/value {ctypes.sizeof(t.Key)}/{ctypes.sizeof(leaf)} bytes, "
                f"ctctl.abi says {ctypes.sizeof(spec.key)}/{ctypes.sizeof(spec.value)}")
        self._tables[name] = t
        return t

    @staticmethod
    def _cast(ctype, value):
        return ctype.from_buffer_copy(bytes(value))

    # -- the program as a whole -------------------------------------------------
    def set_ports(self, netns_name: str, ifindexes) -> None:
        """At XDP, the ports a mirred redirects to (the `ports` devmap), each
        ifindex at its own slot.  Written from inside the box's namespace:
        the kernel resolves a devmap's ifindex in the writer's, and from the
        controller's it would name another device."""
        t = self._table("ports")
        with netns.inside(netns_name):
            for i in ifindexes:
                t[ctypes.c_int(i)] = ctypes.c_int(i)

    @staticmethod
    def missing_pins(pin_dir: Path, hook: str = "tc") -> list[str]:
        """The pinned maps (abi.pinned_maps(hook)) absent from pin_dir.  BCC
        pins them when it compiles the program with CTCTL_PIN_DIR (bpf/maps.h)."""
        return [name for name in abi.pinned_maps(hook) if not (pin_dir / name).exists()]

    def counters(self) -> list[int]:
        """The program's counter slots, summed over CPUs."""
        t = self._table("counters")
        return [int(sum(t[t.Key(i)])) for i in range(abi.COUNTER_MAX)]

    def table_size(self) -> int:
        """Entries the offload table holds (its max_entries)."""
        return int(self._table("flows").max_entries)

    # -- hw_config ---------------------------------------------------------------
    def read_hw_config(self) -> abi.HwConfig:
        t = self._table("hw_config")
        return self._cast(abi.HwConfig, t[t.Key(0)])

    def write_hw_config(self, caps: int, gen: int) -> None:
        t = self._table("hw_config")
        t[t.Key(0)] = self._cast(t.Leaf, abi.HwConfig(caps=caps, gen=gen))

    # -- the hardware's own aging ----------------------------------------------
    def write_aging_config(self, cfg: abi.AgingConfig) -> None:
        t = self._table("aging_config")
        t[t.Key(0)] = self._cast(t.Leaf, cfg)

    def write_aging_slot(self, i: int, slot: abi.AgingSlot) -> None:
        t = self._table("aging_slots")
        t[t.Key(i)] = self._cast(t.Leaf, slot)

    def aging_slots(self) -> int:
        return int(self._table("aging_slots").max_entries)

    # -- TCP window contexts (bpf/window.h) -----------------------------------------
    # Written and read under the value's bpf_spin_lock (BPF_F_LOCK): a copy
    # never mixes two of the program's updates.
    def write_window(self, conn_id: int, w: abi.TcpWindow) -> None:
        t = self._table("windows")
        k, v = ctypes.c_uint32(conn_id), self._cast(t.Leaf, w)
        self.io.syscalls += 1
        res = _libbpf().bpf_map_update_elem(t.map_fd, ctypes.byref(k), ctypes.byref(v),
                                            ctypes.c_uint64(BPF_F_LOCK))
        if res < 0:
            err = _errno(res)
            if err in (errno.E2BIG, errno.ENOMEM):
                raise TableFull(f"window contexts full ({t.max_entries})")
            raise DeviceError(f"cannot write a window context: {os.strerror(err)}")

    def read_window(self, conn_id: int) -> abi.TcpWindow | None:
        t = self._table("windows")
        k, v = ctypes.c_uint32(conn_id), t.Leaf()
        self.io.syscalls += 1
        res = _libbpf().bpf_map_lookup_elem_flags(t.map_fd, ctypes.byref(k), ctypes.byref(v),
                                                  ctypes.c_uint64(BPF_F_LOCK))
        if res < 0:
            err = _errno(res)
            if err == errno.ENOENT:
                return None
            raise DeviceError(f"cannot read a window context: {os.strerror(err)}")
        return self._cast(abi.TcpWindow, v)

    def write_window_merge(self, m: abi.WindowMerge) -> None:
        t = self._table("window_merges")
        t[t.Key(0)] = self._cast(t.Leaf, m)

    def delete_window(self, conn_id: int) -> None:
        t = self._table("windows")
        try:
            del t[t.Key(conn_id)]
        except KeyError:
            pass

    # -- chains ------------------------------------------------------------------
    def write_chain(self, ifindex: int, chain: int, encoded: abi.Chain | bytes) -> None:
        t = self._table("chains")
        t[t.Key(ifindex, chain)] = t.Leaf.from_buffer_copy(bytes(encoded))

    def delete_chain(self, ifindex: int, chain: int) -> bool:
        t = self._table("chains")
        try:
            del t[t.Key(ifindex, chain)]
        except KeyError:
            return False
        return True

    def chain_keys(self) -> list[tuple[int, int]]:
        return [(k.ifindex, k.chain) for k in self._table("chains").keys()]

    # -- tunnels (bpf/tunnel.h) -----------------------------------------------------
    def write_tunnels(self, tunnels: dict[int, abi.Tunnel]) -> None:
        """Make the `tunnels` map hold exactly these (ifindex -> tunnel)."""
        t = self._table("tunnels")
        for k in list(t.keys()):
            if k.value not in tunnels:
                del t[k]
        for ifindex, tun in tunnels.items():
            t[t.Key(ifindex)] = self._cast(t.Leaf, tun)

    def write_encap(self, slot: int, e: abi.Encap) -> None:
        t = self._table("encaps")
        t[t.Key(slot)] = self._cast(t.Leaf, e)

    def vteps(self) -> dict[bytes, bytes]:
        """The VTEP MACs the program learned: outer IPv4 address -> MAC."""
        return {int(k.value).to_bytes(4, "little"): bytes(v.mac) for k, v in self._table("vteps").items()}

    # -- rule_stats --------------------------------------------------------------
    def zero_rule_stats(self, rule_id: int) -> None:
        t = self._table("rule_stats")
        t.clearitem(t.Key(rule_id))

    def rule_stats(self, rule_id: int) -> tuple[int, int]:
        """(packets, bytes) of one rule id, summed over CPUs."""
        t = self._table("rule_stats")
        per_cpu = t.getvalue(t.Key(rule_id))
        return sum(s.packets for s in per_cpu), sum(s.bytes for s in per_cpu)

    # -- flows (the offload table) ----------------------------------------------
    def insert_flow(self, key: abi.Tuple, flow: abi.Flow, replace: bool = False) -> None:
        """Raises TableFull when the table has no room (the kernel's E2BIG
        for a full preallocated hash, ENOMEM otherwise), FlowExists when
        the key is there and replace is False."""
        t = self._table("flows")
        k, v = self._cast(t.Key, key), self._cast(t.Leaf, flow)
        self.io.syscalls += 1
        res = _lib().bpf_update_elem(t.map_fd, ctypes.byref(k), ctypes.byref(v),
                                     BPF_ANY if replace else BPF_NOEXIST)
        if res < 0:
            err = _errno(res)
            if err in (errno.E2BIG, errno.ENOMEM):
                raise TableFull(f"offload table full ({t.max_entries} entries)")
            if err == errno.EEXIST:
                raise FlowExists("offload table already holds that key")
            raise DeviceError(f"cannot add a flow entry: {os.strerror(err)}")

    def take_flow(self, key: abi.Tuple) -> abi.Flow | None:
        """Take one entry out; the entry as it was (its final counters),
        None when it was not there.  Lookup and delete are one syscall
        (BPF_MAP_LOOKUP_AND_DELETE_ELEM), so no hit between reading and
        deleting is lost.  (A program run that found the entry just before
        may still add to it after the copy: the usual BPF map race, at
        most the packets in flight on other CPUs.)"""
        t = self._table("flows")
        k, v = self._cast(t.Key, key), t.Leaf()
        self.io.syscalls += 1
        res = _lib().bpf_lookup_and_delete(t.map_fd, ctypes.byref(k), ctypes.byref(v))
        if res < 0:
            err = _errno(res)
            if err == errno.ENOENT:
                return None
            if err not in _UNSUPPORTED:
                raise DeviceError(f"cannot remove a flow entry: {os.strerror(err)}")
            # Kernels before 5.14 have no lookup-and-delete for hash maps.
            try:
                v = t[k]
            except KeyError:
                return None
            try:
                del t[k]
            except KeyError:
                pass
        self.io.entries_read += 1
        return self._cast(abi.Flow, v)

    def read_flow(self, key: abi.Tuple) -> abi.Flow | None:
        """One entry of the offload table (one lookup), None when absent."""
        t = self._table("flows")
        k, v = self._cast(t.Key, key), t.Leaf()
        self.io.syscalls += 1
        res = _lib().bpf_lookup_elem(t.map_fd, ctypes.byref(k), ctypes.byref(v))
        if res < 0:
            err = _errno(res)
            if err == errno.ENOENT:
                return None
            raise DeviceError(f"cannot read a flow entry: {os.strerror(err)}")
        self.io.entries_read += 1
        return self._cast(abi.Flow, v)

    def flows(self) -> list[tuple[abi.Tuple, abi.Flow]]:
        """Every entry of the offload table, with its counters.  Batched
        (BPF_MAP_LOOKUP_BATCH, 5.6+) where the kernel has it, one lookup per
        key otherwise.  A batch walk under concurrent inserts may miss an
        entry added meanwhile, never return a deleted one twice."""
        ks, vs = ctypes.sizeof(abi.Tuple), ctypes.sizeof(abi.Flow)
        key, flow = abi.Tuple.from_buffer_copy, abi.Flow.from_buffer_copy
        out = []
        for keys, vals, n in self._walk_flows():
            out.extend((key(keys, i * ks), flow(vals, i * vs)) for i in range(n))
        return out

    def flow_counters(self) -> dict[bytes, FlowCounters]:
        """Every entry's counters by its key's bytes: what flows() reads,
        without a ctypes object per entry (a full aging pass reads the whole
        table, and at a million entries the objects cost more than the
        syscalls)."""
        ks = ctypes.sizeof(abi.Tuple)
        out: dict[bytes, FlowCounters] = {}
        for keys, vals, n in self._walk_flows():
            out.update(zip([keys[i:i + ks] for i in range(0, n * ks, ks)],
                           map(_counters, _COUNTERS.iter_unpack(vals))))
        return out

    def flow_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Every entry as two numpy record arrays, keys (struct ctctl_tuple)
        and values (struct ctctl_flow), their fields named as in ctctl.abi:
        the table as the kernel copied it out, viewed in place."""
        runs = self._walk_flows()
        keys = np.frombuffer(b"".join(k for k, _, _ in runs), dtype=_TUPLE_DTYPE)
        vals = np.frombuffer(b"".join(v for _, v, _ in runs), dtype=_FLOW_DTYPE)
        return keys, vals

    def _walk_flows(self) -> list[tuple[bytes, bytes, int]]:
        """The whole table as (keys, values, count) runs: the entries' key
        and value bytes back to back, as the kernel copies them out."""
        t = self._table("flows")
        try:
            runs = self._lookup_batch(t)
        except _NoBatch:
            keys, vals = [], []
            for k in list(t.keys()):
                self.io.syscalls += 2
                try:
                    v = t[k]
                except KeyError:
                    continue
                keys.append(bytes(k))
                vals.append(bytes(v))
            runs = [(b"".join(keys), b"".join(vals), len(keys))]
        self.io.entries_read += sum(n for _, _, n in runs)
        return runs

    def _lookup_batch(self, t, chunk: int = 1024) -> list[tuple[bytes, bytes, int]]:
        """BCC 0.26's items_lookup_batch passes one variable as both the
        batch cursor and the count (and allocates max_entries of both), so
        the walk is done here with libbcc's bpf_lookup_batch directly.  Each
        batch's keys and values are kept as the bytes the kernel wrote:
        (keys, values, count)."""
        lib = _lib()
        ks, vs = ctypes.sizeof(t.Key), ctypes.sizeof(t.Leaf)
        out = []
        cursor_in, cursor_out, count = ctypes.c_uint32(0), ctypes.c_uint32(0), ctypes.c_uint32(0)
        first = True
        keys = vals = None
        while True:
            if keys is None:
                keys, vals = ctypes.create_string_buffer(chunk * ks), ctypes.create_string_buffer(chunk * vs)
            count.value = chunk
            self.io.syscalls += 1
            res = lib.bpf_lookup_batch(t.map_fd, None if first else ctypes.byref(cursor_in),
                                       ctypes.byref(cursor_out), ctypes.byref(keys),
                                       ctypes.byref(vals), ctypes.byref(count))
            err = _errno(res) if res < 0 else 0
            if err == errno.ENOSPC and count.value == 0:
                chunk *= 2  # one bucket holds more entries than the buffer
                keys = None
                continue
            if err and err != errno.ENOENT:
                if first and err in _UNSUPPORTED:
                    raise _NoBatch()
                raise DeviceError(f"BPF_MAP_LOOKUP_BATCH: {os.strerror(err)}")
            n = count.value
            if n:
                out.append((ctypes.string_at(keys, n * ks), ctypes.string_at(vals, n * vs), n))
            if err == errno.ENOENT:
                return out
            cursor_in.value = cursor_out.value
            first = False


# The same layouts as numpy sees them (numpy reads ctypes structures).
_TUPLE_DTYPE, _FLOW_DTYPE = np.dtype(abi.Tuple), np.dtype(abi.Flow)


class FlowCounters(NamedTuple):
    """An entry's hardware counters and path as flow_counters() reads
    them: EntryStats' fields, the path as the program's rule ids."""

    packets: int
    bytes: int
    last_used_ns: int
    path: tuple[int, ...]


# struct ctctl_flow begins with its counters (packets, bytes, last_used_ns)
# and ends with its path and the flow cache's two words.
_PATH_OFF = abi.Flow.path.offset
if ((abi.Flow.packets.offset, abi.Flow.bytes.offset, abi.Flow.last_used_ns.offset) != (0, 8, 16)
        or _PATH_OFF + 2 * abi.PATH_LEN + 16 != ctypes.sizeof(abi.Flow)):
    raise ImportError("ctctl.abi.Flow's counters or path moved: fix _COUNTERS")
_COUNTERS = struct.Struct(f"=QQQ{_PATH_OFF - 24}x{abi.PATH_LEN}H16x")


def _counters(fields: tuple) -> FlowCounters:
    return FlowCounters(fields[0], fields[1], fields[2], fields[3:])


def _possible_cpus() -> int:
    # Per-CPU map values are laid out for every possible CPU, not online.
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


def read_pinned_counters(pin_dir: Path) -> list[int]:
    """The program's counters, summed over CPUs, from its pinned map: what
    `ctctl stats` shows when only the data path is left."""
    lib = _lib()
    path = pin_dir / "counters"
    fd = lib.bpf_obj_get(str(path).encode())
    if fd < 0:
        raise OSError(ctypes.get_errno(), f"cannot open pinned map {path}")
    try:
        values = (ctypes.c_uint64 * _possible_cpus())()
        out = []
        for slot in range(abi.COUNTER_MAX):
            key = ctypes.c_uint32(slot)
            if lib.bpf_lookup_elem(fd, ctypes.byref(key), ctypes.byref(values)) != 0:
                raise OSError(ctypes.get_errno(), f"lookup of slot {slot} in {path} failed")
            out.append(sum(values))
        return out
    finally:
        os.close(fd)


def program_stats(counters: list[int]) -> dict:
    """The program's counter slots as the stats report names them."""
    c = abi.Counter
    return {
        "rx_packets": counters[c.RX],
        "rx_bytes": counters[c.RX_BYTES],
        "punted": counters[c.PUNT],
        "perf_lost": counters[c.PERF_LOST],
        "too_big": counters[c.TOO_BIG],
        "ct_hits": counters[c.CT_HIT],
        "redirected": counters[c.REDIRECT],
        "dropped": counters[c.DROP],
        "passed": counters[c.PASS],
        "goto_loop": counters[c.GOTO_LOOP],
        "nat": counters[c.NAT],
        "window_invalid": counters[c.WINDOW_INVALID],
        "window_ignored": counters[c.WINDOW_IGNORED],
        "csum_invalid": counters[c.CSUM_INVALID],
        "csum_completed": counters[c.CSUM_COMPLETED],    # at XDP: partial checksums completed
        "rewrites": {"pedit": counters[c.PEDIT], "pedit_short": counters[c.PEDIT_SHORT],
                     "csum": counters[c.CSUM]},
        "tunnels": {"decapsulated": counters[c.DECAP], "encapsulated": counters[c.ENCAP]},
        "flow_cache": {"hits": counters[c.CACHE_HIT], "misses": counters[c.CACHE_MISS],
                       "stale": counters[c.CACHE_STALE]},
        "punts_by_reason": {r.label: counters[r] for r in abi.Reason if r and counters[r]},
    }
