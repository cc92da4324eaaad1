"""Issue 23's drift check through ingest's profile on real photos: a season in which one class's share collapses, or
the images become 64 px grayscale thumbnails, is refused with a one-line reason before any training; a clean growth
of the data passes; no champion (or one without a profile) is "no baseline: drift not checked". The CLI doors
(`profile`, `drift`), the parameters' single definition, and the report's data section."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import types
from pathlib import Path

import pytest
from PIL import Image

from kfp_finetune.components.datacheck.params import DATA_CHECKS, DRIFT, LEAKAGE, THRESHOLDS
from kfp_finetune.components.datacheck.step import DataDriftRefused, DriftConfig, check_drift, drift_op
from kfp_finetune.components.dataprofile import PROFILE_FILE, DriftThresholds
from kfp_finetune.components.ingest.step import IngestConfig, profile_source
from kfp_finetune.pipelines.cli import main
from tests.unit.test_parameter_parity import KFP_TYPES

CLASSES = ("daisy", "dandelion", "roses", "sunflowers", "tulips")


def season(flowers: Path, root: Path, per_class: dict[str, int], *, start: int = 0, thumb: bool = False) -> Path:
    """A source folder of real photos: per_class[name] photos of each class from `start`; `thumb`: 64 px grey."""
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for photo in sorted((flowers / name).glob("*.jpg"))[start:start + per_class.get(name, 0)]:
            if thumb:
                with Image.open(photo) as im:
                    im.convert("L").resize((96, 64)).save(root / name / photo.name, "JPEG", quality=85)
            else:
                shutil.copy(photo, root / name / photo.name)
    return root


def profile_file(source: Path, out: Path) -> Path:
    profile, _ = profile_source(IngestConfig(source=str(source), output=str(out / "unused")))
    out.mkdir(parents=True, exist_ok=True)
    (out / PROFILE_FILE).write_text(profile.dumps())
    return out / PROFILE_FILE


def champion(push_to: Path, profile: Path | None) -> Path:
    """A pushed version (version.json, and the data profile when given) that LATEST names."""
    version = push_to / "20260101000000000"
    version.mkdir(parents=True)
    (version / "version.json").write_text(json.dumps({"version": version.name, "created": "2026-01-01T00:00:00Z"}))
    if profile is not None:
        shutil.copy(profile, version / PROFILE_FILE)
    (push_to / "LATEST").write_text(version.name + "\n")
    return push_to


@pytest.fixture(scope="module")
def baseline(flowers_dir, tmp_path_factory) -> Path:
    """The champion's data: 50 photos per class (250)."""
    tmp = tmp_path_factory.mktemp("baseline")
    return profile_file(season(flowers_dir, tmp / "src", dict.fromkeys(CLASSES, 50)), tmp / "p")


def test_clean_growth_passes_and_a_collapsed_class_is_refused_in_one_line(flowers_dir, baseline, tmp_path):
    grown = profile_file(season(flowers_dir, tmp_path / "grown", dict.fromkeys(CLASSES, 80)), tmp_path / "g")
    push_to = champion(tmp_path / "push", baseline)
    ok = check_drift(DriftConfig(dataset=str(grown.parent), champion_from=str(push_to), data_drift="refuse"))
    assert ok.result.verdict == "pass" and "champion 20260101000000000" in ok.line

    broken = profile_file(season(flowers_dir, tmp_path / "broken", {**dict.fromkeys(CLASSES, 60), "tulips": 3}),
                          tmp_path / "b")
    warned = check_drift(DriftConfig(dataset=str(broken), champion_from=str(push_to)))  # default: warn
    assert warned.result.verdict == "warn"
    with pytest.raises(DataDriftRefused) as refused:
        check_drift(DriftConfig(dataset=str(broken), champion_from=str(push_to), data_drift="refuse",
                                output=str(tmp_path / "out")))
    line = str(refused.value)
    assert "\n" not in line and re.search(r"class 'tulips' share 20\.\d% -> 1\.2% \(-18\.\d points, limit 10\)", line)
    assert json.loads((tmp_path / "out" / "drift.json").read_text())["verdict"] == "refuse"
    # the threshold is a parameter: 20 points tolerated -> pass
    assert check_drift(DriftConfig(dataset=str(broken), against=str(baseline), data_drift="refuse",
                                   drift_max_class_share_change=0.2)).result.verdict == "pass"


