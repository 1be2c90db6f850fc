"""Shapes-KG: the Shapes benchmark with made-up *objects* whose look is stated in a knowledge graph.

A deterministic invented world sits on top of :mod:`t2i.data.shapes`: each of the 24 (colour, shape)
pairs gets ``n_seen + n_heldout`` object names (made-up two-character Chinese names, or made-up
English words for ``lang="en"``). An object always looks like its pair: "一个大的琥珀在左上角" means
a large shape of the pair the object 琥珀 stands for, in the top-left cell.

* **seen** objects appear in training captions (``train``/``val``/``test``);
* **held-out** objects appear in *no* training caption, only in the knowledge graph (``kg_heldout``).
  Their names are built from characters that no seen name uses (and that Shapes' captions never
  use), so a model without knowledge has no lexical clue to their look.

``train`` mixes object captions with plain attribute captions (``object_fraction`` of the samples
name an object, default 0.5) so the attribute words stay grounded; ``val``/``test``/``kg_heldout``
always name an object. ``triples.tsv`` (``head<TAB>relation<TAB>tail``) states each object's colour
and shape, with the attribute words of the plain captions as tails (颜色 -> 红色, 形状 -> 圆形; in
English ``color`` -> ``red``), plus two distractor relations with random tails (产地 / 类别, English
``origin`` / ``category``). ``entity2id.txt`` (EasyNLP's form: a header line with the count, then
``entity<TAB>id``) lists every entity: objects, attribute words, distractor tails.

:func:`parse_kg_caption` inverts every caption with the world's name table, so generated images are
scored by :mod:`t2i.data.oracle` exactly as on Shapes. Everything is deterministic given ``seed``.
The (colour, shape) pairs of Shapes' ``compositional`` split play no special part here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from t2i.data import shapes as S
from t2i.data.shapes import COLORS, POSITIONS, SHAPES, SIZES, ShapeSample, ShapeSpec, png_base64, render

SPLITS = ("train", "val", "test", "kg_heldout")
PREFIX = "shapes_kg"

# -- name material ------------------------------------------------------------------------------
# Chinese: seen names from one pool, held-out names from another, distractor tails from words whose
# characters are in neither; none of these characters occurs in Shapes' captions (checked below).
ZH_SEEN_CHARS = "松桥岩星莲梅竹雪峰泉云石林湖溪霜柏杉樱桂菊兰荷藤"
ZH_HELDOUT_CHARS = "琥珀翡翠玛瑙琉璃珊瑚瑾瑜"
# English: consonant-vowel syllables; held-out names share no letter with seen names.
EN_SEEN_LETTERS = ("bdgklmnprstv", "aeio")
EN_HELDOUT_LETTERS = ("fhjwxzq", "uy")

RELATIONS = {
    "zh": {"color": "颜色", "shape": "形状", "origin": "产地", "category": "类别"},
    "en": {"color": "color", "shape": "shape", "origin": "origin", "category": "category"},
}
DISTRACTORS = {
    "zh": {"origin": ("北原", "东岛", "西谷", "南港", "雾城", "沙洲"),
           "category": ("器具", "玩偶", "饰物", "乐器")},
    "en": {"origin": ("norland", "eastisle", "westvale", "southport", "mistown", "sandbar"),
           "category": ("tool", "toy", "trinket", "instrument")},
}

TEMPLATES = {
    "zh": (
        "一个{size}的{object}在{position}",
        "{position}有一个{size}的{object}",
        "画面{position}是一个{size}{object}",
        "位于{position}的一个{size}{object}",
    ),
    "en": (
        "a {size} {object} in the {position}",
        "a {size_alt} {object} at the {position}",
        "{position}: a {size} {object}",
        "a {object} of {size} size in the {position}",
    ),
}


def shapes_caption_text(lang: str) -> str:
    """Every character / word Shapes' plain captions (and its parser) can use, in ``lang``."""
    words = S.ZH if lang == "zh" else S.EN
    parts = [t for t in S.TEMPLATES[lang]] + [t for t in TEMPLATES[lang]]
    parts += [w for table in words.values() for w in table.values()] + list(S.EN_SIZE_ALT.values())
    if lang == "zh":
        parts += list(S._ZH_COLOR) + list(S._ZH_SHAPE) + ["上下左右中"]
    else:
        parts += list(S._EN_COLOR) + list(S._EN_SHAPE) + list(S._EN_SIZE) + ["upper lower center middle"]
    return " ".join(parts)


