"""``jpeglm prepare``: turn images, videos or text into litdata token shards that training streams.

Each input becomes one sample ``bos, modality tag, codec tokens..., eos`` (see jpeglm/tokenizer.py),
written with litdata's ``BinaryWriter`` in the layout ``litdata.TokensLoader`` reads. This module is the
writer; the format and its reader (:func:`read_dataset`, re-exported here) live in jpeglm/shards.py.

Why not ``litdata.optimize``: a job of a million inputs must survive ``kill -9`` with no duplicate and
no gap, must report every skipped input with its reason in one place, and must split across nodes that share
nothing but the output. Here the inputs are cut into fixed *parts*; workers encode and tokenize, the main
process writes each part into a local temporary directory, then publishes it through a
:class:`jpeglm.storage.Store` (the output directory or an ``s3://`` prefix): its chunks under their final names,
then one record ``.prepare/parts/part-P.json`` that marks the part done. A re-run with the same arguments skips
parts with a record and redoes the one that was cut short. Node ``i`` of ``N`` (``--num-nodes``,
``--node-rank``, or SLURM's variables) writes parts ``i, i + N, ...``; the node that finds every record present
merges them: one litdata index per split (the records' chunk lists in part order), the report, ``dataset.json``
last. docs/architecture.md ("The shard format") has the whole protocol.

The train/val split hashes each input's stable key (its path relative to the input directory, see
jpeglm/inputs.py), so re-running never moves an item between splits. A tokenizer trained here (no
``--tokenizer``) sees the training split only: nothing of a validation item leaks into the vocabulary.
Inputs are written in a seeded shuffled order, so every chunk holds a mix of the dataset rather than one
directory's worth.

Captioned images (``--captions``, modality jpeg): each image is paired with its caption (jpeglm/inputs.py,
:func:`find_captioned`) and becomes ``bos, 5 (text tag), caption ids..., 3 (image tag), JPEG ids..., eos`` in one
id space: the JPEG tokenizer's ids as they are, the caption tokenizer's BPE ids moved up by ``jpeg.num_ids - 8``
(its specials stay), as :class:`~jpeglm.data_modules.MixedDataModule` moves a second member's ids. The caption
tokenizer is the one given (``--caption-tokenizer``) or one trained on the training split's captions; it is saved
in ``caption_tokenizer/`` and ``dataset.json``'s ``captions`` records its offset (jpeglm/shards.py). Captions longer
than ``--max-caption-tokens`` are cut to it and written, counted under ``changed_by_reason``; pairs that cannot be
made are skipped and counted with the other skips (reasons in jpeglm/inputs.py).
"""

from __future__ import annotations

import fcntl
import hashlib
import inspect
import json
import multiprocessing
import os
import random
import shutil
import socket
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from tqdm import tqdm

from jpeglm.errors import UserError
from jpeglm.inputs import (
    CAPTION_TRUNCATED,
    WRONG_EXTENSION,
    WRONG_EXTENSION_ERROR,
    Encoded,
    InputError,
    InputItem,
    Inputs,
    encode_input,
    find_captioned,
    find_inputs,
    read_caption,
)
from jpeglm.shards import FORMAT, SPLITS, WORK_DIR, PreparedDataset, read_dataset
from jpeglm.storage import LocalStore, Store, open_store, scratch
from jpeglm.tokenizer import BOS_ID, EOS_ID, MODALITIES, NUM_SPECIAL, CodecTokenizer
from jpeglm.train_tokenizer import ModalityName, TrainReport, make_codec, train_on_inputs

__all__ = ["PreparedDataset", "prepare", "read_dataset", "summary"]
_BATCH = 16  # inputs per worker task: tokenized together in one Rust call
_CAPTION_SAMPLE = 100_000  # captions of the training split a caption tokenizer trained here reads at most


# ---------------------------------------------------------------------- the job


@dataclass
class _Captions:
    """A captioned job's caption settings, and its text tokenizer once given, loaded or trained."""

    max_tokens: int
    vocab_size: int  # of the caption tokenizer trained here
    given: CodecTokenizer | None = None
    tokenizer: CodecTokenizer | None = None
    offset: int = 0  # added to the caption tokenizer's BPE ids: the JPEG tokenizer's num_ids - 8
    report: dict[str, Any] = field(default_factory=dict)  # prepare_report.json's captions.tokenizer

    def meta(self) -> dict[str, Any]:
        """dataset.json's ``captions``."""
        return {
            "modality": "text",
            "offset": self.offset,
            "num_ids": self.tokenizer.num_ids,
            "max_tokens": self.max_tokens,
        }


