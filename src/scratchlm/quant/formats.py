"""GGML block formats: dequantize every type GGUF files use for our models, quantize Q8_0/Q4_0/Q4_1.

NumPy only (no torch): the tokenizer and the header reader import this module's users cheaply.
A quantized row is a sequence of blocks; each block holds ``per_block`` consecutive values as
small integers and one or a few scales.  Layouts, in the order the bytes sit in a block:

* ``Q8_0`` (32 values, 34 B): fp16 ``d``, 32 × int8 ``q``;  x = q·d
* ``Q4_0`` (32, 18 B): fp16 ``d``, 16 B of nibbles;  x = (q − 8)·d
* ``Q4_1`` (32, 20 B): fp16 ``d``, fp16 ``m``, 16 B of nibbles;  x = q·d + m
* ``Q5_0`` / ``Q5_1``: as Q4_0 / Q4_1 with a uint32 of fifth bits after the scales; q − 16 / q·d + m
* K-quants, super-blocks of 256 values split into sub-blocks of 16 or 32 with small integer
  scales multiplied by an fp16 super-scale: ``Q2_K`` (2-bit q, 4-bit scale and min per 16),
  ``Q3_K`` (3-bit q, 6-bit signed scale per 16), ``Q4_K`` / ``Q5_K`` (4/5-bit q, 6-bit scale and
  min per 32: x = d·sc·q − dmin·m), ``Q6_K`` (6-bit q − 32, int8 scale per 16), ``Q8_K`` (fp32 d,
  int8 q, int16 block sums that dequantization ignores).

In every nibble format, a block's 16 bytes hold elements 0–15 in their low nibbles and 16–31 in
their high ones.  Each dequantizer is a few whole-array operations evaluated in the order
``gguf.quants`` evaluates them (each product and sum rounded to float32), so the results are
bit-identical to it (the tests compare on random blocks); ``Q8_K``, which ``gguf`` does not
dequantize, is tested against the format by hand.  The quantizers round as llama.cpp's reference
``quantize_row_*`` do, which ``gguf.quants.quantize`` reproduces; ours equal it byte for byte.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from scratchlm.errors import CheckpointError

__all__ = ["BlockFormat", "FORMATS", "SUPPORTED_TYPES", "QUANTIZABLE", "dequantize", "quantize",
           "unsupported_type"]

QK_K = 256  # values per K-quant super-block


# --------------------------------------------------------------------------------------------
# Dequantization
# --------------------------------------------------------------------------------------------


def _fp16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The fp16 number at byte ``start`` of every block, as float32 [n_blocks, 1]."""
    return blocks[:, start:start + 2].view(np.float16).astype(np.float32)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """[n, 16·k] bytes → [n, 32·k] uint8: per 16 bytes, 16 low nibbles then 16 high nibbles."""
    n = packed.shape[0]
    grouped = packed.reshape(n, -1, 1, 16) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (grouped & np.uint8(0x0F)).reshape(n, -1)


def _bits(packed: np.ndarray, count: int, width: int) -> np.ndarray:
    """Split each byte of [n, b] into ``count`` fields of ``width`` bits, lowest first, grouped per
    shift: [n, b] → [n, count, b] (field j of byte i at [:, j, i])."""
    shifts = np.arange(0, count * width, width, dtype=np.uint8).reshape(1, count, 1)
    return (packed[:, None, :] >> shifts) & np.uint8((1 << width) - 1)


def _f32(blocks: np.ndarray, out: np.ndarray) -> None:
    np.copyto(out, blocks.view(np.float32))


def _f16(blocks: np.ndarray, out: np.ndarray) -> None:
    np.copyto(out, blocks.view(np.float16))


def _bf16(blocks: np.ndarray, out: np.ndarray) -> None:
    """bfloat16 is the top half of a float32: shift the bits up."""
    np.left_shift(blocks.view(np.uint16), 16, out=out.view(np.uint32), dtype=np.uint32)


def _q8_0(blocks: np.ndarray, out: np.ndarray) -> None:
    np.multiply(blocks[:, 2:].view(np.int8), _fp16(blocks, 0), out=out)


def _q4_0(blocks: np.ndarray, out: np.ndarray) -> None:
    q = _nibbles(blocks[:, 2:]).astype(np.int8) - np.int8(8)
    np.multiply(_fp16(blocks, 0), q, out=out, dtype=np.float32)


def _q4_1(blocks: np.ndarray, out: np.ndarray) -> None:
    np.multiply(_fp16(blocks, 0), _nibbles(blocks[:, 4:]), out=out, dtype=np.float32)
    np.add(out, _fp16(blocks, 2), out=out)


