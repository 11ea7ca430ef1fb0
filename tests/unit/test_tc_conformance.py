"""tc conformance: the kernel's own act_ct test cases, and what iproute2
refuses, against ctctl's parser and its `filter show`.

The cases are those of the kernel's tc-testing suite,
tools/testing/selftests/tc-testing/tc-tests/actions/ct.json, as shipped
in Linux 6.12.117 (Debian's linux-source-6.12 6.12.117-1~deb12u1; the
file's sha256 is 30bcd901e5bd916a43ee9b9c1034c692705dece158bc380b57bde00e950dc29f;
the mainline tree at commit 3793338cc3fea40c6bf0835d6b0e74f80beff3fb
has the first 17 of its 18).  Each case is its command line, the exit
code it expects and the pattern (with tdc's flags, re.DOTALL |
re.MULTILINE, counted with findall) that tc's output must match; ctctl's
output must match the same pattern the same number of times.

A standalone action (`tc actions add action ct ...`) is run as the action
of a flower filter on the box's port, and its listing is `filter show`:
ctctl has no shared action table outside filters, and tc prints a
filter's actions in the same layout as `tc actions list`.  Case 3992
sends its two packets through the software datapath (scapy builds them;
the tracker is ctctl's own, no kernel involved) and reads the
connection table as /proc/net/nf_conntrack shows it.

The suite's filter tests (tc-tests/filters/*.json, flower.json included)
have no case with ct_state, ct_zone, ct_mark or ct_label in that version;
flower's ct matches are covered by case 3992's `ct_state -trk` here and by
tests/integration/test_tc_show.py against the kernel's own tc.

Cases of newer trees that do not apply, by id (not in 6.12.117; seen in
intel-lab-lkp/linux@1d291d055581ef69a89987fa1b742efc53f2a6df):
"""

from __future__ import annotations

import re

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from ctctl.kernel.conntrack import ConnTracker
from ctctl.kernel.conntrack.format import format_conntrack
from ctctl.kernel.pipeline import Pipeline
from ctctl.rules import RuleSet, RuleSyntaxError, execute

from helpers import FakeClock

NOT_APPLICABLE = {
    "8883": "act_ct on an ets qdisc: ctctl hangs filters on a port's ingress only",
    "3b10": "a matchall filter: ctctl runs flower only",
    "0337": "clsact egress: ctctl runs ingress only",
    "4f60": "a shared block: ctctl has none",
    "9c2a": "defragmentation before a prio qdisc: no qdiscs, no defragmentation in ctctl",
    "c7a3": "a matchall filter, and the header checks of IPv6 next-header 0",
    "c2a9": "pedit and csum actions (not run by ctctl)",
    "d3b8": "pedit (not run by ctctl)",
    "a1b2": "pedit (not run by ctctl)",
    "b7f4": "pedit and csum (not run by ctctl)",
}
__doc__ += "".join(f"  {k}: {v}\n" for k, v in NOT_APPLICABLE.items())

