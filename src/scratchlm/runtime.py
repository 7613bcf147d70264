"""Where a model runs and how: the device, the CPU thread count, and the training precision.

Loading (``scratchlm.load``), training (``training.Trainer``) and every CLI command share these,
so a device this machine lacks or a bad thread count is the same one-line error everywhere.
The measured effects behind the choices (bf16 speed per CPU family, the allocator's page
faults) are in docs/benchmarks.md.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

from scratchlm.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "auto")
# "auto" on a CPU with bf16 matmuls: models smaller than this train in fp32 without a timing
# probe; at that size the two precisions time within noise of each other, and two runs of the
# same small config should not train in different precisions by chance.
PROBE_MIN_PARAMETERS = 5_000_000


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
    casts), so ``probe_bf16`` times both on CPUs before training chooses.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        names = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        return any(bool(check and check()) for check in (getattr(torch.cpu, n, None) for n in names))
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"auto"``: bf16 where the hardware multiplies bf16 fast, else fp32 (CPUs are then probed)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}", f"use one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if fast_bf16(device) else "fp32"
    return precision


def choose_precision(model: torch.nn.Module, loss: Callable[[torch.nn.Module], torch.Tensor],
                     device: torch.device, agree: Callable[[bool], bool] = bool) -> tuple[str, str]:
    """``(precision, note)`` for ``"auto"`` on a CPU with bf16 matmuls: fp32 or bf16, timed on the model.

    Which precision wins depends on the model (small products gain little, autocast adds
    casts), so this times ``loss(model).backward()`` both ways on a copy of the model, with the
    random state restored, and keeps bf16 only when it is clearly (10 %) faster and ``agree``
    says so (data-parallel ranks vote there).  Models under ``PROBE_MIN_PARAMETERS`` get fp32
    without a probe.
    """
    import copy
    import time

    n_params = sum(p.numel() for p in model.parameters())
    if n_params < PROBE_MIN_PARAMETERS:
        return "fp32", (f"precision auto: fp32 ({n_params / 1e6:.2f}M parameters: too small to gain "
                        "from bf16 matmuls, not probed)")
    probe = copy.deepcopy(model).train()

    def step(bf16: bool) -> float:
        t0 = time.perf_counter()
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            loss(probe).backward()
        probe.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    with torch.random.fork_rng(devices=[]):
        fp32, bf16 = probe_bf16(step)
    choice = "bf16" if agree(bf16 < 0.9 * fp32) else "fp32"
    return choice, (f"precision auto: {choice} (forward+backward {fp32 * 1e3:.0f} ms fp32, "
                    f"{bf16 * 1e3:.0f} ms bf16)")


def probe_bf16(step: Callable[[bool], float], rounds: int = 3) -> tuple[float, float]:
    """Best seconds of ``step(bf16)`` for fp32 and bf16, after one warm-up of each.

    ``step`` runs one forward and backward pass (in bf16 autocast when asked) and returns its
    time; the warm-up lets the first bf16 call build its kernels.  Returns ``(fp32, bf16)``.
    """
    best = {False: float("inf"), True: float("inf")}
    for bf16 in (False, True):
        step(bf16)
    for _ in range(rounds):
        for bf16 in (False, True):
            best[bf16] = min(best[bf16], step(bf16))
    return best[False], best[True]


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
