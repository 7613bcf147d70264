"""GGUF files (llama.cpp's format) as our decoder: config, tokenizer and weights, read and written.

``gguf_file`` reads the header and the tensor table and dequantizes; this module maps the
metadata to a ``ModelConfig``, the tensor names to ours, and fills a ``Transformer``.  One
convention differs from Hugging Face checkpoints beyond what ``gguf_file`` undoes:

* **Q/K rows** (``llama`` architecture only): llama.cpp's converter reorders the rows of
  ``W_q`` and ``W_k`` within each head from the rotate-half RoPE pairing of HF checkpoints,
  (i, i + d/2), to adjacent pairs, (2i, 2i + 1), which its ``llama`` kernels rotate.  Our
  attention rotates halves, so we put the rows back.  qwen2/qwen3 files keep the HF order.

``save_gguf`` writes the same names, metadata and row order back (the tables below, inverted).
Import is strict, as for Hugging Face directories: every tensor is used, every parameter filled,
every shape checked, and an unsupported architecture or tensor type is a ``CheckpointError``
that names it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from scratchlm.checkpoint.gguf_file import GGUFFile, read_gguf
from scratchlm.errors import CheckpointError
from scratchlm.models.config import ModelConfig
from scratchlm.models.rope import inverse_frequencies
from scratchlm.models.transformer import Transformer

if TYPE_CHECKING:
    from scratchlm.tokenizers import Tokenizer

__all__ = ["load_gguf", "save_gguf", "config_from_gguf", "SUPPORTED_ARCHITECTURES", "EXPORT_TYPES"]

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")


# --------------------------------------------------------------------------------------------
# Names and config
# --------------------------------------------------------------------------------------------

_GLOBAL_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {  # blk.N.<key>.{weight,bias} → layers.N.<value>.{weight,bias}
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_ROPE_FREQS = "rope_freqs.weight"  # llama.cpp's per-frequency divisors for Llama 3.1-style rope scaling


def our_name(gguf_name: str) -> str | None:
    """Our parameter name for a GGUF tensor name, or None for a name we do not know."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match and match[2] in _LAYER_NAMES:
        return f"layers.{match[1]}.{_LAYER_NAMES[match[2]]}.{match[3]}"
    return None


