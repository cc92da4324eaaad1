"""fine_tune's history beside the checkpoint: a resumed run keeps its earlier epochs, locally and on gs:// (the GCS
emulator; on Vertex AIP_CHECKPOINT_DIR is a gs:// URI, where the history used to be dropped)."""

import json
import types

import pytest

from kfp_finetune.components.core import gcs
from kfp_finetune.components.train.callbacks import HistoryFile, _epoch_logger, epochs_run


def _train(logger, epochs):
    logger.set_model(types.SimpleNamespace(optimizer=None))
    for epoch in epochs:
        logger.on_epoch_begin(epoch)
        logger.on_epoch_end(epoch, {"loss": 1.0 - epoch / 10, "val_accuracy": 0.5 + epoch / 20})


@pytest.fixture(params=["local", "gcs"])
def checkpoint(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "ckpt" / "fine_tune-abc")
    bucket = request.getfixturevalue("gcs_bucket")
    return f"gs://{bucket.name}/checkpoints/fine_tune-abc"


def test_a_resumed_run_keeps_its_earlier_epochs_and_counts_only_its_own(checkpoint):
    # The first attempt logs 3 of 5 epochs, then its machine goes away.
    first: dict = {}
    _train(_epoch_logger("fine_tune", 5, HistoryFile(checkpoint), first), range(3))
    # The retry: BackupAndRestore restored the state after epoch 2 (its last complete checkpoint).
    initial_epoch = 2
    history = HistoryFile(checkpoint).read(initial_epoch)
    assert history["loss"] == pytest.approx([1.0, 0.9])
    _train(_epoch_logger("fine_tune", 5, HistoryFile(checkpoint), history), range(initial_epoch, 5))
    assert history["loss"] == pytest.approx([1.0, 0.9, 0.8, 0.7, 0.6])
    assert epochs_run(history, initial_epoch) == 3
    uri = HistoryFile(checkpoint).uri
    stored = json.loads(gcs.read_text(uri) if gcs.is_gcs(uri) else open(uri).read())
    assert stored["val_accuracy"] == pytest.approx([0.5, 0.55, 0.6, 0.65, 0.7])


def test_a_fresh_run_reads_no_history(checkpoint):
    assert HistoryFile(checkpoint).read(0) == {}
    assert HistoryFile(checkpoint).read(3) == {}  # nothing stored yet
