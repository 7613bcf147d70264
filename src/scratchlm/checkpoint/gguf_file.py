"""A GGUF file's header, tensor table and dequantization: NumPy and ``struct``, no torch.

The tokenizer reads its vocabulary from here (``tokenizers.bpe``) and the model loader its
weights (``checkpoint.gguf``), so neither pays for the other's imports.  ``gguf.GGUFReader``
reads the same header, but it builds one NumPy view per array element, which for a vocabulary of
tens of thousands of strings takes seconds where one ``struct`` pass over the buffer takes a
fraction of one (docs/benchmarks.md, "Open weights"); the tests hold our reader equal to it.
We use only the ``gguf`` package's constants (value types, quantization types and their block
sizes).

GGUF lists a tensor's dims fastest-varying first (``ne``), the reverse of a torch shape: a
``[576, 1536]`` GGUF matrix is a ``[1536, 576]`` ``nn.Linear`` weight, and ``GGUFTensor.shape``
is already in torch order.  Quantized types store blocks of consecutive values along a row that
share scales; ``quant.formats`` dequantizes them, bit for bit as ``gguf.quants.dequantize`` does.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_MAGIC, GGMLQuantizationType, GGUFValueType

from scratchlm.errors import CheckpointError
from scratchlm.quant.formats import SUPPORTED_TYPES, dequantize, unsupported_type

__all__ = ["read_gguf", "dequantize", "GGUFFile", "GGUFTensor", "SUPPORTED_TYPES"]

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

    def check_types(self) -> None:
        """Refuse a file with any tensor type we cannot dequantize."""
        for name, tensor in self.tensors.items():
            if tensor.type_name not in SUPPORTED_TYPES:
                raise unsupported_type(name, tensor.type_name)

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
