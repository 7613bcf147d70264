"""Hugging Face checkpoints: import (a directory or a hub id) and export, from one weight table per family.

Each family (GPT-2, Llama (SmolLM2 is one), Qwen2, Qwen3: ``FAMILIES``) is *data*: a
list of ``Row``s pairing a Hugging Face tensor name with our parameter name(s), plus the two
config translations.  ``import_weights`` and ``export_weights`` are the only code that walks a
table, so a family cannot import one way and export another.

Import is strict — every tensor in the file is consumed or explicitly ignored, every parameter
is filled, and a shape mismatch names the tensor and both shapes — because a silently skipped
tensor produces a model that runs and talks nonsense.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from scratchlm.checkpoint.atomic import atomic_path, write_json_atomic
from scratchlm.errors import CheckpointError, ConfigError
from scratchlm.models.config import ModelConfig
from scratchlm.models.transformer import Transformer

if TYPE_CHECKING:
    from scratchlm.tokenizers import Tokenizer

__all__ = ["load_hf", "save_hf", "is_hf_dir", "import_weights", "export_weights", "FAMILIES"]


# --------------------------------------------------------------------------------------------
# The declarative part: rows and families
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One Hugging Face tensor and the parameter(s) of ours that hold it.

    ``hf`` and ``ours`` may contain ``{i}``, the layer index.  Several ``ours`` names mean the
    checkpoint fuses them: they are stacked along dim 0 of our ``nn.Linear`` layout (GPT-2's
    ``c_attn`` = q, k, v).  ``conv1d`` marks GPT-2's Conv1D layout, ``[in, out]``: transposed
    on the way in and on the way out.
    """

    hf: str
    ours: tuple[str, ...]
    conv1d: bool = False

    def expand(self, n_layer: int) -> Iterator[tuple[str, tuple[str, ...]]]:
        if "{i}" not in self.hf:
            yield self.hf, self.ours
            return
        for i in range(n_layer):
            yield self.hf.format(i=i), tuple(name.format(i=i) for name in self.ours)


@dataclass(frozen=True)
class Family:
    """Everything that differs between checkpoint families: names, config keys, conventions."""

    model_type: str
    architecture: str
    prefix: str  # prefix of the body tensors; hub files sometimes store them without it
    rows: tuple[Row, ...]
    ignore: tuple[str, ...]  # regexes over full names: buffers that carry no weights
    config_from_hf: Callable[[dict[str, Any]], ModelConfig]
    config_to_hf: Callable[[ModelConfig], dict[str, Any]]
    zero_missing_biases: bool  # the format always has biases: export zeros where our config has none

    def canonical(self, key: str, top_level: set[str]) -> str:
        """The full name of a stored key: accept ``h.0.ln_1.weight`` for ``transformer.h.0.ln_1.weight``."""
        if key.startswith(self.prefix) or key in top_level:
            return key
        return self.prefix + key

    def is_ignored(self, key: str) -> bool:
        return any(re.fullmatch(pattern, key) for pattern in self.ignore)


def _gpt2_rows() -> tuple[Row, ...]:
    t, a = "transformer.h.{i}.", "layers.{i}."
    return (
        Row("transformer.wte.weight", ("embed_tokens.weight",)),
        Row("transformer.wpe.weight", ("embed_positions.weight",)),
        Row(t + "ln_1.weight", (a + "input_layernorm.weight",)),
        Row(t + "ln_1.bias", (a + "input_layernorm.bias",)),
        Row(t + "attn.c_attn.weight", tuple(f"{a}self_attn.{p}_proj.weight" for p in "qkv"), conv1d=True),
        Row(t + "attn.c_attn.bias", tuple(f"{a}self_attn.{p}_proj.bias" for p in "qkv")),
        Row(t + "attn.c_proj.weight", (a + "self_attn.o_proj.weight",), conv1d=True),
        Row(t + "attn.c_proj.bias", (a + "self_attn.o_proj.bias",)),
        Row(t + "ln_2.weight", (a + "post_attention_layernorm.weight",)),
        Row(t + "ln_2.bias", (a + "post_attention_layernorm.bias",)),
        Row(t + "mlp.c_fc.weight", (a + "mlp.up_proj.weight",), conv1d=True),
        Row(t + "mlp.c_fc.bias", (a + "mlp.up_proj.bias",)),
        Row(t + "mlp.c_proj.weight", (a + "mlp.down_proj.weight",), conv1d=True),
        Row(t + "mlp.c_proj.bias", (a + "mlp.down_proj.bias",)),
        Row("transformer.ln_f.weight", ("norm.weight",)),
        Row("transformer.ln_f.bias", ("norm.bias",)),
        Row("lm_head.weight", ("lm_head.weight",)),
    )


