"""Generation: prefill the KV cache with the prompt, then decode one token per step.

Two levels, one loop:

* **Token ids** — ``TokenGenerator`` (and ``generate_ids``, which collects it) runs a batch of
  prompts of different lengths.  Prompts are left-padded, so that every row's next token sits in
  the last column; the attention mask hides the padding and the position ids count real tokens
  only, so each row computes what it would compute alone.  Rows that finish are dropped from the
  batch (``KVCache.select``).  A row ends on the end-of-sequence token (unless ``ignore_eos``), on
  a stop token id, or after ``max_new_tokens``; past the context window the model reads its last
  ``context_length`` tokens.
* **Text** — ``stream``, ``generate`` and ``complete`` decode through the tokenizer's stream
  decoder (which never splits a UTF-8 character) and apply stop strings: the text ends just
  before the first stop string, and text that could be the start of one is held back until it
  cannot.

The per-step work outside the model is one sampler call and one ``tolist()``; everything that
depends only on the batch (cache, mask, positions) is allocated once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from scratchlm.errors import ConfigError
from scratchlm.generation.sampling import Sampler, SamplingParams

if TYPE_CHECKING:
    import torch

    from scratchlm.models.protocols import Cache, CausalLM
    from scratchlm.tokenizers import Tokenizer


class TokenEvent(NamedTuple):
    """One generated token of one batch row; ``finish_reason`` is set on the row's last token."""

    row: int
    token_id: int
    finish_reason: str | None  # None, "stop" (eos or a stop token id) or "length"


@dataclass
class GeneratedIds:
    """What one prompt produced at the token level."""

    token_ids: list[int]  # every sampled token, including the eos / stop token that ended the row
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int


@dataclass
class Completion:
    """What one prompt produced: the text and what the HTTP server reports as usage."""

    text: str  # without the prompt, the eos / stop token and anything from a stop string on
    token_ids: list[int]  # every sampled token, including the one that ended the completion
    finish_reason: str  # "stop" (eos, stop token id or stop string) or "length"
    prompt_tokens: int

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


# --------------------------------------------------------------------------------------------
# Token level
# --------------------------------------------------------------------------------------------


class TokenGenerator:
    """Iterate (once) over ``TokenEvent``s for a batch of prompts; ``stop(row)`` ends a row early.

    The iteration order is step by step, and within a step by row.  Calling ``stop(row)`` while
    handling an event of that row (a stop string found in its text) ends it before the next step.

    A row may generate past the context window: the model then reads the window's last
    ``context_length`` tokens, as Raschka's ``generate`` and nanoGPT's ``sample.py`` crop theirs.
    The cache cannot slide (every cached position depends on the ones before it), so from there
    on each token re-reads the whole window: slower, and the same tokens as a full recompute.
    """

    def __init__(self, model: CausalLM, prompt_ids: Sequence[Sequence[int]], params: SamplingParams,
                 eos_id: int | None = None):
        self.model = model
        self.params = params
        self.prompts = [list(ids) for ids in prompt_ids]
        config = model.config
        self.context_length: int = config.context_length
        self.vocab_size: int = config.vocab_size
        self._check_prompts()
        params.check_vocab(self.vocab_size)
        self.stop_ids = set(params.stop_token_ids)
        if eos_id is not None and not params.ignore_eos:
            self.stop_ids.add(eos_id)
        self.limits = [params.max_new_tokens] * len(self.prompts)  # the most tokens each row may add
        self._stopped: set[int] = set()

    def _check_prompts(self) -> None:
        if not self.prompts:
            raise ConfigError("no prompts to generate from", "pass at least one prompt")
        for ids in self.prompts:
            if not ids:
                raise ConfigError("a prompt is empty", "give at least one token to continue from")
            if len(ids) >= self.context_length:
                raise ConfigError(
                    f"a prompt of {len(ids)} tokens leaves no room in the context of {self.context_length}",
                    f"shorten the prompt below {self.context_length} tokens",
                )
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ConfigError(
                    f"prompt token id {bad[0]} is outside the model's vocabulary of {self.vocab_size}",
                    "encode the prompt with the model's own tokenizer",
                )

    def stop(self, row: int) -> None:
        """End ``row`` after the event being handled (used for stop strings)."""
        self._stopped.add(row)

    def __iter__(self) -> Iterator[TokenEvent]:
        from scratchlm.runtime import evaluating  # (imports torch: this package does not, until called)

        with evaluating(self.model):  # no dropout while generating, even from the training loop
            yield from self._decode()

    def _decode(self) -> Iterator[TokenEvent]:
        import torch

        device = _model_device(self.model)
        active = list(range(len(self.prompts)))  # original row index of each batch row
        sequences = [list(p) for p in self.prompts]  # prompt + generated, for re-prefilling
        produced = [0] * len(self.prompts)
        sampler = Sampler(self.params, self.vocab_size, self.prompts, device)
        state = self._prefill(sequences, active, device)
        while True:
            tokens = sampler(state.logits)
            keep: list[int] = []
            for j, (row, token) in enumerate(zip(active, tokens.tolist(), strict=True)):
                produced[row] += 1
                sequences[row].append(token)
                if token in self.stop_ids:
                    reason = "stop"
                elif produced[row] >= self.limits[row]:
                    reason = "length"
                else:
                    reason = None
                yield TokenEvent(row, token, reason)
                if reason is None and row not in self._stopped:
                    keep.append(j)
            if not keep:
                return
            if len(keep) < len(active):
                rows = torch.tensor(keep, device=device)
                state.select(rows)
                sampler.keep(rows)
                tokens = tokens[rows]
                active = [active[j] for j in keep]
            if state.cache.length + 1 > state.cache.max_length:
                # The cache is full: a row reached the context window (read its last tokens from
                # now on), or the left padding filled it (start over from the rows' own tokens,
                # which packs them tighter).
                state = self._prefill(sequences, active, device)
            else:
                state.step(self.model, tokens)

    def _prefill(self, sequences: list[list[int]], active: list[int], device: torch.device) -> BatchState:
        """Run the rows' sequences (their last ``context_length`` tokens) through the model once,
        filling a new cache."""
        remaining = max(self.limits[row] - (len(sequences[row]) - len(self.prompts[row])) for row in active)
        windows = [sequences[row][-self.context_length:] for row in active]
        return BatchState.prefill(self.model, windows, remaining, self.context_length, device)


