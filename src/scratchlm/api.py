"""``scratchlm.load(ref) -> LM``: the one handle to a model, for users, the CLI, chat, the server and evals.

An ``LM`` bundles the model, its tokenizer, its config and (later) its chat template, and offers
text in, text out through the one sampler (``scratchlm.generation``).  Nothing else in the
project opens weights by itself: it takes an ``LM``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scratchlm.errors import CheckpointError, ConfigError, UserError

if TYPE_CHECKING:
    import torch

    from scratchlm.generation import Completion, SamplingParams, TextStream

ACCEPTED = ("a run directory written by 'scratchlm pretrain', a Hugging Face model directory "
            "(config.json + model.safetensors), a Hugging Face hub id such as openai-community/gpt2, "
            "or a llama.cpp .gguf file")

# owner/name or name, as the hub spells ids; anything else that does not exist is a missing path.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class LM:
    """A loaded language model: ``lm.model(ids)`` gives logits [B, T, V]; ``lm.generate(prompt)`` text.

    ``tokenizer`` may be None (a Hugging Face directory without tokenizer files); the text methods
    then raise a ``UserError``.  ``chat_template`` stays None until the chat work fills it in.
    """

    model: Any
    tokenizer: Any
    config: Any
    chat_template: str | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generate(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                 **sampling: Any) -> str:
        """The continuation of ``prompt`` (text or token ids); sampling options as in ``SamplingParams``."""
        from scratchlm.generation import generate

        return generate(self.model, self._tokenizer(), prompt, params, **sampling)

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
               **sampling: Any) -> TextStream:
        """The continuation as text pieces; ``.completion`` holds the finish reason and counts afterwards."""
        from scratchlm.generation import stream

        return stream(self.model, self._tokenizer(), prompt, params, **sampling)

    def complete(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | None = None,
                 **sampling: Any) -> list[Completion]:
        """Complete several prompts in one batch: text, token ids, finish reason and token counts."""
        from scratchlm.generation import complete

        return complete(self.model, self._tokenizer(), prompts, params, **sampling)

    def save(self, run_dir: str | Path) -> Path:
        """Write a run dir (config, safetensors weights, tokenizer) that ``scratchlm.load`` opens again."""
        from scratchlm.checkpoint.io import save_run
        from scratchlm.generation.packed import is_packed

        if is_packed(self.model):
            raise UserError("this model's weights are packed in fp16 for CPU inference and cannot be saved",
                            "load it again without dtype float16 to save it")
        save_run(run_dir, self.model, self.config, self.tokenizer)
        return Path(run_dir)

    def _tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise UserError("this model has no tokenizer, so it cannot turn text into tokens",
                            "load a directory that includes tokenizer files, or call lm.model with token ids")
        return self.tokenizer


def load(ref: str | Path, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None) -> LM:
    """Open a model: a run dir, a Hugging Face directory, or a Hugging Face hub id.

    ``device`` None picks CUDA when available, else the CPU.  ``dtype`` (``"float32"``,
    ``"bfloat16"``, ``"float16"`` or a torch dtype) None keeps float32.  On the CPU, float16 keeps
    the weights in fp16 but computes in fp32 (``generation.packed``): half the bytes per token,
    so decoding is up to twice as fast, and the model is then for inference only.
    """
    import torch

    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = _torch_dtype(dtype)
    if device.type == "cpu" and torch_dtype == torch.float16:
        from scratchlm.generation.packed import pack_fp16

        lm = load(ref, device, torch.float32)
        pack_fp16(lm.model)
        return lm
    path = Path(ref).expanduser()
    if path.suffix == ".gguf":
        from scratchlm.checkpoint.gguf import load_gguf

        model, tokenizer, config = load_gguf(path, device, torch_dtype or torch.float32)
        return LM(model, tokenizer, config, getattr(tokenizer, "chat_template", None))
    if path.is_dir():
        from scratchlm.checkpoint.hf import is_hf_dir
        from scratchlm.checkpoint.io import is_run_dir

        if is_run_dir(path):
            from scratchlm.checkpoint.io import load_run

            model, tokenizer, config = load_run(path, device)
            if torch_dtype is not None:
                model = model.to(torch_dtype)
            return LM(model, tokenizer, config)
        if is_hf_dir(path):
            return _load_hf(path, device, torch_dtype)
        raise CheckpointError(f"{ref} is a directory but holds no model I can open",
                              f"load accepts {ACCEPTED}")
    if path.exists():
        raise CheckpointError(f"{ref} is a file, not a model I can open", f"load accepts {ACCEPTED}")
    text = str(ref)
    if _HUB_ID.fullmatch(text) and ".." not in text:
        return _load_hf(text, device, torch_dtype)
    raise CheckpointError(f"{ref} not found", f"load accepts {ACCEPTED}")


def _load_hf(ref: str | Path, device: torch.device, dtype: torch.dtype | None) -> LM:
    from scratchlm.checkpoint.hf import load_hf

    model, tokenizer, config = load_hf(ref, device, dtype)
    return LM(model, tokenizer, config)


def _torch_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}", f"use one of {', '.join(_DTYPES)}")
    return getattr(torch, name)
