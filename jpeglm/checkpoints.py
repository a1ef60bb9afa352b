"""Reading training checkpoints: single files and FSDP2's sharded directories alike.

Lightning's ``ModelParallelStrategy`` saves a checkpoint as a directory of ``torch.distributed.checkpoint``
shards (one per rank) plus ``meta.pt``; :func:`load_checkpoint` reads either form into one dictionary in
memory, and ``jpeglm consolidate`` writes that dictionary to a single file that ``torch.load`` and
``Trainer(ckpt_path=...)`` on one device can use.

For inference (``jpeglm generate``, ``evaluate``, ``export``), :func:`open_checkpoint` reads only the model's
weights, one tensor at a time in the dtype asked for, and :func:`load_model` builds a CodecLM for inference
(no training wrappers) whose parameters are those tensors: a 7B model in bf16 never holds an fp32 copy.
"""

from __future__ import annotations

import re
import typing
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch

from jpeglm._compat import WRAPPED_PARAMETER_PARTS
from jpeglm.errors import UserError

Precision = Literal["bf16", "fp32"]
"""The dtype a model is loaded in for inference: bf16 (half the memory; the default on CUDA) or fp32."""
PRECISIONS = typing.get_args(Precision)
DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp32": torch.float32}
#: Hyperparameters that :func:`load_model` overrides: training-only wrappers that inference must not build.
INFERENCE_OVERRIDES = {"activation_checkpointing": False, "compile": False}
# A wrapper's part of a parameter name ("h.0._checkpoint_wrapped_module.attn" -> "h.0.attn"), whole parts only.
_WRAPPER_PART = re.compile(rf"(?<![^.])(?:{'|'.join(map(re.escape, WRAPPED_PARAMETER_PARTS))})\.")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint as one dictionary (``state_dict``, ``hyper_parameters``, loop and optimizer state).

    Single files are read with ``weights_only=True`` (no code runs while loading). Sharded directories are
    gathered on the CPU: the whole model must fit in memory.
    """
    path = Path(path)
    if path.is_dir():
        _check_sharded(path)
        # Lightning's own reader for its sharded format (what its consolidate_checkpoint module runs); it
        # uses torch.distributed.checkpoint without starting a process group.
        from jpeglm._compat import load_distributed_checkpoint

        checkpoint = load_distributed_checkpoint(path)
        return _unflatten_model_state(checkpoint)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def _check_sharded(path: Path) -> None:
    if not (path / "meta.pt").is_file() or not list(path.glob("*.distcp")):
        raise UserError(f"{path} is a directory but not a sharded Lightning checkpoint (no meta.pt / *.distcp)")


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


def load_model(
    path: str | Path, device: str | torch.device = "cpu", precision: Precision | None = None
) -> tuple[Any, list[Any]]:
    """A trained CodecLM built for inference, in eval mode, and the modalities (tokenizers, codecs, id offsets).

    The network is rebuilt from the checkpoint's hyperparameters without the training-only wrappers
    (:data:`INFERENCE_OVERRIDES`: no activation checkpointing, no ``torch.compile``) on the meta device, so
    building it allocates nothing; its parameters then *become* the checkpoint's tensors
    (``load_state_dict(assign=True)``), each read in ``precision`` onto ``device`` one at a time
    (:func:`open_checkpoint`). A 7B model in bf16 takes its ~13.5 GB and never an fp32 copy of itself. The
    rotary cache (not in checkpoints) is computed on ``device`` in fp32.

    Args:
        path: a checkpoint written by `jpeglm fit`: a single file or an FSDP2 sharded directory.
        device: where the model runs.
        precision: bf16 or fp32 weights; None: bf16 on a CUDA device, fp32 elsewhere.

    Raises:
        UserError: the checkpoint was not written by a jpeglm training run (no hyperparameters or vocabulary),
            its weights do not fit the model its hyperparameters describe, or ``precision`` is unknown.
        CodecError: a stored codec spec that this installation would decode into garbage.
    """
    from jpeglm.model import CodecLM
    from jpeglm.vocabulary import from_records, records_in

    device = torch.device(device)
    dtype = inference_dtype(precision, device)
    meta, read = open_checkpoint(path)
    records = records_in(meta)
    if "hyper_parameters" not in meta or not records:
        raise UserError(f"{path} is not a jpeglm CodecLM checkpoint (no hyperparameters or tokenizer records)")
    model = CodecLM.from_hyperparameters({**meta["hyper_parameters"], **INFERENCE_OVERRIDES})
    with torch.device("meta"):
        model.configure_model()  # shapes only: nothing allocated, nothing initialised
    try:
        model.load_state_dict(read(dtype, device), assign=True)  # the parameters are the tensors read
    except RuntimeError as error:  # missing or unexpected names, other shapes
        raise UserError(f"the weights in {path} do not fit the model its hyperparameters describe: {error}") from None
    gpt = model.model
    gpt.cos, gpt.sin = gpt.rope_cache(device=device)  # non-persistent buffers, built on meta above
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"load_model left tensors on the meta device: {left}")
    model.vocabulary = records
    return model.to(device).eval(), from_records(records)


def inference_dtype(precision: Precision | None, device: str | torch.device) -> torch.dtype:
    """The dtype of a ``precision``; None: bf16 on a CUDA device (half the memory and time), fp32 elsewhere.

    Raises:
        UserError: a precision other than bf16 or fp32.
    """
    if precision is None:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if precision not in DTYPES:
        raise UserError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    return DTYPES[precision]


def precision_of(model: torch.nn.Module) -> str:
    """The precision a model's weights are in: bf16, fp32, or the dtype's name for any other."""
    dtype = next(model.parameters()).dtype
    return next((name for name, d in DTYPES.items() if d == dtype), str(dtype).removeprefix("torch."))


def unwrapped_name(name: str) -> str:
    """A parameter name without the parts training wrappers add (activation checkpointing, ``torch.compile``)."""
    return _WRAPPER_PART.sub("", name)


WeightReader = Callable[[torch.dtype | None, torch.device | str], dict[str, torch.Tensor]]
"""``read(dtype, device)``: a checkpoint's model weights (see :func:`open_checkpoint`)."""


