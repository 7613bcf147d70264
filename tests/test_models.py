"""The decoder: fast path = reference path, cached decoding = full recompute, exact parameter counts,
the books' attention/softmax/masking numbers, presets and config validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from scratchlm.errors import ConfigError
from scratchlm.models import ModelConfig, build_model, from_preset, list_presets
from scratchlm.models.attention import Attention, grouped_attention, naive_attention
from scratchlm.models.transformer import Transformer

# A config for each code path the model tests need: GPT-2 (learned positions, LayerNorm, GELU,
# biases), Llama-style (RoPE, RMSNorm, SwiGLU, GQA) and Qwen3-style (q/k norm, head_dim != D/H).
VARIANTS = {
    "gpt2": from_preset("tiny-gpt2"),
    "llama-gqa": from_preset("tiny-llama"),
    "qwen3-like": from_preset("tiny-llama", qk_norm=True, head_dim_override=16, tie_embeddings=False),
}


def make_model(config: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(config).eval()
    with torch.no_grad():  # random norm scales and biases, so no path hides behind 1s and 0s
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def set_naive(model: Transformer, naive: bool) -> None:
    for module in model.modules():
        if isinstance(module, Attention):
            module.use_naive = naive


def left_padded_batch(config: ModelConfig, lengths: list[int], seed: int = 1):
    """Token rows of different lengths, left-padded to the longest; mask and positions from the mask."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    rows = [torch.randint(0, config.vocab_size, (n,), generator=gen) for n in lengths]
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = row
        mask[i, width - len(row):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return rows, ids, mask, positions


# -------------------------------------------------------------------------------------------
# SDPA fast path == naive reference
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_sdpa_equals_naive_causal(variant):
    model = make_model(VARIANTS[variant])
    ids = torch.randint(0, model.config.vocab_size, (3, 17))
    with torch.no_grad():
        fast = model(ids)
        set_naive(model, True)
        slow = model(ids)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_sdpa_equals_naive_with_padding_mask(variant):
    config = VARIANTS[variant]
    model = make_model(config)
    _, ids, mask, positions = left_padded_batch(config, [9, 4, 6])
    with torch.no_grad():
        fast = model(ids, attention_mask=mask, position_ids=positions)
        set_naive(model, True)
        slow = model(ids, attention_mask=mask, position_ids=positions)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_naive_attention_function_matches_sdpa_with_gqa_shapes_and_random_mask():
    torch.manual_seed(0)
    q = torch.randn(2, 4, 5, 8)
    k, v = torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)  # 2 KV heads shared by 4 query heads
    mask = torch.rand(2, 1, 5, 7) > 0.4
    mask[..., 0] = True  # every query sees at least one key
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(naive_attention(q, k, v, mask), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("masked", [False, True], ids=["causal", "mask"])
@pytest.mark.parametrize("heads", [(4, 2), (4, 4)], ids=["gqa", "mha"])
def test_grouped_attention_equals_naive_values_and_gradients(masked, heads):
    """grouped_attention (bf16 CPU training's path) == naive_attention with repeated kv heads, fp32."""
    torch.manual_seed(0)
    h, hkv = heads
    q = torch.randn(2, h, 5, 8, requires_grad=True)
    k, v = torch.randn(2, hkv, 7, 8, requires_grad=True), torch.randn(2, hkv, 7, 8, requires_grad=True)
    mask = None
    if masked:
        mask = torch.rand(2, 1, 5, 7) > 0.4
        mask[..., 0] = True
    results = []
    for fn in (grouped_attention, lambda q, k, v, m: naive_attention(
            q, k.repeat_interleave(h // hkv, dim=1), v.repeat_interleave(h // hkv, dim=1), m)):
        out = fn(q, k, v, mask)
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), (q, k, v))
        results.append((out, *grads))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_bf16_cpu_training_takes_the_grouped_path_and_matches_the_reference():
    """Under bf16 autocast with gradients, the fast path is grouped_attention (not torch's bf16 flash
    kernel); the model's loss and gradients stay within bf16 rounding of the naive fp32 reference."""
    import scratchlm.models.attention as attention

    model = make_model(VARIANTS["llama-gqa"]).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    calls = []
    original = attention.grouped_attention
    attention.grouped_attention = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = model(ids).float().square().mean()
    finally:
        attention.grouped_attention = original
    assert len(calls) == model.config.n_layer
    fast_grads = torch.autograd.grad(fast, list(model.parameters()))
    set_naive(model, True)
    slow = model(ids).float().square().mean()
    slow_grads = torch.autograd.grad(slow, list(model.parameters()))
    torch.testing.assert_close(fast, slow, atol=2e-2, rtol=2e-2)
    for a, b in zip(fast_grads, slow_grads, strict=True):
        assert (a - b).norm() <= 0.05 * b.norm() + 1e-6
    set_naive(model, False)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        attention.grouped_attention = lambda *a, **k: calls.append(1) or original(*a, **k)
        try:
            model(ids)  # inference keeps torch's kernel
        finally:
            attention.grouped_attention = original
    assert len(calls) == model.config.n_layer


# -------------------------------------------------------------------------------------------
# KV cache == full recompute
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("naive", [False, True], ids=["sdpa", "naive"])
def test_cached_decoding_equals_full_recompute(variant, naive):
    model = make_model(VARIANTS[variant])
    set_naive(model, naive)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(batch_size=2)
        steps = [model(ids[:, :5], cache=cache)]  # prefill
        for t in range(5, 12):  # then one token at a time
            steps.append(model(ids[:, t:t + 1], cache=cache))
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_cached_chunks_longer_than_one_token():
    model = make_model(VARIANTS["llama-gqa"])
    ids = torch.randint(0, model.config.vocab_size, (1, 10))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(batch_size=1, max_length=10)
        chunks = [model(ids[:, a:b], cache=cache) for a, b in ((0, 3), (3, 7), (7, 10))]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_left_padded_batch_cached_equals_recompute_and_unpadded(variant):
    """Left padding + attention_mask + positions from the mask: each row behaves as if alone."""
    config = VARIANTS[variant]
    model = make_model(config)
    rows, ids, mask, positions = left_padded_batch(config, [7, 3, 5])
    gen = torch.Generator().manual_seed(2)
    new = torch.randint(0, config.vocab_size, (3, 4), generator=gen)  # 4 tokens decoded after the prompt
    with torch.no_grad():
        # cached: prefill the padded prompts, then one token at a time, mask and positions growing
        cache = model.new_cache(batch_size=3)
        cached = [model(ids, cache=cache, attention_mask=mask, position_ids=positions)]
        step_mask, step_pos = mask, positions[:, -1:]
        for t in range(new.shape[1]):
            step_mask = torch.cat([step_mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
            step_pos = step_pos + 1
            step = model(new[:, t:t + 1], cache=cache, attention_mask=step_mask, position_ids=step_pos)
            cached.append(step)
        cached = torch.cat(cached, dim=1)
        # full recompute of the padded batch
        all_ids = torch.cat([ids, new], dim=1)
        all_pos = (step_mask.cumsum(-1) - 1).clamp(min=0)
        full = model(all_ids, attention_mask=step_mask, position_ids=all_pos)
        torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
        # each row alone, without padding: same logits on its real tokens
        for i, row in enumerate(rows):
            alone = model(torch.cat([row, new[i]])[None])
            torch.testing.assert_close(full[i, -alone.shape[1]:], alone[0], atol=1e-5, rtol=1e-5)


def test_kv_cache_shapes_per_block_and_head():
    """B §4.8: per block, H × L × d_h cached keys (and values); L grows by one per decoded token."""
    config = from_preset("tiny-gpt2")
    model = make_model(config)
    cache = model.new_cache(batch_size=1, max_length=8)
    assert cache.keys.shape == (config.n_layer, 1, config.n_head, 8, config.head_dim)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), cache=cache)
        assert cache.length == 3
        model(torch.tensor([[4]]), cache=cache)
    assert cache.length == 4
    assert cache.keys[:, :, :, 4:].abs().sum() == 0  # nothing written past the filled length
    with pytest.raises(ValueError, match="KV cache full"):
        model(torch.ones(1, 5, dtype=torch.long), cache=cache)


# -------------------------------------------------------------------------------------------
# Parameter counts (Appendix A6, B §4.9)
# -------------------------------------------------------------------------------------------

A6 = {  # preset: (untied qkv_bias=F, tied qkv_bias=F, untied qkv_bias=T, tied qkv_bias=T)
    "gpt2-124m": (163_009_536, 124_412_160, 163_037_184, 124_439_808),
    "gpt2-355m": (406_212_608, 354_749_440, 406_286_336, 354_823_168),
    "gpt2-774m": (838_220_800, 773_891_840, 838_359_040, 774_030_080),
    "gpt2-1558m": (1_637_792_000, 1_557_380_800, 1_638_022_400, 1_557_611_200),
}


def meta_count(config: ModelConfig) -> int:
    """Parameters of the real module (whatever ``build_model`` builds for the config), on the meta
    device: no memory, no init.  ``parameters()`` yields a tied weight once."""
    with torch.device("meta"):
        return sum(p.numel() for p in build_model(config).parameters())


@pytest.mark.parametrize("preset", A6)
def test_gpt2_parameter_counts_a6(preset):
    expected = A6[preset]
    combos = [(False, False), (False, True), (True, False), (True, True)]  # (qkv_bias, tied)
    for (qkv_bias, tied), count in zip(combos, expected, strict=True):
        config = from_preset(preset, qkv_bias=qkv_bias, tie_embeddings=tied)
        assert config.num_parameters() == count, (preset, qkv_bias, tied)
        assert meta_count(config) == count, (preset, qkv_bias, tied)


def test_gpt2_124m_oracles_and_per_module_counts():
    assert from_preset("gpt2-124m", qkv_bias=False, tie_embeddings=False).num_parameters() == 163_009_536
    assert from_preset("gpt2-124m", qkv_bias=False).num_parameters() == 124_412_160
    assert from_preset("gpt2-124m").num_parameters() == 124_439_808  # the released checkpoint
    with torch.device("meta"):
        block = Transformer(from_preset("gpt2-124m", qkv_bias=False, n_layer=1)).layers[0]
    assert sum(p.numel() for p in block.mlp.parameters()) == 4_722_432
    assert sum(p.numel() for p in block.self_attn.parameters()) == 2_360_064


def test_burkov_decoder_count_without_the_output_bias():
    """B §4.9 states 8,621,963; that figure includes an output bias (V = 32,011) our LM head lacks (E10).

    Our equivalent — RMSNorm, RoPE, bias-free attention, a 4x biased MLP (ReLU there, same count),
    untied output, a final norm — has 8,621,963 − 32,011 = 8,589,952.
    """
    config = ModelConfig(vocab_size=32011, context_length=30, n_layer=2, n_head=8, n_embd=128,
                         norm="rmsnorm", norm_bias=False, positions="rope", qkv_bias=False, o_bias=False,
                         tie_embeddings=False)
    assert config.num_parameters() == 8_621_963 - 32_011
    assert meta_count(config) == 8_589_952


@pytest.mark.parametrize("name", [n for n in list_presets() if from_preset(n).arch != "ngram"])
def test_num_parameters_matches_module_for_every_preset(name):  # n-grams: tests/test_ngram_lm.py
    config = from_preset(name)
    assert config.num_parameters() == meta_count(config)
    untied = config.replace(tie_embeddings=not config.tie_embeddings)
    assert untied.num_parameters() == meta_count(untied)


@pytest.mark.parametrize("overrides", [
    dict(qkv_bias=True, o_bias=True, mlp_bias=True),
    dict(n_kv_head_override=1, qk_norm=True, head_dim_override=24, intermediate_size_override=40),
    dict(norm="layernorm", norm_bias=False, mlp="gelu", positions="learned"),
])
def test_num_parameters_matches_module_for_config_variants(overrides):
    config = from_preset("tiny-llama", **overrides)
    assert config.num_parameters() == meta_count(config)


# -------------------------------------------------------------------------------------------
# The books' attention, softmax and masking examples (book-oracles §2.2, §2.8)
# -------------------------------------------------------------------------------------------


def test_burkov_single_head_causal_attention_o35():
    """Scores q·k = [4.90, 17.15, 9.80, 12.25], d_k = 6; scaled by √6; the causal mask; the softmax."""
    scores = torch.tensor([4.90, 17.15, 9.80, 12.25])
    scaled = torch.tensor([2.000417, 7.001458, 4.000833, 5.001042])
    torch.testing.assert_close(scores / math.sqrt(6), scaled, atol=1e-4, rtol=0)
    # One query (the unit vector e1) per position; key j = scores[j]·e1, so q·k_j = scores[j].
    q = torch.zeros(1, 1, 4, 6)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, 4, 6)
    k[0, 0, :, 0] = scores
    v = torch.eye(4)[None, None]  # value j = one-hot j, so the output row is the weight row
    weights = naive_attention(q, k, v, mask=None)[0, 0]
    # Row 2 of the 4×4 mask is [0, 0, −∞, −∞]: weights [0.006693, 0.993307, 0, 0]
    torch.testing.assert_close(weights[1], torch.tensor([0.006693, 0.993307, 0.0, 0.0]), atol=1e-4, rtol=0)
    assert torch.all(weights.triu(1) == 0)  # upper triangle masked
    torch.testing.assert_close(weights[3], torch.softmax(scaled, -1), atol=1e-4, rtol=0)
    # g₂ = 0.0067·v₁ + 0.9933·v₂ (the book prints the weights swapped, E9)
    v2 = torch.randn(1, 1, 4, 3)
    g = naive_attention(q, k, v2, mask=None)[0, 0, 1]
    torch.testing.assert_close(g, 0.006693 * v2[0, 0, 0] + 0.993307 * v2[0, 0, 1], atol=1e-4, rtol=0)
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True)[0, 0]
    torch.testing.assert_close(sdpa, weights, atol=1e-6, rtol=0)


