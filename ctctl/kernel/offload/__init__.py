"""The flowtable: which connections go to the hardware, when they leave,
and what they counted there (nf_flowtable's role, with the proposal's
hardware, soft and pending lists).  One module per job: policy (what
qualifies, which timeouts), hw (what it asks of a device), manager (the
lists), aging (how idle connections in hardware are found), fastpath (the
soft list's software shortcut)."""

from .hw import DeviceError, EntryStats, FlowDevice, FlowExists, TableFull
from .manager import HwConn, OffloadManager
from .policy import OffloadPolicy, PolicyError

__all__ = ["DeviceError", "EntryStats", "FlowDevice", "FlowExists", "TableFull", "HwConn",
           "OffloadManager", "OffloadPolicy", "PolicyError"]
