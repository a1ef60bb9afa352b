"""What a model's ids mean: the tokenizer, codec and id offset of each modality it was trained on.

A data module knows its sources (``CodecDataModule``: one; ``MixedDataModule``: several, each shifted
into its own block of ids). :func:`sources_of` reads them from a data module; :func:`to_records`
turns them into plain JSON-able records that :class:`~jpeglm.model.CodecLM` stores in every checkpoint,
and :func:`from_records` rebuilds them, so sampling, evaluation and export need only the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokenizers import Tokenizer

from jpeglm.codecs import codec_from_spec
from jpeglm.tokenizer import CodecTokenizer


@dataclass
class Source:
    """One modality of a model's vocabulary.

    Attributes:
        modality: "jpeg", "avc" or "text".
        tokenizer: its tokenizer (ids unshifted).
        offset: added to its BPE ids (>= 8) in the model's vocabulary.
        dataset: the prepared dataset it came from, when known (for validation prompts).
    """

    modality: str
    tokenizer: CodecTokenizer
    offset: int = 0
    dataset: Any = None

    @property
    def codec(self) -> Any:
        """The codec of its streams (None for text), checked against this installation."""
        return self.tokenizer.codec


def sources_of(datamodule: Any) -> list[Source]:
    """The sources of a jpeglm data module (empty for anything else)."""
    if hasattr(datamodule, "sources_info"):  # MixedDataModule
        return [Source(i.modality, i.tokenizer, i.offset, i.dataset) for i in datamodule.sources_info]
    if hasattr(datamodule, "dataset") and hasattr(datamodule, "tokenizer"):  # CodecDataModule and subclasses
        return [Source(datamodule.dataset.modality, datamodule.tokenizer, 0, datamodule.dataset)]
    return []


def to_records(sources: list[Source]) -> list[dict[str, Any]]:
    return [
        {
            "modality": s.modality,
            "offset": s.offset,
            "tokenizer": s.tokenizer.tokenizer.to_str(),
            "codec_spec": s.tokenizer.codec_spec,
        }
        for s in sources
    ]


def from_records(records: list[dict[str, Any]]) -> list[Source]:
    """Sources stored in a checkpoint; a codec spec this installation cannot honour raises CodecError."""
    sources = []
    for r in records:
        tokenizer = CodecTokenizer(Tokenizer.from_str(r["tokenizer"]), r["modality"], r["codec_spec"])
        if r["codec_spec"] is not None:
            codec_from_spec(r["codec_spec"])  # fail now, with the spec's message, not at the first decode
        sources.append(Source(r["modality"], tokenizer, r["offset"]))
    return sources
