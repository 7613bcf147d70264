"""Recurrent language models: an Elman RNN and an LSTM written from their equations, and the LM around them.

Elman unit (Burkov §3.1; torch's ``nn.RNN`` with tanh), one per layer, layer ``k`` reading layer
``k − 1``'s outputs (layer 0 reads the token embeddings)::

    h_t = tanh(x_t·W_ihᵀ + b_ih + h_{t−1}·W_hhᵀ + b_hh)

LSTM unit (Hochreiter & Schmidhuber 1997, with the forget gate of Gers et al. 2000; torch's
``nn.LSTM``).  Four gates from the same two products, stacked in torch's order i, f, g, o::

    i = σ(x_t·W_iiᵀ + b_ii + h_{t−1}·W_hiᵀ + b_hi)      input gate: how much of g to write
    f = σ(x_t·W_ifᵀ + b_if + h_{t−1}·W_hfᵀ + b_hf)      forget gate: how much of c_{t−1} to keep
    g = tanh(x_t·W_igᵀ + b_ig + h_{t−1}·W_hgᵀ + b_hg)   candidate cell content
    o = σ(x_t·W_ioᵀ + b_io + h_{t−1}·W_hoᵀ + b_ho)      output gate: how much of the cell to show
    c_t = f ⊙ c_{t−1} + i ⊙ g
    h_t = o ⊙ tanh(c_t)

The cell is additive (c_t = f ⊙ c_{t−1} + …), so gradients pass back through time multiplied by f
rather than by W_hh and tanh′ at every step: that is why the LSTM learns longer dependencies than
the Elman unit, whose gradients vanish or explode geometrically.

Parameters carry torch's names and shapes — ``weight_ih_l{k}`` [G·H, in], ``weight_hh_l{k}``
[G·H, H], ``bias_ih_l{k}`` and ``bias_hh_l{k}`` [G·H] with G = 1 (Elman) or 4 (LSTM) — so a
``state_dict`` copies to and from ``torch.nn.RNN`` / ``torch.nn.LSTM`` unchanged.  Burkov's unit
has one bias b per layer: ``bias="one"`` keeps only ``bias_ih_l{k}`` (torch's b_hh is then 0).

Two paths compute the same thing (tests hold them equal, and equal to torch):

* **fast** (default): layer by layer.  The input products x_t·W_ihᵀ + b of *all* time steps are
  one matrix multiply; only h_{t−1}·W_hhᵀ, which depends on the previous step, is left in the
  Python loop over time (one ``addmm`` per step).
* **reference** (``use_reference = True``): step by step and layer by layer, each gate written out
  as in the equations above.

``RecurrentLM`` is Burkov's RNN language model (§3.4) — token embedding → recurrent stack →
linear layer to the vocabulary — made to speak the transformer's protocol, so the training loop,
the CLI, ``scratchlm.load`` and the sampler drive it unchanged: ``forward(input_ids, *, cache,
attention_mask, position_ids) -> logits`` and ``new_cache(batch_size, max_length)``, whose
``RecurrentState`` plays the part of the KV cache (the last hidden/cell state of every layer
instead of every past key and value: constant memory, whatever the length).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.errors import ConfigError
from scratchlm.models.config import RNN_BIASES, ModelConfig

# An Elman state is h [L, B, H]; an LSTM state is (h, c), both [L, B, H] — torch's conventions.
State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class RecurrentStack(nn.Module):
    """A stack of ``num_layers`` recurrent layers over batch-first inputs [B, T, input_size].

    Subclasses set ``gates`` (how many H-wide blocks the products have) and ``cell_state``
    (whether the state carries a cell c besides h), and implement ``_update`` (fast path) and
    ``_reference_cell`` (the equations, one gate at a time).

    ``dropout`` applies to the outputs of every layer but the last, as torch's ``dropout``
    argument: only the connections between layers, never the recurrent ones (Zaremba et al. 2014),
    so the state is not corrupted anew at every time step.
    """

    gates = 1
    cell_state = False

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: str = "two",
                 dropout: float = 0.0):
        super().__init__()
        if bias not in RNN_BIASES:
            raise ConfigError(f"unknown recurrent bias {bias!r}", f"use one of {', '.join(RNN_BIASES)}")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias = bias
        self.dropout = dropout
        self.use_reference = False  # tests flip this to run the step-by-step reference path
        width = self.gates * hidden_size
        for k in range(num_layers):
            fan_in = input_size if k == 0 else hidden_size
            self.register_parameter(f"weight_ih_l{k}", nn.Parameter(torch.empty(width, fan_in)))
            self.register_parameter(f"weight_hh_l{k}", nn.Parameter(torch.empty(width, hidden_size)))
            if bias != "none":
                self.register_parameter(f"bias_ih_l{k}", nn.Parameter(torch.empty(width)))
            if bias == "two":
                self.register_parameter(f"bias_hh_l{k}", nn.Parameter(torch.empty(width)))
        self.reset_parameters()

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, bias={self.bias!r}, "
                f"dropout={self.dropout}")

    def reset_parameters(self) -> None:
        """Xavier-uniform input weights, orthogonal recurrent weights (per gate), zero biases.

        Burkov draws W and U from a normal distribution and sets b = 0; orthogonal W_hh keeps every
        singular value of the recurrent map at 1, so at the start the state neither shrinks nor
        blows up over the time steps (Saxe et al. 2014).  The LSTM also starts its forget gate at
        bias 1 (``LSTM.reset_parameters``).
        """
        if self.weight_ih_l0.is_meta:  # built on the meta device to load weights into: nothing to fill
            return
        h = self.hidden_size
        for k in range(self.num_layers):
            w_ih, w_hh, b_ih, b_hh = self.layer_parameters(k)
            for g in range(self.gates):
                nn.init.xavier_uniform_(w_ih.data[g * h:(g + 1) * h])
                nn.init.orthogonal_(w_hh.data[g * h:(g + 1) * h])
            for b in (b_ih, b_hh):
                if b is not None:
                    nn.init.zeros_(b)

    def layer_parameters(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                                                torch.Tensor | None]:
        """(W_ih, W_hh, b_ih or None, b_hh or None) of layer ``k``."""
        return (getattr(self, f"weight_ih_l{k}"), getattr(self, f"weight_hh_l{k}"),
                getattr(self, f"bias_ih_l{k}", None), getattr(self, f"bias_hh_l{k}", None))

    # ------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, state: State | None = None,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, State]:
        """Outputs [B, T, H] of the top layer and the final state (torch's ``(output, h_n)`` shapes).

        ``state``: the initial state (zeros when None).  ``mask`` [B, T] (1/True = real token): at a
        masked position the state is carried over unchanged, h_t = h_{t−1} (and c_t = c_{t−1}),
        so left padding leaves the initial state as it was and right padding leaves the state of
        the last real token; the output there is that carried state.
        """
        b, t, _ = x.shape
        h0, c0 = self._initial_state(state, b, x)
        keep = None if mask is None else mask.to(torch.bool)[:, :, None]  # [B, T, 1]
        if self.use_reference:
            return self._reference(x, h0, c0, keep)
        inputs = x.transpose(0, 1).contiguous()  # time-major [T, B, in]: each step's rows are contiguous
        hs, cs = [], []
        for k in range(self.num_layers):
            if k > 0:
                inputs = F.dropout(inputs, self.dropout, self.training)
            w_ih, w_hh, b_ih, b_hh = self.layer_parameters(k)
            bias = b_ih if b_hh is None else b_ih + b_hh  # None when bias="none"
            # x_t·W_ihᵀ + b for every t at once [T, B, G·H], split by step with unbind: its backward
            # stacks the T gradients once, where indexing each step would add a T-long zero tensor T times.
            projected = F.linear(inputs, w_ih, bias).unbind(0)
            w_hh_t = w_hh.t()
            h, c = h0[k], None if c0 is None else c0[k]
            outputs = []
            for step in range(t):
                pre = torch.addmm(projected[step], h, w_hh_t)  # + h_{t−1}·W_hhᵀ
                new_h, new_c = self._update(pre, c)
                if keep is not None:
                    m = keep[:, step]
                    new_h = torch.where(m, new_h, h)
                    new_c = None if c is None else torch.where(m, new_c, c)
                h, c = new_h, new_c
                outputs.append(h)
            inputs = torch.stack(outputs)
            hs.append(h)
            cs.append(c)
        c_n = torch.stack(cs) if c0 is not None else None
        return inputs.transpose(0, 1), self._pack(torch.stack(hs), c_n)

    def _reference(self, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor | None,
                   keep: torch.Tensor | None) -> tuple[torch.Tensor, State]:
        """Step by step, then layer by layer: the equations as written, one gate at a time."""
        hs = list(h0.unbind(0))
        cs = list(c0.unbind(0)) if c0 is not None else [None] * self.num_layers
        outputs = []
        for step, inp in enumerate(x.unbind(1)):
            for k in range(self.num_layers):
                if k > 0:
                    inp = F.dropout(inp, self.dropout, self.training)
                new_h, new_c = self._reference_cell(inp, hs[k], cs[k], *self.layer_parameters(k))
                if keep is not None:
                    m = keep[:, step]
                    new_h = torch.where(m, new_h, hs[k])
                    new_c = None if new_c is None else torch.where(m, new_c, cs[k])
                hs[k], cs[k] = new_h, new_c
                inp = new_h
            outputs.append(inp)
        c_n = torch.stack(cs) if c0 is not None else None
        return torch.stack(outputs, dim=1), self._pack(torch.stack(hs), c_n)

    @staticmethod
    def _affine(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """x·Wᵀ + b (b may be absent)."""
        y = x @ w.t()
        return y if b is None else y + b

    def _initial_state(self, state: State | None, batch: int,
                       x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        shape = (self.num_layers, batch, self.hidden_size)
        if state is None:
            zeros = x.new_zeros(shape)
            return zeros, (zeros if self.cell_state else None)
        h0, c0 = state if self.cell_state else (state, None)
        for name, s in (("h", h0), ("c", c0)):
            if s is not None and tuple(s.shape) != shape:
                raise ValueError(f"initial {name} has shape {tuple(s.shape)}, expected {shape}")
        return h0, c0

    def _pack(self, h: torch.Tensor, c: torch.Tensor | None) -> State:
        return (h, c) if self.cell_state else h

    def _update(self, pre: torch.Tensor, c: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """New (h, c) from the summed products ``pre`` [B, G·H] and the previous cell state."""
        raise NotImplementedError

    def _reference_cell(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None, w_ih: torch.Tensor,
                        w_hh: torch.Tensor, b_ih: torch.Tensor | None,
                        b_hh: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One time step of one layer, from its equations."""
        raise NotImplementedError


class ElmanRNN(RecurrentStack):
    """Multi-layer Elman RNN: h_t = tanh(x_t·W_ihᵀ + b_ih + h_{t−1}·W_hhᵀ + b_hh) (torch's ``nn.RNN``)."""

    gates = 1
    cell_state = False

    def _update(self, pre: torch.Tensor, c: torch.Tensor | None) -> tuple[torch.Tensor, None]:
        return torch.tanh(pre), None

    def _reference_cell(self, x, h, c, w_ih, w_hh, b_ih, b_hh):
        return torch.tanh(self._affine(x, w_ih, b_ih) + self._affine(h, w_hh, b_hh)), None


class LSTM(RecurrentStack):
    """Multi-layer LSTM, gates i, f, g, o as torch's ``nn.LSTM``; the state is (h, c)."""

    gates = 4
    cell_state = True

    def reset_parameters(self) -> None:
        """As the Elman stack, plus forget-gate bias 1: the cell starts out remembering
        (Gers et al. 2000; Jozefowicz et al. 2015), so early gradients reach far back in time."""
        super().reset_parameters()
        if self.weight_ih_l0.is_meta or self.bias == "none":
            return
        h = self.hidden_size
        with torch.no_grad():
            for k in range(self.num_layers):
                self.layer_parameters(k)[2][h:2 * h] = 1.0  # b_ih's f block (b_hh stays 0)

    def _update(self, pre: torch.Tensor, c: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.hidden_size
        gates = torch.sigmoid(pre)  # i, f, o in one kernel (g's block is recomputed with tanh)
        i, f, o = gates[:, :h], gates[:, h:2 * h], gates[:, 3 * h:]
        g = torch.tanh(pre[:, 2 * h:3 * h])
        c = torch.addcmul(f * c, i, g)  # f ⊙ c_{t−1} + i ⊙ g
        return o * torch.tanh(c), c

    def _reference_cell(self, x, h, c, w_ih, w_hh, b_ih, b_hh):
        def gate(n: int) -> torch.Tensor:  # x·W_{i·}ᵀ + b_{i·} + h·W_{h·}ᵀ + b_{h·} for gate block n
            rows = slice(n * self.hidden_size, (n + 1) * self.hidden_size)
            return (self._affine(x, w_ih[rows], None if b_ih is None else b_ih[rows])
                    + self._affine(h, w_hh[rows], None if b_hh is None else b_hh[rows]))

        i, f, o = torch.sigmoid(gate(0)), torch.sigmoid(gate(1)), torch.sigmoid(gate(3))
        g = torch.tanh(gate(2))
        c = f * c + i * g
        return o * torch.tanh(c), c


# ----------------------------------------------------------------------------------------------
# The language model
# ----------------------------------------------------------------------------------------------


class RecurrentState:
    """The recurrent "cache": every layer's last hidden state h (and cell state c for the LSTM).

    It plays the KV cache's part in the sampler's protocol: the model reads it as the initial
    state and writes the final state back in place; ``length`` counts the positions consumed;
    ``select(rows)`` keeps batch rows.  Unlike a KV cache it never fills up: ``max_length`` is
    kept only because the sampler sizes its mask by it, and is not enforced.
    """

    def __init__(self, h: torch.Tensor, c: torch.Tensor | None, max_length: int):
        self.h = h  # [L, B, H]
        self.c = c  # [L, B, H] or None (Elman)
        self.max_length = max_length
        self.length = 0

    @property
    def state(self) -> State:
        return self.h if self.c is None else (self.h, self.c)

    def update(self, state: State, steps: int) -> None:
        """Store the state after ``steps`` more positions."""
        if self.c is None:
            self.h = state  # type: ignore[assignment]
        else:
            self.h, self.c = state  # type: ignore[misc]
        self.advance(steps)

    def advance(self, steps: int) -> None:
        self.length += steps

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows given (e.g. drop finished sequences)."""
        self.h = self.h[:, rows]
        if self.c is not None:
            self.c = self.c[:, rows]

    @classmethod
    def cat(cls, states: Sequence[RecurrentState]) -> RecurrentState:
        """One state with the rows of ``states`` in order (the serving engine joins batches so)."""
        h = torch.cat([s.h for s in states], dim=1)
        c = None if states[0].c is None else torch.cat([s.c for s in states], dim=1)
        joined = cls(h, c, max(s.max_length for s in states))
        joined.length = max(s.length for s in states)
        return joined


STACKS: dict[str, type[RecurrentStack]] = {"elman": ElmanRNN, "lstm": LSTM}


class RecurrentLM(nn.Module):
    """Embedding → Elman RNN or LSTM stack → dropout → linear layer to the vocabulary (Burkov §3.4).

    ``config.arch`` picks the unit; ``config.n_embd`` is the embedding size, ``config.rnn_size``
    (``rnn_hidden``, default n_embd as in Burkov) the hidden size, ``config.n_layer`` the depth.
    ``config.dropout`` is applied to every non-recurrent connection — the embeddings, between
    layers, and before the head — as in Zaremba et al. (2014).  The head has a bias (Burkov's
    ``nn.Linear``), and shares its weight with the embedding when ``tie_embeddings`` is set (that
    needs hidden size = embedding size).

    Burkov's embedding has ``padding_idx``; here padding is handled by ``attention_mask`` instead
    (a padded position leaves the state unchanged), so no row of the table is special.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.arch not in STACKS:
            raise ConfigError(f"RecurrentLM needs arch 'elman' or 'lstm', got {config.arch!r}",
                              "build transformers with scratchlm.models.build_model")
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)
        self.rnn = STACKS[config.arch](config.n_embd, config.rnn_size, config.n_layer, config.rnn_bias,
                                       config.dropout)
        self.lm_head = nn.Linear(config.rnn_size, config.vocab_size, bias=True)
        self.reset_parameters()
        self.tie_weights()

    @classmethod
    def empty(cls, config: ModelConfig, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> RecurrentLM:
        """Allocated but uninitialised parameters, for loading weights into (as ``Transformer.empty``)."""
        with torch.device("meta"):
            model = cls(config)
        model.to_empty(device=device)
        model.to(dtype)
        model.tie_weights()  # to_empty gives each parameter its own storage
        return model

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def reset_parameters(self) -> None:
        """Embedding and head Xavier-uniform (Burkov's notebook), head bias 0; the stack does its own."""
        if self.embed_tokens.weight.is_meta:
            return
        nn.init.xavier_uniform_(self.embed_tokens.weight)
        if not self.config.tie_embeddings:
            nn.init.xavier_uniform_(self.lm_head.weight)
        nn.init.zeros_(self.lm_head.bias)
        self.rnn.reset_parameters()

    def new_cache(self, batch_size: int, max_length: int | None = None,
                  dtype: torch.dtype | None = None) -> RecurrentState:
        """A zero state for ``batch_size`` rows (h_0 = 0, and c_0 = 0 for the LSTM)."""
        param = self.embed_tokens.weight
        shape = (self.config.n_layer, batch_size, self.config.rnn_size)
        h = torch.zeros(shape, device=param.device, dtype=dtype or param.dtype)
        c = torch.zeros_like(h) if self.rnn.cell_state else None
        return RecurrentState(h, c, max_length or self.config.context_length)

    def forward(self, input_ids: torch.Tensor, *, cache: RecurrentState | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                return_hidden: bool = False) -> torch.Tensor:
        """Logits [B, T, V] for token ids [B, T], with the transformer's signature.

        With ``cache``, the ids continue from the cached state, which is updated in place.
        ``attention_mask`` [B, past + T] (as the transformer's; a [B, T] mask of the new tokens
        only is accepted too) marks real tokens 1 and padding 0: at padding the state does not
        move, so a left-padded row computes exactly what it computes alone.  ``position_ids`` are
        ignored: a recurrent model knows positions only through its state.
        ``return_hidden`` returns the top layer's outputs (after dropout) instead of logits.
        """
        t = input_ids.shape[1]
        past = cache.length if cache is not None else 0
        mask = new_token_mask(attention_mask, past, t)
        x = self.dropout(self.embed_tokens(input_ids))
        out, state = self.rnn(x, None if cache is None else cache.state, mask)
        if cache is not None:
            cache.update(state, t)
        out = self.dropout(out)
        return out if return_hidden else self.lm_head(out)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights are one parameter


def new_token_mask(attention_mask: torch.Tensor | None, past: int, t: int) -> torch.Tensor | None:
    """The [B, T] columns of ``attention_mask`` for the new tokens, or None when nothing is padded.

    For models without attention (recurrent, n-gram) that read the sampler's mask row by row.
    """
    if attention_mask is None:
        return None
    width = attention_mask.shape[1]
    if width >= past + t:
        mask = attention_mask[:, past:past + t]
    elif width == t:
        mask = attention_mask
    else:
        raise ValueError(f"attention_mask has {width} columns; expected {past + t} (past + new) "
                         f"or {t} (new)")
    return None if bool(mask.all()) else mask


__all__ = ["ElmanRNN", "LSTM", "RecurrentLM", "RecurrentStack", "RecurrentState", "new_token_mask"]
