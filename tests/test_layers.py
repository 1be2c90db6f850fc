"""Imports flow one way. Every module of ``t2i/`` belongs to a layer; a module may import its own layer and the
layers below it, never one above, and no two modules import each other in a circle. Every import counts,
module level or inside a function (a lazy import is still a dependency). The layers are the README's
picture of the project."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "t2i"

# lowest first; a module's layer is that of the longest prefix listed
LAYERS = [
    ("core", ["t2i.errors", "t2i.checks", "t2i.keys", "t2i.devices", "t2i.distributed", "t2i.checkpoints", "t2i.viz"]),
    ("models", ["t2i.models", "t2i.losses", "t2i.sampling", "t2i.captioning"]),
    ("data", ["t2i.data", "t2i.knowledge", "t2i.metrics"]),
    ("pretrained", ["t2i.pretrained"]),
    ("lit", ["t2i.lit"]),
    ("pipeline", ["t2i.pipeline", "t2i.rerank"]),  # t2i.rerank: the old name of t2i.pipeline.rerank
    ("eval", ["t2i.eval", "t2i.callbacks"]),
    ("cli", ["t2i.cli", "t2i.conf"]),
]
# upward imports allowed, each a lazy alias that keeps a documented name working after its code moved up
COMPAT = {("t2i.models", "t2i.pretrained.image_tokenizers"): "t2i.models.load_tokenizer (now t2i.pretrained)"}
RANK = {prefix: i for i, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes}


def modules() -> dict[str, Path]:
    out = {}
    for f in ROOT.rglob("*.py"):
        parts = f.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def layer(module: str) -> int | None:
    while module:
        if module in RANK:
            return RANK[module]
        module = module.rpartition(".")[0]
    return None


def imports(mods: dict[str, Path]) -> dict[str, set[tuple[str, int]]]:
    """``{module: {(imported t2i module, line)}}`` for every import statement."""

    def resolve(name):
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    out = {}
    for m, f in mods.items():
        is_pkg = f.name == "__init__.py"
        found = set()
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    here = m.split(".") if is_pkg else m.split(".")[:-1]
                    base = ".".join(here[:len(here) - node.level + 1] + ([base] if base else []))
                names = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            for n in names:
                r = resolve(n) if n.startswith("t2i.") else None
                if r and r != m and r != "t2i":
                    found.add((r, node.lineno))
        out[m] = found
    return out


def test_every_module_has_a_layer():
    assert [m for m in modules() if m != "t2i" and layer(m) is None] == []


def test_no_upward_import():
    mods = modules()
    upward = []
    for m, found in imports(mods).items():
        if m == "t2i":  # the package root only re-exports the pipeline, lazily
            continue
        for target, line in sorted(found):
            if layer(target) > layer(m) and (m, target) not in COMPAT:
                upward.append(f"{mods[m].relative_to(ROOT.parent)}:{line} ({LAYERS[layer(m)][0]}) imports {target} "
                              f"({LAYERS[layer(target)][0]})")
    assert upward == [], "upward imports:\n" + "\n".join(upward)


def test_no_import_circle():
    edges = {m: {t for t, _ in found} for m, found in imports(modules()).items()}
    index, low, stack, on, circles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
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
                circles.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert circles == [], "import circles: " + "; ".join(" <-> ".join(c) for c in circles)


def test_the_check_can_fail(tmp_path, monkeypatch):
    """A planted upward import is found and named."""
    pkg = tmp_path / "t2i"
    (pkg / "models").mkdir(parents=True)
    (pkg / "cli").mkdir()
    for f in ("__init__.py", "models/__init__.py", "cli/__init__.py", "cli/tool.py"):
        (pkg / f).write_text("")
    (pkg / "models" / "bad.py").write_text("def f():\n    from t2i.cli.tool import x\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", pkg)
    try:
        test_no_upward_import()
    except AssertionError as e:
        assert "t2i/models/bad.py:2 (models) imports t2i.cli.tool (cli)" in str(e)
    else:
        raise AssertionError("the planted upward import was not found")


def test_moved_names_still_import():
    """Documented lower-level names keep working after their code moved (README: lower-level contracts)."""
    from t2i.models import load_tokenizer
    from t2i.pipeline import rerank
    from t2i.pretrained.image_tokenizers import load_tokenizer as moved
    from t2i.rerank import load_reranker, score

    assert load_tokenizer is moved and load_reranker is rerank.load_reranker and score is rerank.score
