"""RuleSet: tc's ordering and numbering, atomic changes, show round trip;
YAML loading with file positions."""

from __future__ import annotations

import textwrap

import pytest

from ctctl.rules import (
    DEFAULT_PRIO, CtAction, DropAction, Filter, RuleSet, RuleSyntaxError,
    RulesFileError, format_filter, load_rules, load_ruleset, parse_command,
    parse_filter,
)
from ctctl.rules.model import ETH_P_IP, ETH_P_IPV6


def F(line: str) -> Filter:
    return parse_filter(line)


def test_default_prio_follows_tcf_auto_prio():
    rs = RuleSet()
    a = rs.add(F("dev eth5 flower action drop"))
    b = rs.add(F("dev eth5 flower action pass"))
    c = rs.add(F("dev eth5 chain 9 flower action pass"))
    d = rs.add(F("dev eth6 flower action pass"))
    assert a.prio == DEFAULT_PRIO == 49152
    assert b.prio == DEFAULT_PRIO - 1
    assert c.prio == DEFAULT_PRIO and d.prio == DEFAULT_PRIO
    # the later filter has the lower prio number: it runs first
    assert rs.chain("eth5", 0) == [b, a]


def test_auto_prio_below_explicit_prios():
    rs = RuleSet()
    rs.add(F("dev eth5 prio 100 flower action drop"))
    assert rs.add(F("dev eth5 flower action pass")).prio == 99
    rs2 = RuleSet([F("dev eth5 prio 1 flower action drop")])
    with pytest.raises(RuleSyntaxError, match="no free priority"):
        rs2.add(F("dev eth5 flower action pass"))
    assert len(rs2) == 1


def test_order_by_prio_then_insertion_and_handles():
    rs = RuleSet()
    x = rs.add(F("dev eth5 prio 20 flower action drop"))
    y = rs.add(F("dev eth5 prio 10 flower action pass"))
    z = rs.add(F("dev eth5 prio 20 flower action trap"))
    assert rs.chain("eth5", 0) == [y, x, z]
    assert (x.handle, y.handle, z.handle) == (1, 1, 2)
    w = rs.add(F("dev eth5 prio 20 handle 0x10 flower action pass"))
    assert w.handle == 16
    assert rs.add(F("dev eth5 prio 20 flower action pass")).handle == 17


def test_refused_adds_leave_the_set_unchanged():
    rs = RuleSet([F("dev eth5 protocol ip prio 5 handle 1 flower action drop")])
    before = rs.show()
    with pytest.raises(RuleSyntaxError, match="already exists"):
        rs.add(F("dev eth5 protocol ip prio 5 handle 1 flower action pass"))
    with pytest.raises(RuleSyntaxError, match="another protocol"):
        rs.add(F("dev eth5 protocol ipv6 prio 5 flower action pass"))
    with pytest.raises(RuleSyntaxError, match="clear can only be used alone"):
        rs.add(Filter(dev="eth5", actions=(CtAction(clear=True, zone=3),)))
    with pytest.raises(RuleSyntaxError, match="invalid interface name"):
        rs.add(Filter(dev="", actions=(DropAction(),)))
    assert rs.show() == before


def test_delete_selectors_return_what_was_removed():
    rs = RuleSet([
        F("dev eth5 protocol ip chain 0 prio 1 flower action drop"),
        F("dev eth5 protocol ip chain 0 prio 2 flower action drop"),
        F("dev eth5 protocol ip chain 0 prio 2 flower action pass"),
        F("dev eth5 protocol ipv6 chain 9 prio 3 flower action pass"),
        F("dev eth6 protocol ip chain 0 prio 1 flower action drop"),
    ])
    removed = rs.delete("eth5", chain=0, prio=2, handle=2)
    assert [(f.prio, f.handle) for f in removed] == [(2, 2)]
    removed = rs.delete("eth5", protocol=ETH_P_IPV6)
    assert [f.chain for f in removed] == [9]
    assert rs.chains("eth5") == [0]
    assert rs.delete("eth5", prio=7) == []
    assert len(rs.delete("eth5")) == 2
    assert rs.devices() == ["eth6"]
    assert rs.delete("nope") == []


def test_del_command_drives_delete():
    rs = RuleSet([F("dev eth5 chain 9 prio 4 flower action drop"),
                  F("dev eth5 chain 0 prio 4 flower action drop")])
    cmd = parse_command("tc filter del dev eth5 chain 9 pref 4")
    removed = rs.delete(cmd.dev, chain=cmd.chain, prio=cmd.prio, handle=cmd.handle,
                        protocol=cmd.protocol)
    assert [f.chain for f in removed] == [9]


