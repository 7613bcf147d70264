"""Hugging Face GPT-2 import and export against transformers itself, through the production loader."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from conftest import PARITY_ATOL, realistic_weights
from scratchlm.checkpoint.hf import GPT2, export_weights, import_weights, is_hf_dir, load_hf, save_hf
from scratchlm.errors import CheckpointError, ConfigError
from scratchlm.models import from_preset
from scratchlm.models.transformer import Transformer

VOCAB = 97


def make_hf_model(**overrides) -> transformers.GPT2LMHeadModel:
    """A tiny GPT-2 with weights at a trained model's scale, LayerNorms and biases included (conftest)."""
    fields = dict(vocab_size=VOCAB, n_positions=24, n_embd=32, n_layer=2, n_head=4, n_inner=48,
                  bos_token_id=0, eos_token_id=0, layer_norm_epsilon=1e-5)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**fields, **overrides}))
    return realistic_weights(model)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-gpt2")
    make_hf_model().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_model(hf_dir) -> transformers.GPT2LMHeadModel:
    return transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()


IDS = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(0))


def hf_logits(model_or_dir) -> torch.Tensor:
    model = model_or_dir
    if not isinstance(model, torch.nn.Module):
        model = transformers.GPT2LMHeadModel.from_pretrained(model_or_dir).eval()
    with torch.no_grad():
        return model(IDS).logits


def our_logits(model: Transformer) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)


