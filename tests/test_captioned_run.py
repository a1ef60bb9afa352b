"""Captions end to end on a tiny captioned run: the gallery's caption rows, `jpeglm generate --prompt-text`,
`jpeglm evaluate-captions` and `jpeglm export --format hf`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_run import fit, fit_checkpoint

from jpeglm.callbacks import SampleGallery
from jpeglm.caption_eval import agreement
from jpeglm.cli import main
from jpeglm.codecs import JpegCodec
from jpeglm.data_modules.synthetic import (
    COLOUR_NAMES,
    caption_colours,
    caption_pattern,
    palette,
    procedural_caption,
    procedural_image,
)
from jpeglm.export import export
from jpeglm.generation.sampling import kv_cache_bytes
from jpeglm.tokenizer import CodecTokenizer


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("captioned")
    gallery = SampleGallery(
        every_n_steps=3, num_prompts=0, ratios=(), num_unconditional=1, num_captions=2, cfg_scales=(1.0, 3.0),
        max_new_tokens=200,
    )  # fmt: skip
    trainer, model, path = fit_checkpoint(tmp, steps=3, captions=True)  # the test draws the gallery, after training
    return trainer, model, gallery, path


def test_the_gallery_draws_held_out_captions_at_each_scale(run):
    trainer, model, gallery, _ = run
    batches, set_kv_cache = [], model.model.set_kv_cache

    def spy(batch_size, *args, **kwargs):
        batches.append(batch_size)
        return set_kv_cache(batch_size, *args, **kwargs)

    model.model.set_kv_cache = spy
    try:
        pictures = gallery.draw(trainer, model, end=True)  # after training: scalars straight to the loggers
    finally:
        del model.model.set_kv_cache
    assert max(batches) == 4  # 2 captions and their uncaptioned twins: what the memory arithmetic says
    config = model.model.config
    assert gallery.kv_cache_bytes(config, torch.float32, captioned=True) == kv_cache_bytes(
        config, 4, 512, torch.float32
    )
    sheet = pictures["samples/jpeg/captions"]  # 2 rows: caption | scale 1 | scale 3, 64 px shown at 2x
    assert sheet.shape == (2 * 134 + 16, (2 * 160 + 6) + 2 * 134 + 2 * 16, 3)
    assert "samples/jpeg/unconditional" in pictures
    assert gallery.last_scalars["samples/complete"] == 1.0  # 2 captions x 2 scales + 1, all whole under the grammar


def test_generate_draws_captions_with_guidance(run, tmp_path):
    _, model, _, path = run
    (tmp_path / "captions.txt").write_text("a red circle at the top on a plain teal background\n\nsomething blue\n")
    argv = ["generate", "--checkpoint", str(path), "--output", str(tmp_path / "out"), "--prompt-text",
            "a red circle on a plain white background", "--prompt-file", str(tmp_path / "captions.txt"),
            "--cfg-scale", "3.0", "--num-samples", "2", "--max-new-tokens", "200", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    records = json.loads((tmp_path / "out" / "samples.json").read_text())["samples"]
    assert [r["caption"] for r in records] == [
        "a red circle on a plain white background"] * 2 + ["a red circle at the top on a plain teal background"] * 2 + [
        "something blue"] * 2  # fmt: skip
    assert [r["seed"] for r in records] == [0, 1, 2, 3, 4, 5]
    assert {r["cfg_scale"] for r in records} == {3.0}
    assert all(r["complete"] for r in records)
    with Image.open(tmp_path / "out" / "contact_sheet.png") as sheet:
        assert sheet.size == ((2 * 160 + 6) + 134 + 16, 6 * 134 + 5 * 16)  # caption | picture, 6 rows


def test_captions_for_a_model_trained_without_them_are_a_clear_error(tmp_path, capsys):
    trainer, _ = fit(tmp_path, [], steps=1)
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    argv = ["generate", "--checkpoint", str(tmp_path / "plain.ckpt"), "--output", str(tmp_path / "out"),
            "--prompt-text", "a red circle", "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    assert "trained without captions" in capsys.readouterr().err


def test_evaluate_captions_writes_the_agreement_table(run, tmp_path, capsys):
    _, _, _, path = run
    argv = ["evaluate-captions", "--checkpoint", str(path), "--output", str(tmp_path / "eval"), "--num-captions",
            "4", "--cfg-scales", "1,3", "--batch-size", "4"]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert [r["cfg_scale"] for r in results["rows"]] == [1.0, 3.0]
    for row in results["rows"]:
        assert 0 <= row["background"] <= 1
        assert row["complete"] == 1.0
        assert row["tokens_per_s"] > 0
    assert "cfg scale | background" in capsys.readouterr().out
    assert (tmp_path / "eval" / "captions_cfg_3.png").is_file()


def test_agreement_reads_the_colours_of_pictures_that_match_their_captions(tmp_path):
    """The measure itself: the built-in pictures agree with their own captions, and far less with others'."""
    codec = JpegCodec(size=64)
    pictures, captions = [], []
    for index in range(24):
        path = tmp_path / f"{index}.png"
        procedural_image(5, index, 64).save(path)
        pictures.append(codec.preview(codec.decode(codec.encode(path))))
        captions.append(procedural_caption(5, index, 64))
    scores = agreement(pictures, captions)
    assert scores["background"] == 1.0
    assert scores["background_by_pattern"] == {"plain": 1.0, "gradient": 1.0, "striped": 1.0}
    painted = []  # the caption's colour where it asks for a plain background, another colour elsewhere
    for caption in captions:
        background = caption_colours(caption)[0]
        other = next(name for name in COLOUR_NAMES if name not in background)
        colour = background[0] if caption_pattern(caption) == "plain" else other
        painted.append(np.broadcast_to(palette()[COLOUR_NAMES.index(colour)], (64, 64, 3)).copy())
    assert agreement(painted, captions)["background_by_pattern"] == {"plain": 1.0, "gradient": 0.0, "striped": 0.0}
    assert scores["shape"] > 0.9
    assert scores["background_shuffled"] < 0.4
    assert scores["background_palette"] < 0.2
    grey = [np.full((64, 64, 3), 128, np.uint8)] * 24
    assert agreement(grey, captions)["background"] < 0.3  # a picture that ignores its caption does not agree


def test_hf_export_carries_the_caption_tokenizer_and_the_logits(run, tmp_path):
    transformers = pytest.importorskip("transformers")
    _, model, _, path = run
    out = export(path, tmp_path / "hf", "hf")
    sources = json.loads((out / "jpeglm_sources.json").read_text())
    assert [(s["modality"], s.get("captions")) for s in sources] == [("jpeg", {"index": 1, "max_tokens": 64}),
                                                                     ("text", None)]  # fmt: skip
    text = CodecTokenizer.load(out / sources[1]["tokenizer_dir"])
    assert text.tokenizer.to_str() == model.vocabulary[1]["tokenizer"]
    assert sources[1]["offset"] == model.vocabulary[1]["offset"] > 0
    hf = transformers.LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max() < 1e-4
