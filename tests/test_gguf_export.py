"""``scratchlm convert RUN model.gguf --to gguf``: read back by gguf's reader, by transformers' GGUF
loader (logits equal to ours) and by our own loader (round trip), for each weight type; Llama-family
(llama.cpp's llama architecture) and GPT-2 (its gpt2 architecture) run dirs."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import scratchlm
from scratchlm.errors import CheckpointError
from test_convert import IDS, TEMPLATE, hf_dir  # noqa: F401  (the tiny Llama with llama3 rope scaling)

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
# The largest |Δlogit| against the float model for each type: f32 exact (up to the order of sums),
# f16 the rounding of the weights, Q8_0/Q4 the blocks' rounding (random weights are the worst case),
# for matrices at transformers' initial scale, N(0, 0.02).
BOUNDS = {"f32": 1e-5, "f16": 2e-3, "q8_0": 2e-2, "q4_0": 0.2, "q4_1": 0.2}


@pytest.fixture(scope="module")
def run_dir(hf_dir, tmp_path_factory):  # noqa: F811
    """The tiny Llama as a run dir, its tokenizer retrained with GPT-2's split (a pattern llama.cpp
    names; train_bpe's default, cl100k's, has no llama.cpp pre-tokenizer name)."""
    from scratchlm.tokenizers.train_bpe import train_bpe

    lm = scratchlm.load(hf_dir, device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # hf_dir has realistic-scale weights; BOUNDS are for N(0, 0.02) matrices
        for p in lm.model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    tok = train_bpe("a tiny corpus for a tiny tokenizer, tiny and fine. " * 10, 270, pattern="gpt2",
                    special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    tok.eos_token, tok.chat_template = "<|im_end|>", TEMPLATE
    out = tmp_path_factory.mktemp("run") / "run"
    scratchlm.api.LM(lm.model, tok, lm.config).save(out)
    return out


@pytest.mark.parametrize("quant", list(BOUNDS))
def test_export_round_trips_through_our_loader(run_dir, tmp_path, run_cli, quant, fp32_activations):
    path = tmp_path / "m.gguf"
    code, out, err = run_cli("convert", run_dir, path, "--quant", quant)
    assert code == 0, err
    assert out.startswith(f"wrote {path} (GGUF, {quant} weights")
    source, back = scratchlm.load(run_dir, device="cpu"), scratchlm.load(path, device="cpu")
    assert back.config.rope_scaling == source.config.rope_scaling
    assert back.chat_template == TEMPLATE and back.tokenizer.eos_token == "<|im_end|>"
    text = "a tiny corpus, tiny and fine"
    assert back.tokenizer.encode(text) == source.tokenizer.encode(text)
    with torch.no_grad():
        assert (back.model(IDS) - source.model(IDS)).abs().max() <= BOUNDS[quant]
    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    expected = quant.upper()
    assert types["blk.0.attn_q.weight"] == types["output.weight"] == expected
    assert types["blk.0.attn_norm.weight"] == "F32" and "rope_freqs.weight" in types
    if quant in ("q8_0", "q4_0", "q4_1"):  # the blocks are llama.cpp's rounding of the weights
        ours = source.model.layers[1].mlp.down_proj.weight.detach().numpy()
        stored = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
        assert np.array_equal(np.asarray(stored.data).reshape(-1),
                              gguf.quants.quantize(ours, gguf.GGMLQuantizationType[expected]).reshape(-1))
        packed = scratchlm.load(path, device="cpu", dtype="gguf")
        with torch.no_grad():
            assert (packed.model(IDS) - back.model(IDS)).abs().max() < 1e-4


def test_export_loads_in_transformers_with_our_logits(run_dir, tmp_path, run_cli):
    """f16 file → transformers' GGUF loader: logits equal to ours (from the same file) to 1e-3.

    Without rope scaling: transformers' GGUF loader does not read llama.cpp's rope_freqs tensor
    (the llama3 scaling), so on the fixture's scaled model it differs from the file's meaning."""
    from dataclasses import replace

    from scratchlm.models.transformer import Transformer

    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF files")
    lm = scratchlm.load(run_dir, device="cpu")
    plain = Transformer(replace(lm.config, rope_scaling=None))
    plain.load_state_dict(lm.model.state_dict())
    scratchlm.api.LM(plain, lm.tokenizer, plain.config).save(tmp_path / "plain")
    path = tmp_path / "m.gguf"
    assert run_cli("convert", tmp_path / "plain", path, "--to", "gguf", "--quant", "f16")[0] == 0
    ours = scratchlm.load(path, device="cpu")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name,
                                                               dtype=torch.float32).eval()
    with torch.no_grad():
        assert (theirs(IDS).logits - ours.model(IDS)).abs().max() <= 1e-3


# ----- GPT-2 (llama.cpp's gpt2 architecture) ---------------------------------------------------

# The tensors of a two-layer gpt2 file, by llama.cpp's names (without output.weight: the head is tied).
GPT2_TENSORS = {"token_embd.weight", "position_embd.weight", "output_norm.weight", "output_norm.bias"} | {
    f"blk.{i}.{key}.{kind}" for i in range(2)
    for key in ("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down")
    for kind in ("weight", "bias")}


def gpt2_model(vocab_size: int = 300, **overrides):
    """The tiny-gpt2 preset, 1024 positions (transformers' GGUF loader reads gpt2.context_length into
    n_ctx, which GPT2Config ignores, so its position table is always n_positions' default 1024): matrices
    N(0, 0.02) as BOUNDS assume, biases and norm scales random so that a misplaced one shows."""
    from scratchlm.models import build_model, from_preset

    model = build_model(from_preset("tiny-gpt2", vocab_size=vocab_size, context_length=1024, **overrides))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                noise = torch.randn(p.shape, generator=generator)
                p.copy_(1 + 0.2 * noise if name.endswith("weight") else 0.1 * noise)
    return model.eval()


@pytest.fixture(scope="module")
def gpt2_run_dir(tmp_path_factory):
    """A tiny GPT-2 run dir with the tokenizer `scratchlm tokenizer train` makes (cl100k's split)."""
    from scratchlm.tokenizers.train_bpe import train_bpe

    model = gpt2_model()
    tok = train_bpe("a tiny corpus for a tiny tokenizer, tiny and fine. " * 10, 270,
                    special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    tok.eos_token, tok.chat_template = "<|im_end|>", TEMPLATE
    out = tmp_path_factory.mktemp("gpt2") / "run"
    scratchlm.LM(model, tok, model.config).save(out)
    return out


@pytest.mark.parametrize("quant", list(BOUNDS))
def test_gpt2_export_round_trips_through_our_loader(gpt2_run_dir, tmp_path, run_cli, quant,
                                                    fp32_activations):
    path = tmp_path / "g.gguf"
    with pytest.warns(UserWarning, match="the file names the nearest, 'llama-bpe'"):
        code, out, err = run_cli("convert", gpt2_run_dir, path, "--quant", quant)
    assert code == 0, err
    source, back = scratchlm.load(gpt2_run_dir, device="cpu"), scratchlm.load(path, device="cpu")
    assert back.config.to_dict() | {"name": ""} == source.config.to_dict() | {"name": ""}
    assert back.chat_template == TEMPLATE and back.tokenizer.eos_token == "<|im_end|>"
    assert back.tokenizer.pattern == source.tokenizer.pattern
    with torch.no_grad():
        ours, theirs = back.model(IDS), source.model(IDS)
    assert torch.equal(ours, theirs) if quant == "f32" else (ours - theirs).abs().max() <= BOUNDS[quant]

    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert set(types) == GPT2_TENSORS
    assert {types["blk.0.attn_qkv.weight"], types["blk.1.ffn_down.weight"], types["token_embd.weight"]} \
        == {quant.upper()}
    floats = (".bias", "_norm.weight", "position_embd.weight")  # llama.cpp keeps these in F32
    assert {types[n] for n in types if n.endswith(floats)} == {"F32"}
    assert reader.fields["general.architecture"].contents() == "gpt2"
    fields = {key.removeprefix("gpt2."): reader.fields[key].contents() for key in reader.fields
              if key.startswith("gpt2.")}
    config = source.config
    assert fields == {"context_length": 1024, "embedding_length": 32, "block_count": 2,
                      "feed_forward_length": 128, "attention.head_count": 4, "vocab_size": 300,
                      "attention.layer_norm_epsilon": pytest.approx(config.norm_eps)}
    qkv = next(t for t in reader.tensors if t.name == "blk.1.attn_qkv.weight")
    attention = source.model.layers[1].self_attn
    fused = torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight])
    assert list(qkv.shape) == [32, 96]  # GGUF's dims: [in, out], i.e. nn.Linear's [out, in] in torch order
    if quant != "f32":  # llama.cpp's rounding of the fused rows, q then k then v
        stored = np.asarray(qkv.data).reshape(-1)
        expected = gguf.quants.quantize(fused.detach().numpy(), gguf.GGMLQuantizationType[quant.upper()])
        assert np.array_equal(stored, expected.reshape(-1))
    if quant in ("q8_0", "q4_0", "q4_1"):
        packed = scratchlm.load(path, device="cpu", dtype="gguf")
        assert packed.model.layers[0].self_attn.qkv_proj.type_name == quant.upper()
        with torch.no_grad():  # the prefill path, and the decoding kernel's (up to 8 rows)
            for ids in (IDS, IDS[:1, :6]):
                assert (packed.model(ids) - back.model(ids)).abs().max() < 1e-4


@pytest.mark.parametrize("variant", ["tied", "untied-without-biases"])
def test_gpt2_export_loads_in_transformers_with_our_logits(tmp_path, variant):
    """f16 file → transformers' GGUF loader (which transposes the matrices back into GPT-2's Conv1D
    layout): logits equal to ours from the same file to 1e-3.  Realistic weights, so that a swapped q/k
    or a transposed matrix would show; without biases, the zeros llama.cpp requires stand in.  (The
    file needs its vocabulary: transformers takes a gpt2 file's vocab_size from the token list.)"""
    from conftest import realistic_weights
    from scratchlm.checkpoint.gguf import save_gguf
    from scratchlm.tokenizers.train_bpe import train_bpe

    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF files")
    plain = variant == "tied"
    model = realistic_weights(gpt2_model(tie_embeddings=plain, qkv_bias=plain, o_bias=plain, mlp_bias=plain))
    tok = train_bpe("a tiny corpus for a tiny tokenizer, tiny and fine. " * 10, 270, pattern="gpt2")
    path = save_gguf(model, model.config, tmp_path / "g.gguf", tok, quant="f16")
    ours = scratchlm.load(path, device="cpu")
    names = {t.name for t in gguf.GGUFReader(str(path)).tensors}
    assert names - GPT2_TENSORS == (set() if plain else {"output.weight"}) and names >= GPT2_TENSORS
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name,
                                                               dtype=torch.float32).eval()
    assert theirs.config.tie_word_embeddings == plain
    with torch.no_grad():
        assert (theirs(IDS).logits - ours.model(IDS)).abs().max() <= 1e-3


