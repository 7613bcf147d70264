"""What a run leaves for people to read: ``metrics.jsonl``, ``loss.png``, ``samples.txt``, a progress bar.

``metrics.jsonl`` holds one JSON object per line, each with a ``kind``:

* ``"train"`` (every ``log_every`` steps): ``step``, ``tokens`` (items the loss counted so far:
  tokens, or examples or pairs for finetuning), ``elapsed``, ``loss`` (that step's batch),
  ``lr``, ``grad_norm``, ``tokens_per_s`` (``examples_per_s``...), and the mean per item of each
  metric the loss sums (``accuracy``, ``rewards/margins``...);
* ``"eval"``: ``step``, ``tokens``, ``epochs`` (passes over the training data so far),
  ``elapsed``, the evaluator's figures — ``train_loss`` and ``val_loss`` (mean over a fixed set
  of examples, or all of them), for language models ``val_perplexity`` and
  ``val_nats_per_char``, for other objectives ``train_accuracy``, ``val_rewards/margins``... —
  and ``lr``.

JSON lines are appendable (a crash loses at most the line being written) and every tool reads
them; a resumed run first drops the lines written after the checkpoint it resumes from, so the
file tells one consistent story.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from scratchlm.checkpoint.atomic import atomic_path, save_figure

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
SAMPLES_FILE = "samples.txt"


def _clean(value: Any) -> Any:
    """JSON has no NaN or infinity: write them as null rather than as invalid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """Append-only ``metrics.jsonl``; each line is flushed as it is written."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps({k: _clean(v) for k, v in record.items()})
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop lines of steps after ``step`` (written after the checkpoint a run resumes from)."""
        if not self.path.exists():
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``; a torn last line (a crash mid-write) is skipped."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_losses(records: Iterable[dict[str, Any]], path: str | Path, title: str = "",
                extra: Sequence[str] = (), unit: str = "tokens") -> Path:
    """Train and validation loss against step, written atomically as a PNG (matplotlib, Agg backend).

    ``extra``: figures of the ``"eval"`` records drawn against a second axis on the right
    (``val_accuracy``, ``val_rewards/margins``...).  ``unit``: what the loss is a mean over
    (tokens: nats per token; examples, pairs: per example, per pair).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = list(records)
    train = [(r["step"], r["loss"]) for r in records
             if r.get("kind") == "train" and r.get("loss") is not None]
    evals = [r for r in records if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        ax.plot(*zip(*train, strict=True), color="tab:blue", alpha=0.3, lw=0.8, label="train (batch)")
    for key, color, label in (("train_loss", "tab:blue", "train"), ("val_loss", "tab:orange", "validation")):
        points = [(r["step"], r[key]) for r in evals if r.get(key) is not None and not r.get("final")]
        if points:
            ax.plot(*zip(*points, strict=True), "o-", color=color, ms=3, lw=1.5, label=label)
    # The final evaluation scores the whole validation split (the others a fixed subset): its own marker.
    final = [(r["step"], r["val_loss"]) for r in evals if r.get("final") and r.get("val_loss") is not None]
    if final:
        ax.plot(*zip(*final, strict=True), "*", color="tab:red", ms=10, label="validation, whole split")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)" if unit == "tokens" else f"loss (per {unit.rstrip('s')})")
    ax.grid(alpha=0.3)
    lines = [(key, [(r["step"], r[key]) for r in evals if r.get(key) is not None]) for key in extra]
    lines = [(key, points) for key, points in lines if points]
    handles, labels = ax.get_legend_handles_labels()
    if lines:
        right = ax.twinx()
        for (key, points), color in zip(lines, ("tab:green", "tab:purple", "tab:brown", "tab:gray"),
                                        strict=False):
            right.plot(*zip(*points, strict=True), "s--", color=color, ms=3, lw=1.2, label=key)
        right.set_ylabel(", ".join(key for key, _ in lines))
        more_handles, more_labels = right.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    if handles:
        ax.legend(handles, labels)
    if title:
        ax.set_title(title)
    return save_figure(fig, path)


def append_sample(path: str | Path, step: int, prompt: str, text: str, note: str = "") -> None:
    header = f"=== step {step}" + (f" ({note})" if note else "") + " ==="
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"{header}\n{prompt}{text}\n\n")


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """A tqdm bar over the budget's progress (0 → 100 %), whatever the budget is.

    tqdm's own ETA assumes a known number of equal steps, which a wall-clock budget does not
    have, so the postfix carries an ETA computed from the progress fraction instead.
    """

    def __init__(self, enabled: bool, initial: float = 0.0, unit: str = "tokens"):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=1000, initial=int(initial * 1000), dynamic_ncols=True, leave=True,
                            bar_format="{percentage:3.0f}%|{bar:20}| {desc}", mininterval=0.5)
        self._shown = int(initial * 1000)
        self._unit = {"tokens": "tok"}.get(unit, unit)

    def update(self, progress: float, step: int, loss: float, items_per_s: float, elapsed: float,
               since_start: float, progress_at_start: float) -> None:
        if self.bar is None:
            return
        done = progress - progress_at_start
        eta = since_start * (1 - progress) / done if done > 0 else float("nan")
        eta_text = format_duration(eta) if math.isfinite(eta) else "?"
        self.bar.set_description_str(f"step {step} · loss {loss:.3f} · {items_per_s:,.0f} {self._unit}/s · "
                                     f"{format_duration(elapsed)} elapsed · ETA {eta_text}", refresh=False)
        target = min(1000, int(progress * 1000))
        if target > self._shown:
            self.bar.update(target - self._shown)
            self._shown = target
        else:
            self.bar.refresh()

    def write(self, message: str) -> None:
        """A status line above the bar, on stderr with it (stdout is left to the command's results)."""
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def fsync_append(path: str | Path) -> None:
    """Flush an append-only file to disk (called at checkpoints, so logs are as durable as weights)."""
    path = Path(path)
    if path.exists():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
