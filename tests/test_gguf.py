"""GGUF import: dequantization against the ``gguf`` package, tiny files written with ``GGUFWriter``,
and SmolLM2-135M-Instruct's real file against transformers' loading of it."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from conftest import shared_path
from scratchlm.checkpoint.gguf import _unpermute_rows, load_gguf
from scratchlm.checkpoint.gguf_file import dequantize, read_gguf
from scratchlm.errors import CheckpointError
from scratchlm.models.config import ModelConfig
from scratchlm.models.transformer import Transformer

Q = gguf.GGMLQuantizationType
TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"]

TINY = dict(vocab_size=96, context_length=64, n_layer=2, n_head=4, n_kv_head_override=2, n_embd=32,
            intermediate_size_override=64, norm="rmsnorm", norm_bias=False, norm_eps=1e-6, mlp="swiglu",
            mlp_bias=False, positions="rope", rope_theta=10000.0, qkv_bias=False, o_bias=False,
            tie_embeddings=False)
VARIANTS = {
    "llama": dict(TINY),
    "llama-tied": dict(TINY, tie_embeddings=True),
    "qwen2": dict(TINY, qkv_bias=True, tie_embeddings=True, rope_theta=1e6),
    # head_dim × n_head != n_embd
    "qwen3": dict(TINY, qk_norm=True, head_dim_override=16, n_kv_head_override=1),
}
# The GGUF name of each of our per-layer parameters (llama.cpp's tensor names), written out
# independently of the loader's table.
LAYER = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


# ----- helpers: write GGUF files as llama.cpp's converter does -----------------------------------


def llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter for ``llama``: each head's rows [2, d/2] (halves) become [d/2, 2] (pairs)."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2) \
        .reshape(weight.shape)


def gguf_name(ours: str) -> str:
    if ours.startswith("layers."):
        _, i, rest = ours.split(".", 2)
        module, kind = rest.rsplit(".", 1)
        return f"blk.{i}.{LAYER[module]}.{kind}"
    return {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}[ours]


def random_model(variant: str, seed: int = 0) -> Transformer:
    """A tiny model with random weights everywhere, norm scales and biases included."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**VARIANTS[variant]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                noise = torch.randn_like(p)
                p.copy_(1 + 0.2 * noise if name.endswith("weight") else 0.1 * noise)
    return model.eval()


def add_config(writer, config: ModelConfig) -> None:
    writer.add_block_count(config.n_layer)
    writer.add_context_length(config.context_length)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.n_kv_head)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    if config.head_dim_override is not None:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)


