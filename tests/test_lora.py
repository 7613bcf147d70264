"""LoRA: parity with peft both ways (tiny random Llama and GPT-2 saved by transformers), gradients,
merging, disabling, PEFT-format files, the --adapter option and the bad inputs."""

from __future__ import annotations

import json
import math
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import scratchlm  # noqa: E402
from scratchlm.errors import CheckpointError, ConfigError, UserError  # noqa: E402
from scratchlm.finetune.lora import (  # noqa: E402
    AdapterBaseWarning,
    LoRAConfig,
    LoRALinear,
    adapter_parameters,
    apply_lora,
    disable_adapters,
    has_lora,
    linear_targets,
    load_adapter,
    lora_param_groups,
    merge_lora,
    save_adapter,
)
from scratchlm.tokenizers.train_bpe import train_bpe  # noqa: E402

TOKENIZER = train_bpe("a tiny corpus for a tiny tokenizer, tiny and fine. " * 10, 270,
                      special_tokens=("<|endoftext|>",))
VOCAB = TOKENIZER.vocab_size  # every id the model can sample decodes
IDS = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
TOL = 1e-5


def _random_vectors(model: torch.nn.Module) -> torch.nn.Module:
    """Norm weights and biases away from 1 and 0, so a mixed-up tensor cannot hide."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


def _make(kind: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(**{
            "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 0,
            **overrides})
        return _random_vectors(transformers.LlamaForCausalLM(config))
    config = transformers.GPT2Config(**{
        "vocab_size": VOCAB, "n_positions": 32, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_inner": 48,
        "bos_token_id": 0, "eos_token_id": 0, "layer_norm_epsilon": 1e-5, **overrides})
    return _random_vectors(transformers.GPT2LMHeadModel(config))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny random Llama (GQA, untied head) and GPT-2 directories, each with a BPE tokenizer."""
    out = {}
    for kind in ("llama", "gpt2"):
        path = tmp_path_factory.mktemp(kind)
        _make(kind).save_pretrained(path)
        TOKENIZER.save(path)
        out[kind] = path
    return out


# What each test adapts: every linear layer of Llama including the untied head (with rsLoRA), and
# GPT-2's fused c_attn with both c_proj and c_fc, as peft names them.
TARGETS = {"llama": ("all-linear", "lm_head"), "gpt2": ("c_attn", "c_proj", "c_fc")}


def _hf(path: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out = model(IDS)
    return getattr(out, "logits", out)


def _randomise_adapters(model: torch.nn.Module, std: float) -> None:
    """B random (B = 0 would make every parity test trivial), A re-drawn too."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in adapter_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _our_adapter(kind: str, path: Path, out: Path, rslora: bool = False) -> tuple[scratchlm.LM, Path]:
    lm = scratchlm.load(path, device="cpu")
    apply_lora(lm.model, LoRAConfig(rank=4, alpha=8, dropout=0.1, targets=TARGETS[kind], rslora=rslora))
    # sized so that the adapter moves the logits by several times their base size
    _randomise_adapters(lm.model, 0.1 if kind == "llama" else 0.3)
    lm.model.eval()
    save_adapter(lm.model, out, path, metadata={"scratchlm_save_id": "abc"})
    return lm, out


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_our_adapter_loads_in_peft_with_our_logits(kind, dirs, tmp_path):
    lm, adapter = _our_adapter(kind, dirs[kind], tmp_path / "adapter", rslora=kind == "llama")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["bias"] == "none"
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["lora_dropout"] == 0.1
    assert config["fan_in_fan_out"] == (kind == "gpt2") and config["use_rslora"] == (kind == "llama")
    assert config["base_model_name_or_path"] == str(dirs[kind].resolve())
    tensors = load_file(adapter / "adapter_model.safetensors")
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt", "scratchlm_save_id": "abc"}
    if kind == "gpt2":
        assert config["target_modules"] == ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"]
        assert tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (4, 32)
        assert tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape == (96, 4)
    else:
        assert config["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj", "lm_head"]
        assert tensors["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"].shape == (16, 4)
        assert "base_model.model.lm_head.lora_A.weight" in tensors
    base = _hf(dirs[kind])
    base_logits = _logits(base)
    theirs = _logits(peft.PeftModel.from_pretrained(base, adapter).eval())
    ours = _logits(lm.model)
    assert _max_diff(theirs, base_logits) > base_logits.abs().max()  # the adapter matters
    assert _max_diff(ours, theirs) <= TOL


def _peft_adapter(kind: str, path: Path, out: Path) -> tuple[torch.Tensor, Path]:
    """An adapter made and saved by peft itself (random B), and peft's logits with it."""
    if kind == "llama":  # per-module ranks too
        config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                 rank_pattern={"v_proj": 2})
    else:
        config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn", "mlp.c_proj"],
                                 fan_in_fan_out=True)
    model = peft.get_peft_model(_hf(path), config)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.eval()
    model.save_pretrained(out)
    return _logits(model), out


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_peft_adapter_loads_into_ours_and_round_trips(kind, dirs, tmp_path):
    expected, adapter = _peft_adapter(kind, dirs[kind], tmp_path / "peft")
    lm = scratchlm.load(dirs[kind], device="cpu", adapter=adapter)
    assert _max_diff(_logits(lm.model), expected) <= TOL
    if kind == "llama":
        assert lm.model.layers[0].self_attn.v_proj.rank == 2 and lm.model.layers[0].self_attn.q_proj.rank == 4
    else:  # c_attn: one A shared by q, k and v
        attn = lm.model.layers[1].self_attn
        assert attn.q_proj.lora_A is attn.k_proj.lora_A is attn.v_proj.lora_A
        assert not isinstance(attn.o_proj, LoRALinear)
        assert isinstance(lm.model.layers[1].mlp.down_proj, LoRALinear)
    config = load_adapter(scratchlm.load(dirs[kind], device="cpu").model, adapter)
    assert (config.rank, config.alpha, config.dropout, config.rslora) == (4, 16.0, 0.0, False)
    targets = ("q_proj", "v_proj", "down_proj") if kind == "llama" else ("c_attn", "mlp.c_proj")
    assert config.targets == targets
    # and back: what we save from it is the same file, which peft opens with the same logits
    save_adapter(lm.model, tmp_path / "ours", dirs[kind])
    theirs, ours = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("peft", "ours"))
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)
    again = peft.PeftModel.from_pretrained(_hf(dirs[kind]), tmp_path / "ours").eval()
    assert _max_diff(_logits(again), expected) <= TOL


