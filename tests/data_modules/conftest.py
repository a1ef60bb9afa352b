"""Fixtures for the data module tests: token datasets in the exact layout ``jpeglm prepare`` writes.

Most tests need many tokens and no real media, so :func:`write_token_dataset` writes shards straight with
litdata's ``BinaryWriter`` (a fraction of a second); tests of the real path use ``jpeglm.prepare.prepare``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from litdata.streaming.item_loader import TokensLoader
from litdata.streaming.writer import BinaryWriter
from PIL import Image, ImageOps

from jpeglm.codecs import JpegCodec
from jpeglm.prepare import prepare
from jpeglm.tokenizer import BOS_ID, EOS_ID, MODALITIES, CodecTokenizer


def write_token_dataset(
    path: Path,
    modality: str = "jpeg",
    num_ids: int = 328,
    items: tuple[int, int] = (64, 8),
    item_len: int = 200,
    chunk_bytes: int = 8192,
    seed: int = 0,
) -> Path:
    """A prepared-dataset directory of random samples (bos, tag, ids in [8, num_ids), eos); no tokenizer files."""
    rng = np.random.default_rng(seed)
    splits = {}
    for name, count in zip(("train", "val"), items, strict=True):
        splits[name] = {"items": count, "tokens": count * item_len}
        if not count:
            continue
        writer = BinaryWriter(str(path / name), chunk_bytes=chunk_bytes, item_loader=TokensLoader())
        for i in range(count):
            body = rng.integers(8, num_ids, item_len - 3)
            writer.add_item(i, np.concatenate([[BOS_ID, MODALITIES[modality]], body, [EOS_ID]]).astype(np.uint16))
        writer.done()
        writer.merge()
    meta = {"format": 1, "modality": modality, "num_ids": num_ids, "dtype": "uint16", "splits": splits}
    (path / "dataset.json").write_text(json.dumps({**meta, "fingerprint": f"test-{seed}"}))
    return path


@pytest.fixture
def token_dataset(tmp_path):
    """Factory: ``token_dataset(name, **kwargs)`` writes a dataset under the test's tmp_path."""

    def make(name: str = "data", **kwargs) -> Path:
        return write_token_dataset(tmp_path / name, **kwargs)

    return make


@pytest.fixture(scope="session")
def photo_dataset(tmp_path_factory, photos):
    """The fixture photos, mirrored and turned (18 images), prepared by ``jpeglm.prepare`` at 64x64."""
    root = tmp_path_factory.mktemp("photo_dataset")
    (root / "images").mkdir()
    for path in photos:
        with Image.open(path) as im:
            for name, variant in (("a", im), ("m", ImageOps.mirror(im)), ("r", im.rotate(90))):
                variant.convert("RGB").resize((96, 96)).save(root / "images" / f"{path.stem}-{name}.png")
    codec = JpegCodec(size=64)
    streams = [codec.encode(p) for p in sorted((root / "images").iterdir())]
    CodecTokenizer.train(streams, "jpeg", 300, codec_spec=codec.spec).save(root / "tokenizer")
    prepare("jpeg", [root / "images"], root / "data", tokenizer=root / "tokenizer", val_fraction=0.2, num_workers=1)
    return root / "data"
