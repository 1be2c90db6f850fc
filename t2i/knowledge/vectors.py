"""Entity vector tables for knowledge injection (ARTIST, issue 19): read and write ``[num_ids, dim]`` tensors.

Row ``i`` is the vector of the entity whose lexicon id is ``i`` (the ids of ``entity2id.txt``). Three file forms
are read by :func:`load_vectors`:

* ``.pt`` / ``.pth`` / ``.bin``: a raw tensor saved with ``torch.save``, as EasyNLP's ``entity2vec.pt``
  (``[num_entities, 100]``; read with ``weights_only=True``, so nothing but tensors is unpickled). A dict
  holding exactly one 2-D tensor (a state dict of one embedding) is accepted too.
* ``.npy``: a 2-D numpy array (no pickles).
* anything else is text: one ``id v1 ... vd`` line per entity (whitespace separated). Ids may be sparse and in
  any order; each row lands at its id, rows no line gives stay zero and are reported (a log warning naming the
  file, how many and which). A first line of exactly two integers (word2vec's ``count dim``) is a header.

Every problem is one :class:`~t2i.data.skips.DataError` line naming the file (and the config key that set it):
an unreadable, corrupt or truncated file, not two dimensions, NaN/inf values, a bad text line, or a row count
that does not match the lexicon's ``num_ids`` (max id + 1).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch

from t2i.data.skips import DataError, require_path

log = logging.getLogger("t2i.knowledge")
TENSOR_SUFFIXES = (".pt", ".pth", ".bin")


def _where(key: str, path) -> str:
    return f"{key}={path}"


def _read_tensor_file(p: Path, where: str) -> torch.Tensor:
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read or unpickle is a bad file
        msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise DataError(f"{where}: cannot read the tensor file, it is corrupt, truncated or not a plain tensor "
                        f"({type(e).__name__}: {msg}); re-export it with torch.save(tensor) or t2i-knowledge "
                        "train") from None
    if isinstance(obj, dict):
        tensors = [v for v in obj.values() if isinstance(v, torch.Tensor) and v.dim() == 2]
        if len(tensors) != 1:
            raise DataError(f"{where}: a dict with keys {sorted(map(str, obj))[:8]} instead of one "
                            "[num_entities, dim] tensor; save the entity table alone with torch.save(tensor)")
        obj = tensors[0]
    if not isinstance(obj, torch.Tensor):
        raise DataError(f"{where}: holds a {type(obj).__name__}, not a [num_entities, dim] tensor; "
                        "save the entity table with torch.save(tensor)")
    return obj


def _read_npy(p: Path, where: str) -> torch.Tensor:
    try:
        arr = np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise DataError(f"{where}: cannot read the .npy file, it is corrupt or truncated ({msg}); "
                        "re-export it with numpy.save(path, array)") from None
    if not isinstance(arr, np.ndarray):
        raise DataError(f"{where}: not a single .npy array (an .npz archive?); save one [num_entities, dim] "
                        "array with numpy.save")
    if arr.dtype.kind not in "fiu":
        raise DataError(f"{where}: array of dtype {arr.dtype}, expected real numbers [num_entities, dim]")
    return torch.from_numpy(np.ascontiguousarray(arr))


def _read_text(p: Path, where: str, num_ids: int | None) -> torch.Tensor:
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{where}: not readable text ({e}); expected `id v1 ... vd` lines, or a .pt/.npy "
                        "file") from None
    rows: dict[int, list[float]] = {}
    dim = None
    first = True
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if first and len(parts) == 2 and all(s.isdigit() for s in parts):
            first = False  # word2vec-style "count dim" header
            continue
        first = False
        try:
            i = int(parts[0])
            vals = [float(s) for s in parts[1:]]
        except ValueError:
            raise DataError(f"{where}:{n}: bad line {line[:60]!r}; expected `id v1 ... vd` (an integer id, "
                            "then numbers)") from None
        if i < 0:
            raise DataError(f"{where}:{n}: negative id {i}; ids are the lexicon's (0 .. num_ids-1)")
        if not vals:
            raise DataError(f"{where}:{n}: id {i} has no values; expected `id v1 ... vd`")
        if dim is None:
            dim = len(vals)
        elif len(vals) != dim:
            raise DataError(f"{where}:{n}: id {i} has {len(vals)} values but earlier lines have {dim}; "
                            "every line needs the same number of values")
        if i in rows:
            raise DataError(f"{where}:{n}: id {i} appears twice; give each id one line")
        if num_ids is not None and i >= num_ids:
            raise DataError(f"{where}:{n}: id {i} but the lexicon has num_ids={num_ids} (ids 0..{num_ids - 1}); "
                            "use the lexicon (entity2id.txt) these vectors were made for")
        rows[i] = vals
    if not rows:
        raise DataError(f"{where}: no `id v1 ... vd` lines (empty or truncated file)")
    n_rows = num_ids if num_ids is not None else max(rows) + 1
    out = torch.zeros(n_rows, dim, dtype=torch.float64)
    idx = torch.tensor(list(rows), dtype=torch.long)
    out[idx] = torch.tensor(list(rows.values()), dtype=torch.float64)
    missing = n_rows - len(rows)
    if missing:
        have = set(rows)
        first_missing = [i for i in range(n_rows) if i not in have][:10]
        log.warning("%s: %d of %d ids have no line and get zero vectors (first: %s)", where, missing, n_rows,
                    ", ".join(map(str, first_missing)))
    return out


def load_vectors(path, num_ids: int | None = None, key: str = "knowledge.vectors") -> torch.Tensor:
    """Read an entity vector table as ``FloatTensor[num_ids, dim]`` (row i = the vector of lexicon id i).

    ``num_ids``: the lexicon's ``num_ids`` (max id + 1); when given, the table must have exactly that many rows
    (text files: ids must be below it, absent ids are zero rows). ``key`` names the setting in error messages.
    """
    p = require_path(path, key, kind="entity vector file (entity2vec.pt, .npy, or `id v1 ... vd` text)")
    where = _where(key, path)
    if p.is_dir():
        raise DataError(f"{where}: is a folder; give the vector file itself (e.g. {p}/entity2vec.pt)")
    suffix = p.suffix.lower()
    if suffix in TENSOR_SUFFIXES:
        t = _read_tensor_file(p, where)
    elif suffix == ".npy":
        t = _read_npy(p, where)
    else:
        t = _read_text(p, where, num_ids)
    if t.dim() != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise DataError(f"{where}: shape {tuple(t.shape)}, expected a [num_entities, dim] table with at least "
                        "one row and one column")
    if t.is_complex() or t.dtype == torch.bool:
        raise DataError(f"{where}: dtype {t.dtype}, expected real numbers; store a float tensor")
    t = t.to(torch.float32).contiguous()
    bad = ~torch.isfinite(t).all(dim=1)
    if bad.any():
        rows = bad.nonzero().flatten().tolist()
        raise DataError(f"{where}: {len(rows)} row(s) hold NaN or inf (ids {', '.join(map(str, rows[:10]))}"
                        f"{', ...' if len(rows) > 10 else ''}); retrain or repair the vectors")
    if num_ids is not None and t.shape[0] != num_ids:
        raise DataError(f"{where}: {t.shape[0]} rows but the lexicon has num_ids={num_ids} (max id + 1); the "
                        "table needs one row per lexicon id: use the entity2id.txt these vectors were trained "
                        "with, or retrain them for this lexicon (t2i-knowledge train)")
    return t


def save_vectors(vectors: torch.Tensor, path) -> Path:
    """Write ``vectors [num_ids, dim]`` as a raw tensor (``.pt``, EasyNLP's entity2vec.pt form), ``.npy``,
    or ``id v1 ... vd`` text (``.txt``). Returns the path."""
    p = Path(str(path))
    t = torch.as_tensor(vectors).detach().to("cpu", torch.float32).contiguous()
    if t.dim() != 2:
        raise DataError(f"save_vectors({p}): shape {tuple(t.shape)}, expected [num_entities, dim]")
    p.parent.mkdir(parents=True, exist_ok=True)
    suffix = p.suffix.lower()
    if suffix in TENSOR_SUFFIXES:
        torch.save(t.clone(), p)
    elif suffix == ".npy":
        np.save(p, t.numpy())
    elif suffix == ".txt":
        with p.open("w", encoding="utf-8") as f:
            for i, row in enumerate(t.tolist()):
                f.write(f"{i} " + " ".join(repr(v) if math.isfinite(v) else str(v) for v in row) + "\n")
    else:
        raise DataError(f"save_vectors({p}): unknown suffix {suffix!r}; use .pt, .npy or .txt")
    return p