def test_fused_gradients_equal_peft(dirs, tmp_path):
    """The shared A of q/k/v gets the fused A's gradient, and the B rows the fused B's."""
    _, adapter = _peft_adapter("gpt2", dirs["gpt2"], tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(_hf(dirs["gpt2"]), adapter, is_trainable=True).eval()
    ours = scratchlm.load(dirs["gpt2"], device="cpu", adapter=adapter).model.eval()
    theirs(IDS).logits.square().mean().backward()
    ours(IDS).square().mean().backward()
    fused = theirs.base_model.model.transformer.h[0].attn.c_attn
    attn = ours.layers[0].self_attn
    assert _max_diff(attn.q_proj.lora_A.grad, fused.lora_A["default"].weight.grad) <= 1e-6
    grad_b = torch.cat([attn.q_proj.lora_B.grad, attn.k_proj.lora_B.grad, attn.v_proj.lora_B.grad])
    assert _max_diff(grad_b, fused.lora_B["default"].weight.grad) <= 1e-6


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_only_adapters_get_gradients(kind, dirs):
    lm = scratchlm.load(dirs[kind], device="cpu")
    model = apply_lora(lm.model, LoRAConfig(rank=2, targets=TARGETS[kind]))
    _randomise_adapters(model, 0.1)  # with B = 0 (its start), A's gradient is zero
    model.train()
    model(IDS).logsumexp(-1).mean().backward()
    adapters = {id(p) for p in adapter_parameters(model)}
    for name, p in model.named_parameters():
        if id(p) in adapters:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    # GPT-2: 2 layers × (c_attn: one A + three B parts; attn.c_proj, c_fc, mlp.c_proj: A + B)
    assert len(adapters) == (2 * (4 + 6) if kind == "gpt2" else 2 * 7 * 2 + 2)
    # optimizer groups: adapters without weight decay; a head the caller unfreezes by the loop's rule
    model.norm.weight.requires_grad_(True)
    groups = lora_param_groups(model, weight_decay=0.1)
    assert groups[0]["weight_decay"] == 0.0 and {id(p) for p in groups[0]["params"]} == adapters
    assert any(g["params"] == [model.norm.weight] and g["weight_decay"] == 0.0 for g in groups[1:])
    assert lora_param_groups(model, 0.1, adapter_weight_decay=0.01)[0]["weight_decay"] == 0.01


def test_book_counting_oracle():
    """Burkov §5.5.1 (O58): 1024×1024 W, r 8: A and B add 16,384 parameters; α 16 gives a scale of 2."""
    layer = LoRALinear(torch.nn.Linear(1024, 1024, bias=False), rank=8, alpha=16)
    trainable = [p for p in layer.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == 16_384 and layer.scale == 2.0
    assert layer.base.weight.numel() == 1_048_576 and not layer.base.weight.requires_grad


@settings(max_examples=25, deadline=None)
@given(d_in=st.integers(1, 12), d_out=st.integers(1, 12), rank=st.integers(1, 6),
       alpha=st.floats(0.5, 64), rslora=st.booleans(), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_lora_linear_is_the_formula(d_in, d_out, rank, alpha, rslora, bias, seed):
    """y = W x + b + s·B A x (float64 reference); merging gives the same y; unmerging restores W."""
    torch.manual_seed(seed)
    base = torch.nn.Linear(d_in, d_out, bias=bias)
    layer = LoRALinear(base, rank, alpha, dropout=0.5, rslora=rslora).eval()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, d_in)
    w, a, b = (t.detach().double() for t in (layer.base.weight, layer.lora_A, layer.lora_B))
    scale = alpha / (math.sqrt(rank) if rslora else rank)
    expected = x.double() @ (w + scale * b @ a).T
    if bias:
        expected += layer.base.bias.detach().double()
    tol = 1e-6 * (1 + expected.abs().max().item())  # float32 rounding, relative to the outputs' size
    with torch.no_grad():
        assert _max_diff(layer(x).double(), expected) <= tol
        before = layer.base.weight.clone()
        layer.merge()
        merged = layer.base.weight.abs().max().item()
        assert _max_diff(layer(x).double(), expected) <= tol
        layer.unmerge()  # (W + Δ) − Δ: one rounding of W + Δ
        assert _max_diff(layer.base.weight, before) <= 2 * torch.finfo(torch.float32).eps * merged


def test_initialisation_is_peft_s(dirs):
    """A Kaiming-uniform with a = √5 (bound 1/√in), B zero: the adapted model starts as the base."""
    lm = scratchlm.load(dirs["llama"], device="cpu")
    before = _logits(lm.model)
    apply_lora(lm.model, LoRAConfig(rank=16, alpha=32, targets=("down_proj",)))
    layer = lm.model.layers[0].mlp.down_proj
    bound = 1 / math.sqrt(48)
    a = layer.lora_A.detach()
    assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound
    assert abs(a.std().item() - bound / math.sqrt(3)) < 0.1 * bound  # uniform(-b, b) has std b/√3
    assert torch.count_nonzero(layer.lora_B) == 0 and layer.scale == 2.0
    assert torch.equal(_logits(lm.model), before)
    assert LoRAConfig(rank=16, alpha=32, rslora=True).scale == 8.0


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merge_and_disable(kind, dirs, tmp_path):
    lm, adapter = _our_adapter(kind, dirs[kind], tmp_path / "a")
    base = _logits(_hf(dirs[kind]))
    adapted = _logits(lm.model)
    with disable_adapters(lm.model):
        assert _max_diff(_logits(lm.model), base) <= TOL
    assert torch.equal(_logits(lm.model), adapted)
    layer = next(m for m in lm.model.modules() if isinstance(m, LoRALinear))
    weight = layer.base.weight.detach().clone()
    layer.merge()
    with pytest.raises(ConfigError, match="merged"), disable_adapters(lm.model):
        pass
    assert _max_diff(_logits(lm.model), adapted) <= TOL
    layer.unmerge()
    assert _max_diff(layer.base.weight, weight) <= 1e-6
    merge_lora(lm.model)
    assert not has_lora(lm.model)
    assert _max_diff(_logits(lm.model), adapted) <= TOL


def test_fp16_packed_inference_merges_first(dirs, tmp_path):
    from scratchlm.generation.packed import fp16_packing_available, is_packed

    if not fp16_packing_available():
        pytest.skip("this torch build has no FBGEMM fp16 linear")
    lm, adapter = _our_adapter("llama", dirs["llama"], tmp_path / "a")
    packed = scratchlm.load(dirs["llama"], device="cpu", dtype="float16", adapter=adapter)
    assert is_packed(packed.model) and not has_lora(packed.model)
    assert _max_diff(_logits(packed.model), _logits(lm.model)) <= 0.05  # fp16 weights


def test_lm_save_refuses_an_unmerged_adapter(dirs, tmp_path):
    lm, adapter = _our_adapter("gpt2", dirs["gpt2"], tmp_path / "a")
    with pytest.raises(UserError, match="LoRA adapter"):
        lm.save(tmp_path / "run")
    merge_lora(lm.model)
    again = scratchlm.load(lm.save(tmp_path / "run"), device="cpu")
    assert _max_diff(_logits(again.model), _logits(lm.model)) <= TOL


# --------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [dict(rank=0), dict(rank=-2), dict(rank=2.5), dict(alpha=0),
                                 dict(dropout=1.0), dict(targets=",")])
