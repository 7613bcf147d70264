"""The pretraining split of a corpus: the first 90 % of its characters train, the last 10 % validate.

One definition, used by ``scratchlm pretrain`` (neural and count-based) and by
``scratchlm eval perplexity --split``, so that "the validation split" means the same text
everywhere (nanoGPT's shakespeare_char convention).  Splitting by characters, before
tokenization, keeps the split the same whatever the tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass

VAL_FRACTION = 0.1
SPLITS = ("all", "train", "val")


def split_text(text: str, val_fraction: float = VAL_FRACTION) -> tuple[str, str]:
    """``(train, validation)``: the text cut at ``(1 − val_fraction)`` of its characters."""
    cut = int(len(text) * (1 - val_fraction))
    return text[:cut], text[cut:]


def select_split(text: str, split: str) -> str:
    """``"all"``, ``"train"`` or ``"val"`` of ``text`` as ``split_text`` cuts it."""
    train, val = split_text(text)
    return {"all": text, "train": train, "val": val}[split]


@dataclass
class EncodedSplits:
    """Both splits as token ids, and the validation characters (nats per character compares
    tokenizers: the validation loss times tokens per character)."""

    train_ids: list[int]
    val_ids: list[int]
    val_chars: int

    @property
    def val_tokens_per_char(self) -> float | None:
        return len(self.val_ids) / self.val_chars if self.val_chars else None
