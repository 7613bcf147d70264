"""The n-gram counting engine (Burkov §2.5): words in, counts and smoothed probabilities out, numpy.

``NGramCounts(order, smoothing=...)`` counts every n-gram of order 1..N in padded sentences and
turns the counts into next-word probabilities.  It works on words (strings) as ``nltk.lm`` does;
the language model over token ids that the sampler, run dirs and the CLI use is
``models.ngram_module.NGramLM``, built on one of these.  Conventions follow ``nltk.lm`` with
``padded_everygram_pipeline``, so the two can be compared number for number:

* each sentence is padded with N-1 ``<s>`` on the left and N-1 ``</s>`` on the right, and every
  n-gram of order 1..N inside one padded sentence is counted (none crosses a sentence boundary);
* the vocabulary is every token of the padded text (``<s>``/``</s>`` included) seen at least
  ``unk_cutoff`` times, plus ``<UNK>``; rarer and unseen words are read as ``<UNK>``;
* ``score`` is a probability, ``logscore`` its log base 2; a context longer than N-1 words keeps
  its last N-1 (nltk's ``MLE``/``Laplace`` would score such a context as unseen);
* ``pad=False`` counts the sentences as they are (Burkov's §2.5 toy model): no ``<s>``/``</s>``.

Smoothings (c(.) is a raw count, ``h`` a context, ``h'`` the context without its first word):

``mle``
    P(w|h) = c(h w) / c(h •).  Zero for anything unseen (and for every word after an unseen context).
``laplace`` / ``add-k``
    P(w|h) = (c(h w) + k) / (c(h •) + k|V|), k = 1 for Laplace: every word gets a share, so the
    distribution sums to 1 for every context, seen or not.
``backoff`` (Burkov §2.5)
    The MLE of the longest context whose n-gram was seen; if none was, the add-one unigram
    (c(w) + 1) / (W + V) with W the number of training tokens and V the number of distinct ones.
    A score, not a distribution: it does not sum to 1 (nothing is discounted to pay for backing off).
``stupid-backoff`` (Brants et al. 2007)
    S(w|h) = c(h w)/c(h •) if c(h w) > 0, else alpha · S(w|h'), down to c(w)/W.  Also a score.
``kneser-ney`` (interpolated)
    P(w|h) = max(a(h w) − D, 0) / a(h •) + γ(h) · P(w|h'),  γ(h) = D · N(h) / a(h •), where a(.)
    is the raw count at the highest order and, below it, the *continuation count* N1+(• h w):
    how many distinct words precede ``h w``.  A word that follows many different contexts (not one
    frequent one) is a likely continuation of a new context, which is what the lower orders are
    for.  With ``discount=D`` (a float) the model is ``nltk.lm.KneserNeyInterpolated(discount=D)``
    exactly, quirks included: N(h) counts the raw continuations of h, the unigram level is the plain
    continuation distribution N1+(• w) / N1+(• •), and so sentence-initial lower-order contexts
    such as (``<s>``,) do not sum to exactly 1.  With ``discount=None`` (the default) it is the
    *modified* Kneser-Ney of Chen & Goodman (1998), as in KenLM: three discounts per order,
    D1, D2, D3+ for n-grams seen once, twice, three or more times, estimated from the counts of
    counts n1..n4 of that order, Y = n1 / (n1 + 2 n2), Dr = r − (r + 1) Y n(r+1) / n(r); γ(h)
    adds up exactly what was discounted; n-grams that start with ``<s>`` keep raw counts (they have
    no left context to count); and the unigram level is discounted too and interpolated with the
    uniform 1/|V|, so every word of the vocabulary, ``<UNK>`` included, has a non-zero probability.
    Every context sums to 1.

Storage: the n-grams of order k are one sorted ``int64`` array of keys ``row(prefix) · |V| + word``,
where ``row(prefix)`` is the prefix's index in the sorted order-(k−1) array (a trie flattened into
arrays), with a parallel array of counts.  Lookup is ``np.searchsorted``, one order at a time and
vectorised over all queries; counting is ``np.unique``.  No dict of dicts anywhere.

File format (``save``/``load``): one safetensors file (an 8-byte length, a JSON header, raw
little-endian arrays; no pickle).  Tensors ``keys.K`` and ``counts.K`` (int64, K = 1..N) are the
tables above; the header's metadata holds ``format`` = ``scratchlm.ngram``, ``version`` = ``1``,
``config`` (JSON: order, smoothing, k, discount, alpha, unk_cutoff, pad) and ``vocab`` (JSON list of the
words; a word's id is its index).  Everything else is recomputed on load.  ``write_arpa`` exports a
Kneser-Ney model in the standard ARPA backoff format (KenLM, SRILM) as well.

API: ``fit(sentences)``; ``score``/``logscore(word, context)`` and their vectorised ``scores``/
``logscores(ngrams)``; ``distribution(context)`` over ``vocab``; ``token_logscores``/``perplexity``
of sentences; ``predict``; ``sample`` (seeded); ``count(ngram)``; ``save``/``load``; ``next_scores`` (the
distributions after many contexts at once) and ``tables``/``from_tables``, through which
``scratchlm.models.ngram_module.NGramLM`` puts a model behind the transformer's interface (the
sampler, run dirs, ``scratchlm pretrain --preset ngram-kn5``).
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from itertools import chain, repeat
from pathlib import Path

import numpy as np

from scratchlm.checkpoint.atomic import atomic_path
from scratchlm.errors import CheckpointError, ConfigError, DataError

BOS = "<s>"
EOS = "</s>"
UNK = "<UNK>"
SMOOTHINGS = ("mle", "laplace", "add-k", "backoff", "stupid-backoff", "kneser-ney")
FORMAT = "scratchlm.ngram"
FORMAT_VERSION = "1"

_WORD_RE = re.compile(r"\w+")


def words_of(text: str, lowercase: bool = True) -> list[str]:
    """Burkov's word tokenizer (§2.1): runs of word characters, lowercased; punctuation dropped."""
    return _WORD_RE.findall(text.lower() if lowercase else text)


