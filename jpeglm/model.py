"""CodecLM: a litgpt ``GPT`` (Llama-2 shape by default) trained from scratch on codec tokens.

The model knows nothing about codecs: it reads blocks of token ids and predicts the next one. What
it adds around litgpt's ``GPT``:

- ``configure_model`` builds the network under the strategy. With Lightning's ``ModelParallelStrategy``
  the model is created on the meta device (no full fp32 copy on any rank), optionally wrapped for
  activation checkpointing and compiled per block, then sharded with FSDP2 ``fully_shard`` per
  transformer block and at the root (:func:`shard_fsdp2`); Lightning materialises the shards and
  calls each module's ``reset_parameters``, which is where the initialisation below happens.
- bf16 the FSDP2 way (``fsdp_mixed_precision="bf16"``, the 7B recipes): FSDP2's ``MixedPrecisionPolicy`` gathers
  and computes with bf16 weights, reduces gradients in fp32 and keeps fp32 master weights and optimizer state;
  the Trainer then runs at ``32-true``, with no autocast on top (:func:`fsdp_mixed_precision_policy`).
- Initialisation (from scratch, no pretrained weights): litgpt's pretraining init, GPT-NeoX style
  (arXiv 2204.06745): embeddings and linear layers ~ N(0, sqrt(2 / (5 d))), the output projections
  of attention and MLP ~ N(0, 1 / (sqrt(d) n_layer)), biases zero, norms one.
- AdamW (weight decay on matrices only, none on norms and biases), linear warmup then cosine decay to
  ``min_lr_ratio * learning_rate`` over ``trainer.max_steps``, gradient clipping by norm.
- Checkpoints carry the tokenizers and codec specs of the data (``jpeglm_vocabulary``, see jpeglm/vocabulary.py),
  which the data module hands over through :class:`~jpeglm.vocabulary.DescribesVocabulary` in ``setup``.
- Logged: loss, bits per byte of the codec stream (when the data module gives token byte lengths), per-modality
  loss and bits per byte on mixed data (``loss_<modality>``, ``bits_per_byte_<modality>``), learning rate,
  gradient norm; ``flops_per_batch`` for Lightning's ThroughputMonitor.
- A non-finite loss skips the step on every rank with a counted warning; ``max_bad_steps`` in a row stop
  the run with a message that says what to try.
"""

from __future__ import annotations

import inspect
import math
import warnings
from functools import partial
from typing import Any, Literal, NamedTuple

import lightning as L
import torch
from litgpt import GPT, Config
from litgpt.model import CausalSelfAttention, LLaMAMLP
from litgpt.utils import estimate_flops
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel

from jpeglm._compat import checkpoint_wrapper
from jpeglm.errors import UserError
from jpeglm.tokenizer import MODALITIES, NUM_SPECIAL, PAD_ID
from jpeglm.vocabulary import CHECKPOINT_KEY, DescribesVocabulary, caption_modalities, records_in, to_records

_MODALITY_NAMES = {tag: name for name, tag in MODALITIES.items()}