def test_bad_configs(bad):
    with pytest.raises(ConfigError) as info:
        LoRAConfig(**bad)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kind, target, names", [
    ("gpt2", "q_proj", "c_attn, attn.c_proj, c_fc, mlp.c_proj"),
    ("llama", "c_attn", "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head"),
])
def test_unknown_target_lists_the_linear_modules(kind, target, names, dirs):
    lm = scratchlm.load(dirs[kind], device="cpu")
    with pytest.raises(ConfigError) as info:
        apply_lora(lm.model, LoRAConfig(targets=("all-linear", target)))
    message = str(info.value)
    assert "\n" not in message and f"unknown LoRA target {target}" in message and names in message
    assert not has_lora(lm.model)
    # the tied GPT-2 head is not a target (its weight is the embedding)
    assert [t.short for t in linear_targets(lm.model)].count("lm_head") == (kind == "llama")


def test_lora_cli_options():
    import argparse

    from scratchlm.cli.options import add_lora_options, lora_config_from_args

    parser = argparse.ArgumentParser()
    recipe = LoRAConfig(rank=16, alpha=16)
    add_lora_options(parser, recipe)

    def parsed(*argv: str) -> LoRAConfig:
        return lora_config_from_args(vars(parser.parse_args(list(argv))), recipe)

    assert parsed("--lora-targets", "q_proj, v_proj", "--lora-dropout", "0.05") == LoRAConfig(
        rank=16, alpha=16, dropout=0.05, targets=("q_proj", "v_proj"))
    assert parsed() == recipe and vars(parser.parse_args([])) == {}  # absent until given: resume keeps its
    with pytest.raises(ConfigError, match="rank must be a positive integer"):
        parsed("--lora-rank", "0")