@dataclass
class _Job:
    modality: str
    items: list[InputItem]
    wrong_extension: list[Path]  # files of other types: skipped, with the reason WRONG_EXTENSION
    store: Store  # where the dataset is written: the output directory or s3 prefix
    work: Path  # this machine's work area: OUT/.prepare for a local output, a cache directory for s3
    val_fraction: float
    part_size: int
    chunk_bytes: int
    fingerprint: str
    vocab_size: int | None = None  # of the tokenizer trained here
    tokenizer_report: dict[str, Any] = field(default_factory=dict)  # prepare_report.json's "tokenizer"
    rejected: list[dict[str, str]] = field(default_factory=list)  # pairs a captioned search could not make
    captions: _Captions | None = None  # a captioned job's settings
    node: int = 0  # this node's share: the parts p with p % num_nodes == node
    num_nodes: int = 1

    @property
    def output(self) -> str:
        return self.store.url

    @property
    def num_parts(self) -> int:
        return -(-len(self.items) // self.part_size)

    @property
    def share(self) -> list[int]:
        """The parts this node writes."""
        return list(range(self.node, self.num_parts, self.num_nodes))

    def part_items(self, part: int) -> list[InputItem]:
        return self.items[part * self.part_size : (part + 1) * self.part_size]

    def local(self, key: str) -> Path:
        """Where ``key`` of the output is on this machine: in the output directory, or a copy in the work area."""
        return self.store.path(key) if isinstance(self.store, LocalStore) else self.work / "output" / key

    def num_ids(self, tok: CodecTokenizer) -> int:
        """Ids of the stored samples: the tokenizer's, plus the caption tokenizer's BPE ids when captioned."""
        return tok.num_ids + (self.captions.tokenizer.num_ids - NUM_SPECIAL if self.captions else 0)


def _part_key(part: int) -> str:
    return f"{WORK_DIR}/parts/part-{part:06d}.json"


def prepare(
    modality: ModalityName,
    inputs: list[str | Path],
    output: str | Path,
    tokenizer: str | Path | None = None,
    vocab_size: int | None = None,
    val_fraction: float = 0.01,
    num_workers: int | None = None,
    max_items: int | None = None,
    seed: int = 0,
    part_size: int = 1024,
    chunk_bytes: int = 64 * 2**20,
    progress: bool = True,
    codec_options: dict | None = None,
    captions: bool = False,
    caption_tokenizer: str | Path | None = None,
    caption_vocab_size: int = 512,
    max_caption_tokens: int = 64,
    num_nodes: int | None = None,
    node_rank: int | None = None,
) -> dict[str, Any]:
    """Prepare inputs into token shards in ``output`` (see the module docstring); returns the report.

    Args:
        modality: what the inputs are: images (jpeg), videos (avc) or text.
        inputs: directories (recursive), globs, files, list files (.lst/.list; .txt for media), .tar shards; text:
            .txt and .jsonl (a "text" field per line).
        output: the dataset directory or ``s3://bucket/prefix`` to write (run the same command again to finish
            a killed job); s3 settings come from the AWS environment variables (jpeglm/storage.py).
        tokenizer: a tokenizer directory (`jpeglm tokenizer train`; none: one is trained on the training split).
        vocab_size: BPE symbols of the tokenizer trained here, with the 256 bytes (none: 320 jpeg, 1024 avc, 32000
            text; fewer when the training split has too few repeated byte pairs). Not with --tokenizer.
        val_fraction: share of inputs in the validation split, decided by a hash of each input's path.
        num_workers: processes that encode and tokenize (none: all cores).
        max_items: use only the first N inputs found (none: all).
        seed: seed of the order in which inputs are written.
        part_size: inputs per part, the unit of work a killed job redoes.
        chunk_bytes: size of each litdata chunk file, in bytes.
        progress: show progress bars.
        codec_options: codec settings other than the paper's, e.g. {"size": 64} (`--codec size=64`); not with
            --tokenizer (its codec spec decides).
        captions: captioned images (jpeg only): .tar shards (key.jpg with key.txt or key.json's "caption"), folders
            (photo.jpg beside photo.txt or .json) or .jsonl manifests of {"image": path, "caption": text}.
        caption_tokenizer: a text tokenizer for the captions (none: one is trained on the training split's).
        caption_vocab_size: BPE symbols of the caption tokenizer trained here, including the 256 bytes.
        max_caption_tokens: longer captions are cut to this many tokens (and counted: caption_truncated).
        num_nodes: machines writing the output together, each its share (none: from SLURM, see node_share).
        node_rank: this machine's share, 0 .. num_nodes - 1 (none: from SLURM).

    Raises:
        UserError: bad arguments, missing inputs, nothing to read, an output that holds something else, or no
            input could be written (InputError is a UserError).
        CodecError: a tokenizer whose codec this installation cannot honour.
    """
    start, given = time.perf_counter(), _check_arguments(modality, tokenizer, vocab_size, val_fraction, codec_options)
    captioned = _check_captions(modality, captions, caption_tokenizer, caption_vocab_size, max_caption_tokens)
    settings = {"val_fraction": val_fraction, "seed": seed, "part_size": part_size, "chunk_bytes": chunk_bytes}
    job = _make_job(modality, inputs, output, given, max_items, settings, codec_options, vocab_size, captioned)
    job.node, job.num_nodes = node_share(num_nodes, node_rank)
    return _run_job(job, given, num_workers, progress, codec_options, start)


def node_share(num_nodes: int | None, node_rank: int | None) -> tuple[int, int]:
    """``(node_rank, num_nodes)`` as given, else from SLURM: an array job's index among its tasks
    (``SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN`` of ``SLURM_ARRAY_TASK_COUNT``), else a job step's task
    (``SLURM_PROCID`` of ``SLURM_NTASKS``), else one node. ``num_nodes=1`` alone is node 0 of 1 anywhere: what the
    data modules that prepare inside a training job ask for (its SLURM tasks are training ranks, not shares)."""
    env = os.environ
    if "SLURM_ARRAY_TASK_COUNT" in env:
        task = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        found = (task, int(env["SLURM_ARRAY_TASK_COUNT"]))
    elif "SLURM_NTASKS" in env and "SLURM_PROCID" in env:
        found = (int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]))
    else:
        found = (0, 1)
    count = found[1] if num_nodes is None else num_nodes
    rank = (0 if count == 1 else found[0]) if node_rank is None else node_rank
    if count < 1 or not 0 <= rank < count:
        raise UserError(f"node_rank must be in [0, num_nodes) and num_nodes >= 1, got node {rank} of {count}")
    return rank, count


def _run_job(job: _Job, given, num_workers, progress, codec_options, start: float) -> dict[str, Any]:
    """The job under its lock: nothing when it is already done, else tokenizers, parts, then the dataset."""
    with _locked(job):
        if (done := _already_done(job)) is not None:
            return done
        tok = _tokenizer(job, given, num_workers, progress, codec_options)
        codec = tok.codec  # raises CodecError if this installation cannot write the tokenizer's codec
        if job.captions is not None:
            _caption_tokenizer(job, tok, progress)
        counts = _run_parts(job, tok, num_workers or os.cpu_count() or 1, progress)
        _node_record(job, counts, time.perf_counter() - start)
        if (done := _already_done(job, quiet=True)) is not None:  # another node merged meanwhile
            return done
        if missing := job.num_parts - len(_done_parts(job)):  # other nodes' shares are not all written yet
            return _unfinished(job, counts, missing)
        return _finish(job, tok, codec)


