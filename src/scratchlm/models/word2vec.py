"""Skip-gram word2vec with negative sampling (Mikolov et al. 2013; Burkov §2.2), in torch.

Skip-gram learns a vector for every word by asking it to predict the words around it.  Burkov's
version is a softmax over the whole vocabulary; negative sampling replaces that |V|-way softmax
with k+1 binary questions per (center c, context o) pair: "is o a real neighbour of c?" (yes) and,
for k noise words n drawn from the unigram distribution raised to 3/4, "is n?" (no):

    loss(c, o) = -log σ(u_o · v_c) - Σ_n log σ(-u_n · v_c)

v (``center``) are the word vectors we keep; u (``context``) is the output layer, thrown away after
training as in the book.  The 3/4 power flattens the noise distribution so rare words are drawn as
negatives more often than their frequency.  Two more tricks from the original:

* frequent-word subsampling: a word of corpus frequency f is kept with probability
  (√(f/t) + 1) · t/f (word2vec.c's form; t = ``subsample``), so "the" and "and" stop dominating;
* a dynamic window: each center looks b words either side with b uniform in 1..``window``, which
  weights near neighbours more.

``window`` counts words on *each* side (word2vec's convention): Burkov's "window of 5" around
"turing's" is ``window=2``.  Training is the one loop of ``training/`` (``SkipGramPairs`` +
``skipgram_loss`` + both tables): plain SGD, the learning rate decaying linearly to almost zero
as in word2vec.c.  Everything random is seeded by ``seed``, so a run is reproducible.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.errors import ConfigError, DataError
from scratchlm.training import LossEvaluator, Trainer
from scratchlm.training.config import TrainConfig
from scratchlm.training.losses import LossOutput


def skipgram_pairs(ids: Sequence[int] | np.ndarray, window: int) -> np.ndarray:
    """Every (center, context) pair of a sequence with up to ``window`` words each side, (P, 2).

    Pairs are grouped by offset (-window..-1, 1..window), each group in sequence order.
    """
    ids = np.asarray(ids, dtype=np.int64)
    out = []
    for off in [*range(-window, 0), *range(1, window + 1)]:
        if abs(off) < len(ids):
            center = ids[max(0, -off):len(ids) - max(0, off)]
            context = ids[max(0, off):len(ids) - max(0, -off)]
            out.append(np.stack([center, context], axis=1))
    return np.concatenate(out) if out else np.zeros((0, 2), dtype=np.int64)


class SkipGramNS(nn.Module):
    """Two embedding tables (center vectors v, context vectors u) and the negative-sampling loss."""

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.center = nn.Embedding(vocab_size, dim)
        self.context = nn.Embedding(vocab_size, dim)
        nn.init.uniform_(self.center.weight, -0.5 / dim, 0.5 / dim)  # word2vec.c's start
        nn.init.zeros_(self.context.weight)

    def forward(self, center: torch.Tensor, context: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        """Summed loss of a batch: ``center``/``context`` (B,), ``negatives`` (B, k)."""
        v = self.center(center)  # (B, d)
        pos = (self.context(context) * v).sum(-1)  # (B,)
        neg = torch.bmm(self.context(negatives), v.unsqueeze(-1)).squeeze(-1)  # (B, k)
        return -(F.logsigmoid(pos).sum() + F.logsigmoid(-neg).sum())


@dataclass
class Word2VecConfig:
    dim: int = 100
    window: int = 5
    negatives: int = 5
    min_count: int = 5
    subsample: float = 1e-3
    epochs: int = 5
    batch_size: int = 512
    lr: float = 0.025
    seed: int = 0
    max_steps: int | None = None  # stop early (tests); None = all epochs

    def validate(self) -> None:
        ints = {"dim": self.dim, "window": self.window, "negatives": self.negatives,
                "min_count": self.min_count, "epochs": self.epochs, "batch_size": self.batch_size}
        for name, value in ints.items():
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"word2vec {name} must be an integer >= 1, got {value!r}",
                                  f"set {name} to a positive integer")
        if not self.lr > 0 or not self.subsample >= 0:
            raise ConfigError(f"word2vec needs lr > 0 and subsample >= 0 (got {self.lr}, {self.subsample})",
                              "use e.g. lr=0.025, subsample=1e-3 (0 turns it off)")


@dataclass
class Word2Vec:
    """Trained word vectors: ``vocab`` (most frequent first), their ``counts``, and the model."""

    vocab: list[str]
    counts: np.ndarray
    model: SkipGramNS
    config: Word2VecConfig
    losses: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.index = {w: i for i, w in enumerate(self.vocab)}

    @property
    def vectors(self) -> torch.Tensor:
        """The center vectors, (|V|, dim) (a detached copy)."""
        return self.model.center.weight.detach().clone()

    def __getitem__(self, word: str) -> torch.Tensor:
        return self.vectors[self._id(word)]

    def _id(self, word: str) -> int:
        if word not in self.index:
            raise DataError(f"{word!r} is not in the word2vec vocabulary ({len(self.vocab)} words)",
                            f"use a word seen at least {self.config.min_count} times in training")
        return self.index[word]

    def similarity(self, a: str, b: str) -> float:
        """Cosine similarity of two words' vectors."""
        va, vb = self[a], self[b]
        return float(F.cosine_similarity(va, vb, dim=0))

    def most_similar(self, word: str, topn: int = 10) -> list[tuple[str, float]]:
        """The ``topn`` nearest words by cosine similarity (the word itself excluded)."""
        unit = F.normalize(self.vectors, dim=-1)
        sims = unit @ unit[self._id(word)]
        sims[self._id(word)] = -math.inf
        best = torch.topk(sims, min(topn, len(self.vocab) - 1))
        pairs = zip(best.values.tolist(), best.indices.tolist(), strict=True)
        return [(self.vocab[i], float(s)) for s, i in pairs]


