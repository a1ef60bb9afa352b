"""One GPU, one table: the 7B recipe's training step (Trainer vs a bare FSDP2 loop, bf16 and float8), sampling
(jpeglm vs Hugging Face ``generate``), and what that means for ``recipes/jpeg_7b.yaml`` on 16 x 8 GPUs.

Sections (each skipped, with a row saying so, when the time left in ``--budget-s`` is too short for it):

1. training, at the 7B width (Llama-2-7b-hf: d 4096, 32 heads, SwiGLU 11008; vocabulary 328, padded to 384 by
   ``jpeglm.model.model_config``) at 12,288 tokens per sequence, with as many layers as fit (``--layers``; by
   default what the free GPU memory allows, at most 6) under the recipe's settings: ModelParallelStrategy (FSDP2,
   data_parallel_size 1), ``fsdp_mixed_precision: bf16``, ``precision: 32-true``, ``compile``, activation
   checkpointing, batch 2 (``--batch``; 1 when 2 does not fit). (a) Lightning's Trainer with CodecLM on random
   token batches; (b) a bare loop over the same litgpt ``GPT``: per-block activation checkpointing and
   ``torch.compile``, ``fully_shard`` with ``MixedPrecisionPolicy(bf16, reduce fp32)``, fused AdamW, clipping,
   the same LR schedule, the same batches and steps. Warm-up steps (compilation) are not timed. Figures:
   tokens/s/GPU, MFU, peak memory (``torch.cuda.max_memory_allocated`` over the timed steps), Trainer/bare
   step-time ratio. Then the same with ``float8`` (torchao, compute capability >= 8.9), else a row saying why not.
   MFU convention (PaLM's): model FLOPs per sequence = 6 N T + 12 L d T^2, N the parameters that multiply
   (all but the token embedding), L layers, d width, T tokens; the recompute of activation checkpointing is not
   counted; divided by the GPU's dense bf16 peak (:data:`PEAK_BF16`, e.g. H100 SXM / H200 989 TFLOP/s; "n/a" for
   an unknown GPU), float8 runs too.
2. sampling, the same width in bf16 with the KV cache (``--sample-layers`` layers, batch 16, 16-id prompts, 1024
   new ids, greedy, no eos): :func:`jpeglm.generation.generate` on ``load_model(..., precision="bf16")`` of a saved
   checkpoint vs ``transformers.LlamaForCausalLM.generate`` on ``jpeglm.export.export(..., format="hf")`` of the
   same checkpoint in bf16 (as benchmarks/bench_generate.py does on CPU). In bf16 the two attention kernels round
   differently, so greedy ids may part after a while on a random model; the table says where.
3. arithmetic for ``recipes/jpeg_7b.yaml`` (read from the file): the 32-layer model's parameters, memory per GPU
   (fp32 weights + gradients + AdamW moments sharded over all GPUs, the gathered bf16 blocks, activations under
   checkpointing estimated from the measured peak), and the step time from the measured time per layer and token.

    python benchmarks/bench_gpu.py [--budget-s 400] [--layers 0] [--batch 0] [--json out.json] [--smoke]

``--smoke`` runs the same code at tiny shapes on the CPU (gloo, one process, no compile, fp32 sampling, no
float8) in well under two minutes; tests/test_bench_gpu.py runs it.

On a machine with torch, lightning, transformers and tokenizers but without litgpt, litdata, jsonargparse and av
(and no network): fetch wheels where pip reaches PyPI, for that machine's Python (here 3.12, x86-64)::

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d wheels litgpt==0.5.11 jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0 \
        av==18.1.0 litdata==0.2.76 torchao

(The versions this repository's tests ran with. litgpt imports jsonargparse, whose ``[signatures]`` extra needs
docstring-parser and typeshed-client; jpeglm imports av for its codecs; the benchmark never imports litdata,
which jpeglm's package metadata declares, so litdata's own needs (boto3, obstore, tifffile) can stay behind under
``--no-deps``; torchao only for the float8 rows, in a release built for the torch there (torchao's compatibility
table).) Carry ``wheels/`` with the repository, then::

    python3 -m pip install --no-index --no-deps --find-links wheels/ wheels/*.whl
    python3 -m pip install --no-deps --no-build-isolation -e .
    python3 benchmarks/bench_gpu.py --json bench_gpu.json

On this workplace's device machine (tool ``run``; see /work/.library/device/README.md) the wheels travel as an
ignored folder named in ``carry`` (``.whl``, with ``/.whl/`` in ``.git/info/exclude``), fetched with the command
above but ``-d .whl``, and are installed at the start of the same command, since each machine starts bare:
``python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site
.whl/*.whl && export PYTHONPATH=/tmp/site:$PWD``. That machine had torch 2.11, lightning 2.6.6, transformers 5.x,
tokenizers, safetensors, PyYAML and huggingface_hub 1.x (litgpt 0.5.11 asks for < 0.35; not tried) and no torchao
(its KINDS.md); with PYTHONPATH naming the repository, jpeglm needs no install for this benchmark (it imports
none of jpeglm.data_modules or jpeglm.callbacks, the two folders only an install maps). Budget: 15 minutes of
device time per task, starts included, so one ``run`` of the default 400 s budget with ``timeout_s`` near 540.
Rows are printed (and ``--json`` rewritten) as each section ends, and a SIGTERM (``timeout``'s signal) prints the
table so far before the process exits, so a run stopped early still reports what it measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import signal
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from bench_generate import hf_greedy  # the same Hugging Face baseline as the CPU benchmark (this folder)
from litgpt import GPT, Config

from jpeglm._compat import checkpoint_wrapper
from jpeglm.model import CodecLM, convert_float8, model_config, reset_parameters, set_init, warmup_cosine

MODEL_NAME = "Llama-2-7b-hf"
VOCAB = 328  # the paper's JPEG vocabulary size (as bench_generate.py); model_config pads the rows to 384
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "jpeg_7b.yaml"
MAX_AUTO_LAYERS = 6  # more layers fit an H200, but the four training runs must fit the time budget
GIB = 2**30
#: Dense (no sparsity) bf16 tensor-core peaks, FLOP/s, matched in order against ``torch.cuda.get_device_name``.
PEAK_BF16: list[tuple[str, float]] = [
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H800", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
]
SMOKE_MODEL = {"n_embd": 64, "n_head": 4, "n_query_groups": 4, "intermediate_size": 172}


# ---------------------------------------------------------------------------------------------------- the table


@dataclass
class Row:
    """One line of the table; figures not measured (or not meaningful here) are None."""

    section: str
    name: str
    tokens_per_s: float | None = None
    mfu: float | None = None
    peak_gib: float | None = None
    ratio: float | None = None
    value: float | None = None
    unit: str = ""
    tokens: int | None = None
    note: str = ""
    skipped: str | None = None


def fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def render(rows: list[Row]) -> str:
    """The table as fixed-width text."""
    head = f"{'section':<9} {'row':<56} {'tokens/s':>10} {'MFU':>6} {'peak GiB':>9} {'ratio':>6} {'value':>12}  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.skipped:
            lines.append(f"{r.section:<9} {r.name:<56} skipped: {r.skipped}")
            continue
        value = "" if r.value is None else f"{r.value:.4g} {r.unit}"
        lines.append(
            f"{r.section:<9} {r.name:<56} {fmt(r.tokens_per_s, '10.1f'):>10} {fmt(r.mfu, '6.1%'):>6} "
            f"{fmt(r.peak_gib, '9.2f'):>9} {fmt(r.ratio, '6.3f'):>6} {value:>12}  {r.note}"
        )
    return "\n".join(lines)


class Clock:
    """The script's own wall clock against ``--budget-s``, counted from the process's start (its imports of torch,
    Lightning and litgpt take 10-20 s on a cold machine): sections run only while enough time is left."""

    def __init__(self, budget_s: float) -> None:
        self.start = time.perf_counter() - _seconds_since_start()
        self.budget_s = budget_s

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)

    def deadline(self, reserve_s: float = 5.0) -> float:
        """``time.perf_counter()`` value after which a running loop stops taking timed steps."""
        return self.start + self.budget_s - reserve_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def refuse(self, need_s: float) -> str | None:
        """Why a section that needs ``need_s`` seconds is skipped, or None when it fits."""
        left = self.left()
        return None if left >= need_s else f"time budget: {left:.0f} s left of {self.budget_s:.0f}, needs ~{need_s:.0f}"


# ---------------------------------------------------------------------------------------------------- shapes


@dataclass
class Setup:
    """One training comparison: the model, the batches and the settings both loops use."""

    overrides: dict[str, Any]
    seq_len: int
    batch: int
    warmup: int
    steps: int
    compile: bool
    device: torch.device
    float8: bool = False

    def config(self) -> Config:
        return model_config(MODEL_NAME, VOCAB, {**self.overrides, "block_size": self.seq_len})

    def label(self) -> str:
        c = self.config()
        return f"{c.n_layer}L d{c.n_embd} {self.batch}x{self.seq_len}" + ("" if self.compile else " eager")


def meta_gpt(config: Config) -> GPT:
    with torch.device("meta"):
        return GPT(config)


def block_parameters(config: Config) -> int:
    """Parameters of one transformer block (the same for every block)."""
    return sum(p.numel() for p in meta_gpt(replace(config, n_layer=1)).transformer.h[0].parameters())


def matmul_parameters(config: Config) -> int:
    """N of the FLOP count: every parameter but the token embedding (a lookup, not a matmul)."""
    gpt = meta_gpt(config)
    return sum(p.numel() for p in gpt.parameters()) - gpt.transformer.wte.weight.numel()


def flops_per_sequence(config: Config, seq_len: int) -> float:
    """Model FLOPs of one training sequence: 6 N T + 12 L d T^2 (PaLM's convention, no recompute counted)."""
    return 6 * matmul_parameters(config) * seq_len + 12 * config.n_layer * config.n_embd * seq_len**2


def working_bytes(config: Config, batch: int, seq_len: int) -> float:
    """Analytic estimate of one block's forward activations plus their gradients in bf16, and the fp32 logits:
    (16 d + 6 I) x 2 bytes per token, + 3 x 4 bytes per logit."""
    per_token = (16 * config.n_embd + 6 * config.intermediate_size) * 2 + 12 * config.padded_vocab_size
    return batch * seq_len * per_token


def training_bytes(config: Config, batch: int, seq_len: int, world: int = 1) -> float:
    """Memory per GPU of a training step under the recipe's settings (see :func:`memory_plan`)."""
    plan = memory_plan(config, batch, seq_len, world, None)
    return sum(v for k, v in plan.items() if k != "parameters")


def auto_shape(free_bytes: float, seq_len: int, layers: int, batch: int) -> tuple[int, int]:
    """(layers, batch) at the 7B width whose training step fits 85% of ``free_bytes`` (:func:`training_bytes`):
    batch 2 (the recipe's) if any layer count fits it, else 1, and the most layers up to ``MAX_AUTO_LAYERS``;
    a non-zero ``layers`` or ``batch`` is kept as given."""
    counts = [layers] if layers else list(range(MAX_AUTO_LAYERS, 0, -1))
    for b in [batch] if batch else [2, 1]:
        for n in counts:
            if training_bytes(model_config(MODEL_NAME, VOCAB, {"n_layer": n}), b, seq_len) < 0.85 * free_bytes:
                return n, b
    return layers or 1, batch or 1


# ---------------------------------------------------------------------------------------------------- devices


def peak_flops(device: torch.device) -> tuple[str, float | None]:
    """The device's name and its dense bf16 peak (FLOP/s), None when not in :data:`PEAK_BF16` (or a CPU)."""
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    return name, next((peak for key, peak in PEAK_BF16 if key in name), None)


def float8_unavailable(device: torch.device) -> str | None:
    """Why the float8 rows cannot run here, or None when they can (torchao, compute capability >= 8.9)."""
    if device.type != "cuda":
        return f"float8 needs an NVIDIA GPU with compute capability >= 8.9; this run is on {device.type}"
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        return f"float8 needs compute capability >= 8.9; {torch.cuda.get_device_name(device)} has {capability}"
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        return "torchao is not installed (pip install torchao; see this script's header for offline machines)"
    except Exception as error:  # a torchao built for another torch fails at import in other ways
        return f"torchao does not import here: {type(error).__name__}: {str(error)[:160]}"
    return None


def ensure_process_group(device: torch.device) -> None:
    """A one-process default process group (nccl on CUDA, gloo on CPU) that FSDP2's device mesh needs.

    Lightning's ModelParallelStrategy finds it already initialised and uses it; the bare loop uses it too.
    """
    if torch.distributed.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(backend, rank=0, world_size=1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def release(device: torch.device) -> None:
    """Free what the last run left: compiled graphs (they hold its modules), then cached GPU memory."""
    torch.compiler.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------- memory


def memory_plan(config: Config, batch: int, seq_len: int, world: int, activations: float | None) -> dict[str, float]:
    """Bytes per GPU of one training step under the recipe's settings (FSDP2 over ``world`` GPUs, bf16 policy).

    - state: fp32 weights, fp32 gradients and the two fp32 AdamW moments, 16 bytes a parameter, sharded over
      ``world``;
    - gathered: two blocks' bf16 weights (the one computing and the one prefetched) and one block's unsharded
      bf16 gradient with its fp32 copy for the reduce-scatter (10 bytes a block parameter), and the root
      (embedding, head, final norm) the same way (8 bytes a parameter);
    - activations: ``activations`` when measured, else the checkpointed block inputs (bf16, B T d x 2 bytes per
      layer) plus one block's recompute and backward (:func:`working_bytes`).
    """
    gpt = meta_gpt(config)
    total = sum(p.numel() for p in gpt.parameters())
    block = block_parameters(config)
    root = total - config.n_layer * block
    stored = config.n_layer * batch * seq_len * config.n_embd * 2
    return {
        "parameters": float(total),
        "state": 16 * total / world,
        "gathered": 10 * block + 8 * root,
        "activations": activations if activations is not None else stored + working_bytes(config, batch, seq_len),
    }


def activations_from_peak(peak: float, measured: Setup, target: Config, batch: int, seq_len: int) -> float:
    """Activation bytes of ``target`` at ``batch x seq_len``, scaled from a measured one-GPU peak.

    The measured peak less its state and gathered blocks (:func:`memory_plan`, one GPU) is the measured
    activations; less their checkpointed block inputs it is one block's recompute and backward, which is scaled by
    the tokens per step; the checkpointed inputs are then counted for every layer of ``target``.
    """
    config = measured.config()
    plan = memory_plan(config, measured.batch, measured.seq_len, 1, 0.0)
    activations = max(0.0, peak - plan["state"] - plan["gathered"])
    stored = config.n_layer * measured.batch * measured.seq_len * config.n_embd * 2
    working = max(0.0, activations - stored)
    scale = batch * seq_len / (measured.batch * measured.seq_len)
    return target.n_layer * batch * seq_len * target.n_embd * 2 + working * scale


# ---------------------------------------------------------------------------------------------------- training


@dataclass
class Measure:
    """What one training loop measured over its timed steps (after warm-up)."""

    seconds_per_step: float
    steps: int
    tokens: int
    peak_gib: float | None


def make_batches(setup: Setup) -> list[torch.Tensor]:
    """Random token blocks, (batch, seq_len + 1) each, the same for both loops (ids 8.. are codec ids)."""
    generator = torch.Generator().manual_seed(0)
    shape = (setup.batch, setup.seq_len + 1)
    return [torch.randint(8, VOCAB, shape, generator=generator) for _ in range(setup.warmup + setup.steps)]


class RandomBlocks(L.LightningDataModule):
    """The batches as a DataModule (no litdata): one dict with ``input_ids`` per step."""

    def __init__(self, batches: list[torch.Tensor]) -> None:
        super().__init__()
        self.batches = batches

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        data = [{"input_ids": b} for b in self.batches]
        return torch.utils.data.DataLoader(data, batch_size=None)  # already batched


class StepTimer(L.Callback):
    """Times the steps after ``warmup`` (synchronising the GPU each step) and stops the fit at ``deadline``."""

    def __init__(self, setup: Setup, deadline: float) -> None:
        self.setup, self.deadline = setup, deadline
        self.start = self.end = 0.0
        self.steps = self.tokens = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        sync(self.setup.device)
        now = time.perf_counter()
        if trainer.global_step == self.setup.warmup:
            reset_peak(self.setup.device)
            self.start = now
        elif trainer.global_step > self.setup.warmup:
            self.steps += 1
            self.tokens += batch["input_ids"][:, :-1].numel()
            self.end = now
        if now > self.deadline:
            trainer.should_stop = True

    def result(self) -> Measure:
        per_step = (self.end - self.start) / self.steps if self.steps else math.nan
        return Measure(per_step, self.steps, self.tokens, peak_gib(self.setup.device))


def lightning_run(setup: Setup, batches: list[torch.Tensor], deadline: float) -> Measure:
    """CodecLM under Lightning's Trainer with the recipe's strategy, precision and model settings."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    torch.manual_seed(0)
    model = CodecLM(
        model_name=MODEL_NAME,
        model_overrides=setup.overrides,
        vocab_size=VOCAB,
        seq_len=setup.seq_len,
        warmup_steps=setup.warmup,
        grad_clip=1.0,
        activation_checkpointing=True,
        compile=setup.compile,
        fsdp_mixed_precision="bf16",
        float8=setup.float8,
    )
    timer = StepTimer(setup, deadline)
    trainer = L.Trainer(
        accelerator=setup.device.type,
        devices=1,
        strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1),
        precision="32-true",
        max_steps=len(batches),
        callbacks=[timer],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, RandomBlocks(batches))
    return timer.result()


def build_bare(setup: Setup) -> GPT:
    """The same litgpt GPT built by hand as CodecLM.configure_model does under the strategy: on the meta device,
    (float8,) litgpt's init, checkpoint-wrapped and compiled blocks, ``fully_shard`` per block and at the root
    with the bf16 policy, then materialised on the device and initialised."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    config = setup.config()
    with torch.device("meta"):
        model = GPT(config)
        if setup.float8:
            convert_float8(model, setup.device)
    set_init(model, config)
    for i, block in enumerate(model.transformer.h):
        model.transformer.h[i] = checkpoint_wrapper(block)
    if setup.compile:
        for block in model.transformer.h:
            block.compile()
    mesh = init_device_mesh(setup.device.type, (1,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    model.to_empty(device=setup.device)
    reset_parameters(model)  # every module's: litgpt's init, and the rope cache
    return model


def bare_optimizer(model: GPT, setup: Setup, total: int) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW (fused on CUDA, decay on matrices only) and the warmup-cosine schedule, as CodecLM configures."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=3e-4,
        betas=(0.9, 0.95),
        fused=setup.device.type == "cuda",
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, warmup=setup.warmup, total=total, min_ratio=0.1)
    )
    return optimizer, schedule


def bare_step(model: GPT, optimizer: torch.optim.Optimizer, schedule: Any, ids: torch.Tensor) -> None:
    """Forward, cross-entropy in fp32, backward, clip at 1.0, AdamW, schedule: CodecLM's work per step."""
    logits = model(ids[:, :-1])  # (B, T, padded vocab)
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor; CodecLM logs the full norm, the same work
        norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad()
    schedule.step()


def bare_run(setup: Setup, batches: list[torch.Tensor], deadline: float) -> Measure:
    """The bare loop over ``batches``, timed as :class:`StepTimer` times the Trainer."""
    torch.manual_seed(0)
    model = build_bare(setup)
    optimizer, schedule = bare_optimizer(model, setup, len(batches))
    start = end = 0.0
    steps = tokens = 0
    for done, cpu_ids in enumerate(batches, start=1):
        ids = cpu_ids.to(setup.device)
        bare_step(model, optimizer, schedule, ids)
        sync(setup.device)
        now = time.perf_counter()
        if done == setup.warmup:
            reset_peak(setup.device)
            start = now
        elif done > setup.warmup:
            steps, tokens, end = steps + 1, tokens + ids[:, :-1].numel(), now
        if now > deadline:
            break
    per_step = (end - start) / steps if steps else math.nan
    return Measure(per_step, steps, tokens, peak_gib(setup.device))


def measure_row(name: str, m: Measure, setup: Setup, peak: float | None) -> Row:
    """A training row: tokens/s/GPU, MFU (model FLOPs, see the module docstring) and peak memory."""
    if not m.steps:
        return Row("train", name, skipped="the time budget ran out before a timed step")
    flops = flops_per_sequence(setup.config(), setup.seq_len) * setup.batch
    mfu = flops / m.seconds_per_step / peak if peak else None
    note = f"{m.seconds_per_step * 1e3:.0f} ms/step, {m.steps} steps"
    tokens_per_s = setup.batch * setup.seq_len / m.seconds_per_step
    return Row("train", name, tokens_per_s=tokens_per_s, mfu=mfu, peak_gib=m.peak_gib, tokens=m.tokens, note=note)


def train_pair(setup: Setup, clock: Clock, peak: float | None) -> tuple[list[Row], Measure | None]:
    """Trainer and bare loop on the same batches: their rows, the ratio row, and the Trainer's measure."""
    tag = f"{'float8' if setup.float8 else 'bf16'}, {setup.label()}"
    batches = make_batches(setup)
    measures = {}
    began = time.perf_counter()
    measures = {"Trainer + CodecLM": lightning_run(setup, batches, clock.deadline())}
    release(setup.device)
    rows = [measure_row(f"Trainer + CodecLM, {tag}", measures["Trainer + CodecLM"], setup, peak)]
    # The bare loop builds and compiles before its first timed step: start it only when about as long is left.
    reason = clock.refuse(0.8 * (time.perf_counter() - began))
    if reason:
        rows.append(Row("train", f"bare FSDP2 loop, {tag}", skipped=reason))
    else:
        measures["bare FSDP2 loop"] = bare_run(setup, batches, clock.deadline())
        release(setup.device)
        rows.append(measure_row(f"bare FSDP2 loop, {tag}", measures["bare FSDP2 loop"], setup, peak))
    ours, bare = measures["Trainer + CodecLM"], measures.get("bare FSDP2 loop")
    if ours.steps and bare is not None and bare.steps:
        ratio = ours.seconds_per_step / bare.seconds_per_step
        rows.append(Row("train", f"Trainer/bare step time, {tag}", ratio=ratio, note="target <= 1.05"))
    return rows, (ours if ours.steps else None)


# ---------------------------------------------------------------------------------------------------- sampling


@dataclass
class SampleSetup:
    """The sampling comparison: model layers, batch, prompt and new ids, the precision and the device."""

    overrides: dict[str, Any]
    batch: int
    prompt: int
    new_tokens: int
    precision: str  # "bf16" or "fp32" (load_model's names)
    device: torch.device

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bf16" else torch.float32


def save_checkpoint(path: Path, sample: SampleSetup) -> None:
    """A jpeglm checkpoint of a freshly initialised model (built and initialised on the device), weights stored in
    the sampling dtype, with the tokenizer record that load_model and export need."""
    from jpeglm.tokenizer import CodecTokenizer
    from jpeglm.vocabulary import Modality, to_records

    torch.manual_seed(0)
    context = sample.prompt + sample.new_tokens
    model = CodecLM(model_name=MODEL_NAME, model_overrides=sample.overrides, vocab_size=VOCAB, seq_len=context)
    with torch.device(sample.device):
        model.configure_model()
    state = {k: v.to("cpu", sample.dtype) for k, v in model.state_dict().items()}
    del model
    tokenizer = CodecTokenizer.train([bytes(range(256)) * 4], "jpeg", 280)
    vocabulary = to_records([Modality("jpeg", tokenizer)])
    torch.save(
        {"state_dict": state, "hyper_parameters": _hparams(sample, context), "jpeglm_vocabulary": vocabulary}, path
    )


def _hparams(sample: SampleSetup, context: int) -> dict[str, Any]:
    return {"model_name": MODEL_NAME, "model_overrides": sample.overrides, "vocab_size": VOCAB, "seq_len": context}


def make_prompts(sample: SampleSetup) -> list[list[int]]:
    """``[bos, jpeg]`` and random JPEG ids, ``prompt`` ids each (equal lengths: Hugging Face needs no padding)."""
    from jpeglm.tokenizer import BOS_ID, MODALITIES, NUM_SPECIAL

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(NUM_SPECIAL, VOCAB, (sample.batch, sample.prompt - 2), generator=generator)
    return [[BOS_ID, MODALITIES["jpeg"], *row] for row in ids.tolist()]


def timed(run: Callable[[], list[list[int]]], device: torch.device) -> tuple[list[list[int]], float]:
    sync(device)
    start = time.perf_counter()
    ids = run()
    sync(device)
    return ids, time.perf_counter() - start


def agreement(ours: list[list[int]], theirs: list[list[int]], prompt: int) -> str:
    """Whether the greedy ids agree, else where the first sequence parts (new ids in common)."""
    if ours == theirs:
        return "ids identical"
    same = sum(a == b for a, b in zip(ours, theirs, strict=True))
    first = min(
        next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), len(a))
        for a, b in zip(ours, theirs, strict=True)
    )
    return f"ids differ: {same}/{len(ours)} sequences identical, first difference after {first - prompt} new ids"


