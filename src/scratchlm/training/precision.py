"""Choosing the training precision by timing: does bf16 autocast pay off for *this* model here?

``runtime.resolve_precision`` answers from the hardware (bf16 matmuls fast or not); on a CPU
that has them, whether a given model gains depends on its shapes, so training times a few
forward/backward passes both ways before it commits (``Trainer`` with ``precision="auto"``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Models smaller than this train in fp32 without a timing probe: at that size the two precisions
# time within noise of each other, and two runs of the same small config should not train in
# different precisions by chance.
PROBE_MIN_PARAMETERS = 5_000_000


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
