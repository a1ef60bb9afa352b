"""benchmarks/bench_gpu.py --smoke: the GPU benchmark's code paths at tiny shapes on the CPU, in a subprocess.

One run (module fixture) of ``bench_gpu.py --smoke --json``; the tests read its table and JSON. On the CPU the
float8 rows are skipped (no float8 GPU) and the GPU-only figures (MFU, peak memory) are n/a; everything else runs.
The 7B arithmetic is checked against a parameter count written out here independently.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_gpu.py"
GIB = 2**30

# recipes/jpeg_7b.yaml: Llama-2-7b (32 layers, d 4096, SwiGLU 11008, MHA), vocabulary 328 padded to 384 rows,
# 16 nodes x 8 GPUs, 2 sequences of 12,288 tokens per GPU.
LAYERS, D, FFN, PADDED_VOCAB, GPUS, BATCH, SEQ = 32, 4096, 11008, 384, 128, 2, 12288
BLOCK = 4 * D * D + 3 * D * FFN + 2 * D  # q, k, v, o; gate, up, down; two RMSNorm weights
PARAMETERS = LAYERS * BLOCK + 2 * PADDED_VOCAB * D + D  # + embedding, head (untied), final norm


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[str, dict]:
    """The printed output and the JSON of one ``--smoke`` run."""
    out = tmp_path_factory.mktemp("bench_gpu") / "bench.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    return done.stdout, json.loads(out.read_text())


def rows_named(report: dict, section: str, start: str) -> list[dict]:
    return [r for r in report["rows"] if r["section"] == section and r["name"].startswith(start)]


def one(report: dict, section: str, start: str) -> dict:
    (row,) = rows_named(report, section, start)
    return row


EXPECTED = [
    ("train", "Trainer + CodecLM, bf16"),
    ("train", "bare FSDP2 loop, bf16"),
    ("train", "Trainer/bare step time, bf16"),
    ("train", "Trainer + bare loop, float8"),
    ("sample", "jpeglm generate"),
    ("sample", "HF generate"),
    ("sample", "jpeglm/HF tokens per second"),
    ("7B plan", "parameters"),
    ("7B plan", "fp32 weights+grads+AdamW / GPU"),
    ("7B plan", "gathered bf16 blocks"),
    ("7B plan", "activations, checkpointed"),
    ("7B plan", "memory / GPU"),
    ("7B plan", "step time"),
    ("7B plan", "tokens/s/GPU"),
]


@pytest.mark.slow
def test_the_table_has_every_row_and_only_float8_is_skipped(smoke):
    printed, report = smoke
    assert report["smoke"] is True
    assert report["device"] == "cpu"
    for section, start in EXPECTED:
        row = one(report, section, start)
        assert row["name"] in printed, row["name"]
    skipped = [r for r in report["rows"] if r["skipped"]]
    assert [r["name"] for r in skipped] == [one(report, "train", "Trainer + bare loop, float8")["name"]]
    assert "compute capability >= 8.9" in skipped[0]["skipped"]
    assert "6*N*T + 12*L*d*T^2" in printed  # the MFU convention is stated


@pytest.mark.slow
def test_figures_are_positive_and_finite_and_gpu_only_ones_are_absent_on_cpu(smoke):
    _, report = smoke
    for row in (r for r in report["rows"] if not r["skipped"]):
        figures = {k: row[k] for k in ("tokens_per_s", "ratio", "value", "tokens") if row[k] is not None}
        assert figures, row["name"]
        for name, x in figures.items():
            assert math.isfinite(x), (row["name"], name, x)
            assert x > 0, (row["name"], name, x)
        assert row["mfu"] is None, row["name"]  # GPU-only figures
        assert row["peak_gib"] is None, row["name"]
    for start in ("Trainer + CodecLM", "bare FSDP2 loop"):
        assert one(report, "train", start)["tokens_per_s"] > 0
    assert one(report, "train", "Trainer/bare")["ratio"] > 0
    assert one(report, "sample", "jpeglm/HF")["ratio"] > 0


@pytest.mark.slow
def test_trainer_and_bare_loop_train_the_same_tokens(smoke):
    _, report = smoke
    ours = one(report, "train", "Trainer + CodecLM, bf16")
    bare = one(report, "train", "bare FSDP2 loop, bf16")
    assert ours["tokens"] == bare["tokens"] > 0
    assert ours["note"].split(", ")[-1] == bare["note"].split(", ")[-1]  # "N steps"


@pytest.mark.slow
def test_jpeglm_and_hugging_face_greedy_ids_agree(smoke):
    _, report = smoke
    assert one(report, "sample", "jpeglm/HF")["note"] == "ids identical"  # fp32 on CPU: exact
    assert one(report, "sample", "jpeglm generate")["tokens"] == one(report, "sample", "HF generate")["tokens"]


@pytest.mark.slow
def test_the_7b_arithmetic_matches_an_independent_count(smoke):
    _, report = smoke
    assert one(report, "7B plan", "parameters")["value"] == pytest.approx(PARAMETERS / 1e9, rel=1e-6)
    state = 16 * PARAMETERS / GPUS / GIB  # fp32 weights 4 + gradients 4 + AdamW moments 8 bytes, over 128 GPUs
    assert one(report, "7B plan", "fp32 weights+grads+AdamW")["value"] == pytest.approx(state, rel=1e-6)
    checkpoints = LAYERS * BATCH * SEQ * D * 2 / GIB  # each layer's bf16 block input kept for the recompute
    gathered = 2 * BLOCK * 2 / GIB  # at least two blocks' bf16 weights (computing, prefetched)
    assert gathered <= one(report, "7B plan", "gathered")["value"] < 4 * gathered
    activations = one(report, "7B plan", "activations")["value"]
    assert checkpoints < activations < 4 * checkpoints
    total = one(report, "7B plan", "memory / GPU")["value"]
    assert state + gathered + checkpoints < total < 80  # fits an 80 GB GPU with room to spare
    parts = [one(report, "7B plan", start)["value"] for start in ("fp32 weights", "gathered", "activations")]
    assert total == pytest.approx(sum(parts), rel=1e-9)
