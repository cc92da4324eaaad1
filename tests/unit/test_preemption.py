"""Preemption (issue 20): SIGTERM mid-epoch saves the exact position and exits 75; the re-run resumes at that step;
step checkpoints bound what a kill -9 loses; checkpoint writes are atomic; the SIGTERM handler is put back.

Real training of a tiny model (MobileNet α=0.25 at 32 px, random weights) on generated images, in subprocesses that
go through the CLI's `main` (the exit status is the CLI's). A SIGTERM is sent by the process to itself from a Keras
callback after global step K (so the position is known), or by the parent after a log line (a real, unsynchronised
signal). 54 training images at batch 8: 7 steps per epoch.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from kfp_finetune.components.train import HeadConfig, train_head
from kfp_finetune.components.train.preempt import EXIT_PREEMPTED, POINTER, CheckpointStore, Preempted

SIZE = 32
BATCH = 8
STEPS = 7  # ceil(54 / 8)

# The driver: the CLI's main, with (optionally) a callback that signals its own process after global step K.
DRIVER = textwrap.dedent('''
    import os, signal, sys
    import keras
    import kfp_finetune.components.train.finetune as finetune
    import kfp_finetune.components.train.head as head
    from kfp_finetune.pipelines.cli import main

    kill_at, how = int(sys.argv[1]), sys.argv[2]

    class Signaller(keras.callbacks.Callback):
        steps = 0

        def on_train_batch_end(self, batch, logs=None):
            Signaller.steps += 1
            if Signaller.steps == kill_at:
                os.kill(os.getpid(), signal.SIGKILL if how == "kill" else signal.SIGTERM)

    if kill_at > 0:  # fit's callbacks run in order: this one before the phase's own (it goes last)
        for module in (finetune, head):
            original = module._tensorboard
            module._tensorboard = lambda *a, _o=original: [*_o(*a), Signaller()]
    sys.exit(main(sys.argv[3:]))
''')


@pytest.fixture(scope="module")
def tiny(synthetic_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """{'dataset', 'backbone', 'head'}: 90 generated images, a random-weights MobileNet at 32 px, and the untrained
    (zero) head with augmentation and dropout (whose random states a checkpoint must carry)."""
    from kfp_finetune.components.backbone.step import BackboneConfig, build_backbone
    from kfp_finetune.components.ingest.step import IngestConfig, ingest

    root = tmp_path_factory.mktemp("preempt")
    # leakage="report": the generated shapes hold near-duplicates, and the step counts below need the 54 training
    # images of the content-hash split (with "move" some join train).
    ingest(IngestConfig(source=str(synthetic_folder), output=str(root / "dataset"), val_fraction=0.2,
                        test_fraction=0.2, leakage="report"))
    build_backbone(BackboneConfig(name="mobilenet", alpha=0.25, image_size=SIZE, weights="none",
                                  output=str(root / "backbone")))
    train_head(HeadConfig(dataset=str(root / "dataset"), backbone=str(root / "backbone"), output=str(root / "head"),
                          epochs=0, augment=True))
    (root / "driver.py").write_text(DRIVER)
    return {"root": root, "dataset": root / "dataset", "backbone": root / "backbone", "head": root / "head",
            "driver": root / "driver.py"}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CONFIG", "AIP_CHECKPOINT_DIR")}
    env.update(TF_CPP_MIN_LOG_LEVEL="2")
    return env


def _run(tiny: dict, argv: list[str], kill_at: int = 0, how: str = "term") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(tiny["driver"]), str(kill_at), how, *argv], env=_env(),
                          capture_output=True, text=True, timeout=240)


def _fine_tune_argv(tiny: dict, output: Path, checkpoint: Path | None, *extra: str) -> list[str]:
    argv = ["fine-tune", "--dataset", str(tiny["dataset"]), "--model", str(tiny["head"]), "--output", str(output),
            "--epochs", "3", "--batch-size", str(BATCH), "--warmup-epochs", "1", "--learning-rate", "1e-3",
            "--batch-norm", "train", "--seed", "5", *extra]
    return argv + (["--checkpoint-dir", str(checkpoint)] if checkpoint else [])


def _head_argv(tiny: dict, output: Path, checkpoint: Path | None, *extra: str) -> list[str]:
    argv = ["train-head", "--dataset", str(tiny["dataset"]), "--backbone", str(tiny["backbone"]), "--output",
            str(output), "--batch-size", str(BATCH), "--augment", "--seed", "2", *extra]
    return argv + (["--checkpoint-dir", str(checkpoint)] if checkpoint else [])


def _weights(model_dir: Path) -> list[np.ndarray]:
    from kfp_finetune.components.core import modelio

    return modelio.load_model(model_dir)[0].get_weights()


def _meta(model_dir: Path) -> dict:
    return json.loads((model_dir / "model.json").read_text())


def _pointer(checkpoint: Path) -> dict:
    [pointer] = checkpoint.glob(f"*/{POINTER}")
    return json.loads(pointer.read_text())


def _assert_same_model(a: Path, b: Path) -> None:
    """The same weights up to float noise: a tolerance far below what one training step changes (lr 1e-3), so a
    batch trained twice or skipped would show, yet not tied to one CPU's exact rounding."""
    wa, wb = _weights(a), _weights(b)
    assert len(wa) == len(wb)
    for x, y in zip(wa, wb, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_sigterm_mid_epoch_saves_the_position_and_the_rerun_resumes_there(tiny: dict, tmp_path: Path) -> None:
    reference = _run(tiny, _fine_tune_argv(tiny, tmp_path / "reference", tmp_path / "ck-ref"))
    assert reference.returncode == 0, reference.stderr[-3000:]

    ckpt, out = tmp_path / "ck", tmp_path / "tuned"
    argv = _fine_tune_argv(tiny, out, ckpt)
    k = STEPS + 3  # epoch 2, after its 3rd batch
    killed = _run(tiny, argv, kill_at=k)
    assert killed.returncode == EXIT_PREEMPTED, killed.stderr[-3000:]
    lines = [line for line in killed.stderr.splitlines() if "preempted" in line]
    assert len(lines) == 1 and "fine_tune state saved at epoch 2, step 3/7" in lines[0], killed.stderr[-3000:]
    assert _pointer(ckpt) == {**_pointer(ckpt), "epoch": 1, "batch": 3}
    assert not out.exists() and not list(tmp_path.glob(".tuned.tmp-*"))  # no partial output

    rerun = _run(tiny, argv)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from epoch 2, step 3/7" in rerun.stderr
    training = _meta(out)["training"]["fine_tune"]
    assert (training["resumed_from_epoch"], training["resumed_from_step"]) == (1, 3)
    assert training["steps_run"] == 3 * STEPS - k  # the batches already trained were not trained again
    assert rerun.stderr.count("fine_tune epoch ") == 2  # epochs 2 and 3 end in this run
    history, ref_history = _meta(out)["history"]["fine_tune"], _meta(tmp_path / "reference")["history"]["fine_tune"]
    assert len(history["loss"]) == 3
    # The resumed epoch's training loss counts its first 3 batches too (the metrics' sums are in the checkpoint).
    np.testing.assert_allclose(history["loss"], ref_history["loss"], rtol=1e-4)
    np.testing.assert_allclose(history["val_loss"], ref_history["val_loss"], rtol=1e-4)
    _assert_same_model(out, tmp_path / "reference")
    assert not list(ckpt.glob("*/ckpt-*"))  # cleaned up once the output is written


@pytest.mark.slow
def test_train_head_resumes_mid_epoch_with_augmentation(tiny: dict, tmp_path: Path) -> None:
    reference = _run(tiny, _head_argv(tiny, tmp_path / "reference", tmp_path / "ck-ref", "--epochs", "2"))
    assert reference.returncode == 0, reference.stderr[-3000:]
    argv = _head_argv(tiny, tmp_path / "head", tmp_path / "ck", "--epochs", "2")
    killed = _run(tiny, argv, kill_at=5)
    assert killed.returncode == EXIT_PREEMPTED, killed.stderr[-3000:]
    assert "train_head state saved at epoch 1, step 5/7" in killed.stderr
    rerun = _run(tiny, argv)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from epoch 1, step 5/7" in rerun.stderr
    assert _meta(tmp_path / "head")["training"]["train_head"]["steps_run"] == 2 * STEPS - 5
    _assert_same_model(tmp_path / "head", tmp_path / "reference")


def test_kill_9_with_step_checkpoints_loses_at_most_n_steps(tiny: dict, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    every, k = 2, STEPS + 3  # killed after global step 10; checkpoints after steps 2, 4, 6, 7 (epoch end), 9
    ckpt, out = tmp_path / "ck", tmp_path / "head"
    argv = _head_argv(tiny, out, ckpt, "--epochs", "2", "--checkpoint-every-steps", str(every))
    killed = _run(tiny, argv, kill_at=k, how="kill")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    pointer = _pointer(ckpt)
    saved = pointer["epoch"] * STEPS + pointer["batch"]
    assert 0 <= k - saved <= every, pointer
    # The re-run through the same CLI main, in this process (the kill needed a process of its own; the resume does
    # not, and a second TensorFlow start-up cost ~6 s).
    from kfp_finetune.pipelines.cli import main

    for name in ("TF_CONFIG", "AIP_CHECKPOINT_DIR"):
        monkeypatch.delenv(name, raising=False)
    assert main(argv) == 0
    training = _meta(out)["training"]["train_head"]
    assert training["resumed_from_epoch"] * STEPS + training["resumed_from_step"] == saved
    assert training["steps_run"] == 2 * STEPS - saved
    assert training["checkpoints_written"] >= 1 and training["checkpoint_seconds_mean"] < 10


def test_sigterm_without_a_checkpoint_folder_is_one_line_and_status_75(tiny: dict, tmp_path: Path) -> None:
    killed = _run(tiny, _head_argv(tiny, tmp_path / "head", None, "--epochs", "1"), kill_at=4)
    assert killed.returncode == EXIT_PREEMPTED, killed.stderr[-3000:]
    lines = [line for line in killed.stderr.splitlines() if "preempted" in line]
    assert len(lines) == 1, killed.stderr[-3000:]
    assert "at epoch 1, step 4 of train_head: no checkpoint_dir set, nothing saved" in lines[0]
    assert "Traceback" not in killed.stderr
    assert not (tmp_path / "head").exists()


@pytest.mark.slow
def test_sigterm_from_outside_at_any_moment_then_resume(tiny: dict, tmp_path: Path) -> None:
    """The orchestrator's signal: sent by the parent once epoch 1 is logged, wherever training then is."""
    ckpt, out = tmp_path / "ck", tmp_path / "tuned"
    argv = _fine_tune_argv(tiny, out, ckpt)
    proc = subprocess.Popen([sys.executable, str(tiny["driver"]), "0", "term", *argv], env=_env(),
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    seen = []
    try:
        for line in proc.stderr:  # type: ignore[union-attr]
            seen.append(line)
            if "fine_tune epoch 1/3" in line:
                proc.send_signal(signal.SIGTERM)
                break
        seen += proc.stderr.readlines()  # type: ignore[union-attr]
    finally:
        proc.wait(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, "".join(seen)[-3000:]
    assert sum("preempted (SIGTERM)" in line for line in seen) == 1
    rerun = _run(tiny, argv)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from epoch" in rerun.stderr
    assert len(_meta(out)["history"]["fine_tune"]["loss"]) == 3


def test_the_sigterm_handler_is_put_back_after_training(tiny: dict, tmp_path: Path) -> None:
    """In-process, as users call the steps from Python (train_head on cached features: the cheapest training)."""
    calls: list[int] = []

    def mine(signum, frame):
        calls.append(signum)

    def config(output: str) -> HeadConfig:
        return HeadConfig(dataset=str(tiny["dataset"]), backbone=str(tiny["backbone"]), output=str(tmp_path / output),
                          epochs=2, batch_size=BATCH, augment=False, checkpoint_dir=str(tmp_path / "ck"))

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        train_head(config("a"))
        assert signal.getsignal(signal.SIGTERM) is mine

        # A preempted call (from Python: Preempted is a SystemExit with status 75) puts it back too.
        import keras

        import kfp_finetune.components.train.head as head

        class SelfTerm(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                os.kill(os.getpid(), signal.SIGTERM)

        original = head._tensorboard
        head._tensorboard = lambda *a: [*original(*a), SelfTerm()]
        try:
            with pytest.raises(Preempted) as exc:
                train_head(config("b"))
        finally:
            head._tensorboard = original
        # 32 steps per call on cached features: the first call trains the whole 7-step epoch.
        assert exc.value.code == EXIT_PREEMPTED and "state saved at epoch 1, step 7/7" in str(exc.value)
        assert signal.getsignal(signal.SIGTERM) is mine
        assert calls == []  # the training's handler took that SIGTERM, not ours
        assert not (tmp_path / "b").exists()
        os.kill(os.getpid(), signal.SIGTERM)
        assert calls == [signal.SIGTERM]
        # The re-run passes over that epoch's 7 trained batches, validates it, and trains the second epoch only.
        train_head(config("b"))
        training = _meta(tmp_path / "b")["training"]["train_head"]
        assert (training["resumed_from_epoch"], training["resumed_from_step"], training["steps_run"]) == (0, 7, 7)
    finally:
        signal.signal(signal.SIGTERM, previous)


# --- atomic checkpoint writes (no training) ------------------------------------------------------------------------


def _state(epoch: int, step: int) -> dict:
    return {"format": "kfp-finetune-checkpoint/1", "phase": "fine_tune", "position": {"epoch": epoch, "step": step},
            "steps_per_epoch": STEPS, "history": {}}


def _arrays(value: float) -> dict:
    return {"model": [np.full((256, 1024), value, np.float32)], "optimizer": [np.array(value)], "metrics": [],
            "keeper": [], "early_stopping": []}


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one_usable(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path / "ck"))
    store.save(_arrays(1.0), _state(1, 3))
    # A real SIGKILL half-way through writing the next checkpoint's arrays.
    script = textwrap.dedent(f'''
        import os, signal
        import numpy as np
        from kfp_finetune.components.train import checkpoint

        def dying_write(path, data, replace=True):
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        checkpoint._atomic_write = dying_write
        state = {{"format": checkpoint.FORMAT, "phase": "fine_tune", "position": {{"epoch": 1, "step": 5}},
                 "steps_per_epoch": {STEPS}, "history": {{}}}}
        checkpoint.CheckpointStore({str(tmp_path / "ck")!r}).save(
            {{"model": [np.full((256, 1024), 2.0, np.float32)], "optimizer": [np.array(2.0)], "metrics": [],
              "keeper": [], "early_stopping": []}}, state)
    ''')
    proc = subprocess.run([sys.executable, "-c", script], env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert list((tmp_path / "ck").glob(".ckpt-000002.tmp-*")), "the kill did not land inside the write"
    name, arrays, state = store.load()
    assert name == "ckpt-000001" and state["position"] == {"epoch": 1, "step": 3}
    assert float(arrays["model"][0][0, 0]) == 1.0
    assert json.loads((tmp_path / "ck" / POINTER).read_text())["checkpoint"] == "ckpt-000001"


def test_an_unreadable_newest_checkpoint_falls_back_to_the_one_before(tmp_path: Path, caplog) -> None:
    store = CheckpointStore(str(tmp_path / "ck"))
    store.save(_arrays(1.0), _state(1, 3))
    store.save(_arrays(2.0), _state(1, 5))
    assert store.complete() == ["ckpt-000002", "ckpt-000001"]
    npz = tmp_path / "ck" / "ckpt-000002" / "state.npz"
    npz.write_bytes(npz.read_bytes()[:1000])  # truncated (a disk that lost the tail of the file)
    name, arrays, state = store.load()
    assert name == "ckpt-000001" and float(arrays["optimizer"][0]) == 1.0
    assert "ckpt-000002 cannot be read" in caplog.text
    store.save(_arrays(3.0), _state(2, 0))  # the next save keeps the two newest complete ones
    assert store.complete() == ["ckpt-000003", "ckpt-000002"]
    store.clear()
    assert not (tmp_path / "ck").exists() and store.load() is None


@pytest.fixture(params=["local", "gcs"])
def store_uri(request, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "ck" / "fine_tune-abc")
    bucket = request.getfixturevalue("gcs_bucket")  # the GCS emulator: AIP_CHECKPOINT_DIR on Vertex is gs://
    return f"gs://{bucket.name}/ck/fine_tune-abc"


def test_checkpoints_round_trip_keep_the_two_newest_and_clear(store_uri: str) -> None:
    from kfp_finetune.components.core import gcs

    store = CheckpointStore(store_uri)
    assert store.load() is None
    for i in range(1, 4):
        store.save(_arrays(float(i)), _state(0, i))
    assert store.complete() == ["ckpt-000003", "ckpt-000002"]
    name, arrays, state = store.load()
    assert name == "ckpt-000003" and state["position"] == {"epoch": 0, "step": 3}
    assert float(arrays["model"][0][5, 5]) == 3.0 and arrays["metrics"] == []
    pointer_uri = f"{store_uri}/{POINTER}"
    pointer = json.loads(gcs.read_text(pointer_uri) if gcs.is_gcs(store_uri) else Path(pointer_uri).read_text())
    assert pointer == {"epoch": 0, "batch": 3, "checkpoint": "ckpt-000003", "format": state["format"]}
    # A new writer (the retry) numbers on from the newest.
    assert CheckpointStore(store_uri).save(_arrays(4.0), _state(0, 4)) == "ckpt-000004"
    store.clear()
    assert CheckpointStore(store_uri).load() is None
