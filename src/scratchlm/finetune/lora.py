"""LoRA (Hu et al., 2021): low-rank adapters on linear layers, saved and loaded in PEFT's format.

A ``LoRALinear`` wraps a frozen ``nn.Linear`` W (and bias b) and adds a trainable rank-r update::

    y = W x + b + scale · B A dropout(x)        A [r, in], B [out, r], scale = alpha / r

as ``peft`` defines it: A starts Kaiming-uniform (``kaiming_uniform_(a=√5)``, nn.Linear's own
default, which peft's ``reset_lora_parameters`` uses), B starts at zero so the adapted model
starts as the base model, dropout touches only the adapter's input, and ``rslora`` (off by
default) scales by alpha/√r instead.  ``merge`` folds scale·B·A into W (and ``unmerge`` takes it
out again); ``merge_lora`` does that for a whole model and leaves plain ``nn.Linear`` layers.

Targets are Hugging Face module names, derived from ``checkpoint.hf``'s per-family weight table
(one table for import, export and LoRA, so the names cannot drift): ``q_proj, k_proj, v_proj,
o_proj, gate_proj, up_proj, down_proj`` for Llama-family models; ``c_attn``, ``attn.c_proj``,
``c_fc``, ``mlp.c_proj`` (or ``c_proj`` for both) for GPT-2, as peft names them.  GPT-2 fuses q, k
and v into one ``c_attn`` [3d, d] that our model holds as three projections.  A peft LoRA on
``c_attn`` has one A [r, d] and one B [3d, r]; here the three ``LoRALinear`` of a fused module
share that one A (the same ``nn.Parameter``) and each holds its rows of B.  The function, the
gradients (A's gradient is the sum over its three uses, as it is for the fused A) and every
elementwise optimizer step are the same as peft's, so the file round-trips exactly both ways.
(In training with dropout > 0, q, k and v draw their own dropout masks where peft draws one for
the fused input: the same distribution per projection; at evaluation dropout is the identity.)

PEFT format: ``adapter_config.json`` (``peft_type: LORA``, ``r``, ``lora_alpha``, ...) and
``adapter_model.safetensors`` with keys ``base_model.model.<HF module>.lora_A.weight`` /
``.lora_B.weight``, so ``PeftModel.from_pretrained(hf_base, dir)`` opens what ``save_adapter``
writes, and ``load_adapter`` opens what peft saves.  GPT-2's Conv1D layout (``fan_in_fan_out``)
transposes only the base weight, never A or B: the adapter tensors are the same in both layouts.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.errors import CheckpointError, ConfigError
from scratchlm.finetune.lora_config import ALL_LINEAR, LoRAConfig, lora_scale

__all__ = [
    "ALL_LINEAR", "ADAPTER_CONFIG_FILE", "ADAPTER_WEIGHTS_FILE", "AdapterBaseWarning", "LoRAConfig",
    "LoRALinear", "LinearTarget", "adapter_parameters", "apply_lora", "disable_adapters", "has_lora",
    "linear_targets", "load_adapter", "lora_param_groups", "merge_lora", "resolve_targets", "save_adapter",
]

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
_ADAPTER_PICKLE_FILE = "adapter_model.bin"  # older peft versions
_PEFT_PREFIX = "base_model.model."  # PeftModelForCausalLM.base_model (LoraModel).model (the HF model)
_PEFT_KEY = re.compile(re.escape(_PEFT_PREFIX) + r"(?P<module>.+)\.lora_(?P<which>[AB])\.weight")


class AdapterBaseWarning(UserWarning):
    """An adapter names another base model than the one it is applied to (its shapes fit)."""


# --------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearTarget:
    """One Hugging Face linear module and the projection(s) of ours that hold it.

    ``hf_name`` is the module's full HF name (``model.layers.0.self_attn.q_proj``,
    ``transformer.h.0.attn.c_attn``); ``ours`` our module names (three for GPT-2's fused
    ``c_attn``); ``short`` the name a user passes as a target (``q_proj``, ``c_attn``,
    ``attn.c_proj``); ``in_block`` is False for the LM head (which ``all-linear`` leaves out).
    """

    hf_name: str
    ours: tuple[str, ...]
    conv1d: bool
    short: str
    in_block: bool

    def matches(self, target: str) -> bool:
        if target == ALL_LINEAR:
            return self.in_block
        return self.hf_name == target or self.hf_name.endswith("." + target)


def _family(model: nn.Module) -> Any:
    from scratchlm.checkpoint.hf import family_for_config
    from scratchlm.models.transformer import Transformer

    if not isinstance(model, Transformer):
        arch = getattr(getattr(model, "config", None), "arch", type(model).__name__)
        raise ConfigError(f"LoRA adapts transformer models; this model is a {arch}",
                          "load a transformer (a GPT-2 or Llama-family model)")
    return family_for_config(model.config)


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def linear_targets(model: nn.Module) -> list[LinearTarget]:
    """Every linear module of ``model`` that can carry an adapter, by its Hugging Face name.

    Derived from the family's weight table (``checkpoint.hf``): each ``.weight`` row whose
    parameters belong to linear layers of ours.  A tied LM head is left out: its weight is the
    token embedding.
    """
    family = _family(model)
    n_layer = model.config.n_layer
    found: list[tuple[str, tuple[str, ...], bool, str, bool]] = []
    for row in family.rows:
        if not row.hf.endswith(".weight"):
            continue
        in_block = "{i}" in row.hf
        relative = row.hf.split("{i}.", 1)[-1].removesuffix(".weight")
        for hf_name, ours in row.expand(n_layer):
            modules = tuple(name.removesuffix(".weight") for name in ours)
            found_modules = [_submodule(model, m) for m in modules]
            if not all(isinstance(m, (nn.Linear, LoRALinear)) for m in found_modules):
                continue  # an embedding, a norm, or a projection this config lacks
            if not in_block and _base(found_modules[0]).weight is model.embed_tokens.weight:
                continue  # a tied head
            found.append((hf_name.removesuffix(".weight"), modules, row.conv1d, relative, in_block))
    # The short name: the last component when that is unambiguous (q_proj, c_attn), else the path
    # within the block (GPT-2 has attn.c_proj and mlp.c_proj).
    relatives = {relative for *_, relative, _ in found}
    lasts = [relative.rsplit(".", 1)[-1] for relative in relatives]

    def short(relative: str) -> str:
        last = relative.rsplit(".", 1)[-1]
        return last if lasts.count(last) == 1 else relative

    return [LinearTarget(hf_name, modules, conv1d, short(relative), in_block)
            for hf_name, modules, conv1d, relative, in_block in found]


def _names(targets: Sequence[LinearTarget]) -> str:
    return ", ".join(dict.fromkeys(t.short for t in targets))


def resolve_targets(model: nn.Module, config: LoRAConfig) -> list[LinearTarget]:
    """The modules ``config.targets`` selects; an unknown target is a one-line error naming them all."""
    available = linear_targets(model)
    unknown = [t for t in config.targets if not any(x.matches(t) for x in available)]
    if unknown:
        raise ConfigError(f"unknown LoRA target{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: "
                          f"this model's linear modules are {_names(available)}",
                          f"pass --lora-targets with some of those names, or {ALL_LINEAR}")
    return [x for x in available if any(x.matches(t) for t in config.targets)]


# --------------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------------


class LoRALinear(nn.Module):
    """``base(x) + scale · B A dropout(x)`` over a frozen ``nn.Linear`` (kept as ``self.base``).

    Invariants: ``base``'s parameters do not require gradients; ``lora_A`` is [r, in] and
    ``lora_B`` [out, r] in the base weight's dtype and device; ``lora_A`` may be shared with the
    other parts of a fused module (pass it as ``lora_A``), ``lora_B`` never is.  When ``merged``,
    the base weight holds the update and the adapter path is skipped.  ``disabled`` (see
    ``disable_adapters``) skips the adapter path of an unmerged layer.

    Not an ``nn.Linear`` on purpose: code that reads ``.weight`` of a linear layer (fp16 packing,
    stacking q/k/v) would silently drop the adapter; it fails loudly here instead, and those
    paths merge first.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 lora_A: nn.Parameter | None = None):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.rank, self.alpha, self.rslora = rank, alpha, rslora
        self.scale = lora_scale(alpha, rank, rslora)
        like = {"device": base.weight.device, "dtype": base.weight.dtype}
        if lora_A is None:
            lora_A = nn.Parameter(torch.empty(rank, base.in_features, **like))
            nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
        elif tuple(lora_A.shape) != (rank, base.in_features):
            raise ValueError(f"shared lora_A has shape {tuple(lora_A.shape)}, "
                             f"expected {(rank, base.in_features)}")
        self.lora_A = lora_A
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **like))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False
        self._cast: tuple[torch.Tensor, int, torch.Tensor] | None = None  # see _base_forward

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._base_forward(x)
        if self.merged or self.disabled:
            return y
        # y + scale · (A x) Bᵀ as one addmm: the product accumulates into y's copy, with no separate
        # passes over [tokens, out] for the scaling and the sum
        h = F.linear(self.dropout(x), self.lora_A)
        out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), self.lora_B.t(),
                          alpha=self.scale)
        return out.view(y.shape)

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base(x)``; under autocast, with the frozen weight cast to autocast's dtype once and kept
        rather than at every call (autocast keeps casts of tensors that require gradients only, so
        it would cast every frozen base weight in every forward pass).  The kept copy is renewed
        when the weight changes (merging, loading: its version counter) and dropped outside
        autocast."""
        base, device = self.base, x.device.type
        if not (isinstance(base, nn.Linear) and torch.is_autocast_enabled(device)):
            self._cast = None
            return self.base(x)
        weight, dtype = base.weight, torch.get_autocast_dtype(device)
        kept = self._cast
        if kept is None or kept[0] is not weight or kept[1] != weight._version or kept[2].dtype != dtype:
            kept = self._cast = (weight, weight._version, weight.detach().to(dtype))
        return F.linear(x, kept[2], base.bias)

    def delta_weight(self) -> torch.Tensor:
        """scale · B A, [out, in], computed in fp32 and returned in the base weight's dtype."""
        delta = (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scale
        return delta.to(self.base.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Add scale · B A into the base weight (idempotent)."""
        if self.disabled:
            raise ConfigError("cannot merge adapters while they are disabled",
                              "merge outside the disable_adapters block")
        if not self.merged:
            self.base.weight.add_(self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update out of the base weight again (exact up to one rounding per weight)."""
        if self.merged:
            self.base.weight.sub_(self.delta_weight())
            self.merged = False

    def extra_repr(self) -> str:
        return (f"rank={self.rank}, alpha={self.alpha}, scale={self.scale:g}"
                f"{', rslora' if self.rslora else ''}{', merged' if self.merged else ''}")


def _base(module: nn.Module) -> nn.Linear:
    return module.base if isinstance(module, LoRALinear) else module


def _lora_modules(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def has_lora(model: nn.Module) -> bool:
    """Whether ``model`` carries LoRA adapters (merged in place or not)."""
    return bool(_lora_modules(model))


# --------------------------------------------------------------------------------------------
# Model-level operations
# --------------------------------------------------------------------------------------------


def _inject(model: nn.Module, targets: Sequence[LinearTarget], config: LoRAConfig,
            ranks: Mapping[str, int] | None = None) -> None:
    """Wrap each target's projection(s) in ``LoRALinear``; a fused target's parts share one A."""
    for target in targets:
        rank = (ranks or {}).get(target.hf_name, config.rank)
        shared: nn.Parameter | None = None
        for name in target.ours:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            layer = LoRALinear(getattr(parent, child), rank, config.alpha, config.dropout, config.rslora,
                               lora_A=shared)
            shared = layer.lora_A
            setattr(parent, child, layer)


def apply_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Put adapters on the layers ``config.targets`` names, in place; returns ``model``.

    Every parameter of the model is frozen first, so only the adapters train; a caller that
    trains more (a classification head, a norm) sets ``requires_grad`` on those afterwards.
    """
    if has_lora(model):
        raise ConfigError("the model has LoRA adapters already",
                          "merge them first (merge_lora), or start from the base model")
    targets = resolve_targets(model, config)
    model.requires_grad_(False)
    _inject(model, targets, config)
    return model


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' A and B matrices, each once (a fused module's shared A appears once)."""
    seen: dict[int, nn.Parameter] = {}
    for module in _lora_modules(model):
        for p in (module.lora_A, module.lora_B):
            seen.setdefault(id(p), p)
    return list(seen.values())


def lora_param_groups(model: nn.Module, weight_decay: float = 0.0,
                      adapter_weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """AdamW parameter groups for a model with adapters.

    The adapters decay with ``adapter_weight_decay`` (0 unless asked: decaying A and B pulls the
    update toward zero, which is a different regulariser than decaying the weights); every other
    trainable parameter (a head the caller unfroze) follows the training loop's rule with
    ``weight_decay`` (matrices decay, vectors do not).  Empty groups are left out.
    """
    from scratchlm.training.optim import param_groups

    adapters = adapter_parameters(model)
    ids = {id(p) for p in adapters}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    groups = [{"params": adapters, "weight_decay": adapter_weight_decay}, *param_groups(others, weight_decay)]
    return [g for g in groups if g["params"]]


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain ``nn.Linear`` back, in place.

    The result has no LoRA modules: it saves, exports and packs like any model, and its logits
    equal the adapted model's (to float rounding).  ``requires_grad`` stays as ``apply_lora`` set it.
    """
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                if child.disabled:
                    raise ConfigError("cannot merge adapters while they are disabled",
                                      "merge outside the disable_adapters block")
                child.merge()
                setattr(parent, name, child.base)
    return model


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as its base model inside the block (DPO's reference model is this).

    Adapters merged into the weights (``LoRALinear.merge``) cannot be switched off this way.
    """
    modules = _lora_modules(model)
    if any(m.merged for m in modules):
        raise ConfigError("the adapters are merged into the weights, so they cannot be disabled",
                          "unmerge them first (LoRALinear.unmerge), or keep them unmerged")
    before = [m.disabled for m in modules]
    for m in modules:
        m.disabled = True
    try:
        yield model
    finally:
        for m, state in zip(modules, before, strict=True):
            m.disabled = state


# --------------------------------------------------------------------------------------------
# PEFT-format files
# --------------------------------------------------------------------------------------------


@dataclass
class _Adapted:
    """One targeted HF module of a model with adapters: its parts, checked to form one peft LoRA."""

    target: LinearTarget
    parts: list[LoRALinear] = field(default_factory=list)

    @property
    def lora_A(self) -> torch.Tensor:
        return self.parts[0].lora_A

    @property
    def lora_B(self) -> torch.Tensor:
        return torch.cat([p.lora_B.detach() for p in self.parts], dim=0)


def _adapted(model: nn.Module) -> list[_Adapted]:
    """The model's adapters grouped by HF module; refuses layouts peft cannot express."""
    adapted: list[_Adapted] = []
    covered: set[int] = set()
    for target in linear_targets(model):
        parts = [model.get_submodule(name) for name in target.ours]
        if not any(isinstance(p, LoRALinear) for p in parts):
            continue
        if not all(isinstance(p, LoRALinear) and p.lora_A is parts[0].lora_A for p in parts):
            raise ConfigError(f"{target.hf_name} fuses {', '.join(target.ours)}, whose adapters do not share "
                              "one A matrix, so the adapter has no PEFT form",
                              "put adapters on the fused module as a whole (apply_lora with its HF name)")
        if any(p.merged for p in parts):
            raise ConfigError("the adapters are merged into the weights",
                              "save the adapter before merging, or unmerge first")
        adapted.append(_Adapted(target, parts))
        covered.update(id(p) for p in parts)
    stray = [m for m in _lora_modules(model) if id(m) not in covered]
    if stray:
        raise ConfigError("the model has adapters on layers without a Hugging Face name",
                          "put adapters on the layers apply_lora targets")
    if not adapted:
        raise ConfigError("the model has no LoRA adapters to save", "apply_lora first")
    return adapted


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else float(value)


def _target_modules(adapted: Sequence[_Adapted], available: Sequence[LinearTarget]) -> list[str]:
    """peft's ``target_modules``: short names where every module of that name is adapted, else full names."""
    chosen = {a.target.hf_name for a in adapted}
    names: list[str] = []
    for short in dict.fromkeys(t.short for t in available):
        group = [t.hf_name for t in available if t.short == short]
        if all(name in chosen for name in group):
            names.append(short)
        else:
            names.extend(name for name in group if name in chosen)
    return names


def _base_name(ref: str | Path | None) -> str | None:
    """A local path made absolute (so it means the same from any working directory); a hub id as is."""
    if ref is None:
        return None
    path = Path(ref).expanduser()
    return str(path.resolve()) if path.exists() else str(ref)


def save_adapter(model: nn.Module, directory: str | Path, base_model_name_or_path: str | Path | None,
                 *, task_type: str = "CAUSAL_LM", metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``model``'s adapters as a PEFT adapter directory; returns it.

    ``adapter_model.safetensors`` holds ``base_model.model.<HF module>.lora_A.weight`` [r, in] and
    ``lora_B.weight`` [out, r] for each adapted module (GPT-2's q/k/v joined into ``c_attn``);
    ``adapter_config.json`` holds peft's keys.  ``base_model_name_or_path`` names the base (a local
    path is stored absolute) rather than copying it.  ``metadata`` goes into the safetensors
    header beside ``format: pt`` (a run's save id, so a resume can check the files belong together).

    Each file is written atomically, the weights first, so neither is ever half-written.  A crash
    between the two renames leaves the new weights beside the previous config, which is the same
    file for every save of one run (and a first save without its config is refused on load).
    """
    from scratchlm.checkpoint.io import save_tensors_atomic, write_json_atomic

    adapted = _adapted(model)
    first = adapted[0].parts[0]
    for a in adapted:
        p = a.parts[0]
        if (p.alpha, p.rslora, _dropout(p)) != (first.alpha, first.rslora, _dropout(first)):
            raise ConfigError("the adapters differ in alpha, rsLoRA or dropout, which one PEFT config "
                              "cannot express", "use one LoRAConfig for the whole model")
    ranks = [a.parts[0].rank for a in adapted]
    rank = max(set(ranks), key=ranks.count)
    tensors: dict[str, torch.Tensor] = {}
    for a in adapted:
        key = _PEFT_PREFIX + a.target.hf_name
        tensors[key + ".lora_A.weight"] = a.lora_A.detach()
        tensors[key + ".lora_B.weight"] = a.lora_B
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": _base_name(base_model_name_or_path),
        "r": rank,
        "lora_alpha": _number(first.alpha),
        "lora_dropout": _dropout(first),
        "target_modules": _target_modules(adapted, linear_targets(model)),
        "fan_in_fan_out": any(a.target.conv1d for a in adapted),
        "bias": "none",
        "lora_bias": False,
        "use_rslora": first.rslora,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        # per-module ranks (a loaded peft adapter may have them); keys are full module names
        "rank_pattern": {a.target.hf_name: r for a, r in zip(adapted, ranks, strict=True) if r != rank},
        "alpha_pattern": {},
        "revision": None,
    }
    directory = Path(directory)
    save_tensors_atomic(directory / ADAPTER_WEIGHTS_FILE, tensors, {**(metadata or {}), "format": "pt"})
    write_json_atomic(directory / ADAPTER_CONFIG_FILE, config)
    return directory


def _dropout(layer: LoRALinear) -> float:
    return layer.dropout.p if isinstance(layer.dropout, nn.Dropout) else 0.0


def _shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _read_adapter_config(directory: Path) -> dict[str, Any]:
    path = directory / ADAPTER_CONFIG_FILE
    fix = f"pass a PEFT adapter directory ({ADAPTER_CONFIG_FILE} + {ADAPTER_WEIGHTS_FILE})"
    if not directory.is_dir():
        raise CheckpointError(f"adapter directory {directory} not found", fix)
    if not path.is_file():
        raise CheckpointError(f"{directory} has no {ADAPTER_CONFIG_FILE}, so it is not a PEFT adapter", fix)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {err}".replace("\n", " "), "restore the file") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is not a JSON object", "restore the file")
    refused = [
        (config.get("peft_type") != "LORA", f"peft_type {config.get('peft_type')!r} (only LORA)"),
        (bool(config.get("use_dora")), "DoRA (use_dora)"),
        (config.get("bias", "none") != "none" or bool(config.get("lora_bias")),
         "trained biases (bias, lora_bias)"),
        (bool(config.get("alpha_pattern")), "per-module alphas (alpha_pattern)"),
        (bool(config.get("modules_to_save")), f"modules_to_save {config.get('modules_to_save')!r}"),
        (bool(config.get("trainable_token_indices")), "trainable tokens (trainable_token_indices)"),
        (bool(config.get("layer_replication")), "layer_replication"),
    ]
    what = [message for bad, message in refused if bad]
    if what:
        raise CheckpointError(f"the adapter in {directory} uses {', '.join(what)}, which scratchlm does not "
                              "implement", "use a plain LoRA adapter")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or isinstance(config.get(key), bool):
            raise CheckpointError(f"{path} has no valid {key!r}", "restore the file")
    return config


def _read_adapter_tensors(directory: Path) -> tuple[dict[str, torch.Tensor], Path]:
    path = directory / ADAPTER_WEIGHTS_FILE
    if path.is_file():
        from safetensors.torch import load_file

        try:
            return load_file(str(path)), path
        except Exception as err:  # safetensors raises its own error types for corrupt files
            raise CheckpointError(f"cannot read {path}: {err}".replace("\n", " "),
                                  "the file is corrupt; save the adapter again") from None
    if (directory / _ADAPTER_PICKLE_FILE).is_file():
        from scratchlm.checkpoint.hf import _load_pickle

        return _load_pickle(directory / _ADAPTER_PICKLE_FILE), directory / _ADAPTER_PICKLE_FILE
    raise CheckpointError(f"{directory} has no {ADAPTER_WEIGHTS_FILE}",
                          "the adapter directory is incomplete; save it again")


def _same_base(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def load_adapter(model: nn.Module, directory: str | Path, *, base: str | Path | None = None) -> LoRAConfig:
    """Apply the PEFT LoRA adapter in ``directory`` to ``model``, in place; returns its ``LoRAConfig``.

    Strict about what decides the function: every tensor must name a linear module of this
    model (by its HF name) with the shapes that module needs, and each A needs its B; otherwise
    a one-line ``CheckpointError`` names the tensor.  The adapter's ``base_model_name_or_path``
    is only a label (the same weights live under a hub id, a local copy, a cache snapshot or a
    .gguf file), so when ``base`` (the reference the model was loaded from) names another model,
    an ``AdapterBaseWarning`` says so and the adapter is applied: the shapes were checked.
    Per-module ranks (peft's ``rank_pattern``) are read from the shapes of A.
    """
    directory = Path(directory).expanduser()
    config = _read_adapter_config(directory)
    tensors, source = _read_adapter_tensors(directory)
    if has_lora(model):
        raise ConfigError("the model has LoRA adapters already",
                          "load one adapter per model (merge the first one with merge_lora to stack them)")
    available = {t.hf_name: t for t in linear_targets(model)}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _PEFT_KEY.fullmatch(key)
        if match is None:
            raise CheckpointError(f"tensor {key!r} in {source} is not a LoRA A or B matrix of a linear layer",
                                  "scratchlm loads plain LoRA adapters (lora_A / lora_B weights)")
        module = match["module"]
        if module not in available:
            raise CheckpointError(f"tensor {key!r} in {source} is for {module}, which this model does not "
                                  f"have (its linear modules: {_names(list(available.values()))})",
                                  "the adapter was trained for another base model")
        pairs.setdefault(module, {})[match["which"]] = tensor
    if not pairs:
        raise CheckpointError(f"{source} holds no LoRA tensors", "save the adapter again")
    declared_rank = int(config["r"])
    ranks: dict[str, int] = {}
    for module, pair in pairs.items():
        target = available[module]
        for which in "AB":
            if which not in pair:
                raise CheckpointError(f"{source} has no tensor {_PEFT_PREFIX + module}.lora_{which}.weight "
                                      f"beside its lora_{'B' if which == 'A' else 'A'}",
                                      "the adapter file is incomplete; save it again")
        parts = [_base(model.get_submodule(name)) for name in target.ours]
        rank = pair["A"].shape[0] if pair["A"].dim() == 2 else -1
        if not config.get("rank_pattern") and rank != declared_rank:
            rank = declared_rank  # so that the shape error below names the tensor
        expected = {"A": (rank, parts[0].in_features), "B": (sum(p.out_features for p in parts), rank)}
        for which in "AB":
            if tuple(pair[which].shape) != expected[which]:
                raise CheckpointError(
                    f"tensor {_PEFT_PREFIX + module}.lora_{which}.weight in {source} has shape "
                    f"{_shape(pair[which].shape)}, but {module} of this model needs "
                    f"{_shape(expected[which])}",
                    "the adapter was trained for another base model")
        ranks[module] = rank
    if base is not None and config.get("base_model_name_or_path") is not None \
            and not _same_base(str(config["base_model_name_or_path"]), str(base)):
        warnings.warn(f"the adapter in {directory} was trained on {config['base_model_name_or_path']!r}, "
                      f"not {str(base)!r}; its shapes fit, so it is applied", AdapterBaseWarning,
                      stacklevel=2)
    targets = [available[m] for m in pairs]
    names = _target_modules([_Adapted(t) for t in targets], list(available.values()))
    lora = LoRAConfig(rank=declared_rank, alpha=float(config["lora_alpha"]),
                      dropout=float(config.get("lora_dropout") or 0.0), targets=tuple(names),
                      rslora=bool(config.get("use_rslora", False)))
    model.requires_grad_(False)
    _inject(model, targets, lora, ranks)
    with torch.no_grad():
        for module, pair in pairs.items():
            layers = [model.get_submodule(name) for name in available[module].ours]
            layers[0].lora_A.copy_(pair["A"])
            for layer, rows in zip(layers, pair["B"].split([x.out_features for x in layers]), strict=True):
                layer.lora_B.copy_(rows)
    return lora
