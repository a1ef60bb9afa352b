"""bf16 the FSDP2 way (``CodecLM(fsdp_mixed_precision="bf16")``), checked on CPU with gloo.

FSDP2 runs go through Lightning's ``ModelParallelStrategy`` in processes that this file starts on itself
(``python tests/test_precision.py SCENARIO OUT``), one per rank, with torchrun's variables set so that Lightning
launches nothing itself. Rank 0 writes what it measured to ``OUT/SCENARIO.json`` and the tests read it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import types
from pathlib import Path

import lightning as L
import pytest
import torch
from litgpt import GPT
from ranks import wait_for_ranks

import jpeglm.model
from jpeglm.errors import UserError
from jpeglm.model import CodecLM, convert_float8, fsdp_mixed_precision_policy

TINY = {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_query_groups": 2, "intermediate_size": 172}
VOCAB, SEQ_LEN = 40, 32
COLLECTIVES = ("all_gather_into_tensor", "all_gather_single", "reduce_scatter_tensor", "reduce_scatter_single")


# ------------------------------------------------------------------------------------------------ the worker


class Blocks(L.LightningDataModule):
    """Sixteen rotations of a periodic id sequence (learnable in a few steps), 4 per batch, the same every run."""

    def train_dataloader(self):
        pattern = torch.arange(8, VOCAB).repeat(3)[: SEQ_LEN + 1]
        data = [{"input_ids": pattern.roll(-i)} for i in range(16)]
        return torch.utils.data.DataLoader(data, batch_size=4)


class Record(L.Callback):
    """Each step's loss and block 0's type; with ``probe``, the dtypes FSDP2 computes, sends and keeps.

    ``seen`` maps what was looked at to the set of (type, dtype) or dtype strings met, over every step.
    """

    def __init__(self, probe: bool = False) -> None:
        self.probe = probe
        self.losses: list[float] = []
        self.seen: dict[str, set[str]] = {}
        self.originals: dict[str, object] = {}

    def note(self, key: str, value: object) -> None:
        self.seen.setdefault(key, set()).add(str(value))

    def on_fit_start(self, trainer, pl_module) -> None:
        gpt = pl_module.model
        self.note("block", type(gpt.transformer.h[0]).__name__)
        self.note("block qkv", type(gpt.transformer.h[0].attn.qkv).__name__)
        if not self.probe:
            return
        for name, linear in (("block qkv", gpt.transformer.h[0].attn.qkv), ("lm_head", gpt.lm_head)):
            linear.register_forward_pre_hook(self.look(name))
        for name in COLLECTIVES:  # what FSDP2 all-gathers and reduce-scatters (it calls these at run time)
            if hasattr(torch.distributed, name):
                self.originals[name] = getattr(torch.distributed, name)
                setattr(torch.distributed, name, self.spy(name, self.originals[name]))

    def look(self, name: str):
        """A forward pre-hook noting the weight a Linear computes with, and its input."""

        def hook(module, args):
            self.note(f"{name} weight in forward", (type(module.weight).__name__, module.weight.dtype))
            self.note(f"{name} input", args[0].dtype)

        return hook

    def spy(self, name: str, original):
        """``original`` (a torch.distributed collective), noting the dtype of what it sends."""

        def call(*args, **kwargs):
            tensors = [a for a in [*args, *kwargs.values()] if isinstance(a, torch.Tensor)]
            self.note(name, tensors[-1].dtype)  # (output, input): the input comes last
            return original(*args, **kwargs)

        return call

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        for p in pl_module.parameters() if self.probe else []:
            self.note("gradient", (type(p.grad).__name__, p.grad.to_local().dtype))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        state = trainer.optimizers[0].state
        for p in pl_module.parameters() if self.probe else []:
            self.note("parameter", (type(p).__name__, p.to_local().dtype))
            self.note("exp_avg", state[p]["exp_avg"].to_local().dtype)
            self.note("exp_avg_sq", state[p]["exp_avg_sq"].to_local().dtype)

    def on_fit_end(self, trainer, pl_module) -> None:
        for name, original in self.originals.items():
            setattr(torch.distributed, name, original)

    def result(self) -> dict:
        return {"losses": self.losses, "seen": {k: sorted(v) for k, v in self.seen.items()}}


def train(world: int, steps: int, probe: bool = False, accelerator: str = "cpu", **model_args) -> dict:
    """Train the tiny model ``steps`` steps under ModelParallelStrategy (FSDP2 over ``world`` ranks), 32-true."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    L.seed_everything(0, verbose=False)
    model = CodecLM(
        model_overrides=TINY, vocab_size=VOCAB, seq_len=SEQ_LEN, learning_rate=3e-3, warmup_steps=2, **model_args
    )
    record = Record(probe)
    built = jpeglm.model.GPT

    class Spied(built):  # notes where configure_model builds the network
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            record.note("built on", self.lm_head.weight.device.type)

    jpeglm.model.GPT = Spied
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=world,
        strategy=ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1),
        precision="32-true",
        max_steps=steps,
        callbacks=[record],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    try:
        trainer.fit(model, Blocks())
    finally:
        jpeglm.model.GPT = built
    return record.result()


