"""Sliding-window perplexity: every token scored once, with the context the stride promises."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from scratchlm.errors import ConfigError, DataError
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


# -------------------------------------------------------------------------------------------
# perplexity() against a direct computation: token by token, with the context each one gets
# -------------------------------------------------------------------------------------------

STRIDE_TEXT = ("ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the "
               "sun. Arise, fair sun, and kill the envious moon, who is already sick and pale with grief.\n")


def realistic_model(vocab_size: int, context_length: int) -> torch.nn.Module:
    """A tiny GPT-2 with weights at a trained model's scale: its predictions depend on the context."""
    from conftest import realistic_weights

    return realistic_weights(build_model(from_preset("tiny-gpt2", vocab_size=vocab_size,
                                                     context_length=context_length)), seed=1)


def direct_nll(model, ids: list[int], context_length: int, stride: int) -> float:
    """Sum of -log p(ids[i] | its context) over i >= 1, one forward pass per token.

    The contract (module docstring): window k starts at k*stride and holds context_length tokens, and
    a token is scored by the first window that reaches it, so token i sees ids[k*stride:i] with k the
    first window whose last target position min(k*stride + context_length, n - 1) is at least i."""
    total = 0.0
    for i in range(1, len(ids)):
        k = 0
        while min(k * stride + context_length, len(ids) - 1) < i:
            k += 1
        context = torch.tensor(ids[k * stride:i])[None]
        with torch.no_grad():
            logits = model(context)[0, -1]
        total -= float(torch.log_softmax(logits.double(), dim=-1)[ids[i]])
    return total


@pytest.mark.parametrize("stride", [16, 5, 1])
def test_strided_perplexity_equals_a_token_by_token_computation(stride):
    tok = CharTokenizer.from_text(STRIDE_TEXT)
    model = realistic_model(tok.vocab_size, 16)
    ids = tok.encode(STRIDE_TEXT)
    result = perplexity(model, tok, STRIDE_TEXT, context_length=16, stride=stride, batch_size=4)
    expected = direct_nll(model, ids, 16, stride)
    assert result.tokens == len(ids) - 1 and result.stride == stride
    assert result.loss * result.tokens == pytest.approx(expected, rel=1e-5)
    assert result.loss == pytest.approx(expected / (len(ids) - 1), rel=1e-5)


def test_stride_changes_the_result():
    """The model above uses its context: the strides of the test above give clearly different losses,
    so a perplexity() that ignored its stride could not pass it."""
    tok = CharTokenizer.from_text(STRIDE_TEXT)
    model = realistic_model(tok.vocab_size, 16)
    disjoint = perplexity(model, tok, STRIDE_TEXT, context_length=16, stride=16).loss
    overlapping = perplexity(model, tok, STRIDE_TEXT, context_length=16, stride=1).loss
    assert abs(disjoint - overlapping) > 1e-3


def test_nats_per_char_divides_by_characters_not_tokens():
    """With a BPE tokenizer (fewer tokens than characters), nats/char is the total NLL over the
    characters scored: every character of the text but those of the first token."""
    from scratchlm.tokenizers.train_bpe import train_bpe

    tok = train_bpe(STRIDE_TEXT * 4, 300, progress=False)
    ids = tok.encode(STRIDE_TEXT)
    assert len(ids) < 0.7 * len(STRIDE_TEXT)  # a tokenizer that merges: tokens and characters differ
    model = realistic_model(tok.vocab_size, 16)
    result = perplexity(model, tok, STRIDE_TEXT, context_length=16, stride=8)
    total = direct_nll(model, ids, 16, 8)
    characters = len(STRIDE_TEXT) - len(tok.decode(ids[:1]))
    assert result.characters == characters and result.tokens == len(ids) - 1
    assert result.nats_per_char == pytest.approx(total / characters, rel=1e-5)
    assert result.bits_per_char == pytest.approx(total / characters / math.log(2), rel=1e-5)
    assert result.loss == pytest.approx(total / (len(ids) - 1), rel=1e-5)


def test_defaults_and_edges():
    """The default stride is half the context; the result says what it used; a two-character text
    scores one character; specials in the text are encoded as specials, not refused."""
    tok = CharTokenizer.from_text(STRIDE_TEXT)
    model = realistic_model(tok.vocab_size, 16)
    result = perplexity(model, tok, STRIDE_TEXT)
    assert (result.context_length, result.stride) == (16, 8)
    assert result.loss == pytest.approx(perplexity(model, tok, STRIDE_TEXT, context_length=16, stride=8).loss)

    smallest = perplexity(model, tok, STRIDE_TEXT[:40], context_length=2, batch_size=1)
    assert (smallest.context_length, smallest.stride) == (2, 1)  # half of 2, the smallest context
    assert smallest.loss == pytest.approx(direct_nll(model, tok.encode(STRIDE_TEXT[:40]), 2, 1) / 39)

    two = perplexity(model, tok, "RO")
    assert (two.tokens, two.characters) == (1, 1)
    assert two.nats_per_char == pytest.approx(direct_nll(model, tok.encode("RO"), 16, 8))

    from scratchlm.tokenizers.train_bpe import train_bpe

    bpe = train_bpe(STRIDE_TEXT * 2, 280, special_tokens=("<|endoftext|>",), progress=False)
    text = STRIDE_TEXT[:60] + "<|endoftext|>" + STRIDE_TEXT[60:120]
    with_special = perplexity(realistic_model(bpe.vocab_size, 16), bpe, text)
    assert with_special.tokens == len(bpe.encode(text, allowed_special="all")) - 1


class Confident(torch.nn.Module):
    """Always sure of the wrong token: a loss of 10,000 nats per token."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, ids):
        logits = torch.zeros(*ids.shape, self.vocab_size)
        logits[..., -1] = 1e4  # an id the text never holds
        return logits


def test_a_huge_loss_has_infinite_perplexity_and_no_overflow():
    tok = CharTokenizer.from_text("bcd")
    result = perplexity(Confident(tok.vocab_size + 1), tok, "bcdbcd", context_length=4)
    assert result.loss == pytest.approx(1e4) and result.perplexity == math.inf


def test_every_error_says_what_and_how_to_fix():
    tok = CharTokenizer.from_text(STRIDE_TEXT)
    model = realistic_model(tok.vocab_size, 16)
    cases = [
        (dict(context_length=64), ConfigError, "context length 64 exceeds the model's 16 positions",
         "pass a context length of at most 16"),
        (dict(context_length=1), ConfigError, "context length 1 is too short to predict anything",
         "pass a context length of 2 tokens or more"),
        (dict(stride=17), ConfigError, "stride 17 must be between 1 and the context length 16",
         "a larger stride would skip tokens"),
        (dict(batch_size=0), ConfigError, "batch size must be positive, got 0", "pass e.g. --batch-size 8"),
    ]
    for kwargs, error, what, fix in cases:
        with pytest.raises(error) as info:
            perplexity(model, tok, STRIDE_TEXT, **kwargs)
        assert (info.value.what, info.value.fix) == (what, fix)
    with pytest.raises(DataError) as info:
        perplexity(model, tok, "")
    assert (info.value.what, info.value.fix) == ("the text is empty", "pass a text to evaluate")
    with pytest.raises(ConfigError) as info:
        perplexity(Confident(5), tok, STRIDE_TEXT)  # no config, no context length given
    assert (info.value.what, info.value.fix) == ("the model does not say its context length",
                                                 "pass context_length")
