"""The tc syntax: every keyword, every error with its column, the round trip."""

from __future__ import annotations

import ipaddress
import random

import pytest

from ctctl.abi import CtState
from ctctl.rules import (
    ETH_P_ALL, ETH_P_IP, ETH_P_IPV6, CtAction, CtNat, CtStateMatch, DelCommand,
    DropAction, Filter, FlowerMatch, GotoAction, MirredAction, PassAction,
    PortRange, RuleSyntaxError, ShowCommand, TrapAction, format_filter,
    parse_command, parse_filter, problems,
)

# The seed's slide 9, as REFERENCE.md writes it (the slide's "eth 6" is PDF
# extraction; the en dash in "–trk" is the slide's own typography).
SEED_LINES = [
    "tc filter add dev eth6 protocol ip parent ffff: chain 0 flower ct_state \u2013trk action ct action goto chain 9",
    "tc filter add dev eth5 protocol ip parent ffff: chain 9 flower ct_state +trk +est action mirred egress redirect dev eth6",
    "tc filter add dev eth6 protocol ip parent ffff: chain 0 flower ct_state -trk action ct action goto chain 9",
    "tc filter add dev eth5 protocol ip parent ffff: chain 9 flower ct_state +trk+est action mirred egress redirect dev eth6",
]


def test_seed_chain0_line():
    f = parse_filter(SEED_LINES[0])
    assert f == Filter(dev="eth6", chain=0, protocol=ETH_P_IP,
                       matches=FlowerMatch(ct_state=CtStateMatch(clear=CtState.TRK)),
                       actions=(CtAction(), GotoAction(9)))
    assert parse_filter(SEED_LINES[2]) == f


def test_seed_chain9_line():
    f = parse_filter(SEED_LINES[1])
    assert f.dev == "eth5" and f.chain == 9
    assert f.matches.ct_state == CtStateMatch(set=CtState.TRK | CtState.EST)
    assert f.actions == (MirredAction("eth6"),)
    assert parse_filter(SEED_LINES[3]) == f


@pytest.mark.parametrize("line", SEED_LINES)
def test_seed_round_trip(line):
    f = parse_filter(line)
    text = format_filter(f)
    assert parse_filter(text) == f
    assert format_filter(parse_filter(text)) == text


def test_seed_prints_canonical_minus():
    assert "ct_state -trk " in format_filter(parse_filter(SEED_LINES[0]))
    assert "ct_state +trk+est " in format_filter(parse_filter(SEED_LINES[1]))


@pytest.mark.parametrize("prefix", ["", "tc ", "ctctl ", "filter add ", "tc filter add ",
                                    "ctctl filter add ", "tc -s filter add "])
def test_optional_prefixes(prefix):
    f = parse_filter(prefix + "dev eth6 protocol ip parent ffff: flower action drop")
    assert f == Filter(dev="eth6", protocol=ETH_P_IP, actions=(DropAction(),))


@pytest.mark.parametrize("text,expected", [
    ("protocol ip", ETH_P_IP), ("protocol ipv6", ETH_P_IPV6), ("protocol all", ETH_P_ALL),
    ("protocol arp", 0x0806), ("protocol 0x0800", ETH_P_IP), ("protocol 0x88cc", 0x88CC),
    ("", ETH_P_ALL),
])
def test_protocol(text, expected):
    assert parse_filter(f"dev eth6 {text} flower action pass").protocol == expected


@pytest.mark.parametrize("text,field,value", [
    ("chain 7", "chain", 7), ("chain 0x10", "chain", 16), ("prio 5", "prio", 5),
    ("pref 6", "prio", 6), ("priority 9", "prio", 9), ("handle 3", "handle", 3),
    ("handle 0x1f", "handle", 0x1F), ("ingress", "chain", 0), ("parent ffff:fff2", "chain", 0),
])
def test_head_options(text, field, value):
    assert getattr(parse_filter(f"dev eth6 {text} flower action pass"), field) == value


def _m(text: str) -> FlowerMatch:
    return parse_filter(f"dev eth6 {text} action pass").matches