RASCHKA_X = torch.tensor([[0.43, 0.15, 0.89], [0.55, 0.87, 0.66], [0.57, 0.85, 0.64],
                          [0.22, 0.58, 0.33], [0.77, 0.25, 0.10], [0.05, 0.80, 0.55]])
RASCHKA_TABLE = torch.tensor([  # the book's 6×6 weights, "Your journey starts with one step"
    [.20, .20, .19, .12, .12, .14], [.13, .23, .23, .12, .10, .15], [.13, .23, .23, .12, .11, .15],
    [.14, .20, .20, .14, .12, .17], [.15, .19, .19, .13, .18, .12], [.13, .21, .21, .14, .09, .18]])


def test_raschka_simplified_self_attention_o36():
    """softmax(X·Xᵀ) with no weights, no scaling, no mask; the book's table is the weights truncated."""
    x = RASCHKA_X
    torch.testing.assert_close(x[1] @ x.T, torch.tensor([0.9544, 1.4950, 1.4754, 0.8434, 0.7070, 1.0865]),
                               atol=1e-4, rtol=0)
    q = (x * math.sqrt(3))[None, None]  # cancel naive_attention's 1/√d: the book does not scale
    everything = torch.ones(6, 6, dtype=torch.bool)
    eye = torch.eye(6)[None, None]
    weights = naive_attention(q, x[None, None], eye, mask=everything)[0, 0]
    torch.testing.assert_close(weights[0], torch.tensor([0.2098, 0.2006, 0.1981, 0.1242, 0.1220, 0.1452]),
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(weights[1], torch.tensor([0.1385, 0.2379, 0.2333, 0.1240, 0.1082, 0.1581]),
                               atol=1e-4, rtol=0)
    assert torch.equal(torch.floor(weights * 100 + 1e-6) / 100, RASCHKA_TABLE)  # floor, not round
    context = naive_attention(q, x[None, None], x[None, None], mask=everything)[0, 0]
    torch.testing.assert_close(context[1], torch.tensor([0.4419, 0.6515, 0.5683]), atol=1e-4, rtol=0)


def test_burkov_softmax_o10():
    """z = [2.0, 1.0, 0.5] → [0.628532, 0.231224, 0.140244], through attention with d = 1."""
    q = torch.ones(1, 1, 1, 1)
    k = torch.tensor([2.0, 1.0, 0.5]).view(1, 1, 3, 1)
    weights = naive_attention(q, k, torch.eye(3)[None, None], mask=torch.ones(1, 3, dtype=torch.bool))
    expected = torch.tensor([0.628532, 0.231224, 0.140244])
    torch.testing.assert_close(weights.flatten(), expected, atol=1e-6, rtol=0)


def test_causal_mask_is_lower_triangular_and_padding_keeps_the_diagonal():
    # B §4.2: the 4×4 causal mask keeps the lower triangle (row 0 of a batch whose row 1 is padded)
    mask = Transformer._mask(4, 0, torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]]), "cpu")[0, 0]
    assert torch.equal(mask, torch.ones(4, 4, dtype=torch.bool).tril())
    assert Transformer._mask(4, 0, torch.ones(2, 4), "cpu") is None  # no padding: SDPA's causal path
    chunk = Transformer._mask(2, 2, None, "cpu")[0, 0]  # two new tokens after two cached ones
    assert chunk.tolist() == [[True, True, True, False], [True, True, True, True]]
    padded = Transformer._mask(3, 0, torch.tensor([[0, 1, 1]]), "cpu")[0, 0]
    assert padded.tolist() == [[True, False, False], [False, True, False], [False, True, True]]


