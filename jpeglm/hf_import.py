"""``jpeglm import --hf DIR``: the released JPEG-LM weights (a Hugging Face Llama) as a jpeglm checkpoint.

The released model (``huggingface-cli download xhan77/jpeg-lm --local-dir DIR``) is a ``LlamaForCausalLM``
(``config.json``, ``*.safetensors`` or ``pytorch_model*.bin``) with a sentencepiece BPE ``tokenizer.model`` whose
pieces are JPEG bytes written as Braille characters (byte b is ``chr(b + 10240)``, U+2800..U+28FF), ``<unk>`` /
``<s>`` / ``</s>`` as pad / bos / eos and no modality tag: a sequence is ``<s>`` then the stream's tokens (then
``</s>``). :func:`hf_import` writes one checkpoint file that ``jpeglm generate``, ``jpeglm evaluate``, the
gallery and ``jpeglm fit`` read like any other. Decisions, and why:

- **The id layout is jpeglm's, the rows are moved.** Each released piece gets the id it would have in a
  :class:`~jpeglm.tokenizer.CodecTokenizer` (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, byte b at 8 + b, merged pieces
  from 264 in the order of their sentencepiece scores) and the embedding and output rows are permuted to match,
  so the model computes the same function on renamed ids: its logits at id ``jpeglm_id[s]`` are the released
  model's at sentencepiece id ``s`` (checked to 1e-4 in fp32, tests/test_hf_import.py). Everything that reads
  ids then works unchanged: masks, the JPEG grammar, prompts, ``jpeglm prepare`` shards, bits per byte, export.
  Ids 3..7 (jpeglm's tags and reserved ids) and the padding rows take the ``<unk>`` rows: the released model's
  own estimate of "never this". Pieces that stand for no byte string (sentencepiece's ``<0xNN>`` byte-fallback
  pieces, pieces with other characters, pieces no merge can build) are dropped and counted; the sampling masks
  exclude them anyway.
- **The tokenizer is the released one, rewritten as a ``tokenizers`` BPE.** Sentencepiece's BPE merges the
  adjacent pair whose merged piece scores highest; the same merges ranked by score in ``tokenizers`` give the
  same ids (equal to ``sentencepiece``'s on every fixture stream). The ``.model`` file is read with a small
  protobuf reader here, so neither ``sentencepiece`` nor ``protobuf`` is needed. No pre-tokenizer: as in the
  release, merges may cross restart markers. Its template is ``<s> $A </s>`` with no tag, so
  ``CodecTokenizer.tag_id`` is None and prompts are ``[<s>, *ids]`` (:func:`jpeglm.generation.make_prompt`).
  Encoding is lossless on every byte string when each of the 256 Braille characters is a piece (refused if not).
- **Prefix consistency is the release's**: since merges may cross a FFD7 marker, a prompt cut there may tokenize
  differently from the same bytes inside the full stream, exactly as in the reference code (which tokenizes the
  cut string alone). On the fixture photos a 320-symbol stand-in breaks it at 0 of 558 cuts, a 1024-symbol one
  at 9 (1.6%); the grammar works on bytes, so constrained sampling is unaffected.
- **Fine-tuning** starts from the imported weights through ``CodecLM(init_from=...)``: next to the checkpoint the
  import writes ``<stem>_model.yaml`` (the ``model:`` section of a recipe, a second ``--config``: the network's
  shape and ``init_from`` the checkpoint's absolute path) and ``<stem>_tokenizer/`` (for ``jpeglm prepare
  --tokenizer``). ``jpeglm fit`` then loads the weights in ``configure_model`` and starts at step 0 with a fresh
  AdamW and warmup, on one device as under FSDP2 (``ModelParallelStrategy``, the 7B recipes), where rank 0 alone
  reads the file; ``--ckpt_path`` stays for resuming a jpeglm run. The checkpoint still carries empty optimizer and
  scheduler states, so ``--ckpt_path`` on it works on one device, as before. See README "Released JPEG-LM weights".
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, processors

from jpeglm.checkpoints import Precision, inference_dtype
from jpeglm.errors import UserError
from jpeglm.tokenizer import BOS_ID, EOS_ID, NUM_SPECIAL, PAD_ID, SPECIAL_TOKENS, CodecTokenizer

BRAILLE = 0x2800
"""Byte b is the character ``chr(BRAILLE + b)`` in the released vocabulary (10240 = 0x2800)."""
# sentencepiece.ModelProto.SentencePiece.Type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# Hugging Face config.json -> litgpt Config field
_SHAPE = {
    "num_hidden_layers": "n_layer",
    "hidden_size": "n_embd",
    "num_attention_heads": "n_head",
    "intermediate_size": "intermediate_size",
    "rms_norm_eps": "norm_eps",
}


@dataclass
class SentencePieceModel:
    """What jpeglm reads of a sentencepiece ``.model`` file.

    Attributes:
        pieces: (piece, score, type) by sentencepiece id.
        unk_id: id of ``<unk>``; bos_id, eos_id: of ``<s>`` and ``</s>``.
        add_dummy_prefix: whether sentencepiece puts "▁" before every input (refused: JPEG-LM's has none).
    """

    pieces: list[tuple[str, float, int]]
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    add_dummy_prefix: bool = False


@dataclass
class ReleasedVocabulary:
    """The released vocabulary in jpeglm's id layout.

    Attributes:
        tokenizer: the jpeglm tokenizer (no tag; ``<s> ids </s>``).
        rows: for each jpeglm id, the sentencepiece id (the released model's row) it takes; -1: none.
        dropped: sentencepiece pieces that stand for no byte string, by kind.
    """

    tokenizer: CodecTokenizer
    rows: list[int]
    dropped: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------------- the command


def hf_import(
    hf: str,
    output: str,
    precision: Precision | None = None,
    seq_len: int | None = None,
    codec_options: dict | None = None,
) -> dict[str, Any]:
    """Write the released JPEG-LM model (a Hugging Face Llama directory) as a jpeglm checkpoint.

    Args:
        hf: a local copy of the released model: config.json, its weights (safetensors or .bin) and tokenizer.model.
        output: the checkpoint file to write (it must not exist); ``<stem>_tokenizer/`` and ``<stem>_model.yaml``
            are written next to it.
        precision: the weights' dtype, bf16 or fp32 (default: as stored).
        seq_len: the model's context in tokens (default: the config's max_position_embeddings).
        codec_options: codec settings of the model's streams other than the paper's (256x256, quality 25).

    Raises:
        UserError: ``output`` exists, files are missing, or the model or its vocabulary is not the kind described
            in the module docstring.
    """
    from jpeglm.train_tokenizer import make_codec

    source, output = Path(hf), Path(output)
    if output.exists():
        raise UserError(f"{output} exists; choose another --output")
    config = _read_config(source)
    vocabulary = released_vocabulary(read_sentencepiece(source / "tokenizer.model"), make_codec("jpeg", codec_options))
    dtype = None if precision is None else inference_dtype(precision, "cpu")
    hyper_parameters = codeclm_hyperparameters(config, vocabulary.tokenizer.num_ids, seq_len)
    weights = litgpt_weights(hyper_parameters, read_hf_weights(source), vocabulary.rows, dtype)
    records = _records(vocabulary.tokenizer)
    checkpoint = _imported_checkpoint(weights, hyper_parameters, records, vocabulary, source)
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, output)
    tokenizer_dir = vocabulary.tokenizer.save(output.with_name(f"{output.stem}_tokenizer"))
    model_yaml = output.with_name(f"{output.stem}_model.yaml")
    model_yaml.write_text(_model_yaml(hyper_parameters, output))
    return {
        "checkpoint": str(output),
        "tokenizer_dir": str(tokenizer_dir),
        "model_yaml": str(model_yaml),
        "parameters": sum(t.numel() for t in weights.values()),
        "num_ids": vocabulary.tokenizer.num_ids,
        "dropped": vocabulary.dropped,
    }


def summary(result: dict[str, Any]) -> str:
    """What `jpeglm import` prints at the end: what was written and how to use it."""
    dropped = ", ".join(f"{n} {kind}" for kind, n in result["dropped"].items() if n) or "none"
    return "\n".join(
        [
            f"wrote {result['checkpoint']} ({result['parameters'] / 1e6:.1f}M parameters, {result['num_ids']} ids; "
            f"pieces dropped: {dropped})",
            f"  sample:    jpeglm generate --checkpoint {result['checkpoint']} --output samples --prompt-images DIR",
            f"  data:      jpeglm prepare --modality jpeg --tokenizer {result['tokenizer_dir']} --input DIR --output D",
            f"  fine-tune: jpeglm fit --config RECIPE --config {result['model_yaml']} --data.init_args.data_dir D",
        ]
    )


# ---------------------------------------------------------------------- the vocabulary


def read_sentencepiece(path: str | Path) -> SentencePieceModel:
    """The pieces, special ids and dummy-prefix setting of a sentencepiece ``.model`` file (protobuf, read here).

    Raises:
        UserError: no such file, or not a sentencepiece model.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no sentencepiece tokenizer at {path}")
    model = SentencePieceModel([])
    try:
        for number, value in _fields(path.read_bytes()):
            if number == 1:  # repeated SentencePiece pieces
                piece = dict(_fields(value))
                score = struct.unpack("<f", piece.get(2, b"\0\0\0\0"))[0]
                model.pieces.append((piece.get(1, b"").decode(), score, piece.get(3, NORMAL)))
            elif number == 2:  # TrainerSpec: unk_id 40, bos_id 41, eos_id 42
                spec = dict(_fields(value))
                model.unk_id, model.bos_id, model.eos_id = (spec.get(n, d) for n, d in ((40, 0), (41, 1), (42, 2)))
            elif number == 3:  # NormalizerSpec: add_dummy_prefix 3 (default true)
                model.add_dummy_prefix = bool(dict(_fields(value)).get(3, 1))
    except (IndexError, ValueError, UnicodeDecodeError, struct.error) as error:
        raise UserError(f"{path} is not a sentencepiece model: {error}") from None
    if not model.pieces:
        raise UserError(f"{path} is not a sentencepiece model: it holds no pieces")
    return model


def _fields(buffer: bytes) -> Iterator[tuple[int, Any]]:
    """(field number, value) of a protobuf message: ints for varints, bytes for the other wire types."""
    i = 0
    while i < len(buffer):
        key, i = _varint(buffer, i)
        wire = key & 7
        if wire == 0:
            value, i = _varint(buffer, i)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, i = buffer[i : i + size], i + size
        elif wire == 2:
            size, i = _varint(buffer, i)
            value, i = buffer[i : i + size], i + size
        else:
            raise ValueError(f"protobuf wire type {wire}")
        yield key >> 3, value


def _varint(buffer: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buffer[i]
        value |= (byte & 0x7F) << shift
        shift, i = shift + 7, i + 1
        if byte < 0x80:
            return value, i


def released_vocabulary(spm: SentencePieceModel, codec: Any) -> ReleasedVocabulary:
    """The released vocabulary as a jpeglm tokenizer, and the sentencepiece row of each of its ids.

    Raises:
        UserError: a dummy prefix, specials that are not <unk> / <s> / </s>, or a byte with no piece.
    """
    if spm.add_dummy_prefix:
        raise UserError("the sentencepiece model adds a dummy prefix ('▁'): not the JPEG-LM vocabulary")
    _check_specials(spm)
    ids = {piece: i for i, (piece, _, kind) in enumerate(spm.pieces) if kind == NORMAL}
    missing = [b for b in range(256) if chr(BRAILLE + b) not in ids]
    if missing:
        raise UserError(f"the vocabulary has no piece for the bytes {missing[:16]}: it cannot encode every stream")
    dropped = {"byte fallback": 0, "not bytes": 0, "unreachable": 0, "unused": 0}
    merges: list[tuple[float, int, str, str]] = []
    for i, (piece, score, kind) in enumerate(spm.pieces):
        if kind != NORMAL or len(piece) < 2 or not _is_bytes(piece):
            _count_dropped(dropped, piece, kind, i, spm)
            continue
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in ids and piece[k:] in ids]
        merges += [(-score, i, _latin(a), _latin(b)) for a, b in splits]  # sentencepiece: the best score first
        dropped["unreachable"] += not splits
    merges.sort()
    tokenizer = CodecTokenizer(_bpe([(a, b) for *_, a, b in merges]), "jpeg", codec.spec)
    braille = {_latin(p): i for p, i in ids.items() if _is_bytes(p)}
    rows = [-1] * tokenizer.num_ids
    rows[PAD_ID], rows[BOS_ID], rows[EOS_ID] = spm.unk_id, spm.bos_id, spm.eos_id
    for token_id in range(NUM_SPECIAL, tokenizer.num_ids):
        rows[token_id] = braille[tokenizer.tokenizer.id_to_token(token_id)]
    return ReleasedVocabulary(tokenizer, rows, dropped)


def _check_specials(spm: SentencePieceModel) -> None:
    names = {spm.unk_id: "<unk>", spm.bos_id: "<s>", spm.eos_id: "</s>"}
    for i, name in names.items():
        if not 0 <= i < len(spm.pieces) or spm.pieces[i][0] != name:
            raise UserError(f"the sentencepiece model's special ids are not <unk> / <s> / </s>: {names}")


def _count_dropped(dropped: dict[str, int], piece: str, kind: int, i: int, spm: SentencePieceModel) -> None:
    if i in (spm.unk_id, spm.bos_id, spm.eos_id) or (kind == NORMAL and len(piece) == 1 and _is_bytes(piece)):
        return  # the specials and the single bytes: kept
    if kind == BYTE:
        dropped["byte fallback"] += 1
    elif kind == UNUSED:
        dropped["unused"] += 1
    else:
        dropped["not bytes"] += 1


def _is_bytes(piece: str) -> bool:
    return bool(piece) and all(BRAILLE <= ord(c) < BRAILLE + 256 for c in piece)


def _latin(piece: str) -> str:
    """A Braille piece as the Latin-1 string of its bytes (what a CodecTokenizer's vocabulary holds)."""
    return "".join(chr(ord(c) - BRAILLE) for c in piece)


def _bpe(merges: list[tuple[str, str]]) -> Tokenizer:
    """A tokenizer in jpeglm's id layout with these merges, no pre-tokenizer and the template ``<s> $A </s>``."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({chr(b): NUM_SPECIAL + b for b in range(256)})
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    bos, eos = SPECIAL_TOKENS[BOS_ID], SPECIAL_TOKENS[EOS_ID]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, BOS_ID), (eos, EOS_ID)]
    )
    return tok


def _records(tokenizer: CodecTokenizer) -> list[dict[str, Any]]:
    from jpeglm.vocabulary import Modality, to_records

    return to_records([Modality("jpeg", tokenizer)])


# ---------------------------------------------------------------------- the weights


def _read_config(source: Path) -> dict[str, Any]:
    path = source / "config.json"
    if not path.is_file():
        raise UserError(f"{source} holds no config.json: not a Hugging Face model directory")
    config = json.loads(path.read_text())
    odd = {
        key: config.get(key)
        for key, ok in {
            "model_type": lambda v: v == "llama",
            "hidden_act": lambda v: v in (None, "silu"),
            "attention_bias": lambda v: not v,
            "mlp_bias": lambda v: not v,
            "rope_scaling": lambda v: not v or v.get("rope_type", v.get("type")) == "default",
        }.items()
        if not ok(config.get(key))
    }
    if odd:
        raise UserError(f"{path} is not a plain Llama ({odd}): jpeglm import reads the released JPEG-LM model")
    return config


def codeclm_hyperparameters(config: dict[str, Any], num_ids: int, seq_len: int | None = None) -> dict[str, Any]:
    """The CodecLM hyperparameters of a Hugging Face Llama config, for a vocabulary of ``num_ids`` ids."""
    from jpeglm.model import CodecLM

    overrides = {litgpt: config[hf] for hf, litgpt in _SHAPE.items() if hf in config}
    overrides["n_query_groups"] = config.get("num_key_value_heads") or overrides["n_head"]
    overrides["head_size"] = config.get("head_dim") or overrides["n_embd"] // overrides["n_head"]
    overrides["rope_base"] = int((config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta", 1e4)))
    seq_len = seq_len or config.get("max_position_embeddings") or 4096
    model = CodecLM(model_name="Llama-2-7b-hf", model_overrides=overrides, vocab_size=num_ids, seq_len=seq_len)
    return dict(model.hparams)


def read_hf_weights(source: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face model directory (safetensors files, else pytorch_model*.bin)."""
    from safetensors import safe_open

    weights: dict[str, torch.Tensor] = {}
    files = sorted(source.glob("*.safetensors"))
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            weights.update({name: f.get_tensor(name) for name in f.keys()})  # noqa: SIM118 - safe_open has no iter
    if not files:
        for path in sorted(source.glob("pytorch_model*.bin")):
            weights.update(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
    if not weights:
        raise UserError(f"{source} holds no weights (*.safetensors or pytorch_model*.bin)")
    return weights


def litgpt_weights(
    hyper_parameters: dict[str, Any], hf_weights: dict[str, torch.Tensor], rows: list[int], dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """CodecLM's state dict (``model.<litgpt name>``) from the Hugging Face weights, vocabulary rows moved.

    Raises:
        UserError: the weights do not fit the model the config describes.
    """
    from litgpt.scripts.convert_hf_checkpoint import copy_weights_hf_llama

    from jpeglm.model import CodecLM

    model = CodecLM.from_hyperparameters(hyper_parameters)
    weights: dict[str, torch.Tensor] = {}
    try:
        copy_weights_hf_llama(model.config, {}, weights, hf_weights, dtype=dtype)
    except KeyError as error:
        raise UserError(f"a weight of the model is not a Llama's: {error}") from None
    padded = model.config.padded_vocab_size
    for name in ("transformer.wte.weight", "lm_head.weight"):
        weights[name] = _moved_rows(weights[name], rows, padded)
    with torch.device("meta"):
        model.configure_model()
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    got = {f"model.{name}": tuple(t.shape) for name, t in weights.items()}
    if expected != got:
        wrong = sorted(set(expected.items()) ^ set(got.items()))[:6]
        raise UserError(f"the weights do not fit the model config.json describes: {wrong}")
    return {f"model.{name}": t.contiguous() for name, t in weights.items()}


def _moved_rows(weight: torch.Tensor, rows: list[int], padded: int) -> torch.Tensor:
    """(padded, d): row ``i`` is ``weight[rows[i]]``; ids without a row, and padding, take ``weight[rows[0]]``."""
    if max(rows) >= weight.shape[0]:
        raise UserError(f"the tokenizer has more pieces than the model has embedding rows ({weight.shape[0]})")
    index = torch.tensor([r if r >= 0 else rows[PAD_ID] for r in rows] + [rows[PAD_ID]] * (padded - len(rows)))
    return weight[index].clone()


def _imported_checkpoint(
    weights, hyper_parameters, records, vocabulary: ReleasedVocabulary, source: Path
) -> dict[str, Any]:
    """A checkpoint that load_model reads and ``CodecLM(init_from=...)`` starts from (so does ``--ckpt_path``, on one
    device: its optimizer and scheduler states are empty)."""
    import lightning

    from jpeglm.vocabulary import CHECKPOINT_KEY

    return {
        "state_dict": weights,
        "hyper_parameters": hyper_parameters,
        CHECKPOINT_KEY: records,
        "jpeglm_import": {"source": str(source.resolve()), "rows": vocabulary.rows, "dropped": vocabulary.dropped},
        "optimizer_states": [],  # Lightning restores none: AdamW and the schedule start afresh
        "lr_schedulers": [],
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": lightning.__version__,
    }


def _model_yaml(hyper_parameters: dict[str, Any], checkpoint: Path) -> str:
    """The ``model:`` section of a recipe that builds this network and starts from ``checkpoint``'s weights.

    vocab_size and seq_len come from the data, as always; ``init_from`` is the checkpoint's absolute path.
    """
    import yaml

    section = {k: hyper_parameters[k] for k in ("model_name", "model_overrides")}
    section["init_from"] = str(checkpoint.resolve())
    header = (
        "# the imported network, starting from its weights (step 0, fresh optimizer): pass as a second --config\n"
        "# after a recipe; resume an interrupted fine-tuning run with --ckpt_path as usual\n"
    )
    return header + yaml.safe_dump({"model": section}, sort_keys=False)
