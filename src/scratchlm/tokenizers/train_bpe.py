"""Train a byte-level BPE tokenizer: the incremental trainer and the naive reference beside it.

Training in three steps:

1. **Count words.**  The text is cut on the special-token strings (so no merge ever spans one),
   each piece is pre-tokenized with the split regex (GPT-2's or GPT-4's), and identical
   pre-tokens are counted.  Merges never cross a pre-token boundary, so from here on the trainer
   works on the *distinct* words and their frequencies: tinyshakespeare's 1.1 MB holds about
   300,000 pre-tokens but only about 15,000 distinct ones.
2. **Learn merges.**  Repeatedly merge the most frequent adjacent pair of symbols, counting each
   pair once per occurrence in a word times the word's frequency.
3. **Build the tokenizer.**  Token ids: 0..255 are the single bytes *in GPT-2's byte order* (the
   order of GPT-2's byte-to-unicode table: ``!`` .. ``~``, ``¡`` .. ``¬``, ``®`` .. ``ÿ``, then the
   remaining bytes 0..32, 127..160, 173), then one id per new token in the order the merges created
   it, then the special tokens.  GPT-2's order is what the ``tokenizers`` trainer uses too (it sorts
   its byte alphabet by the printable characters of that table), which is what lets the
   tie-breaking rule below agree with it.

Tie-breaking (deterministic): the pair with the highest count wins; among equal counts, the pair
``(left_id, right_id)`` that is smallest as a tuple of the ids above wins -- bytes before merged
tokens, and merged tokens by age.  This is the rule of the Hugging Face ``tokenizers``
``BpeTrainer`` (its heap orders equal counts by ascending pair of ids), so on the same words both
trainers learn the same merges, in the same order.

If a merge ever builds a byte string that is already a token (``"a" + "bc"`` after ``"ab" + "c"``),
it is kept in the merge list but reuses the existing id, as ``tokenizers`` does, so it adds no
vocabulary entry and ``len(merges)`` would exceed ``vocab_size - 256 - len(special_tokens)``.  (No
such case turned up on tinyshakespeare or in 100,000 random small corpora; the rule is there so
that the two trainers would still agree if one did.)

When no pair is left (every distinct word is a single token) before ``vocab_size`` is reached,
training stops there with a ``UserWarning`` and the tokenizer is smaller than asked; that is a
property of a small corpus, not an error.

Why the incremental trainer is fast in pure Python (:func:`learn_merges`):

* each word is a ``str`` whose characters are token ids (``chr(id)``), so a pair is a 2-character
  string -- hashed and compared in C, and ordered exactly like the ``(left_id, right_id)`` tuple --
  and merging a pair inside a word is one ``str.replace`` (left to right, non-overlapping: the
  BPE rule);
* an index ``pair -> words that contain it`` means a merge rewrites only the words it touches, and
  the pair counts change only by local deltas: in each such word, the pairs from the symbol before
  the first occurrence to the symbol after the last one (no recount of the corpus per merge);
* a heap with lazy invalidation gives the most frequent pair: counts only fall for existing pairs,
  so a stale entry is noticed when popped and pushed back with its current count; pairs that a
  merge creates are pushed once after the merge.

:func:`learn_merges_reference` is the naive trainer (recount every pair after every merge, lists of
ints, no index, no heap); the tests hold the two equal.
"""

from __future__ import annotations

import heapq
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import regex

from scratchlm.errors import ConfigError, DataError
from scratchlm.tokenizers.bpe import BYTE_TO_CHAR, GPT4_PATTERN, ByteLevelBPE, resolve_pattern

BYTE_ORDER: list[int] = sorted(range(256), key=BYTE_TO_CHAR.__getitem__)
"""``BYTE_ORDER[i]`` is the byte value of token id ``i`` (ids 0..255): the bytes sorted by the
character GPT-2's byte-to-unicode table gives them, i.e. its printable bytes first."""

_BYTE_TOKENS: list[bytes] = [bytes([b]) for b in BYTE_ORDER]
_ID_OF_BYTE: list[int] = [0] * 256
for _id, _byte in enumerate(BYTE_ORDER):
    _ID_OF_BYTE[_byte] = _id
# For ``word.decode("latin-1").translate(...)``: latin-1 maps byte b to code point b, and the table
# maps that code point to chr(id of byte b) -- one C call per word instead of a loop per byte.
_SYMBOL_TABLE: dict[int, str] = {b: chr(_ID_OF_BYTE[b]) for b in range(256)}


# --------------------------------------------------------------------------------------------
# Step 1: words
# --------------------------------------------------------------------------------------------

def _check_specials(special_tokens: Sequence[str]) -> list[str]:
    if isinstance(special_tokens, str):
        special_tokens = [special_tokens]
    specials = list(special_tokens)
    if any(not isinstance(s, str) or not s for s in specials):
        raise ConfigError("special tokens must be non-empty strings", "remove the empty special token")
    duplicates = sorted({s for s in specials if specials.count(s) > 1})
    if duplicates:
        raise ConfigError(f"special token(s) listed twice: {', '.join(duplicates)}", "list each once")
    return specials


