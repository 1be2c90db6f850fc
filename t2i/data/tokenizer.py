"""Text tokenizer for captions (Chinese first, English too) on Hugging Face ``tokenizers``.

CJK characters are split one per token as BERT-Chinese does (``BertNormalizer`` +
``BertPreTokenizer``); other words go through WordPiece (default) or BPE, both with the
``##`` continuation prefix so decoding works the same way. Special tokens are
``[PAD]=0, [UNK], [CLS], [SEP], [MASK]``. A tokenizer loads from a ``tokenizer.json`` (ours or
any HF one) or a BERT ``vocab.txt`` (e.g. bert-base-chinese) and travels inside checkpoints as a
JSON string; :func:`check_same` compares fingerprints when a checkpoint is loaded. Imported tokenizers
(:mod:`t2i.data.vocabs`, e.g. ruDALL-E's ``<BOS> text <EOS>``) may carry a wrap that ``encode`` applies.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import unicodedata
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

from t2i.data.skips import DataError, require_path

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# Fallback names for special tokens in foreign tokenizer.json files.
_ALIASES = {
    "pad": ("[PAD]", "<pad>", "<|pad|>", "<PAD>"),  # <PAD>/<UNK>/<BOS>/<EOS>: YouTokenToMe (ruDALL-E)
    "unk": ("[UNK]", "<unk>", "<|unk|>", "<UNK>"),
    "cls": ("[CLS]", "<s>", "<|startoftext|>", "<bos>", "<BOS>"),
    "sep": ("[SEP]", "</s>", "<|endoftext|>", "<eos>", "<EOS>"),
}
_EXPECTED = (
    "a tokenizers JSON file (tokenizer.json) or a BERT vocab.txt (one token per line, with [PAD] and [UNK])"
)
_OPENERS, _CLOSERS = set("([{<“‘"), set(",.;:!?)]}>%”’")


def is_cjk(ch: str) -> bool:
    """CJK ideographs, as BERT's ``_is_chinese_char`` defines them."""
    cp = ord(ch)
    return (
        0x4E00 <= cp <= 0x9FFF
        or 0x3400 <= cp <= 0x4DBF
        or 0x20000 <= cp <= 0x2CEAF
        or 0xF900 <= cp <= 0xFAFF
        or 0x2F800 <= cp <= 0x2FA1F
    )


def _wide_punct(ch: str) -> bool:
    """CJK / full-width punctuation, written without spaces around it."""
    return ord(ch) >= 0x2E80 and unicodedata.category(ch).startswith("P")


def _space_between(a: str, b: str) -> bool:
    """Whether decoded text puts a space between a word ending in ``a`` and one starting with ``b``."""
    if (is_cjk(a) and is_cjk(b)) or _wide_punct(a) or _wide_punct(b):
        return False
    return b not in _CLOSERS and a not in _OPENERS  # "red, blue (big)"; CJK next to latin keeps its space


def _wrap_of(post_processor) -> tuple[list[int], list[int]] | None:
    """``(ids before, ids after)`` the text when ``post_processor`` is a single-text wrap: a
    ``TemplateProcessing`` whose pair template holds no special token, as the importers in
    :mod:`t2i.data.vocabs` write it (ruDALL-E's ``<BOS> $A <EOS>``). Hub files such as BERT's
    (``[CLS] $A [SEP] $B [SEP]`` for pairs) give None: they keep encoding without specials."""
    pp = post_processor or {}
    if pp.get("type") != "TemplateProcessing" or any("SpecialToken" in p for p in pp.get("pair") or []):
        return None
    before: list[int] = []
    after: list[int] = []
    side = before
    for piece in pp.get("single") or []:
        if "Sequence" in piece:
            side = after
        elif "SpecialToken" in piece:
            side.extend(pp["special_tokens"][piece["SpecialToken"]["id"]]["ids"])
    return (before, after) if before or after else None  # "$A" alone (GPT-NeoX style): nothing to wrap


def _bert_normalizer():
    return normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=True
    )


