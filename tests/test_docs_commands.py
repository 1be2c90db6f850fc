"""Every command the docs show composes as written.

The commands come from the README, ``docs/**/*.md`` (the reference, one page per command or stage),
``experiments/*/README.md`` and ``conf/**/README.md`` (fenced code blocks and inline code), the comments of ``conf/**/*.yaml`` and the top docstrings of ``t2i/cli/*.py``: each line
that runs ``t2i-*`` (also as ``python -m t2i.cli.*``, under ``torchrun`` or ``srun``, or through the
``experiments/launch`` scripts, which hand their arguments to ``t2i-train``) or ``make``. Placeholders
(``<run>``, ``<vqgan .ckpt>``, ``ckpt=...``) become a path, ``experiment=<name>`` a real experiment; a ``-m``
sweep is composed once per swept value. Each is then composed in-process with Hydra's compose API (one
initialisation for all) against the CLI's own config, exactly as the CLI's parser would see the arguments;
``make`` targets must exist in the Makefile. The recipe's data step and the ``t2i-data`` examples also run
for real on tiny data (``test_recipe_and_data_commands_run_for_real``).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "t2i" / "conf"
CONFIG_OF = {"data": "data", "train": "train", "tokenize": "tokenize", "generate": "generate", "eval": "eval",
             "evaluate": "eval", "demo": "demo", "import": "import", "caption": "caption", "importer": "import",
             "knowledge": "knowledge", "synthesize": "synthesize", "app": "app"}
PLACEHOLDER_PATH = "/tmp/t2i-docs/placeholder"
MIN_COMMANDS = 240  # the docs hold about 290; far fewer means the extraction broke


@dataclass(frozen=True)
class DocCommand:
    where: str      # file:line
    text: str       # the command as the docs show it (continuations joined)

    def __str__(self):
        return f"{self.where}: {self.text}"


# -- extraction ----------------------------------------------------------------------------------------------
def is_command(line: str) -> bool:
    """A line that runs a t2i command or a make target (not a title like ``t2i-eval: ...``, not a diagram,
    not a usage synopsis with ``key=value ...``)."""
    s = line.strip()
    if not re.match(r"(t2i-[a-z-]+(\s|$)|make [a-z]|python -m t2i\.cli\.|torchrun |srun |sbatch |[A-Z_]+=\S+ )", s):
        return False
    return ("t2i" in s or s.startswith("make ") or "experiments/launch/" in s) and not re.search(r"[─│▶]|key=value|^t2i-[a-z-]+ \(", s)


def strip_prose(text: str) -> str:
    """Comment lines put a note after the command, past a wide gap: ``t2i-train ...     (what it does)``."""
    parts = re.split(r"\s{3,}", text.strip())
    kept = [parts[0]]
    for part in parts[1:]:
        if not re.match(r"[\w.+~/-]+=", part):
            break
        kept.append(part)
    return " ".join(kept)


def join_continuations(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for no, line in lines:
        text = line.rstrip()
        if pending is not None:
            text = pending[1] + " " + text.strip()
            no = pending[0]
        if text.endswith("\\"):
            pending = (no, text[:-1].rstrip())
            continue
        pending = None
        out.append((no, text))
    return out


def markdown_commands(path: Path) -> list[DocCommand]:
    rel = path.relative_to(ROOT)
    found, block, fenced = [], [], False
    for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.lstrip().startswith("```"):
            if fenced:
                found += [DocCommand(f"{rel}:{n}", t.strip()) for n, t in join_continuations(block)
                          if is_command(t)]
                block = []
            fenced = not fenced
            continue
        if fenced:
            block.append((no, line))
            continue
        for span in re.findall(r"`([^`]+)`", line):  # inline code that is a whole command
            if is_command(span) and "=" in span and not re.search(r"[*|…]", span):
                found.append(DocCommand(f"{rel}:{no}", span.strip()))
    return found


def comment_commands(path: Path) -> list[DocCommand]:
    rel = Path("conf") / path.relative_to(CONF)
    lines = []
    for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        m = re.match(r"\s*#+\s?(.*)$", line)
        if m:
            lines.append((no, m.group(1)))
    return [DocCommand(f"{rel}:{n}", strip_prose(t)) for n, t in join_continuations(lines) if is_command(t)]


def docstring_commands(path: Path) -> list[DocCommand]:
    import ast

    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    rel = path.relative_to(ROOT)
    lines = list(enumerate(doc.splitlines(), 2))
    return [DocCommand(f"{rel}:{n}", strip_prose(t)) for n, t in join_continuations(lines) if is_command(t)]


def all_commands() -> list[DocCommand]:
    cmds: list[DocCommand] = []
    for md in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted(ROOT.glob("experiments/*/README.md")),
               *sorted(CONF.rglob("README.md"))]:
        cmds += markdown_commands(md)
    for yml in sorted(CONF.rglob("*.yaml")):
        cmds += comment_commands(yml)
    for py in sorted((ROOT / "t2i" / "cli").glob("*.py")):
        cmds += docstring_commands(py)
    return cmds


# -- turning a command into a composition --------------------------------------------------------------------
def substitute(text: str) -> str:
    text = text.replace("$HOME", "/home/user")  # what the shell would expand
    text = re.sub(r"experiment=(<[^<>]*>|\.\.\.(?=\s|$))", "experiment=shapes_transformer", text)
    text = re.sub(r"<[^<>]*>", PLACEHOLDER_PATH, text)
    return re.sub(r"=\.\.\.(?=\s|$)", "=" + PLACEHOLDER_PATH, text)


def parse(cmd: DocCommand) -> tuple[str, list[str]]:
    """(program, arguments): program is a config name, ``make`` or ``sweep-report``."""
    tokens = shlex.split(substitute(cmd.text), comments=True)
    for i, tok in enumerate(tokens):
        if tok == "make":
            return "make", tokens[i + 1:]
        if tok.startswith("t2i-"):
            name = tok[len("t2i-"):]
            return ("sweep-report" if name == "sweep-report" else CONFIG_OF.get(name, name)), tokens[i + 1:]
        if tok.startswith("t2i.cli."):
            return CONFIG_OF.get(tok.rsplit(".", 1)[1], tok), tokens[i + 1:]
        if tok.endswith(("launch/torchrun.sh", "launch/slurm.sbatch")):  # they run t2i-train trainer=$TRAINER "$@"
            env = dict(t.split("=", 1) for t in tokens[:i] if re.fullmatch(r"[A-Z_]+=\S*", t))
            return "train", [f"trainer={env.get('TRAINER', 'multinode')}", *tokens[i + 1:]]
    raise AssertionError(f"{cmd}: no t2i command found")


def overrides_of(program: str, args: list[str], cmd: DocCommand) -> list[str]:
    args = [a for a in args if a not in ("-m", "--multirun", "...", "…")]  # a bare "...": more overrides
    if program == "data" and args and "=" not in args[0]:
        args = [f"command={args[0]}", *args[1:]]  # t2i-data <command> ...
    if program == "knowledge" and args and "=" not in args[0]:
        args = [f"command={args[0]}", *args[1:]]  # t2i-knowledge <command> ...
    if program == "import" and args and "=" not in args[0]:
        args = [f"source={args[0]}", *args[1:]]  # t2i-import <source> ...
    flags = [a for a in args if "=" not in a]
    assert not flags, f"{cmd}: arguments that are not key=value overrides: {flags}"
    return args


def sweep_variants(overrides: list[str]) -> list[list[str]]:
    """One override list per swept value (the other sweeps at their first value); no sweep: the list itself."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    sweeps = [i for i, o in enumerate(parsed) if o.is_sweep_override()]
    if not sweeps:
        return [overrides]
    first = {i: next(iter(parsed[i].sweep_string_iterator())) for i in sweeps}

    def line(i, value):
        return f"{parsed[i].get_key_element()}={value}"

    variants = []
    for i in sweeps:
        for value in parsed[i].sweep_string_iterator():
            variants.append([line(j, value if j == i else first[j]) if j in sweeps else overrides[j]
                             for j in range(len(overrides))])
    return variants


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([a-zA-Z][\w-]*):", text, flags=re.M))


