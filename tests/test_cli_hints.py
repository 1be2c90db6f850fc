"""Every override a message tells the user to write is one the command printing it accepts.

Messages are the strings raised, printed, logged or warned in ``t2i/`` (docstrings and comments are not). A hint
is a ``key=value`` in one of them written as advice: after ``pass``, ``set``, ``use``, ``give``, ``raise``,
``lower``, ``try`` or ``e.g.``; after ``with``, ``or``, ``leave``, ``needs``, ``drop`` or ``from`` when its value
is written out (``rerun with force=true``, ``or prompts_file=<one caption a line>``, not ``with text_len=64``
filled in at run time); in backticks; or in parentheses with a literal value. ``raise data.max_bad_fraction``
(``raise``, ``lower``, ``set``, ``increase`` or ``reduce`` and a bare key with a dot or an underscore) is one too.
An echo of what the user wrote (``ckpt=<path>: no such file``) is not a hint, and neither are the reader
arguments after a run-time key (``eval.split: give root=...`` means ``eval.split.root``; which key it is is known
only when it runs). Each hint is composed with Hydra's compose API, through the checker of
``test_docs_commands`` (the one every documented command goes through), against its command:

* the command a hint names itself (``t2i-train experiment=*_vqgan``, ``train one with experiment=*_spade``);
* else, in ``t2i/cli/<name>.py``, that command;
* else, in a library module, the commands that print its messages (:data:`LIBRARY`): one of them must accept it.

A value that stands for the user's own (``<file>``, ``...``, a formatted value) becomes ``null``; a glob such as
``experiment=*_spade`` must match a config. A key under a config group (``eval.seg.ckpt``, ``model.model.rotary``)
is accepted when some option of that group holds it. The limit on bad samples is named by each
:class:`~t2i.data.skips.SkipLog` (``key=``): its hint is checked where each command builds its log, and by running
the refusal of ``t2i-synthesize``, ``t2i-data convert`` and ``t2i-data inspect`` for real.
"""

from __future__ import annotations

import ast
import fnmatch
import functools
import inspect
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

from tests.test_docs_commands import CONFIG_OF, DocCommand, check

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "t2i" / "conf"
HOLE = "\x00"  # a formatted value inside a message

CLI = {"app": "app", "caption": "caption", "data": "data", "demo": "demo", "eval_caption": "eval", "eval_spade": "eval",
       "evaluate": "eval", "generate": "generate", "importer": "import", "init_from": "train",
       "knowledge": "knowledge", "synthesize": "synthesize", "tokenize": "tokenize", "train": "train"}
COMMANDS = sorted(set(CLI.values()))
# library modules -> the commands whose runs print their messages (longest prefix wins; unlisted: any command)
LIBRARY = {
    "t2i/lit/": ("train",), "t2i/lit/spade.py": ("train", "synthesize", "eval"), "t2i/models/": ("train",), "t2i/losses/": ("train",), "t2i/callbacks/": ("train",),
    "t2i/distributed.py": ("train",), "t2i/checkpoints.py": ("train",), "t2i/data/datamodule.py": ("train",),
    "t2i/data/code_datamodule.py": ("train",), "t2i/data/sampler.py": ("train",),
    "t2i/models/rrdbnet.py": ("generate", "import"), "t2i/data/codes.py": ("tokenize", "train"),
    "t2i/data/layouts/": ("train", "synthesize", "eval", "data"),
    "t2i/data/shards.py": ("data",), "t2i/data/filter.py": ("data",), "t2i/data/shapes.py": ("data", "train"),
    "t2i/data/shapes_kg.py": ("data", "train"), "t2i/data/tokenizer.py": ("data", "train", "tokenize"),
    "t2i/data/encoding.py": ("tokenize",), "t2i/metrics/": ("eval", "train"), "t2i/eval/": ("eval", "train"),
    "t2i/pipeline/": ("generate", "eval", "caption"), "t2i/pipeline/spade.py": ("synthesize", "eval"),
    "t2i/sampling.py": ("generate", "eval", "caption"), "t2i/captioning.py": ("caption", "eval"),
    "t2i/pretrained/": ("import", "tokenize", "generate", "eval", "train"),
    "t2i/knowledge/": ("knowledge", "data", "train"),
}
LOG_CALLS = {"print", "warn", "warning", "info", "error", "exception", "debug", "critical"}
KEY = r"[a-z_]\w*(?:[./][a-z_]\w*)*"
ASSIGNMENT = re.compile(rf"(?<![\w.{{/\-{HOLE}%])({KEY})=")
ADVICE = re.compile(r"(?:\b(?:pass|set|use|give|raise|lower|try)|e\.g\.)[\s`(]*$")
WRITTEN_ADVICE = re.compile(r"\b(?:with|or|leave|needs?|drop|from)[\s`(]*$")  # with a written-out value
BARE = re.compile(rf"\b(?:raise|lower|set|increase|reduce)\s+`?({KEY})`?(?![=\w]|\.\w)")
# messages only a Python caller can meet (the commands check first or never call): file -> {key: why}
PYTHON_ONLY = {
    "t2i/pipeline/text_to_image.py": {"reranker": "Pipeline.score() needs a Pipeline built with reranker=; no "
                                                  "command calls score() (they rank through rerank.*)"},
}