def test_64px_grey_thumbnails_are_refused_with_resolution_and_colour_mode(flowers_dir, baseline, tmp_path):
    thumbs = profile_file(season(flowers_dir, tmp_path / "t", dict.fromkeys(CLASSES, 50), start=50, thumb=True),
                          tmp_path / "tp")
    with pytest.raises(DataDriftRefused, match=r"resolution collapsed: median short side 1\d\d px -> 64 px") as e:
        check_drift(DriftConfig(dataset=str(thumbs), against=str(baseline), data_drift="refuse"))
    assert "new colour mode 'L'" in str(e.value)


def test_no_champion_or_no_stored_profile_is_no_baseline(baseline, tmp_path):
    for push_to in (tmp_path / "empty", champion(tmp_path / "old", None)):
        checked = check_drift(DriftConfig(dataset=str(baseline), champion_from=str(push_to), data_drift="refuse"))
        assert checked.result.verdict == "pass"
        assert checked.line.startswith("data drift: no baseline: drift not checked")
    assert "no --against" in check_drift(DriftConfig(dataset=str(baseline))).line


def test_bad_inputs_are_one_line(baseline, tmp_path, capsys):
    assert main(["drift", "--dataset", str(tmp_path)]) == 2
    assert f"--dataset {tmp_path}: no {PROFILE_FILE} there" in capsys.readouterr().err
    (tmp_path / "x.json").write_text("{}")
    assert main(["drift", "--dataset", str(baseline), "--against", str(tmp_path / "x.json")]) == 2
    assert "not a readable data profile" in capsys.readouterr().err
    assert main(["drift", "--dataset", str(baseline), "--drift-min-resolution-ratio", "2"]) == 2
    assert "--drift-min-resolution-ratio must be a number in [0, 1]" in capsys.readouterr().err