# activation_function values that are GELU with the tanh approximation (same formula, three spellings)
_GPT2_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def _gpt2_config_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    """GPT-2 ``config.json`` → ModelConfig, refusing options that our decoder does not implement."""
    def refuse(what: str) -> CheckpointError:
        return CheckpointError(f"this GPT-2 checkpoint uses {what}, which scratchlm does not implement",
                               "use a standard GPT-2 checkpoint")

    act = cfg.get("activation_function", "gelu_new")
    if act not in _GPT2_TANH_GELUS:
        raise refuse(f"activation_function {act!r} (supported: {', '.join(_GPT2_TANH_GELUS)})")
    if cfg.get("scale_attn_by_inverse_layer_idx", False):
        raise refuse("scale_attn_by_inverse_layer_idx")
    if cfg.get("add_cross_attention", False):
        raise refuse("add_cross_attention (an encoder-decoder setup)")
    if not cfg.get("scale_attn_weights", True):
        raise refuse("scale_attn_weights: false (unscaled attention scores)")
    positions = cfg.get("n_positions") or cfg.get("n_ctx")
    try:
        return ModelConfig(
            vocab_size=cfg["vocab_size"], context_length=positions, n_layer=cfg["n_layer"],
            n_head=cfg["n_head"], n_embd=cfg["n_embd"], intermediate_size_override=cfg.get("n_inner"),
            norm="layernorm", norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)), norm_bias=True,
            mlp="gelu", mlp_bias=True, positions="learned", qkv_bias=True, o_bias=True,
            tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),
            # One probability drives all of our dropouts; GPT-2 checkpoints use 0.1 for all three.
            dropout=float(cfg.get("resid_pdrop", 0.0)),
        )
    except KeyError as err:
        raise CheckpointError(f"config.json has no {err.args[0]!r}",
                              "the GPT-2 config is incomplete") from None
    except ConfigError as err:
        raise CheckpointError(f"config.json describes an invalid model: {err.what}",
                              "fix config.json") from None


def _gpt2_config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """ModelConfig → GPT-2 ``config.json``; a config GPT-2's format cannot express is refused."""
    unsupported = [
        what for what, bad in (
            (f"norm {config.norm!r}", config.norm != "layernorm"),
            (f"mlp {config.mlp!r}", config.mlp != "gelu"),
            (f"positions {config.positions!r}", config.positions != "learned"),
            ("grouped-query attention", config.n_kv_head != config.n_head),
            ("head_dim other than n_embd / n_head", config.head_dim * config.n_head != config.n_embd),
            ("q/k norm", config.qk_norm),
        ) if bad
    ]
    if unsupported:
        raise ConfigError(f"the GPT-2 format cannot express {', '.join(unsupported)}",
                          "export GPT-2-style models only (learned positions, LayerNorm, GELU MLP)")
    # GPT-2's token ids; transformers warns about ids outside a smaller vocabulary, so leave them out.
    eos = 50256 if config.vocab_size > 50256 else None
    return {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
        "vocab_size": config.vocab_size, "n_positions": config.context_length, "n_ctx": config.context_length,
        "n_embd": config.n_embd, "n_layer": config.n_layer, "n_head": config.n_head,
        "n_inner": config.intermediate_size_override, "activation_function": "gelu_new",
        "layer_norm_epsilon": config.norm_eps, "tie_word_embeddings": config.tie_embeddings,
        "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False,
        "reorder_and_upcast_attn": False, "bos_token_id": eos, "eos_token_id": eos,
        "initializer_range": 0.02, "use_cache": True,
    }


