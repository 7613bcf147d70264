"""Claim: our pure-Python byte-level BPE encodes at >= 0.5x tiktoken, single thread, on GPT-2's vocabulary.

What is timed, in one process, on the whole of tinyshakespeare (1,115,394 characters), each side
encoding the full text in one call, with GPT-2's vocabulary built offline from the same two files
(``encoder.json`` + ``vocab.bpe``):

* ours: ``ByteLevelBPE.encode`` -- warm (the piece cache already filled by an earlier call, the
  steady state of a long-running process) and cold (cache emptied before every call);
* tiktoken: ``Encoding.encode_ordinary`` (Rust, single thread);
* ``tokenizers``: ``Tokenizer.encode`` (Rust; ``RAYON_NUM_THREADS=1``, parallelism off);
* the split regex alone (``regex.findall`` with our reordered, equivalent form of GPT-2's
  pattern): the floor under our encoder.

Rounds alternate the sides, so a noisy neighbour on the shared cores slows all of them alike;
each figure is the median over the rounds.  The outputs are checked identical first.

    python benchmarks/tokenizers_encode.py              # 7 rounds, about 30 s
    python benchmarks/tokenizers_encode.py --rounds 3 --gpt2 ../shared/data/gpt2
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # before tokenizers is imported
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from scratchlm.data.corpora import read_corpus  # noqa: E402
from scratchlm.tokenizers import load  # noqa: E402
from scratchlm.tokenizers.bpe import GPT2_PATTERN  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def build_peers(gpt2_dir: Path):
    import tiktoken
    import tiktoken.load
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    encoder_json, vocab_bpe = str(gpt2_dir / "encoder.json"), str(gpt2_dir / "vocab.bpe")
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=vocab_bpe,
                                                           encoder_json_file=encoder_json)
    tik = tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                            special_tokens={"<|endoftext|>": 50256})
    hf = Tokenizer(models.BPE.from_file(encoder_json, vocab_bpe))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    return tik, hf


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpt2", type=Path, default=REPO.parent / "shared" / "data" / "gpt2",
                        help="directory with GPT-2's encoder.json and vocab.bpe")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per side (median reported)")
    args = parser.parse_args()

    text = read_corpus("builtin:tinyshakespeare")
    megabytes = len(text.encode("utf-8")) / 1e6
    ours = load(args.gpt2)
    tik, hf = build_peers(args.gpt2)
    expected = tik.encode_ordinary(text)
    assert ours.encode(text) == expected == hf.encode(text).ids, "the three encoders disagree"

    def cold() -> None:
        ours._cache.clear()
        ours.encode(text)

    sides = {
        "ours (warm cache)": lambda: ours.encode(text),
        "ours (cold cache)": cold,
        "tiktoken": lambda: tik.encode_ordinary(text),
        "tokenizers": lambda: hf.encode(text),
        "split regex alone": lambda: ours._findall(text),
    }
    times: dict[str, list[float]] = {name: [] for name in sides}
    ours.encode(text)  # fill the cache once, as any earlier call would
    for _ in range(args.rounds):
        for name, fn in sides.items():
            times[name].append(seconds(fn))
    speed = {name: megabytes / statistics.median(t) for name, t in times.items()}

    print(f"tinyshakespeare: {megabytes:.2f} MB, {len(expected):,} GPT-2 tokens, "
          f"{len(ours._cache):,} distinct pieces; median of {args.rounds} rounds, one thread")
    for name, mbps in speed.items():
        print(f"  {name:<20} {mbps:6.2f} MB/s")
    tiktoken_speed = speed["tiktoken"]
    print(f"ratio ours/tiktoken:   warm {speed['ours (warm cache)'] / tiktoken_speed:.2f}x, "
          f"cold {speed['ours (cold cache)'] / tiktoken_speed:.2f}x   (target >= 0.5x)")
    print(f"ratio ours/tokenizers: warm {speed['ours (warm cache)'] / speed['tokenizers']:.2f}x, "
          f"cold {speed['ours (cold cache)'] / speed['tokenizers']:.2f}x")
    share = statistics.median(times["split regex alone"]) / statistics.median(times["ours (warm cache)"])
    print(f"the split regex is {share:.0%} of our warm encode time")


if __name__ == "__main__":
    main()