def test_cli_profile_and_drift(flowers_dir, baseline, tmp_path, capsys):
    src = season(flowers_dir, tmp_path / "src", {**dict.fromkeys(CLASSES, 50), "tulips": 2})
    assert main(["profile", "--source", str(src), "--html", str(tmp_path / "p.html")]) == 0
    printed = capsys.readouterr().out
    assert json.loads(printed)["kind"] == "kfp-finetune.dataprofile"
    assert "<section" in (tmp_path / "p.html").read_text()
    (tmp_path / "now.json").write_text(printed)
    assert main(["drift", "--dataset", str(tmp_path / "now.json"), "--against", str(baseline)]) == 0
    assert capsys.readouterr().out.startswith("data drift: warn: class 'tulips' share")
    assert main(["drift", "--dataset", str(tmp_path / "now.json"), "--against", str(baseline),
                 "--data-drift", "refuse"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kfp-finetune: error: data drift: refuse: class 'tulips'") and "\n" not in err


# --- one definition per parameter -------------------------------------------------------------------------------


def test_every_door_follows_the_definitions():
    from kfp_finetune.components.ingest.beam_ingest import ingest_beam_op
    from kfp_finetune.components.ingest.step import ingest_op
    from kfp_finetune.pipelines.pipeline import build_pipeline

    assert {p.name.removeprefix("drift_"): p.default for p in THRESHOLDS} == dataclasses.asdict(DriftThresholds())
    fields = {f.name: f.default for f in dataclasses.fields(DriftConfig)}
    pipeline = build_pipeline().component_spec.inputs
    for op, params in ((drift_op, DRIFT), (ingest_op, [LEAKAGE]), (ingest_beam_op, [LEAKAGE])):
        inputs = op.component_spec.inputs
        for p in params:
            assert inputs[p.name].type == KFP_TYPES[p.type] and inputs[p.name].default == p.default, p.name
            assert inputs[p.name].description, f"{p.name}: no Args line in {op.name}'s docstring"
    for p in DRIFT:
        assert fields[p.name] == p.default, p.name
    for p in DATA_CHECKS:
        assert pipeline[p.pipeline].type == KFP_TYPES[p.type] and pipeline[p.pipeline].default == p.default
    assert {f.name for f in dataclasses.fields(IngestConfig)} >= {"leakage"}
    assert IngestConfig(source="s", output="o").leakage == LEAKAGE.default


def test_the_component_and_cli_hand_every_value_on(monkeypatch, baseline, tmp_path):
    import kfp_finetune.components.datacheck.step as step

    seen: list = []

    def capture(config):
        seen.append(config)
        return step.DriftCheck(types.SimpleNamespace(verdict="pass"), "none", "data drift: pass")

    monkeypatch.setattr(step, "check_drift", capture)
    values = {"data_drift": "refuse", **{p.name: p.default / 2 if p.type is float else p.default + 1
                                        for p in THRESHOLDS}}
    argv = ["drift", "--dataset", str(baseline)]
    for p in DRIFT:
        argv += [p.flag, str(values[p.name])]
    assert main(argv) == 0
    assert {k: getattr(seen[-1], k) for k in values} == values
    out = tmp_path / "drift"
    out.mkdir()
    (out / "drift.json").write_text("{}")
    drift_op.python_func(dataset=types.SimpleNamespace(path=str(baseline.parent)),
                         drift=types.SimpleNamespace(path=str(out), metadata={}), push_to="p", **values)
    assert {k: getattr(seen[-1], k) for k in values} == values and seen[-1].champion_from == "p"


def test_the_ingest_doors_hand_leakage_on(monkeypatch):
    import kfp_finetune.components.ingest.step as step
    from kfp_finetune.components.ingest.beam_ingest import ingest_beam_op

    seen: list = []

    def capture(config):
        seen.append(config)
        return types.SimpleNamespace(class_names=("a",), num_examples={}, report={})

    monkeypatch.setattr(step, "ingest", capture)
    dataset = types.SimpleNamespace(path="d", uri="d", metadata={})
    step.ingest_op.python_func(source="s", dataset=dataset, leakage="report")
    ingest_beam_op.python_func(source="s", dataset=dataset, runner="direct", leakage="report")
    assert main(["ingest", "--source", "s", "--output", "o", "--leakage", "report"]) == 0
    assert [c.leakage for c in seen] == ["report"] * 3


def test_the_pipeline_keeps_drift_out_of_the_training_settings(tmp_path):
    import yaml

    from kfp_finetune.pipelines.pipeline import compile_pipeline

    text = compile_pipeline(tmp_path / "p.yaml").read_text()
    ir = yaml.safe_load(text)
    dags = [ir["root"], *ir["components"].values()]
    tasks = {name: t for c in dags for name, t in c.get("dag", {}).get("tasks", {}).items()}
    settings = tasks["fingerprint"]["inputs"]["parameters"]["training_settings"]
    assert "leakage" in str(settings) and "drift" not in str(settings)
    assert "data-drift" in tasks["train-head"]["dependentTasks"]
    assert tasks["data-drift"]["cachingOptions"] == {} or not tasks["data-drift"]["cachingOptions"].get("enableCache")


def test_run_shows_the_drift_line_and_the_moves_in_the_step_lines():
    from kfp_finetune.pipelines.local import step_error
    from kfp_finetune.pipelines.steplog import key_result

    drift = {"artifacts": {"drift": {"artifacts": [{"metadata": {"line": "data drift: pass (against champion 7)"}}]}}}
    assert key_result("data-drift", drift) == "data drift: pass (against champion 7)"
    dataset = {"artifacts": {"dataset": {"artifacts": [{"metadata": {
        "num_examples": {"train": 8.0, "validation": 1.0, "test": 1.0}, "class_names": ["a", "b"],
        "leakage": {"policy": "move", "cross_split_pairs": 2, "moved": 2}}}]}}}
    assert key_result("ingest", dataset) == "10 images ingested (8 train / 1 validation / 1 test), 2 classes; " \
        "2 near-duplicate(s) moved"
    tail = ["Traceback (most recent call last):", "kfp_finetune.components.datacheck.step.DataDriftRefused: "
            "data drift: refuse: x", ""]
    assert step_error(tail) == "data drift: refuse: x" and step_error(["ValueError: y"]) == ""
