"""Resume points that name a rule, not an action (abi.RESUME_MATCH): the
hardware stopped before deciding whether rule N matches (a match it cannot
evaluate, a skip_hw rule, no match among the rules it holds); software
matches from rule N on, with the metadata the hardware restored."""

from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from ctctl.abi import RESUME_MATCH, CtState
from ctctl.kernel.conntrack import ConnTracker
from ctctl.kernel.pipeline import Pipeline, Resume
from ctctl.rules import RuleSet, parse_filter

RULES = [
    "filter add dev eth5 protocol ip parent ffff: chain 1 prio 1 flower ct_state +trk+est action drop",
    "filter add dev eth5 protocol ip parent ffff: chain 1 prio 2 flower ct_state +trk+est action mirred egress redirect dev eth6",
    "filter add dev eth5 protocol ip parent ffff: chain 1 prio 3 flower action pass",
]


def pipeline():
    rs = RuleSet()
    for line in RULES:
        rs.add(parse_filter(line))
    return Pipeline(rs, ConnTracker(clock=lambda: 0.0), ["eth5", "eth6"])


def frame():
    return bytearray(bytes(Ether() / IP(src="192.0.2.1", dst="192.0.2.2") / TCP(flags="A")))


EST = int(CtState.TRK | CtState.EST)


def test_resume_match_skips_the_rules_before_it():
    v = pipeline().process(frame(), "eth5", Resume(chain=1, rule=1, action=RESUME_MATCH, ct_state=EST))
    assert (v.kind, v.output) == ("output", "eth6")


def test_resume_match_at_rule_0_is_a_full_scan_of_the_chain():
    v = pipeline().process(frame(), "eth5", Resume(chain=1, rule=0, action=RESUME_MATCH, ct_state=EST))
    assert v.kind == "drop" and v.reason != "no_match"


def test_resume_match_uses_the_restored_metadata():
    # Without +est the rules 0 and 1 do not match: the catch-all passes.
    v = pipeline().process(frame(), "eth5", Resume(chain=1, rule=0, action=RESUME_MATCH, ct_state=0))
    assert v.kind == "pass"


def test_resume_match_past_the_end_is_no_match():
    v = pipeline().process(frame(), "eth5", Resume(chain=1, rule=3, action=RESUME_MATCH, ct_state=EST))
    assert (v.kind, v.reason) == ("drop", "no_match")


def test_resume_match_beyond_the_chain_is_stale():
    v = pipeline().process(frame(), "eth5", Resume(chain=1, rule=4, action=RESUME_MATCH, ct_state=EST))
    assert (v.kind, v.reason) == ("drop", "stale_resume")