@dataclass(frozen=True)
class Hint:
    where: str      # file:line of the message
    key: str
    value: str      # as written ("" when it stands for the user's value)
    commands: tuple[str, ...]
    cross: bool     # the message names the command itself (t2i-train ..., train one with ...)

    def __str__(self):
        return f"{self.where}: {self.key}={self.value or '<value>'} (for {' or '.join(self.commands)})"


# -- extraction ------------------------------------------------------------------------------------------------
def text_of(node) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else HOLE for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mod)):
        left, right = text_of(node.left), text_of(node.right)
        if left is None and right is None:
            return None
        return (left or HOLE) + (right or HOLE) if isinstance(node.op, ast.Add) else (left or HOLE)
    return None


def messages(tree) -> list[tuple[int, str]]:
    """(line, text) of every string raised, printed, logged or warned."""
    roots = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and node.exc is not None:
            roots.append(node.exc)
        elif isinstance(node, ast.Call):
            f = node.func
            if (f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")) in LOG_CALLS:
                roots.extend(node.args)
    out, done = [], set()
    for root in roots:
        for node in ast.walk(root):
            if id(node) in done:
                continue
            text = text_of(node)
            if text is not None:
                done.update(id(n) for n in ast.walk(node))
                out.append((node.lineno, re.sub(r"%[sdrfi]", HOLE, text)))
    return out


def value_at(text: str, i: int) -> str:
    """The value written from ``text[i]`` on: quoted, <placeholder>, {mapping} or up to the next blank."""
    closing = {"'": "'", '"': '"', "<": ">", "{": "}"}.get(text[i:i + 1])
    if closing:
        end = text.find(closing, i + 1)
        return text[i:end + 1] if end > 0 else text[i:]
    m = re.match(r"\S*", text[i:])
    return m.group(0).rstrip(").,;:`'\"")


def commands_of(rel: str) -> tuple[str, ...]:
    path = Path(rel)
    if path.parent.as_posix() == "t2i/cli":
        return (CLI[path.stem],) if path.stem in CLI else ()
    best = max((p for p in LIBRARY if rel.startswith(p)), key=len, default=None)
    return LIBRARY[best] if best else tuple(COMMANDS)


def command_named(before: str, commands: tuple[str, ...]) -> tuple[tuple[str, ...], bool]:
    """The command the clause before a hint names (``t2i-train ...``, ``trained with ...``), else ``commands``."""
    clause = re.split(r"[;:)]|(?<!e\.g)(?<!i\.e)\.\s", before)[-1]
    named = re.findall(r"\bt2i-([a-z]+)", re.split(r"[(`<]", clause)[-1])
    if named:
        return ({"evaluate": "eval", "importer": "import"}.get(named[-1], named[-1]),), True
    if re.search(r"\btrain(ed)?\b", clause):
        return ("train",), True
    return commands, False


def hints_in(text: str, where: str, commands: tuple[str, ...]) -> list[Hint]:
    out = []
    relative = re.match(rf"{HOLE}(=\S*)?:", text)  # "<key>: give root=...": arguments under a run-time key
    for m in ASSIGNMENT.finditer(text):
        before = text[: m.start()]
        value = value_at(text, m.end())
        hole = HOLE in value
        literal = bool(value) and not hole and not value.startswith(("<", "{")) and value != "..."
        in_backticks = before.count("`") % 2 == 1
        parenthesised = before.rstrip().endswith("(") and literal
        advice = ADVICE.search(before) or (WRITTEN_ADVICE.search(before) and not hole)
        if not (advice or in_backticks or parenthesised) or (relative and "." not in m.group(1)):
            continue
        out.append(Hint(where, m.group(1), value if literal else "", *command_named(before, commands)))
    for m in BARE.finditer(text):
        if "." in m.group(1) or "_" in m.group(1):
            out.append(Hint(where, m.group(1), "", *command_named(text[: m.start()], commands)))
    file = where.rsplit(":", 1)[0]
    return [h for h in out if h.key not in PYTHON_ONLY.get(file, {})]


def all_hints() -> list[Hint]:
    found = []
    for py in sorted((ROOT / "t2i").rglob("*.py")):
        rel = py.relative_to(ROOT).as_posix()
        for line, text in messages(ast.parse(py.read_text(encoding="utf-8"))):
            found += hints_in(text, f"{rel}:{line}", commands_of(rel))
    return found


# -- composition -----------------------------------------------------------------------------------------------
def group_options(group: str, key: str = "") -> list[str]:
    """The options of config group ``group``; those whose file mentions ``key``'s next part first."""
    files = sorted((CONF / group).glob("*.yaml")) if (CONF / group).is_dir() else []
    part = key.split(".")[1] if key.count(".") else None
    return [f.stem for f in sorted(files, key=lambda f: part is None or f"{part}:" not in f.read_text())]


@functools.cache
def refusal(command: str, overrides: str) -> str | None:
    """Why ``t2i-<command> <overrides>`` does not compose, or None when it does."""
    if command not in CONFIG_OF.values():  # a command the docs checker does not list (yet): compose it here
        try:
            compose(command, overrides=overrides.split(), return_hydra_config=True)
        except Exception as exc:  # noqa: BLE001 - returned as the reason
            return f"t2i-{command} {overrides}\n  does not compose as written ({command}.yaml): {type(exc).__name__}: {exc}"
        return None
    try:
        check(DocCommand("as a command", f"t2i-{command} {overrides}"))
    except AssertionError as exc:
        return str(exc).strip()
    return None


def accepts(command: str, key: str, value: str, where: str) -> None:
    """Compose ``t2i-<command> key=value``; AssertionError (naming ``where`` and the hint) when Hydra refuses.
    A key under a config group composes with the option of that group that holds it."""
    top = key.split(".")[0]
    values = [value or "null"]
    if "*" in value and "." not in key and group_options(key):
        values = fnmatch.filter(group_options(key), value)
        assert values, f"{where}: {key}={value} matches no config in conf/{key}/"
    elif not value and "." not in key and group_options(key):
        values = group_options(key)[:1]
    first = None
    for prefix in ["", *(f"{top}={opt} " for opt in group_options(top, key) if "." in key)]:
        why = refusal(command, f"{prefix}{key}={values[0]}")
        if why is None:
            return
        first = first or why
    raise AssertionError(f"{where}: {first}")


def check_hint(hint: Hint) -> None:
    errors = []
    for command in hint.commands:
        try:
            accepts(command, hint.key, hint.value, hint.where)
            return
        except AssertionError as exc:
            errors.append(str(exc))
    raise AssertionError(f"the hint {hint} names an override no command printing it accepts:\n" + "\n".join(errors))


HINTS = all_hints()
MIN_HINTS = 60  # the messages hold more than this; far fewer means the extraction broke


@pytest.fixture(scope="module", autouse=True)
def hydra_conf():
    GlobalHydra.instance().clear()
    with initialize_config_module("t2i.conf", version_base="1.3"):
        yield
    GlobalHydra.instance().clear()


def test_hints_are_found_in_every_kind_of_module():
    files = {h.where.split(":")[0] for h in HINTS}
    assert len(HINTS) >= MIN_HINTS, f"only {len(HINTS)} hints found"
    for expected in ("t2i/pipeline/parts.py", "t2i/cli/tokenize.py", "t2i/data/shards.py", "t2i/models/transformer.py",
                     "t2i/metrics/segmentation.py"):
        assert expected in files, expected
    assert any(h.cross for h in HINTS) and any(not h.value for h in HINTS)


@pytest.mark.parametrize("hint", HINTS, ids=[f"{h.where}:{h.key}" for h in HINTS])
def test_hint_names_an_override_its_command_accepts(hint):
    check_hint(hint)


def test_the_checker_fails_on_a_hint_its_command_rejects():
    """The hint t2i-synthesize and t2i-data used to print fails, naming the hint and the file."""
    old = "maps: 2 of 3 samples were bad; worst file: m.png. Fix the data or raise data.max_bad_fraction."
    for rel in ("t2i/cli/synthesize.py", "t2i/cli/data.py"):
        (hint,) = hints_in(old, f"{rel}:1", commands_of(rel))
        with pytest.raises(AssertionError, match=rf"(?s){rel}:1: data\.max_bad_fraction=<value>.*Could not override"):
            check_hint(hint)
    (ok,) = hints_in(old, "t2i/data/datamodule.py:1", commands_of("t2i/data/datamodule.py"))
    check_hint(ok)  # the training datamodules' own key
    assert not hints_in("ckpt=\x00: no such file", "t2i/cli/generate.py:1", ("generate",))  # an echo
    with pytest.raises(AssertionError, match="matches no config"):
        check_hint(hints_in("train on codes (data=*_nothing)", "t2i/lit/x.py:1", ("train",))[0])


# -- the limit on bad samples: each SkipLog names the key of its command -----------------------------------------
def skiplog_hints() -> list[Hint]:
    """The limit hint of every SkipLog / LayoutSkipLog built in ``t2i/`` with a literal (or the default) key."""
    from t2i.data.skips import SkipLog

    default = inspect.signature(SkipLog).parameters["key"].default
    out = []
    for py in sorted((ROOT / "t2i").rglob("*.py")):
        rel = py.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(py.read_text(encoding="utf-8"))):
            f = getattr(node, "func", None)
            if isinstance(node, ast.Call) and getattr(f, "id", getattr(f, "attr", "")) in ("SkipLog", "LayoutSkipLog"):
                kw = {k.arg: k.value for k in node.keywords}
                if "key" not in kw or isinstance(kw["key"], ast.Constant):
                    key = kw["key"].value if "key" in kw else default
                    out.append(Hint(f"{rel}:{node.lineno}", key, "0.5", commands_of(rel), False))
    return out