def _check_material() -> None:
    zh_used = set(shapes_caption_text("zh"))
    tails = set("".join(w for ws in DISTRACTORS["zh"].values() for w in ws))
    seen, held = set(ZH_SEEN_CHARS), set(ZH_HELDOUT_CHARS)
    assert len(seen) == len(ZH_SEEN_CHARS) and len(held) == len(ZH_HELDOUT_CHARS)
    assert not (seen & held) and not ((seen | held) & (zh_used | tails)), "Shapes-KG name pools overlap"
    assert not (set("".join(EN_SEEN_LETTERS)) & set("".join(EN_HELDOUT_LETTERS)))


_check_material()


# -- the world ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class KGObject:
    """One made-up object: its name, the (colour, shape) it always has, whether it is held out, and
    its distractor attributes (canonical keys ``origin`` / ``category``, tails in the world's language)."""

    name: str
    color: str
    shape: str
    heldout: bool
    origin: str
    category: str

    def to_dict(self) -> dict:
        return {"name": self.name, "color": self.color, "shape": self.shape, "heldout": self.heldout,
                "origin": self.origin, "category": self.category}


def _names(rng: np.random.Generator, n: int, lang: str, heldout: bool) -> list[str]:
    """``n`` distinct names from the pool of (lang, heldout), in a seeded order."""
    if lang == "zh":
        pool = ZH_HELDOUT_CHARS if heldout else ZH_SEEN_CHARS
        cands = [a + b for a in pool for b in pool if a != b]
    else:
        cons, vows = EN_HELDOUT_LETTERS if heldout else EN_SEEN_LETTERS
        syl = [c + v for c in cons for v in vows]
        cands = [a + b for a in syl for b in syl if a != b]
        banned = set(shapes_caption_text("en").split())
        cands = [c for c in cands if c not in banned]
    if n > len(cands):
        raise ValueError(f"Shapes-KG: {n} {'held-out' if heldout else 'seen'} names asked for, the {lang} pool "
                         f"makes only {len(cands)}")
    order = rng.permutation(len(cands))[:n]
    return [cands[i] for i in order]


@dataclass
class World:
    """The objects of one Shapes-KG world (see :func:`make_world`) and look-ups over them."""

    objects: list[KGObject]
    lang: str = "zh"
    seed: int = 0
    by_name: dict = field(init=False, repr=False)

    def __post_init__(self):
        self.by_name = {o.name: o for o in self.objects}

    def of_pair(self, color: str, shape: str, heldout: bool) -> list[KGObject]:
        return [o for o in self.objects if o.color == color and o.shape == shape and o.heldout == heldout]

    @property
    def seen(self) -> list[KGObject]:
        return [o for o in self.objects if not o.heldout]

    @property
    def heldout(self) -> list[KGObject]:
        return [o for o in self.objects if o.heldout]

    def attribute_word(self, kind: str, value: str) -> str:
        """The caption word of a colour / shape (the tail entity of its triple)."""
        return (S.ZH if self.lang == "zh" else S.EN)[kind][value]

    def triples(self) -> list[tuple[str, str, str]]:
        """``(head, relation, tail)``: every object's colour, shape, origin and category."""
        rel = RELATIONS[self.lang]
        out = []
        for o in self.objects:
            out += [(o.name, rel["color"], self.attribute_word("color", o.color)),
                    (o.name, rel["shape"], self.attribute_word("shape", o.shape)),
                    (o.name, rel["origin"], o.origin),
                    (o.name, rel["category"], o.category)]
        return out

    def entities(self) -> list[str]:
        """Every entity, in id order: objects, colour words, shape words, distractor tails."""
        names = [o.name for o in self.objects]
        names += [self.attribute_word("color", c) for c in COLORS] + [self.attribute_word("shape", s) for s in SHAPES]
        names += [t for tails in DISTRACTORS[self.lang].values() for t in tails]
        return names

    def to_dict(self) -> dict:
        return {"lang": self.lang, "seed": self.seed, "objects": [o.to_dict() for o in self.objects]}