class TextTokenizer:
    """Wraps one :class:`tokenizers.Tokenizer`; encodes captions to fixed-length id tensors."""

    def __init__(self, tok: Tokenizer):
        tok.no_padding()  # we pad / truncate ourselves and count truncations
        tok.no_truncation()
        self.tok = tok
        self.n_truncated = 0
        self.n_encoded = 0
        self.last_text_len: int | None = None
        ids = {
            k: next((i for n in names if (i := tok.token_to_id(n)) is not None), None)
            for k, names in _ALIASES.items()
        }
        self.pad_id: int = ids["pad"] if ids["pad"] is not None else 0  # no pad token: pad with 0
        self.unk_id: int | None = ids["unk"]
        self.cls_id: int | None = ids["cls"]
        self.sep_id: int | None = ids["sep"]
        mask = tok.token_to_id("[MASK]")
        self._drop = {i for i in (ids["pad"], self.cls_id, self.sep_id, mask) if i is not None}
        d = json.loads(tok.to_str())
        model = d.get("model", {})
        self._wrap = _wrap_of(d.get("post_processor"))
        self._prefix = (
            model.get("continuing_subword_prefix") if model.get("type") in ("WordPiece", "BPE") else None
        )

    # -- building -------------------------------------------------------------------------
    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int = 8000, min_frequency: int = 1, model: str = "wordpiece"
    ) -> TextTokenizer:
        """Train on ``texts``. Every character seen becomes a token (the trainer keeps the whole
        alphabet when ``limit_alphabet`` is unset), so each CJK char gets its own id even for a tiny vocab."""
        kw = dict(
            vocab_size=int(vocab_size),
            min_frequency=int(min_frequency),
            special_tokens=list(SPECIALS),
            show_progress=False,
            continuing_subword_prefix="##",
        )  # limit_alphabet unset: keep all chars
        if isinstance(texts, (list, tuple)):  # cheap to guarantee explicitly when the texts are in memory
            kw["initial_alphabet"] = sorted({c for t in texts for c in t if is_cjk(c)})
        if model == "wordpiece":
            tok, trainer = Tokenizer(models.WordPiece(unk_token="[UNK]")), trainers.WordPieceTrainer(**kw)
        elif model == "bpe":
            tok = Tokenizer(models.BPE(unk_token="[UNK]", continuing_subword_prefix="##"))
            trainer = trainers.BpeTrainer(**kw)
        else:
            raise DataError(f"tokenizer model={model!r}: use 'wordpiece' or 'bpe'")
        tok.normalizer = _bert_normalizer()
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.train_from_iterator(iter(texts), trainer=trainer)
        return cls(tok)

    @classmethod
    def from_file(cls, path, key: str = "data.tokenizer") -> TextTokenizer:
        """Load a ``tokenizer.json``, a BERT ``vocab.txt``, or a folder holding either."""
        p = require_path(path, key, kind="tokenizer.json or vocab.txt")
        if p.is_dir():
            found = [p / n for n in ("tokenizer.json", "vocab.txt") if (p / n).is_file()]
            if not found:
                raise DataError(
                    f"{key}={path}: folder has no tokenizer.json or vocab.txt; expected {_EXPECTED}"
                )
            p = found[0]
        try:
            raw = p.read_bytes()
            text = raw.decode("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{key}={path}: not readable UTF-8 text; expected {_EXPECTED} ({e})") from e
        if p.suffix == ".json" or text.lstrip().startswith("{"):
            try:
                return cls(Tokenizer.from_str(text))
            except Exception as e:
                raise DataError(
                    f"{key}={path}: not a valid tokenizers JSON; expected {_EXPECTED} ({e})"
                ) from e
        return cls._from_vocab_txt(text, f"{key}={path}")

    @classmethod
    def _from_vocab_txt(cls, text: str, where: str) -> TextTokenizer:
        # id = line number, as BERT; blank / repeated lines keep their slot (split("\n"), not
        # splitlines(): characters such as \x85 can be tokens)
        vocab: dict[str, int] = {}
        for i, line in enumerate(text.split("\n")):
            if line.strip():
                vocab.setdefault(line.strip(), i)
        if "[UNK]" not in vocab or "[PAD]" not in vocab or any(len(t) > 100 or "\x00" in t for t in vocab):
            raise DataError(f"{where}: expected {_EXPECTED}")
        tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
        tok.normalizer = _bert_normalizer()
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.add_special_tokens([s for s in SPECIALS if s in vocab])
        return cls(tok)

    def save(self, path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(p))
        return p

    def to_str(self) -> str:
        return self.tok.to_str()

    @classmethod
    def from_str(cls, s: str) -> TextTokenizer:
        try:
            return cls(Tokenizer.from_str(s))
        except Exception as e:
            raise DataError(f"stored text tokenizer is not a valid tokenizers JSON ({e})") from e

    # -- facts ----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Embedding rows needed: highest id + 1 (equals the token count unless a vocab.txt has holes)."""
        return max(self.tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1

    @property
    def fingerprint(self) -> str:
        """Short sha256 of vocabulary (+ merges) and normaliser / pre-tokeniser config."""
        d = json.loads(self.tok.to_str())
        vocab = sorted(self.tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
        model = {k: v for k, v in (d.get("model") or {}).items() if k != "vocab"}
        parts = [vocab, model, d.get("normalizer"), d.get("pre_tokenizer")]
        if self._wrap is not None:  # only tokenizers that wrap texts hash their post_processor
            parts.append(d.get("post_processor"))
        blob = json.dumps(parts, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]

    # -- encoding -------------------------------------------------------------------------
    def encode(self, texts: str | list[str], text_len: int, add_special: bool = False) -> torch.LongTensor:
        """``[B, text_len]`` ids, padded with ``pad_id``; too-long captions are cut and counted.

        A tokenizer with a wrap (:func:`_wrap_of`, e.g. ruDALL-E's) always wraps, then cuts the wrapped
        ids to ``text_len`` as ruDALL-E does (a long caption loses its ``<EOS>``)."""
        if isinstance(texts, str):
            texts = [texts]
        if self._wrap is not None:
            if add_special:
                raise DataError("add_special=True, but this tokenizer wraps every text itself; leave it off")
            return self._encode_wrapped(list(texts), text_len)
        if add_special and (self.cls_id is None or self.sep_id is None):
            raise DataError("add_special=True but this tokenizer has no [CLS]/[SEP] tokens")
        budget = text_len - 2 if add_special else text_len
        if budget < 0:
            raise ValueError(f"text_len={text_len} is too short for [CLS] ... [SEP]")
        out = torch.full((len(texts), text_len), self.pad_id, dtype=torch.long)
        for row, enc in enumerate(self.tok.encode_batch(list(texts), add_special_tokens=False)):
            ids = enc.ids
            if len(ids) > budget:
                self.n_truncated += 1
                ids = ids[:budget]
            if add_special:
                ids = [self.cls_id, *ids, self.sep_id]
            if ids:
                out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        self.n_encoded += len(texts)
        self.last_text_len = text_len
        return out

    def _encode_wrapped(self, texts: list[str], text_len: int) -> torch.LongTensor:
        before, after = self._wrap
        out = torch.full((len(texts), text_len), self.pad_id, dtype=torch.long)
        for row, enc in enumerate(self.tok.encode_batch(texts, add_special_tokens=False)):
            ids = [*before, *enc.ids, *after]
            if len(ids) > text_len:
                self.n_truncated += 1
                ids = ids[:text_len]
            if ids:
                out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        self.n_encoded += len(texts)
        self.last_text_len = text_len
        return out

    def offsets(self, texts: str | list[str], text_len: int, add_special: bool = False) -> list[list[tuple[int, int]]]:
        """Per caption, the ``(char_start, char_end)`` in the caption of each token :meth:`encode` puts at
        positions ``0, 1, ...`` (same wrap, specials and cut; pads are not listed). Specials (a wrap's
        ``<BOS>``/``<EOS>``, ``[CLS]``/``[SEP]``) get ``(0, 0)``."""
        if isinstance(texts, str):
            texts = [texts]
        before, after = self._wrap if self._wrap is not None else ([], [])
        if add_special and self._wrap is None:
            before, after = [self.cls_id], [self.sep_id]
        budget = text_len if self._wrap is not None or not add_special else text_len - 2
        out = []
        for enc in self.tok.encode_batch(list(texts), add_special_tokens=False):
            offs = [tuple(o) for o in enc.offsets]
            if self._wrap is not None:
                row = [(0, 0)] * len(before) + offs + [(0, 0)] * len(after)
            else:
                row = [(0, 0)] * len(before) + offs[:budget] + [(0, 0)] * len(after)
            out.append(row[:text_len])
        return out

    def unknown(self, text: str) -> list[str]:
        """The pieces of ``text`` that encode to the unknown token (empty when every piece is known)."""
        if self.unk_id is None:
            return []
        enc = self.tok.encode(text, add_special_tokens=False)
        return [text[a:b] for i, (a, b) in zip(enc.ids, enc.offsets) if i == self.unk_id]

    def lengths(self, texts: list[str]) -> list[int]:
        """Token count of each text before padding or truncation (for choosing ``text_len``); with the
        wrap's specials for a tokenizer that wraps."""
        extra = 0 if self._wrap is None else len(self._wrap[0]) + len(self._wrap[1])
        return [len(enc.ids) + extra for enc in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str | list[str]:
        """Ids (``[L]`` -> str, ``[B, L]`` -> list) to natural text: pads/[CLS]/[SEP]/[MASK] dropped
        ([UNK] kept), ``##`` pieces merged, no space between CJK chars or around CJK punctuation,
        spaces between latin words and between CJK and latin words."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if ids and isinstance(ids[0], (list, tuple)):
            return [self.decode(row) for row in ids]
        ids = [int(i) for i in ids if int(i) not in self._drop]
        if self._prefix is None:  # foreign tokenizer (e.g. byte-level BPE): trust its own decoder
            return self.tok.decode(ids, skip_special_tokens=True)
        words: list[str] = []
        for i in ids:
            t = self.tok.id_to_token(i) or ""
            if t.startswith(self._prefix) and words:
                words[-1] += t[len(self._prefix) :]
            elif t:
                words.append(t)
        out = ""
        for w in words:
            if out and _space_between(out[-1], w[0]):
                out += " "
            out += w
        return out

    def truncation_report(self) -> str:
        return (
            f"tokenizer: {self.n_truncated} of {self.n_encoded} captions truncated to "
            f"text_len={self.last_text_len}"
        )

    def __repr__(self) -> str:
        return f"TextTokenizer(vocab={self.vocab_size}, fingerprint={self.fingerprint})"


def tokenizer_from_checkpoint(ckpt: dict) -> TextTokenizer | None:
    """The text tokenizer a datamodule stored in a Lightning checkpoint (its ``state_dict`` holds the
    tokenizer JSON under ``"tokenizer"``), or None."""
    for key, value in ckpt.items():
        if key.endswith("hyper_parameters") or not isinstance(value, dict):
            continue
        blob = value.get("tokenizer")
        if isinstance(blob, str) and blob.lstrip().startswith("{"):
            return TextTokenizer.from_str(blob)
    return None


def check_same(expected: TextTokenizer, got: TextTokenizer, where: str) -> None:
    """``expected``: the tokenizer saved with the checkpoint at ``where``; ``got``: the configured one."""
    if expected.fingerprint != got.fingerprint:
        raise DataError(
            f"the checkpoint {where} was trained with a different text tokenizer (vocab {expected.vocab_size}, "
            f"fingerprint {expected.fingerprint}) than the configured one (vocab {got.vocab_size}, fingerprint "
            f"{got.fingerprint}); set data.tokenizer to the tokenizer saved with the checkpoint"
        )


# -- training from caption files (`t2i-data tokenizer ...`) --------------------------------
# Files a folder input leaves out: they sit next to caption files but hold no captions.
NOT_CAPTION_FILES = (
    re.compile(r".*\.img\.tsv"),  # MUGE images: id \t base64
    re.compile(r"coco-cn_[^/]*\.txt"),  # COCO-CN split lists: one image id a line
)
MAX_WORD_CHARS = 1000  # a "caption" this long without whitespace is a payload (base64), not text


def _not_caption_file(p: Path) -> bool:
    return any(rx.fullmatch(p.name) for rx in NOT_CAPTION_FILES)


def _looks_like_payload(text: str) -> bool:
    return len(text) > MAX_WORD_CHARS and not any(c.isspace() for c in text)


def _expand(input, ignored: list[Path] | None = None) -> list[Path]:
    """Caption files named by ``input``; a folder's .txt/.tsv files minus :data:`NOT_CAPTION_FILES`
    (those are appended to ``ignored``)."""
    items = [input] if isinstance(input, (str, os.PathLike)) else list(input)
    files: list[Path] = []
    for item in items:
        s = str(item)
        if any(c in s for c in "*?["):
            hits = sorted(glob.glob(os.path.expanduser(s), recursive=True))
            if not hits:
                raise DataError(f"input={s}: the pattern matches no files (set `input=` to caption files)")
            files += [Path(h) for h in hits if Path(h).is_file()]
        else:
            p = require_path(s, "input", kind="caption file")
            if not p.is_dir():
                files.append(p)
                continue
            found = sorted(q for q in p.rglob("*") if q.suffix in (".txt", ".tsv") and q.is_file())
            files += [q for q in found if not _not_caption_file(q)]
            if ignored is not None:
                ignored += [q for q in found if _not_caption_file(q)]
    if not files:
        raise DataError(f"input={input}: no caption files (.txt / .tsv) found")
    return files


def _captions(files: list[Path], text_column, stats: dict) -> Iterator[str]:
    """Stream one caption per line; TSV lines give column ``text_column`` (default: the 2nd)."""
    for f in files:
        col = text_column
        with open(f, "rb") as fh:  # binary + per-line decode: a bad byte skips one line, not the file
            for n, raw in enumerate(fh):
                try:
                    line = raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError:
                    stats["bad"] += 1
                    continue
                if isinstance(col, str) and not col.lstrip("-").isdigit():  # a header name
                    header = line.split("\t")
                    if n == 0 and col in header:
                        col = header.index(col)
                        continue
                    raise DataError(f"text_column={text_column}: not in the header of {f}")
                if "\t" in line:
                    parts = line.split("\t")
                    i = 1 if col is None else int(col)
                    text = parts[i] if -len(parts) <= i < len(parts) else ""
                else:
                    text = line
                text = text.strip()
                if not text:
                    stats["bad"] += 1
                    continue
                if _looks_like_payload(text):
                    stats["not_caption"] += 1
                    continue
                stats["n"] += 1
                stats["cjk"].update(c for c in text if is_cjk(c))
                yield text


def train_tokenizer(
    input, output, vocab_size: int = 8000, model: str = "wordpiece", text_column=None, min_frequency: int = 1
) -> TextTokenizer:
    """Train on caption text / TSV file(s), save ``output`` (tokenizer.json), print a summary."""
    if output is None or str(output) == "":
        raise DataError("output is not set: give the tokenizer.json to write with `output=...`")
    ignored: list[Path] = []
    files = _expand(input, ignored)
    stats: dict = {"n": 0, "bad": 0, "not_caption": 0, "cjk": set()}
    tok = TextTokenizer.train(_captions(files, text_column, stats), vocab_size, min_frequency, model)
    skipped = f"{stats['bad']} blank/bad lines skipped"
    if stats["not_caption"]:
        skipped += (f", {stats['not_caption']} non-caption values skipped (over {MAX_WORD_CHARS} chars "
                    "without whitespace: base64?)")
    if stats["n"] == 0:
        raise DataError(f"input={input}: no captions found in {len(files)} file(s) ({skipped}); "
                        "give caption text / TSV files")
    tok.save(output)
    vocab = tok.tok.get_vocab()
    covered = sum(c in vocab for c in stats["cjk"])
    cover = f"{covered}/{len(stats['cjk'])} CJK chars in vocab" if stats["cjk"] else "no CJK chars"
    print(
        f"tokenizer: {model} vocab {tok.vocab_size} from {stats['n']} captions in {len(files)} file(s)"
        f" ({skipped}); {cover}; fingerprint {tok.fingerprint} -> {output}"
    )
    if ignored:
        names = ", ".join(str(p) for p in ignored[:3]) + (f" and {len(ignored) - 3} more" if len(ignored) > 3 else "")
        print(f"tokenizer: skipped {len(ignored)} file(s) in the input folder that hold no captions: {names}")
    return tok
