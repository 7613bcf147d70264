"""THE sampler: one ``SamplingParams`` and one logit pipeline for the CLI, the API, chat and the server.

The pipeline, in this order (``process_logits``):

1. **Penalties** on the raw logits, because they speak in logit units (Burkov 5.4.4):
   repetition (Hugging Face semantics: a token already in the prompt or the output has a positive
   logit divided by the penalty and a negative one multiplied by it), then frequency
   (``o_j -= α · count_j``) and presence (``o_j -= γ`` once token j appeared), both counted over
   the generated tokens only, as OpenAI and vLLM do.
2. **Temperature**: ``o / T`` (Raschka ch. 5, Burkov 5.4.1).  ``T = 0`` means greedy: the arg-max
   of the penalised logits, and the steps below are skipped because they never change it.
3. **Top-k**: keep every logit ≥ the k-th largest, so ties at the border are all kept (Burkov 5.4.2).
4. **Top-p** (nucleus): keep the smallest set of most likely tokens whose probability reaches p
   (Burkov 5.4.3 says both "exceeds" and "meets"; we pin "meets", ≥ p, as Hugging Face does);
   the most likely token is always kept.

Then ``sample`` draws from ``softmax`` of the result with a ``torch.Generator`` seeded from
``seed``, so a seed reproduces a completion exactly on the same machine.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from scratchlm.errors import ConfigError

if TYPE_CHECKING:  # torch is imported lazily so that the CLI's --help stays light
    import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop.  Validated on construction (``ConfigError``).

    The defaults sample from the model's own distribution (temperature 1, no truncation, no
    penalties), as OpenAI's API does; ``temperature=0`` is greedy decoding.
    """

    temperature: float = 1.0
    top_k: int | None = None  # None: no top-k
    top_p: float = 1.0  # 1.0: no nucleus truncation
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0  # 1.0: off; > 1 discourages repeats
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()  # text is cut before the first of these strings
    stop_token_ids: tuple[int, ...] = ()  # generation ends on these (like eos)
    ignore_eos: bool = False  # keep going past the end-of-sequence token (benchmarks)
    seed: int | None = None  # None: a fresh random seed per call

    def __post_init__(self) -> None:
        # Accept lists (JSON, argparse) and a single stop string; store tuples so params hash and stay frozen.
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, value: Any, rule: str) -> ConfigError:
            return ConfigError(f"{name} must be {rule}, got {value!r}", f"fix the {name} sampling option")

        if not _is_number(self.temperature) or not 0 <= self.temperature < math.inf:
            raise bad("temperature", self.temperature, "a number ≥ 0 (0 = greedy)")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise bad("top_k", self.top_k, "a positive integer (or None for no top-k)")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", self.top_p, "in (0, 1] (1 = no nucleus truncation)")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value):
                raise bad(name, value, "a finite number (0 = off)")
        if not _is_number(self.repetition_penalty) or not 0 < self.repetition_penalty < math.inf:
            raise bad("repetition_penalty", self.repetition_penalty, "a number > 0 (1 = off)")
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise bad("max_new_tokens", self.max_new_tokens, "a positive integer")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", list(self.stop), "a list of non-empty strings")
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", list(self.stop_token_ids), "a list of token ids ≥ 0")
        if not isinstance(self.ignore_eos, bool):
            raise bad("ignore_eos", self.ignore_eos, "true or false")
        if self.seed is not None and not _is_int(self.seed):
            raise bad("seed", self.seed, "an integer (or None)")

    @classmethod
    def from_options(cls, **options: Any) -> SamplingParams:
        """Build from keyword options (``lm.generate(prompt, top_k=5)``); unknown names are a ConfigError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            import difflib

            close = difflib.get_close_matches(unknown[0], known, n=3)
            hint = f"did you mean {', '.join(close)}?" if close else f"use one of {', '.join(sorted(known))}"
            raise ConfigError(f"unknown sampling option {unknown[0]!r}", hint)
        return cls(**options)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_counts(self) -> bool:
        """Whether frequency or presence penalties need per-token counts of the output."""
        return self.frequency_penalty != 0 or self.presence_penalty != 0

    @property
    def uses_seen(self) -> bool:
        """Whether the repetition penalty needs the set of tokens seen so far (prompt included)."""
        return self.repetition_penalty != 1

    def check_vocab(self, vocab_size: int) -> None:
        """Errors that need the model: top-k beyond the vocabulary (Burkov's rule 1 ≤ k ≤ V)."""
        if self.top_k is not None and self.top_k > vocab_size:
            raise ConfigError(
                f"top_k {self.top_k} exceeds the vocabulary size {vocab_size}",
                f"use a top_k between 1 and {vocab_size}",
            )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def process_logits(logits: torch.Tensor, params: SamplingParams, *, counts: torch.Tensor | None = None,
                   seen: torch.Tensor | None = None) -> torch.Tensor:
    """Apply penalties → temperature → top-k → top-p to next-token logits [..., V] (see the module doc).

    ``counts`` [..., V] holds how often each token was generated so far (frequency and presence
    penalties); ``seen`` [..., V] (bool) marks tokens of the prompt or the output (repetition
    penalty).  Either may be None when its penalty is off.  Removed tokens get −inf.  Returns a new
    tensor; for greedy params only the penalties are applied.
    """
    import torch

    logits = logits.float()
    if params.repetition_penalty != 1 and seen is not None:
        rp = params.repetition_penalty
        logits = torch.where(seen, torch.where(logits > 0, logits / rp, logits * rp), logits)
    if counts is not None:
        if params.frequency_penalty:
            logits = logits - params.frequency_penalty * counts
        if params.presence_penalty:
            logits = logits - params.presence_penalty * (counts > 0).to(logits.dtype)
    if params.greedy:
        return logits
    if params.temperature != 1:
        logits = logits / params.temperature
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        logits = _top_p(logits, params.top_p)
    return logits


def _top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest prefix of the tokens sorted by probability whose total probability is ≥ p."""
    import torch

    # Stable, so that among equally likely tokens the lower id is kept first (reproducible).
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop = mass_before >= p  # the set already reached p without this token
    drop[..., 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sample(logits: torch.Tensor, params: SamplingParams,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row from processed logits [B, V]: arg-max when greedy, else a seeded draw."""
    import torch

    if params.greedy:
        return torch.argmax(logits, dim=-1)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from ``seed``; a fresh nondeterministic seed when it is None."""
    import torch

    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


class Sampler:
    """The per-call sampling state for a batch: params, the seeded generator and the penalty history.

    ``seen`` and ``counts`` are dense [B, V] tensors built only when a penalty needs them, so the
    plain case costs nothing per step.  ``keep(rows)`` follows the decoder when it drops finished
    rows from the batch.
    """

    def __init__(self, params: SamplingParams, vocab_size: int, prompts: Sequence[Iterable[int]],
                 device: torch.device | str = "cpu"):
        import torch

        params.check_vocab(vocab_size)
        self.params = params
        self.generator = make_generator(params.seed, device) if not params.greedy else None
        batch = len(prompts)
        self.counts = torch.zeros(batch, vocab_size, device=device) if params.uses_counts else None
        self.seen = None
        if params.uses_seen:
            self.seen = torch.zeros(batch, vocab_size, dtype=torch.bool, device=device)
            for row, ids in enumerate(prompts):
                self.seen[row, torch.tensor(list(ids), dtype=torch.long, device=device)] = True

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Next token ids [B] for last-position logits [B, V]; records them for the penalties."""
        processed = process_logits(logits, self.params, counts=self.counts, seen=self.seen)
        tokens = sample(processed, self.params, self.generator)
        self.record(tokens)
        return tokens

    def record(self, tokens: torch.Tensor) -> None:
        import torch

        if self.counts is None and self.seen is None:
            return
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        if self.counts is not None:
            self.counts[rows, tokens] += 1
        if self.seen is not None:
            self.seen[rows, tokens] = True

    def keep(self, rows: torch.Tensor) -> None:
        if self.counts is not None:
            self.counts = self.counts[rows]
        if self.seen is not None:
            self.seen = self.seen[rows]
