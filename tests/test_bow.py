"""Burkov §2.1: bag of words on his ten toy documents, and the MLP that classifies two new ones."""

from __future__ import annotations

import pytest
import torch

from scratchlm.errors import ConfigError, DataError
from scratchlm.models.bow import BagOfWords, BowClassifier, train_bow_classifier

DOCS = [
    "Movies are fun for everyone.",
    "Watching movies is great fun.",
    "Enjoy a great movie today.",
    "Research is interesting and important.",
    "Learning math is very important.",
    "Science discovery is interesting.",
    "Rock is great to listen to.",
    "Listen to music for fun.",
    "Music is fun for everyone.",
    "Listen to folk music!",
]
LABELS = [1, 1, 1, 3, 3, 3, 2, 2, 2, 2]
CLASS_NAMES = {1: "Cinema", 2: "Music", 3: "Science"}



VOCAB = ("a and are discovery enjoy everyone folk for fun great important interesting is learning listen "
         "math movie movies music research rock science to today very watching").split()


def test_vocabulary_and_document_term_matrix():
    bow = BagOfWords.fit(DOCS)
    assert bow.vocabulary == VOCAB and len(bow) == 26
    x = bow.transform(DOCS)
    assert x.shape == (10, 26) and x.dtype == torch.float32
    # Erratum E2: the book prints a 25-dimensional, shifted x2; the real one has ones at these indices.
    assert torch.nonzero(x[1]).flatten().tolist() == [8, 9, 12, 17, 25]
    assert torch.nonzero(x[2]).flatten().tolist() == [0, 4, 9, 16, 23]
    # out-of-vocabulary words ("listening", "love", "much") are dropped; presence is binary
    new = bow.transform(["Listening to rock music is fun.", "I love science very much.", "to to to"])
    assert [VOCAB[i] for i in torch.nonzero(new[0]).flatten()] == ["fun", "is", "music", "rock", "to"]
    assert [VOCAB[i] for i in torch.nonzero(new[1]).flatten()] == ["science", "very"]
    assert new[2].sum() == 1.0


def test_burkov_toy_classifier_predicts_music_and_science():
    before = torch.random.get_rng_state()
    clf = train_bow_classifier(DOCS, LABELS)  # seed 42, hidden 50, SGD lr 0.001, 3000 steps
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's RNG is untouched
    assert sum(p.numel() for p in clf.model.parameters()) == 1503  # 26*50+50 + 50*3+3
    assert clf.losses[-1] < clf.losses[0]
    assert clf.predict(DOCS) == LABELS
    # The two new documents of Burkov's code (erratum E3: his printed output shows other strings).
    new_docs = ["Listening to rock music is fun.", "I love science very much."]
    assert [CLASS_NAMES[c] for c in clf.predict(new_docs)] == ["Music", "Science"]
    assert CLASS_NAMES[clf.predict(["Listening to rock is fun."])[0]] == "Music"
    probs = clf.predict_proba(new_docs)
    assert probs.shape == (2, 3) and torch.allclose(probs.sum(-1), torch.ones(2))
    # deterministic: the same seed gives the same model
    again = train_bow_classifier(DOCS, LABELS, steps=50)
    assert again.losses == train_bow_classifier(DOCS, LABELS, steps=50).losses


def test_string_labels_and_module_shape():
    clf = train_bow_classifier(DOCS, [CLASS_NAMES[y] for y in LABELS], steps=10)
    assert clf.classes == ["Cinema", "Music", "Science"]
    model = BowClassifier(26, 3)
    assert model(torch.zeros(4, 26)).shape == (4, 3)


def test_bad_input():
    with pytest.raises(DataError, match="10 documents but 3 labels"):
        train_bow_classifier(DOCS, [1, 2, 3])
    with pytest.raises(DataError, match="at least 2 classes"):
        train_bow_classifier(DOCS, [1] * 10)
    with pytest.raises(DataError, match="list of strings"):
        BagOfWords.fit("Movies are fun.")
    with pytest.raises(ConfigError, match="steps >= 1"):
        train_bow_classifier(DOCS, LABELS, steps=0)
