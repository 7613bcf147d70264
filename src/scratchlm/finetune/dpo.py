"""The preference-tuning recipe (DPO, Rafailov et al. 2023; Raschka's ch. 7 notebook): pairs + the
DPO loss + a trainable set + the loss evaluator, over ``training.Trainer``.

* **data** (``data.preference``): each pair tokenized as TRL does; a batch of P pairs is one
  forward of P packed rows, each the prompt once and both answers (``PairCollate``), right-padded
  to the longest, with log-probabilities taken at the completion tokens only;
* **loss**: ``training.losses.DPOLoss`` (sigmoid, IPO or hinge as TRL defines them); its reward
  sums are metrics, so ``metrics.jsonl`` carries ``rewards/*`` for training and validation;
* **reference**: a separate frozen model (``--ref-model``, or a frozen copy of the starting
  model when every weight trains), or, with LoRA, the same weights with the adapters switched off
  (``lora.disable_adapters``: no second copy).  ``precompute_ref`` computes its log-probs once for
  every pair before training and frees a separate reference;
* **trainable set**: ``all`` (the notebook) or ``lora`` (adapters; undecayed, as for classification);
* **evaluator**: loss, rewards and reward accuracy on both splits.

The reference always runs in evaluation mode (no dropout) and without gradients.
"""

from __future__ import annotations

import copy
import gc
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scratchlm.data.preference import EncodedPair, PreferencePair, encode_pair
from scratchlm.errors import ConfigError
from scratchlm.finetune.classify import pad_id
from scratchlm.finetune.lora_config import LoRAConfig
from scratchlm.finetune.trainable import trainable_groups
from scratchlm.runtime import evaluating
from scratchlm.tokenizers import Tokenizer
from scratchlm.training.config import TrainConfig
from scratchlm.training.distributed import DistContext
from scratchlm.training.losses import DPO_LOSSES, DPOLoss, pair_logprobs
from scratchlm.training.trainer import Trainer

TRAIN_MODES = ("all", "lora")


class EncodedPairs(list[EncodedPair]):
    """A split as token ids (a map-style dataset: ``len`` and ``[i]``)."""


def encode_pairs(pairs: Sequence[PreferencePair], tokenizer: Tokenizer,
                 max_length: int) -> tuple[EncodedPairs, int]:
    """Tokenize every pair; pairs whose prompt alone fills ``max_length`` are left out (nothing of
    their completions would remain, as TRL drops them); returns the split and how many were."""
    encoded = [encode_pair(p, tokenizer, max_length) for p in pairs]
    kept = EncodedPairs(e for e in encoded if e.chosen and e.rejected)
    return kept, len(encoded) - len(kept)


@dataclass
class PairCollate:
    """P pairs → one packed row per pair: the prompt once, then the chosen answer, then the rejected one.

    The rejected tokens take the positions that follow the prompt and do not see the chosen ones
    (``attention_mask`` [P, 1, T, T], ``position_ids`` [P, T]), so each answer is computed exactly
    as it would be alone after the prompt, while the prompt's tokens (most of a row in Raschka's
    data) go through the model once instead of twice.  ``picks`` [4, N]: row, position, target
    and owner of every completion token's log-probability (owners 0..P−1 the chosen answers,
    P..2P−1 the rejected; the prompt's last position predicts the first token of both; with an
    empty prompt the first token has no context and does not count, as in TRL).  Rows are
    right-padded.  ``lengths`` [2P]: completion tokens; ``ref_logps`` [2P] when every pair has
    its reference log-probs.
    """

    pad: int

    def __call__(self, pairs: Sequence[EncodedPair]) -> dict[str, Any]:
        n = len(pairs)
        width = max(len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs)
        ids = torch.full((n, width), self.pad, dtype=torch.long)
        positions = torch.zeros((n, width), dtype=torch.long)
        mask = torch.ones(width, width, dtype=torch.bool).tril().repeat(n, 1, 1, 1)
        picks: list[tuple[int, int, int, int]] = []
        for i, pair in enumerate(pairs):
            p, c, r = len(pair.prompt), len(pair.chosen), len(pair.rejected)
            ids[i, :p + c + r] = torch.as_tensor(pair.prompt + pair.chosen + pair.rejected)
            positions[i, :p + c] = torch.arange(p + c)
            positions[i, p + c:p + c + r] = torch.arange(p, p + r)
            mask[i, 0, p + c:p + c + r, p:p + c] = False  # the rejected answer does not see the chosen
            # the logit at a position scores the next token of its own sequence
            chosen_from = [p - 1 + j for j in range(c)]
            rejected_from = [p - 1] + [p + c + j - 1 for j in range(1, r)]
            picks += [(i, at, tok, i) for at, tok in zip(chosen_from, pair.chosen, strict=True) if at >= 0]
            picks += [(i, at, tok, n + i) for at, tok in zip(rejected_from, pair.rejected, strict=True)
                      if at >= 0]
        batch = {"input_ids": ids, "position_ids": positions, "attention_mask": mask,
                 "picks": torch.tensor(picks, dtype=torch.long).T.contiguous(),
                 "lengths": torch.tensor([len(p.chosen) for p in pairs] + [len(p.rejected) for p in pairs])}
        if all(p.ref is not None for p in pairs):
            refs = [p.ref for p in pairs]
            batch["ref_logps"] = torch.tensor([r[0] for r in refs] + [r[1] for r in refs])  # type: ignore[index]
        return batch


