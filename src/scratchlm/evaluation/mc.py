"""Multiple choice by log-likelihood, as EleutherAI's lm-evaluation-harness scores it.

An item is a context, its choices and the index of the right one.  Each choice is a
continuation: ``delimiter + choice`` (lm-eval's default target delimiter is one space), scored by
the summed log-probability of its tokens after the context.  The prediction is the choice with
the highest sum (``acc``), or with the highest sum per character of the choice (``acc_norm``,
lm-eval's length normalisation: ``len(choice)`` without the delimiter).  Standard errors are
lm-eval's: the sample standard deviation of the 0/1 outcomes over √n.

Tokens, as lm-eval's Hugging Face backend makes them: trailing whitespace of the context moves to
the start of the continuation; the context is encoded alone, the continuation's tokens are those
of ``encode(context + continuation)`` after the context's token count; an empty context becomes
the BOS token (EOS if there is none), unless the continuation starts with that token.
Special-token text is parsed as special tokens (as Hugging Face tokenizers do).  lm-eval also
encodes with the tokenizer's own special tokens (a BOS for Llama-2-style tokenizers); ``add_bos``
does that here.  A choice whose tokens (with the context) do not fit the model's context is not
truncated as lm-eval does (from the left, silently): its item is skipped and counted.

Speed: the choices of an item share their context, so the context runs through the model once
and its KV cache (or recurrent state) is repeated for every choice, which then reads only its own
tokens.  Items are batched, longest contexts together; contexts are left-padded (attention mask,
position ids), continuations grouped by length and right-padded (causal: padding after a token
never changes it), and the vocabulary projection, a large share of a small model's work, is computed
only where a continuation token is predicted.
``score_reference`` is the definition written out, one full sequence per choice; tests hold the
two equal, and the reference equal to lm-eval's.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from scratchlm.errors import ConfigError, DataError
from scratchlm.evaluation.stats import mean_stderr
from scratchlm.runtime import evaluating
from scratchlm.training.logprobs import IGNORE_INDEX, sequence_logprobs, token_logprobs

DELIMITER = " "  # lm-eval's default target_delimiter
FEWSHOT_DELIMITER = "\n\n"  # lm-eval's default fewshot_delimiter


@dataclass(frozen=True)
class Item:
    context: str
    choices: list[str]
    label: int


# ----- reading items --------------------------------------------------------------------------

def _arc(r: Mapping[str, Any]) -> Item:
    choices = r["choices"]
    return Item(f"Question: {r['question']}\nAnswer:", list(choices["text"]),
                list(choices["label"]).index(r["answerKey"]))


def _piqa(r: Mapping[str, Any]) -> Item:
    return Item(f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], r["label"])


# The usual exports, recognised by their fields; contexts as lm-eval's task templates write them.
FORMATS: dict[str, tuple[tuple[str, ...], Callable[[Mapping[str, Any]], Item]]] = {
    "scratchlm": (("context", "choices", "label"), lambda r: Item(r["context"], r["choices"], r["label"])),
    "hellaswag": (("ctx", "endings", "label"), lambda r: Item(r["ctx"], r["endings"], r["label"])),
    "arc": (("question", "choices", "answerKey"), _arc),
    "piqa": (("goal", "sol1", "sol2", "label"), _piqa),
}


def parse_fields(spec: str | None) -> dict[str, str]:
    """``--fields context=ctx,choices=endings,label=gold`` → {"context": "ctx", ...}."""
    if not spec:
        return {}
    out = {}
    for part in spec.split(","):
        key, sep, name = part.partition("=")
        if not sep or key.strip() not in ("context", "choices", "label") or not name.strip():
            raise ConfigError(f"--fields {spec!r}: {part!r} is not context=, choices= or label=FIELD",
                              "pass e.g. --fields context=ctx,choices=endings,label=label")
        out[key.strip()] = name.strip()
    return out


def read_items(records: Sequence[Mapping[str, Any]], where: str, fields: Mapping[str, str] | None = None
               ) -> list[Item]:
    """Items from JSONL records; ``fields`` renames context/choices/label, else a known format is used.

    Every item must have at least two non-empty choices and a label that indexes them.
    """
    items = []
    for i, r in enumerate(records, 1):
        at = f"{where}:{i}"
        if fields:
            names = {"context": "context", "choices": "choices", "label": "label", **fields}
            missing = [n for n in names.values() if n not in r]
            if missing:
                raise DataError(f"{at} has no field {missing[0]!r}", "check --fields against the file")
            item = Item(r[names["context"]], r[names["choices"]], r[names["label"]])
        else:
            kind = next((k for k, (need, _) in FORMATS.items() if all(n in r for n in need)), None)
            if kind is None:
                raise DataError(f"{at} is not a multiple-choice item (it has {', '.join(map(repr, r))})",
                                'write {"context": ..., "choices": [...], "label": i}, or map the fields '
                                "with --fields context=...,choices=...,label=...")
            try:
                item = FORMATS[kind][1](r)
            except (KeyError, TypeError, ValueError) as e:
                raise DataError(f"{at} is a malformed {kind} item ({e})", "check the file") from None
        items.append(_checked(item, at))
    if not items:
        raise DataError(f"{where} holds no items", "pass a JSONL file with at least one item")
    return items


def _checked(item: Item, at: str) -> Item:
    context, choices, label = item.context, item.choices, item.label
    if not isinstance(context, str):
        raise DataError(f"{at}: the context is a {type(context).__name__}, not text", "write it as a string")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise DataError(f"{at}: the choices must be a list of at least two strings", "check the item")
    for j, choice in enumerate(choices):
        if not choice:
            raise DataError(f"{at}: choice {j} is empty (it has no tokens to score and no length to "
                            "normalise by)", "remove the item or give the choice its text")
    if isinstance(label, str) and label.strip().lstrip("-").isdigit():
        label = int(label)  # HellaSwag's exports write the label as a string
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
        raise DataError(f"{at}: label {label!r} is not a choice index (0 to {len(choices) - 1})",
                        "give the label as the 0-based index of the right choice")
    return Item(context, choices, label)


def with_few_shot(items: Sequence[Item], shots: Sequence[Item], delimiter: str = DELIMITER) -> list[Item]:
    """Each item's context preceded by the shots (context + delimiter + right answer), lm-eval's way:
    joined and followed by a blank line."""
    if not shots:
        return list(items)
    prefix = "".join(s.context + delimiter + s.choices[s.label] + FEWSHOT_DELIMITER for s in shots)
    return [Item(prefix + it.context, it.choices, it.label) for it in items]


# ----- tokens ---------------------------------------------------------------------------------

@dataclass
class Encoded:
    """One item's tokens: the context once, one continuation per choice."""

    index: int
    context: list[int]
    continuations: list[list[int]]

    @property
    def length(self) -> int:
        """Positions the model reads for the longest choice (the last token is only predicted)."""
        return len(self.context) + max(map(len, self.continuations)) - 1


