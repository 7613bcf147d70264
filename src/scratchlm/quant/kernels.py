"""The packed-weight kernels (``kernels.c``): compiled on first use, cached, with a torch fallback.

The C file is compiled for this machine (``-O3 -march=native``, OpenMP) by the C compiler the
system has (``$CC``, else ``cc``/``gcc``/``clang``), in about a second, into
``$SCRATCHLM_CACHE`` (default ``~/.cache/scratchlm``) under a name that hashes the source, the
compiler's version and the CPU's feature flags — a machine with other instructions builds its
own.  It is loaded with ``ctypes``: a plain C ABI, no Python headers, so no build step at install
time.  Without a compiler (or with ``SCRATCHLM_NO_KERNELS=1``) every operation runs through the
reference path instead — the same numbers from ``quant.formats``' dequantization and a torch
matmul (with x rounded as the integer kernels round it, ``round_activations``), much slower when
decoding — and a warning says so once.

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

from scratchlm.errors import ConfigError
from scratchlm.quant.formats import FORMATS, dequantize, k_quant_parts

__all__ = ["KERNEL_TYPES", "KERNEL_BLOCK_BYTES", "ACTIVATION_MODES", "reblock", "qmatmul", "qgemm",
           "round_activations", "dequantize_rows", "kernels_available", "DecoderTable", "BlockTable",
           "LinearTable", "decode_tokens"]

# GGML type → the C enum of the layout the kernels read.  Q8_0/Q4_0/Q4_1 are read as the file
# stores them; Q4_K and Q6_K are re-blocked first (``reblock``), without loss, into blocks of 32.
KERNEL_TYPES = {"Q8_0": 0, "Q4_0": 1, "Q4_1": 2, "Q4_K": 3, "Q6_K": 4}
KERNEL_BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "Q4_K": 24, "Q6_K": 40}  # per 32 values
_SOURCE = Path(__file__).with_name("kernels.c")
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]
# SCRATCHLM_KERNELS_PORTABLE=1: the portable C path (no -march: no AVX-512 code, no F16C);
# SCRATCHLM_KERNELS_CFLAGS: flags added, e.g. "-mno-avx512vnni" (vpmaddubsw for vpdpbusd, as on Skylake-X)
# or "-mno-avx512f" (portable C with AVX2 and F16C, as on Haswell to Zen 3): the tests build these paths
_PORTABLE_FLAGS = ["-O3", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]
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
    flags = _PORTABLE_FLAGS if os.environ.get("SCRATCHLM_KERNELS_PORTABLE") else _FLAGS
    flags = [*flags, *os.environ.get("SCRATCHLM_KERNELS_CFLAGS", "").split()]
    source = _SOURCE.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), version.encode(),
                                     _cpu_flags().encode()])).hexdigest()[:16]
    cache = Path(os.environ.get("SCRATCHLM_CACHE", Path.home() / ".cache" / "scratchlm")).expanduser()
    target = cache / f"quant_kernels_{key}.so"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        result = subprocess.run([cc, *flags, "-o", tmp, str(_SOURCE)], capture_output=True, text=True)
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
    lib.slm_qmatmul_int.argtypes = [ctypes.c_int, *lib.slm_qmatmul.argtypes]  # type, bits, then slm_qmatmul's
    lib.slm_qmatmul_int.restype = ctypes.c_int
    lib.slm_dequantize_rows.argtypes = [ctypes.c_int, ptr, i64, ptr, i64, ptr, ctypes.c_int]
    lib.slm_dequantize_rows.restype = None
    lib.slm_qgemm_int.argtypes = lib.slm_qmatmul_int.argtypes
    lib.slm_qgemm_int.restype = ctypes.c_int
    lib.slm_decode.argtypes = [ptr, ctypes.c_int, ptr, i64, ptr, ptr, ptr, i64, i64, ptr, i64, ptr,
                               ctypes.c_int]
    lib.slm_decode.restype = ctypes.c_int
    return lib


def _library() -> ctypes.CDLL | None:
    global _lib
    if _lib is None:
        try:
            _lib = _build() or False
        except OSError as err:  # an unwritable cache, a library that will not load
            warnings.warn(f"the packed-weight kernels are unavailable ({err}), so packed GGUF weights run "
                          "through the slow reference path", stacklevel=2)
            _lib = False
    return _lib or None


def kernels_available() -> bool:
    """Whether the compiled kernels are in use (else the reference path runs)."""
    return _library() is not None


def reblock(type_name: str, blocks: np.ndarray) -> np.ndarray:
    """A GGUF tensor's blocks [rows, row bytes] in the layout the kernels read, [rows, cols/32 · bytes].

    Q4_K → 32-value blocks of fp32 d = d·sc and m = −dmin·min plus the 16 bytes of nibbles (low
    nibbles elements 0–15); Q6_K → 32-value blocks of two fp32 scales d·sc (one per 16 values)
    plus 32 int8 q − 32.  The scales are the very products ``gguf.quants`` forms when it
    dequantizes, so the kernels' values equal its values bit for bit.  Other types pass through.
    """
    if type_name not in ("Q4_K", "Q6_K"):
        return blocks
    rows = blocks.shape[0]
    scales, offsets, q = k_quant_parts(type_name, blocks.reshape(-1, FORMATS[type_name].block_bytes))
    n = scales.size // (2 if type_name == "Q6_K" else 1)  # 32-value blocks
    if type_name == "Q4_K":
        q = q.reshape(n, 32)
        packed = q[:, :16] | (q[:, 16:] << np.uint8(4))
        head = np.stack([scales.reshape(n), -offsets.reshape(n)], axis=1).astype(np.float32)
    else:
        packed = q.reshape(n, 32).view(np.uint8)
        head = scales.reshape(n, 2).astype(np.float32)
    return np.concatenate([head.view(np.uint8), packed], axis=1).reshape(rows, -1)


def _dequantize_layout(table: np.ndarray, type_name: str, cols: int) -> np.ndarray:
    """The reference path's dequantization of rows in the kernels' layout (float32 [rows, cols])."""
    rows = table.shape[0]
    if type_name in ("Q4_K", "Q6_K"):
        blocks = table.reshape(-1, KERNEL_BLOCK_BYTES[type_name])
        head = np.ascontiguousarray(blocks[:, :8]).view(np.float32)
        if type_name == "Q4_K":
            q = np.concatenate([blocks[:, 8:] & np.uint8(0x0F), blocks[:, 8:] >> np.uint8(4)], axis=1)
            values = q.astype(np.float32) * head[:, :1] + head[:, 1:]
        else:
            q = blocks[:, 8:].view(np.int8).astype(np.float32).reshape(-1, 2, 16)
            values = q * head.reshape(-1, 2, 1)
        return values.reshape(rows, cols)
    values = dequantize(np.ascontiguousarray(table).reshape(-1), type_name, rows * cols)
    return values.reshape(rows, cols)


# Decode activations: rounded per block of 32 to 15 or 8 bits for the integer kernels, or fp32.
ACTIVATION_MODES = ("int15", "int8", "fp32")
_LEVELS = {"int15": 16256, "int8": 127}  # the largest |q| (15 bits: two bytes 128·h + l, |h| ≤ 127)
_BITS = {"int15": 15, "int8": 8}  # the kernels' argument


def _bits(activations: str) -> int:
    """The kernels' argument for an integer rounding; any other name is a ``ConfigError``."""
    if activations not in _BITS:
        raise ConfigError(f"unknown activations rounding {activations!r}",
                          f"use one of {', '.join(ACTIVATION_MODES)}")
    return _BITS[activations]


