import math

import lightning as L
import pytest
import torch

from jpeglm.model import CodecLM, count_parameters, warmup_cosine

TINY = {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_query_groups": 2, "intermediate_size": 172}


def tiny_model(**kwargs) -> CodecLM:
    model = CodecLM(model_overrides=TINY, vocab_size=40, seq_len=32, **kwargs)
    model.configure_model()
    return model


def test_paper_shapes_have_the_expected_parameter_counts():
    # Llama-2-7B is 6.738B; without its 32000-row embedding and head and with ours (padded to 64 rows):
    assert count_parameters("Llama-2-7b-hf", 32000) == 6_738_415_616
    assert round(count_parameters("Llama-2-7b-hf", 328) / 1e9, 3) == 6.479
    assert round(count_parameters("Llama-2-7b-hf", 1032) / 1e9, 3) == 6.485


def test_config_follows_data_and_overrides():
    model = CodecLM(model_overrides=TINY, vocab_size=328, seq_len=1024)
    cfg = model.config
    assert (cfg.vocab_size, cfg.padded_vocab_size, cfg.block_size, cfg.n_layer) == (328, 384, 1024, 2)
    assert model.model is None  # built in configure_model, under the strategy


def test_from_hyperparameters_ignores_what_lightningcli_adds():
    # A checkpoint written by `jpeglm fit` stores LightningCLI's `_instantiator` next to the model's arguments.
    hparams = {**dict(CodecLM(model_overrides=TINY, vocab_size=40, seq_len=32).hparams), "_instantiator": "x"}
    model = CodecLM.from_hyperparameters(hparams)
    assert (model.config.n_layer, model.config.vocab_size, model.config.block_size) == (2, 40, 32)
    with pytest.raises(TypeError, match="_instantiator"):
        CodecLM(**hparams)


def test_init_is_litgpts_pretraining_init():
    torch.manual_seed(0)
    model = CodecLM(model_overrides={**TINY, "n_embd": 256, "intermediate_size": 688}, vocab_size=328, seq_len=64)
    model.configure_model()
    gpt = model.model
    d, n_layer = 256, 2
    assert gpt.transformer.wte.weight.std().item() == pytest.approx(math.sqrt(2 / 5 / d), rel=0.05)
    proj = gpt.transformer.h[0].attn.proj.weight
    assert proj.std().item() == pytest.approx(1 / math.sqrt(d) / n_layer, rel=0.1)
    assert torch.all(gpt.transformer.ln_f.weight == 1)


def test_warmup_then_cosine():
    values = [warmup_cosine(s, warmup=10, total=110, min_ratio=0.1) for s in range(120)]
    assert values[0] == pytest.approx(0.1)
    assert values[9] == pytest.approx(1.0)
    assert values[60] == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-6)  # half-way through the decay
    assert values[110] == pytest.approx(0.1)
    assert values[119] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[9:], values[10:], strict=False))


class FixedBlocks(L.LightningDataModule):
    """The same few token blocks every epoch, and the bytes each id stands for."""

    def __init__(self, blocks: torch.Tensor) -> None:
        super().__init__()
        self.blocks = blocks
        self.byte_lengths = [0] * 8 + [1] * 32

    def modalities(self) -> list:
        return []

    def token_byte_lengths(self) -> list[int]:
        return self.byte_lengths

    def train_dataloader(self):
        data = [{"input_ids": b, "modality": torch.tensor(3 + i % 2)} for i, b in enumerate(self.blocks)]
        return torch.utils.data.DataLoader(data, batch_size=4)

    val_dataloader = train_dataloader


def test_fit_lowers_the_loss_and_logs_what_it_should(tmp_path):
    torch.manual_seed(0)
    pattern = torch.arange(8, 40).repeat(3)[:33]  # a periodic sequence: easy to learn
    blocks = torch.stack([pattern.roll(-i) for i in range(8)])
    model = CodecLM(model_overrides=TINY, vocab_size=40, seq_len=32, learning_rate=3e-3, warmup_steps=2)
    trainer = L.Trainer(
        max_steps=40,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        limit_val_batches=1,
        val_check_interval=20,
        check_val_every_n_epoch=None,
        default_root_dir=tmp_path,
    )
    data = FixedBlocks(blocks)
    trainer.validate(model, data)
    first = trainer.callback_metrics["val/loss"].item()
    trainer.fit(model, data)
    metrics = trainer.callback_metrics
    assert metrics["val/loss"].item() < 0.5 * first
    for name in (
        "train/loss",
        "train/bits_per_byte",
        "train/loss_jpeg",
        "train/loss_avc",
        "train/lr",
        "train/grad_norm",
        "val/bits_per_byte",
    ):
        assert name in metrics, name
    # Every target stands for one byte here, so bits per byte is the loss in bits.
    assert metrics["val/bits_per_byte"].item() == pytest.approx(metrics["val/loss"].item() / math.log(2), rel=1e-4)
    assert model.flops_per_batch > 0


class NaNAt(CodecLM):
    def __init__(self, bad_steps: set[int], **kwargs) -> None:
        super().__init__(**kwargs)
        self.bad = bad_steps

    def _losses(self, batch):
        t = super()._losses(batch)
        return t._replace(losses=t.losses * float("nan")) if self.global_step in self.bad else t


def _fit(model, steps, tmp_path):
    blocks = torch.randint(8, 40, (8, 33))
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        limit_val_batches=0,
    )
    trainer.fit(model, FixedBlocks(blocks))
    return trainer


