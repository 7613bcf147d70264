"""Claim: ``NGramCounts`` fits and scores a 5-gram model on tinyshakespeare >= 20x faster than ``nltk.lm``.

What is timed, in one process on the same data:

* the corpus: every non-blank line of tinyshakespeare, lowercased ``\\w+`` words (32,777 lines,
  208,530 words);
* fit: nltk ``padded_everygram_pipeline`` + ``Laplace(5).fit`` (the same counting code serves every
  nltk model class, so it is measured once) against ``NGramCounts(5, smoothing).fit``;
* score: log2 P of every word and of one ``</s>`` per line with 4 ``<s>`` of left padding
  (241,307 5-grams).  Ours scores them all (``token_logscores``).  nltk scores the same n-grams
  one ``logscore`` call at a time, so it is timed on the first ``--nltk-sample`` of them
  (``--kn-sample`` for Kneser-Ney, whose every call scans all higher-order contexts) and the
  per-n-gram time is multiplied out to all of them.  The sampled scores are checked equal to ours.
* KenLM (when its Python package is installed) as the speed ceiling for *querying*: our modified
  Kneser-Ney model is written as ARPA and loaded into KenLM (its estimator, ``lmplz``, is not part
  of the pip package, so KenLM has no fit time here), then every line is scored with
  ``full_scores``.

Run: ``.venv/bin/python benchmarks/ngram.py`` (about 1-2 minutes, most of it nltk's fit).
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import numpy as np

from scratchlm.data.corpora import read_corpus
from scratchlm.models.ngram import BOS, EOS, NGramCounts, sentences_of


def best_of(fn, repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        gc.collect()
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default="builtin:tinyshakespeare")
    ap.add_argument("--order", type=int, default=5)
    ap.add_argument("--nltk-sample", type=int, default=20_000, help="n-grams nltk Laplace scores")
    ap.add_argument("--kn-sample", type=int, default=20, help="n-grams nltk Kneser-Ney scores")
    ap.add_argument("--repeat", type=int, default=3, help="best of this many runs for ours")
    args = ap.parse_args()

    from nltk.lm import KneserNeyInterpolated, Laplace
    from nltk.lm.preprocessing import padded_everygram_pipeline

    n = args.order
    sents = sentences_of(read_corpus(args.corpus))
    grams = []  # the n-grams that token_logscores scores, as tuples for nltk
    for s in sents:
        p = [BOS] * (n - 1) + s + [EOS]
        grams.extend(tuple(p[i - n + 1:i + 1]) for i in range(n - 1, len(p)))
    print(f"corpus {args.corpus}: {len(sents):,} lines, {sum(map(len, sents)):,} words; "
          f"order {n}; {len(grams):,} n-grams to score")

    t0 = time.perf_counter()
    train, vocab = padded_everygram_pipeline(n, sents)
    ref = Laplace(n)
    ref.fit(train, vocab)
    nltk_fit = time.perf_counter() - t0
    ref_kn = KneserNeyInterpolated(n, discount=0.1, vocabulary=ref.vocab, counter=ref.counts)
    print(f"nltk fit (shared by every nltk model): {nltk_fit:.2f} s")

    rows = []
    for label, kwargs, ref_model, sample in [
        ("laplace", {"smoothing": "laplace"}, ref, args.nltk_sample),
        ("kneser-ney d=0.1 (nltk's)", {"smoothing": "kneser-ney", "discount": 0.1}, ref_kn, args.kn_sample),
        ("kneser-ney modified (ours only)", {"smoothing": "kneser-ney"}, None, 0),
    ]:
        fit_s, lm = best_of(lambda kw=kwargs: NGramCounts(n, **kw).fit(sents), args.repeat)
        score_s, ours = best_of(lambda lm=lm: lm.token_logscores(sents), args.repeat)
        line = {"model": label, "ours_fit": fit_s, "ours_score": score_s, "ppl": 2 ** -ours.mean()}
        if ref_model is not None:
            sub = grams[:sample]
            t = time.perf_counter()
            expected = np.array([ref_model.logscore(g[-1], g[:-1]) for g in sub])
            per = (time.perf_counter() - t) / len(sub)
            line.update(nltk_score_all=per * len(grams), nltk_per=per, sample=len(sub),
                        maxdiff=float(np.max(np.abs(expected - ours[:len(sub)]))))
        rows.append(line)

    print()
    print(f"{'model':32} {'ours fit':>9} {'ours score':>11} {'nltk fit':>9} {'nltk score (all, est.)':>23} "
          f"{'fit x':>7} {'total x':>8}  check")
    for r in rows:
        if "nltk_per" in r:
            total_ratio = (nltk_fit + r["nltk_score_all"]) / (r["ours_fit"] + r["ours_score"])
            print(f"{r['model']:32} {r['ours_fit']:8.3f}s {r['ours_score']:10.3f}s {nltk_fit:8.2f}s "
                  f"{r['nltk_score_all']:14.1f}s ({r['nltk_per'] * 1e6:,.0f} us/ngram) "
                  f"{nltk_fit / r['ours_fit']:6.0f}x {total_ratio:7.0f}x  "
                  f"max |diff| {r['maxdiff']:.1e} on {r['sample']:,} n-grams")
        else:
            print(f"{r['model']:32} {r['ours_fit']:8.3f}s {r['ours_score']:10.3f}s "
                  f"{'':>9} {'':>23} {'':>7} {'':>8}  (training-set perplexity {r['ppl']:.2f})")

    try:
        import kenlm
    except ImportError:
        print("\nKenLM: python package not installed (pip install kenlm) - no ceiling measured")
        return
    lm = NGramCounts(n, "kneser-ney").fit(sents)
    with tempfile.TemporaryDirectory() as tmp:
        arpa = Path(tmp) / "kn.arpa"
        t = time.perf_counter()
        lm.write_arpa(arpa)
        write_s = time.perf_counter() - t
        t = time.perf_counter()
        km = kenlm.Model(str(arpa))
        load_s = time.perf_counter() - t
    lines = [" ".join([BOS] * (n - 1) + s) for s in sents]

    def ken_score():
        return [sc[0] for line in lines for sc in list(km.full_scores(line, bos=False, eos=True))[n - 1:]]

    ken_s, ken = best_of(ken_score, args.repeat)
    ours_s, ours = best_of(lambda: lm.token_logscores(sents), args.repeat)
    diff = float(np.max(np.abs(np.array(ken) / np.log10(2) - ours)))
    print(f"\nKenLM (query only; no lmplz in the pip package): ARPA write {write_s:.1f} s, "
          f"load {load_s:.1f} s; score all {len(ken):,} tokens {ken_s:.3f} s vs ours {ours_s:.3f} s "
          f"(ours / KenLM = {ours_s / ken_s:.2f}); max |log2 diff| {diff:.1e} (ARPA keeps 7 digits)")


if __name__ == "__main__":
    main()
