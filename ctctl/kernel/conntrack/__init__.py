"""Connection tracking faithful to nf_conntrack (see docs/conntrack.md for
where it is not): ``ConnTracker.ct`` is the tc ``ct`` action."""

from .conn import DEFAULT_TIMEOUTS, Bits, Conn, CtConfig, CtResult, Status
from .format import EventLog, conntrack_record, format_conntrack, format_event
from .nat import NatSpec, nat_ct_state
from .query import ConnFilter, QueryError, select
from .tracker import ConnTracker
from .tuples import Tuple, tuple_of

__all__ = [
    "ConnTracker", "CtConfig", "CtResult", "Conn", "NatSpec", "Status", "Bits", "Tuple",
    "tuple_of", "format_conntrack", "format_event", "EventLog", "DEFAULT_TIMEOUTS", "nat_ct_state",
    "conntrack_record", "ConnFilter", "QueryError", "select",
]