def assert_same_logits(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= PARITY_ATOL


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def one_line_error(info: pytest.ExceptionInfo) -> str:
    message = str(info.value)
    assert "\n" not in message and " — " in message
    return message


# -------------------------------------------------------------------------------------------
# Import: logits equal to transformers
# -------------------------------------------------------------------------------------------


def test_load_hf_logits_equal_transformers(hf_dir, hf_model):
    model, tokenizer, config = load_hf(hf_dir)
    assert tokenizer is None  # the directory has no tokenizer files
    sizes = (config.n_layer, config.n_head, config.n_embd, config.intermediate_size, config.context_length)
    assert sizes == (2, 4, 32, 48, 24)
    assert config.tie_embeddings and model.lm_head.weight is model.embed_tokens.weight
    assert not model.training
    assert_same_logits(our_logits(model), hf_logits(hf_model))


def test_prefix_less_hub_names_and_legacy_buffers(hf_dir, hf_model, tmp_path):
    """The hub's openai-community/gpt2 files: no 'transformer.' prefix, attn.bias/masked_bias buffers."""
    tensors = load_file(hf_dir / "model.safetensors")
    renamed = {name.removeprefix("transformer."): t for name, t in tensors.items()}
    for i in range(2):
        renamed[f"h.{i}.attn.bias"] = torch.ones(1, 1, 24, 24).tril()
        renamed[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    out = tmp_path / "hub-style"
    out.mkdir()
    shutil.copy(hf_dir / "config.json", out)
    save_file(renamed, out / "model.safetensors")
    model, _, _ = load_hf(out)
    assert_same_logits(our_logits(model), hf_logits(hf_model))


def test_untied_head(tmp_path):
    hf = make_hf_model(tie_word_embeddings=False)
    hf.save_pretrained(tmp_path)
    model, _, config = load_hf(tmp_path)
    assert not config.tie_embeddings and model.lm_head.weight is not model.embed_tokens.weight
    assert_same_logits(our_logits(model), hf_logits(hf))


def test_sharded_and_pickled_checkpoints(hf_dir, hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert_same_logits(our_logits(load_hf(tmp_path / "sharded")[0]), hf_logits(hf_model))

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(hf_dir / "config.json", pickled)
    torch.save(load_file(hf_dir / "model.safetensors"), pickled / "pytorch_model.bin")
    assert_same_logits(our_logits(load_hf(pickled)[0]), hf_logits(hf_model))


def test_dtype(hf_dir):
    model, _, _ = load_hf(hf_dir, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


@pytest.mark.parametrize("name, shape", [("transformer.h.0.attn.c_attn.weight", (32, 64)),
                                         ("transformer.h.1.attn.c_attn.bias", (95,))])
def test_import_is_strict_about_fused_rows(hf_dir, tmp_path, name, shape):
    """c_attn holds q, k and v: a fused tensor with the rows of two (or one short) is refused."""
    bad = copy_dir(hf_dir, tmp_path / "bad")
    tensors = load_file(bad / "model.safetensors")
    tensors[name] = tensors[name][..., :shape[-1]].contiguous()
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(CheckpointError) as info:
        load_hf(bad)
    message = one_line_error(info)
    expected = "[" + ", ".join(map(str, shape)) + "]"
    assert f"{name!r}" in message and expected in message


# -------------------------------------------------------------------------------------------
# Export: transformers loads it with the same logits; import∘export is the identity
# -------------------------------------------------------------------------------------------


def test_export_loads_in_transformers_with_same_logits(hf_dir, tmp_path):
    model, _, config = load_hf(hf_dir)
    save_hf(model, config, tmp_path / "out")
    assert is_hf_dir(tmp_path / "out")
    assert_same_logits(hf_logits(tmp_path / "out"), our_logits(model))
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert generation == {}  # a 97-token vocabulary has no GPT-2 end-of-text id


def test_import_export_identity_on_tensors(hf_dir):
    original = load_file(hf_dir / "model.safetensors")
    model, _, config = load_hf(hf_dir)
    exported = export_weights(GPT2, model)
    assert exported.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name
    # and the other way round: our random model → HF names → a fresh model
    ours = Transformer(from_preset("tiny-gpt2"))
    fresh = Transformer.empty(ours.config)
    import_weights(GPT2, fresh, export_weights(GPT2, ours))
    for (name, a), b in zip(ours.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_export_bias_free_model_writes_zero_biases(tmp_path):
    """A model trained without q/k/v biases (Raschka's setup) is still a valid GPT-2 checkpoint."""
    config = from_preset("tiny-gpt2", vocab_size=VOCAB, qkv_bias=False, tie_embeddings=False)
    torch.manual_seed(0)
    model = Transformer(config).eval()
    save_hf(model, config, tmp_path)
    written = load_file(tmp_path / "model.safetensors")
    assert torch.count_nonzero(written["transformer.h.0.attn.c_attn.bias"]) == 0
    assert_same_logits(hf_logits(tmp_path), our_logits(model))


def test_export_refuses_configs_gpt2_cannot_express(tmp_path):
    config = from_preset("tiny-gpt2", n_kv_head_override=2)
    with pytest.raises(ConfigError, match="grouped-query attention"):
        save_hf(Transformer(config), config, tmp_path)


# -------------------------------------------------------------------------------------------
# Bad input: one-line CheckpointErrors
# -------------------------------------------------------------------------------------------


def test_missing_directory_and_files(hf_dir, tmp_path):
    with pytest.raises(CheckpointError, match="not found") as info:
        load_hf(tmp_path / "nope" / "model")
    one_line_error(info)
    with pytest.raises(CheckpointError, match="config.json"):
        load_hf(tmp_path)
    shutil.copy(hf_dir / "config.json", tmp_path)
    with pytest.raises(CheckpointError, match="no weights") as info:
        load_hf(tmp_path)
    one_line_error(info)


def test_shape_mismatch_names_tensor_and_both_shapes(hf_dir, tmp_path):
    bad = copy_dir(hf_dir, tmp_path / "bad")
    tensors = load_file(bad / "model.safetensors")
    tensors["transformer.h.1.mlp.c_fc.weight"] = torch.zeros(32, 40)
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(CheckpointError) as info:
        load_hf(bad)
    message = one_line_error(info)
    assert "'transformer.h.1.mlp.c_fc.weight'" in message and "[32, 40]" in message and "[32, 48]" in message


def test_missing_and_unexpected_tensors(hf_dir, tmp_path):
    tensors = load_file(hf_dir / "model.safetensors")
    missing = copy_dir(hf_dir, tmp_path / "missing")
    del tensors["transformer.h.0.ln_2.bias"]
    save_file(tensors, missing / "model.safetensors")
    with pytest.raises(CheckpointError, match="no tensor 'transformer.h.0.ln_2.bias'") as info:
        load_hf(missing)
    one_line_error(info)
    extra = copy_dir(hf_dir, tmp_path / "extra")
    save_file({**load_file(hf_dir / "model.safetensors"), "score.weight": torch.zeros(2, 32)},
              extra / "model.safetensors")
    with pytest.raises(CheckpointError, match="unexpected tensors: score.weight") as info:
        load_hf(extra)
    one_line_error(info)


def test_missing_shard(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shard {shard.name}.*missing"):
        load_hf(tmp_path)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "bert"}, "unknown model_type 'bert'.*supported model types: gpt2"),
    ({"activation_function": "relu"}, "activation_function 'relu'"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ({"add_cross_attention": True}, "add_cross_attention"),
    ({"n_embd": 30}, "invalid model: n_embd 30 is not divisible by n_head 4"),
])
def test_refused_configs(hf_dir, tmp_path, change, message):
    bad = copy_dir(hf_dir, tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(CheckpointError, match=message) as info:
        load_hf(bad)
    one_line_error(info)


def test_pickle_with_code_is_refused(hf_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(hf_dir / "config.json", bad)
    torch.save({"weights": Path("not a tensor")}, bad / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="holds more than tensors.*safetensors") as info:
        load_hf(bad)
    one_line_error(info)


def test_is_hf_dir(hf_dir, tmp_path):
    assert is_hf_dir(hf_dir)
    assert not is_hf_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"n_layer": 2}))  # a run dir's config: no model_type
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert not is_hf_dir(tmp_path)


# -------------------------------------------------------------------------------------------
# Hub ids, offline
# -------------------------------------------------------------------------------------------


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    from huggingface_hub import constants

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hub_id_offline_without_cache_suggests_a_local_path(offline_cache):
    expected = "not in the Hugging Face cache and HF_HUB_OFFLINE is set.*local model directory"
    with pytest.raises(CheckpointError, match=expected) as info:
        load_hf("scratchlm-tests/tiny-gpt2")
    one_line_error(info)


def test_hub_id_offline_from_populated_cache(offline_cache, hf_dir, hf_model):
    """The huggingface_hub cache layout: models--OWNER--NAME/{refs/main, snapshots/COMMIT/...}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = offline_cache / "models--scratchlm-tests--tiny-gpt2"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(hf_dir, repo / "snapshots" / commit)
    model, tokenizer, config = load_hf("scratchlm-tests/tiny-gpt2")
    assert config.name == "scratchlm-tests/tiny-gpt2" and tokenizer is None
    assert_same_logits(our_logits(model), hf_logits(hf_model))


@pytest.mark.parametrize("names", [("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt")])
def test_tokenizer_files_are_loaded(hf_dir, tmp_path, gpt2_files, names):
    """OpenAI's names and the ones save_pretrained writes for the same two files."""
    with_tok = copy_dir(hf_dir, tmp_path / "with-tokenizer")
    for path, name in zip(gpt2_files, names, strict=True):
        shutil.copy(path, with_tok / name)
    model, tokenizer, config = load_hf(with_tok)
    assert tokenizer is not None and tokenizer.encode("Hello, I am") == [15496, 11, 314, 716]
    save_hf(model, config, tmp_path / "exported", tokenizer=tokenizer)  # writes tokenizer.json
    assert (tmp_path / "exported" / "tokenizer.json").is_file()
    assert load_hf(tmp_path / "exported")[1].encode("Hello, I am") == [15496, 11, 314, 716]
