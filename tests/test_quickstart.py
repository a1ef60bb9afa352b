"""The README's quick start, run as written (parsed from README.md), shortened by a step override.

README.md opens with a bash block of two lines: the first installs the project and runs the tiny recipe,
the second runs these tests. ``.ci/run`` reads the same block, so the README cannot drift from what works.
"""

import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).parent.parent
SHORTER = [  # the recipe as shipped, but 60 steps on 256 pictures: the same code paths in a minute
    "--trainer.max_steps=60",
    "--trainer.val_check_interval=30",
    "--trainer.limit_val_batches=2",
    "--data.init_args.num_images=256",
    "--model.warmup_steps=5",
]


def readme_commands() -> list[str]:
    """The lines of the README's first bash block."""
    match = re.search(r"^```bash\n(.*?)^```$", (ROOT / "README.md").read_text(), re.MULTILINE | re.DOTALL)
    assert match, "README.md has no ```bash block"
    return [line for line in match.group(1).splitlines() if line.strip()]


def quick_start() -> list[str]:
    """The `jpeglm fit ...` part of the README's first line, with `.venv/bin/` pointing at this interpreter's."""
    install_and_run = readme_commands()[0]
    steps = [step.strip() for step in install_and_run.split("&&")]
    fit = [step for step in steps if re.match(r"\.venv/bin/jpeglm fit\b", step)]
    assert len(fit) == 1, f"the first README line must run `jpeglm fit` once: {steps}"
    assert steps[-1] == fit[0], f"the first README line must end with `jpeglm fit`: {steps}"
    argv = shlex.split(fit[0])
    return [str(Path(sys.executable).parent / Path(argv[0]).name), *argv[1:]]


def test_readme_opens_with_the_quick_start_and_the_test_command():
    commands = readme_commands()
    assert len(commands) == 2, commands
    install_and_run, tests = commands
    assert install_and_run.startswith("python3 -m venv .venv && .venv/bin/pip install -e ")
    assert quick_start()[1:] == ["fit", "--config", "recipes/jpeg_tiny.yaml"]
    assert tests == ".venv/bin/python -m pytest"


@pytest.mark.slow
def test_quick_start_trains_validates_samples_and_checkpoints(tmp_path):
    """Run from a fresh directory with the repo's recipes, then use its checkpoint as the README goes on to."""
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    env = {**os.environ, "JPEGLM_CACHE": str(tmp_path / "cache")}
    run = subprocess.run([*quick_start(), *SHORTER], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "validation at step 0 |" in run.stdout  # LogLines shows the untrained baseline

    events = EventAccumulator(str(next((tmp_path / "runs").rglob("events.out.tfevents*")).parent)).Reload()
    val = [(e.step, e.value) for e in events.Scalars("val/bits_per_byte")]
    # InitialValidation's step-0 point, then one every 30 steps (Lightning logs those at steps 29 and 59)
    assert len(val) == 3
    assert val[0][0] == 0 < val[1][0] < val[2][0]
    assert val[-1][1] < 0.85 * val[0][1]  # 60 steps already learn the bytes' statistics
    loss = [e.value for e in events.Scalars("train/loss")]
    assert loss[-1] < math.log(328)  # better than uniform over the vocabulary
    assert "samples/jpeg/ratio_0.50" in events.Tags()["images"]  # the gallery, at the end of training
    assert any((tmp_path / "runs").rglob("samples/*.png"))
    checkpoint = tmp_path / "runs" / "jpeg_tiny" / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file()

    jpeglm = quick_start()[0]
    sample = subprocess.run(
        [jpeglm, "generate", "--checkpoint", str(checkpoint), "--unconditional", "--num-samples", "2",
         "--device", "cpu", "--output", str(tmp_path / "samples"), "--no-progress"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert sample.returncode == 0, sample.stderr[-3000:]
    assert len(list((tmp_path / "samples").glob("sample_*.jpg"))) == 2
    records = json.loads((tmp_path / "samples" / "samples.json").read_text())["samples"]
    assert [(r["complete"], r["constrain"]) for r in records] == [(True, True)] * 2  # the grammar: whole images
    export = subprocess.run(
        [jpeglm, "export", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "hf"), "--format", "hf"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert export.returncode == 0, export.stderr[-3000:]
    assert (tmp_path / "hf" / "config.json").is_file()
