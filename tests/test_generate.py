"""Generation: cached decoding, batching, stopping, stop strings and streaming."""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest
import torch

from scratchlm.errors import ConfigError
from scratchlm.generation import SamplingParams, complete, generate, generate_ids, stream
from scratchlm.models import build_model, from_preset
from scratchlm.tokenizers.base import Tokenizer
from scratchlm.tokenizers.char import CharTokenizer

# The package re-exports the function `generate`, which shadows the module of the same name.
generate_module = importlib.import_module("scratchlm.generation.generate")
GREEDY = SamplingParams(temperature=0, max_new_tokens=12)


def random_model(preset: str = "tiny-gpt2", **overrides):
    """A tiny model with weights large enough that greedy decoding wanders instead of repeating."""
    torch.manual_seed(0)
    model = build_model(from_preset(preset, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    return model.eval()


class ByteTokenizer(Tokenizer):
    """Byte-level: id = byte value, 256 = <|endoftext|>; multi-byte characters span tokens."""

    name = "bytes"

    def __init__(self):
        super().__init__({"<|endoftext|>": 256}, eos_token="<|endoftext|>")

    def encode_ordinary(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def token_bytes(self, token_id: int) -> bytes:
        return bytes([token_id]) if token_id < 256 else b"<|endoftext|>"

    @property
    def vocab_size(self) -> int:
        return 257


class ScriptedModel(torch.nn.Module):
    """Speaks the generation interface but greedily emits a fixed script after the prompt (batch 1)."""

    def __init__(self, script: list[int], vocab_size: int = 257, context_length: int = 64):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab_size, context_length=context_length)
        self.script = script
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.lm_head = torch.nn.Identity()
        self.prompt_length = 0

    def new_cache(self, batch_size: int, max_length: int):
        cache = SimpleNamespace(length=0, max_length=max_length)
        cache.select = lambda rows: None
        return cache

    def forward(self, input_ids, *, cache, attention_mask=None, position_ids=None, return_hidden=False):
        b, t = input_ids.shape
        if cache.length == 0:
            self.prompt_length = t
        cache.length += t
        step = cache.length - self.prompt_length
        logits = torch.zeros(b, t, self.config.vocab_size)
        logits[:, -1, self.script[step] if step < len(self.script) else 0] = 1.0
        return logits


def script(text: str, *extra: int) -> list[int]:
    return list(text.encode("utf-8")) + list(extra)


def run_stream(text_script: list[int], prompt: str = "p", **options):
    """(pieces, completion) for a scripted model and the byte tokenizer."""
    options.setdefault("temperature", 0)
    s = stream(ScriptedModel(text_script), ByteTokenizer(), prompt, **options)
    pieces = list(s)
    return pieces, s.completion



# ----- cached decoding ----------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-llama"])
def test_greedy_equals_argmax_of_full_recompute(preset):
    model = random_model(preset)
    prompt = [5, 17, 42, 9]
    out = generate_ids(model, [prompt], GREEDY)[0]
    assert len(set(out.token_ids)) > 3  # the model does not just repeat itself
    sequence = list(prompt)
    with torch.no_grad():
        for token in out.token_ids:
            logits = model(torch.tensor([sequence]))  # no cache: the whole sequence again
            assert logits[0, -1].argmax().item() == token
            sequence.append(token)


class RecordingSampler(generate_module.Sampler):
    """Keeps every logits tensor the sampler sees, to compare batched and single runs."""

    seen_logits: list[torch.Tensor] = []

    def __call__(self, logits):
        RecordingSampler.seen_logits.append(logits.clone())
        return super().__call__(logits)


@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-llama"])
def test_batched_prompts_equal_one_by_one(preset, monkeypatch):
    monkeypatch.setattr(generate_module, "Sampler", RecordingSampler)
    model = random_model(preset)
    prompts = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11, 12, 13], [40], [7, 7, 8, 200, 3]]
    RecordingSampler.seen_logits = []
    batched = generate_ids(model, prompts, GREEDY)
    batch_logits = torch.stack(RecordingSampler.seen_logits)  # [steps, B, V]
    for row, prompt in enumerate(prompts):
        RecordingSampler.seen_logits = []
        alone = generate_ids(model, [prompt], GREEDY)[0]
        assert batched[row].token_ids == alone.token_ids
        assert batched[row].prompt_tokens == len(prompt)
        torch.testing.assert_close(batch_logits[:, row], torch.stack(RecordingSampler.seen_logits)[:, 0],
                                   atol=1e-4, rtol=1e-4)


