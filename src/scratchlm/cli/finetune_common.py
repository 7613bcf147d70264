"""What the finetuning methods' commands share: the model and data options, the run dir, resuming,
loading the model, and a Ctrl-C that leaves a checkpoint (classify, instruct, dpo)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from scratchlm.cli.training_options import given_options, train_config
from scratchlm.errors import ConfigError
from scratchlm.training.config import TrainConfig

T = TypeVar("T")


def model_and_data(p: argparse.ArgumentParser, *, data: str, split: str, separate: str
                    ) -> argparse._ArgumentGroup:
    """The options every finetuning method shares: the model, the data and its split."""
    s = argparse.SUPPRESS
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=s, metavar="REF",
                   help="the pretrained model: run dir, Hugging Face directory or hub id, or .gguf file")
    g.add_argument("--data", default=s, metavar="FILE", help=data)
    g.add_argument("--val-data", default=s, metavar="FILE", help=f"a separate validation file ({separate})")
    g.add_argument("--test-data", default=s, metavar="FILE", help="a separate test file")
    g.add_argument("--split", default=s, metavar="TRAIN,VAL,TEST", help=split)
    return g


def output_options(p: argparse.ArgumentParser, method: str) -> None:
    s = argparse.SUPPRESS
    g = p.add_argument_group("output")
    g.add_argument("--out", default=s, metavar="DIR",
                   help=f"run dir to create (default: runs/{method}-TIMESTAMP)")
    g.add_argument("--overwrite", action="store_true", default=s,
                   help="replace the run dir --out if it already holds a run")


def fractions(text: str) -> list[float]:
    try:
        fractions = [float(x) for x in text.split(",")]
    except ValueError:
        fractions = []
    if len(fractions) != 3:
        raise ConfigError(f"--split {text}: expected three fractions (train, validation, test) that add "
                          "up to 1",
                          "e.g. --split 0.7,0.1,0.2")
    return fractions


def start(args: argparse.Namespace, method: str, defaults: TrainConfig, data_form: str
           ) -> tuple[dict[str, Any], Path, bool, TrainConfig]:
    """The options given (over a resumed run's saved ones), the run dir, whether it resumes, and the
    training config; a missing model or data is an error before anything loads."""
    given = given_options(args)
    if "model" not in given and "resume" not in given:
        raise ConfigError("no model to finetune", "pass --model REF (a run dir, HF model or .gguf file)")
    if "data" not in given and "resume" not in given:
        raise ConfigError("no training data", f"pass --data FILE ({data_form})")
    resume = "resume" in given
    run_dir, saved = run_dir_of(given, method)
    if resume:
        given = {**saved["cli"], **{k: v for k, v in given.items() if k != "resume"}}
    tc = train_config(given, defaults, saved=saved.get("training") if resume else None)
    return given, run_dir, resume, tc


def load_model(given: dict[str, Any], device: str) -> tuple[Any, str, dict[str, Any]]:
    """The model to finetune, the reference its run names as base, and the options the run saves."""
    from scratchlm.api import load

    lm = load(given["model"], device=device)
    if lm.tokenizer is None:
        raise ConfigError(f"{given['model']} has no tokenizer", "pass a model directory with tokenizer files")
    base_ref = str(Path(given["model"]).resolve()) if Path(given["model"]).exists() else given["model"]
    cli = {k: v for k, v in given.items() if k not in ("resume", "out", "overwrite", "threads", "func")}
    return lm, base_ref, cli


def interruptible(train: Any, method: str, run_dir: Path) -> Any:
    """``train()``, or None after a Ctrl-C, which leaves a checkpoint to resume from."""
    try:
        return train()
    except KeyboardInterrupt:
        print(f"interrupted: checkpoint in {run_dir}; continue with: scratchlm finetune {method} "
              f"--resume {run_dir}", file=sys.stderr)
        return None


def run_dir_of(given: dict[str, Any], method: str) -> tuple[Path, dict[str, Any]]:
    """The run dir, and (resuming) the run's saved settings; a new --out must not hold another run."""
    import time

    from scratchlm.checkpoint.io import read_run_config

    if "resume" in given:
        run_dir = Path(given["resume"])
        payload = read_run_config(run_dir)
        cli = (payload.get("data") or {}).get("cli")
        if not isinstance(cli, dict):
            raise ConfigError(f"{run_dir} was not written by 'scratchlm finetune {method}'",
                              "resume it with the command that wrote it")
        return run_dir, {"cli": cli, "training": payload.get("training") or {}}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(given["out"]) if "out" in given else Path("runs") / f"{method}-{stamp}"
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())) and not given.get("overwrite"):
        raise ConfigError(f"{run_dir} already exists", f"continue it with --resume {run_dir}, replace it "
                          "with --overwrite, or choose another --out")
    return run_dir, {}


def clear(run_dir: Path) -> None:
    """--overwrite: the old run goes only once every input has been checked."""
    import shutil

    if run_dir.is_dir():
        shutil.rmtree(run_dir)
    elif run_dir.exists():
        run_dir.unlink()


def book_splits(given: dict[str, Any], read: Callable[[str], list[T]]) -> tuple[list[T], list[T], list[T]]:
    """``(train, val, test)`` of ``--data`` in Raschka ch. 7's file order (``--split``), or, with
    ``--val-data`` / ``--test-data``, all of ``--data`` for training and those files as given."""
    from scratchlm.data.instruction import book_split

    items = read(given["data"])
    if "val_data" not in given and "test_data" not in given:
        return book_split(items, fractions(given.get("split", "0.85,0.05,0.1")))
    return (items, read(given["val_data"]) if "val_data" in given else [],
            read(given["test_data"]) if "test_data" in given else [])


def add_responses_option(group: argparse._ArgumentGroup, note: str) -> None:
    """--max-new-tokens: the test split's greedy answers, written to RUN/test_responses.jsonl."""
    group.add_argument("--max-new-tokens", type=int, default=argparse.SUPPRESS, metavar="N",
                       help="tokens per greedy test response, written to RUN/test_responses.jsonl "
                            f"{note}; 0: none (default: 256; Raschka ch. 7)")
