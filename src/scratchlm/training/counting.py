"""Training a count-based n-gram LM: the counterpart of ``Trainer.fit`` for arch ``"ngram"``.

Counting is one pass over the training tokens, with nothing to optimise, so there is no loop,
budget, optimizer or resume; everything else is what a neural run leaves: the run dir
(``checkpoint.io.save_run``: config.json, model.safetensors holding the count tables, tokenizer/),
``metrics.jsonl`` with one ``"train"`` and one final ``"eval"`` record carrying the neural runs'
fields, and a text sample from the sampler in ``samples.txt``.

The figures use the neural runs' definitions: ``val_loss`` is the mean −ln P per validation
token and ``val_nats_per_char`` the total over the validation tokens divided by the validation
characters.  The n-gram scores the validation split as one running text (each token given the
N−1 before it; the first ones given what there is), where a neural model scores disjoint windows
of its context length.  ``train_loss`` is the same on the training split: in-sample, so
optimistic (a 5-gram has seen every 5-gram it scores there).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from scratchlm.data.splits import EncodedSplits
from scratchlm.models.config import ModelConfig
from scratchlm.tokenizers import Tokenizer
from scratchlm.training.config import TrainResult
from scratchlm.training.evaluators import LanguageModelEvaluator, Totals, eval_record


def count_run(
    config: ModelConfig,
    tokenizer: Tokenizer | None,
    splits: EncodedSplits,
    *,
    run_dir: str | Path | None = None,
    data_info: Mapping[str, Any] | None = None,
    seed: int = 1337,
    sample_prompt: str = "\n",
    sample_tokens: int = 150,
) -> tuple[Any, TrainResult]:
    """Fit ``NGramLM`` on the training ids, score the validation ids, and (with ``run_dir``) write
    the run dir.

    Returns the model and a ``TrainResult`` (step 1: the one counting pass) whose ``last_eval`` is
    the record written to ``metrics.jsonl``.
    """
    from scratchlm.checkpoint.io import save_run
    from scratchlm.models.ngram_module import NGramLM
    from scratchlm.training.logging import METRICS_FILE, MetricsLog

    start = time.perf_counter()
    train_ids, val_ids = splits.train_ids, splits.val_ids
    model = NGramLM.fit(config, train_ids)
    fit_s = time.perf_counter() - start
    n_train = len(train_ids)
    train = Totals(float(model.token_nats(train_ids).sum()), n_train)
    val = Totals(float(model.token_nats(val_ids).sum()), len(val_ids)) if len(val_ids) else None
    evaluator = LanguageModelEvaluator(tokenizer=tokenizer, tokens_per_char=splits.val_tokens_per_char,
                                       prompt=sample_prompt, sample_tokens=sample_tokens, seed=seed)
    figures = {**evaluator.figures("train", train), **evaluator.figures("val", val)}
    train_record = {"kind": "train", "step": 1, "tokens": n_train, "elapsed": round(fit_s, 3),
                    "loss": train.loss, "lr": None, "grad_norm": None,
                    "tokens_per_s": round(n_train / max(fit_s, 1e-9), 1)}
    record = eval_record(1, n_train, 1.0, time.perf_counter() - start, None, figures, final=True)
    if run_dir is not None:
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
    sample = evaluator.sample(model, record, run_dir)
    elapsed = time.perf_counter() - start
    if run_dir is not None:
        training = {"method": "count", "seed": seed, "fit_seconds": round(fit_s, 3)}
        save_run(run_dir, model, config, tokenizer, training=training, data=data_info,
                 evaluation=evaluator.settings())
        metrics = MetricsLog(run_dir / METRICS_FILE)
        metrics.write(train_record)
        metrics.write(record)
    return model, TrainResult(1, n_train, elapsed, record, sample, run_dir)
