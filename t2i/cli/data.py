"""t2i-data: build Shapes, convert datasets to shards, train the text tokenizer, inspect a dataset.

    t2i-data shapes output=data/shapes n_train=5000 image_size=64 lang=zh
    t2i-data shapes_kg output=data/shapes_kg_64_zh n_train=5000 n_kg_heldout=500 object_fraction=0.5
    t2i-data shapes_layout output=data/shapes_layout_32 image_size=32 n_train=5000 max_objects=3
    t2i-data convert source=muge input=data/muge split=train output=data/muge_shards/train
    t2i-data tokenizer input=data/shapes/shapes_train.tsv output=data/shapes/tokenizer.json vocab_size=1000
    t2i-data inspect source=wds input='data/muge_shards/train/*.tar' tokenizer=data/tok.json
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from t2i import checks
from t2i.cli.common import clear_errors, first_word_as
from t2i.data.skips import BadSample, DataError, SkipLog

log = logging.getLogger("t2i.data")
COMMANDS = ("shapes", "shapes_kg", "shapes_layout", "convert", "tokenizer", "inspect", "filter")


def _sizes(key, value):
    from t2i.data.shapes import SIZES

    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v in SIZES for v in value):
        raise DataError(f"{key}={checks.show(value)} must be a non-empty list of Shapes sizes, e.g. {key}=[small, "
                        f"large] ({', '.join(SIZES)})")


def _texts(key, value):
    """A file name, or a list of them (the tokenizer trains on several)."""
    values = value if isinstance(value, list) else [value]
    for v in values:
        checks.file(utf8=True, what="caption text or TSV file")(key, v)


CLIP_BACKENDS = ("t2i", "open_clip", "cn_clip")
# every key of conf/data.yaml: types and ranges for every command, paths where the command reads them
KEYS = {
    "max_bad_fraction": checks.fraction(), "progress": checks.boolean(), "split": checks.text(optional=True),
    "image_dir": checks.folder(optional=True), "caption_file": checks.file(optional=True, utf8=True),
    "require_images": checks.boolean(), "bert_vocab": checks.file(optional=True, utf8=True, what="vocab.txt"),
    "shard_size": checks.count(), "prefix": checks.text(), "knowledge.max_entities": checks.count(),
    "knowledge.lexicon": checks.file(optional=True, utf8=True, what="entity file"), "overwrite": checks.boolean(),
    "n_train": checks.count(), "n_val": checks.count(0), "n_test": checks.count(0), "n_compositional": checks.count(0),
    "image_size": checks.count(), "lang": checks.choice("zh", "en"), "seed": checks.integer(),
    "n_kg_heldout": checks.count(0), "n_seen": checks.count(), "n_heldout": checks.count(0),
    "object_fraction": checks.fraction(), "kg_vocab_size": checks.count(0), "min_objects": checks.count(),
    "max_objects": checks.count(), "sizes": _sizes, "vocab_size": checks.count(),
    "tokenizer_model": checks.choice("wordpiece", "bpe"), "text_column": checks.count(0, optional=True),
    "min_frequency": checks.count(), "filter.min_side": checks.count(0),
    "filter.max_aspect": checks.number(1, optional=True), "filter.min_caption_len": checks.count(0),
    "filter.max_caption_len": checks.count(optional=True), "filter.clip.ckpt": checks.file(optional=True),
    "filter.clip.backend": checks.choice(*CLIP_BACKENDS), "filter.clip.model_name": checks.text(optional=True),
    "filter.clip.threshold": checks.number(optional=True), "filter.clip.image_size": checks.count(),
    "filter.clip.batch_size": checks.count(), "tokenizer": checks.file(optional=True, utf8=True, what="tokenizer.json"),
    "text_len": checks.count(), "n_preview": checks.count(0),
}
INPUT = {"convert": checks.path(globs=True), "inspect": checks.path(globs=True), "filter": checks.path(globs=True),
         "tokenizer": _texts}
OUTPUT = {"tokenizer": checks.output_file(what="tokenizer.json to write"),
          "inspect": checks.output_folder(optional=True, what="folder for the preview")}


def check_config(cfg: DictConfig) -> None:
    """One error naming the first key that cannot work, before anything is read or written."""
    from t2i.data.formats import SOURCES

    checks.check_keys(cfg, {"source": checks.choice(*SOURCES), **KEYS})
    if cfg.command == "shapes_layout" and not cfg.min_objects <= cfg.max_objects <= 9:
        raise DataError(f"max_objects={cfg.max_objects} must be in [min_objects={cfg.min_objects}, 9] (one object "
                        "per 3x3 cell)")
    if cfg.command in INPUT and cfg.get("input") not in (None, ""):
        checks.check_keys(cfg, {"input": INPUT[cfg.command]})
    if cfg.get("output") not in (None, ""):
        checks.check_keys(cfg, {"output": OUTPUT.get(cfg.command, checks.output_folder())})


def need(cfg: DictConfig, key: str):
    if cfg.get(key) in (None, ""):
        raise DataError(f"t2i-data {cfg.command}: `{key}=...` is required")
    return cfg[key]


def reader_kwargs(cfg: DictConfig) -> dict:
    """Reader options that apply to ``cfg.source`` (only the ones the user set)."""
    keys = {
        "easynlp_tsv": ("require_images",),
        "easynlp_knowledge_tsv": ("require_images", "bert_vocab"),
        "muge": ("split", "require_images"),
        "coco_cn": ("split", "image_dir", "caption_file"),
    }.get(cfg.source, ())
    return {k: cfg[k] for k in keys if cfg.get(k) is not None}


def open_input(cfg: DictConfig):
    from t2i.data.formats import open_source

    source = open_source(cfg.source, need(cfg, "input"), key="input", **reader_kwargs(cfg))
    source.log.key = "max_bad_fraction"  # its refusal names this command's key, not the training configs' one
    return source


def cmd_shapes(cfg: DictConfig) -> dict:
    from t2i.data.shapes import write_shapes

    paths = write_shapes(
        need(cfg, "output"), n_train=cfg.n_train, n_val=cfg.n_val, n_test=cfg.n_test,
        n_compositional=cfg.n_compositional, image_size=cfg.image_size, lang=cfg.lang,
        seed=cfg.seed, progress=cfg.progress,
    )
    print(f"shapes: wrote {cfg.output} ({cfg.n_train}/{cfg.n_val}/{cfg.n_test}/{cfg.n_compositional} "
          f"train/val/test/compositional at {cfg.image_size}px, lang={cfg.lang})")
    return {"paths": paths, "oracle_test": check_oracle(Path(cfg.output), "test")}


def cmd_shapes_kg(cfg: DictConfig) -> dict:
    """Shapes-KG (objects named in captions, their look in a knowledge graph) plus its text tokenizer,
    trained on the captions of *all* splits and every object name, so the held-out objects' characters are
    in its vocabulary (they are in no training caption)."""
    from t2i.data.shapes_kg import PREFIX, SPLITS, write_shapes_kg
    from t2i.data.tokenizer import train_tokenizer

    out = Path(need(cfg, "output"))
    paths = write_shapes_kg(
        out, n_train=cfg.n_train, n_val=cfg.n_val, n_test=cfg.n_test, n_kg_heldout=cfg.n_kg_heldout,
        image_size=cfg.image_size, lang=cfg.lang, seed=cfg.seed, n_seen=cfg.n_seen, n_heldout=cfg.n_heldout,
        object_fraction=cfg.object_fraction, progress=cfg.progress,
    )
    print(f"shapes_kg: wrote {out} ({cfg.n_train}/{cfg.n_val}/{cfg.n_test}/{cfg.n_kg_heldout} "
          f"train/val/test/kg_heldout at {cfg.image_size}px, lang={cfg.lang}, {cfg.n_seen} seen + "
          f"{cfg.n_heldout} held-out objects per colour-shape pair; triples.tsv, entity2id.txt)")
    if cfg.kg_vocab_size:
        paths["tokenizer"] = out / "tokenizer.json"
        train_tokenizer([out / f"{PREFIX}_{s}.tsv" for s in SPLITS] + [paths["object_names"]], paths["tokenizer"],
                        vocab_size=cfg.kg_vocab_size)
    return {"paths": paths, "oracle_test": check_oracle(out, "test", prefix=PREFIX)}


def cmd_shapes_layout(cfg: DictConfig) -> dict:
    """Shapes layouts (issue 21, SPADE): images with 1..max_objects objects and their class maps, checked with
    the layout oracle (it must read the written ground truth back)."""
    from t2i.data.layouts import write_shapes_layout
    from t2i.data.oracle import layout_accuracy

    out = Path(need(cfg, "output"))
    paths = write_shapes_layout(out, n_train=cfg.n_train, n_val=cfg.n_val, n_test=cfg.n_test,
                                image_size=cfg.image_size, seed=cfg.seed, min_objects=cfg.min_objects,
                                max_objects=cfg.max_objects, sizes=tuple(cfg.get("sizes") or ("large",)),
                                progress=cfg.progress)
    print(f"shapes_layout: wrote {out} ({cfg.n_train}/{cfg.n_val}/{cfg.n_test} train/val/test at {cfg.image_size}px, "
          f"{cfg.min_objects}-{cfg.max_objects} objects; <split>/images, <split>/labels, <split>/specs.jsonl)")
    import numpy as np
    from PIL import Image

    test = out / "test"
    stems = sorted(p.stem for p in (test / "images").glob("*.png"))[:200]
    result = {}
    if stems:
        images = [Image.open(test / "images" / f"{s}.png").convert("RGB") for s in stems]
        maps = [np.asarray(Image.open(test / "labels" / f"{s}.png")) for s in stems]
        result = layout_accuracy(images, maps)
        print(f"layout oracle on ground-truth test: all {result['all']:.3f} (objects {result['objects']:.3f}, "
              f"n={result['n']})")
        if result["all"] < ORACLE_MIN:
            print(f"warning: the layout oracle reads only {100 * result['all']:.1f}% of the ground-truth test "
                  f"layouts back (< {100 * ORACLE_MIN:.0f}%)", file=sys.stderr)
    return {"paths": paths, "oracle_test": result}


ORACLE_MIN = 0.99  # the oracle must read the written ground truth back at least this well


def check_oracle(root: Path, split: str, prefix: str = "shapes") -> dict:
    """Score the written ground truth with the oracle: the yardstick must read it back (>= 99%).

    Below that, or when samples cannot be read back, prints a warning to stderr (the data is
    still written); the result gets ``"unreadable"``: the samples that could not be read.
    """
    from t2i.data.formats import EasyNLPTSV
    from t2i.data.oracle import score
    from t2i.data.shapes import ShapeSpec

    specs = {}
    for line in (root / f"{prefix}_{split}.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        specs[row["key"]] = ShapeSpec.from_dict(row["spec"])
    src = EasyNLPTSV(root / f"{prefix}_{split}.tsv")
    slog = SkipLog(name=f"oracle check of {prefix}_{split}.tsv", key="max_bad_fraction")
    images, wanted = [], []
    for rec in src.records(slog):
        try:
            images.append(src.load(rec))
        except BadSample as e:
            slog.skip(e.reason, e.where)
            continue
        slog.ok()
        wanted.append(specs[rec.key])
    if slog.n_bad:
        print(f"warning: {slog.summary()}", file=sys.stderr)
    if not images:
        return {"unreadable": slog.n_bad} if slog.n_bad else {}
    result = score(images, wanted)
    result["unreadable"] = slog.n_bad
    print(f"oracle on ground-truth {split}: all {result['all']:.3f} (color {result['color']:.3f}, shape "
          f"{result['shape']:.3f}, position {result['position']:.3f}, size {result['size']:.3f}, n={result['n']})")
    if result["all"] < ORACLE_MIN:
        print(f"warning: the oracle reads only {100 * result['all']:.1f}% of the ground-truth {split} images "
              f"of {root} back (< {100 * ORACLE_MIN:.0f}%): its scores on this data are not trustworthy",
              file=sys.stderr)
    return result


def cmd_convert(cfg: DictConfig) -> dict:
    from t2i.data.shards import convert

    know = cfg.get("knowledge") or {}
    lexicon = None
    if know.get("lexicon"):
        from t2i.knowledge import EntityLexicon

        lexicon = EntityLexicon.from_file(know["lexicon"], key="knowledge.lexicon")
        print(f"knowledge: linking captions with {lexicon} from {know['lexicon']}")
    summary = convert(open_input(cfg), need(cfg, "output"), shard_size=cfg.shard_size, prefix=cfg.prefix,
                      progress=cfg.progress, max_bad_fraction=cfg.max_bad_fraction, overwrite=cfg.overwrite,
                      lexicon=lexicon, max_entities=int(know.get("max_entities") or 10))
    return summary


def cmd_filter(cfg: DictConfig) -> dict:
    from t2i.data.filter import filter_pairs

    f = cfg.filter
    clip = None
    if f.clip.ckpt:
        from t2i.pipeline.rerank import load_reranker

        clip = load_reranker(f.clip.ckpt, f.clip.backend, f.clip.get("model_name"))
    elif f.clip.threshold is not None:
        raise DataError("filter.clip.threshold is set but filter.clip.ckpt is not: give the CLIP checkpoint")
    report = filter_pairs(open_input(cfg), need(cfg, "output"), min_side=f.min_side, max_aspect=f.max_aspect,
                          min_caption_len=f.min_caption_len, max_caption_len=f.max_caption_len, clip=clip,
                          clip_threshold=f.clip.threshold, clip_image_size=f.clip.image_size,
                          batch_size=f.clip.batch_size, shard_size=cfg.shard_size, prefix=cfg.prefix,
                          overwrite=cfg.overwrite)
    drops = ", ".join(f"{k} {v}" for k, v in report["dropped_images"].items())
    print(f"filter: kept {report['kept']} of {report['read']} images (dropped: {drops}; undecodable "
          f"{sum(report['skipped_bad'].values())}); report in {cfg.output}/filter_report.json")
    return report


def cmd_tokenizer(cfg: DictConfig) -> dict:
    from t2i.data.tokenizer import train_tokenizer

    tok = train_tokenizer(need(cfg, "input"), need(cfg, "output"), vocab_size=cfg.vocab_size,
                          model=cfg.tokenizer_model, text_column=cfg.text_column, min_frequency=cfg.min_frequency)
    return {"tokenizer": tok}


def cmd_inspect(cfg: DictConfig) -> dict:
    """Index a dataset, decode a preview, report skips, caption lengths and truncation at ``text_len``."""
    from t2i.data.tokenizer import TextTokenizer

    source = open_input(cfg)
    slog = SkipLog(cfg.max_bad_fraction, name=f"{cfg.source} {cfg.input}", key="max_bad_fraction")
    records = source.records(slog)
    n_caps = [len(r.captions) for r in records]
    chars = [len(c) for r in records for c in r.captions]
    stats = {
        "images": len(records),
        "captions": sum(n_caps),
        "captions_per_image": round(sum(n_caps) / max(len(records), 1), 3),
        "caption_chars_median": statistics.median(chars) if chars else 0,
        "caption_chars_max": max(chars, default=0),
    }
    if cfg.tokenizer:
        tok = TextTokenizer.from_file(cfg.tokenizer, key="tokenizer")
        caps = [c for r in records for c in r.captions]
        lengths = tok.lengths(caps)
        stats["tokens_median"] = statistics.median(lengths) if lengths else 0
        stats["tokens_max"] = max(lengths, default=0)
        stats[f"truncated_at_text_len_{cfg.text_len}"] = sum(n > cfg.text_len for n in lengths)
    slog.ok(len(records))
    preview, failed = [], []
    with_images = [r for r in records if r.ref is not None]  # require_images=false: captions-only rows
    for rec in with_images[: cfg.n_preview]:
        try:
            preview.append((rec, source.load(rec)))
        except BadSample as e:
            failed.append(f"{e.reason} at {e.where}")
    if failed:
        stats["preview_decode_failures"] = failed
    stats["skipped_while_indexing"] = dict(slog.by_reason)
    if cfg.output and preview:
        stats["preview"] = str(write_preview(preview, Path(cfg.output), size=cfg.image_size))
    print(slog.summary())
    print(json.dumps(stats, ensure_ascii=False, indent=2))
    slog.check()  # the same limit training applies to the index
    return stats


def write_preview(preview, out: Path, size: int = 64, cols: int = 8) -> Path:
    """A grid PNG of the first images plus ``captions.txt`` (row, column, key, caption)."""
    from PIL import Image

    from t2i.data.transforms import ImageTransform, to_pil

    out.mkdir(parents=True, exist_ok=True)
    tf = ImageTransform(size)
    rows = (len(preview) + cols - 1) // cols
    gap = 2  # grey lines between tiles, so white backgrounds stay apart
    grid = Image.new("RGB", (cols * (size + gap) - gap, rows * (size + gap) - gap), (128, 128, 128))
    lines = []
    for i, (rec, img) in enumerate(preview):
        r, c = divmod(i, cols)
        grid.paste(to_pil(tf(img)), (c * (size + gap), r * (size + gap)))
        lines.append(f"{r}\t{c}\t{rec.key}\t{rec.captions[0]}")
    grid.save(out / "preview.png")
    (out / "captions.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out / "preview.png"


def run(cfg: DictConfig) -> dict:
    if cfg.command not in COMMANDS:
        raise DataError(f"t2i-data: unknown command {cfg.command!r}; use one of {', '.join(COMMANDS)}")
    check_config(cfg)
    return globals()[f"cmd_{cfg.command}"](cfg)


@hydra.main(version_base="1.3", config_path="../conf", config_name="data")
@clear_errors
def _hydra_main(cfg: DictConfig) -> None:
    run(cfg)


def main() -> None:
    """``t2i-data <command> key=value ...``: the first bare word becomes ``command=<word>``."""
    first_word_as("command", __doc__)
    _hydra_main()


if __name__ == "__main__":
    main()