def check(cmd: DocCommand) -> None:
    program, args = parse(cmd)
    if program == "make":
        assert args and args[0] in make_targets(), f"{cmd}: no such make target (Makefile: {sorted(make_targets())})"
        return
    if program == "sweep-report":
        import t2i.cli.sweep_report as sr

        seen = []
        real, sr.report = sr.report, lambda *a: seen.append(a)
        try:
            sr.main(args)
        finally:
            sr.report = real
        assert seen, f"{cmd}: not accepted by t2i-sweep-report's parser"
        return
    assert program in CONFIG_OF.values(), f"{cmd}: unknown command {program}"
    overrides = overrides_of(program, args, cmd)
    variant = overrides
    try:
        for variant in sweep_variants(overrides):
            cfg = compose(program, overrides=variant, return_hydra_config=True)
            if program == "train" and any(v.startswith("experiment=") for v in variant):
                assert cfg.get("model") is not None, "the experiment selects no model"
    except Exception as exc:  # noqa: BLE001 - re-raised with the command that failed
        raise AssertionError(f"{cmd}\n  does not compose as written ({program}.yaml, overrides {variant}):\n"
                             f"  {type(exc).__name__}: {exc}") from exc


COMMANDS = all_commands()


@pytest.fixture(scope="module", autouse=True)
def hydra_conf():
    GlobalHydra.instance().clear()
    with initialize_config_module("t2i.conf", version_base="1.3"):
        yield