class CodecLM(L.LightningModule):
    """A litgpt GPT trained from scratch to write codec byte streams.

    Args:
        model_name: a litgpt config name (``litgpt.Config.from_name``), e.g. "Llama-2-7b-hf".
        model_overrides: litgpt ``Config`` fields to change, e.g. ``{"n_layer": 2, "n_embd": 128}``.
        vocab_size: ids in the vocabulary (linked from the data module).
        seq_len: tokens per training sequence, the model's ``block_size`` (linked from the data module).
        learning_rate: peak learning rate (the paper: 3e-4).
        min_lr_ratio: the cosine schedule ends at ``min_lr_ratio * learning_rate``.
        warmup_steps: linear warmup from 0 over this many optimizer steps.
        weight_decay: AdamW weight decay on weight matrices (the paper's recipe: 0.1).
        betas: AdamW betas.
        grad_clip: clip the gradient norm to this value (None: no clipping; the norm is logged anyway).
        activation_checkpointing: recompute each transformer block in the backward pass to save memory.
        compile: ``torch.compile`` each transformer block.
        max_bad_steps: stop after this many non-finite losses in a row.
        fsdp_mixed_precision: "bf16": FSDP2 all-gathers the weights in bf16 and every block computes with them
            in bf16, gradients are reduced in fp32, and the master weights and AdamW state stay fp32
            (``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)`` on every ``fully_shard``,
            torchtitan's default). It needs Lightning's ``ModelParallelStrategy`` and ``trainer.precision:
            32-true``, so that nothing casts twice: ``bf16-mixed`` autocast would cast the already-bf16 weights
            and activations again, and ``bf16-true`` would make the master weights bf16; other combinations
            are refused with a UserError. "none": FSDP2 moves and uses fp32 weights, and bf16 can come only from
            the Trainer's ``bf16-mixed`` autocast. A model built outside a Trainer (sampling, export) is not
            sharded and ignores this setting.
        float8: the transformer blocks' Linear layers compute in float8 (torchao's ``convert_to_float8_training``,
            tensorwise scales, float8 all-gathers under FSDP2; embedding and head stay as they are). Needs
            ``pip install torchao`` and an NVIDIA GPU with float8 (compute capability 8.9+: L4, L40S, H100,
            H200); fast with ``compile: true``. Like ``fsdp_mixed_precision``, ignored outside a Trainer.
        init_from: a jpeglm checkpoint (a file, e.g. the one ``jpeglm import`` wrote, or an FSDP2 sharded
            directory) whose weights a new run starts from: step 0, a fresh AdamW and warmup; the checkpoint's
            optimizer and loop state, if any, are never read. ``configure_model`` loads them under a Trainer, on
            one device or DDP (each process reads the file, memory-mapped) and under FSDP2 (``ModelParallelStrategy``:
            the network is built on the meta device and sharded, only rank 0 reads the file and each rank receives
            its shards of one tensor at a time, see :func:`load_initial_weights`). The data's ids must mean what the
            checkpoint's do (same modalities, offsets and tokenizers), else a UserError. Resuming with
            ``--ckpt_path`` reads this checkpoint too, then restores the resumed one over it. Ignored outside a
            Trainer (sampling, export).
        caption_loss_weight: weight of the caption tokens (and their text tag) of captioned images in the loss,
            relative to the image tokens' 1 (0: learn the images only, conditioned on their captions). Bits per byte
            count image bytes only; ``loss_caption`` is logged apart. Pad (the end of a block whose caption was
            dropped) is never a target.
    """

    def __init__(
        self,
        model_name: str = "Llama-2-7b-hf",
        model_overrides: dict[str, Any] | None = None,
        vocab_size: int = 328,
        seq_len: int = 12288,
        learning_rate: float = 3e-4,
        min_lr_ratio: float = 0.1,
        warmup_steps: int = 2000,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        grad_clip: float | None = 1.0,
        activation_checkpointing: bool = False,
        compile: bool = False,
        max_bad_steps: int = 10,
        fsdp_mixed_precision: Literal["none", "bf16"] = "none",
        float8: bool = False,
        init_from: str | None = None,
        caption_loss_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.config = model_config(model_name, vocab_size, {**(model_overrides or {}), "block_size": seq_len})
        self.model: GPT | None = None
        self.bad_steps = 0
        self.skipped_steps = 0
        self.token_bytes: torch.Tensor | None = None  # (vocab,) bytes each id stands for, from the data module
        self.vocabulary: list[dict[str, Any]] = []  # what the ids mean (jpeglm.vocabulary records), in checkpoints
        self.caption_ids: torch.Tensor | None = None  # (vocab,) bool: the ids captions are written in, if any
        if caption_loss_weight < 0:
            raise UserError(f"caption_loss_weight must be >= 0, got {caption_loss_weight}")

    @classmethod
    def from_hyperparameters(cls, hyper_parameters: dict[str, Any]) -> CodecLM:
        """The (unbuilt) CodecLM a checkpoint's ``hyper_parameters`` describe.

        Keys that are not ``__init__`` arguments are dropped: LightningCLI stores its own (``_instantiator``,
        ``_class_path``) next to the model's.
        """
        names = inspect.signature(cls.__init__).parameters
        return cls(**{k: v for k, v in hyper_parameters.items() if k in names and k != "self"})

    # ------------------------------------------------------------------ building

    def configure_model(self) -> None:
        if self.model is not None:  # Lightning may call this again, e.g. when testing after fitting
            return
        from contextlib import nullcontext

        policy = self._fsdp_policy()  # refuses a wrong combination before anything is built
        init_from = self.hparams.get("init_from") if self._trainer_or_none() is not None else None
        # Under FSDP2, built on the meta device so that no rank ever holds (or initialises) a full copy: Lightning's
        # ModelParallelStrategy calls this hook without a meta context (Lightning 2.6: `tensor_init_context()`
        # with empty_init=None), so at 7B every rank would build 26 GB of fp32 weights on the CPU first. The
        # shards are materialised by the strategy (to_empty + reset_parameters), or filled from init_from.
        with torch.device("meta") if self.device_mesh is not None else nullcontext():
            model = GPT(self.config)
        if self.hparams.float8 and self._trainer_or_none() is not None:  # before set_init: it swaps the Linears
            convert_float8(model, self.trainer.strategy.root_device)
        set_init(model, self.config)
        if not any(p.is_meta for p in model.parameters()):
            reset_parameters(model)  # meta tensors are initialised when the strategy materialises them
        if self.hparams.activation_checkpointing:
            checkpoint_blocks(model)
        if self.hparams.compile:
            for block in model.transformer.h:
                block.compile()
        if self.device_mesh is not None:  # ModelParallelStrategy
            shard_fsdp2(model, self.device_mesh["data_parallel"], policy)
        if init_from:
            records = load_initial_weights(model, init_from, self.vocabulary, self.trainer.strategy.root_device)
            self.vocabulary = self.vocabulary or records  # the data's, when it describes them (it may set new codecs)
        self.model = model
        self.flops_per_batch = None  # set from the first batch (it depends on the micro-batch size)

    def _fsdp_policy(self) -> Any:
        """The FSDP2 mixed-precision policy ``fsdp_mixed_precision`` asks for; None for FSDP2's fp32 default.

        Checked only under a Trainer: a model built for sampling or export has no Trainer and is not sharded.
        """
        trainer = self._trainer_or_none()
        if self.hparams.fsdp_mixed_precision == "none" or trainer is None:
            return None
        return fsdp_mixed_precision_policy(
            self.hparams.fsdp_mixed_precision, fsdp2=self.device_mesh is not None, precision=trainer.precision
        )

    def _trainer_or_none(self) -> L.Trainer | None:
        try:
            return self.trainer
        except RuntimeError:  # not attached to a Trainer: built for sampling or export
            return None

    def setup(self, stage: str) -> None:
        # The one channel from the data to the model (docs/architecture.md): what the ids mean, and their bytes.
        datamodule = self.trainer.datamodule
        if isinstance(datamodule, DescribesVocabulary):
            self.token_bytes = torch.as_tensor(datamodule.token_byte_lengths(), dtype=torch.float32)
            self.vocabulary = to_records(datamodule.modalities()) or self.vocabulary
            self.caption_ids = caption_id_mask(datamodule.modalities(), len(self.token_bytes))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Tokenizers and codec specs travel with the weights: sampling and export need nothing else.
        if self.vocabulary:
            checkpoint[CHECKPOINT_KEY] = self.vocabulary

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.vocabulary = records_in(checkpoint) or self.vocabulary

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)  # (B, T, vocab)

    # ------------------------------------------------------------------ steps

    def _losses(self, batch: dict[str, torch.Tensor]) -> _Targets:
        ids = batch["input_ids"].long()  # (B, T + 1)
        inputs, targets = ids[:, :-1], ids[:, 1:]
        logits = self(inputs)  # (B, T, vocab)
        losses = nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view_as(
            targets
        )  # (B, T), nats per token
        return _Targets(losses, targets, *self._caption_and_item(targets, batch.get("modality")))

    def _caption_and_item(self, targets: torch.Tensor, modality: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """(B, T) bool masks of the caption targets (caption ids, and the text tag in a captioned item) and of the
        item's own targets (the rest, pad excepted)."""
        caption = torch.zeros_like(targets, dtype=torch.bool)
        if self.caption_ids is not None:
            self.caption_ids = self.caption_ids.to(targets.device)
            caption = self.caption_ids[targets.clamp(max=len(self.caption_ids) - 1)]
            tagged = targets == MODALITIES["text"]
            if modality is not None:
                tagged &= (modality != MODALITIES["text"])[:, None]  # a text document's own tag is no caption
            caption |= tagged
        return caption, (targets != PAD_ID) & ~caption

    def _loss(self, t: _Targets) -> torch.Tensor:
        """The loss to learn from: mean over the targets, caption ones weighted ``caption_loss_weight``, pad none."""
        weights = t.item.float() + self.hparams.get("caption_loss_weight", 1.0) * t.caption.float()
        return (t.losses * weights).sum() / weights.sum().clamp(min=1e-6)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        targets = self._losses(batch)
        loss = self._loss(targets)
        if self._skip_non_finite(loss):
            return None
        if self.flops_per_batch is None and self.model is not None:
            self.flops_per_batch = estimate_flops(self.model, training=True) * targets.losses.size(0)
        self.log("train/loss", loss, prog_bar=True)
        self._log_details("train", targets, batch)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        targets = self._losses(batch)
        self.log("val/loss", self._loss(targets), prog_bar=True, sync_dist=True)
        self._log_details("val", targets, batch, sync_dist=True)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        targets = self._losses(batch)
        self.log("test/loss", self._loss(targets), sync_dist=True)
        self._log_details("test", targets, batch, sync_dist=True)

    def _log_details(self, stage: str, t: _Targets, batch, sync_dist: bool = False) -> None:
        losses = t.losses * t.item  # (B, T): the items' own targets (captions and pad apart)
        nbytes = self._target_bytes(t.targets, t.item)  # (B,) bytes each sequence's targets stand for, or None
        if nbytes is not None:
            bpb = bits_per_byte(losses, nbytes)
            self.log(f"{stage}/bits_per_byte", bpb, prog_bar=stage != "train", sync_dist=sync_dist)
        if self.caption_ids is not None:  # captioned data: every rank logs it, weighted by its caption targets
            count = int(t.caption.sum())
            loss = (t.losses * t.caption).sum() / max(count, 1)
            self.log(f"{stage}/loss_caption", loss, batch_size=count, sync_dist=sync_dist)
        modality = batch.get("modality")
        if modality is None:
            return
        if not sync_dist:  # training: the modalities of this batch
            if modality.unique().numel() > 1:
                for tag in modality.unique().tolist():
                    self._log_modality(stage, _MODALITY_NAMES.get(tag, str(tag)), t, nbytes, modality == tag)
            return
        # Validation and test are reduced across ranks at the epoch's end, metric by metric: every rank must log
        # the same names, so each logs every modality of the data, weighted by its sequences (0 when absent).
        captions = caption_modalities(self.vocabulary)
        tags = sorted(
            {
                MODALITIES[r["modality"]]
                for i, r in enumerate(self.vocabulary)
                if i not in captions and r.get("modality") in MODALITIES
            }
        )
        for tag in tags if len(tags) > 1 else []:
            self._log_modality(stage, _MODALITY_NAMES[tag], t, nbytes, modality == tag, sync_dist=True)

    def _target_bytes(self, targets: torch.Tensor, keep: torch.Tensor) -> torch.Tensor | None:
        """(B,) bytes of codec stream (or text) the ``keep`` targets of each sequence stand for; None without byte
        lengths."""
        if self.token_bytes is None:
            return None
        self.token_bytes = self.token_bytes.to(targets.device)
        return (self.token_bytes[targets.clamp(max=len(self.token_bytes) - 1)] * keep).sum(dim=1)

    def _log_modality(self, stage, name, t: _Targets, nbytes, chosen, sync_dist: bool = False) -> None:
        """``<stage>/loss_<name>`` and ``<stage>/bits_per_byte_<name>`` of the ``chosen`` (B,) sequences.

        Each is weighted by the count of chosen sequences (as the pooled values by the batch size); a batch without
        the modality logs 0 with weight 0, so that every rank logs every name (see :meth:`_log_details`).
        """
        count = int(chosen.sum())
        item, losses = t.item[chosen], t.losses[chosen]
        loss = (losses * item).sum() / item.sum().clamp(min=1) if count else losses.new_zeros(())
        self.log(f"{stage}/loss_{name}", loss, batch_size=count, sync_dist=sync_dist)
        if nbytes is not None:
            bpb = bits_per_byte(losses * item, nbytes[chosen]) if count else losses.new_zeros(())
            self.log(f"{stage}/bits_per_byte_{name}", bpb, batch_size=count, sync_dist=sync_dist)

    def _skip_non_finite(self, loss: torch.Tensor) -> bool:
        """True (on every rank) when any rank's loss is NaN/inf: the step is skipped everywhere."""
        bad = not bool(torch.isfinite(loss))
        if self.trainer.world_size > 1:  # all ranks must skip together, or the others hang in backward
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            self.bad_steps = 0
            return False
        self.bad_steps += 1
        self.skipped_steps += 1
        self.log("train/skipped_steps", float(self.skipped_steps))
        warnings.warn(
            f"non-finite loss at step {self.global_step}: step skipped ({self.skipped_steps} so far)", stacklevel=2
        )
        if self.bad_steps >= self.hparams.max_bad_steps:
            raise RuntimeError(
                f"{self.bad_steps} non-finite losses in a row (step {self.global_step}): training diverged. "
                "Lower model.learning_rate, raise model.warmup_steps, set model.grad_clip, or resume from an "
                "earlier checkpoint."
            )
        return True

    # ------------------------------------------------------------------ optimisation

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        decay = [p for p in self.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.ndim < 2]  # norms, biases
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.learning_rate,
            betas=tuple(hp.betas),
            fused=self.device.type == "cuda",
        )
        # The schedule comes from max_steps, never from estimated_stepping_batches: reading that while
        # max_epochs is set drops the data loader's restored state (litdata #775, Lightning #20550).
        total = self.trainer.max_steps
        if total is None or total < 1:
            raise UserError("set trainer.max_steps: the learning-rate schedule is defined over it")
        schedule = partial(warmup_cosine, warmup=hp.warmup_steps, total=total, min_ratio=hp.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # One norm computation serves both logging and clipping; it works on FSDP2's DTensor gradients.
        max_norm = self.hparams.grad_clip if self.hparams.grad_clip is not None else math.inf
        wrapped = self.trainer.strategy.model
        if isinstance(wrapped, FullyShardedDataParallel):
            norm = wrapped.clip_grad_norm_(max_norm)  # FSDP1: flat shards, the norm must be reduced across ranks
        else:
            params = [p for p in self.parameters() if p.grad is not None]
            if not params:
                return
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor
        self.log("train/grad_norm", norm)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])