def _fifth_bits(blocks: np.ndarray, start: int) -> np.ndarray:
    """Q5's uint32 of high bits at byte ``start``: bit j is element j's fifth bit, as [n, 32] 0/16."""
    high = blocks[:, start:start + 4].copy().view(np.uint32)
    return (((high >> np.arange(32, dtype=np.uint32)) & np.uint32(1)) << np.uint32(4)).astype(np.uint8)


def _q5_0(blocks: np.ndarray, out: np.ndarray) -> None:
    q = (_nibbles(blocks[:, 6:]) | _fifth_bits(blocks, 2)).astype(np.int8) - np.int8(16)
    np.multiply(_fp16(blocks, 0), q, out=out, dtype=np.float32)


def _q5_1(blocks: np.ndarray, out: np.ndarray) -> None:
    q = _nibbles(blocks[:, 8:]) | _fifth_bits(blocks, 4)
    np.multiply(_fp16(blocks, 0), q, out=out, dtype=np.float32)
    np.add(out, _fp16(blocks, 2), out=out)


def _q2_k(blocks: np.ndarray, out: np.ndarray) -> None:
    """16 B of (min << 4 | scale) per 16 values, 64 B of 2-bit q, fp16 d, fp16 dmin.
    Each 32 bytes of q hold 128 values: 2-bit field j of byte i is value 32·j + i."""
    n = blocks.shape[0]
    scales = blocks[:, :16]
    d, dmin = _fp16(blocks, 80), _fp16(blocks, 82)
    dl = (d * (scales & np.uint8(0x0F)).astype(np.float32)).reshape(n, 16, 1)
    ml = (dmin * (scales >> np.uint8(4)).astype(np.float32)).reshape(n, 16, 1)
    q = _bits(blocks[:, 16:80].reshape(n * 2, 32), 4, 2).reshape(n, 16, 16).astype(np.float32)
    np.subtract(dl * q, ml, out=out.reshape(n, 16, 16))


def _q3_k(blocks: np.ndarray, out: np.ndarray) -> None:
    """32 B high-bit mask, 64 B of 2-bit low q, 12 B of 6-bit scales, fp16 d.
    q = low − 4 where the mask bit is 0; scale − 32 per 16 values."""
    n = blocks.shape[0]
    hmask, qs, packed, d = blocks[:, :32], blocks[:, 32:96], blocks[:, 96:108], _fp16(blocks, 108)
    low4 = _bits(packed[:, :8], 2, 4).reshape(n, 16)  # scales 0–7 low nibbles, then 8–15
    high2 = _bits(packed[:, 8:12], 4, 2).reshape(n, 16)  # 2-bit field j of byte i is scale 4·j + i
    scales = ((low4 | (high2 << np.uint8(4))).astype(np.int8) - np.int8(32)).astype(np.float32)
    dl = (d * scales).reshape(n, 16, 1)
    low = _bits(qs.reshape(n * 2, 32), 4, 2).reshape(n, 16, 16)
    high = _bits(hmask, 8, 1).reshape(n, 16, 16) ^ np.uint8(1)
    q = (low.astype(np.int8) - (high << np.uint8(2)).astype(np.int8)).astype(np.float32)
    np.multiply(dl, q, out=out.reshape(n, 16, 16))