def _model_device(model: CausalLM) -> torch.device:
    return next(model.parameters()).device


class BatchState:
    """The cache, attention mask, positions and last logits of the rows being decoded.

    Without padding (one prompt, or prompts of one length) the mask and positions are None and
    the model takes its plain causal path, the fastest one.
    """

    def __init__(self, cache: Cache, logits: torch.Tensor, mask: torch.Tensor | None,
                 positions: torch.Tensor | None):
        self.cache = cache
        self.logits = logits  # [B, V] next-token logits
        self.mask = mask  # [B, cache.max_length]: 1 real or future token, 0 padding
        self.positions = positions  # [B] position id of each row's next token

    @classmethod
    def prefill(cls, model: CausalLM, rows: list[list[int]], remaining: int, context_length: int,
                device: torch.device) -> BatchState:
        import torch

        lengths = [len(ids) for ids in rows]
        width = max(lengths)
        cache = model.new_cache(len(rows), min(context_length, width + remaining))
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        for i, seq in enumerate(rows):
            ids[i, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        ids = ids.to(device)
        mask = positions = position_ids = None
        if min(lengths) != width:
            mask = torch.ones(len(rows), cache.max_length, dtype=torch.long)
            for i, n in enumerate(lengths):
                mask[i, :width - n] = 0
            mask = mask.to(device)
            position_ids = (mask[:, :width].cumsum(-1) - 1).clamp(min=0)
            positions = torch.tensor(lengths, dtype=torch.long, device=device)
        with torch.inference_mode():
            attention_mask = None if mask is None else mask[:, :width]
            hidden = model(ids, cache=cache, attention_mask=attention_mask, position_ids=position_ids,
                           return_hidden=True)
            # Only the last position's logits are needed: skip the vocabulary projection of the rest.
            logits = model.lm_head(hidden[:, -1])
        return cls(cache, logits, mask, positions)

    def step(self, model: CausalLM, tokens: torch.Tensor) -> None:
        import torch

        with torch.inference_mode():
            if self.mask is None:
                logits = model(tokens[:, None], cache=self.cache)
            else:
                logits = model(tokens[:, None], cache=self.cache,
                               attention_mask=self.mask[:, :self.cache.length + 1],
                               position_ids=self.positions[:, None])
                self.positions += 1
        self.logits = logits[:, -1]

    def select(self, rows: torch.Tensor) -> None:
        self.cache.select(rows)
        if self.mask is not None:
            self.mask = self.mask[rows]
            self.positions = self.positions[rows]


def generate_ids(model: CausalLM, prompt_ids: Sequence[Sequence[int]], params: SamplingParams | None = None,
                 eos_id: int | None = None) -> list[GeneratedIds]:
    """Generate for a batch of token-id prompts; one ``GeneratedIds`` per prompt, in order.

    Batched rows compute what they would compute alone (left padding, attention mask, position ids).
    """
    params = params or SamplingParams()
    generator = TokenGenerator(model, prompt_ids, params, eos_id)
    tokens: list[list[int]] = [[] for _ in generator.prompts]
    reasons = ["length"] * len(generator.prompts)
    for event in generator:
        tokens[event.row].append(event.token_id)
        if event.finish_reason is not None:
            reasons[event.row] = event.finish_reason
    return [GeneratedIds(t, r, len(p)) for t, r, p in zip(tokens, reasons, generator.prompts, strict=True)]


# --------------------------------------------------------------------------------------------
# Text level
# --------------------------------------------------------------------------------------------


class StopText:
    """One row's text: stream-decodes its tokens and applies the stop strings.

    ``pending`` is decoded text not yet released: the longest tail that could still grow into a
    stop string.  Text before it can never be part of one, so releasing it is safe.
    """

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]):
        self.decoder = tokenizer.stream_decoder()
        self.stop = stop
        self.pending = ""
        self.parts: list[str] = []
        self.stopped = False  # a stop string was found

    def add(self, token_id: int) -> str:
        self.pending += self.decoder.add(token_id)
        return self._release(final=False)

    def finish(self) -> str:
        if not self.stopped:
            self.pending += self.decoder.flush()
        return self._release(final=True)

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def _release(self, final: bool) -> str:
        if self.stopped or not self.pending:
            return ""
        text, keep = self.pending, 0
        if self.stop:
            hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
            if hits:
                out, self.pending, self.stopped = text[:min(hits)], "", True
                self.parts.append(out)
                return out
            if not final:
                keep = self._stop_prefix_length(text)
        out, self.pending = text[:len(text) - keep], text[len(text) - keep:]
        self.parts.append(out)
        return out

    def _stop_prefix_length(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper start of some stop string."""
        longest = max(len(s) for s in self.stop) - 1
        for k in range(min(longest, len(text)), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0


def encode_prompt(tokenizer: Tokenizer, prompt: str | Sequence[int]) -> list[int]:
    """Token ids of a prompt (text, or ids already); an empty text starts from the eos token if any.

    Special-token strings in the prompt become their tokens: the prompt is the caller's own
    formatting (a hand-written chat turn, ``<|endoftext|>`` between documents), not untrusted data.
    Starting from ``<|endoftext|>`` is how GPT-2 generates unconditionally.
    """
    ids = tokenizer.encode(prompt, allowed_special="all") if isinstance(prompt, str) else list(prompt)
    if not ids and getattr(tokenizer, "eos_id", None) is not None:
        ids = [tokenizer.eos_id]
    return ids


def _run_text(model: CausalLM, tokenizer: Tokenizer, prompts: Sequence[str | Sequence[int]],
              params: SamplingParams) -> Iterator[tuple[int, str, Completion | None]]:
    """Yield (row, text piece, completion-or-None); a row's last item carries its ``Completion``."""
    eos_id = getattr(tokenizer, "eos_id", None)
    generator = TokenGenerator(model, [encode_prompt(tokenizer, p) for p in prompts], params, eos_id)
    texts = [StopText(tokenizer, params.stop) for _ in generator.prompts]
    tokens: list[list[int]] = [[] for _ in generator.prompts]
    for row, token, reason in generator:
        tokens[row].append(token)
        text = texts[row]
        piece = "" if reason == "stop" else text.add(token)  # eos / stop ids are not text
        if text.stopped:
            generator.stop(row)
            reason = "stop"
        if reason is None:
            if piece:
                yield row, piece, None
            continue
        piece += text.finish()
        completion = Completion(text.text, tokens[row], reason, len(generator.prompts[row]))
        yield row, piece, completion


class TextStream:
    """An iterator of text pieces for one prompt; after it ends, ``completion`` holds the result.

    The pieces concatenate to ``completion.text``.
    """

    def __init__(self, model: CausalLM, tokenizer: Tokenizer, prompt: str | Sequence[int],
                 params: SamplingParams):
        self._events = _run_text(model, tokenizer, [prompt], params)
        self.completion: Completion | None = None

    def __iter__(self) -> Iterator[str]:
        for _, piece, completion in self._events:
            if completion is not None:
                self.completion = completion
            if piece:
                yield piece


def _params(params: SamplingParams | None, options: dict[str, Any]) -> SamplingParams:
    if params is not None and options:
        raise ConfigError("pass either a SamplingParams or sampling options, not both",
                          "put the options into the SamplingParams")
    return params if params is not None else SamplingParams.from_options(**options)


def stream(model: CausalLM, tokenizer: Tokenizer, prompt: str | Sequence[int],
           params: SamplingParams | None = None, **options: Any) -> TextStream:
    """Stream the continuation of ``prompt`` as text pieces (see ``TextStream``)."""
    return TextStream(model, tokenizer, prompt, _params(params, options))


def complete(model: CausalLM, tokenizer: Tokenizer, prompts: Sequence[str | Sequence[int]],
             params: SamplingParams | None = None, **options: Any) -> list[Completion]:
    """Complete a batch of prompts together; one ``Completion`` per prompt, in order."""
    results: list[Completion | None] = [None] * len(prompts)
    for row, _, completion in _run_text(model, tokenizer, prompts, _params(params, options)):
        if completion is not None:
            results[row] = completion
    return results  # type: ignore[return-value]  # every row ends with a completion


def generate(model: CausalLM, tokenizer: Tokenizer, prompt: str | Sequence[int],
             params: SamplingParams | None = None, **options: Any) -> str:
    """The continuation of ``prompt`` as one string."""
    return complete(model, tokenizer, [prompt], params, **options)[0].text
