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

:func:`multinomial` is ``torch.multinomial(p, 1)``'s draw on the CPU generator, the same codes for the same
seed and the generator left in the same state, at a tenth of its cost (``draw.c``: torch spends a scalar
``log1p`` on every one of 16,384 codes a row where top-k left 256); it checks once per process that it
draws what this torch draws, and falls back to ``torch.multinomial`` where it cannot.
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
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)
SOURCES = tuple(Path(__file__).with_name(n) for n in ("rows.c", "draw.c"))
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
    need = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"}
    if not need <= flags:
        return None, f"the CPU lacks {sorted(need - flags)}", False
    bf16 = "avx512_bf16" in flags
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None, "no C compiler (cc / gcc) on PATH", False
    if not _omp_runtime():
        return None, "torch has not loaded GNU OpenMP (libgomp), which the kernel shares", False
    args = ["-O3", "-fPIC", "-shared", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"] + \
        (["-mavx512bf16"] if bf16 else [])
    key = hashlib.sha256(b"".join(f.read_bytes() for f in SOURCES) + " ".join([cc, *args]).encode()).hexdigest()[:16]
    folder = Path(os.environ.get("T2I_KERNELS") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                  / "t2i" / "kernels")
    lib = folder / f"rows-{key}.so"
    if not lib.exists():
        tmp = None
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
            os.close(fd)
            res = subprocess.run([cc, *args, *map(str, SOURCES), "-o", tmp], capture_output=True, text=True, timeout=120)
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
    dll.fingerprint.argtypes, dll.fingerprint.restype = [p, i, ctypes.c_int], ctypes.c_uint64
    dll.draw_f32.argtypes, dll.draw_f32.restype = [p, i, i, p, p, p, ctypes.c_int], ctypes.c_int
    dll.topk_mask_f32.argtypes, dll.topk_mask_f32.restype = [p, p, i, i, i, p, ctypes.c_int], ctypes.c_int
    dll.exponential_f32.argtypes, dll.exponential_f32.restype = [p, p, i, p, ctypes.c_int], None
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


def fingerprint(t: torch.Tensor) -> int | None:
    """A 64-bit fingerprint of ``t``'s bytes (a contiguous CPU tensor of any dtype), read at the speed of
    memory (``rows.c``): equal for equal contents, whatever the thread count; None where the kernels cannot
    run (or ``t`` is not contiguous on the CPU)."""
    dll = _lib()
    if dll is None or t.device.type != "cpu" or not t.is_contiguous():
        return None
    return dll.fingerprint(t.data_ptr(), t.numel() * t.element_size(), torch.get_num_threads()) or None


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


_scratch = threading.local()  # draw_f32's stream buffer, one per thread (ctypes releases the GIL)


def _words(n: int) -> torch.Tensor:
    words = getattr(_scratch, "words", None)
    if words is None or words.numel() < n + 2 * 624:  # kept: a fresh buffer each call would cost its page faults
        words = _scratch.words = torch.empty(n + 2 * 624, dtype=torch.int32)
    return words


def _draw(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor | None:
    """draw.c's draw, or None where a row is one torch.multinomial rejects (nothing drawn then)."""
    R, V = probs.shape
    words, state = _words(2 * R * V), generator.get_state()
    out = torch.empty(R, 1, dtype=torch.int64)
    if _lib().draw_f32(probs.data_ptr(), R, V, state.data_ptr(), words.data_ptr(), out.data_ptr(),
                       torch.get_num_threads()):
        return None
    generator.set_state(state)
    return out


def exponential(n: int, generator: torch.Generator) -> torch.Tensor:
    """draw.c's ``torch.empty(n).exponential_(generator=generator)``, bit for bit, ``generator`` advanced as
    torch advances it (the variates :func:`multinomial` draws with; for tests)."""
    words, state = _words(2 * n), generator.get_state()
    out = torch.empty(n)
    _lib().exponential_f32(state.data_ptr(), words.data_ptr(), n, out.data_ptr(), torch.get_num_threads())
    generator.set_state(state)
    return out


def _draw_agrees() -> bool:
    """Does draw.c draw what this torch's ``multinomial`` draws, and leave the generator where it does?
    (Checked once per process, at stream positions odd and even, rows dense and sparse.)"""
    if "draw" not in _state:
        # 5056 bytes: torch's CPU generator state as draw.c reads it (mt19937's words at 24, its position at 8 / 16)
        ok, why = _lib() is not None and len(torch.Generator().get_state()) == 5056, ""
        g = torch.Generator().manual_seed(20261207)
        for n, (R, V, k) in enumerate([(3, 1000, None), (2, 16384, 64), (1, 13, None)]):
            if not ok:
                break
            torch.randint(0, 2, (n,), generator=g)  # move the stream to an odd position, then an even one
            x = torch.randn(R, V, generator=g)
            if k is not None:
                x = x.masked_fill(x < x.topk(k, -1).values[..., -1:], float("-inf"))
            probs = x.softmax(-1)
            a, b = torch.Generator(), torch.Generator()
            a.set_state(g.get_state())
            b.set_state(g.get_state())
            ok = torch.equal(torch.multinomial(probs, 1, generator=a), _draw(probs, b)) and \
                torch.equal(a.get_state(), b.get_state())
        if not ok and _lib() is not None:
            why = f"draw.c does not draw what torch {torch.__version__}'s multinomial draws"
            log.warning("%s: sampling uses torch.multinomial", why)
        _state["draw"], _state["draw_why"] = ok, why or _state["why"]
    return _state["draw"]


def multinomial(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``torch.multinomial(probs, 1, generator=generator)``: one index per row of ``probs [R, V]``, the same
    index for the same generator state, the generator (``None``: torch's default) left as torch leaves it,
    bad rows raising torch's own error. draw.c where it can (a float32 contiguous matrix on the CPU, and
    :func:`_draw_agrees`), else torch."""
    g = generator if generator is not None else torch.default_generator
    if (probs.dim() == 2 and probs.dtype == torch.float32 and probs.device.type == "cpu" and probs.is_contiguous()
            and probs.numel() and g.device.type == "cpu" and _draw_agrees()):
        out = _draw(probs, g)
        if out is not None:
            return out
    return torch.multinomial(probs, 1, generator=generator)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor | None:
    """``logits.masked_fill(logits < logits.topk(k, -1).values[..., -1:], -inf)`` for a float32 CPU matrix
    ``[R, V]``, ``0 < k < V`` (draw.c: a radix select finds the same k-th value, a fifth of topk's time at 8 x
    16,384); None where it cannot (no kernels, another dtype or shape, a gradient to keep, a NaN in a row:
    torch then)."""
    if not (_draw_agrees() and logits.dim() == 2 and logits.dtype == torch.float32 and logits.device.type == "cpu"
            and 0 < k < logits.shape[1] and not logits.requires_grad):
        return None
    x = logits.contiguous()
    R, V = x.shape
    y = torch.empty_like(x)
    if _lib().topk_mask_f32(x.data_ptr(), y.data_ptr(), R, V, k, _words(R * V).data_ptr(), torch.get_num_threads()):
        return None
    return y
