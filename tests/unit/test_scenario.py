"""An experiment's scenario is validated like a box's config: every
bundled one parses, and a bad key or value is refused with its file, line
and column, the swept values included (each combination is checked as the
run it will be)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ctctl.box.config import ConfigError
from ctctl.lab import scenario
from ctctl.lab.workload import MixError, check_mix

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"

GOOD = """\
name: t
duration: 5
box:
  rules: firewall
  hardware: {table_size: 256}
workload:
  short: {rate: 10}
sweep:
  box.hardware.table_size: [64, 128]
  box.aging: [{mode: full}, {mode: sample, k: 4}]
"""


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_bundled_scenario_is_valid(path):
    sc = scenario.load(path)
    assert sc.runs and sc.description
    assert all(r.box["rules"] and r.duration >= 1 for r in sc.runs)


def test_a_sweep_is_every_combination_in_order():
    sc = scenario.parse(GOOD, "s.yaml")
    assert [r.values for r in sc.runs] == [
        {"box.hardware.table_size": 64, "box.aging": {"mode": "full"}},
        {"box.hardware.table_size": 64, "box.aging": {"mode": "sample", "k": 4}},
        {"box.hardware.table_size": 128, "box.aging": {"mode": "full"}},
        {"box.hardware.table_size": 128, "box.aging": {"mode": "sample", "k": 4}},
    ]
    assert [r.box["hardware"]["table_size"] for r in sc.runs] == [64, 64, 128, 128]
    assert sc.runs[1].box["aging"] == {"mode": "sample", "k": 4}
    # `rules: firewall` is slide 9's firewall for the topology's ports.
    assert any("dev eth5" in line and "redirect dev eth6" in line for line in sc.runs[0].box["rules"])
    assert sc.runs[0].workload == {"short": {"rate": 10, "size": 1000}}
    assert sc.runs[0].label() == "box.hardware.table_size=64, box.aging={mode: full}"


def test_a_swept_key_absent_from_the_scenario_is_made():
    text = GOOD.replace("  hardware: {table_size: 256}\n", "").replace(
        "  box.aging: [{mode: full}, {mode: sample, k: 4}]\n", "  workload.udp.count: [3]\n")
    sc = scenario.parse(text, "s.yaml")
    assert sc.runs[0].box["hardware"] == {"table_size": 64}
    assert sc.runs[0].workload["udp"]["count"] == 3


@pytest.mark.parametrize("old, new, where, words", [
    ("duration: 5", "duration: 5\nlength: 3", "s.yaml:3:1", "unknown key 'length'"),
    ("duration: 5", "duration: -1", "s.yaml:2:11", "duration must be a number >= 1"),
    ("table_size: 256", "table_size: 256, window: 3", "s.yaml:5:13", "window"),
    ("[64, 128]", "[64, oops]", "s.yaml:9:33", "sweep box.hardware.table_size: hardware: table_size"),
    ("{mode: sample, k: 4}", "{mode: sample, k: 99}", "s.yaml:10:29",
     "sweep box.aging: aging k must be an integer in 0..20"),
    ("box.aging:", "box.agin:", "s.yaml:10:14", "sweep box.agin: unknown key 'agin'"),
    ("box.aging:", "bix.aging:", "s.yaml:10:3", "sweep key 'bix.aging': a dotted path starting with box"),
    ("[{mode: full}, {mode: sample, k: 4}]", "[]", "s.yaml:10:14", "a non-empty list of values"),
    ("short: {rate: 10}", "short: {rate: 10, sise: 3}", "s.yaml:7:3", "workload short: unknown key 'sise'"),
    ("rules: firewall", "rules: [filter add dev eth9 flower action drop]", "s.yaml:4:11", "eth9"),
    ("name: t", "name: t\nname: u", "s.yaml:2:1", "duplicate key 'name'"),
])
def test_a_bad_scenario_is_refused_with_its_position(old, new, where, words):
    text = GOOD.replace(old, new, 1)
    assert text != GOOD
    with pytest.raises(ConfigError) as e:
        scenario.parse(text, "s.yaml")
    assert str(e.value).startswith(where + ": ") and words in str(e.value), str(e.value)


def test_missing_parts_and_bad_topologies_are_named():
    with pytest.raises(ConfigError, match=r"s.yaml:1:1: missing key 'workload'"):
        scenario.parse("duration: 3\nbox: {rules: firewall}\n", "s.yaml")
    with pytest.raises(ConfigError, match=r"s.yaml:6:19: topology ports: two different names"):
        scenario.parse(GOOD.replace("workload:", "topology: {ports: [a, a]}\nworkload:"), "s.yaml")
    with pytest.raises(ConfigError, match="at most 100"):
        scenario.parse(GOOD.replace("[64, 128]", str(list(range(1, 60)))), "s.yaml")


@pytest.mark.parametrize("mix, words", [
    ({}, "a mapping of long, short, udp"),
    ({"tcp": {}}, "unknown workload part 'tcp'"),
    ({"long": {"count": 1.5}}, "workload long.count: a whole number"),
    ({"short": {"size": {"pareto": 3}}}, "workload short.size: a number or {exp: MEAN}"),
    ({"udp": {"every": -1}}, "workload udp.every: a number >= 0"),
])
def test_a_bad_mix_says_what(mix, words):
    with pytest.raises(MixError, match=words.replace("{", r"\{").replace("}", r"\}")):
        check_mix(mix)