def _check_arguments(
    modality: str, tokenizer: str | Path | None, vocab_size: int | None, val_fraction: float, codec_options: dict | None
) -> CodecTokenizer | None:
    """Refuse arguments that cannot go together; returns the given tokenizer, loaded."""
    if tokenizer and vocab_size is not None:
        raise UserError("vocab_size applies only when no --tokenizer is given (the tokenizer's vocabulary decides)")
    if vocab_size is not None and vocab_size < 256:
        raise UserError(f"vocab_size counts the 256 single bytes and must be >= 256, got {vocab_size}")
    if not 0 <= val_fraction < 1:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if modality not in MODALITIES:
        raise UserError(f"modality must be one of {sorted(MODALITIES)}, got {modality!r}")
    given = CodecTokenizer.load(tokenizer) if tokenizer else None
    if given is not None and given.modality != modality:
        raise UserError(f"tokenizer {tokenizer} is for {given.modality!r}, not {modality!r}")
    if given is not None and codec_options:
        raise UserError("codec options apply only when no --tokenizer is given (its codec spec decides)")
    if given is None:
        make_codec(modality, codec_options)  # options the codec refuses fail now, not after finding the inputs
    return given


def _check_captions(
    modality: str, captions: bool, caption_tokenizer: str | Path | None, vocab_size: int, max_tokens: int
) -> _Captions | None:
    """Refuse caption options that cannot apply; returns a captioned job's settings (None without captions)."""
    if not captions:
        if caption_tokenizer:
            raise UserError("caption_tokenizer applies only to captioned images (--captions)")
        return None
    if modality != "jpeg":
        raise UserError(f"--captions pairs images with their captions: it needs --modality jpeg, not {modality!r}")
    if vocab_size < 256:
        raise UserError(f"caption_vocab_size counts the 256 single bytes and must be >= 256, got {vocab_size}")
    if max_tokens < 1:
        raise UserError(f"max_caption_tokens must be >= 1, got {max_tokens}")
    given = CodecTokenizer.load(caption_tokenizer) if caption_tokenizer else None
    if given is not None and given.modality != "text":
        raise UserError(
            f"caption_tokenizer {caption_tokenizer} is for {given.modality!r}: captions need a text tokenizer "
            "(`jpeglm tokenizer train --modality text`)"
        )
    return _Captions(max_tokens, vocab_size, given)


def _make_job(modality, inputs, output, given, max_items, settings, codec_options, vocab_size, captioned) -> _Job:
    """Find the inputs, put them in their seeded order and fingerprint the job (what a re-run must match).

    ``settings``: val_fraction, seed, part_size and chunk_bytes; ``captioned``: the caption settings, or None.
    """
    found = find_captioned(inputs) if captioned else find_inputs(inputs, modality)
    items = found.items[:max_items] if max_items else found.items
    random.Random(settings["seed"]).shuffle(items)
    trained = "trained here" if vocab_size is None else f"trained here, vocab_size {vocab_size}"
    fingerprint = _fingerprint(
        {
            "modality": modality,
            **settings,
            "tokenizer": given.tokenizer.to_str() if given else trained,
            "codec_options": codec_options or {},
            # The codec's settings with its defaults filled in: a changed default (JPEG's resize filter became
            # the reference's bilinear) is another job, never a resume that mixes old and new bytes.
            **({} if given else {"codec": codec_settings(make_codec(modality, codec_options))}),
            **({"captions": _caption_settings(captioned)} if captioned else {}),
        },
        items,
    )
    store = open_store(output)
    work = store.path(WORK_DIR) if isinstance(store, LocalStore) else _remote_work(store.url)
    return _Job(
        modality,
        items,
        found.skipped,
        store,
        work,
        settings["val_fraction"],
        settings["part_size"],
        settings["chunk_bytes"],
        fingerprint,
        vocab_size,
        rejected=found.rejected,
        captions=captioned,
    )


def _remote_work(url: str) -> Path:
    """This machine's work area for an output in object storage: under ``$JPEGLM_CACHE`` (else
    ~/.cache/jpeglm), one directory per URL."""
    root = Path(os.environ.get("JPEGLM_CACHE") or Path.home() / ".cache" / "jpeglm")
    return root / "prepare" / hashlib.sha256(url.encode()).hexdigest()[:16]


def _caption_settings(captioned: _Captions) -> dict[str, Any]:
    """What of the caption settings a re-run must match."""
    if captioned.given is not None:
        return {"tokenizer": captioned.given.tokenizer.to_str(), "max_tokens": captioned.max_tokens}
    return {"tokenizer": f"trained here, vocab_size {captioned.vocab_size}", "max_tokens": captioned.max_tokens}


def codec_settings(codec: Any) -> dict[str, Any] | None:
    """Every constructor argument of ``codec`` as it holds it, defaults included (None for text's missing codec).

    Cheap (no encoding, unlike ``codec.spec``): what cache keys and job fingerprints hash, so that a changed
    default makes a new key.
    """
    if codec is None:
        return None
    names = inspect.signature(type(codec)).parameters
    return {name: getattr(codec, name) for name in names if hasattr(codec, name)}


def _fingerprint(settings: dict[str, Any], items: list[InputItem]) -> str:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for s in items:
        caption = "" if s.caption is None else f"\0{s.caption}"  # uncaptioned jobs keep their fingerprints
        digest.update(f"{s.key}\0{s.path}\0{s.offset}\0{s.size}{caption}\n".encode())
    return digest.hexdigest()