def test_show_round_trips():
    lines = [
        "tc filter add dev eth6 protocol ip parent ffff: chain 0 flower ct_state \u2013trk action ct action goto chain 9",
        "tc filter add dev eth5 protocol ip parent ffff: chain 9 flower ct_state +trk +est action mirred egress redirect dev eth6",
        "filter add dev eth5 protocol ip chain 9 flower ct_state +trk+new action ct commit action mirred egress redirect dev eth6",
        "filter add dev eth5 protocol ipv6 chain 3 prio 7 flower ip_proto udp dst_port 53 action ct commit zone 2 nat src addr fd00::9 action pass",
    ]
    rs = RuleSet([F(x) for x in lines])
    shown = rs.show()
    assert len(shown) == 4
    again = RuleSet([F(x) for x in shown])
    assert again.show() == shown
    assert again.filters() == rs.filters()
    assert rs.show("eth6") == [shown[-1]] or rs.show("eth6")[0] in shown
    assert all(line.startswith("filter add dev eth6") for line in rs.show("eth6"))
    assert rs.show("eth5", chain=3) == [format_filter(rs.chain("eth5", 3)[0])]


def test_replace_all_is_atomic():
    rs = RuleSet([F("dev eth5 flower action drop")])
    before = rs.show()
    with pytest.raises(RuleSyntaxError):
        rs.replace_all([F("dev eth5 prio 1 handle 1 flower action pass"),
                        F("dev eth5 prio 1 handle 1 flower action drop")])
    assert rs.show() == before
    rs.replace_all([F("dev eth6 flower action pass")])
    assert rs.devices() == ["eth6"]


# -- YAML -----------------------------------------------------------------

GOOD = textwrap.dedent("""\
    name: demo
    rules:
      - tc filter add dev eth6 protocol ip parent ffff: chain 0 flower ct_state \u2013trk action ct action goto chain 9
      - "dev eth5 protocol ip chain 9 flower ct_state +trk+est action mirred egress redirect dev eth6"
      - 'dev eth5 protocol ip chain 9 flower ct_state +trk+new action ct commit action mirred egress redirect dev eth6'
    """)


def test_yaml_rules_load():
    fs = load_rules(GOOD, "box.yaml")
    assert [f.chain for f in fs] == [0, 9, 9]
    assert fs[0] == F("dev eth6 protocol ip chain 0 flower ct_state -trk action ct action goto chain 9")
    rs = load_ruleset(GOOD, "box.yaml")
    assert len(rs) == 3 and rs.devices() == ["eth5", "eth6"]


def test_yaml_top_level_list_and_empty():
    assert len(load_rules("- dev eth5 flower action drop\n")) == 1
    assert load_rules("rules:\n") == []
    assert load_rules("") == []


@pytest.mark.parametrize("line_text,quote", [
    ("dev eth5 flower ct_state +trk+estab action drop", ""),
    ("tc filter add dev eth5 parent ffff: chain 0 flower ct_state +trk+estab action drop", ""),
    ("dev eth5 flower ct_state +trk+estab action drop", '"'),
    ("dev eth5 flower ct_state +trk+estab action drop", "'"),
])
def test_yaml_error_points_at_line_and_column(line_text, quote):
    text = f"rules:\n  - dev eth5 flower action drop\n  - {quote}{line_text}{quote}\n"
    with pytest.raises(RulesFileError) as ei:
        load_rules(text, "box.yaml")
    file_line = text.splitlines()[2]
    col = file_line.index("estab") + 1
    assert str(ei.value).startswith(f"box.yaml:3:{col}: ct_state: unknown flag 'estab'")
    assert ei.value.token == "estab"


def test_yaml_error_in_folded_rule_names_rule_column():
    text = "rules:\n  - >-\n    dev eth5 flower\n    ct_state +trk+estab action drop\n"
    with pytest.raises(RulesFileError) as ei:
        load_rules(text, "r.yaml")
    rule = "dev eth5 flower ct_state +trk+estab action drop"
    assert str(ei.value).startswith("r.yaml:2:5: ")
    assert f"at column {rule.index('estab') + 1} of the rule" in str(ei.value)


@pytest.mark.parametrize("text,where,msg", [
    ("rules: 5\n", "x.yaml:1:8", "must be a list"),
    ("rules:\n  - [a, b]\n", "x.yaml:2:5", "must be one tc line"),
    ("rules:\n  - 12\n", "x.yaml:2:5", "must be one tc line"),
    ("other: 1\n", "x.yaml:1:1", "no 'rules:' list"),
    ("rules: [a\n", "x.yaml:2:1", "YAML syntax error"),
])
def test_yaml_structure_errors(text, where, msg):
    with pytest.raises(RulesFileError) as ei:
        load_rules(text, "x.yaml")
    assert str(ei.value).startswith(where + ": "), str(ei.value)
    assert msg in str(ei.value)


