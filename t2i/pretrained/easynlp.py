"""Import EasyNLP's pai-painter / ARTIST text-to-image models (MUGE, Chinese) as t2i checkpoints.

A release is a folder (or a ``.tgz`` of one) with ``config.json`` (``vocab_size``, ``img_vocab_size``,
``text_vocab_size``, ``block_size``, ``n_layer``, ``n_head``, ``n_embd``), ``pytorch_model.bin`` and
usually ``vocab.txt`` (the ``chinese-roberta-wwm-ext`` BERT vocabulary). The weights hold:

- ``first_stage_model.*``: a taming ``VQModel`` in the ``vqgan_imagenet_f16_16384`` geometry (256 px
  images -> 16 x 16 codes from 16384);
- ``transformer.*``: minGPT (the one in ``taming.modules.transformer.mingpt``): one ``tok_emb`` over
  the image codes followed by the text ids (a text id ``t`` is row ``img_vocab_size + t``; captions are
  BERT tokens without [CLS]/[SEP], padded with [PAD] = 0, so every pad is the same token), one learned
  ``pos_emb [1, block_size, d]`` over ``[text ; image]``, pre-LN blocks (``ln1``, ``attn.key/query/value/proj``,
  ``ln2``, ``mlp.0``/``mlp.2`` with exact GELU), ``ln_f`` and a ``head`` over the image codes only;
  dense causal attention. ``text_len = block_size - image tokens`` (32 for the releases);
- ARTIST (the knowledge model) adds ``transformer.ent_emb`` (``Linear(100, d)``), which reads entity vectors
  (``entity2vec.pt``, one row per id of ``entity2id.txt``) after the last block (``fusion=easynlp`` in
  :mod:`t2i.models.knowledge`); the import needs those two files (``entities=``, ``vectors=``), and the
  lexicon travels in the checkpoint so prompts are linked at generation time.

Our model holds this exactly with ``text_pad=shared``, ``image_pos=absolute``, ``text_head=false``
and ``attention=full``: the shared embedding is split into its image rows and text rows, the position
table into text and image parts, the three attention projections are stacked into one. EasyNLP loads
its files with ``strict=False``; here every key must be used and every parameter filled, or the import
stops with the file and the first keys that do not fit.
"""

from __future__ import annotations

import json
import tarfile
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from t2i.errors import T2IError
from t2i.pretrained._pickle import read_weights, tensor_mapping

# EasyNLP's VQModel defaults (appzoo/text2image_generation/vqgan.py): taming's f16-16384 ImageNet model
F16_16384 = {"model": {"target": "taming.models.vqgan.VQModel", "params": {
    "embed_dim": 256, "n_embed": 16384,
    "ddconfig": {"double_z": False, "z_channels": 256, "resolution": 256, "in_channels": 3, "out_ch": 3,
                 "ch": 128, "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2, "attn_resolutions": [16],
                 "dropout": 0.0}}}}
CONFIG_KEYS = ("img_vocab_size", "text_vocab_size", "block_size", "n_layer", "n_head", "n_embd")
KNOWLEDGE_PREFIX = "transformer.ent_emb."


