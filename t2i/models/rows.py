"""The decode step's own CPU kernels, for AVX-512 (``rows.c`` beside this file): a linear layer for a few rows
and a decode step's attention.

At 8 rows PyTorch's GEMMs (oneDNN's packed one included) stream a weight at about two thirds of what a plain
``sum`` reads on the CPUs this project is measured on; ``rows.c`` packs the weight once into panels of 48
output columns and multiplies every row's inputs into them as outer products, reading the weight as one
stream (``experiments/transformer_speed/README.md``: float32 30 GB/s where oneDNN reads 21 and ``sum`` 34).
:func:`pack_linear` in :mod:`t2i.models.attention` uses it where :func:`available` says it can.
:func:`step_attention` runs a decode step's attention (cache write, scores, softmax, weighted values) for
every row and head in one call, where PyTorch needs some twenty small operations a layer
(:class:`t2i.models.decode_step.DecodeStep` uses it).

The C file is compiled on first use with the system's C compiler (``$CC``, else ``cc`` / ``gcc``: ``-O3
-fopenmp`` and the CPU's AVX-512 flags) into ``$T2I_KERNELS`` or ``~/.cache/t2i/kernels`` (one file per source
and flags, written atomically, so parallel processes share it) and loaded with ``ctypes``; its OpenMP threads
are those of the runtime torch already loaded. Where anything is missing (not x86-64 Linux, no AVX-512F, no
compiler, a compile error, torch without its GNU OpenMP runtime) :func:`available` is False, the reason is in
:func:`why_not`, and the packed oneDNN / MKL layers and PyTorch's attention run as before. ``T2I_ROWS=0``
turns it off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("rows.c")
PANEL = 48  # output columns per panel: NV * 16 in rows.c
MAX_KEYS = 4096  # the most cache positions step_attention reads (MAXKEYS in rows.c)
_state: dict = {}


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _omp_runtime() -> bool:
    """Has torch loaded GNU OpenMP (``libgomp.so.1``), which the compiled file links to and so shares?"""
    try:
        return "libgomp" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def _build() -> tuple[ctypes.CDLL | None, str, bool]:
    if os.environ.get("T2I_ROWS", "1") == "0":
        return None, "turned off (T2I_ROWS=0)", False
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None, f"not x86-64 Linux ({platform.system()} {platform.machine()})", False
    flags = cpu_flags()
    need = {"avx512f", "avx512bw", "avx512vl", "fma"}
    if not need <= flags:
        return None, f"the CPU lacks {sorted(need - flags)}", False
    bf16 = "avx512_bf16" in flags
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None, "no C compiler (cc / gcc) on PATH", False
    if not _omp_runtime():
        return None, "torch has not loaded GNU OpenMP (libgomp), which the kernel shares", False
    args = ["-O3", "-fPIC", "-shared", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma"] + \
        (["-mavx512bf16"] if bf16 else [])
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([cc, *args]).encode()).hexdigest()[:16]
    folder = Path(os.environ.get("T2I_KERNELS") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                  / "t2i" / "kernels")
    lib = folder / f"rows-{key}.so"
    if not lib.exists():
        tmp = None
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
            os.close(fd)
            res = subprocess.run([cc, *args, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=120)
            if res.returncode:
                return None, f"{cc} failed: {res.stderr.strip()[-500:]}", False
            os.replace(tmp, lib)
            tmp = None
        except (OSError, subprocess.SubprocessError) as e:
            return None, f"cannot build {lib}: {e}", False
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
    try:
        dll = ctypes.CDLL(str(lib))
    except OSError as e:
        return None, f"cannot load {lib}: {e}", False
    p, i = ctypes.c_void_p, ctypes.c_int64
    for name in ("rows_f32",) + (("rows_bf16",) if bf16 else ()):
        fn = getattr(dll, name)
        fn.argtypes, fn.restype = [p, p, p, p, p, i, i, i, ctypes.c_int, ctypes.c_int], None
    for name in ("step_attn_f32",) + (("step_attn_bf16",) if bf16 else ()):
        fn = getattr(dll, name)
        fn.argtypes, fn.restype = [p, p, p, i, i, i, i, i, p, i, ctypes.c_float, p, ctypes.c_int], None
    return dll, "", bf16


def _lib():
    if "lib" not in _state:
        _state["lib"], _state["why"], _state["bf16"] = _build()
        if _state["lib"] is None:
            log.debug("rows kernel not used: %s", _state["why"])
    return _state["lib"]


def available(dtype: torch.dtype = torch.float32) -> bool:
    """Can :func:`pack` / :func:`linear_fn` run ``dtype`` (float32 or bfloat16) here?"""
    if _lib() is None:
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and _state["bf16"])


def why_not() -> str:
    """Why :func:`available` is False ("" where it is True)."""
    _lib()
    return _state["why"]


def pack(w: torch.Tensor) -> torch.Tensor:
    """``w [N, K]`` (float32 or bfloat16) in ``rows.c``'s layout: panels of :data:`PANEL` output columns,
    ``[panels, K, PANEL]`` in float32, ``[panels, ceil(K / 2), PANEL, 2]`` in bfloat16, zero-padded."""
    N, K = w.shape
    Np = -(-N // PANEL) * PANEL
    if w.dtype == torch.float32:
        wp = w.new_zeros(Np, K)
        wp[:N] = w
        return wp.view(Np // PANEL, PANEL, K).transpose(1, 2).contiguous()
    K2 = -(-K // 2)
    wp = w.new_zeros(Np, 2 * K2)
    wp[:N, :K] = w
    return wp.view(Np // PANEL, PANEL, K2, 2).permute(0, 2, 1, 3).contiguous()


GELUS = {None: 0, "none": 1, "tanh": 2}  # F.gelu's approximate= -> rows.c's act


def linear_fn(w: torch.Tensor, b: torch.Tensor | None, residual: bool = False, gelu: str | None = None):
    """``f(x) = x w^T + b`` (``residual``: ``f(x, r) = x w^T + b + r``; ``gelu`` ``"none"`` / ``"tanh"``:
    ``F.gelu(x w^T + b, approximate=gelu)``, on the float32 sum, to within 2e-7) over inputs ``[..., K]`` in
    ``w``'s dtype, rounded once, the weight packed once (:func:`pack`); for a few rows (a decode step)."""
    dll = _lib()
    fn = dll.rows_f32 if w.dtype == torch.float32 else dll.rows_bf16
    N, K = w.shape
    wp = pack(w.detach())
    bias = b.detach().to(w.dtype).contiguous() if b is not None else None
    wptr, bptr = wp.data_ptr(), (bias.data_ptr() if bias is not None else None)
    threads, act = torch.get_num_threads, GELUS[gelu]

    def f(x: torch.Tensor, r: torch.Tensor | None = None) -> torch.Tensor:
        if x.dtype != wp.dtype or x.shape[-1] != K or x.device.type != "cpu":
            raise ValueError(f"rows kernel for a {wp.dtype} [{N}, {K}] weight got a {x.dtype} {list(x.shape)} "
                             f"input on {x.device}")
        x = x.contiguous()
        y = torch.empty(x.shape[:-1] + (N,), dtype=x.dtype)
        if r is not None:
            if r.shape != y.shape or r.dtype != y.dtype:
                raise ValueError(f"rows kernel residual {r.dtype} {list(r.shape)} for an output {y.dtype} "
                                 f"{list(y.shape)}")
            r = r.contiguous()
        fn(x.data_ptr(), wptr, bptr, r.data_ptr() if r is not None else None, y.data_ptr(), x.numel() // K, K, N,
           act, threads())
        return y

    f.packed = (wp, bias)  # keep the buffers the kernel reads alive with the function
    return f if residual else (lambda x: f(x))