def round_activations(x: torch.Tensor, activations: str) -> torch.Tensor:
    """x (fp32, last dimension a multiple of 32) as the integer kernels round it: per block of 32,
    ``dx · q`` with ``dx = amax / L`` and ``q = round-half-even(x · L/amax)``, L = 127 for int8
    (llama.cpp's ``quantize_row_q8_1``, with an fp32 scale) or 16256 for int15.  The reference path
    multiplies this by the dequantized W, the integer kernels' product up to fp32 rounding; a block
    holding a NaN or an infinity gives NaN (the kernels give NaN where it is used)."""
    _bits(activations)
    levels = _LEVELS[activations]
    blocks = x.reshape(-1, 32)
    amax = blocks.abs().amax(dim=1, keepdim=True)
    # (a true division, as the kernels' L / amax: ``levels / amax`` would be amax.reciprocal() · L,
    # which rounds differently now and then, and with it a value next to a step's midpoint)
    inverse = torch.where(amax == 0, torch.zeros_like(amax), torch.full_like(amax, levels) / amax)
    return (torch.round(blocks * inverse) * (amax / levels)).reshape(x.shape)


def qmatmul(blocks: torch.Tensor, type_name: str, rows: int, cols: int, x: torch.Tensor,
            activations: str = "fp32") -> torch.Tensor:
    """``x @ Wᵀ`` for x [..., cols] (fp32, contiguous) and W [rows, cols] packed in ``blocks`` (uint8).

    ``activations="fp32"``: the dequantized weights' product up to fp32 rounding of the sums.
    ``"int15"`` / ``"int8"``: each token's x is first rounded per block of 32 to integers
    (``round_activations``) and each weight block's exact integer dot products are scaled in fp32,
    as llama.cpp decodes (int8 is its arithmetic); per output the difference from the fp32 product
    is at most ``√32/(2L) · ‖w_row‖ · ‖x‖`` (x moves by at most half its block's step amax/L), and
    a token's outputs do not depend on the tokens beside it.  The compiled kernels read W in place;
    the reference path dequantizes it.
    """
    lib = _library()
    bits = None if activations == "fp32" else _bits(activations)
    if lib is None:
        w = dequantize_rows(blocks, type_name, rows, cols)
        return (x if activations == "fp32" else round_activations(x, activations)) @ w.T
    y = torch.empty(*x.shape[:-1], rows, dtype=torch.float32)  # (int arguments: a tuple parses slowly)
    n = x.numel() // cols
    if bits is None:
        lib.slm_qmatmul(KERNEL_TYPES[type_name], blocks.data_ptr(), rows, cols, x.data_ptr(), n, cols,
                        y.data_ptr(), rows, torch.get_num_threads())
    elif lib.slm_qmatmul_int(KERNEL_TYPES[type_name], bits, blocks.data_ptr(),
                             rows, cols, x.data_ptr(), n, cols, y.data_ptr(), rows, torch.get_num_threads()):
        raise MemoryError(f"no memory for the rounded activations of {n} x {cols} values")
    return y


