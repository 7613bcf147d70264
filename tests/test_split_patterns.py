"""The split patterns against independent copies of their published sources, run by outside engines.

Each ``PUBLISHED`` entry is copied from where the tokenizer's authors publish it (not from our
``scratchlm.tokenizers.bpe``), and the first test checks each copy against the source installed
with the peer package where one ships it.  Our tokenizer's pieces must then equal the pieces the
published pattern gives in the engine it was written for: Python's ``regex`` for tiktoken's
patterns (what ``tiktoken/_educational.py`` uses; tiktoken's own engine is compared in
test_tokenizers_bpe.py when GPT-2's ranks are in ../shared), and Hugging Face ``tokenizers``
(Oniguruma) for the patterns published in ``tokenizer.json`` files.
"""

from __future__ import annotations

import importlib
import inspect

import regex
import tiktoken_ext.openai_public
import transformers.convert_slow_tokenizer
import transformers.models.qwen2.tokenization_qwen2
from hypothesis import given
from tokenizers import Regex, pre_tokenizers

from scratchlm.tokenizers import ByteLevelBPE
from scratchlm.tokenizers.bpe import PATTERNS, token_to_bytes
from test_tokenizers_bpe import PARITY, TEXT

# openai/tiktoken, tiktoken_ext/openai_public.py, o200k_base (GPT-4o): its pattern, one alternative a line
GPT4O_ALTERNATIVES = [
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
]
PUBLISHED = {
    # openai/gpt-2, src/encoder.py (Encoder.pat)
    "gpt2": r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
    # openai/tiktoken, tiktoken_ext/openai_public.py, cl100k_base
    "gpt4": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",  # noqa: E501
    # openai/tiktoken, tiktoken_ext/openai_public.py, o200k_base (GPT-4o)
    "gpt4o": "|".join(GPT4O_ALTERNATIVES),
    # meta-llama/llama3, llama/tokenizer.py (Tokenizer.pat_str); the Split regex of Meta-Llama-3's
    # tokenizer.json
    "llama3": r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",  # noqa: E501
    # Qwen2's tokenizer.json Split regex (transformers' tokenization_qwen2.PRETOKENIZE_REGEX)
    "qwen2": r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",  # noqa: E501
}
TIKTOKEN_PATTERNS = ("gpt2", "gpt4", "gpt4o")
TOKENIZER_JSON_PATTERNS = ("llama3", "qwen2")
BYTES = {bytes([b]): b for b in range(256)}


def test_published_copies_match_the_installed_sources():
    source = inspect.getsource(tiktoken_ext.openai_public)
    assert f'"pat_str": r"""{PUBLISHED["gpt4"]}"""' in source
    for alternative in GPT4O_ALTERNATIVES:
        assert f'r"""{alternative}"""' in source
    assert transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX == PUBLISHED["qwen2"]
    # transformers' tiktoken converter defaults to Llama 3's pattern
    # (the module, imported by name: transformers also exports a *function* convert_slow_tokenizer,
    # which shadows the module attribute once something imports it from the top level)
    converter = importlib.import_module("transformers.convert_slow_tokenizer").TikTokenConverter
    default = inspect.signature(converter).parameters["pattern"]
    assert default.default == PUBLISHED["llama3"]


def our_pieces(name: str, text: str) -> list[str]:
    """The pieces our byte-level BPE splits ``text`` into under the pattern named ``name``."""
    return ByteLevelBPE(BYTES, [], {}, PATTERNS[name])._findall(text)


def hf_pieces(pre_tokenizer, text: str) -> list[str]:
    return [piece for piece, _ in pre_tokenizer.pre_tokenize_str(text)]


@PARITY
@given(text=TEXT)
def test_tiktoken_patterns_split_like_the_published_ones(text):
    for name in TIKTOKEN_PATTERNS:
        assert our_pieces(name, text) == regex.findall(PUBLISHED[name], text), name
    # tiktoken's r50k (GPT-2) form, rewritten with possessive quantifiers, splits alike
    assert our_pieces("gpt2", text) == regex.findall(tiktoken_ext.openai_public.r50k_pat_str, text)


@PARITY
@given(text=TEXT)
def test_tokenizer_json_patterns_split_like_hugging_face(text):
    for name in TOKENIZER_JSON_PATTERNS:
        split = pre_tokenizers.Split(Regex(PUBLISHED[name]), behavior="isolated", invert=False)
        assert our_pieces(name, text) == hf_pieces(split, text), name


def _from_byte_level(piece: str) -> str:
    return token_to_bytes(piece).decode("utf-8")


@PARITY
@given(text=TEXT)
def test_byte_level_patterns_split_like_hugging_face(text):
    """GPT-2's and SmolLM2's pre-tokenizers as Hugging Face builds them (no regex in the file)."""
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    smollm2 = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                       pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    for name, hf in (("gpt2", gpt2), ("smollm2", smollm2)):
        theirs = [_from_byte_level(p) for p in hf_pieces(hf, text)]
        assert our_pieces(name, text) == theirs, name