def write_gguf(path: Path, arch: str, tensors: dict[str, tuple[np.ndarray, str]],
               config: ModelConfig | None = None, metadata=None) -> Path:
    """A GGUF file holding ``tensors`` (name → (float32 values, type name)), quantized by the gguf package."""
    writer = gguf.GGUFWriter(str(path), arch)
    if config is not None:
        add_config(writer, config)
    if metadata:
        metadata(writer)
    for name, (values, type_name) in tensors.items():
        stored = gguf.quants.quantize(values.astype(np.float32), Q[type_name])
        writer.add_tensor(name, stored, raw_dtype=Q[type_name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def model_tensors(model: Transformer, arch: str, matrix_type: str = "F32"
                  ) -> dict[str, tuple[np.ndarray, str]]:
    """The model's weights under GGUF names, Q/K rows permuted for ``llama``; 1-D tensors stay F32."""
    config, out = model.config, {}
    for name, p in model.named_parameters():
        values = p.detach().numpy().copy()
        if arch == "llama" and ".q_proj." in name:
            values = llama_cpp_permute(values, config.n_head)
        elif arch == "llama" and ".k_proj." in name:
            values = llama_cpp_permute(values, config.n_kv_head)
        out[gguf_name(name)] = (values, matrix_type if values.ndim == 2 else "F32")
    return out


def write_model(path: Path, model: Transformer, arch: str, matrix_type: str = "F32", metadata=None) -> Path:
    return write_gguf(path, arch, model_tensors(model, arch, matrix_type), model.config, metadata)


def arch_of(variant: str) -> str:
    return variant.split("-")[0]


# ----- dequantization ----------------------------------------------------------------------------


def random_values(rows: int, cols: int, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)


def sample_values() -> np.ndarray:
    """[12, 96] random values with the edge cases of block formats: an all-zero block, a constant
    block, one huge outlier, negative-only and positive-only blocks."""
    x = random_values(12, 96, seed=7)
    x[0, :32] = 0.0
    x[1, :32] = 0.75
    x[2, 5] = 40.0
    x[3, 32:64] = -np.abs(x[3, 32:64])
    x[4, 64:96] = np.abs(x[4, 64:96])
    return x


@pytest.mark.parametrize("type_name", TYPES)
def test_dequantize_equals_gguf_reference(type_name):
    raw = gguf.quants.quantize(sample_values(), Q[type_name])
    expected = gguf.quants.dequantize(raw, Q[type_name]).reshape(-1)
    ours = dequantize(np.ascontiguousarray(raw).view(np.uint8).reshape(-1), type_name, expected.size)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, expected)


def test_nibble_order_by_hand():
    """Q4_1 by hand: low nibbles are elements 0–15, high nibbles 16–31; value = q·d + m."""
    d, m = np.float16(0.5), np.float16(-1.0)
    q = np.arange(32) % 16
    packed = (q[:16] | (q[16:] << 4)).astype(np.uint8)
    block = np.concatenate([np.array([d]).view(np.uint8), np.array([m]).view(np.uint8), packed])
    np.testing.assert_array_equal(dequantize(block, "Q4_1", 32), q * 0.5 - 1.0)


@pytest.mark.parametrize("type_name", TYPES)
def test_file_tensors_equal_gguf_reader(tmp_path, type_name):
    """Through a file: our header parsing and dequantization agree with GGUFReader + dequantize."""
    values = sample_values()
    tensors = {"a.weight": (values, type_name), "b.weight": (values[:3], "F32")}
    path = write_gguf(tmp_path / "t.gguf", "llama", tensors)
    reader = gguf.GGUFReader(str(path))
    ours = read_gguf(path)
    for tensor in reader.tensors:
        info = ours.tensors[tensor.name]
        assert info.type_name == tensor.tensor_type.name
        assert info.shape == tuple(reversed(tensor.shape.tolist()))
        assert info.offset == tensor.data_offset and info.n_bytes == tensor.n_bytes
        expected = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        np.testing.assert_array_equal(ours.load(tensor.name), expected)
    assert ours.load("a.weight").shape == values.shape


def test_header_metadata_equals_gguf_reader(tmp_path):
    def metadata(w):
        w.add_string("general.name", "tiny ✓")
        w.add_array("tokenizer.ggml.tokens", ["a", "b", "ü", ""])
        w.add_array("tokenizer.ggml.token_type", [1, 1, 3, 1])
        w.add_array("test.floats", [0.5, -2.0])
        w.add_bool("test.flag", True)
        w.add_uint64("test.big", 2**40)
        w.add_custom_alignment(64)

    path = write_gguf(tmp_path / "m.gguf", "llama", {"x.weight": (random_values(2, 32), "F32")},
                      ModelConfig(**TINY), metadata)
    reader = gguf.GGUFReader(str(path))
    ours = read_gguf(path)
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        assert ours.metadata[key] == field.contents(), key
    assert set(ours.metadata) == {k for k in reader.fields if not k.startswith("GGUF.")}
    assert ours.tensors["x.weight"].offset == reader.tensors[0].data_offset


# ----- whole models --------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tiny_model_round_trip(tmp_path, variant):
    """An F32 file written as llama.cpp writes it loads back to the same weights and logits."""
    model = random_model(variant)
    path = write_model(tmp_path / "m.gguf", model, arch_of(variant))
    loaded, tokenizer, config = load_gguf(path)
    assert tokenizer is None  # no tokenizer.* metadata in this file
    assert config.to_dict() | {"name": ""} == model.config.to_dict() | {"name": ""}
    for name, p in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], p, rtol=0, atol=0, msg=name)
    if config.tie_embeddings:
        assert loaded.lm_head.weight is loaded.embed_tokens.weight
    ids = torch.randint(0, config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=1e-6)


