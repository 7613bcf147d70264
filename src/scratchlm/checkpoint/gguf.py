"""GGUF files (llama.cpp's format) as our decoder: config, tokenizer and weights, read and written.

``gguf_file`` reads the header and the tensor table and dequantizes; this module maps the
metadata to a ``ModelConfig``, the tensor names to ours, and fills a ``Transformer``.  Each
llama.cpp architecture we read is a table (``_NAMES``) from its tensor names to our parameters;
two conventions differ from Hugging Face checkpoints beyond what ``gguf_file`` undoes:

* **Q/K rows** (``llama`` architecture only): llama.cpp's converter reorders the rows of
  ``W_q`` and ``W_k`` within each head from the rotate-half RoPE pairing of HF checkpoints,
  (i, i + d/2), to adjacent pairs, (2i, 2i + 1), which its ``llama`` kernels rotate.  Our
  attention rotates halves, so we put the rows back.  qwen2/qwen3 files keep the HF order.
* **GPT-2's matrices** (``gpt2``): llama.cpp stores every matrix as ``nn.Linear`` does, ``[out, in]``
  in torch order — its converter transposes the ``[in, out]`` Conv1D weights of Hugging Face's
  GPT-2 (transformers' GGUF loader transposes them back) — with q, k and v fused in one
  ``attn_qkv`` (rows q, then k, then v, as in ``c_attn``), which we split on import and join on
  export.  llama.cpp requires every bias of a ``gpt2`` file and always keeps the position table in
  F32.

``save_gguf`` writes the same names, metadata and row order back (the tables below, walked the other
way).  Import is strict, as for Hugging Face directories: every tensor is used, every parameter
filled, every shape checked, and an unsupported architecture or tensor type is a ``CheckpointError``
that names it.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from scratchlm.checkpoint.gguf_file import GGUFFile, read_gguf
from scratchlm.errors import CheckpointError, ConfigError
from scratchlm.models.config import ModelConfig
from scratchlm.models.rope import inverse_frequencies
from scratchlm.models.transformer import Transformer

if TYPE_CHECKING:
    from scratchlm.tokenizers import Tokenizer

__all__ = ["load_gguf", "save_gguf", "config_from_gguf", "SUPPORTED_ARCHITECTURES", "EXPORT_TYPES"]


# --------------------------------------------------------------------------------------------
# Names and config
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Names:
    """One llama.cpp architecture's tensor names, each with the parameter(s) of ours it holds.

    Several parameters for one tensor: llama.cpp stores them fused, stacked along rows in that
    order (GPT-2's ``attn_qkv`` is q, k, v).  ``layers`` keys are the ``<key>`` of
    ``blk.N.<key>.{weight,bias}``, values the module under ``layers.N.``.
    """

    globals: dict[str, tuple[str, ...]]
    layers: dict[str, tuple[str, ...]]
    float_only: frozenset[str] = frozenset()  # matrices llama.cpp keeps in F32 whatever the file type
    zero_missing_biases: bool = False  # llama.cpp requires every bias: export zeros where we have none

    def ours(self, gguf_name: str) -> tuple[str, ...] | None:
        """Our parameter name(s) for a GGUF tensor name, or None for a name we do not know."""
        if gguf_name in self.globals:
            return self.globals[gguf_name]
        match = _LAYER_TENSOR.fullmatch(gguf_name)
        if match and match[2] in self.layers:
            return tuple(f"layers.{match[1]}.{module}.{match[3]}" for module in self.layers[match[2]])
        return None

    def expand(self, n_layer: int) -> Iterator[tuple[str, tuple[str, ...]]]:
        """Every (GGUF name, our names) a model of ``n_layer`` layers may have, in llama.cpp's order."""
        outputs = [name for name in self.globals if name.startswith("output")]
        for name in self.globals:
            if name not in outputs:
                yield name, self.globals[name]
        for i in range(n_layer):
            for key, modules in self.layers.items():
                for kind in ("weight", "bias"):
                    yield f"blk.{i}.{key}.{kind}", tuple(f"layers.{i}.{m}.{kind}" for m in modules)
        for name in outputs:
            yield name, self.globals[name]


_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_LLAMA = _Names(
    globals={"token_embd.weight": ("embed_tokens.weight",), "output_norm.weight": ("norm.weight",),
             "output.weight": ("lm_head.weight",)},
    layers={
        "attn_norm": ("input_layernorm",),
        "attn_q": ("self_attn.q_proj",),
        "attn_k": ("self_attn.k_proj",),
        "attn_v": ("self_attn.v_proj",),
        "attn_output": ("self_attn.o_proj",),
        "attn_q_norm": ("self_attn.q_norm",),
        "attn_k_norm": ("self_attn.k_norm",),
        "ffn_norm": ("post_attention_layernorm",),
        "ffn_gate": ("mlp.gate_proj",),
        "ffn_up": ("mlp.up_proj",),
        "ffn_down": ("mlp.down_proj",),
    },
)
_GPT2 = _Names(
    globals={"token_embd.weight": ("embed_tokens.weight",),
             "position_embd.weight": ("embed_positions.weight",),
             "output_norm.weight": ("norm.weight",), "output_norm.bias": ("norm.bias",),
             "output.weight": ("lm_head.weight",)},
    layers={
        "attn_norm": ("input_layernorm",),
        "attn_qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "attn_output": ("self_attn.o_proj",),
        "ffn_norm": ("post_attention_layernorm",),
        "ffn_up": ("mlp.up_proj",),
        "ffn_down": ("mlp.down_proj",),
    },
    float_only=frozenset({"position_embd.weight"}),
    zero_missing_biases=True,
)
_NAMES = {"llama": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA, "gpt2": _GPT2}
SUPPORTED_ARCHITECTURES = tuple(_NAMES)
_ROPE_FREQS = "rope_freqs.weight"  # llama.cpp's per-frequency divisors for Llama 3.1-style rope scaling
_REQUIRED = object()


def _names(file: GGUFFile) -> _Names:
    return _NAMES[file.architecture]  # type: ignore[index]  (config_from_gguf checked it)


def _metadata(file: GGUFFile, key: str, default: Any = _REQUIRED) -> Any:
    """``{arch}.{key}`` from the header: one value for the whole model, ``default`` when absent."""
    value = file.metadata.get(f"{file.architecture}.{key}", default)
    if value is _REQUIRED:
        raise CheckpointError(f"{file.path} lacks the metadata key {file.architecture}.{key}",
                              "the file is incomplete; re-convert it with a recent llama.cpp")
    if isinstance(value, list):
        raise CheckpointError(f"{file.path}: {file.architecture}.{key} differs between layers ({value[:4]}…)",
                              "scratchlm needs the same attention shape in every layer")
    return value


def config_from_gguf(file: GGUFFile) -> ModelConfig:
    """Our ``ModelConfig`` from the ``{arch}.*`` metadata and which tensors exist."""
    arch = file.architecture
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"{file.path}: GGUF architecture {arch!r} is not supported",
                              f"scratchlm runs GGUF architectures {', '.join(SUPPORTED_ARCHITECTURES)}")
    if "token_embd.weight" not in file.tensors:
        raise CheckpointError(f"{file.path} has no token_embd.weight tensor", "the file is incomplete")
    layer0 = {name.removeprefix("blk.0.") for name in file.tensors if name.startswith("blk.0.")}
    common = dict(vocab_size=file.tensors["token_embd.weight"].shape[0],
                  context_length=int(_metadata(file, "context_length")),
                  n_layer=int(_metadata(file, "block_count")),
                  n_head=int(_metadata(file, "attention.head_count")),
                  n_embd=int(_metadata(file, "embedding_length")),
                  tie_embeddings="output.weight" not in file.tensors,
                  name=str(file.metadata.get("general.name") or file.path.stem))
    if arch == "gpt2":
        return _gpt2_config(file, layer0, **common)
    return _llama_config(file, layer0, **common)


