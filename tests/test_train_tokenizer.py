import json
import shutil
import subprocess
import sys
import typing

import pytest

from jpeglm.cli import main
from jpeglm.tokenizer import DEFAULT_VOCAB_SIZE, MODALITIES, CodecTokenizer
from jpeglm.train_tokenizer import ModalityName, train_tokenizer


@pytest.fixture
def photo_dir(photos, tmp_path):
    directory = tmp_path / "photos"
    (directory / "nested").mkdir(parents=True)
    for i, path in enumerate(photos):
        shutil.copy(path, directory / ("nested" if i % 2 else "") / path.name)
    (directory / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (directory / "empty.png").write_bytes(b"")
    (directory / "readme.md").write_text("not an input")
    return directory


def test_tokenizer_train_command(photo_dir, photos, tmp_path, capsys):
    out = tmp_path / "tok"
    code = main(
        [
            "tokenizer",
            "train",
            "--modality",
            "jpeg",
            "--input",
            str(photo_dir),
            "--vocab-size",
            "300",
            "--output",
            str(out),
            "--num-workers",
            "2",
            "--no-progress",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert f"streams read: {len(photos)}, skipped: 3" in printed  # one word, "skipped", for every input not used
    assert "wrong_extension: 1" in printed  # readme.md
    assert "ignored" not in printed
    assert "corrupt: 1" in printed
    assert "empty: 1" in printed
    assert "broken.jpg" in printed
    assert "empty.png" in printed
    assert "mean tokens per item" in printed
    tokenizer = CodecTokenizer.load(out)
    assert tokenizer.modality == "jpeg"
    assert tokenizer.vocab_size == 300
    assert json.loads((out / "codec_spec.json").read_text())["codec"] == "jpeg"


def test_inputs_from_globs_and_list_files(photo_dir, photos, tmp_path, capsys):
    listing = tmp_path / "inputs.lst"
    listing.write_text(f"# two photos\n{photos[0]}\n{photos[1].name}\n")
    shutil.copy(photos[1], tmp_path / photos[1].name)  # relative entries are read from the list's directory
    code = main(
        [
            "tokenizer",
            "train",
            "--modality",
            "jpeg",
            "--input",
            str(listing),
            str(photo_dir / "nested" / "*.jpg"),
            "--output",
            str(tmp_path / "tok"),
            "--num-workers",
            "1",
            "--no-progress",
        ]
    )
    assert code == 0
    assert f"streams read: {2 + len(photos) // 2}, skipped: 0" in capsys.readouterr().out


def test_text_modality_reads_txt_and_jsonl(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("plain text file " * 50)
    lines = [json.dumps({"text": f"line {i} of the corpus"}) for i in range(30)] + ["{broken json"]
    (tmp_path / "b.jsonl").write_text("\n".join(lines) + "\n")
    code = main(
        [
            "tokenizer",
            "train",
            "--modality",
            "text",
            "--input",
            str(tmp_path),
            "--vocab-size",
            "280",
            "--output",
            str(tmp_path / "tok"),
            "--no-progress",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "streams read: 31, skipped: 1" in printed
    assert "b.jsonl:31" in printed
    tokenizer = CodecTokenizer.load(tmp_path / "tok")
    assert tokenizer.codec_spec is None
    assert tokenizer.decode(tokenizer.encode(b"line 7")) == b"line 7"


@pytest.mark.parametrize(
    ("inputs", "message"),
    [(["/no/such/dir"], "input not found"), (["/no/such/*.jpg"], "no file matches"), ([], "no jpeg inputs")],
)
def test_input_mistakes_are_one_clear_line(tmp_path, capsys, inputs, message):
    (tmp_path / "empty").mkdir()
    inputs = inputs or [str(tmp_path / "empty")]
    code = main(["tokenizer", "train", "--modality", "jpeg", "--input", *inputs, "--output", str(tmp_path / "t")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("jpeglm tokenizer train: error:")
    assert message in err
    assert "Traceback" not in err


def test_nothing_readable_is_an_error(tmp_path, capsys):
    (tmp_path / "bad.jpg").write_bytes(b"garbage")
    code = main(
        [
            "tokenizer",
            "train",
            "--modality",
            "jpeg",
            "--input",
            str(tmp_path),
            "--output",
            str(tmp_path / "t"),
            "--no-progress",
        ]
    )
    assert code == 2
    assert "none of the 1 inputs could be read" in capsys.readouterr().err


def test_console_script_help():
    result = subprocess.run(
        [sys.executable, "-m", "jpeglm.cli", "tokenizer", "train", "--help"], capture_output=True, text=True, check=True
    )
    for option in ("--modality", "--inputs", "--vocab_size", "--output", "--max_items", "--num_workers", "--codec"):
        assert option in result.stdout
    assert "--val-fraction" in result.stdout  # how options may also be spelt


def test_the_help_names_each_modality_and_its_default_vocabulary():
    assert set(typing.get_args(ModalityName)) == set(MODALITIES)
    doc = " ".join(train_tokenizer.__doc__.split())
    assert ", ".join(f"{n} for {m}" for m, n in DEFAULT_VOCAB_SIZE.items()) in doc


@pytest.mark.parametrize(
    ("options", "message"),
    [(["sise=64"], "unexpected keyword argument 'sise'"), (["size=63"], "size must be a positive multiple of 16")],
)
def test_codec_options_the_codec_refuses_are_one_line(photo_dir, tmp_path, capsys, options, message):
    args = ["tokenizer", "train", "--modality", "jpeg", "--input", str(photo_dir), "--output", str(tmp_path / "t")]
    assert main([*args, *(f"--codec={o}" for o in options)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jpeglm tokenizer train: error: codec options")
    assert message in err
    assert "Traceback" not in err


def test_avc_modality_encodes_videos_first(tmp_path, capsys):
    from media import PHOTOS, pan_frames, write_video

    for i, photo in enumerate(PHOTOS[:2]):
        write_video(tmp_path / f"clip{i}.mp4", pan_frames(photo, 20, (160, 120)))
    write_video(tmp_path / "tone.m4a", None, audio_seconds=0.5)  # audio-only: skipped, counted
    code = main(
        [
            "tokenizer",
            "train",
            "--modality",
            "avc",
            "--input",
            str(tmp_path),
            "--vocab-size",
            "400",
            "--output",
            str(tmp_path / "tok"),
            "--num-workers",
            "1",
            "--no-progress",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "streams read: 2, skipped: 1\n  wrong_extension: 1" in printed  # .m4a is not a video
    tokenizer = CodecTokenizer.load(tmp_path / "tok")
    assert tokenizer.modality == "avc"
    assert tokenizer.codec.frames_per_clip == 15
