"""Reading training checkpoints: single files and FSDP2's sharded directories alike.

Lightning's ``ModelParallelStrategy`` saves a checkpoint as a directory of ``torch.distributed.checkpoint``
shards (one per rank) plus ``meta.pt``; :func:`load_checkpoint` reads either form into one dictionary in
memory, and ``jpeglm consolidate`` writes that dictionary to a single file that ``torch.load`` and
``Trainer(ckpt_path=...)`` on one device can use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from jpeglm.errors import UserError


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint as one dictionary (``state_dict``, ``hyper_parameters``, loop and optimizer state).

    Single files are read with ``weights_only=True`` (no code runs while loading). Sharded directories are
    gathered on the CPU: the whole model must fit in memory.
    """
    path = Path(path)
    if path.is_dir():
        if not (path / "meta.pt").is_file() or not list(path.glob("*.distcp")):
            raise UserError(f"{path} is a directory but not a sharded Lightning checkpoint (no meta.pt / *.distcp)")
        # Lightning's own reader for its sharded format (what its consolidate_checkpoint module runs); it
        # uses torch.distributed.checkpoint without starting a process group.
        from jpeglm._compat import load_distributed_checkpoint

        checkpoint = load_distributed_checkpoint(path)
        return _unflatten_model_state(checkpoint)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def _unflatten_model_state(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Sharded checkpoints keep the model's tensors under ``state_dict`` already; older layouts put them at the top."""
    if "state_dict" not in checkpoint:
        state = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
        checkpoint = {k: v for k, v in checkpoint.items() if k not in state} | {"state_dict": state}
    return checkpoint


def consolidate(checkpoint: str | Path, output: str | Path) -> Path:
    """Write a (sharded) checkpoint as a single file that ``torch.load`` and ``Trainer(ckpt_path=...)`` read.

    Args:
        checkpoint: a checkpoint: an FSDP2 sharded directory (or a single file).
        output: the single checkpoint file to write (it must not exist).

    Raises:
        UserError: ``output`` exists, or ``checkpoint`` is neither a checkpoint file nor a sharded directory.
    """
    output = Path(output)
    if output.exists():
        raise UserError(f"{output} exists; choose another --output")
    loaded = load_checkpoint(checkpoint)
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(loaded, output)
    return output


def consolidate_summary(output: Path) -> str:
    """What `jpeglm consolidate` prints at the end: the file written and its size."""
    return f"wrote {output} ({output.stat().st_size / 2**20:.1f} MiB)"


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Any, list[Any]]:
    """A trained CodecLM in eval mode and the modalities (tokenizers, codecs, id offsets) stored with it.

    Raises:
        UserError: the checkpoint was not written by a jpeglm training run (no hyperparameters or vocabulary).
        CodecError: a stored codec spec that this installation would decode into garbage.
    """
    from jpeglm.model import CodecLM
    from jpeglm.vocabulary import from_records, records_in

    checkpoint = load_checkpoint(path)
    records = records_in(checkpoint)
    if "hyper_parameters" not in checkpoint or not records:
        raise UserError(f"{path} is not a jpeglm CodecLM checkpoint (no hyperparameters or tokenizer records)")
    model = CodecLM.from_hyperparameters(checkpoint["hyper_parameters"])
    model.configure_model()
    model.load_state_dict(checkpoint["state_dict"])
    model.vocabulary = records
    return model.to(device).eval(), from_records(records)


def check_tokenizer(modalities: list[Any], tokenizer_dir: str | Path | None) -> None:
    """Refuse a user-given tokenizer that differs from the one the checkpoint was trained with."""
    if tokenizer_dir is None:
        return
    from jpeglm.tokenizer import CodecTokenizer

    given = CodecTokenizer.load(tokenizer_dir)
    for modality in modalities:
        if modality.name == given.modality:
            if modality.tokenizer.tokenizer.to_str() != given.tokenizer.to_str():
                raise UserError(
                    f"tokenizer {tokenizer_dir} is not the {given.modality} tokenizer this model was "
                    "trained with (its vocabulary or merges differ); leave --tokenizer out to use the "
                    "checkpoint's own"
                )
            if modality.tokenizer.codec_spec != given.codec_spec:
                raise UserError(f"tokenizer {tokenizer_dir} carries another codec spec than the checkpoint's")
            return
    raise UserError(f"the model was not trained on {given.modality!r} (it knows {[m.name for m in modalities]})")
