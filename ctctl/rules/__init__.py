"""tc rules as the talk writes them: model, parser, printer, validation,
the ordered set of a box's filters, and YAML loading."""

from .commands import Outcome, execute
from .errors import RuleSyntaxError
from .model import (
    CT_CONTROLS, DEFAULT_PRIO, ETH_P_ALL, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, Action, ActionBase,
    ContinueAction, CsumAction, CtAction, CtNat, CtStateMatch, DropAction, Filter, FlowerMatch,
    GotoAction, MirredAction, Munge, PassAction, PeditAction, PipeAction, PortRange, ReclassifyAction,
    TrapAction, TunnelKeyAction,
)
from .parser import AddCommand, Command, DelCommand, ShowCommand, parse_command, parse_filter
from .printer import format_action, format_filter
from .ruleset import FilterStats, RuleSet
from .validate import problems, validate
from .yaml_rules import RulesFileError, load_rules, load_ruleset, rules_from_node

__all__ = [
    "Outcome", "execute",
    "RuleSyntaxError", "DEFAULT_PRIO", "ETH_P_ALL", "ETH_P_ARP", "ETH_P_IP", "ETH_P_IPV6",
    "Action", "ActionBase", "CT_CONTROLS", "ContinueAction", "CsumAction", "CtAction", "Munge",
    "PeditAction", "CtNat", "CtStateMatch",
    "DropAction", "Filter", "FlowerMatch", "GotoAction", "MirredAction", "PassAction", "PipeAction",
    "PortRange", "ReclassifyAction", "TrapAction", "TunnelKeyAction",
    "AddCommand", "Command", "DelCommand", "ShowCommand", "parse_command", "parse_filter",
    "format_action", "format_filter", "FilterStats", "RuleSet", "problems", "validate",
    "RulesFileError", "load_rules", "load_ruleset", "rules_from_node",
]