def encode_item(tokenizer: Any, item: Item, index: int, delimiter: str = DELIMITER,
                add_bos: bool = False) -> Encoded:
    """lm-eval's ``_encode_pair`` for every choice (see the module docstring)."""
    if add_bos and tokenizer.bos_id is None:
        raise ConfigError("--add-bos: this tokenizer has no BOS token", "leave out --add-bos")

    def encode(text: str) -> list[int]:
        ids = tokenizer.encode(text, allowed_special="all")
        return [tokenizer.bos_id, *ids] if add_bos and tokenizer.bos_id is not None else ids

    context = item.context
    contexts, continuations = [], []
    for choice in item.choices:
        continuation = delimiter + choice
        if context == "":
            cont = tokenizer.encode(continuation, allowed_special="all")
            prefix = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
            if prefix is None:
                raise ConfigError("an item has an empty context and the tokenizer has no BOS or EOS token "
                                  "to condition on", "give the items a context")
            ctx, cont = ([prefix], cont) if cont[:1] != [prefix] else (cont[:1], cont[1:])
        else:
            n_spaces = len(context) - len(context.rstrip())
            ctx_text, cont_text = context, continuation
            if n_spaces:
                ctx_text, cont_text = context[:-n_spaces], context[-n_spaces:] + continuation
            ctx = encode(ctx_text)
            cont = encode(ctx_text + cont_text)[len(ctx):]
        contexts.append(ctx)
        continuations.append(cont)
    # The context is the same text for every choice, so the same tokens (the empty-context case
    # aside, where a continuation may start with the prefix token itself).
    if any(c != contexts[0] for c in contexts):
        return Encoded(index, [], [c + k for c, k in zip(contexts, continuations, strict=True)])
    for j, cont in enumerate(continuations):
        if not cont:
            raise DataError(f"item {index}: choice {j} adds no tokens to the context",
                            "check the choice text and --delimiter")
    return Encoded(index, contexts[0], continuations)


