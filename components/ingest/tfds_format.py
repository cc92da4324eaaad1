"""Writing a TFDS-format dataset directory without importing TensorFlow or TFDS.

Importing TensorFlow costs ~7 s and TFDS ~0.5 s here, several times what decoding the whole flowers set takes, so the
ingest step writes the three things `tfds.builder_from_directory` needs itself:
- TFRecord files named as TFDS names them (`{name}-{split}.tfrecord-{i:05d}-of-{n:05d}`), framed with masked CRC32C;
- `tf.train.Example` records with `image` (bytes_list) and `label` (int64_list), protobuf-encoded by hand;
- `dataset_info.json`, `features.json` and `label.labels.txt`, byte for byte what TFDS's own
  `DatasetInfo.write_to_directory` writes (tests/unit/test_ingest.py compares them against TFDS's output, so a TFDS
  upgrade that changes the format fails there, not in training).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

DATASET_NAME = "images"
DATASET_VERSION = "1.0.0"
FILENAME_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
FEATURES_FILE = "features.json"
INFO_FILE = "dataset_info.json"
LABELS_FILE = "label.labels.txt"


# --- tf.train.Example, hand-encoded ------------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1  # negative int64 -> two's complement, as protobuf does
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _len_field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _map_entry(key: str, feature: bytes) -> bytes:
    return _len_field(1, _len_field(1, key.encode()) + _len_field(2, feature))


def encode_example(image: bytes, label: int) -> bytes:
    """Serialized tf.train.Example{features: {image: bytes_list [image], label: int64_list [label]}}."""
    image_feature = _len_field(1, _len_field(1, image))  # Feature.bytes_list = 1 -> BytesList.value = 1
    label_feature = _len_field(3, _len_field(1, _varint(label)))  # Feature.int64_list = 3 -> packed value = 1
    features = _map_entry("image", image_feature) + _map_entry("label", label_feature)
    return _len_field(1, features)  # Example.features = 1


# --- TFRecord framing ---------------------------------------------------------------------------------------------


def _masked_crc(data: bytes) -> int:
    import google_crc32c

    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def write_record(f: BinaryIO, data: bytes) -> int:
    """Append one TFRecord; returns the bytes written."""
    header = struct.pack("<Q", len(data))
    f.write(header)
    f.write(struct.pack("<I", _masked_crc(header)))
    f.write(data)
    f.write(struct.pack("<I", _masked_crc(data)))
    return len(data) + 16


def read_records(path: str | os.PathLike) -> list[bytes]:
    """All records of a TFRecord file (checks lengths, not CRCs); for tests and tools, not the data path."""
    out = []
    with open(path, "rb") as f:
        while header := f.read(12):
            (length,) = struct.unpack("<Q", header[:8])
            out.append(f.read(length))
            f.read(4)
    return out


def shard_name(split: str, index: int, total: int, name: str = DATASET_NAME) -> str:
    return f"{name}-{split}.tfrecord-{index:05d}-of-{total:05d}"


def partial_shard(directory: str | os.PathLike, split: str, index: int) -> Path:
    """Where shard `index` of `split` is written before `finish_split` gives it its TFDS name."""
    return Path(directory) / f".{split}-{index:05d}.partial"


def finish_split(directory: str | os.PathLike, split: str, shard_lengths: Sequence[int]) -> list[int]:
    """Rename a split's written shards (`partial_shard`, record r of the split in shard r % len(shard_lengths)) to
    TFDS's `-NNNNN-of-MMMMM` names, dropping shards that stayed empty (a split smaller than its shard count; they may
    or may not exist as files). A split with no example gets one empty shard, which TFDS reads as an empty split.
    Returns the final shard lengths."""
    kept = [i for i, n in enumerate(shard_lengths) if n]
    for i in range(len(shard_lengths)):
        if i not in kept:
            partial_shard(directory, split, i).unlink(missing_ok=True)
    if not kept:
        (Path(directory) / shard_name(split, 0, 1)).touch()
        return [0]
    for new_index, old_index in enumerate(kept):
        os.replace(partial_shard(directory, split, old_index),
                   Path(directory) / shard_name(split, new_index, len(kept)))
    return [shard_lengths[i] for i in kept]


# --- metadata -----------------------------------------------------------------------------------------------------


def features_json(num_classes: int) -> dict:
    """features.json of FeaturesDict({'image': Image(shape=(None, None, 3)), 'label': ClassLabel(num_classes)})."""
    return {
        "featuresDict": {
            "features": {
                "image": {
                    "image": {"dtype": "uint8", "shape": {"dimensions": ["-1", "-1", "3"]}},
                    "pythonClassName": "tensorflow_datasets.core.features.image_feature.Image",
                },
                "label": {
                    "classLabel": {"numClasses": str(num_classes)},
                    "pythonClassName": "tensorflow_datasets.core.features.class_label_feature.ClassLabel",
                },
            }
        },
        "pythonClassName": "tensorflow_datasets.core.features.features_dict.FeaturesDict",
    }


def dataset_info_json(splits: dict[str, tuple[Sequence[int], int]], description: str) -> dict:
    """dataset_info.json for `splits` {split: (shard_lengths, num_bytes)}, in TFDS's proto-JSON spelling."""
    split_list = []
    for name, (lengths, num_bytes) in splits.items():
        entry: dict = {"filepathTemplate": FILENAME_TEMPLATE, "name": name}
        if num_bytes:  # proto3 JSON leaves zero values out
            entry["numBytes"] = str(num_bytes)
        entry["shardLengths"] = [str(n) for n in lengths]
        split_list.append(entry)
    return {
        "description": description,
        "fileFormat": "tfrecord",
        "name": DATASET_NAME,
        "splits": split_list,
        "supervisedKeys": {"tuple": {"items": [{"featureKey": "image"}, {"featureKey": "label"}]}},
        "version": DATASET_VERSION,
    }


def write_metadata(
    directory: str | os.PathLike,
    class_names: Sequence[str],
    splits: dict[str, tuple[Sequence[int], int]],
    description: str,
) -> None:
    """Write dataset_info.json, features.json and label.labels.txt so `tfds.builder_from_directory` loads the dir."""
    directory = Path(directory)
    for name, data in metadata_files(class_names, splits, description).items():
        (directory / name).write_bytes(data)


def metadata_files(
    class_names: Sequence[str], splits: dict[str, tuple[Sequence[int], int]], description: str
) -> dict[str, bytes]:
    """{file name: bytes} of the metadata `write_metadata` writes, for writers on other filesystems (Beam's)."""
    return {
        INFO_FILE: json.dumps(dataset_info_json(splits, description), indent=2, sort_keys=True).encode(),
        FEATURES_FILE: json.dumps(features_json(len(class_names)), indent=4, sort_keys=True).encode(),
        LABELS_FILE: "".join(f"{name}\n" for name in class_names).encode(),
    }