def load_both(sample: SampleSetup, tmp: Path) -> tuple[CodecLM, Any]:
    """The checkpoint loaded by jpeglm (``load_model``) and, exported as a Hugging Face Llama, by transformers."""
    from transformers import LlamaForCausalLM

    from jpeglm.checkpoints import load_model
    from jpeglm.export import export

    checkpoint = tmp / "model.ckpt"
    save_checkpoint(checkpoint, sample)
    model, _ = load_model(checkpoint, sample.device, sample.precision)
    hf = LlamaForCausalLM.from_pretrained(export(checkpoint, tmp / "hf", "hf"), dtype=sample.dtype)
    hf = hf.to(sample.device).eval()
    hf.generation_config.eos_token_id = None  # no id ends a sequence, as eos_id=None on jpeglm's side
    return model, hf


def sampling_rows(sample: SampleSetup) -> list[Row]:
    """jpeglm's generate vs Hugging Face's on the same weights, prompts and greedy settings."""
    from jpeglm.generation import generate

    with tempfile.TemporaryDirectory() as tmp:
        model, hf = load_both(sample, Path(tmp))
    prompts, n = make_prompts(sample), sample.new_tokens
    warm = min(16, n)
    generate(model, prompts, warm, temperature=0, eos_id=None)  # warm-up, both sides
    hf_greedy(hf, prompts, warm, VOCAB, sample.device)
    ours, t_ours = timed(lambda: generate(model, prompts, n, temperature=0, eos_id=None), sample.device)
    theirs, t_theirs = timed(lambda: hf_greedy(hf, prompts, n, VOCAB, sample.device), sample.device)
    assert all(len(ids) == sample.prompt + n for ids in ours + theirs), "a side stopped early"
    tokens = sample.batch * n
    layers = sample.overrides["n_layer"]
    what = f"{layers}L {sample.precision}, B{sample.batch}, {sample.prompt}+{n} ids"
    return [
        Row("sample", f"jpeglm generate, {what}", tokens_per_s=tokens / t_ours, tokens=tokens, note=f"{t_ours:.1f} s"),
        Row("sample", f"HF generate, {what}", tokens_per_s=tokens / t_theirs, tokens=tokens, note=f"{t_theirs:.1f} s"),
        Row(
            "sample",
            "jpeglm/HF tokens per second (greedy)",
            ratio=t_theirs / t_ours,
            note=agreement(ours, theirs, sample.prompt),
        ),
    ]