@pytest.mark.parametrize("text,expected", [
    ("protocol ip flower ip_proto tcp", FlowerMatch(ip_proto=6)),
    ("protocol ip flower ip_proto udp", FlowerMatch(ip_proto=17)),
    ("protocol ip flower ip_proto icmp", FlowerMatch(ip_proto=1)),
    ("protocol ipv6 flower ip_proto icmpv6", FlowerMatch(ip_proto=58)),
    ("protocol ip flower ip_proto 47", FlowerMatch(ip_proto=47)),
    ("protocol ip flower src_ip 10.0.0.1", FlowerMatch(src_ip=ipaddress.ip_network("10.0.0.1/32"))),
    ("protocol ip flower dst_ip 10.1.2.3/16", FlowerMatch(dst_ip=ipaddress.ip_network("10.1.0.0/16"))),
    ("protocol ipv6 flower dst_ip fd00::1/64", FlowerMatch(dst_ip=ipaddress.ip_network("fd00::/64"))),
    ("protocol ip flower ip_proto tcp src_port 1234",
     FlowerMatch(ip_proto=6, src_port=PortRange(1234, 1234))),
    ("protocol ip flower ip_proto udp dst_port 1000-2000",
     FlowerMatch(ip_proto=17, dst_port=PortRange(1000, 2000))),
    ("protocol ip flower ip_proto icmp type 8 code 0", FlowerMatch(ip_proto=1, icmp_type=8, icmp_code=0)),
    ("protocol ip flower ip_proto icmp icmp_type 3 icmp_code 1",
     FlowerMatch(ip_proto=1, icmp_type=3, icmp_code=1)),
    ("flower ct_state +trk+est-rpl",
     FlowerMatch(ct_state=CtStateMatch(set=CtState.TRK | CtState.EST, clear=CtState.RPL))),
    ("flower ct_state +trk +new -rel", FlowerMatch(
        ct_state=CtStateMatch(set=CtState.TRK | CtState.NEW, clear=CtState.REL))),
    ("flower ct_state +trk+inv", FlowerMatch(ct_state=CtStateMatch(set=CtState.TRK | CtState.INV))),
    ("flower ct_state +trk+snat-dnat", FlowerMatch(
        ct_state=CtStateMatch(set=CtState.TRK | CtState.SNAT, clear=CtState.DNAT))),
    ("flower ct_state \u2212trk", FlowerMatch(ct_state=CtStateMatch(clear=CtState.TRK))),
    ("flower ct_zone 5", FlowerMatch(ct_zone=(5, 0xFFFF))),
    ("flower ct_zone 5/0xff", FlowerMatch(ct_zone=(5, 0xFF))),
    ("flower ct_mark 0x10", FlowerMatch(ct_mark=(0x10, 0xFFFFFFFF))),
    ("flower ct_mark 0x13/0x0f", FlowerMatch(ct_mark=(0x03, 0x0F))),
    ("flower ct_label 0x1", FlowerMatch(ct_label=(1, (1 << 128) - 1))),
    # Without 0x, tc's byte string: `ff00` is the first two bytes.
    ("flower ct_label ff00/ffff", FlowerMatch(ct_label=(0xFF00 << 112, 0xFFFF << 112))),
    ("flower ct_label 12312300000000000000000000000001/ffffffff000000000000000000000001",
     FlowerMatch(ct_label=(0x12312300000000000000000000000001, 0xffffffff000000000000000000000001))),
    ("protocol ip flower eth_type ip", FlowerMatch(eth_type=ETH_P_IP)),
    ("flower eth_type ipv6 ip_proto tcp", FlowerMatch(eth_type=ETH_P_IPV6, ip_proto=6)),
])
def test_flower_keys(text, expected):
    assert _m(text) == expected


def test_skip_flags():
    f = parse_filter("dev eth6 flower skip_hw action pass")
    assert f.skip_hw and not f.skip_sw
    assert parse_filter("dev eth6 flower skip_sw action pass").skip_sw


def _acts(text: str):
    return parse_filter(f"dev eth6 protocol ip flower {text}").actions


