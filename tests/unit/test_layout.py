"""The house rules of ctctl/, read from the code itself: no import cycle,
no module (test modules included) reaching into another module's
underscore names, the wings importing only downwards, a docstring that
opens every module, and one job per file (a size bound, with the files
that are one job and longer named here with the reason)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "ctctl"
TESTS = ROOT / "tests"

# What each part may import, besides itself: the NIC side sits on the
# kernel side (a driver includes the kernel's headers), the box wires both,
# the lab drives boxes.  abi, protocols and netns are the foundations.
FOUNDATIONS = {"ctctl.abi", "ctctl.protocols", "ctctl.netns"}
ALLOWED = {
    "ctctl.abi": set(),
    "ctctl.protocols": set(),
    "ctctl.netns": set(),
    "ctctl.rules": {"ctctl.abi", "ctctl.protocols"},
    "ctctl.kernel": FOUNDATIONS | {"ctctl.rules"},
    "ctctl.nic": FOUNDATIONS | {"ctctl.rules", "ctctl.kernel"},
    "ctctl.box": FOUNDATIONS | {"ctctl.rules", "ctctl.kernel", "ctctl.nic"},
    "ctctl.lab": FOUNDATIONS | {"ctctl.rules", "ctctl.kernel", "ctctl.nic", "ctctl.box"},
}
MAX_LINES = 500
# One job each, longer than MAX_LINES; splitting would cut the job in two.
LONG = {
    "ctctl/kernel/conntrack/tcp.py": "nf_conntrack_proto_tcp.c's job: the state table, "
                                     "tcp_in_window and the timeouts read one another",
    "ctctl/abi.py": "the mirror of bpf/ctctl_abi.h, the one Python truth of the C/Python boundary "
                    "that test_abi.py holds to the header: split, it would be two",
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(mod: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    base = base[:len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _reexports(pkg: str) -> dict[str, str]:
    """name -> submodule, for the names a package's __init__ imports from
    its own submodules (so that `from pkg import Name` is an edge to the
    module that defines Name, not to the package)."""
    path = MODULES.get(pkg)
    if path is None or path.name != "__init__.py":
        return {}
    out = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            src = _resolve(pkg, path, node)
            for a in node.names:
                if src in MODULES and src != pkg:
                    out[a.asname or a.name] = src
    return out


def _imports(mod: str, path: Path) -> tuple[set[str], list[tuple[str, int, str]]]:
    """The ctctl modules `mod` imports, and its `from X import _name` uses."""
    edges, private = set(), []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            edges |= {a.name for a in node.names if a.name in MODULES}
        elif isinstance(node, ast.ImportFrom):
            src = _resolve(mod, path, node)
            if not src.startswith("ctctl"):
                continue
            for a in node.names:
                if a.name.startswith("_") and not a.name.startswith("__"):
                    private.append((mod, node.lineno, f"from {src} import {a.name}"))
                full = f"{src}.{a.name}"
                edges.add(full if full in MODULES else _reexports(src).get(a.name, src))
    edges.discard(mod)
    return {e for e in edges if e in MODULES}, private


def _defined(path: Path) -> set[str]:
    names = set()
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(n.name)
        elif isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store):
            names.add(n.attr)
        elif isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
            names.add(n.id)
        elif isinstance(n, ast.arg):
            names.add(n.arg)
    return names


def test_no_import_cycle():
    graph = {m: _imports(m, p)[0] for m, p in MODULES.items()}
    # A package's __init__ only re-exports: leave it out of cycles.
    graph = {m: {e for e in es if MODULES[e].name != "__init__.py"}
             for m, es in graph.items() if MODULES[m].name != "__init__.py"}
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert cycles == []


def test_the_wings_import_only_downwards():
    wrong = []
    for mod, path in MODULES.items():
        part = next((p for p in ALLOWED if mod == p or mod.startswith(p + ".")), None)
        if part is None:          # cli.py and __main__: the top
            continue
        for dep in _imports(mod, path)[0]:
            dep_part = next((p for p in ALLOWED if dep == p or dep.startswith(p + ".")), dep)
            if dep_part != part and dep_part not in ALLOWED[part]:
                wrong.append(f"{mod} imports {dep}")
    assert wrong == []


def test_no_reach_into_another_modules_underscore_names():
    defined = {m: _defined(p) for m, p in MODULES.items()}
    found = []
    files = [(m, p) for m, p in MODULES.items()] + [(str(p.relative_to(ROOT)), p)
                                                   for p in sorted(TESTS.rglob("*.py"))]
    for mod, path in files:
        tree = ast.parse(path.read_text())
        own = defined.get(mod) or _defined(path)
        if mod in MODULES:
            found += [f"{m}:{line}: {what}" for m, line, what in _imports(mod, path)[1]]
        for n in ast.walk(tree):
            if not (isinstance(n, ast.Attribute) and n.attr.startswith("_") and not n.attr.startswith("__")):
                continue
            if isinstance(n.value, ast.Name) and n.value.id in ("self", "cls"):
                continue
            if n.attr not in own and any(n.attr in d for o, d in defined.items() if o != mod):
                found.append(f"{mod}:{n.lineno}: .{n.attr}")
    assert found == []


def test_every_module_says_what_it_is_for():
    missing = [m for m, p in MODULES.items()
               if p.stat().st_size and not ast.get_docstring(ast.parse(p.read_text()))]
    assert missing == []


def test_one_job_per_file():
    long = {str(p.relative_to(ROOT)): sum(1 for _ in p.open()) for p in MODULES.values()}
    over = {f: n for f, n in long.items() if n > MAX_LINES and f not in LONG}
    assert over == {}
    # The named exceptions are still needed (or the list is stale).
    assert all(long[f] > MAX_LINES for f in LONG)
