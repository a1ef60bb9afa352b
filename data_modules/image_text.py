"""The built-in synthetic pictures mixed with text of yours: images and text in one small model, on CPU.

:class:`SyntheticImageTextDataModule` is a :class:`~jpeglm.data_modules.MixedDataModule` of two members, made in
process and cached like :class:`~jpeglm.data_modules.SyntheticDataModule`: the procedural JPEG set (the same
directory SyntheticDataModule builds for the same settings) and the ``.txt``/``.jsonl`` files of ``text_dir``,
prepared with a small byte-level BPE of their own. The text's cache key hashes the settings and every text file's
path, size and modification time, so changed text is prepared again and unchanged text is not.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
from functools import cached_property
from pathlib import Path

from jpeglm.data_modules.mixed import MixedDataModule, MixtureMember
from jpeglm.data_modules.synthetic import SyntheticDataModule
from jpeglm.errors import UserError
from jpeglm.inputs import TEXT_EXTENSIONS

__all__ = ["SyntheticImageTextDataModule"]


class SyntheticImageTextDataModule(MixedDataModule):
    """Synthetic JPEG pictures and the text files in ``text_dir``, mixed with ``weights``, each with its own BPE.

    Both members are prepared on first use (``prepare_data``, ``setup`` or reading :attr:`vocab_size`) in
    ``cache_dir`` and reused from then on. Batches carry each sequence's modality, so the model logs loss and
    bits per byte per modality (``val/loss_text``, ``val/bits_per_byte_jpeg``, ...).

    Args:
        text_dir: a directory of ``.txt`` files (one item each) and ``.jsonl`` files (one item per line, its
            ``text`` field), searched recursively.
        seq_len: tokens the model sees per sequence; blocks hold ``seq_len + 1`` ids.
        batch_size: sequences per batch on each rank.
        weights: shares of sequences drawn from the pictures and from the text.
        num_images: pictures to make (as SyntheticDataModule).
        image_size: side of the square pictures in pixels (a multiple of 16).
        text_vocab_size: BPE symbols of the text tokenizer, the 256 bytes included (fewer are learned when the
            text has too few repeated byte pairs).
        val_fraction: share of each member in its validation split.
        cache_dir: where prepared sets are kept (default: ``$JPEGLM_CACHE`` or ``~/.cache/jpeglm``, then
            ``synthetic/``).
        num_workers: loader worker processes per rank (0: load in the training process).
        seed: seed of the pictures, of the shuffles and of the member draws.
    """

    def __init__(
        self,
        text_dir: str,
        seq_len: int,
        batch_size: int,
        weights: list[float] | None = None,
        num_images: int = 256,
        image_size: int = 64,
        text_vocab_size: int = 512,
        val_fraction: float = 0.05,
        cache_dir: str | None = None,
        num_workers: int = 0,
        seed: int = 42,
    ) -> None:
        self.images = SyntheticDataModule(
            seq_len, batch_size, num_images=num_images, image_size=image_size, modality="jpeg",
            val_fraction=val_fraction, cache_dir=cache_dir, num_workers=num_workers, seed=seed,
        )  # fmt: skip
        self.text_dir = Path(text_dir).expanduser()
        files = text_files(self.text_dir)
        settings = {"vocab_size": text_vocab_size, "val_fraction": val_fraction, "seed": seed, "files": files}
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
        self.text_data_dir = self.images.data_dir.with_name(f"text-{len(files)}files-{key}")
        self.text_settings = settings
        super().__init__([str(self.images.data_dir), str(self.text_data_dir)], weights or [0.5, 0.5], seq_len,
                         batch_size, num_workers, seed)  # fmt: skip
        self.save_hyperparameters()

    @cached_property
    def members(self) -> list[MixtureMember]:
        """The two members (pictures, then text), prepared first if the cache lacks them."""
        self.prepare_data()
        return super().members

    def prepare_data(self) -> None:
        """Make and prepare both members unless the cache already holds them; safe when processes race."""
        self.images.prepare_data()
        with open(self.text_data_dir.with_name(self.text_data_dir.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # blocks while another process prepares it
            if not (self.text_data_dir / "dataset.json").is_file():
                self._prepare_text()

    def _prepare_text(self) -> None:
        from jpeglm.prepare import prepare

        shutil.rmtree(self.text_data_dir, ignore_errors=True)  # of a process killed while preparing
        prepare(
            "text",
            [str(self.text_dir)],
            self.text_data_dir,
            vocab_size=self.text_settings["vocab_size"],
            val_fraction=self.text_settings["val_fraction"],
            num_workers=1,  # in this process: spawning workers costs more than a small corpus takes
            seed=self.text_settings["seed"],
            progress=False,
            num_nodes=1,  # this process alone: not a share of SLURM's tasks (one per training rank)
        )


def text_files(directory: Path) -> list[tuple[str, int, int]]:
    """(path relative to ``directory``, size, mtime in ns) of every text input under it, sorted.

    Raises:
        UserError: ``directory`` does not exist or holds no ``.txt`` or ``.jsonl`` file.
    """
    if not directory.is_dir():
        raise UserError(
            f"text_dir {directory} is not a directory: give a folder of .txt or .jsonl files, e.g. "
            "--data.init_args.text_dir path/to/texts"
        )
    found = []
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.suffix.lower() in TEXT_EXTENSIONS:
            stat = path.stat()
            found.append((str(path.relative_to(directory)), stat.st_size, stat.st_mtime_ns))
    if not found:
        raise UserError(f"text_dir {directory} holds no .txt or .jsonl file")
    return found