GPT2 = Family(
    model_type="gpt2",
    architecture="GPT2LMHeadModel",
    prefix="transformer.",
    rows=_gpt2_rows(),
    ignore=(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)",),
    config_from_hf=_gpt2_config_from_hf,
    config_to_hf=_gpt2_config_to_hf,
    zero_missing_biases=True,
)


# Llama, Qwen2 and Qwen3 checkpoints use our module names already (ours follow theirs), under
# "model.".  One row list serves all three: rows for parameters a config lacks (biases, q/k norm)
# are skipped, and a stored tensor that no row consumed is then an error.
_LLAMA_LAYER_PARAMS = (
    "input_layernorm.weight", "post_attention_layernorm.weight",
    *(f"self_attn.{p}_proj.{kind}" for p in "qkvo" for kind in ("weight", "bias")),
    "self_attn.q_norm.weight", "self_attn.k_norm.weight",
    *(f"mlp.{p}_proj.{kind}" for p in ("gate", "up", "down") for kind in ("weight", "bias")),
)
_LLAMA_ROWS = (
    Row("model.embed_tokens.weight", ("embed_tokens.weight",)),
    *(Row(f"model.layers.{{i}}.{name}", (f"layers.{{i}}.{name}",)) for name in _LLAMA_LAYER_PARAMS),
    Row("model.norm.weight", ("norm.weight",)),
    Row("lm_head.weight", ("lm_head.weight",)),
)
_LLAMA_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def _rope_from_hf(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from either config form: transformers v5 ``rope_parameters`` or v4
    ``rope_theta`` + ``rope_scaling``.  A missing theta is an error, never a silent default."""
    params = cfg.get("rope_parameters") or {}
    legacy = cfg.get("rope_scaling") or {}
    theta = params.get("rope_theta", cfg.get("rope_theta"))
    if theta is None:
        raise CheckpointError("config.json gives no rope_theta (nor rope_parameters.rope_theta)",
                              "add the model's RoPE base to config.json")
    scaling = {k: v for k, v in {**legacy, **params}.items() if k != "rope_theta"}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind not in ("linear", "llama3"):
        raise CheckpointError(f"rope type {kind!r} is not implemented",
                              "supported rope types: default, linear, llama3")
    return float(theta), {**scaling, "rope_type": kind}


def _llama_config_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    """Llama / Qwen2 / Qwen3 ``config.json`` (v4 or v5 form) → ModelConfig."""
    model_type = cfg["model_type"]
    if cfg.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"hidden_act {cfg['hidden_act']!r} is not implemented for {model_type}",
                              "only SwiGLU (silu) MLPs are supported")
    if float(cfg.get("partial_rotary_factor", 1.0)) != 1.0:
        raise CheckpointError("partial_rotary_factor other than 1.0 is not implemented",
                              "use a model with RoPE over whole heads")
    if cfg.get("use_sliding_window", False):
        raise CheckpointError("sliding-window attention (use_sliding_window: true) is not implemented",
                              "use a checkpoint with full attention")
    theta, scaling = _rope_from_hf(cfg)
    attention_bias = bool(cfg.get("attention_bias", False))
    try:
        return ModelConfig(
            vocab_size=cfg["vocab_size"], context_length=cfg["max_position_embeddings"],
            n_layer=cfg["num_hidden_layers"], n_head=cfg["num_attention_heads"], n_embd=cfg["hidden_size"],
            n_kv_head_override=cfg.get("num_key_value_heads"), head_dim_override=cfg.get("head_dim"),
            intermediate_size_override=cfg["intermediate_size"], mlp="swiglu",
            mlp_bias=bool(cfg.get("mlp_bias", False)) and model_type == "llama",
            norm="rmsnorm", norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), norm_bias=False,
            positions="rope", rope_theta=theta, rope_scaling=scaling,
            # Qwen2's q/k/v biases are part of the architecture (no config key); its o_proj has none.
            qkv_bias=attention_bias or model_type == "qwen2", o_bias=attention_bias and model_type != "qwen2",
            qk_norm=model_type == "qwen3", tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            dropout=float(cfg.get("attention_dropout", 0.0)),
        )
    except KeyError as err:
        raise CheckpointError(f"config.json has no {err.args[0]!r}",
                              f"the {model_type} config is incomplete") from None
    except ConfigError as err:
        raise CheckpointError(f"config.json describes an invalid model: {err.what}",
                              "fix config.json") from None


def _llama_family_of(config: ModelConfig) -> str:
    """Which of llama / qwen2 / qwen3 expresses a RoPE + RMSNorm + SwiGLU config."""
    if config.qk_norm:
        return "qwen3"
    if config.qkv_bias and not config.o_bias:
        return "qwen2"
    return "llama"


def _llama_config_to_hf(config: ModelConfig) -> dict[str, Any]:
    model_type = _llama_family_of(config)
    unsupported = [
        what for what, bad in (
            (f"norm {config.norm!r}", config.norm != "rmsnorm"),
            (f"mlp {config.mlp!r}", config.mlp != "swiglu"),
            (f"positions {config.positions!r}", config.positions != "rope"),
            ("q/k/v biases without an o_proj bias, or the reverse",
             model_type != "qwen2" and config.qkv_bias != config.o_bias),
            ("MLP biases", config.mlp_bias and model_type != "llama"),
        ) if bad
    ]
    if unsupported:
        raise ConfigError(f"the {model_type} format cannot express {', '.join(unsupported)}",
                          "change the model config")
    scaling = dict(config.rope_scaling or {})
    kind = scaling.pop("rope_type", scaling.pop("type", "default"))  # pops both spellings
    rope: dict[str, Any] = {"rope_type": kind, **scaling, "rope_theta": config.rope_theta}
    out: dict[str, Any] = {
        "model_type": model_type, "architectures": [_LLAMA_ARCHITECTURES[model_type]],
        "vocab_size": config.vocab_size, "max_position_embeddings": config.context_length,
        "hidden_size": config.n_embd, "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head, "head_dim": config.head_dim, "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps, "tie_word_embeddings": config.tie_embeddings,
        "attention_dropout": config.dropout, "initializer_range": 0.02, "use_cache": True,
        # both config forms: transformers v5 reads rope_parameters, v4 rope_theta + rope_scaling
        "rope_parameters": rope, "rope_theta": config.rope_theta,
        "rope_scaling": {k: v for k, v in rope.items() if k != "rope_theta"} if config.rope_scaling else None,
    }
    if model_type != "qwen2":
        out["attention_bias"] = config.qkv_bias
    if model_type == "llama":
        out["mlp_bias"] = config.mlp_bias
    else:
        out["use_sliding_window"] = False
    return out


def _llama_family(model_type: str) -> Family:
    return Family(
        model_type=model_type,
        architecture=_LLAMA_ARCHITECTURES[model_type],
        prefix="model.",
        rows=_LLAMA_ROWS,
        ignore=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",),
        config_from_hf=_llama_config_from_hf,
        config_to_hf=_llama_config_to_hf,
        zero_missing_biases=False,
    )


FAMILIES: dict[str, Family] = {GPT2.model_type: GPT2, **{t: _llama_family(t) for t in _LLAMA_ARCHITECTURES}}


def family_for_hf_config(cfg: dict[str, Any]) -> Family:
    model_type = cfg.get("model_type")
    if model_type not in FAMILIES:
        raise CheckpointError(f"unknown model_type {model_type!r} in config.json",
                              f"supported model types: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def family_for_config(config: ModelConfig) -> Family:
    """The checkpoint family that can express ``config``: GPT-2 for learned positions, else
    Llama, Qwen2 or Qwen3 (``config_to_hf`` then refuses what the chosen format cannot hold)."""
    if config.arch != "transformer":
        raise ConfigError(f"models of arch {config.arch!r} have no Hugging Face checkpoint format "
                          "(transformers has none for it)",
                          "keep it as a scratchlm run dir (convert --to run), which every scratchlm "
                          "command opens")
    if config.positions == "learned":
        return GPT2
    return FAMILIES[_llama_family_of(config)]


# --------------------------------------------------------------------------------------------
# The only two walks over a table
# --------------------------------------------------------------------------------------------


def _shape(shape: torch.Size | tuple[int, ...]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def import_weights(family: Family, model: Transformer, tensors: Mapping[str, torch.Tensor],
                   source: str = "the checkpoint") -> None:
    """Copy checkpoint ``tensors`` (HF names) into ``model``'s parameters, strictly.

    ``tensors`` may be lazy (``__getitem__`` reads from disk): each tensor is loaded once, copied
    into place and dropped, so peak memory stays near one model.
    """
    params = dict(model.named_parameters())  # tied weights appear once, under embed_tokens
    top_level = {row.hf for row in family.rows if not row.hf.startswith(family.prefix)}
    stored = {family.canonical(key, top_level): key for key in tensors}
    consumed: set[str] = set()
    filled: set[str] = set()
    for row in family.rows:
        for hf_name, ours in row.expand(model.config.n_layer):
            present = [name for name in ours if name in params]
            if not present:
                continue  # not in this config: a tied head, or biases the config does not have
            if len(present) != len(ours):
                raise CheckpointError(f"{hf_name} fuses {', '.join(ours)}, but the model has only "
                                      f"{', '.join(present)}", "fix the model config")
            if hf_name not in stored:
                raise CheckpointError(f"{source} has no tensor {hf_name!r} (needed for {ours[0]})",
                                      "the checkpoint is incomplete or does not match its config.json")
            tensor = tensors[stored[hf_name]]
            sizes = [params[name].shape[0] for name in ours]
            expected = (sum(sizes), *params[ours[0]].shape[1:])
            if row.conv1d:
                expected = expected[::-1]
            if tuple(tensor.shape) != expected:
                raise CheckpointError(
                    f"tensor {hf_name!r} in {source} has shape {_shape(tensor.shape)}, "
                    f"but the model expects {_shape(expected)}",
                    "the weights do not match config.json",
                )
            if row.conv1d:
                tensor = tensor.t()
            with torch.no_grad():
                for name, part in zip(ours, tensor.split(sizes, dim=0), strict=True):
                    params[name].copy_(part)
            consumed.add(hf_name)
            filled.update(ours)
    leftover = sorted(
        stored[key] for key in stored  # reported as stored, prefix or not
        if key not in consumed and not family.is_ignored(key)
        # a tied head may still be stored (old checkpoints); it is the embedding again
        and not (key == "lm_head.weight" and model.config.tie_embeddings)
    )
    if leftover:
        more = f" and {len(leftover) - 5} more" if len(leftover) > 5 else ""
        raise CheckpointError(f"{source} has unexpected tensors: {', '.join(leftover[:5])}{more}",
                              f"it is not a {family.architecture} checkpoint matching its config.json")
    unfilled = sorted(set(params) - filled)
    if unfilled:
        raise CheckpointError(f"no {family.model_type} tensor fills {', '.join(unfilled[:5])}",
                              f"this model config cannot be loaded from a {family.model_type} checkpoint")


def export_weights(family: Family, model: Transformer) -> dict[str, torch.Tensor]:
    """The model's parameters under HF names and layouts (the inverse of ``import_weights``)."""
    params = dict(model.named_parameters())
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for row in family.rows:
        for hf_name, ours in row.expand(model.config.n_layer):
            if all(name in params for name in ours):
                tensor = torch.cat([params[name].detach() for name in ours], dim=0)
                used.update(ours)
            elif family.zero_missing_biases and hf_name.endswith(".bias"):
                # e.g. a model trained with qkv_bias=False: zero biases are the same function
                sizes = [model.get_submodule(name.rsplit(".", 1)[0]).weight.shape[0] for name in ours]
                weight = params[ours[0].rsplit(".", 1)[0] + ".weight"]
                tensor = torch.zeros(sum(sizes), dtype=weight.dtype, device=weight.device)
            else:
                continue  # a tied head: HF files leave it out too
            out[hf_name] = (tensor.t() if row.conv1d else tensor).contiguous()
    unused = sorted(set(params) - used)
    if unused:
        raise ConfigError(f"the {family.model_type} format has no place for {', '.join(unused[:5])}",
                          "this model cannot be exported in that format")
    return out


# --------------------------------------------------------------------------------------------
# Files: directories, hub ids, weights
# --------------------------------------------------------------------------------------------

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
_HUB_PATTERNS = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "vocab.json", "merges.txt", "encoder.json", "vocab.bpe"]
_SAFETENSORS_PATTERNS = ["model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]
_PICKLE_PATTERNS = ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin"]
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def _unreadable(path: Path, err: Exception | str) -> CheckpointError:
    return CheckpointError(f"cannot read {path}: {err}", "the file is corrupt; download it again")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found",
                              "a Hugging Face model directory needs config.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _unreadable(path, err) from None
    if not isinstance(data, dict):
        raise _unreadable(path, "not a JSON object")
    return data


def is_hf_dir(path: str | Path) -> bool:
    """True for a directory holding an HF ``config.json`` (with ``model_type``) and weights.

    ``model_type`` is what tells it from our run dirs, which also hold ``config.json`` and
    ``model.safetensors``.
    """
    path = Path(path)
    if not (path / "config.json").is_file() or not any((path / name).is_file() for name in WEIGHT_FILES):
        return False
    try:
        return "model_type" in json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError):
        return False


