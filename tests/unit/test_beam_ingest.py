"""The ingest step on Apache Beam (ingest/beam_ingest.py): the same dataset as the local ingest, byte for byte.

The default suite runs the odd-images matrix on the DirectRunner (multi-process, 2 workers) plus the option and
bad-input checks; flowers, gs:// on the emulator and training on the Beam output are in the slow suite.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

pytest.importorskip("apache_beam", reason="needs the beam extra: pip install -e '.[beam]'")

from kfp_finetune.components.core.errors import UserError  # noqa: E402
from kfp_finetune.components.ingest import tfds_format  # noqa: E402
from kfp_finetune.components.ingest.beam_ingest import DataflowSettings, check_dataflow_options, pipeline_flags  # noqa: E402
from kfp_finetune.components.ingest.step import IngestConfig, ingest  # noqa: E402
from kfp_finetune.pipelines.cli import main as cli_main  # noqa: E402
from tests import imagegen  # noqa: E402

VALID = imagegen.ImageFactory.VALID
DIRECT_2 = ("direct_num_workers=2", "direct_running_mode=multi_processing")
IN_MEMORY = ("direct_running_mode=in_memory",)


def _ext(kind: str) -> str:
    from tests.unit.test_ingest import _ext as ext

    return ext(kind)


def odd_matrix(factory: imagegen.ImageFactory) -> Path:
    """The odd-images matrix of tests/unit/test_ingest.py, plus duplicates and a label conflict."""
    f = factory
    for label in ("a", "b"):
        for kind in VALID:
            f.make(kind, f"{label}/nested/deeper/{kind}{_ext(kind)}")
    for kind in ("truncated_jpeg", "corrupt", "empty", "bomb", "fake_ext", "not_image"):
        f.make(kind, f"a/{kind}{_ext(kind)}")
    f.make("hidden", "b/hidden.jpg")
    (f.root / ".DS_Store").write_bytes(b"junk")
    (f.root / "README.txt").write_text("top-level file, not in a class folder")
    imagegen.write_class_folder(f.root, classes=("c",), per_class=12, size=16)
    first = sorted((f.root / "c").iterdir())[0]
    (f.root / "c" / "copy-of-first.png").write_bytes(first.read_bytes())  # a duplicate under one label
    (f.root / "a" / "conflict.png").write_bytes(sorted((f.root / "c").iterdir())[1].read_bytes())  # two labels
    return f.root


def assert_same_dataset(local: Path, beam: Path, *, same_paths: bool = True) -> None:
    """Every shard byte for byte, the metadata files, and the report's counts and skip reasons."""
    names = sorted(p.name for p in local.iterdir())
    assert sorted(p.name for p in beam.iterdir()) == names
    for name in names:
        if name == "ingest_report.json":
            continue
        if name == "dataset_info.json" and not same_paths:  # its description names the source
            a, b = (json.loads((d / name).read_text()) for d in (local, beam))
            assert {**a, "description": ""} == {**b, "description": ""}
            continue
        if name == "data_profile.json" and not same_paths:  # its meta names the source
            a, b = (json.loads((d / name).read_text()) for d in (local, beam))
            assert {**a, "meta": {**a["meta"], "source": ""}} == {**b, "meta": {**b["meta"], "source": ""}}
            continue
        assert (beam / name).read_bytes() == (local / name).read_bytes(), name
    a, b = (json.loads((d / "ingest_report.json").read_text()) for d in (local, beam))
    for key in ("class_names", "num_examples", "counts", "num_files", "num_image_files", "converted", "resized",
                "num_shards", "skipped_counts", "fractions", "seed", "max_side"):
        assert a[key] == b[key], key
    for key in ("cross_split_pairs", "moves", "group_members", "moved", "policy"):  # names may differ, ids do not
        assert a["leakage"][key] == b["leakage"][key], key
    if same_paths:
        assert [(s["path"], s["reason"]) for s in a["skipped"]] == [(s["path"], s["reason"]) for s in b["skipped"]]


