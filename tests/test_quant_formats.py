"""GGML block formats: every dequantizer equal to ``gguf.quants.dequantize`` on random blocks, and
our quantizers byte-identical to ``gguf.quants.quantize``."""

from __future__ import annotations

import numpy as np
import pytest

from scratchlm.errors import CheckpointError
from scratchlm.quant.formats import FORMATS, QUANTIZABLE, dequantize, quantize

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
# every block type gguf dequantizes; Q8_K is checked by hand below
REFERENCE_TYPES = [name for name in FORMATS if name not in ("F32", "F16", "BF16", "Q8_K")]


def random_blocks(type_name: str, n_blocks: int, seed: int = 0) -> np.ndarray:
    """Random bytes for ``n_blocks`` blocks, with finite fp16 scales (random bytes could be NaN/inf)."""
    rng = np.random.default_rng(seed)
    fmt = FORMATS[type_name]
    blocks = rng.integers(0, 256, size=(n_blocks, fmt.block_bytes), dtype=np.uint8)
    scale_bytes = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2],
                   "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}
    for start in scale_bytes[type_name]:
        scales = rng.uniform(-2, 2, size=n_blocks).astype(np.float16)
        blocks[:, start:start + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return blocks


@pytest.mark.parametrize("type_name", REFERENCE_TYPES)
def test_dequantize_random_blocks_equal_gguf(type_name):
    blocks = random_blocks(type_name, 37)
    expected = gguf.quants.dequantize(blocks, Q[type_name]).reshape(-1)
    ours = dequantize(blocks.reshape(-1), type_name, expected.size)
    np.testing.assert_array_equal(ours, expected)


def test_q8_k_by_hand():
    d = np.float32(0.25)
    q = (np.arange(256) - 128).astype(np.int8)
    block = np.concatenate([np.array([d]).view(np.uint8), q.view(np.uint8), np.zeros(32, np.uint8)])
    np.testing.assert_array_equal(dequantize(block, "Q8_K", 256), q.astype(np.float32) * d)


def edge_values() -> np.ndarray:
    """Random rows plus the edge cases: zero, constant, outlier, one-signed, exact halves."""
    x = np.random.default_rng(5).standard_normal((16, 128)).astype(np.float32)
    x[0, :32] = 0.0
    x[1, :32] = 0.75
    x[2, 5] = 40.0
    x[3, 32:64] = -np.abs(x[3, 32:64])
    x[4, 64:96] = np.abs(x[4, 64:96])
    x[5, :32] = np.arange(32) / 2 - 8  # values landing on rounding halves
    x[6, :32] = np.float32(0.5) * 127 * (np.arange(32) % 3 - 1)
    return x


@pytest.mark.parametrize("type_name", QUANTIZABLE)
def test_quantize_equals_gguf(type_name):
    x = edge_values()
    expected = gguf.quants.quantize(x, Q[type_name])
    ours = quantize(x, type_name)
    assert ours.dtype == np.uint8 and ours.shape == expected.shape
    np.testing.assert_array_equal(ours, expected)


@pytest.mark.parametrize("type_name", QUANTIZABLE)
def test_quantize_then_dequantize_error_is_bounded(type_name):
    """Round trip within half a step of each block's scale (one step for the 4-bit formats' ends)."""
    x = edge_values()
    back = dequantize(quantize(x, type_name).reshape(-1), type_name, x.size).reshape(x.shape)
    blocks, restored = x.reshape(-1, 32), back.reshape(-1, 32)
    span = np.abs(blocks).max(1) / 127 if type_name == "Q8_0" else (
        np.abs(blocks).max(1) / 8 if type_name == "Q4_0" else (blocks.max(1) - blocks.min(1)) / 15)
    assert (np.abs(restored - blocks).max(1) <= span * 1.01 + 1e-3).all()


def test_bad_sizes_and_types():
    with pytest.raises(CheckpointError, match="do not hold"):
        dequantize(np.zeros(33, np.uint8), "Q8_0", 32)
    with pytest.raises(CheckpointError, match="IQ2_XXS.*supported GGUF types"):
        dequantize(np.zeros(66, np.uint8), "IQ2_XXS", 256)
    with pytest.raises(ValueError, match="blocks of 32"):
        quantize(np.zeros((2, 48), np.float32), "Q4_0")
