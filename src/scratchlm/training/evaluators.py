"""What an evaluation reports, per objective: the loop measures, an evaluator names the figures.

The loop runs the objective's loss over each split and adds up ``LossOutput``s across batches
and processes into ``Totals`` (loss sum, item count, metric sums).  An ``Evaluator`` turns those
totals into the named figures of the ``"eval"`` record in ``metrics.jsonl`` and the status line,
and may add something to look at after each evaluation (a text sample for language models):

* ``LossEvaluator``: ``{split}_loss`` and the mean of every metric per item
  (``val_accuracy`` from a ``"accuracy"`` sum of 0/1, ``val_rewards/margins``, ...);
* ``LanguageModelEvaluator``: the same plus ``val_perplexity`` and ``val_nats_per_char``, and a
  text sample written to ``samples.txt``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from scratchlm.training.logging import SAMPLES_FILE, append_sample
from scratchlm.training.losses import LossOutput

if TYPE_CHECKING:
    from scratchlm.models.protocols import CausalLM
    from scratchlm.tokenizers import Tokenizer

Figures = dict[str, float | None]


@dataclass
class Totals:
    """A loss and its metrics summed over a split (every batch, every process)."""

    loss_sum: float
    count: float
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def loss(self) -> float:
        return self.loss_sum / self.count if self.count > 0 else math.nan

    def means(self) -> dict[str, float]:
        """Each metric per item (the metrics are sums over the same items as the loss)."""
        count = self.count if self.count > 0 else math.nan
        return {name: value / count for name, value in self.metrics.items()}


def sum_outputs(outputs: Sequence[LossOutput], device: torch.device,
                all_reduce: Callable[[torch.Tensor], torch.Tensor],
                extra: Sequence[float] = ()) -> tuple[Totals, list[float]]:
    """Sum loss outputs (loss, count, every metric) in float64 and reduce them across processes in one
    ``all_reduce``; ``extra``: further per-process numbers summed in the same call (stop flags, clocks).
    """
    names = sorted({name for out in outputs for name in out.metrics})
    sums = torch.zeros(2 + len(names) + len(extra), dtype=torch.float64, device=device)
    for out in outputs:
        sums[0] += out.loss_sum.detach().double()
        sums[1] += out.count.double() if isinstance(out.count, torch.Tensor) else float(out.count)
        for i, name in enumerate(names):
            value = out.metrics.get(name, 0.0)
            sums[2 + i] += value.detach().double() if isinstance(value, torch.Tensor) else float(value)
    sums[2 + len(names):] = torch.tensor(list(extra), dtype=torch.float64)
    values = all_reduce(sums).tolist()
    return Totals(values[0], values[1], dict(zip(names, values[2:2 + len(names)], strict=True))), \
        values[2 + len(names):]


class Evaluator(Protocol):
    """Names the figures of an objective's evaluation; see the module docstring."""

    unit: str  # what the loss counts, for logs and progress: "tokens", "examples", "pairs"
    plot_metrics: Sequence[str]  # figures drawn beside the loss in loss.png (e.g. "val_accuracy")

    def figures(self, split: str, totals: Totals | None) -> Figures:
        """The named figures of one split (``None`` values when the split is absent)."""
        ...

    def describe(self, record: Mapping[str, object]) -> str:
        """A short status line for an ``"eval"`` record."""
        ...

    def sample(self, model: torch.nn.Module, record: Mapping[str, object],
               run_dir: Path | None) -> str | None:
        """Something to look at after an evaluation (rank 0 only), or None."""
        ...


def _number(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


@dataclass
class LossEvaluator:
    """The loss and the mean of each metric per item, for every split; no sample."""

    unit: str = "tokens"
    plot_metrics: Sequence[str] = ()
    # Metrics shown in the status line after the losses (e.g. ("accuracy",)).
    shown: Sequence[str] = ()

    def figures(self, split: str, totals: Totals | None) -> Figures:
        out: Figures = {f"{split}_loss": None if totals is None else totals.loss}
        if totals is not None:
            out.update({f"{split}_{name}": value for name, value in totals.means().items()})
        return out

    def describe(self, record: Mapping[str, object]) -> str:
        parts = [f"train {_number(record.get('train_loss'))}"]
        if record.get("val_loss") is not None:
            parts.append(f"val {_number(record['val_loss'])}")
        for name in self.shown:
            for split in ("train", "val"):
                if record.get(f"{split}_{name}") is not None:
                    parts.append(f"{split} {name} {_number(record[f'{split}_{name}'])}")
        return ", ".join(parts)

    def sample(self, model: torch.nn.Module, record: Mapping[str, object],
               run_dir: Path | None) -> str | None:
        return None


@dataclass
class LanguageModelEvaluator(LossEvaluator):
    """Language modelling: perplexity, nats per character, and a text sample after each evaluation.

    ``tokens_per_char``: tokens per character of the validation text, which turns the validation
    loss (nats per token) into nats per character, comparable across tokenizers.  The sample
    (``sample_tokens`` from ``prompt``, seeded by the step) leaves the training RNG untouched.
    """

    tokenizer: Tokenizer | None = None
    tokens_per_char: float | None = None
    prompt: str = "\n"
    sample_tokens: int = 200
    temperature: float = 0.8
    seed: int = 1337

    def figures(self, split: str, totals: Totals | None) -> Figures:
        out = super().figures(split, totals)
        if split == "val":
            loss = out["val_loss"]
            out["val_perplexity"] = math.exp(loss) if loss is not None and loss < 700 else None
            out["val_nats_per_char"] = (loss * self.tokens_per_char
                                        if loss is not None and self.tokens_per_char else None)
        return out

    def describe(self, record: Mapping[str, object]) -> str:
        text = super().describe(record)
        nats = record.get("val_nats_per_char")
        return text + (f" ({nats:.4f} nats/char)" if isinstance(nats, float) else "")

    def sample(self, model: CausalLM, record: Mapping[str, object], run_dir: Path | None) -> str | None:
        if self.tokenizer is None or self.sample_tokens == 0:
            return None
        from scratchlm.generation import SamplingParams, generate

        step = int(record.get("step", 0))  # type: ignore[call-overload]
        params = SamplingParams(max_new_tokens=self.sample_tokens, temperature=self.temperature,
                                seed=self.seed + step)
        device = model_device(model)
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            text = generate(model, self.tokenizer, self.prompt, params)
        if run_dir is not None:
            nats = record.get("val_nats_per_char")
            note = f"val {nats:.3f} nats/char" if isinstance(nats, float) else ""
            append_sample(run_dir / SAMPLES_FILE, step, self.prompt, text, note)
        return text

    def settings(self) -> dict[str, object]:
        """The sample's settings as a run dir records them (``config.json``'s ``"evaluation"``)."""
        return {"sample_prompt": self.prompt, "sample_tokens": self.sample_tokens,
                "sample_temperature": self.temperature}


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's tensors are (the CPU for a model without any, such as an empty n-gram)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def eval_record(step: int, tokens: int, epochs: float, elapsed: float, lr: float | None,
                figures: Figures, final: bool = False) -> dict[str, object]:
    """An ``"eval"`` line of ``metrics.jsonl``: where the run stands, then the evaluator's figures."""
    record: dict[str, object] = {"kind": "eval", "step": step, "tokens": tokens, "epochs": round(epochs, 6),
                                 "elapsed": round(elapsed, 3), **figures, "lr": lr}
    if final:
        record["final"] = True
    return record