# ---------------------------------------------------------------------------------------------------- the recipe


@dataclass
class Recipe:
    """What recipes/jpeg_7b.yaml says about the run's size."""

    model_name: str
    gpus: int
    batch: int  # sequences per GPU per micro-batch
    accumulate: int
    seq_len: int
    max_steps: int
    overrides: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path = RECIPE) -> Recipe:
        config = yaml.safe_load(path.read_text())
        trainer, model, data = config["trainer"], config["model"], config["data"]["init_args"]
        return cls(
            model_name=model["model_name"],
            gpus=int(trainer["devices"]) * int(trainer["num_nodes"]),
            batch=int(data["batch_size"]),
            accumulate=int(trainer.get("accumulate_grad_batches", 1)),
            seq_len=int(data["seq_len"]),
            max_steps=int(trainer["max_steps"]),
            overrides=model.get("model_overrides") or {},
        )

    def config(self) -> Config:
        return model_config(self.model_name, VOCAB, {**self.overrides, "block_size": self.seq_len})


ASSUMPTIONS = [
    "MFU: model FLOPs 6*N*T + 12*L*d*T^2 per sequence (N = parameters but the token embedding; activation "
    "checkpointing's recompute not counted) over the GPU's dense bf16 peak, float8 rows too",
    "7B memory: fp32 weights + fp32 grads + 2 fp32 AdamW moments = 16 B/param sharded over all GPUs; gathered = 2 "
    "blocks' bf16 weights + 1 block's bf16 grad and fp32 copy (10 B per block param) + root at 8 B/param; "
    "activations = measured one-GPU peak less its state and gathered blocks, its checkpointed block inputs "
    "(B*T*d*2 bytes a layer) recounted for 32 layers, the rest (one block's recompute + backward) scaled by tokens",
    "7B step time: the Trainer's measured seconds per layer per token (head, embedding and optimizer folded into "
    "the layers) x 32 layers x the tokens each GPU takes per step; all-gathers and reduce-scatters fully hidden "
    "behind compute, no data-loading stalls, no slower GPUs (stragglers), validation and checkpoints not counted",
]


