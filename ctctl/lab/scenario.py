"""An experiment's scenario (YAML): the topology, the box, the workload,
how long, and the parameters to sweep; validated as a box's config is, every
error with its file, line and column, before anything runs.

    name: expiration                  # default: the file's stem
    description: what it asks         # shown in the report
    duration: 20                      # seconds of workload per run
    settle: 5                         # seconds sampled after the workload (idle flows age out)
    topology: {ports: [eth5, eth6], hosts: [client, server]}   # the client's side first
    box:                              # a box config without name, netns and ports
      rules: firewall                 # slide 9's firewall (ctctl.lab.firewall), or tc lines
      hardware: {table_size: 4096}
      aging: {mode: full}
    workload:                         # ctctl.lab.workload's mix
      long: {count: 4, rate: 200000, lifetime: {exp: 10}}
      short: {rate: 50, size: 2000}
      udp: {count: 500, every: 1}
    sweep:                            # one run per combination, in order
      box.aging: [{mode: full}, {mode: sample, k: 4}]
      workload.udp.count: [100, 1000]

A sweep key is a dotted path into `box`, `workload`, `duration` or `settle`;
each value replaces what is there (a whole mapping for `box.aging`).  The
scenario as written is itself a valid run; each swept value is checked in
it (a bad one is named at its own line and column), and every combination
as the run it will be.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ctctl.box import config as boxconfig
from ctctl.box.config import ConfigError
from ctctl.lab import firewall, workload

KEYS = {"name": "the experiment's name", "description": "what it asks", "duration": "seconds of workload",
        "settle": "seconds sampled after the workload", "topology": "ports and hosts", "box": "the box's settings",
        "workload": "the mix of connections", "sweep": "parameters to vary"}
SWEEPABLE = ("box", "workload", "duration", "settle")
DEFAULT_PORTS = ["eth5", "eth6"]
DEFAULT_HOSTS = ["client", "server"]
MAX_RUNS = 100


@dataclass
class Run:
    """One run of a sweep: the values it sets, and what it runs."""

    index: int
    values: dict                 # sweep key -> value (empty without a sweep)
    box: dict                    # the box's settings (rules expanded to tc lines)
    workload: dict               # ctctl.lab.workload's mix, defaults filled in
    duration: float
    settle: float

    def label(self) -> str:
        return ", ".join(f"{k}={_short(v)}" for k, v in self.values.items()) or "the scenario"


@dataclass
class Scenario:
    name: str
    description: str
    path: str
    ports: list[str]
    hosts: list[str]
    runs: list[Run] = field(default_factory=list)
    sweep_keys: list[str] = field(default_factory=list)


def _short(v) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_short(x)}" for k, x in v.items()) + "}"
    return str(v)


def _where(path: str, node) -> str:
    m = node.start_mark
    return f"{path}:{m.line + 1}:{m.column + 1}"


def _data(node):
    return yaml.safe_load(yaml.serialize(node))


def _number(path: str, node, what: str, low: float = 0.0) -> float:
    v = _data(node) if isinstance(node, yaml.ScalarNode) else None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < low:
        raise ConfigError(_where(path, node), f"{what} must be a number >= {low:g}, not {_data(node)!r}")
    return float(v)


def load(path: str | Path) -> Scenario:
    return parse(boxconfig.read(path), str(path))


def parse(text: str, path: str = "<scenario>") -> Scenario:
    seen = boxconfig.keys_of(path, boxconfig.compose(text, path), KEYS)
    for key in ("duration", "box", "workload"):
        if key not in seen:
            raise ConfigError(f"{path}:1:1", f"missing key {key!r} ({KEYS[key]})")
    name = _data(seen["name"][1]) if "name" in seen else Path(path).stem
    if not isinstance(name, str) or not boxconfig.NAME_RE.match(name):
        raise ConfigError(_where(path, seen["name"][1]), f"name {name!r}: letters, digits, '.', '_', '-'")
    description = str(_data(seen["description"][1])) if "description" in seen else ""
    ports, hosts = _topology(path, seen.get("topology", (None, None))[1])
    sc = Scenario(name, description, path, ports, hosts)
    base = {k: seen[k][1] for k in SWEEPABLE if k in seen}
    sweep = _sweep(path, seen["sweep"][1]) if "sweep" in seen else []
    sc.sweep_keys = [k for k, _, _ in sweep]
    # The scenario as written must be a run of its own; then each swept
    # value alone, so that a bad one is named where it is written (the
    # section it lands in would otherwise take the blame).
    _run(path, sc, 0, {}, {k: copy.deepcopy(v) for k, v in base.items()})
    for key, knode, values in sweep:
        for vnode in values:
            nodes = {k: copy.deepcopy(v) for k, v in base.items()}
            _put(path, nodes, key, knode, vnode)
            try:
                _run(path, sc, 0, {}, nodes)
            except ConfigError as e:
                raise ConfigError(_where(path, vnode), f"sweep {key}: {e.msg}") from None
    combos = list(itertools.product(*[values for _, _, values in sweep])) or [()]
    if len(combos) > MAX_RUNS:
        raise ConfigError(_where(path, seen["sweep"][0]), f"the sweep makes {len(combos)} runs (at most {MAX_RUNS})")
    for i, combo in enumerate(combos):
        nodes = {k: copy.deepcopy(v) for k, v in base.items()}
        values = {}
        for (key, knode, _), vnode in zip(sweep, combo):
            _put(path, nodes, key, knode, vnode)
            values[key] = _data(vnode)
        sc.runs.append(_run(path, sc, i, values, nodes))
    return sc


def _topology(path: str, node) -> tuple[list[str], list[str]]:
    if node is None:
        return list(DEFAULT_PORTS), list(DEFAULT_HOSTS)
    seen = boxconfig.keys_of(path, node, {"ports": "two ports", "hosts": "two host names"}, "topology, a mapping")
    out = []
    for key, default in (("ports", DEFAULT_PORTS), ("hosts", DEFAULT_HOSTS)):
        if key not in seen:
            out.append(list(default))
            continue
        n = seen[key][1]
        v = _data(n)
        if not (isinstance(v, list) and len(v) == 2 and all(isinstance(x, str) and boxconfig.NAME_RE.match(x)
                                                            for x in v) and v[0] != v[1]):
            raise ConfigError(_where(path, n), f"topology {key}: two different names, the client's side first "
                                               f"(an experiment runs one client and one server), not {v!r}")
        out.append(v)
    return out[0], out[1]


def _sweep(path: str, node) -> list[tuple[str, object, list]]:
    if not isinstance(node, yaml.MappingNode) or not node.value:
        raise ConfigError(_where(path, node), "sweep maps a dotted key (box.aging, workload.udp.count, ...) "
                                              "to a list of values")
    out = []
    for knode, vnode in node.value:
        key = _data(knode)
        if not isinstance(key, str) or key.split(".")[0] not in SWEEPABLE:
            raise ConfigError(_where(path, knode), f"sweep key {key!r}: a dotted path starting with "
                                                   f"{', '.join(SWEEPABLE)}")
        if key in [k for k, _, _ in out]:
            raise ConfigError(_where(path, knode), f"sweep key {key!r} twice")
        if not isinstance(vnode, yaml.SequenceNode) or not vnode.value:
            raise ConfigError(_where(path, vnode), f"sweep {key}: a non-empty list of values")
        out.append((key, knode, vnode.value))
    return out


def _put(path: str, nodes: dict, key: str, knode, vnode) -> None:
    """Set the dotted `key` to `vnode` in the scenario's nodes, making the
    mappings on the way."""
    first, *rest = key.split(".")
    if not rest:
        nodes[first] = vnode
        return
    node = nodes.setdefault(first, yaml.MappingNode("tag:yaml.org,2002:map", [], knode.start_mark, knode.end_mark))
    for i, part in enumerate(rest):
        if not isinstance(node, yaml.MappingNode):
            raise ConfigError(_where(path, knode), f"sweep key {key!r}: {'.'.join([first] + rest[:i])} "
                                                   "is not a mapping")
        hit = next((pair for pair in node.value if _data(pair[0]) == part), None)
        if i == len(rest) - 1:
            if hit is not None:
                node.value[node.value.index(hit)] = (hit[0], vnode)
            else:
                node.value.append((yaml.ScalarNode("tag:yaml.org,2002:str", part, knode.start_mark,
                                                   knode.end_mark), vnode))
            return
        if hit is None:
            child = yaml.MappingNode("tag:yaml.org,2002:map", [], knode.start_mark, knode.end_mark)
            node.value.append((yaml.ScalarNode("tag:yaml.org,2002:str", part, knode.start_mark, knode.end_mark),
                               child))
            node = child
        else:
            node = hit[1]


def _run(path: str, sc: Scenario, index: int, values: dict, nodes: dict) -> Run:
    box = nodes["box"]
    if isinstance(box, yaml.MappingNode):
        for i, (k, v) in enumerate(box.value):
            if _data(k) == "rules" and isinstance(v, yaml.ScalarNode) and _data(v) == "firewall":
                lines = [yaml.ScalarNode("tag:yaml.org,2002:str", line, v.start_mark, v.end_mark)
                         for line in firewall.rules(*sc.ports)]
                box.value[i] = (k, yaml.SequenceNode("tag:yaml.org,2002:seq", lines, v.start_mark, v.end_mark))
    # Validated as the box it will be (a placeholder name and namespace).
    boxconfig.parse_settings(box, path, "experiment", "experiment-box", sc.ports)
    try:
        mix = workload.check_mix(_data(nodes["workload"]))
    except workload.MixError as e:
        raise ConfigError(_where(path, nodes["workload"]), str(e)) from None
    duration = _number(path, nodes["duration"], "duration", 1.0)
    settle = _number(path, nodes["settle"], "settle") if "settle" in nodes else 0.0
    return Run(index, values, _data(box), mix, duration, settle)