def count_words(texts: str | Iterable[str], pattern: str = GPT4_PATTERN,
                special_tokens: Sequence[str] = ("<|endoftext|>",)) -> dict[bytes, int]:
    """Distinct pre-tokens (UTF-8 bytes) and how often each occurs.

    Each text is first split on the special-token strings (the longest first, so a special that
    contains another wins) and the specials are dropped: they are added to the vocabulary whole,
    and no merge may learn a piece of one or glue it to its neighbours.  Separate texts are
    pre-tokenized separately, so no pre-token spans two of them.  Counting happens on ``str``
    pre-tokens and only the distinct ones are encoded to bytes.
    """
    split = regex.compile(resolve_pattern(pattern, strict=True))
    specials = _check_specials(special_tokens)
    cut = (regex.compile("|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True)))
           if specials else None)
    if isinstance(texts, str):
        texts = [texts]
    counts: Counter[str] = Counter()
    for text in texts:
        for piece in cut.split(text) if cut is not None else (text,):
            if not piece:
                continue
            if split.groups == 0:
                counts.update(split.findall(piece))
            else:  # a user regex with capture groups: findall would return the groups
                counts.update(m.group() for m in split.finditer(piece))
    counts.pop("", None)  # a user regex that can match the empty string
    return {word.encode("utf-8"): n for word, n in counts.items()}


# --------------------------------------------------------------------------------------------
# Step 2: merges
# --------------------------------------------------------------------------------------------

def learn_merges(word_counts: Mapping[bytes, int], num_tokens: int,
                 progress: bool = False) -> list[tuple[bytes, bytes]]:
    """Merges, in order, until there are ``num_tokens`` tokens (256 bytes + merged) or no pair left.

    The incremental trainer; see the module docstring for the data structures and the
    tie-breaking rule.  ``word_counts`` maps a pre-token's bytes to its frequency.
    """
    # Words of one symbol never take part in a merge: leave them out from the start.
    words: list[str] = []
    freqs: list[int] = []
    for word, freq in word_counts.items():
        if len(word) > 1 and freq > 0:
            words.append(word.decode("latin-1").translate(_SYMBOL_TABLE))
            freqs.append(freq)

    token_bytes = list(_BYTE_TOKENS)  # id -> bytes
    token_id = {b: i for i, b in enumerate(token_bytes)}

    # Pair counts and the pair -> words index.  The index may hold a word twice, or a word that
    # has since lost the pair: visiting it again is a cheap no-op (``word.find(pair) < 0``),
    # cheaper than keeping the lists exact.
    counts: dict[str, int] = {}
    where: dict[str, list[int]] = {}
    for wi, word in enumerate(words):
        freq = freqs[wi]
        for i in range(len(word) - 1):
            pair = word[i:i + 2]
            if pair in counts:
                counts[pair] += freq
                where[pair].append(wi)
            else:
                counts[pair] = freq
                where[pair] = [wi]

    # Max-heap via negated counts; equal counts fall back to the pair string, whose order is the
    # order of (left_id, right_id) -- the documented tie-break.
    heap = [(-count, pair) for pair, count in counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[bytes, bytes]] = []
    bar = _progress_bar(num_tokens - len(token_bytes)) if progress else None
    while len(token_bytes) < num_tokens and heap:
        negative, pair = heapq.heappop(heap)
        count = counts.get(pair, 0)
        if count != -negative:  # stale entry: its count fell since it was pushed
            if count > 0:
                heapq.heappush(heap, (-count, pair))
            continue

        left, right = token_bytes[ord(pair[0])], token_bytes[ord(pair[1])]
        merges.append((left, right))
        new_id = token_id.get(left + right)
        if new_id is None:
            new_id = len(token_bytes)
            token_bytes.append(left + right)
            token_id[left + right] = new_id
            if bar is not None:
                bar.update(1)
        symbol = chr(new_id)

        born: set[str] = set()  # pairs holding the new symbol: pushed once, after the merge
        for wi in where.pop(pair):
            old = words[wi]
            first = old.find(pair)
            if first < 0:
                continue
            new = old.replace(pair, symbol)
            words[wi] = new
            freq = freqs[wi]
            # Local delta: only the stretch from the symbol before the first occurrence to the
            # symbol after the last one changes.  Its old pairs go and its new pairs come; pairs
            # outside it are the same in ``old`` and ``new`` and are not touched.
            start = first - 1 if first else 0
            tail = len(old) - old.rfind(pair) - 2  # symbols after the last occurrence: unchanged
            for i in range(start, min(len(old) - tail, len(old) - 1)):
                counts[old[i:i + 2]] -= freq
            for i in range(start, min(len(new) - tail, len(new) - 1)):
                q = new[i:i + 2]
                if symbol in q:
                    born.add(q)
                    if q in counts:
                        counts[q] += freq
                        where[q].append(wi)
                    else:
                        counts[q] = freq
                        where[q] = [wi]
                else:
                    counts[q] += freq
        del counts[pair]  # every occurrence was merged: its count is now exactly 0
        for q in born:
            count = counts[q]
            if count > 0:
                heapq.heappush(heap, (-count, q))

    if bar is not None:
        bar.close()
    return merges


def learn_merges_reference(word_counts: Mapping[bytes, int], num_tokens: int) -> list[tuple[bytes, bytes]]:
    """The naive trainer: recount every pair of every word after each merge.

    Same result as :func:`learn_merges` by definition (same ids, same tie-break, same id reuse for
    a byte string built twice), written to be obviously right rather than fast; used by the tests.
    """
    words = [[_ID_OF_BYTE[b] for b in word] for word in word_counts]
    freqs = list(word_counts.values())
    token_bytes = list(_BYTE_TOKENS)
    merges: list[tuple[bytes, bytes]] = []
    while len(token_bytes) < num_tokens:
        counts: dict[tuple[int, int], int] = {}
        for word, freq in zip(words, freqs, strict=True):
            for pair in zip(word, word[1:], strict=False):
                counts[pair] = counts.get(pair, 0) + freq
        counts = {pair: n for pair, n in counts.items() if n > 0}
        if not counts:
            break
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merged = token_bytes[best[0]] + token_bytes[best[1]]
        merges.append((token_bytes[best[0]], token_bytes[best[1]]))
        if merged in token_bytes:
            new_id = token_bytes.index(merged)
        else:
            new_id = len(token_bytes)
            token_bytes.append(merged)
        words = [_merge_pair(word, best, new_id) for word in words]
    return merges


def _merge_pair(word: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """``word`` with each occurrence of ``pair``, scanned left to right, replaced by ``new_id``."""
    out: list[int] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def _progress_bar(total: int):
    from tqdm.auto import tqdm  # imported here: the CLI's tokenizer commands must start fast

    return tqdm(total=total, desc="BPE merges", unit="merge")


# --------------------------------------------------------------------------------------------
# Step 3: the tokenizer
# --------------------------------------------------------------------------------------------

def build_encoder(merges: Sequence[tuple[bytes, bytes]]) -> dict[bytes, int]:
    """Token bytes -> id: the 256 bytes in GPT-2's order, then each new merged string in order."""
    encoder = {token: i for i, token in enumerate(_BYTE_TOKENS)}
    for left, right in merges:
        encoder.setdefault(left + right, len(encoder))
    return encoder


def train_bpe(text_or_texts: str | Iterable[str], vocab_size: int, pattern: str = GPT4_PATTERN,
              special_tokens: Sequence[str] = ("<|endoftext|>",), progress: bool = False) -> ByteLevelBPE:
    """Train a byte-level BPE tokenizer with ``vocab_size`` tokens, special tokens included.

    ``pattern`` is the split regex (or a name: ``gpt2``, ``gpt4``).  Ids: 0..255 the bytes in
    GPT-2's byte order, then the merged tokens in creation order, then ``special_tokens`` in the
    order given.  ``vocab_size`` below 256 + the number of specials is a :class:`ConfigError`;
    exactly that many learns no merge.  If the corpus runs out of pairs first, training stops
    with a warning and the tokenizer is smaller.  See the module docstring for tie-breaking.
    """
    specials = _check_specials(special_tokens)
    minimum = 256 + len(specials)
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
        raise ConfigError(f"vocab_size must be an integer, not {vocab_size!r}", "use e.g. 4096")
    if vocab_size < minimum:
        raise ConfigError(
            f"vocab_size {vocab_size} is below the minimum {minimum} "
            f"(256 byte tokens + {len(specials)} special token{'s' if len(specials) != 1 else ''})",
            f"use a vocab size of at least {minimum}",
        )
    split = resolve_pattern(pattern, strict=True)
    word_counts = count_words(text_or_texts, split, specials)
    if not word_counts:
        raise DataError("the training text is empty (nothing left besides special tokens)",
                        "train on a corpus that contains text")

    num_tokens = vocab_size - len(specials)
    merges = learn_merges(word_counts, num_tokens, progress=progress)
    encoder = build_encoder(merges)
    if len(encoder) < num_tokens:
        warnings.warn(
            f"the corpus ran out of pairs to merge: the vocabulary has {len(encoder) + len(specials)} "
            f"tokens, not {vocab_size} (every distinct pre-token is already a single token)",
            stacklevel=2,
        )
    special_ids = {s: len(encoder) + i for i, s in enumerate(specials)}
    return ByteLevelBPE(encoder, list(merges), special_ids, split, name="bpe")


def train_bpe_from_corpus(corpus_ref: str, vocab_size: int, pattern: str = "gpt4",
                          special_tokens: Sequence[str] = ("<|endoftext|>",),
                          progress: bool = True) -> ByteLevelBPE:
    """:func:`train_bpe` on a file or ``builtin:NAME`` corpus (read with ``read_corpus``)."""
    from scratchlm.data.corpora import read_corpus

    return train_bpe(read_corpus(corpus_ref), vocab_size, pattern=pattern,
                     special_tokens=special_tokens, progress=progress)