def test_batched_rows_that_finish_early_and_a_full_padded_window():
    # Context 64: the 50-token prompt fills the window after 14 tokens and reads its last 64 tokens
    # from then on; when the padded window (50 + 14) is full the rows are repacked.  Every row must
    # match running alone.
    model = random_model("tiny-llama")
    prompts = [list(range(1, 51)), [3, 4, 5, 6, 7], [9, 9]]
    params = SamplingParams(temperature=0, max_new_tokens=30, stop_token_ids=[])
    batched = generate_ids(model, prompts, params)
    for row, prompt in enumerate(prompts):
        alone = generate_ids(model, [prompt], params)[0]
        assert batched[row].token_ids == alone.token_ids
        assert batched[row].finish_reason == alone.finish_reason
    assert [len(r.token_ids) for r in batched] == [30, 30, 30]
    assert [r.finish_reason for r in batched] == ["length", "length", "length"]


def test_batched_eos_per_row():
    model = random_model()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    free = generate_ids(model, prompts, GREEDY)
    eos = free[0].token_ids[3]  # some token row 0 meets within 4 steps
    stopped = generate_ids(model, prompts, GREEDY, eos_id=eos)
    for row in (0, 1):
        ids = free[row].token_ids
        cut = ids.index(eos) + 1 if eos in ids else len(ids)
        assert stopped[row].token_ids == ids[:cut]
        assert stopped[row].finish_reason == ("stop" if eos in ids else "length")
    assert stopped[0].finish_reason == "stop" and len(stopped[0].token_ids) <= 4
    ignored = generate_ids(model, prompts, SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True),
                           eos_id=eos)
    assert [r.token_ids for r in ignored] == [r.token_ids for r in free]


def test_stop_token_ids_and_max_new_tokens():
    model = random_model()
    free = generate_ids(model, [[10, 11]], GREEDY)[0]
    assert free.finish_reason == "length" and len(free.token_ids) == GREEDY.max_new_tokens
    stop_at = free.token_ids[5]
    first = free.token_ids.index(stop_at)
    out = generate_ids(model, [[10, 11]], SamplingParams(temperature=0, max_new_tokens=12,
                                                         stop_token_ids=[stop_at]))[0]
    assert out.token_ids == free.token_ids[:first + 1] and out.finish_reason == "stop"


@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-llama", "tiny-lstm"])
def test_generation_past_the_context_window_reads_its_last_tokens(preset):
    """Raschka's generate (and nanoGPT's sample.py) crop the sequence to the context window before
    every step: the tokens past the window equal the arg-max of a full recompute of the last 64."""
    model = random_model(preset)  # context 64
    prompts = [list(range(3, 60)), [7, 8, 9, 10, 11] * 10]  # 57 and 50 tokens: two lengths, left padding
    params = SamplingParams(temperature=0, max_new_tokens=20)
    batched = generate_ids(model, prompts, params)
    for prompt, out in zip(prompts, batched, strict=True):
        assert len(out.token_ids) == 20 and out.finish_reason == "length"
        assert generate_ids(model, [prompt], params)[0].token_ids == out.token_ids
        sequence = list(prompt)
        with torch.no_grad():
            for token in out.token_ids:
                logits = model(torch.tensor([sequence[-64:]]))
                assert logits[0, -1].argmax().item() == token
                sequence.append(token)
    with pytest.raises(ConfigError, match="leaves no room in the context of 64"):
        generate_ids(model, [list(range(64))], GREEDY)


def test_bad_prompts_are_config_errors():
    model = random_model()
    with pytest.raises(ConfigError, match="outside the model's vocabulary of 256"):
        generate_ids(model, [[1, 256]], GREEDY)
    with pytest.raises(ConfigError, match="empty"):
        generate_ids(model, [[]], GREEDY)
    with pytest.raises(ConfigError, match="top_k 300 exceeds"):
        generate_ids(model, [[1]], SamplingParams(top_k=300))


def test_seeded_generation_is_reproducible_and_training_mode_is_restored():
    model = random_model()
    model.train()
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.95, seed=1234, max_new_tokens=20)
    first = generate_ids(model, [[1, 2], [3]], params)
    assert model.training
    assert [r.token_ids for r in generate_ids(model, [[1, 2], [3]], params)] == [r.token_ids for r in first]
    other = generate_ids(model, [[1, 2], [3]], SamplingParams(seed=99, max_new_tokens=20))
    assert [r.token_ids for r in other] != [r.token_ids for r in first]


