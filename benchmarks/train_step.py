"""Training-step throughput: our Transformer against transformers.GPT2LMHeadModel, same config and weights.

One step = forward, next-token cross-entropy, backward, AdamW step.  Both models live in the same
process with the same initial weights (ours is loaded from theirs through the HF importer) and
the same random batch; the variants run alternately, one step each per round, so a noisy
neighbour slows every variant alike.  Reported, each as a ratio to transformers fp32: the median
step (and tokens/s from it), the best step, and the median of the per-round ratios ("paired").
On a quiet machine the three agree; on a busy one the best and paired figures are the steadier.

Variants:
  transformers fp32   GPT2LMHeadModel as a user runs it (SDPA attention, use_cache=False),
                      torch.optim.AdamW with its defaults
  ours fp32           our Transformer, AdamW(fused=True)
  ours bf16           the same under torch.autocast("cpu", dtype=torch.bfloat16), fp32 master weights
  ours compiled fp32  torch.compile(model) (with --compile; compile time printed)
  GEMM floor          not a model: the step's floating-point work (matrix products and attention,
                      forward and backward) done as 1024-square fp32 matmuls, the fastest shape
                      on this CPU.  Its ratio is the most any fp32 implementation could gain over
                      transformers here: the roofline the 1.5x target has to fit under.
  bf16 GEMM floor     the same work as 1024-square bf16 matmuls (where the bf16 variant runs):
                      the roofline of any bf16 step, the one the 3x target has to fit under.

Sizes: ``demo`` (nanoGPT's shakespeare_char: 4 layers, 4 heads, 128 wide, context 64, batch 12,
vocabulary 65) and ``124m`` (gpt2-124m, context 256, batch 2).

    python benchmarks/train_step.py                     # both sizes
    python benchmarks/train_step.py --sizes demo --steps 40
    python benchmarks/train_step.py --sizes 124m --steps 5 --compile
    python benchmarks/train_step.py --sizes demo --breakdown   # where our fp32 step's time goes

bf16 needs a CPU with native bf16 matmuls (AMX, or AVX512-BF16 as on Zen 4: the trainer's
``fast_bf16``); elsewhere torch emulates them and a bf16 step is many times slower, so the bf16
variant is skipped with the reason unless ``--bf16 always``.

"ours" runs the trainer's loss (``next_token_loss``: the chunked ``cross_entropy_sum``), and, as
``scratchlm pretrain`` does (``Trainer`` calls it), glibc's malloc keeps freed memory
(``keep_freed_memory``); that is process-wide, so transformers gets it too (``--malloc default``
runs every variant without it).

Where the difference comes from (profiles at both sizes): the matrix products cost the same in
both models (60% of a demo step, 80% at 124M in fp32).  transformers spends the rest on
``gelu_new``, written as eight elementwise ops forward and more backward, where we call the one
``F.gelu(approximate="tanh")`` kernel (same function); and on ``torch.optim.AdamW``'s default
per-tensor loop, where ``fused=True`` updates every parameter in one kernel.  torch.compile
(``--compile``) took about 2 minutes to compile the demo model on a busy 2-core machine for
about 7% less per step, so the demo does not use it.

``--breakdown`` times our fp32 step beside copies of itself with one part taken out (the attention
core, returning v; GELU; the norms; the AdamW step) and prints what each part costs in the step,
paired round by round: the time a fused kernel for that part could at most win back.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from unittest import mock

import torch
import torch.nn.functional as F

from scratchlm.runtime import fast_bf16, keep_freed_memory
from scratchlm.training.losses import next_token_loss

SIZES = {
    # name: (n_layer, n_head, n_embd, n_positions, vocab, context, batch, default steps)
    "demo": (4, 4, 128, 64, 65, 64, 12, 30),
    "124m": (12, 12, 768, 1024, 50257, 256, 2, 5),
}


def native_bf16() -> bool:
    """True when this CPU multiplies bf16 matrices in hardware (AMX or AVX512-BF16): the trainer's test."""
    return fast_bf16(torch.device("cpu"))


@dataclass
class Variant:
    name: str
    step: Callable[[], float]
    times: list[float]


def make_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
              hf: bool, bf16: bool, without: str | None = None) -> Callable[[], float]:
    """A closure running one training step; returns its wall time in seconds.

    ``without`` (``--breakdown``) takes one part out of the step: a key of ``ABLATIONS``, or
    "optimizer" (no AdamW step).
    """

    def step() -> float:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        ablation = ABLATIONS.get(without, contextlib.nullcontext)
        with ablation(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if hf:
                logits = model(x, use_cache=False).logits
                loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.view(-1))
            else:  # the trainer's loss (scratchlm pretrain): summed, divided by the token count
                out = next_token_loss(model, (x, y))
                loss = out.loss_sum / out.count
        loss.backward()
        if without != "optimizer":
            optimizer.step()
        return time.perf_counter() - start

    return step


