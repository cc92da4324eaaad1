"""The local runner's write pass (step.py's pass 3): every kept image into its final split's TFRecord shards.

Record r of a split (in content-hash order) goes to shard r % n, as the Beam runner deals its ranks, so both write
the same shards byte for byte. One pool task per shard file: the worker re-reads the shard's files (each checked
against its pass-1 content hash and re-encoded only when pass 1 converted or resized it: `checked`, which the Beam
runner's `write_shard` calls too) and frames them straight into the shard, so memory stays flat and no image bytes
travel between processes. The biggest shards go first, so that the workers finish together.

Imports only the standard library and our plumbing (no kfp, no TensorFlow), so the workers start cheaply.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import Executor, as_completed
from pathlib import Path

from kfp_finetune.components.core import imagecheck, safefiles
from kfp_finetune.components.ingest import tfds_format

# One kept image as the write pass needs it: (local path, content SHA-256, re-encode?, label index, file size).
Item = tuple[str, str, bool, int, int]
ShardKey = tuple[str, int]  # (split, shard index)


def checked(data: bytes, sha256: str, reencode: bool, max_side: int | None, name: str) -> bytes:
    """The bytes to store for one kept image, read again by either runner: checked against its pass-1 content hash
    (a file changed since then fails the ingest), re-encoded only when pass 1 converted or resized it."""
    if imagecheck.hash_bytes(data).sha256 != sha256:
        raise RuntimeError(f"{name} changed while it was being ingested; run the ingest again")
    if reencode:
        result = imagecheck.decode_bytes(data, max_side)
        if not result.ok or result.data is None:  # pragma: no cover  (decoded fine moments ago)
            raise RuntimeError(f"{name}: decode check gave a different answer the second time")
        data = result.data
    return data


def write_shard(shard: str, items: list[Item], max_side: int | None) -> tuple[int, int]:
    """Each item, in the given order, read again and `checked` into a tf.train.Example appended to the TFRecord file
    `shard` (created). One image in memory at a time. Returns (records, example bytes)."""
    length = num_bytes = 0
    with open(shard, "wb") as f:
        for path, sha256, reencode, label, _ in items:
            data = checked(safefiles.read_bytes(path), sha256, reencode, max_side, path)
            example = tfds_format.encode_example(data, label)
            tfds_format.write_record(f, example)
            length += 1
            num_bytes += len(example)
    return length, num_bytes


def plan(items: Iterable[tuple[str, Item]], num_shards: dict[str, int]) -> dict[ShardKey, list[Item]]:
    """(final split, item) pairs in content-hash order -> each shard's items, record r of a split in shard r % n."""
    out: dict[ShardKey, list[Item]] = {}
    rank = dict.fromkeys(num_shards, 0)
    for split, item in items:
        out.setdefault((split, rank[split] % num_shards[split]), []).append(item)
        rank[split] += 1
    return out


def write_all(directory: Path, shards: dict[ShardKey, list[Item]], max_side: int | None, executor: Executor | None,
              progress: Callable[[int], object]) -> dict[ShardKey, tuple[int, int]]:
    """Write every planned shard to `tfds_format.partial_shard(directory, split, index)`, one task per shard on
    `executor` (None: here, one after the other), biggest first; `progress(n)` after each shard of n images.
    Returns {(split, index): (records, example bytes)}. On an error, shards still being written finish before the
    caller's `executor.shutdown()` returns; nothing is renamed into place here."""
    order = sorted(shards, key=lambda key: (-sum(item[4] for item in shards[key]), key))
    written: dict[ShardKey, tuple[int, int]] = {}
    if executor is None:
        for key in order:
            written[key] = write_shard(str(tfds_format.partial_shard(directory, *key)), shards[key], max_side)
            progress(len(shards[key]))
        return written
    futures = {executor.submit(write_shard, str(tfds_format.partial_shard(directory, *key)), shards[key], max_side): key
               for key in order}
    for future in as_completed(futures):
        written[futures[future]] = future.result()
        progress(len(shards[futures[future]]))
    return written