def plan_rows(recipe: Recipe, measured: tuple[Setup, Measure] | None, smoke: bool) -> list[Row]:
    """Parameters, memory per GPU and step time of the recipe, from its file and the training measurement."""
    config = recipe.config()
    activations = None
    if measured is not None and measured[1].peak_gib is not None:
        activations = activations_from_peak(
            measured[1].peak_gib * GIB, measured[0], config, recipe.batch, recipe.seq_len
        )
    plan = memory_plan(config, recipe.batch, recipe.seq_len, recipe.gpus, activations)
    per_gpu = (plan["state"] + plan["gathered"] + plan["activations"]) / GIB
    section, shape = "7B plan", f"{recipe.batch}x{recipe.seq_len}"
    source = "from the measured peak" if activations is not None else "analytic (no GPU peak measured)"
    rows = [
        Row(section, f"parameters, {config.n_layer} layers", value=plan["parameters"] / 1e9, unit="B"),
        Row(
            section,
            f"fp32 weights+grads+AdamW / GPU (16 B/param / {recipe.gpus})",
            value=plan["state"] / GIB,
            unit="GiB",
        ),
        Row(section, "gathered bf16 blocks + block grads / GPU", value=plan["gathered"] / GIB, unit="GiB"),
        Row(
            section,
            f"activations, checkpointed, {shape} / GPU",
            value=plan["activations"] / GIB,
            unit="GiB",
            note=source,
        ),
        Row(section, "memory / GPU", value=per_gpu, unit="GiB"),
    ]
    return rows + step_rows(recipe, config, measured, smoke)


