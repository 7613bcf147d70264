"""GGUF speed: SmolLM2-135M-Instruct (Q4_1) loaded and run by scratchlm against transformers.

Both sides open the same ``.gguf`` file in one process: ``scratchlm.load(path)`` and
``AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)`` + ``generate``, fp32 weights,
batch 1, greedy.  Figures:

* load: wall time of the load call (imports excluded; scratchlm's includes the tokenizer);
* decode: tokens/s of the cached decode loop, (96 − 1) new tokens / (time for 96 − time for 1),
  so the prompt's prefill is not in it; eos is ignored so every run makes all 96 tokens;
* prefill: tokens/s for a 512-token prompt (one call that makes one new token);
* peak memory: the process's peak resident set size (``VmHWM``) while each side loads and runs,
  above what it held before (the peak is reset in between through ``/proc/self/clear_refs``).

Each speed figure is the median over rounds that alternate the sides, so a noisy neighbour on the
shared cores slows both alike.  The issue's reference: llama.cpp (llama-cpp-python, 2 threads)
decodes this file at about 65 tokens/s on this machine type; it is not built or run here.

    python benchmarks/gguf_smollm2.py                   # 3 rounds, both sides
    python benchmarks/gguf_smollm2.py --fp16            # also scratchlm with fp16-packed weights
    python benchmarks/gguf_smollm2.py --no-transformers # scratchlm alone
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
DEFAULT = REPO.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA_CPP_TOKENS_PER_S = 65.0  # issue 5's measurement, not repeated here
QUESTION = "Tell me a long story about a lighthouse keeper and a storm."


def rss_mib(field: str) -> float:
    """VmRSS or VmHWM (peak) of this process, MiB; 0 where /proc is unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def reset_peak() -> None:
    """Make VmHWM the current RSS (Linux ≥ 4.0), so the next peak belongs to what runs next."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


class Side:
    """One implementation: how it makes ``n`` greedy tokens after a prompt of token ids."""

    def __init__(self, name: str, run: Callable[[list[int], int], list[int]], load_s: float, peak_mib: float):
        self.name, self.run, self.load_s, self.peak_mib = name, run, load_s, peak_mib
        self.decode: list[float] = []
        self.prefill: list[float] = []
        self.tokens: list[int] = []


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def load_scratchlm(path: Path, dtype: str | None, name: str) -> tuple[Side, object]:
    import scratchlm
    from scratchlm.generation import SamplingParams, generate_ids

    before = rss_mib("VmRSS")
    reset_peak()
    seconds, lm = timed(lambda: scratchlm.load(path, device="cpu", dtype=dtype))

    def run(prompt: list[int], n: int) -> list[int]:
        params = SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True)
        return generate_ids(lm.model, [prompt], params, eos_id=lm.tokenizer.eos_id)[0].token_ids

    run([1, 2, 3], 4)  # warm-up; the peak then includes a KV cache and activations
    return Side(name, run, seconds, rss_mib("VmHWM") - before), lm


def load_transformers(path: Path, eos_id: int) -> Side:
    from transformers import AutoModelForCausalLM

    before = rss_mib("VmRSS")
    reset_peak()
    seconds, model = timed(lambda: AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval())

    def run(prompt: list[int], n: int) -> list[int]:
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=eos_id)
        return out[0, len(prompt):].tolist()

    run([1, 2, 3], 4)
    return Side("transformers", run, seconds, rss_mib("VmHWM") - before)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", type=Path, default=DEFAULT, help="the SmolLM2 .gguf file")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (the median is reported)")
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--fp16", action="store_true", help="also run scratchlm with fp16-packed weights")
    parser.add_argument("--no-transformers", action="store_true", help="skip transformers (no 30+ s load)")
    args = parser.parse_args(argv)
    if not args.path.is_file():
        print(f"error: {args.path} not found — pass --path to SmolLM2-135M-Instruct.Q4_1.gguf",
              file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    import scratchlm  # noqa: F401  (imports outside the timed loads)
    from scratchlm.data.corpora import read_corpus

    if not args.no_transformers:
        import transformers  # noqa: F401

    baseline = rss_mib("VmRSS")
    ours, lm = load_scratchlm(args.path, None, "scratchlm")
    sides = [ours]
    if args.fp16:
        sides.append(load_scratchlm(args.path, "float16", "scratchlm fp16")[0])
    if not args.no_transformers:
        sides.append(load_transformers(args.path, lm.tokenizer.eos_id))

    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    chat = env.from_string(lm.chat_template).render(messages=[{"role": "user", "content": QUESTION}],
                                                    add_generation_prompt=True)
    prompt = lm.tokenizer.encode(chat, allowed_special="all")
    long_prompt = lm.tokenizer.encode(read_corpus("builtin:the-verdict"))[:args.prefill_tokens]
    n = args.new_tokens
    load_avg = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads{load_avg}; {args.path.name}; "
          f"{len(prompt)}-token chat prompt, {n} new tokens, greedy, batch 1; "
          f"prefill {len(long_prompt)} tokens",
          flush=True)
    for r in range(args.rounds):
        for side in sides:
            t_n, side.tokens = timed(lambda side=side: side.run(prompt, n))
            t_1, _ = timed(lambda side=side: side.run(prompt, 1))
            t_prefill, _ = timed(lambda side=side: side.run(long_prompt, 1))
            side.decode.append((n - 1) / (t_n - t_1))
            side.prefill.append(len(long_prompt) / t_prefill)
        print(f"round {r + 1}: " + ", ".join(
            f"{s.name} decode {s.decode[-1]:.1f} tok/s, prefill {s.prefill[-1]:.0f} tok/s" for s in sides),
              flush=True)

    print(f"\nprocess RSS before loading: {baseline:.0f} MiB")
    print(f"{'':>15} {'load s':>8} {'decode tok/s':>13} {'prefill tok/s':>14} {'peak RSS +MiB':>14}")
    for s in sides:
        print(f"{s.name:>15} {s.load_s:8.2f} {statistics.median(s.decode):13.1f} "
              f"{statistics.median(s.prefill):14.0f} {s.peak_mib:14.0f}")
    for s in sides[1:]:
        same = sum(a == b for a, b in zip(ours.tokens, s.tokens, strict=True))
        print(f"greedy tokens identical, scratchlm vs {s.name}: {same}/{n}")
    decode = statistics.median(ours.decode)
    print(f"\nscratchlm load {ours.load_s:.2f} s (target < 3 s)")
    theirs = next((s for s in sides if s.name == "transformers"), None)
    if theirs is not None:
        print(f"ratio vs transformers: load {theirs.load_s / ours.load_s:.1f}x faster, decode "
              f"{decode / statistics.median(theirs.decode):.2f}x (target >= 3x), prefill "
              f"{statistics.median(ours.prefill) / statistics.median(theirs.prefill):.2f}x")
    for s in sides[:2] if args.fp16 else sides[:1]:
        print(f"{s.name} decode vs llama.cpp's {LLAMA_CPP_TOKENS_PER_S:.0f} tok/s (issue 5's figure): "
              f"{statistics.median(s.decode) / LLAMA_CPP_TOKENS_PER_S:.2f}x (stretch goal 0.5x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
