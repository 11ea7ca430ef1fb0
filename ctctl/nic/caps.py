"""The declared capabilities of the "NIC": what the hardware can run, so
that the same box can be modelled as different devices.

    hardware:                 # box config; every key optional
      flow_counters: true     # per-entry packets/bytes/last-used in hardware
      ct: true                # the ct action in hardware (offload table lookups)
      nat: true               # NAT rewrite on a ct hit
      ct_label_match: true    # matching on ct_label
      port_range_match: true  # port ranges (a single port always works)
      max_rules_per_chain: 64 # <= ctctl.abi.MAX_RULES
      max_hops: 8             # <= ctctl.abi.MAX_HOPS
      table_size: 65536       # entries of the offload table (flows map)
      insert_rate: 0          # flows/s the table accepts, 0 = unlimited
      hw_aging: true          # the hardware ages entries itself
      window: true            # TCP window validation (bpf/window.h)
      csum: [ipv4, l4]        # checksums it verifies, by layer (bpf/csum.h)
      invalid: inv            # what an invalid packet gets: inv (+trk+inv in
                              # hardware) or punt (software judges it)
      flow_cache: true        # finish a hit from the verdict cached in its
                              # entry (only without window and csum checks)
      rewrite: true           # pedit and csum actions (bpf/pedit.h)
      tunnels: true           # VXLAN decap/encap and enc_key_id (bpf/tunnel.h)

    hardware: {profile: minimal, nat: true}   # a named profile, then overrides

Profiles (PROFILES): `full` (the defaults: everything the model has, so it
validates windows and checksums, counts, ages), `minimal` (the ct lookup
and counters: no window or checksum validation, no NAT, no ct_label or
port-range matches, no aging of its own, no header rewrites, no tunnels), `no-counters` (everything but
per-entry counters).

The defaults are a device that supports everything.  ctctl.nic.encode turns
whatever the declared device cannot run into a trap to software; the
program honours flow_counters, hw_aging, window, csum, invalid and
flow_cache at run time (hw_config), and `table_size` is a compile-time
size (cflags()).  insert_rate is the offload manager's to enforce.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from ctctl import abi

MAX_TABLE_SIZE = 1 << 24  # a bound far beyond any NIC's table, for typos


class CapsError(ValueError):
    """A hardware description that cannot be. ``where`` names the place
    the description came from (file:line:column); the message does not
    repeat it, so a caller that prefixes its own position (ctctl.box.config)
    does not print it twice."""

    def __init__(self, msg: str, where: str | None = None):
        super().__init__(msg)
        self.where = where


# Named devices: a profile's settings, over which a config's own keys go.
PROFILES: dict[str, dict] = {
    "full": {},
    "minimal": {"nat": False, "ct_label_match": False, "port_range_match": False, "hw_aging": False,
                "window": False, "csum": (), "rewrite": False, "tunnels": False},
    "no-counters": {"flow_counters": False},
}

# key -> (type, lowest, highest, what it means); bounds None for bools.
_SPEC: dict[str, tuple[type, int | None, int | None, str]] = {
    "flow_counters": (bool, None, None, "per-entry counters"),
    "ct": (bool, None, None, "ct action in hardware"),
    "nat": (bool, None, None, "NAT in hardware"),
    "ct_label_match": (bool, None, None, "ct_label matches"),
    "port_range_match": (bool, None, None, "port range matches"),
    "max_rules_per_chain": (int, 1, abi.MAX_RULES, "rules per chain"),
    "max_hops": (int, 0, abi.MAX_HOPS, "goto hops per packet"),
    "table_size": (int, 1, MAX_TABLE_SIZE, "offload table entries"),
    "insert_rate": (float, 0, None, "flows per second, 0 = unlimited"),
    "hw_aging": (bool, None, None, "hardware aging"),
    "window": (bool, None, None, "TCP window validation"),
    "csum": (tuple, None, None, "checksums verified"),
    "invalid": (str, None, None, "what an invalid packet gets"),
    "flow_cache": (bool, None, None, "verdicts cached in the offload table's entries"),
    "rewrite": (bool, None, None, "header rewrites: pedit and csum actions"),
    "tunnels": (bool, None, None, "VXLAN: decapsulation, encapsulation, tunnel_key, enc_key_id"),
}
CSUM_LAYERS = ("ipv4", "l4")
INVALID_CHOICES = ("inv", "punt")


@dataclass(frozen=True)
class HwCaps:
    flow_counters: bool = True
    ct: bool = True
    nat: bool = True
    ct_label_match: bool = True
    port_range_match: bool = True
    max_rules_per_chain: int = abi.MAX_RULES
    max_hops: int = abi.MAX_HOPS
    table_size: int = 65536
    insert_rate: float = 0
    hw_aging: bool = True
    window: bool = True
    csum: tuple = CSUM_LAYERS
    invalid: str = "inv"
    flow_cache: bool = True
    rewrite: bool = True
    tunnels: bool = True
    profile: str = "full"        # the named profile it started from (PROFILES)

    def __post_init__(self):
        for f in fields(self):
            if f.name != "profile":
                _check(f.name, getattr(self, f.name))
        if self.profile not in PROFILES:
            raise CapsError(f"hardware: unknown profile {self.profile!r} (expected {', '.join(PROFILES)})")

    def describe(self) -> str:
        """The profile and what differs from it, for `ctctl load`."""
        base = HwCaps(**PROFILES[self.profile])
        diff = [f"{f.name}={getattr(self, f.name)}" for f in fields(self)
                if f.name != "profile" and getattr(self, f.name) != getattr(base, f.name)]
        off = [f.name for f in fields(self) if isinstance(getattr(self, f.name), bool) and not getattr(self, f.name)]
        if not self.csum:
            off.append("csum")
        return (f"profile {self.profile}" + (f" with {', '.join(diff)}" if diff else "")
                + (f"; without {', '.join(off)}" if off else ""))

    @classmethod
    def from_config(cls, mapping, where: str | None = None) -> "HwCaps":
        """From the `hardware:` mapping of a box config (None or {} gives the
        defaults).  Raises CapsError naming the key: unknown keys, wrong
        types (a bool is not a number, a number is not a bool) and values
        out of range are refused, never coerced."""
        if mapping is None:
            return cls()
        if not isinstance(mapping, dict):
            raise CapsError(f"hardware must be a mapping of profile, {', '.join(_SPEC)}, "
                            f"not {type(mapping).__name__}", where)
        mapping = dict(mapping)
        if isinstance(mapping.get("csum"), list):
            mapping["csum"] = tuple(mapping["csum"])   # YAML's list, kept hashable
        profile = mapping.pop("profile", "full")
        if profile not in PROFILES:
            raise CapsError(f"hardware: unknown profile {profile!r} (expected {', '.join(PROFILES)})", where)
        for key, value in mapping.items():
            if key not in _SPEC:
                raise CapsError(f"hardware: unknown key {key!r} (expected profile, {', '.join(_SPEC)})",
                                where)
            try:
                _check(key, value)
            except CapsError as e:
                raise CapsError(str(e), where) from None
        return cls(**{**PROFILES[profile], **mapping, "profile": profile})

    @property
    def program_caps(self) -> int:
        """enum ctctl_cap bits for hw_config."""
        bits = {abi.Cap.FLOW_COUNTERS: self.flow_counters, abi.Cap.HW_AGING: self.hw_aging,
                abi.Cap.TCP_WINDOW: self.window, abi.Cap.CSUM_IPV4: "ipv4" in self.csum,
                abi.Cap.CSUM_L4: "l4" in self.csum, abi.Cap.INVALID_PUNT: self.invalid == "punt",
                abi.Cap.FLOW_CACHE: self.flow_cache, abi.Cap.TUNNELS: self.tunnels}
        return sum(int(bit) for bit, on in bits.items() if on)

    @property
    def aging_slots(self) -> int:
        """Connection contexts for the NIC's own aging: one per connection
        the table can hold (two entries each), none without the capability."""
        return self.table_size // 2 + 1 if self.hw_aging else 1

    @property
    def window_slots(self) -> int:
        """Window contexts: one per connection the table can hold."""
        return self.table_size // 2 + 1 if self.window else 1

    def cflags(self) -> list[str]:
        """Compile flags that size the program's maps as declared."""
        return [f"-DCTCTL_FLOW_TABLE_SIZE={self.table_size}", f"-DCTCTL_AGING_SLOTS={self.aging_slots}",
                f"-DCTCTL_WINDOW_SLOTS={self.window_slots}"]


def _check(key: str, value) -> None:
    kind, lo, hi, what = _SPEC[key]
    if key == "csum":
        if not isinstance(value, (list, tuple)) or any(v not in CSUM_LAYERS for v in value):
            raise CapsError(f"hardware: csum ({what}) must be a list of {', '.join(CSUM_LAYERS)} "
                            f"(or []), not {value!r}")
        return
    if key == "invalid":
        if value not in INVALID_CHOICES:
            raise CapsError(f"hardware: invalid ({what}) must be one of {', '.join(INVALID_CHOICES)}, "
                            f"not {value!r}")
        return
    if kind is bool:
        if not isinstance(value, bool):
            raise CapsError(f"hardware: {key} ({what}) must be true or false, not {value!r}")
        return
    ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
    if not ok:
        name = "a number" if kind is float else "an integer"
        raise CapsError(f"hardware: {key} ({what}) must be {name}, not {value!r}")
    if not math.isfinite(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
        rng = f"in {lo}..{hi}" if hi is not None else f">= {lo}"
        raise CapsError(f"hardware: {key} ({what}) must be {rng}, not {value!r}")
