"""Sliding-window data: Raschka's chapter-2 and chapter-5 numbers (book-oracles A4, A5)."""

from __future__ import annotations

import pytest
import torch

from conftest import shared_path
from scratchlm.data.corpora import read_corpus
from scratchlm.data.windows import SlidingWindowDataset, create_dataloader
from scratchlm.errors import UserError
from scratchlm.tokenizers import load


@pytest.fixture(scope="module")
def gpt2():
    return load(shared_path("data", "gpt2", "encoder.json").parent)


def test_first_batch_oracle_a4(gpt2):
    loader = create_dataloader(read_corpus("builtin:the-verdict"), gpt2, batch_size=1, max_length=4, stride=1,
                               shuffle=False)
    inputs, targets = next(iter(loader))
    assert inputs.tolist() == [[40, 367, 2885, 1464]]
    assert targets.tolist() == [[367, 2885, 1464, 1807]]
    assert inputs.dtype == targets.dtype == torch.long


def test_chapter5_split_oracle_a5(gpt2):
    text = read_corpus("builtin:the-verdict")
    split = int(0.9 * len(text))
    assert split == 18_431
    train, val = gpt2.encode(text[:split]), gpt2.encode(text[split:])
    assert (len(train), len(val)) == (4_612, 534)
    train_loader = create_dataloader(train, batch_size=2, max_length=256, stride=256)
    val_loader = create_dataloader(val, batch_size=2, max_length=256, stride=256, shuffle=False,
                                   drop_last=False)
    assert (len(train_loader.dataset), len(val_loader.dataset)) == (18, 2)
    assert sum(x.numel() for x, _ in train_loader) == 4_608 and len(train_loader) == 9
    assert sum(x.numel() for x, _ in val_loader) == 512


def test_windows_follow_stride_and_shift():
    ids = list(range(10))
    data = SlidingWindowDataset(ids, max_length=4, stride=3)
    windows = [(x.tolist(), y.tolist()) for x, y in data]
    assert windows == [([0, 1, 2, 3], [1, 2, 3, 4]), ([3, 4, 5, 6], [4, 5, 6, 7])]
    assert len(data) == len(range(0, len(ids) - 4, 3))
    assert data[-1][0].tolist() == [3, 4, 5, 6]
    with pytest.raises(IndexError):
        data[2]


def test_shuffle_is_seeded():
    ids = list(range(200))
    first = [x.tolist() for x, _ in create_dataloader(ids, batch_size=2, max_length=8, stride=8, seed=7)]
    again = [x.tolist() for x, _ in create_dataloader(ids, batch_size=2, max_length=8, stride=8, seed=7)]
    other = [x.tolist() for x, _ in create_dataloader(ids, batch_size=2, max_length=8, stride=8, seed=8)]
    assert first == again != other


def test_text_shorter_than_one_window_is_an_error(gpt2):
    with pytest.raises(UserError, match="has 4 tokens, fewer than one window"):
        create_dataloader("Hello, I am", gpt2, max_length=4, stride=1)
    with pytest.raises(UserError, match="needs a tokenizer"):
        create_dataloader("some text")
    with pytest.raises(UserError, match="fewer than one batch"):
        create_dataloader(list(range(20)), batch_size=8, max_length=4, stride=4)
    with pytest.raises(UserError, match="at least 1"):
        SlidingWindowDataset(list(range(20)), max_length=0, stride=1)


def test_tokenizer_may_be_a_path():
    loader = create_dataloader("Every effort moves you forward, step by step.", shared_path("data", "gpt2"),
                               batch_size=1, max_length=4, stride=4, shuffle=False)
    assert next(iter(loader))[0].tolist() == [[6109, 3626, 6100, 345]]