class _locked:
    """Claim this node's share of the output: one `jpeglm prepare` per node and output at a time (a lock in the
    work area); refuse an output that holds something else or another job's unfinished work."""

    KNOWN = {WORK_DIR, "dataset.json", "train", "val", "tokenizer", "caption_tokenizer", "codec_spec.json"}
    KNOWN |= {"prepare_report.json"}

    def __init__(self, job: _Job) -> None:
        self.job = job

    def __enter__(self) -> None:
        job = self.job
        _check_foreign(job)
        job.work.mkdir(parents=True, exist_ok=True)
        name = "lock" if job.num_nodes == 1 else f"lock-node-{job.node}"
        self.lock = open(job.work / name, "w")  # noqa: SIM115 - held for the whole job
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise InputError(f"another `jpeglm prepare` is writing {job.output} (node {job.node})") from e
        state = f"{WORK_DIR}/state.json"
        if job.store.exists(state) and json.loads(job.store.read_text(state))["fingerprint"] != job.fingerprint:
            raise InputError(
                f"{job.output} holds an unfinished `jpeglm prepare` with other inputs or arguments; "
                "re-run it with the same ones, or use a new output directory"
            )
        _store_json(job.store, state, {"fingerprint": job.fingerprint, "num_parts": job.num_parts})

    def __exit__(self, *exc: object) -> None:
        self.lock.close()
        if self.job.store.exists("dataset.json"):  # finished: the work areas are no longer needed
            self.job.store.delete(WORK_DIR)
            shutil.rmtree(self.job.work, ignore_errors=True)


def _check_foreign(job: _Job) -> None:
    """Refuse an output that is a file, or a directory or prefix holding anything a prepared dataset does not."""
    if isinstance(job.store, LocalStore):
        root = job.store.root
        if root.exists() and not root.is_dir():
            raise InputError(f"output {job.output} exists and is not a directory")
        names = {p.name for p in root.iterdir() if not scratch(p)} if root.is_dir() else set()
    else:
        names = {key.split("/", 1)[0] for key in job.store.list()}
    if names - _locked.KNOWN:
        raise InputError(f"output {job.output} holds other files; give an empty or new directory or prefix")


def _already_done(job: _Job, quiet: bool = False) -> dict[str, Any] | None:
    if not job.store.exists("dataset.json"):
        return None
    if json.loads(job.store.read_text("dataset.json")).get("fingerprint") != job.fingerprint:
        raise InputError(
            f"{job.output} already holds a different prepared dataset; use a new output directory or delete it"
        )
    if not quiet:
        print(f"{job.output} is already prepared with these inputs and arguments; nothing to do", file=sys.stderr)
    return json.loads(job.store.read_text("prepare_report.json"))


def _tokenizer(job: _Job, given: CodecTokenizer | None, num_workers, progress, codec_options) -> CodecTokenizer:
    """The given tokenizer, or one trained on the training split's inputs (sets ``job.tokenizer_report``)."""
    if given is not None:
        job.tokenizer_report = {"trained_here": False, "vocab_size": given.vocab_size}
        return _publish_tokenizer(job, "tokenizer", given, job.tokenizer_report)
    if (shared := _published_tokenizer(job, "tokenizer")) is not None:  # by a killed run or another node
        job.tokenizer_report = shared[1]
        return shared[0]
    train = [item for item in job.items if not _is_val(item.key, job.val_fraction)]
    if not train:
        raise UserError(
            f"none of the {len(job.items)} inputs falls in the training split (val_fraction {job.val_fraction}): "
            "nothing to train a tokenizer on; lower --val-fraction or give more inputs"
        )
    print(
        f"no --tokenizer given: training a {job.modality} tokenizer on a sample of the {len(train)} inputs of the "
        "training split",
        file=sys.stderr,
    )
    codec = make_codec(job.modality, codec_options)
    found = Inputs(train, job.wrong_extension)
    target = job.work / f"tokenizer-node-{job.node}"
    tok, report = train_on_inputs(
        job.modality, found, target, codec, job.vocab_size, num_workers=num_workers, progress=progress
    )
    print(report.summary(tok, job.output + "/tokenizer"), file=sys.stderr)
    job.tokenizer_report = {"trained_here": True, "split": "train", **report.as_dict()}
    return _publish_tokenizer(job, "tokenizer", tok, job.tokenizer_report)


def _caption_tokenizer(job: _Job, tok: CodecTokenizer, progress: bool) -> None:
    """The given caption tokenizer, or one trained on the training split's captions; sets ``job.captions``'
    tokenizer, offset and report."""
    captions = job.captions
    if captions.given is not None:
        captions.report = {"trained_here": False, "vocab_size": captions.given.vocab_size}
        captions.tokenizer = _publish_tokenizer(job, "caption_tokenizer", captions.given, captions.report)
    elif (shared := _published_tokenizer(job, "caption_tokenizer")) is not None:
        captions.tokenizer, captions.report = shared
    else:
        trained, report = _train_caption_tokenizer(job, job.work / f"caption_tokenizer-node-{job.node}", progress)
        captions.tokenizer = _publish_tokenizer(job, "caption_tokenizer", trained, report)
        captions.report = report
    captions.offset = tok.num_ids - NUM_SPECIAL


def _published_tokenizer(job: _Job, name: str) -> tuple[CodecTokenizer, dict[str, Any]] | None:
    """The tokenizer ``name`` (tokenizer, caption_tokenizer) and its report, when an earlier run or another
    node has published it (``.prepare/NAME.done`` in the output, written after its files); else None."""
    done = f"{WORK_DIR}/{name}.done"
    if not job.store.exists(done):
        return None
    if not isinstance(job.store, LocalStore):
        for key in job.store.list(name + "/"):
            job.store.get_file(key, job.local(key))
    return CodecTokenizer.load(job.local(name)), json.loads(job.store.read_text(done) or "{}")


