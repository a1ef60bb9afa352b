"""The `jpeglm` command as people meet it: help on every command and option, one clear line per mistake."""

from __future__ import annotations

import functools
import importlib
import inspect
import re
import shlex
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
from jpeglm.cli import COMMANDS, LIGHTNING_COMMANDS, Command, command_line_spelling, main
from jpeglm.codecs import CodecError
from jpeglm.data_modules import SyntheticDataModule
from jpeglm.errors import UserError
from jpeglm.model import CodecLM

ROOT = Path(__file__).parent.parent
TINY = {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_query_groups": 2, "intermediate_size": 64}
TYPED_COMMANDS = sorted(set(COMMANDS) - set(LIGHTNING_COMMANDS))


def error_line(capsys, command: str) -> str:
    """The one line `jpeglm COMMAND: error: ...` that a failed command ends with (Lightning may log before it)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith(f"jpeglm {command}: error: "), err
    assert err.count("error:") == 1, err
    return last


def command_function(name: str):
    command = COMMANDS[name]
    return getattr(importlib.import_module(command.module), command.function)


def squash(text: str) -> str:
    """Text without whitespace: help output wraps lines anywhere."""
    return "".join(text.split())


def option_help(out: str) -> dict[str, str]:
    """`--help` output -> each option's name (without dashes) -> its help text, squashed."""
    blocks: dict[str, list[str]] = {}
    current = None
    for line in out.split("options:", 1)[1].splitlines():
        match = re.match(r"^  --(\w+)", line)
        if match:
            current = blocks.setdefault(match.group(1), [])
        elif line and not line.startswith(" "):
            current = None  # the epilog
        if current is not None:
            current.append(line)
    return {name: squash(" ".join(lines)) for name, lines in blocks.items()}


# ---------------------------------------------------------------------- --help


@pytest.mark.parametrize("name", TYPED_COMMANDS)
def test_help_shows_every_option_with_its_default_and_sentence(name, capsys):
    function = command_function(name)
    documented = {p.arg_name: p.description for p in docstring_parser.parse(function.__doc__).params}
    with pytest.raises(SystemExit) as exit_:
        main([*name.split(), "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert squash(COMMANDS[name].help) in squash(out)
    options = option_help(out)
    assert {"config", "print_config"} <= set(options)
    for parameter in inspect.signature(function).parameters.values():
        assert (documented.get(parameter.name) or "").strip(), f"{name}: no 'Args:' line for {parameter.name}"
        text = options[parameter.name]
        assert squash(documented[parameter.name]) in text
        if parameter.default is inspect.Parameter.empty:
            assert "required" in text
        else:
            shown = "null" if parameter.default is None else str(parameter.default)
            assert squash(f"default: {shown}") in text


def test_jpeglm_help_imports_no_command(tmp_path):
    code = (
        "import sys\nfrom jpeglm.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in sys.modules if m.startswith(('jpeglm.', 'jsonargparse', 'torch', 'lightning'))))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    for name in TYPED_COMMANDS:
        assert name in result.stdout
    assert result.stdout.splitlines()[-1] == "['jpeglm.cli']"


# ---------------------------------------------------------------------- how arguments reach the function


@pytest.fixture
def calls(monkeypatch):
    """``calls(name)`` replaces a command's function (and summary) by one that records its keyword arguments."""

    def patch(name: str, result=None, raises: BaseException | None = None) -> list[dict]:
        command = COMMANDS[name]
        module = importlib.import_module(command.module)
        real = getattr(module, command.function)
        recorded: list[dict] = []

        @functools.wraps(real)
        def record(**kwargs):  # keyword arguments only: a positional one would be a TypeError
            recorded.append(kwargs)
            if raises is not None:
                raise raises
            return result

        monkeypatch.setattr(module, command.function, record)
        if command.summary:
            monkeypatch.setattr(module, command.summary, lambda value: f"summary of {value}")
        return recorded

    return patch


PREPARE = ["prepare", "--modality", "jpeg", "--input", "photos/", "more/*.jpg", "--output", "data/out"]


def test_dashes_and_underscores_and_native_spellings_give_the_same_call(calls, capsys):
    recorded = calls("prepare", result="report")
    dashed = ["--val-fraction", "0.2", "--num-workers", "3", "--max-items", "5", "--tokenizer", "tok/jpeg"]
    underscored = ["--val_fraction", "0.2", "--num_workers=3", "--max_items", "5", "--tokenizer=tok/jpeg"]
    assert main([*PREPARE, *dashed, "--no-progress", "--codec", "size=64"]) == 0
    assert capsys.readouterr().out == "summary of report\n"
    assert main([*PREPARE, *underscored, "--progress", "false", "--codec_options", '{"size": 64}']) == 0
    native = ["prepare", "--modality=jpeg", '--inputs=["photos/", "more/*.jpg"]', "--output=data/out", *underscored]
    assert main([*native, "--progress=false", "--codec_options={size: 64}"]) == 0
    expected = {
        "modality": "jpeg",
        "inputs": ["photos/", "more/*.jpg"],
        "output": "data/out",
        "tokenizer": "tok/jpeg",
        "vocab_size": None,
        "val_fraction": 0.2,
        "num_workers": 3,
        "max_items": 5,
        "seed": 0,
        "part_size": 1024,
        "chunk_bytes": 64 * 2**20,
        "progress": False,
        "codec_options": {"size": 64},
        "captions": False,
        "caption_tokenizer": None,
        "caption_vocab_size": 512,
        "max_caption_tokens": 64,
        "num_nodes": None,
        "node_rank": None,
    }
    assert recorded == [expected] * 3


def test_bools_lists_and_dicts_on_the_command_line(monkeypatch, capsys):
    monkeypatch.setitem(COMMANDS, "toy", Command(__name__, "toy", "a command to try the mechanism on", "toy_summary"))
    assert main(["toy"]) == 0
    defaults = {"ratios": [0.25, 0.5], "top_k": [40], "paths": None, "unconditional": False, "codec": None, "seed": 0}
    assert TOY_CALLS.pop() == defaults
    assert capsys.readouterr().out == "toy done\n"
    cases = {
        ("--ratios", "0.25,0.5,0.75"): {"ratios": [0.25, 0.5, 0.75]},
        ("--ratios", "0.25", "0.5,0.75", "--seed", "-1"): {"ratios": [0.25, 0.5, 0.75], "seed": -1},
        ("--top-k", "40,80,null"): {"top_k": [40, 80, None]},
        ("--top-k", "[1, 2]"): {"top_k": [1, 2]},
        ("--paths", "a,b.jpg", "c/"): {"paths": ["a,b.jpg", "c/"]},  # paths are never cut at commas
        ("--unconditional",): {"unconditional": True},
        ("--unconditional", "--no-unconditional"): {"unconditional": False},
        ("--unconditional", "false"): {"unconditional": False},
        ("--uncond",): {"unconditional": True},  # a unique prefix
        ("--codec", "size=64", "--codec", "quality=30", "--codec", "subsampling=4:4:4", "--codec", "x=null"): {
            "codec": {"size": 64, "quality": 30, "subsampling": "4:4:4", "x": None}
        },
    }
    for args, changed in cases.items():
        assert main(["toy", *args]) == 0, args
        assert TOY_CALLS.pop() == defaults | changed, args


def test_consolidate_takes_its_checkpoint_as_the_first_word(calls, tmp_path):
    recorded = calls("consolidate", result=tmp_path / "model.ckpt")
    assert main(["consolidate", "runs/last.ckpt", "--output", "model.ckpt"]) == 0
    assert main(["consolidate", "--output", "model.ckpt", "runs/last.ckpt"]) == 0
    assert main(["consolidate", "--checkpoint", "runs/last.ckpt", "--output", "model.ckpt"]) == 0
    assert recorded == [{"checkpoint": "runs/last.ckpt", "output": "model.ckpt"}] * 3


def readme_commands() -> list[list[str]]:
    """Every `jpeglm ...` line of the README's code blocks but the Lightning ones, and the consolidate example in
    its text, as argv (after `jpeglm`)."""
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S) + re.findall(r"`(jpeglm consolidate [^`]*)`", readme)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    commands = []
    for line in lines:
        words = shlex.split(line.split("#")[0])
        start = next((i for i, w in enumerate(words) if w.endswith("jpeglm") and i + 1 < len(words)), None)
        if start is not None and words[start + 1] not in LIGHTNING_COMMANDS:
            commands.append(words[start + 1 :])
    return commands


def test_every_command_line_of_the_readme_parses(calls):
    commands = readme_commands()
    assert {" ".join(c[:2]) if c[0] == "tokenizer" else c[0] for c in commands} == set(TYPED_COMMANDS)
    recorded = {name: calls(name) for name in TYPED_COMMANDS}
    for argv in commands:
        assert main(argv) == 0, argv
    from_s3, caption, generate, unconditional, _released = recorded["generate"]
    assert from_s3["prompt_images"] == ["s3://my-bucket/prompts/"]
    assert (caption["prompt_text"], caption["cfg_scale"], caption["num_samples"]) == (
        ["a red circle at the top left on a plain teal background"], 2.0, 4)  # fmt: skip
    assert recorded["evaluate-captions"][0]["cfg_scales"] == [1.0, 1.5, 2.0]
    assert generate["prompt_images"] == ["photos/"]
    assert (generate["ratio"], generate["num_samples"], generate["top_k"], generate["top_p"]) == (0.5, 8, 40, 0.9)
    assert (unconditional["unconditional"], unconditional["prompt_images"]) == (True, None)
    evaluate, released = recorded["evaluate"]
    assert (released["num_images"], released["constrain"]) == (5000, False)  # the paper's protocol, unconstrained
    assert [(c["hf"], c["output"]) for c in recorded["import"]] == [("jpeg-lm/", "released/jpeg-lm.ckpt")]
    assert (evaluate["ratios"], evaluate["top_k"], evaluate["top_p"]) == ([0.25, 0.5, 0.75], [40, 80], [0.9, 1.0])
    assert (evaluate["seeds"], evaluate["inception_weights"], evaluate["unconditional"]) == (3, "weights.pth", True)
    assert recorded["consolidate"] == [{"checkpoint": "CKPT_DIR", "output": "model.ckpt"}]
    assert [c["vocab_size"] for c in recorded["tokenizer train"]] == [320, None, 32000]
    assert recorded["prepare"][0]["val_fraction"] == 0.01
    on_node_2 = next(c for c in recorded["prepare"] if c["node_rank"] is not None)
    assert (on_node_2["num_nodes"], on_node_2["node_rank"], on_node_2["output"]) == (4, 2, "/shared/jpeg")


def test_the_quick_start_commands_parse(calls):
    recorded = {name: calls(name) for name in ("generate", "evaluate")}
    generate = ["generate", "--checkpoint", "last.ckpt", "--unconditional", "--num-samples", "2", "--max-new-tokens"]
    assert main([*generate, "64", "--device", "cpu", "--output", "samples", "--no-progress"]) == 0
    evaluate = ["evaluate", "--checkpoint", "c", "--images", "a", "b", "--output", "o", "--no-unconditional"]
    assert main([*evaluate, "--top-k", "0,40", "--feature-extractor", "small", "--num-images", "4"]) == 0
    (kwargs,) = recorded["generate"]
    assert (kwargs["unconditional"], kwargs["num_samples"], kwargs["max_new_tokens"]) == (True, 2, 64)
    assert (kwargs["device"], kwargs["progress"]) == ("cpu", False)
    (kwargs,) = recorded["evaluate"]
    assert (kwargs["images"], kwargs["unconditional"], kwargs["top_k"]) == (["a", "b"], False, [0, 40])
    assert (kwargs["feature_extractor"], kwargs["num_images"]) == ("small", 4)


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("prepare", [*PREPARE[1:], "--val-fraction", "0.1", "--no-progress", "--codec", "subsampling=4:4:4"]),
        ("export", ["--checkpoint", "last.ckpt", "--output", "hf/", "--format", "litgpt"]),
        ("tokenizer train", ["--modality", "avc", "--input", "clips/", "--output", "tok", "--vocab-size", "512"]),
        ("consolidate", ["ckpt_dir", "--output", "model.ckpt"]),
        ("evaluate", ["--checkpoint", "c", "--images", "a", "--output", "o", "--ratios", "0.5", "--no-unconditional"]),
        ("generate", ["--checkpoint", "c", "--prompt-images", "a", "b", "--output", "o", "--top-k", "0"]),
    ],
)
def test_print_config_is_a_config_that_gives_the_same_call(name, args, calls, capsys, tmp_path):
    recorded = calls(name)
    assert main([*name.split(), *args]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main([*name.split(), *args, "--print_config"])
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    assert yaml.safe_load(printed) == recorded[0]  # every parameter, with its value
    (tmp_path / "config.yaml").write_text(printed)
    assert main([*name.split(), "--config", str(tmp_path / "config.yaml")]) == 0
    assert recorded[1] == recorded[0]
    if name == "export":  # and options after --config override it
        assert main([*name.split(), "--config", str(tmp_path / "config.yaml"), "--format", "hf"]) == 0
        assert recorded[2] == recorded[0] | {"format": "hf"}


# ---------------------------------------------------------------------- mistakes and bugs


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--no-such-option", "1"], "unrecognized arguments: --no-such-option 1"),
        (["--val-fraction", "a lot"], 'Parser key "val_fraction"'),
        (["--modality", "png"], "Got value: png"),
        (["--codec", "size"], "--codec takes KEY=VALUE, got 'size'"),
    ],
)
def test_a_mistake_in_the_arguments_is_one_line(args, message, calls, capsys):
    recorded = calls("prepare")
    assert main([*PREPARE, *args]) == 2
    assert message in error_line(capsys, "prepare")
    assert main(["prepare", "--modality", "jpeg", "--input", "a"]) == 2  # no --output
    assert "required: output" in error_line(capsys, "prepare")
    assert recorded == []


