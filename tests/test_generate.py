"""`jpeglm generate` (generate_samples) and `jpeglm evaluate` (evaluate) on a checkpoint of a tiny run."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from tiny_run import fit_checkpoint

from jpeglm import evaluate as evaluate_module
from jpeglm import fid as fid_module
from jpeglm import generate as generate_module
from jpeglm.codecs import JpegCodec
from jpeglm.errors import UserError
from jpeglm.evaluate import evaluate
from jpeglm.generate import generate_samples
from jpeglm.tokenizer import CodecTokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return fit_checkpoint(tmp_path_factory.mktemp("ckpt"), steps=3)[2]


def test_generate_writes_files_that_open(checkpoint, photos, tmp_path):
    out = tmp_path / "samples"
    records = generate_samples(
        str(checkpoint),
        str(out),
        prompt_images=[str(photos[0].parent)],
        ratio=0.5,
        num_samples=3,
        max_new_tokens=60,
        batch_size=2,
        constrain=False,
        progress=False,
    )
    written = json.loads((out / "samples.json").read_text())
    assert written == {"checkpoint": str(checkpoint), "samples": records, "skipped": []}
    assert len(records) == 3
    assert {"file", "prompt", "new_tokens", "complete", "fraction", "seed", "top_k", "top_p"} <= records[0].keys()
    assert [r["seed"] for r in records] == [0, 1, 2]  # seed + index: what reproduces each sample
    assert [r["prompt"] for r in records] == [str(p) for p in photos[:3]]
    for r in records:
        with Image.open(out / r["file"]) as im:
            im.load()
            assert im.size == (64, 64)
        assert 0 < r["new_tokens"] <= 60
        assert r["ratio"] == 0.5
    with Image.open(out / "contact_sheet.png") as sheet:
        assert sheet.size == (3 * 134 + 2 * 16, 3 * 134 + 2 * 16)  # 64 px shown at 2x in a 3-px frame, 16-px gaps
    share = np.mean([r["complete"] for r in records])
    line = f"wrote 3 samples to {out} ({share:.0%} complete streams); see samples.json"
    assert generate_module.summary(records) == line

    assert {r["precision"] for r in records} == {"fp32"}  # on CPU by default

    records = generate_samples(
        str(checkpoint),
        str(tmp_path / "uncond"),
        unconditional=True,
        num_samples=2,
        precision="bf16",
        progress=False,
    )
    assert [r["complete"] for r in records] == [True, True]  # under the JPEG grammar (the default): whole images
    assert len(list((tmp_path / "uncond").glob("sample_*.jpg"))) == 2
    assert [(r["prompt"], r["ratio"], r["seed"], r["precision"]) for r in records] == [
        (None, None, 0, "bf16"),
        (None, None, 1, "bf16"),
    ]
    with Image.open(tmp_path / "uncond" / "contact_sheet.png") as sheet:
        assert sheet.size == (134, 2 * 134 + 16)  # one panel a row


def test_generate_skips_prompts_too_long_for_the_context(checkpoint, photos, tmp_path, monkeypatch, capsys):
    """One prompt longer than the context is named and skipped (counted in samples.json); the others are made."""
    from jpeglm.checkpoints import load_model

    codec = JpegCodec(size=64)
    lengths = []

    def shortened(path, device, precision=None):
        model, modalities = load_model(path, device, precision)
        [jpeg] = modalities
        lengths.extend(len(jpeg.tokenizer.encode(codec.prompt(codec.encode(p), 0.5))) + 2 for p in photos[:3])
        model.model.config.block_size = sorted(lengths)[1] + 1  # room for the two shorter prompts only
        return model, modalities

    monkeypatch.setattr(generate_module, "load_model", shortened)
    out = tmp_path / "short"
    records = generate_samples(
        str(checkpoint),
        str(out),
        prompt_images=[str(p) for p in photos[:3]],
        num_samples=3,
        max_new_tokens=5,
        constrain=False,
        progress=False,
    )
    longest = lengths.index(max(lengths))
    written = json.loads((out / "samples.json").read_text())
    assert [r["prompt"] for r in written["skipped"]] == [str(photos[longest])]
    assert f"is {max(lengths)} tokens" in written["skipped"][0]["reason"]
    assert f"skipped {photos[longest]}: prompt {longest} is {max(lengths)} tokens" in capsys.readouterr().out
    assert [r["prompt"] for r in records] == [str(p) for i, p in enumerate(photos[:3]) if i != longest]
    assert [r["seed"] for r in records] == [i for i in range(3) if i != longest]


def test_generate_refuses_mistakes(checkpoint, photos, tmp_path):
    mistakes = {
        "give prompt images to complete": {},
        "--unconditional samples from nothing": {"prompt_images": [str(photos[0])], "unconditional": True},
        "without prompt images or captions": {"prompt_text": ["a red circle"], "unconditional": True},
        "is not a file": {"prompt_file": str(tmp_path / "missing.txt")},
    }
    for message, kwargs in mistakes.items():
        with pytest.raises(UserError, match=message):  # before the checkpoint is read
            generate_samples("/no/such.ckpt", str(tmp_path / "o"), **kwargs)
    other = CodecTokenizer.train([p.read_bytes() for p in photos], "jpeg", 280)
    other.codec_spec = JpegCodec(size=64).spec
    other.save(tmp_path / "tok")
    with pytest.raises(UserError, match=r"^tokenizer .* is not the jpeg tokenizer this model was trained with"):
        generate_samples(str(checkpoint), str(tmp_path / "o"), unconditional=True, tokenizer=str(tmp_path / "tok"))
    with pytest.raises(UserError, match="cannot cut prompt 0 at ratio 1.5"):
        generate_samples(str(checkpoint), str(tmp_path / "o"), prompt_images=[str(photos[0])], ratio=1.5)
    assert not (tmp_path / "o").exists()


def test_evaluate_writes_the_table(checkpoint, photos, tmp_path, monkeypatch):
    out = tmp_path / "eval"
    batches = []
    update = fid_module._update

    def counted(metric, pictures, real):
        batches.append(len(pictures))
        return update(metric, pictures, real)

    monkeypatch.setattr(fid_module, "_update", counted)
    rows = evaluate(
        str(checkpoint),
        [str(photos[0].parent)],
        str(out),
        ratios=[0.5],
        seeds=2,
        top_k=[40],
        top_p=[0.9, 1.0],
        feature_extractor="small",
        batch_size=3,
        feature_batch_size=2,
        progress=False,
    )
    assert max(batches) == 2  # the features see at most feature_batch_size pictures at once
    assert sum(batches) == len(photos) * (1 + 4 * 2)  # the originals once, then each of 4 settings x 2 seeds
    written = json.loads((out / "results.json").read_text())
    assert written["rows"] == [vars(r) for r in rows]
    assert written["precision"] == "fp32"
    assert [(r["ratio"], r["top_k"], r["top_p"]) for r in written["rows"]] == [
        (0.5, 40, 0.9),
        (0.5, 40, 1.0),
        (None, 40, 0.9),
        (None, 40, 1.0),
    ]
    for r in rows:
        assert np.isfinite(r.fid_mean)
        assert r.fid_std >= 0
        assert r.seeds == 2
        assert r.images == len(photos)
        assert 0 <= r.complete_share <= 1
        assert r.tokens_per_s > 0
    assert [r.kept for r in rows] == [0.5, 0.5, None, None]
    assert written["codec"] == JpegCodec(size=64).spec
    assert written["temperature"] == 1.0
    assert written["constrain"] is True  # sampled under the JPEG grammar (the default), recorded
    definition = written["fid_definition"]  # jpeglm.fid's one definition, with the protocol's reals
    assert (definition["reals"], definition["num_reals"], definition["feature_extractor"]) == (
        "reference",
        len(photos),
        "small",
    )
    assert written["paper"] == "imagenet"  # the default: the paper's ImageNet FIDs beside ours
    assert [r.paper_fid for r in rows] == [123.09, 123.09, 121.35, 121.35]
    assert all(r.complete_share == 1.0 for r in rows)  # every completion a whole image
    table = (out / "results.md").read_text()
    assert "| 0.5 | 50% | 40 | 0.9 |" in table
    assert "| unconditional | - | 40 | 1 |" in table
    assert "Codec: size 64, quality 25, subsampling 4:2:0, restart_interval 1" in table
    assert "| FID | paper FID |" in table
    assert "| 123.09 |" in table
    assert f"Reals ({len(photos)}): the images as the codec crops and resizes them, before JPEG compression" in table
    text = evaluate_module.summary(rows)
    assert "| 0.5 | 50% | 40 | 0.9 |" in text
    assert text.endswith("4 settings; see results.md and results.json")


def test_evaluate_merges_ratios_that_cut_the_same_and_explains_those_that_cannot(checkpoint, photos, tmp_path, capsys):
    common = {"seeds": 1, "top_k": [40], "top_p": [1.0], "unconditional": False, "feature_extractor": "small"}
    rows = evaluate(
        str(checkpoint),
        [str(photos[0].parent)],
        str(tmp_path / "e"),
        ratios=[0.5, 0.75],
        temperature=0.7,
        num_images=3,
        max_new_tokens=8,
        constrain=False,
        progress=False,
        **common,
    )
    assert [(r.ratio, r.kept) for r in rows] == [(0.5, 0.5)]  # 0.75 keeps the same half of a 64-pixel image
    assert "ratio 0.75 keeps the same 0.5 of each image as ratio 0.5; evaluated once" in capsys.readouterr().out
    written = json.loads((tmp_path / "e" / "results.json").read_text())
    assert (written["temperature"], written["constrain"]) == (0.7, False)  # the paper's unconstrained protocol
    assert "unconstrained sampling (the paper's)" in (tmp_path / "e" / "results.md").read_text()
    with pytest.raises(UserError, match=r"--ratios 0.25: .* 16 restart intervals, so 2 FFD7 marker\(s\)"):
        evaluate(str(checkpoint), [str(photos[0].parent)], str(tmp_path / "f"), ratios=[0.25], **common)


def test_evaluate_refuses_missing_inception_weights_before_any_work(tmp_path):
    with pytest.raises(UserError, match="never downloads"):
        evaluate("/no/such.ckpt", ["/no/images"], str(tmp_path / "e"), inception_weights="/no/weights.pth")


def test_the_commands_need_no_callbacks():
    code = (
        "import sys, jpeglm.generate, jpeglm.evaluate; "
        "print(sorted(m for m in sys.modules if m.startswith('jpeglm.callbacks')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