# ----- scoring --------------------------------------------------------------------------------

@dataclass
class ChoiceScore:
    loglikelihood: float  # summed log-probability of the continuation's tokens (nats)
    tokens: int
    greedy: bool  # every continuation token is the model's argmax


def _scores(logits: torch.Tensor, targets: torch.Tensor) -> list[ChoiceScore]:
    """Per row of logits [R, T, V] and targets [R, T] (IGNORE_INDEX where nothing is scored)."""
    summed = sequence_logprobs(logits, targets)
    valid = targets != IGNORE_INDEX
    greedy = ((logits.argmax(-1) == targets) | ~valid).all(-1)
    return [ChoiceScore(float(s), int(c), bool(g))
            for s, c, g in zip(summed.sum.tolist(), summed.count.tolist(), greedy.tolist(), strict=True)]


@torch.no_grad()
def score_reference(model: Any, encoded: Encoded) -> list[ChoiceScore]:
    """The definition: each choice's whole sequence through the model, its continuation summed."""
    device = next(model.parameters()).device
    out = []
    for cont in encoded.continuations:
        ctx = encoded.context
        if not ctx:  # contexts differ per choice (empty-context items): the prefix is the first token
            ctx, cont = cont[:1], cont[1:]
        ids = torch.tensor([ctx + cont[:-1]], device=device)
        targets = torch.tensor([[IGNORE_INDEX] * (len(ctx) - 1) + cont], device=device)
        out.extend(_scores(model(ids), targets))
    return out


ROWS_PER_PASS = 8  # continuations per forward pass after the shared context


@torch.no_grad()
def score_batch(model: Any, batch: Sequence[Encoded], rows_per_pass: int = ROWS_PER_PASS
                ) -> list[list[ChoiceScore]]:
    """Choices of several items, each context run once and its cache shared by its choices.

    The contexts go through the model together (left-padded).  The continuations are then taken
    shortest first, ``rows_per_pass`` at a time, each group reading a copy of its items' cache
    rows, so that a group pads its rows to similar lengths.  The vocabulary projection runs only
    at the positions that predict a continuation token (none for the context, none for padding).
    """
    device = next(model.parameters()).device
    lengths = [len(e.context) for e in batch]
    width = max(lengths)
    longest = max(len(c) for e in batch for c in e.continuations)
    cache = model.new_cache(len(batch), width + longest - 1)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.ones(len(batch), width + longest - 1, dtype=torch.long)
    for i, e in enumerate(batch):
        ids[i, width - len(e.context):] = torch.tensor(e.context)
        mask[i, :width - len(e.context)] = 0
    ids, mask = ids.to(device), mask.to(device)
    padded = min(lengths) != width
    position_ids = (mask[:, :width].cumsum(-1) - 1).clamp(min=0) if padded else None
    hidden = model(ids, cache=cache, attention_mask=mask[:, :width] if padded else None,
                   position_ids=position_ids, return_hidden=True)
    last = hidden[:, -1]  # [B, d]: the state that predicts every continuation's first token
    rows = [(i, j, c) for i, e in enumerate(batch) for j, c in enumerate(e.continuations)]
    rows.sort(key=lambda r: len(r[2]))
    scores: dict[tuple[int, int], ChoiceScore] = {}
    for start in range(0, len(rows), rows_per_pass):
        group = rows[start:start + rows_per_pass]
        items = torch.tensor([i for i, _, _ in group], device=device)
        n = max(len(c) for _, _, c in group)
        targets = torch.full((len(group), n), IGNORE_INDEX, dtype=torch.long)
        for r, (_, _, c) in enumerate(group):
            targets[r, :len(c)] = torch.tensor(c)
        targets = targets.to(device)
        states = last[items][:, None]
        if n > 1:
            group_cache = copy.copy(cache)  # select rebinds its tensors: the shared cache stays whole
            group_cache.select(items)
            starts = torch.tensor(lengths, device=device)[items, None]
            rest = model(targets[:, :-1].clamp(min=0), cache=group_cache,
                         attention_mask=mask[items] if padded else None,
                         position_ids=starts + torch.arange(n - 1, device=device) if padded else None,
                         return_hidden=True)
            states = torch.cat([states, rest], dim=1)
        valid = targets != IGNORE_INDEX
        logits = model.lm_head(states[valid])  # [tokens, V]
        picked = targets[valid]
        logprobs = token_logprobs(logits, picked)
        hits = logits.argmax(-1) == picked
        row_of = torch.arange(len(group), device=device)[:, None].expand_as(targets)[valid]
        sums = torch.zeros(len(group), device=device).index_add_(0, row_of, logprobs)
        misses = torch.zeros(len(group), device=device).index_add_(0, row_of, (~hits).float())
        for r, (i, j, c) in enumerate(group):
            scores[i, j] = ChoiceScore(float(sums[r]), len(c), bool(misses[r] == 0))
    return [[scores[i, j] for j in range(len(e.continuations))] for i, e in enumerate(batch)]


