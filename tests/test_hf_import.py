"""`jpeglm import --hf DIR`: the released JPEG-LM weights, on a stand-in built the same way offline.

The stand-in: a sentencepiece BPE trained on the fixture photos' streams as Braille characters (byte b is
chr(b + 10240)), with <unk> / <s> / </s> at 0 / 1 / 2 and no dummy prefix, and a tiny LlamaForCausalLM over its
pieces, saved with save_pretrained next to the tokenizer.model.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from ranks import wait_for_ranks

from jpeglm.checkpoints import load_checkpoint, load_model, open_checkpoint
from jpeglm.cli import main
from jpeglm.codecs import JpegCodec
from jpeglm.errors import UserError
from jpeglm.generate import generate_samples
from jpeglm.generation import make_prompt
from jpeglm.hf_import import BRAILLE, hf_import, read_sentencepiece, released_vocabulary

spm = pytest.importorskip("sentencepiece")
transformers = pytest.importorskip("transformers")

TINY_LLAMA = {
    "hidden_size": 64,
    "intermediate_size": 172,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # grouped-query attention: the q/k/v split must be right
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}


def braille(stream: bytes) -> str:
    return "".join(chr(BRAILLE + b) for b in stream)


def train_sentencepiece(streams: list[bytes], vocab_size: int) -> bytes:
    """A sentencepiece BPE over Braille-mapped streams (every byte among the pieces, as in the release)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([braille(s) for s in streams] + [braille(bytes(range(256)))]),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        add_dummy_prefix=False,
        normalization_rule_name="identity",
        max_sentence_length=1 << 20,
        split_by_whitespace=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
        num_threads=1,
    )
    return model.getvalue()


@pytest.fixture(scope="module")
def released(tmp_path_factory, jpeg_streams):
    """A directory shaped like the released model: config.json, model.safetensors, tokenizer.model."""
    directory = tmp_path_factory.mktemp("jpeg-lm")
    proto = train_sentencepiece(jpeg_streams, 320)
    (directory / "tokenizer.model").write_bytes(proto)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=320, pad_token_id=0, bos_token_id=1, eos_token_id=2, **TINY_LLAMA)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # norms away from 1, so a swapped norm weight would show
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def imported(released, tmp_path_factory):
    """The stand-in imported with the command line, for 64x64 pictures (a tiny model writes them quickly)."""
    out = tmp_path_factory.mktemp("imported") / "jpeg-lm.ckpt"
    assert main(["import", "--hf", str(released), "--output", str(out), "--codec", "size=64"]) == 0
    return out


def test_tokenizer_is_the_released_one(released, jpeg_streams):
    processor = spm.SentencePieceProcessor(model_file=str(released / "tokenizer.model"))
    vocabulary = released_vocabulary(read_sentencepiece(released / "tokenizer.model"), JpegCodec())
    tokenizer, rows = vocabulary.tokenizer, vocabulary.rows
    assert tokenizer.tag_id is None
    assert rows[:3] == [0, 1, 2]
    assert sorted(r for r in rows if r >= 0) == list(range(320))  # every piece of the stand-in kept, once
    for stream in jpeg_streams:
        ids = tokenizer.encode(stream)
        assert [rows[i] for i in ids] == processor.encode(braille(stream))  # sentencepiece's own ids
        assert tokenizer.decode(ids) == stream
        assert b"".join(tokenizer.token_bytes(i) for i in ids) == stream
        assert make_prompt(tokenizer, stream) == [1, *ids]
        assert tokenizer.encode(stream, add_special_tokens=True) == [1, *ids, 2]  # what `jpeglm prepare` writes
    noise = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    assert tokenizer.decode(tokenizer.encode(noise)) == noise  # lossless on any bytes


