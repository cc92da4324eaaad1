"""The one Source abstraction (components/core/sources.py, source_formats.py): detect each kind, list / files /
fingerprint / read / stat on a local folder, a CSV manifest and gs:// (the real GCS emulator); and the rule that
no other module detects a source's kind by its prefix or lists files itself."""

import ast
import os
from pathlib import Path

import pytest

from kfp_finetune.components.core import safefiles, sources
from kfp_finetune.components.core.errors import UserError
from kfp_finetune.components.core.source_formats import ManifestSource, TfdsSource
from tests.imagegen import write_class_folder

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = write_class_folder(tmp_path / "data", classes=("circle", "square"), per_class=2, size=16)
    (root / "README.txt").write_text("not in a class folder")
    (root / "circle" / ".hidden.jpg").write_bytes(b"x")
    (root / "square" / "notes.txt").write_text("not an image name")
    return root


def _images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.jpg") if not p.name.startswith("."))


@pytest.mark.parametrize("spec, kind", [
    ("tfds:mnist", TfdsSource), ("tfds:mnist:3.0.1", TfdsSource),
    ("data/labels.csv", ManifestSource), ("data/LABELS.CSV", ManifestSource), ("gs://b/p/labels.csv", ManifestSource),
    ("gs://b/flowers", sources.GcsSource), ("gs://b/flowers/", sources.GcsSource),
    ("data/flowers", sources.FolderSource), ("~/flowers", sources.FolderSource),
])
def test_detect_finds_each_kind(spec, kind):
    found = sources.detect(spec, "--input")
    assert type(found) is kind and found.spec == spec and found.what == "--input"
    assert found.kind == {TfdsSource: "tfds", ManifestSource: "manifest", sources.GcsSource: "gcs",
                          sources.FolderSource: "folder"}[kind]


def test_a_folder_lists_reads_and_stats(folder):
    source = sources.detect(str(folder))
    listing = source.list()
    images = _images(folder)
    assert [e.ref for e in listing.entries] == [str(p) for p in images]  # walk order: sorted folders, sorted names
    assert [e.label for e in listing.entries] == ["circle", "circle", "square", "square"]
    assert all(e.local == str(p.resolve()) for e, p in zip(listing.entries, images, strict=True))
    assert listing.class_names == ["circle", "square"]
    assert {Path(s["path"]).name: s["reason"] for s in listing.skipped} == {
        "README.txt": sources.OUTSIDE_CLASS, ".hidden.jpg": sources.HIDDEN, "notes.txt": sources.NOT_IMAGE}

    assert sources.read(str(images[0])) == images[0].read_bytes()
    stats = sources.stat_refs([str(images[0]), str(folder / "circle" / "gone.jpg")])
    st = os.stat(images[0])
    assert stats[str(images[0])] == sources.Stat(st.st_size, (str(st.st_mtime_ns),))
    assert stats[str(folder / "circle" / "gone.jpg")] is None

    lines, count = source.fingerprint()
    assert count == 4 and lines[0] == stats[str(images[0])].line("circle/circle_000.jpg")

    files, total = source.files()  # predict: every image name, class folders or not
    assert list(files) == [str(p) for p in images] and total == 4
    assert source.input_root() == os.path.realpath(folder)


def test_a_folder_that_is_not_there_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match=r"--source .*nope: no such directory"):
        sources.detect(str(tmp_path / "nope")).list()
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(UserError, match=r"is not a directory \(for a manifest, name it \*\.csv\)"):
        sources.detect(str(tmp_path / "file.txt")).list()


def test_a_local_manifest_lists_and_fingerprints(folder):
    images = _images(folder)
    manifest = folder / "labels.csv"
    manifest.write_text("path,label\n" + "".join(f"{p.relative_to(folder).as_posix()},{p.parent.name}\n"
                                                  for p in images))
    source = sources.detect(str(manifest))
    listing = source.list()
    assert [e.ref for e in listing.entries] == [str(p) for p in images]
    assert [e.label for e in listing.entries] == ["circle", "circle", "square", "square"]
    assert listing.class_refs["circle"] == f"label 'circle' in {manifest}"
    lines, count = source.fingerprint()
    assert count == 4 and lines[0].startswith("manifest\t") and len(lines) == 5

    (folder / "escape.csv").write_text("path,label\n../outside.jpg,circle\n")
    with pytest.raises(UserError, match="escapes the manifest's folder"):
        sources.detect(str(folder / "escape.csv")).list()
    (folder / "headless.csv").write_text("a,b\n")
    with pytest.raises(UserError, match="needs a 'path,label' header"):
        sources.detect(str(folder / "headless.csv")).list()


def test_a_predict_list_names_its_files(folder):
    images = _images(folder)
    listed = folder / "list.csv"
    listed.write_text("id,file\n1,circle/circle_000.jpg\n2,/abs/x.jpg\n3,gs://b/y.jpg\n")
    files, total = sources.detect(str(listed), "--input").files()
    assert list(files) == [str(images[0]), "/abs/x.jpg", "gs://b/y.jpg"] and total == 3
    (folder / "bare.csv").write_text("circle/circle_001.jpg\n\n")
    files, total = sources.detect(str(folder / "bare.csv"), "--input").files()
    assert list(files) == [str(images[1])] and total == 1
    assert sources.detect(str(listed), "--input").input_root() is None


