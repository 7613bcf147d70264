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


@pytest.mark.parametrize("dtype", [None, "gguf"])
def test_k_quant_file_loads_with_the_dequantized_weights(tmp_path, dtype):
    """A llama file whose matrices are K-quant blocks (random, as the tests build them): every
    weight equals gguf's dequantization, loaded plainly or with dtype="gguf" (which keeps Q4_K and
    Q6_K packed, re-blocked, and dequantizes the others)."""
    import torch

    import scratchlm
    from scratchlm.models.config import ModelConfig
    from test_gguf import add_config, llama_cpp_permute

    config = ModelConfig(vocab_size=32, context_length=16, n_layer=1, n_head=2, n_kv_head_override=1,
                         n_embd=256,
                         intermediate_size_override=256, norm="rmsnorm", norm_bias=False, mlp="swiglu",
                         positions="rope", qkv_bias=False, o_bias=False, mlp_bias=False)
    shapes = {"token_embd.weight": (32, 256), "output.weight": (32, 256), "blk.0.attn_q.weight": (256, 256),
              "blk.0.attn_k.weight": (128, 256), "blk.0.attn_v.weight": (128, 256),
              "blk.0.attn_output.weight": (256, 256), "blk.0.ffn_gate.weight": (256, 256),
              "blk.0.ffn_up.weight": (256, 256), "blk.0.ffn_down.weight": (256, 256)}
    kinds = ["Q4_K", "Q6_K", "Q2_K", "Q3_K", "Q5_K"]
    writer = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    add_config(writer, config)
    expected = {}
    for i, (name, (rows, cols)) in enumerate(shapes.items()):
        kind = kinds[i % len(kinds)]
        blocks = random_blocks(kind, rows * cols // 256, seed=i).reshape(rows, -1)
        writer.add_tensor(name, blocks, raw_dtype=Q[kind])
        expected[name] = gguf.quants.dequantize(blocks, Q[kind]).reshape(rows, cols)
    for name in ("blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "output_norm.weight"):
        writer.add_tensor(name, np.ones(256, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    lm = scratchlm.load(tmp_path / "k.gguf", device="cpu", dtype=dtype)
    params = dict(lm.model.named_parameters())
    q = params["layers.0.self_attn.q_proj.weight"].detach().numpy()
    np.testing.assert_array_equal(llama_cpp_permute(q, 2), expected["blk.0.attn_q.weight"])
    np.testing.assert_array_equal(params["layers.0.mlp.down_proj.weight"].detach().numpy(),
                                  expected["blk.0.ffn_down.weight"])
    if dtype is None:
        np.testing.assert_array_equal(params["embed_tokens.weight"].detach().numpy(),
                                      expected["token_embd.weight"])
        np.testing.assert_array_equal(params["lm_head.weight"].detach().numpy(), expected["output.weight"])
    else:  # Q4_K embedding and Q6_K head stay packed (re-blocked), with the same values
        from scratchlm.quant.linear import QuantEmbedding, QuantLinear

        assert isinstance(lm.model.embed_tokens, QuantEmbedding) and isinstance(lm.model.lm_head, QuantLinear)
        np.testing.assert_array_equal(lm.model.embed_tokens(torch.arange(32)).numpy(),
                                      expected["token_embd.weight"])
        np.testing.assert_array_equal(lm.model.lm_head.dequantized().numpy(), expected["output.weight"])