class _Targets(NamedTuple):
    """One batch's per-token losses and targets, and which targets are captions and which the items' own."""

    losses: torch.Tensor  # (B, T) nats per target
    targets: torch.Tensor  # (B, T) ids
    caption: torch.Tensor  # (B, T) bool: caption ids, and the text tag of a captioned item
    item: torch.Tensor  # (B, T) bool: the rest, pad excepted


def caption_id_mask(modalities: list[Any], vocab_size: int) -> torch.Tensor | None:
    """(vocab_size,) bool: the ids of every modality that is some modality's captions; None when there are none."""
    mask, found = torch.zeros(vocab_size, dtype=torch.bool), False
    for m in modalities:
        if getattr(m, "captions", None) is not None:
            text = m.captions
            mask[NUM_SPECIAL + text.offset : text.tokenizer.num_ids + text.offset] = found = True
    return mask if found else None


def bits_per_byte(losses: torch.Tensor, nbytes: torch.Tensor) -> torch.Tensor:
    """Bits per byte of a batch: its summed loss in bits over the bytes its targets stand for.

    Args:
        losses: (B, T) nats per target token.
        nbytes: (B,) bytes the targets of each sequence stand for (special ids count 0 bytes but their loss counts).
    """
    return losses.sum() / math.log(2) / nbytes.sum().clamp(min=1)


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warmup to 1, then cosine decay to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------- model surgery


