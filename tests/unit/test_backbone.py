"""The backbone step without network or shared data: registry, preprocessing, config checks, random-init builds."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from kfp_finetune.components.backbone import step as backbone
from kfp_finetune.components.backbone.step import BackboneConfig, build_backbone
from kfp_finetune.components.core import modelio
from kfp_finetune.components.core.errors import UserError

pytestmark = pytest.mark.usefixtures("offline_weights")  # empty Keras cache, no mirror, no network


# --- registry ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, keras_name",
    [
        ("VGG16", "VGG16"), ("vgg16", "VGG16"), ("MobileNet", "MobileNet"), ("mobilenet_v2", "MobileNetV2"),
        ("ResNet50V2", "ResNet50V2"), ("resnet50_v2", "ResNet50V2"), ("EfficientNetB0", "EfficientNetB0"),
        ("efficientnet_v2_s", "EfficientNetV2S"), ("ConvNeXtTiny", "ConvNeXtTiny"), ("convnext_tiny", "ConvNeXtTiny"),
        ("MobileNetV3Small", "MobileNetV3Small"), ("mobilenet_v3_small", "MobileNetV3Small"),
        ("inception_resnet_v2", "InceptionResNetV2"), ("NASNetMobile", "NASNetMobile"),
    ],
)
def test_names_in_keras_spelling_or_snake_case(name, keras_name):
    assert backbone.lookup(name).keras_name == keras_name


def test_registry_covers_keras_applications():
    import keras

    names = backbone.valid_names()
    assert len(names) >= 40
    for name in names:
        assert callable(getattr(keras.applications, name))
    assert "decode_predictions" not in [n.lower() for n in names]


def test_unknown_name_lists_valid_ones(tmp_path):
    with pytest.raises(UserError) as err:
        BackboneConfig(name="ResNet51", output=str(tmp_path / "out"))
    message = str(err.value)
    assert "ResNet51" in message and "MobileNetV3Small" in message and "EfficientNetV2S" in message
    assert not (tmp_path / "out").exists()


EXPECTED_PREPROCESSING = {
    "VGG16": "caffe", "VGG19": "caffe", "ResNet50": "caffe", "DenseNet121": "torch", "MobileNet": "tf",
    "MobileNetV2": "tf", "ResNet50V2": "tf", "InceptionV3": "tf", "InceptionResNetV2": "tf", "Xception": "tf",
    "NASNetMobile": "tf", "EfficientNetB0": "none", "EfficientNetV2B0": "none", "ConvNeXtTiny": "none",
    "MobileNetV3Small": "none",
}


@pytest.mark.parametrize("keras_name, mode", sorted(EXPECTED_PREPROCESSING.items()))
def test_preprocessing_per_family_matches_keras(keras_name, mode):
    """Our built-in block (and the legacy layer) compute what the family's own keras.applications preprocess_input
    computes."""
    from kfp_finetune.components.core.layers import Preprocess, preprocessing_block

    spec = backbone.lookup(keras_name)
    assert spec.preprocessing == mode
    x = np.random.default_rng(1).uniform(0, 255, size=(2, 5, 7, 3)).astype("float32")
    ours = np.asarray(preprocessing_block(spec.preprocessing)(x))
    theirs = np.asarray(spec.module.preprocess_input(x.copy()))
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(Preprocess(mode=spec.preprocessing)(x)), theirs, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "name, default, minimum",
    [("MobileNet", 224, 32), ("EfficientNetB3", 300, 32), ("InceptionV3", 299, 75), ("Xception", 299, 71),
     ("NASNetLarge", 331, 32), ("EfficientNetV2S", 384, 32), ("MobileNetV3Small", 224, 32)],
)
def test_default_and_minimum_sizes_come_from_keras(name, default, minimum, tmp_path):
    spec = backbone.lookup(name)
    assert (spec.default_size, spec.min_size) == (default, minimum)
    assert BackboneConfig(name=name, output=str(tmp_path / "o"), weights="none").image_size == default


# --- config errors -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(name="VGG16", alpha=0.5), "no width multiplier"),
        (dict(name="MobileNet", alpha=0.3), "ImageNet weights exist for alpha 0.25, 0.5, 0.75, 1"),
        (dict(name="MobileNet", alpha=-1.0, weights="none"), "must be positive"),
        (dict(name="InceptionV3", image_size=64), "at least 75"),
        (dict(name="MobileNet", weights_sha256="abc"), "64 hex digits"),
        (dict(name="MobileNet", weights="/no/such/file.h5"), "no such file"),
        (dict(name="MobileNet", weights="none", weights_sha256="0" * 64), "--weights none"),
    ],
)
def test_bad_config_is_a_user_error(kwargs, fragment, tmp_path):
    with pytest.raises(UserError, match=fragment.replace(".", r"\.")):
        BackboneConfig(output=str(tmp_path / "out"), **kwargs)


def test_alpha_defaults_and_any_alpha_without_imagenet(tmp_path):
    assert BackboneConfig(name="mobilenet_v2", output=str(tmp_path / "o")).alpha == 1.0
    assert BackboneConfig(name="mobilenet_v2", output=str(tmp_path / "o"), alpha=0.3, weights="none").alpha == 0.3
    assert BackboneConfig(name="VGG16", output=str(tmp_path / "o")).alpha is None


# --- hashes --------------------------------------------------------------------------------------------------------


def test_keras_hashes_md5_or_sha256_and_user_sha256(tmp_path):
    path = tmp_path / "w.h5"
    path.write_bytes(b"weights" * 1000)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    md5 = hashlib.md5(path.read_bytes()).hexdigest()
    assert backbone._check(path, "w", md5, None) == (sha, True, "Keras's md5")
    assert backbone._check(path, "w", sha, sha)[1:] == (True, "--weights-sha256 and Keras's sha256")
    assert backbone._check(path, "w", None, None) == (sha, False, "")
    with pytest.raises(UserError, match="Keras's known hash"):
        backbone._check(path, "w", "0" * 32, None)
    with pytest.raises(UserError, match="--weights-sha256 mismatch"):
        backbone._check(path, "w", None, "0" * 64)


# --- building with random init ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, size",
    [("VGG16", 32), ("MobileNetV3Small", 32),
     # ~30 s each on 2 busy cores (mostly writing and reading 25 M / 5 M parameters with a fresh graph)
     pytest.param("ResNet50", 32, marks=pytest.mark.slow), pytest.param("EfficientNetB0", 32, marks=pytest.mark.slow)],
)
def test_weights_none_builds_saves_and_loads_in_safe_mode(name, size, tmp_path):
    out = tmp_path / "model"
    result = build_backbone(BackboneConfig(name=name, output=str(out), image_size=size, weights="none"))
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.keras"]
    meta = json.loads((out / "model.json").read_text())
    assert meta["phase"] == "backbone" and meta["input_size"] == size and meta["class_names"] is None
    assert meta["backbone"]["keras_name"] == name
    assert meta["backbone"]["weights"]["source"] == "none" and meta["backbone"]["weights"]["sha256"] is None
    assert meta["backbone"]["param_count"] == result.param_count > 0

    model, loaded_meta = modelio.load_model(out)  # safe_mode=True
    assert loaded_meta == meta
    assert model.name == "feature_extractor"
    assert [layer.name for layer in model.layers] == ["pixels", "preprocess", "backbone", "pool"]
    nested = model.get_layer("backbone")
    assert len(nested.layers) == meta["backbone"]["layer_count"]
    assert not any(type(layer).__name__ == "Lambda" for layer in nested.layers)

    x = np.random.default_rng(0).uniform(0, 255, size=(2, size, size, 3)).astype("float32")
    before = np.asarray(result.model(x))
    assert before.shape == (2, meta["backbone"]["output_dim"]) and np.isfinite(before).all()
    np.testing.assert_allclose(np.asarray(model(x)), before, rtol=1e-5, atol=1e-5)


def test_keras_layer_names_kept_inside_backbone(tmp_path):
    build_backbone(BackboneConfig(name="MobileNet", alpha=0.25, image_size=32, output=str(tmp_path / "m"),
                                  weights="none"))
    model, _ = modelio.load_model(tmp_path / "m")
    names = [layer.name for layer in model.get_layer("backbone").layers]
    assert names[1:3] == ["conv1", "conv1_bn"] and names[-1] == "conv_pw_13_relu"


# --- weights files and failures -------------------------------------------------------------------------------------


@pytest.fixture
def small_weights(tmp_path):
    """A weights file of MobileNet alpha 0.25 at 32x32 (random, so the test needs no download)."""
    import keras

    model = keras.applications.MobileNet(alpha=0.25, include_top=False, weights=None, input_shape=(32, 32, 3))
    path = tmp_path / "mobilenet_025.weights.h5"
    model.save_weights(path)
    return path, model


def test_weights_uri_loads_the_file_and_records_its_sha(small_weights, tmp_path):
    path, reference = small_weights
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    out = tmp_path / "out"
    build_backbone(BackboneConfig(name="mobilenet", alpha=0.25, image_size=32, output=str(out), weights=str(path),
                                  weights_sha256=sha.upper()))
    model, meta = modelio.load_model(out)
    weights = meta["backbone"]["weights"]
    assert (weights["source"], weights["file"], weights["uri"], weights["sha256"], weights["verified"]) == (
        "uri", path.name, str(path), sha, True)
    x = np.random.default_rng(2).uniform(0, 255, size=(2, 32, 32, 3)).astype("float32")
    expected = np.asarray(reference(x / 127.5 - 1.0)).mean(axis=(1, 2))
    np.testing.assert_allclose(np.asarray(model(x)), expected, rtol=1e-4, atol=1e-5)


def test_wrong_sha256_fails_and_writes_nothing(small_weights, tmp_path):
    path, _ = small_weights
    out = tmp_path / "out"
    config = BackboneConfig(name="mobilenet", alpha=0.25, image_size=32, output=str(out), weights=str(path),
                            weights_sha256="ab" * 32)
    with pytest.raises(UserError, match="--weights-sha256 mismatch"):
        build_backbone(config)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


def test_weights_that_do_not_fit_the_architecture(small_weights, tmp_path):
    path, _ = small_weights
    out = tmp_path / "out"
    with pytest.raises(UserError, match="does not fit MobileNet"):
        build_backbone(BackboneConfig(name="mobilenet", alpha=0.5, image_size=32, output=str(out),
                                      weights=str(path)))
    assert not out.exists()


def test_fallback_to_random_is_loud_and_recorded(tmp_path, caplog):
    out = tmp_path / "out"
    build_backbone(BackboneConfig(name="MobileNetV3Small", image_size=32, output=str(out), fallback_to_random=True))
    weights = json.loads((out / "model.json").read_text())["backbone"]["weights"]
    assert weights["source"] == "random-fallback"
    assert "RANDOMLY INITIALISED" in weights["warning"] and "weights_mobilenet_v3_small" in weights["warning"]
    assert any(r.levelname == "WARNING" and "RANDOMLY" in r.getMessage() for r in caplog.records)


def test_imagenet_without_cache_mirror_or_network_fails_clearly(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UserError) as err:
        build_backbone(BackboneConfig(name="mobilenet", alpha=0.25, image_size=128, output=str(out)))
    message = str(err.value)
    assert "mobilenet_2_5_128_tf_no_top.h5" in message and "mobilenet_2_5_224_tf_no_top.h5" in message
    assert str(tmp_path / "keras-home" / "models") in message
    assert "KFP_FINETUNE_WEIGHTS_MIRROR" in message
    assert not out.exists()
