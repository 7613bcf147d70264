"""Named model presets: data only.  Fields not given take ModelConfig's defaults (GPT-2 style)."""

from __future__ import annotations

from typing import Any

_GPT2 = dict(vocab_size=50257, context_length=1024, qkv_bias=True)

PRESETS: dict[str, dict[str, Any]] = {
    # OpenAI GPT-2 sizes, as released (q/k/v biases, tied embeddings).
    "gpt2-124m": dict(_GPT2, n_layer=12, n_head=12, n_embd=768),
    "gpt2-355m": dict(_GPT2, n_layer=24, n_head=16, n_embd=1024),
    "gpt2-774m": dict(_GPT2, n_layer=36, n_head=20, n_embd=1280),
    "gpt2-1558m": dict(_GPT2, n_layer=48, n_head=25, n_embd=1600),
    # The 'scratchlm pretrain' demo: a Llama-style (RoPE, RMSNorm, SwiGLU) character-level model for
    # tinyshakespeare; the tokenizer sets vocab_size.  Tuned for 5 minutes on 2 CPU cores.
    "shakespeare-char": dict(
        vocab_size=65, context_length=128, n_layer=4, n_head=4, n_embd=128, intermediate_size_override=336,
        norm="rmsnorm", norm_bias=False, mlp="swiglu", mlp_bias=False, positions="rope", qkv_bias=False,
        o_bias=False,
    ),
    # Tiny models for tests: seconds to build, run and train.
    "tiny-gpt2": dict(vocab_size=256, context_length=64, n_layer=2, n_head=4, n_embd=32),
    "tiny-llama": dict(
        vocab_size=256, context_length=64, n_layer=2, n_head=4, n_kv_head_override=2, n_embd=32,
        intermediate_size_override=64, norm="rmsnorm", norm_bias=False, norm_eps=1e-6, mlp="swiglu",
        mlp_bias=False, positions="rope", qkv_bias=False, o_bias=False,
    ),
    # Recurrent LMs (models/rnn.py): hidden size = embedding size, as Burkov's RNN.  The -small ones are
    # for the 5-minute char-level tinyshakespeare comparison with shakespeare-char: the same windows,
    # about 0.6M parameters each (benchmarks/lm_comparison.py; figures in docs/benchmarks.md).
    "elman-small": dict(arch="elman", vocab_size=65, context_length=128, n_layer=2, n_embd=384),
    "lstm-small": dict(arch="lstm", vocab_size=65, context_length=128, n_layer=2, n_embd=192),
    "tiny-elman": dict(arch="elman", vocab_size=256, context_length=64, n_layer=2, n_embd=32),
    "tiny-lstm": dict(arch="lstm", vocab_size=256, context_length=64, n_layer=2, n_embd=32),
    # Count-based LMs (models/ngram_module.py over models/ngram.py): fitted in one pass over the
    # training tokens, no budget.  context_length is only the longest prompt + generation.
    "ngram-laplace3": dict(arch="ngram", ngram_order=3, ngram_smoothing="laplace", vocab_size=65,
                           context_length=1024),
    "ngram-kn5": dict(arch="ngram", ngram_order=5, ngram_smoothing="kneser-ney", vocab_size=65,
                      context_length=1024),
}