def set_init(model: GPT, config: Config) -> None:
    """Make each module's ``reset_parameters`` apply litgpt's pretraining init (see the module docstring)."""

    def normal(module: nn.Module, std: float) -> None:
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)

    for module in model.modules():
        if isinstance(module, (nn.Embedding, nn.Linear)):
            module.reset_parameters = partial(normal, module, std=math.sqrt(2.0 / 5 / config.n_embd))
    for module in model.modules():  # a second pass: these projections are nn.Linear too
        if isinstance(module, (LLaMAMLP, CausalSelfAttention)):
            std = 1 / math.sqrt(config.n_embd) / config.n_layer
            module.proj.reset_parameters = partial(normal, module.proj, std=std)


def reset_parameters(model: nn.Module) -> None:
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()


# ---------------------------------------------------------------------- initial weights (CodecLM.init_from)


def load_initial_weights(
    model: GPT, path: str, vocabulary: list[dict[str, Any]], device: torch.device
) -> list[dict[str, Any]]:
    """Put the weights of the jpeglm checkpoint ``path`` into ``model`` (``CodecLM.init_from``); its vocabulary records.

    Unsharded (one device, DDP): every process reads the file, memory-mapped, and copies the weights in.
    FSDP2 (the parameters are DTensors, built on the meta device): rank 0 alone reads and checks the file; its verdict
    goes to every rank, so all raise the same error or none. Each rank then materialises its shards on ``device``
    (the rotary cache computed, nothing initialised at random, so Lightning's materialisation, which runs only on
    meta tensors, leaves them alone), and ``set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True)``
    sends one full tensor at a time from rank 0, of which each rank keeps its shard: no rank holds more than one
    full tensor besides its shards (rank 0 reads the memory-mapped file's pages as it sends them).

    Args:
        model: the network (sharded or not, wrappers and all).
        path: a checkpoint file or an FSDP2 sharded directory written by jpeglm.
        vocabulary: the data's vocabulary records ([]: the data does not describe them, nothing is compared).
        device: where the shards live (the strategy's root device).

    Raises:
        UserError: no checkpoint at ``path``, not a jpeglm checkpoint, ids that mean other things than the data's,
            or weights that do not fit ``model``.
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in model.parameters()):
        state, records = read_initial_weights(path, model, vocabulary)
        model.load_state_dict(state)
        return records
    state: dict[str, torch.Tensor] = {}
    verdict: list[Any] = [None, None]  # rank 0's error message, or the records
    if dist.get_rank() == 0:
        try:
            state, verdict[1] = read_initial_weights(path, model, vocabulary)
        except Exception as error:  # raised on every rank below: the others would wait in the broadcast for ever
            verdict[0] = str(error) if isinstance(error, UserError) else f"model.init_from {path}: {error!r}"
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise UserError(verdict[0])
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        model.to_empty(device=device)
        model.cos, model.sin = model.rope_cache(device=device)  # the one state checkpoints do not hold
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
    set_model_state_dict(model, state, options=options)
    return verdict[1]


def read_initial_weights(
    path: str, model: GPT, vocabulary: list[dict[str, Any]]
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """The weights of the jpeglm checkpoint ``path`` under ``model``'s parameter names, and its vocabulary records.

    A single file is memory-mapped (its tensors are read as they are copied, its optimizer state never); a sharded
    directory is gathered on the CPU. See :func:`load_initial_weights` for ``vocabulary``.

    Raises:
        UserError: see :func:`load_initial_weights`.
    """
    from pathlib import Path

    from jpeglm.checkpoints import open_checkpoint, unwrapped_name

    if not Path(path).exists():
        raise UserError(f"model.init_from: no checkpoint at {path}")
    if Path(path).is_file():
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as error:  # not a torch file, or one holding code
            raise UserError(f"model.init_from: {path} is not a checkpoint torch can read: {error}") from None
        stored = checkpoint.get("state_dict") or {}
    else:
        checkpoint, read = open_checkpoint(path)  # a sharded directory, or a UserError
        stored = read(None, "cpu")
    records = records_in(checkpoint)
    if not records or not stored:
        raise UserError(f"model.init_from: {path} is not a jpeglm checkpoint (no weights or vocabulary records)")
    check_same_vocabulary(vocabulary, records, path)
    state = {unwrapped_name(name.removeprefix("model.")): tensor for name, tensor in stored.items()}
    expected = {unwrapped_name(name): tuple(t.shape) for name, t in model.state_dict().items()}
    wrong = [
        f"{name}: {tuple(state[name].shape) if name in state else 'missing'} in the file, {expected.get(name, 'none')} "
        "in the model"
        for name in sorted(set(expected) | set(state))
        if expected.get(name) != (tuple(state[name].shape) if name in state else None)
    ]
    if wrong:
        raise UserError(
            f"model.init_from: the weights in {path} do not fit the model ({'; '.join(wrong[:3])}"
            f"{'; ...' if len(wrong) > 3 else ''}): build the checkpoint's network, its model_name and model_overrides "
            "(for an imported checkpoint, pass the <name>_model.yaml `jpeglm import` wrote as a second --config)"
        )
    return state, records


def check_same_vocabulary(data: list[dict[str, Any]], weights: list[dict[str, Any]], path: str) -> None:
    """Refuse data whose ids mean other things than the ids of the weights in ``path`` (both vocabulary records).

    What ids mean: each modality's name, id offset and tokenizer (vocabulary and merges, compared after a round trip
    through this ``tokenizers``). Codec settings may differ: the checkpoints written then carry the data's. No data
    records (a data module that does not describe its vocabulary): nothing to compare.

    Raises:
        UserError: the modalities, their offsets or a tokenizer differ; the message says how to prepare the data.
    """
    from tokenizers import Tokenizer

    def layout(records: list[dict[str, Any]]) -> list[str]:
        return [f"{r['modality']} at id offset {r['offset']}" for r in records]

    if not data:
        return
    if layout(data) != layout(weights):
        detail = f"the data holds {layout(data)}, the checkpoint {layout(weights)}"
    else:
        same = [
            Tokenizer.from_str(d["tokenizer"]).to_str() == Tokenizer.from_str(w["tokenizer"]).to_str()
            for d, w in zip(data, weights, strict=True)
        ]
        if all(same):
            return
        detail = "another " + ", ".join(d["modality"] for d, s in zip(data, same, strict=True) if not s) + " tokenizer"
    raise UserError(
        f"model.init_from: the data's ids are not those the weights in {path} were trained on ({detail}); prepare "
        "the data with the checkpoint's tokenizer: jpeglm prepare --tokenizer DIR (for an imported checkpoint, the "
        "<name>_tokenizer/ `jpeglm import` wrote next to it)"
    )


def checkpoint_blocks(model: GPT) -> None:
    """Recompute each transformer block in the backward pass instead of storing its activations."""
    for i, block in enumerate(model.transformer.h):
        model.transformer.h[i] = checkpoint_wrapper(block)


def shard_fsdp2(model: GPT, mesh: Any, policy: Any = None) -> None:
    """FSDP2: shard every transformer block, then the root (embedding, final norm, head), all under ``policy``.

    ``policy`` is a ``torch.distributed.fsdp.MixedPrecisionPolicy`` (None: FSDP2's default, fp32 throughout).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = policy or MixedPrecisionPolicy()
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def fsdp_mixed_precision_policy(setting: str, fsdp2: bool, precision: str) -> Any:
    """FSDP2's ``MixedPrecisionPolicy`` for ``CodecLM(fsdp_mixed_precision=setting)``; None for "none".

    Args:
        setting: "none" or "bf16" (see :class:`CodecLM`).
        fsdp2: whether the model is sharded with FSDP2 (Lightning's ``ModelParallelStrategy``).
        precision: the Trainer's precision, e.g. "32-true".

    Raises:
        UserError: the policy without ``ModelParallelStrategy`` (nothing would apply it), or with a Trainer
            precision other than 32-true (autocast would cast again; bf16-true would make the master weights bf16).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if setting == "none":
        return None
    if not fsdp2:
        raise UserError(
            f"model.fsdp_mixed_precision={setting} is FSDP2's mixed-precision policy and needs trainer.strategy "
            "lightning.pytorch.strategies.ModelParallelStrategy; with another strategy set model.fsdp_mixed_precision "
            "to none and trainer.precision to bf16-mixed"
        )
    if str(precision) != "32-true":
        raise UserError(
            f"model.fsdp_mixed_precision={setting} needs trainer.precision 32-true, not {precision}: the policy "
            "already gathers and computes in bf16 with fp32 master weights; bf16-mixed autocast would cast again "
            "and bf16-true would make the master weights bf16"
        )
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def convert_float8(model: GPT, device: torch.device) -> None:
    """torchao float8 training for every Linear of the transformer blocks (see ``CodecLM``'s ``float8``).

    Raises:
        UserError: torchao is not installed, or ``device`` is not an NVIDIA GPU with float8 matmuls.
    """
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        raise UserError("model.float8 needs torchao: pip install torchao (or set model.float8 to false)") from None
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        raise UserError(
            f"model.float8 needs an NVIDIA GPU with float8 matmuls (compute capability 8.9+: L4, L40S, H100, "
            f"H200), not {name}; set model.float8 to false"
        )

    def blocks_only(module: nn.Module, name: str) -> bool:  # float8 matmuls need dimensions divisible by 16
        return name.startswith("transformer.h.") and module.in_features % 16 == 0 and module.out_features % 16 == 0

    config = Float8LinearConfig(enable_fsdp_float8_all_gather=True)
    convert_to_float8_training(model, config=config, module_filter_fn=blocks_only)


def model_config(model_name: str, vocab_size: int, overrides: dict[str, Any] | None = None) -> Config:
    """A litgpt config with our vocabulary: embedding and head rows padded to a multiple of 64 (fast matmuls).

    Named configs such as Llama-2's fix ``padded_vocab_size`` at 32000, so it is set here explicitly.
    """
    padded = -(-vocab_size // 64) * 64
    return Config.from_name(model_name, **{"padded_vocab_size": padded, **(overrides or {}), "vocab_size": vocab_size})


def count_parameters(model_name: str, vocab_size: int, overrides: dict[str, Any] | None = None) -> int:
    """Parameters of a model built on the meta device (nothing allocated), e.g. to check a 7B recipe."""
    config = model_config(model_name, vocab_size, overrides)
    with torch.device("meta"):
        return sum(p.numel() for p in GPT(config).parameters())