def test_layernorm_and_gelu_as_gpt2_defines_them():
    """R §4: biased variance, eps 1e-5 (mean 0, variance 1 per token); GELU with the tanh approximation."""
    model = make_model(from_preset("tiny-gpt2"))
    norm = model.layers[0].input_layernorm  # the model's own norm, with a random scale and shift
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
        norm.bias.normal_(0.0, 0.3)
    x = torch.randn(4, 32) * 3 + 1
    mean = x.mean(-1, keepdim=True)
    biased_var = ((x - mean) ** 2).mean(-1, keepdim=True)  # divided by n, not n - 1
    expected = (x - mean) / torch.sqrt(biased_var + 1e-5) * norm.weight + norm.bias
    torch.testing.assert_close(norm(x), expected, atol=1e-5, rtol=1e-5)
    for layer in model.layers:
        for n in (layer.input_layernorm, layer.post_attention_layernorm):
            assert n.eps == 1e-5
    mlp = model.layers[0].mlp
    h = torch.randn(5, 32)
    u = mlp.up_proj(h)
    gelu = 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u**3)))
    torch.testing.assert_close(mlp(h), mlp.down_proj(gelu), atol=1e-5, rtol=1e-5)


# -------------------------------------------------------------------------------------------
# Model construction, dtypes
# -------------------------------------------------------------------------------------------