@pytest.mark.parametrize("text,expected", [
    ("action ct", (CtAction(),)),
    ("actions ct", (CtAction(),)),
    ("action ct zone 5", (CtAction(zone=5),)),
    ("action ct commit", (CtAction(commit=True),)),
    ("action ct commit force", (CtAction(commit=True, force=True),)),
    ("action ct clear", (CtAction(clear=True),)),
    ("action ct commit mark 0x5", (CtAction(commit=True, mark=(5, 0xFFFFFFFF)),)),
    # act_ct keeps the value as given (tc prints it back) and masks on commit.
    ("action ct commit mark 7/0x3", (CtAction(commit=True, mark=(7, 3)),)),
    ("action ct commit label 0xff/0xf0", (CtAction(commit=True, label=(0xFF, 0xF0)),)),
    # Accepted as tc and the kernel accept them, and inert without commit.
    ("action ct force", (CtAction(force=True),)),
    ("action ct mark 5", (CtAction(mark=(5, 0xFFFFFFFF)),)),
    ("action ct label 05", (CtAction(label=(5 << 120, (1 << 128) - 1)),)),
    ("action ct label 123123", (CtAction(label=(0x123123 << 104, (1 << 128) - 1)),)),
    # tc needs no `action` between actions: a second verb is a second gact.
    ("action drop drop", (DropAction(), DropAction())),
    ("action ct nat", (CtAction(nat=CtNat()),)),
    ("action ct zone 2 nat", (CtAction(zone=2, nat=CtNat()),)),
    ("action ct commit nat src addr 192.0.2.1",
     (CtAction(commit=True, nat=CtNat("src", ipaddress.ip_address("192.0.2.1"),
                                      ipaddress.ip_address("192.0.2.1"))),)),
    ("action ct commit nat dst addr 192.0.2.1-192.0.2.9 port 80-90",
     (CtAction(commit=True, nat=CtNat("dst", ipaddress.ip_address("192.0.2.1"),
                                      ipaddress.ip_address("192.0.2.9"), 80, 90)),)),
    ("action ct commit nat src", (CtAction(commit=True, nat=CtNat("src")),)),
    ("action ct commit nat src port 5000", (CtAction(commit=True, nat=CtNat("src", None, None, 5000, 5000)),)),
    ("action ct pipe action drop", (CtAction(), DropAction())),
    ("action goto chain 9", (GotoAction(9),)),
    ("action mirred egress redirect dev eth5", (MirredAction("eth5"),)),
    ("action drop", (DropAction(),)),
    ("action shot", (DropAction(),)),
    ("action gact drop", (DropAction(),)),
    ("action pass", (PassAction(),)),
    ("action ok", (PassAction(),)),
    ("action trap", (TrapAction(),)),
    ("action ct commit action mirred egress redirect dev eth6",
     (CtAction(commit=True), MirredAction("eth6"))),
    ("", ()),
])
def test_actions(text, expected):
    assert _acts(text) == expected


def test_del_and_show_commands():
    assert parse_command("tc filter del dev eth6") == DelCommand("eth6")
    assert parse_command("filter del dev eth6 ingress chain 9") == DelCommand("eth6", chain=9)
    assert parse_command("filter delete dev eth6 parent ffff: protocol ip pref 10 handle 0x2 flower") == \
        DelCommand("eth6", prio=10, handle=2, protocol=ETH_P_IP)
    assert parse_command("ctctl filter show") == ShowCommand()
    assert parse_command("tc -s filter show dev eth6 ingress") == ShowCommand(
        "eth6", stats=True, named=frozenset({"dev", "parent"}))
    assert parse_command("filter ls dev eth6 chain 9") == ShowCommand("eth6", chain=9, named=frozenset({"dev", "chain"}))


def _error(line: str) -> RuleSyntaxError:
    with pytest.raises(RuleSyntaxError) as ei:
        parse_command(line)
    return ei.value