def step_rows(recipe: Recipe, config: Config, measured: tuple[Setup, Measure] | None, smoke: bool) -> list[Row]:
    """Step time, tokens/s/GPU and the whole run's days from the measured seconds per layer per token."""
    section = "7B plan"
    if measured is None:
        return [Row(section, "step time", skipped="no bf16 training measurement (skipped or failed)")]
    setup, m = measured
    per_layer_token = m.seconds_per_step / (setup.config().n_layer * setup.batch * setup.seq_len)
    tokens_per_gpu = recipe.batch * recipe.accumulate * recipe.seq_len
    step = per_layer_token * config.n_layer * tokens_per_gpu
    note = "no communication exposed"
    if setup.device.type != "cuda":
        note = "from smoke shapes on CPU: not an estimate" if smoke else "measured on CPU: not an estimate"
    global_tokens = tokens_per_gpu * recipe.gpus
    return [
        Row(section, f"step time ({global_tokens:,} tokens on {recipe.gpus} GPUs)", value=step, unit="s", note=note),
        Row(section, "tokens/s/GPU", tokens_per_s=tokens_per_gpu / step, note=note),
        Row(section, f"{recipe.max_steps:,} steps", value=recipe.max_steps * step / 86400, unit="days", note=note),
    ]


# ---------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, same code paths")
    parser.add_argument("--json", type=Path, help="also write the table's figures here")
    parser.add_argument(
        "--budget-s", type=float, default=400.0, help="skip sections rather than run past this (from process start)"
    )
    parser.add_argument("--layers", type=int, default=0, help="training layers (0: what fits, at most 6)")
    parser.add_argument("--batch", type=int, default=0, help="training sequences per step (0: 2 if it fits, else 1)")
    parser.add_argument("--seq-len", type=int, default=12288)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per loop")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-float8", action="store_true")
    parser.add_argument("--sample-layers", type=int, default=8)
    parser.add_argument("--sample-batch", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=1024)
    return parser.parse_args(argv)


