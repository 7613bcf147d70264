"""The one decoder-only transformer: GPT-2, Llama, Qwen2/3 and SmolLM2 are configs of this class.

embed tokens (+ learned positions) → n × [pre-norm attention + residual, pre-norm MLP + residual]
→ final norm → LM head (optionally tied to the token embedding).
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import nn

from scratchlm.models.attention import Attention, KVCache
from scratchlm.models.config import ModelConfig
from scratchlm.models.layers import make_mlp, make_norm
from scratchlm.models.rope import inverse_frequencies, rope_cos_sin


class DecodeStep(Protocol):
    """One cached decoding step computed another way: the logits [B, T, V] ``Transformer.forward``
    would return (the cache advanced as it would be), or None where that forward must run."""

    def __call__(self, model: Transformer, input_ids: torch.Tensor, cache: KVCache,
                 attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
                 ) -> torch.Tensor | None: ...


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.input_layernorm = make_norm(config)
        self.self_attn = Attention(config, layer_index)
        self.post_attention_layernorm = make_norm(config)
        self.mlp = make_mlp(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope=None, mask=None, cache=None):
        if self.training and self.dropout.p > 0:
            x = x + self.dropout(self.self_attn(self.input_layernorm(x), rope, mask, cache))
            return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache)  # (dropout is the identity)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        # Under Transformer.empty (meta device) hand the embeddings a weight: nn.Embedding's own
        # normal_ on a meta tensor imports torch._dynamo (seconds).  Real construction is unchanged.
        meta = torch.empty(0).is_meta
        self.embed_tokens = nn.Embedding(
            config.vocab_size, config.n_embd,
            _weight=torch.empty(config.vocab_size, config.n_embd) if meta else None)
        if config.positions == "learned":
            self.embed_positions = nn.Embedding(
                config.context_length, config.n_embd,
                _weight=torch.empty(config.context_length, config.n_embd) if meta else None)
        else:
            self.embed_positions = None
        self._rope_inv_freq: torch.Tensor | None = None  # fp32 whatever the model dtype; see rope_inv_freq
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.reset_parameters()
        self.tie_weights()
        # A faster path for cached decoding steps that some weight formats attach (quant.decode):
        # given (model, ids, cache, attention_mask, position_ids) it returns the logits, or None
        # where this forward must run.
        self.decode_step: DecodeStep | None = None

    @classmethod
    def empty(cls, config: ModelConfig, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> Transformer:
        """A model with allocated but uninitialised parameters, for loading weights into.

        Built on the meta device, so loading a checkpoint skips the random initialisation
        (seconds for the larger GPT-2 sizes) and never holds two copies of the weights.
        """
        with torch.device("meta"):
            model = cls(config)
        # What to_empty does, with torch.empty for its empty_like: the meta empty_like runs a Python
        # reference that imports sympy (about a second, on first use); and allocated in dtype at once.
        model._apply(lambda t: torch.empty(t.shape, device=device,
                                           dtype=dtype if t.is_floating_point() else t.dtype))
        model.tie_weights()  # each parameter got its own storage
        return model

    def tie_weights(self) -> None:
        """Share the LM head with the token embedding when the config ties them (GPT-2)."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @property
    def rope_inv_freq(self) -> torch.Tensor:
        """RoPE inverse frequencies, fp32 on the model's device.

        Not a buffer: ``model.to(torch.bfloat16)`` would round them, and positions times a
        rounded frequency drift far from the checkpoint's angles at long contexts.
        """
        device = self.norm.weight.device  # (not the embedding's: quant/ may hold it packed)
        if self._rope_inv_freq is None or self._rope_inv_freq.device != device:
            c = self.config
            self._rope_inv_freq = inverse_frequencies(c.head_dim, c.rope_theta, c.rope_scaling).to(device)
        return self._rope_inv_freq

    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/√(2·n_layer), zero biases.

        ``config.init == "pytorch"``: every layer's own PyTorch default instead, as Raschka's GPTModel
        keeps them (embeddings N(0, 1), linear weights and biases U(±1/√fan_in), norms 1 and 0).
        """
        if self.embed_tokens.weight.is_meta:
            # Transformer.empty: no data to fill, and normal_ on meta tensors imports torch._dynamo (seconds)
            return
        if self.config.init == "pytorch":
            for module in self.modules():
                if module is not self and hasattr(module, "reset_parameters"):
                    module.reset_parameters()
            return
        std = 0.02
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                residual = name.endswith(("o_proj.weight", "down_proj.weight"))
                scale = 1 / math.sqrt(2 * self.config.n_layer) if residual else 1.0
                nn.init.normal_(p, mean=0.0, std=std * scale)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.ones_(p)  # norm scales

    def new_cache(self, batch_size: int, max_length: int | None = None,
                  dtype: torch.dtype | None = None) -> KVCache:
        param = self.norm.weight  # the model's float dtype, also when quant/ packs the embedding
        return KVCache(self.config, batch_size, max_length or self.config.context_length,
                       device=param.device, dtype=dtype or param.dtype)

    def forward(self, input_ids: torch.Tensor, *, cache: KVCache | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                return_hidden: bool = False) -> torch.Tensor:
        """Logits [B, T, V] for token ids [B, T].

        With ``cache``, the ids are the new tokens after ``cache.length`` cached ones.
        ``attention_mask`` [B, past + T] marks real tokens (1) and padding (0) over the whole
        sequence so far, or is the whole boolean mask [B, 1, T, past + T] (True = may attend; for
        several sequences packed in one row, which must each see themselves); ``position_ids``
        [B, T] default to past … past + T − 1.
        ``return_hidden`` returns the final normed hidden states instead of logits (for heads).
        """
        if cache is not None and self.decode_step is not None and not return_hidden:
            logits = self.decode_step(self, input_ids, cache, attention_mask, position_ids)
            if logits is not None:
                return logits
        past = cache.length if cache is not None else 0
        x = self.embed(input_ids, past, position_ids)
        rope, mask = self._rope_and_mask(input_ids, past, attention_mask, position_ids, x.dtype)
        for layer in self.layers:
            x = layer(x, rope, mask, cache)
        if cache is not None:
            cache.advance(input_ids.shape[1])
        x = self.norm(x)
        return x if return_hidden else self.lm_head(x)

    def hidden_states(self, input_ids: torch.Tensor, *, start_layer: int = 0, stop_layer: int | None = None,
                      hidden: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The hidden states [B, T, D] after layers ``start_layer .. stop_layer − 1`` (no cache).

        ``start_layer`` 0 starts from the embedded ``input_ids``; a later start continues from
        ``hidden``, the states after ``start_layer`` layers of the same ids.  ``stop_layer`` None
        runs the remaining layers and the final norm: what ``forward(..., return_hidden=True)``
        gives.  Split at any layer, the two halves compute exactly what one pass does (a frozen
        prefix can be run once and reused: ``finetune.classify``).
        """
        x = self.embed(input_ids, 0, position_ids) if start_layer == 0 else hidden
        if x is None:
            raise ValueError("hidden states are needed to start after layer 0")
        rope, mask = self._rope_and_mask(input_ids, 0, attention_mask, position_ids, x.dtype)
        for layer in self.layers[start_layer:stop_layer]:
            x = layer(x, rope, mask, None)
        return self.norm(x) if stop_layer is None else x

    def embed(self, input_ids: torch.Tensor, past: int, position_ids: torch.Tensor | None) -> torch.Tensor:
        """The input of the first layer for ids [B, T] after `past` cached positions: token embeddings
        (plus learned positions: `position_ids`, default past … past + T − 1), dropout applied."""
        t = input_ids.shape[1]
        if self.embed_positions is not None:  # a learned table has no row past the context
            given = position_ids is not None and position_ids.numel() > 0
            end = int(position_ids.max()) + 1 if given else past + t  # type: ignore[union-attr]
            if end > self.config.context_length:
                raise ValueError(f"sequence of {end} tokens exceeds the context length "
                                 f"{self.config.context_length}")
        x = self.embed_tokens(input_ids)
        if self.embed_positions is not None:
            # Default positions: add a slice of the table, broadcast over the batch; its backward is
            # one sum instead of a scatter of B·T rows.
            if position_ids is None:
                x = x + self.embed_positions.weight[past:past + t]
            else:
                x = x + self.embed_positions(position_ids)
        return self.dropout(x)

    def _rope_and_mask(self, input_ids: torch.Tensor, past: int, attention_mask: torch.Tensor | None,
                       position_ids: torch.Tensor | None, dtype: torch.dtype,
                       ) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, torch.Tensor | None]:
        b, t = input_ids.shape
        rope = None
        if self.embed_positions is None:
            if position_ids is None:
                position_ids = torch.arange(past, past + t, device=input_ids.device).expand(b, t)
            rope = rope_cos_sin(self.rope_inv_freq, position_ids, dtype)
        return rope, self._mask(t, past, attention_mask, input_ids.device)

    @staticmethod
    def _mask(t: int, past: int, attention_mask: torch.Tensor | None, device) -> torch.Tensor | None:
        """Boolean [B|1, 1, T, past+T] mask (True = may attend), or None for the plain causal case.

        A query always sees itself, so rows of left padding never become all −∞ (NaN).  A mask
        without padding is dropped, so SDPA keeps its causal fast path.
        """
        if attention_mask is not None and attention_mask.dim() == 4:  # the whole mask, as given
            return attention_mask.bool()
        s = past + t
        if attention_mask is not None and bool(attention_mask[:, :s].all()):
            attention_mask = None
        if attention_mask is None and (past == 0 or t == 1):
            return None
        causal = torch.ones(t, s, dtype=torch.bool, device=device).tril(past)
        if attention_mask is None:
            return causal[None, None]
        keys = attention_mask[:, None, None, :s].bool()
        diagonal = torch.zeros(t, s, dtype=torch.bool, device=device)
        diagonal[torch.arange(t), past + torch.arange(t)] = True
        return causal & (keys | diagonal)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights are one parameter
