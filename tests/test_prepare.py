import io
import json
import os
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jpeglm.cli import main
from jpeglm.codecs import JpegCodec
from jpeglm.inputs import InputError
from jpeglm.prepare import prepare
from jpeglm.shards import read_dataset
from jpeglm.tokenizer import BOS_ID, EOS_ID, MODALITIES


def small_photos(photos, count: int, size: int = 96) -> list[Image.Image]:
    """``count`` different photo crops (mirrors and offsets of the fixture photos), small so they encode fast."""
    images = []
    for i in range(count):
        im = Image.open(photos[i % len(photos)]).convert("RGB")
        shift = (i // len(photos)) * 7
        crop = im.crop((shift, shift, shift + 250, shift + 250)).resize((size, size))
        images.append(crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if i % 2 else crop)
    return images


def write_images(directory: Path, images: list[Image.Image]) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, im in enumerate(images):
        path = directory / f"img_{i:04d}.png"
        im.save(path)
        paths.append(path)
    return paths


def png_header_only(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))


def all_samples(path) -> dict[str, list[bytes]]:
    dataset = read_dataset(path)
    return {split: [s.tobytes() for s in dataset.samples(split)] for split in ("train", "val")}


@pytest.fixture(scope="module")
def bad_corpus(photos, tmp_path_factory) -> tuple[Path, list[Path]]:
    """Good images plus one input of every bad kind, each kind named so the test can check its reason."""
    root = tmp_path_factory.mktemp("corpus")
    good = write_images(root / "good", small_photos(photos, 12))
    bad = root / "bad"
    bad.mkdir()
    (bad / "corrupt.jpg").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    (bad / "truncated.jpg").write_bytes(photos[0].read_bytes()[:2500])
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "notes.md").write_text("wrong extension")
    (bad / "bomb.png").write_bytes(png_header_only(12_000, 12_000))
    (bad / "dangling.jpg").symlink_to(root / "does-not-exist.jpg")  # unreadable
    return root, good


