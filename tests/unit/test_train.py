"""train_head and fine_tune on generated images, through the real ingest and backbone steps.

One small MobileNet α=0.25 at 96 px (ImageNet weights from the shared mirror) and a 90-image dataset are built
once per module; each test trains for an epoch or a few, so the module stays within ~1.5 minutes.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from kfp_finetune.components.core.errors import UserError
from kfp_finetune.components.train import FineTuneConfig, HeadConfig, fine_tune, train_head, unfreeze

REPO = Path(__file__).resolve().parents[2]
SIZE = 96


@pytest.fixture(scope="module")
def artifacts(synthetic_folder: Path, weights_mirror: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """{'dataset', 'backbone', 'head'}: ingest -> backbone -> train_head (cached features, 4 epochs). The backbone
    is the session's (tests/evalchain.py: MobileNet α=0.25, ImageNet weights, 96 px), shared read-only."""
    from kfp_finetune.components.ingest.step import IngestConfig, ingest
    from tests import evalchain

    root = tmp_path_factory.mktemp("train")
    backbone = evalchain.get(tmp_path_factory, synthetic_folder, weights_mirror).backbone
    assert evalchain.IMAGE_SIZE == SIZE
    ingest(IngestConfig(source=str(synthetic_folder), output=str(root / "dataset"), val_fraction=0.2,
                        test_fraction=0.2))
    result = train_head(HeadConfig(dataset=str(root / "dataset"), backbone=str(backbone),
                                   output=str(root / "head"), epochs=4, augment=False, learning_rate=1e-2))
    return {"root": root, "dataset": root / "dataset", "backbone": backbone, "head": root / "head",
            "head_result": result}


@pytest.fixture(scope="module")
def tuned_from_zero(artifacts: dict) -> dict:
    """One fine-tune shared by several tests (a fine-tune costs ~15 s, most of it tracing the train step): the
    untrained (zero-head) classifier with augmentation, then 2 epochs at lr 1e-3 with BatchNorm training, seed 3.

    {'h0', 'h0_result', 'tuned', 'result', 'before'}: 'before' holds h0's BatchNorm statistics."""
    root = artifacts["root"] / "tuned_from_zero"
    h0_result = train_head(HeadConfig(dataset=str(artifacts["dataset"]), backbone=str(artifacts["backbone"]),
                                      output=str(root / "h0"), epochs=0, augment=True, seed=3))
    before = _bn_stats(_load(root / "h0")[0])
    result = fine_tune(FineTuneConfig(**TUNED_FROM_ZERO, model=str(root / "h0"), output=str(root / "tuned"),
                                      dataset=str(artifacts["dataset"])))
    return {"h0": root / "h0", "h0_result": h0_result, "tuned": root / "tuned", "result": result, "before": before}


# What tuned_from_zero's fine-tune is given (test_the_same_seed_gives_the_same_model repeats it).
TUNED_FROM_ZERO = {"epochs": 2, "warmup_epochs": 0, "learning_rate": 1e-3, "batch_norm": "train",
                   "early_stopping_patience": 0, "seed": 3}


@pytest.fixture(scope="module")
def augmented_heads(artifacts: dict) -> list[Path]:
    """Two heads trained alike (1 epoch with augmentation: no feature cache, seed 3): the augmentation test reads
    the first, the determinism test compares the two."""
    root = artifacts["root"] / "augmented_heads"
    results = [train_head(HeadConfig(dataset=str(artifacts["dataset"]), backbone=str(artifacts["backbone"]),
                                     output=str(root / run), epochs=1, augment=True, seed=3)) for run in ("a", "b")]
    assert not any(r.feature_cache for r in results)
    return [root / "a", root / "b"]


def _load(path: Path):
    from kfp_finetune.components.core import modelio

    return modelio.load_model(path)


def _bn_stats(model) -> dict[str, np.ndarray]:
    import keras

    backbone = model.get_layer("feature_extractor").get_layer("backbone")
    return {f"{layer.name}/{which}": np.array(getattr(layer, which)) for layer in backbone.layers
            if isinstance(layer, keras.layers.BatchNormalization)
            for which in ("moving_mean", "moving_variance")}


def _pixels(dataset: Path, split: str):
    from kfp_finetune.components.core import dataset as ds_mod

    images, labels = [], []
    for image, label in ds_mod.read_split(dataset, split):
        images.append(ds_mod.decode_image(image, SIZE).numpy())
        labels.append(int(label))
    return np.stack(images), np.array(labels)