def _publish_tokenizer(job: _Job, name: str, tok: CodecTokenizer, report: dict[str, Any]) -> CodecTokenizer:
    """Put ``tok`` into the output as ``name``, unless another node was first: then theirs is used (and the
    merge checks that every part was written with the published one). Returns the tokenizer to write with."""
    if (shared := _published_tokenizer(job, name)) is not None:
        return shared[0]
    staged = tok.save(job.work / f"{name}-node-{job.node}")
    for path in sorted(staged.iterdir()):
        job.store.put_file(path, f"{name}/{path.name}")
    _store_json(job.store, f"{WORK_DIR}/{name}.done", report)
    # What the output holds now, not ``tok``: a node that published at the same moment may have written last.
    return _published_tokenizer(job, name)[0]


def _train_caption_tokenizer(job: _Job, target: Path, progress: bool) -> tuple[CodecTokenizer, dict[str, Any]]:
    """A text tokenizer trained on (a seeded sample of at most :data:`_CAPTION_SAMPLE` of) the training split's
    captions, saved in ``target``; returns it and its report."""
    start = time.perf_counter()
    train = [item for item in job.items if not _is_val(item.key, job.val_fraction)]
    if len(train) > _CAPTION_SAMPLE:
        train = random.Random(0).sample(train, _CAPTION_SAMPLE)
    report = TrainReport(output=job.output + "/caption_tokenizer", vocab_size_asked=job.captions.vocab_size)
    texts = []
    for item in tqdm(train, desc="reading captions", unit="caption", disable=not progress, mininterval=1):
        text, reason, _ = read_caption(item.caption)
        if text is None:
            report.skipped[reason] += 1
        else:
            texts.append(text)
    if not texts:
        raise UserError(
            f"no caption of the {len(train)} images of the training split could be read: nothing to train a caption "
            "tokenizer on; give --caption-tokenizer, more captioned images or a lower --val-fraction"
        )
    print(
        f"no --caption-tokenizer given: training a text tokenizer on the {len(texts)} captions of the training split",
        file=sys.stderr,
    )
    tokenizer = CodecTokenizer.train(texts, "text", job.captions.vocab_size, show_progress=progress)
    tokenizer.save(target)
    report.items, report.total_bytes, report.vocab_size = len(texts), sum(map(len, texts)), tokenizer.vocab_size
    report.total_tokens = sum(len(ids) for ids in tokenizer.encode_batch(texts))
    report.seconds = time.perf_counter() - start
    print(report.summary(tokenizer, report.output), file=sys.stderr)
    return tokenizer, {"trained_here": True, "split": "train", **report.as_dict()}


# ---------------------------------------------------------------------- workers

_worker: dict[str, Any] = {}


class _Sample(NamedTuple):
    """One input's outcome: the result of reading it, its sample's ids (None: skipped) and, for a captioned image,
    the caption's tokens written and, when it was cut, how many it had."""

    result: Encoded
    ids: np.ndarray | None
    caption_tokens: int = 0
    cut_from: int | None = None


def _worker_config(job: _Job, tok: CodecTokenizer) -> dict[str, Any]:
    """What each worker loads (:func:`_init_worker`): tokenizer directories, the stored dtype, caption settings."""
    captions = job.captions and {
        "tokenizer": str(job.local("caption_tokenizer")),
        "offset": job.captions.offset,
        "max_tokens": job.captions.max_tokens,
    }
    return {"tokenizer": str(job.local("tokenizer")), "dtype": _dtype(job.num_ids(tok)), "captions": captions}


def _init_worker(config: dict[str, Any]) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # parallelism comes from the processes
    tok = CodecTokenizer.load(config["tokenizer"])
    captions = config["captions"] and {
        **config["captions"],
        "tokenizer": CodecTokenizer.load(config["captions"]["tokenizer"]),
    }
    _worker.update(tokenizer=tok, codec=tok.codec, dtype=config["dtype"], captions=captions)


def _process(batch: list[InputItem]) -> list[_Sample]:
    """Encode and tokenize a batch of inputs: one :class:`_Sample` per input, in order."""
    if _worker["captions"]:
        return _process_captioned(batch)
    tok, codec = _worker["tokenizer"], _worker["codec"]
    results = [encode_input(codec, source) for source in batch]
    good = [r.stream for r in results if r.stream is not None]
    ids = iter(tok.encode_batch(good, add_special_tokens=True)) if good else iter(())
    return [_Sample(r, None if r.stream is None else _array(next(ids))) for r in results]


def _array(ids: list[int]) -> np.ndarray:
    """A sample's ids in the stored dtype (``np.fromiter``: ~40% faster than ``np.asarray`` on a list of ints)."""
    return np.fromiter(ids, dtype=_worker["dtype"], count=len(ids))


def _process_captioned(batch: list[InputItem]) -> list[_Sample]:
    """:func:`_process` for captioned images: the caption first (a bad one spares encoding the image)."""
    tok, codec, captions = _worker["tokenizer"], _worker["codec"], _worker["captions"]
    results, texts = [], []
    for item in batch:
        text, reason, error = read_caption(item.caption)
        results.append(Encoded(item, None, reason, error) if text is None else encode_input(codec, item))
        texts.append(text)
    samples = [_Sample(r, None) for r in results]
    good = [i for i, r in enumerate(results) if r.stream is not None]
    if not good:
        return samples
    images = tok.encode_batch([results[i].stream for i in good])
    words = captions["tokenizer"].encode_batch([texts[i] for i in good])
    for i, image, caption in zip(good, images, words, strict=True):
        kept = captions["tokenizer"].shift(
            np.asarray(caption[: captions["max_tokens"]], dtype=np.int64), captions["offset"]
        )
        ids = [BOS_ID, MODALITIES["text"], *kept.tolist(), MODALITIES["jpeg"], *image, EOS_ID]
        cut_from = len(caption) if len(caption) > len(kept) else None
        samples[i] = _Sample(results[i], np.asarray(ids, dtype=_worker["dtype"]), len(kept), cut_from)
    return samples