def gpt2_as_llama_cpp_converts_it(path: Path, model, matrix_type: str) -> Path:
    """A transformers GPT-2 written as llama.cpp's convert_hf_to_gguf.py writes it, independently of our
    exporter: names from gguf's own table for MODEL_ARCH.GPT2, Conv1D weights transposed to [out, in]
    (q, k, v staying fused in attn_qkv), position table and 1-D tensors in F32, its metadata keys."""
    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, config.n_layer)
    conv1d = ("c_attn.weight", "c_proj.weight", "c_fc.weight")
    tensors = {}
    for hf_name, p in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # the tied head is the embedding
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        values = p.detach().numpy()
        values = values.T if hf_name.endswith(conv1d) else values
        kind = matrix_type if values.ndim == 2 and name != "position_embd.weight" else "F32"
        tensors[name] = (np.ascontiguousarray(values), kind)

    def metadata(writer):
        writer.add_block_count(config.n_layer)
        writer.add_context_length(config.n_positions)
        writer.add_embedding_length(config.n_embd)
        writer.add_feed_forward_length(4 * config.n_embd)
        writer.add_head_count(config.n_head)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)

    return write_gguf(path, "gpt2", tensors, metadata=metadata)


@pytest.mark.parametrize("tied", [True, False])
def test_gpt2_file_as_llama_cpp_writes_it_matches_transformers(tmp_path, tied, fp32_activations):
    """A gpt2-architecture file (llama.cpp's layout, not our exporter's) loads with the logits of the
    transformers GPT-2 it was made from: fused q/k/v split in order, matrices not transposed twice."""
    import transformers

    from conftest import PARITY_ATOL, realistic_weights

    config = transformers.GPT2Config(vocab_size=96, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                     tie_word_embeddings=tied, bos_token_id=None, eos_token_id=None)
    theirs = realistic_weights(transformers.GPT2LMHeadModel(config))
    path = gpt2_as_llama_cpp_converts_it(tmp_path / "gpt2.gguf", theirs, "F32")
    ours, _, ours_config = load_gguf(path)
    assert (ours_config.positions, ours_config.norm, ours_config.mlp) == ("learned", "layernorm", "gelu")
    assert ours_config.tie_embeddings == tied and ours_config.context_length == 64
    ids = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = theirs(ids).logits
        assert (ours(ids) - expected).abs().max().item() <= PARITY_ATOL
        quantized = gpt2_as_llama_cpp_converts_it(tmp_path / "q8.gguf", theirs, "Q8_0")
        packed, _, _ = load_gguf(quantized, packed=True)
        dequantized, _, _ = load_gguf(quantized)
        assert packed.layers[0].self_attn.qkv_proj.type_name == "Q8_0"  # the fused blocks kept whole
        assert isinstance(packed.embed_positions, torch.nn.Embedding)  # a table the model slices
        assert (packed(ids) - dequantized(ids)).abs().max().item() < 1e-4


def test_unpermute_inverts_llama_cpp_permute():
    w = np.arange(24 * 5, dtype=np.float32).reshape(24, 5)
    for heads in (1, 2, 3):
        np.testing.assert_array_equal(_unpermute_rows(llama_cpp_permute(w, heads), heads), w)
        bias = w[:, 0].copy()
        np.testing.assert_array_equal(_unpermute_rows(llama_cpp_permute(bias, heads), heads), bias)
    # Head 0 of size 4: rows (0, 2) and (1, 3) are the rotate-half pairs; llama.cpp stores them adjacent.
    np.testing.assert_array_equal(llama_cpp_permute(np.arange(8), 2), [0, 2, 1, 3, 4, 6, 5, 7])


@pytest.mark.parametrize("matrix_type", ["Q8_0", "Q4_0", "Q4_1", "F16", "BF16"])
def test_quantized_model_weights(tmp_path, matrix_type):
    """Each matrix is exactly gguf's dequantization of the stored blocks (Q/K after un-permuting)."""
    model = random_model("llama")
    path = write_model(tmp_path / "q.gguf", model, "llama", matrix_type)
    loaded, _, config = load_gguf(path)
    reader = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    for name, p in loaded.named_parameters():
        tensor = reader[gguf_name(name)]
        expected = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        value = p.detach().numpy()
        if ".q_proj." in name:
            value = llama_cpp_permute(value, config.n_head)
        elif ".k_proj." in name:
            value = llama_cpp_permute(value, config.n_kv_head)
        np.testing.assert_array_equal(value, expected, err_msg=name)
    assert loaded.embed_tokens.weight.dtype == torch.float32


def test_dtype_option(tmp_path):
    model = random_model("qwen2")
    path = write_model(tmp_path / "m.gguf", model, "qwen2", "Q8_0")
    fp32, _, _ = load_gguf(path)
    bf16, _, _ = load_gguf(path, dtype=torch.bfloat16)
    for (name, a), b in zip(fp32.state_dict().items(), bf16.state_dict().values(), strict=True):
        assert b.dtype == torch.bfloat16
        assert torch.equal(b, a.to(torch.bfloat16)), name