# (line, text the error must contain, the token the column must point at,
#  which occurrence of that token in the line)
ERRORS = [
    ("tc filter add dev eth6 protocol ip parent ffff: chain 0 flower ct_state +trk+estab action drop",
     "ct_state: unknown flag 'estab' (expected trk,new,est,rel,rpl,inv,snat,dnat)", "estab", 0),
    ("dev eth6 flower ct_state +trk +bogus action drop", "unknown flag 'bogus'", "bogus", 0),
    ("dev eth6 flower ct_state trk action drop", "needs a '+' or '-'", "trk", 0),
    ("dev eth6 flower ct_state +trk+ action drop", "missing flag name", "+", 1),
    ("dev eth6 flower ct_state +trk-trk action drop", "given twice", "trk", 1),
    ("dev eth6 flower ct_state +est action drop", "no trk, so no other flag can be set", "+est", 0),
    ("dev eth6 flower ct_state -trk+est action drop", "no trk", "-trk+est", 0),
    ("dev eth6 flower ct_state +trk+new+est action drop", "new and est are mutually exclusive",
     "+trk+new+est", 0),
    ("dev eth6 flower ct_state +trk+inv+rpl action drop", "when inv is set, only trk may be set",
     "+trk+inv+rpl", 0),
    ("dev eth6 flower ct_state +trk+new+rpl action drop", "new and rpl are mutually exclusive",
     "+trk+new+rpl", 0),
    ("dev eth6 protocol ip flower action ct nat src addr 10.0.0.1", "only valid if commit is set", "src", 0),
    ("dev eth6 protocol ip flower action ct commit nat", "commit and nat must set src or dst", "nat", 0),
    ("dev eth6 protocol ip flower action ct commit nat src addr 1.1.1.1 nat dst addr 2.2.2.2",
     "src and dst nat can't be used together", "dst", 0),
    ("dev eth6 protocol ip flower action ct clear zone 1", "clear can only be used alone", "clear", 0),
    ("dev eth6 protocol ip flower action ct commit clear", "clear can only be used alone", "clear", 0),
    ("dev eth6 protocol ip flower action ct zone 70000", "invalid value '70000'", "70000", 0),
    ("dev eth6 protocol ip flower action ct zone 1 zone 2", "'zone' given twice", "zone", 1),
    ("dev eth6 protocol ip flower action ct commit nat src addr 10.0.0.9-10.0.0.1",
     "invalid nat address range", "10.0.0.9-10.0.0.1", 0),
    ("dev eth6 protocol ip flower action ct commit nat src addr 10.0.0.1 port 9-1",
     "invalid nat port range", "9-1", 0),
    ("dev eth6 protocol ip flower action ct commit nat src addr fd00::1",
     "nat address family does not match", "src", 0),
    ("dev eth6 protocol ip flower action ct commit nat src addr 10.0.0.300",
     "invalid address '10.0.0.300'", "10.0.0.300", 0),
    ("dev eth6 protocol ip flower action ct bogus", "ct: unknown option 'bogus'", "bogus", 0),
    ("dev eth6 flower action mirred egress redirect", "expected 'dev'", "", 0),
    ("dev eth6 flower action mirred egress redirect dev", "expected an interface name", "", 0),
    ("dev eth6 flower action mirred egress mirror dev eth5", "only 'egress redirect'", "mirror", 0),
    ("dev eth6 flower action mirred ingress redirect dev eth5", "only 'egress redirect'", "ingress", 0),
    ("dev eth6 flower action mirred egress redirect dev a/b", "invalid interface name", "a/b", 0),
    ("dev eth6 flower action goto 9", "goto: expected 'chain'", "9", 0),
    ("dev eth6 flower action goto chain x", "invalid value 'x'", "x", 0),
    ("dev eth6 flower action frobnicate", "unknown action 'frobnicate'", "frobnicate", 0),
    ("dev eth6 flower action vlan pop", "'vlan' is not supported", "vlan", 0),
    ("dev eth6 flower action pedit ex munge", "expected eth, ip, ip6, tcp or udp after 'munge'", "", 0),
    ("dev eth6 flower action drop frobnicate", "unexpected 'frobnicate'", "frobnicate", 0),
    ("dev eth6 flower ip_proto tcp action drop", "ip_proto: needs protocol ip or ipv6", "tcp", 0),
    ("dev eth6 protocol ip flower ip_proto tcpp action drop", "unknown protocol 'tcpp'", "tcpp", 0),
    ("dev eth6 protocol ip flower ip_proto udp src_port 80-80 action drop",
     "min must be strictly smaller than max", "80-80", 0),
    ("dev eth6 protocol ip flower ip_proto udp dst_port 70000 action drop", "invalid port '70000'",
     "70000", 0),
    ("dev eth6 protocol ip flower dst_port 80 action drop", "needs ip_proto tcp, udp or sctp", "80", 0),
    ("dev eth6 protocol ip flower ip_proto tcp type 8 action drop", "icmp_type: needs", "8", 0),
    ("dev eth6 protocol ipv6 flower ip_proto icmp type 8 action drop", "icmp_type: needs", "8", 0),
    ("dev eth6 protocol ip flower src_ip fd00::1 action drop", "address family does not match",
     "fd00::1", 0),
    ("dev eth6 protocol ip flower dst_ip 10.0.0.0/33 action drop", "invalid address", "10.0.0.0/33", 0),
    ("dev eth6 protocol ipv6 flower eth_type ip action drop", "contradicts the filter's protocol", "ip", 1),
    ("dev eth6 flower ct_mark 1/2/3 action drop", "expected VALUE[/MASK]", "1/2/3", 0),
    ("dev eth6 flower ct_mark 0x1/zz action drop", "invalid value 'zz'", "zz", 0),
    ("dev eth6 flower ct_label 0x1ffffffffffffffffffffffffffffffff action drop", "at most 128 bits",
     "0x1ffffffffffffffffffffffffffffffff", 0),
    ("dev eth6 flower ct_zone 1 ct_zone 2 action drop", "given twice", "ct_zone", 1),
    ("dev eth6 flower tcp_flags 0x2 action drop", "'tcp_flags' is not supported", "tcp_flags", 0),
    ("dev eth6 flower wibble action drop", "flower: unknown keyword 'wibble'", "wibble", 0),
    ("dev eth6 flower skip_hw skip_sw action drop", "mutually exclusive", "skip_sw", 0),
    ("dev eth6 protocol ipx flower action drop", "unknown protocol 'ipx'", "ipx", 0),
    ("dev eth6 parent 1: flower action drop", "unsupported parent", "1:", 0),
    ("dev eth6 egress flower action drop", "only ingress", "egress", 0),
    ("dev eth6 parent ffff:fff3 flower action drop", "only ingress", "ffff:fff3", 0),
    ("dev eth6 chain 4294967296 flower action drop", "invalid value", "4294967296", 0),
    ("dev eth6 prio 0x10000 flower action drop", "invalid value", "0x10000", 0),
    ("dev eth6 prio 0 flower action drop", "prio: out of range", "0", 0),
    ("dev eth6 handle 0 flower action drop", "handle: out of range", "0", 0),
    ("dev eth6 chain 1 chain 2 flower action drop", "given twice", "chain", 1),
    ("dev eth6 u32 match ip dst 1.2.3.4", "classifier 'u32' is not supported", "u32", 0),
    ("dev eth6 protocol ip action drop", "expected 'flower' before the actions", "action", 0),
    ("dev eth6 protocol ip", "expected 'flower'", "", 0),
    ("dev eth6 protocol", "expected a protocol", "", 0),
    ("dev thisnameiswaytoolong flower action drop", "invalid interface name", "thisnameiswaytoolong", 0),
    ("protocol ip flower action drop", "'dev NAME' is required", "", 0),
    ("tc filter replace dev eth6 flower action drop", "unsupported command 'replace'", "replace", 0),
    ("tc filter del", "'dev NAME' is required", "", 0),
    ("tc filter del dev eth6 handle 1", "'handle' needs 'prio'", "", 0),
    ("tc filter show dev eth6 prio 3", "unknown keyword 'prio'", "prio", 0),
    ("", "empty command", "", 0),
]


