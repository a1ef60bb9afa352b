"""Byte-level BPE over codec byte streams (and UTF-8 text), with Hugging Face ``tokenizers``.

Bytes become symbols without a Python loop: a byte string decoded as Latin-1 is a string whose
code points are exactly the byte values (U+0000..U+00FF), so ``tokenizers`` runs BPE on it in Rust,
and ``str.encode("latin-1")`` turns decoded tokens back into the bytes. Traps this avoids (see
docs/architecture.md): no normalizer, no ``ByteLevel`` pre-tokenizer (it adds prefix spaces and works on UTF-8),
a ``Fuse`` decoder (decode would otherwise join tokens with spaces), and all 256 bytes in the
alphabet (bytes unseen in training would otherwise vanish). Special tokens use a fullwidth bar
(``<｜bos｜>``, U+FF5C), a character no Latin-1 string can hold, so no byte sequence can ever be
mistaken for one: encoding is lossless on every byte string.

Prefix stability: merges never cross a restart marker (JPEG) or a NAL start code (AVC), because a
``Split`` pre-tokenizer cuts the stream there first. A prompt cut at such a boundary therefore
tokenizes to an exact prefix of the full stream's tokens. For JPEG, encoding skips that cut whenever the merges
themselves cannot cross a marker (:func:`_marker_free`): the same ids, about a quarter faster.

Id layout (the same for every modality, so modalities mix by shifting BPE blocks, never by
re-tokenizing)::

    0 <｜pad｜>   1 <｜bos｜>   2 <｜eos｜>   3 <｜image｜>   4 <｜video｜>   5 <｜text｜>   6, 7 reserved
    8 + b        the single byte b (b = 0..255), in byte order
    264 ...      the tokens made by BPE merges, in merge order

A tokenizer with ``vocab_size`` BPE symbols (the paper: 320 for JPEG, 1024 for AVC) has
``num_ids = 8 + vocab_size`` ids in all. To mix modalities in one model, keep ids < 8 and add an
offset to the others: :meth:`CodecTokenizer.shift` gives the offset-shifted ids.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from jpeglm.errors import UserError

SPECIAL_TOKENS = (
    "<｜pad｜>",
    "<｜bos｜>",
    "<｜eos｜>",
    "<｜image｜>",
    "<｜video｜>",
    "<｜text｜>",
    "<｜reserved_6｜>",
    "<｜reserved_7｜>",
)
NUM_SPECIAL = len(SPECIAL_TOKENS)
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
MODALITIES = {"jpeg": 3, "avc": 4, "text": 5}
"""Modality name -> id of its tag token (the token after bos that says what follows)."""
DEFAULT_VOCAB_SIZE = {"jpeg": 320, "avc": 1024, "text": 32000}
"""BPE symbols per modality when none is given: the paper's 320 (JPEG) and 1024 (AVC); Llama's 32000 for text."""

# Where merges may not cross. JPEG: a piece ends with each restart marker FFD0..FFD7. AVC: a piece starts at
# each Annex-B start code (00 00 01 or 00 00 00 01). Text: GPT-2-like words over UTF-8 bytes, every byte
# >= 0x80 treated as a letter so multi-byte characters stay inside words.
_SPLITS = {
    "jpeg": ("\u00ff[\u00d0-\u00d7]", "merged_with_previous"),
    "avc": (r"\x00\x00\x00?\x01", "merged_with_next"),
    "text": (
        r"'(?:s|t|re|ve|m|ll|d)| ?[A-Za-z\x{80}-\x{ff}]+| ?[0-9]{1,3}| ?[^\sA-Za-z0-9\x{80}-\x{ff}]+|\s+(?!\S)|\s+",
        "isolated",
    ),
}
_FILES = ("tokenizer.json", "id_layout.json", "codec_spec.json")
_FORMAT = 1


class CodecTokenizer:
    """Lossless byte-level BPE for one modality's byte streams, in the id layout of the module docstring.

    Build one with :meth:`train` or :meth:`load`; the constructor wraps an existing ``tokenizers.Tokenizer``.

    Args:
        tokenizer: a ``tokenizers.Tokenizer`` in this module's layout (as :meth:`train` makes it).
        modality: "jpeg", "avc" or "text".
        codec_spec: the spec of the codec whose streams this tokenizer reads (None for text).
    """

    def __init__(self, tokenizer: Tokenizer, modality: str, codec_spec: dict[str, Any] | None = None) -> None:
        if modality not in MODALITIES:
            raise UserError(f"modality must be one of {sorted(MODALITIES)}, got {modality!r}")
        for i, token in enumerate(SPECIAL_TOKENS):
            if tokenizer.token_to_id(token) != i:
                raise UserError(f"not a jpeglm tokenizer: {token} is not id {i}")
        self.tokenizer = tokenizer
        self.modality = modality
        self.codec_spec = codec_spec
        self._encoder = _marker_free(tokenizer) if modality == "jpeg" else tokenizer  # what encode runs
        # The tag that follows bos in a sample, as the tokenizer's template writes it: jpeglm's tokenizers all have
        # one; the released JPEG-LM vocabulary (`jpeglm import`, jpeglm/hf_import.py) has none, so None.
        template = tokenizer.encode("", add_special_tokens=True).ids
        self.tag_id: int | None = MODALITIES[modality] if MODALITIES[modality] in template else None

    def __repr__(self) -> str:
        return f"CodecTokenizer(modality={self.modality!r}, vocab_size={self.vocab_size})"

    @property
    def num_ids(self) -> int:
        """All ids: the 8 special ids plus the BPE symbols (the model's vocabulary size)."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        """BPE symbols: 256 single bytes plus the learned merges (the paper's 320 / 1024)."""
        return self.num_ids - NUM_SPECIAL

    # ------------------------------------------------------------------ train

    @classmethod
    def train(
        cls,
        streams: Iterable[bytes],
        modality: str,
        vocab_size: int | None = None,
        codec_spec: dict[str, Any] | None = None,
        show_progress: bool = False,
        length: int | None = None,
    ) -> CodecTokenizer:
        """Train a byte-level BPE on byte streams.

        Args:
            streams: codec byte streams (or UTF-8 text as bytes for ``modality="text"``).
            modality: "jpeg", "avc" or "text"; chooses where merges may not cross.
            vocab_size: BPE symbols including the 256 bytes (default: 320 jpeg, 1024 avc, 32000 text).
                Fewer are learned when the data has too few repeated pairs.
            codec_spec: the spec of the codec that made the streams, saved with the tokenizer.
            show_progress: show the trainer's progress bars.
            length: number of streams, if known (for the progress bar).
        """
        if modality not in MODALITIES:
            raise UserError(f"modality must be one of {sorted(MODALITIES)}, got {modality!r}")
        vocab_size = DEFAULT_VOCAB_SIZE[modality] if vocab_size is None else vocab_size
        if vocab_size < 256:
            raise UserError(f"vocab_size counts the 256 single bytes and must be >= 256, got {vocab_size}")
        raw = Tokenizer(models.BPE())
        raw.pre_tokenizer = _pre_tokenizer(modality)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size + 1,  # + the one special token the trainer keeps at id 0
            special_tokens=[SPECIAL_TOKENS[0]],
            initial_alphabet=[chr(b) for b in range(256)],
            min_frequency=2,
            show_progress=show_progress,
        )
        raw.train_from_iterator((bytes(s).decode("latin-1") for s in streams), trainer, length=length)
        merges = [tuple(pair) for pair in json.loads(raw.to_str())["model"]["merges"]]
        return cls(_build(merges, modality), modality, codec_spec)

    # ------------------------------------------------------------------ encode / decode

    def encode(self, stream: bytes, add_special_tokens: bool = False) -> list[int]:
        """Token ids of one byte stream; with ``add_special_tokens``: bos, modality tag, tokens, eos."""
        return self._encoder.encode(bytes(stream).decode("latin-1"), add_special_tokens=add_special_tokens).ids

    def encode_batch(self, streams: Sequence[bytes], add_special_tokens: bool = False) -> list[list[int]]:
        """Token ids of many streams at once (in Rust, on all cores unless TOKENIZERS_PARALLELISM=false)."""
        texts = [bytes(s).decode("latin-1") for s in streams]
        return [e.ids for e in self._encoder.encode_batch_fast(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int]) -> bytes:
        """The bytes of ``ids``; special ids and ids outside this tokenizer's range are dropped."""
        ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64).reshape(-1)
        keep = ids[(ids >= NUM_SPECIAL) & (ids < self.num_ids)].tolist()
        return self.tokenizer.decode(keep, skip_special_tokens=True).encode("latin-1")

    def shift(self, ids: np.ndarray, offset: int) -> np.ndarray:
        """Ids moved into a mixed vocabulary: special ids stay, BPE ids gain ``offset``."""
        ids = np.asarray(ids)
        return np.where(ids >= NUM_SPECIAL, ids + offset, ids)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one BPE id stands for (empty for special ids)."""
        if token_id < NUM_SPECIAL:
            return b""
        return self.tokenizer.id_to_token(token_id).encode("latin-1")

    # ------------------------------------------------------------------ save / load

    def save(self, directory: str | Path) -> Path:
        """Write ``tokenizer.json``, ``id_layout.json`` and ``codec_spec.json`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(directory / "tokenizer.json"))
        layout = {
            "format": _FORMAT,
            "modality": self.modality,
            "vocab_size": self.vocab_size,
            "num_ids": self.num_ids,
            "special_tokens": {token: i for i, token in enumerate(SPECIAL_TOKENS)},
            "modality_tags": MODALITIES,
            "byte_ids": f"{NUM_SPECIAL} + byte value",
            "merge_ids": f"{NUM_SPECIAL + 256} and up, in merge order",
        }
        (directory / "id_layout.json").write_text(json.dumps(layout, indent=2, ensure_ascii=False) + "\n")
        (directory / "codec_spec.json").write_text(json.dumps(self.codec_spec, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> CodecTokenizer:
        """Read a tokenizer directory written by :meth:`save`.

        Raises:
            UserError: a file of the directory is missing, or
                the files are not a jpeglm tokenizer of a known format.
        """
        directory = Path(directory)
        missing = [f for f in _FILES if not (directory / f).is_file()]
        if missing:
            raise UserError(f"{directory} is not a jpeglm tokenizer directory: missing {missing}")
        layout = json.loads((directory / "id_layout.json").read_text())
        if layout.get("format") != _FORMAT:
            raise UserError(f"{directory}: tokenizer format {layout.get('format')!r}, expected {_FORMAT}")
        spec = json.loads((directory / "codec_spec.json").read_text())
        return cls(Tokenizer.from_file(str(directory / "tokenizer.json")), layout["modality"], spec)

    @property
    def codec(self) -> Any:
        """The codec of :attr:`codec_spec`, checked against this installation (None for text)."""
        from jpeglm.codecs import codec_from_spec

        return None if self.codec_spec is None else codec_from_spec(self.codec_spec)


def _marker_free(tokenizer: Tokenizer) -> Tokenizer:
    """``tokenizer`` without its pre-tokenizer when that gives the same ids on every byte string; else itself.

    The JPEG split cuts after each restart marker ``FF D0``..``FF D7``, so no merge joins the token that ends a
    marker to the one after it. Without the cut, such a join needs a merge whose left side can end a marker: a
    marker byte alone, or a token ending in ``FF Dk``. Merges learned with the cut never have the second (a marker
    ends its piece), and rarely the first (the byte alone inside entropy-coded data; the most frequent pairs are
    the markers ``FF Dk`` themselves). When neither is there, the two sides of a marker never interact, so BPE on
    the whole stream makes exactly the cut's ids, without the regex pass and the per-piece bookkeeping (0.61 ->
    0.47 ms per 256-px image, measured). Otherwise the cut stays.
    """
    markers = {chr(0xD0 + k) for k in range(8)}
    text = tokenizer.to_str()
    merges = json.loads(text)["model"]["merges"]
    for merge in merges:
        pair = merge if isinstance(merge, list) else merge.split(" ")  # ["a", "b"], or "a b" in older files
        if len(pair) != 2:  # "a b" with a space byte inside a token: which side is which is not known
            return tokenizer
        if pair[0][-1] in markers and (len(pair[0]) == 1 or pair[0][-2] == "\xff"):
            return tokenizer
    fast = Tokenizer.from_str(text)
    fast.pre_tokenizer = None
    return fast


def _pre_tokenizer(modality: str) -> pre_tokenizers.PreTokenizer:
    pattern, behavior = _SPLITS[modality]
    return pre_tokenizers.Split(Regex(pattern), behavior=behavior)


def _build(merges: list[tuple[str, str]], modality: str) -> Tokenizer:
    """A tokenizer in the documented id layout from a list of BPE merges."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({chr(b): NUM_SPECIAL + b for b in range(256)})
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = _pre_tokenizer(modality)
    tok.decoder = decoders.Fuse()
    # Special tokens already hold ids 0..7 in the vocabulary; registering them keeps those ids.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    bos, eos, tag = SPECIAL_TOKENS[BOS_ID], SPECIAL_TOKENS[EOS_ID], SPECIAL_TOKENS[MODALITIES[modality]]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} {tag} $A {eos}",
        special_tokens=[(bos, BOS_ID), (tag, MODALITIES[modality]), (eos, EOS_ID)],
    )
    return tok