def qgemm(blocks: torch.Tensor, type_name: str, rows: int, cols: int, x: torch.Tensor,
          activations: str) -> torch.Tensor | None:
    """``x @ Wᵀ`` for many rows of x [n, cols] (fp32, contiguous) with x rounded as ``qmatmul``
    rounds it (``"int15"`` or ``"int8"``), as a matrix product (``slm_qgemm_int``: int16 panels of
    W, AVX512-VNNI); the same arithmetic as ``qmatmul``'s, up to fp32 rounding of the sums.  None
    where the kernels or that instruction set are missing."""
    lib = _library()
    if lib is None:
        return None
    bits = _bits(activations)
    y = torch.empty(x.shape[0], rows, dtype=torch.float32)
    status = lib.slm_qgemm_int(KERNEL_TYPES[type_name], bits, blocks.data_ptr(),
                               rows, cols, x.data_ptr(), x.shape[0], cols, y.data_ptr(), rows,
                               torch.get_num_threads())
    if status == -1:
        raise MemoryError(f"no memory for the rounded activations of {x.shape[0]} x {cols} values")
    return None if status else y


def dequantize_rows(blocks: torch.Tensor, type_name: str, rows: int, cols: int,
                    index: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``index`` (default: all) of the packed W, as float32 [len(index), cols], bit-identical to
    ``quant.formats.dequantize`` of the file's blocks."""
    lib = _library()
    if lib is None:
        table = blocks.numpy().reshape(rows, -1)
        picked = table if index is None else table[index.numpy()]
        return torch.from_numpy(_dequantize_layout(picked, type_name, cols))
    if index is None:
        index = torch.arange(rows)
    index = index.to(torch.int64).contiguous()
    out = torch.empty(index.numel(), cols, dtype=torch.float32)
    lib.slm_dequantize_rows(KERNEL_TYPES[type_name], blocks.data_ptr(), cols, index.data_ptr(), index.numel(),
                            out.data_ptr(), torch.get_num_threads())
    return out


class LinearTable(ctypes.Structure):
    """``slm_linear``: a packed matrix as the C side reads it."""
    _fields_ = [("w", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("rows", ctypes.c_int64),
                ("cols", ctypes.c_int64), ("type", ctypes.c_int64)]


class BlockTable(ctypes.Structure):
    """``slm_block``: one decoder layer (qkv rows q, k, v; up rows gate, up when gated)."""
    _fields_ = [("attn_norm", ctypes.c_void_p), ("attn_norm_bias", ctypes.c_void_p),
                ("mlp_norm", ctypes.c_void_p), ("mlp_norm_bias", ctypes.c_void_p), ("qkv", LinearTable),
                ("o", LinearTable), ("up", LinearTable), ("down", LinearTable)]


class DecoderTable(ctypes.Structure):
    """``slm_model``: a decoder (Llama-family or GPT-2 blocks) whose matrices are all packed."""
    _fields_ = [("n_layer", ctypes.c_int64), ("n_embd", ctypes.c_int64), ("n_head", ctypes.c_int64),
                ("n_kv_head", ctypes.c_int64), ("head_dim", ctypes.c_int64), ("intermediate", ctypes.c_int64),
                ("layer_norm", ctypes.c_int64), ("gated", ctypes.c_int64), ("norm_eps", ctypes.c_float),
                ("inv_freq", ctypes.c_void_p), ("blocks", ctypes.POINTER(BlockTable)),
                ("final_norm", ctypes.c_void_p), ("final_norm_bias", ctypes.c_void_p),
                ("lm_head", LinearTable)]


def decode_tokens(table: DecoderTable, activations: str, x: torch.Tensor, positions: torch.Tensor,
                  keys: torch.Tensor, values: torch.Tensor, past: int, key_mask: torch.Tensor | None,
                  ) -> torch.Tensor:
    """``slm_decode``: the next-token logits [n, vocab] of n new tokens, one per cache row, through
    the whole decoder in one call (its contract is in kernels.c); their keys and values are written
    at cache position ``past``.  x [n, n_embd] fp32 (the embeddings; overwritten), positions [n]
    int64, keys / values the cache [n_layer, n, n_kv_head, max_length, head_dim] fp32, key_mask
    None or [n, ≥ past + 1] int64 with unit column stride (0 at padding).  Needs the kernels."""
    lib = _library()
    if lib is None:
        raise RuntimeError("the packed-weight kernels are unavailable")
    n = x.shape[0]
    logits = torch.empty(n, table.lm_head.rows, dtype=torch.float32)
    status = lib.slm_decode(ctypes.addressof(table), _bits(activations), x.data_ptr(), n,
                            positions.data_ptr(), keys.data_ptr(), values.data_ptr(), keys.shape[3], past,
                            None if key_mask is None else key_mask.data_ptr(),
                            0 if key_mask is None else key_mask.stride(0), logits.data_ptr(),
                            torch.get_num_threads())
    if status:
        raise MemoryError(f"no memory for decoding {n} tokens")
    return logits