def _column_of(line: str, token: str, nth: int) -> int:
    if token == "":
        return len(line) + 1 if line else 1
    # The token as a whole word, or (for ct_state flags) inside a word.
    pos = -1
    for _ in range(nth + 1):
        pos = line.index(token, pos + 1)
    return pos + 1


@pytest.mark.parametrize("line,message,token,nth", ERRORS,
                         ids=[f"{i}:{e[1][:30]}" for i, e in enumerate(ERRORS)])
def test_error_names_the_token(line, message, token, nth):
    e = _error(line)
    assert message in e.message
    if token == "" and "required" in message and "del" not in line:
        assert e.column is not None  # points at the start
        return
    assert e.column == _column_of(line, token, nth), (str(e), line)
    assert str(e).endswith(f" at column {e.column}")


def test_error_column_in_the_issue_example():
    line = ("ctctl filter add dev eth6 protocol ip parent ffff: chain 0 flower "
            "ct_state +trk+estab action ct action goto chain 9")
    e = _error(line)
    assert str(e) == ("ct_state: unknown flag 'estab' (expected trk,new,est,rel,rpl,inv,snat,dnat)"
                      f" at column {line.index('estab') + 1}")
    assert e.token == "estab"


def test_columns_count_characters_not_bytes():
    line = "dev eth6 flower ct_state \u2013trk+bogus action drop"
    e = _error(line)
    assert e.column == line.index("bogus") + 1


