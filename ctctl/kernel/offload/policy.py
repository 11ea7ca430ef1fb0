"""What qualifies a connection for the hardware, what takes it out, and
the timeouts it lives by there (act_ct's decisions, and the proposal's
suggested offload timeouts).

- TCP once ESTABLISHED and ASSURED, UDP once ASSURED (act_ct's policy);
  never with a helper.  ICMP echo, which act_ct never offloads, once it has
  seen a reply (the tool's choice, so that ping can be measured; set
  `icmp: never` for act_ct's behaviour).
- Termination is software's: a FIN or RST reaches software, and the
  connection leaves the hardware at once.  With `closing` (the kernel's
  behaviour since 2025) a FIN leaves the flow in hardware until TIME_WAIT
  or CLOSE.
- Offloaded connections get the offload timeouts (3600 s TCP, 180 s
  UDP/ICMP by default); back in software they get their state's timeout.
- `where: soft` keeps qualified connections off the hardware, on the
  software fast path (nf_flowtable without its offload flag).
"""

from __future__ import annotations

from dataclasses import dataclass

from ctctl.kernel.conntrack import Bits, Conn
from ctctl.kernel.conntrack.timeouts import state_key
from ctctl.protocols import ICMPS, IPPROTO_TCP, IPPROTO_UDP

_NOT_ELIGIBLE = Bits.HELPER | Bits.DYING

TERMINAL_STATES = ("TIME_WAIT", "CLOSE")


class PolicyError(ValueError):
    pass


@dataclass
class OffloadPolicy:
    tcp: str = "established"      # established | never
    udp: str = "assured"          # assured | replied | never
    icmp: str = "replied"         # replied | never
    where: str = "hardware"       # hardware | soft: soft keeps qualified flows on the software fast path
    closing: bool = False         # keep FIN'd TCP flows in hardware until TIME_WAIT/CLOSE
    tcp_timeout: float = 3600.0   # the proposal's suggested offload timeouts
    udp_timeout: float = 180.0
    icmp_timeout: float = 180.0

    CHOICES = {"tcp": ("established", "never"), "udp": ("assured", "replied", "never"),
               "icmp": ("replied", "never"), "where": ("hardware", "soft")}

    @classmethod
    def from_config(cls, d: dict) -> "OffloadPolicy":
        p = cls()
        for k, v in d.items():
            if k not in cls.__dataclass_fields__:
                raise PolicyError(f"unknown offload key {k!r} (expected {', '.join(cls.__dataclass_fields__)})")
            if k in cls.CHOICES and v not in cls.CHOICES[k]:
                raise PolicyError(f"offload {k}: {v!r} is not one of {', '.join(cls.CHOICES[k])}")
            if k == "closing" and not isinstance(v, bool):
                raise PolicyError(f"offload closing must be true or false, not {v!r}")
            if k.endswith("_timeout") and (not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0):
                raise PolicyError(f"offload {k} must be a number of seconds > 0, not {v!r}")
            setattr(p, k, v)
        return p

    # -- decisions ------------------------------------------------------------
    def eligible(self, conn: Conn) -> bool:
        """Does the connection qualify for the hardware now?"""
        st = conn.bits          # asked after every packet: plain ints, no Status per call
        if not st & Bits.CONFIRMED or st & _NOT_ELIGIBLE:
            return False
        proto = conn.proto
        if proto == IPPROTO_TCP:
            return self.tcp == "established" and conn.state == "ESTABLISHED" and bool(st & Bits.ASSURED)
        if proto == IPPROTO_UDP:
            if self.udp == "assured":
                return bool(st & Bits.ASSURED)
            return self.udp == "replied" and bool(st & Bits.SEEN_REPLY)
        if proto in ICMPS:
            return self.icmp == "replied" and bool(st & Bits.SEEN_REPLY)
        return False

    def leaving(self, conn: Conn) -> str | None:
        """Why an offloaded connection must leave the hardware now ("fin",
        "rst"), None while it may stay."""
        if conn.proto != IPPROTO_TCP:
            return None
        state = conn.state
        if state == "ESTABLISHED":
            return None
        if state == "CLOSE":
            return "rst"
        if self.closing and state not in TERMINAL_STATES:
            return None
        return "fin"

    def timeouts(self) -> dict[str, float]:
        """The offload timeouts by protocol, as the hardware ages by them."""
        return {"tcp": self.tcp_timeout, "udp": self.udp_timeout, "icmp": self.icmp_timeout}

    def set_timeouts(self, changes: dict[str, float]) -> None:
        """New offload timeouts by protocol (tcp, udp, icmp); all or none."""
        for proto, secs in changes.items():
            if proto not in ("tcp", "udp", "icmp"):
                raise PolicyError(f"no offload timeout for {proto!r} (tcp, udp, icmp)")
            if not isinstance(secs, (int, float)) or isinstance(secs, bool) or secs <= 0:
                raise PolicyError(f"offload {proto} timeout must be a number of seconds > 0, not {secs!r}")
        for proto, secs in changes.items():
            setattr(self, f"{proto}_timeout", float(secs))

    def timeout_for(self, conn: Conn) -> float:
        """The offload timeout of a connection in hardware."""
        if conn.proto == IPPROTO_TCP:
            return self.tcp_timeout
        if conn.proto == IPPROTO_UDP:
            return self.udp_timeout
        return self.icmp_timeout


def state_timeout(conn: Conn, timeouts: dict) -> float:
    """The timeout the tracker gives a connection in its state (what it
    gets back when it leaves the hardware, as nf_flowtable does)."""
    return timeouts[state_key(conn)]