def config_from_gguf(file: GGUFFile) -> ModelConfig:
    """Our ``ModelConfig`` from the ``{arch}.*`` metadata and which tensors exist."""
    arch = file.architecture
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"{file.path}: GGUF architecture {arch!r} is not supported",
                              f"scratchlm runs GGUF architectures {', '.join(SUPPORTED_ARCHITECTURES)}")
    meta, tensors = file.metadata, file.tensors

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise CheckpointError(f"{file.path} lacks the metadata key {arch}.{key}",
                                  "the file is incomplete; re-convert it with a recent llama.cpp")
        if isinstance(value, list):
            raise CheckpointError(f"{file.path}: {arch}.{key} differs between layers ({value[:4]}…)",
                                  "scratchlm needs the same attention shape in every layer")
        return value

    if "token_embd.weight" not in tensors:
        raise CheckpointError(f"{file.path} has no token_embd.weight tensor", "the file is incomplete")
    n_embd, n_head = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", n_embd // n_head))
    if int(get("attention.value_length", head_dim)) != head_dim:
        raise CheckpointError(f"{file.path}: keys and values have different head sizes",
                              "scratchlm's attention needs key_length == value_length")
    if int(get("rope.dimension_count", head_dim)) != head_dim:
        rotated = get("rope.dimension_count")
        raise CheckpointError(f"{file.path}: RoPE rotates {rotated} of {head_dim} dims per head",
                              "scratchlm rotates whole heads; partial rotary embeddings are not supported")
    vocab_size = file.tensors["token_embd.weight"].shape[0]
    layer0 = {name.removeprefix("blk.0.") for name in tensors if name.startswith("blk.0.")}
    theta = _float32(get("rope.freq_base", 10000.0))
    return ModelConfig(
        vocab_size=vocab_size,
        context_length=int(get("context_length")),
        n_layer=int(get("block_count")),
        n_head=n_head,
        n_embd=n_embd,
        n_kv_head_override=int(get("attention.head_count_kv", n_head)),
        head_dim_override=head_dim if head_dim != n_embd // n_head else None,
        intermediate_size_override=int(get("feed_forward_length")),
        norm="rmsnorm",
        norm_eps=_float32(get("attention.layer_norm_rms_epsilon")),
        norm_bias=False,
        mlp="swiglu",
        mlp_bias="ffn_up.bias" in layer0,
        positions="rope",
        rope_theta=theta,
        rope_scaling=_rope_scaling(file, arch, head_dim, theta),
        qkv_bias="attn_q.bias" in layer0,
        o_bias="attn_output.bias" in layer0,
        qk_norm="attn_q_norm.weight" in layer0,
        tie_embeddings="output.weight" not in tensors,
        name=str(meta.get("general.name") or file.path.stem),
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


def _permuted_heads(file: GGUFFile, name: str, config: ModelConfig) -> int | None:
    """How many heads the rows of ``name`` were permuted over (llama's q and k), else None."""
    if file.architecture != "llama" or not name.startswith("blk."):
        return None
    kind = name.split(".")[2]
    return config.n_head if kind == "attn_q" else config.n_kv_head if kind == "attn_k" else None


def load_weights(model: Transformer, file: GGUFFile, packed: frozenset[str] = frozenset()) -> None:
    """Fill every parameter of ``model`` from ``file``: strict, shape-checked, Q/K rows restored.

    A float32 CPU parameter is dequantized straight into its own memory; other devices and
    dtypes go through one float32 copy.  ``packed`` names tensors already in packed layers.
    """
    params = dict(model.named_parameters())  # a tied lm_head appears once, as embed_tokens.weight
    filled: set[str] = set()
    for name, tensor in file.tensors.items():
        if name == _ROPE_FREQS or name in packed:
            continue  # read into config.rope_scaling, or into a packed layer
        ours = our_name(name)
        if ours is None or ours not in params:
            hint = ("a tensor scratchlm's decoder has no place for" if ours is None
                    else f"maps to {ours}, which this config has no parameter for")
            raise CheckpointError(f"{file.path}: tensor {name} is {hint}",
                                  "this GGUF variant is not supported; use the Hugging Face checkpoint")
        param = params[ours]
        if tuple(param.shape) != tensor.shape:
            raise CheckpointError(f"{file.path}: tensor {name} has shape {list(tensor.shape)} but {ours} "
                                  f"needs {list(param.shape)}", "the file's metadata and tensors disagree")
        heads = _permuted_heads(file, name, model.config)
        with torch.no_grad():
            on_host = param.device.type == "cpu" and param.dtype == torch.float32
            host = param.detach().numpy() if on_host else None
            if host is not None and heads is None:
                file.load(name, out=host.reshape(-1))
            else:
                values = file.load(name)
                if heads is not None:
                    values = _unpermute_rows(values, heads)
                if host is not None:
                    np.copyto(host, values)
                else:
                    param.copy_(torch.from_numpy(np.ascontiguousarray(values)))
        filled.add(ours)
    missing = sorted(set(params) - filled)
    if missing:
        raise CheckpointError(f"{file.path} lacks weights for {', '.join(missing[:5])}"
                              + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""),
                              "the file is incomplete or from an unsupported variant")


def packed_model(file: GGUFFile, config: ModelConfig) -> Transformer:
    """A CPU model that keeps each weight matrix in the file's own type (``dtype="gguf"``).

    Q8_0/Q4_0/Q4_1/Q4_K/Q6_K matrices (and the token embedding) become ``quant.linear`` layers over
    a copy of the file's blocks (K-quants re-blocked without loss; llama's Q/K rows restored by
    moving whole rows of blocks), F16 ones ``generation.packed.PackedLinear``; everything else
    (other K-quants included) is float32 as ``load_weights`` fills it, dequantized exactly.
    """
    from torch import nn

    from scratchlm.generation.packed import PackedLinear, fp16_packing_available
    from scratchlm.quant.kernels import reblock
    from scratchlm.quant.linear import QUANT_TYPES, QuantEmbedding, QuantLinear, stack_projections

    with torch.device("meta"):
        model = Transformer(config)
    modules = dict(model.named_modules())
    packed: set[str] = set()
    fp16: list[str] = []
    for name, tensor in file.tensors.items():
        ours = our_name(name)
        module_name = ours.removesuffix(".weight") if ours and ours.endswith(".weight") else None
        module = modules.get(module_name) if module_name else None
        if not isinstance(module, nn.Linear | nn.Embedding) or tuple(module.weight.shape) != tensor.shape:
            continue  # not a matrix (or a mismatch load_weights reports)
        if tensor.type_name == "F16" and isinstance(module, nn.Linear) and fp16_packing_available():
            fp16.append(module_name)
        if tensor.type_name not in QUANT_TYPES:
            continue
        rows, cols = tensor.shape
        blocks = reblock(tensor.type_name, np.array(file.raw(tensor)).reshape(rows, -1))
        heads = _permuted_heads(file, name, config)
        if heads is not None:
            blocks = np.ascontiguousarray(_unpermute_rows(blocks, heads))
        blocks_t = torch.from_numpy(blocks.reshape(-1))
        if isinstance(module, nn.Embedding):
            layer: nn.Module = QuantEmbedding(blocks_t, tensor.type_name, rows, cols)
        else:
            bias_name = name.removesuffix(".weight") + ".bias"
            bias = None
            if module.bias is not None and bias_name in file.tensors:
                values = file.load(bias_name)
                bias = torch.from_numpy(_unpermute_rows(values, heads) if heads is not None else values)
                packed.add(bias_name)
            layer = QuantLinear(blocks_t, tensor.type_name, cols, rows, bias)
        parent_name, _, attr = module_name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, layer)
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


