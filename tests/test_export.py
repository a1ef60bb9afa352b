"""`jpeglm export`: the exported Hugging Face Llama and litgpt checkpoints give CodecLM's logits exactly."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from litgpt import GPT, Config

from jpeglm.checkpoints import load_model
from jpeglm.cli import main
from jpeglm.errors import UserError
from jpeglm.export import export
from jpeglm.model import CodecLM
from jpeglm.tokenizer import CodecTokenizer
from jpeglm.vocabulary import Modality as Source
from jpeglm.vocabulary import to_records

# n_query_groups < n_head: grouped-query attention, whose k/v split the conversion must get right.
TINY = {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_query_groups": 2, "intermediate_size": 172}


@pytest.fixture(scope="module")
def trained(jpeg_tokenizer) -> CodecLM:
    """A tiny CodecLM with non-trivial weights (norms included) and the tokenizer records of its data."""
    torch.manual_seed(0)
    model = CodecLM(model_overrides=TINY, vocab_size=328, seq_len=64)
    model.configure_model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # norms away from 1, so a swapped norm weight would show
    model.vocabulary = to_records([Source("jpeg", jpeg_tokenizer)])
    return model.eval()


def save(model: CodecLM, path, optimizer: dict | None = None) -> None:
    """A checkpoint as Lightning writes one (the keys export reads; the optimizer's state if given)."""
    checkpoint = {
        "state_dict": model.state_dict(),
        "hyper_parameters": dict(model.hparams),
        "jpeglm_sources": model.vocabulary,
    }
    if optimizer is not None:
        checkpoint["optimizer_states"] = [optimizer]
    torch.save(checkpoint, path)


def save_sharded(model: CodecLM, path, state_dict: dict | None = None, optimizer: dict | None = None) -> None:
    """A directory in the layout of Lightning's ModelParallelStrategy: tensors in *.distcp, the rest in meta.pt.

    ``state_dict``: the tensors to save (default: the model's); ``optimizer``: an optimizer state saved next to them.
    """
    import torch.distributed.checkpoint as dcp

    tensors = {"state_dict": state_dict or model.state_dict()} | ({"optimizer_0": optimizer} if optimizer else {})
    dcp.save(tensors, checkpoint_id=path, no_dist=True)
    torch.save({"hyper_parameters": dict(model.hparams), "jpeglm_sources": model.vocabulary}, path / "meta.pt")


@pytest.fixture(scope="module")
def checkpoint(trained, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "last.ckpt"
    save(trained, path)
    return path


def reference_logits(model: CodecLM) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 328, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return ids, model(ids)  # (B, T, padded vocab)


def test_hf_export_gives_codeclm_logits(trained, checkpoint, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = export(checkpoint, tmp_path / "hf", "hf")
    assert {"config.json", "model.safetensors", "tokenizer.json", "codec_spec.json", "jpeglm_sources.json"} <= {
        p.name for p in out.iterdir()
    }
    hf = transformers.LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    assert hf.config.num_key_value_heads == 2
    assert hf.config.vocab_size == trained.config.padded_vocab_size
    ids, expected = reference_logits(trained)
    with torch.no_grad():
        got = hf(ids).logits
    assert (got - expected).abs().max() < 1e-4

    sources = json.loads((out / "jpeglm_sources.json").read_text())
    assert [(s["modality"], s["offset"]) for s in sources] == [("jpeg", 0)]
    tokenizer = CodecTokenizer.load(out)  # the tokenizer files are a jpeglm tokenizer directory
    assert tokenizer.tokenizer.to_str() == trained.vocabulary[0]["tokenizer"]
    assert tokenizer.codec_spec == trained.vocabulary[0]["codec_spec"]


def test_litgpt_export_loads_strictly_and_gives_codeclm_logits(trained, checkpoint, tmp_path):
    assert (
        main(["export", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "lit"), "--format", "litgpt"]) == 0
    )
    out = tmp_path / "lit"
    gpt = GPT(Config.from_file(out / "model_config.yaml"))
    gpt.load_state_dict(torch.load(out / "lit_model.pth", weights_only=True), strict=True)
    ids, expected = reference_logits(trained)
    with torch.no_grad():
        assert torch.equal(gpt.eval()(ids), expected)
    assert (out / "tokenizer.json").is_file()


def test_several_sources_get_a_directory_each(trained, jpeg_tokenizer, tmp_path):
    text = CodecTokenizer(jpeg_tokenizer.tokenizer, "text", None)  # any second tokenizer will do
    trained.vocabulary = to_records([Source("jpeg", jpeg_tokenizer), Source("text", text, offset=320)])
    try:
        save(trained, tmp_path / "mixed.ckpt")
    finally:
        trained.vocabulary = to_records([Source("jpeg", jpeg_tokenizer)])
    out = export(tmp_path / "mixed.ckpt", tmp_path / "lit", "litgpt")
    sources = json.loads((out / "jpeglm_sources.json").read_text())
    assert [(s["modality"], s["offset"], s["tokenizer_dir"]) for s in sources] == [
        ("jpeg", 0, "jpeg"),
        ("text", 320, "text"),
    ]
    assert CodecTokenizer.load(out / "text").codec_spec is None
    assert CodecTokenizer.load(out / "jpeg").modality == "jpeg"


def test_precision_bf16_exports_the_weights_rounded(trained, checkpoint, tmp_path):
    out = export(checkpoint, tmp_path / "lit", "litgpt", precision="bf16")
    weights = torch.load(out / "lit_model.pth", weights_only=True)
    expected = {k.removeprefix("model."): v for k, v in trained.state_dict().items()}
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k].to(torch.bfloat16)) for k in expected)
    out = export(checkpoint, tmp_path / "hf", "hf", precision="bf16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # noqa: SIM118 (not a dict)
    as_stored = export(checkpoint, tmp_path / "as_stored", "hf")  # the default keeps the checkpoint's dtype
    assert json.loads((as_stored / "config.json").read_text())["torch_dtype"] == "float32"


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_sharded_checkpoint_exports_like_a_single_file(trained, checkpoint, tmp_path):
    sharded = tmp_path / "last.ckpt"
    save_sharded(trained, sharded)
    export(sharded, tmp_path / "from_shards", "litgpt")
    export(checkpoint, tmp_path / "from_file", "litgpt")
    a = torch.load(tmp_path / "from_shards" / "lit_model.pth", weights_only=True)
    b = torch.load(tmp_path / "from_file" / "lit_model.pth", weights_only=True)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


FSDP2_ONE_STEP = """
import sys, torch, lightning as L
from lightning.pytorch.strategies import ModelParallelStrategy
from jpeglm.model import CodecLM

L.seed_everything(0)
model = CodecLM(model_overrides=%r, vocab_size=328, seq_len=64, warmup_steps=1)
model.vocabulary = [{"modality": "jpeg", "offset": 0, "tokenizer": open(sys.argv[2]).read(), "codec_spec": None}]
data = [{"input_ids": torch.randint(0, 328, (65,))} for _ in range(8)]
strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=1, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=2))
trainer.save_checkpoint(sys.argv[1])
"""


@pytest.mark.slow
def test_fsdp2_sharded_checkpoint_exports_to_hf(jpeg_tokenizer, tmp_path):
    """One real FSDP2 step over two CPU processes, saved sharded, exported: HF gives the trained model's logits."""
    transformers = pytest.importorskip("transformers")
    script, tokenizer = tmp_path / "one_step.py", tmp_path / "tokenizer.json"
    script.write_text(FSDP2_ONE_STEP % (TINY,))
    tokenizer.write_text(jpeg_tokenizer.tokenizer.to_str())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sharded = tmp_path / "last.ckpt"
    result = subprocess.run(
        [sys.executable, str(script), str(sharded), str(tokenizer)],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "MASTER_PORT": str(port)},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert len(list(sharded.glob("*.distcp"))) == 2

    out = export(sharded, tmp_path / "hf", "hf")
    model, _ = load_model(sharded)
    hf = transformers.LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    ids, expected = reference_logits(model)
    with torch.no_grad():
        assert (hf(ids).logits - expected).abs().max() < 1e-4


def test_existing_output_is_refused(checkpoint, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        export(checkpoint, tmp_path / "out", "hf")
    assert main(["export", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "out")]) == 2
    assert "jpeglm export: error:" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
