"""The classification recipe (Raschka ch. 6, appendix E): labelled texts + a head + the one loop.

A recipe is a dataset, a loss, a trainable set and an evaluator over ``training.Trainer``:

* **data**: each text tokenized and truncated from the left to the context (the end of a text is
  what the last-token head reads), batched with right padding to the longest text of the batch
  (or of each of its two length groups, where that saves padding: ``Collate``);
* **loss**: ``training.losses.classification_loss`` (cross-entropy sum, correct predictions as the
  ``accuracy`` metric);
* **trainable set** (``--train``): ``last-block`` (the book: the last transformer block, the final
  norm and the head), ``head``, ``all``, or ``lora`` (adapters on every block plus the head);
* **evaluator**: loss and accuracy on the training and validation splits every epoch.

The frozen prefix is computed once.  With the first N blocks frozen (the book's recipe freezes
29 of SmolLM2's 30), their output for a text never changes during training, so it is computed
once per text (in batches sorted by length) and every step runs only the remaining blocks from
it.  Frozen blocks run in evaluation mode (no dropout), which is also what makes the cached
path exact: the test holds its loss and gradients equal to the plain path's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scratchlm.data.collate import length_groups
from scratchlm.errors import ConfigError
from scratchlm.finetune.data import LabelledText
from scratchlm.finetune.heads import DEFAULT_TEMPLATE, LabelText, SequenceClassifier
from scratchlm.finetune.lora_config import LoRAConfig
from scratchlm.runtime import evaluating
from scratchlm.tokenizers import Tokenizer
from scratchlm.training.config import TrainConfig
from scratchlm.training.evaluators import Totals
from scratchlm.training.logprobs import IGNORE_INDEX
from scratchlm.training.trainer import Trainer

TRAIN_MODES = ("last-block", "head", "all", "lora")


@dataclass
class EncodedTexts:
    """One split as token rows, its label indices, and how many texts were cut to fit the context.

    An example is ``rows_per_example`` consecutive rows: one (its text, for a head), or one per
    label (prompt + that label's answer, for classification as text; ``targets`` then marks the
    answer tokens of each row, shifted as next-token targets).
    """

    rows: list[list[int]]
    labels: list[int]
    truncated: int = 0
    rows_per_example: int = 1
    targets: list[list[int]] | None = None
    hidden: list[torch.Tensor] | None = None  # per row: the frozen prefix's output [T, D]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        span = range(i * self.rows_per_example, (i + 1) * self.rows_per_example)
        item: dict[str, Any] = {"rows": [self.rows[r] for r in span], "label": self.labels[i]}
        if self.targets is not None:
            item["targets"] = [self.targets[r] for r in span]
        if self.hidden is not None:
            item["hidden"] = [self.hidden[r] for r in span]
        return item


def _fit(tokens: list[int], room: int) -> tuple[list[int], bool]:
    """The last ``room`` tokens (a text is cut from the left: its end is what a classifier reads)."""
    return (tokens[-room:], True) if len(tokens) > room else (tokens, False)


def encode(examples: Sequence[LabelledText], tokenizer: Tokenizer, labels: Sequence[str],
           max_length: int) -> EncodedTexts:
    """Tokenize every text; one longer than ``max_length`` keeps its last ``max_length`` tokens."""
    index = {label: i for i, label in enumerate(labels)}
    rows, truncated = [], 0
    for example in examples:
        tokens, cut = _fit(tokenizer.encode(example.text), max_length)
        rows.append(tokens or [pad_id(tokenizer)])
        truncated += cut
    return EncodedTexts(rows, [index[x.label] for x in examples], truncated)


def encode_as_text(examples: Sequence[LabelledText], tokenizer: Tokenizer, head: LabelText,
                   max_length: int) -> EncodedTexts:
    """Each example as one row per label: the prompt, then that label's answer tokens (the targets)."""
    index = {label: i for i, label in enumerate(head.labels)}
    rows, targets, truncated = [], [], 0
    longest = max(map(len, head.answer_ids))
    for example in examples:
        before, after = head.prompt_parts(tokenizer, example.text)
        room = max_length - len(before) - len(after) - longest
        text, cut = _fit(tokenizer.encode(example.text), max(room, 1))
        truncated += cut
        prompt = before + text + after
        for answer in head.answer_ids:
            rows.append(prompt + answer)
            targets.append([IGNORE_INDEX] * (len(prompt) - 1) + answer + [IGNORE_INDEX])
    return EncodedTexts(rows, [index[x.label] for x in examples], truncated, len(head.labels), targets)