@pytest.fixture(scope="module")
def tokenizer_dir(bad_corpus, tmp_path_factory) -> Path:
    root, good = bad_corpus
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    assert (
        main(
            [
                "tokenizer",
                "train",
                "--modality",
                "jpeg",
                "--input",
                str(root / "good"),
                "--vocab-size",
                "300",
                "--output",
                str(out),
                "--num-workers",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    return out


@pytest.fixture(scope="module")
def prepared(bad_corpus, tokenizer_dir, tmp_path_factory) -> tuple[Path, dict]:
    root, _ = bad_corpus
    out = tmp_path_factory.mktemp("prepared") / "data"
    report = prepare("jpeg", [root], out, tokenizer_dir, val_fraction=0.25, num_workers=2, part_size=5, progress=False)
    return out, report


def test_bad_inputs_are_skipped_and_counted_by_reason(prepared, bad_corpus):
    out, report = prepared
    assert report["items_seen"] == 18
    assert report["items_written"] == 12
    assert report["skipped_by_reason"] == {
        "corrupt": 1,
        "truncated": 1,
        "empty": 1,
        "wrong_extension": 1,
        "too_large": 1,
        "unreadable": 1,
    }
    by_name = {Path(s["source"]).name: s["reason"] for s in report["skipped"]}
    assert by_name == {
        "corrupt.jpg": "corrupt",
        "truncated.jpg": "truncated",
        "empty.jpg": "empty",
        "notes.md": "wrong_extension",
        "bomb.png": "too_large",
        "dangling.jpg": "unreadable",
    }
    assert report == json.loads((out / "prepare_report.json").read_text())


def test_every_good_input_is_written_byte_exact(prepared, bad_corpus):
    out, report = prepared
    _, good = bad_corpus
    dataset = read_dataset(out)
    tok, codec = dataset.tokenizer, dataset.codec
    written = Counter()
    for split in ("train", "val"):
        for sample in dataset.samples(split):
            assert sample[0] == BOS_ID
            assert sample[1] == MODALITIES["jpeg"]
            assert sample[-1] == EOS_ID
            written[tok.decode(sample)] += 1
    assert written == Counter(codec.encode(p) for p in good)  # every good image once: no duplicate, no gap
    assert dataset.splits["train"]["items"] + dataset.splits["val"]["items"] == 12
    assert dataset.splits["val"]["items"] > 0
    assert sum(len(s) for s in dataset.samples("train")) == dataset.splits["train"]["tokens"]


def test_output_describes_itself(prepared, tokenizer_dir):
    out, report = prepared
    dataset = read_dataset(out)
    assert (dataset.modality, dataset.num_ids, dataset.dtype) == ("jpeg", 308, "uint16")
    assert json.loads((out / "codec_spec.json").read_text()) == JpegCodec().spec
    assert (out / "tokenizer" / "tokenizer.json").read_text() == (tokenizer_dir / "tokenizer.json").read_text()
    assert not (out / ".prepare").exists()
    t = report["tokens_per_item"]
    assert t["min"] <= t["p50"] <= t["p99"] <= t["max"]
    assert report["total_tokens"] == sum(v["tokens"] for v in report["splits"].values())


def test_litdata_streams_the_shards(prepared):
    from litdata import StreamingDataset, TokensLoader

    out, _ = prepared
    dataset = StreamingDataset(str(out / "train"), item_loader=TokensLoader(block_size=257), shuffle=False)
    streamed = np.concatenate([np.asarray(dataset[i]) for i in range(len(dataset))])
    # TokensLoader cuts each chunk into whole blocks; the tail of a chunk shorter than a block is not read.
    everything = np.concatenate(list(read_dataset(out).samples("train")))
    chunks = json.loads((out / "train" / "index.json").read_text())["chunks"]
    bounds = np.cumsum([0] + [c["dim"] for c in chunks])
    expected = np.concatenate(
        [everything[a : a + (b - a) // 257 * 257] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    )
    assert len(chunks) > 1
    assert bounds[-1] == len(everything)
    assert np.array_equal(streamed, expected)


def test_split_is_deterministic_and_location_independent(prepared, bad_corpus, tokenizer_dir, tmp_path):
    out, _ = prepared
    root, _ = bad_corpus
    moved = tmp_path / "elsewhere"
    os.rename(root, moved)
    try:
        again = prepare(
            "jpeg",
            [moved],
            tmp_path / "again",
            tokenizer_dir,
            val_fraction=0.25,
            num_workers=1,
            part_size=7,
            seed=5,
            progress=False,
        )
    finally:
        os.rename(moved, root)
    assert again["splits"] == read_dataset(out).splits
    first, second = all_samples(out), all_samples(tmp_path / "again")
    assert sorted(first["val"]) == sorted(second["val"])  # same items, written in another order
    assert sorted(first["train"]) == sorted(second["train"])


def test_rerun_of_a_finished_job_does_nothing(prepared, bad_corpus, tokenizer_dir, capsys):
    out, report = prepared
    root, _ = bad_corpus
    before = all_samples(out)
    again = prepare("jpeg", [root], out, tokenizer_dir, val_fraction=0.25, num_workers=2, part_size=5, progress=False)
    assert again == report
    assert "already prepared" in capsys.readouterr().err
    assert all_samples(out) == before


def test_clear_errors(prepared, bad_corpus, tokenizer_dir, tmp_path):
    out, _ = prepared
    root, _ = bad_corpus
    with pytest.raises(InputError, match="already holds a different prepared dataset"):
        prepare("jpeg", [root / "good"], out, tokenizer_dir, progress=False)
    with pytest.raises(InputError, match="input not found"):
        prepare("jpeg", [tmp_path / "missing"], tmp_path / "o1", tokenizer_dir, progress=False)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(InputError, match="no jpeg inputs"):
        prepare("jpeg", [tmp_path / "nothing"], tmp_path / "o2", tokenizer_dir, progress=False)
    with pytest.raises(ValueError, match="is for 'jpeg', not 'avc'"):
        prepare("avc", [root / "good"], tmp_path / "o3", tokenizer_dir, progress=False)
    (tmp_path / "o4").mkdir()
    (tmp_path / "o4" / "mine.txt").write_text("do not overwrite")
    with pytest.raises(InputError, match="holds other files"):
        prepare("jpeg", [root / "good"], tmp_path / "o4", tokenizer_dir, progress=False)


def test_tokenizer_whose_codec_differs_is_refused(bad_corpus, tokenizer_dir, tmp_path, capsys):
    root, _ = bad_corpus
    tampered = tmp_path / "tok"
    tampered.mkdir()
    for f in tokenizer_dir.iterdir():
        (tampered / f.name).write_bytes(f.read_bytes())
    spec = json.loads((tampered / "codec_spec.json").read_text())
    spec.update(tables_sha256="0" * 64, libjpeg="9e")
    (tampered / "codec_spec.json").write_text(json.dumps(spec))
    code = main(
        [
            "prepare",
            "--modality",
            "jpeg",
            "--input",
            str(root / "good"),
            "--tokenizer",
            str(tampered),
            "--output",
            str(tmp_path / "out"),
            "--no-progress",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "tables differ" in err
    assert "libjpeg 9e" in err
    assert "Traceback" not in err


def test_nothing_written_is_an_error(tmp_path, tokenizer_dir, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(b"not an image")
    code = main(
        [
            "prepare",
            "--modality",
            "jpeg",
            "--input",
            str(tmp_path / "in"),
            "--tokenizer",
            str(tokenizer_dir),
            "--output",
            str(tmp_path / "out"),
            "--no-progress",
        ]
    )
    assert code == 2
    assert "none of the 1 inputs could be written" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not a complete prepared dataset"):
        read_dataset(tmp_path / "out")


def test_without_a_tokenizer_one_is_trained_first(photos, tmp_path, capsys):
    write_images(tmp_path / "in", small_photos(photos, 6))
    code = main(
        [
            "prepare",
            "--modality",
            "jpeg",
            "--input",
            str(tmp_path / "in"),
            "--output",
            str(tmp_path / "out"),
            "--num-workers",
            "1",
            "--no-progress",
        ]
    )
    assert code == 0
    captured = capsys.readouterr()
    assert "no --tokenizer given: training a jpeg tokenizer" in captured.err
    assert "wrote 6 of 6 inputs" in captured.out
    assert read_dataset(tmp_path / "out").tokenizer.vocab_size == 320


def test_tar_shards_and_text(photos, tmp_path):
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for i, im in enumerate(small_photos(photos, 4)):
            for name, data in ((f"{i:03d}.jpg", _jpeg_bytes(im)), (f"{i:03d}.json", b'{"label": 1}')):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    report = prepare("jpeg", [shard], tmp_path / "img", val_fraction=0.0, num_workers=1, progress=False)
    assert report["items_written"] == 4
    assert report["skipped_by_reason"] == {"wrong_extension": 4}  # the .json sidecars

    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("a whole document " * 40)
    lines = [json.dumps({"text": f"document {i} ünïcode"}) for i in range(20)] + ['{"no_text": 1}', "", "[1, 2"]
    (tmp_path / "text" / "b.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "text" / "c.txt").write_bytes(b"\xff\xfe binary, not utf-8")
    report = prepare("text", [tmp_path / "text"], tmp_path / "txt", val_fraction=0.0, num_workers=1, progress=False)
    assert report["items_written"] == 21
    assert report["skipped_by_reason"] == {"corrupt": 2, "not_utf8": 1}
    dataset = read_dataset(tmp_path / "txt")
    texts = {dataset.tokenizer.decode(s).decode() for s in dataset.samples("train")}
    assert "document 7 ünïcode" in texts
    assert dataset.codec is None


def _jpeg_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.slow
def test_kill_9_then_rerun_gives_no_duplicates_and_no_gaps(photos, tokenizer_dir, tmp_path):
    inputs = tmp_path / "in"
    write_images(inputs, small_photos(photos, 150, size=64))
    args = [
        "--modality",
        "jpeg",
        "--input",
        str(inputs),
        "--tokenizer",
        str(tokenizer_dir),
        "--val-fraction",
        "0.2",
        "--num-workers",
        "1",
        "--part-size",
        "8",
        "--no-progress",
    ]
    command = [sys.executable, "-m", "jpeglm.cli", "prepare", *args]
    killed = tmp_path / "killed"
    process = subprocess.Popen([*command, "--output", str(killed)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    parts = killed / ".prepare" / "parts"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(parts.glob("part-*"))) < 4:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    written_before_kill = len(list(parts.glob("part-*")))
    assert 4 <= written_before_kill < 19, "the kill must land in the middle of the job"
    with pytest.raises(ValueError, match="unfinished"):
        read_dataset(killed)  # a half-written output is never taken for a dataset
    subprocess.run([*command, "--output", str(killed)], check=True, capture_output=True)

    clean = tmp_path / "clean"
    subprocess.run([*command, "--output", str(clean)], check=True, capture_output=True)
    assert all_samples(killed) == all_samples(clean)  # same samples in the same order: nothing lost or doubled
    assert read_dataset(killed).splits["train"]["items"] + read_dataset(killed).splits["val"]["items"] == 150


def test_codec_options_make_small_images(photos, tmp_path, capsys):
    write_images(tmp_path / "in", small_photos(photos, 4))
    code = main(
        [
            "prepare",
            "--modality",
            "jpeg",
            "--input",
            str(tmp_path / "in"),
            "--output",
            str(tmp_path / "out"),
            "--codec",
            "size=64",
            "--codec",
            "quality=30",
            "--num-workers",
            "1",
            "--no-progress",
        ]
    )
    assert code == 0
    dataset = read_dataset(tmp_path / "out")
    codec = dataset.codec
    assert (codec.size, codec.quality) == (64, 30)
    sample = next(dataset.samples("train"))
    decoded = codec.decode(dataset.tokenizer.decode(sample))
    assert decoded.complete
    assert decoded.image.size == (64, 64)
    assert len(sample) < 1000  # a 64x64 image is a few hundred tokens


def _names_in_split(split: str, count: int, val_fraction: float) -> list[str]:
    """``count`` file names whose key falls in ``split`` (the split is a hash of the key)."""
    from jpeglm.prepare import _is_val

    names = (f"doc_{i:03d}.txt" for i in range(10_000))
    return [n for n in names if _is_val(n, val_fraction) == (split == "val")][:count]


def _split_corpus(root: Path) -> tuple[list[str], list[str]]:
    """Text files: English in the training split, "qxqx zvzv" (letters English never pairs) in the validation one."""
    root.mkdir()
    train, val = _names_in_split("train", 6, 0.5), _names_in_split("val", 4, 0.5)
    for i, name in enumerate(train):
        (root / name).write_text(f"the cat number {i} sat on the mat and the dog sat on the log. " * 20)
    for name in val:
        (root / name).write_text("qxqx zvzv qxqxqx zvzvzv " * 40)
    return train, val


def test_a_tokenizer_trained_here_sees_the_training_split_only(tmp_path, capsys):
    train, val = _split_corpus(tmp_path / "in")
    report = prepare("text", [tmp_path / "in"], tmp_path / "out", val_fraction=0.5, num_workers=1, progress=False)
    assert report["splits"]["train"]["items"] == len(train)
    assert report["splits"]["val"]["items"] == len(val)
    assert report["tokenizer"]["trained_here"] is True
    assert report["tokenizer"]["trained_on_items"] == len(train)  # not len(train) + len(val)
    vocabulary = read_dataset(tmp_path / "out").tokenizer.tokenizer.get_vocab()
    assert "the" in vocabulary
    assert not [token for token in vocabulary if "qx" in token or "zv" in token]  # merges only val items could make
    assert f"training a text tokenizer on a sample of the {len(train)} inputs of the training split" in (
        capsys.readouterr().err
    )


def test_prepare_vocab_size_and_a_vocabulary_smaller_than_asked(tmp_path, capsys):
    train, _ = _split_corpus(tmp_path / "in")
    common = ["prepare", "--modality", "text", "--input", str(tmp_path / "in"), "--val-fraction", "0.5"]
    assert main([*common, "--output", str(tmp_path / "a"), "--vocab-size", "270", "--no-progress"]) == 0
    assert read_dataset(tmp_path / "a").tokenizer.vocab_size == 270
    report = json.loads((tmp_path / "a" / "prepare_report.json").read_text())
    assert (report["vocab_size"], report["tokenizer"]["vocab_size_asked"]) == (270, 270)
    assert report["tokenizer"]["short_vocabulary"] is None
    assert "warning" not in capsys.readouterr().err

    assert main([*common, "--output", str(tmp_path / "b"), "--no-progress"]) == 0  # the text default: 32000
    captured = capsys.readouterr()
    report = json.loads((tmp_path / "b" / "prepare_report.json").read_text())
    learned = read_dataset(tmp_path / "b").tokenizer.vocab_size
    assert 270 < learned < 32000
    assert (report["tokenizer"]["vocab_size_asked"], report["tokenizer"]["vocab_size"]) == (32000, learned)
    short = report["tokenizer"]["short_vocabulary"]
    assert short.startswith(f"asked for 32000 BPE symbols, learned {learned} from {len(train)} streams")
    assert "occurs at least twice" in short  # why
    assert f"warning: {short}" in captured.err  # when the tokenizer is trained
    assert f"warning: tokenizer trained on the training split: {short}" in captured.out  # and in the summary

    code = main(
        [
            *common,
            "--output",
            str(tmp_path / "c"),
            "--vocab-size",
            "300",
            "--tokenizer",
            str(tmp_path / "a" / "tokenizer"),
        ]
    )
    assert code == 2
    assert "--vocab-size applies only when no --tokenizer is given" in capsys.readouterr().err


def test_files_of_other_types_are_skipped_with_one_word_and_one_reason(photos, tmp_path, capsys):
    write_images(tmp_path / "in", small_photos(photos, 4))
    (tmp_path / "in" / "logo.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
    code = main(
        ["prepare", "--modality", "jpeg", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")]
        + ["--vocab-size", "270", "--val-fraction", "0", "--num-workers", "1", "--no-progress"]
    )
    assert code == 0
    captured = capsys.readouterr()
    report = json.loads((tmp_path / "out" / "prepare_report.json").read_text())
    assert report["skipped_by_reason"] == {"wrong_extension": 1}
    assert report["tokenizer"]["skipped_by_reason"] == {"wrong_extension": 1}  # the tokenizer step: same word
    assert [Path(s["source"]).name for s in report["skipped"]] == ["logo.svg"]
    assert "streams read: 4, skipped: 1\n  wrong_extension: 1" in captured.err  # the tokenizer step
    assert "skipped: 1, wrong_extension: 1" in captured.out  # the shard step
    assert "ignored" not in captured.err + captured.out


def test_prepare_workers_start_without_torch():
    """A spawned prepare worker imports jpeglm.prepare (and codecs, tokenizers) only: torch would add seconds to
    every worker's start (jpeglm/codecs/grammar.py imports it where masks are made)."""
    code = "import sys, jpeglm.prepare; print(sorted(m for m in ('torch', 'litdata', 'lightning') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout
