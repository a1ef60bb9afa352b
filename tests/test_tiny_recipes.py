"""The video, image+text and caption quick starts (recipes/avc_tiny.yaml, jpeg_text_tiny.yaml,
jpeg_caption_tiny.yaml), shortened.

Each runs ``jpeglm fit`` on the recipe as shipped from a fresh directory with an empty cache (data, tokenizer,
shards and training), with fewer steps and items and a smaller gallery, as tests/test_quickstart.py does for the
image quick start. The full recipes' wall times and curves are in the README ("Video and mixed quick starts").
"""

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).parent.parent
JPEGLM = str(Path(sys.executable).parent / "jpeglm")
GALLERY = {"num_prompts": 1, "num_unconditional": 1}  # one completion and one sample: the same code, less sampling


def shortened(recipe: str, directory: Path, gallery: dict) -> Path:
    """The recipe with the gallery's settings replaced (a list of callbacks cannot be changed from the command line)."""
    config = yaml.safe_load((ROOT / "recipes" / recipe).read_text())
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("SampleGallery"):
            callback["init_args"].update(gallery)
    path = directory / recipe
    path.write_text(yaml.safe_dump(config))
    return path


def fit(tmp_path: Path, recipe: str, gallery: dict, *overrides: str) -> EventAccumulator:
    """Run ``jpeglm fit`` on the shortened recipe in ``tmp_path``; the run's TensorBoard events."""
    config = shortened(recipe, tmp_path, gallery)
    env = {**os.environ, "JPEGLM_CACHE": str(tmp_path / "cache")}
    command = [JPEGLM, "fit", "--config", str(config), *overrides]
    run = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "validation at step 0 |" in run.stdout
    events = next((tmp_path / "runs").rglob("events.out.tfevents*")).parent
    return EventAccumulator(str(events), size_guidance={"images": 0}).Reload()


def values(events: EventAccumulator, tag: str) -> list[float]:
    return [e.value for e in events.Scalars(tag)]


@pytest.mark.slow
def test_the_video_quick_start_learns_and_draws_clips(tmp_path):
    events = fit(
        tmp_path, "avc_tiny.yaml", {**GALLERY, "max_new_tokens": 200},
        "--trainer.max_steps=30", "--trainer.val_check_interval=15", "--trainer.limit_val_batches=1",
        "--data.init_args.num_images=256", "--model.warmup_steps=5",  # 256: 13 clips, 2 batches for validation
    )  # fmt: skip
    val = values(events, "val/bits_per_byte")
    assert len(val) == 3
    assert val[-1] < 0.9 * val[0]  # the full recipe: -25% or more (README)
    tags = events.Tags()["images"]
    assert {"samples/avc/ratio_0.50", "samples/avc/unconditional"} <= set(tags)
    clip = 3 * (6 * 64 + 5 * 4) + 2 * 3  # 6 frames of 64x48 with 4-px gaps, shown at 3x in a 3-px frame
    picture = events.Images("samples/avc/ratio_0.50")[-1]  # prompt | completion | original
    assert (picture.width, picture.height) == (3 * clip + 2 * 16, 3 * 48 + 2 * 3)
    assert (tmp_path / "runs" / "avc_tiny" / "checkpoints" / "last.ckpt").is_file()


def sentences(count: int, seed: int = 0) -> list[str]:
    """Made-up English sentences: a small text corpus with the repetition BPE and a tiny model can learn."""
    rng = random.Random(seed)
    subjects = ["the cat", "a small dog", "my neighbour", "the old man", "our teacher", "a red bird", "the river"]
    verbs = ["sees", "follows", "paints", "finds", "remembers", "likes", "carries"]
    objects = ["a blue box", "the green door", "seven apples", "the morning train", "a quiet song", "the long road"]
    places = ["in the garden", "near the station", "after the rain", "under the bridge", "every Sunday", "at night"]
    return [
        f"{rng.choice(subjects).capitalize()} {rng.choice(verbs)} {rng.choice(objects)} {rng.choice(places)}."
        for _ in range(count)
    ]


def write_texts(directory: Path, files: int = 4, lines: int = 400) -> Path:
    """``files`` .jsonl files of ``lines`` items, each item two or three sentences."""
    directory.mkdir(parents=True)
    rng = random.Random(1)
    for f in range(files):
        items = [" ".join(sentences(rng.randint(2, 3), seed=f * lines + i)) for i in range(lines)]
        (directory / f"part-{f}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in items))
    return directory


@pytest.mark.slow
def test_the_image_and_text_quick_start_logs_each_modality(tmp_path):
    texts = write_texts(tmp_path / "texts")  # 190 KB; a fifth for validation: more than a batch of blocks
    events = fit(
        tmp_path, "jpeg_text_tiny.yaml", GALLERY,
        f"--data.init_args.text_dir={texts}", "--trainer.max_steps=40", "--trainer.val_check_interval=20",
        "--trainer.limit_val_batches=8", "--data.init_args.num_images=256", "--data.init_args.val_fraction=0.2",
        "--model.warmup_steps=5",
    )  # fmt: skip
    scalars = set(events.Tags()["scalars"])
    for modality in ("jpeg", "text"):
        for name in (f"val/loss_{modality}", f"val/bits_per_byte_{modality}", f"train/bits_per_byte_{modality}"):
            assert name in scalars, name
        bpb = values(events, f"val/bits_per_byte_{modality}")
        assert len(bpb) == 3
        assert all(math.isfinite(v) for v in bpb), bpb
        assert bpb[-1] < 0.9 * bpb[0], (modality, bpb)  # both modalities learn
    assert "samples/jpeg/ratio_0.50" in events.Tags()["images"]  # the JPEG member's gallery; text draws nothing


@pytest.mark.slow
def test_the_caption_quick_start_draws_held_out_captions(tmp_path):
    gallery = {**GALLERY, "num_captions": 2, "cfg_scales": [1.0, 3.0], "max_new_tokens": 300}
    events = fit(
        tmp_path, "jpeg_caption_tiny.yaml", gallery,
        "--trainer.max_steps=30", "--trainer.val_check_interval=15", "--trainer.limit_val_batches=2",
        "--data.init_args.num_images=256", "--model.warmup_steps=5",
    )  # fmt: skip
    bpb = values(events, "val/bits_per_byte")
    assert len(bpb) == 3
    assert bpb[-1] < 0.9 * bpb[0]
    assert "val/loss_caption" in events.Tags()["scalars"]
    captions = events.Images("samples/jpeg/captions")[-1]  # 2 rows: caption | scale 1 | scale 3, at 2x
    assert (captions.width, captions.height) == ((2 * 160 + 6) + 2 * 134 + 2 * 16, 2 * 134 + 16)
    assert values(events, "samples/complete")[-1] == 1.0  # every caption drawn whole, under the grammar
