"""Run one `filter add|del|flush|show` command line against a RuleSet — what
`ctctl filter ...` does once the line reaches the box."""

from __future__ import annotations

from dataclasses import dataclass, field

from .model import Filter
from .parser import AddCommand, DelCommand, parse_command
from .ruleset import RuleSet


@dataclass
class Outcome:
    verb: str  # "add", "del" or "show"
    filters: list[Filter] = field(default_factory=list)  # added or removed
    lines: list[str] = field(default_factory=list)  # what to print


def execute(rs: RuleSet, text: str, hw_stats: dict | None = None, aggregates: dict | None = None) -> Outcome:
    """Parse and apply; a refused line raises RuleSyntaxError and leaves
    the set unchanged.  `hw_stats` (Filter -> (packets, bytes)) are what
    the hardware counted, `aggregates` what each rule's flows counted
    (RuleSet.show), for `show -s`."""
    cmd = parse_command(text)
    if isinstance(cmd, AddCommand):
        f = rs.add(cmd.filter)
        return Outcome("add", [f], [])
    if isinstance(cmd, DelCommand):
        removed = []
        for dev in [cmd.dev] if cmd.dev is not None else rs.devices():
            removed += rs.delete(dev, chain=cmd.chain, prio=cmd.prio, handle=cmd.handle, protocol=cmd.protocol)
        return Outcome("del", removed, [])
    return Outcome("show", [], rs.show(cmd.dev, chain=cmd.chain, stats=cmd.stats, hw_stats=hw_stats,
                                       aggregates=aggregates))