def test_train_head_saves_the_full_classifier_trained_on_cached_features(artifacts: dict) -> None:
    result = artifacts["head_result"]
    assert result.feature_cache and result.epochs_run == 4
    model, meta = _load(artifacts["head"])
    assert model.name == "classifier"
    assert [layer.name for layer in model.layers] == ["pixels", "feature_extractor", "dropout", "head"]
    assert meta["phase"] == "train_head"
    assert meta["class_names"] == ["circle", "square", "stripes"]
    assert meta["trainable_layers"] == ["head"]
    assert len(meta["history"]["train_head"]["val_loss"]) == 4
    assert meta["training"]["train_head"]["feature_cache"] is True
    # The head trained on cached features is the head of the saved pixel model: evaluating the full model on the
    # validation pixels reproduces the last epoch's val_loss.
    x, y = _pixels(artifacts["dataset"], "validation")
    probs = model.predict(x, verbose=0)
    smoothing = meta["training"]["train_head"]["label_smoothing"]  # the default recipe smooths the targets
    targets = (1 - smoothing) * np.eye(probs.shape[1])[y] + smoothing / probs.shape[1]
    loss = float(np.mean(-np.sum(targets * np.log(np.clip(probs, 1e-7, 1.0)), axis=1)))
    assert loss == pytest.approx(meta["history"]["train_head"]["val_loss"][-1], rel=1e-3, abs=1e-4)
    assert float(np.mean(probs.argmax(1) == y)) > 0.6  # 3 separable classes: well above chance (0.33)


def test_train_head_with_augmentation_keeps_it_for_training_only(artifacts: dict, augmented_heads: list) -> None:
    model, meta = _load(augmented_heads[0])  # trained 1 epoch with augment=True
    assert meta["training"]["train_head"]["feature_cache"] is False  # augmentation needs the pixels every epoch
    assert len(meta["history"]["train_head"]["loss"]) == 1
    assert model.layers[1].name == "augment"
    assert meta["training"]["train_head"]["class_weight"] is not None  # auto: from the train counts
    x, _ = _pixels(artifacts["dataset"], "validation")
    x = x[:4]
    np.testing.assert_allclose(model(x, training=False), model(x, training=False), rtol=1e-6)
    augmented = model.get_layer("augment")(x, training=True)
    assert not np.allclose(np.asarray(augmented), x)
    np.testing.assert_array_equal(np.asarray(model.get_layer("augment")(x, training=False)), x)


def test_unfreeze_top_and_from_with_frozen_batch_norm(artifacts: dict) -> None:
    import keras

    model, _ = _load(artifacts["head"])
    names = unfreeze(model, unfreeze_top=6, unfreeze_from=None, batch_norm="frozen")
    backbone = model.get_layer("feature_extractor").get_layer("backbone")
    layers = [layer for layer in backbone.layers if not isinstance(layer, keras.layers.InputLayer)]
    assert names == [layer.name for layer in layers[-6:]]
    for layer in layers[:-6]:
        assert not layer.trainable
    for layer in layers[-6:]:
        assert layer.trainable != isinstance(layer, keras.layers.BatchNormalization)
    assert model.get_layer("head").trainable

    model, _ = _load(artifacts["head"])
    names = unfreeze(model, unfreeze_top=None, unfreeze_from=layers[-6].name, batch_norm="train")
    assert names == [layer.name for layer in layers[-6:]]
    backbone = model.get_layer("feature_extractor").get_layer("backbone")
    layers = [layer for layer in backbone.layers if not isinstance(layer, keras.layers.InputLayer)]
    assert all(layer.trainable for layer in layers[-6:])

    with pytest.raises(UserError, match="conv_pw_13.*out of range|is not a layer.*conv_pw_13"):
        unfreeze(model, unfreeze_top=None, unfreeze_from="no_such_layer", batch_norm="frozen")
    with pytest.raises(UserError, match="out of range"):
        unfreeze(model, unfreeze_top=len(layers) + 1, unfreeze_from=None, batch_norm="frozen")


@pytest.mark.parametrize("batch_norm", ["frozen", "train"])
def test_fine_tune_batch_norm_statistics(artifacts: dict, tuned_from_zero: dict, tmp_path: Path,
                                         batch_norm: str) -> None:
    # From the untrained (uniform) classifier, so that training improves on the start and the guard keeps the
    # trained model (the module's head is already perfect on validation: a fine-tune could only tie or lose).
    # "train" is the module's shared fine-tune (2 epochs); "frozen" is one epoch of its own from the same start.
    before = tuned_from_zero["before"]
    epochs = 1 if batch_norm == "frozen" else TUNED_FROM_ZERO["epochs"]
    if batch_norm == "frozen":
        result = fine_tune(FineTuneConfig(dataset=str(artifacts["dataset"]), model=str(tuned_from_zero["h0"]),
                                          output=str(tmp_path / "tuned"), epochs=1, warmup_epochs=0,
                                          learning_rate=1e-3, batch_norm="frozen", early_stopping_patience=0))
        tuned = tmp_path / "tuned"
    else:
        assert TUNED_FROM_ZERO["batch_norm"] == batch_norm
        result, tuned = tuned_from_zero["result"], tuned_from_zero["tuned"]
    assert result.guard["kept"] == "final", result.guard
    model, meta = _load(tuned)
    after = _bn_stats(model)
    assert before.keys() == after.keys() and before
    changed = [k for k in before if not np.array_equal(before[k], after[k])]
    if batch_norm == "frozen":
        assert changed == []
        assert not any("_bn" in name for name in meta["trainable_layers"])
    else:
        assert len(changed) == len(before)
    assert meta["phase"] == "fine_tune"
    assert set(meta["history"]) == {"train_head", "fine_tune"}
    assert len(meta["history"]["fine_tune"]["loss"]) == epochs
    assert result.epochs_run == epochs and meta["training"]["fine_tune"]["batch_norm"] == batch_norm


