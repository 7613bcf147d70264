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
    out = Path(given["out"]) if "out" in given else None
    if out is not None and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(
            f"{out} already exists", "choose another --out (an n-gram run is refitted, not resumed)"
        )
    settings, run_dir = pretrain._new_settings(given)

    from scratchlm.data.corpora import read_corpus
    from scratchlm.models.config import from_preset
    from scratchlm.training.counting import count_run

    text = read_corpus(settings["data"])
    split = int(len(text) * (1 - pretrain.VAL_FRACTION))
    train_text, val_text = text[:split], text[split:]
    tokenizer = pretrain._tokenizer(settings["tokenizer"], train_text, text)
    train_ids = tokenizer.encode(train_text, allowed_special="all")
    val_ids = tokenizer.encode(val_text, allowed_special="all") if val_text else []
    for name, ids, part in (("training", train_ids, "first 90%"), ("validation", val_ids, "last 10%")):
        if not ids:
            raise DataError(
                f"the {name} split ({part} of {settings['data']}) has no tokens", "use a longer text"
            )
    if settings["prompt"]:
        tokenizer.encode(settings["prompt"])  # a prompt the tokenizer cannot encode fails now
    config = from_preset(settings["preset"]).replace(vocab_size=tokenizer.vocab_size)
    data_info = {
        "data": settings["data"],
        "tokenizer": settings["tokenizer"],
        "preset": settings["preset"],
        "val_fraction": pretrain.VAL_FRACTION,
        "train_tokens": len(train_ids),
        "val_tokens": len(val_ids),
        "val_chars": len(val_text),
    }
    print(
        f"counting {config.name}: order-{config.ngram_order} {config.ngram_smoothing} n-gram; "
        f"{settings['data']}: {len(train_ids):,} train / {len(val_ids):,} validation tokens, "
        f"tokenizer {settings['tokenizer']} ({tokenizer.vocab_size} ids), run dir {run_dir}",
        file=sys.stderr,
    )
    model, result = count_run(
        config,
        tokenizer,
        train_ids,
        val_ids,
        val_chars=len(val_text),
        run_dir=run_dir,
        data_info=data_info,
        seed=settings["seed"],
        sample_prompt=settings["prompt"],
        sample_tokens=settings["sample_tokens"],
    )
    ev = result.last_eval or {}
    print(
        f"\ndone: {model.num_parameters():,} n-gram counts from {result.tokens:,} tokens in "
        f"{result.elapsed:.1f} s (evaluation included)"
    )
    if ev.get("val_loss") is not None:
        print(
            f"validation loss {ev['val_loss']:.4f} (perplexity {ev['val_perplexity']:.2f}, "
            f"{ev['val_nats_per_char']:.4f} nats/char)"
        )
    if result.sample:
        print(f"\n--- sample (prompt {settings['prompt']!r}) ---")
        print(settings["prompt"] + result.sample)
        print("---")
    prompt = "ROMEO:" if settings["data"] == "builtin:tinyshakespeare" else "TEXT"
    print(
        f"run dir:    {run_dir}\ncounts:     {run_dir / 'model.safetensors'}\n"
        f"samples:    {run_dir / 'samples.txt'}\nmetrics:    {run_dir / 'metrics.jsonl'}\n"
        f'continue:   scratchlm generate --model {run_dir} --prompt "{prompt}"'
    )
    return 0
