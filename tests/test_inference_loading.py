"""`load_model` builds a checkpoint's CodecLM for inference: no training wrappers, weights read straight into
the dtype asked for (bf16 never passes through an fp32 copy of the model), single files and sharded directories
alike.

The memory test runs in a process of its own (``python tests/test_inference_loading.py CHECKPOINT...``) that
samples the process's anonymous memory (``RssAnon``: what it allocated, not the checkpoint's file pages, which
a memory-mapped read leaves to the page cache) at every torch function call while it loads.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_export import TINY, save, save_sharded

from jpeglm.checkpoints import inference_dtype, load_model, unwrapped_name
from jpeglm.errors import UserError
from jpeglm.model import CodecLM
from jpeglm.vocabulary import Modality, to_records

WRAPPED_PARTS = ("_checkpoint_wrapped_module.", "_orig_mod.")


def perturbed(model: CodecLM) -> CodecLM:
    """``model`` built, with weights away from their init (norms too), in eval mode."""
    torch.manual_seed(0)
    model.configure_model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def adam_like(model: CodecLM) -> dict:
    """An optimizer state as Lightning saves one: a moment per parameter (as much again as the weights)."""
    return {"state": {i: {"exp_avg": torch.ones_like(p)} for i, p in enumerate(model.parameters())}}


def logits(model: CodecLM) -> torch.Tensor:
    ids = torch.randint(0, 328, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids)  # (B, T, padded vocab)


@pytest.fixture(scope="module")
def wrapped(jpeg_tokenizer) -> CodecLM:
    """A model trained a few steps with ``activation_checkpointing`` (every block in a checkpoint wrapper,
    recomputed in the backward pass)."""
    model = perturbed(CodecLM(model_overrides=TINY, vocab_size=328, seq_len=64, activation_checkpointing=True))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 328, (4, 33), generator=torch.Generator().manual_seed(2))
    model.train()
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.vocabulary = to_records([Modality("jpeg", jpeg_tokenizer)])
    return model.eval()


@pytest.fixture(scope="module")
def wrapped_checkpoint(wrapped, tmp_path_factory) -> Path:
    """A checkpoint of ``wrapped`` whose names carry the wrappers' parts, as ``named_parameters`` shows them (and
    ``_orig_mod.`` of a ``torch.compile(block)`` in block 1), and whose hyperparameters ask for both wrappers."""
    state = {f"model.{name}": p.detach() for name, p in wrapped.model.named_parameters()}
    state = {k.replace("transformer.h.1.", "transformer.h.1._orig_mod."): v for k, v in state.items()}
    assert all(any(part in k for part in WRAPPED_PARTS) for k in state if ".h." in k)
    path = tmp_path_factory.mktemp("ckpt") / "wrapped.ckpt"
    hyper_parameters = {**wrapped.hparams, "activation_checkpointing": True, "compile": True}
    torch.save(
        {"state_dict": state, "hyper_parameters": hyper_parameters, "jpeglm_vocabulary": wrapped.vocabulary}, path
    )
    return path


def test_wrapped_training_checkpoint_loads_into_a_plain_model(wrapped, wrapped_checkpoint, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("load_model compiled something")

    monkeypatch.setattr(torch.nn.Module, "compile", refuse)
    monkeypatch.setattr(torch, "compile", refuse)
    model, modalities = load_model(wrapped_checkpoint)  # CPU: fp32 by default
    assert (model.hparams.activation_checkpointing, model.hparams.compile) == (False, False)
    assert {type(m).__name__ for m in model.modules()}.isdisjoint({"CheckpointWrapper", "OptimizedModule"})
    names = [name for name, _ in model.named_parameters()]
    assert not [n for n in names if any(part in n for part in WRAPPED_PARTS)]
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert not model.training
    assert [m.name for m in modalities] == ["jpeg"]
    assert torch.equal(logits(model), logits(wrapped))  # the same fp32 computation, bit for bit


def test_unwrapped_name_strips_whole_parts_only():
    assert unwrapped_name("model.transformer.h.0._checkpoint_wrapped_module.attn.qkv.weight") == (
        "model.transformer.h.0.attn.qkv.weight"
    )
    assert unwrapped_name("_orig_mod.model.transformer.h.0._orig_mod.norm_1.weight") == (
        "model.transformer.h.0.norm_1.weight"
    )
    assert unwrapped_name("model.my_orig_mod.weight") == "model.my_orig_mod.weight"


def test_bf16_weights_are_the_fp32_ones_rounded_and_give_close_logits(wrapped, wrapped_checkpoint):
    model, _ = load_model(wrapped_checkpoint, precision="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    expected = wrapped.state_dict()  # plain names: the checkpoint wrapper drops its part from state_dict()
    for name, weight in model.state_dict().items():
        assert torch.equal(weight, expected[name].to(torch.bfloat16)), name
    got, expected = logits(model), logits(wrapped)
    assert got.dtype == torch.bfloat16
    # bf16 rounds each weight and activation to 8 significant bits (relative error <= 2^-9); through the 2 blocks
    # and the head that moved these logits (within +-4) by 0.047 at most and 0.006 on average, as measured: 1.2%
    # and 0.15% of the largest. The bounds are about twice that; one transposed weight matrix moves them by ~5.5
    # and ~0.8.
    scale = expected.abs().max()
    diff = (got.float() - expected).abs()
    assert diff.max() <= 0.03 * scale
    assert diff.mean() <= 0.005 * scale


def test_default_precision_follows_the_device():
    assert inference_dtype(None, "cuda") == torch.bfloat16
    assert inference_dtype(None, "cuda:1") == torch.bfloat16
    assert inference_dtype(None, "cpu") == torch.float32
    assert inference_dtype("fp32", "cuda") == torch.float32
    with pytest.raises(UserError, match="unknown precision 'fp16'"):
        inference_dtype("fp16", "cpu")


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_sharded_directory_loads_like_the_single_file(wrapped, wrapped_checkpoint, tmp_path, precision):
    sharded = tmp_path / "last.ckpt"
    state = torch.load(wrapped_checkpoint, weights_only=True)["state_dict"]  # names with the wrappers' parts
    save_sharded(wrapped, sharded, state_dict=state, optimizer=adam_like(wrapped))  # the optimizer state is ignored
    from_dir, _ = load_model(sharded, precision=precision)
    from_file, _ = load_model(wrapped_checkpoint, precision=precision)
    a, b = from_dir.state_dict(), from_file.state_dict()
    assert a.keys() == b.keys()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    assert all(a[k].dtype == b[k].dtype == dtype for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(logits(from_dir), logits(from_file))


# ------------------------------------------------------------------------------------------------ memory

BIG = {"n_layer": 4, "n_embd": 512, "n_head": 8, "n_query_groups": 8, "intermediate_size": 1376}  # 13.0M parameters


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads RssAnon from Linux's /proc")
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_bf16_loading_never_holds_an_fp32_copy_of_the_model(jpeg_tokenizer, tmp_path):
    """Peak anonymous memory while loading in bf16: the bf16 model and one fp32 tensor at most, from a file and
    from a sharded directory. The same meter on the naive load (build in fp32, load, then ``.bfloat16()``) sees
    the fp32 copy, so the meter works."""
    model = CodecLM(model_overrides=BIG, vocab_size=328, seq_len=256)
    model.configure_model()
    model.vocabulary = to_records([Modality("jpeg", jpeg_tokenizer)])
    parameters = sum(p.numel() for p in model.parameters())
    largest = max(p.numel() for p in model.parameters())
    save(model, tmp_path / "big.ckpt", optimizer=adam_like(model))  # never read: memory-mapped, never touched
    save_sharded(model, tmp_path / "big_dir", optimizer=adam_like(model))  # never read: not asked for
    del model
    gc.collect()
    # Allocations above 128 KiB are their own mappings, given back to the system when freed, so RssAnon follows
    # what is alive (glibc otherwise keeps freed blocks for reuse once it has seen big ones freed).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    paths = [str(tmp_path / "big.ckpt"), str(tmp_path / "big_dir")]
    result = subprocess.run(
        [sys.executable, __file__, *paths], capture_output=True, text=True, timeout=120, env=env, check=False
    )
    assert result.returncode == 0, result.stderr[-4000:]
    peaks = json.loads(result.stdout.strip().splitlines()[-1])  # bytes above the baseline, per load
    bf16, fp32 = 2 * parameters, 4 * parameters
    allowed = bf16 + 4 * largest + 4 * 2**20  # one tensor as stored, and 4 MiB for everything else
    assert peaks["file"] <= allowed, peaks
    assert peaks["directory"] <= allowed, peaks
    assert peaks["naive"] >= fp32 + bf16 * 0.9, peaks  # the meter sees the fp32 model that the naive way builds
    assert allowed < fp32  # the test tells the two apart


def _rss_anon() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def _peak_while(load) -> int:
    """Peak RssAnon above the level before ``load()``, sampled at every torch function call and at the end."""
    from torch.overrides import TorchFunctionMode

    class Sample(TorchFunctionMode):
        peak = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            Sample.peak = max(Sample.peak, _rss_anon())
            return out

    gc.collect()
    before = _rss_anon()
    with Sample():
        model = load()
    peak = max(Sample.peak, _rss_anon())
    del model
    gc.collect()
    return peak - before


def _naive_load(path: str) -> CodecLM:
    """What load_model must not do: the model built in fp32, the checkpoint read whole, then cast to bf16."""
    from jpeglm.checkpoints import load_checkpoint

    checkpoint = load_checkpoint(path)
    model = CodecLM.from_hyperparameters(checkpoint["hyper_parameters"])
    model.configure_model()
    model.load_state_dict(checkpoint["state_dict"])
    return model.bfloat16()


def _measure(file: str, directory: str) -> dict[str, int]:
    import torch.distributed.checkpoint  # noqa: F401  (imports, and the first load's one-off costs, come first)

    load_model(file, precision="bf16")
    load_model(directory, precision="bf16")
    return {
        "file": _peak_while(lambda: load_model(file, precision="bf16")[0]),
        "directory": _peak_while(lambda: load_model(directory, precision="bf16")[0]),
        "naive": _peak_while(lambda: _naive_load(file)),
    }


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    print(json.dumps(_measure(*sys.argv[1:3])))