DEV = "eth5"
# id: (cmdUnderTest, expExitCode, matchPattern, matchCount), as in the file.
CASES = {
    "696a": ("$TC actions add action ct index 42", 0,
             r"action order [0-9]*: ct zone 0 pipe.*index 42 ref", 1),
    "e38c": ("$TC actions add action ct index 42 cookie deadbeef", 0,
             r"action order [0-9]*: ct zone 0 pipe.*index 42 ref.*cookie deadbeef", 1),
    "9f20": ("$TC actions add action ct clear index 42", 0,
             r"action order [0-9]*: ct clear pipe.*index 42 ref", 1),
    "0bc1": ("$TC actions add action ct clear index 42 cookie aa11bb22cc33dd44ee55ff66aa11b1b2", 0,
             r"action order [0-9]*: ct clear pipe.*index 42 ref.*cookie aa11bb22cc33dd44ee55ff66aa11b1b2", 1),
    "5bea": ("$TC actions add action ct zone 404 index 42", 0,
             r"action order [0-9]*: ct zone 404 pipe.*index 42 ref", 1),
    "d5d6": ("$TC actions add action ct zone 404 commit index 42", 0,
             r"action order [0-9]*: ct commit zone 404 pipe.*index 42 ref", 1),
    "029f": ("$TC actions add action ct zone 404 commit mark 0x42 index 42", 0,
             r"action order [0-9]*: ct commit mark 66 zone 404 pipe.*index 42 ref", 1),
    "a58d": ("$TC actions add action ct zone 404 commit mark 0x42 nat src addr 5.5.5.7 index 42", 0,
             r"action order [0-9]*: ct commit mark 66 zone 404 nat src addr 5.5.5.7 pipe.*index 42 ref", 1),
    "901b": ("$TC actions add action ct commit nat src addr 5.5.5.7-5.5.6.0 port 1000-2000 index 44", 0,
             r"action order [0-9]*: ct commit zone 0 nat src addr 5.5.5.7-5.5.6.0 port 1000-2000 pipe.*index 44 ref",
             1),
    "072b": ("$TC actions add action ct commit nat src addr 2001::1 port 1000-2000 index 44", 0,
             r"action order [0-9]*: ct commit zone 0 nat src addr 2001::1 port 1000-2000 pipe.*index 44 ref", 1),
    "3420": ("$TC actions add action ct commit nat src addr 2001::1-2001::10 port 1000-2000 index 44", 0,
             r"action order [0-9]*: ct commit zone 0 nat src addr 2001::1-2001::10 port 1000-2000 pipe.*index 44 ref",
             1),
    "4470": ("$TC actions add action ct commit force nat src addr 2001::1-2001::10 port 1000-2000 index 44", 0,
             r"action order [0-9]*: ct commit force zone 0 nat src addr 2001::1-2001::10 port 1000-2000 pipe"
             r".*index 44 ref", 1),
    "5d88": ("$TC actions add action ct label 123123 index 44", 0,
             r"action order [0-9]*: ct zone 0 label 12312300000000000000000000000000 pipe.*index 44 ref", 1),
    "04d4": ("$TC actions add action ct label 12312300000000000000000000000001/ffffffff000000000000000000000001 "
             "index 44", 0,
             r"action order [0-9]*: ct zone 0 label 12312300000000000000000000000001/ffffffff000000000000000000000001"
             r" pipe.*index 44 ref", 1),
    "9751": ("$TC actions add action ct mark 0x42/0xf0 index 42", 0,
             r"action order [0-9]*: ct mark 66/0xf0 zone 0 pipe.*index 42 ref", 1),
    "2faa": ("$TC actions add action ct mark 0x42/0xf0 index 42 cookie aa11bb22cc33dd44ee55ff66aa11b1b2", 0,
             r"action order [0-9]*: ct mark 66/0xf0 zone 0 pipe.*index 42 ref.*cookie aa11bb22cc33dd44ee55ff66aa11b1b2",
             1),
    "3991": ("$TC actions add action ct no_percpu", 0, r"action order [0-9]*: ct zone 0 pipe.*no_percpu", 1),
    "3992": ("$TC filter add dev $DEV1 ingress protocol ip prio 1 flower ct_state -trk action ct commit nat dst "
             "addr 20.0.0.1 port 10 pipe action drop", 0, r"dst=10.0.0.20", 1),
}


def as_filter(cmd: str) -> str:
    """The case's line as ctctl takes it: a standalone action becomes a
    filter's, $DEV1 the box's port."""
    prefix = "$TC actions add "
    if cmd.startswith(prefix):
        return f"filter add dev {DEV} ingress prio 1 flower {cmd[len(prefix):]}"
    return cmd.replace("$TC ", "").replace("$DEV1", DEV)


def run(rs: RuleSet, line: str) -> int:
    """The exit code ctctl gives the line (ctctl filter: 1 on a refusal)."""
    try:
        execute(rs, line)
    except RuleSyntaxError:
        return 1
    return 0


def test_every_case_is_listed_or_run():
    assert not set(CASES) & set(NOT_APPLICABLE)
    assert len(CASES) == 18


@pytest.mark.parametrize("case", [c for c in CASES if c != "3992"])
def test_ct_action_case(case: str):
    cmd, code, pattern, count = CASES[case]
    rs = RuleSet()
    assert run(rs, as_filter(cmd)) == code
    shown = "\n".join(execute(rs, f"filter show dev {DEV} ingress").lines)
    found = re.findall(pattern, shown, re.DOTALL | re.MULTILINE)
    assert len(found) == count, shown
    # The action as the user wrote it survives the round trip through
    # the `filter add` line ctctl keeps (its restart state).
    again = RuleSet()
    assert run(again, execute(rs, f"filter show dev {DEV}", layout="as-added").lines[0]) == 0
    assert again.filters() == rs.filters()


