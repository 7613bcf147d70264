"""End-to-end evaluation demo: SmolLM2-135M-Instruct against the book's reference answers.

1. SmolLM2-135M-Instruct (the shared ``.gguf``) answers the 110 test instructions of Raschka's
   ch. 7 split (``instruction-data.json``: first 85 % train, next 10 % test), greedy, through its
   chat template; ``<out>/smollm2/test_responses.jsonl``.  The book's answers are the second
   "model" (response = output).
2. ``eval rouge`` scores SmolLM2's answers against the references.
3. ``scratchlm serve`` (in this process: ``ServerThread``) serves SmolLM2 itself as the judge;
   ``eval judge`` scores the first ``--judge-items`` answers (Raschka's 0-100 prompt) and compares
   them pairwise with the references, both orders.
4. ``eval ranking`` ranks the two from the comparisons; ``eval report`` writes one page.

A 135M judge is a weak judge (it is the demo's plumbing that is on trial, not its verdicts): the
figures it prints say how often its replies parse and how often its two orders disagree.

    OMP_NUM_THREADS=1 python benchmarks/eval_demo_smollm2.py --out runs/eval-demo --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
GGUF = SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA = SHARED / "data" / "instruction-data.json"


def test_split() -> list[dict]:
    data = json.loads(DATA.read_text())
    train, test = int(len(data) * 0.85), int(len(data) * 0.1)
    return data[train:train + test]


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def cli(*args) -> None:
    from scratchlm.cli import main

    print("$ scratchlm " + " ".join(map(str, args)), flush=True)
    code = main([str(a) for a in args])
    if code:
        sys.exit(code)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/eval-demo")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--batch", type=int, default=16, help="prompts generated together")
    parser.add_argument("--judge-items", type=int, default=40, help="items the judge sees (of 110)")
    parser.add_argument("--parallel", type=int, default=8)
    args = parser.parse_args()
    import torch

    import scratchlm
    from scratchlm.generation import SamplingParams
    from scratchlm.serving.openai_server import ServerConfig, ServerThread

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    entries = test_split()
    lm = scratchlm.load(GGUF, device="cpu", dtype="float16")
    model_file = out / "smollm2" / "test_responses.jsonl"
    if not model_file.exists():
        start = time.perf_counter()
        params = lm.chat_params(SamplingParams(temperature=0, max_new_tokens=args.max_new_tokens), {})
        responses = []
        for i in range(0, len(entries), args.batch):
            chunk = entries[i:i + args.batch]
            prompts = [lm.chat_prompt(e["instruction"] + (f"\n\n{e['input']}" if e["input"] else ""))
                       for e in chunk]
            responses += [c.text.strip() for c in lm.complete(prompts, params)]
            print(f"generated {len(responses)}/{len(entries)}", flush=True)
        write_jsonl(model_file, [{**e, "response": r} for e, r in zip(entries, responses, strict=True)])
        print(f"generation: {time.perf_counter() - start:.0f} s")
    cli("eval", "rouge", "--predictions", model_file, "--out", out / "rouge_items.jsonl")
    judged = out / "judge"
    subset = [json.loads(line) for line in model_file.read_text().splitlines()][:args.judge_items]
    write_jsonl(judged / "smollm2" / "test_responses.jsonl", subset)
    write_jsonl(judged / "reference" / "test_responses.jsonl",
                [{**e, "response": e["output"]} for e in entries[:args.judge_items]])
    with ServerThread(lm, ServerConfig("smollm2", max_batch=args.parallel)) as server:
        url = server.url + "/v1"
        cli("eval", "judge", "--responses", judged / "smollm2" / "test_responses.jsonl", "--judge-url", url,
            "--judge-model", "smollm2", "--parallel", args.parallel, "--out", judged / "judge_scores.jsonl")
        cli("eval", "judge", "--responses", judged / "smollm2" / "test_responses.jsonl", "--against",
            judged / "reference" / "test_responses.jsonl", "--judge-url", url, "--judge-model", "smollm2",
            "--parallel", args.parallel, "--out", judged / "judge_pairwise.jsonl",
            "--comparisons", judged / "comparisons.jsonl")
    cli("eval", "ranking", "--comparisons", judged / "comparisons.jsonl", "--plot", judged / "ratings.png")
    cli("eval", "report", model_file, judged / "judge_scores.jsonl", judged / "comparisons.jsonl",
        "--out", out / "report.html", "--title", "SmolLM2-135M-Instruct vs the book's answers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