@pytest.mark.parametrize("error", [UserError("output exists;\n  choose another"), CodecError("tables differ")])
def test_a_user_error_from_the_command_is_one_line(error, calls, capsys, monkeypatch):
    calls("export", raises=error)
    args = ["export", "--checkpoint", "last.ckpt", "--output", "out"]
    assert main(args) == 2
    assert error_line(capsys, "export") == f"jpeglm export: error: {' '.join(str(error).split())}"
    monkeypatch.setenv("JPEGLM_DEBUG", "1")
    with pytest.raises(type(error)):
        main(args)


@pytest.mark.parametrize("error", [ValueError("zip() argument 2 is shorter"), FileNotFoundError("meta.pt")])
def test_any_other_error_from_the_command_keeps_its_traceback(error, calls, capsys):
    calls("tokenizer train", raises=error)
    with pytest.raises(type(error)) as raised:
        main(["tokenizer", "train", "--modality", "jpeg", "--input", "photos/", "--output", "tok"])
    assert raised.value is error
    assert "error:" not in capsys.readouterr().err


TOY_CALLS: list[dict] = []


def toy(
    ratios: list[float] = (0.25, 0.5),
    top_k: list[int | None] = (40,),
    paths: list[str] | None = None,
    unconditional: bool = False,
    codec: dict | None = None,
    seed: int = 0,
) -> int:
    """A command to try the mechanism on: records its arguments.

    Args:
        ratios: numbers.
        top_k: numbers or none.
        paths: paths, which may hold commas.
        unconditional: a flag.
        codec: KEY=VALUE settings.
        seed: an integer.
    """
    TOY_CALLS.append({key: list(value) if isinstance(value, tuple) else value for key, value in locals().items()})
    return len(TOY_CALLS)


def toy_summary(result: int) -> str:
    return "toy done"


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


def test_a_user_error_names_options_as_they_are_typed(tmp_path, capsys):
    """`jpeglm evaluate --feature-extractor vgg` is told about --feature-extractor, not feature_extractor='...'."""
    args = ["evaluate", "--checkpoint", "c.ckpt", "--images", str(tmp_path), "--output", str(tmp_path / "o")]
    assert main([*args, "--feature-extractor", "inception"]) == 2
    line = error_line(capsys, "evaluate")
    assert "use --feature-extractor small" in line
    assert "feature_extractor" not in line
    assert command_line_spelling("ratio 0.25 keeps no marker; ratio=0.25; top_k must be >= 1", ["ratio", "top_k"]) == (
        "ratio 0.25 keeps no marker; --ratio 0.25; --top-k must be >= 1"  # a bare ratio is also a word: kept
    )