def setups(args: argparse.Namespace, device: torch.device) -> tuple[Setup, SampleSetup]:
    """The training and sampling shapes: the 7B width on a GPU, tiny ones with ``--smoke``."""
    if args.smoke:
        train = Setup({"n_layer": 2, **SMOKE_MODEL}, 128, 2, 2, 5, compile=False, device=device)
        return train, SampleSetup({"n_layer": 2, **SMOKE_MODEL}, 4, 16, 32, "fp32", device)
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 64 * GIB
    layers, batch = auto_shape(free, args.seq_len, args.layers, args.batch)
    train = Setup({"n_layer": layers}, args.seq_len, batch, args.warmup, args.steps, not args.no_compile, device)
    precision = "bf16" if device.type == "cuda" else "fp32"
    sample = SampleSetup(
        {"n_layer": args.sample_layers}, args.sample_batch, args.prompt, args.new_tokens, precision, device
    )
    return train, sample


def needs(args: argparse.Namespace) -> dict[str, float]:
    """Seconds each section is expected to take at most (compilation included); checked before it starts."""
    return {"train": 20.0, "sample": 15.0} if args.smoke else {"train": 150.0, "sample": 100.0}


def training_section(train: Setup, clock: Clock, need: float, peak: float | None) -> tuple[list[Row], Measure | None]:
    """The bf16 pair; the float8 pair is :func:`float8_section`."""
    reason = clock.refuse(need)
    if reason:
        return [Row("train", f"Trainer + bare loop, bf16, {train.label()}", skipped=reason)], None
    try:
        ensure_process_group(train.device)
        return train_pair(train, clock, peak)
    except Exception as error:  # the table still comes out, with the other sections
        rows = [failed("train", f"Trainer + bare loop, bf16, {train.label()}", error, train.device)]
    if not train.compile or clock.refuse(need):
        return rows, None
    try:  # once more without torch.compile (the first run on a GPU is where inductor can fail): rows say "eager"
        more, measure = train_pair(replace(train, compile=False), clock, peak)
        return rows + more, measure
    except Exception as error:
        eager = replace(train, compile=False)
        return rows + [failed("train", f"Trainer + bare loop, bf16, {eager.label()}", error, train.device)], None


