"""``scratchlm convert RUN model.gguf --to gguf``: read back by gguf's reader, by transformers' GGUF
loader (logits equal to ours) and by our own loader (round trip), for each weight type."""

from __future__ import annotations

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
def test_export_round_trips_through_our_loader(run_dir, tmp_path, run_cli, quant):
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


def test_export_refusals(run_dir, tmp_path, run_cli):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"x")
    code, _, err = run_cli("convert", run_dir, path)
    assert code == 2 and err.startswith(f"error: {path} exists") and err.count("\n") == 1
    code, _, err = run_cli("convert", run_dir, tmp_path, "--to", "gguf")
    assert code == 2 and "is a directory" in err
    gpt2 = tmp_path / "gpt2"
    from scratchlm.models import build_model, from_preset

    config = from_preset("tiny-gpt2") if "tiny-gpt2" in _presets() else None
    if config is not None:
        scratchlm.api.LM(build_model(config), None, config).save(gpt2)
        code, _, err = run_cli("convert", gpt2, tmp_path / "g.gguf")
        assert code == 2 and "GGUF export of gpt2 models is not implemented" in err
    from scratchlm.checkpoint.gguf import save_gguf
    from scratchlm.tokenizers.train_bpe import train_bpe

    lm = scratchlm.load(run_dir, device="cpu")
    with pytest.raises(CheckpointError, match="cannot write GGUF tensors as Q2_K"):
        save_gguf(lm.model, lm.config, tmp_path / "x.gguf", quant="q2_k")
    cl100k = train_bpe("tiny text, tiny", 260)
    with pytest.raises(CheckpointError, match="split pattern has no llama.cpp pre-tokenizer name"):
        save_gguf(lm.model, lm.config, tmp_path / "x.gguf", cl100k)
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / ".x.gguf.tmp").exists()


def _presets() -> list[str]:
    from scratchlm.models.presets import PRESETS

    return list(PRESETS)
