"""Skip-gram word2vec with negative sampling: pairs (Burkov §2.2), the loss, training mechanics."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from scratchlm.data.corpora import read_corpus
from scratchlm.errors import ConfigError, DataError
from scratchlm.models.ngram import words_of
from scratchlm.models.word2vec import SkipGramNS, Word2VecConfig, skipgram_pairs, train_word2vec


def test_burkov_window_of_five_gives_four_pairs_per_word():
    words = ["professor", "alan", "turing's", "research", "advanced"]
    pairs = skipgram_pairs(range(5), window=2)  # Burkov's "window of 5": 2 words either side
    assert len(pairs) == 4 * 2 + 3 * 2
    around = sorted(int(o) for c, o in pairs if c == 2)
    assert [words[o] for o in around] == ["professor", "alan", "research", "advanced"]
    assert len(skipgram_pairs([7], window=3)) == 0


def test_negative_sampling_loss():
    torch.manual_seed(0)
    model = SkipGramNS(20, 8)
    c, o, n = torch.tensor([1, 2]), torch.tensor([3, 4]), torch.tensor([[5, 6, 7], [8, 9, 10]])
    # context vectors start at zero: every sigmoid is 1/2, so each pair costs (1 + k) log 2
    assert model(c, o, n).item() == pytest.approx(2 * 4 * math.log(2), rel=1e-6)
    with torch.no_grad():
        model.context.weight.normal_()
    v, u = model.center.weight, model.context.weight
    want = sum(-F.logsigmoid(u[o[b]] @ v[c[b]]) - sum(F.logsigmoid(-(u[j] @ v[c[b]])) for j in n[b])
               for b in range(2))
    assert model(c, o, n).item() == pytest.approx(want.item(), rel=1e-5)


def two_topics(n=200, seed=0):
    rng = random.Random(seed)
    a = "cat dog horse cow sheep goat".split()
    b = "red green blue yellow purple orange".split()
    return [rng.choices(a if i % 2 else b, k=8) for i in range(n)]


def test_tiny_training_separates_two_topics():
    wv = train_word2vec(two_topics(), dim=16, window=3, negatives=3, min_count=1, subsample=0,
                        epochs=2, batch_size=256, lr=0.05, seed=1)
    assert wv.vectors.shape == (12, 16) and len(wv.vocab) == 12
    first, last = sum(wv.losses[:5]) / 5, sum(wv.losses[-5:]) / 5
    assert last < first
    assert wv.similarity("cat", "dog") > wv.similarity("cat", "blue") + 0.3
    top = [w for w, _ in wv.most_similar("red", topn=5)]
    assert set(top) == {"green", "blue", "yellow", "purple", "orange"}
    # seeded: the same run twice is the same run
    again = train_word2vec(two_topics(), dim=16, window=3, negatives=3, min_count=1, subsample=0,
                           epochs=2, batch_size=256, lr=0.05, seed=1)
    assert again.losses == wv.losses and torch.equal(again.vectors, wv.vectors)


def test_budget_vocab_and_errors():
    wv = train_word2vec(two_topics(), dim=4, min_count=1, max_steps=3, batch_size=64)
    assert len(wv.losses) == 3
    assert wv.vocab[0] in {"cat", "dog", "horse", "cow", "sheep", "goat", "red", "green", "blue",
                           "yellow", "purple", "orange"}
    with pytest.raises(DataError, match="not in the word2vec vocabulary"):
        wv.most_similar("zebra")
    with pytest.raises(ConfigError, match="window must be an integer >= 1"):
        train_word2vec(two_topics(), window=0)
    with pytest.raises(ConfigError, match="unknown word2vec option 'windw'"):
        train_word2vec(two_topics(), windw=2)
    with pytest.raises(DataError, match="list of word lists"):
        train_word2vec("some text")
    with pytest.raises(DataError, match="occur at least 5 times"):
        train_word2vec([["a", "b", "c"]])
    assert Word2VecConfig().window == 5


@pytest.mark.slow
def test_shakespeare_neighbours():
    """One epoch on tinyshakespeare (~840 steps, seconds): royalty, family and lovers cluster."""
    words = words_of(read_corpus("builtin:tinyshakespeare"))
    wv = train_word2vec([words], dim=50, epochs=1, batch_size=1024, seed=0)
    near = {w: {x for x, _ in wv.most_similar(w, 10)} for w in ("king", "father", "romeo")}
    assert len(near["king"] & {"queen", "prince", "duke", "lord", "edward", "henry", "richard", "bolingbroke",
                               "warwick", "crown", "ii", "iii", "iv", "vi"}) >= 3, near["king"]
    assert len(near["father"] & {"mother", "son", "brother", "daughter", "husband", "wife", "uncle",
                                 "sister", "child"}) >= 2, near["father"]
    assert near["romeo"] & {"juliet", "nurse", "mercutio", "tybalt", "capulet", "benvolio", "montague",
                            "laurence", "paris"}, near["romeo"]


def test_pairs_of_each_epoch_are_shuffled_among_themselves_in_epoch_order():
    """The loop makes one pass over every epoch's pairs: each epoch's own pairs, then the next's."""
    import numpy as np

    from scratchlm.models.word2vec import SkipGramPairs

    epochs = [np.full((5, 2), 0), np.full((3, 2), 1), np.full((4, 2), 2)]
    data = SkipGramPairs(epochs)
    order = data.epoch_order(torch.Generator().manual_seed(0), 2).tolist()
    assert len(data) == 12 and sorted(order) == list(range(12))
    assert [int(data[i][0]) for i in order] == [0] * 5 + [1] * 3 + [2] * 4
    assert order[:5] != list(range(5))  # shuffled within the epoch
