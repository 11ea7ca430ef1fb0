"""The box configuration (YAML), validated before anything is touched.

    name: demo                 # box name: pins, socket and state file use it
    netns: ctctl-demo-box      # the box's network namespace (must exist)
    ports: [eth5, eth6]        # interfaces in that namespace
    attach: tc                 # the program's hook: tc (ingress, default) | xdp (driver mode, veth)
    forward: {eth5: eth6, eth6: eth5}   # static port map (software switch)
    perf_pages: 2048            # perf buffer pages per CPU
    aging: {mode: full}         # how offloaded connections die: full | sample | hardware
    eviction: {max_idle: 10, flow_limit: 200000}   # OVS-style eviction of rules' flows (off by default)
    metrics: {listen: 127.0.0.1:9464}   # serve the counters on /metrics for Prometheus (off by default)
    port_lost: keep             # a port deleted under the box: keep the others (default) | stop
    tunnels: {vxlan0: {port: eth5, local: 10.9.0.1, dstport: 4789}}   # VXLAN devices (ctctl.kernel.tunnel)

Every error names the file, line and column of the offending node.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pyroute2 import netns as pr_netns

from ctctl import abi, netns
from ctctl.box.metrics import MetricsConfig

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
KEYS = {
    "name": "box name",
    "netns": "namespace of the box",
    "ports": "list of interfaces",
    "attach": "the program's hook: tc or xdp",
    "forward": "static port map",
    "rules": "tc filter lines",
    "hardware": "hardware capabilities",
    "offload": "offload policy",
    "perf_pages": "perf buffer pages per CPU",
    "aging": "expiry of offloaded connections",
    "eviction": "eviction of rules' flows from hardware",
    "metrics": "Prometheus endpoint",
    "port_lost": "what a deleted port does to the box",
    "tunnels": "VXLAN tunnel devices over the ports",
}
REQUIRED = ("name", "netns", "ports")


class ConfigError(Exception):
    def __init__(self, where: str, msg: str):
        super().__init__(f"{where}: {msg}")
        self.where, self.msg = where, msg


@dataclass
class BoxConfig:
    name: str
    netns: str
    ports: list[str]
    forward: dict[str, str] = field(default_factory=dict)
    rules: list | None = None          # list[ctctl.rules.Filter] when given
    hardware: object = None            # ctctl.nic.caps.HwCaps
    offload: object = None             # ctctl.kernel.offload.OffloadPolicy
    aging: object = None               # ctctl.kernel.offload.aging.AgingConfig
    eviction: object = None            # ctctl.kernel.offload.eviction.EvictionConfig
    metrics: object = None             # ctctl.box.metrics.MetricsConfig
    port_lost: str = "keep"            # keep | stop
    attach: str = "tc"                 # one of ctctl.abi.HOOKS
    tunnels: list = field(default_factory=list)   # list[ctctl.kernel.tunnel.Tunnel]
    perf_pages: int = 2048
    # key -> (key node, value node): positions for check_system's errors
    nodes: dict = field(default_factory=dict, repr=False, compare=False)


def _where(path: str, node) -> str:
    m = node.start_mark
    return f"{path}:{m.line + 1}:{m.column + 1}"


def _scalar(path, node, kind, what):
    if not isinstance(node, yaml.ScalarNode):
        raise ConfigError(_where(path, node), f"{what} must be a {kind.__name__}")
    value = yaml.safe_load(yaml.serialize(node))
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ConfigError(_where(path, node), f"{what} must be a {kind.__name__}, not {value!r}")
    return value


def compose(text: str, path: str):
    """The YAML's node tree (positions kept); ConfigError on bad syntax."""
    try:
        return yaml.compose(text)
    except yaml.MarkedYAMLError as e:
        m = e.problem_mark
        where = f"{path}:{m.line + 1}:{m.column + 1}" if m else path
        raise ConfigError(where, f"YAML syntax error: {e.problem}") from None


def keys_of(path: str, node, keys: dict, what: str = "") -> dict[str, tuple]:
    """A mapping node's entries by key (key node, value node); an unknown
    or repeated key is refused at its position."""
    if node is None or not isinstance(node, yaml.MappingNode):
        where = _where(path, node) if node is not None else f"{path}:1:1"
        raise ConfigError(where, f"expected {what or 'a mapping'} of " + ", ".join(keys))
    seen: dict[str, tuple] = {}
    for knode, vnode in node.value:
        key = _scalar(path, knode, str, "key")
        if key not in keys:
            raise ConfigError(_where(path, knode),
                              f"unknown key {key!r} (expected {', '.join(keys)})")
        if key in seen:
            raise ConfigError(_where(path, knode), f"duplicate key {key!r}")
        seen[key] = (knode, vnode)
    return seen


