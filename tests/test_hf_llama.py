"""Llama, Qwen2 and Qwen3 checkpoints: the same importer and exporter as GPT-2, more table rows."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from conftest import PARITY_ATOL, realistic_weights
from scratchlm.checkpoint.hf import FAMILIES, export_weights, load_hf, save_hf
from scratchlm.errors import CheckpointError

VOCAB = 97
SIZES = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, bos_token_id=0, eos_token_id=0)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

CASES = {
    # llama3 rope scaling with an original context (16) shorter than the test sequences (40)
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **SIZES, max_position_embeddings=64, rms_norm_eps=1e-5, rope_parameters=LLAMA3_ROPE)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        **SIZES, max_position_embeddings=64, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "qwen3": lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        **SIZES, head_dim=16, max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
}
IDS = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=list(CASES))
def saved(request, tmp_path_factory) -> tuple[str, Path, torch.Tensor]:
    torch.manual_seed(0)
    model = realistic_weights(CASES[request.param]())
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    with torch.no_grad():
        logits = model(IDS).logits
    return request.param, path, logits


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def test_logits_equal_transformers(saved):
    model_type, path, expected = saved
    model, _, config = load_hf(path)
    assert config.qk_norm == (model_type == "qwen3")
    assert (config.rope_scaling or {}).get("rope_type") == ("llama3" if model_type == "llama" else None)
    assert (config.qkv_bias, config.o_bias) == ((True, False) if model_type == "qwen2" else (False, False))
    with torch.no_grad():
        assert max_diff(model(IDS), expected) <= PARITY_ATOL


def test_cached_decoding_equals_full_recompute(saved):
    _, path, expected = saved
    model, _, _ = load_hf(path)
    with torch.no_grad():
        cache = model.new_cache(batch_size=2, max_length=40)
        steps = [model(IDS[:, :30], cache=cache)]
        steps += [model(IDS[:, t:t + 1], cache=cache) for t in range(30, 40)]
    assert max_diff(torch.cat(steps, dim=1), expected) <= PARITY_ATOL


def test_export_round_trip(saved, tmp_path):
    model_type, path, expected = saved
    model, _, config = load_hf(path)
    save_hf(model, config, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == model_type
    exported = export_weights(FAMILIES[model_type], model)
    original = load_file(path / "model.safetensors")
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], original[k]) for k in original)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert max_diff(theirs(IDS).logits, expected) <= PARITY_ATOL


def test_export_writes_the_tokenizers_bos_and_eos(tmp_path):
    """generation_config.json (and config.json) carry the bos/eos ids the tokenizer knows."""
    from scratchlm.models import build_model, from_preset
    from scratchlm.tokenizers.train_bpe import train_bpe

    tokenizer = train_bpe("a tiny corpus for a tiny tokenizer, tiny and fine. " * 10, 270,
                          special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    tokenizer.bos_token, tokenizer.eos_token = "<|im_start|>", "<|im_end|>"
    bos, eos = tokenizer.special_tokens["<|im_start|>"], tokenizer.special_tokens["<|im_end|>"]
    assert bos != eos and 0 not in (bos, eos)
    config = from_preset("tiny-llama", vocab_size=300)
    model = build_model(config).eval()
    save_hf(model, config, tmp_path / "with", tokenizer=tokenizer)
    for name in ("config.json", "generation_config.json"):
        data = json.loads((tmp_path / "with" / name).read_text())
        assert (data["bos_token_id"], data["eos_token_id"]) == (bos, eos), name
    generation = transformers.GenerationConfig.from_pretrained(tmp_path / "with")
    assert (generation.bos_token_id, generation.eos_token_id) == (bos, eos)
    assert transformers.AutoConfig.from_pretrained(tmp_path / "with").eos_token_id == eos
    save_hf(model, config, tmp_path / "without")  # no tokenizer: no ids are made up
    assert "eos_token_id" not in json.loads((tmp_path / "without" / "generation_config.json").read_text())
    small = from_preset("tiny-llama", vocab_size=260)  # the tokenizer's bos/eos are past its vocabulary
    save_hf(build_model(small).eval(), small, tmp_path / "outside", tokenizer=tokenizer)
    for name in ("config.json", "generation_config.json"):  # one rule (save_hf's), for convert too
        data = json.loads((tmp_path / "outside" / name).read_text())
        assert "bos_token_id" not in data and "eos_token_id" not in data, name


def test_v4_config_form(saved, tmp_path):
    """transformers v4 wrote rope_theta + rope_scaling (and torch_dtype) instead of rope_parameters."""
    model_type, path, expected = saved
    v4 = tmp_path / "v4"
    shutil.copytree(path, v4)
    cfg = json.loads((v4 / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = None if rope["rope_type"] == "default" else rope
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    (v4 / "config.json").write_text(json.dumps(cfg))
    model, _, _ = load_hf(v4)
    with torch.no_grad():
        assert max_diff(model(IDS), expected) <= PARITY_ATOL


@pytest.mark.parametrize("change, message", [
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope type 'yarn'"),
    ({"rope_parameters": None}, "no rope_theta"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"use_sliding_window": True}, "sliding-window"),
])
def test_refused_configs(saved, tmp_path, change, message):
    _, path, _ = saved
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(CheckpointError, match=message) as info:
        load_hf(bad)
    assert "\n" not in str(info.value)


def test_v4_linear_rope_scaling_with_the_legacy_type_key(saved, tmp_path):
    """transformers v4 files spell the scaling ``rope_scaling: {"type": "linear", "factor": F}``."""
    model_type, path, _ = saved
    legacy = tmp_path / "legacy"
    shutil.copytree(path, legacy)
    cfg = json.loads((legacy / "config.json").read_text())
    cfg["rope_theta"] = cfg.pop("rope_parameters")["rope_theta"]
    cfg["rope_scaling"] = {"type": "linear", "factor": 4.0}
    (legacy / "config.json").write_text(json.dumps(cfg))
    model, _, config = load_hf(legacy)
    assert config.rope_scaling["rope_type"] == "linear" and config.rope_scaling["factor"] == 4.0
    assert "rope_theta" not in config.rope_scaling
    theirs = transformers.AutoModelForCausalLM.from_pretrained(legacy, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = theirs(IDS).logits
        assert max_diff(model(IDS), expected) <= PARITY_ATOL
        default, _, _ = load_hf(path)
        assert max_diff(default(IDS), expected) > 0.01  # the scaling changes the function


def test_a_tied_head_stored_anyway_is_accepted(tmp_path):
    """Some tied checkpoints still store lm_head.weight (a copy of the embedding): not 'unexpected'."""
    model = realistic_weights(CASES["qwen2"]())
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in tensors
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ours, _, config = load_hf(tmp_path)
    assert config.tie_embeddings
    with torch.no_grad():
        assert max_diff(ours(IDS), model(IDS).logits) <= PARITY_ATOL


def test_export_refuses_parameters_the_format_has_no_place_for():
    from scratchlm.errors import ConfigError
    from scratchlm.models import build_model, from_preset

    model = build_model(from_preset("tiny-gpt2", qk_norm=True))  # GPT-2 has no q/k norms
    with pytest.raises(ConfigError, match="the gpt2 format has no place for .*q_norm"):
        export_weights(FAMILIES["gpt2"], model)
