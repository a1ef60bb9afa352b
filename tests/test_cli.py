"""The `jpeglm` command as people meet it: help on every command and option, one clear line per mistake."""

from __future__ import annotations

import argparse
import inspect
import shutil
import subprocess
import sys
from pathlib import Path

import docstring_parser
import lightning as L
import pytest
import torch
import yaml

import jpeglm.callbacks
import jpeglm.data_modules
from jpeglm.cli import COMMANDS, LIGHTNING_COMMANDS, build_parser, main
from jpeglm.data_modules import SyntheticDataModule
from jpeglm.model import CodecLM

ROOT = Path(__file__).parent.parent
TINY = {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_query_groups": 2, "intermediate_size": 64}


def command_line(name: str) -> list[str]:
    return ["tokenizer", "train"] if name == "tokenizer" else [name]


def options_parser(name: str) -> argparse.ArgumentParser:
    """The parser of `jpeglm NAME` (of `jpeglm tokenizer train` for tokenizer), as `main` builds it."""
    parser = build_parser(name)
    for word in command_line(name):
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[word]
    return parser


def error_line(capsys, command: str) -> str:
    """The one line `jpeglm COMMAND: error: ...` that a failed command ends with (Lightning may log before it)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith(f"jpeglm {command}: error: "), err
    assert err.count("error:") == 1, err
    return last


# ---------------------------------------------------------------------- --help


@pytest.mark.parametrize("name", sorted(set(COMMANDS) - set(LIGHTNING_COMMANDS)))
def test_every_option_of_every_command_is_explained(name, capsys):
    parser = options_parser(name)
    assert parser.description, f"`jpeglm {' '.join(command_line(name))}` has no description"
    options = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    assert options
    for action in options:
        assert (action.help or "").strip() not in ("", argparse.SUPPRESS), action.dest
    with pytest.raises(SystemExit) as exit_:
        main([*command_line(name), "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for action in options:
        assert (action.option_strings or [action.dest])[-1] in out
        assert " ".join(action.help.split()[:3]) in " ".join(out.split())


@pytest.mark.parametrize("name", LIGHTNING_COMMANDS)
def test_lightning_commands_show_help(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([name, "--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for option in ("--config", "--model.learning_rate", "--model.activation_checkpointing", "--data", "--ckpt_path"):
        assert option in out
    assert "jpeglm.data_modules.CodecDataModule" in out  # known subclasses: `--data.help CodecDataModule` works


def jpeglm_classes() -> list[type]:
    """The classes a config names: the model, the data modules, the callbacks."""
    exported = [getattr(module, name) for module in (jpeglm.data_modules, jpeglm.callbacks) for name in module.__all__]
    configurable = (L.LightningDataModule, L.Callback)
    return [CodecLM, *(c for c in exported if inspect.isclass(c) and issubclass(c, configurable))]


@pytest.mark.parametrize("cls", jpeglm_classes(), ids=lambda c: c.__name__)
def test_every_init_argument_of_a_config_class_is_documented(cls):
    """jsonargparse takes each `--model.X` / `--data.X` / callback option's help from the class's Args: section."""
    documented = {p.arg_name: p.description for p in docstring_parser.parse(cls.__doc__).params}
    parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]  # without self
    for parameter in parameters:
        if parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            assert (documented.get(parameter.name) or "").strip(), (
                f"{cls.__name__}: no 'Args:' line for {parameter.name}"
            )
    assert cls.__doc__.splitlines()[0].rstrip().endswith("."), "the first line is the help's section title"


# ---------------------------------------------------------------------- data mistakes


def test_prepare_input_mistakes_are_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.csv").write_text("a,b\n")
    cases = {"missing": "input not found", "empty": "no jpeg inputs", "other": "1 files of other types"}
    for folder, message in cases.items():
        code = main(
            ["prepare", "--modality", "jpeg", "--input", str(tmp_path / folder), "--output", str(tmp_path / "o")]
        )
        assert code == 2
        assert message in error_line(capsys, "prepare")
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """A real prepared directory: 16 synthetic 32x32 images."""
    cache = tmp_path_factory.mktemp("cli_data")
    module = SyntheticDataModule(seq_len=64, batch_size=2, num_images=16, image_size=32, cache_dir=str(cache))
    module.prepare_data()
    return module.data_dir


def fit_config(path: Path, data_dir: Path, run_dir: Path) -> Path:
    config = {
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 2,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "limit_val_batches": 0,
            "default_root_dir": str(run_dir),
        },
        "model": {"model_overrides": TINY, "warmup_steps": 1},
        "data": {
            "class_path": "jpeglm.data_modules.CodecDataModule",
            "init_args": {"data_dir": str(data_dir), "seq_len": 64, "batch_size": 2},
        },
    }
    path.write_text(yaml.safe_dump(config))
    return path


def test_fit_on_a_missing_or_empty_data_directory_is_one_line(tiny_data, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    unfinished = tmp_path / "unfinished"
    shutil.copytree(tiny_data, unfinished)
    (unfinished / "dataset.json").unlink()
    no_chunks = tmp_path / "no_chunks"
    shutil.copytree(tiny_data, no_chunks)
    for chunk in (no_chunks / "train").glob("*.bin"):
        chunk.unlink()
    cases = {
        "missing": "the directory does not exist; make it with `jpeglm prepare",
        "empty": "no dataset.json; give a directory written by `jpeglm prepare`",
        "unfinished": "no dataset.json",
        "no_chunks": "lacks 1 of its 1 chunk files",
    }
    for name, message in cases.items():
        config = fit_config(tmp_path / f"{name}.yaml", tmp_path / name, tmp_path / "run")
        assert main(["fit", "--config", str(config)]) == 2
        line = error_line(capsys, "fit")
        assert str(tmp_path / name) in line
        assert message in line
    sources = ["--data", "MixedDataModule", "--data.data_dirs", f"[{tmp_path / 'missing'}]", "--data.weights", "[1]"]
    assert main(["fit", "--config", str(config), *sources]) == 2
    assert "the directory does not exist" in error_line(capsys, "fit")


# ---------------------------------------------------------------------- config mistakes


def test_an_unknown_config_key_is_one_line_that_names_it(tiny_data, tmp_path, capsys):
    config = fit_config(tmp_path / "c.yaml", tiny_data, tmp_path / "run")
    assert main(["fit", "--config", str(config), "--model.no_such_key", "1"]) == 2
    assert "unrecognized arguments: --model.no_such_key 1" in error_line(capsys, "fit").lower()  # case: by version
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  learning_rat: 0.1\n")
    assert main(["fit", "--config", str(config), "--config", str(typo)]) == 2
    assert "model.learning_rat" in error_line(capsys, "fit")
    assert main(["validate", "--config", str(config), "--data.init_args.batch_sise", "4"]) == 2
    assert "'batch_sise'" in error_line(capsys, "validate")  # jsonargparse's wording changes between versions


def test_settings_lightning_refuses_are_one_line(tiny_data, tmp_path, capsys):
    config = fit_config(tmp_path / "c.yaml", tiny_data, tmp_path / "run")
    assert main(["fit", "--config", str(config), "--trainer.devices", "0"]) == 2  # a MisconfigurationException
    assert "`Trainer(devices='0')` value is not a valid input" in error_line(capsys, "fit")


def test_a_gpu_recipe_on_a_cpu_machine_fails_at_once_in_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = subprocess.run(
        [sys.executable, "-m", "jpeglm.cli", "fit", "--config", str(ROOT / "recipes" / "jpeg_7b.yaml")],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # the recipe's data/jpeg does not exist here: the GPU is checked before the data is read
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        "jpeglm fit: error: this recipe needs a GPU (trainer.accelerator=gpu) but no CUDA device is visible; "
        "on a CPU machine try `jpeglm fit --config recipes/jpeg_tiny.yaml`"
    )


# ---------------------------------------------------------------------- out of memory


def cuda_out_of_memory(self, batch, batch_idx):
    raise torch.cuda.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which "
        "1.02 GiB is free.\nSee documentation for Memory Management"
    )


def cpu_out_of_memory(self, batch, batch_idx):
    return torch.empty(2**50, dtype=torch.uint8)  # 1 PiB: the allocator refuses at once, nothing is touched


@pytest.mark.parametrize(
    ("step", "shown"),
    [
        (cuda_out_of_memory, "(CUDA out of memory. Tried to allocate 20.00 GiB). To use less memory: "),
        (cpu_out_of_memory, "DefaultCPUAllocator: can't allocate memory"),
    ],
)
def test_out_of_memory_says_what_to_change(tiny_data, tmp_path, capsys, monkeypatch, step, shown):
    monkeypatch.setattr(CodecLM, "training_step", step)
    config = fit_config(tmp_path / "c.yaml", tiny_data, tmp_path / "run")
    assert main(["fit", "--config", str(config)]) == 1
    line = error_line(capsys, "fit")
    assert line.startswith("jpeglm fit: error: out of memory (")
    assert shown in line
    for advice in ("--model.activation_checkpointing true", "--data.init_args.batch_size", "accumulate_grad_batches"):
        assert advice in line
    monkeypatch.setenv("JPEGLM_DEBUG", "1")
    with pytest.raises(RuntimeError, match="allocate"):
        main(["fit", "--config", str(config)])


def test_a_value_error_inside_a_training_step_keeps_its_traceback(tiny_data, tmp_path, monkeypatch):
    # A ValueError from setting up the data is the user's mistake (one line, above); one from inside the loop
    # is almost surely a bug: it must reach the user whole, not as a misleading "jpeglm fit: error" line.
    def broken_step(self, batch, batch_idx):
        raise ValueError("zip() argument 2 is shorter than argument 1")

    monkeypatch.setattr(CodecLM, "training_step", broken_step)
    config = fit_config(tmp_path / "c.yaml", tiny_data, tmp_path / "run")
    with pytest.raises(ValueError, match="zip"):
        main(["fit", "--config", str(config)])
