"""Text tokenizers of released text-to-image models as :class:`t2i.data.tokenizer.TextTokenizer`.

* :func:`bert_tokenizer`: a BERT ``vocab.txt`` (EasyNLP pai-painter / ARTIST use
  ``hfl/chinese-roberta-wwm-ext``'s, 21128 lines) tokenized as ``transformers.BertTokenizer(vocab,
  do_lower_case=True).tokenize`` does: lowercase *and* strip accents (``"й"`` -> ``"и"``), one token per
  CJK char, WordPiece with ``##`` and at most 100 chars a word, no [CLS]/[SEP]. (``TextTokenizer.from_file``
  on a vocab.txt keeps accents; that path is unchanged, so its ids and fingerprints stay as they were.)
* :func:`yttm_tokenizer`: a YouTokenToMe BPE model file (ruDALL-E's ``bpe.model``) converted to a
  ``tokenizers`` BPE that encodes to the same ids as ``yttm.BPE(model).encode([text], output_type=ID)``,
  with ruDALL-E's wrap ``<BOS> ids <EOS>`` stored as the JSON's post-processor, so
  ``TextTokenizer.encode(texts, text_len)`` gives ruDALL-E's ``encode_text`` ids (right-padded with
  ``<PAD>`` = 0; a long text is cut to ``text_len``, losing its ``<EOS>``).

YouTokenToMe's model file is whitespace-separated decimal integers::

    n_chars n_rules
    codepoint id          (n_chars lines: the alphabet, "▁" U+2581 included)
    x y z                 (n_rules lines, in training order: tokens x and y merge into token z)
    unk_id pad_id bos_id eos_id      (-1: not used)

A token's text is its chars' concatenation. YouTokenToMe encodes each whitespace-separated word as
``"▁" + word`` (whitespace: ASCII ``\\t\\n\\v\\f\\r`` and space, plus "▁" itself), a run of chars outside
the alphabet becomes one ``<UNK>``, and merges apply lowest rule index first, leftmost first on ties:
exactly Hugging Face BPE with ``merges`` in rule order (rank = rule index) and ``fuse_unk=True``.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from t2i.data.skips import DataError, require_path
from t2i.data.tokenizer import SPECIALS, TextTokenizer

SPACE = "\u2581"  # YouTokenToMe's word-start mark
YTTM_SPECIALS = ("<UNK>", "<PAD>", "<BOS>", "<EOS>")  # the file's order
_WS = f"[\\t-\\r {SPACE}]"  # what YouTokenToMe splits words on (C isspace below 256, and "▁")
# Python's str.isspace() chars (str.strip() removes these); ruDALL-E's pipeline strips prompts with it
PY_SPACES = "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + \
    "\u2028\u2029\u202f\u205f\u3000"
_BERT_EXPECTED = "a BERT vocab.txt (one token a line, with [PAD] and [UNK])"
_YTTM_EXPECTED = "a YouTokenToMe BPE model file (ruDALL-E's bpe.model)"


def bert_tokenizer(vocab_path, key: str = "tokenizer") -> TextTokenizer:
    """A BERT ``vocab.txt`` -> TextTokenizer giving ``BertTokenizer(vocab, do_lower_case=True)``'s ids."""
    p = require_path(vocab_path, key, kind="vocab.txt")
    where = f"{key}={vocab_path}"
    try:
        p.read_bytes().decode("utf-8")
        vocab = models.WordPiece.read_file(str(p))  # the reference's own reader: id = line, last line wins
    except Exception as e:  # OSError, UnicodeDecodeError, or the reader's own
        raise DataError(f"{where}: not readable UTF-8 text; expected {_BERT_EXPECTED} ({e})") from e
    if "[UNK]" not in vocab or "[PAD]" not in vocab or any("\x00" in t for t in vocab):
        raise DataError(f"{where}: no [PAD] / [UNK] lines; expected {_BERT_EXPECTED}")
    tok = Tokenizer(
        models.WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##", max_input_chars_per_word=100)
    )
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=True, lowercase=True
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens([s for s in SPECIALS if s in vocab])
    return TextTokenizer(tok)


