"""A count-based n-gram LM behind the transformer's interface: ``NGramLM`` (config arch ``"ngram"``).

``models.ngram.NGramCounts`` (the counting engine) counts words and answers in numpy; this wraps
one fitted on a tokenizer's ids, so that everything built for the neural models takes it
unchanged: the sampler (``generation``), ``scratchlm.load`` and run dirs (``checkpoint.io``),
``scratchlm pretrain --preset ngram-kn5`` and ``scratchlm generate``.

* **Words are token ids.**  The n-gram is fitted on the training split's ids written as strings
  (``"17"``), as one sequence with ``pad=False``: no ``<s>``/``</s>``, so the first tokens of a
  text are predicted from the shorter context they have, as a neural model predicts the start of
  its window.  Any tokenizer works; ``char`` gives a character n-gram.
* **Logits are log-probabilities**: ``logits[b, t, i] = ln P(token i | the N−1 tokens up to t)``.
  Token ids never seen in training are ``<UNK>`` to the n-gram; they share its probability equally.
  When every id was seen, ``<UNK>``'s (tiny) probability belongs to no token, and softmax (the
  sampler, a cross-entropy) renormalises over the tokens; ``token_nats``, the figure
  ``scratchlm pretrain`` reports, is the n-gram's own probability.
* **The "hidden state" is the context.**  ``forward(..., return_hidden=True)`` returns the N−1
  token ids each position's prediction reads ([B, T, N−1], −1 where the text is shorter), and
  ``lm_head`` turns contexts into logits — the split the sampler's prefill uses.  The cache
  (``NGramContext``) keeps each row's last N−1 ids.  ``attention_mask`` marks padding, which must
  be on the left (as the sampler pads); ``position_ids`` are ignored.
* **Parameters are the counts.**  ``counts.K`` are int64 parameters without gradients, so
  ``model.parameters()`` counts the stored n-gram counts (the size of a count-based model) and
  carries the device; ``keys.K`` (the n-grams, ``NGramCounts.tables``) and ``vocab_ids`` (the token id of
  each n-gram word, −1 for ``<UNK>``) are buffers.  A run dir's ``model.safetensors`` holds exactly
  these tensors; ``checkpoint.io`` rebuilds the model with ``load_tensors`` because their sizes
  come from the data, not the config.  The work is numpy on the CPU whatever the input's device;
  logits come back on the input's device.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from scratchlm.errors import CheckpointError, ConfigError, DataError
from scratchlm.models.config import ModelConfig
from scratchlm.models.ngram import UNK, NGramCounts


class NGramContext:
    """The n-gram's "cache": each row's last N−1 token ids (−1 where there are fewer).

    It plays the KV cache's part in the sampler's protocol: ``length`` counts the positions
    consumed, ``select(rows)`` keeps batch rows.  It never fills up; ``max_length`` is kept only
    because the sampler sizes its mask by it.
    """

    def __init__(self, ids: torch.Tensor, max_length: int):
        self.ids = ids  # [B, N-1]
        self.max_length = max_length
        self.length = 0

    def advance(self, steps: int) -> None:
        self.length += steps

    def select(self, rows: torch.Tensor) -> None:
        self.ids = self.ids[rows.cpu()]

    @classmethod
    def cat(cls, contexts: Sequence[NGramContext]) -> NGramContext:
        """One context with the rows of ``contexts`` in order (the serving engine joins batches so)."""
        joined = cls(torch.cat([c.ids for c in contexts]), max(c.max_length for c in contexts))
        joined.length = max(c.length for c in contexts)
        return joined


class NGramLM(nn.Module):
    """An ``NGramCounts`` over token ids with the transformer's ``forward``/``new_cache``/``lm_head``.

    Build one with ``NGramLM.fit(config, train_ids)``; ``NGramLM(config)`` is an unfitted
    shell that ``load_tensors`` fills (that is how a run dir is opened).
    """

    def __init__(self, config: ModelConfig, ngram: NGramCounts | None = None):
        super().__init__()
        if config.arch != "ngram":
            raise ConfigError(
                f"NGramLM needs arch 'ngram', got {config.arch!r}",
                "build other models with scratchlm.models.build_model",
            )
        self.config = config
        self.order = config.ngram_order
        self.keys = nn.Module()  # buffers "1".."N": state_dict names keys.K, as NGramCounts's own file
        self.counts = nn.Module()  # parameters "1".."N"
        self.ngram: NGramCounts | None = None
        if ngram is not None:
            self._attach(ngram)

    # ------------------------------------------------------------------ building
    @staticmethod
    def ngram_settings(config: ModelConfig) -> dict:
        """``NGramCounts``'s settings for a config (``pad=False``: one running text of token ids)."""
        return {"order": config.ngram_order, "smoothing": config.ngram_smoothing,
                "k": config.ngram_k or 1.0, "discount": config.ngram_discount, "pad": False}

    @classmethod
    def fit(cls, config: ModelConfig, token_ids: Sequence[int]) -> NGramLM:
        """Count the n-grams of ``token_ids`` (one running text) and return the fitted model."""
        ids = np.asarray(token_ids, dtype=np.int64)
        if ids.size == 0:
            raise DataError("the training text has no tokens", "pass a non-empty training text")
        if ids.min() < 0 or ids.max() >= config.vocab_size:
            raise DataError(
                f"token id {int(ids.max())} is outside the model's vocabulary of {config.vocab_size}",
                "size the config to the tokenizer (vocab_size)",
            )
        ngram = NGramCounts(**cls.ngram_settings(config)).fit([list(map(str, ids.tolist()))])
        return cls(config, ngram)

    @classmethod
    def empty(
        cls, config: ModelConfig, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
    ) -> NGramLM:
        """An unfitted model for ``load_tensors`` to fill (the table sizes come from the file)."""
        return cls(config)

    def load_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Rebuild the model from a state dict (``keys.K``, ``counts.K``, ``vocab_ids``)."""
        n = self.order
        expected = {f"{kind}.{k}" for kind in ("keys", "counts") for k in range(1, n + 1)} | {"vocab_ids"}
        if set(tensors) != expected:
            odd = sorted(set(tensors) ^ expected)
            raise CheckpointError(
                f"the weights do not fit an order-{n} n-gram model ({odd[0]} "
                f"{'missing' if odd[0] in expected else 'unexpected'})",
                "the weights were written for another model config; check config.json",
            )
        arrays = {name: t.detach().cpu().numpy() for name, t in tensors.items()}
        vocab_ids = arrays.pop("vocab_ids")
        if vocab_ids.dtype != np.int64 or vocab_ids.ndim != 1 or (vocab_ids >= self.config.vocab_size).any():
            raise CheckpointError(
                "the n-gram's vocab_ids are malformed or outside the vocabulary",
                "the file is damaged or belongs to another run",
            )
        vocab = [UNK if i < 0 else str(i) for i in vocab_ids.tolist()]
        ngram = NGramCounts.from_tables(arrays, self.ngram_settings(self.config), vocab,
                                        where="n-gram weights")
        self._attach(ngram)

    def _attach(self, ngram: NGramCounts) -> None:
        """Take over a fitted ``NGramCounts`` whose words are token ids (and ``<UNK>``)."""
        vocab_ids = np.array([-1 if w == UNK else int(w) for w in ngram.vocab], dtype=np.int64)
        for name, array in ngram.tables().items():
            kind, k = name.split(".")
            t = torch.from_numpy(array)
            if kind == "keys":
                self.keys.register_buffer(k, t)
            else:
                self.counts.register_parameter(k, nn.Parameter(t, requires_grad=False))
        self.register_buffer("vocab_ids", torch.from_numpy(vocab_ids))
        # token id -> n-gram word index (0 = <UNK> for ids never seen in training), and how many
        # token ids share each n-gram word (more than one only for <UNK>)
        V = self.config.vocab_size
        self._word_of = np.zeros(V, dtype=np.int64)
        seen = vocab_ids >= 0
        self._word_of[vocab_ids[seen]] = np.flatnonzero(seen)
        share = np.bincount(self._word_of, minlength=len(vocab_ids))
        self._log_share = np.log(share[self._word_of])
        self.ngram = ngram

    def _fitted(self) -> NGramCounts:
        if self.ngram is None:
            raise ConfigError(
                "this n-gram model has not been fitted",
                "use NGramLM.fit(config, token_ids) or scratchlm.load(run_dir)",
            )
        return self.ngram

    def num_parameters(self) -> int:
        """The stored n-gram counts (one per distinct n-gram of each order 1..N)."""
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        c = self.config
        state = f"{self.num_parameters():,} counts" if self.ngram is not None else "not fitted"
        return f"order={self.order}, smoothing={c.ngram_smoothing!r}, vocab_size={c.vocab_size}; {state}"

    # ------------------------------------------------------------------ the LM protocol
    def new_cache(
        self, batch_size: int, max_length: int | None = None, dtype: torch.dtype | None = None
    ) -> NGramContext:
        ids = torch.full((batch_size, self.order - 1), -1, dtype=torch.long)
        return NGramContext(ids, max_length or self.config.context_length)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        cache: NGramContext | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """Logits [B, T, V] (log-probabilities) for token ids [B, T]; with ``return_hidden`` the contexts
        [B, T, N−1] instead.  With ``cache`` the ids continue its rows, and it is updated in place."""
        from scratchlm.models.rnn import new_token_mask

        self._fitted()
        b, t = input_ids.shape
        L = self.order - 1
        past = cache.length if cache is not None else 0
        ids = input_ids.detach().cpu().long()
        mask = new_token_mask(attention_mask, past, t)  # the new tokens' columns, or None
        if mask is not None:
            ids = ids.masked_fill(~mask.cpu().bool(), -1)  # left padding: "no token yet"
        before = cache.ids if cache is not None else torch.full((b, L), -1, dtype=torch.long)
        seq = torch.cat([before, ids], dim=1)  # [B, L + T]
        # the context after token t is the L ids ending at it: seq[:, t + 1 : t + 1 + L]
        contexts = seq.unfold(1, L, 1)[:, 1:] if L else seq.new_empty(b, t, 0)
        if cache is not None:
            cache.ids = seq[:, seq.shape[1] - L :]
            cache.advance(t)
        out = contexts if return_hidden else self.lm_head(contexts)
        return out.to(input_ids.device)

    def lm_head(self, contexts: torch.Tensor) -> torch.Tensor:
        """Log-probabilities [..., V] of the next token after each context [..., N−1] of token ids."""
        ngram = self._fitted()
        L, V = self.order - 1, self.config.vocab_size
        flat = contexts.detach().cpu().reshape(-1, L).numpy()
        words = np.where(flat >= 0, self._word_of[np.maximum(flat, 0)], -1)
        if L and len(words):
            unique, inverse = np.unique(words, axis=0, return_inverse=True)
            inverse = inverse.reshape(-1)
        else:
            unique, inverse = words[:1], np.zeros(len(words), dtype=np.int64)
        with np.errstate(divide="ignore"):
            logp = np.log(ngram.next_scores(unique))[:, self._word_of] - self._log_share  # [U, V]
        out = torch.from_numpy(logp[inverse].astype(np.float32))
        return out.reshape(*contexts.shape[:-1], V).to(contexts.device)

    # ------------------------------------------------------------------ evaluation
    def token_nats(self, token_ids: Sequence[int]) -> np.ndarray:
        """−ln P of every token of one running text, each given the up to N−1 tokens before it.

        The first token has no context (the unigram distribution), as in training.  Sum and
        divide by the text's characters for nats per character.
        """
        ngram = self._fitted()
        ids = np.asarray(token_ids, dtype=np.int64)
        if ids.size == 0:
            return np.zeros(0)
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise DataError(
                f"token id {int(ids.max())} is outside the vocabulary of {self.config.vocab_size}",
                "encode the text with the model's own tokenizer",
            )
        log2p = ngram.token_logscores([list(map(str, ids.tolist()))])
        return -log2p * math.log(2) + self._log_share[ids]


__all__ = ["NGramContext", "NGramLM"]
