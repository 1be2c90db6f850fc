"""Every documented key of every command, given the inputs a new user gets wrong (issue 30, last bullet).

The table is built from the configs themselves: each leaf key of ``t2i/conf/<command>.yaml`` (and of the
default ``eval=`` protocol, for ``t2i-eval``) must have an entry in :data:`KEYS`, which gives its kind; a key
the table does not classify fails :func:`test_every_documented_key_is_classified`. Each kind has its bad
values (:data:`BAD`: a wrong type, empty, zero, negative, NaN / inf, a folder where a file is expected, a file
where a folder is expected, a missing path, non-UTF-8 text); an entry may accept some of them (with the
reason). For each (key, bad value) the command run in-process on an otherwise valid, cheap config must raise
a :class:`~t2i.errors.T2IError` (nothing else) whose message is one line naming the key, and leave no file in
its output folder. A few subprocess checks confirm the real commands print exactly one ``error:`` line and
exit 1.
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf, open_dict

from t2i.cli.common import user_error

CONF = Path(__file__).resolve().parents[1] / "t2i" / "conf"

# -- the bad values of each kind ------------------------------------------------------------------------------
# Path placeholders, replaced per test: @dir an existing folder (with a file in it), @file an existing UTF-8 text
# file, @missing a path that does not exist, @binary an existing file that is not UTF-8 text.
NUMBER = {"type": "abc", "list": "[1,2]", "empty": "''", "nan": "nan", "inf": "inf", "-inf": "-inf"}
INTEGER = {**NUMBER, "float": "1.5"}
BAD = {
    "count": {**INTEGER, "zero": "0", "negative": "-1"},                 # an integer >= 1
    "count0": {**INTEGER, "negative": "-1"},                             # an integer >= 0
    "seed": INTEGER,                                                     # any integer (negative ones seed too)
    "fraction": {**NUMBER, "negative": "-0.5", "above": "1.5"},          # a number in [0, 1]
    "prob": {**NUMBER, "zero": "0", "negative": "-0.5", "above": "1.5"},  # a number in (0, 1]
    "positive": {**NUMBER, "zero": "0", "negative": "-1"},               # a number > 0
    "nonneg": {**NUMBER, "negative": "-1"},                              # a number >= 0
    "finite": NUMBER,                                                    # any finite number
    "bool": {"type": "abc", "list": "[1,2]", "empty": "''", "number": "2"},
    "choice": {"type": "no_such_choice", "list": "[1,2]", "empty": "''"},
    "text": {"list": "[1,2]", "empty": "''"},                            # a non-empty string
    "device": {"type": "abc", "list": "[1,2]", "empty": "''", "index": "cuda:x"},
    "file": {"folder": "@dir", "missing": "@missing", "empty": "''", "list": "[1,2]"},
    "ckpt": {"folder": "@dir", "missing": "@missing", "empty": "''", "list": "[1,2]", "corrupt": "@binary"},
    "text_file": {"folder": "@dir", "missing": "@missing", "empty": "''", "list": "[1,2]", "binary": "@binary"},
    "folder": {"file": "@file", "missing": "@missing", "empty": "''", "list": "[1,2]"},
    "path": {"missing": "@missing", "empty": "''", "list": "[1,2]"},    # a file or a folder
    "out_folder": {"file": "@file", "empty": "''", "list": "[1,2]"},
    "out_file": {"folder": "@dir", "empty": "''", "list": "[1,2]"},
}
OPTIONAL_PATH = "'' clears an optional path, as null does"

# -- the reviewed table: key -> (kind, {bad value accepted: reason}) -------------------------------------------
# A key used by one sub-command only is tried with it (VARIANT); "skip" keys are not user input.
SKIP = "skip"


def k(kind, **accepted):
    return kind, accepted


def opt(kind, **accepted):
    """An optional key (default null): for paths and texts '' means unset."""
    if kind in ("file", "text_file", "folder", "path", "text"):
        accepted.setdefault("empty", OPTIONAL_PATH)
    return kind, accepted


KEYS: dict[str, dict[str, tuple]] = {
    "generate": {
        "task_name": k(SKIP), "ckpt": k("ckpt"), "prompts": k("prompts"), "prompts_file": opt("text_file"),
        "allow_unk": k("bool"), "num_samples": k("count"), "batch_size": k("count"), "top_k": k("count"),
        "top_p": k("prob"), "temperature": k("nonneg"), "cfg_scale": k("finite"), "use_cache": k("bool"),
        "ema": k("bool"), "seed": k("seed"), "device": k("device"), "image_tokenizer": opt("file"),
        "text_tokenizer": opt("text_file"), "output": k("out_folder"), "progress": k("bool"),
        "rerank.backend": k("choice"), "rerank.combine": k("choice", empty="'' is no combination, as null"),
        "rerank.ckpt": opt("file"), "rerank.model_name": opt("text"), "rerank.top": k("count"),
        "sr.ckpt": opt("file"), "sr.scale": k("scale"), "sr.tile": k("count0"), "sr.tile_pad": k("count0"),
        "dtype": k("choice"), "decode_dtype": k("choice"),
    },
    "caption": {
        "task_name": k(SKIP), "ckpt": k("ckpt"), "images": k("images"), "num_images": k("count"), "lang": k("choice"),
        "caption.method": k("choice"), "caption.beam_size": k("count"), "caption.length_penalty": k("finite"),
        "caption.top_k": k("count"), "caption.top_p": k("prob"), "caption.temperature": k("nonneg"),
        "caption.use_cache": k("bool"), "batch_size": k("count"), "seed": k("seed"), "device": k("device"),
        "ema": k("bool"), "image_tokenizer": opt("file"), "text_tokenizer": opt("text_file"),
        "output": k("out_folder"), "progress": k("bool"),
    },
    "eval": {
        "task_name": k(SKIP), "ckpt": k("ckpt"), "tokenizer_ckpt": opt("file"), "image_tokenizer": opt("file"),
        "text_tokenizer": opt("text_file"), "ema": k("bool"), "clip.ckpt": opt("file"), "clip.backend": k("choice"),
        "clip.model_name": opt("text"), "rerank.backend": k("choice"),
        "rerank.combine": k("choice", empty="'' is no combination, as null"),
        "sample.top_k": k("count"), "sample.top_p": k("prob"), "sample.temperature": k("nonneg"),
        "sample.cfg_scale": k("finite"), "sample.use_cache": k("bool"),
        "metrics.extractor": k("choice", empty="'' is no extractor, as null"),
        "metrics.feature_extractor_weights_path": opt("file"), "metrics.inception_score": k("bool"),
        "metrics.is_extractor": k(SKIP), "metrics.is_splits": k("count"), "metrics.clip_score": k("bool"),
        "metrics.fd_clip": k("bool"), "metrics.lpips": k("bool"), "metrics.vgg_path": opt("file"),
        "metrics.cache_dir": k("out_folder", empty="'' is no cache, as null"), "batch_size": k("count"),
        "autocast": k("choice", empty="'' is float32, as null"), "seed": k("seed"), "device": k("device"),
        "output": k("out_folder"), "progress": k("bool"),
        "eval.name": k(SKIP), "eval.kind": k("choice"), "eval.splits": k("splits"), "eval.num_captions": k("count"),
        "eval.caption_seed": k("seed"), "eval.lang": k("choice"), "eval.num_candidates": k("count"),
        "eval.anchors": k(SKIP),
    },
    "synthesize": {
        "task_name": k(SKIP), "ckpt": k("ckpt"), "maps": k("folder"), "instances": opt("folder"), "limit": k("count"),
        "style": k("style"), "num_styles": k("count"), "batch_size": k("count"), "max_bad_fraction": k("fraction"),
        "grid_maps": k("count0"), "seed": k("seed"), "device": k("device"),
        "output": k("out_folder"), "progress": k("bool"),
    },
    "tokenize": {
        "task_name": k(SKIP), "seed": k("seed"), "tokenizer_ckpt": k("ckpt"), "tokenizer_kind": k("choice"),
        "tokenizer_config": opt("text_file"), "tokenizer_decoder": opt("file"), "output": k("out_folder"),
        "split": k("choice"), "batch_size": k("count"), "num_workers": k("count0"), "device": k("device"),
        "shard_size": k("count"), "resume": k("bool"), "overwrite": k("bool"), "progress": k("bool"),
    },
    "data": {
        "command": k(SKIP), "source": k("choice"), "input": k("path"), "output": k("out_folder"),
        "max_bad_fraction": k("fraction"), "progress": k("bool"), "split": opt("text"), "image_dir": opt("folder"),
        "caption_file": opt("text_file"), "require_images": k("bool"), "bert_vocab": opt("text_file"),
        "shard_size": k("count"), "prefix": k("text"), "knowledge.lexicon": opt("text_file"),
        "knowledge.max_entities": k("count"), "overwrite": k("bool"),
        "n_train": k("count"), "n_val": k("count0"), "n_test": k("count0"), "n_compositional": k("count0"),
        "image_size": k("count"), "lang": k("choice"), "seed": k("seed"),
        "n_kg_heldout": k("count0"), "n_seen": k("count"), "n_heldout": k("count0"),
        "object_fraction": k("fraction"), "kg_vocab_size": k("count0"),
        "min_objects": k("count"), "max_objects": k("count"), "sizes": k("sizes"),
        "vocab_size": k("count"), "tokenizer_model": k("choice"), "text_column": k("count0"),
        "min_frequency": k("count"),
        "filter.min_side": k("count0"), "filter.max_aspect": k("ratio"), "filter.min_caption_len": k("count0"),
        "filter.max_caption_len": k("count"), "filter.clip.ckpt": opt("file"), "filter.clip.backend": k("choice"),
        "filter.clip.model_name": opt("text"), "filter.clip.threshold": k("finite"),
        "filter.clip.image_size": k("count"), "filter.clip.batch_size": k("count"),
        "tokenizer": opt("text_file"), "text_len": k("count"), "n_preview": k("count0"),
    },
    "import": {
        "task_name": k(SKIP), "source": k("choice"), "input": k("file"), "output": k("out_file"),
        "trust_pickle": k("bool"), "vocab": opt("text_file"), "text_len": k("count"), "vqgan_config": opt("text_file"),
        "image_tokenizer": opt("file"), "entities": opt("text_file"), "vectors": opt("file"),
        "tokenizer": opt("file"), "vae": opt("file"), "vae_config": opt("text_file"), "n_head": k("count"),
        "version": k("choice"), "scale": k("scale"), "config": opt("text_file"), "decoder": opt("file"),
    },
    "knowledge": {
        "command": k(SKIP), "triples": k("text_file"), "output": k("out_folder"), "kg_model": k("choice"),
        "dim": k("count"), "epochs": k("count"), "batch_size": k("count"), "lr": k("positive"),
        "num_negs": k("count"), "seed": k("seed"), "heldout": k("fraction", above="must be < 1, checked below"),
        "lexicon": opt("text_file"), "device": k("device"), "progress": k("bool"), "vectors": k("file"),
        "entities": k("entities"), "neighbours": k("count"), "n_show": k("count"),
    },
}

# kinds that are one key's own
BAD.update({
    "prompts": {"dict": "'{a: 1}'", "empty": "''", "blank": "'[\" \"]'"},
    "images": {"missing": "@missing", "empty": "''", "list": "'[1,2]'", "no_images": "@dir"},
    "scale": {"type": "abc", "list": "[1,2]", "empty": "''", "zero": "0", "negative": "-1", "three": "3", "nan": "nan"},
    "splits": {"type": "test", "empty": "[]", "unknown": "[validation]"},
    "style": {"missing": "@missing", "file": "@file", "list": "[1,2]"},
    "sizes": {"type": "huge", "empty": "[]", "unknown": "[huge]", "list": "[[1]]"},
    "ratio": {**NUMBER, "zero": "0", "below": "0.5"},  # an aspect ratio >= 1
    "entities": {"list": "'[[1]]'", "empty": "''"},
})
# the sub-command a key belongs to (its first user), and the source for t2i-import
VARIANT = {
    "data": {
        **{key: "shapes" for key in ("n_train", "n_val", "n_test", "n_compositional", "image_size", "lang", "seed")},
        **{key: "shapes_kg" for key in ("n_kg_heldout", "n_seen", "n_heldout", "object_fraction", "kg_vocab_size")},
        **{key: "shapes_layout" for key in ("min_objects", "max_objects", "sizes")},
        **{key: "tokenizer" for key in ("vocab_size", "tokenizer_model", "text_column", "min_frequency")},
        **{key: "inspect" for key in ("tokenizer", "text_len", "n_preview")},
        **{key: "filter" for key in KEYS["data"] if key.startswith("filter.")},
    },
    "import": {
        **{key: "easynlp" for key in ("vocab", "text_len", "vqgan_config", "image_tokenizer", "entities", "vectors")},
        **{key: "rudalle" for key in ("tokenizer", "vae", "vae_config", "n_head", "version")},
        "scale": "realesrgan", "config": "taming", "decoder": "openai",
    },
    "knowledge": {key: "inspect" for key in ("vectors", "entities", "neighbours", "n_show")},
}
DEFAULT_VARIANT = {"data": "convert", "import": "realesrgan", "knowledge": "train"}
MODULE = {"generate": "generate", "caption": "caption", "eval": "evaluate", "synthesize": "synthesize",
          "tokenize": "tokenize", "data": "data", "import": "importer", "knowledge": "knowledge"}
# Known defects in files reserved to another change (t2i/cli/evaluate.py, t2i/cli/synthesize.py, t2i/eval/*): these
# cases are not run (each would load models or run a protocol); reported for the restructuring. Remove an entry
# once its key is checked up front.
BOOL_ALL, INT_ALL = ["empty", "list", "number", "type"], ["-inf", "empty", "float", "inf", "list", "nan", "type"]
PATH_ALL = ["folder", "list", "missing"]
RESERVED_DEFECTS: dict[str, dict[str, list[str]]] = {}  # cases known to fail, marked xfail (none left)
RESOLVED = {"generate", "caption", "eval"}  # their main() resolves the config before run()


def leaves(node, prefix=""):
    for key, value in node.items():
        if key in ("defaults", "hydra"):
            continue
        full = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from leaves(value, full + ".")
        else:
            yield full


def documented_keys(name: str) -> list[str]:
    def load(path):
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)

    keys = list(leaves(load(CONF / f"{name}.yaml")))
    if name == "eval":
        keys += [f"eval.{x}" for x in leaves(load(CONF / "eval" / "shapes.yaml"))]
    return keys


def test_every_documented_key_is_classified():
    for name, table in KEYS.items():
        keys = documented_keys(name)
        assert sorted(set(keys) - set(table)) == [], f"{name}.yaml keys missing from KEYS[{name!r}]: classify them"
        assert sorted(set(table) - set(keys)) == [], f"KEYS[{name!r}] names keys {name}.yaml no longer has"
        for key, (kind, accepted) in table.items():
            assert kind == SKIP or kind in BAD, (name, key, kind)
            assert set(accepted) <= set(BAD.get(kind, {})), (name, key, accepted)


def cases():
    out = []
    for name, table in KEYS.items():
        for key, (kind, accepted) in table.items():
            if kind == SKIP:
                continue
            for label, value in BAD[kind].items():
                if label in accepted:
                    continue
                marks = ([pytest.mark.xfail(reason=f"t2i-{name}: known defect in a reserved file", run=False)]
                         if label in RESERVED_DEFECTS.get(name, {}).get(key, ()) else [])
                out.append(pytest.param(name, key, value, id=f"{name}-{key}-{label}", marks=marks))
    return out


# -- valid, cheap configs to spoil one key of ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from PIL import Image

    from t2i.data.layouts import write_shapes_layout
    from tests.tiny_pipeline import captions, text_tokenizer, write_checkpoints
    from tests.toy_tokenizer import save_checkpoint

    root = tmp_path_factory.mktemp("bad_inputs")
    tok = text_tokenizer()
    w = {"root": root, **{k_: str(v) for k_, v in write_checkpoints(tok, root / "ckpt").items()}}
    (root / "images").mkdir()
    for i, color in enumerate(((200, 30, 30), (30, 30, 200))):
        Image.new("RGB", (24, 24), color).save(root / "images" / f"im{i}.png")
    w["images"] = str(root / "images")
    w["caption"] = captions(1)[0]
    save_checkpoint(root / "pool.ckpt")
    w["pool"] = str(root / "pool.ckpt")
    write_shapes_layout(root / "layout", n_train=1, n_val=1, n_test=2, image_size=32, progress=False)
    w["maps"] = str(root / "layout" / "test" / "labels")
    (root / "spade.ckpt").write_bytes(b"not a checkpoint")
    w["spade"] = str(root / "spade.ckpt")
    # a 2-row EasyNLP TSV (id, caption, base64 PNG)
    import base64
    import io

    rows = []
    for i, cap in enumerate(captions(2)):
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (40 * i, 80, 120)).save(buf, format="PNG")
        rows.append(f"{i}\t{cap}\t{base64.b64encode(buf.getvalue()).decode()}")
    (root / "pairs.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    w["tsv"] = str(root / "pairs.tsv")
    tok.save(root / "tokenizer.json")
    w["tokenizer"] = str(root / "tokenizer.json")
    names = ["红圆", "蓝方", "绿三角", "黄星"]
    (root / "triples.tsv").write_text("".join(f"{a}\tnear\t{b}\n" for a, b in zip(names, names[1:] + names[:1])),
                                      encoding="utf-8")
    w["triples"] = str(root / "triples.tsv")
    (root / "entity2id.txt").write_text(f"{len(names)}\n" + "".join(f"{n}\t{i}\n" for i, n in enumerate(names)),
                                        encoding="utf-8")
    w["lexicon"] = str(root / "entity2id.txt")
    torch.save(torch.randn(len(names), 4), root / "entity2vec.pt")
    w["vectors"] = str(root / "entity2vec.pt")
    (root / "weights.pth").write_bytes(b"not weights")
    w["weights"] = str(root / "weights.pth")
    (root / "a_dir").mkdir()
    (root / "a_dir" / "note.txt").write_text("x", encoding="utf-8")
    (root / "plain.txt").write_text("一个圆\n", encoding="utf-8")
    (root / "binary.txt").write_bytes(b"ok\n\xff\xfe\x00\x9c bad\n")
    return w


def variant_of(name: str, key: str) -> str | None:
    return VARIANT.get(name, {}).get(key, DEFAULT_VARIANT.get(name))


def base(name: str, variant: str | None, w: dict) -> list[str]:
    """The overrides of a valid run of ``name`` (``variant``: its sub-command); ``@out`` is the output folder."""
    out = "@out"
    logs = [f"paths.log_dir={w['root']}/logs"]
    if name == "generate":
        return [*logs, f"ckpt={w['transformer']}", f"prompts=['{w['caption']}']", "num_samples=1",
                "batch_size=1", f"output={out}", "progress=false"]
    if name == "caption":
        return [*logs, f"ckpt={w['transformer']}", f"images={w['images']}", f"output={out}",
                "progress=false", "caption.method=greedy"]
    if name == "eval":
        return [*logs, "eval=shapes", f"ckpt={w['transformer']}", f"clip.ckpt={w['clip']}",
                "eval.num_captions=2", "eval.num_candidates=1", "metrics.extractor=null",
                        "metrics.inception_score=false", f"output={out}", "progress=false", "device=cpu"]
    if name == "synthesize":
        return [*logs, f"ckpt={w['spade']}", f"maps={w['maps']}", f"output={out}", "progress=false"]
    if name == "tokenize":
        return [*logs, f"paths.data_dir={w['root']}/data", f"tokenizer_ckpt={w['pool']}", f"output={out}",
                "progress=false", "num_workers=0", "batch_size=8", "data.shapes.n_train=8",
                "data.shapes.n_val=2", "data.shapes.n_test=2", "data.shapes.n_compositional=2", "data.image_size=16"]
    if name == "data":
        over = [*logs, f"command={variant}", "progress=false"]
        if variant in ("shapes", "shapes_kg", "shapes_layout"):
            return [*over, f"output={out}", "n_train=4", "n_val=2", "n_test=2", "n_compositional=2",
                    "n_kg_heldout=2", "image_size=32", "kg_vocab_size=0"]
        if variant == "tokenizer":
            return [*over, f"input={w['tsv']}", f"output={out}/tokenizer.json", "vocab_size=100"]
        if variant == "inspect":
            return [*over, f"input={w['tsv']}", f"output={out}", f"tokenizer={w['tokenizer']}"]
        return [*over, f"input={w['tsv']}", f"output={out}", "max_bad_fraction=0"]
    if name == "import":
        return [*logs, f"source={variant}", f"input={w['weights']}", f"output={out}/model.ckpt"]
    if name == "knowledge":
        if variant == "inspect":
            return [*logs, "command=inspect", f"lexicon={w['lexicon']}", f"vectors={w['vectors']}"]
        return [*logs, "command=train", f"triples={w['triples']}", f"output={out}", "epochs=1", "dim=4",
                "batch_size=4", "heldout=0", "progress=false"]
    raise AssertionError(name)


def fill(value: str, w: dict) -> str:
    root = w["root"]
    return (value.replace("@dir", str(root / "a_dir")).replace("@file", str(root / "plain.txt"))
            .replace("@missing", str(root / "no_such_thing")).replace("@binary", str(root / "binary.txt")))


def names_key(message: str, key: str) -> bool:
    return re.search(rf"(?<![\w.]){re.escape(key)}(?=[=\s:\[`'\"]|$)", message) is not None


@pytest.fixture(scope="module")
def hydra_init():
    with initialize_config_module("t2i.conf", version_base="1.3"):
        yield


_BASES: dict = {}
PARSER = OverridesParser.create()


@pytest.fixture(scope="module", autouse=True)
def _forget_hydra_config():
    """``spoiled`` sets HydraConfig as @hydra.main does; later test modules must not see it."""
    yield
    HydraConfig.instance().cfg = None


def spoiled(name: str, key: str, value: str, w: dict, out: Path):
    """The base config of ``name`` (composed once per sub-command) with ``key=value`` as Hydra parses it."""
    variant = variant_of(name, key)
    if (name, variant) not in _BASES:
        overrides = base(name, variant, w)
        cfg = compose(name, overrides=[o.replace("@out", "/nonexistent/out") for o in overrides],
                      return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)  # as @hydra.main does: ${hydra:...} resolves
        with open_dict(cfg):
            del cfg["hydra"]
        outs = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in overrides if "@out" in o}
        _BASES[name, variant] = cfg, outs
    cfg, outs = _BASES[name, variant]
    cfg = copy.deepcopy(cfg)
    for k_, v in outs.items():
        OmegaConf.update(cfg, k_, v.replace("@out", str(out)), merge=False)
    OmegaConf.update(cfg, key, PARSER.parse_override(f"{key}={value}").value(), merge=False)
    return cfg


@pytest.mark.parametrize("name, key, value", cases())
def test_a_bad_value_is_one_line_naming_the_key(hydra_init, world, tmp_path, name, key, value):
    import importlib

    out = tmp_path / "out"
    cfg = spoiled(name, key, fill(value, world), world, out)
    run = importlib.import_module(f"t2i.cli.{MODULE[name]}").run
    try:
        if name in RESOLVED:
            OmegaConf.resolve(cfg)
        run(cfg)
    except Exception as exc:  # noqa: BLE001 (which exception it is, is the point)
        err = user_error(exc)
        assert err is not None, f"{key}={value}: {type(exc).__name__}: {exc}"
        message = str(err)
    else:
        raise AssertionError(f"{key}={value} was accepted")
    assert "\n" not in message.strip(), message
    assert names_key(message, key), f"{key}={value}: the message does not name {key}: {message}"
    left = [p for p in out.rglob("*") if p.is_file()] if out.is_dir() else []
    assert left == [], f"{key}={value} left {left}"


# -- the real commands: exactly one `error:` line and exit status 1 ---------------------------------------------
@pytest.mark.parametrize("module, args, key", [
    ("generate", ["ckpt=@missing", "prompts=[a]", "num_samples=abc"], "num_samples"),
    ("data", ["shapes", "output=@out", "n_train=-1"], "n_train"),
    ("knowledge", ["train", "triples=@binary", "output=@out"], "triples"),
    ("importer", ["realesrgan", "input=@dir", "output=@out/m.ckpt"], "input"),
    ("tokenize", ["tokenizer_ckpt=@pool", "output=@out", "shard_size=nan"], "shard_size"),
])
def test_the_command_prints_one_error_line_and_exits_1(world, tmp_path, module, args, key):
    args = [fill(a, world).replace("@out", str(tmp_path / "out")).replace("@pool", world["pool"]) for a in args]
    res = subprocess.run([sys.executable, "-c", f"from t2i.cli.{module} import main; main()", *args,
                          f"hydra.run.dir={tmp_path}/h"], capture_output=True, text=True)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert names_key(lines[0], key), lines[0]
    assert not (tmp_path / "out").exists() or not any(p.is_file() for p in (tmp_path / "out").rglob("*"))
