"""The local ingest's write pass (components/ingest/shards.py) on real generated images: the shard plan, the shard
files, and a file that changed between the inspect pass and the write pass."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from kfp_finetune.components.core import imagecheck
from kfp_finetune.components.ingest import shards, tfds_format
from tests import imagegen


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    root = imagegen.write_class_folder(tmp_path / "src", classes=("a",), per_class=7, size=40)
    return sorted((root / "a").glob("*.jpg"))


def _item(path: Path, label: int, reencode: bool = False) -> shards.Item:
    data = path.read_bytes()
    return (str(path), imagecheck.hash_bytes(data).sha256, reencode, label, len(data))


def test_record_r_of_a_split_goes_to_shard_r_mod_n(images):
    items = [("train" if i % 3 else "test", _item(p, i)) for i, p in enumerate(images)]
    plan = shards.plan(items, {"train": 2, "validation": 1, "test": 3})
    train = [item for split, item in items if split == "train"]
    test = [item for split, item in items if split == "test"]
    assert plan == {("train", 0): train[0::2], ("train", 1): train[1::2], ("test", 0): test[0:1],
                    ("test", 1): test[1:2], ("test", 2): test[2:3]}


def test_shards_hold_the_images_bytes_and_labels_in_order_on_a_pool_or_here(images, tmp_path):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from kfp_finetune.components.ingest.step import _start_method  # fork only where it is safe (no TF, no threads)

    plan = shards.plan((("train", _item(p, i)) for i, p in enumerate(images)), {"train": 2})
    pool = ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context(_start_method()))
    for executor in (None, pool):
        out = tmp_path / ("here" if executor is None else "pool")
        out.mkdir()
        seen: list[int] = []
        try:
            written = shards.write_all(out, plan, None, executor, seen.append)
        finally:
            if executor is not None:
                executor.shutdown()
        assert sorted(seen) == [3, 4] and written[("train", 0)][0] == 4 and written[("train", 1)][0] == 3
        for index in (0, 1):
            records = tfds_format.read_records(tfds_format.partial_shard(out, "train", index))
            expected = images[index::2]
            assert [tfds_format.encode_example(p.read_bytes(), images.index(p)) for p in expected] == records
            assert written[("train", index)][1] == sum(len(r) for r in records)


def test_a_file_changed_since_it_was_inspected_fails_the_write_and_names_it(images, tmp_path):
    item = _item(images[0], 0)
    Image.new("RGB", (40, 40), "red").save(images[0], "JPEG")  # another image under the same name
    with pytest.raises(RuntimeError, match=f"{images[0]} changed while it was being ingested"):
        shards.write_shard(str(tmp_path / "shard"), [item], None)


def test_a_converted_image_is_stored_re_encoded(tmp_path):
    path = imagegen.ImageFactory(tmp_path).make("bmp", size=24)
    data = shards.checked(path.read_bytes(), imagecheck.hash_bytes(path.read_bytes()).sha256, True, None, str(path))
    assert data != path.read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        assert im.format in ("JPEG", "PNG") and im.size == (24, 24)
