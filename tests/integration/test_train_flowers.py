"""As a new user would: ingest flowers -> backbone (mirror, MobileNet α=0.25, 160 px) -> train-head -> fine-tune,
all through the CLI; the fine-tuned model must score clearly above chance (1/5) on the untouched test split."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "kfp_finetune.pipelines", *args], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, f"kfp-finetune {args[0]} failed:\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_flowers_train_head_then_fine_tune_beats_chance(flowers_dir: Path, weights_mirror: Path,
                                                        tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CONFIG", "AIP_CHECKPOINT_DIR",
                                                              "AIP_TENSORBOARD_LOG_DIR")}
    env.update(PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2", KFP_FINETUNE_WEIGHTS_MIRROR=str(weights_mirror))
    data, backbone, head, tuned = (str(tmp_path / n) for n in ("dataset", "backbone", "head", "tuned"))
    _cli("ingest", "--source", str(flowers_dir), "--output", data, env=env)
    _cli("backbone", "--name", "mobilenet", "--alpha", "0.25", "--image-size", "160", "--output", backbone, env=env)
    head_run = _cli("train-head", "--dataset", data, "--backbone", backbone, "--output", head, "--epochs", "8",
                    "--no-augment", env=env)
    assert head_run.stderr.count("train_head epoch ") == 8  # one log line per epoch
    _cli("fine-tune", "--dataset", data, "--model", head, "--output", tuned, "--epochs", "2",
         "--unfreeze-top", "12", "--learning-rate", "5e-5", env=env)

    from kfp_finetune.components.core import dataset, modelio

    meta = json.loads((tmp_path / "tuned" / "model.json").read_text())
    assert meta["phase"] == "fine_tune" and len(meta["class_names"]) == 5
    assert len(meta["history"]["train_head"]["loss"]) == 8 and len(meta["history"]["fine_tune"]["loss"]) >= 1
    model, _ = modelio.load_model(tuned)
    images, labels = [], []
    for image, label in dataset.read_split(data, "test"):
        images.append(dataset.decode_image(image, 160).numpy())
        labels.append(int(label))
    accuracy = float(np.mean(model.predict(np.stack(images), verbose=0).argmax(1) == np.array(labels)))
    assert len(labels) >= 100
    assert accuracy > 0.6, f"test accuracy {accuracy:.3f} is not clearly above chance (0.2)"
