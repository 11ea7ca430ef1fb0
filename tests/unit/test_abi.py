"""bpf/ctctl_abi.h and ctctl/abi.py describe the same boundary.

The header is compiled with the host C compiler into a probe that prints
every enum constant, struct size and field offset; each is compared with
the ctypes mirror.  Adding a constant or a field on one side only fails
here.
"""

import ctypes
import re
import shutil
import subprocess

import pytest

from ctctl import abi

CC = shutil.which("cc") or shutil.which("gcc")


def _header_enum_names() -> list[str]:
    text = abi.HEADER.read_text()
    body = "\n".join(re.findall(r"enum\s+\w+\s*\{(.*?)\};", text, re.S))
    return re.findall(r"^\s*(CTCTL_\w+)\s*[=,]", body, re.M)


def _header_fields(struct: str) -> list[str]:
    text = abi.HEADER.read_text()
    body = re.search(rf"struct\s+{struct}\s*\{{(.*?)\}};", text, re.S)[1]
    return re.findall(r"^\s*(?:__\w+|struct\s+\w+)\s+(\w+)(?:\[\w+\])?;", body, re.M)


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    if not CC:
        pytest.skip("no C compiler")
    d = tmp_path_factory.mktemp("abi")
    lines = ['#include <stdio.h>', '#include <stddef.h>', f'#include "{abi.HEADER}"', "int main(void) {"]
    for name in _header_enum_names() + [c for c in abi.C_CONSTANTS if not c.endswith("_MAX")]:
        lines.append(f'printf("{name} %lld\\n", (long long){name});')
    for s in abi.C_STRUCTS:
        lines.append(f'printf("sizeof {s} %zu\\n", sizeof(struct {s}));')
        for f in _header_fields(s):
            lines.append(f'printf("offsetof {s}.{f} %zu\\n", offsetof(struct {s}, {f}));')
    lines += ["return 0;", "}"]
    src = d / "probe.c"
    src.write_text("\n".join(lines))
    subprocess.run([CC, "-o", str(d / "probe"), str(src)], check=True)
    out = subprocess.run([str(d / "probe")], check=True, capture_output=True, text=True).stdout
    return dict(line.rsplit(" ", 1) for line in out.splitlines())


def test_every_enum_constant_matches(probe):
    checked = 0
    for prefix, enum in abi.C_ENUMS.items():
        # The prefixes are distinct (CTCTL_C_ is not a prefix of CTCTL_CS_).
        c_names = {k[len(prefix):] for k in probe if k.startswith(prefix) and k != prefix + "MAX"}
        py_names = {m.name for m in enum}
        assert c_names == py_names, f"{prefix}*: C has {sorted(c_names - py_names)}, Python has {sorted(py_names - c_names)}"
        for m in enum:
            assert int(probe[prefix + m.name]) == m.value, f"{prefix}{m.name}"
            checked += 1
    assert checked >= 20


def test_constants_match(probe):
    for name, value in abi.C_CONSTANTS.items():
        assert int(probe[name]) == value, name


def test_struct_layouts_match(probe):
    for s, cls in abi.C_STRUCTS.items():
        assert int(probe[f"sizeof {s}"]) == ctypes.sizeof(cls), s
        c_fields = _header_fields(s)
        assert c_fields == [f[0] for f in cls._fields_], f"{s}: field list differs"
        for f in c_fields:
            assert int(probe[f"offsetof {s}.{f}"]) == getattr(cls, f).offset, f"{s}.{f}"


def test_every_define_is_mirrored():
    defines = set(re.findall(r"^#define\s+(CTCTL_\w+)\s+\S", abi.HEADER.read_text(), re.M))
    assert defines - {"CTCTL_ABI_H"} == {c for c in abi.C_CONSTANTS if not c.endswith("_MAX")}


_C_TYPES = {"__u64": ctypes.c_uint64, "__u32": ctypes.c_uint32}


def _c_type(text: str):
    text = text.strip()
    if text.startswith("struct "):
        name = text.split()[1]
        return abi.C_STRUCTS.get(name, name)   # internal structs stay names
    return _C_TYPES[text]


def test_maps_match_maps_h():
    """Every map of bpf/maps.h, its macro and its types, is abi.MAPS's, and
    nothing else is: the names the driver and the loader use come from
    there."""
    text = (abi.BPF_DIR / "maps.h").read_text()
    declared = {name: (macro, [a for a in (args or "").split(",") if a.strip()])
                for macro, name, args in re.findall(r"^((?:BPF|CTCTL)_\w+)\((\w+)(?:,([^;]*))?\);", text, re.M)}
    assert set(declared) == set(abi.MAPS)
    for name, spec in abi.MAPS.items():
        macro, args = declared[name]
        assert macro == spec.kind, name
        # Pinned (CTCTL_*) unless program-internal (BCC's own BPF_*).
        assert spec.pinned == macro.startswith("CTCTL_"), name
        if macro in ("CTCTL_PERF_OUTPUT", "CTCTL_RINGBUF_OUTPUT"):
            assert spec.key is None and spec.value is None, name
            continue
        # *_HASH(name, key, value, size); the arrays' (and the devmap's) keys are u32 indexes.
        key, value = (args[0], args[1]) if macro.endswith("_HASH") else ("__u32", args[0])
        assert _c_type(key) is spec.key, name
        if spec.value is None:
            assert name == "scratch" and not spec.pinned   # program-internal state
        else:
            assert _c_type(value) is spec.value, name
    assert abi.pinned_maps("xdp") == abi.PINNED_MAPS + ("ports",)
    assert abi.PINNED_MAPS == ("punts", "counters", "chains", "flows", "rule_stats", "hw_config",
                               "aging_config", "aging_slots", "windows", "window_merges", "tunnels", "encaps", "vteps",
                               "expiries")
