"""The layer order of DESIGN.md, checked on the imports of toolkit/ (lazy imports inside functions included).

A module may import modules of its own layer or of a layer below it, and no chain of imports may lead back
to where it started. Layers are matched by the longest module-name prefix, so `toolkit.audio.rollout` can sit
above `toolkit.shards` while the rest of `toolkit.audio` (io, codec, codes, score) sits below it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "toolkit"

# lowest first; keep in step with the Layout section of DESIGN.md
LAYERS = [
    ["toolkit.errors", "toolkit.console", "toolkit.hub", "toolkit.fsio", "toolkit"],
    ["toolkit.device"],
    ["toolkit.models"],
    ["toolkit.recipe"],
    ["toolkit.data"],
    ["toolkit.tokenizers"],
    ["toolkit.audio"],  # io, codec, codes, score: audio files and their codes, no training
    ["toolkit.shards"],
    ["toolkit.run", "toolkit.plot"],
    ["toolkit.generate"],
    ["toolkit.evaluate"],
    ["toolkit.train"],
    ["toolkit.compare", "toolkit.seed_formats"],
    ["toolkit.export", "toolkit.audio.rollout"],
    ["toolkit.chat"],
    ["toolkit.serve"],
    ["toolkit.cli", "toolkit.__main__"],
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every toolkit module `path` imports, at the top or inside a function."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            # `from toolkit import models` imports the module toolkit.models
            found.update(f"{mod}.{a.name}" for a in node.names if (ROOT.parent / f"{mod}.{a.name}".replace(".", "/")
                                                                   ).with_suffix(".py").is_file()
                         or (ROOT.parent / f"{mod}.{a.name}".replace(".", "/")).is_dir())
    return {m for m in found if m == "toolkit" or m.startswith("toolkit.")}


def layer_of(name: str) -> int:
    best, best_len = None, -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    assert best is not None, f"{name} is in no layer: add it to LAYERS and to DESIGN.md"
    return best


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    return {name: {m for m in imports_of(p) if m in modules and m != name} for name, p in modules.items()}


def test_every_module_has_a_layer():
    for name in graph():
        layer_of(name)


def test_no_import_against_the_layer_order():
    bad = []
    for name, deps in sorted(graph().items()):
        for dep in sorted(deps):
            if dep == "toolkit":  # the package's own __init__ (version) is the floor
                continue
            if layer_of(dep) > layer_of(name):
                bad.append(f"{name} (layer {layer_of(name)}) imports {dep} (layer {layer_of(dep)})")
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_no_import_cycle():
    g = graph()
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    cycles = []

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for dep in sorted(g[node]):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("needle", ["hasattr(model,", "hasattr(raw_model,", "\"toolkit.models.", "'toolkit.models."])
def test_no_family_tests_outside_models(needle):
    hits = [f"{p.relative_to(ROOT.parent)}:{i}" for p in ROOT.rglob("*.py") if "models" not in p.parts
            for i, line in enumerate(p.read_text().splitlines(), 1) if needle in line]
    assert not hits, f"{needle} outside toolkit/models/: " + ", ".join(hits)


def test_the_checker_sees_lazy_imports(tmp_path):
    src = "import os\n\ndef f():\n    from toolkit.train import loop\n    import toolkit.chat\n"
    p = ROOT / "_layers_probe.py"
    try:
        p.write_text(src)
        assert {"toolkit.train", "toolkit.train.loop", "toolkit.chat"} <= imports_of(p)
    finally:
        p.unlink()
