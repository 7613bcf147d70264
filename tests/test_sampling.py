"""The sampler: parameter validation, the logit pipeline against hand-computed values and the books."""

from __future__ import annotations

import math

import pytest
import torch

from scratchlm.errors import ConfigError
from scratchlm.generation import Sampler, SamplingParams, make_generator, process_logits, sample

# Raschka ch. 5: the toy vocabulary and the next-token logits after "every effort moves you".
RASCHKA_VOCAB = ["closer", "every", "effort", "forward", "inches", "moves", "pizza", "toward", "you"]
RASCHKA_LOGITS = [4.51, 0.89, -1.90, 6.75, 1.63, -1.62, -1.89, 6.28, 1.79]


def softmax_ref(logits: list[float]) -> list[float]:
    """Float64 softmax in plain Python, independent of the code under test."""
    finite = [x for x in logits if x != -math.inf]
    top = max(finite)
    exps = [math.exp(x - top) if x != -math.inf else 0.0 for x in logits]
    total = sum(exps)
    return [e / total for e in exps]


def probs(logits: list[float], **options) -> list[float]:
    out = process_logits(torch.tensor(logits), SamplingParams(**options))
    return torch.softmax(out, dim=-1).tolist()



# ----- Raschka ch. 5 ------------------------------------------------------------------------------


def test_raschka_greedy_picks_forward():
    params = SamplingParams(temperature=0)
    token = sample(process_logits(torch.tensor([RASCHKA_LOGITS]), params), params)
    assert RASCHKA_VOCAB[token.item()] == "forward"


@pytest.mark.parametrize("temperature", [1, 0.1, 5])
def test_raschka_temperature_scaling(temperature):
    expected = softmax_ref([x / temperature for x in RASCHKA_LOGITS])
    assert probs(RASCHKA_LOGITS, temperature=temperature) == pytest.approx(expected, abs=1e-6)
    if temperature == 0.1:  # a low temperature sharpens: "forward" takes 99.1 %
        assert expected[3] == pytest.approx(0.990987, abs=1e-6)


def test_raschka_top_k_3():
    # Book: tensor([0.0615, 0.0000, 0.0000, 0.5775, 0.0000, 0.0000, 0.0000, 0.3610, 0.0000]).
    out = process_logits(torch.tensor(RASCHKA_LOGITS), SamplingParams(top_k=3))
    kept = [x if i in (0, 3, 7) else -math.inf for i, x in enumerate(RASCHKA_LOGITS)]
    assert out.tolist() == pytest.approx(kept)
    p = torch.softmax(out, dim=-1).tolist()
    assert p == pytest.approx(softmax_ref(kept), abs=1e-6)
    assert [round(x, 4) for x in p] == [0.0615, 0.0, 0.0, 0.5775, 0.0, 0.0, 0.0, 0.3610, 0.0]


def test_raschka_multinomial_counts_with_seed_123():
    # Book: 1,000 draws after torch.manual_seed(123) give 73 closer, 582 forward, 2 inches, 343 toward.
    # (Depends on torch's multinomial; holds for the torch versions the book and we use.)
    params = SamplingParams(seed=123)
    generator = make_generator(123)
    logits = process_logits(torch.tensor([RASCHKA_LOGITS]), params)
    draws = [sample(logits, params, generator).item() for _ in range(1000)]
    counts = torch.bincount(torch.tensor(draws), minlength=9).tolist()
    assert dict(zip(RASCHKA_VOCAB, counts, strict=True)) == {
        "closer": 73, "every": 0, "effort": 0, "forward": 582, "inches": 2,
        "moves": 0, "pizza": 0, "toward": 343, "you": 0,
    }


# ----- Burkov 5.4 ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("temperature", "expected"), [
    (0.5, [0.981690, 0.017980, 0.000329]),
    (1.0, [0.866813, 0.117310, 0.015876]),
    (2.0, [0.665241, 0.244728, 0.090031]),
])
def test_burkov_temperature_table(temperature, expected):
    # O54: logits [4, 2, 0] for cat, dog, bird.
    assert probs([4.0, 2.0, 0.0], temperature=temperature) == pytest.approx(expected, abs=1e-6)


