"""`jpeglm import --hf DIR`: the released JPEG-LM weights, on a stand-in built the same way offline.

The stand-in: a sentencepiece BPE trained on the fixture photos' streams as Braille characters (byte b is
chr(b + 10240)), with <unk> / <s> / </s> at 0 / 1 / 2 and no dummy prefix, and a tiny LlamaForCausalLM over its
pieces, saved with save_pretrained next to the tokenizer.model.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from jpeglm.checkpoints import load_checkpoint, load_model
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


def test_fine_tuning_starts_from_the_imported_weights(imported, photos, tmp_path):
    tokenizer_dir = imported.with_name("jpeg-lm_tokenizer")
    data = tmp_path / "data"
    prepare = [
        "prepare",
        "--modality",
        "jpeg",
        "--input",
        str(photos[0].parent),
        "--output",
        str(data),
        "--no-progress",
    ]
    assert main([*prepare, "--tokenizer", str(tokenizer_dir), "--val-fraction", "0", "--num-workers", "1"]) == 0
    recipe = {
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 3,
            "limit_val_batches": 0,
            "logger": False,
            "enable_progress_bar": False,
            "default_root_dir": str(tmp_path / "run"),
        },
        "model": {"learning_rate": 1e-4, "warmup_steps": 1},
        "data": {
            "class_path": "jpeglm.data_modules.CodecDataModule",
            "init_args": {"data_dir": str(data), "seq_len": 128, "batch_size": 2},
        },
    }
    (tmp_path / "recipe.yaml").write_text(json.dumps(recipe))
    model_yaml = imported.with_name("jpeg-lm_model.yaml")
    argv = ["fit", "--config", str(tmp_path / "recipe.yaml"), "--config", str(model_yaml), "--ckpt_path", str(imported)]
    assert main(argv) == 0
    (last,) = (tmp_path / "run").rglob("*.ckpt")
    checkpoint = load_checkpoint(last)
    assert checkpoint["global_step"] == 3
    assert checkpoint["jpeglm_vocabulary"] == load_checkpoint(imported)["jpeglm_vocabulary"]
    before = load_checkpoint(imported)["state_dict"]["model.transformer.h.0.attn.qkv.weight"]
    after = checkpoint["state_dict"]["model.transformer.h.0.attn.qkv.weight"]
    assert 0 < (after - before).abs().max() < 0.01  # trained from the imported weights, not from scratch


def test_import_refuses_what_is_not_the_release(released, tmp_path):
    with pytest.raises(UserError, match="no sentencepiece tokenizer"):
        read_sentencepiece(tmp_path / "tokenizer.model")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UserError, match="not a plain Llama"):
        hf_import(str(tmp_path), str(tmp_path / "x.ckpt"))