def load_gguf(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
              packed: bool = False) -> tuple[Transformer, Tokenizer | None, ModelConfig]:
    """Model, tokenizer and config from a llama.cpp ``.gguf`` file (llama, qwen2, qwen3).

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
_GGUF_NAMES = {ours: theirs for theirs, ours in _GLOBAL_NAMES.items()}
_GGUF_LAYER_NAMES = {ours: theirs for theirs, ours in _LAYER_NAMES.items()}


def gguf_name(ours: str) -> str:
    """llama.cpp's tensor name for one of our parameter names (the inverse of ``our_name``)."""
    if ours in _GGUF_NAMES:
        return _GGUF_NAMES[ours]
    _, index, rest = ours.split(".", 2)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{index}.{_GGUF_LAYER_NAMES[module]}.{kind}"


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


def _add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    """``tokenizer.ggml.*`` for a byte-level BPE (what ``ByteLevelBPE.from_gguf`` reads back); ids the
    tokenizer does not use, up to the embedding's ``vocab_size``, are unused ``[PADn]`` tokens."""
    from gguf import TokenType

    from scratchlm.tokenizers.bpe import GGUF_PRE_PATTERNS, ByteLevelBPE, bytes_to_token

    if not isinstance(tokenizer, ByteLevelBPE):
        raise CheckpointError(f"a {type(tokenizer).__name__} cannot be written into a GGUF file",
                              "GGUF holds byte-level BPE vocabularies; export with --to hf instead")
    pre = next((name for name, pattern in GGUF_PRE_PATTERNS.items() if pattern == tokenizer.pattern), None)
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
    """Write ``model`` as a llama.cpp GGUF file: llama.cpp's tensor names and metadata, Q/K rows in
    its order (``llama``), weight matrices in ``quant`` (F32, F16, Q8_0, Q4_0, Q4_1; rounded as
    llama.cpp rounds), norms and biases in F32, and the tokenizer and chat template when given.

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
        writer.add_context_length(config.context_length)
        writer.add_embedding_length(config.n_embd)
        writer.add_block_count(config.n_layer)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.n_head)
        writer.add_head_count_kv(config.n_kv_head)
        writer.add_layer_norm_rms_eps(config.norm_eps)
        writer.add_rope_freq_base(config.rope_theta)
        writer.add_rope_dimension_count(config.head_dim)
        if config.head_dim != config.n_embd // config.n_head:
            writer.add_key_length(config.head_dim)
            writer.add_value_length(config.head_dim)
        writer.add_vocab_size(config.vocab_size)
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
        if tokenizer is not None:
            _add_tokenizer(writer, tokenizer, config.vocab_size)
        for name, param in model.named_parameters():  # a tied head appears once, as the embedding
            values = param.detach().float().cpu().numpy()
            heads = {"q_proj": config.n_head, "k_proj": config.n_kv_head}.get(name.split(".")[-2]) \
                if arch == "llama" else None
            if heads is not None:
                values = _permute_rows(values, heads)
            values = np.ascontiguousarray(values)
            kind_of = quant if values.ndim == 2 else "F32"
            if kind_of not in ("F32", "F16") and values.shape[1] % FORMATS[kind_of].per_block:
                kind_of = "F16"
            if kind_of in ("F32", "F16"):
                writer.add_tensor(gguf_name(name), values.astype(np.float32 if kind_of == "F32"
                                                                 else np.float16))
            else:
                writer.add_tensor(gguf_name(name), quantize(values, kind_of),
                                  raw_dtype=gguf.GGMLQuantizationType[kind_of])
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