# ----- the evaluation -------------------------------------------------------------------------

@dataclass
class ItemResult:
    index: int
    label: int
    choices: list[ChoiceScore] = field(default_factory=list)
    chars: list[int] = field(default_factory=list)
    skipped: str | None = None  # why the item was not scored

    @property
    def pred(self) -> int:
        lls = [c.loglikelihood for c in self.choices]
        return lls.index(max(lls))

    @property
    def pred_norm(self) -> int:
        normed = [c.loglikelihood / n for c, n in zip(self.choices, self.chars, strict=True)]
        return normed.index(max(normed))

    def to_dict(self) -> dict[str, Any]:
        if self.skipped:
            return {"index": self.index, "label": self.label, "skipped": self.skipped}
        return {"index": self.index, "label": self.label, "pred": self.pred, "pred_norm": self.pred_norm,
                "acc": float(self.pred == self.label), "acc_norm": float(self.pred_norm == self.label),
                "choices": [{"loglikelihood": c.loglikelihood, "tokens": c.tokens, "chars": n,
                             "greedy": c.greedy} for c, n in zip(self.choices, self.chars, strict=True)]}


@dataclass
class MCResult:
    items: list[ItemResult]

    @property
    def scored(self) -> list[ItemResult]:
        return [r for r in self.items if not r.skipped]

    def metrics(self) -> dict[str, Any]:
        scored = self.scored
        acc = [float(r.pred == r.label) for r in scored]
        acc_norm = [float(r.pred_norm == r.label) for r in scored]
        mean = (lambda v: sum(v) / len(v)) if scored else (lambda v: float("nan"))
        return {"acc": mean(acc), "acc_stderr": mean_stderr(acc), "acc_norm": mean(acc_norm),
                "acc_norm_stderr": mean_stderr(acc_norm), "n": len(scored),
                "skipped": len(self.items) - len(scored)}


def evaluate_mc(model: Any, tokenizer: Any, items: Sequence[Item], *, delimiter: str = DELIMITER,
                batch_size: int = 8, add_bos: bool = False, reference: bool = False,
                progress: Callable[[int], None] | None = None) -> MCResult:
    """Score every item (``batch_size`` items per forward pass); ``reference`` uses the slow definition."""
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}", "pass e.g. --batch-size 8")
    context_length = model.config.context_length
    results = [ItemResult(i, it.label, chars=[len(c) for c in it.choices]) for i, it in enumerate(items)]
    encoded = []
    for i, it in enumerate(items):
        e = encode_item(tokenizer, it, i, delimiter, add_bos)
        if e.length > context_length:
            results[i].skipped = (f"{e.length} tokens (context and longest choice) do not fit the model's "
                                  f"context of {context_length}")
        else:
            encoded.append(e)
    with evaluating(model):
        if reference or not hasattr(model, "new_cache"):
            for e in encoded:
                results[e.index].choices = score_reference(model, e)
                if progress:
                    progress(1)
            return MCResult(results)
        # Empty-context items (a context per choice) go through the reference path.
        for e in (e for e in encoded if not e.context):
            results[e.index].choices = score_reference(model, e)
            if progress:
                progress(1)
        cached = sorted((e for e in encoded if e.context), key=lambda e: -len(e.context))
        for start in range(0, len(cached), batch_size):
            batch = cached[start:start + batch_size]
            for e, scores in zip(batch, score_batch(model, batch), strict=True):
                results[e.index].choices = scores
            if progress:
                progress(len(batch))
    return MCResult(results)