def make_world(seed: int = 0, n_seen: int = 3, n_heldout: int = 1, lang: str = "zh") -> World:
    """``n_seen + n_heldout`` objects for each of the 24 (colour, shape) pairs; deterministic in ``seed``."""
    if lang not in TEMPLATES:
        raise ValueError(f"lang={lang!r} is not one of {list(TEMPLATES)}")
    if n_seen < 1 or n_heldout < 0:
        raise ValueError(f"n_seen={n_seen} must be >= 1 and n_heldout={n_heldout} >= 0")
    rng = np.random.default_rng([seed, 20221, 19])
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    seen = _names(rng, len(pairs) * n_seen, lang, heldout=False)
    held = _names(rng, len(pairs) * n_heldout, lang, heldout=True)
    origins, cats = DISTRACTORS[lang]["origin"], DISTRACTORS[lang]["category"]
    objects = []
    for k, (c, s) in enumerate(pairs):
        for j in range(n_seen + n_heldout):
            h = j >= n_seen
            name = held[k * n_heldout + j - n_seen] if h else seen[k * n_seen + j]
            objects.append(KGObject(name, c, s, h, origins[int(rng.integers(len(origins)))],
                                    cats[int(rng.integers(len(cats)))]))
    return World(objects, lang, seed)


# -- captions -----------------------------------------------------------------------------------
def object_caption(obj: KGObject, spec: ShapeSpec, lang: str = "zh", template: int = 0) -> str:
    """The caption naming ``obj`` (whose colour / shape ``spec`` must have) from template ``template``."""
    if (obj.color, obj.shape) != (spec.color, spec.shape):
        raise ValueError(f"object {obj.name} is a {obj.color} {obj.shape}, the spec is {spec.color} {spec.shape}")
    words = S.ZH if lang == "zh" else S.EN
    fields = {"object": obj.name, "position": words["position"][spec.position], "size": words["size"][spec.size],
              "size_alt": S.EN_SIZE_ALT[spec.size]}
    return TEMPLATES[lang][template].format(**fields)


def object_captions(obj: KGObject, spec: ShapeSpec, lang: str = "zh") -> list[str]:
    return [object_caption(obj, spec, lang, t) for t in range(len(TEMPLATES[lang]))]


def parse_kg_caption(text: str, world: World) -> ShapeSpec | None:
    """The spec a Shapes-KG caption asks for: the named object stands for its colour and shape (a plain
    Shapes caption parses as in :func:`t2i.data.shapes.parse_caption`). None when two objects are named,
    or an attribute is missing or ambiguous."""
    import re

    if world.lang == "zh":
        named = [n for n in world.by_name if n in text]
    else:
        words = set(re.findall(r"[a-z]+", text.lower()))
        named = [n for n in world.by_name if n in words]
    if len(named) > 1:
        return None
    if named:
        o = world.by_name[named[0]]
        sep = "" if world.lang == "zh" else " "
        phrase = world.attribute_word("color", o.color) + sep + world.attribute_word("shape", o.shape)
        text = text.replace(named[0], phrase) if world.lang == "zh" else re.sub(
            rf"\b{re.escape(named[0])}\b", phrase, text, flags=re.IGNORECASE)
    return S.parse_caption(text, world.lang)


# -- splits -------------------------------------------------------------------------------------
@dataclass
class KGSample(ShapeSample):
    """A Shapes sample plus the object its captions name (None: a plain attribute caption)."""

    object: str | None = None


