"""Native CPU kernels, compiled on first use with the system C compiler and loaded with ctypes.

Plain C with OpenMP, no torch headers: a build takes about a second, needs nothing but `cc`, and happens
once per machine (the shared object is cached under $MOSAIC_CACHE_DIR/kernels, keyed by the source, the
compiler and the CPU's features, since it is built for this CPU). The library links `libgomp.so.1`, which
resolves to the copy torch has already loaded, so the kernels share torch's OpenMP thread pool. Where no
compiler or OpenMP is available the engine keeps its pure-torch path (a warning says so, once).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import torch

from serving.utils.cache import cache_dir

logger = logging.getLogger(__name__)

# Each source file and the C signatures of its functions: (name, pointer arguments, int64 arguments, float
# arguments); every function ends with an int thread count and returns nothing.
_SOURCES = {
    "paged_attention.c": (("paged_decode_attention_f32", 6, 6, 1), ("paged_decode_attention_i8", 8, 6, 1)),
    "small_linear.c": (("small_linear_f32", 4, 3, 0),),
    "fused_ops.c": (("add_rms_norm_f32", 5, 2, 1), ("rotary_f32", 6, 8, 0), ("silu_and_mul_f32", 2, 3, 0),
                    ("kv_store_i8", 4, 4, 0)),
    # Includes the three above (its key hashes every source of the package).
    "decode_layers.c": (("llama_decode_layers_f32", 10, 10, 2),),
}
# Included by the sources above (part of every library's cache key).
_HEADERS = ("half.h",)
_COMPILE_FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC")
# Linked without -ffast-math: linking with it would add crtfastmath.o, whose constructor changes the
# floating-point mode of the whole process when the library loads.
_LINK_FLAGS = ("-shared", "-fopenmp")

# (out, q, k_cache, v_cache, block_tables, seq_lens, scale, k_params=None, v_params=None)
PagedDecodeAttention = Callable[..., None]


def _cpu_features() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def _build(compiler: str, source: Path, target: Path) -> None:
    """Compile `source` into `target` atomically: concurrent first uses each build, the last rename wins."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        obj, lib = Path(tmp) / "kernel.o", Path(tmp) / target.name
        # -I: the package's headers, also for a variant built from a copy elsewhere (build_variant).
        headers = ("-I", str(Path(__file__).parent))
        for cmd in ([compiler, *_COMPILE_FLAGS, *headers, "-c", str(source), "-o", str(obj)],
                    [compiler, *_LINK_FLAGS, str(obj), "-o", str(lib), "-lm"]):
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-2000:]}")
        os.replace(lib, target)


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _bind(lib: ctypes.CDLL, name: str) -> ctypes.CDLL:
    """Declare the C signatures of source file `name`'s functions on its loaded library."""
    for function, pointers, ints, floats in _SOURCES[name]:
        kernel = getattr(lib, function)
        kernel.argtypes = ([ctypes.c_void_p] * pointers + [ctypes.c_int64] * ints + [ctypes.c_float] * floats
                           + [ctypes.c_int])
        kernel.restype = None
    return lib


def build_variant(name: str, source: Path, target: Path) -> ctypes.CDLL:
    """Another version of kernel file `name` (for example an older commit's, for an A/B benchmark), built
    from `source` into `target` with the same flags and loaded. Raises where it cannot be built."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found")
    _build(compiler, source, target)
    return _bind(ctypes.CDLL(str(target)), name)


@functools.cache
def _library(name: str) -> ctypes.CDLL | None:
    compiler = _compiler()
    if compiler is None:
        logger.warning("no C compiler found: %s's kernels fall back to pure torch", name)
        return None
    source = resources.files(__package__) / name
    key = hashlib.sha256()
    sources = (resources.files(__package__) / other for other in (*sorted(_SOURCES), *_HEADERS))
    for part in (*(s.read_bytes() for s in sources), compiler.encode(),
                 " ".join(_COMPILE_FLAGS + _LINK_FLAGS).encode(), platform.machine().encode(),
                 _cpu_features().encode()):
        key.update(part)
    target = cache_dir() / "kernels" / f"{name.removesuffix('.c')}-{key.hexdigest()[:16]}.so"
    try:
        if not target.exists():
            with resources.as_file(source) as path:
                _build(compiler, path, target)
            logger.info("built CPU kernel %s", target)
        lib = ctypes.CDLL(str(target))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        logger.warning("CPU kernels of %s unavailable (%s): using the pure-torch path", name, exc)
        return None
    return _bind(lib, name)


def paged_decode_attention() -> PagedDecodeAttention | None:
    """The paged decode-attention kernel (float32 queries), or None where it cannot be built here.

    The returned function takes (out, q, k_cache, v_cache, block_tables, seq_lens, scale, k_params=None,
    v_params=None): out/q [N, H, D] float32, caches [num_blocks, block_size, KVH, D] float32, or int8 codes
    with k/v_params [num_blocks, block_size, KVH, 2] float16 (scale, zero), block_tables [N, max_blocks]
    int32, seq_lens [N] int32, all contiguous CPU tensors; it writes out in place.
    """
    lib = _library("paged_attention.c")
    return None if lib is None else attention_entry(lib)


def attention_entry(lib: ctypes.CDLL) -> PagedDecodeAttention:
    """paged_decode_attention's function over a loaded paged_attention.c library."""

    def run(out: torch.Tensor, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
            block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
            k_params: torch.Tensor | None = None, v_params: torch.Tensor | None = None) -> None:
        num_seqs, num_heads, head_dim = q.shape
        caches = [k_cache.data_ptr(), v_cache.data_ptr()]
        if k_params is None:
            kernel = lib.paged_decode_attention_f32
        else:
            kernel = lib.paged_decode_attention_i8
            caches += [k_params.data_ptr(), v_params.data_ptr()]
        kernel(out.data_ptr(), q.data_ptr(), *caches, block_tables.data_ptr(), seq_lens.data_ptr(), num_seqs,
               num_heads, k_cache.shape[2], head_dim, k_cache.shape[1], block_tables.shape[1], scale,
               torch.get_num_threads())

    return run


# (x [M, K], weight [N, K], bias [N] or None) -> [M, N]
SmallLinear = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


@functools.cache
def small_linear() -> SmallLinear | None:
    """`F.linear` for a few rows of contiguous float32 CPU tensors, split over torch's threads
    (small_linear.c), or None where it cannot be built here."""
    lib = _library("small_linear.c")
    if lib is None:
        return None
    kernel = lib.small_linear_f32

    def run(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        (m, k), n = x.shape, weight.shape[0]
        # The kernel trusts its shapes: a mismatch would read out of bounds, not raise as F.linear does.
        if weight.shape[1] != k or (bias is not None and (bias.shape != (n,) or not bias.is_contiguous()
                                                          or bias.dtype != torch.float32)):
            raise ValueError(f"small_linear: x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
                             f"bias {None if bias is None else (tuple(bias.shape), bias.dtype)} do not match")
        y = torch.empty(m, n, dtype=x.dtype)
        kernel(y.data_ptr(), x.data_ptr(), weight.data_ptr(), None if bias is None else bias.data_ptr(), m, n, k,
               torch.get_num_threads())
        return y

    return run


@functools.cache
def llama_decode_layers() -> Callable[..., None] | None:
    """decode_layers.c's `llama_decode_layers_f32` (raw pointers and sizes, see its header; the caller checks
    every shape, since the C code trusts them), or None where it cannot be built here."""
    lib = _library("decode_layers.c")
    return None if lib is None else lib.llama_decode_layers_f32