# --breakdown: each replaces one torch function our model calls by (nearly) nothing for one step.
ABLATIONS: dict[str, Callable[[], contextlib.AbstractContextManager]] = {
    "attention core": lambda: mock.patch.object(F, "scaled_dot_product_attention", lambda q, k, v, **_: v),
    "GELU": lambda: mock.patch.object(F, "gelu", lambda x, **_: x),
    "norms": lambda: mock.patch.object(F, "layer_norm", lambda x, *_, **__: x),
}


def step_flops(n_layer: int, n_embd: int, vocab: int, context: int, batch: int) -> float:
    """Multiply-add FLOPs of one GPT-2 training step: forward 2 per weight per token (the twelve
    d×d blocks of a layer, and the output head), attention 4·T·d per token per layer (QKᵀ and AV,
    as if unmasked), and backward twice the forward."""
    tokens = batch * context
    weights = 2 * tokens * (12 * n_layer * n_embd**2 + vocab * n_embd)
    forward = weights + 4 * n_layer * tokens * context * n_embd
    return 3.0 * forward


def make_gemm_floor(flops: float, dtype: torch.dtype = torch.float32, n: int = 1024) -> Callable[[], float]:
    """A closure returning the seconds ``flops`` of work take as n×n matmuls in ``dtype`` (measured)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    reps = max(1, round(flops / (2 * n**3)))

    def step() -> float:
        start = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        return (time.perf_counter() - start) * flops / (reps * 2 * n**3)

    return step


def bench_size(size: str, steps: int, warmup: int, use_compile: bool, bf16_mode: str) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from scratchlm.checkpoint.hf import load_hf

    n_layer, n_head, n_embd, n_positions, vocab, context, batch, _ = SIZES[size]
    torch.manual_seed(0)
    hf_config = GPT2Config(vocab_size=vocab, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                           n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                           bos_token_id=0, eos_token_id=0, attn_implementation="sdpa")
    theirs = GPT2LMHeadModel(hf_config).train()
    skip_bf16 = bf16_mode == "never" or (bf16_mode == "auto" and not native_bf16())
    with tempfile.TemporaryDirectory() as tmp:
        theirs.save_pretrained(tmp)
        ours = load_hf(tmp)[0].train()  # each variant gets its own copy of the same weights
        ours_bf16 = None if skip_bf16 else load_hf(tmp)[0].train()
        ours_compiled = load_hf(tmp)[0].train() if use_compile else None

    x = torch.randint(0, vocab, (batch, context))
    y = torch.randint(0, vocab, (batch, context))
    lr, wd = 3e-4, 0.1
    def adamw(model: torch.nn.Module, fused: bool) -> torch.optim.Optimizer:
        return torch.optim.AdamW(model.parameters(), lr, weight_decay=wd, fused=fused or None)

    variants = [
        Variant("transformers fp32", make_step(theirs, adamw(theirs, False), x, y, hf=True, bf16=False), []),
        Variant("ours fp32", make_step(ours, adamw(ours, True), x, y, hf=False, bf16=False), []),
    ]
    if ours_bf16 is not None:
        step = make_step(ours_bf16, adamw(ours_bf16, True), x, y, hf=False, bf16=True)
        variants.append(Variant("ours bf16 autocast", step, []))
    if ours_compiled is not None:
        step = make_step(torch.compile(ours_compiled), adamw(ours_compiled, True), x, y, hf=False, bf16=False)
        start = time.perf_counter()
        step()
        print(f"  torch.compile: first step (compilation) took {time.perf_counter() - start:.1f} s")
        variants.append(Variant("ours compiled fp32", step, []))

    flops = step_flops(n_layer, n_embd, vocab, context, batch)
    variants.append(Variant("GEMM floor", make_gemm_floor(flops), []))
    if ours_bf16 is not None:
        variants.append(Variant("bf16 GEMM floor", make_gemm_floor(flops, torch.bfloat16), []))

    for _ in range(warmup):
        for v in variants:
            v.step()
    for _ in range(steps):
        for v in variants:
            v.times.append(v.step())

    tokens = batch * context
    base = variants[0].times
    print(f"\n{size}: {n_layer} layers, {n_head} heads, {n_embd} wide, vocab {vocab}, "
          f"batch {batch} x {context}, {steps} steps, {torch.get_num_threads()} threads")
    header = f"{'median ms':>10}{'tokens/s':>10}{'ratio':>8}{'best ms':>10}{'ratio':>8}{'paired':>8}"
    print(f"  {'variant':<21}{header}")
    for v in variants:
        med, best = statistics.median(v.times), min(v.times)
        # paired: the median over rounds of (transformers step / this step), both from the same round
        paired = statistics.median(b / t for b, t in zip(base, v.times, strict=True))
        print(f"  {v.name:<21}{med * 1e3:>10.1f}{tokens / med:>10.0f}{statistics.median(base) / med:>7.2f}x"
              f"{best * 1e3:>10.1f}{min(base) / best:>7.2f}x{paired:>7.2f}x")
    floors = {v.name: statistics.median(v.times) for v in variants if v.name.endswith("GEMM floor")}
    floor = floors["GEMM floor"]
    print(f"  one step is {flops / 1e9:.1f} GFLOP; at the GEMM floor's {flops / floor / 1e9:.0f} GFLOP/s it "
          f"takes {floor * 1e3:.0f} ms, so transformers runs at {floor / statistics.median(base):.0%} of "
          f"this CPU's fp32 matmul speed and 1.5x transformers would need "
          f"{1.5 * floor / statistics.median(base):.0%}")
    if "bf16 GEMM floor" in floors:
        floor16 = floors["bf16 GEMM floor"]
        print(f"  in bf16 matmuls ({flops / floor16 / 1e9:.0f} GFLOP/s) it takes at least "
              f"{floor16 * 1e3:.0f} ms: 3x transformers fp32 would need "
              f"{3 * floor16 / statistics.median(base):.0%} of that speed")
    if skip_bf16:
        print("  ours bf16 autocast: skipped — this CPU has no native bf16 matmul (no AMX / AVX512-BF16), "
              "so torch emulates it and it is far slower than fp32; --bf16 always runs it anyway")


def bench_breakdown(size: str, steps: int, warmup: int) -> None:
    """What each part of our fp32 step costs: the step against copies of it with the part taken out."""
    from scratchlm.models import from_preset
    from scratchlm.models.transformer import Transformer

    n_layer, n_head, n_embd, n_positions, vocab, context, batch, _ = SIZES[size]
    torch.manual_seed(0)
    config = from_preset("gpt2-124m", n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab,
                         context_length=n_positions)
    state = Transformer(config).state_dict()
    x = torch.randint(0, vocab, (batch, context))
    y = torch.randint(0, vocab, (batch, context))
    variants = []
    for without in (None, *ABLATIONS, "optimizer"):
        model = Transformer(config).train()
        model.load_state_dict(state)
        optimizer = torch.optim.AdamW(model.parameters(), 3e-4, weight_decay=0.1, fused=True)
        name = "ours fp32" if without is None else f"without {without}"
        step = make_step(model, optimizer, x, y, hf=False, bf16=False, without=without)
        variants.append(Variant(name, step, []))
    for round_ in range(warmup + steps):
        for v in variants:
            seconds = v.step()
            if round_ >= warmup:
                v.times.append(seconds)
    base = variants[0].times
    full = statistics.median(base)
    print(f"\n{size} breakdown: our fp32 step, {steps} rounds, {torch.get_num_threads()} threads")
    print(f"  {'variant':<26}{'median ms':>10}{'part costs':>12}{'of the step':>13}")
    for v in variants:
        saved = statistics.median(b - t for b, t in zip(base, v.times, strict=True))  # paired by round
        cost = "" if v is variants[0] else f"{saved * 1e3:>10.1f}ms{saved / full:>12.0%}"
        print(f"  {v.name:<26}{statistics.median(v.times) * 1e3:>10.1f}{cost}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="demo,124m", help="comma-separated: " + ", ".join(SIZES))
    parser.add_argument("--steps", type=int, default=None,
                        help="timed rounds per size (default: 30 demo, 5 at 124m)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(ours)")
    parser.add_argument("--bf16", choices=("auto", "always", "never"), default="auto",
                        help="auto: run the bf16 variant only on CPUs with native bf16 matmuls")
    parser.add_argument("--breakdown", action="store_true",
                        help="instead: what each part of our fp32 step costs (attention core, GELU, "
                             "norms, AdamW)")
    parser.add_argument("--malloc", choices=("trainer", "default"), default="trainer",
                        help="trainer: glibc malloc tuned as the Trainer tunes it (keep_freed_memory), "
                             "for every variant; default: glibc's defaults")
    args = parser.parse_args(argv)
    if args.malloc == "trainer":
        keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = torch.backends.cpu.get_cpu_capability()
    print(f"torch {torch.__version__}, CPU capability {cpu}, native bf16: {native_bf16()}, "
          f"malloc: {args.malloc}")
    for size in args.sizes.split(","):
        if size not in SIZES:
            print(f"error: unknown size {size!r} — use one of {', '.join(SIZES)}", file=sys.stderr)
            return 2
        steps = args.steps or SIZES[size][-1]
        if args.breakdown:
            bench_breakdown(size, steps, args.warmup)
        else:
            bench_size(size, steps, args.warmup, args.compile, args.bf16)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
