"""The instruction-tuning recipe (Raschka ch. 7, Burkov §5.3.3): conversations + masked next-token
loss + a trainable set, over ``training.Trainer``.

* **data**: ``data.instruction`` reads Alpaca, prompt/completion and chat files and renders
  each example with a template into token ids and targets.  The targets are the assistant's turns
  (their end-of-turn token included, so the model learns to stop) when the prompt is masked,
  every token otherwise.  Batches are padded to their longest row; ``group_by_length`` batches
  rows of similar length together (less padding).
* **loss**: ``training.losses.next_token_loss``: the summed cross-entropy over target tokens,
  with the LM head run only at target positions (over a batch cut in two length groups where
  that saves padding: ``PadCollate``).
* **trainable set**: ``all`` weights, the ``last-blocks`` N transformer blocks and the final norm,
  or ``lora`` adapters.
* **evaluator**: the loss on fixed batches of the training and validation splits before the first
  step, every ``eval_every`` steps and at the end.

After training, the test split's prompts are answered greedily through the serving engine
(``test_responses.jsonl``: the book's ``instruction-data-with-response.json``, one record a
line) and the validation and test losses go to ``results.json``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scratchlm.data.collate import length_groups
from scratchlm.data.instruction import Example, encode_example, prompt_ids
from scratchlm.errors import ConfigError, DataError
from scratchlm.finetune.lora_config import LoRAConfig
from scratchlm.finetune.trainable import trainable_groups
from scratchlm.prompts import PromptStyle
from scratchlm.tokenizers import Tokenizer
from scratchlm.training.config import TrainConfig
from scratchlm.training.logprobs import IGNORE_INDEX
from scratchlm.training.losses import GroupedLoss, next_token_loss
from scratchlm.training.trainer import Trainer

RESPONSES_FILE = "test_responses.jsonl"
_MEGABATCH = 50  # batches per length-sorted group (transformers' LengthGroupedSampler uses 50 too)


@dataclass
class InstructRows:
    """One split as next-token rows: ``inputs`` (ids without the last) and ``targets`` (ids without
    the first, ``IGNORE_INDEX`` where not learned).  ``truncated``: rows cut to the length limit;
    ``dropped``: examples left out because the cut removed every target."""

    inputs: list[list[int]]
    targets: list[list[int]]
    examples: list[Example]
    truncated: int = 0
    dropped: int = 0

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> tuple[list[int], list[int]]:
        return self.inputs[i], self.targets[i]

    def target_tokens(self) -> int:
        return sum(sum(t != IGNORE_INDEX for t in row) for row in self.targets)


@dataclass
class LengthGrouped(InstructRows):
    """Rows served in length-grouped batches: each epoch's shuffled order is cut into groups of
    ``_MEGABATCH`` batches, each sorted longest first, so a batch pads to rows of similar length."""

    def epoch_order(self, generator: torch.Generator, batch: int) -> torch.Tensor:
        order = torch.randperm(len(self), generator=generator).tolist()
        size = batch * _MEGABATCH
        lengths = [len(row) for row in self.inputs]
        groups = [sorted(order[i:i + size], key=lambda j: -lengths[j]) for i in range(0, len(order), size)]
        return torch.tensor([j for group in groups for j in group])


def encode_rows(examples: Sequence[Example], style: PromptStyle, tokenizer: Tokenizer, *, max_length: int,
                mask_prompt: bool = True, group_by_length: bool = False) -> InstructRows:
    """Tokenize a split; a row longer than ``max_length`` input tokens keeps its first ones."""
    inputs, targets, kept = [], [], []
    truncated = dropped = 0
    for example in examples:
        row = encode_example(example, style, tokenizer)
        if len(row.ids) - 1 > max_length:
            truncated += 1
            row = type(row)(row.ids[:max_length + 1], row.target[:max_length + 1])
        learned = [token if (learn or not mask_prompt) else IGNORE_INDEX
                   for token, learn in zip(row.ids[1:], row.target[1:], strict=True)]
        if all(t == IGNORE_INDEX for t in learned):
            dropped += 1
            continue
        inputs.append(row.ids[:-1])
        targets.append(learned)
        kept.append(example)
    kind = LengthGrouped if group_by_length else InstructRows
    return kind(inputs, targets, kept, truncated - dropped, dropped)


@dataclass
class PadCollate:
    """Right-pad a batch's rows to the longest: ``input_ids`` with ``pad``, ``labels`` with
    ``IGNORE_INDEX``.  Right padding needs no attention mask: causal attention never lets a real
    token see the padding after it.

    ``split``: the rows may be cut into two groups by length (``data.collate.length_groups``; in
    random batches of Raschka's data a fifth of the tokens are padding).  The result is a list of
    padded groups; ``instruct_loss`` sums over them, so the loss and gradients are the whole batch's.
    """

    pad: int
    split: bool = True

    def __call__(self, items: Sequence[tuple[list[int], list[int]]]) -> list[dict[str, torch.Tensor]]:
        groups = length_groups([len(ids) for ids, _ in items]) if self.split else [list(range(len(items)))]
        return [self._pad([items[i] for i in group]) for group in groups]

    def _pad(self, items: Sequence[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(ids) for ids, _ in items)
        ids = torch.full((len(items), width), self.pad, dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
        for r, (row, target) in enumerate(items):
            ids[r, :len(row)], labels[r, :len(target)] = torch.as_tensor(row), torch.as_tensor(target)
        return {"input_ids": ids, "labels": labels}


#: ``next_token_loss`` summed over a batch's padded groups (``PadCollate``).
instruct_loss = GroupedLoss(next_token_loss)


@dataclass
class InstructRecipe:
    """Everything ``finetune_instruct`` needs besides the model and the training config."""

    train: list[Example]
    val: list[Example]
    test: list[Example]
    style: PromptStyle
    mode: str = "lora"
    last_blocks: int = 1
    lora: LoRAConfig | None = None
    mask_prompt: bool = True
    max_length: int | None = None  # input tokens per row; None: the model's context
    group_by_length: bool = False
    max_new_tokens: int = 256  # Raschka ch. 7 generates the test responses with 256
    base_model: str | None = None  # the run names it instead of copying weights it did not train
    data_info: dict[str, Any] = field(default_factory=dict)


@dataclass
class InstructResult:
    figures: dict[str, Any]
    trainer: Trainer


def check_template(style: PromptStyle, tokenizer: Tokenizer) -> None:
    """The tokenizer has the special tokens the template writes, and an end-of-text token where the
    template ends answers with it."""
    missing = [t for t in style.tokens if t not in tokenizer.special_tokens]
    if missing:
        raise ConfigError(f"the {style.name} template writes {', '.join(missing)}, which this tokenizer does "
                          "not have as a special token",
                          "use --template model (the model's own chat template) or --template alpaca")
    if "eos_token" in style.template and tokenizer.eos_token is None:
        raise ConfigError(f"the {style.name} template ends answers with the end-of-text token, and this "
                          "tokenizer has none", "use a template with its own end-of-turn token (chatml)")


def encode_splits(recipe: InstructRecipe, tokenizer: Tokenizer,
                  context_length: int) -> dict[str, InstructRows]:
    """The three splits as token rows, checked: the template suits the tokenizer and some training
    example has a target within the length limit.  Raises before anything is written."""
    check_template(recipe.style, tokenizer)
    max_length = min(recipe.max_length or context_length, context_length)
    encode = {"max_length": max_length, "mask_prompt": recipe.mask_prompt}
    splits = {"train": encode_rows(recipe.train, recipe.style, tokenizer, **encode,
                                   group_by_length=recipe.group_by_length),
              "val": encode_rows(recipe.val, recipe.style, tokenizer, **encode),
              "test": encode_rows(recipe.test, recipe.style, tokenizer, **encode)}
    if not len(splits["train"]):
        raise DataError(f"every training example is longer than --max-length {max_length} tokens before "
                        "its answer starts", "raise --max-length or shorten the prompts")
    return splits


def finetune_instruct(model: nn.Module, tokenizer: Tokenizer, recipe: InstructRecipe, config: TrainConfig, *,
                      splits: dict[str, InstructRows] | None = None, run_dir: str | Path | None = None,
                      resume: bool = False) -> InstructResult:
    """Instruction-tune ``model`` with the one loop, then answer the test split (module docstring).

    ``splits``: what ``encode_splits`` returned, when the caller checked the data first."""
    import sys

    from scratchlm.checkpoint.io import RunManifest, write_json_atomic
    from scratchlm.finetune.classify import pad_id
    from scratchlm.training import LossEvaluator

    started = time.perf_counter()
    context = model.config.context_length
    splits = splits or encode_splits(recipe, tokenizer, context)
    max_length = min(recipe.max_length or context, context)
    torch.manual_seed(config.seed)  # LoRA's initial A follows the run's seed
    groups = trainable_groups(model, recipe.mode, config.weight_decay, last_blocks=recipe.last_blocks,
                              lora=recipe.lora)
    cut = {name: (rows.truncated, rows.dropped) for name, rows in splits.items()
           if rows.truncated or rows.dropped}
    if cut:
        what = ", ".join(f"{name}: {t} cut, {d} left out" for name, (t, d) in cut.items())
        print(f"warning: examples longer than {max_length} tokens ({what}); counted in results.json",
              file=sys.stderr)
    manifest = RunManifest(base_model=recipe.base_model if recipe.mode != "all" else None,
                           adapter={"format": "peft", "path": "adapter"} if recipe.mode == "lora" else None,
                           chat_template=recipe.style.template)
    val = splits["val"] if len(splits["val"]) else None
    trainer = Trainer(model, config, splits["train"], val_data=val, collate=PadCollate(pad_id(tokenizer)),
                      loss_fn=instruct_loss,
                      parameters=groups, evaluator=LossEvaluator(unit="tokens"), run_dir=run_dir,
                      model_config=model.config, tokenizer=tokenizer,
                      run_info={"manifest": manifest, "data": recipe.data_info})
    trainer.fit(resume=resume)
    figures: dict[str, Any] = {}
    for name in ("val", "test"):
        if len(splits[name]):
            figures[f"{name}_loss"] = trainer.evaluate_split(splits[name]).loss
    figures.update({"template": recipe.style.name, "train_mode": recipe.mode,
                    "mask_prompt": recipe.mask_prompt,
                    "split_sizes": {name: len(rows) for name, rows in splits.items()},
                    "target_tokens": {name: rows.target_tokens() for name, rows in splits.items()},
                    "truncated": {name: rows.truncated for name, rows in splits.items()},
                    "dropped": {name: rows.dropped for name, rows in splits.items()},
                    "max_length": max_length, "steps": trainer.step,
                    "train_time_s": round(time.perf_counter() - started, 2)})
    if run_dir is not None and trainer.dist.is_main and recipe.test and recipe.max_new_tokens > 0:
        answered = time.perf_counter()
        prompts = [prompt_ids(example, recipe.style, tokenizer) for example in recipe.test]
        records = [example.summary() for example in recipe.test]
        write_test_responses(Path(run_dir) / RESPONSES_FILE, model, tokenizer, prompts, records,
                             recipe.style.template, recipe.max_new_tokens,
                             progress="test responses" if config.progress else None)
        figures["responses_time_s"] = round(time.perf_counter() - answered, 2)
    figures["wall_time_s"] = round(time.perf_counter() - started, 2)
    if run_dir is not None and trainer.dist.is_main:
        write_json_atomic(Path(run_dir) / "results.json", figures)
    return InstructResult(figures, trainer)


def write_test_responses(path: Path, model: nn.Module, tokenizer: Tokenizer, prompts: Sequence[Sequence[int]],
                         records: Sequence[Mapping[str, str]], chat_template: str | None,
                         max_new_tokens: int, *, progress: str | None = None) -> None:
    """Answer each prompt (token ids) greedily, batched through the serving engine, stopping at the
    template's end of turn, and write each record (``instruction``, ``input``, ``reference``) with
    its ``response`` as one JSON line, atomically."""
    import json

    from scratchlm.api import LM
    from scratchlm.checkpoint.atomic import write_text_atomic
    from scratchlm.runtime import evaluating
    from scratchlm.serving.engine import complete_all

    lm = LM(model, tokenizer, model.config, chat_template)
    params = lm.chat_params(None, {"temperature": 0.0, "max_new_tokens": max_new_tokens})
    with evaluating(model):
        answers = complete_all(model, tokenizer, prompts, params, progress=progress)
    lines = [json.dumps({**record, "response": answer.text.strip()}, ensure_ascii=False)
             for record, answer in zip(records, answers, strict=True)]
    write_text_atomic(path, "".join(line + "\n" for line in lines))