class _SafetensorsFiles(Mapping[str, torch.Tensor]):
    """Lazy name → tensor view over one or more safetensors files (reads each tensor on access)."""

    def __init__(self, files: dict[str, Path]):
        from safetensors import safe_open

        self._where = files  # tensor name → file
        self._handles: dict[Path, Any] = {}
        for path in sorted(set(files.values())):
            try:
                self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
            except Exception as err:  # safetensors raises its own error types for corrupt headers
                raise _unreadable(path, err) from None

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._handles[self._where[key]].get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _safetensors_names(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return list(f.keys())
    except Exception as err:
        raise _unreadable(path, err) from None


def _shards(directory: Path, index_name: str) -> list[Path]:
    index = _read_json(directory / index_name)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{directory / index_name} has no weight_map", "the index file is corrupt")
    shards = [directory / name for name in sorted(set(weight_map.values()))]
    for shard in shards:
        if not shard.is_file():
            raise CheckpointError(f"shard {shard.name} listed in {index_name} is missing from {directory}",
                                  "download the missing shard files")
    return shards


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    """``pytorch_model.bin``, opened only with ``weights_only=True`` (no code runs from the file)."""
    import pickle

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first_line = str(err).splitlines()[0]
        raise CheckpointError(f"{path} holds more than tensors and was not loaded ({first_line})",
                              "convert it to safetensors with a tool you trust") from None
    except (OSError, RuntimeError, EOFError) as err:
        raise _unreadable(path, err) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a state dict", "convert it to safetensors")
    return state


def read_weights(directory: Path) -> tuple[Mapping[str, torch.Tensor], str]:
    """The tensors of an HF directory (lazy for safetensors) and a name for error messages."""
    if (directory / "model.safetensors").is_file():
        path = directory / "model.safetensors"
        return _SafetensorsFiles({name: path for name in _safetensors_names(path)}), path.name
    if (directory / "model.safetensors.index.json").is_file():
        files = {name: shard for shard in _shards(directory, "model.safetensors.index.json")
                 for name in _safetensors_names(shard)}
        return _SafetensorsFiles(files), "model.safetensors.index.json"
    if (directory / "pytorch_model.bin").is_file():
        return _load_pickle(directory / "pytorch_model.bin"), "pytorch_model.bin"
    if (directory / "pytorch_model.bin.index.json").is_file():
        state: dict[str, torch.Tensor] = {}
        for shard in _shards(directory, "pytorch_model.bin.index.json"):
            state.update(_load_pickle(shard))
        return state, "pytorch_model.bin.index.json"
    raise CheckpointError(f"no weights in {directory}", "expected model.safetensors, a sharded "
                          "model.safetensors.index.json or pytorch_model.bin")


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _snapshot(repo_id: str, patterns: list[str], offline: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=offline))
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if offline else "the hub cannot be reached"
        raise CheckpointError(f"{repo_id!r} is not in the Hugging Face cache and {why}",
                              "pass a local model directory instead, or download it while online") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{repo_id!r} is not a model on the Hugging Face hub (or it is gated)",
                              "check the id, or log in with 'hf auth login' for gated models") from None
    except ValueError as err:  # HFValidationError: not a well-formed repo id
        raise CheckpointError(f"{repo_id!r} is neither a directory nor a hub id ({err})",
                              "pass a model directory or an id like openai-community/gpt2") from None
    except OSError as err:  # HTTP errors, disk full, ...
        raise CheckpointError(f"cannot download {repo_id!r}: {str(err).splitlines()[0]}",
                              "check the network, or pass a local model directory") from None


