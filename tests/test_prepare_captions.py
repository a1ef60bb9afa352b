"""`jpeglm prepare --captions`: (image, caption) pairs from tar shards, folders with sidecars and jsonl manifests,
written as ``bos, 5, caption ids, 3, JPEG ids, eos`` in one id space (caption BPE ids shifted past the JPEG ones)."""

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import jpeglm.prepare
from jpeglm.cli import main
from jpeglm.codecs import JpegCodec
from jpeglm.inputs import InputError
from jpeglm.prepare import _is_val, prepare
from jpeglm.shards import SPLITS, read_dataset
from jpeglm.tokenizer import BOS_ID, EOS_ID, MODALITIES, NUM_SPECIAL, CodecTokenizer

WORDS = ("bridge", "dragonfly", "peaks", "seeding", "sunset", "wine", "river", "stone", "light", "shadow")


def crops(photos, count: int, size: int = 64) -> list[Image.Image]:
    """``count`` different small crops of the fixture photos (mirrored every other one)."""
    images = []
    for i in range(count):
        im = Image.open(photos[i % len(photos)]).convert("RGB")
        shift = (i // len(photos)) * 9
        crop = im.crop((shift, shift, shift + 240, shift + 240)).resize((size, size))
        images.append(crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if i % 2 else crop)
    return images


def caption_of(i: int) -> str:
    return f"a photo of the {WORDS[i % len(WORDS)]} number {i}"


def image_bytes(im: Image.Image, format: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=format)
    return buf.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def read_pairs(out: Path) -> dict[str, list[tuple[str, bytes]]]:
    """Every sample of each split as (caption, JPEG stream), checking the sample layout and the id space."""
    dataset = read_dataset(out)
    jpeg, text = dataset.tokenizer, dataset.caption_tokenizer
    offset = dataset.captions["offset"]
    assert dataset.captions == {
        "modality": "text",
        "offset": jpeg.num_ids - 8,
        "num_ids": text.num_ids,
        "max_tokens": dataset.captions["max_tokens"],
    }
    assert dataset.num_ids == jpeg.num_ids + text.num_ids - NUM_SPECIAL
    assert dataset.dtype == "uint16"
    pairs = {}
    for split in SPLITS:
        pairs[split] = []
        for sample in dataset.samples(split):
            ids = sample.astype(np.int64)
            assert (ids[0], ids[1], ids[-1]) == (BOS_ID, MODALITIES["text"], EOS_ID)
            tag = int(np.flatnonzero(ids == MODALITIES["jpeg"])[0])
            caption, image = ids[2:tag], ids[tag + 1 : -1]
            assert len(caption)
            assert ((caption >= jpeg.num_ids) & (caption < dataset.num_ids)).all()
            assert len(image)
            assert ((image >= NUM_SPECIAL) & (image < jpeg.num_ids)).all()
            stream = jpeg.decode(image)
            Image.open(io.BytesIO(dataset.codec.to_jpeg(stream))).load()  # a whole JPEG that Pillow opens
            pairs[split].append((text.decode(caption - offset).decode("utf-8"), stream))
    return pairs


def written(out: Path) -> dict[str, bytes]:
    """caption -> JPEG stream over both splits (captions are unique in these tests)."""
    return {caption: stream for pairs in read_pairs(out).values() for caption, stream in pairs}


@pytest.fixture(scope="module")
def codec() -> JpegCodec:
    return JpegCodec()


@pytest.fixture(scope="module")
def jpeg_tokenizer_dir(photos, codec, tmp_path_factory) -> Path:
    streams = [codec.encode(im) for im in crops(photos, 6)]
    return CodecTokenizer.train(streams, "jpeg", 300, codec_spec=codec.spec).save(tmp_path_factory.mktemp("jpegtok"))


@pytest.fixture(scope="module")
def caption_tokenizer_dir(tmp_path_factory) -> Path:
    texts = [caption_of(i).encode() for i in range(40)] * 3
    return CodecTokenizer.train(texts, "text", 300).save(tmp_path_factory.mktemp("texttok"))


@pytest.fixture(scope="module")
def folder(photos, tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """Images with sidecars: .png + .txt, and .jpg + .json (its caption field) in a subdirectory."""
    root = tmp_path_factory.mktemp("folder")
    (root / "sub").mkdir()
    images = {}
    for i, im in enumerate(crops(photos, 10)):
        name = f"img_{i:02d}" if i < 6 else f"sub/img_{i:02d}"
        if i < 6:
            im.save(root / f"{name}.png")
            (root / f"{name}.txt").write_text(f"  {caption_of(i)}\n")  # surrounding whitespace is stripped
        else:
            im.save(root / f"{name}.jpg", quality=92)
            (root / f"{name}.json").write_text(json.dumps({"caption": caption_of(i), "url": "http://x"}))
        images[caption_of(i)] = next(root.glob(f"{name}.*g"))
    return root, images


@pytest.fixture(scope="module")
def prepared_folder(folder, jpeg_tokenizer_dir, tmp_path_factory) -> tuple[Path, dict]:
    root, _ = folder
    out = tmp_path_factory.mktemp("prepared") / "data"
    report = prepare(
        "jpeg",
        [root],
        out,
        jpeg_tokenizer_dir,
        val_fraction=0.3,
        num_workers=2,
        part_size=4,
        captions=True,
        caption_vocab_size=280,
        progress=False,
    )
    return out, report


def test_folder_sidecars_make_the_captioned_layout(prepared_folder, folder, codec):
    out, report = prepared_folder
    _, images = folder
    assert written(out) == {caption: codec.encode(im) for caption, im in images.items()}
    assert report["items_written"] == 10
    assert report["skipped_by_reason"] == {}
    assert report["changed_by_reason"] == {}
    captions = report["captions"]
    assert (captions["written"], captions["truncated"], captions["max_tokens"]) == (10, 0, 64)
    assert captions["tokenizer"]["trained_here"] is True
    assert captions["tokenizer"]["vocab_size"] == read_dataset(out).caption_tokenizer.vocab_size <= 280
    assert captions["total_tokens"] == round(captions["tokens_per_caption"]["mean"] * 10)
    assert (out / "caption_tokenizer" / "tokenizer.json").is_file()
    assert json.loads((out / "dataset.json").read_text())["captions"]["offset"] == captions["offset"]


def test_the_split_hashes_each_image_key_and_is_stable(prepared_folder, folder, jpeg_tokenizer_dir, tmp_path):
    out, _ = prepared_folder
    root, _ = folder
    pairs = read_pairs(out)
    for split in SPLITS:
        for caption, _ in pairs[split]:
            i = int(caption.rsplit(" ", 1)[1])
            key = f"img_{i:02d}.png" if i < 6 else f"sub/img_{i:02d}.jpg"
            assert _is_val(key, 0.3) == (split == "val")
    assert pairs["val"]
    assert pairs["train"]
    moved = tmp_path / "moved"
    os.rename(root, moved)
    try:
        prepare(
            "jpeg",
            [moved],
            tmp_path / "again",
            jpeg_tokenizer_dir,
            val_fraction=0.3,
            num_workers=1,
            part_size=3,
            seed=7,
            captions=True,
            caption_vocab_size=280,
            progress=False,
        )
    finally:
        os.rename(moved, root)
    again = read_pairs(tmp_path / "again")
    assert {s: sorted(p) for s, p in again.items()} == {s: sorted(p) for s, p in pairs.items()}


def test_a_caption_tokenizer_trained_here_sees_the_training_split_only(photos, jpeg_tokenizer_dir, tmp_path):
    names = (f"pic_{i:03d}.png" for i in range(1000))
    val = [n for n in names if _is_val(n, 0.5)][:3]
    train = [f"pic_{i:03d}.png" for i in range(1000) if not _is_val(f"pic_{i:03d}.png", 0.5)][:4]
    (tmp_path / "in").mkdir()
    for name, im in zip(train + val, crops(photos, 7, size=32), strict=True):
        im.save(tmp_path / "in" / name)
        text = "qxqx zvzv qxqxqx zvzvzv" if name in val else "the cat sat on the mat and the dog sat on the log"
        (tmp_path / "in" / name).with_suffix(".txt").write_text(text)
    report = prepare(
        "jpeg",
        [tmp_path / "in"],
        tmp_path / "out",
        jpeg_tokenizer_dir,
        val_fraction=0.5,
        num_workers=1,
        captions=True,
        progress=False,
    )
    assert report["captions"]["tokenizer"]["trained_on_items"] == 4
    vocabulary = read_dataset(tmp_path / "out").caption_tokenizer.tokenizer.get_vocab()
    assert "the" in vocabulary or " the" in vocabulary
    assert not [token for token in vocabulary if "qx" in token or "zv" in token]
    assert sorted(c for c, _ in read_pairs(tmp_path / "out")["val"]) == ["qxqx zvzv qxqxqx zvzvzv"] * 3


def test_tar_shards_pair_members_by_key(photos, codec, jpeg_tokenizer_dir, caption_tokenizer_dir, tmp_path):
    ims = crops(photos, 6)
    files = [
        image_bytes(im, format) for im, format in zip(ims, ["JPEG", "PNG", "WEBP", "JPEG", "PNG", "JPEG"], strict=True)
    ]
    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard, "w") as tar:
        add_member(tar, "000.jpg", files[0])
        add_member(tar, "000.txt", caption_of(0).encode())
        add_member(tar, "000.json", json.dumps({"caption": "not this one: .txt comes first"}).encode())
        add_member(tar, "001.png", files[1])
        add_member(tar, "001.json", json.dumps({"caption": caption_of(1), "status": "success"}).encode())
        add_member(tar, "dir/002.webp", files[2])
        add_member(tar, "dir/002.txt", f"\n{caption_of(2)}  ".encode())
        add_member(tar, "003.jpeg", files[3])  # no caption
        add_member(tar, "004.txt", caption_of(4).encode())  # no image
        add_member(tar, "005.jpg", files[5])
        add_member(tar, "005.json", json.dumps({"status": "failed_to_resize"}).encode())  # no caption field
        add_member(tar, "005.cls", b"3")
    report = prepare(
        "jpeg",
        [shard],
        tmp_path / "out",
        jpeg_tokenizer_dir,
        val_fraction=0.0,
        num_workers=1,
        captions=True,
        caption_tokenizer=caption_tokenizer_dir,
        progress=False,
    )
    assert written(tmp_path / "out") == {caption_of(i): codec.encode(files[i]) for i in range(3)}
    assert report["skipped_by_reason"] == {"no_caption": 2, "no_image": 1, "wrong_extension": 1}
    by_source = {s["source"].rsplit("/", 1)[1]: s["reason"] for s in report["skipped"]}
    assert by_source == {
        "003.jpeg": "no_caption",
        "004.txt": "no_image",
        "005.jpg": "no_caption",
        "005.cls": "wrong_extension",
    }
    assert report["items_seen"] == 3 + 4


def test_jsonl_manifest(photos, codec, jpeg_tokenizer_dir, caption_tokenizer_dir, tmp_path):
    ims = crops(photos, 3)
    (tmp_path / "data" / "images").mkdir(parents=True)
    paths = []
    for i, im in enumerate(ims):
        im.save(tmp_path / "data" / "images" / f"{i}.png")
        paths.append(f"images/{i}.png")
    elsewhere = tmp_path / "elsewhere.png"
    crops(photos, 4)[3].save(elsewhere)
    lines = [
        {"image": paths[0], "caption": caption_of(0)},
        {"image": paths[1], "caption": f" {caption_of(1)} "},
        {"image": paths[1], "caption": caption_of(11)},  # another caption of the same image
        {"image": str(elsewhere), "caption": caption_of(3)},  # absolute
        {"image": paths[2]},  # no caption
        {"image": "images/missing.png", "caption": "gone"},  # no image
        {"caption": "no image field"},
        {"image": paths[2], "caption": ""},
    ]
    manifest = tmp_path / "data" / "captions.jsonl"
    manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n\nnot json\n")
    report = prepare(
        "jpeg",
        [manifest],
        tmp_path / "out",
        jpeg_tokenizer_dir,
        val_fraction=0.5,
        num_workers=1,
        captions=True,
        caption_tokenizer=caption_tokenizer_dir,
        progress=False,
    )
    expected = {caption_of(0): ims[0], caption_of(1): ims[1], caption_of(11): ims[1], caption_of(3): elsewhere}
    assert written(tmp_path / "out") == {c: codec.encode(im) for c, im in expected.items()}
    assert report["skipped_by_reason"] == {"corrupt": 2, "no_caption": 1, "no_image": 1, "empty_caption": 1}
    sources = sorted((s["reason"], s["source"]) for s in report["skipped"])
    at = f"{manifest}:"
    empty = str(tmp_path / "data" / paths[2])
    assert sources == [
        ("corrupt", f"{at}10"),
        ("corrupt", f"{at}7"),
        ("empty_caption", empty),
        ("no_caption", f"{at}5"),
        ("no_image", f"{at}6"),
    ]
    assert f"caption {at}8 is empty" in next(s["error"] for s in report["skipped"] if s["reason"] == "empty_caption")
    pairs = read_pairs(tmp_path / "out")
    split_of = {c: s for s in SPLITS for c, _ in pairs[s]}
    assert split_of[caption_of(1)] == split_of[caption_of(11)]  # one image, one split: keyed by the image path


@pytest.fixture(scope="module")
def bad_folder(photos, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """Good pairs and one pair of every bad kind; name -> the reason each bad one is counted under."""
    root = tmp_path_factory.mktemp("bad")
    for i, im in enumerate(crops(photos, 5)):
        im.save(root / f"good_{i}.png")
        (root / f"good_{i}.txt").write_text(caption_of(i))
    im = crops(photos, 1)[0]
    im.save(root / "lonely.png")
    (root / "orphan.txt").write_text("a caption whose image is gone")
    im.save(root / "blank.png")
    (root / "blank.txt").write_text("  \n\t ")
    (root / "dangling.jpg").symlink_to(root / "does-not-exist.jpg")
    (root / "dangling.txt").write_text("the image of this caption cannot be read")
    (root / "corrupt.jpg").write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    (root / "corrupt.txt").write_text("random bytes")
    im.save(root / "nofield.png")
    (root / "nofield.json").write_text(json.dumps({"url": "http://example.com/a.png"}))
    im.save(root / "binary.png")
    (root / "binary.txt").write_bytes(b"\xff\xfe\x00 not utf-8")
    im.save(root / "long.png")
    (root / "long.txt").write_text(" ".join(caption_of(i) for i in range(30)))
    (root / "notes.md").write_text("wrong extension")
    reasons = {
        "lonely.png": "no_caption",
        "orphan.txt": "no_image",
        "blank.png": "empty_caption",
        "dangling.jpg": "unreadable",
        "corrupt.jpg": "corrupt",
        "nofield.png": "no_caption",
        "binary.png": "not_utf8",
        "notes.md": "wrong_extension",
    }
    return root, reasons


def test_every_bad_pair_is_counted_by_reason_and_the_rest_written(
    bad_folder, jpeg_tokenizer_dir, caption_tokenizer_dir, tmp_path
):
    root, reasons = bad_folder
    report = prepare(
        "jpeg",
        [root],
        tmp_path / "out",
        jpeg_tokenizer_dir,
        val_fraction=0.0,
        num_workers=1,
        captions=True,
        caption_tokenizer=caption_tokenizer_dir,
        max_caption_tokens=20,
        progress=False,
    )
    by_name = {Path(s["source"]).name: s["reason"] for s in report["skipped"]}
    assert by_name == reasons
    assert report["skipped_by_reason"] == {
        "no_caption": 2,
        "no_image": 1,
        "empty_caption": 1,
        "unreadable": 1,
        "corrupt": 1,
        "not_utf8": 1,
        "wrong_extension": 1,
    }
    assert report["items_written"] == 6  # the 5 good pairs and the long caption, cut
    assert report["items_seen"] == 6 + 8
    (cut,) = set(written(tmp_path / "out")) - {caption_of(i) for i in range(5)}
    long_ids = CodecTokenizer.load(caption_tokenizer_dir).encode((root / "long.txt").read_text().encode())
    assert len(long_ids) > 20
    dataset = read_dataset(tmp_path / "out")
    (sample,) = [s.astype(np.int64) for s in dataset.samples("train") if len(s) and s[22] == MODALITIES["jpeg"]]
    assert (sample[2:22] - dataset.captions["offset"]).tolist() == long_ids[:20]  # the first 20 tokens, shifted
    assert (root / "long.txt").read_text().startswith(cut)
    assert report["changed_by_reason"] == {"caption_truncated": 1}
    (change,) = report["changed"]
    assert (Path(change["source"]).name, change["reason"]) == ("long.png", "caption_truncated")
    stats = report["captions"]["tokens_per_caption"]
    assert (report["captions"]["truncated"], stats["max"]) == (1, 20)
    assert report == json.loads((tmp_path / "out" / "prepare_report.json").read_text())


def test_a_given_caption_tokenizer_is_used_and_copied_and_a_rerun_does_nothing(
    folder, jpeg_tokenizer_dir, caption_tokenizer_dir, tmp_path, capsys
):
    root, images = folder
    args = dict(val_fraction=0.3, num_workers=1, captions=True, caption_tokenizer=caption_tokenizer_dir, progress=False)
    report = prepare("jpeg", [root], tmp_path / "out", jpeg_tokenizer_dir, **args)
    copied = tmp_path / "out" / "caption_tokenizer" / "tokenizer.json"
    assert copied.read_text() == (caption_tokenizer_dir / "tokenizer.json").read_text()
    assert report["captions"]["tokenizer"] == {"trained_here": False, "vocab_size": 300}
    assert report["captions"]["num_ids"] == 308
    assert set(written(tmp_path / "out")) == set(images)
    before = {s: [x.tobytes() for x in read_dataset(tmp_path / "out").samples(s)] for s in SPLITS}
    capsys.readouterr()
    assert prepare("jpeg", [root], tmp_path / "out", jpeg_tokenizer_dir, **args) == report
    assert "already prepared" in capsys.readouterr().err
    assert {s: [x.tobytes() for x in read_dataset(tmp_path / "out").samples(s)] for s in SPLITS} == before
    with pytest.raises(InputError, match="already holds a different prepared dataset"):
        prepare("jpeg", [root], tmp_path / "out", jpeg_tokenizer_dir, **{**args, "max_caption_tokens": 8})


def test_a_killed_job_resumes(folder, jpeg_tokenizer_dir, tmp_path, monkeypatch):
    root, _ = folder
    args = dict(val_fraction=0.3, num_workers=1, part_size=3, captions=True, caption_vocab_size=280, progress=False)
    close, closed = jpeglm.prepare._PartWriter.close, []

    def close_twice_then_die(self, *args):
        if len(closed) == 2:
            raise KeyboardInterrupt
        closed.append(self.part)
        close(self, *args)

    monkeypatch.setattr(jpeglm.prepare._PartWriter, "close", close_twice_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare("jpeg", [root], tmp_path / "killed", jpeg_tokenizer_dir, **args)
    monkeypatch.setattr(jpeglm.prepare._PartWriter, "close", close)
    assert (tmp_path / "killed" / ".prepare" / "caption_tokenizer.done").is_file()
    report = prepare("jpeg", [root], tmp_path / "killed", jpeg_tokenizer_dir, **args)
    assert report["items_processed_this_run"] == 10 - 6
    prepare("jpeg", [root], tmp_path / "clean", jpeg_tokenizer_dir, **args)
    assert read_pairs(tmp_path / "killed") == read_pairs(tmp_path / "clean")
    assert report["captions"]["written"] == 10


def test_cli_captions(folder, jpeg_tokenizer_dir, tmp_path, capsys):
    root, _ = folder
    common = ["prepare", "--modality", "jpeg", "--input", str(root), "--num-workers", "1", "--no-progress"]
    code = main(
        [
            *common,
            "--captions",
            "--output",
            str(tmp_path / "out"),
            "--tokenizer",
            str(jpeg_tokenizer_dir),
            "--caption-vocab-size",
            "270",
            "--max-caption-tokens",
            "32",
        ]
    )
    assert code == 0
    captured = capsys.readouterr()
    assert "no --caption-tokenizer given: training a text tokenizer on the" in captured.err
    assert "captions: 10 written" in captured.out
    dataset = read_dataset(tmp_path / "out")
    assert dataset.captions["max_tokens"] == 32
    assert dataset.caption_tokenizer.vocab_size <= 270

    assert (
        main(["prepare", "--modality", "text", "--captions", "--input", str(root), "--output", str(tmp_path / "o2")])
        == 2
    )
    assert "--captions pairs images with their captions: it needs --modality jpeg" in capsys.readouterr().err
    assert main([*common, "--output", str(tmp_path / "o3"), "--caption-tokenizer", str(jpeg_tokenizer_dir)]) == 2
    assert "--caption-tokenizer applies only to captioned images (--captions)" in capsys.readouterr().err
    assert (
        main([*common, "--captions", "--output", str(tmp_path / "o4"), "--caption-tokenizer", str(jpeg_tokenizer_dir)])
        == 2
    )
    assert "captions need a text tokenizer" in capsys.readouterr().err


def test_no_pairs_at_all_is_a_clear_error(photos, tmp_path):
    crops(photos, 1)[0].save(tmp_path / "alone.png")
    (tmp_path / "words.txt").write_text("no image")
    with pytest.raises(InputError, match=r"no images with captions in .* \(no_caption: 1, no_image: 1\)"):
        prepare("jpeg", [tmp_path], tmp_path / "out", captions=True, progress=False)


def test_datasets_without_captions_still_read(tmp_path):
    (tmp_path / "dataset.json").write_text(
        json.dumps({"format": 1, "modality": "jpeg", "num_ids": 328, "dtype": "uint16", "splits": {}})
    )
    dataset = read_dataset(tmp_path)
    assert dataset.captions is None
    assert dataset.caption_tokenizer is None
