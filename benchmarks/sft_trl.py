"""Instruction tuning: ``finetune instruct`` against TRL's ``SFTTrainer``, same model, data and batches.

The recipe is Raschka's ch. 7 on his instruction data (Alpaca prompt, loss on the response only,
AdamW lr 5e-5, weight decay 0.1, batch 8, a constant rate) with LoRA rank 16 on every linear
layer of the blocks, on SmolLM2-135M (the shared .gguf, dequantized and saved as a Hugging Face
directory that transformers opens).  Both sides train one pass over the same first
``steps × 8`` training examples, TRL from a prompt-completion dataset of the same prompt texts
(its completion-only loss, EOS appended: our Alpaca template ends each answer with it too), so
they see the same tokens and the same number of optimizer steps.  Timed: TRL's ``train()``
(the dataset is tokenized before) and our ``finetune_instruct`` (the data encoded before).

Precision is named on both sides: ``--precision fp32`` (both fp32; TRL with ``bf16=False``) or
``bf16`` (both bf16 autocast over fp32 weights; TRL's CPU default).  TRL's default also turns on
gradient checkpointing; ``--trl-checkpointing`` times it that way.  The sides run one after the
other, each in a fresh process, ``--rounds`` times each, alternating; printed: every round, each
side's median seconds per step and the ratio of the medians.

    python benchmarks/sft_trl.py --steps 8 --threads 2
    python benchmarks/sft_trl.py --steps 8 --threads 2 --precision bf16 --group-by-length
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
MODEL = SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA = SHARED / "data" / "instruction-data.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(MODEL))
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per side and round")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--train", choices=["lora", "all"], default="lora")
    parser.add_argument("--group-by-length", action="store_true",
                        help="ours batches rows of similar length (TRL: its group_by_length too)")
    parser.add_argument("--trl-checkpointing", action="store_true",
                        help="TRL with gradient checkpointing, its default")
    parser.add_argument("--side", choices=["scratchlm", "trl"], help=argparse.SUPPRESS)  # one timed run
    parser.add_argument("--base", help=argparse.SUPPRESS)  # the exported model, for --side
    args = parser.parse_args(argv)
    for path in (args.model, args.data):
        if not Path(path).exists():
            print(f"skipped: {path} not present (the shared folder is optional)")
            return 0
    if args.side is not None:
        print(f"seconds_per_step={(ours if args.side == 'scratchlm' else theirs)(args, Path(args.base))}")
        return 0
    import scratchlm
    from scratchlm.checkpoint.hf import save_hf

    with tempfile.TemporaryDirectory(prefix="sft-trl-") as tmp:
        base = Path(tmp) / "base"
        lm = scratchlm.load(args.model, device="cpu")
        save_hf(lm.model, lm.config, base)
        lm.tokenizer.save(base)
        del lm
        # Each side in a process of its own, alternating: neither inherits the other's thread
        # pools, allocator state or settings (accelerate configures torch for its CPU runs).
        times: dict[str, list[float]] = {"scratchlm": [], "trl": []}
        passed = list(argv if argv is not None else sys.argv[1:])
        for _ in range(args.rounds):
            for side in times:
                out = subprocess.run([sys.executable, __file__, *passed, "--side", side, "--base", str(base)],
                                     capture_output=True, text=True, check=True).stdout
                times[side].append(float(out.rsplit("seconds_per_step=", 1)[1]))
    a, b = statistics.median(times["scratchlm"]), statistics.median(times["trl"])
    print(f"SFT {args.train} r{args.rank}, {args.precision}, batch {args.batch}, {args.steps} steps, "
          f"{args.threads} threads, group_by_length={args.group_by_length}, "
          f"trl gradient checkpointing={args.trl_checkpointing}")
    print("rounds: " + "; ".join(f"{side} " + ", ".join(f"{t:.2f}" for t in ts)
                                 for side, ts in times.items()))
    import trl

    print(f"scratchlm {a:.2f} s/step   trl {trl.__version__} SFTTrainer {b:.2f} s/step   ratio {b / a:.2f}x")
    return 0


def _train_examples(args: argparse.Namespace) -> list:
    from scratchlm.data.instruction import book_split, read_examples

    return book_split(read_examples(args.data))[0][:args.steps * args.batch]


def ours(args: argparse.Namespace, base: Path) -> float:
    """Our seconds per step: ``finetune_instruct`` over the examples (encoded before the clock starts)."""
    import scratchlm
    from scratchlm.finetune.instruct import InstructRecipe, encode_splits, finetune_instruct
    from scratchlm.finetune.lora_config import LoRAConfig
    from scratchlm.prompts import get_style
    from scratchlm.training.config import TrainConfig

    torch.set_num_threads(args.threads)
    lm = scratchlm.load(base, device="cpu")
    config = TrainConfig(batch_size=args.batch, lr=5e-5, lr_schedule="constant", warmup_steps=0,
                         weight_decay=0.1, beta2=0.999, grad_clip=None, max_epochs=1, eval_every=0,
                         eval_batches=1, log_every=10**9, seed=123, precision=args.precision, device="cpu",
                         progress=False)
    recipe = InstructRecipe(_train_examples(args), [], [], get_style("alpaca"), mode=args.train,
                            lora=LoRAConfig(rank=args.rank, alpha=2.0 * args.rank), max_new_tokens=0,
                            group_by_length=args.group_by_length)
    splits = encode_splits(recipe, lm.tokenizer, lm.config.context_length)
    start = time.perf_counter()
    finetune_instruct(lm.model, lm.tokenizer, recipe, config, splits=splits)
    return (time.perf_counter() - start) / args.steps


def theirs(args: argparse.Namespace, base: Path) -> float:
    """TRL's seconds per step: ``SFTTrainer.train()`` on the same prompts and completions."""
    import datasets
    import peft
    import transformers
    import trl

    from scratchlm.prompts import format_prompt

    torch.set_num_threads(args.threads)
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    rows = [{"prompt": format_prompt(e.record, "alpaca"), "completion": e.record["output"]}
            for e in _train_examples(args)]
    sft = trl.SFTConfig(output_dir=str(base.parent / "trl"), per_device_train_batch_size=args.batch,
                        num_train_epochs=1, learning_rate=5e-5, lr_scheduler_type="constant",
                        warmup_steps=0, weight_decay=0.1, max_grad_norm=0.0, seed=123,
                        bf16=args.precision == "bf16", use_cpu=True, report_to=[], save_strategy="no",
                        eval_strategy="no", logging_steps=10**6, completion_only_loss=True,
                        gradient_checkpointing=args.trl_checkpointing, dataloader_drop_last=True,
                        train_sampling_strategy="group_by_length" if args.group_by_length else "random",
                        eos_token=tokenizer.eos_token, disable_tqdm=True)
    lora = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear",
                           task_type="CAUSAL_LM") if args.train == "lora" else None
    trainer = trl.SFTTrainer(model=model, args=sft, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tokenizer, peft_config=lora)
    start = time.perf_counter()
    trainer.train()
    return (time.perf_counter() - start) / args.steps


if __name__ == "__main__":
    raise SystemExit(main())