def open_checkpoint(path: str | Path) -> tuple[dict[str, Any], WeightReader]:
    """What a checkpoint holds besides tensors (hyperparameters, vocabulary records, loop state), and a function
    that reads its model weights, once.

    ``read(dtype, device)`` gives the ``state_dict`` with names :func:`unwrapped_name`, each floating tensor
    cast to ``dtype`` (None: as stored) on ``device`` one at a time: memory holds the weights in ``dtype`` plus
    one tensor as stored. A single file is memory-mapped (its optimizer state is never read); of a sharded
    directory only the model's tensors are read, each copied into a tensor of ``dtype`` made on ``device``.

    Raises:
        UserError: no checkpoint at ``path``, or a directory that is not a sharded Lightning checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        _check_sharded(path)
        return _open_sharded(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    state = checkpoint.pop("state_dict", {})
    checkpoint.pop("optimizer_states", None)
    return checkpoint, lambda dtype, device: _cast_each(state, dtype, device)


def _cast_each(state: dict[str, torch.Tensor], dtype: torch.dtype | None, device: torch.device | str):
    """``state``'s tensors, unwrapped names, cast and moved one at a time; ``state`` is emptied as it goes."""
    weights = {}
    for name in list(state):
        tensor = state.pop(name)
        kept = _kept_dtype(dtype, tensor.dtype)
        weights[unwrapped_name(name)] = tensor.to(device=device, dtype=kept, copy=True)  # never the file's pages
    return weights


def _kept_dtype(dtype: torch.dtype | None, stored: torch.dtype) -> torch.dtype:
    """What a stored tensor is read as: ``dtype`` when it is a floating dtype (and given), else as stored."""
    return dtype if dtype is not None and stored.is_floating_point else stored


def _open_sharded(path: Path) -> tuple[dict[str, Any], WeightReader]:
    """:func:`open_checkpoint` for a ``torch.distributed.checkpoint`` directory with Lightning's ``meta.pt``."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    stored = FileSystemReader(path).read_metadata()
    where = stored.planner_data or {}  # flattened name -> its path in the saved dictionary
    model = {
        where[fqn][1]: md
        for fqn, md in stored.state_dict_metadata.items()
        if isinstance(md, TensorStorageMetadata) and len(where.get(fqn, ())) == 2 and where[fqn][0] == "state_dict"
    }
    if not model:  # an older layout, tensors at the top level: read it whole
        checkpoint = load_checkpoint(path)
        state = checkpoint.pop("state_dict")
        return checkpoint, lambda dtype, device: _cast_each(state, dtype, device)

    def read(dtype: torch.dtype | None, device: torch.device | str) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint import load

        kept = {name: _kept_dtype(dtype, md.properties.dtype) for name, md in model.items()}
        targets = {name: torch.empty(md.size, dtype=kept[name], device=device) for name, md in model.items()}
        with warnings.catch_warnings():  # "torch.distributed is disabled ...": one process is what no_dist asks
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            load({"state_dict": targets}, checkpoint_id=path, no_dist=True)  # copies each stored tensor in, casting
        return {unwrapped_name(name): tensor for name, tensor in targets.items()}

    return torch.load(path / "meta.pt", map_location="cpu", weights_only=True), read


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