def float8_section(train: Setup, clock: Clock, need: float, peak: float | None, off: bool) -> list[Row]:
    """The float8 pair, or a row saying why not (no torchao, no float8 GPU, --no-float8, time, failure)."""
    name = f"Trainer + bare loop, float8, {train.label()}"
    try:
        reason = "--no-float8" if off else float8_unavailable(train.device) or clock.refuse(need)
        if reason:
            return [Row("train", name, skipped=reason)]
        ensure_process_group(train.device)
        return train_pair(replace(train, float8=True), clock, peak)[0]
    except Exception as error:
        return [failed("train", name, error, train.device)]


def sample_section(sample: SampleSetup, clock: Clock, need: float) -> list[Row]:
    """The sampling rows, or a row saying why not (time, failure)."""
    name = f"jpeglm vs HF generate, {sample.overrides['n_layer']}L"
    reason = clock.refuse(need)
    if reason:
        return [Row("sample", name, skipped=reason)]
    try:
        rows = sampling_rows(sample)
    except Exception as error:
        return [failed("sample", name, error, sample.device)]
    release(sample.device)  # the two models go before the float8 runs
    return rows


def failed(section: str, name: str, error: Exception, device: torch.device) -> Row:
    """A row for a section that raised (the traceback goes to stderr); what it held is released."""
    traceback.print_exc()
    release(device)
    first = (str(error).splitlines() or [""])[0][:200]
    return Row(section, name, skipped=f"failed: {type(error).__name__}: {first}")


