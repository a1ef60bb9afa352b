"""Every shipped recipe is parsed by the real CLI; the 7B ones are built on the meta device and counted."""

import subprocess
import sys
from argparse import ArgumentError
from pathlib import Path

import pytest
import yaml
from lightning.pytorch import LightningDataModule

from jpeglm.model import CodecLM, count_parameters
from jpeglm.train import JpeglmCLI, cli

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
BIG = {"jpeg_7b.yaml": 328, "avc_7b.yaml": 1032, "jpeg_text_7b.yaml": None}


class ParseOnly(JpeglmCLI):
    """The real parser and links, without building the trainer, model and data (no data or GPU needed)."""

    def instantiate_classes(self) -> None:
        pass


def parse(recipe: Path, *extra: str):
    return ParseOnly(
        CodecLM,
        LightningDataModule,
        subclass_mode_data=True,
        run=False,
        args=["--config", str(recipe), *extra],
    ).config


def test_recipes_are_shipped():
    names = {r.name for r in RECIPES}
    assert {"jpeg_7b.yaml", "avc_7b.yaml", "jpeg_text_7b.yaml", "jpeg_tiny.yaml"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_parses_with_the_real_cli(recipe):
    config = parse(recipe)
    assert config.model.seq_len == config.data.init_args.seq_len  # linked, not repeated
    assert config.trainer.max_steps > 0


@pytest.mark.parametrize("name", ["jpeg_7b.yaml", "avc_7b.yaml"])
def test_7b_recipes_build_llama_2_7b_on_the_meta_device(name):
    config = parse(Path(RECIPES[0]).parent / name)
    params = count_parameters(config.model.model_name, BIG[name], config.model.model_overrides)
    expected = {"jpeg_7b.yaml": 6.479e9, "avc_7b.yaml": 6.485e9}[name]
    assert params == pytest.approx(expected, rel=1e-3)


def test_7b_budget_comments_match_the_settings():
    for name, context in (("jpeg_7b.yaml", 12288), ("avc_7b.yaml", 32768)):
        config = parse(Path(RECIPES[0]).parent / name)
        t = config.trainer
        sequences = t.num_nodes * t.devices * config.data.init_args.batch_size * t.accumulate_grad_batches
        assert config.data.init_args.seq_len == context
        assert t.max_steps == -(-228_000_000_000 // (sequences * context))  # 2 epochs x 114B tokens
        assert t.strategy.init_args.data_parallel_size == t.num_nodes * t.devices


@pytest.mark.parametrize("name", sorted(BIG))
def test_7b_recipes_use_bf16_the_fsdp2_way(name):
    config = parse(Path(RECIPES[0]).parent / name)
    assert config.trainer.strategy.class_path == "lightning.pytorch.strategies.ModelParallelStrategy"
    assert config.model.fsdp_mixed_precision == "bf16"  # FSDP2's MixedPrecisionPolicy: bf16 gathers and compute
    assert config.trainer.precision == "32-true"  # and no autocast on top of it (jpeglm fit refuses bf16-mixed)


def test_print_config_round_trips(tmp_path):
    recipe = Path(RECIPES[0]).parent / "jpeg_tiny.yaml"
    command = [sys.executable, "-m", "jpeglm.cli", "fit", "--config"]
    first = subprocess.run([*command, str(recipe), "--print_config"], capture_output=True, text=True, check=True)
    (tmp_path / "printed.yaml").write_text(first.stdout)
    second = subprocess.run(
        [*command, str(tmp_path / "printed.yaml"), "--print_config"], capture_output=True, text=True, check=True
    )
    assert yaml.safe_load(first.stdout) == yaml.safe_load(second.stdout)
    assert yaml.safe_load(first.stdout)["model"]["model_overrides"]["n_layer"] >= 1


def test_unknown_key_is_a_clear_error():
    with pytest.raises(ArgumentError, match="no_such_option"):  # `jpeglm fit` prints it as one line (test_cli.py)
        cli(["fit", "--config", str(Path(RECIPES[0]).parent / "jpeg_tiny.yaml"), "--model.no_such_option=1"])


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_a_derived_run_writes_under_its_own_root_dir(recipe, tmp_path):
    """The recipe names its run directory once: --trainer.default_root_dir moves the logs and checkpoints too."""
    from jpeglm.train import under_root_dir

    trainer = parse(recipe).trainer
    under_root_dir(trainer)
    root = trainer.default_root_dir
    assert root == f"runs/{recipe.stem}"  # named after the recipe
    assert trainer.logger is None  # Lightning's default: TensorBoard under default_root_dir
    [checkpoints] = [c for c in trainer.callbacks if c.class_path.endswith("ModelCheckpoint")]
    assert checkpoints.init_args.dirpath == f"{root}/checkpoints"
    mine = parse(recipe, "--trainer.default_root_dir", str(tmp_path / "mine")).trainer
    under_root_dir(mine)
    assert mine.logger is None
    assert [c.init_args.dirpath for c in mine.callbacks if "dirpath" in (c.get("init_args") or {})] == [
        str(tmp_path / "mine/checkpoints")
    ]
    settings = [line.split("#")[0] for line in recipe.read_text().splitlines()]  # without the comments
    assert sum(f"runs/{recipe.stem}" in line for line in settings) == 1  # named once


def test_a_logger_without_a_place_writes_under_the_root_dir(tmp_path):
    from jpeglm.train import under_root_dir

    logger = '{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": ""}}'
    trainer = parse(RECIPES[-1], "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", logger).trainer
    under_root_dir(trainer)
    assert trainer.logger.init_args.save_dir == str(tmp_path)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_the_last_checkpoint_is_the_final_model(recipe):
    """ModelCheckpoint(save_last=True) refreshes last.ckpt only when it saves on its step interval (Lightning 2.6:
    `on_train_end` saves only if no last checkpoint was ever written), so an interval that does not divide
    max_steps leaves last.ckpt behind the trained model (jpeg_tiny's was step 1200 of 1400)."""
    config = yaml.safe_load(recipe.read_text())
    checkpoints = [
        c["init_args"] for c in config["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint")
    ]
    for args in checkpoints:
        if args.get("save_last") and args.get("every_n_train_steps"):
            assert config["trainer"]["max_steps"] % args["every_n_train_steps"] == 0, recipe.name