def _dtype(num_ids: int) -> str:
    return "uint16" if num_ids <= 2**16 else "int32"


def _batches(job: _Job, parts: list[int]) -> Iterator[list[InputItem]]:
    for part in parts:
        items = job.part_items(part)
        for i in range(0, len(items), _BATCH):
            yield items[i : i + _BATCH]


def _results(job: _Job, parts: list[int], config: dict[str, Any], num_workers: int) -> Iterator[_Sample | None]:
    """Each input's :class:`_Sample`, in order, after one None once the workers are started: the caller takes
    that first, so the workers start and encode while it imports litdata for the writer (seconds, with torch)."""
    batches = _batches(job, parts)
    if num_workers <= 1:
        _init_worker(config)
        yield None
        for batch in batches:
            yield from _process(batch)
        return
    context = multiprocessing.get_context("spawn")  # no fork of a parent that runs threads
    with context.Pool(num_workers, initializer=_init_worker, initargs=(config,)) as pool:
        started = pool.imap(_process, batches, chunksize=1)
        yield None
        for results in started:
            yield from results


# ---------------------------------------------------------------------- parts


class _PartWriter:
    """Writes one part's samples into a temporary directory, then renames it into place."""

    def __init__(self, job: _Job, part: int) -> None:
        from litdata.streaming.item_loader import TokensLoader
        from litdata.streaming.writer import BinaryWriter

        self.job, self.part = job, part
        self.tmp, self.lock = _claim_tmp(job.work, part)
        self.writers = {
            split: BinaryWriter(str(self.tmp / split), chunk_bytes=job.chunk_bytes, item_loader=TokensLoader())
            for split in SPLITS
        }
        self.items = Counter()
        self.tokens = Counter()
        self.lengths: list[int] = []
        self.stream_bytes: list[int] = []
        self.skipped: list[dict[str, str]] = []
        self.caption_tokens: list[int] = []
        self.changed: list[dict[str, str]] = []  # written, but not as read: captions cut to max_tokens

    def add(self, sample: _Sample) -> None:
        result, ids = sample.result, sample.ids
        if ids is None:
            self.skipped.append({"source": result.item.name, "reason": result.reason, "error": result.error})
            return
        split = "val" if _is_val(result.item.key, self.job.val_fraction) else "train"
        self.writers[split].add_item(self.items[split], ids)
        self.items[split] += 1
        self.tokens[split] += len(ids)
        self.lengths.append(len(ids))
        self.stream_bytes.append(len(result.stream))
        if self.job.captions is not None:
            self.caption_tokens.append(sample.caption_tokens)
        if sample.cut_from is not None:
            detail = f"caption {result.item.caption.name}: {sample.cut_from} tokens cut to {sample.caption_tokens}"
            self.changed.append({"source": result.item.name, "reason": CAPTION_TRUNCATED, "detail": detail})

    def close(self, tokenizers: str) -> None:
        """Publish the part: its chunks under their final names (``train/chunk-PART-N.bin``), then one record
        ``.prepare/parts/part-PART.json`` with their index, counts and statistics, which marks the part done. A
        part killed before its record is redone whole by the next run, over the same chunk names."""
        chunks = {}
        for split, writer in self.writers.items():
            if not self.items[split]:
                continue
            writer.done()
            writer.merge()
            index = json.loads((self.tmp / split / "index.json").read_text())
            for chunk in index["chunks"]:
                name = f"chunk-{self.part:06d}-{chunk['filename'].rsplit('-', 1)[1]}"
                self.job.store.put_file(self.tmp / split / chunk["filename"], f"{split}/{name}")
                chunk["filename"] = name
            chunks[split] = index
        record = {
            "items": dict(self.items),
            "tokens": dict(self.tokens),
            "skipped": self.skipped,
            "changed": self.changed,
            "lengths": self.lengths,
            "stream_bytes": self.stream_bytes,
            "caption_tokens": self.caption_tokens,
            "index": chunks,
            "tokenizers": tokenizers,
        }
        _store_json(self.job.store, _part_key(self.part), record)

    def release(self) -> None:
        """Delete the temporary directory and give up its lock (after :meth:`close`, or instead of it)."""
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.lock.close()