def test_adapter_for_another_shape_names_the_tensor(dirs, tmp_path):
    _, adapter = _our_adapter("llama", dirs["llama"], tmp_path / "a")
    other = tmp_path / "wider"
    _make("llama", intermediate_size=40).save_pretrained(other)
    with pytest.raises(CheckpointError) as info:
        scratchlm.load(other, device="cpu", adapter=adapter)
    message = str(info.value)
    assert "\n" not in message
    assert re.search(r"tensor base_model\.model\.model\.layers\.0\.mlp\.\w+_proj\.lora_[AB]\.weight in .* "
                     r"has shape \[.*48.*\], but model\.layers\.0\.mlp\.\w+ of this model needs \[.*40.*\]",
                     message)
    # an adapter for a module the model does not have (GPT-2's adapter on Llama)
    _, gpt2_adapter = _our_adapter("gpt2", dirs["gpt2"], tmp_path / "g")
    with pytest.raises(CheckpointError, match="transformer.h.0.attn.c_attn, which this model does not have"):
        scratchlm.load(dirs["llama"], device="cpu", adapter=gpt2_adapter)


def test_rank_mismatch_and_missing_half(dirs, tmp_path):
    _, adapter = _our_adapter("llama", dirs["llama"], tmp_path / "a")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    with pytest.raises(CheckpointError, match=r"lora_A.weight .* has shape \[4, 32\], .* needs \[8, 32\]"):
        scratchlm.load(dirs["llama"], device="cpu", adapter=adapter)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(adapter / "adapter_model.safetensors")
    del tensors["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"]
    save_file(tensors, adapter / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="no tensor base_model.model.model.layers.1.mlp.up_proj.lora_B"):
        scratchlm.load(dirs["llama"], device="cpu", adapter=adapter)


def test_base_name_mismatch_warns_and_applies(dirs, tmp_path):
    """The base name is a label (hub id, local copy, .gguf): another name warns; the shapes decide."""
    _, adapter = _our_adapter("llama", dirs["llama"], tmp_path / "a")
    copy = shutil.copytree(dirs["llama"], tmp_path / "copy")
    with pytest.warns(AdapterBaseWarning, match="was trained on"):
        lm = scratchlm.load(copy, device="cpu", adapter=adapter)
    assert has_lora(lm.model)
    with warnings.catch_warnings():  # the same directory, spelled another way: no warning
        warnings.simplefilter("error", AdapterBaseWarning)
        scratchlm.load(Path(dirs["llama"]) / ".." / dirs["llama"].name, device="cpu", adapter=adapter)