def _k_scale_min(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes → 8 six-bit scales and 8 six-bit mins: bytes 0–3 hold scales 0–3 (low 6
    bits) and the top 2 bits of scales 4–7; 4–7 likewise for mins; 8–11 the low 4 bits of scales
    4–7 (low nibble) and mins 4–7 (high nibble)."""
    a, b, c = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    low6, top2, low4 = np.uint8(0x3F), np.uint8(0x30), np.uint8(0x0F)
    scale = np.concatenate([a & low6, (c & low4) | ((a >> np.uint8(2)) & top2)], 1)
    low_min = np.concatenate([b & low6, (c >> np.uint8(4)) | ((b >> np.uint8(2)) & top2)], 1)
    return scale, low_min


def _q45_k_scales(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's per-32 scale d·sc and offset dmin·min, float32 [n, 8, 1] each."""
    n = blocks.shape[0]
    sc, mn = _k_scale_min(blocks[:, 4:16])
    d = (_fp16(blocks, 0) * sc.astype(np.float32)).reshape(n, 8, 1)
    dm = (_fp16(blocks, 2) * mn.astype(np.float32)).reshape(n, 8, 1)
    return d, dm


def _q45_k(blocks: np.ndarray, out: np.ndarray, q: np.ndarray) -> None:
    n = blocks.shape[0]
    d, dm = _q45_k_scales(blocks)
    np.subtract(d * q.reshape(n, 8, 32).astype(np.float32), dm, out=out.reshape(n, 8, 32))


def _q4_k_ints(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    return _bits(blocks[:, 16:].reshape(n * 4, 32), 2, 4).reshape(n, 8, 32)


def _q4_k(blocks: np.ndarray, out: np.ndarray) -> None:
    """fp16 d, fp16 dmin, 12 B of scales/mins, 128 B of nibbles (per 32 B: 32 low, then 32 high)."""
    _q45_k(blocks, out, _q4_k_ints(blocks))


def _q5_k(blocks: np.ndarray, out: np.ndarray) -> None:
    """As Q4_K with 32 B of fifth bits before the nibbles: bit j of byte i is value 32·j + i's."""
    n = blocks.shape[0]
    low = _bits(blocks[:, 48:].reshape(n * 4, 32), 2, 4).reshape(n, 8, 32)
    high = _bits(blocks[:, 16:48], 8, 1).reshape(n, 8, 32)
    _q45_k(blocks, out, low | (high << np.uint8(4)))


def _q6_k(blocks: np.ndarray, out: np.ndarray) -> None:
    """128 B of low nibbles, 64 B of 2-bit highs, 16 int8 scales (one per 16 values), fp16 d.
    Per half (128 values): 64 low bytes give values 0–63 (low nibble) and 64–127 (high); 32 high
    bytes give 2-bit field j of byte i to value 32·j + i."""
    dl, q = _q6_k_parts(blocks)
    np.multiply(dl, q.astype(np.float32), out=out.reshape(-1, 16, 16))


def _q6_k_parts(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q6_K's per-16 scales d·sc, float32 [n, 16, 1], and its values q − 32, int8 [n, 16, 16]."""
    n = blocks.shape[0]
    scales = blocks[:, 192:208].view(np.int8).astype(np.float32)
    dl = (_fp16(blocks, 208) * scales).reshape(n, 16, 1)
    low = _bits(blocks[:, :128].reshape(n * 2, 64), 2, 4).reshape(n, 8, 32)
    high = _bits(blocks[:, 128:192].reshape(n * 2, 32), 4, 2).reshape(n, 8, 32)
    q = (low | (high << np.uint8(4))).astype(np.int8) - np.int8(32)
    return dl, q.reshape(n, 16, 16)


def k_quant_parts(type_name: str, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """The pieces a K-quant block dequantizes from, in value order, for re-blocking without loss:
    Q4_K: (d·sc [n·8], dmin·min [n·8], q uint8 [n·256]); Q6_K: (d·sc [n·16], None, q − 32 int8 [n·256]).
    The products are formed exactly as the dequantizers form them."""
    if type_name == "Q4_K":
        d, dm = _q45_k_scales(blocks)
        return d.reshape(-1), dm.reshape(-1), _q4_k_ints(blocks).reshape(-1)
    if type_name == "Q6_K":
        dl, q = _q6_k_parts(blocks)
        return dl.reshape(-1), None, q.reshape(-1)
    raise ValueError(f"{type_name} is not re-blocked")


def _q8_k(blocks: np.ndarray, out: np.ndarray) -> None:
    """fp32 d, 256 × int8 q, 16 × int16 block sums (for dot products; not needed here)."""
    np.multiply(blocks[:, 4:260].view(np.int8), blocks[:, :4].copy().view(np.float32), out=out)


@dataclass(frozen=True)
class BlockFormat:
    """A GGML type: values and bytes per block, and its block dequantizer
    ``fill(bytes[n_blocks, block_bytes], out float32[n_blocks, per_block])``."""

    name: str
    per_block: int
    block_bytes: int
    fill: Callable[[np.ndarray, np.ndarray], None]


FORMATS: dict[str, BlockFormat] = {f.name: f for f in (
    BlockFormat("F32", 1, 4, _f32),
    BlockFormat("F16", 1, 2, _f16),
    BlockFormat("BF16", 1, 2, _bf16),
    BlockFormat("Q8_0", 32, 34, _q8_0),
    BlockFormat("Q4_0", 32, 18, _q4_0),
    BlockFormat("Q4_1", 32, 20, _q4_1),
    BlockFormat("Q5_0", 32, 22, _q5_0),
    BlockFormat("Q5_1", 32, 24, _q5_1),
    BlockFormat("Q2_K", QK_K, 84, _q2_k),
    BlockFormat("Q3_K", QK_K, 110, _q3_k),
    BlockFormat("Q4_K", QK_K, 144, _q4_k),
    BlockFormat("Q5_K", QK_K, 176, _q5_k),
    BlockFormat("Q6_K", QK_K, 210, _q6_k),
    BlockFormat("Q8_K", QK_K, 292, _q8_k),
)}
SUPPORTED_TYPES = tuple(FORMATS)


def dequantize(raw: np.ndarray, type_name: str, n_elements: int, name: str = "tensor",
               out: np.ndarray | None = None) -> np.ndarray:
    """The float32 values [n_elements] stored in ``raw`` (flat uint8) as GGML type ``type_name``.

    NumPy rather than torch: its ops run on one thread, which keeps loading fast when the cores
    are busy (torch's thread pool slows ~20x when oversubscribed).  ``out`` (float32, contiguous)
    receives the values, e.g. a parameter's own memory.
    """
    if type_name not in FORMATS:
        raise unsupported_type(name, type_name)
    fmt = FORMATS[type_name]
    if n_elements % fmt.per_block or raw.size != n_elements // fmt.per_block * fmt.block_bytes:
        raise CheckpointError(f"tensor {name}: {raw.size} bytes do not hold {n_elements} {type_name} values",
                              "the file is damaged; download it again")
    if out is None:
        out = np.empty(n_elements, dtype=np.float32)
    elif out.dtype != np.float32 or out.size != n_elements or not out.flags.c_contiguous:
        # a strided out would be reshaped into a copy, and the values would never reach it
        raise ValueError(f"out must be a contiguous float32 array of {n_elements} values")
    fmt.fill(raw.reshape(-1, fmt.block_bytes), out.reshape(-1, fmt.per_block))
    return out


def unsupported_type(name: str, type_name: str) -> CheckpointError:
    return CheckpointError(
        f"tensor {name} is stored as {type_name}, which scratchlm cannot dequantize",
        f"supported GGUF types: {', '.join(SUPPORTED_TYPES)}; re-quantize with llama.cpp's llama-quantize "
        "(e.g. to Q8_0) or load the original Hugging Face checkpoint")


# --------------------------------------------------------------------------------------------
# Quantization (llama.cpp's reference rounding)
# --------------------------------------------------------------------------------------------


def _inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)


def _round_half_away(x: np.ndarray) -> np.ndarray:
    """C's ``roundf``: halves go away from zero (NumPy's ``round`` goes to even).  Not
    ``floor(|x| + 0.5)``: that sum rounds up for the float just below 0.5."""
    a = np.abs(x)
    whole = np.floor(a)
    return np.copysign(whole + np.floor(2 * (a - whole)), x)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """[n, 32] values 0–15 → [n, 16] bytes: element i in the low nibble, i + 16 in the high one."""
    return q[:, :16] | (q[:, 16:] << np.uint8(4))


def _quantize_q8_0(x: np.ndarray) -> np.ndarray:
    d = np.abs(x).max(axis=1, keepdims=True) / np.float32(127)
    q = _round_half_away(x * _inverse(d)).astype(np.int8)
    return np.concatenate([d.astype(np.float16).view(np.uint8), q.view(np.uint8)], axis=1)


def _quantize_q4_0(x: np.ndarray) -> np.ndarray:
    """d = (the value of largest magnitude, first if tied) / −8; q = trunc(x/d + 8.5) capped at 15."""
    extreme = np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)
    d = extreme / np.float32(-8)
    q = np.minimum(np.trunc(x * _inverse(d) + np.float32(8.5)), 15).astype(np.uint8)
    return np.concatenate([d.astype(np.float16).view(np.uint8), _pack_nibbles(q)], axis=1)


def _quantize_q4_1(x: np.ndarray) -> np.ndarray:
    """d = (max − min) / 15, m = min; q = trunc((x − m)/d + 0.5) capped at 15."""
    low, high = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
    d = (high - low) / np.float32(15)
    q = np.minimum(np.trunc((x - low) * _inverse(d) + np.float32(0.5)), 15).astype(np.uint8)
    return np.concatenate([d.astype(np.float16).view(np.uint8), low.astype(np.float16).view(np.uint8),
                           _pack_nibbles(q)], axis=1)


_QUANTIZERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "Q8_0": _quantize_q8_0, "Q4_0": _quantize_q4_0, "Q4_1": _quantize_q4_1}
QUANTIZABLE = tuple(_QUANTIZERS)


def quantize(values: np.ndarray, type_name: str) -> np.ndarray:
    """``values`` [..., n] (n a multiple of 32) as ``type_name`` blocks: uint8 [..., n/32 · block_bytes].

    ``F32``/``F16`` are plain casts (their "blocks" are single values, as GGUF stores them).
    """
    values = np.ascontiguousarray(values, dtype=np.float32)
    if type_name in ("F32", "F16"):
        return values.astype(np.float32 if type_name == "F32" else np.float16).view(np.uint8)
    if type_name not in _QUANTIZERS:
        raise ValueError(f"cannot quantize to {type_name}; scratchlm quantizes to {', '.join(QUANTIZABLE)}")
    fmt = FORMATS[type_name]
    if values.shape[-1] % fmt.per_block:
        raise ValueError(f"rows of {values.shape[-1]} values do not fill {type_name} blocks "
                         f"of {fmt.per_block}")
    blocks = _QUANTIZERS[type_name](values.reshape(-1, fmt.per_block))
    return blocks.reshape(*values.shape[:-1], values.shape[-1] // fmt.per_block * fmt.block_bytes)
