"""``scratchlm pretrain`` for the count-based presets (arch ``"ngram"``: ngram-kn5, ngram-laplace3).

The same data, split and tokenizer as every other preset (``pretrain``'s own code), then one
counting pass (``training.counting.count_run``) instead of the training loop.  Counting has no
budget, learning rate, batches or checkpoints to resume, so those options are an error rather than
silently meaningless; ``--device`` and ``--threads`` are accepted and ignored (counting is numpy
on one CPU core).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from scratchlm.errors import ConfigError, DataError

# The options that mean something to a count-based model; "device" and "threads" are ignored.
ACCEPTED = ("preset", "data", "tokenizer", "seed", "prompt", "sample_tokens", "out", "device", "threads")


def wanted(given: dict[str, Any]) -> bool:
    """Whether these pretrain options ask for a count-based model (or to resume one)."""
    from scratchlm.cli.pretrain import DEFAULTS
    from scratchlm.models.config import from_preset

    if "resume" in given and "preset" not in given:
        from scratchlm.checkpoint.io import read_run_config

        return (read_run_config(Path(given["resume"])).get("model") or {}).get("arch") == "ngram"
    return from_preset(given.get("preset", DEFAULTS["preset"])).arch == "ngram"


def run(given: dict[str, Any]) -> int:
    from scratchlm.cli import pretrain

    preset = given.get("preset")
    if "resume" in given:
        raise ConfigError(
            "an n-gram run has nothing to resume: counting is one pass, with no budget",
            "start a new run (it takes seconds)",
        )
    odd = [key for key in given if key not in ACCEPTED]
    if odd:
        flag = "--" + odd[0].replace("_", "-")
        raise ConfigError(
            f"{flag} means nothing to the count-based preset {preset}",
            "drop it: n-gram presets take --data, --tokenizer, --seed, --prompt, --sample-tokens and --out",
        )
    settings, run_dir = pretrain.new_settings(given, resumable=False)

    from scratchlm.models.config import from_preset
    from scratchlm.training.counting import count_run

    splits = pretrain.encode_splits(settings)
    for name, ids, part in (("training", splits.train_ids, "first 90%"),
                            ("validation", splits.val_ids, "last 10%")):
        if not ids:
            raise DataError(f"the {name} split ({part} of {settings['data']}) has no tokens",
                            "use a longer text")
    tokenizer = splits.tokenizer
    if settings["prompt"]:
        tokenizer.encode(settings["prompt"])  # a prompt the tokenizer cannot encode fails now
    config = from_preset(settings["preset"]).replace(vocab_size=tokenizer.vocab_size)
    print(f"counting {config.name}: order-{config.ngram_order} {config.ngram_smoothing} n-gram; "
          f"{settings['data']}: {len(splits.train_ids):,} train / {len(splits.val_ids):,} validation tokens, "
          f"tokenizer {settings['tokenizer']} ({tokenizer.vocab_size} ids), run dir {run_dir}",
          file=sys.stderr)
    model, result = count_run(config, tokenizer, splits.train_ids, splits.val_ids, val_chars=splits.val_chars,
                              run_dir=run_dir, data_info=splits.info(settings), seed=settings["seed"],
                              sample_prompt=settings["prompt"], sample_tokens=settings["sample_tokens"])
    pretrain.report(f"{model.num_parameters():,} n-gram counts from {result.tokens:,} tokens in "
                    f"{result.elapsed:.1f} s (evaluation included)", result, settings, run_dir,
                    {"counts": run_dir / "model.safetensors"})
    return 0