def test_gcs_lists_reads_and_stats(folder, gcs_bucket, gcs_upload, monkeypatch):
    uri = gcs_upload(gcs_bucket, folder, "flowers")
    source = sources.detect(uri + "/")
    listing = source.list()
    rels = [p.relative_to(folder).as_posix() for p in _images(folder)]
    assert [e.ref for e in listing.entries] == [f"{uri}/{r}" for r in rels]
    assert all(e.local is None and e.stat is not None for e in listing.entries)
    assert listing.class_names == ["circle", "square"]
    assert sorted(s["reason"] for s in listing.skipped) == sorted(
        [sources.OUTSIDE_CLASS, sources.HIDDEN, sources.NOT_IMAGE])
    assert source.place(f"{uri}/circle/a.jpg") == (("circle", "a.jpg"), None)
    assert source.place(f"{uri}/x.jpg") == (("x.jpg",), sources.OUTSIDE_CLASS)
    assert source.place(f"gs://{gcs_bucket.name}/elsewhere/a/b.jpg") is None

    first = listing.entries[0]
    assert sources.read(first.ref) == (folder / rels[0]).read_bytes()
    gone = f"{uri}/circle/gone.jpg"
    stats = sources.stat_refs([first.ref, gone])
    assert stats == {first.ref: first.stat, gone: None}
    assert first.stat.size == (folder / rels[0]).stat().st_size
    lines, count = source.fingerprint()
    assert count == 4 and lines[0] == first.stat.line(rels[0])

    files, total = source.files()  # predict: every image-named object, page by page (hidden ones too, as before)
    assert total is None and list(files) == [f"{uri}/circle/.hidden.jpg"] + [f"{uri}/{r}" for r in rels]

    monkeypatch.setattr(safefiles, "MAX_FILE_BYTES", 10)  # the bound, lowered: never more than it is fetched
    with pytest.raises(safefiles.UnsafeFile, match="over the 10-byte limit"):
        sources.read(first.ref)


def test_a_gcs_manifest_and_collect_download(folder, gcs_bucket, gcs_upload, tmp_path):
    images = _images(folder)
    (folder / "labels.csv").write_text("path,label\n" + "".join(
        f"{p.relative_to(folder).as_posix()},{p.parent.name}\n" for p in images))
    uri = gcs_upload(gcs_bucket, folder, "flowers")
    listing = sources.detect(f"{uri}/labels.csv").list()
    assert [e.ref for e in listing.entries] == [f"{uri}/{p.relative_to(folder).as_posix()}" for p in images]
    files, _ = sources.detect(f"{uri}/labels.csv", "--input").files()
    assert list(files) == [f"{uri}/{p.relative_to(folder).as_posix()}" for p in images]  # the `path` column

    staged = sources.collect(uri, tmp_path / "staging")
    assert all(e.local and Path(e.local).read_bytes() == (folder / e.ref[len(uri) + 1:]).read_bytes()
               for e in staged.entries)
    with pytest.raises(UserError, match="no image files found"):
        sources.collect(f"{uri}/circle", tmp_path / "staging2")


def test_tfds_is_fingerprinted_by_its_name():
    assert TfdsSource("tfds:mnist").fingerprint() == (["tfds:mnist"], None)
    with pytest.raises(UserError, match="give a folder, a gs:// prefix or a .csv list"):
        TfdsSource("tfds:mnist", "--input").files()


# --- the architecture rule: one definition of the source kinds -----------------------------------------------------

SOURCES_MODULES = {"components/core/sources.py", "components/core/source_formats.py"}
LISTING_CALLS = {"walk", "scandir", "listdir", "iterdir", "rglob", "list_blobs"}
SOURCE_READERS = ("components/ingest", "components/predict/inputs.py")  # the modules that consume data sources


def _kind_checks(tree: ast.AST) -> list[tuple[int, str]]:
    """Calls like `x.startswith("tfds:")`, `x.lower().endswith(".csv")`: detecting a source's kind."""
    found = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("startswith", "endswith") and node.args
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
                and node.args[0].value.lower() in ("tfds:", ".csv")):
            found.append((node.lineno, f"{node.func.attr}({node.args[0].value!r})"))
    return found


def _listing_calls(tree: ast.AST) -> list[tuple[int, str]]:
    return [(node.lineno, node.func.attr) for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in LISTING_CALLS]


def test_only_the_sources_module_detects_kinds_and_lists_sources():
    problems = []
    for path in sorted([*(REPO / "components").rglob("*.py"), *(REPO / "pipelines").rglob("*.py")]):
        rel = path.relative_to(REPO).as_posix()
        if rel in SOURCES_MODULES or rel == "components/core/gcs.py":
            continue
        tree = ast.parse(path.read_text(), rel)
        # "tfds:" and ".csv" by prefix/suffix is kind detection: sources.detect does it, nobody else.
        problems += [f"{rel}:{line}: {what}: use sources.detect(spec).kind" for line, what in _kind_checks(tree)]
        if rel.startswith(SOURCE_READERS):  # and the source readers list nothing themselves (no os.walk, no gs://
            # listing): outputs and Beam's own matching of a GcsSource (FileSystems.match) are not listings of a source
            problems += [f"{rel}:{line}: {what}(): list through a Source" for line, what in _listing_calls(tree)]
    assert not problems, "\n".join(problems)


def test_the_rule_catches_a_prefix_check():
    tree = ast.parse('if source.lower().endswith(".csv"):\n    rows = os.walk(root)\nx.startswith("tfds:")\n')
    assert _kind_checks(tree) == [(1, "endswith('.csv')"), (3, "startswith('tfds:')")]
    assert _listing_calls(tree) == [(2, "walk")]
