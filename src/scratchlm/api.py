"""``scratchlm.load(ref) -> LM``: the one handle to a model, for users, the CLI, chat, the server and evals.

An ``LM`` bundles the model, its tokenizer, its config and (later) its chat template, and offers
text in, text out through the one sampler (``scratchlm.generation``).  Nothing else in the
project opens weights by itself: it takes an ``LM``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scratchlm.errors import CheckpointError, ConfigError, UserError

if TYPE_CHECKING:
    import torch

    from scratchlm.generation import Completion, SamplingParams, TextStream
    from scratchlm.models.config import ModelConfig
    from scratchlm.models.protocols import CausalLM
    from scratchlm.tokenizers import Tokenizer

ACCEPTED = ("a run directory written by 'scratchlm pretrain', a Hugging Face model directory "
            "(config.json + model.safetensors), a Hugging Face hub id such as openai-community/gpt2, "
            "or a llama.cpp .gguf file")

# owner/name or name, as the hub spells ids; anything else that does not exist is a missing path.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
DTYPES = ("float32", "bfloat16", "float16")  # what load's dtype (and the CLI's --dtype) accept
# Packed weights (quant/): "gguf" keeps a .gguf file's own types; the others quantize at load.
QUANT_DTYPES = ("gguf", "q8_0", "q4_0", "q4_1")
# Asked for, measured, not offered (generation.packed says why): one line saying what to use instead.
_REFUSED_DTYPES = {
    name: f"{name} weights are not offered: the CPU kernels torch ships for them are no faster than "
          "float16 here or change greedy answers (int8 quantizes activations to 7 bits)"
    for name in ("int8", "qint8", "int4", "quint4x2")
}


@dataclass
class LM:
    """A loaded language model: ``lm.model(ids)`` gives logits [B, T, V]; ``lm.generate(prompt)`` text.

    ``tokenizer`` may be None (a Hugging Face directory without tokenizer files); the text methods
    then raise a ``UserError``.  ``chat_template`` is the model's Jinja chat template, taken from
    the tokenizer when not given; None means ``chat`` formats with ChatML.
    """

    model: CausalLM
    tokenizer: Tokenizer | None
    config: ModelConfig
    chat_template: str | None = None

    def __post_init__(self) -> None:
        # Every loader hands over the tokenizer, which carries the template its files ship with.
        if self.chat_template is None:
            self.chat_template = getattr(self.tokenizer, "chat_template", None)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def weight_bytes(self) -> int:
        """Bytes the weights occupy as loaded (packed blocks, fp16 or float; a tied head once)."""
        from scratchlm.quant.linear import weight_bytes

        return weight_bytes(self.model)

    def generate(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                 **sampling: Any) -> str:
        """The continuation of ``prompt`` (text or token ids); sampling options as in ``SamplingParams``."""
        from scratchlm.generation import generate

        return generate(self._language_model(), self._tokenizer(), prompt, params, **sampling)

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
               **sampling: Any) -> TextStream:
        """The continuation as text pieces; ``.completion`` holds the finish reason and counts afterwards."""
        from scratchlm.generation import stream

        return stream(self._language_model(), self._tokenizer(), prompt, params, **sampling)

    def complete(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | None = None,
                 **sampling: Any) -> list[Completion]:
        """Complete several prompts in one batch: text, token ids, finish reason and token counts."""
        from scratchlm.generation import complete

        return complete(self._language_model(), self._tokenizer(), prompts, params, **sampling)

    def chat_prompt(self, messages: Sequence[Mapping[str, Any]] | str, *, add_generation_prompt: bool = True,
                    **template_vars: Any) -> str:
        """``messages`` rendered with the model's chat template (ChatML without one), as text.

        A string is one user message.  ``template_vars`` reach the template (``date_string``, ...).
        """
        from scratchlm.prompts import render_chat

        tokenizer = self._tokenizer()
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        return render_chat(messages, self.chat_template, add_generation_prompt=add_generation_prompt,
                           bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token, **template_vars)

    def chat(self, messages: Sequence[Mapping[str, Any]] | str, params: SamplingParams | None = None,
             **sampling: Any) -> str:
        """The assistant's reply to ``messages`` (a list of role/content dicts, or one user string).

        The prompt is rendered with the chat template and generation stops at the end of the
        assistant's turn.  Surrounding whitespace is stripped: it is never part of the answer.
        """
        return "".join(self.chat_stream(messages, params, **sampling)).strip()

    def chat_stream(self, messages: Sequence[Mapping[str, Any]] | str, params: SamplingParams | None = None,
                    **sampling: Any) -> TextStream:
        """The reply to ``messages`` as text pieces, as ``stream`` gives them (nothing stripped)."""
        from scratchlm.generation import stream

        tokenizer = self._tokenizer()
        prompt = tokenizer.encode(self.chat_prompt(messages), allowed_special="all")
        return stream(self._language_model(), tokenizer, prompt, self.chat_params(params, sampling))

    def chat_params(self, params: SamplingParams | None, sampling: dict[str, Any]) -> SamplingParams:
        """``params`` (or the options) plus the end-of-turn stops of this model's chat format.

        An end-of-turn token the vocabulary has is a stop id; one the template writes but the
        vocabulary lacks (ChatML over GPT-2's tokenizer) is spelled in ordinary tokens, so it is
        a stop string instead.  ``ignore_eos`` turns all of them off.
        """
        from dataclasses import replace

        from scratchlm.generation import SamplingParams
        from scratchlm.prompts import CHATML_TEMPLATE, END_OF_TURN_TOKENS

        if params is not None and sampling:
            raise ConfigError("pass either a SamplingParams or sampling options, not both",
                              "put the options into the SamplingParams")
        params = params if params is not None else SamplingParams.from_options(**sampling)
        if params.ignore_eos:  # benchmarks: run to max_new_tokens, past the end of the turn too
            return params
        tokenizer = self._tokenizer()
        specials = tokenizer.special_tokens
        ids = [specials[t] for t in END_OF_TURN_TOKENS if t in specials]
        if tokenizer.eos_id is not None:
            ids.append(tokenizer.eos_id)
        template = self.chat_template or CHATML_TEMPLATE
        texts = [t for t in END_OF_TURN_TOKENS if t in template and t not in specials]
        return replace(params, stop_token_ids=tuple(dict.fromkeys([*params.stop_token_ids, *ids])),
                       stop=tuple(dict.fromkeys([*params.stop, *texts])))

    def save(self, run_dir: str | Path) -> Path:
        """Write a run dir (config, safetensors weights, tokenizer) that ``scratchlm.load`` opens again."""
        from scratchlm.checkpoint.io import save_run
        from scratchlm.finetune.lora import has_lora
        from scratchlm.generation.packed import is_packed
        from scratchlm.quant.linear import is_quantized

        if is_packed(self.model) or is_quantized(self.model):
            raise UserError("this model's weights are packed for CPU inference and cannot be saved",
                            "load it again without dtype float16, gguf or a quantization to save it")
        if has_lora(self.model):
            raise UserError("this model carries a LoRA adapter, which a run dir's weights do not hold",
                            "save the adapter (finetune.lora.save_adapter), or merge it first (merge_lora)")
        save_run(run_dir, self.model, self.config, self.tokenizer)
        return Path(run_dir)

    @property
    def labels(self) -> list[str] | None:
        """The class labels of a classifier (a run of 'finetune classify'); None for a language model."""
        labels = getattr(self.model, "labels", None)
        return list(labels) if labels is not None else None

    def classify(self, texts: Sequence[str], batch_size: int = 16) -> list[tuple[str, float]]:
        """``(label, probability)`` of each text, from a classifier's head."""
        from scratchlm.finetune.classify import predict

        if self.labels is None:
            raise UserError("this model has no classification head",
                            "train one with 'scratchlm finetune classify', then classify with its run dir")
        if isinstance(texts, str):
            texts = [texts]
        return predict(self.model, self._tokenizer(), list(texts), batch_size)  # type: ignore[arg-type]

    def _language_model(self) -> CausalLM:
        if self.labels is not None:
            raise UserError(f"this model is a classifier (labels: {', '.join(self.labels)}), "
                            "not a text generator",
                            "label texts with 'scratchlm classify' or lm.classify(texts)")
        return self.model

    def _tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise UserError("this model has no tokenizer, so it cannot turn text into tokens",
                            "load a directory that includes tokenizer files, or call lm.model with token ids")
        return self.tokenizer


def load(ref: str | Path, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, adapter: str | Path | None = None,
         quantize: str | None = None) -> LM:
    """Open a model: a run dir, a Hugging Face directory or hub id, or a llama.cpp .gguf file.

    ``device`` None picks CUDA when available, else the CPU.  ``dtype`` (``"float32"``,
    ``"bfloat16"``, ``"float16"`` or a torch dtype) None keeps float32.  On the CPU, float16 is the
    fast inference mode (``generation.packed``): weights in fp16, arithmetic in fp32, q/k/v and
    gate/up stacked into one matrix each — half the bytes and fewer calls per token, so decoding
    is several times as fast (docs/benchmarks.md, "Open weights"), and the model is then for
    inference only.  ``adapter``: a PEFT LoRA adapter directory applied on top
    (``finetune.lora.load_adapter``); the fp16 mode merges it into the weights first.

    Packed weights (``quant/``, CPU, inference only): ``dtype="gguf"`` keeps a .gguf file's
    Q8_0/Q4_0/Q4_1 matrices in their blocks (Q4_K/Q6_K re-blocked without loss) and computes with
    them in place;
    ``quantize="q8_0" | "q4_0" | "q4_1"`` (or that name as ``dtype``) rounds a float model's
    matrices into such blocks as llama.cpp does.  The products round each token's activations per
    block of 32 as llama.cpp does, to 15 bits by default (greedy answers kept); the environment
    variable ``SCRATCHLM_ACTIVATIONS`` (or ``quant.linear.ACTIVATIONS``) picks
    ``int15``, ``int8`` (llama.cpp's own rounding) or ``fp32`` (exact, slower).
    """
    import torch

    from scratchlm.runtime import resolve_device

    device = resolve_device(device)
    packing = _packing(dtype, quantize)
    if packing == "gguf":
        if adapter is not None:
            raise ConfigError("an adapter cannot be applied to a .gguf file's packed blocks",
                              "use --dtype float16, or --quantize q8_0|q4_0|q4_1 (the adapter is merged "
                              "first)")
        path = Path(ref).expanduser()
        if path.suffix != ".gguf":
            raise ConfigError(f"dtype gguf keeps a .gguf file's own weight types; {ref} is not a .gguf file",
                              "use --quantize q8_0, q4_0 or q4_1 to pack another model's weights")
        from scratchlm.checkpoint.gguf import load_gguf

        model, tokenizer, config = load_gguf(path, device, packed=True)
        return LM(model, tokenizer, config, getattr(tokenizer, "chat_template", None))
    if packing is not None:
        from scratchlm.quant.linear import quantize_model

        lm = load(ref, device, adapter=adapter)
        if adapter is not None:
            from scratchlm.finetune.lora import merge_lora

            merge_lora(lm.model)
        quantize_model(lm.model, packing)
        return lm
    torch_dtype = _torch_dtype(dtype)
    if device.type == "cpu" and torch_dtype == torch.float16:
        from scratchlm.generation.packed import pack_fp16

        lm = load(ref, device, torch.float32, adapter)
        pack_fp16(lm.model)  # (merges the adapter first)
        return lm
    if adapter is not None:
        from scratchlm.finetune.lora import load_adapter

        lm = load(ref, device, torch_dtype)
        load_adapter(lm.model, adapter, base=ref)
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

            run = load_run(path, device, torch_dtype)
            return LM(run.model, run.tokenizer, run.config, run.manifest.chat_template)
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


def _packing(dtype: str | torch.dtype | None, quantize: str | None) -> str | None:
    """"gguf", a block type to quantize to ("q4_1"), or None for plain torch dtypes."""
    name = str(dtype).lower() if isinstance(dtype, str) else None
    if quantize is not None:
        if quantize.lower() not in QUANT_DTYPES[1:]:
            raise ConfigError(f"unknown quantization {quantize!r}",
                              f"use one of {', '.join(QUANT_DTYPES[1:])}")
        if dtype is not None:
            raise ConfigError(f"pass either dtype {dtype} or quantize {quantize}, not both",
                              "quantized models compute in float32 with packed weights")
        return quantize.lower()
    return name if name in QUANT_DTYPES else None


def _torch_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    import torch

    if dtype is None:
        return None
    name = str(dtype).removeprefix("torch.")  # torch.float16 and "float16" alike
    if name.lower() in _REFUSED_DTYPES:
        raise ConfigError(_REFUSED_DTYPES[name.lower()],
                          "use float16 on the CPU, or q8_0 / q4_0 / q4_1 (packed blocks, fp32 arithmetic)")
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}", f"use one of {', '.join(DTYPES + QUANT_DTYPES)}")
    return getattr(torch, name)
