"""Where a model runs and how: the device, the CPU thread count, and the training precision.

Loading (``scratchlm.load``), training (``training.Trainer``) and every CLI command share these,
so a device this machine lacks or a bad thread count is the same one-line error everywhere.
The measured effects behind the choices (bf16 speed per CPU family, the allocator's page
faults) are in docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch

from scratchlm.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "auto")


def resolve_device(device: str | torch.device | None = None, local_rank: int = 0) -> torch.device:
    """``None``/``"auto"``: CUDA when available (this process's local GPU), else the CPU.

    A device this machine does not have is a ``ConfigError``, not an error deep inside torch.
    """
    if device is None or str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {str(device)!r}", "use cpu, cuda, cuda:N, mps or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("CUDA was asked for but is not available", "pass --device cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        elif device.index >= torch.cuda.device_count():
            raise ConfigError(f"{device} was asked for but this machine has {torch.cuda.device_count()} "
                              "CUDA devices", "pass --device cuda:0, or another index below the count")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("MPS (Apple GPU) was asked for but is not available", "pass --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device {str(device)!r} is not supported", "use cpu, cuda, cuda:N, mps or auto")
    return device


def set_threads(threads: int) -> None:
    """``torch.set_num_threads`` for a --threads option: 0 leaves PyTorch's default (one per core)."""
    if threads < 0:
        raise ConfigError(f"--threads must be 0 or more, got {threads}",
                          "pass a thread count, e.g. --threads 1 (0 = one per core)")
    if threads:
        torch.set_num_threads(threads)


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matrix products are faster than float32 here.

    CUDA: Ampere or newer.  CPU: with AMX tiles or AVX512-BF16.  Without either (AVX2, plain
    AVX-512) PyTorch's bf16 matmul falls back to emulation, many times slower than float32.
    Whether a given model gains is another matter (small products gain little and autocast adds
    casts), so training times both on CPUs before it chooses (``training.precision``).
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        names = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        return any(bool(check and check()) for check in (getattr(torch.cpu, n, None) for n in names))
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"auto"``: bf16 where the hardware multiplies bf16 fast, else fp32 (training then probes CPUs)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}", f"use one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if fast_bf16(device) else "fp32"
    return precision


_MALLOC_TUNED = False


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse instead of handing it back to the OS.

    By default glibc serves every allocation over 32 MB with its own ``mmap`` and unmaps it when
    freed, so the next one starts on fresh pages and faults every page in again.  A training
    step allocates and frees several such tensors (logits, the embedding's gradient, bf16 copies
    of a tied matrix); served from the heap, with the trim threshold raised, they are reused on
    the next step.  The cost: the process keeps its peak memory until it exits.  Process-wide;
    the trainer calls it on the CPU.  Returns whether it applied (Linux with glibc only).
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return True
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
    _MALLOC_TUNED = bool(mallopt(m_trim_threshold, 2**31 - 1)) and bool(mallopt(m_mmap_max, 0))
    return _MALLOC_TUNED


@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model`` in evaluation mode (no dropout) inside the block, its own mode restored after it:
    generation, evaluation and frozen-prefix passes can run in the middle of training."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