def test_dnat_tuple_conflict_3992():
    """Two packets from one source port, DNATed to one server address and
    port: the second connection's reply tuple would clash with the first's,
    and the kernel's fix gives it another source port instead of dropping
    it, so both are in the table (the case counts the second's original
    destination, 10.0.0.20, once)."""
    cmd, code, pattern, count = CASES["3992"]
    rs = RuleSet()
    assert run(rs, as_filter(cmd)) == code
    clock = FakeClock()
    tracker = ConnTracker(clock=clock)
    pipe = Pipeline(rs, tracker, [DEV, "eth6"])
    for dst in ("10.0.0.10", "10.0.0.20"):
        pkt = Ether(type=0x800) / IP(src="10.0.0.10", dst=dst) / TCP(sport=5000, dport=10)
        v = pipe.process(bytearray(bytes(pkt)), DEV)
        assert v.kind == "drop" and v.reason == "drop_action", v   # the rule's own drop, after the commit
    table = "\n".join(format_conntrack(c, clock(), extended=True) for c in tracker.entries())
    assert len(re.findall(pattern, table, re.DOTALL | re.MULTILINE)) == count, table
    assert len(list(tracker.entries())) == 2, table


# What iproute2's m_ct.c refuses after reading the options, with its words.
REFUSED = [
    ("action ct clear commit", "ct: clear can only be used alone"),
    ("action ct clear zone 5", "ct: clear can only be used alone"),
    ("action ct commit nat src addr 1.1.1.1 nat dst addr 2.2.2.2", "ct: src and dst nat can't be used together"),
    ("action ct commit nat", "ct: commit and nat must set src or dst"),
    ("action ct nat src addr 1.1.1.1", "ct: src or dst is only valid if commit is set"),
]


@pytest.mark.parametrize("actions,reason", REFUSED)
def test_what_tc_refuses_is_refused_with_its_reason(actions: str, reason: str):
    rs = RuleSet()
    with pytest.raises(RuleSyntaxError) as e:
        execute(rs, f"filter add dev {DEV} ingress protocol ip prio 1 flower {actions}")
    assert reason in e.value.message
    assert rs.filters() == []


# tc's abbreviations (iproute2's matches(): any prefix, first keyword in
# the parser's order wins), each against the line spelled out.
ABBREVIATIONS = [
    ("filter add dev eth5 proto ip pref 3 ingress flower ip_p tcp dst_p 80 ct_s +trk+est ac drop",
     "filter add dev eth5 protocol ip preference 3 ingress flower ip_proto tcp dst_port 80 "
     "ct_state +trk+est action drop"),
    ("filter add dev eth5 prio 2 ingress flower action ct co z 4 m 5 pipe",
     "filter add dev eth5 priority 2 ingress flower action ct commit zone 4 mark 5 pipe"),
    ("filter add dev eth5 p 2 c 3 flower action ct c",     # p: preference, c: chain; in ct, c is clear
     "filter add dev eth5 preference 2 chain 3 flower action ct clear"),
    ("filter add dev eth5 parent ffff:fff2 prio 1 flower s action mirred e r dev eth6",   # s: skip_hw
     "filter add dev eth5 ingress prio 1 flower skip_hw action mirred egress redirect dev eth6"),
    ("f a dev eth5 prio 1 flower action d", "filter add dev eth5 prio 1 flower action drop"),
    ("filter add dev eth5 prio 1 flower action ct commit g chain 7",
     "filter add dev eth5 prio 1 flower action ct commit goto chain 7"),
]


@pytest.mark.parametrize("short,full", ABBREVIATIONS)
def test_abbreviations_read_as_tc_reads_them(short: str, full: str):
    a, b = RuleSet(), RuleSet()
    assert run(a, short) == 0 and run(b, full) == 0
    assert a.filters() == b.filters()


@pytest.mark.parametrize("line,why", [
    ("filter add dev eth5 h 1 flower action drop", "help"),           # h is help; handle is exact
    ("filter add dev eth5 prio 1 flower a 1.1.1.1 action drop", "arp_tip"),   # a is arp_tip, not action
    ("filter add dev eth5 prio 1 flower action ct yes_percpu", "no 'yes_percpu'"),
    ("filter add dev eth5 prio 1 flower action ct commit pipe index 3", "before its control verb"),
    ("filter add dev eth5 prio 1 flower action ct commit trap", "trap as ct's control verb"),
    ("filter add dev eth5 prio 1 flower action drop cookie abc", "even number of hex digits"),
    ("filter add dev eth5 prio 1 flower action goto chain 268435456", "268435455"),
])
def test_what_tc_reads_otherwise_is_named(line: str, why: str):
    with pytest.raises(RuleSyntaxError) as e:
        execute(RuleSet(), line)
    assert why in e.value.message