def test_yaml_ruleset_conflict_reported_at_its_line():
    text = ("rules:\n  - dev eth5 prio 3 handle 1 flower action drop\n"
            "  - dev eth5 prio 3 handle 1 flower action pass\n")
    with pytest.raises(RulesFileError) as ei:
        load_ruleset(text, "c.yaml")
    assert str(ei.value).startswith("c.yaml:3:5: ")
    assert "already exists" in str(ei.value)


def test_yaml_and_cli_share_one_syntax():
    line = "tc filter add dev eth5 protocol ip parent ffff: chain 0 flower ip_proto tcp dst_port 80 action drop"
    assert load_rules(f"rules:\n  - {line}\n")[0] == parse_command(line).filter
    assert load_rules(f"rules:\n  - {line}\n")[0].protocol == ETH_P_IP


def test_execute_add_show_del():
    from ctctl.rules import execute
    rs = RuleSet()
    seed = ("tc filter add dev eth6 protocol ip parent ffff: chain 0 flower ct_state \u2013trk "
            "action ct action goto chain 9")
    out = execute(rs, seed)
    assert out.verb == "add" and out.filters[0].prio == DEFAULT_PRIO
    shown = execute(rs, "ctctl filter show dev eth6", layout="as-added").lines
    assert shown == ["filter add dev eth6 protocol ip parent ffff: chain 0 prio 49152 handle 0x1 "
                     "flower ct_state -trk action ct action goto chain 9"]
    with pytest.raises(RuleSyntaxError):
        execute(rs, "tc filter add dev eth6 flower ct_state +est action drop")
    assert execute(rs, "tc filter show", layout="as-added").lines == shown
    assert execute(rs, "tc -s filter show dev eth6", layout="as-added").lines[0].splitlines()[1:] == [
        "\tSent 0 bytes 0 pkt", "\tSent software 0 bytes 0 pkt", "\tSent hardware 0 bytes 0 pkt"]
    # tc's own layout by default: the instance's line, then the filter's.
    assert execute(rs, "tc filter show dev eth6 ingress").lines == [
        "filter protocol ip pref 49152 flower chain 0 ",
        "filter protocol ip pref 49152 flower chain 0 handle 0x1 ",
        "  eth_type ipv4", "  ct_state -trk", "  not_in_hw",
        "\taction order 1: ct zone 0 pipe", "\t index 1 ref 1 bind 1", "",
        "\taction order 2: gact action goto chain 9", "\t random type none pass val 0",
        "\t index 1 ref 1 bind 1", ""]
    gone = execute(rs, "tc filter del dev eth6 chain 0").filters
    assert [format_filter(f) for f in gone] == shown
    assert execute(rs, "tc filter show").lines == []


def test_action_indices_as_the_kernel_gives_them():
    """Each kind (ct, mirred, gact) numbers its actions from 1, lowest free
    first; an index given that an action of the kind has binds the filter
    to that action, with that action's parameters, as tc does."""
    from ctctl.rules import execute
    rs = RuleSet()
    a = rs.add(parse_filter("dev eth5 prio 1 flower action ct zone 1 action drop"))
    b = rs.add(parse_filter("dev eth5 prio 2 flower action ct zone 2 index 7 action mirred egress redirect dev eth6"))
    assert rs.indices(a) == (1, 1) and rs.indices(b) == (7, 1)
    assert format_filter(a).endswith("action ct zone 1 action drop")    # assigned: not in the line
    out = execute(rs, "filter add dev eth5 prio 3 flower action ct commit zone 9 index 7")
    c = out.filters[0]
    assert c.actions[0].zone == 2 and not c.actions[0].commit and rs.indices(c) == (7,)
    assert out.lines and "index 7 exists" in out.lines[0]
    assert rs.action_refs()[("ct", 7)] == 2
    rs.delete("eth5", prio=1)
    d = rs.add(parse_filter("dev eth5 prio 4 flower action ct"))
    assert rs.indices(d) == (1,)            # the freed index is the lowest again
    rs.delete("eth5", prio=3)
    assert rs.action_refs()[("ct", 7)] == 1     # b still holds it
    e = rs.add(parse_filter("dev eth5 prio 5 flower action ct zone 5 action ct zone 6"))
    assert rs.indices(e) == (2, 3)              # two of a kind in one filter: two indices
    # The state a controller keeps: the lines re-added give the same set.
    again = RuleSet([parse_filter(format_filter(f)) for f in rs.filters()])
    assert again.filters() == rs.filters()
    assert [again.indices(f) for f in again.filters()] == [rs.indices(f) for f in rs.filters()]
