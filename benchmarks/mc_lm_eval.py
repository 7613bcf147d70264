"""Multiple-choice scoring speed: ``scratchlm eval mc`` against lm-evaluation-harness's HF backend.

Both sides score the same requests with the same weights: SmolLM2-135M-Instruct from the shared
``.gguf`` file, dequantized to fp32 (``scratchlm.load(path)``; transformers'
``from_pretrained(dir, gguf_file=name)`` handed to lm-eval's ``HFLM``).  The items are built from
the shared Alpaca-style ``instruction-data.json`` (no hub download): the context is
``"Instruction: ...\\nAnswer:"``, the four choices are the item's own output and three others
(seeded), each cut to its first ``--choice-chars`` characters, so an item is four
HellaSwag-sized requests.

Sides, each timed over the same items, rounds alternating so that a busy neighbour slows them alike:

* ``lm-eval``: ``HFLM(batch_size=8).loglikelihood(requests)`` (it sorts requests by length and
  groups those with the same context);
* ``scratchlm``: ``evaluate_mc`` (each context once, its KV cache shared by the choices, items
  batched by length, ``--batch-size`` items per pass);
* ``per-request``: the definition, one full sequence per request (``score_reference``), the naive loop.

It prints each side's median seconds, the ratio lm-eval / scratchlm, and the largest difference
of a per-choice log-likelihood between the two (the parity check on a real model).

    OMP_NUM_THREADS=1 python benchmarks/mc_lm_eval.py --threads 1        # 50 items = 200 requests
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
GGUF = SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA = SHARED / "data" / "instruction-data.json"


def build_items(n: int, choice_chars: int, seed: int, shots: int):
    from scratchlm.evaluation.mc import Item, with_few_shot

    entries = json.loads(DATA.read_text())
    rng = random.Random(seed)
    picked = rng.sample(range(len(entries)), n)
    items = []
    for i in picked:
        e = entries[i]
        question = e["instruction"] + (f"\n{e['input']}" if e["input"] else "")
        others = rng.sample([j for j in range(len(entries)) if j != i], 3)
        choices = [entries[j]["output"][:choice_chars].strip() or "-" for j in [i, *others]]
        order = list(range(4))
        rng.shuffle(order)
        items.append(Item(f"Instruction: {question}\nAnswer:", [choices[k] for k in order], order.index(0)))
    # lm-eval's few-shot layout: answered examples, each followed by a blank line, before the item.
    return with_few_shot(items[shots:], items[:shots])


def work_bound(model, encoded) -> dict[str, float]:
    """FLOPs of the matrix products each side must do (attention's own products, a few percent at
    these lengths, left out).  lm-eval runs context + choice (less its last token) once per choice
    and projects every position onto the vocabulary; we run the context once per item, each
    choice's tokens (less its last) after it, and project only the positions that predict a
    choice token."""
    body = sum(m.weight.numel() for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.startswith("layers."))
    head = model.lm_head.weight.numel()
    harness = ours = 0.0
    for e in encoded:
        for cont in e.continuations:
            read = len(e.context) + len(cont) - 1
            harness += 2 * read * (body + head)
            ours += 2 * (len(cont) - 1) * body + 2 * len(cont) * head
        ours += 2 * len(e.context) * body
    return {"lm-eval": harness, "scratchlm": ours}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=50, help="items (4 requests each)")
    parser.add_argument("--choice-chars", type=int, default=80)
    parser.add_argument("--few-shot", type=int, default=0,
                        help="answered examples before every item (HellaSwag is usually run 10-shot)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="lm-eval's batch (requests) and ours (items)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-reference", action="store_true", help="skip the naive per-request loop")
    args = parser.parse_args()
    if not GGUF.exists() or not DATA.exists():
        print(f"needs {GGUF} and {DATA}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import scratchlm
    from scratchlm.evaluation.mc import encode_item, evaluate_mc, score_reference

    items = build_items(args.items + args.few_shot, args.choice_chars, args.seed, args.few_shot)
    lm = scratchlm.load(GGUF, device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name,
                                              dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name)
    harness = HFLM(pretrained=hf, tokenizer=tok, batch_size=args.batch_size, device="cpu")
    requests = [Instance("loglikelihood", {}, (it.context, " " + c), j)
                for it in items for j, c in enumerate(it.choices)]

    def run_harness():
        return [ll for ll, _ in harness.loglikelihood(requests, disable_tqdm=True)]

    def run_ours():
        result = evaluate_mc(lm.model, lm.tokenizer, items, batch_size=args.batch_size)
        return [c.loglikelihood for r in result.items for c in r.choices]

    encoded = [encode_item(lm.tokenizer, it, i) for i, it in enumerate(items)]

    def run_reference():
        with torch.inference_mode():
            return [c.loglikelihood for e in encoded for c in score_reference(lm.model, e)]

    sides = {"lm-eval": run_harness, "scratchlm": run_ours}
    if not args.no_reference:
        sides["per-request"] = run_reference
    times: dict[str, list[float]] = {k: [] for k in sides}
    outputs = {}
    for _ in range(args.rounds):
        for name, fn in sides.items():
            start = time.perf_counter()
            outputs[name] = fn()
            times[name].append(time.perf_counter() - start)
    diff = max(abs(a - b) for a, b in zip(outputs["lm-eval"], outputs["scratchlm"], strict=True))
    bound = work_bound(lm.model, encoded)
    tokens = sum(len(e.context) + sum(map(len, e.continuations)) for e in encoded)
    print(f"SmolLM2-135M-Instruct fp32, {len(items)} items = {len(requests)} requests, {args.few_shot}-shot "
          f"({tokens} tokens with each context counted once per item), {args.threads} thread(s), "
          f"median of {args.rounds} rounds")
    for name, t in times.items():
        print(f"  {name:<12} {statistics.median(t):7.2f} s   (rounds: {', '.join(f'{x:.2f}' for x in t)})")
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"ratio lm-eval / scratchlm: {med['lm-eval'] / med['scratchlm']:.2f}x")
    if "per-request" in med:
        print(f"ratio per-request / lm-eval: {med['per-request'] / med['lm-eval']:.2f}x")
    work = bound["lm-eval"] / bound["scratchlm"]
    print(f"matrix-product work (2 x weights x tokens read, plus the vocabulary projection where computed): "
          f"lm-eval {bound['lm-eval'] / 1e9:.0f} GFLOP, scratchlm {bound['scratchlm'] / 1e9:.0f} GFLOP: "
          f"at equal speed per FLOP the ratio is {work:.2f}x, and the measured ratio is "
          f"{med['lm-eval'] / med['scratchlm'] / work:.0%} of that")
    print(f"largest per-choice log-likelihood difference, scratchlm vs lm-eval: {diff:.2e}")
    if "per-request" in outputs:
        # The definition through our model, one sequence per request: what the model (not the
        # cache sharing) contributes to the difference.
        ref = max(abs(a - b) for a, b in zip(outputs["lm-eval"], outputs["per-request"], strict=True))
        own = max(abs(a - b) for a, b in zip(outputs["scratchlm"], outputs["per-request"], strict=True))
        print(f"  per-request vs lm-eval: {ref:.2e}; scratchlm vs per-request: {own:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