SKIPLOGS = skiplog_hints()


def test_skiplogs_are_found():
    assert {c for h in SKIPLOGS for c in h.commands} >= {"data", "eval", "tokenize", "train"}, SKIPLOGS


@pytest.mark.parametrize("hint", SKIPLOGS, ids=[h.where for h in SKIPLOGS])
def test_each_command_names_its_own_bad_fraction_key(hint):
    check_hint(hint)


def test_the_training_default_is_the_training_key():
    from t2i.data.skips import SkipLog

    accepts("train", inspect.signature(SkipLog).parameters["key"].default, "0.5", "t2i/data/skips.py")


def refusal_hints(exc, rel: str) -> list[Hint]:
    hints = hints_in(str(exc), rel, commands_of(rel))
    assert any(h.key.endswith("max_bad_fraction") for h in hints), str(exc)
    return hints


def test_synthesize_refusal_names_its_key(tmp_path, monkeypatch):
    from t2i.cli import synthesize as synth
    from t2i.data.skips import DataError
    from t2i.pipeline import spade as spade_lib
    from tests.test_synthesize import StandInSPADE, save_standin

    monkeypatch.setattr(spade_lib, "module_class", lambda: StandInSPADE)
    maps = tmp_path / "maps"
    maps.mkdir()
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(maps / "a.png")
    (maps / "b.png").write_bytes(b"\x89PNG broken")
    cfg = compose("synthesize", overrides=[f"ckpt={save_standin(tmp_path / 's.ckpt')}", f"maps={maps}",
                                           f"output={tmp_path}/out", "device=cpu", "progress=false",
                                           "max_bad_fraction=0.1"])
    with pytest.raises(DataError, match=r"Fix the data or raise ") as e:
        synth.run(cfg)
    for hint in refusal_hints(e.value, "t2i/cli/synthesize.py"):
        check_hint(hint)


@pytest.mark.parametrize("command", ["convert", "inspect"])
def test_data_refusals_name_its_key(tmp_path, command, capsys):
    from t2i.cli.data import run
    from t2i.data.shapes import iter_split, png_base64
    from t2i.data.skips import DataError

    rows = [f"{s.key}\t{s.caption}\t{png_base64(s.image)}\n" for s in iter_split("train", 3, 0, 16)]
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("".join(rows) + "k9\tno image\tnot base64!\n" + "k10\tbad\n", encoding="utf-8")
    cfg = compose("data", overrides=[f"command={command}", "source=easynlp_tsv", f"input={tsv}",
                                     f"output={tmp_path}/out", "max_bad_fraction=0.1", "progress=false",
                                     "n_preview=0"])
    with pytest.raises(DataError, match=r"Fix the data or raise ") as e:
        run(cfg)
    for hint in refusal_hints(e.value, "t2i/cli/data.py"):
        check_hint(hint)
