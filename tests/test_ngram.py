"""Count-based n-gram LMs: nltk parity, normalisation, Burkov's §2.5 backoff example, save/load, errors."""

from __future__ import annotations

import json
import math
import random
import struct

import nltk.lm as nltk_lm
import numpy as np
import pytest
from nltk.lm.preprocessing import pad_both_ends, padded_everygram_pipeline
from nltk.util import ngrams as nltk_ngrams

from scratchlm.data.corpora import read_corpus
from scratchlm.errors import CheckpointError, ConfigError, DataError
from scratchlm.models.ngram import BOS, EOS, UNK, NGramCounts, sentences_of, words_of


@pytest.fixture(scope="module")
def shakespeare() -> list[list[str]]:
    """The first 400 non-blank lines of tinyshakespeare as lowercased word lists (~2.6k words)."""
    return sentences_of(read_corpus("builtin:tinyshakespeare"))[:400]


def _nltk_model(kind: str, order: int, sents: list[list[str]]):
    train, vocab = padded_everygram_pipeline(order, sents)
    model = {
        "mle": lambda: nltk_lm.MLE(order),
        "laplace": lambda: nltk_lm.Laplace(order),
        "kneser-ney": lambda: nltk_lm.KneserNeyInterpolated(order, discount=0.1),
        "stupid-backoff": lambda: nltk_lm.StupidBackoff(0.4, order),
    }[kind]()
    model.fit(train, vocab)
    return model


def _queries(order: int, sents: list[list[str]], vocab: list[str], limit: int) -> list[tuple[str, ...]]:
    """Training n-grams, random (mostly unseen) n-grams with an OOV word, and shorter contexts."""
    seen = [g for s in sents[:30] for g in nltk_ngrams(pad_both_ends(s, order), order)]
    rng = random.Random(0)
    pool = sorted(vocab) + ["zyzzyva"]
    unseen = [tuple(rng.choice(pool) for _ in range(order)) for _ in range(60)]
    shorter = [g[-k:] for g in seen[::7] for k in range(1, order)]
    qs = seen + unseen + shorter
    rng.shuffle(qs)
    return qs[:limit]


@pytest.mark.parametrize(
    "kind,order",
    [("mle", 1), ("mle", 2), ("mle", 3), ("laplace", 1), ("laplace", 2), ("laplace", 3), ("laplace", 4),
     ("kneser-ney", 2), ("kneser-ney", 3), ("stupid-backoff", 3)],
)
def test_logscore_matches_nltk(kind, order, shakespeare):
    ref = _nltk_model(kind, order, shakespeare)
    ours = NGramCounts(order, kind, **({"discount": 0.1} if kind == "kneser-ney" else {})).fit(shakespeare)
    assert len(ours.vocab) == len(ref.vocab)
    assert set(ours.vocab) == set(ref.vocab)
    # nltk's Kneser-Ney scans every higher-order context per call: keep its query count small
    qs = _queries(order, shakespeare, list(ref.vocab), 250 if kind == "kneser-ney" else 2000)
    expected = np.array([ref.logscore(g[-1], g[:-1]) for g in qs])
    got = ours.logscores(qs)
    assert np.array_equal(np.isinf(expected), np.isinf(got))
    finite = np.isfinite(expected)
    assert finite.sum() > len(qs) // 2
    np.testing.assert_allclose(got[finite], expected[finite], rtol=0, atol=1e-9)
    for g in qs[:40]:  # the scalar API agrees with the vectorised one
        assert ours.logscore(g[-1], g[:-1]) == pytest.approx(ref.logscore(g[-1], g[:-1]), abs=1e-9)


def test_counts_and_perplexity_match_nltk(shakespeare):
    order = 3
    ref = _nltk_model("laplace", order, shakespeare)
    ours = NGramCounts(order, "laplace").fit(shakespeare)
    for g in [("<s>",), ("</s>",), ("the",), ("<s>", "<s>"), ("<s>", "first"), ("first", "citizen", "</s>")]:
        want = ref.counts[g[-1]] if len(g) == 1 else ref.counts[list(g[:-1])][g[-1]]
        assert ours.count(g) == want
    # Our sentence API predicts every word and one </s>: the same n-grams scored through nltk.
    test = shakespeare[300:340]
    grams = [p[i - 2:i + 1] for s in test for p in [["<s>", "<s>", *s, "</s>"]] for i in range(2, len(p))]
    assert ours.perplexity(test) == pytest.approx(ref.perplexity(grams), rel=1e-12)