# ----- config from metadata -------------------------------------------------------------------------


def llama3_divisors(head_dim: int, theta: float, factor: float, low: float = 1.0, high: float = 4.0,
                    original: int = 8192) -> np.ndarray:
    """The rope_freqs tensor llama.cpp's converter writes for Llama 3.1-style scaling (fp32)."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    out = []
    for freq in freqs:
        wavelen = 2 * np.pi / freq
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def test_llama3_rope_scaling_from_rope_freqs(tmp_path):
    # head_dim 128
    config = ModelConfig(**dict(TINY, n_embd=256, n_head=2, n_kv_head_override=2, rope_theta=500000.0))
    model = Transformer(config)
    tensors = model_tensors(model, "llama")
    tensors["rope_freqs.weight"] = (llama3_divisors(128, 500000.0, 32.0), "F32")
    _, _, loaded = load_gguf(write_gguf(tmp_path / "l3.gguf", "llama", tensors, config))
    assert loaded.rope_scaling == {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

    tensors["rope_freqs.weight"] = (llama3_divisors(128, 500000.0, 32.0, high=2.0), "F32")
    with pytest.raises(CheckpointError, match="rope_freqs"):
        load_gguf(write_gguf(tmp_path / "odd.gguf", "llama", tensors, config))


def test_linear_rope_scaling_and_refused_kinds(tmp_path):
    model = random_model("llama")

    def linear(w):
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(4.0)

    _, _, config = load_gguf(write_model(tmp_path / "lin.gguf", model, "llama", metadata=linear))
    assert config.rope_scaling == {"rope_type": "linear", "factor": 4.0}

    def yarn(w):
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(4.0)

    with pytest.raises(CheckpointError, match="'yarn' is not implemented"):
        load_gguf(write_model(tmp_path / "yarn.gguf", model, "llama", metadata=yarn))


# ----- tokenizer, chat template, scratchlm.load --------------------------------------------------------


def test_tokenizer_and_chat_template_from_metadata(tmp_path):
    import scratchlm
    from scratchlm.tokenizers.bpe import bytes_to_token

    specials = ["<|im_start|>", "<|im_end|>"]
    tokens = [bytes_to_token(bytes([b])) for b in range(256)] + ["he", "Ġt"] + specials
    template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"

    def vocab(w):
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt2")
        w.add_token_list(tokens)
        w.add_token_types([gguf.TokenType.NORMAL] * 258 + [gguf.TokenType.CONTROL] * 2)
        w.add_token_merges(["h e", "Ġ t"])
        w.add_bos_token_id(258)
        w.add_eos_token_id(259)
        w.add_chat_template(template)

    model = Transformer(ModelConfig(**dict(TINY, vocab_size=len(tokens))))
    path = write_model(tmp_path / "chat.gguf", model, "llama", "Q8_0", metadata=vocab)
    lm = scratchlm.load(path, device="cpu")
    assert lm.chat_template == template == lm.tokenizer.chat_template
    assert lm.tokenizer.eos_id == 259 and lm.tokenizer.vocab_size == len(tokens)
    assert lm.tokenizer.encode("he the") == [256, 257, 256]  # "h e" ranks before "Ġ t"
    assert isinstance(lm.generate("he", temperature=0, max_new_tokens=3), str)
    assert lm.config.vocab_size == len(tokens)


# ----- bad input ----------------------------------------------------------------------------------------


def test_unsupported_type_names_it(tmp_path):
    model = random_model("llama")
    tensors = model_tensors(model, "llama")
    tensors["blk.1.ffn_down.weight"] = (tensors["blk.1.ffn_down.weight"][0], "MXFP4")
    with pytest.raises(CheckpointError, match=r"blk\.1\.ffn_down\.weight is stored as MXFP4") as err:
        load_gguf(write_gguf(tmp_path / "mxfp4.gguf", "llama", tensors, model.config))
    assert "Q4_1" in str(err.value) and "Q6_K" in str(err.value)  # the fix lists what is supported


def test_unsupported_architecture_lists_supported(tmp_path):
    path = write_gguf(tmp_path / "g.gguf", "falcon", {"token_embd.weight": (random_values(4, 32), "F32")})
    with pytest.raises(CheckpointError, match=r"'falcon' is not supported.*llama, qwen2, qwen3, gpt2"):
        load_gguf(path)


def test_strict_tensor_names_and_shapes(tmp_path):
    model = random_model("llama")
    tensors = model_tensors(model, "llama")
    extra = dict(tensors, **{"blk.0.attn_gate.weight": (random_values(4, 32), "F32")})
    with pytest.raises(CheckpointError, match=r"blk\.0\.attn_gate\.weight"):
        load_gguf(write_gguf(tmp_path / "extra.gguf", "llama", extra, model.config))
    missing = {k: v for k, v in tensors.items() if k != "blk.1.ffn_up.weight"}
    with pytest.raises(CheckpointError, match=r"lacks weights for layers\.1\.mlp\.up_proj\.weight"):
        load_gguf(write_gguf(tmp_path / "missing.gguf", "llama", missing, model.config))
    wrong = dict(tensors, **{"blk.0.ffn_up.weight": (random_values(32, 32), "F32")})
    with pytest.raises(CheckpointError, match=r"blk\.0\.ffn_up\.weight has shape \[32, 32\].*\[64, 32\]"):
        load_gguf(write_gguf(tmp_path / "shape.gguf", "llama", wrong, model.config))


def test_damaged_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_gguf(tmp_path / "absent.gguf")
    (tmp_path / "text.gguf").write_text("hello, this is not a GGUF file at all")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        load_gguf(tmp_path / "text.gguf")
    path = write_model(tmp_path / "m.gguf", random_model("llama"), "llama")
    data = path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:len(data) - 100])
    with pytest.raises(CheckpointError, match="past the end of the file"):
        load_gguf(tmp_path / "cut.gguf")
    (tmp_path / "header.gguf").write_bytes(data[:200])
    with pytest.raises(CheckpointError, match="cannot read the GGUF header"):
        load_gguf(tmp_path / "header.gguf")


# ----- the real model: SmolLM2-135M-Instruct, Q4_1 ------------------------------------------------------

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
SMOLLM2_PROMPT = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                  "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                  "<|im_start|>assistant\n")


def render_chat(template: str, messages: list[dict], **extra) -> str:
    """The chat template rendered as transformers does: sandboxed jinja, trim_blocks + lstrip_blocks."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=True, **extra)


