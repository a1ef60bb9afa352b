"""Export a trained CodecLM for use outside jpeglm: a Hugging Face Llama or a litgpt checkpoint directory.

Both layouts carry what the ids mean next to the weights: each source's tokenizer directory
(``tokenizer.json``, ``id_layout.json``, ``codec_spec.json``; at the top level for a single-source model,
one subdirectory per modality otherwise) and ``jpeglm_sources.json`` with the modalities and id offsets.

- ``hf``: ``config.json`` (a ``LlamaConfig``) and ``model.safetensors``, which
  ``transformers.LlamaForCausalLM.from_pretrained`` loads. The weight names and the q/k/v split come from
  litgpt's own converter (``copy_weights_llama``), so they follow litgpt's layout as it changes.
- ``litgpt``: ``lit_model.pth`` (the ``GPT`` state dict) and ``model_config.yaml``, which litgpt's
  scripts (``litgpt generate``, ``litgpt convert_from_litgpt``, ...) read.

The weights keep the checkpoint's dtype unless ``precision`` asks for bf16 or fp32; they are read one tensor at
a time in that dtype (:func:`jpeglm.checkpoints.open_checkpoint`), never the optimizer state.

The vocabulary is exported padded (``padded_vocab_size`` rows, a multiple of 64): the extra ids are
never produced by the tokenizers, and keeping them keeps the weights bit-identical.
"""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Any, Literal

import torch
from litgpt import Config
from tokenizers import Tokenizer

from jpeglm.checkpoints import Precision, inference_dtype, open_checkpoint, unwrapped_name
from jpeglm.errors import UserError
from jpeglm.tokenizer import CodecTokenizer
from jpeglm.vocabulary import records_in

ExportFormat = Literal["hf", "litgpt"]
FORMATS = typing.get_args(ExportFormat)
# litgpt Config fields that a Hugging Face Llama cannot express, with the value a Llama has.
_LLAMA_SHAPE = {
    "mlp_class_name": "LLaMAMLP",
    "norm_class_name": "RMSNorm",
    "bias": False,
    "lm_head_bias": False,
    "parallel_residual": False,
    "rotary_percentage": 1.0,
    "rope_condense_ratio": 1,
    "rope_adjustments": None,
    "norm_qk": False,
    "post_attention_norm": False,
    "post_mlp_norm": False,
    "scale_embeddings": False,
    "sliding_window_size": None,
    "attention_logit_softcapping": None,
    "final_logit_softcapping": None,
    "attention_scores_scalar": None,
}


def export(
    checkpoint: str | Path, output: str | Path, format: ExportFormat = "hf", precision: Precision | None = None
) -> Path:
    """Write a CodecLM checkpoint (a single file or an FSDP2 sharded directory) as an export directory.

    Args:
        checkpoint: a checkpoint written by `jpeglm fit`: a single file or an FSDP2 sharded directory.
        output: the directory to write; it must not exist or be empty.
        format: hf (a Hugging Face Llama: config.json, model.safetensors) or litgpt (lit_model.pth,
            model_config.yaml).
        precision: the exported weights' dtype, bf16 or fp32 (default: as stored in the checkpoint).

    Raises:
        UserError: an unknown format or precision, an ``output`` that exists and is not empty, a checkpoint
            without jpeglm's hyperparameters and tokenizers, or (for "hf") a model shape that a Hugging Face
            Llama cannot represent.
    """
    if format not in FORMATS:
        raise UserError(f"unknown export format {format!r}; choose one of {FORMATS}")
    dtype = None if precision is None else inference_dtype(precision, "cpu")
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UserError(f"{output} exists and is not empty; choose another --output")
    meta, read = open_checkpoint(checkpoint)  # the weights are read below, one tensor at a time, in `dtype`
    records = records_in(meta)
    if "hyper_parameters" not in meta or not records:
        raise UserError(f"{checkpoint} is not a jpeglm CodecLM checkpoint (no hyperparameters or tokenizer records)")
    config = litgpt_config(meta["hyper_parameters"])
    if format == "hf":
        check_llama_shape(config)
    weights = litgpt_state_dict(read(dtype, "cpu"))
    output.mkdir(parents=True, exist_ok=True)
    if format == "hf":
        write_hf(config, weights, output)
    else:
        write_litgpt(config, weights, output)
    write_vocabulary(records, output)
    return output