@dataclass
class FrozenReference:
    """A separate reference model (``--ref-model``, or a frozen copy of the starting model)."""

    model: nn.Module

    @torch.no_grad()
    def __call__(self, policy: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        with evaluating(self.model):
            return pair_logprobs(self.model, batch)


@dataclass
class AdapterReference:
    """LoRA's reference: the policy's own weights with its adapters switched off (no copy)."""

    @torch.no_grad()
    def __call__(self, policy: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        from scratchlm.finetune.lora import disable_adapters

        module = getattr(policy, "module", policy)  # not through DDP: nothing to synchronise
        with evaluating(module), disable_adapters(module):
            return pair_logprobs(module, batch)


@torch.no_grad()
def precompute_reference(data: EncodedPairs, reference: FrozenReference, pad: int,
                         batch_size: int = 8, progress: str | None = None) -> None:
    """Store the reference's (chosen, rejected) log-prob sums in every pair of ``data``, in batches
    sorted by length (little padding; right padding never changes a row's sums).  ``progress``: a
    description for a progress bar on stderr (None: no bar)."""
    from tqdm.auto import tqdm

    device = next(reference.model.parameters()).device
    collate = PairCollate(pad)
    order = sorted(range(len(data)), key=lambda i: len(data[i].prompt) + max(len(data[i].chosen),
                                                                             len(data[i].rejected)))
    for start in tqdm(range(0, len(order), batch_size), desc=progress, disable=progress is None,
                      unit="batch", leave=False):
        chunk = order[start:start + batch_size]
        batch = collate([EncodedPair(data[i].prompt, data[i].chosen, data[i].rejected) for i in chunk])
        sums = reference(reference.model, {k: v.to(device) for k, v in batch.items()}).tolist()
        for n, i in enumerate(chunk):
            data[i].ref = (sums[n], sums[len(chunk) + n])


def same_tokenizer(policy: Tokenizer, reference: Tokenizer) -> bool:
    """Whether two tokenizers map every id to the same bytes and agree on the end of text (the
    reference scores the policy's token ids, so they must mean the same text)."""
    if policy.vocab_size != reference.vocab_size or policy.eos_id != reference.eos_id:
        return False
    return all(policy.token_bytes(i) == reference.token_bytes(i) for i in range(policy.vocab_size))


@dataclass
class DPORecipe:
    """Everything ``finetune_dpo`` needs besides the model and the training config."""

    train: list[PreferencePair]
    val: list[PreferencePair]
    test: list[PreferencePair]
    beta: float = 0.1
    loss: str = "sigmoid"
    mode: str = "all"
    lora: LoRAConfig | None = None
    precompute_ref: bool = False
    max_length: int | None = None  # None: the model's context
    base_model: str | None = None  # what a LoRA run names instead of copying the base weights
    chat_template: str | None = None  # recorded in the run dir for chat and the server
    data_info: dict[str, Any] = field(default_factory=dict)


@dataclass
class DPOResult:
    figures: dict[str, Any]
    model: nn.Module
    trainer: Trainer
    splits: dict[str, EncodedPairs]

    @property
    def test_prompts(self) -> list[list[int]]:
        """The test split's prompts as token ids, in file order (for ``test_responses.jsonl``)."""
        return [pair.prompt for pair in self.splits["test"]]


def _eval_figures(prefix: str, totals: Any) -> dict[str, float]:
    return {f"{prefix}_loss": totals.loss, **{f"{prefix}_{k}": v for k, v in totals.means().items()}}


def finetune_dpo(model: nn.Module, tokenizer: Tokenizer, recipe: DPORecipe, config: TrainConfig, *,
                 ref_model: nn.Module | None = None, ref_tokenizer: Tokenizer | None = None,
                 run_dir: str | Path | None = None, resume: bool = False,
                 dist: DistContext | None = None) -> DPOResult:
    """Preference-tune ``model`` with the one loop; evaluate on the validation and test splits.

    ``ref_model``: the reference (None: the starting model, frozen; with LoRA, ``model`` itself
    with its adapters off); ``ref_tokenizer``: its tokenizer, which must be the policy's.
    ``dist``: the data-parallel group (``training.distributed.from_env`` under torchrun).
    Returns the figures of ``results.json``: ``eval_*`` (validation) and ``test_*`` (test) loss,
    rewards and log-probs, the split sizes and the wall time.
    """
    from scratchlm.checkpoint.io import RunManifest, write_json_atomic
    from scratchlm.training import LossEvaluator

    started = time.perf_counter()
    if recipe.beta <= 0:
        raise ConfigError(f"--beta must be positive, got {recipe.beta:g}",
                          "pass --beta > 0 (the notebook's: 0.1)")
    if recipe.loss not in DPO_LOSSES:
        raise ConfigError(f"unknown --loss {recipe.loss!r}", f"use one of {', '.join(DPO_LOSSES)}")
    if ref_model is not None and ref_tokenizer is not None and not same_tokenizer(tokenizer, ref_tokenizer):
        raise ConfigError("the reference model's tokenizer differs from the policy's, so it cannot score "
                          "the same token ids", "pass a --ref-model with the same tokenizer (or none)")
    torch.manual_seed(config.seed)  # LoRA's initial A follows the run's seed
    device = dist.device if dist is not None else next(model.parameters()).device
    model.to(device)  # where the trainer puts it, before a reference is copied from it or precomputed
    max_length = min(recipe.max_length or model.config.context_length, model.config.context_length)
    pad = pad_id(tokenizer)
    splits, too_long = {}, {}
    for name, part in (("train", recipe.train), ("val", recipe.val), ("test", recipe.test)):
        splits[name], too_long[name] = encode_pairs(part, tokenizer, max_length)
    if sum(too_long.values()):
        print(f"warning: {sum(too_long.values())} pairs have a prompt of {max_length} tokens or more and are "
              "left out (nothing of their answers fits; counted in results.json)", file=sys.stderr)
    reference: FrozenReference | AdapterReference | None
    if recipe.precompute_ref:  # before anything trains: the starting model is its own reference
        frozen = FrozenReference(ref_model.to(device) if ref_model is not None else model)
        for name, data in splits.items():
            precompute_reference(data, frozen, pad, config.batch_size,
                                 progress=f"{name}: reference log-probs, once" if config.progress else None)
        reference = ref_model = frozen = None  # every batch carries its ref_logps; a separate model goes
        gc.collect()
    elif ref_model is not None or recipe.mode == "all":
        ref_model = ref_model if ref_model is not None else copy.deepcopy(model)  # the starting model
        reference = FrozenReference(ref_model.requires_grad_(False).to(device))
    else:
        reference = AdapterReference()
    groups = trainable_groups(model, recipe.mode, config.weight_decay, lora=recipe.lora)
    evaluator = LossEvaluator(unit="pairs", plot_metrics=("train_rewards/margins", "val_rewards/margins"),
                              shown=("rewards/margins", "rewards/accuracies"))
    lora = recipe.mode == "lora"
    manifest = RunManifest(base_model=recipe.base_model if lora else None,
                           adapter={"format": "peft", "path": "adapter"} if lora else None,
                           chat_template=recipe.chat_template)
    trainer = Trainer(model, config, splits["train"], val_data=splits["val"] or None,
                      loss_fn=DPOLoss(recipe.beta, recipe.loss, reference), collate=PairCollate(pad),
                      parameters=groups, evaluator=evaluator, run_dir=run_dir, model_config=model.config,
                      tokenizer=tokenizer, run_info={"manifest": manifest, "data": recipe.data_info},
                      dist=dist)
    trainer.fit(resume=resume)
    figures: dict[str, Any] = {}
    for name, prefix in (("val", "eval"), ("test", "test")):
        if splits[name]:
            figures.update(_eval_figures(prefix, trainer.evaluate_split(splits[name])))
    figures.update({"beta": recipe.beta, "loss_type": recipe.loss, "train_mode": recipe.mode,
                    "precompute_ref": recipe.precompute_ref,
                    "split_sizes": {name: len(data) for name, data in splits.items()},
                    "too_long": too_long, "max_length": max_length, "steps": trainer.step,
                    "wall_time_s": round(time.perf_counter() - started, 2)})
    if run_dir is not None and trainer.dist.is_main:
        write_json_atomic(Path(run_dir) / "results.json", figures)
    return DPOResult(figures, model, trainer, splits)
