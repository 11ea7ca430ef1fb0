"""Config validation: every refusal names the reason and the position."""

import pytest

from ctctl.box import config

GOOD = "name: demo\nnetns: ctctl-x-box\nports: [eth5, eth6]\nforward: {eth5: eth6, eth6: eth5}\n"


def test_good_config_parses():
    cfg = config.parse(GOOD, "box.yaml")
    assert (cfg.name, cfg.netns, cfg.ports) == ("demo", "ctctl-x-box", ["eth5", "eth6"])
    assert cfg.forward == {"eth5": "eth6", "eth6": "eth5"}
    assert cfg.perf_pages == 2048


@pytest.mark.parametrize("text, where, words", [
    ("name: demo\nnetns: [x\n", "box.yaml:3:1", "YAML syntax error"),
    ("name: demo\nnetns: n\nports: [a]\nprots: 1\n", "box.yaml:4:1", "unknown key 'prots'"),
    ("name: demo\nports: [a]\n", "box.yaml:1:1", "missing key 'netns'"),
    ("name: demo\nnetns: n\nports: []\n", "box.yaml:3:8", "non-empty list"),
    ("name: demo\nnetns: n\nports: [a, a]\n", "box.yaml:3:12", "listed twice"),
    ("name: demo\nnetns: n\nports: [a, b]\nforward: {a: c}\n", "box.yaml:4:14", "unknown port 'c'"),
    ("name: 'bad name'\nnetns: n\nports: [a]\n", "box.yaml:1:7", "name 'bad name'"),
    ("name: demo\nnetns: 3\nports: [a]\n", "box.yaml:2:8", "netns must be a str"),
    ("name: demo\nnetns: n\nports: [a]\nperf_pages: 100\n", "box.yaml:4:13", "power of two"),
    ("name: demo\nname: again\nnetns: n\nports: [a]\n", "box.yaml:2:1", "duplicate key"),
    ("- just\n- a list\n", "box.yaml:1:1", "expected a mapping"),
    ("", "box.yaml:1:1", "expected a mapping"),
])
def test_bad_config_is_refused_with_position(text, where, words):
    with pytest.raises(config.ConfigError) as e:
        config.parse(text, "box.yaml")
    assert str(e.value).startswith(where + ": "), str(e.value)
    assert words in str(e.value)


RULES = "name: demo\nnetns: n\nports: [eth5, eth6]\nrules:\n  - dev eth5 flower action mirred egress redirect dev eth6\n"


def test_hardware_and_offload_sections():
    cfg = config.parse(RULES + "hardware: {table_size: 1024, flow_counters: false}\n"
                               "offload: {icmp: never, closing: true}\n", "box.yaml")
    assert cfg.hardware.table_size == 1024 and not cfg.hardware.flow_counters
    assert cfg.offload.icmp == "never" and cfg.offload.closing
    defaults = config.parse(RULES, "box.yaml")
    assert defaults.hardware.table_size == 65536 and defaults.offload.tcp == "established"


@pytest.mark.parametrize("extra, where, words", [
    ("hardware: {table_sise: 8}\n", "box.yaml:6:11", "table_sise"),
    ("hardware: {table_size: -1}\n", "box.yaml:6:11", "table_size"),
    ("hardware: 3\n", "box.yaml:6:11", "must be a mapping"),
    ("offload: {udp: always}\n", "box.yaml:6:10", "udp"),
    ("offload: {closing: 1}\n", "box.yaml:6:10", "closing"),
])
def test_bad_hardware_or_offload_is_refused_with_position(extra, where, words):
    with pytest.raises(config.ConfigError) as e:
        config.parse(RULES + extra, "box.yaml")
    assert str(e.value).startswith(where + ": ") and words in str(e.value), str(e.value)


def test_rules_refused_with_the_token_position():
    with pytest.raises(config.ConfigError) as e:
        config.parse(RULES.replace("mirred egress", "mirred egrezz"), "box.yaml")
    assert str(e.value).startswith("box.yaml:5:"), str(e.value)


def test_rules_in_tc_s_abbreviations_and_verbs_load():
    """The lines a user pastes from tc documentation: prefixes (proto,
    pref), ingress, control verbs, a ct with mark and pipe."""
    cfg = config.parse("name: demo\nnetns: n\nports: [eth5, eth6]\nrules:\n"
                       "  - filter add dev eth5 proto ip pref 1 ingress flower ct_state -trk action ct zone 2 pipe "
                       "action goto chain 9\n"
                       "  - filter add dev eth5 proto ip pref 2 ingress chain 9 flower ct_state +trk+new "
                       "action ct commit zone 2 mark 0x42/0xf0 pipe action mirred egress redirect dev eth6\n",
                       "box.yaml")
    first, second = cfg.rules
    assert (first.protocol, first.prio, second.chain) == (0x0800, 1, 9)
    ct = second.actions[0]
    assert ct.commit and ct.zone == 2 and ct.mark == (0x42, 0xF0) and ct.control is None


def test_missing_file():
    with pytest.raises(config.ConfigError, match="no-such.yaml: No such file"):
        config.load("/nonexistent/no-such.yaml")


def test_a_hardware_profile_with_overrides():
    cfg = config.parse(RULES + "hardware: {profile: minimal, nat: true}\n")
    hw = cfg.hardware
    assert hw.profile == "minimal" and hw.nat and not hw.hw_aging and not hw.port_range_match
    assert hw.describe() == ("profile minimal with nat=True; without ct_label_match, port_range_match, "
                             "hw_aging, window, rewrite, tunnels, csum")
    assert config.parse(RULES).hardware.describe() == "profile full"


@pytest.mark.parametrize("extra,where,words", [
    ("hardware: {profile: cheap}\n", "<config>:6:11", "unknown profile 'cheap' (expected full, minimal, no-counters)"),
    ("hardware: {flow_counters: false}\naging: {mode: full}\n", "<config>:7:8",
     "aging mode full reads the entries' counters and last use, which a NIC without flow counters does not keep"),
    ("hardware: {flow_counters: false, hw_aging: false}\naging: {mode: sample}\n", "<config>:7:8",
     "use aging mode timeout (it has no hw_aging either)"),
])
def test_a_nic_that_cannot_be_aged_that_way_is_refused(extra, where, words):
    with pytest.raises(config.ConfigError) as e:
        config.parse(RULES + extra)
    assert str(e.value).startswith(where) and words in str(e.value)


@pytest.mark.parametrize("hardware,mode", [
    ("{}", "full"),
    ("{flow_counters: false}", "hardware"),                  # the NIC ages its own
    ("{profile: no-counters, hw_aging: false}", "timeout"),  # nothing to read, nothing that ages
])
def test_without_counters_the_default_aging_is_what_the_nic_allows(hardware, mode):
    assert config.parse(RULES + f"hardware: {hardware}\n").aging.mode == mode
