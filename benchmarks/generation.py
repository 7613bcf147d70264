"""Generation speed: our KV-cached decoding against ``transformers`` ``generate``, same weights.

gpt2-124m config with random weights: a ``transformers.GPT2LMHeadModel`` is built, saved with
``save_pretrained`` and loaded into our ``Transformer`` through ``scratchlm.checkpoint.hf.load_hf``
(the importer users run).  Batch 1, a 32-token prompt, 128 new tokens, greedy, eos ignored.

Sides:
  transformers          GPT2LMHeadModel.generate, fp32 (SDPA attention, its own KV cache)
  scratchlm fp32        generate_ids on our Transformer, fp32: the same arithmetic
  scratchlm fp16-w      the same model after ``generation.packed.pack_fp16``: weights stored in
                        fp16 (half the bytes per token), arithmetic in fp32 — what
                        ``scratchlm.load(ref, dtype="float16")`` gives on a CPU

Two figures per side, each the median over rounds that alternate the sides, so that a noisy
neighbour on the shared cores slows every side alike:

* decode throughput: new tokens / wall time of the whole call (prefill included, as a user sees it);
* first-token latency: wall time of the same call with ``max_new_tokens=1`` (prompt + first token).

    python benchmarks/generation.py                 # 5 rounds
    python benchmarks/generation.py --rounds 9 --threads 1

Know the ceiling: decoding reads every weight once per token.  gpt2-124m is 0.5 GB of fp32
(tied embedding included), and an fp32 matrix-vector product streams about 16 GB/s on the
2-core machine this was written on, so about 32 tokens/s is the most any fp32 decoder gets
there; fp16 weights move that ceiling to about 64.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time

import torch


def build_models(directory: str):
    """The transformers model (random weights, seeded) and ours loaded from its saved directory."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from scratchlm.checkpoint.hf import load_hf

    torch.manual_seed(0)
    config = GPT2Config(n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab_size=50257)
    hf = GPT2LMHeadModel(config).eval()
    hf.save_pretrained(directory)
    ours, _, _ = load_hf(directory, "cpu")
    return hf, ours.eval()


def timed(fn) -> tuple[float, list[int]]:
    start = time.perf_counter()
    tokens = fn()
    return time.perf_counter() - start, tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (the median is reported)")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from scratchlm.generation import SamplingParams, generate_ids
    from scratchlm.generation.packed import pack_fp16

    with tempfile.TemporaryDirectory() as tmp:
        hf, ours = build_models(tmp)
    prompt = torch.randint(0, 50257, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(prompt)

    def run_hf(n: int) -> list[int]:
        with torch.inference_mode():
            out = hf.generate(prompt, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=50256, eos_token_id=None)
        return out[0, prompt.shape[1]:].tolist()

    def run_ours(n: int) -> list[int]:
        params = SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True)
        return generate_ids(ours, [prompt[0].tolist()], params, eos_id=50256)[0].token_ids

    packed = copy.deepcopy(ours)
    pack_fp16(packed)

    def run_packed(n: int) -> list[int]:
        params = SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True)
        return generate_ids(packed, [prompt[0].tolist()], params, eos_id=50256)[0].token_ids

    sides = {"transformers": run_hf, "scratchlm fp32": run_ours, "scratchlm fp16-w": run_packed}
    decode: dict[str, list[float]] = {name: [] for name in sides}
    first: dict[str, list[float]] = {name: [] for name in sides}
    outputs: dict[str, list[int]] = {}
    for fn in sides.values():  # warm-up: allocator, thread pool, lazy imports
        fn(4)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, greedy, batch 1", flush=True)
    for r in range(args.rounds):
        for name, fn in sides.items():
            seconds, outputs[name] = timed(lambda fn=fn: fn(args.new_tokens))
            decode[name].append(args.new_tokens / seconds)
            first[name].append(timed(lambda fn=fn: fn(1))[0] * 1000)
        figures = [f"{name} {decode[name][-1]:.1f} tok/s, first {first[name][-1]:.0f} ms" for name in sides]
        print(f"round {r + 1}: " + ", ".join(figures), flush=True)

    for name in list(sides)[1:]:
        same = sum(a == b for a, b in zip(outputs["transformers"], outputs[name], strict=True))
        print(f"greedy tokens identical to transformers, {name}: {same}/{args.new_tokens}")
    med = {name: (statistics.median(decode[name]), statistics.median(first[name])) for name in sides}
    for name, (tps, ms) in med.items():
        print(f"{name:>18}: {tps:6.1f} tokens/s   prompt + first token {ms:6.1f} ms")
    base_tps, base_ms = med["transformers"]
    for name in list(sides)[1:]:
        tps, ms = med[name]
        print(f"{name} / transformers: {tps / base_tps:.2f}x tokens/s, "
              f"first token {base_ms / ms:.2f}x faster (target >= 1.5x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
