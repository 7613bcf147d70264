"""Pretrain a language model on a text file.  With no options this is the 5-minute demo:
a character-level model on builtin:tinyshakespeare (first 90% train, last 10% validation), on the
CPU, for 300 seconds, then a sample and the paths of the run dir, loss plot and checkpoint.

Tokenizers (--tokenizer): 'char' (one id per character of the text, as nanoGPT's shakespeare_char),
'bpe:N' (train a byte-level BPE of N tokens on the training split), or a path that
scratchlm.tokenizers.load opens (a directory with GPT-2's encoder.json + vocab.bpe, a tokenizer.json,
a saved scratchlm tokenizer, a .gguf file).  Validation loss is also reported in nats per character,
so runs with different tokenizers compare.

Data-parallel: torchrun --nproc_per_node=N -m scratchlm pretrain ... (--batch-size is per process).
Ctrl-C saves a checkpoint; --resume RUN_DIR continues it exactly.

Count-based presets (ngram-kn5, ngram-laplace3) fit an n-gram model on the same split in one
counting pass and report the same validation nats/char; they take --data, --tokenizer, --seed,
--prompt, --sample-tokens and --out, ignore --device and --threads, and reject the other options.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from scratchlm.cli.corpus import CorpusOptions, encode_corpus, new_run_dir, report
from scratchlm.cli.training_options import add_training_options, given_options, train_config
from scratchlm.data.splits import EncodedSplits
from scratchlm.errors import ConfigError, DataError
from scratchlm.models.config import ModelConfig
from scratchlm.runtime import set_threads
from scratchlm.training.config import TrainConfig

# The demo: tuned so that 'scratchlm pretrain' on 2 CPU cores beats nanoGPT's documented CPU run
# (benchmarks/demo_vs_nanogpt.py; the measurements are in docs/benchmarks.md).
DEMO = TrainConfig(batch_size=6, lr=3e-3, warmup_steps=100, weight_decay=0.1, beta2=0.99, grad_clip=1.0,
                   max_time=300.0, eval_every=250, eval_batches=16, log_every=10, save_every=0, seed=1337,
                   precision="auto", device="cpu")


@dataclass
class ModelOptions:
    """The model options of pretrain; None: the preset's value."""

    context_length: int | None = None
    # Every position starts a training window: nanoGPT's random offsets, drawn without replacement.
    stride: int = 1
    dropout: float = 0.0
    qkv_bias: bool | None = None
    tie_embeddings: bool | None = None
    init: str | None = None  # None: the preset's (GPT-2's N(0, 0.02))


def _pick(cls: type, given: dict[str, Any]) -> Any:
    return cls(**{f.name: given[f.name] for f in fields(cls) if f.name in given})


def configure(parser: argparse.ArgumentParser) -> None:
    c, m = CorpusOptions(), ModelOptions()
    s = argparse.SUPPRESS  # absent unless given, so that --resume can tell what the user changed
    g = parser.add_argument_group("model and data")
    g.add_argument("--preset", default=s, metavar="NAME",
                   help=f"model preset; 'scratchlm presets' lists them (default: {c.preset})")
    g.add_argument("--data", default=s, metavar="PATH",
                   help=f"training text: a UTF-8 file or builtin:NAME (default: {c.data})")
    g.add_argument("--tokenizer", default=s, metavar="SPEC",
                   help=f"'char', 'bpe:N' (train N tokens), or a tokenizer path (default: {c.tokenizer!r})")
    g.add_argument("--context-length", type=int, default=s, metavar="N",
                   help="tokens per training window, at most the preset's positions (default: the preset's)")
    g.add_argument("--stride", type=int, default=s, metavar="N",
                   help="tokens between the starts of consecutive training windows (the context length: "
                        "disjoint windows, as Raschka ch. 5; validation windows are always disjoint) "
                        f"(default: {m.stride})")
    g.add_argument("--dropout", type=float, default=s, metavar="P",
                   help=f"dropout probability (default: {m.dropout:g})")
    g.add_argument("--qkv-bias", action=argparse.BooleanOptionalAction, default=s,
                   help="biases on the query/key/value projections (default: the preset's)")
    g.add_argument("--tie-embeddings", action=argparse.BooleanOptionalAction, default=s,
                   help="share the token embedding and output matrices (default: the preset's)")
    g.add_argument("--init", choices=["gpt2", "pytorch"], default=s,
                   help="initial weights: 'gpt2' (N(0, 0.02), residual projections scaled down) or "
                        "'pytorch' (each layer's default, embeddings N(0, 1): Raschka's GPTModel) "
                        "(default: gpt2)")
    add_training_options(parser, DEMO, items="windows",
                         sources={"max_time": "the 5-minute demo; none when another budget is given"})
    g = parser.add_argument_group("samples and output")
    g.add_argument("--prompt", default=s, metavar="TEXT",
                   help=f"prompt of the text sample after each evaluation (default: {c.prompt!r})")
    g.add_argument("--sample-tokens", type=int, default=s, metavar="N",
                   help=f"tokens per sample; 0 = none (default: {c.sample_tokens})")
    g.add_argument("--out", default=s, metavar="DIR",
                   help="run dir to create (default: runs/PRESET-TIMESTAMP)")
    parser.set_defaults(func=run)


