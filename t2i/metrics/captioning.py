"""Captioning metrics: BLEU-1..4, CIDEr-D and ROUGE-L from pycocoevalcap's scorers, on our own tokenization.

pycocoevalcap's ``PTBTokenizer`` needs Java and splits English only; we tokenize here and hand the scorers
sentences whose tokens are joined by single spaces (their ``split()`` / ``split(" ")`` read them back).

Tokenization (:func:`tokenize`):

* ``zh`` (character level, as MUGE and other Chinese captioning benchmarks score): NFKC-normalise (full-width
  letters and digits become ASCII), lowercase, then every character that is neither whitespace nor punctuation
  (Unicode category ``P*``) is one token -- each Chinese character, and each Latin letter or digit too.
  Punctuation is dropped, as PTBTokenizer drops it for English. MUGE's own scoring script is not published
  with the data we could read; this is the character rule stated, not a port of it.
* ``en`` (word level): NFKC, lowercase, punctuation characters (``P*``) become spaces, split on whitespace.

CIDEr-D: pycocoevalcap (1.2) exposes one CIDEr class, ``pycocoevalcap.cider.cider.Cider`` (there is no
``CiderD`` class); its scorer is the CIDEr-D variant the COCO server reports as "CIDEr": n = 1..4, tf-idf
with document frequencies from the evaluated references, clipped n-gram counts
(``min(hyp, ref) * ref``), a Gaussian length penalty with sigma = 6, the mean over references, times 10.
"""

from __future__ import annotations

import unicodedata

LANGS = ("zh", "en")


def _punct(c: str) -> bool:
    return unicodedata.category(c).startswith("P")


def tokenize(text: str, lang: str = "zh") -> list[str]:
    """Tokens of ``text`` by the rule of ``lang`` (see the module docstring)."""
    if lang not in LANGS:
        raise ValueError(f"lang={lang!r}: use one of {', '.join(LANGS)}")
    text = unicodedata.normalize("NFKC", text).lower()
    if lang == "zh":
        return [c for c in text if not c.isspace() and not _punct(c)]
    return "".join(" " if _punct(c) else c for c in text).split()


def joined(text: str, lang: str = "zh") -> str:
    """``text`` tokenized and joined by single spaces: the form pycocoevalcap's scorers take."""
    return " ".join(tokenize(text, lang))


def score_captions(hyps: dict, refs: dict, lang: str = "zh") -> dict:
    """Corpus BLEU-1..4, CIDEr-D and ROUGE-L of ``hyps`` (key -> caption) against ``refs`` (key -> list of
    references), each text tokenized with :func:`tokenize`. Also ``per_image``: key -> cider, rouge_l."""
    if set(hyps) != set(refs):
        raise ValueError(f"hyps and refs name different images ({len(set(hyps) ^ set(refs))} differ)")
    if not hyps:
        raise ValueError("no captions to score")
    keys = list(hyps)
    for k in keys:
        if not refs[k]:
            raise ValueError(f"image {k!r} has no reference caption")
    res = {k: [joined(hyps[k], lang)] for k in keys}
    gts = {k: [joined(r, lang) for r in refs[k]] for k in keys}
    return scores_of_tokenized(gts, res) | {"n": len(keys), "tokenization": lang}


def scores_of_tokenized(gts: dict, res: dict) -> dict:
    """The pycocoevalcap numbers of already tokenized (space-joined) ``gts`` (key -> [refs]) and ``res``
    (key -> [hypothesis])."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, cider_each = Cider().compute_score(gts, res)
    rouge, rouge_each = Rouge().compute_score(gts, res)
    out = {f"bleu{i + 1}": float(b) for i, b in enumerate(bleu)}
    out.update(cider=float(cider), rouge_l=float(rouge))
    out["per_image"] = {k: {"cider": float(c), "rouge_l": float(r)}
                        for k, c, r in zip(gts, cider_each, rouge_each)}
    return out