def _copy_dataset(artifacts: dict, tmp_path: Path, **report_changes: object) -> Path:
    copy = tmp_path / "dataset"
    shutil.copytree(artifacts["dataset"], copy)
    report = json.loads((copy / "ingest_report.json").read_text())
    report.update(report_changes)
    (copy / "ingest_report.json").write_text(json.dumps(report))
    return copy


def test_fine_tune_errors_leave_nothing(artifacts: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    renamed = _copy_dataset(artifacts, tmp_path, class_names=["a", "b", "c"])
    with pytest.raises(UserError, match="class names differ"):
        fine_tune(FineTuneConfig(dataset=str(renamed), model=str(artifacts["head"]), output=str(out)))
    assert not out.exists()
    with pytest.raises(UserError, match="out of range"):
        fine_tune(FineTuneConfig(dataset=str(artifacts["dataset"]), model=str(artifacts["head"]), output=str(out),
                                 unfreeze_top=10_000))
    assert not out.exists()
    with pytest.raises(UserError, match="learning-rate"):
        FineTuneConfig(dataset="d", model="m", output="o", learning_rate=0.0)
    with pytest.raises(UserError, match="learning-rate"):
        HeadConfig(dataset="d", backbone="b", output="o", learning_rate=-1e-3)
    with pytest.raises(UserError, match="needs --no-augment"):
        HeadConfig(dataset="d", backbone="b", output="o", cache_features="on", augment=True)


def test_augment_strength_scales_the_models_augmentation(artifacts: dict, tmp_path: Path) -> None:
    """augment_strength is the rotation, zoom and contrast factor of the augment layers train_head builds into the
    model (fine_tune keeps them): a stronger setting moves the same photos further under the same seed."""
    x, _ = _pixels(artifacts["dataset"], "validation")
    x = (x[:8] + x[:8, :, ::-1, :]) / 2  # mirror-symmetric photos: the flip (always on) moves nothing
    moved = {}
    for strength in (0.05, 0.3):
        out = tmp_path / f"s{strength}"
        train_head(HeadConfig(dataset=str(artifacts["dataset"]), backbone=str(artifacts["backbone"]), output=str(out),
                              epochs=0, augment=True, augment_strength=strength, seed=3))
        model, meta = _load(out)
        assert meta["training"]["train_head"]["augment_strength"] == strength
        layers = {type(layer).__name__: layer.get_config() for layer in model.get_layer("augment").layers}
        assert layers["RandomRotation"]["factor"] in (strength, [-strength, strength], (-strength, strength))
        assert layers["RandomZoom"]["height_factor"] in (strength, [-strength, strength], (-strength, strength))
        moved[strength] = float(np.mean(np.abs(np.asarray(model.get_layer("augment")(x, training=True)) - x)))
    assert moved[0.3] > 1.5 * moved[0.05], moved
    for bad in (0.0, 0.6):
        with pytest.raises(UserError, match="augment-strength"):
            HeadConfig(dataset="d", backbone="b", output="o", augment_strength=bad)


def test_empty_split_is_an_error(artifacts: dict, tmp_path: Path) -> None:
    report = json.loads((artifacts["dataset"] / "ingest_report.json").read_text())
    empty = _copy_dataset(artifacts, tmp_path, num_examples={**report["num_examples"], "validation": 0})
    with pytest.raises(UserError, match="'validation' is empty"):
        train_head(HeadConfig(dataset=str(empty), backbone=str(artifacts["backbone"]), output=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()


def test_model_needing_unsafe_mode_is_refused(artifacts: dict, tmp_path: Path) -> None:
    import keras

    inputs = keras.Input((SIZE, SIZE, 3), name="pixels")
    model = keras.Model(inputs, keras.layers.Lambda(lambda t: t * 2.0)(inputs))
    (tmp_path / "lambda").mkdir()
    model.save(tmp_path / "lambda" / "model.keras")
    (tmp_path / "lambda" / "model.json").write_text("{}")
    with pytest.raises(UserError, match="safe_mode=False"):
        fine_tune(FineTuneConfig(dataset=str(artifacts["dataset"]), model=str(tmp_path / "lambda"),
                                 output=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()


def _cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CONFIG", "AIP_CHECKPOINT_DIR")}
    env.update(PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2", **extra)
    return env


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "kfp_finetune.pipelines", *args]


@pytest.mark.slow
def test_fine_tune_resumes_after_sigkill(artifacts: dict, tmp_path: Path) -> None:
    args = _cli("fine-tune", "--dataset", str(artifacts["dataset"]), "--model", str(artifacts["head"]),
                "--output", str(tmp_path / "tuned"), "--epochs", "12", "--batch-size", "8",
                "--early-stopping-patience", "0", "--checkpoint-dir", str(tmp_path / "ckpt"))
    proc = subprocess.Popen(args, env=_cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    killed_after = 0
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            meta = list((tmp_path / "ckpt").glob("fine_tune-*/training_metadata.json"))
            if meta:
                try:
                    killed_after = json.loads(meta[0].read_text())["epoch"]
                except (ValueError, KeyError):
                    killed_after = 0
                if killed_after >= 1:
                    proc.send_signal(signal.SIGKILL)
                    break
            time.sleep(0.05)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "tuned").exists()

    rerun = subprocess.run(args, env=_cli_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming fine_tune" in rerun.stderr
    epochs_logged = rerun.stderr.count("fine_tune epoch ")
    meta = json.loads((tmp_path / "tuned" / "model.json").read_text())
    resumed = meta["training"]["fine_tune"]["resumed_from_epoch"]
    assert resumed >= killed_after >= 1
    assert epochs_logged == 12 - resumed  # did not start over
    assert len(meta["history"]["fine_tune"]["loss"]) == 12  # the history spans both runs
    assert not list((tmp_path / "ckpt").glob("fine_tune-*/latest.weights.h5"))  # cleaned up when done


@pytest.mark.slow
def test_fine_tune_with_two_local_workers(artifacts: dict, tmp_path: Path) -> None:
    import socket

    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for index in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        args = _cli("fine-tune", "--dataset", str(artifacts["dataset"]), "--model", str(artifacts["head"]),
                    "--output", str(tmp_path / "tuned"), "--epochs", "2", "--batch-size", "16",
                    "--unfreeze-top", "10")
        procs.append(subprocess.Popen(args, env=_cli_env(TF_CONFIG=tf_config), stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
    errs = []
    for proc in procs:
        try:
            errs.append(proc.communicate(timeout=300)[1])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    assert [p.returncode for p in procs] == [0, 0], "\n".join(e[-6000:] for e in errs)
    meta = json.loads((tmp_path / "tuned" / "model.json").read_text())
    assert meta["training"]["fine_tune"]["strategy"] == "MultiWorkerMirroredStrategy"
    assert meta["training"]["fine_tune"]["replicas"] == 2
    assert "not the chief: nothing written" in errs[1]
    # Synchronous training: both workers saw the same loss every epoch.
    losses = [[line.split("loss=")[1].split()[0] for line in e.splitlines() if "fine_tune epoch" in line]
              for e in errs]
    assert losses[0] == losses[1] and len(losses[0]) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["tuned"]


def test_with_policy_computes_in_mixed_precision_and_keeps_softmax_float32(artifacts: dict) -> None:
    """What `auto` mixed precision does on a GPU with compute capability ≥ 7, checked here on the CPU."""
    from kfp_finetune.components.train import with_policy

    model, _ = _load(artifacts["head"])
    mixed = with_policy(model, "mixed_float16")
    backbone = mixed.get_layer("feature_extractor").get_layer("backbone")
    assert backbone.get_layer("conv1").dtype_policy.name == "mixed_float16"
    assert mixed.get_layer("head").dtype_policy.name == "float32"
    x, _ = _pixels(artifacts["dataset"], "validation")
    x = x[:4]
    out = mixed(x, training=False)
    assert out.dtype.name == "float32"
    np.testing.assert_allclose(np.asarray(out), np.asarray(model(x, training=False)), atol=2e-2)
    back = with_policy(mixed, "float32")
    np.testing.assert_allclose(np.asarray(back(x, training=False)), np.asarray(model(x, training=False)), atol=1e-5)


def test_components_match_the_interface() -> None:
    from kfp_finetune.components.train import fine_tune_op, train_head_op

    head_inputs = train_head_op.component_spec.inputs
    assert set(head_inputs) == {"dataset", "backbone", "epochs", "learning_rate", "batch_size", "dropout", "augment",
                                "augment_strength", "class_weights", "cache_features", "label_smoothing", "seed",
                                "determinism", "checkpoint_dir", "checkpoint_every_steps"}
    assert set(train_head_op.component_spec.outputs) == {"model"}
    assert set(fine_tune_op.component_spec.outputs) == {"tuned_model"}
    assert head_inputs["augment_strength"].default == 0.1
    assert fine_tune_op.component_spec.inputs["unfreeze_top"].default == 0
    assert fine_tune_op.component_spec.inputs["checkpoint_dir"].default == ""
    assert fine_tune_op.component_spec.inputs["label_smoothing"].default == 0.1
    # Unset: the backbone family's (components/train/family.py).
    assert fine_tune_op.component_spec.inputs["learning_rate"].default == 0.0
    assert fine_tune_op.component_spec.inputs["batch_norm"].default == "auto"
    assert fine_tune_op.component_spec.inputs["determinism"].default == "data"


# --- the study's levers: a zero-initialised head, epochs=0, label smoothing ----------------------------------------


def test_head_starts_at_chance_loss_and_learns_within_a_few_steps(artifacts: dict, tmp_path: Path) -> None:
    """Regression: a random (Glorot) head on MobileNet's pooled ReLU6 features started at loss 3-4 on 5 classes and a
    100-photo flowers set scored below chance after 2 epochs. The head now starts at zero: loss exactly ln k."""
    import math

    result = train_head(HeadConfig(dataset=str(artifacts["dataset"]), backbone=str(artifacts["backbone"]),
                                   output=str(tmp_path / "h"), epochs=2, augment=False, dropout=0.0,
                                   learning_rate=1e-9, class_weights="none"))
    chance = math.log(3)
    assert result.history["loss"][0] == pytest.approx(chance, abs=1e-3)
    assert result.history["val_loss"][0] == pytest.approx(chance, abs=1e-3)
    # Two epochs at the default learning rate on 54 images (4 steps): already far better than chance.
    learned = train_head(HeadConfig(dataset=str(artifacts["dataset"]), backbone=str(artifacts["backbone"]),
                                    output=str(tmp_path / "h2"), epochs=2, augment=False))
    assert learned.history["val_loss"][-1] < chance - 0.1
    assert learned.history["val_accuracy"][-1] >= 0.6


def test_head_epochs_zero_writes_the_untrained_classifier_and_fine_tune_trains_it(
    artifacts: dict, tuned_from_zero: dict,
) -> None:
    result = tuned_from_zero["h0_result"]  # train_head with epochs=0, augment=True
    assert result.epochs_run == 0 and result.history == {} and not result.feature_cache
    model, meta = _load(tuned_from_zero["h0"])
    assert meta["phase"] == "train_head" and meta["history"] == {"train_head": {}}
    x, y = _pixels(artifacts["dataset"], "validation")
    np.testing.assert_allclose(np.asarray(model(x, training=False)), 1 / 3, atol=1e-6)
    assert [layer.name for layer in model.layers][1] == "augment"
    # The shared fine-tune of that classifier: 2 epochs at lr 1e-3, warmup 0, BatchNorm training.
    tuned = tuned_from_zero["result"]
    assert tuned.history["loss"][-1] < tuned.history["loss"][0] < 1.2
    assert "head" in tuned.trainable_layers and any(n.startswith("feature_extractor/backbone/")
                                                    for n in tuned.trainable_layers)


def test_label_smoothing_raises_the_loss_floor_on_sparse_labels() -> None:
    """Smoothed cross-entropy on sparse labels equals Keras's categorical one on one-hot labels."""
    import keras

    from kfp_finetune.components.train import sparse_crossentropy

    y = np.array([0, 2, 1])
    p = np.array([[0.98, 0.01, 0.01], [0.1, 0.1, 0.8], [0.2, 0.7, 0.1]], dtype="float32")
    smoothed = float(sparse_crossentropy(0.1)(y, p))
    expected = float(keras.losses.CategoricalCrossentropy(label_smoothing=0.1)(np.eye(3)[y], p))
    assert smoothed == pytest.approx(expected, rel=1e-5)
    assert float(sparse_crossentropy(0.0)(y, p)) < smoothed
    weights = np.array([1.0, 0.0, 2.0])  # sample weights (what class_weight becomes) still apply
    expected_w = float(keras.losses.CategoricalCrossentropy(label_smoothing=0.1)(np.eye(3)[y], p, weights))
    assert float(sparse_crossentropy(0.1)(y, p, weights)) == pytest.approx(expected_w, rel=1e-5)


def test_label_smoothing_trains_and_is_recorded(artifacts: dict, tmp_path: Path) -> None:
    result = train_head(HeadConfig(dataset=str(artifacts["dataset"]), backbone=str(artifacts["backbone"]),
                                   output=str(tmp_path / "ls"), epochs=3, augment=False, learning_rate=1e-2,
                                   label_smoothing=0.2))
    assert result.history["val_accuracy"][-1] >= 0.6
    _, meta = _load(tmp_path / "ls")
    assert meta["training"]["train_head"]["label_smoothing"] == 0.2
    with pytest.raises(UserError, match="--label-smoothing"):
        HeadConfig(dataset="d", backbone="b", output="o", label_smoothing=1.0)
    with pytest.raises(UserError, match="--label-smoothing"):
        FineTuneConfig(dataset="d", model="m", output="o", label_smoothing=-0.1)
    with pytest.raises(UserError, match="--epochs must be an integer ≥ 0"):
        FineTuneConfig(dataset="d", model="m", output="o", epochs=-1)
    with pytest.raises(UserError, match="--epochs must be an integer ≥ 0"):
        HeadConfig(dataset="d", backbone="b", output="o", epochs=-1)


def test_guard_returns_the_starting_model_when_fine_tuning_ruins_it(
    artifacts: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """A learning rate of 3 wrecks the backbone's top 20 layers in one epoch: fine_tune hands back the head it started
    from. (The guard does not care how many layers trained; unfreezing 20 of 85 traces a train step ~30 % cheaper,
    and the wreck is still asserted below, not assumed.)"""
    import logging

    head, _ = _load(artifacts["head"])
    x, _ = _pixels(artifacts["dataset"], "validation")
    before = np.asarray(head(x, training=False))
    with caplog.at_level(logging.INFO, logger="kfp_finetune.train"):
        result = fine_tune(FineTuneConfig(dataset=str(artifacts["dataset"]), model=str(artifacts["head"]),
                                          output=str(tmp_path / "ruined"), epochs=2, learning_rate=3.0,
                                          warmup_epochs=0, batch_norm="train", label_smoothing=0.0,
                                          unfreeze_top=20))
    model, meta = _load(tmp_path / "ruined")
    guard = meta["training"]["fine_tune"]["guard"]
    assert guard["kept"] == "start", guard
    assert guard["final"]["accuracy"] < guard["start"]["accuracy"]  # the training itself did ruin it
    assert "did not improve on the head: kept the head" in guard["message"]
    assert "kept the head" in caplog.text
    np.testing.assert_allclose(np.asarray(model(x, training=False)), before, atol=1e-5)
    assert result.guard == guard and result.metrics["val_accuracy"] == pytest.approx(guard["start"]["accuracy"])
    assert result.artifact_metadata()["guard_kept"] == "start"
    # The history still shows what fine-tuning did, and the report and evaluation.json say what was kept.
    assert len(meta["history"]["fine_tune"]["loss"]) == 2
    from kfp_finetune.components.evaluate.step import EvaluateConfig, evaluate

    evaluation = evaluate(EvaluateConfig(dataset=str(artifacts["dataset"]), model=str(tmp_path / "ruined"),
                                         output=str(tmp_path / "eval"), split="validation")).evaluation
    assert evaluation["fine_tune_guard"]["kept"] == "start"
    assert "kept the head" in (tmp_path / "eval" / "report.html").read_text()


def test_guard_decision_rules() -> None:
    from kfp_finetune.components.train.guard import KEPT_BEST, KEPT_FINAL, KEPT_START, Score, decide

    start = Score(0.80, 0.60)
    assert decide(start, Score(0.85, 0.70), 3, Score(0.90, 0.50)).kept == KEPT_FINAL  # better final is kept as is
    assert decide(start, Score(0.80, 0.60), 1, Score(0.80, 0.60)).kept == KEPT_FINAL  # a tie is not worse
    assert decide(start, Score(0.80, 0.65), 2, Score(0.84, 0.55)).kept == KEPT_BEST  # same accuracy, higher loss
    worse = decide(start, Score(0.70, 0.90), 2, Score(0.79, 0.50))
    assert worse.kept == KEPT_START and "kept the head" in worse.message
    assert decide(start, Score(0.70, 0.90), None, None).kept == KEPT_START


@pytest.fixture(scope="module")
def retuned_with_family_defaults(artifacts: dict, tuned_from_zero: dict) -> Path:
    """tuned_from_zero's fine-tune again, same seed, with learning rate and BatchNorm policy left unset: MobileNet
    v1's family defaults are the lr 1e-3 / BN training that tuned_from_zero was given explicitly."""
    out = artifacts["root"] / "retuned"
    settings = {**TUNED_FROM_ZERO, "learning_rate": None, "batch_norm": "auto"}
    fine_tune(FineTuneConfig(**settings, dataset=str(artifacts["dataset"]), model=str(tuned_from_zero["h0"]),
                             output=str(out)))
    return out


def test_fine_tune_defaults_follow_the_backbone_family(retuned_with_family_defaults: Path) -> None:
    """Unset lr / BN policy come from components/train/family.py by the model's family; explicit values win."""
    from kfp_finetune.components.train import family

    assert family.resolve({"learning_rate": None, "batch_norm": "auto"}, "mobilenet")[0] == {
        "learning_rate": 1e-3, "batch_norm": "train"}
    v2, where = family.resolve({"learning_rate": None, "batch_norm": "auto"}, "mobilenet_v2")
    assert v2 == family.FAMILY_DEFAULTS["mobilenet_v2"].settings() and where["batch_norm"] == "family mobilenet_v2"
    other, where = family.resolve({"learning_rate": 5e-5, "batch_norm": "auto"}, "efficientnet")
    assert other == {"learning_rate": 5e-5, "batch_norm": family.FALLBACK.batch_norm}
    assert where == {"learning_rate": "given", "batch_norm": "fallback (family efficientnet not measured)"}
    _, meta = _load(retuned_with_family_defaults)
    recorded = meta["training"]["fine_tune"]
    assert recorded["learning_rate"] is None and recorded["batch_norm"] == "auto"  # what was asked
    assert recorded["effective"] == {"learning_rate": 1e-3, "batch_norm": "train"}  # what the family table gave
    assert recorded["effective_from"]["learning_rate"] == "family mobilenet"


def test_weight_averaging_validates_keeps_and_returns_the_average(artifacts: dict, tuned_from_zero: dict,
                                                                   tmp_path: Path) -> None:
    """ema_momentum: tuned_from_zero's fine-tune again (same seed, so the same steps), now keeping a moving average of
    the weights, with early stopping's best-epoch restore on (patience 5: it restores without stopping). The output
    is an average, not the weights the steps ended on, and it is what validation scored: the best epoch's
    val_accuracy/val_loss are the output's own, as the guard measured them."""
    out = tmp_path / "averaged"
    settings = {**TUNED_FROM_ZERO, "early_stopping_patience": 5}
    result = fine_tune(FineTuneConfig(**settings, ema_momentum=0.9, dataset=str(artifacts["dataset"]),
                                      model=str(tuned_from_zero["h0"]), output=str(out)))
    model, meta = _load(out)
    raw = _load(tuned_from_zero["tuned"])[0]
    trainable = {id(v) for v in model.trainable_weights}
    moved = [not np.allclose(a, b) for v, a, b in zip(model.weights, model.get_weights(), raw.get_weights(),
                                                     strict=True) if id(v) in trainable]
    assert sum(moved) > len(moved) // 2  # averaged: not the weights the same steps ended on
    guard = meta["training"]["fine_tune"]["guard"]
    history = meta["history"]["fine_tune"]
    best = int(np.argmin(history["val_loss"]))
    assert guard["kept"] == "final", guard
    assert guard["final"]["accuracy"] == pytest.approx(history["val_accuracy"][best])
    assert guard["final"]["loss"] == pytest.approx(history["val_loss"][best], rel=1e-4)
    assert meta["training"]["fine_tune"]["ema_momentum"] == 0.9 and result.epochs_run == 2
    with pytest.raises(UserError, match="--ema-momentum must be in \\[0, 1\\)"):
        FineTuneConfig(dataset="d", model="m", output="o", ema_momentum=1.0)


def test_fused_adamw_steps_like_keras_adamw() -> None:
    """fine_tune's optimizer (one ResourceApplyAdam kernel per variable, the decoupled decay folded in) takes the
    steps keras.optimizers.AdamW takes, under a schedule and weight decay, and its slots are Keras's own (m and v
    equal too): the trace is cheaper, the training is the same. Two fitted steps; float32 rounding apart."""
    import keras

    from kfp_finetune.components.train import layerwise

    def build() -> keras.Model:
        keras.utils.set_random_seed(3)
        inputs = keras.Input((8, 8, 3))
        x = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
        x = keras.layers.GlobalAveragePooling2D()(x)
        return keras.Model(inputs, keras.layers.Dense(3)(x))

    rng = np.random.default_rng(0)
    x, y = rng.random((16, 8, 8, 3), dtype=np.float32), np.arange(16) % 3
    results = []
    for fused in (False, True):
        model = build()
        schedule = keras.optimizers.schedules.CosineDecay(0.0, 10, warmup_target=1e-2, warmup_steps=1)
        settings = {"learning_rate": schedule, "weight_decay": 0.3}
        optimizer = (layerwise.layerwise_adamw(model, 1.0, **settings) if fused
                     else keras.optimizers.AdamW(**settings))
        model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        results.append(([np.array(v) for v in model.trainable_variables],
                        [np.array(v) for v in optimizer.variables], int(optimizer.iterations)))
    assert type(optimizer).__name__ == "FusedAdamW"
    (w_keras, slots_keras, steps_keras), (w_fused, slots_fused, steps_fused) = results
    assert steps_keras == steps_fused == 2
    start = [np.array(v) for v in build().weights]
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(w_keras, start, strict=True))
    assert moved > 1e-3  # the steps are real
    for a, b in zip(w_keras + slots_keras, w_fused + slots_fused, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


def test_discriminative_rates_scale_each_backbone_layers_step(artifacts: dict, tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """layer_lr_ratio: one AdamW step on a gradient of ones moves every weight by its rate (Adam's first step is
    lr * sign(g)), so each backbone layer's step must be the peak rate times ratio ** (1 - i / (n - 1)): the ratio at
    the first layer, the full rate at the top layer and the head. The decoupled weight decay scales with it. Then
    the fine_tune door: the setting is validated, logged and recorded."""
    import logging

    import keras

    from kfp_finetune.components.train import layerwise

    model, _ = _load(artifacts["head"])
    unfreeze(model, None, None, "train")
    backbone = model.get_layer("feature_extractor").get_layer("backbone")
    layers = [layer for layer in backbone.layers if not isinstance(layer, keras.layers.InputLayer)]
    position = {id(v): i for i, layer in enumerate(layers) for v in layer.weights}
    lr, ratio = 1e-3, 0.01
    variables = model.trainable_variables
    before = [np.array(v) for v in variables]
    optimizer = layerwise.layerwise_adamw(model, ratio, learning_rate=lr, weight_decay=0.0, epsilon=1e-12)
    optimizer.apply_gradients(zip([keras.ops.ones_like(v) for v in variables], variables, strict=True))
    # The median step: float32 rounds a 1e-5 step on a weight near 1 by up to 0.6 %; neighbouring layers' rates
    # differ by 5 % (0.01 ** (1 / 85)).
    steps = {id(v): float(np.median(np.abs(np.array(v) - b))) for v, b in zip(variables, before, strict=True)}
    expected = {k: lr * ratio ** (1 - i / (len(layers) - 1)) for k, i in position.items()}
    head = [v for v in variables if id(v) not in position]
    assert head and all(steps[id(v)] == pytest.approx(lr, rel=1e-2) for v in head)
    checked = [v for v in variables if id(v) in position]
    assert len(checked) > 20
    for v in checked:
        assert steps[id(v)] == pytest.approx(expected[id(v)], rel=1e-2), (v.path, position[id(v)])
    low = min(checked, key=lambda v: position[id(v)])
    assert steps[id(low)] < 2 * lr * ratio  # the stem barely moves, the head moves 1/ratio times more
    # Weight decay alone (zero gradient): w -= w * wd * lr * factor.
    decayed = layerwise.layerwise_adamw(model, ratio, learning_rate=lr, weight_decay=0.5)
    kernel = next(v for v in checked if len(v.shape) == 4 and np.any(np.array(v)))
    w = np.array(kernel)
    decayed.apply_gradients(zip([keras.ops.zeros_like(v) for v in variables], variables, strict=True))
    np.testing.assert_allclose(np.array(kernel), w * (1 - 0.5 * expected[id(kernel)]), rtol=1e-5, atol=1e-9)

    with pytest.raises(UserError, match="--layer-lr-ratio must be in \\(0, 1\\]"):
        FineTuneConfig(dataset="d", model="m", output="o", layer_lr_ratio=0.0)
    with caplog.at_level(logging.INFO, logger="kfp_finetune.train"):
        fine_tune(FineTuneConfig(dataset=str(artifacts["dataset"]), model=str(artifacts["head"]),
                                 output=str(tmp_path / "tuned"), epochs=1, warmup_epochs=0, unfreeze_top=20,
                                 layer_lr_ratio=ratio))
    assert "layer-wise down to 0.01x at the first backbone layer" in caplog.text
    assert _load(tmp_path / "tuned")[1]["training"]["fine_tune"]["layer_lr_ratio"] == ratio


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _load(a)[0].get_weights(), _load(b)[0].get_weights()
    assert len(wa) == len(wb)
    assert all(np.array_equal(x, y) for x, y in zip(wa, wb, strict=True))


def test_the_same_seed_gives_the_same_model(augmented_heads: list, tuned_from_zero: dict,
                                            retuned_with_family_defaults: Path) -> None:
    """determinism="data" (the default): two trainings of one seed with augmentation give the same weights bit for
    bit (seeded, ordered input; no op determinism needed on a CPU): the head phase without a feature cache, and the
    fine-tune with BatchNorm training (two 2-epoch fine-tunes of one start, seed 3; the second reaches the same lr
    and BN policy through the family defaults)."""
    _assert_same_weights(*augmented_heads)
    _assert_same_weights(tuned_from_zero["tuned"], retuned_with_family_defaults)
    # ... and the fine-tune really moved the weights (equal only because of the seed, not because nothing trained).
    start, tuned = _load(tuned_from_zero["h0"])[0].get_weights(), _load(tuned_from_zero["tuned"])[0].get_weights()
    assert sum(not np.array_equal(x, y) for x, y in zip(start, tuned, strict=True)) > len(start) // 2
    with pytest.raises(UserError, match="--determinism must be one of"):
        FineTuneConfig(dataset="d", model="m", output="o", determinism="always")


def test_fine_tune_with_mixup_and_cutmix_trains_on_mixed_batches(artifacts: dict, tuned_from_zero: dict,
                                                                  tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """mixup_alpha + cutmix_alpha: the fine-tune trains on soft targets with the class weights as sample weights,
    validates on the sparse labels, and records both settings (the mixing itself: tests/unit/test_mixing.py)."""
    out = tmp_path / "mixed"
    with caplog.at_level("INFO", logger="kfp_finetune.train"):
        # unfreeze_top=20: the mixing is in the input pipeline, whatever trains; a smaller train step traces faster
        result = fine_tune(FineTuneConfig(**{**TUNED_FROM_ZERO, "epochs": 1, "unfreeze_top": 20}, mixup_alpha=0.2,
                                          cutmix_alpha=1.0,
                                          dataset=str(artifacts["dataset"]), model=str(tuned_from_zero["h0"]),
                                          output=str(out)))
    assert "batches mixed (MixUp α=0.2 or CutMix α=1 (1/2 each))" in caplog.text
    _, meta = _load(out)
    recorded = meta["training"]["fine_tune"]
    assert recorded["mixup_alpha"] == 0.2 and recorded["cutmix_alpha"] == 1.0
    assert recorded["class_weight"]  # handed to the mixing as sample weights, not to fit
    history = meta["history"]["fine_tune"]
    assert result.epochs_run == 1 and np.isfinite(history["loss"][0])
    assert 0.0 <= history["accuracy"][0] <= 1.0 and 0.0 <= history["val_accuracy"][0] <= 1.0
    assert recorded["guard"]["kept"] in ("final", "start", "best_epoch")
    with pytest.raises(UserError, match="--cutmix-alpha must be a number ≥ 0"):
        FineTuneConfig(dataset="d", model="m", output="o", cutmix_alpha=-1.0)
