"""safefiles' read rule, on real files, FIFOs and devices: the fast path (no root: one stat, then open and fstat)
gives the same verdicts and details as the full check and reads exactly the bytes;
the listing's one-lstat check agrees with `safefiles.check` (symlinked roots and files included)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kfp_finetune.components.core import safefiles
from kfp_finetune.components.core.sources import FolderSource

pytestmark = pytest.mark.timeout(60)  # a FIFO or /dev/zero read by mistake must fail the test, not hang it


@pytest.mark.parametrize("size", [0, 1, 5000, (1 << 20) + 3, (3 << 20) - 1])
def test_reads_exactly_the_bytes(tmp_path, size):
    data = os.urandom(size)
    (tmp_path / "f.jpg").write_bytes(data)
    assert safefiles.read_bytes(tmp_path / "f.jpg") == data
    assert safefiles.read_bytes(tmp_path / "f.jpg", safefiles.real_root(tmp_path)) == data


def test_size_bound_is_exact(tmp_path):
    (tmp_path / "f.jpg").write_bytes(b"x" * 100)
    assert safefiles.read_bytes(tmp_path / "f.jpg", max_bytes=100) == b"x" * 100
    for root in (None, safefiles.real_root(tmp_path)):
        with pytest.raises(safefiles.UnsafeFile) as err:
            safefiles.read_bytes(tmp_path / "f.jpg", root, max_bytes=99)
        assert err.value.reason == safefiles.TOO_LARGE


def test_what_is_not_a_regular_file_is_refused_with_the_full_checks_detail(tmp_path):
    os.mkfifo(tmp_path / "pipe.jpg")  # opened for reading without a writer, a blocking open would hang
    (tmp_path / "via_link.jpg").symlink_to(tmp_path / "pipe.jpg")
    (tmp_path / "zero.jpg").symlink_to("/dev/zero")  # read, it never ends
    (tmp_path / "folder.jpg").mkdir()
    for name in ("pipe.jpg", "via_link.jpg", "zero.jpg", "folder.jpg"):
        with pytest.raises(safefiles.UnsafeFile) as err:
            safefiles.read_bytes(tmp_path / name)
        assert err.value.reason == safefiles.NOT_REGULAR, name
        assert err.value.detail == safefiles.check(tmp_path / name).detail


def test_missing_file_keeps_its_verdict(tmp_path):
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    for name in ("nothing.jpg", "dangling.jpg"):
        with pytest.raises(safefiles.UnsafeFile) as err:
            safefiles.read_bytes(tmp_path / name)
        assert err.value.reason == safefiles.MISSING
        assert err.value.detail == safefiles.check(tmp_path / name).detail


def test_root_still_bounds_symlinks(tmp_path):
    (tmp_path / "outside.jpg").write_bytes(b"secret")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "link.jpg").symlink_to(tmp_path / "outside.jpg")
    with pytest.raises(safefiles.UnsafeFile) as err:
        safefiles.read_bytes(tmp_path / "src" / "link.jpg", safefiles.real_root(tmp_path / "src"))
    assert err.value.reason == safefiles.OUTSIDE_SOURCE


def test_listing_check_agrees_with_the_full_check(tmp_path):
    real = tmp_path / "real"
    for cls in ("a", "b"):
        (real / cls).mkdir(parents=True)
        (real / cls / f"{cls}1.jpg").write_bytes(b"1")
    (real / "a" / "inside_link.jpg").symlink_to(real / "b" / "b1.jpg")
    (real / "b" / "big.jpg").write_bytes(b"")
    os.truncate(real / "b" / "big.jpg", safefiles.MAX_FILE_BYTES + 1)  # sparse: no disk used
    (tmp_path / "outside.jpg").write_bytes(b"2")
    (real / "a" / "out_link.jpg").symlink_to(tmp_path / "outside.jpg")
    (tmp_path / "alias").symlink_to(real)  # the source itself given through a symlink
    for spec in (real, tmp_path / "alias"):
        listing = FolderSource(str(spec)).list()
        base = safefiles.real_root(spec)
        for entry in listing.entries:
            assert entry.local == safefiles.check(entry.ref, base).real == os.path.realpath(entry.ref)
        skipped = {Path(s["path"]).name: s["reason"] for s in listing.skipped}
        assert skipped == {"out_link.jpg": safefiles.OUTSIDE_SOURCE, "big.jpg": safefiles.TOO_LARGE}
        assert sorted(Path(e.ref).name for e in listing.entries) == ["a1.jpg", "b1.jpg", "inside_link.jpg"]