def _check_sums(lm: NGramCounts, sents: list[list[str]], skip=lambda ctx: False) -> int:
    """Every context seen in ``sents``: the scores over the vocabulary sum to 1."""
    n = lm.order
    padded = [[BOS] * (n - 1) + s + [EOS] for s in sents]
    contexts = {tuple(p[i:i + n - 1]) for p in padded for i in range(len(p) - n + 1)}
    checked = 0
    for ctx in sorted(contexts):
        if skip(ctx):
            continue
        dist = lm.distribution(ctx)
        assert dist.shape == (len(lm.vocab),) and (dist >= 0).all()
        assert dist.sum() == pytest.approx(1.0, abs=1e-9), ctx
        checked += 1
    return checked


@pytest.mark.parametrize("kind,kw", [("laplace", {}), ("add-k", {"k": 0.05}), ("kneser-ney", {}),
                                     ("kneser-ney", {"discount": 0.75}), ("mle", {})])
def test_distributions_sum_to_one_for_every_seen_context(kind, kw, shakespeare):
    sents = shakespeare[:120]
    lm = NGramCounts(3, kind, **kw).fit(sents)
    # nltk's Kneser-Ney (a float discount) is off by d/T at lower-order contexts that begin with <s>:
    # the raw count of (<s>, <s>) has no left extension, so γ pays for a continuation α never used.
    skip = (lambda ctx: ctx[0] == BOS) if kw.get("discount") else (lambda ctx: False)
    assert _check_sums(lm, sents, skip) > 500


def test_nltk_style_kneser_ney_keeps_nltks_sentence_start_quirk(shakespeare):
    lm = NGramCounts(3, "kneser-ney", discount=0.1).fit(shakespeare)
    ref = _nltk_model("kneser-ney", 3, shakespeare)
    total = lm.distribution([BOS, BOS]).sum()
    assert total > 1.0 + 1e-6
    some = ["first", "before", "</s>", "<s>"]
    for w in some:
        assert lm.logscore(w, [BOS, BOS]) == pytest.approx(ref.logscore(w, (BOS, BOS)), abs=1e-9)


def test_modified_kneser_ney_discounts_and_held_out_perplexity():
    sents = sentences_of(read_corpus("builtin:tinyshakespeare"))
    train, test = sents[:3000], sents[3000:3300]
    kn = NGramCounts(3, "kneser-ney").fit(train)
    for k in (1, 2, 3):
        _, d1, d2, d3 = kn._kn_D[k]
        assert 0 < d1 <= 1 and 0 < d2 <= 2 and 0 < d3 <= 3
    ppl = {name: NGramCounts(3, name).fit(train).perplexity(test) for name in ("laplace", "add-k")}
    ppl["kneser-ney"] = kn.perplexity(test)
    assert math.isfinite(ppl["kneser-ney"])
    assert ppl["kneser-ney"] < ppl["laplace"] / 5
    assert ppl["kneser-ney"] < NGramCounts(3, "add-k", k=0.01).fit(train).perplexity(test)
    assert NGramCounts(3, "mle").fit(train).perplexity(test) == math.inf  # unseen n-grams


# --- Burkov §2.5: the toy backoff model ------------------------------------------------------------
TOY = "Language models are powerful. Language models are useful."


def toy_model() -> NGramCounts:
    sentences = [words_of(s) for s in TOY.split(".") if s.strip()]
    return NGramCounts(3, "backoff", pad=False).fit(sentences)


def test_burkov_toy_counts():
    lm = toy_model()
    assert {w: lm.count([w]) for w in ["language", "models", "are", "powerful", "useful"]} == {
        "language": 2, "models": 2, "are": 2, "powerful": 1, "useful": 1}
    assert lm.count(["language", "models"]) == 2 and lm.count(["are", "useful"]) == 1
    assert lm.count(["models", "are", "powerful"]) == 1 and lm.count(["language", "models", "are"]) == 2
    assert lm.count(["powerful", "language"]) == 0  # trained per sentence (erratum E5)