@contextmanager
def release_folder(path):
    """The release folder: ``path`` itself, or a ``.tgz`` / ``.tar.gz`` unpacked to a temporary folder
    (members with absolute paths or ``..`` are refused)."""
    p = Path(str(path)).expanduser()
    if p.is_dir():
        yield p
        return
    if not p.is_file():
        raise T2IError(f"input={path}: no such file or folder (an EasyNLP model folder or its .tgz)")
    if not tarfile.is_tarfile(p):
        raise T2IError(f"input={path}: not a folder or a tar archive (EasyNLP releases are .tgz files holding "
                       "config.json and pytorch_model.bin)")
    with tempfile.TemporaryDirectory(prefix="t2i-easynlp-") as tmp, tarfile.open(p) as tar:
        try:
            tar.extractall(tmp, filter="data")
        except (tarfile.TarError, OSError) as e:
            raise T2IError(f"input={path}: the archive cannot be unpacked ({type(e).__name__}: {e})") from None
        roots = {Path(tmp)} | {c.parent for c in Path(tmp).rglob("pytorch_model.bin")}
        found = [r for r in roots if (r / "pytorch_model.bin").is_file()]
        if len(found) != 1:
            raise T2IError(f"input={path}: expected one pytorch_model.bin in the archive, found {len(found)}")
        yield found[0]


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise T2IError(f"{folder}: no config.json (an EasyNLP model folder has config.json and pytorch_model.bin)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise T2IError(f"{path}: not a readable JSON file ({e})") from None
    missing = [k for k in CONFIG_KEYS if k not in cfg]
    if missing:
        raise T2IError(f"{path}: lacks {missing} (not an EasyNLP ARTIST / pai-painter config?)")
    return cfg


def model_config(cfg: dict, text_len: int) -> dict:
    """Our :class:`~t2i.models.transformer.Transformer` arguments for an EasyNLP ``config.json``."""
    unmasked = cfg.get("n_unmasked") or 0
    if unmasked != 0:  # taming's GPT: the first n_unmasked positions attend to each other both ways
        raise T2IError(f"config.json: n_unmasked={unmasked}: the release's first {unmasked} positions attend to each "
                       "other in both directions, which t2i's causal transformer does not compute; only releases "
                       "whose n_unmasked is 0 (or absent) import exactly")
    n_image = int(cfg["block_size"]) - int(text_len)
    side = round(max(n_image, 0) ** 0.5)
    if n_image <= 0 or side * side != n_image:
        raise T2IError(f"config.json: block_size={cfg['block_size']} minus text_len={text_len} is {n_image} image "
                       "tokens, not a square grid; pass the text_len the model was trained with")
    return {"text_vocab": int(cfg["text_vocab_size"]), "text_len": int(text_len),
            "image_vocab": int(cfg["img_vocab_size"]), "image_grid": [side, side], "n_layer": int(cfg["n_layer"]),
            "n_head": int(cfg["n_head"]), "d_model": int(cfg["n_embd"]), "d_ff": 4 * int(cfg["n_embd"]),
            "dropout": 0.0, "attn_dropout": 0.0, "attention": "full", "text_pad_id": 0, "text_pad": "shared",
            "image_pos": "absolute", "gelu": "exact", "head_bias": False, "text_head": False}


def convert_gpt(sd: dict, config: dict, where: str, prefix: str = "transformer.") -> dict:
    """minGPT weights (``tok_emb.weight``, ``pos_emb``, ``blocks.N.*``, ``ln_f.*``, ``head.weight``, keys
    without ``prefix``) -> our Transformer's state dict for ``config`` (from :func:`model_config`). Every
    source tensor's shape is checked before anything is combined; a wrong one is one error naming its key
    as the file spells it (``prefix`` + key) and both shapes. Every input key is used exactly once;
    leftovers and gaps are one error naming ``where``."""
    sd = dict(sd)
    used: set[str] = set()
    v_img, v_txt, t, d = config["image_vocab"], config["text_vocab"], config["text_len"], config["d_model"]
    n = config["image_grid"][0] * config["image_grid"][1]

    def take(key, *shape, why: str = ""):
        if key not in sd:
            raise T2IError(f"{where}: missing {prefix}{key} (not an EasyNLP ARTIST / pai-painter model?)")
        used.add(key)
        x = sd[key]
        if tuple(x.shape) != shape:
            raise T2IError(f"{where}: {prefix}{key} has shape {list(x.shape)}, expected {list(shape)} "
                           f"({why or f'config.json: n_embd={d}'})")
        return x

    tok = take("tok_emb.weight", v_img + v_txt, d, why=f"config.json: {v_img} image + {v_txt} text codes, n_embd={d}")
    pos = sd.get("pos_emb")
    block = pos.shape[1] if pos is not None and pos.dim() == 3 and pos.shape[1] >= t + n else t + n
    pos = take("pos_emb", 1, block, d, why=f"text_len={t} + {n} image positions at least, n_embd={d}")
    head = take("head.weight", v_img, d, why=f"ARTIST's head covers the {v_img} image codes only, n_embd={d}")
    out = {"image_emb.weight": tok[:v_img], "text_emb.weight": tok[v_img:], "text_pos": pos[0, :t],
           "image_pos_emb": pos[0, t:t + n], "ln_f.weight": take("ln_f.weight", d), "ln_f.bias": take("ln_f.bias", d),
           "image_head.weight": head}
    f = config["d_ff"]
    for i in range(config["n_layer"]):
        a = f"blocks.{i}."
        for kind in ("weight", "bias"):
            def w(rows, cols, kind=kind):  # a bias has the output size only
                return (rows, cols) if kind == "weight" else (rows,)

            out[f"{a}ln_1.{kind}"] = take(f"{a}ln1.{kind}", d)
            out[f"{a}ln_2.{kind}"] = take(f"{a}ln2.{kind}", d)
            qkv = [take(f"{a}attn.{p}.{kind}", *w(d, d)) for p in ("query", "key", "value")]
            out[f"{a}attn.qkv.{kind}"] = torch.cat(qkv)
            out[f"{a}attn.proj.{kind}"] = take(f"{a}attn.proj.{kind}", *w(d, d))
            out[f"{a}mlp.fc.{kind}"] = take(f"{a}mlp.0.{kind}", *w(f, d), why=f"config.json: n_embd={d}, 4 * n_embd "
                                            f"hidden units")
            out[f"{a}mlp.proj.{kind}"] = take(f"{a}mlp.2.{kind}", *w(d, f), why=f"config.json: n_embd={d}, 4 * "
                                              f"n_embd hidden units")
        used.update(k for k in sd if k.startswith(a) and k.endswith("attn.mask"))  # minGPT's causal-mask buffer
    left = sorted(set(sd) - used)
    if left:
        raise T2IError(f"{where}: unexpected transformer keys {left[:5]} (a model with more layers than config.json "
                       f"says, or another architecture)")
    return out


def _weights(path: Path, trust_pickle: bool) -> dict:
    return read_weights(path, tensor_mapping, what="EasyNLP weights", trust_pickle=trust_pickle)


def load_easynlp(input, vocab=None, text_len: int = 32, vqgan_config=None, image_tokenizer=None,
                 trust_pickle: bool = False, entities=None, vectors=None) -> tuple[dict, dict, object, object, dict]:
    """Read an EasyNLP release -> ``(model_config, state_dict, text_tokenizer, image_tokenizer, files)``.

    ``vocab``: the BERT ``vocab.txt`` when the release has none; ``vqgan_config``: a taming YAML for a
    first stage other than f16-16384; ``image_tokenizer``: a :func:`t2i.pretrained.load_tokenizer` source
    to use instead of the weights' ``first_stage_model`` (a transformer-only file); ``entities`` /
    ``vectors``: ARTIST's ``entity2id.txt`` / ``entity2vec.pt`` (a knowledge model needs both; the
    lexicon is returned in ``files["lexicon"]``)."""
    from t2i.data.vocabs import bert_tokenizer
    from t2i.models.vqgan import VQGAN
    from t2i.pretrained.image_tokenizers import load_tokenizer
    from t2i.pretrained.taming import taming_vqgan_config

    with release_folder(input) as folder:
        cfg = read_config(folder)
        weights_path = folder / "pytorch_model.bin"
        sd = _weights(weights_path, trust_pickle)
        where = f"EasyNLP weights {input}"
        knowledge = {k[len(KNOWLEDGE_PREFIX):]: sd.pop(k) for k in sorted(sd) if k.startswith(KNOWLEDGE_PREFIX)}
        other = sorted(k for k in sd if not k.startswith(("transformer.", "first_stage_model.")))
        if other:
            raise T2IError(f"{where}: unexpected keys {other[:5]} (expected transformer.* and first_stage_model.*)")
        config = model_config(cfg, text_len)
        state = convert_gpt({k[len("transformer."):]: v for k, v in sd.items() if k.startswith("transformer.")},
                            config, where)
        lexicon = None
        if knowledge:
            lexicon = _knowledge(knowledge, entities, vectors, config, state, where)
        vocab_path = Path(str(vocab)).expanduser() if vocab else folder / "vocab.txt"
        if not vocab_path.is_file():
            raise T2IError(f"{where}: no vocab.txt in the release; pass vocab=<chinese-roberta-wwm-ext vocab.txt>")
        text_tok = bert_tokenizer(vocab_path)
        if image_tokenizer:
            image_tok = load_tokenizer(image_tokenizer, key="image_tokenizer")
        else:
            vq = {k[len("first_stage_model."):]: v for k, v in sd.items() if k.startswith("first_stage_model.")}
            vq = {k: v for k, v in vq.items() if not k.startswith("loss.")}
            if not vq:
                raise T2IError(f"{where}: no first_stage_model.* weights; pass image_tokenizer=<the VQGAN> (e.g. "
                               "'{kind: taming, files: {ckpt: ..., config: ...}}')")
            image_tok = VQGAN(**taming_vqgan_config(vqgan_config or F16_16384))
            from t2i.pretrained.export import check_state

            check_state(image_tok, vq, f"{where} (first_stage_model)")
            image_tok.eval()
        files = {"weights": weights_path, "config": folder / "config.json", "vocab": vocab_path,
                 "entities": entities if knowledge else None, "vectors": vectors if knowledge else None}
        from t2i.pretrained.export import provenance

        meta = provenance("artist" if knowledge else "easynlp", files)
        meta["lexicon"] = lexicon
    return config, state, text_tok, image_tok, meta


def _knowledge(weights: dict, entities, vectors, config: dict, state: dict, where: str):
    """ARTIST's ``ent_emb`` + entity files -> ``config["knowledge"]`` and the fusion weights in ``state``."""
    from t2i.knowledge.lexicon import EntityLexicon
    from t2i.knowledge.vectors import load_vectors

    if set(weights) != {"weight", "bias"}:
        raise T2IError(f"{where}: unexpected knowledge weights {sorted(weights)} (ARTIST has ent_emb.weight/bias)")
    if not entities or not vectors:
        raise T2IError(f"{where}: an ARTIST model with knowledge weights (transformer.ent_emb); pass its entity files: "
                       "entities=<entity2id.txt> vectors=<entity2vec.pt>")
    lexicon = EntityLexicon.from_file(entities, key="entities")
    table = load_vectors(vectors, num_ids=lexicon.num_ids, key="vectors")
    if table.shape[1] != weights["weight"].shape[1]:
        raise T2IError(f"vectors={vectors}: {table.shape[1]}-d rows, ent_emb reads {weights['weight'].shape[1]}-d")
    config["knowledge"] = {"num_entities": int(table.shape[0]), "dim": int(table.shape[1]), "trainable": False,
                           "fusion": "easynlp"}
    state.update({"knowledge.table": table, "knowledge.proj.weight": weights["weight"],
                  "knowledge.proj.bias": weights["bias"]})
    return lexicon