def run_both(source: Path | str, tmp_path: Path, beam_options=DIRECT_2, local_source=None, **kw) -> tuple[Path, Path]:
    local, beam = tmp_path / "local", tmp_path / "beam"
    ingest(IngestConfig(source=str(local_source or source), output=str(local), **kw))
    ingest(IngestConfig(source=str(source), output=str(beam), runner="direct", beam_options=beam_options, **kw))
    return local, beam


# --- default suite -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [
    pytest.param(IN_MEMORY, id="in_memory"),
    pytest.param(DIRECT_2, id="2_processes", marks=pytest.mark.slow),
])
def test_direct_runner_gives_the_local_dataset_on_the_odd_images_matrix(mode, image_factory, tmp_path, caplog):
    """The same shards byte for byte, so the same split membership and parsed examples, and the same report; and
    the direct runner never tries Prism (Beam's DirectRunner downloads its binary from GitHub at run time)."""
    caplog.set_level(logging.INFO, logger="apache_beam")
    root = odd_matrix(image_factory)
    local, beam = run_both(root, tmp_path, beam_options=mode, max_corrupt_fraction=1.0, num_shards=3)
    assert_same_dataset(local, beam)
    tried = [r.getMessage() for r in caplog.records if "prism" in r.getMessage().lower()]
    assert not tried, f"--runner direct went through Prism: {tried[:2]}"
    report = json.loads((beam / "ingest_report.json").read_text())
    reasons = {Path(s["path"]).name: s["reason"] for s in report["skipped"]}
    assert reasons["copy-of-first.png"] == "duplicate" or reasons.get(sorted((root / "c").iterdir())[0].name)
    assert reasons["conflict.png"] == "label_conflict" and reasons["bomb.png"] == "too_large"
    assert reasons[".DS_Store"] == "hidden" and reasons["README.txt"] == "outside_class_folder"
    assert sum(len(tfds_format.read_records(p)) for p in beam.glob("*.tfrecord-*")) == sum(
        report["num_examples"].values())
    assert not list(beam.glob(".beam-tmp-*")) and not list(tmp_path.glob(".beam.tmp-*"))


def test_beam_options_are_checked_before_any_job(tmp_path):
    with pytest.raises(UserError, match="max_num_wokers: Beam has no such pipeline option; did you mean max_num_work"):
        pipeline_flags("direct", ["max_num_wokers=3"])
    with pytest.raises(UserError, match="whole number"):
        pipeline_flags("direct", ["direct_num_workers=two"])
    with pytest.raises(UserError, match="--runner dataflow needs --project, --region, --temp_location"):
        pipeline_flags("dataflow", [])
    flags = pipeline_flags("dataflow", ["project=p", "region=europe-west4", "temp_location=gs://b/tmp",
                                        "max_num_workers=20", "sdk_container_image=r.example.com/x:1"])
    assert flags[0] == "--runner=DataflowRunner"
    assert {"--max_num_workers=20", "--sdk_container_image=r.example.com/x:1", "--region=europe-west4"} <= set(flags)