def test_burkov_toy_backoff_probabilities_and_predictions():
    lm = toy_model()
    assert lm.score("are", ["language", "models"]) == 1.0
    assert lm.score("useful", ["models", "are"]) == 0.5
    # no match at any order: add-one unigram (0 + 1) / (W + V) with W = 8 tokens, V = 5 types
    assert lm.score("sing", ["language", "models"]) == pytest.approx(1 / 13, abs=1e-12)
    assert lm.score("models", ["english", "language"]) == 1.0  # backs off to the bigram
    assert lm.predict(["language", "models"]) == "are"
    assert lm.predict(["english", "language"]) == "models"
    assert lm.predict(["language", "models", "are"]) == "powerful"  # tie with useful: first in order


def test_rule_of_thumb_estimate_and_stupid_backoff():
    # Burkov's O19: C(language models rock) = 50, C(language models) = 200 -> 0.25
    sents = [["language", "models", "rock"]] * 50 + [["language", "models", "rule"]] * 150
    for kind in ("mle", "backoff", "stupid-backoff"):
        lm = NGramCounts(3, kind, pad=False).fit(sents)
        assert lm.score("rock", ["language", "models"]) == 0.25
    sb = NGramCounts(3, "stupid-backoff", pad=False).fit(sents)
    assert sb.score("language", ["rule", "rock"]) == pytest.approx(0.4 * 0.4 * 200 / 600)
    assert NGramCounts(3, "mle", pad=False).fit(sents).score("sing", ["language", "models"]) == 0.0


def test_perplexity_conventions():
    # A uniform model over V words has perplexity V (Burkov §2.6.1).
    words = ["a", "b", "c", "d", "e"]
    uni = NGramCounts(1, "mle").fit([words * 3])
    assert uni.perplexity([["e", "a", "c"], ["b"]]) == pytest.approx(5.0, rel=1e-12)
    # 2 ** mean(-log2 p) is the e ** mean(-ln p) of Burkov's eq. 2.5.
    lm = toy_model()
    test = [["language", "models", "are", "useful"]]
    p = 2.0 ** lm.token_logscores(test)
    assert lm.perplexity(test) == pytest.approx(math.exp(-np.mean(np.log(p))), rel=1e-12)


def test_sampling_is_seeded_and_follows_training_ngrams(shakespeare):
    lm = NGramCounts(3, "mle").fit(shakespeare)
    a, b = lm.sample(seed=7, max_words=30), lm.sample(seed=7, max_words=30)
    assert a == b and 0 < len(a) <= 30
    assert any(lm.sample(seed=s, max_words=30) != a for s in range(8, 12))
    padded = [BOS, BOS, *a]
    for i in range(2, len(padded)):  # MLE only ever emits n-grams it has seen
        assert lm.count(padded[i - 2:i + 1]) > 0
    kn = NGramCounts(3, "kneser-ney").fit(shakespeare)
    out = kn.sample(prefix=["first", "citizen"], seed=1, max_words=20)
    assert set(out) <= set(kn.vocab) - {BOS, EOS}


@pytest.mark.parametrize("kind,kw", [("mle", {}), ("laplace", {}), ("add-k", {"k": 0.3}), ("backoff", {}),
                                     ("stupid-backoff", {"alpha": 0.3}), ("kneser-ney", {}),
                                     ("kneser-ney", {"discount": 0.1})])
def test_save_load_round_trip(kind, kw, shakespeare, tmp_path):
    lm = NGramCounts(4, kind, unk_cutoff=2, **kw).fit(shakespeare[:200])
    path = lm.save(tmp_path / "lm.safetensors")
    back = NGramCounts.load(path)
    assert back.vocab == lm.vocab and back.order == 4 and back.smoothing == kind and back.unk_cutoff == 2
    test = shakespeare[200:260]
    np.testing.assert_array_equal(back.token_logscores(test), lm.token_logscores(test))
    # the documented layout: 8-byte little-endian header length, a JSON header, raw int64 arrays
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    assert header["__metadata__"]["format"] == "scratchlm.ngram"
    assert header["keys.4"]["dtype"] == "I64" and json.loads(header["__metadata__"]["vocab"]) == lm.vocab