def step_attention(qkv: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, idx: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """A decode step's attention in one call: ``qkv [B, 1, 3 * H * D]`` (the new position's queries, keys and
    values, as the QKV layer writes them), its keys and values stored into the caches ``k, v [B, H, L, D]`` at
    ``start``, then ``softmax(scale q . k[idx]) v[idx]`` over the cache positions ``idx`` (int64, the step's
    mask row) for every row and head, in float32; returns ``[B, 1, H * D]`` in ``qkv``'s dtype (rounded once).
    Every tensor contiguous, on the CPU, ``qkv``, ``k`` and ``v`` of one dtype."""
    B, H, L, D = k.shape
    n = idx.numel()
    if not (qkv.dtype == k.dtype == v.dtype and qkv.shape == (B, 1, 3 * H * D) and v.shape == k.shape
            and k.is_contiguous() and v.is_contiguous() and qkv.is_contiguous() and idx.dtype == torch.int64
            and 0 < n <= MAX_KEYS and 0 <= start < L):
        raise ValueError(f"step_attention: qkv {qkv.dtype} {list(qkv.shape)}, cache {k.dtype} {list(k.shape)}, "
                         f"{n} keys, start {start}")
    dll = _lib()
    fn = dll.step_attn_f32 if k.dtype == torch.float32 else dll.step_attn_bf16
    y = torch.empty(B, 1, H * D, dtype=qkv.dtype)
    fn(qkv.data_ptr(), k.data_ptr(), v.data_ptr(), B, H, L, D, start, idx.data_ptr(), n, scale, y.data_ptr(),
       torch.get_num_threads())
    return y
