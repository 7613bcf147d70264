"""GGUF files (llama.cpp's format): read the header, dequantize the weights, build our decoder.

A GGUF file is a key/value header (architecture sizes, tokenizer, chat template), a table of
tensor descriptions (name, type, dims, offset) and the tensor bytes, each aligned.  We read the
header with ``struct`` and the tensors through one memory map, using the ``gguf`` package's
constants (value types, quantization types and their block sizes).  ``gguf.GGUFReader`` reads the
same header, but it builds one NumPy view per array element — about 14 s for SmolLM2's 49k-token
vocabulary on a 2-core machine, against the < 3 s this loader is for; the tests hold our reader
equal to it.

Three conventions differ from Hugging Face checkpoints, and each is undone here:

* **dims**: GGUF lists a tensor's dims fastest-varying first (``ne``), the reverse of a torch
  shape; a ``[576, 1536]`` GGUF matrix is a torch ``[1536, 576]`` ``nn.Linear`` weight.
* **quantization**: blocks of 32 consecutive values along a row share a scale (and, for Q4_1, a
  minimum).  Dequantization is a handful of whole-tensor NumPy ops per type, never a loop over
  blocks, and matches ``gguf.quants.dequantize`` bit for bit.
* **Q/K rows** (``llama`` architecture only): llama.cpp's converter reorders the rows of
  ``W_q`` and ``W_k`` within each head from the rotate-half RoPE pairing of HF checkpoints,
  (i, i + d/2), to adjacent pairs, (2i, 2i + 1), which its ``llama`` kernels rotate.  Our
  attention rotates halves, so we put the rows back.  qwen2/qwen3 files keep the HF order.

Import is strict, as for Hugging Face directories: every tensor is used, every parameter filled,
every shape checked, and an unsupported architecture or tensor type is a ``CheckpointError``
that names it.
"""

from __future__ import annotations

import mmap
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGUF_MAGIC, GGMLQuantizationType, GGUFValueType

from scratchlm.errors import CheckpointError
from scratchlm.models.config import ModelConfig
from scratchlm.models.rope import inverse_frequencies
from scratchlm.models.transformer import Transformer

if TYPE_CHECKING:
    from scratchlm.tokenizers import Tokenizer

__all__ = ["load_gguf", "read_gguf", "dequantize", "GGUFFile", "GGUFTensor", "SUPPORTED_ARCHITECTURES",
           "SUPPORTED_TYPES"]

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
_DEFAULT_ALIGNMENT = 32  # llama.cpp's, when the header has no general.alignment