@pytest.fixture(scope="module")
def smollm2_transformers(smollm2_gguf_module):
    """transformers' model from the same GGUF file, fp32: ~35 s to load here, so once per module."""
    import accelerate  # noqa: F401  (a dev dependency: transformers needs it to load GGUF files)
    import transformers
    path = smollm2_gguf_module
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def smollm2_gguf_module() -> Path:
    return shared_path("models", "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.slow
def test_smollm2_loads_through_scratchlm_load(smollm2_gguf):
    import scratchlm

    lm = scratchlm.load(smollm2_gguf, device="cpu")
    c = lm.config
    sizes = (c.n_layer, c.n_head, c.n_kv_head, c.n_embd, c.intermediate_size, c.vocab_size)
    assert sizes == (30, 9, 3, 576, 1536, 49152)
    assert (c.rope_theta, c.norm_eps, c.tie_embeddings, c.context_length) == (100000.0, 1e-5, True, 8192)
    assert lm.tokenizer.eos_token == "<|im_end|>"
    assert render_chat(lm.chat_template, QUESTION) == SMOLLM2_PROMPT


@pytest.mark.slow
def test_smollm2_matches_transformers(smollm2_gguf_module, smollm2_transformers):
    """Same logits as transformers' loading of the file (≤ 1e-4 in fp32), same greedy chat answer: Paris."""
    from scratchlm.generation import SamplingParams, generate_ids

    model, tokenizer, _ = load_gguf(smollm2_gguf_module)
    theirs = smollm2_transformers
    ids = torch.tensor([tokenizer.encode(
        "The quick brown fox jumps over the lazy dog. Paris is the capital of")])
    with torch.no_grad():
        diff = (model(ids) - theirs(ids).logits).abs().max().item()
    assert diff <= 1e-4, diff  # docs/benchmarks.md quotes this bound

    prompt = tokenizer.encode(render_chat(tokenizer.chat_template, QUESTION), allowed_special="all")
    ours = generate_ids(model, [prompt], SamplingParams(temperature=0, max_new_tokens=40),
                        eos_id=tokenizer.eos_id)[0].token_ids
    with torch.no_grad():
        out = theirs.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False,
                              eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.eos_id)
    reference = out[0, len(prompt):].tolist()
    assert ours == reference
    answer = tokenizer.decode(ours)
    assert "Paris" in answer, answer
