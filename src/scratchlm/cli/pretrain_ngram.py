"""``scratchlm pretrain`` for the count-based presets (arch ``"ngram"``: ngram-kn5, ngram-laplace3).

The same data, split and tokenizer as every other preset (``cli.corpus``), then one
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
    from scratchlm.cli.corpus import CorpusOptions
    from scratchlm.models.config import from_preset

    if "resume" in given and "preset" not in given:
        from scratchlm.checkpoint.io import read_run_config

        return (read_run_config(Path(given["resume"])).get("model") or {}).get("arch") == "ngram"
    return from_preset(given.get("preset", CorpusOptions.preset)).arch == "ngram"


def run(given: dict[str, Any]) -> int:
    from scratchlm.cli.corpus import CorpusOptions, encode_corpus, new_run_dir, report

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
    corpus = CorpusOptions(**{k: v for k, v in given.items() if k in CorpusOptions.__dataclass_fields__})
    run_dir = new_run_dir(given.get("out"), corpus.preset, resumable=False)

    from scratchlm.models.config import from_preset
    from scratchlm.training.counting import count_run

    tokenizer, splits = encode_corpus(corpus)
    for name, ids, part in (("training", splits.train_ids, "first 90%"),
                            ("validation", splits.val_ids, "last 10%")):
        if not ids:
            raise DataError(f"the {name} split ({part} of {corpus.data}) has no tokens",
                            "use a longer text")
    if corpus.prompt:
        tokenizer.encode(corpus.prompt)  # a prompt the tokenizer cannot encode fails now
    config = from_preset(corpus.preset).replace(vocab_size=tokenizer.vocab_size)
    print(f"counting {config.name}: order-{config.ngram_order} {config.ngram_smoothing} n-gram; "
          f"{corpus.data}: {len(splits.train_ids):,} train / {len(splits.val_ids):,} validation tokens, "
          f"tokenizer {corpus.tokenizer} ({tokenizer.vocab_size} ids), run dir {run_dir}",
          file=sys.stderr)
    model, result = count_run(config, tokenizer, splits, run_dir=run_dir, data_info=corpus.info(splits),
                              seed=given.get("seed", 1337), sample_prompt=corpus.prompt,
                              sample_tokens=corpus.sample_tokens)
    report(f"{model.num_parameters():,} n-gram counts from {result.tokens:,} tokens in "
           f"{result.elapsed:.1f} s (evaluation included)", result, corpus, run_dir,
           {"counts": run_dir / "model.safetensors"})
    return 0