SPEEDUPS = {"checkpointing": {"activation_checkpointing": True}, "compile": {"compile": True}}
SPEEDUPS["both"] = {**SPEEDUPS["checkpointing"], **SPEEDUPS["compile"]}

SCENARIOS = {
    "probe": lambda: {name: train(2, 2, probe=True, fsdp_mixed_precision=name) for name in ("bf16", "none")},
    "curves": lambda: {name: train(2, 30, fsdp_mixed_precision=name) for name in ("bf16", "none")},
    **{
        case: lambda case=case: {
            "eager": train(1, 6, fsdp_mixed_precision="bf16"),
            case: train(1, 6, fsdp_mixed_precision="bf16", **SPEEDUPS[case]),
        }
        for case in SPEEDUPS
    },
    "float8": lambda: {
        name: train(1, 10, accelerator="cuda", fsdp_mixed_precision="bf16", float8=name == "float8")
        for name in ("bf16", "float8")
    },
}


def launch(scenario: str, world: int, out: Path, timeout: int = 240) -> dict:
    """Run ``scenario`` in ``world`` processes (one per rank) and return what rank 0 wrote."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    processes = []
    for rank in range(world):
        env = {
            **os.environ,
            **{"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": "0"},
            **{"WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank)},
            "OMP_NUM_THREADS": "1",
            "TORCHINDUCTOR_COMPILE_THREADS": "1",  # no pool of compile workers: on 2 cores it only adds start-up
        }
        command = [sys.executable, __file__, scenario, str(out)]
        processes.append(
            subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    wait_for_ranks(processes, timeout)
    return json.loads((out / f"{scenario}.json").read_text())


# ------------------------------------------------------------------------------------------------ the tests


def float8_gpu() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def cpp_compiler() -> str | None:
    """The C++ compiler inductor would call on CPU (``$CXX``, else g++), if it is installed."""
    return shutil.which(os.environ.get("CXX", "g++"))


def max_relative_deviation(losses: list[float], reference: list[float]) -> float:
    assert len(losses) == len(reference) > 0
    return max(abs(a - b) / abs(b) for a, b in zip(losses, reference, strict=True))


def test_the_policy_is_bf16_compute_with_fp32_reduction_and_only_with_32_true():
    policy = fsdp_mixed_precision_policy("bf16", fsdp2=True, precision="32-true")
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert fsdp_mixed_precision_policy("none", fsdp2=False, precision="bf16-mixed") is None
    with pytest.raises(UserError, match="needs trainer.precision 32-true, not bf16-mixed: .*would cast again"):
        fsdp_mixed_precision_policy("bf16", fsdp2=True, precision="bf16-mixed")
    with pytest.raises(UserError, match="bf16-true would make the master weights bf16"):
        fsdp_mixed_precision_policy("bf16", fsdp2=True, precision="bf16-true")


def test_the_policy_without_model_parallel_strategy_is_a_user_error(tmp_path):
    model = CodecLM(model_overrides=TINY, vocab_size=VOCAB, seq_len=SEQ_LEN, fsdp_mixed_precision="bf16")
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    with pytest.raises(UserError, match="needs trainer.strategy lightning.pytorch.strategies.ModelParallelStrategy"):
        trainer.fit(model, Blocks())


def test_a_model_built_outside_a_trainer_ignores_the_policy():
    # `jpeglm generate` / `export` rebuild a 7B checkpoint's model from its hyperparameters, with no Trainer.
    model = CodecLM(model_overrides=TINY, vocab_size=VOCAB, seq_len=SEQ_LEN, fsdp_mixed_precision="bf16")
    model.configure_model()
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model(torch.randint(8, VOCAB, (1, 8))).dtype == torch.float32


@pytest.mark.slow
def test_fsdp2_gathers_and_computes_in_bf16_while_shards_gradients_and_adam_state_stay_fp32(tmp_path):
    runs = launch("probe", 2, tmp_path)
    bf16, none = runs["bf16"]["seen"], runs["none"]["seen"]
    # In the forward each block's Linear computes with the all-gathered weight (a plain tensor), in bf16, on bf16
    # inputs; the head too (the root module carries the same policy). Without the policy all of it is fp32.
    for name in ("block qkv", "lm_head"):
        assert bf16[f"{name} weight in forward"] == ["('Parameter', torch.bfloat16)"], name
        assert bf16[f"{name} input"] == ["torch.bfloat16"], name
        assert none[f"{name} weight in forward"] == ["('Parameter', torch.float32)"], name
    # What travels: the all-gathers move bf16 (half of fp32's bytes), the gradient reduce-scatters fp32.
    assert bf16["all_gather_single"] == ["torch.bfloat16"]
    assert bf16["reduce_scatter_single"] == ["torch.float32"]
    assert none["all_gather_single"] == ["torch.float32"]
    # Built on the meta device, so no rank ever holds a whole fp32 model (26 GB at 7B), then materialised as shards.
    assert bf16["built on"] == none["built on"] == ["meta"]
    # What is kept: fp32 shards (DTensors), fp32 sharded gradients, fp32 AdamW moments.
    assert bf16["parameter"] == ["('DTensor', torch.float32)"]
    assert bf16["gradient"] == ["('DTensor', torch.float32)"]
    assert bf16["exp_avg"] == bf16["exp_avg_sq"] == ["torch.float32"]


@pytest.mark.slow
def test_30_steps_under_the_policy_follow_the_fp32_loss_curve(tmp_path):
    """Every step's loss within 3% (relative) of the fp32 run's, and not equal to it.

    Measured here (2 ranks, 30 steps, loss 4.40 -> 0.08): the policy's largest deviation from fp32 was 0.56%
    (0.0025 nats); bf16-mixed autocast's 0.40%; bf16 master weights (bf16-true, the mistake the policy avoids)
    21%. So 3% leaves 5x margin and still catches master weights kept in bf16.
    """
    runs = launch("curves", 2, tmp_path)
    bf16, fp32 = runs["bf16"]["losses"], runs["none"]["losses"]
    assert len(bf16) == 30
    assert fp32[-1] < 0.1 * fp32[0]  # the curve goes somewhere: a comparison along it means something
    deviation = max_relative_deviation(bf16, fp32)
    assert 0 < deviation < 0.03, f"max relative deviation from fp32: {deviation:.4f}"


@pytest.mark.slow
@pytest.mark.parametrize("case", ["checkpointing", "compile", "both"])
def test_activation_checkpointing_and_compile_under_the_policy_match_eager(case, tmp_path):
    """Six steps on one FSDP2 rank under the policy give eager's losses: exactly with activation checkpointing
    (the recompute repeats the same bf16 ops), within 1% (relative) with ``torch.compile`` (measured: 0.093%, from
    inductor's fused kernels; with checkpointing as well, the same).
    """
    if "compile" in case and not cpp_compiler():
        pytest.skip("torch.compile on CPU needs a C++ compiler (g++, or $CXX) to build inductor's kernels; none found")
    runs = launch(case, 1, tmp_path, timeout=300)
    eager, other = runs["eager"], runs[case]
    wrapped = "checkpointing" in case or case == "both"
    (block,) = other["seen"]["block"]  # fully_shard renames a module's class: FSDPBlock, FSDPCheckpointWrapper
    assert block == ("FSDPCheckpointWrapper" if wrapped else "FSDPBlock")
    deviation = max_relative_deviation(other["losses"], eager["losses"])
    if case == "checkpointing":
        assert deviation == 0
    else:
        assert 0 < deviation < 0.01, f"max relative deviation from eager: {deviation:.5f}"  # > 0: compiled code ran


def test_float8_without_torchao_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # what an environment without torchao imports
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    with pytest.raises(UserError, match="model.float8 needs torchao: pip install torchao"):
        convert_float8(
            GPT(CodecLM(model_overrides=TINY, vocab_size=VOCAB, seq_len=SEQ_LEN).config), torch.device("cpu")
        )


def test_float8_on_cpu_is_a_user_error(monkeypatch, tmp_path):
    fake = types.ModuleType("torchao.float8")  # installed or not, the device is refused before anything converts
    fake.Float8LinearConfig = fake.convert_to_float8_training = None
    monkeypatch.setitem(sys.modules, "torchao", types.ModuleType("torchao"))
    monkeypatch.setitem(sys.modules, "torchao.float8", fake)
    model = CodecLM(model_overrides=TINY, vocab_size=VOCAB, seq_len=SEQ_LEN, float8=True)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False, default_root_dir=tmp_path
    )
    with pytest.raises(UserError, match=r"needs an NVIDIA GPU with float8 matmuls \(compute capability 8.9\+.*not cpu"):
        trainer.fit(model, Blocks())
    unattached = CodecLM(model_overrides=TINY, vocab_size=VOCAB, seq_len=SEQ_LEN, float8=True)
    unattached.configure_model()  # no Trainer (sampling, export): float8 is ignored, the model is the plain one
    assert type(unattached.model.transformer.h[0].attn.qkv) is torch.nn.Linear


@pytest.mark.requires_cuda
@pytest.mark.skipif(not float8_gpu(), reason="needs an NVIDIA GPU with float8 matmuls (compute capability 8.9+)")
def test_float8_trains_like_bf16_on_a_gpu(tmp_path):
    """Ten steps on one GPU (FSDP2, the bf16 policy): float8 blocks follow bf16's losses within 10% (relative).

    Not measured on a GPU when written (no GPU at hand). On CPU, where torch 2.14 emulates float8 matmuls, the
    same float8 path (FSDP2 over 2 ranks, uint8 all-gathers) stayed within 3.6% of bf16 over 30 steps.
    """
    pytest.importorskip("torchao.float8", reason="float8 needs torchao: pip install torchao")
    runs = launch("float8", 1, tmp_path, timeout=300)
    assert runs["float8"]["seen"]["block qkv"] == ["Float8Linear"]
    assert runs["bf16"]["seen"]["block qkv"] == ["Linear"]
    assert max_relative_deviation(runs["float8"]["losses"], runs["bf16"]["losses"]) < 0.10


if __name__ == "__main__":
    result = SCENARIOS[sys.argv[1]]()
    if int(os.environ["RANK"]) == 0:
        (Path(sys.argv[2]) / f"{sys.argv[1]}.json").write_text(json.dumps(result))
