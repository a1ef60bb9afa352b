"""`jpeglm fit` end to end on CPU: one process, two "nodes", kill -9 and resume.

FSDP2 over two processes (sharded checkpoints, kill inside a checkpoint write, resume to the weights of an
uninterrupted run, consolidate) is tested in test_checkpoint_faults.py."""

from __future__ import annotations

import csv
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from jpeglm.prepare import prepare

TINY = {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_query_groups": 2, "intermediate_size": 172}
FIT = [sys.executable, "-m", "jpeglm.cli", "fit"]


def prepared_crops(photos: list[Path], root: Path, count: int, val_fraction: float) -> Path:
    """``count`` 64x64 JPEG crops of the fixture photos (shifted by 11 pixels each round), prepared under
    ``root / "data"`` (a few hundred tokens each)."""
    (root / "in").mkdir()
    for i in range(count):
        im = Image.open(photos[i % len(photos)]).convert("RGB")
        shift = (i // len(photos)) * 11
        im.crop((shift, shift, shift + 220, shift + 220)).resize((64, 64)).save(root / "in" / f"{i}.png")
    options = {"val_fraction": val_fraction, "num_workers": 1, "progress": False, "codec_options": {"size": 64}}
    prepare("jpeg", [root / "in"], root / "data", **options)
    return root / "data"


@pytest.fixture(scope="module")
def tiny_data(photos, tmp_path_factory) -> Path:
    """48 prepared crops of the fixture photos."""
    return prepared_crops(photos, tmp_path_factory.mktemp("train_data"), 48, val_fraction=0.15)


def write_config(path: Path, data_dir: Path, run_dir: Path, **trainer) -> Path:
    config = {
        "seed_everything": 7,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 8,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "limit_val_batches": 2,
            "val_check_interval": 4,
            "check_val_every_n_epoch": None,
            "default_root_dir": str(run_dir),
            "deterministic": True,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(run_dir)}},
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {
                        "dirpath": str(run_dir / "checkpoints"),
                        "every_n_train_steps": 2,
                        "save_last": True,
                        "save_top_k": -1,
                        "save_on_train_epoch_end": True,
                    },
                }
            ],
            **trainer,
        },
        "model": {"model_overrides": TINY, "learning_rate": 3e-3, "warmup_steps": 2},
        "data": {
            "class_path": "jpeglm.data_modules.codec.CodecDataModule",
            "init_args": {"data_dir": str(data_dir), "seq_len": 128, "batch_size": 2},
        },
    }
    path.write_text(yaml.safe_dump(config))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(command: list[str], env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]


def test_fit_single_process_writes_checkpoints_and_metrics(tiny_data, tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_data, tmp_path / "run")
    secret = ["--data.init_args.storage.secret_access_key", "s3cr3t-k3y", "--data.init_args.storage.region", "eu-1"]
    run([*FIT, "--config", str(config), *secret])  # storage is not used for a local data_dir, only recorded
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    saved = next((tmp_path / "run").rglob("config.yaml")).read_text()
    assert "s3cr3t-k3y" not in saved  # the run directory is shared: config.yaml keeps no secret
    assert yaml.safe_load(saved)["data"]["init_args"]["storage"] == {
        "endpoint_url": None,
        "region": "eu-1",
        "access_key_id": None,
        "secret_access_key": None,  # unset: a run started from this file reads AWS_SECRET_ACCESS_KEY
    }
    assert not any(b"s3cr3t-k3y" in p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file())
    metrics = (next((tmp_path / "run").rglob("metrics.csv"))).read_text().splitlines()[0]
    for name in ("train/loss", "train/bits_per_byte", "val/loss", "val/bits_per_byte", "train/grad_norm", "train/lr"):
        assert name in metrics


