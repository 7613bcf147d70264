"""Continuous batching: requests join a running batch between decode steps.

``generation.TokenGenerator`` decodes a batch fixed at the start: a request arriving one step
later would wait for the whole batch to finish.  The ``Engine`` keeps one batch running in a
thread of its own and, between two decode steps,

1. **admits** waiting requests (up to ``max_batch`` rows): each newcomer's prompt is prefilled
   *alone*, so its prompt computation is exactly what it would be without company, and its keys
   and values are spliced into the running cache;
2. **samples** one token per row, each with the request's own ``generation.Sampler`` (its own
   temperature, penalties and seeded generator: a seed reproduces a completion whatever else is
   in the batch), and applies stop strings through the same ``_RowText`` as ``generation.stream``;
3. **removes** rows that finished or whose client went away (``cancel``), which frees the slot
   for the next request at once;
4. feeds the sampled tokens through the model in **one forward pass** for the whole batch.

The cache layout is the one ``TokenGenerator`` uses: rows are right-aligned (each row's newest
token in the last filled column), the attention mask hides the left padding and the position ids
count each row's real tokens, so every row computes what it would compute alone.  Rows of
different lengths share one ``KVCache``; when a row joins or leaves, the cache is rebuilt with the
columns no row uses cut off the left, so its width stays the longest row's length (never more than
the context window) and attention does not run over dead padding.  A rebuild copies the cache
once, as ``KVCache.select`` does when ``TokenGenerator`` drops a finished row.

Only the engine thread touches the model; callers talk to it through ``submit`` and ``cancel``,
which are thread-safe, and receive ``StreamEvent``s through a callback run on the engine thread.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from scratchlm.errors import UserError
from scratchlm.generation import Completion, Sampler, SamplingParams
from scratchlm.generation.generate import _RowText

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


class QueueFull(UserError):
    """Every batch slot is busy and the waiting queue is full (the server answers 429)."""


@dataclass(frozen=True)
class StreamEvent:
    """A piece of a request's text; the last event carries the ``Completion`` (or an ``error``)."""

    text: str
    completion: Completion | None = None
    error: str | None = None


@dataclass(eq=False)
class Request:
    """A submitted request.  ``cancel`` it through ``Engine.cancel``; the engine fills the rest."""

    prompt_ids: list[int]
    params: SamplingParams
    on_event: Callable[[StreamEvent], None]
    stop_ids: frozenset[int] = frozenset()
    cancelled: bool = False
    done: bool = False


@dataclass(eq=False)
class _Row:
    """A request being decoded: its sampler, text state and how many of its tokens the cache holds."""

    request: Request
    sampler: Sampler
    text: _RowText
    limit: int  # most tokens it may generate: its max_new_tokens or the rest of the context
    fed: int  # tokens of this row in the cache (= position id of the next token fed)
    tokens: list[int] = field(default_factory=list)

    @property
    def remaining(self) -> int:
        return self.limit - len(self.tokens)


@dataclass
class _Block:
    """Right-aligned cache columns of some rows: keys/values [L, b, H, w, d], mask [b, w], logits [b, V]."""

    keys: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor
    logits: torch.Tensor


