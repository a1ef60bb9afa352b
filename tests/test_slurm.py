"""recipes/slurm/jpeg_tiny.sbatch and prepare.sbatch on a real SLURM cluster (slurmctld + slurmd on this machine,
see slurm_cluster.py).

Two jobs of two CPU tasks each: one trains a few steps and checkpoints; the other is sent SIGUSR1 while it
trains, saves ``hpc_ckpt_1.ckpt`` through ``jpeglm.callbacks.SlurmRequeue``, is requeued by SLURM under the same
job id and resumes from that checkpoint to the end. CI installs slurm-wlm (.ci/run) and sets
``JPEGLM_REQUIRE_SLURM=1``, so there these tests fail rather than skip when SLURM is missing.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from slurm_cluster import SlurmCluster, installed
from test_prepare import all_samples, small_photos, write_images

from jpeglm.cli import main

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "recipes" / "slurm" / "jpeg_tiny.sbatch"
PREPARE = REPO / "recipes" / "slurm" / "prepare.sbatch"
RUN = Path("runs/jpeg_tiny")  # the recipe's run directory, relative to where the job runs
# One sequence per rank and step instead of the recipe's 4, and 256 pictures instead of 4096: a quick test on
# 2 cores; everything else is the recipe.
SMALL_BATCHES = ["--data.init_args.batch_size=1", "--data.init_args.num_images=256"]
STEP = re.compile(r"^step \d+ \((\d+)/(\d+) done", re.MULTILINE)  # LogLines: "step 49 (50/50 done, 100%) | ..."

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not installed() and not os.environ.get("JPEGLM_REQUIRE_SLURM"),
        reason="SLURM not installed (apt-get install slurm-wlm munge; CI does, see .ci/run)",
    ),
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[SlurmCluster]:
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """Where the recipe's synthetic data set is made (by the first job) and reused (by the second)."""
    return tmp_path_factory.mktemp("jpeglm_cache")


def submit(cluster: SlurmCluster, workdir: Path, cache_dir: Path, *args: str) -> int:
    """sbatch the tiny script as its header says, from ``workdir``, whose ``recipes`` links to the repository's.

    The recipe's relative paths (``runs/jpeg_tiny/...``: run directory, logs, checkpoints, the job's output)
    then land in ``workdir``. ``args`` go to ``jpeglm fit``.
    """
    (workdir / "recipes").symlink_to(REPO / "recipes", target_is_directory=True)
    (workdir / RUN).mkdir(parents=True)  # SLURM opens the job's output there before the script runs
    env = {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # the `jpeglm` under test
        "JPEGLM_CACHE": str(cache_dir),
        "MASTER_PORT": str(free_port()),  # Lightning's default derives from the job id, which another cluster shares
        "PYTHONUNBUFFERED": "1",
    }
    return cluster.sbatch(SCRIPT, env=env, args=[*SMALL_BATCHES, *args], cwd=workdir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def global_step(checkpoint: Path) -> int:
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"]


def test_two_tasks_train_and_checkpoint(cluster, cache_dir, tmp_path):
    job = submit(cluster, tmp_path, cache_dir, "--trainer.max_steps=50")  # LogLines prints every 50 steps
    info = cluster.wait(job, timeout=300)
    assert info["JobState"] == "COMPLETED", cluster.logs(job)
    out = cluster.output(job)
    # Lightning took both ranks from SLURM (SLURMEnvironment): one process each, not a launcher of its own.
    assert out.count("GLOBAL_RANK: 0, MEMBER: 1/2") == 1, out
    assert out.count("GLOBAL_RANK: 1, MEMBER: 2/2") == 1, out
    assert STEP.findall(out) == [("50", "50")], out  # progress: steps done / max_steps
    assert "`Trainer.fit` stopped: `max_steps=50` reached." in out, out
    last = tmp_path / RUN / "checkpoints" / "last.ckpt"
    assert last.is_file(), f"no {last}\n{out}"
    assert global_step(last) == 50


def test_usr1_saves_requeues_and_resumes(cluster, cache_dir, tmp_path):
    # Signalled after its first progress line (step 50), the first run saves hpc_ckpt_1 a step or two later;
    # the restarted run continues from there to max_steps.
    max_steps = 150
    job = submit(cluster, tmp_path, cache_dir, f"--trainer.max_steps={max_steps}")
    cluster.wait_for(lambda: STEP.search(cluster.output(job)), 300, "the first progress line", job)
    cluster.run("scancel", "--signal=USR1", str(job))

    hpc = tmp_path / RUN / "hpc_ckpt_1.ckpt"
    cluster.wait_for(hpc.exists, 60, f"{hpc} after SIGUSR1", job)
    cluster.wait_for(lambda: int(cluster.job(job).get("Restarts", 0)) >= 1, 60, f"job {job} requeued", job)
    info = cluster.wait(job, timeout=300)  # the same job id, run again
    assert info["JobState"] == "COMPLETED", cluster.logs(job)
    assert info["Restarts"] == "1", cluster.logs(job)

    out = cluster.output(job)  # both runs: the script appends (--open-mode=append)
    assert re.search(r"signal \S+ received: saving \S*hpc_ckpt_1\.ckpt and requeueing the job", out), out
    assert f"requeued SLURM job {job}" in out, out
    restore = re.search(r"Restoring states from the checkpoint path at \S*hpc_ckpt_1\.ckpt", out)
    assert restore, f"the restarted run did not restore hpc_ckpt_1:\n{out}"
    first, restart = out[: restore.start()], out[restore.end() :]
    saved = global_step(hpc)
    assert int(STEP.findall(first)[-1][0]) <= saved < max_steps, first
    resumed = [int(step) for step, _ in STEP.findall(restart)]
    assert resumed, restart
    assert min(resumed) > saved, f"the restarted run did not continue from step {saved}:\n{restart}"
    assert f"`Trainer.fit` stopped: `max_steps={max_steps}` reached." in restart, restart
    assert global_step(tmp_path / RUN / "checkpoints" / "last.ckpt") == max_steps
    assert not (tmp_path / RUN / "hpc_ckpt_2.ckpt").exists()


def test_prepare_array_of_two_tasks_equals_one_node(cluster, photos, tmp_path):
    """recipes/slurm/prepare.sbatch as a 2-task array, both tasks at once (each trains the tokenizer; the first
    publishes it): the same samples in the same order as one node, and one report with both nodes' counts."""
    corpus = tmp_path / "corpus"
    write_images(corpus, small_photos(photos, 24, size=64))
    args = ["--modality", "jpeg", "--input", str(corpus), "--val-fraction", "0.2", "--part-size", "3", "--no-progress"]
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONUNBUFFERED": "1"}
    options = ["--array=0-1", "--cpus-per-task=1"]
    job = cluster.sbatch(
        PREPARE, env=env, args=[*args, "--output", str(tmp_path / "nodes")], options=options, cwd=tmp_path
    )
    for task in (f"{job}_0", f"{job}_1"):
        info = cluster.wait(task, timeout=300)
        assert info["JobState"] == "COMPLETED", cluster.logs(task)
    assert main(["prepare", *args, "--output", str(tmp_path / "one"), "--num-nodes", "1"]) == 0

    assert all_samples(tmp_path / "nodes") == all_samples(tmp_path / "one")
    report = json.loads((tmp_path / "nodes" / "prepare_report.json").read_text())
    assert [(n["node"], n["num_nodes"], n["parts"]) for n in report["nodes"]] == [(0, 2, 4), (1, 2, 4)]
    assert sum(n["items_written"] for n in report["nodes"]) == report["items_written"] == 24
