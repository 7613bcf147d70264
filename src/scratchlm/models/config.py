"""Model configuration: one validated dataclass for every decoder family; presets are data (presets.py).

GPT-2, Llama, Qwen2/3 and SmolLM2 differ only by these flags (norm, positions, MLP, KV heads,
biases, q/k-norm, head size, tying), never by copied classes.  No torch import here: the CLI
lists presets without loading torch.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any

from scratchlm.errors import ConfigError

NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
POSITIONS = ("learned", "rope")
ROPE_SCALINGS = (None, "default", "linear", "llama3")  # rope.inverse_frequencies implements these
ARCHS = ("transformer", "elman", "lstm", "ngram")  # elman, lstm: models/rnn.py; ngram: models/ngram_module.py
RNN_BIASES = ("two", "one", "none")  # b_ih + b_hh as torch.nn.RNN/LSTM; one b per layer (Burkov); none
# Transformer initialisations: None or "gpt2" (N(0, 0.02), residual projections scaled down), or
# "pytorch": every layer's own default, as Raschka's GPTModel leaves them (nn.Embedding N(0, 1)).
INITS = (None, "gpt2", "pytorch")
# The NGramCounts smoothings that give a probability distribution after every context (what a language
# model behind the sampler and a loss in nats needs): not mle (zeros), backoff or stupid-backoff (scores).
NGRAM_SMOOTHINGS = ("kneser-ney", "laplace", "add-k")
NGRAM_FIELDS = ("ngram_order", "ngram_smoothing", "ngram_k", "ngram_discount")
# config.json before the overrides were named apart from the derived sizes (run dirs saved then
# still load): old key -> field.
_OLD_KEYS = {"n_kv_head": "n_kv_head_override", "head_dim": "head_dim_override",
             "intermediate_size": "intermediate_size_override"}


@dataclass
class ModelConfig:
    """Shape and flavour of a decoder-only transformer.

    Sizes follow GPT-2 names (``n_layer``, ``n_head``, ``n_embd``).  Three sizes are usually
    derived from those, and each has one name: a property giving the value the model uses, and an
    ``*_override`` field (None = derive) for the families that set it apart:

    * ``n_kv_head`` = ``n_kv_head_override`` or ``n_head`` (no grouped-query attention);
    * ``head_dim`` = ``head_dim_override`` or ``n_embd // n_head`` (Qwen3 sets it apart);
    * ``intermediate_size`` = ``intermediate_size_override`` or 4 × ``n_embd`` (the MLP's width).

    Keeping the override apart from the value means ``replace(n_embd=...)`` derives again, and a
    saved config records what was chosen, not what followed from it.
    """

    vocab_size: int = 50257
    context_length: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_kv_head_override: int | None = None
    head_dim_override: int | None = None
    intermediate_size_override: int | None = None
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    norm_bias: bool = True  # LayerNorm shift (GPT-2); RMSNorm has none
    mlp: str = "gelu"  # "gelu": GELU (tanh approximation) MLP; "swiglu": down(silu(gate(x)) * up(x))
    mlp_bias: bool = True
    positions: str = "learned"  # "learned": GPT-2 position table; "rope": rotary, rotate-half convention
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    qkv_bias: bool = True
    o_bias: bool = True
    qk_norm: bool = False  # Qwen3: RMSNorm over each head's q and k before RoPE
    tie_embeddings: bool = True
    dropout: float = 0.0
    init: str | None = None  # see INITS; None: "gpt2"
    name: str = field(default="custom", compare=False)
    # Recurrent LMs (models/rnn.py) use vocab_size, context_length (training window and generation
    # limit), n_layer, n_embd (embedding size), dropout and tie_embeddings, plus these.
    arch: str = "transformer"  # "transformer", or "elman" / "lstm" for a recurrent LM
    rnn_hidden: int | None = None  # hidden size of each recurrent layer; None: n_embd (Burkov)
    rnn_bias: str = "two"  # see RNN_BIASES; "two" copies to and from torch.nn.RNN/LSTM unchanged
    # Count-based LMs (arch "ngram", models/ngram_module.py) use vocab_size and context_length (the
    # longest prompt + generation; the model itself reads only the last ngram_order - 1 tokens) plus
    # these, passed to models.ngram.NGramCounts.  None elsewhere.
    ngram_order: int | None = None  # N: each token is predicted from the N - 1 before it
    ngram_smoothing: str | None = None  # one of NGRAM_SMOOTHINGS
    ngram_k: float | None = None  # add-k's k (None: 1)
    ngram_discount: float | None = None  # Kneser-Ney: a fixed discount (nltk's); None: modified KN

    def __post_init__(self) -> None:
        self.validate()

    # Derived sizes -----------------------------------------------------------------------
    @property
    def n_kv_head(self) -> int:
        """Key/value heads: each is shared by ``n_head // n_kv_head`` query heads."""
        return self.n_kv_head_override or self.n_head

    @property
    def head_dim(self) -> int:
        """The size of one attention head (of q, k and v alike)."""
        return self.head_dim_override or self.n_embd // self.n_head

    @property
    def intermediate_size(self) -> int:
        """The MLP's hidden width."""
        return self.intermediate_size_override or 4 * self.n_embd

    def validate(self) -> None:
        if self.init not in INITS:
            raise ConfigError(f"unknown init {self.init!r}", "use 'gpt2' or 'pytorch'")
        if self.arch != "ngram":
            given = [k for k in NGRAM_FIELDS if getattr(self, k) is not None]
            if given:
                raise ConfigError(f"{given[0]} is set but arch is {self.arch!r}",
                                  "the ngram_* fields configure arch 'ngram' only")
        if self.arch == "ngram":
            self._validate_ngram()
            return
        if self.arch != "transformer":
            self._validate_recurrent()
            return
        for key in ("vocab_size", "context_length", "n_layer", "n_head", "n_embd"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{key} must be a positive integer, got {value!r}", "fix the model config")
        for key, allowed in (("norm", NORMS), ("mlp", MLPS), ("positions", POSITIONS)):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"unknown {key} {getattr(self, key)!r}", f"use one of {', '.join(allowed)}")
        if self.head_dim_override is None and self.n_embd % self.n_head:
            raise ConfigError(
                f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}",
                "pick sizes where n_embd = n_head × head size, or set head_dim_override",
            )
        if self.n_head % self.n_kv_head:
            raise ConfigError(
                f"n_head {self.n_head} is not a multiple of n_kv_head {self.n_kv_head}",
                "grouped-query attention needs each key/value head shared by a whole number of query heads",
            )
        if self.positions == "rope" and self.head_dim % 2:
            raise ConfigError(f"RoPE needs an even head size, got {self.head_dim}",
                              "change head_dim_override or n_head")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ROPE_SCALINGS:
                raise ConfigError(f"rope scaling type {kind!r} is not implemented",
                                  f"use one of {', '.join(k for k in ROPE_SCALINGS if k)} or none")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}", "fix the model config")

    # Serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """The config ``to_dict`` wrote; also the older form, whose overrides had the plain names."""
        data = dict(data)
        for old, new in _OLD_KEYS.items():
            if old in data and new not in data:
                data[new] = data.pop(old)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"unknown model config keys: {', '.join(unknown)}",
                "the config was written by another tool or version; convert it with 'scratchlm convert'",
            )
        return cls(**data)

    def replace(self, **overrides: Any) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(self)}
        for key in overrides:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=3)
                hint = f"did you mean {', '.join(close)}?" if close else "see ModelConfig's fields"
                raise ConfigError(f"unknown model config field {key!r}", hint)
        return dataclasses.replace(self, **overrides)

    def num_parameters(self) -> int:
        """Parameter count computed from the config alone (no torch); tied embeddings count once.

        An n-gram model has none to count here: its size is its number of distinct n-grams, which
        the training text decides (``NGramLM.num_parameters()`` once fitted).
        """
        if self.arch == "ngram":
            raise ConfigError("an n-gram model's size is the number of distinct n-grams in its training text",
                              "fit it first and count model.num_parameters()")
        if self.arch != "transformer":
            return self._recurrent_parameters()
        d, hd, f = self.n_embd, self.head_dim, self.intermediate_size
        q_out, kv_out = self.n_head * hd, self.n_kv_head * hd
        attn = d * q_out + 2 * d * kv_out + q_out * d
        attn += (q_out + 2 * kv_out if self.qkv_bias else 0) + (d if self.o_bias else 0)
        attn += 2 * hd if self.qk_norm else 0
        if self.mlp == "gelu":
            mlp = 2 * d * f + ((f + d) if self.mlp_bias else 0)
        else:
            mlp = 3 * d * f + ((2 * f + d) if self.mlp_bias else 0)
        norm = d * (2 if self.norm == "layernorm" and self.norm_bias else 1)
        block = attn + mlp + 2 * norm
        total = self.vocab_size * d + self.n_layer * block + norm
        if self.positions == "learned":
            total += self.context_length * d
        if not self.tie_embeddings:
            total += self.vocab_size * d
        return total

    # Recurrent LMs -----------------------------------------------------------------------
    @property
    def rnn_size(self) -> int:
        """Hidden size of the recurrent layers: ``rnn_hidden``, or the embedding size."""
        return self.rnn_hidden or self.n_embd

    def _validate_recurrent(self) -> None:
        if self.arch not in ARCHS:
            raise ConfigError(f"unknown arch {self.arch!r}", f"use one of {', '.join(ARCHS)}")
        for key in ("vocab_size", "context_length", "n_layer", "n_embd"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{key} must be a positive integer, got {value!r}", "fix the model config")
        if self.rnn_hidden is not None and (not isinstance(self.rnn_hidden, int) or self.rnn_hidden < 1):
            raise ConfigError(f"rnn_hidden must be a positive integer or None, got {self.rnn_hidden!r}",
                              "fix the model config (None: the embedding size)")
        if self.rnn_bias not in RNN_BIASES:
            raise ConfigError(f"unknown rnn_bias {self.rnn_bias!r}", f"use one of {', '.join(RNN_BIASES)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}", "fix the model config")
        if self.tie_embeddings and self.rnn_size != self.n_embd:
            raise ConfigError(
                f"tied embeddings need the hidden size ({self.rnn_size}) to equal the embedding size "
                f"({self.n_embd})",
                "set tie_embeddings=False, or rnn_hidden=None",
            )

    def _validate_ngram(self) -> None:
        for key in ("vocab_size", "context_length"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{key} must be a positive integer, got {value!r}", "fix the model config")
        order = self.ngram_order
        if isinstance(order, bool) or not isinstance(order, int) or order < 1:
            raise ConfigError(f"ngram_order must be an integer >= 1, got {order!r}",
                              "e.g. ngram_order=5 for a 5-gram model")
        if self.ngram_smoothing not in NGRAM_SMOOTHINGS:
            raise ConfigError(f"ngram_smoothing {self.ngram_smoothing!r} cannot drive a language model",
                              f"use one of {', '.join(NGRAM_SMOOTHINGS)} (the others are not distributions)")
        if self.ngram_smoothing == "kneser-ney" and order < 2:
            raise ConfigError("Kneser-Ney needs ngram_order >= 2", "use ngram_order >= 2, or laplace")
        if self.ngram_k is not None and not (isinstance(self.ngram_k, (int, float)) and self.ngram_k > 0):
            raise ConfigError(f"ngram_k must be > 0, got {self.ngram_k!r}", "e.g. ngram_k=0.1 (1 = Laplace)")
        d = self.ngram_discount
        if d is not None and not (isinstance(d, (int, float)) and 0 <= d <= 1):
            raise ConfigError(f"ngram_discount must be in [0, 1], got {d!r}",
                              "e.g. 0.1 (nltk's), or None for modified Kneser-Ney")

    def _recurrent_parameters(self) -> int:
        """Embedding V·E + per layer G·H·(in + H + biases) (G = 1 Elman, 4 LSTM) + head H·V (untied) + V."""
        e, h, v = self.n_embd, self.rnn_size, self.vocab_size
        gates = 4 if self.arch == "lstm" else 1
        biases = {"two": 2, "one": 1, "none": 0}[self.rnn_bias]
        stack = sum(gates * h * ((e if k == 0 else h) + h + biases) for k in range(self.n_layer))
        return v * e + stack + (0 if self.tie_embeddings else h * v) + v


def from_preset(name: str, **overrides: Any) -> ModelConfig:
    """A named preset, with fields overridden; an unknown name lists close matches."""
    from scratchlm.models.presets import PRESETS

    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=3, cutoff=0.4)
        hint = f"did you mean {', '.join(close)}?" if close else "run 'scratchlm presets' for the list"
        raise ConfigError(f"unknown preset {name!r}", hint)
    data = {**PRESETS[name], "name": name}
    config = ModelConfig(**data)
    return config.replace(**overrides) if overrides else config


def list_presets() -> list[str]:
    from scratchlm.models.presets import PRESETS

    return list(PRESETS)
