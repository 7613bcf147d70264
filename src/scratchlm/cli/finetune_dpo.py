"""Preference-tune a model with DPO ('scratchlm finetune dpo'; Raschka's ch. 7 DPO notebook, and TRL's
DPOTrainer conventions).

The data is a JSON list or JSONL file of preference pairs, in Raschka's form ({"instruction", "input",
"chosen", "rejected"}: the prompt is the instruction template) or TRL's ({"prompt", "chosen",
"rejected"} as strings, or as chat message lists rendered with the model's chat template).  The
reference model is the starting model, frozen (with --train lora: the same weights with the
adapters off, no second copy).  The run dir holds metrics.jsonl (loss and rewards/* for training
and validation), loss.png, results.json (eval_* for validation, test_* for test) and the weights
(with --train lora: the adapter, naming the base model).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from scratchlm.cli import finetune_common as common
from scratchlm.cli.options import add_lora_options, lora_config_from_args
from scratchlm.cli.training_options import add_training_options
from scratchlm.errors import ConfigError
from scratchlm.finetune.lora_config import LoRAConfig
from scratchlm.training.config import TrainConfig

# Raschka ch. 7, DPO notebook: beta 0.1, AdamW lr 5e-6, weight decay 0.01, batch 8, 1 epoch, no
# warmup or decay, no clipping, torch's AdamW betas, evaluation every 5 steps on 5 batches of each
# split (eval_freq, eval_iter), torch.manual_seed(123).
DPO = TrainConfig(batch_size=8, lr=5e-6, lr_schedule="constant", warmup_steps=0, weight_decay=0.01,
                  beta2=0.999, grad_clip=None, max_epochs=1, eval_every=5, eval_batches=5, eval_at_start=True,
                  log_every=1, seed=123, precision="fp32", device="cpu")
NOTEBOOK = "Raschka ch. 7 DPO notebook"
SOURCES = dict.fromkeys(("batch_size", "lr", "lr_schedule", "weight_decay", "max_epochs", "eval_every",
                         "eval_batches", "seed"), NOTEBOOK)
DPO_LORA = LoRAConfig(rank=16, alpha=16.0)  # the benchmark: rank 16


def add_parser(subparsers: Any) -> None:
    """Register 'dpo' under 'scratchlm finetune'."""
    from scratchlm.prompts import TEMPLATE_CHOICES
    from scratchlm.training.losses import DPO_LOSSES

    p = subparsers.add_parser("dpo", help="preference-tune a model with DPO (chosen/rejected pairs)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s = argparse.SUPPRESS
    g = common.model_and_data(
        p, data="preference pairs: JSON list or JSONL of {instruction, input, chosen, rejected} (Raschka) or "
        "{prompt, chosen, rejected} as strings or chat message lists (TRL)",
        split="fractions of --data, in file order: the first TRAIN train, the next TEST test, the rest "
        f"validates (default: 0.85,0.05,0.1, 935/55/110 of 1,100 pairs; {NOTEBOOK})",
        separate="then --data is all training data")
    g.add_argument("--template", choices=TEMPLATE_CHOICES, default=s,
                   help="the prompt of Raschka's form: an instruction style (default: alpaca; the notebook), "
                        "or 'model': one user turn rendered with the model's chat template (what "
                        "'finetune instruct --template model' trains).  Chat-form pairs always use the "
                        "model's chat template")
    g.add_argument("--max-length", type=int, default=s, metavar="N",
                   help="tokens per prompt + answer; longer ones keep their start, as in TRL "
                        "(default: the model's context)")
    g = p.add_argument_group("DPO")
    g.add_argument("--beta", type=float, default=s,
                   help=f"strength of the pull toward the reference (default: 0.1; {NOTEBOOK})")
    g.add_argument("--loss", choices=list(DPO_LOSSES), default=s,
                   help="sigmoid: DPO's -log σ(β d) (default); ipo: (d/len - 1/2β)² per token; hinge: "
                        "max(0, 1 - β d) — as TRL defines them")
    g.add_argument("--ref-model", default=s, metavar="REF",
                   help="the reference model (default: the starting model, frozen; it must share the "
                        "tokenizer)")
    g.add_argument("--train", choices=["all", "lora"], default=s,
                   help=f"all: every weight (default; {NOTEBOOK}); lora: LoRA adapters on every block, "
                        "the reference being the same weights with the adapters off")
    g.add_argument("--precompute-ref", action="store_true", default=s,
                   help="compute the reference's log-probabilities once for every pair before training, "
                        "then free the reference (each step runs only the policy)")
    add_lora_options(g, DPO_LORA)
    common.add_responses_option(g, "(the prompts 'finetune instruct' answers, to compare the two)")
    add_training_options(p, DPO, items="pairs", sources=SOURCES)
    common.output_options(p, "dpo")
    p.set_defaults(func=run_dpo)


def run_dpo(args: argparse.Namespace) -> int:
    from scratchlm.data.preference import drop_ties, read_preferences
    from scratchlm.finetune.dpo import DPORecipe, finetune_dpo
    from scratchlm.finetune.instruct import RESPONSES_FILE, write_test_responses
    from scratchlm.prompts import template_style
    from scratchlm.runtime import set_threads
    from scratchlm.training import distributed

    given, run_dir, resume, tc = common.start(args, "dpo", DPO, "JSON or JSONL preference pairs")
    if given.get("beta", 0.1) <= 0:
        raise ConfigError(f"--beta must be positive, got {given['beta']:g}",
                          "pass --beta > 0 (the notebook's: 0.1)")
    if given.get("max_new_tokens", 0) < 0:
        raise ConfigError("--max-new-tokens must be ≥ 0", "pass e.g. --max-new-tokens 256")
    lora = lora_config_from_args(given, DPO_LORA)
    set_threads(given.get("threads", 0))
    lm, base_ref, cli = common.load_model(given, tc.device)
    template = given.get("template", "alpaca")
    style = template_style(template, lm.chat_template)
    form = {"style": None if template == "model" else template, "chat_template": lm.chat_template,
            "bos_token": lm.tokenizer.bos_token, "eos_token": lm.tokenizer.eos_token}
    train, val, test = common.book_splits(given, lambda path: read_preferences(path, **form))
    ties = 0
    for part in (train, val, test):
        part[:], dropped = drop_ties(part)
        ties += dropped
    if ties:
        print(f"warning: {ties} pairs have the same chosen and rejected answer; left out (no signal)",
              file=sys.stderr)
    ref_model = ref_tokenizer = None
    if "ref_model" in given:
        from scratchlm.api import load

        ref = load(given["ref_model"], device=tc.device)
        ref_model, ref_tokenizer = ref.model, ref.tokenizer
        if ref_tokenizer is None:
            raise ConfigError(f"{given['ref_model']} has no tokenizer",
                              "pass a reference with the policy's tokenizer")
    mode = given.get("train", "all")
    if mode == "lora":
        from scratchlm.finetune.lora import resolve_targets

        resolve_targets(lm.model, lora)  # an unknown target is an error before anything runs
    recipe = DPORecipe(train, val, test, beta=given.get("beta", 0.1), loss=given.get("loss", "sigmoid"),
                       mode=mode, lora=lora, precompute_ref=bool(given.get("precompute_ref")),
                       max_length=given.get("max_length"), base_model=base_ref,
                       chat_template=style.template, data_info={"cli": cli, "ties_dropped": ties})
    print(f"preference-tuning {lm.config.name} with DPO ({recipe.loss}, beta {recipe.beta:g}): "
          f"{len(train)} train / {len(val)} validation / {len(test)} test pairs, --train {mode}, "
          f"run dir {run_dir}", file=sys.stderr)
    if not resume and given.get("overwrite"):
        common.clear(run_dir)
    result = common.interruptible(lambda: finetune_dpo(
        lm.model, lm.tokenizer, recipe, tc, ref_model=ref_model, ref_tokenizer=ref_tokenizer, run_dir=run_dir,
        resume=resume, dist=distributed.from_env(tc.device)), "dpo", run_dir)
    if result is None:
        return 130
    max_new = given.get("max_new_tokens", 256)
    if result.trainer.dist.is_main and max_new > 0 and result.splits["test"]:
        test_pairs = result.splits["test"]
        write_test_responses(run_dir / RESPONSES_FILE, result.model, lm.tokenizer, result.test_prompts,
                             [pair.source.summary for pair in test_pairs if pair.source is not None],
                             style.template, max_new, progress="test responses" if tc.progress else None)
    _report(result.figures, run_dir)
    return 0


def _report(figures: dict[str, Any], run_dir: Path) -> None:
    print(f"\ndone: {figures['steps']} steps in {figures['wall_time_s']:.0f} s")
    for split, prefix in (("validation", "eval"), ("test", "test")):
        if f"{prefix}_loss" in figures:
            print(f"{split:<10} loss {figures[f'{prefix}_loss']:.4f}   reward margin "
                  f"{figures[f'{prefix}_rewards/margins']:.4f}   reward accuracy "
                  f"{figures[f'{prefix}_rewards/accuracies'] * 100:.2f} %")
    for label, path in (("run dir", run_dir), ("results", run_dir / "results.json"),
                        ("loss plot", run_dir / "loss.png"), ("responses", run_dir / "test_responses.jsonl")):
        if path.exists():
            print(f"{label + ':':<12}{path}")
