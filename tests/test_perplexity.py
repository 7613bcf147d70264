"""Sliding-window perplexity: every token scored once, with the context the stride promises."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from scratchlm.errors import ConfigError
from scratchlm.evaluation.perplexity import perplexity, sliding_window_nll, windows
from scratchlm.models import build_model, from_preset
from scratchlm.tokenizers import CharTokenizer


@pytest.mark.parametrize(("n", "ctx", "stride"),
                         [(50, 16, 16), (50, 16, 5), (17, 16, 8), (2, 16, 4), (100, 7, 1)])
def test_windows_score_every_target_once(n, ctx, stride):
    scored = []
    for start, end, first in windows(n, ctx, stride):
        assert end - start <= ctx and first > start  # a target always has at least one token of context
        scored.extend(range(first, end + 1))
        if first > 1:
            assert first - start - 1 >= ctx - stride or start == 0  # the promised context
    assert scored == list(range(1, n))


def model_and_text():
    text = "It is the east, and Juliet is the sun. Arise, fair sun, and kill the envious moon.\n" * 3
    tok = CharTokenizer.from_text(text)
    torch.manual_seed(0)
    model = build_model(from_preset("tiny-gpt2", vocab_size=tok.vocab_size, context_length=32)).eval()
    return model, tok, text


def test_disjoint_windows_equal_a_direct_computation():
    model, tok, text = model_and_text()
    ids = torch.tensor(tok.encode(text))
    total, count = sliding_window_nll(model, ids, 32, 32, batch_size=3)
    expected, n = 0.0, 0
    for start in range(0, len(ids) - 1, 32):
        x = ids[start:start + 32]
        y = ids[start + 1:start + 33]
        x = x[:len(y)]
        with torch.no_grad():
            expected += float(F.cross_entropy(model(x[None])[0], y, reduction="sum"))
        n += len(y)
    assert count == n == len(ids) - 1
    assert total == pytest.approx(expected, rel=1e-5)


def test_perplexity_result_and_errors():
    model, tok, text = model_and_text()
    result = perplexity(model, tok, text, stride=8)
    assert result.tokens == len(text) - 1 and result.characters == len(text) - 1
    assert result.perplexity == pytest.approx(math.exp(result.loss))
    assert result.nats_per_char == pytest.approx(result.loss)  # one character per token
    assert result.bits_per_char == pytest.approx(result.loss / math.log(2))
    assert result.loss == pytest.approx(math.log(tok.vocab_size), abs=0.3)  # untrained: near uniform
    with pytest.raises(ConfigError, match="exceeds"):
        perplexity(model, tok, text, context_length=64)
    with pytest.raises(ConfigError, match="stride"):
        perplexity(model, tok, text, context_length=16, stride=17)
    with pytest.raises(ConfigError, match="stride 0 must be between 1"):  # 0 is not "the default"
        perplexity(model, tok, text, stride=0)
    with pytest.raises(ConfigError, match="context length 0 is too short"):
        perplexity(model, tok, text, context_length=0)
