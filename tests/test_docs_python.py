"""Every Python block the docs show runs as written.

The blocks are the fenced ```` ```python ```` blocks of ``README.md`` and ``docs/**/*.md``. The blocks of one
page run in order in one namespace (a block may use what an earlier block of its page made, as a reader
would type them), in a scratch folder, against tiny checkpoints made here (``tests/tiny_pipeline.py`` and a
tiny SPADE): a checkpoint path of the docs, ``outputs/<experiment>/runs/.../checkpoints/best.ckpt``, becomes
the tiny checkpoint of its kind (:data:`STANDS_FOR`). A block that cannot run here (it needs released weights)
says so in its fence, ```` ```python no-run ````, or with ``<!-- no-run -->`` on the line before it; there
may be at most :data:`MAX_NO_RUN` of them. A block that raises fails the test with its page and line.
"""

from __future__ import annotations

import re
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
MAX_NO_RUN = 3   # blocks that need released weights; more means the docs stopped being tested
MIN_BLOCKS = 6   # the README's and docs/python.md's blocks at least; far fewer means the extraction broke
# the experiment a docs path names -> the tiny checkpoint that stands for it
STANDS_FOR = {"shapes_transformer": "transformer", "shapes_bidirectional": "transformer", "shapes_clip": "clip",
              "shapes_spade": "spade"}
CKPT_PATH = re.compile(r"""(?:outputs|runs)/([a-z0-9_]+)/[^"'\s]*?\.ckpt""")
FENCE = re.compile(r"^\s*```\s*([\w+-]*)(.*)$")


@dataclass(frozen=True)
class Block:
    where: str   # page:line of the block's first code line
    code: str
    run: bool    # False: marked no-run

    @property
    def page(self) -> str:
        return self.where.rsplit(":", 1)[0]

    @property
    def line(self) -> int:
        return int(self.where.rsplit(":", 1)[1])


def python_blocks(text: str, page: str) -> list[Block]:
    found, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        lang, rest = m.group(1).lower(), m.group(2)
        start, body, indent = i + 1, [], len(lines[i]) - len(lines[i].lstrip())
        i += 1
        while i < len(lines) and not FENCE.match(lines[i]):
            body.append(lines[i][indent:] if lines[i][:indent].isspace() else lines[i])
            i += 1
        i += 1  # the closing fence
        if lang in ("python", "py"):
            before = next((s.strip() for s in reversed(lines[:start - 1]) if s.strip()), "")
            no_run = "no-run" in rest or before == "<!-- no-run -->"
            found.append(Block(f"{page}:{start + 1}", "\n".join(body) + "\n", not no_run))
    return found


def all_blocks() -> list[Block]:
    return [b for p in PAGES for b in python_blocks(p.read_text(encoding="utf-8"), str(p.relative_to(ROOT)))]


BLOCKS = all_blocks()


def substitute(code: str, ckpts: dict[str, Path], where: str) -> str:
    def repl(m):
        kind = STANDS_FOR.get(m.group(1))
        assert kind is not None, (f"{where}: {m.group(0)} names {m.group(1)}, which no tiny checkpoint stands for "
                                  f"(add it to STANDS_FOR: {sorted(STANDS_FOR)})")
        return ckpts[kind].as_posix()

    return CKPT_PATH.sub(repl, code)


def run_blocks(blocks: list[Block], ckpts: dict[str, Path]) -> dict:
    """Run ``blocks`` (of one page) in order in one namespace; an AssertionError naming the block if one raises."""
    namespace: dict = {"__name__": "__docs__"}
    for b in blocks:
        code = "\n" * (b.line - 1) + substitute(b.code, ckpts, b.where)  # tracebacks give the page's line numbers
        try:
            exec(compile(code, b.page, "exec"), namespace)  # noqa: S102 - the docs' own examples
        except Exception as exc:  # noqa: BLE001 - re-raised with the block that failed
            raise AssertionError(f"the Python block at {b.where} raises {type(exc).__name__}: {exc}\n"
                                 f"{traceback.format_exc()}") from exc
    return namespace