def test_empty_model_keeps_ties_and_rope_in_fp32():
    config = from_preset("tiny-llama", tie_embeddings=True)
    model = Transformer.empty(config, dtype=torch.bfloat16)
    assert model.lm_head.weight is model.embed_tokens.weight
    weight = model.embed_tokens.weight
    assert weight.dtype == torch.bfloat16 and weight.device.type == "cpu"
    assert model.rope_inv_freq.dtype == torch.float32
    untied = Transformer.empty(from_preset("tiny-gpt2", tie_embeddings=False))
    assert untied.lm_head.weight is not untied.embed_tokens.weight


def test_bf16_autocast_tracks_fp32_loss():
    """The bf16-autocast training recipe (fp32 master weights) gives the same loss within bf16 noise."""
    model = make_model(from_preset("tiny-gpt2")).train()
    ids = torch.randint(0, 256, (2, 32))
    loss32 = F.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids)
    loss16 = F.cross_entropy(logits.float().flatten(0, 1), ids.flatten())
    loss16.backward()
    assert abs(loss16.item() - loss32.item()) < 0.02 * loss32.item()
    assert model.embed_tokens.weight.grad.dtype == torch.float32


def test_context_length_is_enforced_for_learned_positions():
    model = make_model(from_preset("tiny-gpt2", context_length=8))
    with pytest.raises(ValueError, match="exceeds the context length"):
        model(torch.zeros(1, 9, dtype=torch.long))


