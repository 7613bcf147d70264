"""Instruction tuning, Raschka ch. 7 on SmolLM2-135M-Instruct: the finetuned run against its base model.

Takes a run of ``scratchlm finetune instruct`` (default ``runs/sft``, made by the command the
README gives) and answers the same 110 test instructions with the *base* model through the same
template, greedy, ``--max-new-tokens`` each (the run's own answers are its
``test_responses.jsonl``).  Prints the validation loss curve of the run, ROUGE-L F1 of both
models against the book's answers, and a few answers side by side (docs/benchmarks.md).

    python benchmarks/sft_smollm2.py --run runs/sft --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/sft", help="the run dir of 'scratchlm finetune instruct'")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--show", type=int, default=3, help="answers printed side by side")
    args = parser.parse_args(argv)
    run = Path(args.run)
    if not (run / "test_responses.jsonl").is_file():
        print(f"skipped: {run}/test_responses.jsonl not found (run 'scratchlm finetune instruct' first)")
        return 0
    import scratchlm
    from scratchlm.checkpoint.io import read_run_config
    from scratchlm.data.instruction import book_split, prompt_ids, read_examples
    from scratchlm.evaluation.rouge import rouge
    from scratchlm.finetune.instruct import write_test_responses
    from scratchlm.prompts import template_style
    from scratchlm.runtime import set_threads

    set_threads(args.threads)
    payload = read_run_config(run)
    cli = payload["data"]["cli"]
    results = json.loads((run / "results.json").read_text())
    base = scratchlm.load(payload.get("base_model") or cli["model"], device="cpu")
    style = template_style(results["template"], base.chat_template)
    test = book_split(read_examples(cli["data"]))[2]
    out = run / "base_test_responses.jsonl"
    start = time.perf_counter()
    prompts = [prompt_ids(example, style, base.tokenizer) for example in test]
    records = [example.summary() for example in test]
    write_test_responses(out, base.model, base.tokenizer, prompts, records, style.template,
                         args.max_new_tokens, progress="base model answers")
    print(f"base model: {len(test)} answers in {time.perf_counter() - start:.0f} s", file=sys.stderr)

    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["step"], r["val_loss"]) for r in evals if r.get("kind") == "eval" and "val_loss" in r]
    print("validation loss: " + ", ".join(f"step {s}: {v:.3f}" for s, v in curve))
    print(f"run: {results['steps']} steps, wall time {results['wall_time_s']:.0f} s "
          f"(training {results['train_time_s']:.0f} s, test answers "
          f"{results.get('responses_time_s', 0):.0f} s); "
          f"val loss {results['val_loss']:.4f}, test loss {results['test_loss']:.4f}")
    tuned = [json.loads(line) for line in (run / "test_responses.jsonl").read_text().splitlines()]
    plain = [json.loads(line) for line in out.read_text().splitlines()]
    references = [r["reference"] for r in tuned]
    for name, records in (("base model", plain), ("finetuned", tuned)):
        score = rouge([r["response"] for r in records], references).average["rougeL"]
        print(f"{name:<11} ROUGE-L F1 {score.fmeasure:.4f} against the book's answers")
    for a, b in list(zip(plain, tuned, strict=True))[:args.show]:
        print(f"\n### {a['instruction']}" + (f"\n    input: {a['input']}" if a["input"] else ""))
        print(f"reference:  {a['reference']}\nbase:       {a['response'][:300]}\n"
              f"finetuned:  {b['response'][:300]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