def test_prefix_consistency_at_markers(released, jpeg_streams):
    """A prompt cut after any FFD7 marker tokenizes to a prefix of the full stream's tokens: on the fixtures,
    at this vocabulary size (320, the paper's) always; merges may cross markers, so not by construction."""
    vocabulary = released_vocabulary(read_sentencepiece(released / "tokenizer.model"), JpegCodec())
    tokenizer, codec = vocabulary.tokenizer, JpegCodec()
    breaks = cuts = 0
    for stream in jpeg_streams:
        full = tokenizer.encode(stream)
        for rows in range(1, 32):
            prompt = tokenizer.encode(codec.prompt(stream, rows / 32))
            cuts += 1
            breaks += full[: len(prompt)] != prompt
    assert (breaks, cuts) == (0, 18 * 31)


def test_imported_logits_equal_the_hf_models(released, imported):
    hf = transformers.LlamaForCausalLM.from_pretrained(released, torch_dtype=torch.float32).eval()
    model, modalities = load_model(imported, precision="fp32")
    rows = load_checkpoint(imported)["jpeglm_import"]["rows"]
    ours = {piece: i for i, piece in enumerate(rows) if piece >= 0}  # sentencepiece id -> jpeglm id
    pieces = torch.randint(0, 320, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(pieces).logits  # (2, 64, 320)
        got = model(pieces.apply_(ours.__getitem__))[..., [ours[i] for i in range(320)]]
    assert (got - expected).abs().max() < 1e-4
    assert modalities[0].tokenizer.tag_id is None
    assert modalities[0].codec.spec == JpegCodec(size=64).spec


def test_generate_writes_files_that_open(imported, photos, tmp_path):
    records = generate_samples(
        str(imported), str(tmp_path / "samples"), prompt_images=[str(photos[0])], num_samples=1, progress=False
    )
    records += generate_samples(
        str(imported), str(tmp_path / "uncond"), unconditional=True, num_samples=1, progress=False
    )
    assert [r["complete"] for r in records] == [True, True]  # under the JPEG grammar: whole images
    for r, folder in zip(records, ("samples", "uncond"), strict=True):
        with Image.open(tmp_path / folder / r["file"]) as im:
            im.load()
            assert im.size == (64, 64)


@pytest.fixture(scope="module")
def prepared(imported, photos, tmp_path_factory):
    """The fixture photos prepared with the imported tokenizer (the ids the imported weights know)."""
    data = tmp_path_factory.mktemp("prepared") / "data"
    tokenizer = imported.with_name("jpeg-lm_tokenizer")
    assert main([*prepare_args(photos, data), "--tokenizer", str(tokenizer)]) == 0
    return data


def prepare_args(photos, data) -> list[str]:
    inputs = ["--input", str(photos[0].parent), "--output", str(data), "--val-fraction", "0", "--num-workers", "1"]
    return ["prepare", "--modality", "jpeg", *inputs, "--no-progress"]


def write_recipe(path, data, root, **trainer) -> str:
    """A 3-step fine-tuning recipe on ``data`` (one CPU device unless ``trainer`` says otherwise)."""
    recipe = {
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 3,
            "limit_val_batches": 0,
            "logger": False,
            "enable_progress_bar": False,
            "default_root_dir": str(root),
            **trainer,
        },
        "model": {"learning_rate": 1e-4, "warmup_steps": 1},
        "data": {
            "class_path": "jpeglm.data_modules.CodecDataModule",
            "init_args": {"data_dir": str(data), "seq_len": 128, "batch_size": 2},
        },
    }
    path.write_text(json.dumps(recipe))
    return str(path)


def assert_trained_from_the_imported_weights(imported, trained) -> dict:
    """Every weight of ``trained`` (a checkpoint file or sharded directory) within 0.01 of the imported one, and some
    moved: 3 AdamW steps at 1e-4 move a weight by 3e-4 at most, a random initialisation by far more."""
    meta, read = open_checkpoint(trained)
    before, after = load_checkpoint(imported)["state_dict"], read(None, "cpu")
    assert after.keys() == before.keys()
    moved = [float((after[name] - before[name]).abs().max()) for name in before]
    assert 0 < max(moved) < 0.01
    assert meta["jpeglm_vocabulary"] == load_checkpoint(imported)["jpeglm_vocabulary"]
    return meta