def test_load_rejects_foreign_and_damaged_files(tmp_path, shakespeare):
    from safetensors.numpy import save_file

    with pytest.raises(CheckpointError, match="not found"):
        NGramCounts.load(tmp_path / "missing.safetensors")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": np.zeros(3, dtype=np.float32)}, str(foreign))
    with pytest.raises(CheckpointError, match="not a scratchlm n-gram model"):
        NGramCounts.load(foreign)
    good = NGramCounts(2, "laplace").fit(shakespeare[:20]).save(tmp_path / "good.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:-40])
    with pytest.raises(CheckpointError):
        NGramCounts.load(tmp_path / "cut.safetensors")


# --- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize("order", [0, -1, 2.5, "3", True])
def test_bad_order(order):
    with pytest.raises(ConfigError, match="order must be an integer >= 1") as err:
        NGramCounts(order)
    assert "\n" not in str(err.value) and " — " in str(err.value)


def test_bad_options():
    with pytest.raises(ConfigError, match="did you mean kneser-ney"):
        NGramCounts(3, "kneser_ney")
    with pytest.raises(ConfigError, match="choose one of mle, laplace"):
        NGramCounts(3, "good-turing")
    with pytest.raises(ConfigError, match="k > 0"):
        NGramCounts(3, "add-k", k=0)
    with pytest.raises(ConfigError, match="discount"):
        NGramCounts(3, "kneser-ney", discount=1.5)
    with pytest.raises(ConfigError, match="kneser-ney needs order >= 2"):
        NGramCounts(1, "kneser-ney")
    with pytest.raises(ConfigError, match="not been fitted"):
        NGramCounts(2).score("a")


@pytest.mark.parametrize("bad,match", [
    ([], "empty"), ([[]], "empty"), ("the cat sat", "not one string"),
    ([["the", "cat"], "a dog"], "sentence 1 is not a list of strings"),
    ([["the", 3]], "sentence 0 is not a list of strings"), (42, "iterable"),
])
def test_bad_corpus(bad, match):
    with pytest.raises(DataError, match=match) as err:
        NGramCounts(2, "laplace").fit(bad)
    assert "\n" not in str(err.value)


def test_unknown_words_and_long_contexts(shakespeare):
    lm = NGramCounts(3, "laplace").fit(shakespeare)
    assert lm.score("qwertyuiop", ["first"]) == lm.score(UNK, ["first"])
    assert lm.score("citizen", ["a", "b", "c", "first"]) == lm.score("citizen", ["c", "first"])
    assert UNK in lm.vocab and BOS in lm.vocab and EOS in lm.vocab


def _arpa_logprob(tables: dict, word: str, context: tuple[str, ...]) -> float:
    """log10 P(word | context) by the ARPA backoff rule, from the parsed file."""
    if (*context, word) in tables:
        return tables[(*context, word)][0]
    if not context:
        raise KeyError(word)
    bow = tables.get(context, (0.0, 0.0))[1]
    return bow + _arpa_logprob(tables, word, context[1:])


@pytest.mark.parametrize("kw", [{}, {"discount": 0.1}])
def test_write_arpa_is_the_same_model_in_backoff_form(kw, shakespeare, tmp_path):
    lm = NGramCounts(3, "kneser-ney", **kw).fit(shakespeare[:200])
    path = lm.write_arpa(tmp_path / "lm.arpa")
    text = path.read_text(encoding="utf-8")
    assert text.startswith("\\data\\\nngram 1=") and text.rstrip().endswith("\\end\\")
    tables = {}
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) >= 2:
            bow = float(parts[2]) if len(parts) == 3 else 0.0
            tables[tuple(parts[1].split(" "))] = (float(parts[0]), bow)
    assert sum(len(g) == 1 for g in tables) == len(lm.vocab) and ("<unk>",) in tables
    qs = _queries(3, shakespeare[:200], [w for w in lm.vocab if w != UNK], 400)
    for g in qs:
        ours = lm.logscore(g[-1], g[:-1])
        ctx = tuple("<unk>" if w not in lm.vocab else w for w in g[:-1])
        word = g[-1] if g[-1] in lm.vocab else "<unk>"
        arpa = _arpa_logprob(tables, word, ctx) / math.log10(2)
        if math.isinf(ours):
            assert arpa < -99 / math.log10(2) + 1e-9
        else:
            assert arpa == pytest.approx(ours, abs=1e-5)
    with pytest.raises(ConfigError, match="write_arpa needs smoothing='kneser-ney'"):
        NGramCounts(2, "laplace").fit(shakespeare[:5]).write_arpa(tmp_path / "x.arpa")