# --------------------------------------------------------------------------------------------
# The file: header and tensor table
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor's entry in the table: ``shape`` in torch order (GGUF's dims reversed)."""

    name: str
    type_name: str  # GGMLQuantizationType name: "F32", "Q4_1", ...
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file
    n_bytes: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


@dataclass
class GGUFFile:
    """A GGUF file's metadata and tensor table, and a read-only memory map of its bytes."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]
    data: np.memmap

    @property
    def architecture(self) -> str | None:
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else None

    def raw(self, tensor: GGUFTensor) -> np.ndarray:
        """The stored bytes of ``tensor``, flat uint8 (a view of the map, no copy)."""
        return self.data[tensor.offset:tensor.offset + tensor.n_bytes]

    def load(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        """Tensor ``name`` dequantized to float32 in torch shape (into ``out`` when given)."""
        tensor = self.tensors[name]
        values = dequantize(self.raw(tensor), tensor.type_name, tensor.n_elements, name, out)
        return values.reshape(tensor.shape)


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse a GGUF file's header and tensor table; the tensor bytes stay on disk until used."""
    path = Path(path).expanduser()
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if len(buf) < 24 or struct.unpack_from("<I", buf, 0)[0] != GGUF_MAGIC:
                raise CheckpointError(f"{path} is not a GGUF file (bad magic number)",
                                      "pass a llama.cpp .gguf file")
            version = struct.unpack_from("<I", buf, 4)[0]
            if version & 0xFFFF == 0:
                raise CheckpointError(f"{path} is a big-endian GGUF file",
                                      "convert it to little-endian with gguf's gguf_convert_endian script")
            if version not in (2, 3):
                raise CheckpointError(f"{path} is GGUF version {version}; scratchlm reads versions 2 and 3",
                                      "re-convert the model with a recent llama.cpp")
            n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
            reader = _HeaderReader(buf, 24)
            metadata = {}
            for _ in range(n_kv):
                key = reader.string()
                metadata[key] = reader.value(reader.unpack("I"))
            entries = []
            for _ in range(n_tensors):
                name = reader.string()
                n_dims = reader.unpack("I")
                dims = struct.unpack_from(f"<{n_dims}Q", buf, reader.pos)
                reader.pos += 8 * n_dims
                entries.append((name, dims, reader.unpack("I"), reader.unpack("Q")))
            header_end, file_size = reader.pos, len(buf)
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found", "check the path to the .gguf file") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a directory, not a .gguf file",
                              "pass the .gguf file itself") from None
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror or err}",
                              "check that the file exists and is readable") from None
    except (struct.error, ValueError, UnicodeDecodeError, OverflowError, MemoryError) as err:
        raise CheckpointError(f"{path}: cannot read the GGUF header ({err})",
                              "the file is truncated or damaged; download it again") from None

    if int(metadata.get("split.count", 1)) > 1:
        raise CheckpointError(f"{path} is one part of a split GGUF model ({metadata['split.count']} files)",
                              "merge the parts into one file with llama.cpp's 'llama-gguf-split --merge'")
    alignment = int(metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
    data_start = -(-header_end // alignment) * alignment
    tensors: dict[str, GGUFTensor] = {}
    for name, dims, type_code, offset in entries:
        try:
            qtype = GGMLQuantizationType(type_code)
        except ValueError:
            raise CheckpointError(f"{path}: tensor {name} has unknown GGML type code {type_code}",
                                  "re-convert the model with a recent llama.cpp") from None
        block, type_size = GGML_QUANT_SIZES[qtype]
        n_elements = int(np.prod(dims, dtype=np.int64)) if dims else 1
        if dims and dims[0] % block:
            raise CheckpointError(f"{path}: tensor {name} rows of {dims[0]} values do not fill "
                                  f"{qtype.name} blocks of {block}", "the file is damaged; download it again")
        info = GGUFTensor(name, qtype.name, tuple(reversed(dims)), data_start + offset,
                          n_elements // block * type_size)
        if info.offset + info.n_bytes > file_size:
            raise CheckpointError(f"{path}: tensor {name} ends past the end of the file ({file_size} bytes)",
                                  "the file is truncated; download it again")
        if name in tensors:
            raise CheckpointError(f"{path} holds two tensors named {name}", "the file is damaged")
        tensors[name] = info
    data = np.memmap(path, dtype=np.uint8, mode="r")
    return GGUFFile(path, version, metadata, tensors, data)


class _HeaderReader:
    """Sequential little-endian reads of GGUF values from a buffer, at ``pos``."""

    def __init__(self, buf: mmap.mmap, pos: int):
        self.buf, self.pos = buf, pos
        self.types = GGUFValueType
        self.formats = {GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H",
                        GGUFValueType.INT16: "h", GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i",
                        GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?", GGUFValueType.UINT64: "Q",
                        GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d"}

    def unpack(self, fmt: str) -> Any:
        value = struct.unpack_from("<" + fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        size = self.unpack("Q")
        self.pos += size
        return self.buf[self.pos - size:self.pos].decode("utf-8")

    def value(self, code: int) -> Any:
        kind = self.types(code)
        if kind == self.types.STRING:
            return self.string()
        if kind != self.types.ARRAY:
            return self.unpack(self.formats[kind])
        item, count = self.unpack("I"), self.unpack("Q")
        item_kind = self.types(item)
        if item_kind in self.formats:
            # Numeric arrays (token types, per-layer sizes) in one read, not one unpack per element.
            fmt = self.formats[item_kind]
            values = struct.unpack_from(f"<{count}{fmt}", self.buf, self.pos)
            self.pos += count * struct.calcsize(fmt)
            return list(values)
        if item_kind == self.types.STRING:
            return self._strings(count)
        return [self.value(item) for _ in range(count)]

    def _strings(self, count: int) -> list[str]:
        """``count`` length-prefixed strings: the vocabulary and the merges, ~100k of them."""
        buf, pos, out = self.buf, self.pos, []
        length = struct.Struct("<Q").unpack_from
        for _ in range(count):
            size = length(buf, pos)[0]
            pos += 8
            out.append(buf[pos:pos + size].decode("utf-8"))
            pos += size
        self.pos = pos
        return out


# --------------------------------------------------------------------------------------------
# Dequantization: one vectorised function per type
# --------------------------------------------------------------------------------------------


def _fp16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The fp16 number at byte ``start`` of every block, as float32 [n_blocks, 1]."""
    return blocks[:, start:start + 2].view(np.float16).astype(np.float32)


def _nibbles(packed: np.ndarray, out: np.ndarray) -> None:
    """16 bytes per block → 32 values in ``out``: low nibbles are elements 0–15, high nibbles 16–31."""
    halves = out.reshape(-1, 2, 16)
    np.bitwise_and(packed, 0x0F, out=halves[:, 0], casting="unsafe")
    np.right_shift(packed, 4, out=halves[:, 1], casting="unsafe")


def _f32(blocks: np.ndarray, out: np.ndarray) -> None:
    np.copyto(out, blocks.view(np.float32))


def _f16(blocks: np.ndarray, out: np.ndarray) -> None:
    np.copyto(out, blocks.view(np.float16))


def _bf16(blocks: np.ndarray, out: np.ndarray) -> None:
    """bfloat16 is the top half of a float32: shift the bits up."""
    np.left_shift(blocks.view(np.uint16), 16, out=out.view(np.uint32), dtype=np.uint32)


def _q8_0(blocks: np.ndarray, out: np.ndarray) -> None:
    """Q8_0 block (34 bytes): fp16 scale d, 32 int8 q; value = q · d."""
    np.multiply(blocks[:, 2:].view(np.int8), _fp16(blocks, 0), out=out)


def _q4_0(blocks: np.ndarray, out: np.ndarray) -> None:
    """Q4_0 block (18 bytes): fp16 scale d, 16 bytes of 4-bit q; value = (q − 8) · d."""
    _nibbles(blocks[:, 2:], out)
    np.subtract(out, 8, out=out)
    np.multiply(out, _fp16(blocks, 0), out=out)


def _q4_1(blocks: np.ndarray, out: np.ndarray) -> None:
    """Q4_1 block (20 bytes): fp16 scale d, fp16 minimum m, 16 bytes of 4-bit q; value = q · d + m."""
    _nibbles(blocks[:, 4:], out)
    np.multiply(out, _fp16(blocks, 0), out=out)
    np.add(out, _fp16(blocks, 2), out=out)


# type name → (values per block, bytes per block, fill(bytes[n_blocks, bytes], out[n_blocks, values]))
_DEQUANTIZERS: dict[str, tuple[int, int, Callable[[np.ndarray, np.ndarray], None]]] = {
    "F32": (1, 4, _f32),
    "F16": (1, 2, _f16),
    "BF16": (1, 2, _bf16),
    "Q8_0": (32, 34, _q8_0),
    "Q4_0": (32, 18, _q4_0),
    "Q4_1": (32, 20, _q4_1),
}


def dequantize(raw: np.ndarray, type_name: str, n_elements: int, name: str = "tensor",
               out: np.ndarray | None = None) -> np.ndarray:
    """The float32 values [n_elements] stored in ``raw`` (flat uint8) as GGML type ``type_name``.

    A few whole-array NumPy ops per type, never a loop over blocks, in the order
    ``gguf.quants.dequantize`` computes (multiply, then add, each rounded to float32), so the
    results are identical.  NumPy rather than torch: its ops run on one thread, which keeps
    loading fast when the cores are busy (torch's thread pool slows ~20x when oversubscribed).
    ``out`` (float32, contiguous) receives the values, e.g. a parameter's own memory.
    """
    if type_name not in _DEQUANTIZERS:
        raise _unsupported_type(name, type_name)
    per_block, block_bytes, fill = _DEQUANTIZERS[type_name]
    if n_elements % per_block or raw.size != n_elements // per_block * block_bytes:
        raise CheckpointError(f"tensor {name}: {raw.size} bytes do not hold {n_elements} {type_name} values",
                              "the file is damaged; download it again")
    if out is None:
        out = np.empty(n_elements, dtype=np.float32)
    elif out.dtype != np.float32 or out.size != n_elements or not out.flags.c_contiguous:
        # a strided out would be reshaped into a copy, and the values would never reach it
        raise ValueError(f"out must be a contiguous float32 array of {n_elements} values")
    fill(raw.reshape(-1, block_bytes), out.reshape(-1, per_block))
    return out


def _unsupported_type(name: str, type_name: str) -> CheckpointError:
    return CheckpointError(
        f"tensor {name} is stored as {type_name}, which scratchlm cannot dequantize",
        f"supported GGUF types: {', '.join(SUPPORTED_TYPES)}; re-quantize with llama.cpp's llama-quantize "
        "(e.g. to Q8_0) or load the original Hugging Face checkpoint")


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
        n_kv_head=int(get("attention.head_count_kv", n_head)),
        head_dim=head_dim if head_dim != n_embd // n_head else None,
        intermediate_size=int(get("feed_forward_length")),
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
    return config.n_head if kind == "attn_q" else config.kv_heads if kind == "attn_k" else None


def load_weights(model: Transformer, file: GGUFFile) -> None:
    """Fill every parameter of ``model`` from ``file``: strict, shape-checked, Q/K rows restored.

    A float32 CPU parameter is dequantized straight into its own memory; other devices and
    dtypes go through one float32 copy.
    """
    params = dict(model.named_parameters())  # a tied lm_head appears once, as embed_tokens.weight
    filled: set[str] = set()
    for name, tensor in file.tensors.items():
        if name == _ROPE_FREQS:
            continue  # read into config.rope_scaling
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


def check_types(file: GGUFFile) -> None:
    """Refuse a file with any tensor type we cannot dequantize, before allocating the model."""
    for name, tensor in file.tensors.items():
        if tensor.type_name not in SUPPORTED_TYPES:
            raise _unsupported_type(name, tensor.type_name)


def load_gguf(path: str | Path, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> tuple[Transformer, Tokenizer | None, ModelConfig]:
    """Model, tokenizer and config from a llama.cpp ``.gguf`` file (llama, qwen2, qwen3).

    Weights are dequantized to float32 and then cast to ``dtype``.  The tokenizer (with the chat
    template and eos token) comes from the ``tokenizer.*`` metadata; a file without any is loaded
    with tokenizer None.
    """
    file = read_gguf(path)
    config = config_from_gguf(file)
    check_types(file)
    model = Transformer.empty(config, device=device, dtype=dtype)
    load_weights(model, file)
    model.eval()
    tokenizer = None
    if "tokenizer.ggml.model" in file.metadata:
        from scratchlm.tokenizers import load as load_tokenizer

        tokenizer = load_tokenizer(file.path)
    return model, tokenizer, config
