"""LightningDataModules that stream prepared token shards (installed as ``jpeglm.data_modules``).

- :class:`CodecDataModule`: one prepared dataset (``jpeglm prepare``) as blocks of ``seq_len + 1`` ids.
- :class:`MixedDataModule`: several prepared datasets (JPEG, AVC, text) mixed with weights, ids shifted apart.
- :class:`SyntheticDataModule`: a procedural image (or clip) set made and prepared in-process, no download.
- :class:`SyntheticImageTextDataModule`: those pictures mixed with text files of yours, both prepared in-process.

All four yield ``{"input_ids": LongTensor (B, seq_len + 1), "modality": LongTensor (B,)}`` batches and keep
the loader's position in every checkpoint, so a resumed run sees exactly the batches of an uninterrupted one.
"""

from jpeglm.data_modules.codec import CodecDataModule
from jpeglm.data_modules.image_text import SyntheticImageTextDataModule
from jpeglm.data_modules.mixed import MixedDataModule, MixtureMember
from jpeglm.data_modules.synthetic import SyntheticDataModule

__all__ = [
    "CodecDataModule",
    "MixedDataModule",
    "MixtureMember",
    "SyntheticDataModule",
    "SyntheticImageTextDataModule",
]
