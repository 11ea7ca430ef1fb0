"""Run one `filter add|del|flush|show` command line against a RuleSet — what
`ctctl filter ...` does once the line reaches the box."""

from __future__ import annotations

from dataclasses import dataclass, field

from typing import Callable

from . import tcshow
from .model import Filter
from .parser import AddCommand, DelCommand, parse_command
from .ruleset import RuleSet

# How `filter show` prints: tc's layout (text or tc -j's JSON), or each
# filter as the `filter add` line that makes it.
LAYOUTS = ("tc", "json", "as-added")


@dataclass
class Outcome:
    verb: str  # "add", "del" or "show"
    filters: list[Filter] = field(default_factory=list)  # added or removed
    lines: list[str] = field(default_factory=list)  # what to print
    data: list[dict] | None = None  # show in the json layout: tc -j's list


def execute(rs: RuleSet, text: str, hw_stats: dict | None = None, aggregates: dict | None = None,
            layout: str = "tc", in_hw: Callable[[Filter], bool] | None = None) -> Outcome:
    """Parse and apply; a refused line raises RuleSyntaxError and leaves
    the set unchanged.  `hw_stats` (Filter -> (packets, bytes)) are what
    the hardware counted, `aggregates` what each rule's flows counted
    (RuleSet.show), for `show -s`; `in_hw` says whether the hardware runs a
    filter (tc's in_hw / not_in_hw)."""
    if layout not in LAYOUTS:
        raise ValueError(f"filter show: unknown layout {layout!r} (expected {', '.join(LAYOUTS)})")
    cmd = parse_command(text)
    if isinstance(cmd, AddCommand):
        f = rs.add(cmd.filter)
        return Outcome("add", [f], [f"note: {n}" for n in rs.notes(f)])
    if isinstance(cmd, DelCommand):
        removed = []
        for dev in [cmd.dev] if cmd.dev is not None else rs.devices():
            removed += rs.delete(dev, chain=cmd.chain, prio=cmd.prio, handle=cmd.handle, protocol=cmd.protocol)
        return Outcome("del", removed, [])
    if layout == "as-added":
        return Outcome("show", [], rs.show(cmd.dev, chain=cmd.chain, stats=cmd.stats, hw_stats=hw_stats,
                                           aggregates=aggregates))
    shown, data = tcshow.show(rs, cmd.dev, chain=cmd.chain, stats=cmd.stats, hw_stats=hw_stats,
                              in_hw=in_hw, named=cmd.named)
    if layout == "json":
        return Outcome("show", [], [], data)
    return Outcome("show", [], shown.split("\n")[:-1] if shown else [])