def test_burkov_top_k_keeps_ties():
    # O55: every logit ≥ the k-th largest is kept, so a tie at the border keeps more than k.
    out = process_logits(torch.tensor([3.0, 2.0, 2.0, 1.0]), SamplingParams(top_k=2))
    assert out.tolist() == [3.0, 2.0, 2.0, -math.inf]
    assert probs([3.0, 2.0, 2.0, 1.0], top_k=2) == pytest.approx(softmax_ref([3.0, 2.0, 2.0, -math.inf]))


def test_top_p_keeps_smallest_set_reaching_p():
    logits = [math.log(x) for x in (0.5, 0.3, 0.15, 0.05)]
    assert probs(logits, top_p=0.75) == pytest.approx([0.625, 0.375, 0, 0], abs=1e-6)
    assert probs(logits, top_p=0.9) == pytest.approx([0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0], abs=1e-6)
    assert probs(logits, top_p=0.3) == pytest.approx([1, 0, 0, 0])  # the top token always stays
    assert probs(logits, top_p=1.0) == pytest.approx([0.5, 0.3, 0.15, 0.05], abs=1e-6)


def test_top_p_pins_meets_not_exceeds():
    # E18: Burkov says both "exceeds" and "meets"; we keep the smallest set whose mass is ≥ p.
    # Two equally likely tokens: the first alone has mass exactly 0.5, which meets p = 0.5.
    assert probs([0.0, 0.0], top_p=0.5) == [1.0, 0.0]
    assert probs([0.0, 0.0], top_p=0.51) == [0.5, 0.5]


def test_burkov_pipeline_temperature_then_top_k_then_top_p():
    logits = [2.0, 1.0, 0.5, 0.0, -1.0]
    # By hand: /0.5 → [4, 2, 1, 0, -2]; top-k 4 drops -2; top-p 0.95 over softmax([4, 2, 1, 0]).
    p4 = softmax_ref([4.0, 2.0, 1.0, 0.0])  # [0.8310, 0.1125, 0.0414, 0.0152]
    assert p4[0] + p4[1] < 0.95 <= p4[0] + p4[1] + p4[2]
    expected = softmax_ref([4.0, 2.0, 1.0, -math.inf, -math.inf])
    assert probs(logits, temperature=0.5, top_k=4, top_p=0.95) == pytest.approx(expected, abs=1e-6)


def test_burkov_penalty_formulas_by_hand():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    counts = torch.tensor([0.0, 2.0, 1.0, 0.0])  # generated so far
    seen = torch.tensor([True, True, True, False])  # token 0 only in the prompt
    # Frequency: o_j − α·count_j.
    out = process_logits(logits, SamplingParams(frequency_penalty=0.5), counts=counts)
    assert out.tolist() == pytest.approx([2.0, -2.0, 0.0, 3.0])
    # Presence: o_j − γ once j has appeared in the output.
    out = process_logits(logits, SamplingParams(presence_penalty=0.7), counts=counts)
    assert out.tolist() == pytest.approx([2.0, -1.7, -0.2, 3.0])
    # Repetition (Hugging Face): positive / r, negative · r, over prompt and output.
    out = process_logits(logits, SamplingParams(repetition_penalty=2.0), seen=seen)
    assert out.tolist() == pytest.approx([1.0, -2.0, 0.25, 3.0])
    # All together, then temperature: repetition → frequency → presence → / T.
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.7,
                            temperature=2.0)
    out = process_logits(logits, params, counts=counts, seen=seen)
    assert out.tolist() == pytest.approx([0.5, -1.85, -0.475, 1.5])


