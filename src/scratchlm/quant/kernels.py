"""The packed-weight kernels (``kernels.c``): compiled on first use, cached, with a torch fallback.

The C file is compiled for this machine (``-O3 -march=native``, OpenMP) by the C compiler the
system has (``$CC``, else ``cc``/``gcc``/``clang``), in about a second, into
``$SCRATCHLM_CACHE`` (default ``~/.cache/scratchlm``) under a name that hashes the source, the
compiler's version and the CPU's feature flags — a machine with other instructions builds its
own.  It is loaded with ``ctypes``: a plain C ABI, no Python headers, so no build step at install
time.  Without a compiler (or with ``SCRATCHLM_NO_KERNELS=1``) every operation runs through the
reference path instead — the same numbers from ``quant.formats``' dequantization and a torch
matmul, much slower when decoding — and a warning says so once.

The library's OpenMP runtime is the one torch already loaded (``libgomp.so.1`` by soname), so the
kernels and torch share one thread pool; each call passes ``torch.get_num_threads()``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from scratchlm.quant.formats import FORMATS, dequantize

__all__ = ["KERNEL_TYPES", "qmatmul", "dequantize_rows", "kernels_available"]

KERNEL_TYPES = {"Q8_0": 0, "Q4_0": 1, "Q4_1": 2}  # the C enum
_SOURCE = Path(__file__).with_name("kernels.c")
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]
_lib: ctypes.CDLL | None | bool = None  # None: not tried yet; False: unavailable


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return sys.platform


def _build() -> ctypes.CDLL | None:
    if os.environ.get("SCRATCHLM_NO_KERNELS"):
        return None
    cc = _compiler()
    if cc is None:
        warnings.warn("no C compiler found: packed GGUF weights run through the slow reference path "
                      "(install gcc or clang, or set CC)", stacklevel=3)
        return None
    source = _SOURCE.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(b"\0".join([source, " ".join(_FLAGS).encode(), version.encode(),
                                     _cpu_flags().encode()])).hexdigest()[:16]
    cache = Path(os.environ.get("SCRATCHLM_CACHE", Path.home() / ".cache" / "scratchlm")).expanduser()
    target = cache / f"quant_kernels_{key}.so"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        result = subprocess.run([cc, *_FLAGS, "-o", tmp, str(_SOURCE)], capture_output=True, text=True)
        if result.returncode != 0:
            os.unlink(tmp)
            warnings.warn(f"compiling the packed-weight kernels with {cc} failed, so packed GGUF weights "
                          f"run through the slow reference path: {result.stderr.strip()[:300]}", stacklevel=3)
            return None
        os.replace(tmp, target)  # atomic: a concurrent build of the same key writes the same file
    lib = ctypes.CDLL(str(target))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.slm_qmatmul.argtypes = [ctypes.c_int, ptr, i64, i64, ptr, i64, i64, ptr, i64, ctypes.c_int]
    lib.slm_qmatmul.restype = None
    lib.slm_dequantize_rows.argtypes = [ctypes.c_int, ptr, i64, ptr, i64, ptr, ctypes.c_int]
    lib.slm_dequantize_rows.restype = None
    return lib


def _library() -> ctypes.CDLL | None:
    global _lib
    if _lib is None:
        _lib = _build() or False
    return _lib or None


def kernels_available() -> bool:
    """Whether the compiled kernels are in use (else the reference path runs)."""
    return _library() is not None


def qmatmul(blocks: torch.Tensor, type_name: str, rows: int, cols: int, x: torch.Tensor) -> torch.Tensor:
    """``x @ Wᵀ`` for x [n, cols] (fp32, contiguous) and W [rows, cols] packed in ``blocks`` (uint8).

    The compiled kernel reads W in place; the reference path dequantizes it.  Equal up to fp32
    rounding of the sums (the tests bound it).
    """
    lib = _library()
    n = x.shape[0]
    if lib is None:
        return x @ dequantize_rows(blocks, type_name, rows, cols).T
    y = torch.empty(n, rows, dtype=torch.float32)
    lib.slm_qmatmul(KERNEL_TYPES[type_name], blocks.data_ptr(), rows, cols, x.data_ptr(), n, cols,
                    y.data_ptr(), rows, torch.get_num_threads())
    return y


def dequantize_rows(blocks: torch.Tensor, type_name: str, rows: int, cols: int,
                    index: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``index`` (default: all) of the packed W, as float32 [len(index), cols], bit-identical to
    ``quant.formats.dequantize``."""
    lib = _library()
    if lib is None:
        fmt = FORMATS[type_name]
        table = blocks.numpy().reshape(rows, cols // fmt.per_block * fmt.block_bytes)
        picked = table if index is None else table[index.numpy()]
        values = dequantize(np.ascontiguousarray(picked).reshape(-1), type_name, picked.shape[0] * cols)
        return torch.from_numpy(values.reshape(-1, cols))
    if index is None:
        index = torch.arange(rows)
    index = index.to(torch.int64).contiguous()
    out = torch.empty(index.numel(), cols, dtype=torch.float32)
    lib.slm_dequantize_rows(KERNEL_TYPES[type_name], blocks.data_ptr(), cols, index.data_ptr(), index.numel(),
                            out.data_ptr(), torch.get_num_threads())
    return out