@pytest.mark.parametrize(("arch", "pattern"), [("gpt2", "gpt2"), ("gpt2", "gpt4"), ("llama", "gpt2")])
def test_export_runs_in_llama_cpp(tmp_path, arch, pattern):
    """llama.cpp itself (llama-cpp-python, the bench extra, where built) loads the f16 file, its
    vocabulary included (GPT-2's split as "gpt-2", cl100k as its nearest, "llama-bpe"), tokenizes as we
    do and computes our logits from the same file: within 2e-2 on realistic weights (measured up to
    7e-3: llama.cpp's GELU and attention round through fp16), where a swapped q/k moves them by 0.3."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (a bench extra) is not built here")
    import test_gguf
    from conftest import realistic_weights
    from scratchlm.checkpoint.gguf import save_gguf
    from scratchlm.models.config import ModelConfig
    from scratchlm.models.transformer import Transformer
    from scratchlm.tokenizers.train_bpe import train_bpe

    corpus = ["def f(x):\n    return x + 1\n", "a tiny corpus, tiny and fine.\n"] * 20
    tok = train_bpe(corpus, 280, pattern=pattern)  # (the model's 300 rows: padded past the vocabulary)
    model = realistic_weights(gpt2_model(tie_embeddings=False) if arch == "gpt2" else
                              Transformer(ModelConfig(**dict(test_gguf.TINY, vocab_size=300))))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cl100k's nearest name
        path = save_gguf(model, model.config, tmp_path / "m.gguf", tok, quant="f16")
    ours = scratchlm.load(path, device="cpu")
    llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    try:
        text = "def f(x):\n    return x + 12, tiny and fine"
        ids = ours.tokenizer.encode(text)
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids
        llm.eval(ids)
        theirs = torch.from_numpy(np.array(llm.scores[:len(ids)]))
    finally:
        llm.close()
    with torch.no_grad():
        assert (ours.model(torch.tensor([ids]))[0] - theirs).abs().max() <= 2e-2


def test_export_refusals(run_dir, tmp_path, run_cli):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"x")
    code, _, err = run_cli("convert", run_dir, path)
    assert code == 2 and err.startswith(f"error: {path} exists") and err.count("\n") == 1
    code, _, err = run_cli("convert", run_dir, tmp_path, "--to", "gguf")
    assert code == 2 and "is a directory" in err
    from scratchlm.models import build_model, from_preset

    config = from_preset("tiny-gpt2", norm="rmsnorm")  # learned positions (GPT-2's format) but RMSNorm
    scratchlm.LM(build_model(config), None, config).save(tmp_path / "gpt2")
    code, _, err = run_cli("convert", tmp_path / "gpt2", tmp_path / "g.gguf")
    assert code == 2 and "the GPT-2 format cannot express norm 'rmsnorm'" in err and err.count("\n") == 1
    from scratchlm.checkpoint.gguf import save_gguf
    from scratchlm.tokenizers.train_bpe import train_bpe

    lm = scratchlm.load(run_dir, device="cpu")
    with pytest.raises(CheckpointError, match="cannot write GGUF tensors as Q2_K"):
        save_gguf(lm.model, lm.config, tmp_path / "x.gguf", quant="q2_k")
    words = train_bpe("tiny text, tiny", 260, pattern=r"\S+|\s+")  # no llama.cpp name, none near
    with pytest.raises(CheckpointError, match="split pattern has no llama.cpp pre-tokenizer name"):
        save_gguf(lm.model, lm.config, tmp_path / "x.gguf", words)
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / ".x.gguf.tmp").exists()
