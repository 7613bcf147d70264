"""BPE training wall time: our incremental trainer vs the Hugging Face ``tokenizers`` BpeTrainer.

Claim: training a byte-level BPE to a 4,096-token vocabulary on tinyshakespeare (1.1 MB) takes
at most 3x as long as ``tokenizers`` (Rust) -- in pure Python.

Both trainers get the same job, side by side in one process: the whole corpus as one text, GPT-2's
split regex (``tokenizers``: ``ByteLevel(add_prefix_space=False)``, all 256 bytes as the initial
alphabet), ``<|endoftext|>`` as the one special token, no progress bar.  The script checks that the
two learn the same merges, so the times are for the same work.  ``tokenizers`` is timed twice:
with its default parallelism (rayon, all cores) and single-threaded (``TOKENIZERS_PARALLELISM=false``,
which it reads on every call).  Run under ``RAYON_NUM_THREADS=1`` to pin rayon to one thread too.
Our trainer is also timed with the GPT-4 split regex, its default (different words, so different
merges; for scale only).  Each figure is the median of ``--repeats`` runs, with the best beside it.

    .venv/bin/python benchmarks/tokenizers_train.py [--vocab-size 4096] [--repeats 5] [--naive 320]
    .venv/bin/python benchmarks/tokenizers_train.py --profile     # cProfile of our trainer

``--naive N`` also times the merge loops alone, naive reference (recount every pair after each
merge) vs incremental, to N tokens on the same counted words.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import time
from collections.abc import Callable

from scratchlm.data.corpora import read_corpus
from scratchlm.tokenizers.bpe import bytes_to_token
from scratchlm.tokenizers.train_bpe import count_words, learn_merges, learn_merges_reference, train_bpe

CORPUS = "builtin:tinyshakespeare"
SPECIAL = "<|endoftext|>"


def time_it(fn: Callable[[], object]) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds of this process, result) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def train_tokenizers(text: str, vocab_size: int, parallel: bool) -> list[tuple[str, str]]:
    """Train with the ``tokenizers`` BpeTrainer; its merges as pairs of GPT-2 unicode strings."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    os.environ["TOKENIZERS_PARALLELISM"] = "true" if parallel else "false"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[SPECIAL], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]


def summary(times: list[float]) -> str:
    return f"{statistics.median(times):6.3f} s (best {min(times):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--naive", type=int, default=0, metavar="N",
                        help="also time the naive reference trainer to N tokens (e.g. 320)")
    parser.add_argument("--profile", action="store_true", help="cProfile one run of our trainer and exit")
    args = parser.parse_args()
    text = read_corpus(CORPUS)

    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(train_bpe, text, args.vocab_size, "gpt2", [SPECIAL])
        pstats.Stats(profiler).sort_stats("tottime").print_stats(12)
        return

    print(f"corpus {CORPUS}: {len(text):,} chars, {len(text.encode()):,} bytes; vocab {args.vocab_size}; "
          f"RAYON_NUM_THREADS={os.environ.get('RAYON_NUM_THREADS', 'unset')}, {os.cpu_count()} CPUs")
    wall: dict[str, list[float]] = {k: [] for k in ("ours", "ours_gpt4", "hf_default", "hf_single")}
    cpu: dict[str, list[float]] = {k: [] for k in wall}
    ours_merges, hf_merges = None, None
    for _ in range(args.repeats):  # interleaved, so drifting machine load hits every contender alike
        runs = {
            "ours": lambda: train_bpe(text, args.vocab_size, "gpt2", [SPECIAL]).merges,
            "hf_default": lambda: train_tokenizers(text, args.vocab_size, parallel=True),
            "hf_single": lambda: train_tokenizers(text, args.vocab_size, parallel=False),
            "ours_gpt4": lambda: train_bpe(text, args.vocab_size, "gpt4", [SPECIAL]),
        }
        for key, fn in runs.items():
            w, c, result = time_it(fn)
            wall[key].append(w)
            cpu[key].append(c)
            if key == "ours":
                ours_merges = result
            elif key == "hf_default":
                hf_merges = result
    os.environ.pop("TOKENIZERS_PARALLELISM", None)

    ours_spelled = [(bytes_to_token(a), bytes_to_token(b)) for a, b in ours_merges]
    side_by_side = list(zip(ours_spelled, hf_merges, strict=False))
    same = sum(1 for a, b in side_by_side if a == b)
    first_diff = next((i for i, (a, b) in enumerate(side_by_side) if a != b), None)
    print(f"merges: ours {len(ours_merges)}, tokenizers {len(hf_merges)}; identical in order: "
          f"{'all' if ours_spelled == hf_merges else f'{same} (first difference at {first_diff})'}")

    labels = {"ours": "ours (GPT-2 split)", "ours_gpt4": "ours (GPT-4 split)",
              "hf_single": "tokenizers, 1 thread", "hf_default": "tokenizers, default threads"}
    for key in ("ours", "ours_gpt4", "hf_single", "hf_default"):
        print(f"  {labels[key]:<28} {summary(wall[key])}   cpu {statistics.median(cpu[key]):.3f} s")
    ours = statistics.median(wall["ours"])
    print(f"ratio ours / tokenizers 1 thread:  {ours / statistics.median(wall['hf_single']):.2f}x")
    print(f"ratio ours / tokenizers default:   {ours / statistics.median(wall['hf_default']):.2f}x  "
          f"(target: <= 3x)")

    if args.naive:  # the merge loops alone, on the same counted words
        words = count_words(text, "gpt2", [SPECIAL])
        naive_t, naive_cpu, naive = time_it(lambda: learn_merges_reference(words, args.naive - 1))
        fast_t, fast_cpu, fast = time_it(lambda: learn_merges(words, args.naive - 1))
        assert naive == fast, "the incremental and naive trainers disagree"
        print(f"merge loop to {args.naive} tokens (same merges): naive reference {naive_t:.2f} s "
              f"(cpu {naive_cpu:.2f}), incremental {fast_t:.3f} s (cpu {fast_cpu:.3f}): "
              f"{naive_t / fast_t:.0f}x wall, {naive_cpu / fast_cpu:.0f}x cpu")


if __name__ == "__main__":
    main()
