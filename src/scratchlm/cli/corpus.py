"""What both kinds of ``scratchlm pretrain`` share: the corpus, its split and tokenizer, the run dir
and the closing report.  The neural path (``pretrain``) and the counting path (``pretrain_ngram``)
each import this module, not each other.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scratchlm.data.splits import VAL_FRACTION, EncodedSplits, split_text
from scratchlm.errors import ConfigError
from scratchlm.tokenizers import Tokenizer
from scratchlm.training.config import TrainResult


@dataclass
class CorpusOptions:
    """The data, tokenizer and text-sample options of ``scratchlm pretrain`` (the demo's defaults)."""

    preset: str = "shakespeare-char"
    data: str = "builtin:tinyshakespeare"
    tokenizer: str = "char"
    prompt: str = "\n"
    sample_tokens: int = 150

    def info(self, splits: EncodedSplits) -> dict[str, Any]:
        """The run's ``data`` record in config.json."""
        return {"data": self.data, "tokenizer": self.tokenizer, "preset": self.preset,
                "val_fraction": VAL_FRACTION, "train_tokens": len(splits.train_ids),
                "val_tokens": len(splits.val_ids), "val_chars": splits.val_chars}


def make_tokenizer(spec: str, train_text: str, text: str) -> Tokenizer:
    """The tokenizer ``--tokenizer`` names: char, bpe:N trained on the training split, or a path."""
    from scratchlm.tokenizers import CharTokenizer
    from scratchlm.tokenizers import load as load_tokenizer

    if spec == "char":
        # The characters of the whole text (as nanoGPT does), so that the validation split encodes.
        return CharTokenizer.from_text(text)
    if spec.startswith("bpe:"):
        size = spec[4:]
        if not size.isdigit():
            raise ConfigError(f"--tokenizer {spec}: expected bpe:N with N a number of tokens",
                              "e.g. --tokenizer bpe:1024")
        from scratchlm.tokenizers.train_bpe import train_bpe

        return train_bpe(train_text, int(size), progress=False)
    return load_tokenizer(spec)


def encode_corpus(options: CorpusOptions,
                  tokenizer_dir: Path | None = None) -> tuple[Tokenizer, EncodedSplits]:
    """Read ``--data``, split it and encode both parts with ``--tokenizer`` (or a run's saved one)."""
    from scratchlm.data.corpora import read_corpus
    from scratchlm.tokenizers import load as load_tokenizer

    text = read_corpus(options.data)
    train_text, val_text = split_text(text)
    if tokenizer_dir is not None:
        tokenizer = load_tokenizer(tokenizer_dir)
    else:
        tokenizer = make_tokenizer(options.tokenizer, train_text, text)
    train_ids = tokenizer.encode(train_text, allowed_special="all")
    val_ids = tokenizer.encode(val_text, allowed_special="all") if val_text else []
    return tokenizer, EncodedSplits(train_ids, val_ids, len(val_text))


def new_run_dir(out: str | None, preset: str, resumable: bool = True) -> Path:
    """The run dir of a new run (``runs/PRESET-TIMESTAMP`` by default); it must be new or empty."""
    path = Path(out) if out is not None else Path("runs") / f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConfigError(f"{path} already exists",
                          f"continue that run with --resume {path}, or choose another --out" if resumable
                          else "choose another --out (an n-gram run is refitted in seconds, not resumed)")
    return path


def report(done: str, result: TrainResult, options: CorpusOptions, run_dir: Path,
           files: dict[str, Path]) -> None:
    """What a finished run prints: the figures, the last sample, where its files are, what next."""
    ev = result.last_eval or {}
    print(f"\ndone: {done}")
    if ev.get("val_loss") is not None:
        print(f"validation loss {ev['val_loss']:.4f} (perplexity {ev['val_perplexity']:.2f}"
              + (f", {nats:.4f} nats/char)" if (nats := ev.get("val_nats_per_char")) is not None else ")"))
    if result.sample:
        print(f"\n--- sample (prompt {options.prompt!r}) ---")
        print(options.prompt + result.sample)
        print("---")
    prompt = "ROMEO:" if options.data == "builtin:tinyshakespeare" else "TEXT"
    for label, path in {"run dir": run_dir, **files, "samples": run_dir / "samples.txt",
                        "metrics": run_dir / "metrics.jsonl"}.items():
        print(f"{label + ':':<12}{path}")
    print(f"continue:   scratchlm generate --model {run_dir} --prompt \"{prompt}\"")