@pytest.mark.parametrize("args, message", [
    (["--beam-option", "max_num_wokers=3"], "did you mean max_num_workers"),
    (["--region", "europe-west4"], "need --runner direct or dataflow"),
])
def test_option_typos_are_one_line_and_leave_nothing(args, message, synthetic_folder, tmp_path, capsys):
    out = tmp_path / "ds"
    runner = [] if "--region" in args else ["--runner", "direct"]
    code = cli_main(["ingest", "--source", str(synthetic_folder), "--output", str(out), *runner, *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[-1] and err[-1].startswith("kfp-finetune: error: --")
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_too_many_corrupt_files_fail_inside_the_job_and_leave_nothing(tmp_path, image_factory, capsys):
    root = tmp_path / "src"
    imagegen.write_class_folder(root, classes=("a", "b"), per_class=4, size=16)
    image_factory.root = root
    image_factory.make("truncated_jpeg", "b/t.jpg")
    out = tmp_path / "out" / "ds"
    code = cli_main(["ingest", "--source", str(root), "--output", str(out), "--runner", "direct",
                     "--beam-option", "direct_running_mode=in_memory"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("kfp-finetune: error: --source") and "max-corrupt-fraction" in err[-1]
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_dataflow_settings_are_validated():
    with pytest.raises(UserError, match="--dataflow-region"):
        DataflowSettings(region="Europe West", temp_location="gs://b/tmp")
    with pytest.raises(UserError, match="--dataflow-temp-location"):
        DataflowSettings(region="europe-west4", temp_location="/tmp/x")
    with pytest.raises(UserError, match="--dataflow-max-workers"):
        DataflowSettings(region="europe-west4", temp_location="gs://b/tmp", max_num_workers=0)
    settings = DataflowSettings(region="europe-west4", temp_location="gs://b/tmp", machine_type="n2-standard-4",
                                service_account="ingest@p.iam.gserviceaccount.com", network="vpc")
    options = settings.beam_options("r.example.com/kfp-finetune:1.2.3")
    check_dataflow_options(options)
    assert "service_account_email=ingest@p.iam.gserviceaccount.com" in options
    with pytest.raises(UserError, match="machine_typ: Beam has no such pipeline option"):
        check_dataflow_options([*options, "machine_typ=n2"])


# --- slow suite ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_direct_runner_gives_the_local_dataset_on_flowers_and_it_loads_in_tfds(flowers_dir, tmp_path):
    import tensorflow_datasets as tfds

    local, beam = run_both(flowers_dir, tmp_path, num_shards=4)
    assert_same_dataset(local, beam)
    builder = tfds.builder_from_directory(str(beam))
    assert builder.info.features["label"].num_classes == 5
    report = json.loads((local / "ingest_report.json").read_text())
    assert {s: builder.info.splits[s].num_examples for s in report["num_examples"]} == report["num_examples"]


@pytest.mark.slow
def test_beam_dataset_trains(mini_flowers, weights_mirror, tmp_path, monkeypatch):
    """The DirectRunner's dataset goes through backbone -> train_head like any other (2 epochs, cached features)."""
    from kfp_finetune.components.backbone.step import BackboneConfig, build_backbone
    from kfp_finetune.components.train import HeadConfig, train_head

    monkeypatch.setenv("KFP_FINETUNE_WEIGHTS_MIRROR", str(weights_mirror))
    ingest(IngestConfig(source=str(mini_flowers), output=str(tmp_path / "ds"), runner="direct",
                        beam_options=IN_MEMORY, val_fraction=0.2, test_fraction=0.2))
    build_backbone(BackboneConfig(name="mobilenet", alpha=0.25, image_size=96, output=str(tmp_path / "bb")))
    result = train_head(HeadConfig(dataset=str(tmp_path / "ds"), backbone=str(tmp_path / "bb"),
                                   output=str(tmp_path / "head"), epochs=3, augment=False, learning_rate=1e-2))
    assert result.epochs_run == 3 and len(result.class_names) == 5
    assert result.history["loss"][-1] < result.history["loss"][0]  # it learns from the Beam-written records


@pytest.mark.slow
def test_gcs_source_read_through_beam_on_the_emulator(gcs_bucket, gcs_upload, image_factory, tmp_path):
    """Beam's own GCS filesystem, pointed at the emulator by STORAGE_EMULATOR_HOST."""
    root = odd_matrix(image_factory)
    uri = gcs_upload(gcs_bucket, root, "photos")
    local, beam = run_both(uri, tmp_path, beam_options=IN_MEMORY, local_source=root, max_corrupt_fraction=1.0)
    assert_same_dataset(local, beam, same_paths=False)
    report = json.loads((beam / "ingest_report.json").read_text())
    assert all(s["path"].startswith(f"{uri}/") for s in report["skipped"])


@pytest.mark.slow
@pytest.mark.parametrize("case, message", [
    ("no_images", "no image files found"),
    ("empty_prefix", "no objects under this prefix"),
    ("missing_bucket", "does not exist"),
])
def test_bad_gcs_sources_are_one_line_and_leave_nothing(case, message, gcs_bucket, tmp_path, capsys):
    if case == "no_images":
        gcs_bucket.blob("docs/a/readme.txt").upload_from_string("x")
        gcs_bucket.blob("docs/b/notes.txt").upload_from_string("y")
        source = f"gs://{gcs_bucket.name}/docs"
    elif case == "empty_prefix":
        source = f"gs://{gcs_bucket.name}/nothing-here"
    else:
        source = "gs://no-such-bucket-kfp-finetune/photos"
    out = tmp_path / "ds"
    code = cli_main(["ingest", "--source", source, "--output", str(out), "--runner", "direct",
                     "--beam-option", "direct_running_mode=in_memory"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith(f"kfp-finetune: error: --source {source}") and message in err[-1]
    assert list(tmp_path.iterdir()) == []


# --- compile --dataflow and submit -----------------------------------------------------------------------------------

IMAGE = "registry.example.com/team/kfp-finetune:1.2.3"
GOLDEN_DATAFLOW = Path(__file__).resolve().parents[1] / "golden" / "pipeline_structure_dataflow.json"
DATAFLOW_ARGS = ["--dataflow", "--dataflow-region", "europe-west4", "--dataflow-temp-location", "gs://b/tmp",
                 "--dataflow-max-workers", "20", "--dataflow-machine-type", "n2-standard-4",
                 "--dataflow-service-account", "ingest@p.iam.gserviceaccount.com", "--dataflow-network", "vpc"]


def compile_dataflow(tmp_path: Path, *extra: str) -> Path:
    out = tmp_path / "pipeline.yaml"
    assert cli_main(["compile", "--output", str(out), "--image", IMAGE, *DATAFLOW_ARGS, *extra]) == 0
    return out


def test_dataflow_compile_golden_structure_and_job_arguments(tmp_path):
    """Regenerate with KFP_FINETUNE_UPDATE_GOLDEN=1 after a reviewed change (like pipeline_structure.json)."""
    import os

    import yaml

    from kfp_finetune.components.ingest.beam_ingest import compiled_dataflow_options
    from tests.pipeline_shape import pipeline_structure
    from tests.unit.test_pipeline_compile import find_task

    package = compile_dataflow(tmp_path)
    ir = yaml.safe_load(package.read_text())
    actual = pipeline_structure(ir, image=IMAGE)
    if os.environ.get("KFP_FINETUNE_UPDATE_GOLDEN"):
        GOLDEN_DATAFLOW.write_text(json.dumps(actual, indent=2, sort_keys=True) + "\n")
    assert actual == json.loads(GOLDEN_DATAFLOW.read_text()), "regenerate with KFP_FINETUNE_UPDATE_GOLDEN=1"
    ingest_task = actual["tasks"][find_task(actual["tasks"], "ingest")]
    assert ingest_task["parameters"]["runner"] == "const:'dataflow'" and ingest_task["image"] == "<image>"
    options = compiled_dataflow_options(package)
    assert options == ["region=europe-west4", "temp_location=gs://b/tmp", "max_num_workers=20",
                       f"sdk_container_image={IMAGE}", "machine_type=n2-standard-4",
                       "service_account_email=ingest@p.iam.gserviceaccount.com", "network=vpc"]
    flags = pipeline_flags("dataflow", [*options, "project=p"])
    assert f"--sdk_container_image={IMAGE}" in flags and "--runner=DataflowRunner" in flags
    executor = next(e for name, e in ir["deploymentSpec"]["executors"].items() if "ingest" in name)
    assert "from kfp_finetune.components.ingest.beam_ingest import" in " ".join(executor["container"]["args"] +
                                                                executor["container"].get("command", []))
    # the other steps are untouched: the same tasks as without --dataflow
    plain = pipeline_structure(yaml.safe_load((Path(compile_plain(tmp_path))).read_text()), image=IMAGE)
    assert set(plain["tasks"]) == set(actual["tasks"])


def compile_plain(tmp_path: Path) -> Path:
    out = tmp_path / "plain.yaml"
    assert cli_main(["compile", "--output", str(out), "--image", IMAGE]) == 0
    return out


@pytest.mark.parametrize("args, message", [
    (["--dataflow"], "--dataflow-region"),
    (["--dataflow", "--dataflow-region", "europe-west4"], "--dataflow-temp-location"),
    (["--dataflow-region", "europe-west4"], "needs --dataflow"),
])
def test_bad_dataflow_compile_options_are_one_line(args, message, tmp_path, capsys):
    out = tmp_path / "pipeline.yaml"
    assert cli_main(["compile", "--output", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and not out.exists()


def test_submit_checks_dataflow_options_before_any_network_call(tmp_path, monkeypatch, capsys):
    import kfp_finetune.pipelines.remote

    def no_network(*_a, **_k):
        raise AssertionError("submit reached the network")

    monkeypatch.setattr(kfp_finetune.pipelines.remote, "send", no_network)
    package = compile_dataflow(tmp_path)
    package.write_text(package.read_text().replace("machine_type=n2-standard-4", "machin_type=n2-standard-4"))
    code = cli_main(["submit", "--host", "http://kfp.example.com", "--pipeline-root", "gs://b/root",
                     "--package", str(package)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "machin_type: Beam has no such pipeline option; did you mean machine_type" in err[-1]
    assert err[-1].startswith(f"kfp-finetune: error: --package {package}")


def test_beam_component_takes_the_ingest_inputs_plus_runner_and_options(tmp_path):
    from kfp import compiler

    from kfp_finetune.components.core import settings
    from kfp_finetune.components.ingest.beam_ingest import ingest_beam_op
    from kfp_finetune.components.ingest.step import ingest_op

    spec = ingest_beam_op.component_spec
    assert spec.implementation.container.image == settings.component_image()
    defaults = {name: i.default for name, i in spec.inputs.items()}
    local = {name: i.default for name, i in ingest_op.component_spec.inputs.items()}
    assert defaults == {**local, "runner": "dataflow", "beam_options": []}
    assert {name: o.type for name, o in spec.outputs.items()} == {"dataset": "system.Dataset@0.0.1"}
    compiler.Compiler().compile(ingest_beam_op, str(tmp_path / "ingest.yaml"))
    import yaml

    ir = yaml.safe_load((tmp_path / "ingest.yaml").read_text())
    executor = next(iter(ir["deploymentSpec"]["executors"].values()))
    code = " ".join(executor["container"]["command"] + executor["container"]["args"])
    assert "from kfp_finetune.components.ingest.step import IngestConfig, ingest" in code and "runner=runner" in code


@pytest.mark.slow
def test_manifest_with_a_missing_file_gives_the_local_dataset(tmp_path):
    data = tmp_path / "data"
    imagegen.write_class_folder(data, classes=("a", "b"), per_class=4, size=16)
    rows = "".join(f"{p.parent.name}/{p.name},{p.parent.name}\n" for p in sorted(data.rglob("*.jpg")))
    (data / "m.csv").write_text("path,label\n" + rows + "a/gone.jpg,a\n")
    local, beam = run_both(data / "m.csv", tmp_path, beam_options=IN_MEMORY, max_corrupt_fraction=0.5)
    assert_same_dataset(local, beam)
    report = json.loads((beam / "ingest_report.json").read_text())
    assert [(Path(s["path"]).name, s["reason"]) for s in report["skipped"]] == [("gone.jpg", "missing")]