# ---------------------------------------------------------------------------------------------
# Resuming: the run's own settings, with the options given on top
# ---------------------------------------------------------------------------------------------


def _saved_options(payload: dict[str, Any]) -> tuple[CorpusOptions, ModelOptions]:
    """The corpus and model options a run was started with, read back from its config.json."""
    data, model = payload.get("data") or {}, payload["model"]
    # The sample settings: config.json's "evaluation" (runs before it kept them under "training").
    sample = payload.get("evaluation") or payload.get("training") or {}
    defaults = CorpusOptions()
    corpus = CorpusOptions(preset=data.get("preset", model.get("name")), data=data.get("data", defaults.data),
                           tokenizer=data.get("tokenizer", defaults.tokenizer),
                           prompt=sample.get("sample_prompt", defaults.prompt),
                           sample_tokens=sample.get("sample_tokens", defaults.sample_tokens))
    options = ModelOptions(context_length=model.get("context_length"), stride=data.get("stride", 1),
                           dropout=model.get("dropout", 0.0), qkv_bias=model.get("qkv_bias"),
                           tie_embeddings=model.get("tie_embeddings"), init=model.get("init") or "gpt2")
    return corpus, options


def _check_unchanged(given: dict[str, Any], run_dir: Path, saved: dict[str, Any]) -> None:
    """The corpus and model options may not change on resume (they define the run)."""
    for key in ("preset", "data", "tokenizer", *(f.name for f in fields(ModelOptions))):
        if key in given and saved.get(key) is not None and given[key] != saved[key]:
            flag = "--" + key.replace("_", "-")
            raise ConfigError(f"cannot resume {run_dir}: {flag} {given[key]} differs from the run's "
                              f"{saved[key]}", f"drop {flag} to continue the run as it was, "
                              "or start a new run with another --out")


# ---------------------------------------------------------------------------------------------
# Building the pieces: every check happens here, before anything is written
# ---------------------------------------------------------------------------------------------


def _model_config(corpus: CorpusOptions, options: ModelOptions, vocab_size: int) -> ModelConfig:
    """The preset sized to the tokenizer's vocabulary and the training context."""
    from scratchlm.models import from_preset

    base = from_preset(corpus.preset)
    ctx = options.context_length or base.context_length
    if ctx < 1:
        raise ConfigError(f"--context-length must be positive, got {ctx}", "e.g. --context-length 256")
    if ctx > base.context_length:
        raise ConfigError(f"context length {ctx} is longer than the {base.context_length} positions of "
                          f"preset {corpus.preset}", f"pass --context-length {base.context_length} or less")
    flags = {k: getattr(options, k) for k in ("qkv_bias", "tie_embeddings", "init")
             if getattr(options, k) is not None}
    return base.replace(vocab_size=vocab_size, context_length=ctx, dropout=options.dropout, **flags)


def _check_ids(config: ModelConfig, splits: EncodedSplits, data: str) -> None:
    top = max(max(splits.train_ids, default=0), max(splits.val_ids, default=0))
    if top >= config.vocab_size:
        raise ConfigError(f"the tokenizer produces id {top}, outside the model's vocabulary of "
                          f"{config.vocab_size}", "use the tokenizer the run was trained with, or a model "
                          "sized to this tokenizer")
    ctx = config.context_length
    for name, ids, part in (("training", splits.train_ids, "first 90%"),
                            ("validation", splits.val_ids, "last 10%")):
        if len(ids) < ctx + 1:
            raise DataError(f"the {name} split ({part} of {data}) has {len(ids)} tokens, fewer than one "
                            f"context window of {ctx} + 1", "use a longer text or a smaller --context-length")