def test_kill_9_then_resume_gives_the_weights_of_an_uninterrupted_run(tiny_data, tmp_path):
    straight = write_config(tmp_path / "a.yaml", tiny_data, tmp_path / "a", max_steps=12)
    run([*FIT, "--config", str(straight)])

    killed_dir = tmp_path / "b"
    killed = write_config(tmp_path / "b.yaml", tiny_data, killed_dir, max_steps=12)
    process = subprocess.Popen([*FIT, "--config", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    marker = killed_dir / "checkpoints" / "epoch=0-step=6.ckpt"  # written only after step 4's checkpoint is whole
    deadline = time.monotonic() + 240
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert marker.exists(), "the run ended before it could be killed"
    assert not (killed_dir / "checkpoints" / "epoch=0-step=12.ckpt").exists()

    resume_from = killed_dir / "checkpoints" / "epoch=0-step=4.ckpt"
    run([*FIT, "--config", str(killed), "--ckpt_path", str(resume_from)])
    a = weights(tmp_path / "a" / "checkpoints" / "epoch=0-step=12.ckpt")
    b = weights(killed_dir / "checkpoints" / "epoch=0-step=12.ckpt")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.slow
def test_two_nodes_of_one_process_train_together(tiny_data, tmp_path):
    port = str(free_port())
    config = write_config(tmp_path / "c.yaml", tiny_data, tmp_path / "run", num_nodes=2, strategy="ddp", max_steps=4)
    base = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2"}
    nodes = [
        subprocess.Popen(
            [*FIT, "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **base, "NODE_RANK": str(rank)},
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in outputs[0]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in outputs[1]
    assert (tmp_path / "run" / "checkpoints" / "epoch=0-step=4.ckpt").is_file()


def val_steps(run_dir: Path) -> list[int]:
    """Steps at which a run's CSVLogger recorded val/bits_per_byte, over all its versions."""
    steps = []
    for metrics in sorted(run_dir.rglob("metrics.csv")):
        rows = list(csv.DictReader(metrics.open()))
        steps += [int(row["step"]) for row in rows if row.get("val/bits_per_byte")]
    return steps


def test_initial_validation_adds_a_step_0_point_and_leaves_training_alone(tiny_data, tmp_path):
    plain = write_config(tmp_path / "a.yaml", tiny_data, tmp_path / "a")
    run([*FIT, "--config", str(plain)])
    first = write_config(tmp_path / "b.yaml", tiny_data, tmp_path / "b")
    run([*FIT, "--config", str(first), "--trainer.callbacks+=jpeglm.callbacks.InitialValidation"])

    assert val_steps(tmp_path / "a") == [3, 7]  # Lightning's in-loop validations after steps 4 and 8
    assert val_steps(tmp_path / "b") == [0, 3, 7]
    a, b = (weights(tmp_path / d / "checkpoints" / "epoch=0-step=8.ckpt") for d in "ab")
    for name in a:
        assert torch.equal(a[name], b[name]), name  # validating first changes nothing in training

    # Resuming is not a start: no second step-0 point.
    shutil.rmtree(tmp_path / "b" / "lightning_logs")
    resume = ["--ckpt_path", str(tmp_path / "b" / "checkpoints" / "epoch=0-step=4.ckpt")]
    run([*FIT, "--config", str(first), "--trainer.callbacks+=jpeglm.callbacks.InitialValidation", *resume])
    assert val_steps(tmp_path / "b") == [7]


def test_log_lines_print_each_step_once_with_progress_and_eta(tiny_data, tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_data, tmp_path / "run", max_steps=4, accumulate_grad_batches=2)
    result = run(
        [
            *FIT,
            "--config",
            str(config),
            "--trainer.callbacks+=jpeglm.callbacks.LogLines",
            "--trainer.callbacks.every_n_steps=2",
        ]
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    # Once per optimizer step, named by the step the logger records (k - 1 after k steps), then the steps done.
    assert [line.split(" | ")[0] for line in lines] == ["step 1 (2/4 done, 50%)", "step 3 (4/4 done, 100%)"]
    assert re.search(r"\| \d+ tok/s \| \d\d:\d\d:\d\d elapsed, ETA \d\d:\d\d:\d\d$", lines[0]), lines[0]
    assert lines[1].endswith("ETA 00:00:00")
    # val_check_interval 4 counts batches: validations after batches 4 and 8, the 2nd and 4th optimizer steps.
    validations = re.findall(r"^validation at step (\d+) \| val/bits_per_byte (\S+)", result.stdout, re.M)
    assert [int(step) for step, _ in validations] == val_steps(tmp_path / "run") == [1, 3]  # what the logger has
    assert f"val/bits_per_byte {validations[0][1]} @1 |" in lines[1]  # the last validation, with its step
    rows = list(csv.DictReader(next((tmp_path / "run").rglob("metrics.csv")).open()))
    losses = {int(row["step"]): float(row["train/loss"]) for row in rows if row.get("train/loss")}
    for line in lines:
        step = int(line.split()[1])
        assert f"train/loss {losses[step]:.4g} |" in line  # the value the logger has at the step the line names