def test_fine_tuning_starts_from_the_imported_weights(imported, prepared, tmp_path):
    model_yaml = imported.with_name("jpeg-lm_model.yaml")
    assert yaml.safe_load(model_yaml.read_text())["model"]["init_from"] == str(imported.resolve())
    recipe = write_recipe(tmp_path / "recipe.yaml", prepared, tmp_path / "run")
    assert main(["fit", "--config", recipe, "--config", str(model_yaml)]) == 0
    (trained,) = (tmp_path / "run").rglob("*.ckpt")
    assert assert_trained_from_the_imported_weights(imported, trained)["global_step"] == 3
    # --ckpt_path still resumes a run (its weights, optimizer and step win over init_from's)
    resume = ["fit", "--config", recipe, "--config", str(model_yaml), "--trainer.max_steps", "4"]
    assert main([*resume, "--ckpt_path", str(trained)]) == 0
    (resumed,) = set((tmp_path / "run").rglob("*.ckpt")) - {trained}
    assert load_checkpoint(resumed)["global_step"] == 4


def test_fine_tuning_refuses_data_of_another_vocabulary(imported, photos, jpeg_tokenizer, tmp_path, capsys):
    data = tmp_path / "data"
    other = jpeg_tokenizer.save(tmp_path / "other_tokenizer")  # the same size (320), other merges
    assert main([*prepare_args(photos, data), "--tokenizer", str(other)]) == 0
    recipe = write_recipe(tmp_path / "recipe.yaml", data, tmp_path / "run")
    assert main(["fit", "--config", recipe, "--config", str(imported.with_name("jpeg-lm_model.yaml"))]) == 2
    error = capsys.readouterr().err
    assert "model.init_from: the data's ids are not those the weights in" in error
    assert "another jpeg tokenizer" in error
    assert "jpeglm prepare --tokenizer" in error
    assert not list((tmp_path / "run").rglob("*.ckpt"))


@pytest.mark.slow
def test_fine_tuning_under_fsdp2_starts_from_the_imported_weights(imported, prepared, tmp_path):
    """`jpeglm fit` in 2 gloo processes under ModelParallelStrategy (FSDP2, as the 7B recipes: activation
    checkpointing, the bf16 policy), the processes started here with torchrun's variables (tests/test_precision.py)."""
    strategy = {
        "class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
        "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1},
    }
    recipe = write_recipe(tmp_path / "recipe.yaml", prepared, tmp_path / "run", devices=2, strategy=strategy)
    model = ["--model.activation_checkpointing", "true", "--model.fsdp_mixed_precision", "bf16"]
    argv = ["fit", "--config", recipe, "--config", str(imported.with_name("jpeg-lm_model.yaml")), *model]
    run_ranks(argv, world=2)
    (trained,) = (tmp_path / "run").rglob("*.ckpt")
    assert trained.is_dir()  # FSDP2's sharded checkpoint
    assert assert_trained_from_the_imported_weights(imported, trained)["global_step"] == 3


def run_ranks(argv: list[str], world: int, timeout: int = 240) -> None:
    """``jpeglm ARGV`` in ``world`` processes, one per rank, with torchrun's variables (Lightning starts none)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = "import sys; from jpeglm.cli import main; sys.exit(main(sys.argv[1:]))"
    processes = []
    for rank in range(world):
        env = {
            **os.environ,
            **{"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": "0", "OMP_NUM_THREADS": "1"},
            **{"WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank)},
        }
        processes.append(
            subprocess.Popen(
                [sys.executable, "-c", code, *argv],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    wait_for_ranks(processes, timeout)


def test_import_refuses_what_is_not_the_release(released, tmp_path):
    with pytest.raises(UserError, match="no sentencepiece tokenizer"):
        read_sentencepiece(tmp_path / "tokenizer.model")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UserError, match="not a plain Llama"):
        hf_import(str(tmp_path), str(tmp_path / "x.ckpt"))
