"""What a model's ids mean: the tokenizer, codec and id offset of each modality it was trained on.

A :class:`Modality` is one part of a model's vocabulary: "jpeg", "avc" or "text", its tokenizer, and the
offset by which its BPE ids are moved in a mixed vocabulary (docs/architecture.md, "The id layout").

The one channel through which a model learns what its ids mean is :class:`DescribesVocabulary`: every jpeglm
data module implements it, and :class:`~jpeglm.model.CodecLM` calls it in ``setup``. :func:`to_records` turns
the modalities into plain JSON-able records that CodecLM stores in every checkpoint, and :func:`from_records`
rebuilds them, so sampling, evaluation and export need only the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from tokenizers import Tokenizer

from jpeglm.codecs import Codec, codec_from_spec
from jpeglm.errors import UserError
from jpeglm.tokenizer import CodecTokenizer

CHECKPOINT_KEY = "jpeglm_vocabulary"
"""Where a checkpoint keeps the records (checkpoints written before this name used ``jpeglm_sources``)."""
_OLD_CHECKPOINT_KEY = "jpeglm_sources"


@dataclass
class Modality:
    """One modality of a model's vocabulary.

    Attributes:
        name: "jpeg", "avc" or "text".
        tokenizer: its tokenizer (ids unshifted).
        offset: added to its BPE ids (>= 8) in the model's vocabulary.
        dataset: the prepared dataset it came from, when known (validation prompts for galleries and FID).
        captions: for an image modality trained on captioned samples (``bos, text tag, caption, image tag, image,
            eos``): the text modality whose ids the captions are in; None when its items were never captioned.
        max_caption_tokens: the most caption tokens the model saw before an item (longer ones were cut).
    """

    name: str
    tokenizer: CodecTokenizer
    offset: int = 0
    dataset: Any = None
    captions: Modality | None = None
    max_caption_tokens: int | None = None

    @property
    def codec(self) -> Codec | None:
        """The codec of its streams (None for text), checked against this installation."""
        return self.tokenizer.codec

    @property
    def is_media(self) -> bool:
        """Whether its items are pictures or clips a codec decodes (not text)."""
        return self.tokenizer.codec_spec is not None


@runtime_checkable
class DescribesVocabulary(Protocol):
    """What a data module tells the model about the ids it feeds it (jpeglm's data modules all do).

    :class:`~jpeglm.model.CodecLM` calls both in ``setup``: the modalities go into every checkpoint, the byte
    lengths turn the loss into bits per byte.
    """

    def modalities(self) -> list[Modality]:
        """The modalities of the data, in the order of their id offsets."""
        ...

    def token_byte_lengths(self) -> list[int]:
        """Bytes of codec stream (or UTF-8 text) each id stands for, 0 for special ids."""
        ...


def pick_modality(modalities: list[Modality], name: str | None = None) -> Modality:
    """The modality called ``name``, or the first image or video one when ``name`` is None.

    Raises:
        UserError: the model has no such modality (or none that draws pictures).
    """
    media = [m for m in modalities if m.is_media and (name is None or m.name == name)]
    if not media:
        known = [m.name for m in modalities]
        raise UserError(f"the model has no {name or 'image or video'} modality to sample (it knows {known})")
    return media[0]


def to_records(modalities: list[Modality]) -> list[dict[str, Any]]:
    """Plain JSON-able records of the modalities (what a checkpoint stores).

    A captioned modality's record names its captions' modality by index: ``"captions": {"index": i,
    "max_tokens": n}``.
    """
    records = []
    for m in modalities:
        record = {
            "modality": m.name,
            "offset": m.offset,
            "tokenizer": m.tokenizer.tokenizer.to_str(),
            "codec_spec": m.tokenizer.codec_spec,
        }
        if m.captions is not None:
            index = next(i for i, other in enumerate(modalities) if other is m.captions)
            record["captions"] = {"index": index, "max_tokens": m.max_caption_tokens}
        records.append(record)
    return records


def caption_modalities(records: list[dict[str, Any]]) -> set[int]:
    """Indices of the records that are some modality's captions (not items of their own)."""
    return {r["captions"]["index"] for r in records if r.get("captions")}


def dataset_modalities(dataset: Any, offset: int = 0) -> list[Modality]:
    """The modalities of one prepared dataset (``jpeglm.shards.PreparedDataset``) whose ids start at ``offset``:
    its own, and for a captioned one (``jpeg`` with ``--captions``) the captions' text modality after it."""
    media = Modality(dataset.modality, dataset.tokenizer, offset, dataset)
    if not getattr(dataset, "captions", None):
        return [media]
    text = Modality("text", dataset.caption_tokenizer, offset + dataset.captions["offset"], dataset)
    media.captions, media.max_caption_tokens = text, dataset.captions.get("max_tokens")
    return [media, text]


def from_records(records: list[dict[str, Any]]) -> list[Modality]:
    """Modalities stored in a checkpoint; a codec spec this installation cannot honour raises CodecError."""
    modalities = []
    for r in records:
        tokenizer = CodecTokenizer(Tokenizer.from_str(r["tokenizer"]), r["modality"], r["codec_spec"])
        if r["codec_spec"] is not None:
            codec_from_spec(r["codec_spec"])  # fail now, with the spec's message, not at the first decode
        modalities.append(Modality(r["modality"], tokenizer, r["offset"]))
    for m, r in zip(modalities, records, strict=True):
        if r.get("captions"):
            m.captions, m.max_caption_tokens = modalities[r["captions"]["index"]], r["captions"].get("max_tokens")
    return modalities


def records_in(checkpoint: dict[str, Any]) -> list[dict[str, Any]]:
    """The vocabulary records a checkpoint dictionary holds (under the current or the old key), or []."""
    return checkpoint.get(CHECKPOINT_KEY) or checkpoint.get(_OLD_CHECKPOINT_KEY) or []
