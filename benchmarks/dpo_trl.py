"""DPO training step: scratchlm's recipe against trl's DPOTrainer, same model, pairs and settings.

The recipe both sides run: SmolLM2-135M-Instruct (the shared .gguf, dequantized and saved as a
Hugging Face directory that transformers opens), the first pairs of Raschka's
instruction-data-with-preference.json in file order with the Alpaca prompt, beta 0.1, sigmoid
loss, AdamW lr 5e-6, batch 8, LoRA rank 16 / alpha 16 on every linear layer of the blocks, the
reference being the base with the adapters off, fp32 on the CPU.

* **trl**: ``trl.DPOTrainer`` with a peft ``LoraConfig`` (its default since 1.0: the reference
  forward under ``disable_adapter``), each step timed by a callback;
* **scratchlm**: ``finetune.dpo.finetune_dpo`` (one forward for chosen and rejected, logits only at
  completion tokens), each step timed from ``metrics.jsonl``; and again with ``precompute_ref``
  (the reference's log-probs computed once before training, timed separately and printed per pair,
  so its share of an epoch can be added).

The first step of each side is a warm-up and not counted.  The sides run one after the other, so
run it on a quiet machine (the load average is printed).  Printed: the median seconds per step of
each and the ratio, and the first step's loss on each side (ln 2 = 0.6931: the policy starts as
the reference).

    python benchmarks/dpo_trl.py [--steps 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
MODEL = SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA = SHARED / "data" / "instruction-data-with-preference.json"


def step_times_from_metrics(run_dir: Path) -> tuple[list[float], float]:
    """Seconds of each step after the first (from the train records' clocks), and the first loss."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    clocks = [r["elapsed"] for r in train]
    return [b - a for a, b in zip(clocks, clocks[1:], strict=False)], train[0]["loss"]


def run_trl(base: Path, rows: list[dict], args: argparse.Namespace, out: Path) -> tuple[list[float], float]:
    import peft
    import transformers
    import trl
    from datasets import Dataset

    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    clocks: list[float] = []

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, *_, **__):
            clocks.append(time.perf_counter())

        def on_step_end(self, *_, **__):
            clocks.append(time.perf_counter())

    config = trl.DPOConfig(output_dir=str(out), per_device_train_batch_size=args.batch,
                           max_steps=args.steps, learning_rate=5e-6, weight_decay=0.01,
                           lr_scheduler_type="constant", warmup_steps=0,
                           beta=0.1, loss_type=["sigmoid"], bf16=False, use_cpu=True, report_to="none",
                           save_strategy="no", logging_steps=1, max_length=None, max_grad_norm=0.0,
                           disable_tqdm=True, seed=123, dataloader_num_workers=0)
    lora = peft.LoraConfig(r=args.rank, lora_alpha=args.rank, lora_dropout=0.0, target_modules="all-linear",
                           task_type="CAUSAL_LM")
    trainer = trl.DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer, peft_config=lora, callbacks=[Clock()])
    trainer.train()
    steps = [end - start for start, end in zip(clocks[::2], clocks[1::2], strict=True)]
    first_loss = next(r["loss"] for r in trainer.state.log_history if "loss" in r)
    return steps[1:], first_loss


def run_ours(pairs: list, args: argparse.Namespace, out: Path,
             precompute: bool) -> tuple[list[float], float, float]:
    import scratchlm
    from scratchlm.finetune.dpo import DPORecipe, finetune_dpo
    from scratchlm.finetune.lora import LoRAConfig
    from scratchlm.training.config import TrainConfig

    lm = scratchlm.load(args.model, device="cpu")
    config = TrainConfig(batch_size=args.batch, lr=5e-6, lr_schedule="constant", warmup_steps=0,
                         weight_decay=0.01, beta2=0.999, grad_clip=None, max_steps=args.steps, eval_every=0,
                         eval_batches=1, log_every=1, seed=123, precision="fp32", device="cpu",
                         progress=False)
    recipe = DPORecipe(pairs, [], [], beta=0.1, loss="sigmoid", mode="lora",
                       lora=LoRAConfig(rank=args.rank, alpha=float(args.rank)), precompute_ref=precompute)
    started = time.perf_counter()
    result = finetune_dpo(lm.model, lm.tokenizer, recipe, config, run_dir=out)
    setup = time.perf_counter() - started - result.trainer.elapsed
    steps, first_loss = step_times_from_metrics(out)
    return steps, first_loss, setup


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(MODEL), help="the model (what scratchlm.load opens)")
    parser.add_argument("--steps", type=int, default=5, help="steps per side (the first is a warm-up)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-trl", action="store_true", help="time ours only")
    args = parser.parse_args(argv)
    if not Path(args.model).exists() or not DATA.exists():
        print(f"skipped: {args.model} or {DATA} not present (the shared folder is optional)")
        return 0
    from scratchlm.data.preference import read_preferences

    torch.set_num_threads(args.threads)
    pairs = read_preferences(DATA)[:args.batch * args.steps]
    rows = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs]
    with tempfile.TemporaryDirectory(prefix="dpo-trl-") as tmp:  # 1.7 GB of run dirs and exports
        return measure(Path(tmp), pairs, rows, args)


def measure(tmp: Path, pairs: list, rows: list[dict], args: argparse.Namespace) -> int:
    import scratchlm
    from scratchlm.checkpoint.hf import save_hf

    print(f"load average before: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} cores, "
          f"{args.threads} threads, {args.steps} steps of {args.batch} pairs")
    results: dict[str, tuple[list[float], float]] = {}
    ours, first, _ = run_ours(pairs, args, tmp / "ours", precompute=False)
    results["scratchlm"] = (ours, first)
    pre, first, setup = run_ours(pairs, args, tmp / "ours-pre", precompute=True)
    results["scratchlm --precompute-ref"] = (pre, first)
    print(f"precomputing the reference: {setup:.1f} s for {len(pairs)} pairs "
          f"({setup / len(pairs):.3f} s per pair, once per run)")
    if not args.skip_trl:
        lm = scratchlm.load(args.model, device="cpu")
        save_hf(lm.model, lm.config, tmp / "base", lm.tokenizer)
        del lm
        results["trl DPOTrainer"] = run_trl(tmp / "base", rows, args, tmp / "trl")
    for name, (steps, loss) in results.items():
        print(f"{name:>27}: median step {statistics.median(steps):.2f} s (steps 2-{args.steps}: "
              f"{', '.join(f'{s:.2f}' for s in steps)}), first-step loss {loss:.4f}")
    if "trl DPOTrainer" in results:
        theirs = statistics.median(results["trl DPOTrainer"][0])
        for name in ("scratchlm", "scratchlm --precompute-ref"):
            ratio = theirs / statistics.median(results[name][0])
            print(f"speed-up of {name} over trl DPOTrainer: {ratio:.2f}x")
    print(f"load average after: {os.getloadavg()[0]:.2f} (1 min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
