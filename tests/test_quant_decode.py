"""The fused decoding step (``quant.decode``): a packed Llama-family model's cached decode steps in one
call of the compiled kernels, held to the model's own eager layers on the same weights — logits,
the cache it leaves, greedy answers, left-padded batches — and declining what it does not run."""

from __future__ import annotations

import platform
import warnings

import pytest
import torch

from scratchlm.generation import SamplingParams, generate_ids
from scratchlm.generation.generate import BatchState
from scratchlm.models.config import ModelConfig
from scratchlm.models.transformer import Transformer
from scratchlm.quant import decode, kernels, linear
from scratchlm.quant.linear import QuantLinear, quantize_model
from test_quant_linear import random_layer

pytestmark = pytest.mark.skipif(not kernels.kernels_available(),
                                reason="no C compiler: the kernels could not be built")

LLAMA = dict(vocab_size=96, context_length=64, n_layer=2, n_head=8, n_kv_head_override=2, n_embd=256,
             intermediate_size_override=512, norm="rmsnorm", norm_bias=False, norm_eps=1e-5, mlp="swiglu",
             mlp_bias=False, positions="rope", rope_theta=10000.0, qkv_bias=False, o_bias=False,
             tie_embeddings=True)


def packed_model(type_name: str = "q4_1", seed: int = 0, **overrides) -> Transformer:
    """A tiny random Llama-family model (norm scales and biases random too), packed."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**{**LLAMA, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                noise = torch.randn_like(p)
                p.copy_(1 + 0.2 * noise if name.endswith("weight") else 0.3 * noise)
            elif "embed" not in name:
                p.normal_(0, 0.1)
    return quantize_model(model, type_name)


def mixed_types_model() -> Transformer:
    """Every kernel type in one model, as K-quant files mix them: Q4_K and Q6_K matrices among Q8_0 ones."""
    model = packed_model("q8_0")
    attn, mlp = model.layers[0].self_attn, model.layers[1].mlp
    attn.o_proj = random_layer("Q6_K", attn.o_proj.out_features, attn.o_proj.in_features, seed=1)
    mlp.down_proj = random_layer("Q4_K", mlp.down_proj.out_features, mlp.down_proj.in_features, seed=2)
    model.layers[1].self_attn.o_proj = QuantLinear.from_float(0.1 * torch.randn(256, 256), None, "Q4_0")
    return model


@pytest.fixture
def calls(monkeypatch):
    """How many times the fused kernel ran (so no test passes by taking the eager path twice)."""
    count = [0]
    real = kernels.decode_tokens

    def counted(*args, **kwargs):
        count[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "decode_tokens", counted)
    return count


def step_through(model: Transformer, ids: torch.Tensor, fused: bool, prefill: int = 4):
    """Logits of each cached step after a ``prefill``-token prefill, and the cache left."""
    step = model.decode_step
    model.decode_step = step if fused else None
    try:
        cache = model.new_cache(ids.shape[0], ids.shape[1] + 2)
        with torch.inference_mode():
            model(ids[:, :prefill], cache=cache)
            logits = [model(ids[:, i:i + 1], cache=cache) for i in range(prefill, ids.shape[1])]
    finally:
        model.decode_step = step
    return torch.cat(logits, dim=1), cache


def tolerance() -> float:
    """How far the fused step may be from the eager one, relative to the largest |value|.

    The two sum in different orders, so their fp32 results differ in the last bits, and an
    activation that the integer kernels round then and then lands, now and then, one step (amax/L)
    away.  int15's steps are small and such landings frequent (measured up to 1.7e-4 of the
    scale); int8's steps are 128 times larger and landings rare (measured 2e-7, once 7.2e-3).  A
    wrong rotation, mask or cache slot moves the logits by about their own size.
    """
    return 1e-3 if linear.ACTIVATIONS == "int15" else 3e-2


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, mask: torch.Tensor | float = 1.0) -> None:
    assert ((ours - theirs).abs() * mask).max() <= tolerance() * theirs.abs().max()


def assert_close_to_eager(model: Transformer, ids: torch.Tensor, calls: list[int], prefill: int = 4) -> None:
    """The logits of each step, the argmax with int15 activations (int8's rare step can swap two
    close logits), and the keys and values in the cache."""
    before = calls[0]
    ours, cache = step_through(model, ids, fused=True, prefill=prefill)
    theirs, reference = step_through(model, ids, fused=False, prefill=prefill)
    assert calls[0] - before == ids.shape[1] - prefill
    assert_close(ours, theirs)
    if linear.ACTIVATIONS == "int15":
        assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
    assert cache.length == reference.length == ids.shape[1]
    assert_close(cache.keys, reference.keys)
    assert_close(cache.values, reference.values)


GPT2 = dict(norm="layernorm", norm_bias=True, mlp="gelu", positions="learned", n_kv_head_override=None,
            qkv_bias=True, o_bias=True, mlp_bias=True)


@pytest.mark.parametrize("activations", ["int15", "int8"])
@pytest.mark.parametrize("variant", ["q4_1", "q4_0", "q8_0", "mixed", "biases", "untied", "multi-head",
                                     "gpt2", "gpt2-without-biases"])
def test_fused_steps_equal_the_eager_layers(monkeypatch, calls, variant, activations):
    monkeypatch.setattr(linear, "ACTIVATIONS", activations)
    model = {
        "mixed": mixed_types_model,
        "biases": lambda: packed_model("q4_1", qkv_bias=True, o_bias=True, mlp_bias=True),
        "untied": lambda: packed_model("q4_0", tie_embeddings=False),
        "multi-head": lambda: packed_model("q8_0", n_kv_head_override=8, rope_theta=1e6),
        "gpt2": lambda: packed_model("q4_1", **GPT2),
        "gpt2-without-biases": lambda: packed_model("q8_0", **{**GPT2, "norm_bias": False, "qkv_bias": False,
                                                               "o_bias": False, "mlp_bias": False}),
    }.get(variant, lambda: packed_model(variant))()
    ids = torch.randint(0, 96, (1, 24), generator=torch.Generator().manual_seed(3))
    assert_close_to_eager(model, ids, calls)


def test_fused_batches_rows_and_left_padding(calls):
    """Rows of one length (no mask), and rows of different lengths (left padding, a key mask and
    per-row positions, as batched serving decodes): each as the eager layers compute it."""
    model = packed_model("q4_1", seed=4)
    ids = torch.randint(0, 96, (3, 20), generator=torch.Generator().manual_seed(5))
    assert_close_to_eager(model, ids, calls, prefill=6)

    rows = [ids[0, :9].tolist(), ids[1, :3].tolist(), ids[2, :14].tolist()]
    states = {}
    for fused in (True, False):
        step = model.decode_step
        model.decode_step = step if fused else None
        state = BatchState.prefill(model, rows, remaining=8, context_length=64, device=torch.device("cpu"))
        assert state.mask is not None and state.positions is not None
        logits = []
        for i in range(8):
            state.step(model, ids[:, 14 + i % 6])
            logits.append(state.logits)
        states[fused] = (torch.stack(logits), state.cache)
        model.decode_step = step
    (ours, cache), (theirs, reference) = states[True], states[False]
    assert_close(ours, theirs)
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
    real = state.mask[:, :cache.length][None, :, None, :, None]  # padding slots hold anything
    assert_close(cache.keys, reference.keys, real)
    assert_close(cache.values, reference.values, real)
    assert calls[0] >= 8

    params = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
    with_fused = generate_ids(model, rows, params)
    model.decode_step = None
    assert [c.token_ids for c in with_fused] == [c.token_ids for c in generate_ids(model, rows, params)]


def test_what_the_fused_step_declines_runs_eagerly(monkeypatch, calls):
    """q/k norms, a matrix kept in float, autograd, several new tokens, exact fp32 activations: the
    eager layers run (the same logits as with no fused step at all)."""
    qk_norm = packed_model("q8_0", qk_norm=True)
    kept = packed_model("q8_0")
    kept.layers[1].mlp.down_proj = torch.nn.Linear(512, 256, bias=False)
    for model in (qk_norm, kept):
        assert isinstance(model.decode_step, decode.FusedDecode) and decode.decoder_table(model) is None
        ids = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(0))
        ours, _ = step_through(model, ids, fused=True)
        theirs, _ = step_through(model, ids, fused=False)
        assert torch.equal(ours, theirs)
    assert calls[0] == 0

    model = packed_model("q4_1")
    assert decode.decoder_table(model) is not None
    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(1))
    cache = model.new_cache(1, 8)
    with torch.no_grad():
        model(ids[:, :2], cache=cache)  # two new tokens: a prefill
    with torch.enable_grad():
        model(ids[:, 2:3], cache=cache)
    monkeypatch.setattr(linear, "ACTIVATIONS", "fp32")
    with torch.no_grad():
        model(ids[:, 3:4], cache=cache)
    assert calls[0] == 0 and cache.length == 4
    monkeypatch.setattr(linear, "ACTIVATIONS", "int15")
    with torch.no_grad():
        model(ids[:, 4:5], cache=cache)
    assert calls[0] == 1 and cache.length == 5


def test_fused_steps_are_the_same_bits_on_1_or_2_threads(calls):
    """Threads share out rows of each product and heads of attention, never the terms of one sum."""
    model = mixed_types_model()
    ids = torch.randint(0, 96, (3, 12), generator=torch.Generator().manual_seed(7))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, _ = step_through(model, ids, fused=True)
        torch.set_num_threads(2)
        two, _ = step_through(model, ids, fused=True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two) and calls[0] == 2 * 8


def test_fused_step_reads_the_model_again_for_a_new_cache(calls):
    """Modules swapped between two generations are seen by the next one."""
    model = packed_model("q4_1")
    ids = torch.randint(0, 96, (1, 10), generator=torch.Generator().manual_seed(2))
    first, _ = step_through(model, ids, fused=True)
    model.layers[0].mlp.down_proj = QuantLinear.from_float(torch.zeros(256, 512), None, "Q4_1")
    second, _ = step_through(model, ids, fused=True)
    eager, _ = step_through(model, ids, fused=False)
    assert (first - second).abs().max() > 0.1
    assert_close(second, eager)


def test_a_cache_or_mask_of_another_shape_is_left_to_the_eager_forward(calls):
    """The C reads the cache and the mask as the model's shapes: anything else is not handed to it
    (the eager forward refuses it) rather than read or written out of bounds."""
    model, other = packed_model("q8_0"), packed_model("q8_0", n_kv_head_override=4)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        cache = other.new_cache(1, 8)
        with pytest.raises(RuntimeError):
            model(ids[:, :1], cache=cache)
        cache = model.new_cache(1, 8)
        model(ids[:, :2], cache=cache)
        with pytest.raises(RuntimeError):
            model(ids[:, 2:], cache=cache, attention_mask=torch.tensor([[1, 0]]))
    assert calls[0] == 0


def test_a_full_cache_is_an_error():
    model = packed_model("q8_0")
    cache = model.new_cache(1, 3)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), cache=cache)
        with pytest.raises(ValueError, match="KV cache full: 4 positions > 3"):
            model(torch.tensor([[4]]), cache=cache)


@pytest.mark.parametrize("variable,value", [("SCRATCHLM_KERNELS_PORTABLE", "1"),
                                            ("SCRATCHLM_KERNELS_CFLAGS", "-mno-avx512f")])
def test_other_builds_decode_the_same(monkeypatch, calls, variable, value):
    """The portable C and the AVX2 build run the fused step as the native one does."""
    if variable == "SCRATCHLM_KERNELS_CFLAGS" and platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip(f"{value} is an x86 flag")
    model = mixed_types_model()
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(6))
    native, _ = step_through(model, ids, fused=True)
    monkeypatch.setenv(variable, value)
    monkeypatch.setattr(kernels, "_lib", None)
    try:
        with warnings.catch_warnings(record=True) as caught:
            assert kernels.kernels_available(), [str(w.message) for w in caught]
        other, _ = step_through(model, ids, fused=True)
        assert_close(other, native)
        assert_close_to_eager(model, ids, calls)
    finally:
        monkeypatch.delenv(variable)
        monkeypatch.setattr(kernels, "_lib", None)
