"""Continuous batching: requests join a running batch between decode steps.

``generation.TokenGenerator`` decodes a batch fixed at the start: a request arriving one step
later would wait for the whole batch to finish.  The ``Engine`` keeps one batch running in a
thread of its own.  Requests are **admitted** into free slots (up to ``max_batch`` rows, prompts
read or not) and every turn of its loop does two things:

1. **prefill** the next newcomers, in arrival order: as many as fit in ``prefill_tokens`` tokens
   padded to the longest of them, in one forward pass (left-padded and masked, as
   ``TokenGenerator`` does), or one ``prefill_tokens`` chunk of a longer prompt, which is read
   over several turns into a cache of its own.  A newcomer's first token is sampled and streamed
   as soon as its own prompt is read, and its keys and values are spliced into the running cache;
2. **decode** one step: feed every running row's newest token through the model in one forward
   pass, sample each row's next token, and remove the rows that finished or whose client went
   away (``cancel``), which frees their slots for the next turn.

So running rows wait for at most one prefill of ``prefill_tokens`` tokens between two of their
tokens, however many newcomers arrive or however long their prompts are.

Each row samples with its request's own ``generation.Sampler`` (its temperature, penalties and
seeded generator: a seed reproduces a completion whatever else is in the batch), except that rows
that are greedy without penalties, whose token is the arg-max of the logits, share one ``argmax``.
Stop strings go through the same ``StopText`` as ``generation.stream``.

The cache layout is the one ``TokenGenerator`` uses: rows are right-aligned (each row's newest
token in the last filled column), the attention mask hides the left padding and the position ids
count each row's real tokens, so every row computes what it would compute alone (up to the
summation order of batched matrix products).  When rows join or leave, the cache is rebuilt with
the columns no row uses cut off the left, so its width stays the longest row's length and
attention does not run over dead padding.  The room left for new tokens grows by doubling (at
least ``_MIN_ROOM`` columns), not to every row's ``max_tokens`` at once, which for a request
without one is the whole context window.  A rebuild copies the cache once, as ``KVCache.select``
does when ``TokenGenerator`` drops a finished row.  All of this bookkeeping (rebuilds, sampling,
text, events) is per row or per column, never per weight, so it stays small beside the forward
pass it schedules (docs/benchmarks.md, "Serving", has the split of a decode step).

Recurrent and n-gram models batch the same way, with no columns to align: their cache holds one
fixed-size state per row (``RecurrentState``, ``NGramContext``), rows join by stacking states and
leave by selecting them, and left padding in a group prefill leaves a row's state untouched.

Only the engine thread touches the model; callers talk to it through ``submit`` and ``cancel``,
which are thread-safe, and receive ``StreamEvent``s through a callback run on the engine thread.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from scratchlm.errors import UserError
from scratchlm.generation import Completion, Sampler, SamplingParams
from scratchlm.generation.generate import BatchState, StopText

if TYPE_CHECKING:
    import torch

    from scratchlm.models.protocols import Cache, CausalLM, JoinableCache
    from scratchlm.tokenizers import Tokenizer

log = logging.getLogger(__name__)

_MIN_ROOM = 64  # fewest free columns a cache rebuild leaves for the tokens to come
PREFILL_TOKENS = 256  # the default bound on one turn's prefill (see Engine)


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
    text: StopText
    limit: int  # most tokens it may generate: its max_new_tokens or the rest of the context
    fed: int  # tokens of this row in the cache (= position id of the next token fed)
    tokens: list[int] = field(default_factory=list)

    @property
    def remaining(self) -> int:
        return self.limit - len(self.tokens)

    @property
    def argmax(self) -> bool:
        """Greedy without penalties: its next token is the arg-max of the raw logits."""
        params = self.sampler.params
        return params.greedy and not params.uses_counts and not params.uses_seen


@dataclass(eq=False)
class _Reading:
    """A prompt longer than ``prefill_tokens``, read one chunk per turn into a cache of its own."""

    request: Request
    cache: Cache
    done: int = 0  # prompt tokens in the cache


@dataclass
class _Block:
    """Right-aligned cache columns of some rows: keys/values [L, b, H, w, d], mask [b, w]."""

    keys: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor

    def select(self, rows: list[int]) -> _Block:
        import torch

        index = torch.tensor(rows, device=self.mask.device)
        return _Block(self.keys[:, index], self.values[:, index], self.mask[index])


@dataclass
class _StateBlock:
    """Some rows of a recurrent or n-gram model: their cache is one fixed-size state per row."""

    state: JoinableCache  # RecurrentState or NGramContext: ``select(rows)`` in place, ``cat(states)``

    def select(self, rows: list[int]) -> _StateBlock:
        import torch

        self.state.select(torch.tensor(rows))
        return self


def _block(cache: Cache, mask: torch.Tensor) -> _Block | _StateBlock:
    """The rows of a freshly read cache, as the running batch will take them in."""
    from scratchlm.models.attention import KVCache

    if isinstance(cache, KVCache):
        return _Block(cache.keys, cache.values, mask)
    return _StateBlock(cache)


class Engine:
    """A continuous-batching scheduler over one model and THE sampler (see the module docstring).

    ``max_batch`` rows decode together; up to ``max_queue`` more requests wait for a slot, and
    ``submit`` raises ``QueueFull`` beyond that.  ``prefill_tokens`` bounds one turn's prefill
    (newcomers' prompts, padded): larger reads more prompts per forward pass, smaller lets the
    running rows decode more often.  Call ``start()`` once and ``close()`` at the end.
    """

    def __init__(self, model: CausalLM, tokenizer: Tokenizer, *, max_batch: int = 16, max_queue: int = 64,
                 prefill_tokens: int = PREFILL_TOKENS):
        if max_batch < 1 or max_queue < 0 or prefill_tokens < 1:
            raise UserError(f"max_batch and prefill_tokens must be ≥ 1 and max_queue ≥ 0, got "
                            f"{max_batch}, {prefill_tokens} and {max_queue}", "pass positive sizes")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefill_tokens = prefill_tokens
        self.context_length: int = model.config.context_length
        self.vocab_size: int = model.config.vocab_size
        self.eos_id: int | None = getattr(tokenizer, "eos_id", None)
        self._waiting: collections.deque[Request] = collections.deque()
        self._wakeup = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        # Admitted requests (engine thread only): prompts not read yet, in arrival order; the one
        # being read in chunks; those whose prompt is being read or just was (until they join the
        # batch or finish); and the running batch.
        self._pending: list[Request] = []
        self._reading: _Reading | None = None
        self._joining: list[Request] = []
        self._rows: list[_Row] = []
        self._cache: Cache | None = None
        self._mask: torch.Tensor | None = None  # [B, cache.max_length]: 1 real or future token, 0 padding
        self._device: torch.device | None = None

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
        """Admitted requests, prefilling or decoding (read without a lock: a snapshot)."""
        return len(self._rows) + len(self._pending) + len(self._joining) + (self._reading is not None)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def start(self) -> Engine:
        self.model.eval()
        self._device = next(self.model.parameters()).device
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
        for request in [*self._waiting, *self._admitted()]:
            self._emit(request, StreamEvent("", error="the server is shutting down"))
        self._waiting.clear()
        self._reset()

    # ----- the engine thread --------------------------------------------------------------------

    def _loop(self) -> None:
        import torch

        with torch.inference_mode():
            while True:
                with self._wakeup:
                    while not self._closed and not self._waiting and not self.busy_slots:
                        self._wakeup.wait()
                    if self._closed:
                        return
                    self._admit()
                try:
                    self._prefill()
                    self._decode()
                except Exception as err:  # a bug or out of memory: fail these requests, keep serving
                    log.exception("engine step failed")
                    for request in self._admitted():
                        self._emit(request, StreamEvent("", error=f"generation failed: {err}"))
                    self._reset()

    def _admit(self) -> None:
        """Move waiting requests into free slots (called with the lock held)."""
        while self._waiting and self.busy_slots < self.max_batch:
            request = self._waiting.popleft()
            if not request.cancelled:
                self._pending.append(request)

    def _admitted(self) -> list[Request]:
        reading = [self._reading.request] if self._reading is not None else []
        return [*reading, *self._joining, *self._pending, *(row.request for row in self._rows)]

    def _prefill(self) -> None:
        """Read the next newcomers' prompts (at most ``prefill_tokens``); they get their first token."""
        self._pending = [request for request in self._pending if not request.cancelled]
        if self._reading is not None and self._reading.request.cancelled:
            self._reading = None
        if self._reading is None and self._pending and len(self._pending[0].prompt_ids) > self.prefill_tokens:
            request = self._pending.pop(0)
            self._reading = _Reading(request, self.model.new_cache(1, len(request.prompt_ids)))
        if self._reading is not None:
            read = self._read_chunk()
        elif self._pending:
            read = self._read_group()
        else:
            return
        if read is None:
            return
        block, logits = read
        rows = [self._new_row(request) for request in self._joining]
        keep = self._sample(rows, logits)
        if keep:
            if len(keep) < len(rows):
                block = block.select(keep)
            live = [self._live_block()] if self._rows else []
            self._rebuild([*live, block], [*self._rows, *(rows[j] for j in keep)])
        self._joining = []

    def _new_row(self, request: Request) -> _Row:
        prompt = request.prompt_ids
        return _Row(request, Sampler(request.params, self.vocab_size, [prompt], self._device),
                    StopText(self.tokenizer, request.params.stop),
                    min(request.params.max_new_tokens, self.context_length - len(prompt)), fed=len(prompt))

    def _read_group(self) -> tuple[_Block | _StateBlock, torch.Tensor]:
        """Prefill the first pending prompts that fit in ``prefill_tokens`` (padded) in one pass."""
        import torch

        group, width = self._pending[:1], len(self._pending[0].prompt_ids)
        for request in self._pending[1:]:
            wider = max(width, len(request.prompt_ids))
            if (len(group) + 1) * wider > self.prefill_tokens:
                break
            group.append(request)
            width = wider
        self._joining, self._pending = group, self._pending[len(group):]
        # TokenGenerator's prefill (left padding, mask, positions), with a cache just wide enough
        state = BatchState.prefill(self.model, [request.prompt_ids for request in group], 0,
                                   self.context_length, self._device)
        mask = state.mask if state.mask is not None else torch.ones(
            len(group), width, dtype=torch.long, device=self._device)
        return _block(state.cache, mask), state.logits

    def _read_chunk(self) -> tuple[_Block | _StateBlock, torch.Tensor] | None:
        """Read the next ``prefill_tokens`` of the long prompt; None until it is all in."""
        import torch

        reading = self._reading
        prompt = reading.request.prompt_ids
        chunk = prompt[reading.done:reading.done + self.prefill_tokens]
        hidden = self.model(torch.tensor([chunk], dtype=torch.long, device=self._device),
                            cache=reading.cache, return_hidden=True)
        reading.done += len(chunk)
        if reading.done < len(prompt):
            return None
        logits = self.model.lm_head(hidden[:, -1])
        self._joining, self._reading = [reading.request], None
        mask = torch.ones(1, len(prompt), dtype=torch.long, device=self._device)
        return _block(reading.cache, mask), logits

    def _decode(self) -> None:
        """One step for the running batch: feed each row's newest token, sample its next one."""
        import torch

        live = [j for j, row in enumerate(self._rows) if not row.request.cancelled]
        if len(live) < len(self._rows):
            self._keep(live)
        if not self._rows:
            return
        ids = torch.tensor([row.tokens[-1] for row in self._rows], dtype=torch.long, device=self._device)
        if self._mask is None:  # a state per row: nothing to align, no room to run out of
            logits = self.model(ids[:, None], cache=self._cache)
        else:
            if self._cache.length + 1 > self._cache.max_length:
                self._rebuild([self._live_block()], self._rows)
            positions = torch.tensor([row.fed for row in self._rows], dtype=torch.long, device=self._device)
            logits = self.model(ids[:, None], cache=self._cache, position_ids=positions[:, None],
                                attention_mask=self._mask[:, :self._cache.length + 1])
        for row in self._rows:
            row.fed += 1
        keep = self._sample(self._rows, logits[:, -1])
        if len(keep) < len(self._rows):
            self._keep(keep)

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> list[int]:
        """Sample and send one token per row from logits [B, V]; the indices of the rows that go on."""
        argmax = logits.argmax(-1).tolist() if any(row.argmax for row in rows) else None
        keep = []
        for j, row in enumerate(rows):
            if row.request.cancelled:
                continue
            token = argmax[j] if row.argmax else int(row.sampler(logits[j:j + 1])[0])
            if self._advance(row, token):
                keep.append(j)
        return keep

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

    def _live_block(self) -> _Block | _StateBlock:
        """The running batch's columns that some row uses (the dead left padding cut off)."""
        if self._mask is None:
            return _StateBlock(self._cache)
        length = self._cache.length
        start = length - max(row.fed for row in self._rows)
        return _Block(self._cache.keys[:, :, :, start:length], self._cache.values[:, :, :, start:length],
                      self._mask[:, start:length])

    def _keep(self, keep: list[int]) -> None:
        """Drop every row not in ``keep`` (finished or cancelled) and compact the cache."""
        rows = [self._rows[j] for j in keep]
        if rows:
            self._rebuild([self._live_block().select(keep)], rows)
        else:
            self._rows, self._cache, self._mask = [], None, None

    def _rebuild(self, blocks: list[_Block] | list[_StateBlock], rows: list[_Row]) -> None:
        """One right-aligned cache for ``blocks`` (stacked in order) with room for the rows' next tokens."""
        import torch

        if isinstance(blocks[0], _StateBlock):  # states stack row after row; no mask (None marks this)
            states = [block.state for block in blocks]
            self._cache = states[0] if len(states) == 1 else type(states[0]).cat(states)
            self._mask, self._rows = None, rows
            return

        width = max(block.mask.shape[1] for block in blocks)
        # Room for the tokens to come, doubling the width at most; never past the context window
        # (learned position tables end there), which always holds width + 1 since every row is
        # shorter than the context.
        room = min(max(row.remaining for row in rows), max(_MIN_ROOM, width))
        capacity = max(min(self.context_length, width + room), width + 1)
        cache = self.model.new_cache(len(rows), capacity)
        mask = torch.zeros(len(rows), capacity, dtype=torch.long, device=self._device)
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

    def _reset(self) -> None:
        self._pending, self._reading, self._joining = [], None, []
        self._rows, self._cache, self._mask = [], None, None



def complete_all(model: CausalLM, tokenizer: Tokenizer, prompts: Sequence[Sequence[int]],
                 params: SamplingParams, *, max_batch: int = 16,
                 progress: str | None = None) -> list[Completion]:
    """Complete every prompt (token ids) through one ``Engine``, and return the completions in order.

    Offline batch generation (a finetuning run's test responses): all prompts are queued at once,
    so a row that finishes early frees its slot for the next prompt at once.  ``progress``: a
    description for a progress bar on stderr (None: no bar).  A failed request raises.
    """
    import queue

    from tqdm.auto import tqdm

    if not prompts:
        return []
    finished: queue.Queue[tuple[int, StreamEvent]] = queue.Queue()
    engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=len(prompts)).start()
    results: list[Completion | None] = [None] * len(prompts)
    try:
        for i, ids in enumerate(prompts):
            def on_event(event: StreamEvent, i: int = i) -> None:
                if event.completion is not None or event.error is not None:
                    finished.put((i, event))

            engine.submit(ids, params, on_event)
        with tqdm(total=len(prompts), desc=progress, disable=progress is None, unit="answer") as bar:
            for _ in range(len(prompts)):
                i, event = finished.get()
                if event.error is not None:
                    raise UserError(f"generating answer {i + 1} failed: {event.error}",
                                    "check the prompt and the model")
                results[i] = event.completion
                bar.update()
    finally:
        engine.close()
    return [r for r in results if r is not None]
