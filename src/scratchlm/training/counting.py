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

import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from scratchlm.training.trainer import TrainResult


def count_run(
    config: Any,
    tokenizer: Any,
    train_ids: Sequence[int],
    val_ids: Sequence[int],
    *,
    val_chars: int,
    run_dir: str | Path | None = None,
    data_info: Mapping[str, Any] | None = None,
    seed: int = 1337,
    sample_prompt: str = "\n",
    sample_tokens: int = 150,
    sample_temperature: float = 0.8,
) -> tuple[Any, TrainResult]:
    """Fit ``NGramLM`` on ``train_ids``, score ``val_ids``, and (with ``run_dir``) write the run dir.

    Returns the model and a ``TrainResult`` (step 1: the one counting pass) whose ``last_eval`` is
    the record written to ``metrics.jsonl``.
    """
    from scratchlm.checkpoint.io import save_run
    from scratchlm.models.ngram_module import NGramLM
    from scratchlm.training.logging import METRICS_FILE, SAMPLES_FILE, MetricsLog, append_sample

    start = time.perf_counter()
    model = NGramLM.fit(config, train_ids)
    fit_s = time.perf_counter() - start
    n_train = len(train_ids)
    train_loss = float(model.token_nats(train_ids).mean())
    val_loss = nats_per_char = None
    if len(val_ids):
        total = float(model.token_nats(val_ids).sum())
        val_loss = total / len(val_ids)
        nats_per_char = total / val_chars if val_chars else None
    elapsed = time.perf_counter() - start
    train_record = {
        "kind": "train",
        "step": 1,
        "tokens": n_train,
        "elapsed": round(fit_s, 3),
        "loss": train_loss,
        "lr": None,
        "grad_norm": None,
        "tokens_per_s": round(n_train / max(fit_s, 1e-9), 1),
    }
    eval_record = {
        "kind": "eval",
        "step": 1,
        "tokens": n_train,
        "epochs": 1.0,
        "elapsed": round(elapsed, 3),
        "train_loss": train_loss,
        "val_loss": val_loss,
        "val_perplexity": math.exp(val_loss) if val_loss is not None and val_loss < 700 else None,
        "val_nats_per_char": nats_per_char,
        "lr": None,
        "final": True,
    }
    sample = None
    if sample_tokens and tokenizer is not None:
        from scratchlm.generation import SamplingParams, generate

        params = SamplingParams(max_new_tokens=sample_tokens, temperature=sample_temperature, seed=seed + 1)
        sample = generate(model, tokenizer, sample_prompt, params)
    if run_dir is not None:
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        training = {
            "method": "count",
            "seed": seed,
            "sample_prompt": sample_prompt,
            "sample_tokens": sample_tokens,
            "sample_temperature": sample_temperature,
            "fit_seconds": round(fit_s, 3),
        }
        save_run(run_dir, model, config, tokenizer, training=training, data=data_info)
        metrics = MetricsLog(run_dir / METRICS_FILE)
        metrics.write(train_record)
        metrics.write(eval_record)
        if sample is not None:
            note = f"val {nats_per_char:.3f} nats/char" if nats_per_char is not None else ""
            append_sample(run_dir / SAMPLES_FILE, 1, sample_prompt, sample, note)
    return model, TrainResult(1, n_train, elapsed, eval_record, sample, run_dir)