def _gpt2_config(file: GGUFFile, layer0: set[str], **common: Any) -> ModelConfig:
    """GPT-2: LayerNorm, learned positions, GELU MLP; the biases are whichever tensors exist (all of
    them, in files llama.cpp can load).  Derived sizes stay derived, as Hugging Face's GPT-2 import
    leaves them, so a round trip gives back an equal config."""
    n_embd, n_head = common["n_embd"], common["n_head"]
    width = int(_metadata(file, "feed_forward_length", 4 * n_embd))
    kv_heads = int(_metadata(file, "attention.head_count_kv", n_head))
    return ModelConfig(
        **common, n_kv_head_override=None if kv_heads == n_head else kv_heads,
        intermediate_size_override=None if width == 4 * n_embd else width,
        norm="layernorm", norm_eps=_float32(_metadata(file, "attention.layer_norm_epsilon")),
        norm_bias="output_norm.bias" in file.tensors, mlp="gelu", mlp_bias="ffn_up.bias" in layer0,
        positions="learned", qkv_bias="attn_qkv.bias" in layer0, o_bias="attn_output.bias" in layer0,
    )


def _llama_config(file: GGUFFile, layer0: set[str], **common: Any) -> ModelConfig:
    """llama / qwen2 / qwen3: RMSNorm, RoPE (with its scaling), SwiGLU; biases and q/k norms as the
    tensors show."""
    arch, n_embd, n_head = file.architecture, common["n_embd"], common["n_head"]
    head_dim = int(_metadata(file, "attention.key_length", n_embd // n_head))
    if int(_metadata(file, "attention.value_length", head_dim)) != head_dim:
        raise CheckpointError(f"{file.path}: keys and values have different head sizes",
                              "scratchlm's attention needs key_length == value_length")
    if int(_metadata(file, "rope.dimension_count", head_dim)) != head_dim:
        rotated = _metadata(file, "rope.dimension_count")
        raise CheckpointError(f"{file.path}: RoPE rotates {rotated} of {head_dim} dims per head",
                              "scratchlm rotates whole heads; partial rotary embeddings are not supported")
    theta = _float32(_metadata(file, "rope.freq_base", 10000.0))
    return ModelConfig(
        **common,
        n_kv_head_override=int(_metadata(file, "attention.head_count_kv", n_head)),
        head_dim_override=head_dim if head_dim != n_embd // n_head else None,
        intermediate_size_override=int(_metadata(file, "feed_forward_length")),
        norm="rmsnorm",
        norm_eps=_float32(_metadata(file, "attention.layer_norm_rms_epsilon")),
        norm_bias=False,
        mlp="swiglu",
        mlp_bias="ffn_up.bias" in layer0,
        positions="rope",
        rope_theta=theta,
        rope_scaling=_rope_scaling(file, arch, head_dim, theta),
        qkv_bias="attn_q.bias" in layer0,
        o_bias="attn_output.bias" in layer0,
        qk_norm="attn_q_norm.weight" in layer0,
    )


def _float32(value: float) -> float:
    """The shortest decimal of a float32 header value: 1e-05, not 9.999999747378752e-06.

    The model adds it in float32 either way; the short form is what config.json shows.
    """
    return float(str(np.float32(value)))


def _rope_scaling(file: GGUFFile, arch: str, head_dim: int, theta: float) -> dict[str, Any] | None:
    """``rope_scaling`` from ``{arch}.rope.scaling.*``, or recovered from a ``rope_freqs`` tensor.

    llama.cpp stores Llama 3.1's scaling not as parameters but as one divisor per frequency
    (``rope_freqs``).  We rebuild the parameters those files are made from (factor = the largest
    divisor, low/high frequency factors 1 and 4, original context 8192 unless the header says)
    and accept them only if they reproduce every divisor.
    """
    meta = file.metadata
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    scaling: dict[str, Any] | None
    if kind == "none":
        scaling = None
    elif kind == "linear":
        scaling = {"rope_type": "linear", "factor": float(meta[f"{arch}.rope.scaling.factor"])}
    else:
        raise CheckpointError(f"{file.path}: rope scaling type {kind!r} is not implemented",
                              "scratchlm implements linear and llama3 rope scaling")
    if _ROPE_FREQS not in file.tensors:
        return scaling
    if scaling is not None:
        raise CheckpointError(f"{file.path} has both {kind} rope scaling and a rope_freqs tensor",
                              "scratchlm cannot combine the two; use the Hugging Face checkpoint")
    divisors = torch.from_numpy(file.load(_ROPE_FREQS)).double()
    original = int(meta.get(f"{arch}.rope.scaling.original_context_length", 8192))
    scaling = {"rope_type": "llama3", "factor": float(divisors.max()), "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": original}
    plain = inverse_frequencies(head_dim, theta).double()
    if divisors.shape != plain.shape or not torch.allclose(
            inverse_frequencies(head_dim, theta, scaling).double(), plain / divisors, rtol=1e-5, atol=0):
        raise CheckpointError(f"{file.path}: its rope_freqs tensor does not follow Llama 3's rope scaling",
                              "scratchlm implements llama3 and linear scaling; use the Hugging Face model")
    return scaling


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def _unpermute_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order: within each head, rows (2i, 2i+1) go back to (i, i + d/2).

    llama.cpp's converter views each head's rows as [2, d/2] (the two halves) and transposes to
    [d/2, 2]; viewing them as [d/2, 2] and transposing back restores the halves.  Works for
    weights [H·d, in] and biases [H·d] alike.
    """
    rows, rest = weight.shape[0], weight.shape[1:]
    half = rows // n_heads // 2
    return weight.reshape(n_heads, half, 2, *rest).swapaxes(1, 2).reshape(rows, *rest)


def _permuted_heads(arch: str | None, name: str, config: ModelConfig) -> int | None:
    """How many heads the rows of GGUF tensor ``name`` are permuted over (llama's q and k), else None."""
    if arch != "llama" or not name.startswith("blk."):
        return None
    kind = name.split(".")[2]
    return config.n_head if kind == "attn_q" else config.n_kv_head if kind == "attn_k" else None


def _split_rows(values: np.ndarray, params: list[torch.Tensor]) -> list[np.ndarray]:
    """A fused tensor's rows cut into the parameters it stacks (one piece when it fuses nothing)."""
    return np.split(values, np.cumsum([p.shape[0] for p in params])[:-1])


def load_weights(model: Transformer, file: GGUFFile, packed: frozenset[str] = frozenset()) -> None:
    """Fill every parameter of ``model`` from ``file``: strict, shape-checked, Q/K rows restored,
    fused tensors split.

    A float32 CPU parameter is dequantized straight into its own memory; other devices and
    dtypes, and fused tensors, go through one float32 copy.  ``packed`` names tensors already in
    packed layers.
    """
    params = dict(model.named_parameters())  # a tied lm_head appears once, as embed_tokens.weight
    names = _names(file)
    filled: set[str] = set()
    for name, tensor in file.tensors.items():
        if name == _ROPE_FREQS or name in packed:
            continue  # read into config.rope_scaling, or into a packed layer
        ours = names.ours(name)
        absent = None if ours is None else next((n for n in ours if n not in params), None)
        if ours is None or absent is not None:
            hint = ("a tensor scratchlm's decoder has no place for" if ours is None
                    else f"maps to {absent}, which this config has no parameter for")
            raise CheckpointError(f"{file.path}: tensor {name} is {hint}",
                                  "this GGUF variant is not supported; use the Hugging Face checkpoint")
        parts = [params[n] for n in ours]
        expected = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
        if tensor.shape != expected:
            raise CheckpointError(f"{file.path}: tensor {name} has shape {list(tensor.shape)} but "
                                  f"{' + '.join(ours)} need {list(expected)}",
                                  "the file's metadata and tensors disagree")
        heads = _permuted_heads(file.architecture, name, model.config)
        with torch.no_grad():
            on_host = [p.device.type == "cpu" and p.dtype == torch.float32 for p in parts]
            if len(parts) == 1 and on_host[0] and heads is None:
                file.load(name, out=parts[0].detach().numpy().reshape(-1))
            else:
                values = file.load(name)
                if heads is not None:
                    values = _unpermute_rows(values, heads)
                for param, host, piece in zip(parts, on_host, _split_rows(values, parts), strict=True):
                    if host:
                        np.copyto(param.detach().numpy(), piece)
                    else:
                        param.copy_(torch.from_numpy(np.ascontiguousarray(piece)))
        filled.update(ours)
    missing = sorted(set(params) - filled)
    if missing:
        raise CheckpointError(f"{file.path} lacks weights for {', '.join(missing[:5])}"
                              + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""),
                              "the file is incomplete or from an unsupported variant")


def packed_model(file: GGUFFile, config: ModelConfig) -> Transformer:
    """A CPU model that keeps each weight matrix in the file's own type (``dtype="gguf"``).

    Q8_0/Q4_0/Q4_1/Q4_K/Q6_K matrices (and the token embedding) become ``quant.linear`` layers over
    a copy of the file's blocks (K-quants re-blocked without loss; llama's Q/K rows restored by
    moving whole rows of blocks; GPT-2's fused ``attn_qkv`` kept whole, as its attention's
    ``qkv_proj``), F16 ones ``generation.packed.PackedLinear``; everything else (other K-quants,
    the learned position table, which the model slices) is float32 as ``load_weights`` fills it,
    dequantized exactly.
    """
    from torch import nn

    from scratchlm.generation.packed import PackedLinear, fp16_packing_available
    from scratchlm.quant.kernels import reblock
    from scratchlm.quant.linear import QUANT_TYPES, QuantEmbedding, QuantLinear, stack_projections

    with torch.device("meta"):
        model = Transformer(config)
    modules = dict(model.named_modules())
    names = _names(file)
    packed: set[str] = set()
    fp16: list[str] = []
    for name, tensor in file.tensors.items():
        ours = names.ours(name) if name.endswith(".weight") else None
        module_names = [n.removesuffix(".weight") for n in ours or ()]
        targets = [modules.get(n) for n in module_names]
        linear = bool(targets) and all(isinstance(m, nn.Linear) for m in targets)
        if not (linear or targets == [model.embed_tokens]) or \
                (sum(m.weight.shape[0] for m in targets), targets[0].weight.shape[1]) != tensor.shape:
            continue  # a norm, the position table, or a mismatch load_weights reports
        if tensor.type_name == "F16" and linear and fp16_packing_available():
            fp16.extend(module_names)  # (a fused F16 tensor: each of its parts packed apart)
        if tensor.type_name not in QUANT_TYPES:
            continue
        rows, cols = tensor.shape
        blocks = reblock(tensor.type_name, np.array(file.raw(tensor)).reshape(rows, -1))
        heads = _permuted_heads(file.architecture, name, config)
        if heads is not None:
            blocks = np.ascontiguousarray(_unpermute_rows(blocks, heads))
        blocks_t = torch.from_numpy(blocks.reshape(-1))
        if not linear:
            layer: nn.Module = QuantEmbedding(blocks_t, tensor.type_name, rows, cols)
        else:
            bias_name = name.removesuffix(".weight") + ".bias"
            bias = None
            if targets[0].bias is not None and bias_name in file.tensors:
                values = file.load(bias_name)
                bias = torch.from_numpy(_unpermute_rows(values, heads) if heads is not None else values)
                packed.add(bias_name)
            layer = QuantLinear(blocks_t, tensor.type_name, cols, rows, bias)
        _put_layer(model, module_names, layer)
        packed.add(name)
    if config.tie_embeddings and isinstance(model.embed_tokens, QuantEmbedding):
        model.lm_head = model.embed_tokens.as_linear()
    model._apply(lambda t: torch.empty(t.shape, dtype=torch.float32) if t.is_meta else t)
    if isinstance(model.lm_head, nn.Linear) and isinstance(model.embed_tokens, nn.Embedding):
        model.tie_weights()
    load_weights(model, file, frozenset(packed))
    for module_name in fp16:
        parent_name, _, attr = module_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(getattr(parent, attr), nn.Linear) and not (
                attr == "lm_head" and model.lm_head.weight is model.embed_tokens.weight):
            setattr(parent, attr, PackedLinear(getattr(parent, attr)))
    stack_projections(model)
    return model


def _put_layer(model: Transformer, module_names: list[str], layer: torch.nn.Module) -> None:
    """Put ``layer`` in place of the modules it holds: one module, or q, k and v fused (the only fused
    tensor in the tables), which the attention then runs as its ``qkv_proj``."""
    parent_name, _, attr = module_names[0].rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if len(module_names) == 1:
        setattr(parent, attr, layer)
        return
    parent.qkv_proj = layer
    for module_name in module_names:
        setattr(parent, module_name.rpartition(".")[2], None)


def load_gguf(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
              packed: bool = False) -> tuple[Transformer, Tokenizer | None, ModelConfig]:
    """Model, tokenizer and config from a llama.cpp ``.gguf`` file (gpt2, llama, qwen2, qwen3).

    Weights are dequantized to float32 and then cast to ``dtype``; with ``packed`` (CPU only) the
    matrices keep the file's types instead (``packed_model``).  The tokenizer (with the chat
    template and eos token) comes from the ``tokenizer.*`` metadata; a file without any is loaded
    with tokenizer None.
    """
    file = read_gguf(path)
    config = config_from_gguf(file)
    file.check_types()  # before allocating the model
    if packed:
        if torch.device(device).type != "cpu":
            raise CheckpointError("GGUF's packed weights run on the CPU",
                                  "load with --device cpu, or without --dtype gguf")
        model = packed_model(file, config)
    else:
        model = Transformer.empty(config, device=device, dtype=dtype)
        load_weights(model, file)
    model.eval()
    tokenizer = None
    if "tokenizer.ggml.model" in file.metadata:
        from scratchlm.tokenizers import load as load_tokenizer

        tokenizer = load_tokenizer(file.path)
    if packed:  # the point of packing is the memory: give back what loading freed
        from scratchlm.quant.linear import release_freed_memory

        release_freed_memory()
    return model, tokenizer, config


# --------------------------------------------------------------------------------------------
# Export: a model (and its byte-level BPE tokenizer) as a llama.cpp .gguf file
# --------------------------------------------------------------------------------------------

EXPORT_TYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1")
_FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7}  # llama.cpp's general.file_type


def _permute_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's Q/K row order for ``llama``: each head's halves (i, i + d/2) become pairs (2i, 2i+1)."""
    rows, rest = weight.shape[0], weight.shape[1:]
    half = rows // n_heads // 2
    return weight.reshape(n_heads, 2, half, *rest).swapaxes(1, 2).reshape(rows, *rest)


def _export_arch(config: ModelConfig) -> str:
    from scratchlm.checkpoint.hf import family_for_config

    family = family_for_config(config)  # refuses non-transformer archs in one line
    if family.model_type not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"GGUF export of {family.model_type} models is not implemented",
                              f"scratchlm writes GGUF for {', '.join(SUPPORTED_ARCHITECTURES)} models; "
                              "use convert --to hf and llama.cpp's convert_hf_to_gguf.py")
    family.config_to_hf(config)  # the same refusals as the HF export (what the format cannot hold)
    return family.model_type


def _export_tensors(model: Transformer, arch: str) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 values) of every tensor the file holds: the architecture's table walked
    from our side, fused parts stacked, llama's Q/K rows permuted, zero biases where llama.cpp
    requires one that the config lacks (the same function)."""
    names, config = _NAMES[arch], model.config
    params = dict(model.named_parameters())  # a tied head appears once, as the embedding
    used: set[str] = set()
    for name, ours in names.expand(config.n_layer):
        if all(n in params for n in ours):
            values = np.concatenate([params[n].detach().float().cpu().numpy() for n in ours])
            used.update(ours)
        elif names.zero_missing_biases and name.endswith(".bias"):
            values = np.zeros(sum(model.get_submodule(n.removesuffix(".bias")).weight.shape[0] for n in ours),
                              dtype=np.float32)
        else:
            continue  # a tied head, or a bias, norm or projection this config does not have
        heads = _permuted_heads(arch, name, config)
        yield name, np.ascontiguousarray(_permute_rows(values, heads) if heads is not None else values)
    unused = sorted(set(params) - used)
    if unused:
        raise ConfigError(f"the GGUF {arch} architecture has no place for {', '.join(unused[:5])}",
                          "this model cannot be exported as GGUF")


def _add_metadata(writer: Any, config: ModelConfig, arch: str) -> None:
    """``{arch}.*``: the sizes every architecture has, then GPT-2's LayerNorm or llama's RMSNorm and
    RoPE (a llama3 scaling as llama.cpp's ``rope_freqs`` tensor)."""
    import gguf

    writer.add_context_length(config.context_length)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.n_head)
    writer.add_vocab_size(config.vocab_size)
    if arch == "gpt2":
        writer.add_layer_norm_eps(config.norm_eps)
        return
    writer.add_head_count_kv(config.n_kv_head)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_rope_dimension_count(config.head_dim)
    if config.head_dim != config.n_embd // config.n_head:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    elif kind == "llama3":
        plain = inverse_frequencies(config.head_dim, config.rope_theta).double()
        scaled = inverse_frequencies(config.head_dim, config.rope_theta, scaling).double()
        writer.add_tensor(_ROPE_FREQS, (plain / scaled).float().numpy())
        writer.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))
    elif kind not in (None, "default"):
        raise CheckpointError(f"rope scaling {kind!r} has no GGUF form here",
                              "scratchlm writes linear and llama3 rope scaling")


