"""Sampling from a CodecLM: the token loop (:mod:`.sampling`) and the one completion pipeline (:mod:`.pipeline`).

:func:`complete` (or :func:`iter_complete`, batch by batch) is what the gallery, FID, ``jpeglm generate`` and
``jpeglm evaluate`` call: codec streams in, decoded :class:`Completion` objects out.
:func:`generate` is the loop under it (KV cache, masks, stops).
"""

from jpeglm.generation.pipeline import Completion, complete, item_budget, iter_complete
from jpeglm.generation.sampling import (
    CodecStop,
    Constraint,
    GrammarConstraint,
    Guidance,
    Stop,
    codec_stop,
    generate,
    make_prompt,
    modality_mask,
    sample_logits,
    sequence_bytes,
    token_pieces,
    tokenizer_mask,
)

__all__ = [
    "CodecStop",
    "Completion",
    "Constraint",
    "GrammarConstraint",
    "Guidance",
    "Stop",
    "codec_stop",
    "complete",
    "generate",
    "item_budget",
    "iter_complete",
    "make_prompt",
    "modality_mask",
    "sample_logits",
    "sequence_bytes",
    "token_pieces",
    "tokenizer_mask",
]