def resolve_hf(ref: str | Path) -> Path:
    """A local directory, or a hub id downloaded (config, weights, tokenizer files only) into the HF cache."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{ref} is a file, not a model directory",
                              "pass the directory that holds config.json")
    text = str(ref)
    if not _HUB_ID.fullmatch(text) or ".." in text:
        raise CheckpointError(f"{ref} not found",
                              "pass an existing model directory or a hub id like owner/name")
    from huggingface_hub import constants

    # huggingface_hub reads HF_HUB_OFFLINE once, at import; read it again so a later setting counts
    offline = constants.HF_HUB_OFFLINE or _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")
    directory = _snapshot(text, _HUB_PATTERNS + _SAFETENSORS_PATTERNS, offline)
    if not any((directory / name).is_file() for name in WEIGHT_FILES):
        # No safetensors on the hub: fall back to the pickled files (opened with weights_only=True).
        directory = _snapshot(text, _HUB_PATTERNS + _PICKLE_PATTERNS, offline)
    return directory


def _load_tokenizer(directory: Path) -> Tokenizer | None:
    """The directory's tokenizer, or None when it has no tokenizer files.

    ``vocab.json`` + ``merges.txt`` (what ``save_pretrained`` writes for GPT-2) are GPT-2's
    ``encoder.json`` + ``vocab.bpe`` under other names.
    """
    from scratchlm.tokenizers import ByteLevelBPE, load

    if (directory / "tokenizer.json").is_file() or (directory / "encoder.json").is_file():
        return load(directory)
    if (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
        return ByteLevelBPE.from_gpt2_files(directory / "vocab.json", directory / "merges.txt")
    return None


def load_hf(ref: str | Path, device: str | torch.device = "cpu",
            dtype: torch.dtype | None = None) -> tuple[Transformer, Tokenizer | None, ModelConfig]:
    """Open a Hugging Face checkpoint (directory or hub id) as ``(model, tokenizer, config)``.

    The model is in eval mode.  ``dtype`` None means float32 whatever the file stores: CPUs
    without native bf16 run fp32 far faster, and fp32 is what parity tests compare against.
    """
    directory = resolve_hf(ref)
    hf_config = _read_json(directory / "config.json")
    family = family_for_hf_config(hf_config)
    config = family.config_from_hf(hf_config).replace(name=str(ref))
    tensors, source = read_weights(directory)
    model = Transformer.empty(config, device=device, dtype=dtype or torch.float32)
    import_weights(family, model, tensors, source=f"{directory / source}")
    return model.eval(), _load_tokenizer(directory), config


def save_hf(model: Transformer, config: ModelConfig, out_dir: str | Path,
            tokenizer: Tokenizer | None = None) -> Path:
    """Write ``config.json``, ``model.safetensors``, ``generation_config.json`` (+ tokenizer files).

    ``transformers``' ``from_pretrained`` loads the directory with the same logits.  bos and eos
    have one rule, here: the ids the tokenizer knows, where they are inside the model's vocabulary,
    else the family's own (GPT-2's 50256 for a GPT-2-sized vocabulary), go into both JSON files.
    Without ``eos_token_id`` in ``generation_config.json``, transformers' ``generate`` never stops
    at the end of a chat turn; with no tokenizer, no id is made up.
    """
    from safetensors.torch import save_file

    family = family_for_config(config)
    hf_config = family.config_to_hf(config)
    hf_config["torch_dtype"] = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
    for key, token_id in (("bos_token_id", getattr(tokenizer, "bos_id", None)),
                          ("eos_token_id", getattr(tokenizer, "eos_id", None))):
        if token_id is not None and 0 <= token_id < config.vocab_size:
            hf_config[key] = token_id
    tensors = {name: t.cpu() for name, t in export_weights(family, model).items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    generation = {key: hf_config[key] for key in ("bos_token_id", "eos_token_id")
                  if hf_config.get(key) is not None}
    write_json_atomic(out / "config.json", hf_config)
    write_json_atomic(out / "generation_config.json", generation)
    if tokenizer is not None:
        tokenizer.save(out)
    return out