class Engine:
    """A continuous-batching scheduler over one model and THE sampler (see the module docstring).

    ``max_batch`` rows decode together; up to ``max_queue`` more requests wait for a slot, and
    ``submit`` raises ``QueueFull`` beyond that.  Call ``start()`` once and ``close()`` at the end.
    """

    def __init__(self, model: Any, tokenizer: Any, *, max_batch: int = 16, max_queue: int = 64):
        if max_batch < 1 or max_queue < 0:
            raise UserError(f"max_batch must be ≥ 1 and max_queue ≥ 0, got {max_batch} and {max_queue}",
                            "pass a positive batch size")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.context_length: int = model.config.context_length
        self.vocab_size: int = model.config.vocab_size
        self.eos_id: int | None = getattr(tokenizer, "eos_id", None)
        self._waiting: collections.deque[Request] = collections.deque()
        self._wakeup = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        # The running batch (engine thread only).
        self._rows: list[_Row] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None  # [B, cache.max_length]: 1 real or future token, 0 padding
        self._logits: torch.Tensor | None = None  # [B, V] next-token logits of each row

    # ----- the caller's side (any thread) -------------------------------------------------------

    def check(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Raise a ``UserError`` for a request the model cannot run (called by ``submit``)."""
        if not prompt_ids:
            raise UserError("the prompt is empty", "give at least one token to continue from")
        if len(prompt_ids) >= self.context_length:
            raise UserError(
                f"the prompt has {len(prompt_ids)} tokens, which leaves no room in this model's "
                f"context of {self.context_length} tokens",
                f"shorten the prompt below {self.context_length} tokens")
        bad = [t for t in prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise UserError(f"token id {bad[0]} is outside the vocabulary of {self.vocab_size}",
                            "use ids from the model's own tokenizer")
        params.check_vocab(self.vocab_size)

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams,
               on_event: Callable[[StreamEvent], None], stop_ids: Sequence[int] = ()) -> Request:
        """Queue a request; ``on_event`` gets its text pieces (on the engine thread, so keep it quick)."""
        self.check(prompt_ids, params)
        stops = set(stop_ids) | set(params.stop_token_ids)
        if self.eos_id is not None and not params.ignore_eos:
            stops.add(self.eos_id)
        request = Request(list(prompt_ids), params, on_event, frozenset(stops))
        with self._wakeup:
            if self._closed:
                raise UserError("the engine is shut down", "start a new one")
            # Waiting requests that fit in free slots are not queued: count only those beyond them.
            if self.busy_slots + len(self._waiting) + 1 > self.max_batch + self.max_queue:
                raise QueueFull(f"all {self.max_batch} slots are busy and {len(self._waiting)} requests wait",
                                "retry in a moment")
            self._waiting.append(request)
            self._wakeup.notify()
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request (its client went away): it leaves the batch before the next decode step."""
        with self._wakeup:
            request.cancelled = True
            if request in self._waiting:
                self._waiting.remove(request)
            self._wakeup.notify()

    @property
    def busy_slots(self) -> int:
        """Rows decoding now (read without a lock: a snapshot, for admission and metrics)."""
        return len(self._rows)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def start(self) -> Engine:
        self.model.eval()
        self._thread = threading.Thread(target=self._loop, name="scratchlm-engine", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        """Stop the loop; requests still running or waiting end with an error event."""
        with self._wakeup:
            self._closed = True
            self._wakeup.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        for request in [*self._waiting, *(row.request for row in self._rows)]:
            self._emit(request, StreamEvent("", error="the server is shutting down"))
        self._waiting.clear()
        self._rows = []

    # ----- the engine thread --------------------------------------------------------------------

    def _loop(self) -> None:
        import torch

        with torch.inference_mode():
            while True:
                with self._wakeup:
                    while not self._closed and not self._waiting and not self._rows:
                        self._wakeup.wait()
                    if self._closed:
                        return
                    newcomers = self._admit()
                try:
                    self._step(newcomers)
                except Exception as err:  # a bug or out of memory: fail these requests, keep serving
                    log.exception("decode step failed")
                    for request in {*(r.request for r in self._rows), *newcomers}:
                        self._emit(request, StreamEvent("", error=f"generation failed: {err}"))
                    self._reset()

    def _admit(self) -> list[Request]:
        """Take waiting requests into free slots (called with the lock held)."""
        taken: list[Request] = []
        while self._waiting and len(self._rows) + len(taken) < self.max_batch:
            request = self._waiting.popleft()
            if not request.cancelled:
                taken.append(request)
        return taken

    def _step(self, newcomers: list[Request]) -> None:
        if newcomers:
            self._join(newcomers)
        if not self._rows:
            return
        keep: list[int] = []
        next_tokens: list[int] = []
        for j, row in enumerate(self._rows):
            if row.request.cancelled:
                continue
            token = int(row.sampler(self._logits[j:j + 1])[0])
            if self._advance(row, token):
                keep.append(j)
                next_tokens.append(token)
        if len(keep) < len(self._rows):
            self._keep(keep)
        if not self._rows:
            return
        if self._cache.length + 1 > self._cache.max_length:
            self._rebuild([self._live_block()], self._rows)
        self._decode(next_tokens)

    def _advance(self, row: _Row, token: int) -> bool:
        """Record one sampled token and send its text; False when the row is finished."""
        request = row.request
        row.tokens.append(token)
        if token in request.stop_ids:
            reason: str | None = "stop"
        elif row.remaining <= 0:
            reason = "length"
        else:
            reason = None
        piece = "" if reason == "stop" else row.text.add(token)  # eos / stop ids are not text
        if row.text.stopped:
            reason = "stop"
        if reason is None:
            if piece:
                self._emit(request, StreamEvent(piece))
            return True
        piece += row.text.finish()
        completion = Completion(row.text.text, row.tokens, reason, len(request.prompt_ids))
        self._emit(request, StreamEvent(piece, completion))
        return False

    def _emit(self, request: Request, event: StreamEvent) -> None:
        if request.done or request.cancelled:
            return
        if event.completion is not None or event.error is not None:
            request.done = True
        try:
            request.on_event(event)
        except Exception:  # a callback's failure is its request's problem, not the batch's
            log.exception("request callback failed")
            request.cancelled = True

    # ----- the batch's cache --------------------------------------------------------------------

    def _join(self, newcomers: list[Request]) -> None:
        """Prefill each newcomer alone, then splice its cache into the running batch."""
        import torch

        device = next(self.model.parameters()).device
        blocks = [self._live_block()] if self._rows else []
        rows = list(self._rows)
        for request in newcomers:
            prompt = request.prompt_ids
            cache = self.model.new_cache(1, len(prompt))
            ids = torch.tensor([prompt], dtype=torch.long, device=device)
            hidden = self.model(ids, cache=cache, return_hidden=True)
            logits = self.model.lm_head(hidden[:, -1])  # only the last position's logits are needed
            mask = torch.ones(1, len(prompt), dtype=torch.long, device=device)
            blocks.append(_Block(cache.keys, cache.values, mask, logits))
            rows.append(_Row(request, Sampler(request.params, self.vocab_size, [prompt], device),
                             _RowText(self.tokenizer, request.params.stop),
                             min(request.params.max_new_tokens, self.context_length - len(prompt)),
                             fed=len(prompt)))
        self._rebuild(blocks, rows)

    def _live_block(self) -> _Block:
        """The running batch's columns that some row uses (the dead left padding cut off)."""
        length = self._cache.length
        start = length - max(row.fed for row in self._rows)
        return _Block(self._cache.keys[:, :, :, start:length], self._cache.values[:, :, :, start:length],
                      self._mask[:, start:length], self._logits)

    def _keep(self, keep: list[int]) -> None:
        """Drop every row not in ``keep`` (finished or cancelled) and compact the cache."""
        import torch

        rows = [self._rows[j] for j in keep]
        if not rows:
            self._reset()
            return
        index = torch.tensor(keep, device=self._logits.device)
        self._rows = rows
        block = self._live_block()
        self._rebuild([_Block(block.keys[:, index], block.values[:, index], block.mask[index],
                              block.logits[index])], rows)

    def _rebuild(self, blocks: list[_Block], rows: list[_Row]) -> None:
        """One right-aligned cache for ``blocks`` (stacked in order) with room for the rows' next tokens."""
        import torch

        width = max(block.mask.shape[1] for block in blocks)
        # Room for every token still to be fed; never past the context window (learned position
        # tables end there), which always holds width + 1 since width ≤ the longest row < context.
        capacity = min(self.context_length, width + max(row.remaining for row in rows))
        capacity = max(capacity, width + 1)
        cache = self.model.new_cache(len(rows), capacity)
        device = blocks[0].logits.device
        mask = torch.zeros(len(rows), capacity, dtype=torch.long, device=device)
        mask[:, width:] = 1
        start = 0
        for block in blocks:
            n, w = block.mask.shape
            cache.keys[:, start:start + n, :, width - w:width] = block.keys
            cache.values[:, start:start + n, :, width - w:width] = block.values
            mask[start:start + n, width - w:width] = block.mask
            start += n
        cache.length = width
        self._cache, self._mask, self._rows = cache, mask, rows
        self._logits = torch.cat([block.logits for block in blocks])

    def _decode(self, tokens: list[int]) -> None:
        """Feed each row's newest token through the model: one forward pass for the batch."""
        import torch

        device = self._logits.device
        ids = torch.tensor(tokens, dtype=torch.long, device=device)[:, None]
        positions = torch.tensor([row.fed for row in self._rows], dtype=torch.long, device=device)[:, None]
        logits = self.model(ids, cache=self._cache, attention_mask=self._mask[:, :self._cache.length + 1],
                            position_ids=positions)
        self._logits = logits[:, -1]
        for row in self._rows:
            row.fed += 1

    def _reset(self) -> None:
        self._rows, self._cache, self._mask, self._logits = [], None, None, None
