"""Finetune a pretrained model: 'classify' (a classification head, Raschka ch. 6 / appendix E, or
classification as text, Burkov §5.3.2).

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

from scratchlm.cli import finetune_dpo
from scratchlm.cli.options import add_lora_options, lora_config_from_args
from scratchlm.cli.training_options import add_training_options, given_options, train_config
from scratchlm.errors import ConfigError
from scratchlm.training.config import TrainConfig

# Raschka ch. 6: AdamW lr 5e-5, weight decay 0.1, batch 8, 5 epochs, a constant rate (no warmup,
# no decay), no clipping, torch's AdamW betas, accuracy after every epoch on 5 batches of each
# split (his eval_iter) and on every example at the end; the split 0.7/0.1/0.2 shuffled with seed 123.
CLASSIFY = TrainConfig(batch_size=8, lr=5e-5, lr_schedule="constant", warmup_steps=0, weight_decay=0.1,
                       beta2=0.999, grad_clip=None, max_epochs=5, eval_every="epoch", eval_batches=5,
                       log_every=10, seed=123, precision="fp32", device="cpu")
SOURCES = {name: "Raschka ch. 6" for name in ("batch_size", "lr", "lr_schedule", "weight_decay", "max_epochs",
                                              "seed", "eval_batches")}


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(title="methods", metavar="METHOD")
    p = sub.add_parser("classify", help="train a text classifier on a pretrained model",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s = argparse.SUPPRESS
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=s, metavar="REF",
                   help="the pretrained model: run dir, Hugging Face directory or hub id, or .gguf file")
    g.add_argument("--data", default=s, metavar="FILE",
                   help="labelled texts: TSV/CSV 'label<TAB>text' (header optional) or JSONL "
                        '{"text", "label"}; labels may be any strings')
    g.add_argument("--val-data", default=s, metavar="FILE", help="a separate validation file (then --data "
                   "is all training data unless --test-data is missing, which --split then cuts)")
    g.add_argument("--test-data", default=s, metavar="FILE", help="a separate test file")
    g.add_argument("--split", default=s, metavar="TRAIN,VAL,TEST",
                   help="fractions of --data, shuffled with --seed (default: 0.7,0.1,0.2; Raschka ch. 6)")
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
    add_lora_options(g, rank=16, alpha=16.0)
    add_training_options(p, CLASSIFY, items="examples", sources=SOURCES)
    g = p.add_argument_group("output")
    g.add_argument("--out", default=s, metavar="DIR",
                   help="run dir to create (default: runs/classify-TIMESTAMP)")
    g.add_argument("--overwrite", action="store_true", default=s,
                   help="replace the run dir --out if it already holds a run")
    p.set_defaults(func=run_classify)
    finetune_dpo.add_parser(sub)


def _fractions(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise ConfigError(f"--split {text}: expected three fractions", "e.g. --split 0.7,0.1,0.2") from None


def run_classify(args: argparse.Namespace) -> int:
    from scratchlm.finetune.data import balance, label_set, read_labelled, split

    given = given_options(args)
    if "model" not in given and "resume" not in given:
        raise ConfigError("no model to finetune", "pass --model REF (a run dir, HF model or .gguf file)")
    if "data" not in given and "resume" not in given:
        raise ConfigError("no training data", "pass --data FILE (label<TAB>text lines, or JSONL)")
    resume = "resume" in given
    run_dir, saved = _run_dir(given)
    if resume:
        given = {**saved["cli"], **{k: v for k, v in given.items() if k != "resume"}}
    tc = train_config(given, CLASSIFY, saved=saved.get("training") if resume else None)
    seed = tc.seed
    lora = lora_config_from_args(argparse.Namespace(**given))  # a bad rank or alpha fails before loading
    examples = read_labelled(given["data"])
    if "val_data" in given or "test_data" in given:
        train = balance(examples, seed) if given.get("balance", True) else examples
        val = read_labelled(given["val_data"]) if "val_data" in given else []
        test = read_labelled(given["test_data"]) if "test_data" in given else []
    else:
        pool = balance(examples, seed) if given.get("balance", True) else examples
        train, val, test = split(pool, _fractions(given.get("split", "0.7,0.1,0.2")), seed)
    labels = label_set(train, val, test)

    from scratchlm.api import load
    from scratchlm.finetune.classify import ClassifyRecipe, finetune_classifier
    from scratchlm.finetune.heads import DEFAULT_TEMPLATE
    from scratchlm.runtime import set_threads

    set_threads(given.get("threads", 0))
    lm = load(given["model"], device=tc.device)
    if lm.tokenizer is None:
        raise ConfigError(f"{given['model']} has no tokenizer", "pass a model directory with tokenizer files")
    base_ref = str(Path(given["model"]).resolve()) if Path(given["model"]).exists() else given["model"]
    cli = {k: v for k, v in given.items() if k not in ("resume", "out", "overwrite", "threads", "func")}
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
        _clear(run_dir)
    try:
        result = finetune_classifier(lm.model, lm.tokenizer, recipe, tc, run_dir=run_dir, resume=resume)
    except KeyboardInterrupt:
        print(f"interrupted: checkpoint in {run_dir}; continue with: scratchlm finetune classify "
              f"--resume {run_dir}", file=sys.stderr)
        return 130
    _report(result.figures, run_dir)
    return 0


def _run_dir(given: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """The run dir, and (resuming) the run's saved settings; a new --out must not hold another run."""
    import time

    from scratchlm.checkpoint.io import read_run_config

    if "resume" in given:
        run_dir = Path(given["resume"])
        payload = read_run_config(run_dir)
        cli = (payload.get("data") or {}).get("cli")
        if not isinstance(cli, dict):
            raise ConfigError(f"{run_dir} was not written by 'scratchlm finetune classify'",
                              "resume it with the command that wrote it")
        return run_dir, {"cli": cli, "training": payload.get("training") or {}}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(given["out"]) if "out" in given else Path("runs") / f"classify-{stamp}"
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())) and not given.get("overwrite"):
        raise ConfigError(f"{run_dir} already exists", f"continue it with --resume {run_dir}, replace it "
                          "with --overwrite, or choose another --out")
    return run_dir, {}


def _clear(run_dir: Path) -> None:
    """--overwrite: the old run goes only once every input has been checked."""
    import shutil

    if run_dir.is_dir():
        shutil.rmtree(run_dir)
    elif run_dir.exists():
        run_dir.unlink()


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