def test_the_docs_have_commands_from_every_source():
    wheres = {c.where.split(":")[0] for c in COMMANDS}
    assert len(COMMANDS) >= MIN_COMMANDS, f"only {len(COMMANDS)} commands found"
    assert "README.md" in wheres
    assert {"docs/data.md", "docs/training.md", "docs/generate.md", "docs/eval.md"} <= wheres
    assert any(w.startswith("experiments/") for w in wheres)
    assert any(w.startswith("conf/") and w.endswith(".yaml") for w in wheres)
    assert any(w.startswith("t2i/cli/") for w in wheres)


@pytest.mark.parametrize("cmd", COMMANDS, ids=[c.where for c in COMMANDS])
def test_doc_command_composes(cmd: DocCommand):
    check(cmd)


def test_the_checker_catches_what_used_to_be_wrong():
    """The two known mistakes fail the check (so the test above can fail)."""
    with pytest.raises(AssertionError, match="does not compose"):
        check(DocCommand("x:1", "t2i-train -m experiment=shapes_transformer model.attention=full,dalle"))
    with pytest.raises(AssertionError, match="does not compose"):
        check(DocCommand("x:1", "t2i-generate ckpt=a.ckpt prompts='[一个大的红色圆形在左上角]' num_samples=8"))
    with pytest.raises(AssertionError, match="no such make target"):
        check(DocCommand("x:1", "make nonsense"))
    check(DocCommand("x:1", "t2i-train -m experiment=shapes_transformer model.model.attention=full,dalle"))


def run_for_real(cmd: DocCommand, extra: list[str] = ()) -> dict:
    """Run a ``t2i-data`` command of the docs in-process, as written (plus ``extra`` size overrides)."""
    from t2i.cli.data import run

    program, args = parse(cmd)
    assert program == "data", cmd
    return run(compose("data", overrides=[*overrides_of(program, args, cmd), *extra]))


def find(where: str, text: str) -> DocCommand:
    hits = [c for c in COMMANDS if c.where.startswith(where) and c.text.startswith(text)]
    assert len(hits) == 1, f"{text!r} in {where}: {len(hits)} matches"
    return hits[0]


def test_recipe_and_data_commands_run_for_real(tmp_path, monkeypatch):
    """The recipe's data step and the t2i-data examples, run as written in a scratch folder on tiny data."""
    import tarfile

    from t2i.data.shapes import iter_split, png_base64

    monkeypatch.chdir(tmp_path)
    easynlp = tmp_path / "data" / "muge_easynlp"
    easynlp.mkdir(parents=True)
    for split, n in (("train", 12), ("val", 4)):
        rows = [f"{s.key}\t{s.caption}\t{png_base64(s.image)}\n" for s in iter_split(split, n, 0, 32)]
        (easynlp / f"T2I_{split}.tsv").write_text("".join(rows), encoding="utf-8")

    for text in ("t2i-data convert source=easynlp_tsv input=data/muge_easynlp/T2I_train.tsv",
                 "t2i-data convert source=easynlp_tsv input=data/muge_easynlp/T2I_val.tsv",
                 "t2i-data tokenizer input=data/muge_easynlp/T2I_train.tsv"):
        run_for_real(find("README.md", text), ["progress=false"] if "convert" in text else [])
    for split, n in (("train", 12), ("val", 4)):
        with tarfile.open(next((tmp_path / "data" / "shards" / "muge" / split).glob("*.tar"))) as tar:
            assert sum(m.name.endswith(".txt") for m in tar.getmembers()) == n
    assert (tmp_path / "data" / "shards" / "muge" / "tokenizer.json").is_file()

    # the t2i-data page: Shapes -> its tokenizer -> shards -> inspect (Shapes at a tiny size)
    run_for_real(find("docs/data.md", "t2i-data shapes output=data/shapes"),
                 ["n_train=24", "n_val=4", "n_test=4", "n_compositional=4", "progress=false"])
    (tmp_path / "data" / "T2I_train.tsv").write_text((tmp_path / "data/shapes/shapes_train.tsv").read_text())
    run_for_real(find("docs/data.md", "t2i-data convert source=easynlp_tsv input=data/T2I_train.tsv"), ["progress=false"])
    run_for_real(find("docs/data.md", "t2i-data tokenizer input=data/shapes/shapes_train.tsv"))
    report = run_for_real(find("docs/data.md", "t2i-data inspect source=wds"))
    assert report["images"] == 24 and report["tokens_max"] > 0 and Path(report["preview"]).is_file()
