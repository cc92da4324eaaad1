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


def test_the_application_size_probe_is_restored_and_refuses_another_keras(monkeypatch):
    from keras.src.applications import imagenet_utils

    original = imagenet_utils.obtain_input_shape
    assert compat.keras_application_sizes("MobileNet") == (224, 32)
    assert compat.keras_application_sizes("EfficientNetB1") == (240, 32)
    assert imagenet_utils.obtain_input_shape is original
    monkeypatch.setattr(importlib.metadata, "version", lambda package: "99.0.0")
    with pytest.raises(RuntimeError, match=r"keras_application_sizes was written for keras 3\.15\.x"):
        compat.keras_application_sizes("MobileNet")


def test_beams_anonymous_gcs_refuses_another_beam(monkeypatch):
    monkeypatch.setattr(importlib.metadata, "version", lambda package: "99.0.0")
    with pytest.raises(RuntimeError, match=r"beam_anonymous_gcs was written for apache-beam 2\.77\.x"):
        compat.beam_anonymous_gcs()


def test_the_component_decorator_is_put_back_at_run_time(monkeypatch):
    from kfp import dsl

    component = dsl.component
    assert compat.kfp_component_decorator_at_runtime() is False  # present: nothing to do
    monkeypatch.delattr(dsl, "component")
    assert compat.kfp_component_decorator_at_runtime() is True and dsl.component is component
    monkeypatch.delattr(dsl, "component")
    monkeypatch.setattr(importlib.metadata, "version", lambda package: "99.0.0")
    with pytest.raises(RuntimeError, match=r"kfp_component_decorator_at_runtime was written for kfp 2\.17\.x"):
        compat.kfp_component_decorator_at_runtime()