def _claim_tmp(work: Path, part: int) -> tuple[Path, Any]:
    """This process's temporary directory for ``part`` and the open file whose lock marks it in use.

    The work area of a local output is shared by every node, and two processes may write one part at once (a
    re-run as one node while another is still going): each writes in a directory of its own (host, process and a
    random suffix) and publishes whole files. Directories of the part that this machine's killed runs left are
    removed: their lock is free (the kernel drops a lock with its process) and their process is gone.
    """
    prefix = f"tmp-part-{part:06d}-{socket.gethostname()}-"
    for old in work.glob(f"tmp-part-{part:06d}-*"):
        pid = old.name[len(prefix) :].split("-")[0]
        if old.name.startswith(prefix) and pid.isdigit() and _abandoned(old, int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    tmp = work / f"{prefix}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    lock = open(tmp / ".lock", "w")  # noqa: SIM115 - held until the part is published
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else holds it
    return tmp, lock


def _abandoned(directory: Path, pid: int) -> bool:
    """Whether no running process of this machine writes in ``directory``: nobody holds its lock (or it has none
    yet) and its process ``pid`` has ended (a live one may be between creating the lock file and locking it)."""
    try:
        with open(directory / ".lock") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except FileNotFoundError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process
        return False
    return False


def _is_val(key: str, val_fraction: float) -> bool:
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < val_fraction * 2**64


def _done_parts(job: _Job) -> set[int]:
    """Parts whose record is in the output (written by any node, this run or an earlier one)."""
    names = [key.rsplit("/", 1)[1] for key in job.store.list(f"{WORK_DIR}/parts/")]
    return {int(name[5:11]) for name in names if name.startswith("part-") and name.endswith(".json")}


def _tokenizers_id(job: _Job, tok: CodecTokenizer) -> str:
    """A digest of the tokenizers a part is written with: the merge refuses parts of another tokenizer."""
    text = tok.tokenizer.to_str() + (job.captions.tokenizer.tokenizer.to_str() if job.captions else "")
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _run_parts(job: _Job, tok: CodecTokenizer, num_workers: int, progress: bool) -> Counter:
    """Write this node's unwritten parts; returns counts of this run (processed, skipped)."""
    done = _done_parts(job)
    todo = [p for p in job.share if p not in done]
    share_items = sum(len(job.part_items(p)) for p in job.share)
    done_items = share_items - sum(len(job.part_items(p)) for p in todo)
    counts = Counter(processed=0, skipped=0)
    node = f" (node {job.node} of {job.num_nodes})" if job.num_nodes > 1 else ""
    bar = tqdm(
        total=share_items,
        initial=done_items,
        desc=f"prepare {job.modality}{node}",
        unit="item",
        disable=not progress,
        mininterval=1,
    )
    if done_items:
        print(
            f"resuming: {len(job.share) - len(todo)} of {len(job.share)} parts already written{node}", file=sys.stderr
        )
    results, tokenizers = _results(job, todo, _worker_config(job, tok), num_workers), _tokenizers_id(job, tok)
    if todo:
        next(results)  # the workers start (none when this node's share is all written)
    for part in todo:
        writer = _PartWriter(job, part)
        try:
            for _ in range(len(job.part_items(part))):
                sample = next(results)
                writer.add(sample)
                counts["processed"] += 1
                counts["skipped"] += sample.ids is None
                bar.update(1)
                bar.set_postfix(skipped=counts["skipped"], refresh=False)
            writer.close(tokenizers)
        finally:
            writer.release()  # also on an error: a re-run in this process finds the directory abandoned
    results.close()
    bar.close()
    return counts


# ---------------------------------------------------------------------- finish


def _node_record(job: _Job, counts: Counter, seconds: float) -> None:
    """``.prepare/nodes/node-N.json``: what this node's run did, for the report's ``nodes``."""
    record = {
        "node": job.node,
        "num_nodes": job.num_nodes,
        "host": socket.gethostname(),
        "items_processed_this_run": counts["processed"],
        "items_skipped_this_run": counts["skipped"],
        "wall_time_s": round(seconds, 3),
        "items_per_s": round(counts["processed"] / seconds, 2) if seconds else None,
    }
    _store_json(job.store, f"{WORK_DIR}/nodes/node-{job.node:04d}.json", record)


def _unfinished(job: _Job, counts: Counter, missing: int) -> dict[str, Any]:
    """The report of a node whose share is written while others' are not: the dataset is not complete yet."""
    print(
        f"node {job.node} of {job.num_nodes}: its share is written; {missing} of {job.num_parts} parts of other "
        f"nodes are not yet: the node that writes the last part completes {job.output}",
        file=sys.stderr,
    )
    return {
        "complete": False,
        "output": job.output,
        "node": job.node,
        "num_nodes": job.num_nodes,
        "parts_missing": missing,
        "items_processed_this_run": counts["processed"],
        "items_skipped_this_run": counts["skipped"],
    }


def _finish(job: _Job, tok: CodecTokenizer, codec: Any) -> dict[str, Any]:
    """Merge every part's record into one index per split, the report, then ``dataset.json`` (last). Runs on
    the node that finds every part written; safe to re-run after a kill, and to run on two nodes at once."""
    try:
        records = [json.loads(job.store.read_text(_part_key(p))) for p in range(job.num_parts)]
        nodes = [json.loads(job.store.read_text(k)) for k in job.store.list(f"{WORK_DIR}/nodes/")]
    except FileNotFoundError:  # another node finished the merge (and cleared the work area) meanwhile
        if (done := _already_done(job)) is not None:
            return done
        raise
    _check_tokenizers(job, tok, records)
    splits = {}
    for split in SPLITS:
        items = sum(r["items"].get(split, 0) for r in records)
        splits[split] = {"items": items, "tokens": sum(r["tokens"].get(split, 0) for r in records)}
        indexes = [r["index"][split] for r in records if split in r["index"]]
        if indexes:
            chunks = [chunk for index in indexes for chunk in index["chunks"]]
            _store_json(job.store, f"{split}/index.json", {"chunks": chunks, "config": indexes[0]["config"]})
    if not sum(v["items"] for v in splits.values()):
        raise UserError(f"none of the {len(job.items)} inputs could be written; see the reasons above")
    report = _report(job, tok, records, splits, nodes)
    _store_json(job.store, "prepare_report.json", report)
    _store_json(job.store, "codec_spec.json", tok.codec_spec)
    meta = {
        "format": FORMAT,
        "modality": job.modality,
        "num_ids": job.num_ids(tok),
        "dtype": _dtype(job.num_ids(tok)),
        "splits": splits,
        "fingerprint": job.fingerprint,
        # This writing of the dataset: readers cache a remote dataset's files per version of dataset.json, and the
        # fingerprint alone stays the same when the same inputs are prepared again after a delete.
        "version": uuid.uuid4().hex,
        **({"captions": job.captions.meta()} if job.captions else {}),
    }
    _store_json(job.store, "dataset.json", meta)  # last: the dataset is complete
    return report


def _check_tokenizers(job: _Job, tok: CodecTokenizer, records: list[dict[str, Any]]) -> None:
    """Refuse to merge parts written with a tokenizer other than the published one (two nodes that trained
    different ones at once): their records are removed, so re-running the nodes rewrites them."""
    expected = _tokenizers_id(job, tok)
    wrong = [p for p, r in enumerate(records) if r["tokenizers"] != expected]
    if wrong:
        for part in wrong:
            job.store.delete(_part_key(part))
        raise UserError(
            f"{len(wrong)} parts of {job.output} were written with another tokenizer than {job.output}/tokenizer "
            "(nodes trained their own at once); they were removed: re-run the nodes to rewrite them"
        )


def _report(job, tok, records, splits, nodes) -> dict[str, Any]:
    lengths = np.asarray([n for r in records for n in r["lengths"]], dtype=np.int64)
    stream_bytes = np.asarray([n for r in records for n in r["stream_bytes"]], dtype=np.int64)
    skipped = [s for r in records for s in r["skipped"]]
    skipped += [
        {"source": str(p), "reason": WRONG_EXTENSION, "error": WRONG_EXTENSION_ERROR} for p in job.wrong_extension
    ]
    skipped += job.rejected
    reasons = Counter(s["reason"] for s in skipped)
    processed = sum(n["items_processed_this_run"] for n in nodes)
    seconds = max((n["wall_time_s"] for n in nodes), default=0.0)
    report = {
        "modality": job.modality,
        "output": job.output,
        "items_seen": len(job.items) + len(job.wrong_extension) + len(job.rejected),
        "items_written": int(len(lengths)),
        "items_skipped": len(skipped),
        "skipped_by_reason": dict(reasons.most_common()),
        "splits": splits,
        "total_tokens": int(lengths.sum()),
        "tokens_per_item": _stats(lengths),
        "total_stream_bytes": int(stream_bytes.sum()),
        "stream_bytes_per_item": _stats(stream_bytes),
        "vocab_size": tok.vocab_size,
        "num_ids": job.num_ids(tok),
        "tokenizer": job.tokenizer_report,
        "wall_time_s": seconds,
        "items_processed_this_run": processed,
        "items_per_s": round(processed / seconds, 2) if seconds else None,
        "nodes": _node_reports(job, records, nodes),
        "skipped": skipped,
    }
    if job.captions is not None:
        report.update(_caption_report(job, records))
    return report


def _node_reports(job: _Job, records: list[dict[str, Any]], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each node's share (parts, items written and skipped), with its last run's record when it has one (a node
    whose run ended while another merged may have none)."""
    last_run = {(r["node"], r["num_nodes"]): r for r in runs}
    out = []
    for node in range(job.num_nodes):
        share = records[node :: job.num_nodes]
        out.append(
            {
                **last_run.get((node, job.num_nodes), {"node": node, "num_nodes": job.num_nodes}),
                "parts": len(share),
                "items_written": sum(sum(r["items"].values()) for r in share),
                "items_skipped": sum(len(r["skipped"]) for r in share),
            }
        )
    return out


def _caption_report(job: _Job, records: list[dict[str, Any]]) -> dict[str, Any]:
    """prepare_report.json's caption statistics and the items written with a change (captions cut short)."""
    tokens = np.asarray([n for r in records for n in r["caption_tokens"]], dtype=np.int64)
    changed = [c for r in records for c in r["changed"]]
    captions = {
        **job.captions.meta(),
        "written": int(len(tokens)),
        "total_tokens": int(tokens.sum()),
        "tokens_per_caption": _stats(tokens),
        "truncated": len(changed),
        "tokenizer": job.captions.report,
    }
    by_reason = dict(Counter(c["reason"] for c in changed).most_common())
    return {"captions": captions, "changed_by_reason": by_reason, "changed": changed}


def _stats(values: np.ndarray) -> dict[str, float]:
    if not len(values):
        return {}
    return {
        "mean": round(float(values.mean()), 2),
        "p50": float(np.percentile(values, 50)),
        "p99": float(np.percentile(values, 99)),
        "min": int(values.min()),
        "max": int(values.max()),
    }


def _store_json(store: Store, key: str, data: Any) -> None:
    """Write JSON as one whole object: readers see the old one or the new one, never half of one."""
    store.write_text(key, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------- for people


def summary(report: dict[str, Any]) -> str:
    """What `jpeglm prepare` prints at the end: what was written, what was skipped and why."""
    if report.get("complete") is False:  # one node of several, before the last one finished
        return (
            f"node {report['node']} of {report['num_nodes']}: processed {report['items_processed_this_run']} inputs "
            f"({report['items_skipped_this_run']} skipped) into {report['output']}; {report['parts_missing']} parts "
            "of other nodes to go"
        )
    t = report["tokens_per_item"]
    lines = [
        f"wrote {report['items_written']} of {report['items_seen']} inputs to {report['output']} "
        f"(train {report['splits']['train']['items']}, val {report['splits']['val']['items']})",
        f"tokens: {report['total_tokens']} ({t['mean']:.0f} per item, p50 {t['p50']:.0f}, p99 {t['p99']:.0f})",
        f"skipped: {report['items_skipped']}" + "".join(f", {k}: {v}" for k, v in report["skipped_by_reason"].items()),
        f"time: {report['wall_time_s']:.1f} s ({report['items_per_s']} items/s); details in prepare_report.json",
    ]
    if short := report.get("tokenizer", {}).get("short_vocabulary"):
        lines.insert(2, f"warning: tokenizer trained on the training split: {short}")
    if captions := report.get("captions"):
        c = captions["tokens_per_caption"]
        lines.insert(
            2,
            f"captions: {captions['written']} written, {c['mean']:.1f} tokens per caption (max {c['max']}); "
            f"{captions['truncated']} cut to {captions['max_tokens']} tokens ({CAPTION_TRUNCATED})",
        )
        if short := captions["tokenizer"].get("short_vocabulary"):
            lines.insert(3, f"warning: caption tokenizer trained on the training split: {short}")
    return "\n".join(lines)
