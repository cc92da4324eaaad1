"""components/core/compat.py: each patch of a private internal is undone on exit and refuses a version it was not
written for."""

import importlib.metadata
import types

import pytest

from kfp_finetune.components.core import compat


def test_the_weights_hook_is_restored():
    from keras.src.utils import file_utils

    original = file_utils.get_file
    with compat.keras_get_file(lambda *a, **k: "answered"):
        assert file_utils.get_file("x.h5", "http://example.invalid/x.h5") == "answered"
    assert file_utils.get_file is original


def test_the_multi_worker_fixes_are_restored():
    from keras.src.backend.tensorflow import trainer

    original = trainer.reduce_per_replica
    model = types.SimpleNamespace()
    with compat.multi_worker_fit(model, strategy=None):
        assert trainer.reduce_per_replica is not original and callable(model._maybe_symbolic_build)
    assert trainer.reduce_per_replica is original and not hasattr(model, "_maybe_symbolic_build")


@pytest.mark.parametrize("patch", [
    lambda: compat.keras_get_file(lambda *a, **k: "").__enter__(),
    lambda: compat.multi_worker_fit(types.SimpleNamespace(), None).__enter__(),
    compat.kfp_local_condition_resolution,
])
def test_a_patch_refuses_another_version(patch, monkeypatch):
    monkeypatch.setattr(importlib.metadata, "version", lambda package: "99.0.0")
    with pytest.raises(RuntimeError, match=r"was written for .* 99\.0\.0"):
        patch()


def test_the_pins_match_the_versions_the_patches_accept():
    from pathlib import Path

    setup = (Path(__file__).resolve().parents[2] / "setup.cfg").read_text()
    assert f"keras=={compat.KERAS_VERSION}*" in setup and f"kfp=={compat.KFP_VERSION}*" in setup
    assert importlib.metadata.version("keras").startswith(compat.KERAS_VERSION)
    assert importlib.metadata.version("kfp").startswith(compat.KFP_VERSION)