def parse(text: str, path: str = "<config>") -> BoxConfig:
    """Syntax and schema; no system access."""
    seen = keys_of(path, compose(text, path), KEYS)
    for key in REQUIRED:
        if key not in seen:
            raise ConfigError(f"{path}:1:1", f"missing key {key!r} ({KEYS[key]})")

    name = _scalar(path, seen["name"][1], str, "name")
    if not NAME_RE.match(name):
        raise ConfigError(_where(path, seen["name"][1]),
                          f"name {name!r}: letters, digits, '.', '_', '-' (at most 32)")
    netns = _scalar(path, seen["netns"][1], str, "netns")
    pnode = seen["ports"][1]
    if not isinstance(pnode, yaml.SequenceNode) or not pnode.value:
        raise ConfigError(_where(path, pnode), "ports must be a non-empty list of interface names")
    ports = []
    for n in pnode.value:
        p = _scalar(path, n, str, "port")
        if p in ports:
            raise ConfigError(_where(path, n), f"port {p!r} listed twice")
        ports.append(p)
    return _settings(path, seen, BoxConfig(name, netns, ports))


def parse_settings(node, path: str, name: str, netns: str, ports: list[str]) -> BoxConfig:
    """A box's settings without its name, namespace and ports (which an
    experiment gives each run): a mapping node of the other keys."""
    settings = {k: v for k, v in KEYS.items() if k not in REQUIRED}
    return _settings(path, keys_of(path, node, settings, "the box's settings, a mapping"),
                     BoxConfig(name, netns, list(ports)))


def _settings(path: str, seen: dict, cfg: BoxConfig) -> BoxConfig:
    ports = cfg.ports
    if "forward" in seen:
        fnode = seen["forward"][1]
        if not isinstance(fnode, yaml.MappingNode):
            raise ConfigError(_where(path, fnode), "forward must map an input port to an output port")
        for kn, vn in fnode.value:
            src, dst = _scalar(path, kn, str, "port"), _scalar(path, vn, str, "port")
            for p, n in ((src, kn), (dst, vn)):
                if p not in ports:
                    raise ConfigError(_where(path, n), f"forward: unknown port {p!r} (ports: {', '.join(ports)})")
            cfg.forward[src] = dst
    if "tunnels" in seen:
        cfg.tunnels = _tunnels(path, seen["tunnels"][1], ports)
    if "rules" in seen:
        if "forward" in seen:
            raise ConfigError(_where(path, seen["rules"][0]), "rules and forward exclude each other: "
                              "the rules decide where packets go")
        cfg.rules = _rules(path, seen["rules"][1], ports + [t.name for t in cfg.tunnels])
    cfg.hardware = _hardware(path, seen.get("hardware", (None, None))[1])
    cfg.offload = _offload(path, seen.get("offload", (None, None))[1])
    cfg.aging = _aging(path, seen.get("aging", (None, None))[1], cfg.hardware)
    cfg.eviction = _eviction(path, seen.get("eviction", (None, None))[1])
    cfg.metrics = _section(path, seen.get("metrics", (None, None))[1], "metrics", MetricsConfig)
    if "port_lost" in seen:
        n = seen["port_lost"][1]
        cfg.port_lost = _scalar(path, n, str, "port_lost")
        if cfg.port_lost not in ("keep", "stop"):
            raise ConfigError(_where(path, n), f"port_lost must be keep or stop, not {cfg.port_lost!r}")
    if "attach" in seen:
        n = seen["attach"][1]
        cfg.attach = _scalar(path, n, str, "attach")
        if cfg.attach not in abi.HOOKS:
            raise ConfigError(_where(path, n), f"attach must be {' or '.join(abi.HOOKS)}, not {cfg.attach!r}")
    if "perf_pages" in seen:
        n = seen["perf_pages"][1]
        pages = _scalar(path, n, int, "perf_pages")
        if pages < 1 or pages & (pages - 1):
            raise ConfigError(_where(path, n), f"perf_pages must be a power of two, not {pages}")
        cfg.perf_pages = pages
    cfg.nodes = seen
    return cfg


def _tunnels(path: str, node, ports: list[str]) -> list:
    """`tunnels: {NAME: {port: P, local: A, dstport: N}}`: a VXLAN device
    NAME over port P with local IPv4 address A (UDP port N, 4789 by
    default), one per port."""
    import ipaddress

    from ctctl.kernel.tunnel import VXLAN_PORT, Tunnel

    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(_where(path, node), "tunnels must map a device name to {port, local, dstport}")
    out: list = []
    for kn, vn in node.value:
        name = _scalar(path, kn, str, "tunnel name")
        if not NAME_RE.match(name) or name in ports or any(t.name == name for t in out):
            raise ConfigError(_where(path, kn), f"tunnel {name!r}: a new device name (not a port, not twice)")
        spec = keys_of(path, vn, {"port": "underlay port", "local": "local IPv4 address",
                                  "dstport": "UDP port"}, f"tunnel {name}")
        for key in ("port", "local"):
            if key not in spec:
                raise ConfigError(_where(path, vn), f"tunnel {name}: missing key {key!r}")
        port = _scalar(path, spec["port"][1], str, "port")
        if port not in ports or any(t.port == port for t in out):
            raise ConfigError(_where(path, spec["port"][1]),
                              f"tunnel {name}: port {port!r} is not a port of the box, or has a tunnel already")
        try:
            local = ipaddress.IPv4Address(_scalar(path, spec["local"][1], str, "local"))
        except ValueError:
            raise ConfigError(_where(path, spec["local"][1]),
                              f"tunnel {name}: local must be an IPv4 address (outer IPv6 is not modelled)") from None
        dstport = VXLAN_PORT
        if "dstport" in spec:
            dstport = _scalar(path, spec["dstport"][1], int, "dstport")
            if not 1 <= dstport <= 65535:
                raise ConfigError(_where(path, spec["dstport"][1]), f"tunnel {name}: dstport must be 1-65535")
        out.append(Tunnel(name, port, local, dstport))
    return out