def read_yttm(model_path, key: str = "tokenizer") -> tuple[dict[int, int], list[tuple[int, int, int]], dict]:
    """Parse a YouTokenToMe model file: ``({codepoint: id}, [(x, y, z), ...], {name: id})``.
    A truncated, corrupt or foreign file raises one :class:`DataError` naming it."""
    p = require_path(model_path, key, kind="YouTokenToMe model file")
    where = f"{key}={model_path}"

    def bad(why: str) -> DataError:
        return DataError(f"{where}: {why}; expected {_YTTM_EXPECTED}")

    try:
        words = p.read_bytes().decode("ascii").split()
        nums = [int(w) for w in words]
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise bad(f"not a file of integers ({str(e)[:80]})") from e
    if len(nums) < 2 or nums[0] < 1 or nums[1] < 0:
        raise bad("no 'n_chars n_rules' header")
    n, m = nums[0], nums[1]
    if len(nums) != 2 + 2 * n + 3 * m + 4:
        raise bad(f"{len(nums)} numbers, but its header (n_chars={n}, n_rules={m}) needs {2 + 2 * n + 3 * m + 4}"
                  " (truncated or corrupt)")
    chars: dict[int, int] = {}
    for i in range(n):
        cp, tid = nums[2 + 2 * i], nums[3 + 2 * i]
        if not (0 <= cp < 0x110000) or 0xD800 <= cp <= 0xDFFF or cp in chars:
            raise bad(f"alphabet entry {i + 1} has a bad or repeated code point {cp}")
        chars[cp] = tid
    rules = [tuple(nums[2 + 2 * n + 3 * j : 5 + 2 * n + 3 * j]) for j in range(m)]
    specials = dict(zip(YTTM_SPECIALS, nums[-4:], strict=True))
    specials = {name: i for name, i in specials.items() if i >= 0}
    if ord(SPACE) not in chars:
        raise bad("no '▁' (U+2581) in the alphabet")
    if "<UNK>" not in specials:
        raise bad("no <UNK> id")
    known = set(chars.values()) | set(specials.values())
    if len(known) != n + len(specials):
        raise bad("two alphabet / special entries share an id")
    for j, (x, y, z) in enumerate(rules):
        if x not in known or y not in known or z in known:
            raise bad(f"merge rule {j + 1} ({x} {y} {z}) uses an unknown id or redefines one")
        known.add(z)
    if known != set(range(len(known))):
        raise bad(f"its {len(known)} ids are not 0..{len(known) - 1}")
    return chars, rules, specials


def yttm_tokenizer(model_path, key: str = "tokenizer", wrap: bool = True, lowercase: bool = False,
                   strip: bool = False) -> TextTokenizer:
    """A YouTokenToMe BPE model file -> TextTokenizer with the same ids as ``yttm.BPE(model).encode``.

    ``wrap``: store ruDALL-E's ``<BOS> $A <EOS>`` so :meth:`TextTokenizer.encode` reproduces its
    ``encode_text`` (wrap, then pad with <PAD> / cut to ``text_len``). ``lowercase``: lowercase before
    encoding; ``strip``: drop leading / trailing whitespace as Python's ``str.strip()`` does (NBSP, U+3000,
    U+2028, ... too). ruDALL-E's pipeline encodes ``text.lower().strip()``: both on give its prompt ids."""
    chars, rules, specials = read_yttm(model_path, key)
    text = {tid: chr(cp) for cp, tid in chars.items()}
    vocab = {chr(cp): tid for cp, tid in chars.items()}
    for name, tid in specials.items():
        text[tid], vocab[name] = name, tid
    for x, y, z in rules:
        text[z] = text[x] + text[y]
        if text[z] in vocab:
            raise DataError(
                f"{key}={model_path}: tokens {vocab[text[z]]} and {z} both spell {text[z]!r}; a tokenizers BPE "
                "keeps one id per text, so this YouTokenToMe model cannot be converted exactly"
            )
        vocab[text[z]] = z
    merges = [(text[x], text[y]) for x, y, _ in rules]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<UNK>", fuse_unk=True))
    steps = [normalizers.Lowercase()] if lowercase else []
    if strip:
        steps.append(normalizers.Replace(Regex(f"\\A[{PY_SPACES}]+|[{PY_SPACES}]+\\z"), ""))
    steps += [
        normalizers.Replace(Regex(f"\\A{_WS}+|{_WS}+\\z"), ""),  # YouTokenToMe skips edge whitespace
        normalizers.Replace(Regex(f"{_WS}+"), SPACE),  # any whitespace run (or "▁") separates two words
    ]
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="always", split=True)
    if wrap:
        if "<BOS>" not in specials or "<EOS>" not in specials:
            raise DataError(f"{key}={model_path}: wrap=True needs <BOS> and <EOS> ids; this model has none")
        tok.post_processor = processors.TemplateProcessing(
            single="<BOS> $A <EOS>", special_tokens=[(s, specials[s]) for s in ("<BOS>", "<EOS>")]
        )
    return TextTokenizer(tok)


def load_text_tokenizer(path, key: str = "tokenizer") -> TextTokenizer:
    """A BERT ``vocab.txt`` (EasyNLP) or a YouTokenToMe model (ruDALL-E), told apart by content."""
    p = Path(require_path(path, key, kind="vocab.txt or bpe.model"))
    head = p.read_bytes()[:4096] if p.is_file() else b""
    if head.split() and all(w.isdigit() or w.lstrip(b"-").isdigit() for w in head.split()[:-1]):
        return yttm_tokenizer(p, key)
    return bert_tokenizer(p, key)