def test_penalties_change_greedy_output():
    model = random_model()
    plain = generate_ids(model, [[1, 2, 3]], SamplingParams(temperature=0, max_new_tokens=30))[0].token_ids
    penalised = generate_ids(model, [[1, 2, 3]], SamplingParams(
        temperature=0, max_new_tokens=30, frequency_penalty=100.0))[0].token_ids
    assert len(set(penalised)) == 30  # a huge frequency penalty forbids every repeat
    assert penalised != plain


# ----- text: stop strings and streaming ------------------------------------------------------------


def test_text_ends_at_eos_and_keeps_multibyte_characters():
    pieces, c = run_stream(script("Héllo wörld ✓", 256), max_new_tokens=40)
    assert "".join(pieces) == c.text == "Héllo wörld ✓"
    assert all("\ufffd" not in p for p in pieces)
    assert c.finish_reason == "stop"
    assert c.token_ids[-1] == 256 and c.completion_tokens == len("Héllo wörld ✓".encode()) + 1
    assert c.prompt_tokens == 1


def test_stop_string_made_of_a_multibyte_character():
    pieces, c = run_stream(script("abc→def"), stop=["→"])
    assert c.text == "abc" and c.finish_reason == "stop"
    assert c.completion_tokens == 6  # the row ends with the token that completes "→"
    assert "".join(pieces) == "abc"


def test_stop_string_spanning_tokens_is_held_back_then_released():
    pieces, c = run_stream(script("a\nb\n\nc"), stop=["\n\n"])
    assert c.text == "a\nb" and c.finish_reason == "stop"
    # The first "\n" could have started "\n\n": it is held back until "b" shows it did not.
    assert pieces == ["a", "\nb"]


def test_partial_stop_string_at_the_end_is_released():
    pieces, c = run_stream(script("xyzab"), stop=["abc"], max_new_tokens=5)
    assert pieces == ["x", "y", "z", "ab"]
    assert c.text == "xyzab" and c.finish_reason == "length"


def test_earliest_stop_string_wins_and_cut_never_splits_a_character():
    _, c = run_stream(script("aébcde"), stop=["cd", "bc"])
    assert c.text == "aé"
    _, c = run_stream(script("xé✓y"), stop=["✓"])
    assert c.text == "xé"


def test_stop_string_in_the_prompt_is_ignored():
    _, c = run_stream(script("plain text", 256), prompt="STOP here", stop=["STOP"])
    assert c.text == "plain text"


def test_ignore_eos_and_stop_token_ids_at_text_level():
    _, c = run_stream(script("ab", 256) + script("cd"), ignore_eos=True, max_new_tokens=5)
    assert c.text == "ab<|endoftext|>cd" and c.finish_reason == "length"
    _, c = run_stream(script("abcd"), stop_token_ids=[ord("c")])
    assert c.text == "ab" and c.finish_reason == "stop" and c.token_ids == script("abc")


def test_max_new_tokens_inside_a_character_shows_a_replacement():
    _, c = run_stream(script("é"), max_new_tokens=1)
    assert c.text == "\ufffd" and c.finish_reason == "length"


def test_empty_prompt_starts_from_eos():
    _, c = run_stream(script("hi", 256), prompt="")
    assert c.text == "hi" and c.prompt_tokens == 1


def test_real_model_text_stream_and_batch_complete():
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
    tok = CharTokenizer.from_text(text, special_tokens=["<|endoftext|>"])
    model = random_model(vocab_size=tok.vocab_size)
    params = SamplingParams(temperature=0.8, seed=5, max_new_tokens=25)
    s = stream(model, tok, "First", params)
    pieces = list(s)
    assert "".join(pieces) == s.completion.text == generate(model, tok, "First", params)
    assert s.completion.completion_tokens == len(s.completion.token_ids)
    greedy = SamplingParams(temperature=0, max_new_tokens=15)
    prompts = ["First", "Before we", "hear"]
    together = complete(model, tok, prompts, greedy)
    assert [c.text for c in together] == [generate(model, tok, p, greedy) for p in prompts]
    with pytest.raises(ConfigError, match="either a SamplingParams or sampling options"):
        generate(model, tok, "First", greedy, top_k=3)
