"""Image-tokenizer specs: which files make a tokenizer, with their sha256 and their paths relative to a
folder, so that a later stage finds (and checks) the same files after the folder moved.

A spec is ``{"kind": "t2i" | "taming" | "openai_dvae", "files": {"ckpt": ..., "config": ...,
"decoder": ...}, "sha256": {role: hex}, "relative": {role: path}}``; :func:`t2i.pretrained.load_tokenizer`
builds the tokenizer it names.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

from t2i.errors import T2IError
from t2i.models.records import plain

KINDS = {"t2i": ("ckpt",), "taming": ("ckpt", "config"), "openai_dvae": ("ckpt", "decoder")}  # kind: file roles
SPEC_HINT = "'{kind: taming, files: {ckpt: <vqgan .ckpt>, config: <its model.yaml>}}'"


def file_sha256(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def resolve_spec(spec: Mapping, base=None, key: str = "model.image_tokenizer", check_hash: bool = True) -> dict:
    """The spec with ``files`` pointing at files that exist here: each recorded path, else its ``relative``
    path under ``base``; every file with a recorded sha256 is checked against it. One clear error naming
    ``key`` (the override that fixes it) otherwise."""
    spec = plain(spec)
    kind = spec.get("kind", "t2i")
    if kind not in KINDS:
        raise T2IError(f"{key}: tokenizer kind {kind!r} is unknown; use one of {', '.join(KINDS)}")
    files = dict(spec.get("files") or {})
    if "ckpt" not in files:
        raise T2IError(f"{key}: the tokenizer spec names no ckpt file; give {key}=<tokenizer .ckpt> or {SPEC_HINT}")
    relative, hashes, found = spec.get("relative") or {}, spec.get("sha256") or {}, {}
    for role, path in files.items():
        if path is None:
            continue
        tried = [Path(str(path)).expanduser()]
        if base is not None and relative.get(role):
            tried.append(Path(str(base)).expanduser() / relative[role])
        hit = next((p for p in tried if p.is_file()), None)
        if hit is None:
            where = " or ".join(str(p) for p in tried)
            raise T2IError(f"image tokenizer {role} file {where}: no such file (was it moved?); pass "
                           f"{key}=<its path> (a t2i tokenizer .ckpt or a transformer .ckpt that carries one, or "
                           f"for public weights {key}={SPEC_HINT})")
        if check_hash and hashes.get(role):
            got = file_sha256(hit)
            if got != hashes[role]:
                raise T2IError(f"image tokenizer {role} file {hit} has sha256 {got[:12]}, not the {hashes[role][:12]} "
                               f"recorded when its codes were made (the file changed since t2i-tokenize); pass "
                               f"{key}=<the original file> or re-run t2i-tokenize")
        found[role] = str(hit.resolve())
    return {**spec, "kind": kind, "files": found}