def train_word2vec(sentences: Sequence[Sequence[str]], config: Word2VecConfig | None = None,
                   **overrides) -> Word2Vec:
    """Train skip-gram with negative sampling on word lists (pass ``[words]`` for one long stream).

    Words seen fewer than ``min_count`` times are dropped before windows are taken, as in word2vec.c.
    """
    cfg = config or Word2VecConfig()
    for key, value in overrides.items():
        if not hasattr(cfg, key):
            raise ConfigError(f"unknown word2vec option {key!r}", "see Word2VecConfig for the options")
        setattr(cfg, key, value)
    cfg.validate()
    if isinstance(sentences, str) or not all(isinstance(s, (list, tuple)) for s in sentences):
        raise DataError("word2vec trains on a list of word lists", "pass e.g. [words_of(text)]")
    freq = Counter(w for s in sentences for w in s)
    vocab = sorted((w for w, c in freq.items() if c >= cfg.min_count), key=lambda w: (-freq[w], w))
    if len(vocab) < 2:
        raise DataError(f"only {len(vocab)} words occur at least {cfg.min_count} times",
                        "train on more text or lower min_count")
    index = {w: i for i, w in enumerate(vocab)}
    counts = np.array([freq[w] for w in vocab], dtype=np.int64)
    streams = [np.array([index[w] for w in s if w in index], dtype=np.int64) for s in sentences]
    streams = [s for s in streams if len(s) > 1]

    rng = np.random.default_rng(cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = SkipGramNS(len(vocab), cfg.dim)
    freqs = counts / counts.sum()
    keep = None  # per-word probability of surviving subsampling
    if cfg.subsample:
        keep = np.minimum(1.0, (np.sqrt(freqs / cfg.subsample) + 1) * cfg.subsample / freqs)

    def epoch_pairs() -> np.ndarray:
        chunks = []
        for s in streams:
            if keep is not None:
                s = s[rng.random(len(s)) < keep[s]]
            if len(s) < 2:
                continue
            reach = rng.integers(1, cfg.window + 1, size=len(s))  # dynamic window per center
            for off in [*range(-cfg.window, 0), *range(1, cfg.window + 1)]:
                if abs(off) >= len(s):
                    continue
                lo, hi = max(0, -off), len(s) - max(0, off)
                ok = reach[lo:hi] >= abs(off)
                chunks.append(np.stack([s[lo:hi][ok], s[lo + off:hi + off][ok]], axis=1))
        return np.concatenate(chunks) if chunks else np.zeros((0, 2), dtype=np.int64)

    data = SkipGramPairs([epoch_pairs() for _ in range(cfg.epochs)])
    if not len(data):
        raise DataError("no training pairs: every sentence has fewer than 2 known words",
                        "train on longer sentences or lower min_count")
    losses: list[float] = []
    noise = torch.tensor(counts, dtype=torch.float64) ** 0.75
    trainer = Trainer(model, _train_config(cfg), data, loss_fn=skipgram_loss,
                      collate=SkipGramCollate(noise, cfg.negatives), evaluator=LossEvaluator(unit="pairs"),
                      callbacks=[lambda t: losses.append(t.last_loss)])
    trainer.fit()
    return Word2Vec(vocab, counts, model.eval(), cfg, losses)


def _train_config(cfg: Word2VecConfig) -> TrainConfig:
    """The loop's settings for word2vec.c's recipe: SGD whose rate decays linearly to 1e-4 of its
    start over the run.  word2vec.c's rate is per pair and the loop averages the gradient over the
    batch, so the loop's rate is ``lr × batch_size``: a full batch takes the same step."""
    lr = cfg.lr * cfg.batch_size
    return TrainConfig(batch_size=cfg.batch_size, lr=lr, min_lr=lr * 1e-4, lr_schedule="linear",
                       warmup_steps=0, optimizer="sgd", weight_decay=0.0, grad_clip=None, max_epochs=1,
                       max_steps=cfg.max_steps, eval_every=None, eval_batches=1, log_every=10**9,
                       seed=cfg.seed, precision="fp32", device="cpu", progress=False)


class SkipGramPairs:
    """The (center, context) pairs of every epoch, drawn before training, as one dataset for the loop.

    Each word2vec epoch subsamples and draws its dynamic windows anew, so epochs differ in their
    pairs and their number; the loop makes one pass over all of them, and ``epoch_order`` shuffles
    each epoch's pairs among themselves, keeping the epochs in order.
    """

    def __init__(self, epochs: Sequence[np.ndarray]):
        self.pairs = torch.from_numpy(np.concatenate(epochs))
        self.sizes = [len(e) for e in epochs]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.pairs[i]

    def epoch_order(self, generator: torch.Generator, batch: int) -> torch.Tensor:
        starts = np.cumsum([0, *self.sizes[:-1]]).tolist()
        return torch.cat([start + torch.randperm(size, generator=generator)
                          for start, size in zip(starts, self.sizes, strict=True)])


@dataclass
class SkipGramCollate:
    """A batch of pairs, with ``negatives`` noise words per pair drawn from ``noise`` (unigram counts
    to the 3/4) by the loop's seeded random state, so a resumed run draws what it would have."""

    noise: torch.Tensor
    negatives: int

    def __call__(self, items: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        pairs = torch.stack(list(items))
        drawn = torch.multinomial(self.noise, len(pairs) * self.negatives, replacement=True)
        return {"center": pairs[:, 0], "context": pairs[:, 1], "negatives": drawn.view(len(pairs), -1)}


def skipgram_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
    """The negative-sampling loss summed over the batch's pairs, and how many pairs."""
    return LossOutput(model(batch["center"], batch["context"], batch["negatives"]), len(batch["center"]))