def _add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    """``tokenizer.ggml.*`` for a byte-level BPE (what ``ByteLevelBPE.from_gguf`` reads back); ids the
    tokenizer does not use, up to the embedding's ``vocab_size``, are unused ``[PADn]`` tokens.

    The split pattern goes in as llama.cpp's ``tokenizer.ggml.pre`` name.  A pattern llama.cpp has
    no name for but a near one (cl100k, ``GPT4_PATTERN``, what ``train_bpe`` uses by default, is
    ``llama-bpe`` but for a whitespace run that ends the text and holds a line break: cl100k keeps
    it whole, llama-bpe cuts it after the line break) is written under that name, so llama.cpp and
    transformers read the file, with the exact regex beside it in ``GGUF_PATTERN_KEY``, which
    ``from_gguf`` prefers: our own round trip encodes exactly.  Any other pattern is refused.
    """
    from gguf import TokenType

    from scratchlm.tokenizers.bpe import (
        GGUF_NEAREST_PRE,
        GGUF_PATTERN_KEY,
        GGUF_PRE_PATTERNS,
        ByteLevelBPE,
        bytes_to_token,
    )

    if not isinstance(tokenizer, ByteLevelBPE):
        raise CheckpointError(f"a {type(tokenizer).__name__} cannot be written into a GGUF file",
                              "GGUF holds byte-level BPE vocabularies; export with --to hf instead")
    pre = next((name for name, pattern in GGUF_PRE_PATTERNS.items() if pattern == tokenizer.pattern), None)
    if pre is None and tokenizer.pattern in GGUF_NEAREST_PRE:
        pre = GGUF_NEAREST_PRE[tokenizer.pattern]
        warnings.warn(f"llama.cpp has no name for the tokenizer's split pattern: the file names the nearest, "
                      f"{pre!r} (llama.cpp and transformers may split whitespace ending a text differently); "
                      f"scratchlm reads the exact pattern from {GGUF_PATTERN_KEY}", stacklevel=3)
        writer.add_string(GGUF_PATTERN_KEY, tokenizer.pattern)
    if pre is None:
        raise CheckpointError("the tokenizer's split pattern has no llama.cpp pre-tokenizer name",
                              "export with --to hf instead")
    size = max(tokenizer.vocab_size, vocab_size)
    tokens, types = [f"[PAD{i}]" for i in range(size)], [TokenType.UNUSED] * size
    for data, i in tokenizer.encoder.items():
        tokens[i], types[i] = bytes_to_token(data), TokenType.NORMAL
    for text, i in tokenizer.added_tokens.items():
        tokens[i], types[i] = text, TokenType.USER_DEFINED
    for text, i in tokenizer.special_tokens.items():
        tokens[i], types[i] = text, TokenType.CONTROL
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    writer.add_token_merges([f"{bytes_to_token(a)} {bytes_to_token(b)}" for a, b in tokenizer.merges])
    if tokenizer.eos_id is not None:
        writer.add_eos_token_id(tokenizer.eos_id)
    if tokenizer.bos_id is not None:
        writer.add_bos_token_id(tokenizer.bos_id)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def save_gguf(model: Transformer, config: ModelConfig, path: str | Path, tokenizer: Any = None,
              quant: str = "F16") -> Path:
    """Write ``model`` as a llama.cpp GGUF file (architecture gpt2, llama, qwen2 or qwen3): llama.cpp's
    tensor names and metadata, Q/K rows in its order (``llama``), GPT-2's q, k, v fused, weight
    matrices in ``quant`` (F32, F16, Q8_0, Q4_0, Q4_1; rounded as llama.cpp rounds), norms, biases
    and GPT-2's position table in F32, and the tokenizer and chat template when given.

    A matrix whose rows do not fill ``quant``'s blocks is written in F16, as llama.cpp does.
    Written beside ``path`` and renamed into place.
    """
    import gguf

    from scratchlm.quant.formats import FORMATS, quantize

    quant = quant.upper()
    if quant not in EXPORT_TYPES:
        raise CheckpointError(f"cannot write GGUF tensors as {quant}",
                              f"use one of {', '.join(t.lower() for t in EXPORT_TYPES)}")
    arch = _export_arch(config)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        writer.add_name(config.name or path.stem)
        writer.add_file_type(_FILE_TYPES[quant])
        _add_metadata(writer, config, arch)
        if tokenizer is not None:
            _add_tokenizer(writer, tokenizer, config.vocab_size)
        for name, values in _export_tensors(model, arch):
            kind = quant if values.ndim == 2 and name not in _NAMES[arch].float_only else "F32"
            if kind not in ("F32", "F16") and values.shape[1] % FORMATS[kind].per_block:
                kind = "F16"
            if kind in ("F32", "F16"):
                writer.add_tensor(name, values.astype(np.float32 if kind == "F32" else np.float16))
            else:
                writer.add_tensor(name, quantize(values, kind), raw_dtype=gguf.GGMLQuantizationType[kind])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return path