def run(args: argparse.Namespace) -> int:
    given = given_options(args)
    from scratchlm.cli import pretrain_ngram

    if pretrain_ngram.wanted(given):  # a count-based preset: one counting pass, no training loop
        return pretrain_ngram.run(given)
    payload = None
    if "resume" in given:
        from scratchlm.checkpoint.io import read_run_config, run_model_config

        run_dir = Path(given["resume"])
        if "out" in given and Path(given["out"]).resolve() != run_dir.resolve():
            raise ConfigError("--out and --resume name different run dirs", "pass only --resume RUN_DIR")
        payload = read_run_config(run_dir)
        saved_corpus, saved_model = _saved_options(payload)
        _check_unchanged(given, run_dir, {**vars(saved_corpus), **vars(saved_model)})
        tc = train_config(given, DEMO, saved=payload.get("training") or {})
        corpus = replace(saved_corpus, **{k: given[k] for k in ("prompt", "sample_tokens") if k in given})
        options = saved_model
    else:
        tc = train_config(given, DEMO)  # validates the numbers before any slow work
        corpus, options = _pick(CorpusOptions, given), _pick(ModelOptions, given)
        run_dir = new_run_dir(given.get("out"), corpus.preset)
    if options.stride < 1:
        raise ConfigError(f"--stride must be positive, got {options.stride}",
                          "pass 1 for every offset, or the context length for disjoint windows")
    set_threads(given.get("threads", 0))

    import torch

    from scratchlm.data.windows import SlidingWindowDataset
    from scratchlm.models import build_model
    from scratchlm.training import distributed
    from scratchlm.training.evaluators import LanguageModelEvaluator
    from scratchlm.training.trainer import Trainer

    tokenizer, splits = encode_corpus(corpus, run_dir / "tokenizer" if payload is not None else None)
    if payload is not None:
        config = run_model_config(payload)
    else:
        config = _model_config(corpus, options, tokenizer.vocab_size)
    _check_ids(config, splits, corpus.data)
    if corpus.prompt:
        tokenizer.encode(corpus.prompt)  # a prompt the tokenizer cannot encode fails now, not mid-run
    ctx = config.context_length
    train = SlidingWindowDataset(splits.train_ids, ctx, options.stride)
    val = SlidingWindowDataset(splits.val_ids, ctx, ctx)  # disjoint windows spread over the whole split
    evaluator = LanguageModelEvaluator(tokenizer=tokenizer, tokens_per_char=splits.val_tokens_per_char,
                                       prompt=corpus.prompt, sample_tokens=corpus.sample_tokens, seed=tc.seed)

    dist = distributed.from_env(tc.device)
    torch.manual_seed(tc.seed)
    model = build_model(config)
    trainer = Trainer(model, tc, train, val_data=val, evaluator=evaluator, run_dir=run_dir,
                      model_config=config, tokenizer=tokenizer, dist=dist,
                      run_info={"data": {**corpus.info(splits), "stride": options.stride},
                                "evaluation": evaluator.settings()})
    if payload is not None:
        info = trainer.check_resumable().info
        epochs = info["epoch"] + info["position"] / len(train)
        if tc.budget().progress(info["step"], epochs, info["tokens"], info["elapsed"]) >= 1.0:
            raise ConfigError(f"{run_dir} already reached its budget (step {info['step']})",
                              "pass a larger --max-steps or --max-time to train it further")
    distributed.barrier(dist)  # every rank has checked everything before rank 0 writes
    if dist.is_main:
        _announce(corpus, config, model, trainer, run_dir, splits, tokenizer.vocab_size, payload is not None)
    try:
        result = trainer.fit(resume=payload is not None)
    except KeyboardInterrupt:
        if dist.is_main:
            print(f"interrupted at step {trainer.step}: checkpoint in {run_dir}; "
                  f"continue with: scratchlm pretrain --resume {run_dir}", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown(dist)
    if dist.is_main:
        report(f"{result.step:,} steps, {result.tokens:,} tokens in {result.elapsed:.0f} s", result, corpus,
               run_dir, {"loss plot": run_dir / "loss.png", "checkpoint": run_dir / "model.safetensors"})
    return 0


def _announce(corpus: CorpusOptions, config: ModelConfig, model: Any, trainer: Any, run_dir: Path,
              splits: EncodedSplits, vocab: int, resuming: bool) -> None:
    tc = trainer.config
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{'resuming' if resuming else 'training'} {config.name}: {n_params / 1e6:.2f}M parameters, "
          f"{config.n_layer} layers × {config.n_embd}, context {config.context_length}; {corpus.data}: "
          f"{len(splits.train_ids):,} train / {len(splits.val_ids):,} validation tokens, tokenizer "
          f"{corpus.tokenizer} ({vocab} ids)", file=sys.stderr)
    print(f"batch {tc.batch_size}×{tc.grad_accum}×{trainer.dist.world_size} windows, lr {tc.lr:g}, "
          f"{trainer.precision} on {trainer.device}, budget {tc.budget().describe()}, run dir {run_dir}",
          file=sys.stderr)
