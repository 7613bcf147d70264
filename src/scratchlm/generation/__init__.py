"""Generation: the one sampler (``sampling``) and the one decoding loop (``generate``).

The CLI, ``LM.generate``/``LM.stream``, chat and the HTTP server all come through here.  Importing
this package does not import torch; the functions do, when called.  ``generation.packed`` (fp16
weights with fp32 arithmetic, for decoding on a CPU) imports torch, so it is imported on its own.
"""

from scratchlm.generation.generate import (
    Completion,
    GeneratedIds,
    TextStream,
    TokenEvent,
    TokenGenerator,
    complete,
    generate,
    generate_ids,
    stream,
)
from scratchlm.generation.sampling import Sampler, SamplingParams, make_generator, process_logits, sample

__all__ = [
    "SamplingParams",
    "process_logits",
    "sample",
    "make_generator",
    "Sampler",
    "TokenGenerator",
    "TokenEvent",
    "GeneratedIds",
    "Completion",
    "TextStream",
    "generate_ids",
    "generate",
    "stream",
    "complete",
]