def test_greedy_applies_penalties_only():
    logits = torch.tensor([[2.0, 1.9, 0.0]])
    params = SamplingParams(temperature=0, frequency_penalty=1.0, top_k=1, top_p=0.1)
    out = process_logits(logits, params, counts=torch.tensor([[1.0, 0.0, 0.0]]))
    assert out[0].tolist() == pytest.approx([1.0, 1.9, 0.0])
    assert sample(out, params).tolist() == [1]


# ----- the Sampler and seeds ----------------------------------------------------------------------


def test_seeded_sampling_is_reproducible_and_seeds_differ():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))

    def draws(seed):
        sampler = Sampler(SamplingParams(seed=seed, temperature=1.5), 50, [[1], [2], [3]])
        return [sampler(logits).tolist() for _ in range(20)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_top_k_1_is_greedy():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(1))
    sampler = Sampler(SamplingParams(top_k=1, seed=3), 30, [[0]] * 4)
    assert sampler(logits).tolist() == logits.argmax(-1).tolist()


def test_sampler_tracks_penalty_history():
    sampler = Sampler(SamplingParams(temperature=0, frequency_penalty=10.0, repetition_penalty=2.0), 4,
                      [[3], [2]])
    assert sampler.seen.tolist() == [[False, False, False, True], [False, False, True, False]]
    logits = torch.tensor([[1.0, 0.5, 0.0, 0.0], [1.0, 0.5, 0.0, 0.0]])
    assert sampler(logits).tolist() == [0, 0]
    assert sampler(logits).tolist() == [1, 1]  # token 0 now costs 10 per use
    assert sampler.counts.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0]]
    sampler.keep(torch.tensor([1]))
    assert sampler.counts.shape == (1, 4) and sampler.seen[0, 2]


def test_penalties_reach_the_sampled_token():
    """Through the Sampler, not process_logits alone: the repetition penalty applies to the prompt
    and to generated tokens, and the frequency penalty grows with every use (counts, not flags)."""
    logits = torch.tensor([[2.0, 1.5, 1.25, 0.0]])
    repeat = Sampler(SamplingParams(temperature=0, repetition_penalty=2.0), 4, [[0]])
    assert repeat(logits).tolist() == [1]  # 2.0 / 2 < 1.5: the prompt's token is penalised
    assert repeat(logits).tolist() == [2]  # and so is the token just generated
    frequency = Sampler(SamplingParams(temperature=0, frequency_penalty=0.4), 4, [[3]])
    assert [frequency(logits).item() for _ in range(4)] == [0, 0, 1, 2]  # 1.2 < 1.5, then 1.1 < 1.25
    assert frequency.counts.tolist() == [[2, 1, 1, 0]]


# ----- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [
    {"temperature": -0.1}, {"temperature": float("nan")}, {"temperature": float("inf")},
    {"top_k": 0}, {"top_k": 2.5}, {"top_p": 0.0}, {"top_p": 1.5},
    {"frequency_penalty": float("inf")}, {"presence_penalty": "high"},
    {"repetition_penalty": 0.0}, {"max_new_tokens": 0}, {"max_new_tokens": True},
    {"stop": [""]}, {"stop": [3]}, {"stop_token_ids": [-1]}, {"seed": 1.5}, {"ignore_eos": "yes"},
])
def test_bad_params_are_one_line_config_errors(options):
    with pytest.raises(ConfigError) as info:
        SamplingParams(**options)
    message = str(info.value)
    assert "\n" not in message and next(iter(options)) in message


def test_unknown_option_suggests_close_name():
    with pytest.raises(ConfigError, match="did you mean top_k"):
        SamplingParams.from_options(topk=5)


def test_top_k_larger_than_vocab_is_an_error():
    with pytest.raises(ConfigError, match="top_k 10 exceeds the vocabulary size 9"):
        Sampler(SamplingParams(top_k=10), 9, [[0]])


def test_stop_accepts_a_single_string_and_lists():
    assert SamplingParams(stop="\n\n").stop == ("\n\n",)
    assert SamplingParams(stop=["a", "b"], stop_token_ids=[1]).stop_token_ids == (1,)