def iter_split(split: str, n: int, world: World, seed: int = 0, image_size: int = 64,
               object_fraction: float = 0.5) -> Iterator[KGSample]:
    """Yield ``n`` samples of ``split``; sample ``i`` depends only on (world, seed, split, i).

    ``train`` names a seen object with probability ``object_fraction`` (else a plain Shapes caption);
    ``val``/``test`` always name a seen object, ``kg_heldout`` always a held-out one."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}")
    if not 0.0 <= object_fraction <= 1.0:
        raise ValueError(f"object_fraction={object_fraction} must be in [0, 1]")
    lang = world.lang
    heldout = split == "kg_heldout"
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    if heldout and not world.heldout:
        raise ValueError("the world has no held-out objects (n_heldout=0): kg_heldout is empty")
    n_templates = len(TEMPLATES[lang])
    for i in range(n):
        rng = np.random.default_rng([seed, 1000 + SPLITS.index(split), i])
        color, shape = pairs[rng.integers(len(pairs))]
        spec = ShapeSpec(color, shape, POSITIONS[rng.integers(len(POSITIONS))], SIZES[rng.integers(len(SIZES))])
        jitter = tuple(float(j) for j in rng.uniform(-1, 1, size=2))
        template = int(rng.integers(n_templates))
        candidates = world.of_pair(color, shape, heldout)
        obj = candidates[int(rng.integers(len(candidates)))]
        use_object = split != "train" or rng.random() < object_fraction
        caps = object_captions(obj, spec, lang) if use_object else S.captions(spec, lang)
        image = render(spec, image_size, jitter=jitter)
        yield KGSample(f"{PREFIX}_{split}_{i:06d}", spec, image, caps, template, jitter,
                       obj.name if use_object else None)


def make_split(split: str, n: int, world: World, seed: int = 0, image_size: int = 64,
               object_fraction: float = 0.5) -> list[KGSample]:
    return list(iter_split(split, n, world, seed, image_size, object_fraction))


# -- writing ------------------------------------------------------------------------------------
def write_kg(world: World, out: Path) -> dict[str, Path]:
    """``triples.tsv``, ``entity2id.txt`` (EasyNLP form) and ``object_names.txt`` (one a line, for the text
    tokenizer: every object's characters, held-out ones included) of ``world`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    triples, ents, names_txt = out / "triples.tsv", out / "entity2id.txt", out / "object_names.txt"
    triples.write_text("".join(f"{h}\t{r}\t{t}\n" for h, r, t in world.triples()), encoding="utf-8")
    names = world.entities()
    ents.write_text(f"{len(names)}\n" + "".join(f"{e}\t{i}\n" for i, e in enumerate(names)), encoding="utf-8")
    names_txt.write_text("".join(o.name + "\n" for o in world.objects), encoding="utf-8")
    return {"triples": triples, "entity2id": ents, "object_names": names_txt}


def write_shapes_kg(output, n_train: int = 5000, n_val: int = 500, n_test: int = 500, n_kg_heldout: int = 500,
                    image_size: int = 64, lang: str = "zh", seed: int = 0, n_seen: int = 3, n_heldout: int = 1,
                    object_fraction: float = 0.5, progress: bool = True) -> dict[str, Path]:
    """Write ``shapes_kg_{split}.tsv`` (``key \\t caption \\t base64 PNG``), ``shapes_kg_{split}.jsonl``
    (key, spec, object, all captions, template), ``triples.tsv``, ``entity2id.txt``, ``object_names.txt`` and
    ``meta.json``
    (the world: every object, which are held out) under ``output``. Returns the written paths."""
    from rich.progress import Progress

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    world = make_world(seed, n_seen, n_heldout, lang)
    counts = {"train": n_train, "val": n_val, "test": n_test, "kg_heldout": n_kg_heldout}
    paths: dict[str, Path] = {}
    with Progress(disable=not progress, transient=True) as bar:
        for split, n in counts.items():
            task = bar.add_task(f"shapes_kg {split}", total=n)
            tsv, jsonl = out / f"{PREFIX}_{split}.tsv", out / f"{PREFIX}_{split}.jsonl"
            with open(tsv, "w", encoding="utf-8", newline="\n") as ft, open(jsonl, "w", encoding="utf-8") as fj:
                for s in iter_split(split, n, world, seed, image_size, object_fraction):
                    ft.write(f"{s.key}\t{s.caption}\t{png_base64(s.image)}\n")
                    record = {"key": s.key, "spec": s.spec.to_dict(), "object": s.object, "captions": s.captions,
                              "template": s.template}
                    fj.write(json.dumps(record, ensure_ascii=False) + "\n")
                    bar.advance(task)
            paths[f"{split}_tsv"], paths[f"{split}_jsonl"] = tsv, jsonl
    paths.update(write_kg(world, out))
    meta = {
        "benchmark": PREFIX,
        "counts": counts,
        "image_size": image_size,
        "seed": seed,
        "lang": lang,
        "n_seen": n_seen,
        "n_heldout": n_heldout,
        "object_fraction": object_fraction,
        "heldout_objects": [o.name for o in world.heldout],
        "seen_objects": [o.name for o in world.seen],
        "world": world.to_dict(),
        "relations": RELATIONS[lang],
        "templates": {k: list(v) for k, v in TEMPLATES.items()},
        "vocab": {"color": list(COLORS), "shape": list(SHAPES), "position": list(POSITIONS), "size": list(SIZES)},
    }
    paths["meta"] = out / "meta.json"
    paths["meta"].write_text(json.dumps(meta, ensure_ascii=False, indent=2), encoding="utf-8")
    return paths


def world_from_meta(path) -> World:
    """The world a written benchmark's ``meta.json`` records."""
    meta = json.loads(Path(path).read_text(encoding="utf-8"))
    w = meta["world"]
    return World([KGObject(**o) for o in w["objects"]], w["lang"], w["seed"])
