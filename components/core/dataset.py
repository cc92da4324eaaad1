"""Reading the Dataset artifact (written by `components.ingest.step`), shared by training, evaluation and export.

On-disk contract (a TFDS-format directory; docs/interfaces.md lists every artifact):
    DIR/dataset_info.json, DIR/features.json, ...   what `tfds.builder_from_directory(DIR)` needs
    DIR/<name>-<split>.tfrecord-NNNNN-of-MMMMM      tf.train.Example records:
                                                    image: bytes (encoded JPEG/PNG), label: int64
    DIR/ingest_report.json                          class_names, num_examples per split, counts, skipped files

Reading goes straight through tf.data (parallel interleave over shards) rather than through TFDS's builder,
which keeps the input pipeline cheap; `tfds.builder_from_directory` reads the very same files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kfp_finetune.components.core.errors import UserError
from kfp_finetune.components.core.fsutil import read_json

if TYPE_CHECKING:  # pragma: no cover
    import tensorflow as tf

SPLITS = ("train", "validation", "test")
REPORT_FILE = "ingest_report.json"


@dataclass(frozen=True)
class DatasetInfo:
    """What a Dataset artifact holds: class names, example counts per split, and the ingest report."""

    path: Path
    class_names: tuple[str, ...]
    num_examples: dict[str, int]
    report: dict[str, Any] = field(repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def files(self, split: str) -> list[str]:
        return split_files(self.path, split)

    def require_split(self, split: str) -> int:
        """The number of examples in `split`; UserError if the split is missing or empty."""
        if split not in self.num_examples:
            raise UserError(f"dataset {self.path} has no split {split!r} (it has {sorted(self.num_examples)})")
        n = self.num_examples[split]
        if n <= 0 or not self.files(split):
            raise UserError(f"dataset {self.path}: split {split!r} is empty")
        return n


def load_info(path: str | os.PathLike) -> DatasetInfo:
    """Read and check a Dataset artifact's ingest report."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"dataset {path} is not a directory (expected the output of `kfp-finetune ingest`)")
    report = read_json(path / REPORT_FILE, f"dataset {path}")
    try:
        class_names = tuple(report["class_names"])
        num_examples = {str(k): int(v) for k, v in report["num_examples"].items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"dataset {path}: {REPORT_FILE} lacks class_names/num_examples ({exc})") from exc
    return DatasetInfo(path=path, class_names=class_names, num_examples=num_examples, report=report)


def split_files(path: str | os.PathLike, split: str) -> list[str]:
    """The split's TFRecord shards, in order."""
    return sorted(str(p) for p in Path(path).glob(f"*-{split}.tfrecord-*"))


def parse_example(serialized: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """A serialized tf.train.Example -> (encoded image bytes, int32 label)."""
    import tensorflow as tf

    parsed = tf.io.parse_single_example(
        serialized,
        {"image": tf.io.FixedLenFeature([], tf.string), "label": tf.io.FixedLenFeature([], tf.int64)},
    )
    return parsed["image"], tf.cast(parsed["label"], tf.int32)


def read_split(path: str | os.PathLike, split: str, *, shuffle_files: bool = False, seed: int = 0) -> tf.data.Dataset:
    """(image_bytes, label) pairs of one split, read from its shards in parallel."""
    import tensorflow as tf

    files = split_files(path, split)
    if not files:
        raise UserError(f"dataset {path}: no TFRecord shards for split {split!r}")
    ds = tf.data.Dataset.from_tensor_slices(files)
    if shuffle_files:
        ds = ds.shuffle(len(files), seed=seed)
    ds = ds.interleave(
        tf.data.TFRecordDataset,
        cycle_length=min(len(files), 8),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=not shuffle_files,
    )
    return ds.map(parse_example, num_parallel_calls=tf.data.AUTOTUNE)


def decode_image(image_bytes: tf.Tensor, size: int | tuple[int, int]) -> tf.Tensor:
    """Encoded JPEG/PNG bytes -> float32 [H, W, 3] RGB pixels in 0..255, resized (bilinear) to `size`.

    The one decode+resize used in training, evaluation and the exported serving signature, so all three see
    the same pixels.
    """
    import tensorflow as tf

    height, width = (size, size) if isinstance(size, int) else size
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    image = tf.image.resize(image, (height, width), method="bilinear")
    image.set_shape((height, width, 3))
    return image