def write_spade(path: Path) -> Path:
    """A tiny, randomly initialised SPADE for the 25 Shapes-layout classes, saved as a trained run saves it."""
    from t2i.data.layouts import NUM_LAYOUT_CLASSES
    from t2i.lit.spade import SPADEModule

    torch.manual_seed(0)
    model = dict(num_classes=NUM_LAYOUT_CLASSES, use_instance=False, image_size=16, ngf=4, latent_size=4, z_dim=8,
                 nef=4, hidden=8, norm="instance")
    module = SPADEModule(model=model, loss=dict(disc_ndf=8, disc_layers=2, num_d=1, perceptual_weight=0.0))
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    from tests.tiny_pipeline import text_tokenizer, write_checkpoints

    root = tmp_path_factory.mktemp("docs_ckpts")
    paths = write_checkpoints(text_tokenizer(), root)
    paths["spade"] = write_spade(root / "spade.ckpt")
    return paths


def test_the_docs_have_python_blocks():
    runnable = [b for b in BLOCKS if b.run]
    skipped = [b.where for b in BLOCKS if not b.run]
    assert len(runnable) >= MIN_BLOCKS, f"only {len(runnable)} runnable Python blocks found"
    assert any(b.page == "README.md" for b in runnable), "the README shows no runnable Python"
    assert any(b.page == "docs/python.md" for b in runnable)
    assert len(skipped) <= MAX_NO_RUN, f"{len(skipped)} blocks marked no-run (at most {MAX_NO_RUN}): {skipped}"


@pytest.mark.parametrize("page", sorted({b.page for b in BLOCKS if b.run}))
def test_python_blocks_run(page, ckpts, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # what the blocks write (best.png, samples/, ...) lands in a scratch folder
    run_blocks([b for b in BLOCKS if b.page == page and b.run], ckpts)


def test_the_checker_fails_a_block_that_raises(ckpts, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = ("# x\n\n```python\nx = 1\n```\n\n<!-- no-run -->\n```python\nimport nowhere\n```\n\n"
            "```python no-run\nimport nowhere\n```\n\n```python\nassert x == 2, 'x is 1'\n```\n")
    blocks = python_blocks(text, "x.md")
    assert [(b.where, b.run) for b in blocks] == [("x.md:4", True), ("x.md:9", False), ("x.md:13", False),
                                                   ("x.md:17", True)]
    with pytest.raises(AssertionError, match=r"x\.md:17 raises AssertionError: x is 1"):
        run_blocks([b for b in blocks if b.run], ckpts)
    with pytest.raises(AssertionError, match="which no tiny checkpoint stands for"):
        substitute('Pipeline.from_checkpoint("outputs/muge_transformer/runs/a/checkpoints/best.ckpt")', ckpts, "x")
    assert substitute('"outputs/shapes_clip/runs/.../checkpoints/best.ckpt"', ckpts, "x") == \
        f'"{ckpts["clip"].as_posix()}"'


def test_the_layer_tables_are_the_layers_test_layers_enforces():
    """The README's and docs/development.md's layer tables list exactly ``tests/test_layers.py``'s LAYERS."""
    from tests.test_layers import LAYERS

    def modules(cell: str) -> set[str]:
        names = [n for n in re.findall(r"`([^`]+)`", cell) if n.endswith((".py", "/"))]  # files and folders
        return {"t2i." + n.removeprefix("t2i/").removesuffix(".py").strip("/").replace("/", ".") for n in names}

    for page in ("README.md", "docs/development.md"):
        rows = {}
        for line in (ROOT / page).read_text(encoding="utf-8").splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if line.startswith("|") and len(cells) == 2 and cells[0] in {name for name, _ in LAYERS}:
                rows[cells[0]] = modules(cells[1])
        assert list(rows) == [name for name, _ in LAYERS], f"{page}: layer rows {list(rows)}"
        for name, prefixes in LAYERS:
            assert rows[name] == set(prefixes), f"{page}, layer {name}: {sorted(rows[name])} != {sorted(prefixes)}"