# -------------------------------------------------------------------------------------------
# Presets and config validation
# -------------------------------------------------------------------------------------------


def test_from_preset_overrides_and_unknown_names():
    config = from_preset("gpt2-124m", n_layer=2, dropout=0.1)
    assert (config.n_layer, config.n_embd, config.dropout, config.name) == (2, 768, 0.1, "gpt2-124m")
    with pytest.raises(ConfigError, match="unknown preset 'gpt2-124'.*gpt2-124m"):
        from_preset("gpt2-124")
    with pytest.raises(ConfigError, match="unknown preset 'zzzz'.*scratchlm presets"):
        from_preset("zzzz")
    with pytest.raises(ConfigError, match="unknown model config field 'n_layers'.*n_layer"):
        from_preset("gpt2-124m", n_layers=2)


@pytest.mark.parametrize("fields, message", [
    (dict(n_embd=100, n_head=12), "not divisible by n_head"),
    (dict(n_head=12, n_kv_head_override=5), "not a multiple of n_kv_head"),
    (dict(vocab_size=0), "vocab_size must be a positive integer"),
    (dict(n_layer=-1), "n_layer must be a positive integer"),
    (dict(context_length=2.5), "context_length must be a positive integer"),
    (dict(norm="batchnorm"), "unknown norm"),
    (dict(mlp="relu"), "unknown mlp"),
    (dict(positions="alibi"), "unknown positions"),
    (dict(positions="rope", n_embd=36, n_head=12), "RoPE needs an even head size"),
    (dict(positions="rope", rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope scaling type 'yarn'"),
    (dict(dropout=1.0), "dropout must be in"),
])
def test_config_errors(fields, message):
    with pytest.raises(ConfigError, match=message) as info:
        ModelConfig(**fields)
    assert "\n" not in str(info.value) and " — " in str(info.value)  # one line: what — how to fix


def test_config_round_trips_through_dict():
    config = from_preset("tiny-llama")
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="unknown model config keys: bogus"):
        ModelConfig.from_dict({**config.to_dict(), "bogus": 1})


def test_config_of_an_older_run_dir_loads():
    """Run dirs saved before the overrides had their own names wrote them under the plain names."""
    old = {**from_preset("tiny-llama").to_dict(), "n_kv_head": 2, "head_dim": None, "intermediate_size": 64}
    for key in ("n_kv_head_override", "head_dim_override", "intermediate_size_override"):
        del old[key]
    config = ModelConfig.from_dict(old)
    assert config == from_preset("tiny-llama")
    assert (config.n_kv_head, config.head_dim, config.intermediate_size) == (2, 8, 64)


def test_derived_sizes_are_properties_and_follow_replace():
    config = from_preset("tiny-gpt2")  # n_embd 32, n_head 4, nothing overridden
    assert (config.n_kv_head, config.head_dim, config.intermediate_size) == (4, 8, 128)
    wider = config.replace(n_embd=64)
    assert (wider.n_kv_head, wider.head_dim, wider.intermediate_size) == (4, 16, 256)
    qwen3ish = config.replace(head_dim_override=16, n_kv_head_override=2, intermediate_size_override=40)
    assert (qwen3ish.n_kv_head, qwen3ish.head_dim, qwen3ish.intermediate_size) == (2, 16, 40)
    assert "head_dim" not in config.to_dict() and config.to_dict()["head_dim_override"] is None
    attention = build_model(qwen3ish).layers[0].self_attn
    assert (attention.head_dim, attention.n_kv_head) == (qwen3ish.head_dim, qwen3ish.n_kv_head)
    with pytest.raises(ConfigError, match="did you mean head_dim_override"):
        config.replace(head_dim=16)


def test_pytorch_init_is_each_layers_default_as_raschkas_gptmodel():
    """init="pytorch": embeddings N(0, 1), linear layers U(±1/√fan_in), norms 1/0; "gpt2" is N(0, 0.02)."""
    config = from_preset("tiny-gpt2", n_embd=64, vocab_size=512, qkv_bias=False, tie_embeddings=False)
    book = build_model(config.replace(init="pytorch"))
    gpt2 = build_model(config)
    assert book.embed_tokens.weight.std().item() == pytest.approx(1.0, abs=0.02)
    assert gpt2.embed_tokens.weight.std().item() == pytest.approx(0.02, abs=0.002)
    assert build_model(config.replace(init="gpt2")).embed_tokens.weight.std().item() < 0.03
    linears = [m for m in book.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2 * 6 + 1  # q, k, v, o, up, down per block; the head
    for m in linears:
        bound = 1 / math.sqrt(m.in_features)
        assert 0.95 * bound < m.weight.abs().max() <= bound
        if m.bias is not None:
            assert 0 < m.bias.abs().max() <= bound
    norms = [m for m in book.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in norms)
    with pytest.raises(ConfigError, match="unknown init 'xavier'"):
        config.replace(init="xavier")


def test_rmsnorm_fused_path_equals_the_formula():
    """fp32 takes torch's fused rms_norm; it must give HF Llama's x·rsqrt(mean(x²)+ε)·γ, gradients too."""
    from scratchlm.models.layers import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(48, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 7, 48, requires_grad=True)
    y = norm(x)
    reference = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    torch.testing.assert_close(y, reference, rtol=1e-6, atol=1e-6)
    grad = torch.randn_like(y)
    ours = torch.autograd.grad(y, (x, norm.weight), grad)
    theirs = torch.autograd.grad(reference, (x, norm.weight), grad)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    half = norm.to(torch.bfloat16)(x.detach().to(torch.bfloat16))  # the explicit fp32-inside path
    torch.testing.assert_close(half.float(), reference.detach(), rtol=2e-2, atol=2e-2)


def test_every_model_satisfies_the_causal_lm_protocol():
    """Generation, the engine and load are typed with these Protocols: each model family keeps them."""
    from scratchlm.models.ngram_module import NGramLM
    from scratchlm.models.protocols import Cache, CausalLM, HiddenStatesLM, JoinableCache

    transformer = build_model(from_preset("tiny-gpt2", vocab_size=17, context_length=8))
    lstm = build_model(from_preset("tiny-lstm", vocab_size=17, context_length=8))
    ngram = NGramLM.fit(from_preset("ngram-kn5", vocab_size=17), [1, 2, 3, 4, 5, 1, 2, 3])
    for model in (transformer, lstm, ngram):
        assert isinstance(model, CausalLM), type(model).__name__
        cache = model.new_cache(2, 8)
        assert isinstance(cache, Cache) and cache.length == 0
        logits = model(torch.tensor([[1, 2, 3], [3, 2, 1]]), cache=cache)
        assert logits.shape == (2, 3, 17) and cache.length == 3
        cache.select(torch.tensor([1]))
        assert model(torch.tensor([[4]]), cache=cache).shape == (1, 1, 17) and cache.length == 4
    assert all(isinstance(m.new_cache(1, 8), JoinableCache) for m in (lstm, ngram))
    hidden = transformer(torch.tensor([[1, 2]]), return_hidden=True)
    assert isinstance(transformer, HiddenStatesLM) and hidden.shape == (1, 2, transformer.config.n_embd)