def test_kernel_accepts_clear_flags_freely():
    # fl_validate_ct_state only looks at the flags that must be set.
    f = parse_filter("dev eth6 flower ct_state -trk-est-new-inv-rpl action drop")
    assert f.matches.ct_state.clear == CtState.TRK | CtState.EST | CtState.NEW | CtState.INV | CtState.RPL


def test_validation_applies_to_filters_built_in_code():
    bad = Filter(dev="eth6", actions=(CtAction(clear=True, commit=True),))
    assert any("clear" in p.message for p in problems(bad))
    with pytest.raises(RuleSyntaxError) as ei:
        format_filter(bad) and parse_filter(format_filter(bad))
    assert "clear can only be used alone" in str(ei.value)


# -- property-style round trip over generated rules -----------------------

def _rand_filter(rng: random.Random) -> Filter:
    proto = rng.choice([ETH_P_IP, ETH_P_IPV6, ETH_P_ALL, 0x0806])
    m: dict = {}
    v6 = proto == ETH_P_IPV6
    if proto in (ETH_P_IP, ETH_P_IPV6):
        if rng.random() < 0.7:
            m["ip_proto"] = rng.choice([6, 17, 132, 58 if v6 else 1, 47])
        for k in ("src_ip", "dst_ip"):
            if rng.random() < 0.4:
                bits = 128 if v6 else 32
                plen = rng.randint(0, bits)
                addr = rng.getrandbits(bits)
                m[k] = ipaddress.ip_network((addr, plen), strict=False)
        if m.get("ip_proto") in (6, 17, 132):
            for k in ("src_port", "dst_port"):
                if rng.random() < 0.5:
                    lo = rng.randint(0, 65534)
                    hi = lo if rng.random() < 0.5 else rng.randint(lo + 1, 65535)
                    m[k] = PortRange(lo, hi)
        if m.get("ip_proto") in (1, 58):
            if rng.random() < 0.7:
                m["icmp_type"] = rng.randint(0, 255)
            if rng.random() < 0.5:
                m["icmp_code"] = rng.randint(0, 255)
    if rng.random() < 0.8:
        bits = list(CtState)
        set_ = CtState(0)
        clear = CtState(0)
        for b in bits:
            r = rng.random()
            if r < 0.2:
                set_ |= b
            elif r < 0.35:
                clear |= b
        if set_ or clear:
            m["ct_state"] = CtStateMatch(set=set_, clear=clear)
    for k, full in (("ct_zone", 0xFFFF), ("ct_mark", 0xFFFFFFFF), ("ct_label", (1 << 128) - 1)):
        if rng.random() < 0.3:
            mask = full if rng.random() < 0.5 else rng.randint(1, full)
            m[k] = (rng.randint(0, full) & mask, mask)
    actions = []
    for _ in range(rng.randint(0, 4)):
        kind = rng.choice(["ct", "ct", "goto", "mirred", "drop", "pass", "trap"])
        if kind == "ct":
            commit = rng.random() < 0.5
            nat = None
            if rng.random() < 0.4:
                if commit and proto in (ETH_P_IP, ETH_P_IPV6):
                    fam = 128 if v6 else 32
                    a = ipaddress.ip_address(rng.getrandbits(fam)) if fam == 32 else \
                        ipaddress.IPv6Address(rng.getrandbits(fam))
                    b = ipaddress.ip_address(int(a) + rng.randint(0, 5)) if int(a) + 5 < (1 << fam) else a
                    p = rng.randint(1, 60000)
                    nat = CtNat(rng.choice(["src", "dst"]), a, b, p, p + rng.randint(0, 100))
                elif not commit:
                    nat = CtNat()
            actions.append(CtAction(
                commit=commit, force=commit and rng.random() < 0.3, zone=rng.choice([0, 1, 65535]),
                mark=(rng.randint(0, 0xFFFFFFFF), 0xFFFFFFFF) if commit and rng.random() < 0.3 else None,
                label=(rng.getrandbits(128), (1 << 128) - 1) if commit and rng.random() < 0.3 else None,
                nat=nat))
        elif kind == "goto":
            actions.append(GotoAction(rng.randint(0, 100)))
        elif kind == "mirred":
            actions.append(MirredAction(rng.choice(["eth5", "eth6", "veth-a.1"])))
        else:
            actions.append({"drop": DropAction(), "pass": PassAction(), "trap": TrapAction()}[kind])
    return Filter(dev=rng.choice(["eth5", "eth6", "p0"]), chain=rng.choice([0, 1, 9, 4294967295]),
                  prio=rng.choice([None, 1, 100, 65535]), handle=rng.choice([None, 1, 0xFFFFFFFF]),
                  protocol=proto, matches=FlowerMatch(**m), actions=tuple(actions),
                  skip_hw=rng.random() < 0.1)


