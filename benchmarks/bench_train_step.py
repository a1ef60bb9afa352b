"""Time per optimizer step: CodecLM under Lightning's Trainer vs a bare litgpt GPT + AdamW loop, same run.

Both sides train the same small Llama-shaped model (CPU by default) on the same batches with the same
work per step: forward, cross-entropy, backward, gradient clipping, AdamW, LR schedule. The ratio is
what jpeglm and Lightning add (logging, hooks, bits per byte). Target: <= 1.10.

    python benchmarks/bench_train_step.py [--steps 30] [--repeats 3] [--layers 4 --dim 256 --seq-len 256]
"""

from __future__ import annotations

import argparse
import time

import lightning as L
import torch
from litgpt import GPT

from jpeglm.model import CodecLM, model_config, reset_parameters, set_init, warmup_cosine


class Blocks(L.LightningDataModule):
    def __init__(self, batches: list[torch.Tensor], vocab: int) -> None:
        super().__init__()
        self.batches = batches
        self.byte_lengths = [0] * 8 + [1] * (vocab - 8)

    def modalities(self) -> list:
        return []

    def token_byte_lengths(self) -> list[int]:
        return self.byte_lengths

    def train_dataloader(self):
        data = [{"input_ids": b, "modality": torch.full((b.size(0),), 3)} for b in self.batches]
        return torch.utils.data.DataLoader(data, batch_size=None)  # already batched


class StepTimer(L.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.steps = warmup, 0.0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()
        self.steps = trainer.global_step

    def per_step(self) -> float:
        return (time.perf_counter() - self.start) / (self.steps - self.warmup)


def lightning_run(overrides: dict, vocab: int, seq_len: int, batches: list[torch.Tensor], warmup: int) -> float:
    torch.manual_seed(0)
    model = CodecLM(model_overrides=overrides, vocab_size=vocab, seq_len=seq_len, warmup_steps=5, grad_clip=1.0)
    timer = StepTimer(warmup)
    trainer = L.Trainer(
        max_steps=len(batches),
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=[timer],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        limit_val_batches=0,
    )
    trainer.fit(model, Blocks(batches, vocab))
    return timer.per_step()


def bare_run(overrides: dict, vocab: int, seq_len: int, batches: list[torch.Tensor], warmup: int) -> float:
    torch.manual_seed(0)
    config = model_config("Llama-2-7b-hf", vocab, {**overrides, "block_size": seq_len})
    model = GPT(config)
    set_init(model, config)
    reset_parameters(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, warmup=5, total=len(batches), min_ratio=0.1)
    )
    start = 0.0
    for step, ids in enumerate(batches):
        if step == warmup:
            start = time.perf_counter()
        logits = model(ids[:, :-1])  # (B, T, vocab)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
    return (time.perf_counter() - start) / (len(batches) - warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps per run (after 5 warm-up).")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side, interleaved; the best counts.")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    vocab, warmup = 328, 5
    overrides = {
        "n_layer": args.layers,
        "n_embd": args.dim,
        "n_head": args.dim // 64,
        "n_query_groups": args.dim // 64,
        "intermediate_size": int(args.dim * 8 / 3 // 64 * 64 + 64),
    }
    generator = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(8, vocab, (args.batch_size, args.seq_len + 1), generator=generator)
        for _ in range(warmup + args.steps)
    ]
    bare, ours = [], []
    for _ in range(args.repeats):
        bare.append(bare_run(overrides, vocab, args.seq_len, batches, warmup))
        ours.append(lightning_run(overrides, vocab, args.seq_len, batches, warmup))
    params = sum(p.numel() for p in GPT(model_config("Llama-2-7b-hf", vocab, overrides)).parameters())
    tokens = args.batch_size * args.seq_len
    print(f"model: {params / 1e6:.1f}M parameters, {tokens} tokens per step, {torch.get_num_threads()} threads")
    print(f"bare litgpt GPT + AdamW loop: {min(bare) * 1e3:8.1f} ms/step ({tokens / min(bare):.0f} tok/s)")
    print(f"CodecLM under Trainer:        {min(ours) * 1e3:8.1f} ms/step ({tokens / min(ours):.0f} tok/s)")
    print(f"ratio Trainer/bare: {min(ours) / min(bare):.3f}  (target <= 1.10)")


if __name__ == "__main__":
    main()