def sentences_of(text: str, lowercase: bool = True) -> list[list[str]]:
    """One sentence per non-blank line of ``text``, each a list of words (``words_of``)."""
    out = []
    for line in text.splitlines():
        words = words_of(line, lowercase)
        if words:
            out.append(words)
    return out


def _check_sentences(sentences: Iterable[Sequence[str]]) -> list[Sequence[str]]:
    if isinstance(sentences, (str, bytes)):
        raise DataError("sentences must be a list of token lists, not one string",
                        "split it first, e.g. sentences_of(text) or [line.split() for line in lines]")
    try:
        sents = list(sentences)
    except TypeError:
        raise DataError(f"sentences must be an iterable of token lists, got {type(sentences).__name__}",
                        "pass e.g. [['the', 'cat'], ['a', 'dog']]") from None
    for i, sent in enumerate(sents):
        if not isinstance(sent, (list, tuple)) or not all(map(isinstance, sent, repeat(str))):
            is_seq = isinstance(sent, (list, tuple))
            got = "a list with non-string items" if is_seq else type(sent).__name__
            raise DataError(f"sentence {i} is not a list of strings (got {got})",
                            "pass each sentence as a list of word strings, e.g. 'the cat sat'.split()")
    return sents


class NGramCounts:
    """The counts of an order-N word n-gram model and its smoothed scores (the module docstring).

    >>> lm = NGramCounts(2, "laplace").fit([["a", "b"], ["a", "c"]])
    >>> round(lm.score("b", ["a"]), 4)
    0.2857
    """

    def __init__(self, order: int, smoothing: str = "kneser-ney", *, k: float = 1.0,
                 discount: float | None = None, alpha: float = 0.4, unk_cutoff: int = 1, pad: bool = True):
        if isinstance(order, bool) or not isinstance(order, int) or order < 1:
            raise ConfigError(f"n-gram order must be an integer >= 1, got {order!r}",
                              "use e.g. order=3 for a trigram model")
        if smoothing not in SMOOTHINGS:
            close = difflib.get_close_matches(str(smoothing), SMOOTHINGS, n=2)
            hint = f"did you mean {' or '.join(close)}? " if close else ""
            raise ConfigError(f"unknown smoothing {smoothing!r}",
                              f"{hint}choose one of {', '.join(SMOOTHINGS)}")
        if smoothing == "laplace":
            k = 1.0
        if not (isinstance(k, (int, float)) and k > 0):
            raise ConfigError(f"add-k needs k > 0, got {k!r}", "use e.g. k=0.1 (k=1 is Laplace)")
        if discount is not None and not (isinstance(discount, (int, float)) and 0 <= discount <= 1):
            raise ConfigError(f"Kneser-Ney discount must be in [0, 1], got {discount!r}",
                              "use discount=0.1 (nltk's) or None for modified Kneser-Ney")
        if not (isinstance(alpha, (int, float)) and 0 < alpha <= 1):
            raise ConfigError(f"stupid-backoff alpha must be in (0, 1], got {alpha!r}", "use alpha=0.4")
        if isinstance(unk_cutoff, bool) or not isinstance(unk_cutoff, int) or unk_cutoff < 1:
            raise ConfigError(f"unk_cutoff must be an integer >= 1, got {unk_cutoff!r}",
                              "use 1 to keep every training word, 2 to map singletons to <UNK>")
        if smoothing == "kneser-ney" and order < 2:
            raise ConfigError("kneser-ney needs order >= 2 (its lower orders are counted from bigrams)",
                              "use order >= 2, or smoothing='laplace' for a unigram model")
        self.order = order
        self.smoothing = smoothing
        self.k = float(k)
        self.discount = None if discount is None else float(discount)
        self.alpha = float(alpha)
        self.unk_cutoff = unk_cutoff
        self.pad = bool(pad)
        self.vocab: list[str] = []
        self._fitted = False

    # ------------------------------------------------------------------ fitting
    def fit(self, sentences: Iterable[Sequence[str]]) -> NGramCounts:
        """Count the n-grams of ``sentences`` (lists of words); returns ``self``."""
        sents = _check_sentences(sentences)
        if not sents or not any(sents):
            raise DataError("the training corpus is empty (no words)",
                            "pass at least one non-empty sentence, e.g. sentences_of(text)")
        n, pad = self.order, (self.order - 1 if self.pad else 0)
        freq = Counter(chain.from_iterable(sents))
        if pad:
            freq[BOS] += pad * len(sents)
            freq[EOS] += pad * len(sents)
        vocab = sorted(w for w, c in freq.items() if c >= self.unk_cutoff and w != UNK)
        self._set_vocab([UNK, *vocab])
        get = self._index.get
        lead, tail = [BOS] * pad, [EOS] * pad
        tokens = list(chain.from_iterable(chain(lead, s, tail) for s in sents))
        flat = np.fromiter(map(get, tokens, repeat(0)), dtype=np.int64, count=len(tokens))
        lengths = np.fromiter((len(s) + 2 * pad for s in sents), dtype=np.int64, count=len(sents))
        ends = np.repeat(np.cumsum(lengths), lengths)
        room = ends - np.arange(len(flat))  # tokens left in this position's sentence
        V = len(self.vocab)
        self._keys, self._counts, self._suffix = [None], [None], [None, None]
        rows = None
        for order in range(1, n + 1):
            pos = np.flatnonzero(room >= order)
            key = flat[pos] if order == 1 else rows[pos] * V + flat[pos + order - 1]
            uniq, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
            new_rows = np.full(len(flat), -1, dtype=np.int64)
            new_rows[pos] = inverse
            if order > 1:  # the suffix of the k-gram at i is the (k-1)-gram at i+1
                suffix = np.empty(len(uniq), dtype=np.int64)
                suffix[inverse] = rows[pos + 1]
                self._suffix.append(suffix)
            self._keys.append(uniq.astype(np.int64))
            self._counts.append(counts.astype(np.int64))
            rows = new_rows
        self._prepare()
        return self

    def _set_vocab(self, vocab: list[str]) -> None:
        self.vocab = vocab
        self._index = {w: i for i, w in enumerate(vocab)}
        self._bos = self._index.get(BOS, -1)
        self._eos = self._index.get(EOS, -1)

    def _prepare(self) -> None:
        """Per-context totals and the smoothing's own statistics, from the count tables."""
        n, V = self.order, len(self.vocab)
        self._row1 = np.full(V, -1, dtype=np.int64)
        self._row1[self._keys[1]] = np.arange(len(self._keys[1]))
        sizes = [1] + [len(self._keys[k]) for k in range(1, n + 1)]
        self._parent = [None] + [self._keys[k] // V for k in range(1, n + 1)]
        self._word = [None] + [self._keys[k] % V for k in range(1, n + 1)]
        # ctx_total[k][r]: c(h •) for the order-(k-1) context in row r; ctx_types[k][r]: N1+(h •)
        self._ctx_total = [None] + [np.bincount(self._parent[k], weights=self._counts[k],
                                                minlength=sizes[k - 1]) for k in range(1, n + 1)]
        self._ctx_types = [None] + [np.bincount(self._parent[k], minlength=sizes[k - 1])
                                    for k in range(1, n + 1)]
        self._total_tokens = float(self._ctx_total[1][0])
        if self.smoothing == "kneser-ney":
            # cont[k][r]: N1+(• g), distinct words before the k-gram g in row r (k < n)
            cont = [None] + [np.bincount(self._suffix[k + 1], minlength=sizes[k]) for k in range(1, n)]
            if self.discount is not None:
                self._kn_cont = cont
                self._kn_cont_total = [None] + [np.bincount(self._parent[k], weights=cont[k],
                                                            minlength=sizes[k - 1]) for k in range(1, n)]
            else:
                self._prepare_modified_kn(cont, sizes)
        self._fitted = True

    def _prepare_modified_kn(self, cont: list, sizes: list[int]) -> None:
        n = self.order
        first = [None, self._word[1]]
        for k in range(2, n + 1):
            first.append(first[k - 1][self._parent[k]])
        self._kn_adj, self._kn_disc, self._kn_D = [None], [None], [None]
        self._kn_S, self._kn_G = [None], [None]
        for k in range(1, n + 1):
            if k == n:
                adj = self._counts[k].astype(np.float64)
            else:
                adj = np.where(first[k] == self._bos, self._counts[k], cont[k]).astype(np.float64)
            D = self._discounts(adj)
            disc = np.where(adj >= 3, D[3], np.where(adj == 2, D[2], np.where(adj == 1, D[1], 0.0)))
            self._kn_adj.append(adj)
            self._kn_disc.append(disc)
            self._kn_D.append(D)
            self._kn_S.append(np.bincount(self._parent[k], weights=adj, minlength=sizes[k - 1]))
            self._kn_G.append(np.bincount(self._parent[k], weights=disc, minlength=sizes[k - 1]))

    @staticmethod
    def _discounts(adj: np.ndarray) -> tuple[float, float, float, float]:
        """Chen & Goodman's D1, D2, D3+ (index 1..3) from the counts of counts n1..n4.

        A tiny corpus can lack some n_r; then one discount Y = n1 / (n1 + 2 n2) serves all three
        (0.5 if even that is undefined), clipped into (0, 1) so no count loses all of its mass.
        """
        nr = [int(np.count_nonzero(adj == r)) for r in range(5)]
        if min(nr[1:]) > 0:
            Y = nr[1] / (nr[1] + 2 * nr[2])
            D = [r - (r + 1) * Y * nr[r + 1] / nr[r] for r in (1, 2, 3)]
            return (0.0, *(float(min(max(d, 0.0), r)) for r, d in zip((1, 2, 3), D, strict=True)))
        Y = nr[1] / (nr[1] + 2 * nr[2]) if nr[1] + nr[2] > 0 else 0.5
        Y = min(max(Y, 0.05), 0.95)
        return (0.0, Y, Y, Y)

    # ------------------------------------------------------------------ lookup
    def _child(self, k: int, parent_rows: np.ndarray, words: np.ndarray) -> np.ndarray:
        """Rows in the order-k table of (prefix in ``parent_rows``, word); -1 where absent."""
        if k == 1:  # unigrams: a direct word -> row map instead of a binary search
            return np.where((parent_rows >= 0) & (words >= 0), self._row1[np.maximum(words, 0)], -1)
        keys = self._keys[k]
        key = parent_rows * len(self.vocab) + words
        pos = np.searchsorted(keys, key)
        pos_c = np.minimum(pos, len(keys) - 1)
        found = (parent_rows >= 0) & (words >= 0) & (pos < len(keys)) & (keys[pos_c] == key)
        return np.where(found, pos_c, -1)

    def _rows(self, seqs: np.ndarray) -> np.ndarray:
        """Rows of the n-grams ``seqs`` (M, k) in the order-k table; -1 where absent."""
        rows = np.zeros(len(seqs), dtype=np.int64)
        for j in range(seqs.shape[1]):
            rows = self._child(j + 1, rows, seqs[:, j])
        return rows

    def _score_ids(self, ctx: np.ndarray, words: np.ndarray) -> np.ndarray:
        """Scores of ``words`` (M,) after contexts ``ctx`` (M, N-1), left-padded with -1."""
        L, M = self.order - 1, len(words)
        avail = (ctx >= 0).sum(axis=1) if L else np.zeros(M, dtype=np.int64)
        ctx_rows, ng_rows = [], []
        for m in range(L + 1):  # context = the last m words
            rows = np.zeros(M, dtype=np.int64)
            for j in range(L - m, L):
                rows = self._child(j - (L - m) + 1, rows, ctx[:, j])
            rows = np.where(avail >= m, rows, -1)
            ctx_rows.append(rows)
            ng_rows.append(self._child(m + 1, rows, words))
        return self._smooth(ctx_rows, ng_rows, words, avail)

    def _smooth(self, ctx_rows: list, ng_rows: list, words: np.ndarray, avail: np.ndarray) -> np.ndarray:
        """Scores from table rows: ``ctx_rows[m]``/``ng_rows[m]`` hold, per query, the row of its last-m-word
        context in the order-m table and of context + word in the order-(m+1) table (-1: absent or
        beyond the ``avail`` words of context the query has)."""
        method = getattr(self, "_p_" + self.smoothing.replace("-", "_"))
        return method(ctx_rows, ng_rows, words, avail)

    def _count_at(self, k: int, rows: np.ndarray, table: np.ndarray | None = None) -> np.ndarray:
        table = self._counts[k] if table is None else table
        return np.where(rows >= 0, table[np.maximum(rows, 0)], 0)

    def _total_at(self, k: int, ctx_rows: np.ndarray, table: np.ndarray | None = None) -> np.ndarray:
        table = self._ctx_total[k] if table is None else table
        return np.where(ctx_rows >= 0, table[np.maximum(ctx_rows, 0)], 0)

    # ------------------------------------------------------------------ smoothings
    def _p_mle(self, ctx_rows, ng_rows, words, avail):
        out = np.zeros(len(words))
        for m in range(self.order):
            sel = avail == m
            if not sel.any():
                continue
            c = self._count_at(m + 1, ng_rows[m][sel])
            t = self._total_at(m + 1, ctx_rows[m][sel])
            out[sel] = np.divide(c, t, out=np.zeros(len(c)), where=t > 0)
        return out

    def _p_add_k(self, ctx_rows, ng_rows, words, avail):
        out = np.zeros(len(words))
        k, V = self.k, len(self.vocab)
        for m in range(self.order):
            sel = avail == m
            if sel.any():
                c = self._count_at(m + 1, ng_rows[m][sel])
                t = self._total_at(m + 1, ctx_rows[m][sel])
                out[sel] = (c + k) / (t + V * k)
        return out

    _p_laplace = _p_add_k

    def _p_backoff(self, ctx_rows, ng_rows, words, avail):
        out = (self._count_at(1, ng_rows[0]) + 1) / (self._total_tokens + len(self._keys[1]))
        for m in range(1, self.order):
            c = self._count_at(m + 1, ng_rows[m])
            use = (c > 0) & (avail >= m)
            t = self._total_at(m + 1, ctx_rows[m])
            out = np.where(use, np.divide(c, t, out=np.zeros(len(c)), where=use), out)
        return out

    def _p_stupid_backoff(self, ctx_rows, ng_rows, words, avail):
        out = self.alpha ** avail * (self._count_at(1, ng_rows[0]) / self._total_tokens)
        for m in range(1, self.order):
            c = self._count_at(m + 1, ng_rows[m])
            use = (c > 0) & (avail >= m)
            t = self._total_at(m + 1, ctx_rows[m])
            rel = np.divide(c, t, out=np.zeros(len(c)), where=use)
            out = np.where(use, self.alpha ** (avail - m) * rel, out)
        return out

    def _p_kneser_ney(self, ctx_rows, ng_rows, words, avail):
        if self.discount is None:
            return self._p_modified_kn(ctx_rows, ng_rows, words, avail)
        d, top = self.discount, self.order - 1
        n_bigrams = float(len(self._keys[2]))
        p = self._count_at(1, ng_rows[0], self._kn_cont[1]) / n_bigrams
        for m in range(1, top + 1):
            ctx = ctx_rows[m]
            types = self._total_at(m + 1, ctx, self._ctx_types[m + 1])
            if m == top:
                c, t = self._count_at(m + 1, ng_rows[m]), self._total_at(m + 1, ctx)
            else:
                c = self._count_at(m + 1, ng_rows[m], self._kn_cont[m + 1])
                t = self._total_at(m + 1, ctx, self._kn_cont_total[m + 1])
            seen = (types > 0) & (t > 0) & (avail >= m)
            safe_t = np.where(seen, t, 1.0)
            alpha = np.maximum(c - d, 0.0) / safe_t
            gamma = d * types / safe_t
            p = np.where(seen, alpha + gamma * p, p)
        return p

    def _p_modified_kn(self, ctx_rows, ng_rows, words, avail):
        V = len(self.vocab)
        S1, G1 = self._kn_S[1][0], self._kn_G[1][0]
        a = self._count_at(1, ng_rows[0], self._kn_adj[1])
        dsc = self._count_at(1, ng_rows[0], self._kn_disc[1])
        p = np.maximum(a - dsc, 0.0) / S1 + (G1 / S1) / V
        for m in range(1, self.order):
            ctx = ctx_rows[m]
            S = self._total_at(m + 1, ctx, self._kn_S[m + 1])
            G = self._total_at(m + 1, ctx, self._kn_G[m + 1])
            a = self._count_at(m + 1, ng_rows[m], self._kn_adj[m + 1])
            dsc = self._count_at(m + 1, ng_rows[m], self._kn_disc[m + 1])
            seen = (S > 0) & (avail >= m)
            safe = np.where(seen, S, 1.0)
            p = np.where(seen, np.maximum(a - dsc, 0.0) / safe + G / safe * p, p)
        return p

    # ------------------------------------------------------------------ public scoring
    def _require_fitted(self) -> None:
        if not self._fitted:
            raise ConfigError("this n-gram model has not been fitted",
                              "call fit(sentences) or NGramCounts.load(path)")

    def _encode_queries(self, ngrams: Iterable[Sequence[str]]) -> tuple[np.ndarray, np.ndarray]:
        """Word ids of the queries: contexts (M, N-1) left-padded with -1, and words (M,)."""
        grams = ngrams if isinstance(ngrams, list) else list(ngrams)
        if isinstance(ngrams, str) or any(isinstance(g, str) for g in grams) or not all(grams):
            raise DataError("n-grams must be non-empty sequences of words",
                            "pass tuples like ('the', 'cat'): context words, then the word")
        L, M, get = self.order - 1, len(grams), self._index.get
        lengths = np.fromiter(map(len, grams), dtype=np.int64, count=M)
        ctx = np.full((M, L), -1, dtype=np.int64)
        words = np.zeros(M, dtype=np.int64)
        for width in np.unique(lengths).tolist():
            idx = np.flatnonzero(lengths == width)
            group = grams if len(idx) == M else [grams[i] for i in idx]
            ids = np.fromiter(map(get, chain.from_iterable(group), repeat(0)), dtype=np.int64,
                              count=len(idx) * width).reshape(len(idx), width)
            words[idx] = ids[:, -1]
            keep = min(width - 1, L)
            if keep:
                ctx[idx, L - keep:] = ids[:, width - 1 - keep:width - 1]
        return ctx, words

    def scores(self, ngrams: Iterable[Sequence[str]]) -> np.ndarray:
        """Vectorised ``score``: one probability per n-gram (its last word given the words before)."""
        self._require_fitted()
        ctx, words = self._encode_queries(ngrams)
        return self._score_ids(ctx, words)

    def logscores(self, ngrams: Iterable[Sequence[str]]) -> np.ndarray:
        """Vectorised ``logscore`` (log base 2; -inf for probability 0)."""
        with np.errstate(divide="ignore"):
            return np.log2(self.scores(ngrams))

    def score(self, word: str, context: Sequence[str] | None = None) -> float:
        """P(word | context); words outside the vocabulary count as ``<UNK>``."""
        return float(self.scores([(*(context or ()), word)])[0])

    def logscore(self, word: str, context: Sequence[str] | None = None) -> float:
        """log2 P(word | context), as ``nltk.lm``'s ``logscore`` (-inf for probability 0)."""
        s = self.score(word, context)
        return math.log2(s) if s > 0 else -math.inf

    def count(self, ngram: Sequence[str]) -> int:
        """Raw training count of an n-gram (words outside the vocabulary count as ``<UNK>``)."""
        self._require_fitted()
        if not 1 <= len(ngram) <= self.order:
            raise ConfigError(f"n-gram {tuple(ngram)!r} has {len(ngram)} words, not 1..{self.order}",
                              "pass an n-gram no longer than the model's order")
        ids = np.array([[self._index.get(w, 0) for w in ngram]], dtype=np.int64)
        row = self._rows(ids)[0]
        return int(self._counts[len(ngram)][row]) if row >= 0 else 0

    def distribution(self, context: Sequence[str] | None = None) -> np.ndarray:
        """Scores of every vocabulary word (``self.vocab`` order) after ``context``."""
        self._require_fitted()
        L, V = self.order - 1, len(self.vocab)
        c = [self._index.get(w, 0) for w in list(context or ())[-L:]] if L else []
        row = np.array([-1] * (L - len(c)) + c, dtype=np.int64)
        return self._score_ids(np.broadcast_to(row, (V, L)), np.arange(V, dtype=np.int64))

    def next_scores(self, contexts: np.ndarray) -> np.ndarray:
        """Vectorised ``distribution``: scores (M, |V|) of every vocabulary word after each of M contexts.

        ``contexts`` (M, N-1) holds vocabulary indices (``vocab.index(word)``), left-padded with -1
        where a context is shorter than N-1 words.
        """
        self._require_fitted()
        L, V = self.order - 1, len(self.vocab)
        ctx = np.asarray(contexts, dtype=np.int64).reshape(-1, L)
        words = np.tile(np.arange(V, dtype=np.int64), len(ctx))
        return self._score_ids(np.repeat(ctx, V, axis=0), words).reshape(len(ctx), V)

    @property
    def num_counts(self) -> int:
        """Stored counts: one per distinct n-gram of each order 1..N (the model's "parameters")."""
        self._require_fitted()
        return sum(len(self._counts[k]) for k in range(1, self.order + 1))

    def token_logscores(self, sentences: Iterable[Sequence[str]]) -> np.ndarray:
        """log2 P of every word of every sentence and of one ``</s>`` ending each, in order.

        Sentences are left-padded with N-1 ``<s>`` as in training (with ``pad=False``: no padding,
        no ``</s>``, and the first words see shorter contexts).  This is what ``perplexity``
        averages; sum it and divide by a character count for bits per character.
        """
        self._require_fitted()
        sents = _check_sentences(sentences)
        if not sents:
            raise DataError("nothing to score: no sentences", "pass at least one sentence")
        n, L = self.order, self.order - 1
        pad = L if self.pad else 0
        lead, tail = [BOS] * pad, [EOS] * (1 if pad else 0)
        tokens = list(chain.from_iterable(chain(lead, s, tail) for s in sents))
        seq = np.fromiter(map(self._index.get, tokens, repeat(0)), dtype=np.int64, count=len(tokens))
        lengths = np.fromiter((len(s) + pad + len(tail) for s in sents), dtype=np.int64, count=len(sents))
        starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
        offset = np.arange(len(seq)) - starts  # position inside its sentence
        room = lengths.repeat(lengths) - offset  # tokens from here to the sentence's end
        # rows[k][i]: row of the k-gram that starts at position i (-1: absent or crosses a sentence end)
        rows = [np.zeros(len(seq), dtype=np.int64)]
        for k in range(1, n + 1):
            nxt = np.full(len(seq), -1, dtype=np.int64)
            ok = np.flatnonzero(room >= k)
            nxt[ok] = self._child(k, rows[k - 1][ok], seq[ok + k - 1])
            rows.append(nxt)
        targets = np.flatnonzero(offset >= pad)
        avail = np.minimum(offset[targets], L)
        ctx_rows, ng_rows = [], []
        for m in range(L + 1):  # context = the m words before the target
            start = np.maximum(targets - m, 0)
            ctx_rows.append(np.where(avail >= m, rows[m][start], -1))
            ng_rows.append(np.where(avail >= m, rows[m + 1][start], -1))
        with np.errstate(divide="ignore"):
            return np.log2(self._smooth(ctx_rows, ng_rows, seq[targets], avail))

    def perplexity(self, sentences: Iterable[Sequence[str]]) -> float:
        """2 ** (mean negative log2 probability per token), over ``token_logscores``.

        Infinite when some token has probability 0 (MLE on unseen text, nltk-style Kneser-Ney on a
        word that never followed anything).  Equals ``nltk.lm``'s ``perplexity`` over the same
        n-grams.
        """
        return float(2.0 ** -np.mean(self.token_logscores(sentences)))

    def predict(self, context: Sequence[str] | None = None) -> str:
        """The highest-scoring next word (Burkov's ``predict_next_token``); ties go to the word that
        sorts first, and ``<s>`` is never predicted."""
        p = self.distribution(context)
        if self._bos >= 0:
            p[self._bos] = -1.0
        return self.vocab[int(np.argmax(p))]

    # ------------------------------------------------------------------ sampling
    def sample(self, prefix: Sequence[str] | None = None, max_words: int = 50,
               seed: int | None = None) -> list[str]:
        """Sample one sentence word by word until ``</s>`` or ``max_words`` (seeded, reproducible).

        The distribution is the model's scores over the vocabulary after the last N-1 words,
        renormalised (backoff scores are not distributions), with ``<s>`` excluded.  If every word
        scores 0 (MLE after an unseen context) the context is shortened until one does not.
        Returns the new words only, without ``</s>``.
        """
        self._require_fitted()
        rng = np.random.default_rng(seed)
        history = [BOS] * (self.order - 1 if self.pad else 0) + list(prefix or ())
        out: list[str] = []
        while len(out) < max_words:
            context = history[max(len(history) - self.order + 1, 0):] if self.order > 1 else []
            while True:
                p = self.distribution(context)
                if self._bos >= 0:
                    p[self._bos] = 0.0
                if p.sum() > 0 or not context:
                    break
                context = context[1:]
            cum = np.cumsum(p)
            if cum[-1] <= 0:
                break
            idx = int(np.searchsorted(cum, rng.random() * cum[-1], side="right"))
            word = self.vocab[min(idx, len(self.vocab) - 1)]
            if word == EOS:
                break
            out.append(word)
            history.append(word)
        return out

    # ------------------------------------------------------------------ save / load
    def _config(self) -> dict:
        return {"order": self.order, "smoothing": self.smoothing, "k": self.k, "discount": self.discount,
                "alpha": self.alpha, "unk_cutoff": self.unk_cutoff, "pad": self.pad}

    def tables(self) -> dict[str, np.ndarray]:
        """The count tables as named arrays: ``keys.K`` and ``counts.K`` (int64, K = 1..N)."""
        self._require_fitted()
        tensors = {}
        for k in range(1, self.order + 1):
            tensors[f"keys.{k}"] = np.ascontiguousarray(self._keys[k])
            tensors[f"counts.{k}"] = np.ascontiguousarray(self._counts[k])
        return tensors

    def save(self, path: str | Path) -> Path:
        """Write the model to one ``.safetensors`` file (format in the module docstring)."""
        from safetensors.numpy import save_file

        path = Path(path)
        tensors = self.tables()
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "config": json.dumps(self._config()),
                "vocab": json.dumps(self.vocab, ensure_ascii=False)}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> NGramCounts:
        """Read a model written by ``save``; a foreign or damaged file is a ``CheckpointError``."""
        from safetensors import SafetensorError
        from safetensors.numpy import safe_open

        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"n-gram model file not found: {path}", "check the path given to save()")
        try:
            with safe_open(str(path), framework="np") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise CheckpointError(f"{path} is not a scratchlm n-gram model",
                                          "load a file written by NGramCounts.save")
                if meta.get("version") != FORMAT_VERSION:
                    raise CheckpointError(f"{path} has n-gram format version {meta.get('version')!r}",
                                          f"this scratchlm reads version {FORMAT_VERSION}")
                cfg, vocab = json.loads(meta["config"]), json.loads(meta["vocab"])
                arrays = {name: f.get_tensor(name) for name in f.keys()}
        except (SafetensorError, OSError, ValueError, KeyError) as err:
            raise CheckpointError(f"cannot read n-gram model {path}: {err}",
                                  "the file is damaged; save the model again") from None
        return cls.from_tables(arrays, cfg, vocab, where=str(path))

    @classmethod
    def from_tables(cls, tables: dict[str, np.ndarray], config: dict, vocab: list[str],
                    where: str = "n-gram model") -> NGramCounts:
        """A fitted model from ``tables()``, ``config`` (as saved: order, smoothing, k, discount, alpha,
        unk_cutoff, pad) and ``vocab``; malformed tables are a ``CheckpointError``."""
        cfg = config
        lm = cls(cfg["order"], cfg["smoothing"], k=cfg.get("k", 1.0), discount=cfg.get("discount"),
                 alpha=cfg.get("alpha", 0.4), unk_cutoff=cfg.get("unk_cutoff", 1), pad=cfg.get("pad", True))
        lm._set_vocab(list(vocab))
        lm._keys, lm._counts = [None], [None]
        prev_size = 1  # rows of the order-(k-1) table; the empty context has one
        for k in range(1, lm.order + 1):
            keys, counts = tables.get(f"keys.{k}"), tables.get(f"counts.{k}")
            keys = None if keys is None else np.asarray(keys)
            counts = None if counts is None else np.asarray(counts)
            ok = (keys is not None and counts is not None and keys.dtype == np.int64
                  and counts.dtype == np.int64 and keys.ndim == 1 and keys.shape == counts.shape
                  and len(keys) > 0 and bool(np.all(keys[1:] > keys[:-1])) and bool(np.all(counts > 0))
                  and keys[0] >= 0 and keys[-1] < prev_size * len(vocab))
            if not ok:
                raise CheckpointError(f"{where}: count table of order {k} is missing or malformed",
                                      "the file is damaged; save the model again")
            lm._keys.append(keys)
            lm._counts.append(counts)
            prev_size = len(keys)
        lm._suffix = [None, None] + [lm._derive_suffix(k) for k in range(2, lm.order + 1)]
        lm._prepare()
        return lm

    def _decode(self, k: int) -> np.ndarray:
        """The word ids (n_k, k) of every n-gram in the order-k table, in table order."""
        V = len(self.vocab)
        seqs = (self._keys[1] % V)[:, None]
        for j in range(2, k + 1):
            seqs = np.hstack([seqs[self._keys[j] // V], (self._keys[j] % V)[:, None]])
        return seqs

    def _derive_suffix(self, k: int) -> np.ndarray:
        """Rows in the order-(k-1) table of each k-gram's last k-1 words (decoded from the keys)."""
        V = len(self.vocab)
        self._row1 = np.full(V, -1, dtype=np.int64)
        self._row1[self._keys[1]] = np.arange(len(self._keys[1]))
        rows = self._rows(self._decode(k)[:, 1:])
        if (rows < 0).any():
            raise CheckpointError(f"order-{k} n-grams whose suffix is missing from order {k - 1}",
                                  "the file is damaged; save the model again")
        return rows

    def write_arpa(self, path: str | Path) -> Path:
        """Write a Kneser-Ney model as an ARPA backoff file (readable by KenLM, SRILM).

        Interpolated Kneser-Ney is exactly a backoff model: a listed n-gram gets its interpolated
        probability, and an unlisted one P(w|h) = γ(h) · P(w|h'), so γ(h) is the backoff weight of
        h.  Every vocabulary word is listed as a unigram (``<UNK>`` written as KenLM's ``<unk>``);
        probability 0 is written as -99.  Lines are ``log10 P <TAB> words [<TAB> log10 backoff]``.
        """
        self._require_fitted()
        if self.smoothing != "kneser-ney":
            raise ConfigError(f"write_arpa needs smoothing='kneser-ney', this model is {self.smoothing!r}",
                              "refit with NGramCounts(order, 'kneser-ney')")
        n, L, V = self.order, self.order - 1, len(self.vocab)
        names = ["<unk>" if w == UNK else w for w in self.vocab]

        def log10(x: np.ndarray) -> np.ndarray:
            with np.errstate(divide="ignore"):
                return np.where(x > 0, np.log10(np.where(x > 0, x, 1.0)), -99.0)

        def backoff(k: int) -> np.ndarray:  # γ of each order-k n-gram as a context (1 where unseen)
            if self.discount is None:
                S, G = self._kn_S[k + 1], self._kn_G[k + 1]
                return np.divide(G, S, out=np.ones(len(S)), where=S > 0)
            t = self._ctx_total[k + 1] if k + 1 == n else self._kn_cont_total[k + 1]
            types = self._ctx_types[k + 1]
            ok = (types > 0) & (t > 0)
            return np.divide(self.discount * types, t, out=np.ones(len(t)), where=ok)

        sizes = [V] + [len(self._keys[k]) for k in range(2, n + 1)]
        path = Path(path)
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write("\\data\\\n" + "".join(f"ngram {k}={sizes[k - 1]}\n" for k in range(1, n + 1)))
            for k in range(1, n + 1):
                f.write(f"\n\\{k}-grams:\n")
                if k == 1:
                    seqs = np.arange(V)[:, None]
                    bow = np.ones(V)
                    if n > 1:
                        bow[self._keys[1]] = backoff(1)
                else:
                    seqs = self._decode(k)
                    bow = backoff(k) if k < n else None
                ctx = np.full((len(seqs), L), -1, dtype=np.int64)
                if k > 1:
                    ctx[:, L - (k - 1):] = seqs[:, :-1]
                logp = log10(self._score_ids(ctx, seqs[:, -1])).tolist()
                grams = [" ".join(names[w] for w in row) for row in seqs.tolist()]
                if bow is None:
                    f.writelines(f"{p:.7g}\t{g}\n" for p, g in zip(logp, grams, strict=True))
                else:
                    logb = log10(bow).tolist()
                    rows = zip(logp, grams, logb, strict=True)
                    f.writelines(f"{p:.7g}\t{g}\t{b:.7g}\n" for p, g, b in rows)
            f.write("\n\\end\\\n")
        return path

    def __repr__(self) -> str:
        extra = f", discount={self.discount}" if self.smoothing == "kneser-ney" else ""
        state = f"{len(self.vocab)} words" if self._fitted else "not fitted"
        return f"NGramCounts(order={self.order}, smoothing={self.smoothing!r}{extra}; {state})"