def test_round_trip_generated():
    rng = random.Random(20181017)
    valid = 0
    refused = 0
    for _ in range(3000):
        f = _rand_filter(rng)
        if problems(f):
            # A filter the validator refuses must be refused by the parser too.
            with pytest.raises(RuleSyntaxError):
                parse_filter(format_filter(f))
            refused += 1
            continue
        text = format_filter(f)
        assert parse_filter(text) == f, text
        valid += 1
    assert valid >= 1000 and refused >= 100


def test_garbage_gets_an_error_never_a_crash():
    """Random sequences of tc words and junk: every outcome is a Filter or a
    RuleSyntaxError with a column inside the line (or just past its end)."""
    words = ("tc filter add del show dev eth6 protocol ip ipv6 all parent ffff: ingress chain prio "
             "handle flower ct_state +trk -trk +est ct_zone ct_mark ct_label 0x1/0x1 ip_proto tcp "
             "udp icmp src_ip dst_ip 10.0.0.1/8 fd00::1 src_port dst_port 1-2 80 type code action "
             "actions ct commit force clear zone mark label nat src dst addr 1.1.1.1-1.1.1.2 port "
             "goto mirred egress redirect drop pass trap 0 9 65536 -1 / - + \u2013 \u00e9 '' \"").split()
    rng = random.Random(7)
    ok = 0
    for _ in range(5000):
        line = " ".join(rng.choice(words) for _ in range(rng.randint(0, 14)))
        try:
            parse_command(line)
            ok += 1
        except RuleSyntaxError as e:
            assert e.column is not None and 1 <= e.column <= len(line) + 1, (line, str(e))
    assert ok >= 1


def test_parse_filter_wants_an_add_line():
    with pytest.raises(RuleSyntaxError, match="expected a 'filter add' line"):
        parse_filter("tc filter del dev eth6")