class Report:
    """The rows so far: each section's rows are printed (flushed) and ``--json`` rewritten as the section ends, so a
    run stopped early (the device's time limit) still reports what it measured; :meth:`table` is the whole table in
    its final order (training, float8, sampling, the plan) whatever order the sections ran in."""

    SLOTS = ("train", "float8", "sample", "plan")

    def __init__(self, json_path: Path | None) -> None:
        self.json_path, self.meta = json_path, {}
        self.slots: dict[str, list[Row]] = {slot: [] for slot in self.SLOTS}

    def add(self, slot: str, rows: list[Row]) -> None:
        self.slots[slot] += rows
        for line in render(rows).splitlines()[2:]:
            print(line, flush=True)
        if self.json_path:
            self.json_path.write_text(json.dumps({**self.meta, "rows": [asdict(r) for r in self.rows()]}, indent=2))

    def rows(self) -> list[Row]:
        return [row for slot in self.SLOTS for row in self.slots[slot]]

    def table(self) -> str:
        meta, smoke = self.meta, self.meta.get("smoke")
        peak = meta.get("peak_bf16_flops")
        peak = "n/a" if peak is None else f"{peak / 1e12:.0f} TFLOP/s"
        lines = [
            f"\ndevice: {meta.get('device')} (dense bf16 peak {peak}); torch {torch.__version__}; "
            f"{meta.get('seconds', 0):.0f} s of a {meta.get('budget_s', 0):.0f} s budget"
            + (" [smoke: tiny shapes on CPU]" if smoke else ""),
            render(self.rows()),
        ]
        return "\n".join(lines + [f"- {line}" for line in ASSUMPTIONS])


def run(args: argparse.Namespace, report: Report) -> None:
    """Every section in priority order (bf16 training, sampling, float8, the plan), each reported as it ends."""
    clock = Clock(args.budget_s)
    device = torch.device("cuda", 0) if torch.cuda.is_available() and not args.smoke else torch.device("cpu")
    train, sample = setups(args, device)
    name, peak = peak_flops(device)
    report.meta.update(device=name, peak_bf16_flops=peak, smoke=args.smoke, budget_s=args.budget_s)
    report.meta.update(torch=torch.__version__, assumptions=ASSUMPTIONS, seconds=clock.elapsed())
    need = needs(args)
    print(render([]).splitlines()[0], flush=True)
    started = time.perf_counter()
    rows, measure = training_section(train, clock, need["train"], peak)
    report.add("train", rows)
    if measure is not None:
        need["train"] = max(need["train"] / 3, 1.1 * (time.perf_counter() - started))
    report.add("sample", sample_section(sample, clock, need["sample"]))
    report.add("float8", float8_section(train, clock, need["train"], peak, args.no_float8))
    report.add("plan", plan_rows(Recipe.read(), (train, measure) if measure else None, args.smoke))
    report.meta["seconds"] = clock.elapsed()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.smoke:
        torch.set_num_threads(1)  # see bench_generate.py: on a shared 2-core machine more threads are noise
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    report = Report(args.json)

    def stopped(signum: int, frame: Any) -> None:  # `timeout` ends the run: the table so far, then exit
        print(report.table() + "\n(stopped by signal before the end)", flush=True)
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, stopped)
    try:
        run(args, report)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    print(report.table())
    if args.json:
        args.json.write_text(json.dumps({**report.meta, "rows": [asdict(r) for r in report.rows()]}, indent=2) + "\n")


def _seconds_since_start() -> float:
    """Seconds since this process started (psutil, which litgpt needs too); 0 when that cannot be told."""
    try:
        import psutil

        return max(0.0, time.time() - psutil.Process().create_time())
    except Exception:
        return 0.0


if __name__ == "__main__":
    main()