def litgpt_config(hyper_parameters: dict[str, Any]) -> Config:
    """The litgpt config the CodecLM of these hyperparameters builds (vocabulary padded, block size = seq_len)."""
    from jpeglm.model import CodecLM

    return CodecLM.from_hyperparameters(hyper_parameters).config  # builds no network: that happens in configure_model


def litgpt_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CodecLM's ``model.<litgpt key>`` tensors as a plain litgpt ``GPT`` state dict."""
    names = {unwrapped_name(k): v for k, v in state_dict.items()}  # no activation-checkpointing or compile parts
    weights = {k.removeprefix("model."): v for k, v in names.items() if k.startswith("model.")}
    if not weights:
        raise UserError("the checkpoint holds no CodecLM weights (no `model.*` keys in its state_dict)")
    return weights


def check_llama_shape(config: Config) -> None:
    """Refuse litgpt configs whose network differs from a Hugging Face Llama's."""
    odd = {k: getattr(config, k) for k, v in _LLAMA_SHAPE.items() if hasattr(config, k) and getattr(config, k) != v}
    if getattr(config, "n_expert", 0):
        odd["n_expert"] = config.n_expert
    if odd:
        raise UserError(f"the model is not a plain Llama ({odd}); export it with --format litgpt instead")


def hf_config(config: Config, dtype: torch.dtype) -> dict[str, Any]:
    """``config.json`` of the equivalent ``LlamaForCausalLM`` (ids 0/1/2 are jpeglm's <pad>/<bos>/<eos>)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.padded_vocab_size,  # the weights' rows; ids past the tokenizers' are never produced
        "hidden_size": config.n_embd,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_query_groups,
        "head_dim": config.head_size,
        "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_base},  # transformers >= 5
        "max_position_embeddings": config.block_size,
        "attention_bias": False,
        "mlp_bias": False,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def write_hf(config: Config, weights: dict[str, torch.Tensor], output: Path) -> None:
    from litgpt.scripts.convert_lit_checkpoint import copy_weights_llama
    from safetensors.torch import save_file

    hf_weights: dict[str, torch.Tensor] = {}
    copy_weights_llama(config, hf_weights, weights)
    # q, k and v are views of one qkv matrix: safetensors refuses tensors that share memory.
    hf_weights = {k: v.detach().clone().contiguous() for k, v in hf_weights.items()}
    save_file(hf_weights, output / "model.safetensors", metadata={"format": "pt"})
    dtype = next(iter(weights.values())).dtype
    (output / "config.json").write_text(json.dumps(hf_config(config, dtype), indent=2) + "\n")


def write_litgpt(config: Config, weights: dict[str, torch.Tensor], output: Path) -> None:
    from litgpt.utils import save_config

    torch.save({k: v.detach().contiguous() for k, v in weights.items()}, output / "lit_model.pth")
    save_config(config, output)


def write_vocabulary(records: list[dict[str, Any]], output: Path) -> None:
    """Each modality's tokenizer directory and ``jpeglm_sources.json`` (modality, offset, where its files are).

    A captioned image modality's entry says which entry holds its captions (``"captions": {"index": i,
    "max_tokens": n}``, ``i`` counting the entries); two modalities of one name (the captions' text and a text
    member of a mixture) get numbered directories (``text``, ``text_2``).
    """
    listing, used = [], set()
    for r in records:
        name = r["modality"] if r["modality"] not in used else f"{r['modality']}_{len(used)}"
        used.add(name)
        directory = output if len(records) == 1 else output / name
        # Not from_records: exporting needs no codec, so a codec this installation lacks is no reason to fail.
        CodecTokenizer(Tokenizer.from_str(r["tokenizer"]), r["modality"], r["codec_spec"]).save(directory)
        listing.append(
            {
                "modality": r["modality"],
                "offset": r["offset"],
                "tokenizer_dir": directory.relative_to(output).as_posix(),
                "codec_spec": r["codec_spec"],
                **({"captions": r["captions"]} if r.get("captions") else {}),
            }
        )
    (output / "jpeglm_sources.json").write_text(json.dumps(listing, indent=2) + "\n")


def summary(output: Path) -> str:
    """What `jpeglm export` prints at the end: where the export is and what it holds."""
    kind = "Hugging Face Llama" if (output / "config.json").is_file() else "litgpt checkpoint"
    return f"wrote {output} ({kind}: {', '.join(sorted(p.name for p in output.iterdir()))})"
