"""Sampling from an FSDP2-sharded model (2 gloo processes on CPU): one all-gather per sharded module per generate
call, the KV cache in the compute dtype, the weights untouched and training going on afterwards."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from test_generation import TINY, VOCAB, spy_on_kv_cache

from jpeglm.generation import generate, sampling
from jpeglm.model import CodecLM
from jpeglm.tokenizer import BOS_ID

BLOCKS = 4
NEW = 64
PROMPTS = [[BOS_ID, 3], [BOS_ID, 3, 20, 21]]
BF16 = {"param_dtype": torch.bfloat16, "reduce_dtype": torch.float32}


def four_blocks() -> CodecLM:
    torch.manual_seed(0)
    model = CodecLM(model_overrides={**TINY, "n_layer": BLOCKS}, vocab_size=VOCAB, seq_len=128)
    model.configure_model()
    return model


def shard(model: CodecLM, policy: dict | None = None) -> None:
    """As jpeglm.model.shard_fsdp2 (each block, then the root), with an optional MixedPrecisionPolicy."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh("cpu", (2,))
    kwargs = {"mp_policy": MixedPrecisionPolicy(**policy)} if policy else {}
    for block in model.model.transformer.h:
        fully_shard(block, mesh=mesh, **kwargs)
    fully_shard(model.model, mesh=mesh, **kwargs)


@contextlib.contextmanager
def all_gathers() -> Iterator[list[torch.dtype]]:
    """The dtype of every all-gather while inside (FSDP2 gathers through ``dist.all_gather_single`` in torch
    2.14, through ``dist.all_gather_into_tensor`` in some versions: both are counted)."""
    gathered: list[torch.dtype] = []
    names = ("all_gather_single", "all_gather_into_tensor")
    real = {name: getattr(dist, name) for name in names if hasattr(dist, name)}

    def counted(fn):
        def gather(output, *args, **kwargs):
            gathered.append(output.dtype)
            return fn(output, *args, **kwargs)

        return gather

    for name, fn in real.items():
        setattr(dist, name, counted(fn))
    try:
        yield gathered
    finally:
        for name, fn in real.items():
            setattr(dist, name, fn)


@contextlib.contextmanager
def gathering_per_forward() -> Iterator[None]:
    """generate as it was: FSDP2 gathers each block for each forward."""
    real = sampling.gathered
    sampling.gathered = lambda model: contextlib.nullcontext()
    try:
        yield
    finally:
        sampling.gathered = real


def local_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.to_local().clone() for name, p in model.named_parameters()}


def timed_generate(model: CodecLM) -> tuple[list[list[int]], float]:
    start = time.perf_counter()
    outputs = generate(model, PROMPTS, NEW, seed=1, eos_id=None)
    return outputs, time.perf_counter() - start


def _sharded_fp32(result: dict) -> None:
    model = four_blocks()
    result["expected"] = generate(model, PROMPTS, NEW, seed=1, eos_id=None)  # the same weights, unsharded
    x = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        expected_loss = model(x).sum()
    shard(model)
    model.train()
    before = local_weights(model)
    with all_gathers() as gathers:  # the first forward of this model: FSDP2's root set-up happens inside
        result["outputs"], result["seconds"] = timed_generate(model)
    result["gathers"] = len(gathers)
    with all_gathers() as gathers:
        result["recomputed"] = generate(model, PROMPTS, NEW, seed=1, eos_id=None, use_kv_cache=False)
    result["recomputed_gathers"] = len(gathers)
    result["weights_kept"] = all(torch.equal(p, before[n]) for n, p in local_weights(model).items())
    result["training"] = model.training
    # Each module's reshard-after-forward setting is back: blocks free their parameters after a forward, the
    # root keeps its own (FSDP2's default), so a second forward gathers the blocks only.
    result["forward_gathers"] = []
    for _ in range(2):
        with all_gathers() as gathers, torch.no_grad():
            model(x)
        result["forward_gathers"].append(len(gathers))
    loss = model(x).sum()  # training goes on after sampling
    loss.backward()
    result["loss_matches"] = torch.allclose(loss, expected_loss)
    result["grads"] = all(p.grad is not None and torch.isfinite(p.grad.to_local()).all() for p in model.parameters())
    with all_gathers() as gathers, gathering_per_forward():
        result["old_outputs"], result["old_seconds"] = timed_generate(model)
    result["old_gathers"] = len(gathers)


def _sharded_bf16(result: dict) -> None:
    model = four_blocks()
    shard(model, BF16)
    gpt = model.model
    allocated = spy_on_kv_cache(gpt)
    weights = []
    with all_gathers() as gathers:
        result["bf16_outputs"] = generate(
            model, PROMPTS, NEW, seed=1, eos_id=None, on_step=lambda n: weights.append(gpt.lm_head.weight.dtype)
        )
    result["bf16_gathers"] = gathers
    result["bf16_cache"] = allocated
    result["bf16_gathered_weights"] = set(weights)
    result["bf16_stored"] = {p.dtype for p in model.parameters()}
    model(torch.tensor([PROMPTS[1]])).sum().backward()
    result["bf16_grads"] = all(torch.isfinite(p.grad.to_local()).all() for p in model.parameters())


def _worker(rank: int, path: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        result: dict = {}
        _sharded_fp32(result)
        _sharded_bf16(result)
        torch.save(result, f"{path}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    import torch.multiprocessing as mp

    path = tmp_path_factory.mktemp("fsdp") / "out"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(str(path), port), nprocs=2)
    return [torch.load(f"{path}.{rank}") for rank in range(2)]


@pytest.mark.slow
def test_generate_gathers_each_sharded_module_once(results):
    for result in results:
        assert result["gathers"] <= BLOCKS + 1  # each block and the root, once for the whole generation
        assert result["recomputed_gathers"] <= BLOCKS + 1  # without the KV cache too
        assert result["recomputed"] == result["expected"]
        assert result["old_gathers"] > NEW * BLOCKS  # gathering per forward: the counter does count
        assert result["outputs"] == result["old_outputs"] == result["expected"]  # the unsharded model's ids
        assert result["weights_kept"]
        assert result["training"]
        assert result["forward_gathers"] == [BLOCKS + 1, BLOCKS]
        assert result["loss_matches"]
        assert result["grads"]
    assert results[0]["outputs"] == results[1]["outputs"]
    print(
        f"\n{NEW} tokens, {BLOCKS} blocks, 2 ranks: {results[0]['old_gathers']} all-gathers in "
        f"{results[0]['old_seconds']:.2f} s before, {results[0]['gathers']} in {results[0]['seconds']:.2f} s now"
    )


@pytest.mark.slow
def test_a_bf16_policy_samples_in_bf16(results):
    for result in results:
        assert result["bf16_gathers"] == [torch.bfloat16] * (BLOCKS + 1)  # gathered once, in param_dtype
        assert result["bf16_gathered_weights"] == {torch.bfloat16}  # what the forwards compute with
        assert result["bf16_cache"] == [torch.bfloat16]  # as allocated, not converted at the first write
        assert result["bf16_stored"] == {torch.float32}  # the sharded weights stay fp32
        assert result["bf16_grads"]
        assert all(len(out) == len(p) + NEW for out, p in zip(result["bf16_outputs"], PROMPTS, strict=True))
    assert results[0]["bf16_outputs"] == results[1]["bf16_outputs"]