def test_a_nan_loss_skips_the_step_with_a_warning(tmp_path):
    model = NaNAt({3}, model_overrides=TINY, vocab_size=40, seq_len=32)
    with pytest.warns(UserWarning, match="non-finite loss at step 3"):
        trainer = _fit(model, 8, tmp_path)
    assert model.skipped_steps == 1
    assert trainer.global_step == 8  # the skipped batch does not count as an optimizer step
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_many_nans_in_a_row_stop_with_a_clear_message(tmp_path):
    model = NaNAt(set(range(100)), model_overrides=TINY, vocab_size=40, seq_len=32, max_bad_steps=3)
    with pytest.warns(UserWarning, match="non-finite"), pytest.raises(RuntimeError, match="3 non-finite losses"):
        _fit(model, 8, tmp_path)


def test_schedule_needs_max_steps(tmp_path):
    model = tiny_model()
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    with pytest.raises(ValueError, match="set trainer.max_steps"):
        trainer.fit(model, FixedBlocks(torch.randint(8, 40, (4, 33))))


class OneModalityVal(FixedBlocks):
    """Validation batches of images only: what one rank of a mixed run may see."""

    def val_dataloader(self):
        data = [{"input_ids": b, "modality": torch.tensor(3)} for b in self.blocks]
        return torch.utils.data.DataLoader(data, batch_size=4)


def test_validation_logs_every_modality_of_the_data_on_every_rank(tmp_path):
    # Ranks reduce validation metrics name by name: a name logged on one rank only would pair the wrong
    # all-reduces (or hang). So each rank logs every modality of the data, weighted by its sequence count.
    blocks = torch.randint(8, 40, (8, 33), generator=torch.Generator().manual_seed(0))
    model = CodecLM(model_overrides=TINY, vocab_size=40, seq_len=32)
    model.vocabulary = [{"modality": "jpeg"}, {"modality": "avc"}]  # what setup() reads from a MixedDataModule
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(model, FixedBlocks(blocks))  # half images, half videos
    metrics = {k: v.item() for k, v in trainer.callback_metrics.items()}
    assert metrics["val/loss"] == pytest.approx((metrics["val/loss_jpeg"] + metrics["val/loss_avc"]) / 2, rel=1e-5)

    trainer.validate(model, OneModalityVal(blocks))
    metrics = {k: v.item() for k, v in trainer.callback_metrics.items()}
    assert metrics["val/loss_jpeg"] == pytest.approx(metrics["val/loss"], rel=1e-5)
    assert math.isnan(metrics["val/loss_avc"])  # logged all the same, with no sequences behind it


class KnownLosses(CodecLM):
    """Per-token losses given by the batch (kept in the graph), so that logged metrics can be checked by hand."""

    def _losses(self, batch):
        t = super()._losses(batch)
        return t._replace(losses=batch["losses"] + 0 * t.losses)


class HandMadeBatch(L.LightningDataModule):
    """One batch of three sequences (two images, one video) whose targets stand for known bytes."""

    def __init__(self, modalities: tuple[int, ...] = (3, 4, 3)) -> None:
        super().__init__()
        self.tags = modalities

    def modalities(self) -> list:
        return []

    def token_byte_lengths(self) -> list[int]:
        return [0] * 8 + [1] * 16 + [3] * 16  # specials 0 bytes, ids 8-23 one byte, 24-39 three

    def train_dataloader(self):
        ids = torch.tensor([[10, 8, 24], [10, 24, 25], [10, 1, 9]])  # targets: 1+3, 3+3 and 0+1 bytes
        losses = torch.tensor([[1.0, 2.0], [3.0, 3.0], [0.5, 0.5]])  # nats per target
        rows = zip(ids, self.tags, losses, strict=True)
        data = [{"input_ids": i, "modality": torch.tensor(t), "losses": x} for i, t, x in rows]
        return torch.utils.data.DataLoader(data, batch_size=3)

    val_dataloader = train_dataloader


def test_bits_per_byte_per_modality_is_each_modality_s_bits_over_its_bytes(tmp_path):
    model = KnownLosses(model_overrides=TINY, vocab_size=40, seq_len=2, learning_rate=0.0, warmup_steps=1)
    model.vocabulary = [{"modality": "jpeg"}, {"modality": "avc"}]  # what setup() reads from a MixedDataModule
    trainer = L.Trainer(
        max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, log_every_n_steps=1, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(model, HandMadeBatch())
    trained = {k: v.item() for k, v in trainer.callback_metrics.items()}
    trainer.validate(model, HandMadeBatch())
    validated = {k: v.item() for k, v in trainer.callback_metrics.items()}
    bits = 1 / math.log(2)
    for stage, metrics in (("train", trained), ("val", validated)):
        assert metrics[f"{stage}/bits_per_byte"] == pytest.approx((1 + 2 + 6 + 0.5 + 0.5) * bits / (4 + 6 + 1))
        assert metrics[f"{stage}/bits_per_byte_jpeg"] == pytest.approx((1 + 2 + 0.5 + 0.5) * bits / (4 + 1))
        assert metrics[f"{stage}/bits_per_byte_avc"] == pytest.approx(6 * bits / 6)
        assert metrics[f"{stage}/loss_jpeg"] == pytest.approx(1.0)  # nats per token, as before
        assert metrics[f"{stage}/loss_avc"] == pytest.approx(3.0)

    trainer.validate(model, HandMadeBatch((3, 3, 3)))  # a rank whose batches hold no video logs it all the same
    metrics = {k: v.item() for k, v in trainer.callback_metrics.items()}
    assert metrics["val/bits_per_byte_jpeg"] == pytest.approx(metrics["val/bits_per_byte"])
    assert math.isnan(metrics["val/bits_per_byte_avc"])  # weight 0: no sequences behind it
