"""Finetune a pretrained model: 'classify' (a classification head, Raschka ch. 6 / appendix E, or
classification as text, Burkov §5.3.2) and 'instruct' (instruction tuning, Raschka ch. 7, Burkov §5.3.3).

The model is anything scratchlm.load opens (a run dir, a Hugging Face directory or hub id, a
.gguf file).  The run dir names the base model instead of copying its weights: it holds the
trained tensors (head, last block, adapters), the labels, metrics.jsonl, loss.png and
results.json, and loads with scratchlm.load like any other model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from scratchlm.cli import finetune_common as common
from scratchlm.cli import finetune_dpo
from scratchlm.cli.options import add_lora_options, lora_config_from_args
from scratchlm.cli.training_options import add_training_options
from scratchlm.errors import ConfigError
from scratchlm.finetune.lora_config import LoRAConfig
from scratchlm.training.config import TrainConfig

# Raschka ch. 6: AdamW lr 5e-5, weight decay 0.1, batch 8, 5 epochs, a constant rate (no warmup,
# no decay), no clipping, torch's AdamW betas, accuracy after every epoch on 5 batches of each
# split (his eval_iter) and on every example at the end; the split 0.7/0.1/0.2 shuffled with seed 123.
CLASSIFY = TrainConfig(batch_size=8, lr=5e-5, lr_schedule="constant", warmup_steps=0, weight_decay=0.1,
                       beta2=0.999, grad_clip=None, max_epochs=5, eval_every="epoch", eval_batches=5,
                       log_every=10, seed=123, precision="fp32", device="cpu")
CLASSIFY_LORA = LoRAConfig(rank=16, alpha=16.0)  # Raschka appendix E: rank 16, alpha 16
SOURCES = {name: "Raschka ch. 6" for name in ("batch_size", "lr", "lr_schedule", "weight_decay", "max_epochs",
                                              "seed", "eval_batches")}


# Raschka ch. 7: AdamW lr 5e-5, weight decay 0.1, batch 8, 2 epochs, a constant rate, no clipping,
# the loss on 5 batches of each split every 5 steps (his eval_freq / eval_iter) and before training.
INSTRUCT = TrainConfig(batch_size=8, lr=5e-5, lr_schedule="constant", warmup_steps=0, weight_decay=0.1,
                       beta2=0.999, grad_clip=None, max_epochs=2, eval_every=5, eval_batches=5,
                       eval_at_start=True, log_every=5, seed=123, precision="fp32", device="cpu")
INSTRUCT_LORA = LoRAConfig(rank=16, alpha=32.0)  # rank 16 as Burkov §5.5; alpha 2r, the usual choice
INSTRUCT_SOURCES = {name: "Raschka ch. 7" for name in ("batch_size", "lr", "lr_schedule", "weight_decay",
                                                       "max_epochs", "seed", "eval_every", "eval_batches")}


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(title="methods", metavar="METHOD")
    p = sub.add_parser("classify", help="train a text classifier on a pretrained model",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s = argparse.SUPPRESS
    g = common.model_and_data(p, data="labelled texts: TSV/CSV 'label<TAB>text' (header optional) or JSONL "
                        '{"text", "label"}; labels may be any strings',
                        split="fractions of --data, shuffled with --seed "
                        "(default: 0.7,0.1,0.2; Raschka ch. 6)",
                        separate="then --data is all training data unless --test-data is missing, which "
                        "--split then cuts")
    g.add_argument("--balance", action=argparse.BooleanOptionalAction, default=s,
                   help="undersample every class to the smallest one before splitting "
                        "(default: on; Raschka's balanced SMS spam set: 747 + 747)")
    g.add_argument("--max-length", type=int, default=s, metavar="N",
                   help="tokens per text; longer texts keep their last N (default: the model's context)")
    g = p.add_argument_group("what trains")
    g.add_argument("--train", choices=["last-block", "head", "all", "lora"], default=s,
                   help="last-block: the last transformer block, the final norm and the head "
                        "(default; Raschka ch. 6); head: only the head; all: every weight; lora: LoRA "
                        "adapters on every block and the head (Raschka appendix E)")
    g.add_argument("--as-text", action="store_true", default=s,
                   help="classification as text (Burkov §5.3.2): the model learns to answer the label after "
                        "--prompt-template (loss on the answer tokens only) and predicts the label whose "
                        "answer is most probable; no new head")
    g.add_argument("--prompt-template", default=s, metavar="TEXT",
                   help="the prompt of --as-text, with {text} where the text goes; the answer is ' LABEL' "
                        "and the end-of-text token (default: 'Predict label: {text}\\nLabel:', Burkov's "
                        "'Predict emotion: {text}\\nEmotion:' for any labels)")
    add_lora_options(g, CLASSIFY_LORA)
    add_training_options(p, CLASSIFY, items="examples", sources=SOURCES)
    common.output_options(p, "classify")
    p.set_defaults(func=run_classify)
    _configure_instruct(sub)
    finetune_dpo.add_parser(sub)


def _configure_instruct(sub: Any) -> None:
    from scratchlm.prompts import PROMPT_STYLES, TEMPLATE_CHOICES

    s = argparse.SUPPRESS
    p = sub.add_parser("instruct", help="instruction-tune a pretrained model (Alpaca, prompt/completion or "
                       "chat data)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    g = common.model_and_data(p, data="instruction data, JSON list or JSONL: Alpaca "
                        '{"instruction", "input", "output"}, '
                        '{"prompt", "completion"} (used as written, end-of-text appended), or chat '
                        '{"messages": [{"role", "content"}, ...]} (every assistant turn is learned)',
                        split="fractions of --data in file order: the first is training, then the test "
                        "fraction, then validation (default: 0.85,0.05,0.1 = 935/55/110 of 1,100; "
                        "Raschka ch. 7)", separate="then --data is all training data")
    g.add_argument("--template", choices=TEMPLATE_CHOICES, default=s,
                   help="how conversations become text: "
                        + "; ".join(f"{name}: {style.description}" for name, style in PROMPT_STYLES.items())
                        + "; model: the model's own chat template (SmolLM2: ChatML). Saved in the run "
                        "dir, so chat and serve format prompts the same way (default: alpaca; Raschka ch. 7)")
    g.add_argument("--mask-prompt", action=argparse.BooleanOptionalAction, default=s,
                   help="learn only the assistant's turns: system and user turns and the template's "
                        "scaffolding are not targets (default: on, as Raschka's exercise 7.2, Burkov §5.3.3 "
                        "and TRL's assistant-only loss; his first recipe learns the prompt too: "
                        "--no-mask-prompt)")
    g.add_argument("--max-length", type=int, default=s, metavar="N",
                   help="input tokens per example; longer ones are cut at the end and counted "
                        "(default: the model's context; Raschka: 1024)")
    g.add_argument("--group-by-length", action="store_true", default=s,
                   help="batch examples of similar length together (less padding; shuffled in groups of "
                        "50 batches)")
    g = p.add_argument_group("what trains")
    g.add_argument("--train", nargs="+", default=s, metavar="MODE",
                   help="all: every weight (default; Raschka ch. 7); lora: LoRA adapters on every linear "
                        "layer of the blocks (Burkov §5.5); last-blocks N: the last N transformer blocks "
                        "and the final norm")
    add_lora_options(g, INSTRUCT_LORA)
    common.add_responses_option(g, "(what 'eval rouge' and 'eval judge' score)")
    add_training_options(p, INSTRUCT, items="examples", sources=INSTRUCT_SOURCES)
    common.output_options(p, "instruct")
    p.set_defaults(func=run_instruct)


def run_classify(args: argparse.Namespace) -> int:
    from scratchlm.finetune.data import balance, label_set, read_labelled, split

    given, run_dir, resume, tc = common.start(args, "classify", CLASSIFY, "label<TAB>text lines, or JSONL")
    seed = tc.seed
    lora = lora_config_from_args(given, CLASSIFY_LORA)  # a bad rank or alpha fails before loading
    examples = read_labelled(given["data"])
    if "val_data" in given or "test_data" in given:
        train = balance(examples, seed) if given.get("balance", True) else examples
        val = read_labelled(given["val_data"]) if "val_data" in given else []
        test = read_labelled(given["test_data"]) if "test_data" in given else []
    else:
        pool = balance(examples, seed) if given.get("balance", True) else examples
        train, val, test = split(pool, common.fractions(given.get("split", "0.7,0.1,0.2")), seed)
    labels = label_set(train, val, test)

    from scratchlm.finetune.classify import ClassifyRecipe, finetune_classifier
    from scratchlm.finetune.heads import DEFAULT_TEMPLATE
    from scratchlm.runtime import set_threads

    set_threads(given.get("threads", 0))
    lm, base_ref, cli = common.load_model(given, tc.device)
    recipe = ClassifyRecipe(train, val, test, labels, mode=given.get("train", "last-block"), lora=lora,
                            max_length=given.get("max_length"), base_model=base_ref,
                            as_text=bool(given.get("as_text")),
                            template=given.get("prompt_template", DEFAULT_TEMPLATE).replace("\\n", "\n"),
                            data_info={"cli": cli, "labels": labels})
    if recipe.as_text and "{text}" not in recipe.template:
        raise ConfigError(f"the prompt template {recipe.template!r} has no {{text}}",
                          "put {text} where the text goes, e.g. "
                          "--prompt-template 'Predict label: {text}\\nLabel:'")
    if recipe.mode == "lora":
        from scratchlm.finetune.lora import resolve_targets

        resolve_targets(lm.model, lora)  # an unknown target is an error before anything runs
    print(f"finetuning {lm.config.name} as a {len(labels)}-class classifier ({', '.join(labels)}): "
          f"{len(train)} train / {len(val)} validation / {len(test)} test texts, --train {recipe.mode}, "
          f"run dir {run_dir}", file=sys.stderr)
    if not resume and given.get("overwrite"):
        common.clear(run_dir)
    result = common.interruptible(lambda: finetune_classifier(lm.model, lm.tokenizer, recipe, tc,
                                                              run_dir=run_dir, resume=resume),
                                  "classify", run_dir)
    if result is None:
        return 130
    _report(result.figures, run_dir)
    return 0


def run_instruct(args: argparse.Namespace) -> int:
    from scratchlm.data.instruction import read_examples
    from scratchlm.finetune.instruct import InstructRecipe, encode_splits, finetune_instruct
    from scratchlm.prompts import template_style

    given, run_dir, resume, tc = common.start(args, "instruct", INSTRUCT,
                                        "Alpaca JSON, prompt/completion or chat JSONL")
    mode, blocks = _train_mode(given.get("train", ["all"]))
    lora = lora_config_from_args(given, INSTRUCT_LORA)
    max_new = given.get("max_new_tokens", 256)
    if max_new < 0 or given.get("max_length", 1) < 1:
        raise ConfigError("--max-new-tokens must be ≥ 0 and --max-length ≥ 1", "pass e.g. --max-length 1024")
    train, val, test = common.book_splits(given, read_examples)
    from scratchlm.runtime import set_threads

    set_threads(given.get("threads", 0))
    lm, base_ref, cli = common.load_model(given, tc.device)
    style = template_style(given.get("template", "alpaca"), lm.chat_template)
    recipe = InstructRecipe(train, val, test, style, mode=mode, last_blocks=blocks, lora=lora,
                            mask_prompt=given.get("mask_prompt", True), max_length=given.get("max_length"),
                            group_by_length=bool(given.get("group_by_length")), max_new_tokens=max_new,
                            base_model=base_ref, data_info={"cli": cli})
    if mode == "lora":
        from scratchlm.finetune.lora import resolve_targets

        resolve_targets(lm.model, lora)
    print(f"instruction-tuning {lm.config.name} with the {style.name} template: {len(train)} train / "
          f"{len(val)} validation / {len(test)} test examples ({train[0].form} data), --train {mode}, "
          f"run dir {run_dir}", file=sys.stderr)
    splits = encode_splits(recipe, lm.tokenizer, lm.config.context_length)
    if not resume and given.get("overwrite"):
        common.clear(run_dir)
    result = common.interruptible(lambda: finetune_instruct(lm.model, lm.tokenizer, recipe, tc, splits=splits,
                                                            run_dir=run_dir, resume=resume),
                                  "instruct", run_dir)
    if result is None:
        return 130
    figures = result.figures
    print(f"\ndone: {figures['steps']} steps in {figures['wall_time_s']:.0f} s")
    for split in ("val", "test"):
        if f"{split}_loss" in figures:
            print(f"{split:<6} loss {figures[f'{split}_loss']:.4f}")
    for label, name in (("run dir", ""), ("results", "results.json"), ("loss plot", "loss.png"),
                        ("responses", "test_responses.jsonl")):
        if (run_dir / name).exists():
            print(f"{label + ':':<12}{run_dir / name}")
    print(f"chat:       scratchlm chat --model {run_dir}")
    return 0


def _train_mode(words: list[str]) -> tuple[str, int]:
    """``--train all|lora|last-blocks N`` as (mode, blocks)."""
    from scratchlm.finetune.trainable import TRAIN_MODES

    mode, rest = words[0], words[1:]
    if mode not in TRAIN_MODES:
        raise ConfigError(f"unknown --train {mode!r}", f"use one of {', '.join(TRAIN_MODES)}")
    if mode != "last-blocks":
        if rest:
            raise ConfigError(f"--train {mode} takes no number", f"pass --train {mode}")
        return mode, 0
    if len(rest) != 1 or not rest[0].isdigit() or int(rest[0]) < 1:
        raise ConfigError("--train last-blocks needs how many blocks", "e.g. --train last-blocks 2")
    return mode, int(rest[0])


def _report(figures: dict[str, Any], run_dir: Path) -> None:
    print(f"\ndone: {figures['steps']} steps in {figures['wall_time_s']:.0f} s")
    for split in ("train", "val", "test"):
        if f"{split}_accuracy" in figures:
            print(f"{split:<6} accuracy {figures[f'{split}_accuracy'] * 100:6.2f} %   "
                  f"loss {figures[f'{split}_loss']:.4f}")
    truncated = sum(figures["truncated"].values())
    if truncated:
        print(f"note: {truncated} texts were longer than {figures['max_length']} tokens and kept their end")
    for label, path in (("run dir", run_dir), ("results", run_dir / "results.json"),
                        ("loss plot", run_dir / "loss.png")):
        print(f"{label + ':':<12}{path}")
    print(f"classify:   scratchlm classify --model {run_dir} --text \"...\"")