def _rules(path: str, node, ports: list[str]) -> list:
    from ctctl.rules import MirredAction, RulesFileError, rules_from_node

    try:
        filters = rules_from_node(node, path)
    except RulesFileError as e:
        raise ConfigError(e.where, str(e)[len(e.where) + 2:]) from None
    # rules_from_node keeps the order of the list: item i is filter i.
    for item, f in zip(node.value, filters):
        for dev, what in [(f.dev, "dev")] + [(a.dev, "mirred dev") for a in f.actions
                                              if isinstance(a, MirredAction)]:
            if dev not in ports:
                raise ConfigError(_where(path, item), f"{what} {dev!r} is not a port or tunnel of the box "
                                                      f"(ports: {', '.join(ports)})")
    return filters


def _mapping(path: str, node, what: str) -> dict:
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(_where(path, node), f"{what} must be a mapping")
    return yaml.safe_load(yaml.serialize(node)) or {}


def _section(path: str, node, key: str, kind):
    """A mapping section parsed by its class's from_config (defaults when
    absent); a refusal names the section's position."""
    if node is None:
        return kind()
    try:
        return kind.from_config(_mapping(path, node, key))
    except ValueError as e:
        raise ConfigError(_where(path, node), str(e)) from None


def _hardware(path: str, node):
    from ctctl.nic.caps import HwCaps

    return _section(path, node, "hardware", HwCaps)


def _offload(path: str, node):
    from ctctl.kernel.offload import OffloadPolicy

    return _section(path, node, "offload", OffloadPolicy)


def _aging(path: str, node, hardware):
    from ctctl.kernel.offload.aging import AgingConfig

    if node is None:
        return AgingConfig(mode=default_aging(hardware))
    aging = _section(path, node, "aging", AgingConfig)
    why = aging_refused(aging.mode, hardware)
    if why:
        raise ConfigError(_where(path, node), why)
    return aging


def default_aging(hardware) -> str:
    """full where software can read the entries; without flow counters,
    the NIC's own aging where it has it, else the offload timeout."""
    if hardware.flow_counters:
        return "full"
    return "hardware" if hardware.hw_aging else "timeout"


def aging_refused(mode: str, hardware) -> str | None:
    """Why the declared NIC cannot be aged that way, or None."""
    if mode == "hardware" and not hardware.hw_aging:
        return "aging mode hardware needs a NIC that ages its own entries (hardware: {hw_aging: true})"
    if mode in ("full", "sample") and not hardware.flow_counters:
        return (f"aging mode {mode} reads the entries' counters and last use, which a NIC without flow "
                "counters does not keep (hardware: {flow_counters: false}): use aging mode "
                + ("hardware or timeout" if hardware.hw_aging else "timeout (it has no hw_aging either)"))
    return None


def _eviction(path: str, node):
    from ctctl.kernel.offload.eviction import EvictionConfig

    return _section(path, node, "eviction", EvictionConfig)


def check_system(cfg: BoxConfig, path: str = "<config>") -> None:
    """The namespace and the ports exist.  Still changes nothing."""
    knodes = cfg.nodes

    def where(key, i=None):
        if key not in knodes:
            return path
        node = knodes[key][1]
        if i is not None:
            node = node.value[i]
        return _where(path, node)

    if cfg.netns not in pr_netns.listnetns():
        raise ConfigError(where("netns"), f"netns {cfg.netns!r} does not exist (ip netns list)")
    with netns.ipr(cfg.netns) as ipr:
        for i, port in enumerate(cfg.ports):
            if not ipr.link_lookup(ifname=port):
                raise ConfigError(where("ports", i), f"unknown port {port!r}: no such interface in netns {cfg.netns!r}")


def read(path: str | Path) -> str:
    """A config file's text; ConfigError naming the file when it cannot be read."""
    try:
        return Path(path).read_text()
    except OSError as e:
        raise ConfigError(str(path), e.strerror or str(e)) from None


def load(path: str | Path) -> BoxConfig:
    path = str(path)
    cfg = parse(read(path), path)
    check_system(cfg, path)
    return cfg