def pad_id(tokenizer: Tokenizer) -> int:
    """The padding id: the tokenizer's pad token, else its end-of-text token (Raschka pads with
    GPT-2's <|endoftext|>), else 0.  Padding is masked by position, so its value never matters."""
    for name in ("pad_id", "eos_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


@dataclass
class Collate:
    """Right-pad a batch's rows to the longest: input_ids, attention_mask, labels (and, where the
    examples have them, answer targets and prefix states).

    The result is a list of padded groups: with ``split``, the examples may be cut into two groups
    by length (``data.collate.length_groups``: random batches of SMS texts are half padding), which
    ``GroupedLoss`` sums into the whole batch's loss; without, one group in the items' order.
    """

    pad: int
    start_layer: int = 0
    split: bool = True

    def __call__(self, items: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        if not self.split:
            return [self._pad(items)]
        groups = length_groups([max(map(len, item["rows"])) for item in items])
        return [self._pad([items[i] for i in group]) for group in groups]

    def _pad(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        rows = [row for item in items for row in item["rows"]]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, :len(row)], mask[r, :len(row)] = torch.as_tensor(row), 1
        batch: dict[str, Any] = {"input_ids": ids, "attention_mask": mask,
                                 "labels": torch.tensor([item["label"] for item in items])}
        if "targets" in items[0]:
            targets = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
            for r, row in enumerate(t for item in items for t in item["targets"]):
                targets[r, :len(row)] = torch.as_tensor(row)
            batch["targets"] = targets
        if self.start_layer:
            states = [h for item in items for h in item["hidden"]]
            hidden = states[0].new_zeros(len(rows), width, states[0].shape[-1])
            for r, h in enumerate(states):
                hidden[r, :len(h)] = h
            batch["hidden"], batch["start_layer"] = hidden, self.start_layer
        return batch


@torch.no_grad()
def cache_prefix(base: nn.Module, data: EncodedTexts, start_layer: int, pad: int,
                 batch_size: int = 16, progress: str | None = None) -> None:
    """Run the frozen first ``start_layer`` blocks once per text and keep their output in ``data``.

    Texts are batched in order of length, so padding is small; right padding never reaches a
    real token (causal attention), so each text's states are those it would get alone.
    ``progress``: a description for a progress bar on stderr (None: no bar).
    """
    from tqdm.auto import tqdm

    hidden: list[torch.Tensor | None] = [None] * len(data.rows)
    order = sorted(range(len(data.rows)), key=lambda i: len(data.rows[i]))
    collate = Collate(pad, split=False)
    device = next(base.parameters()).device
    with evaluating(base):
        for start in tqdm(range(0, len(order), batch_size), desc=progress, disable=progress is None,
                          unit="batch", leave=False):
            rows = order[start:start + batch_size]
            [batch] = collate([{"rows": [data.rows[i]], "label": 0} for i in rows])
            states = base.hidden_states(batch["input_ids"].to(device), stop_layer=start_layer)
            for row, i in enumerate(rows):
                hidden[i] = states[row, :len(data.rows[i])].clone()
    data.hidden = [h for h in hidden if h is not None]


@dataclass
class TrainableSet:
    """What trains: the optimizer's parameter groups, and how many leading blocks are frozen."""

    groups: list[dict[str, Any]]
    frozen_blocks: int
    notes: list[str] = field(default_factory=list)


def trainable_set(model: SequenceClassifier | LabelText, mode: str, weight_decay: float,
                  lora: LoRAConfig | None = None) -> TrainableSet:
    """Freeze everything, then unfreeze what ``mode`` trains (see the module docstring).

    A classification head is new and always trains; classification as text reads the model's
    own LM head, which trains only with ``head`` or ``all``.
    """
    from scratchlm.training.optim import param_groups

    if mode not in TRAIN_MODES:
        raise ConfigError(f"unknown --train {mode!r}", f"use one of {', '.join(TRAIN_MODES)}")
    base = model.base
    n_layer = len(base.layers)
    model.requires_grad_(False)
    head = model.head_parameters()
    new_head = isinstance(model, SequenceClassifier)
    if new_head or mode == "head":
        for p in head:
            p.requires_grad_(True)
    if mode == "all":
        model.requires_grad_(True)
        return TrainableSet(param_groups(model.parameters(), weight_decay), 0)
    if mode == "head":  # a head tied to the token embedding changes the first block's input
        tied = any(p is base.embed_tokens.weight for p in head)
        return TrainableSet(param_groups(head, weight_decay), 0 if tied else n_layer)
    if mode == "last-block":
        base.layers[-1].requires_grad_(True)
        base.norm.requires_grad_(True)
        return TrainableSet(param_groups(model.parameters(), weight_decay), n_layer - 1)
    from scratchlm.finetune.lora import apply_lora, lora_param_groups

    apply_lora(base, lora or LoRAConfig(rank=16, alpha=16.0))
    groups = lora_param_groups(base, weight_decay=0.0)
    return TrainableSet([*groups, *(param_groups(head, weight_decay) if new_head else [])], 0)


@torch.no_grad()
def predict(model: SequenceClassifier | LabelText, tokenizer: Tokenizer, texts: Sequence[str],
            batch_size: int = 16) -> list[tuple[str, float]]:
    """``(label, probability)`` of each text: the most probable class and its softmax probability
    (for classification as text: over the labels' answer log-probabilities)."""
    examples = [LabelledText(t, model.labels[0]) for t in texts]
    data = encode_split(model, examples, tokenizer, model.config.context_length)
    collate = Collate(pad_id(tokenizer), split=False)
    device = next(model.parameters()).device
    model.eval()
    out: list[tuple[str, float]] = []
    for start in range(0, len(data), batch_size):
        [batch] = collate([data[i] for i in range(start, min(start + batch_size, len(data)))])
        inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        probs = torch.softmax(model(**inputs).float(), dim=-1)
        best = probs.argmax(dim=-1)
        out += [(model.labels[int(i)], float(p[i])) for i, p in zip(best, probs, strict=True)]
    return out


def encode_split(model: SequenceClassifier | LabelText, examples: Sequence[LabelledText],
                 tokenizer: Tokenizer, max_length: int) -> EncodedTexts:
    """A split as the model reads it: one row per text, or one per label (classification as text)."""
    if isinstance(model, LabelText):
        return encode_as_text(examples, tokenizer, model, max_length)
    return encode(examples, tokenizer, model.labels, max_length)


def accuracy_figures(totals: Totals) -> dict[str, float]:
    """Loss and accuracy of a split's ``Totals`` (classification_loss's sums)."""
    count = totals.count or math.nan
    return {"loss": totals.loss_sum / count, "accuracy": totals.metrics.get("accuracy", 0.0) / count}


@dataclass
class ClassifyRecipe:
    """Everything ``finetune_classifier`` needs besides the model and the training config."""

    train: list[LabelledText]
    val: list[LabelledText]
    test: list[LabelledText]
    labels: list[str]
    mode: str = "last-block"
    lora: LoRAConfig | None = None
    max_length: int | None = None  # None: the model's context
    base_model: str | None = None  # the reference the run names instead of copying the base weights
    as_text: bool = False  # classification as text (Burkov §5.3.2) instead of a classification head
    template: str = DEFAULT_TEMPLATE
    data_info: dict[str, Any] = field(default_factory=dict)


@dataclass
class ClassifyResult:
    figures: dict[str, Any]
    classifier: SequenceClassifier | LabelText
    trainer: Trainer


def finetune_classifier(base: nn.Module, tokenizer: Tokenizer, recipe: ClassifyRecipe, config: TrainConfig, *,
                        run_dir: str | Path | None = None, resume: bool = False) -> ClassifyResult:
    """Train a classifier on ``base`` with the one loop; evaluate it on all three splits.

    Returns the figures of ``results.json``: loss and accuracy per split, the labels, the split
    sizes, truncated texts and wall time.
    """
    import time

    from scratchlm.checkpoint.io import RunManifest, write_json_atomic
    from scratchlm.training import LossEvaluator
    from scratchlm.training.losses import GroupedLoss, answer_loss, classification_loss

    started = time.perf_counter()
    torch.manual_seed(config.seed)  # the head's initial weights (and LoRA's) follow the run's seed
    classifier: SequenceClassifier | LabelText = (
        LabelText.build(base, recipe.labels, recipe.template, tokenizer) if recipe.as_text
        else SequenceClassifier(base, recipe.labels))
    chosen = trainable_set(classifier, recipe.mode, config.weight_decay, recipe.lora)
    max_length = min(recipe.max_length or base.config.context_length, base.config.context_length)
    pad = pad_id(tokenizer)
    splits = {name: encode_split(classifier, part, tokenizer, max_length)
              for name, part in (("train", recipe.train), ("val", recipe.val), ("test", recipe.test))}
    truncated = sum(data.truncated for data in splits.values())
    if truncated:
        import sys

        print(f"warning: {truncated} texts are longer than {max_length} tokens; each keeps its last "
              f"{max_length} (counted in results.json)", file=sys.stderr)
    if chosen.frozen_blocks:
        for name, data in splits.items():
            if len(data):
                cache_prefix(base, data, chosen.frozen_blocks, pad, progress=(
                    f"{name}: the {chosen.frozen_blocks} frozen blocks, once" if config.progress else None))
    evaluator = LossEvaluator(unit="examples", plot_metrics=("train_accuracy", "val_accuracy"),
                              shown=("accuracy",))
    manifest = RunManifest(base_model=recipe.base_model, head=classifier.spec(),
                           adapter={"format": "peft", "path": "adapter"} if recipe.mode == "lora" else None)
    val = splits["val"] if len(splits["val"]) else None
    trainer = Trainer(classifier, config, splits["train"], val_data=val,
                      loss_fn=GroupedLoss(answer_loss if recipe.as_text else classification_loss),
                      collate=Collate(pad, chosen.frozen_blocks),
                      parameters=chosen.groups, evaluator=evaluator, run_dir=run_dir,
                      model_config=base.config, tokenizer=tokenizer,
                      run_info={"manifest": manifest, "data": recipe.data_info})
    trainer.fit(resume=resume)
    figures: dict[str, Any] = {}
    for name, data in splits.items():
        if len(data):
            for key, value in accuracy_figures(trainer.evaluate_split(data)).items():
                figures[f"{name}_{key}"] = value
    figures.update({"labels": recipe.labels, "train_mode": recipe.mode, "as_text": recipe.as_text,
                    "split_sizes": {name: len(data) for name, data in splits.items()},
                    "truncated": {name: data.truncated for name, data in splits.items()},
                    "max_length": max_length, "steps": trainer.step,
                    "wall_time_s": round(time.perf_counter() - started, 2)})
    if run_dir is not None and trainer.dist.is_main:
        write_json_atomic(Path(run_dir) / "results.json", figures)
    return ClassifyResult(figures, classifier, trainer)