@pytest.mark.parametrize("change, message", [
    ({"peft_type": "IA3"}, "peft_type 'IA3'"),
    ({"use_dora": True}, "DoRA"),
    ({"bias": "all"}, "trained biases"),
    ({"modules_to_save": ["score"]}, "modules_to_save"),
])
def test_refused_adapter_kinds(change, message, dirs, tmp_path):
    _, adapter = _our_adapter("llama", dirs["llama"], tmp_path / "a")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(CheckpointError, match=message):
        scratchlm.load(dirs["llama"], device="cpu", adapter=adapter)


def test_missing_adapter_files(dirs, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        scratchlm.load(dirs["llama"], device="cpu", adapter=tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        scratchlm.load(dirs["llama"], device="cpu", adapter=dirs["llama"])
    lm = scratchlm.load(dirs["llama"], device="cpu")
    with pytest.raises(ConfigError, match="no LoRA adapters to save"):
        save_adapter(lm.model, tmp_path / "empty", dirs["llama"])
    assert not (tmp_path / "empty").exists()
    apply_lora(lm.model, LoRAConfig(targets=("q_proj",)))
    with pytest.raises(ConfigError, match="already"):
        apply_lora(lm.model, LoRAConfig(targets=("v_proj",)))


# --------------------------------------------------------------------------------------------
# The CLI
# --------------------------------------------------------------------------------------------


def test_generate_with_adapter(dirs, tmp_path, run_cli):
    lm, adapter = _our_adapter("llama", dirs["llama"], tmp_path / "a")
    expected = lm.generate("a tiny", temperature=0, max_new_tokens=8)
    plain = scratchlm.load(dirs["llama"], device="cpu").generate("a tiny", temperature=0, max_new_tokens=8)
    assert expected != plain
    code, out, err = run_cli("generate", "--model", dirs["llama"], "--adapter", adapter, "--prompt", "a tiny",
                             "--temperature", "0", "--max-new-tokens", "8")
    assert code == 0, err
    assert out.rstrip("\n") == expected.rstrip("\n")
    code, out, err = run_cli("generate", "--model", dirs["llama"], "--adapter", tmp_path / "missing",
                             "--prompt", "a")
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1


def test_convert_merge_adapter(dirs, tmp_path, run_cli):
    lm, adapter = _our_adapter("gpt2", dirs["gpt2"], tmp_path / "a")
    code, _, err = run_cli("convert", dirs["gpt2"], tmp_path / "out", "--to", "hf", "--adapter", adapter)
    assert code == 2 and "--merge-adapter" in err and not (tmp_path / "out").exists()
    code, _, err = run_cli("convert", dirs["gpt2"], tmp_path / "out", "--merge-adapter")
    assert code == 2 and "--adapter DIR" in err
    code, _, err = run_cli("convert", dirs["gpt2"], tmp_path / "out", "--to", "hf", "--adapter", adapter,
                           "--merge-adapter")
    assert code == 0, err
    assert _max_diff(_logits(_hf(tmp_path / "out")), _logits(lm.model)) <= TOL


def test_autocast_keeps_one_cast_of_the_frozen_weight_and_renews_it_when_the_weight_changes():
    """Under bf16 autocast the frozen base weight is cast once and kept (autocast itself recasts frozen
    weights at every call); the output is bit-equal to the plain autocast path, follows in-place
    changes of the weight (merge), and the copy is dropped outside autocast."""
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(16, 8), rank=4, alpha=8)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 16)

    def plain() -> torch.Tensor:
        y = layer.base(x)
        return y + layer.scale * (x.to(y.dtype) @ layer.lora_A.t().to(y.dtype)) @ layer.lora_B.t().to(y.dtype)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        first = layer(x)
        kept = layer._cast[2]
        torch.testing.assert_close(layer(x), first, rtol=0, atol=0)
        assert layer._cast[2] is kept and kept.dtype == torch.bfloat16  # cast once
        torch.testing.assert_close(first, plain(), rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(layer.base(x), torch.nn.functional.linear(x, kept, layer.base.bias),
                                   rtol=0, atol=0)  # the kept copy is autocast's own rounding
        layer.merge()
        merged = layer(x)
        assert layer._cast[2] is not kept  # the weight changed in place: cast anew
        torch.testing.assert_close(merged, layer.base(x), rtol=0, atol=0)
    layer(x)
    assert layer._cast is None
