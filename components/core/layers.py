"""The per-family input preprocessing that lives inside every model, built from Keras's own layers only.

`preprocessing_block(mode, size)` returns a small functional model named `preprocess` made of built-in Keras
layers and ops (`Rescaling`, `Normalization`, `keras.ops.flip`), so a saved model.keras loads with plain
`keras.saving.load_model(path)` (safe mode, no custom objects): a user does not need this package to open it.

The modes are those of `keras.applications.imagenet_utils.preprocess_input`, fed raw RGB pixels in 0..255:
    tf     x / 127.5 - 1                  -> Rescaling(1/127.5, offset=-1)
           (MobileNet v1/v2, ResNetV2, Inception, Xception, NASNet)
    torch  x / 255, then (x - ImageNet mean) / ImageNet std, RGB order
           -> Normalization(mean=255*mean, variance=(255*std)^2)                      (DenseNet)
    caffe  RGB -> BGR, then subtract the ImageNet BGR means, no scaling
           -> keras.ops.flip(x, axis=-1) (a built-in op node: no weights, so nothing a fine-tune could move)
              then Normalization(mean=BGR means, variance=1)                          (VGG, ResNet v1)
    none   identity: the keras.applications model preprocesses inside itself
           -> Identity                          (EfficientNet, EfficientNetV2, ConvNeXt, MobileNetV3)

None of these layers has a trainable weight, so `trainable=True` on the feature extractor (fine-tune) leaves them
as they are.

`Preprocess` is the custom layer models written before this change hold (`kfp_finetune>Preprocess`). It stays
registered so those models still load through `modelio.load_model`, which swaps it for the built-in block
(`upgrade_legacy`); re-saving such a model (any later step, or
`python -m kfp_finetune.components.core.modelio upgrade OLD_DIR NEW_DIR`) writes the plain-Keras form.
"""

from __future__ import annotations

from typing import Any

import keras

PREPROCESSING_MODES = ("tf", "torch", "caffe", "none")
BLOCK_NAME = "preprocess"

# The constants Keras uses in imagenet_utils._preprocess_numpy_input / _preprocess_tensor_input.
TORCH_MEAN = (0.485, 0.456, 0.406)
TORCH_STD = (0.229, 0.224, 0.225)
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


def preprocessing_block(mode: str, size: int | None = None, name: str = BLOCK_NAME) -> keras.Model:
    """A functional model of built-in layers mapping raw RGB pixels (0..255) to what the family's backbone expects.

    `size` None accepts any height and width (the block is per-pixel).
    """
    if mode not in PREPROCESSING_MODES:
        raise ValueError(f"preprocessing mode {mode!r} is not one of {PREPROCESSING_MODES}")
    pixels = keras.Input(shape=(size, size, 3), dtype="float32", name=f"{name}_pixels")
    if mode == "tf":
        x = keras.layers.Rescaling(scale=1.0 / 127.5, offset=-1.0, name=f"{name}_rescale")(pixels)
    elif mode == "torch":
        x = keras.layers.Normalization(
            axis=-1, mean=[255.0 * m for m in TORCH_MEAN], variance=[(255.0 * s) ** 2 for s in TORCH_STD],
            name=f"{name}_normalize",
        )(pixels)
    elif mode == "caffe":
        bgr = keras.ops.flip(pixels, axis=-1)
        x = keras.layers.Normalization(axis=-1, mean=list(CAFFE_MEAN_BGR), variance=[1.0, 1.0, 1.0],
                                       name=f"{name}_center")(bgr)
    else:
        x = keras.layers.Identity(name=f"{name}_identity")(pixels)
    return keras.Model(pixels, x, name=name)


@keras.saving.register_keras_serializable(package="kfp_finetune")
class Preprocess(keras.layers.Layer):
    """LEGACY (models written before the built-in block): raw RGB pixels -> what a keras.applications backbone
    expects. Kept only so old model.keras files load; `upgrade_legacy` replaces it."""

    def __init__(self, mode: str = "tf", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if mode not in PREPROCESSING_MODES:
            raise ValueError(f"Preprocess mode {mode!r} is not one of {PREPROCESSING_MODES}")
        self.mode = mode

    def call(self, inputs):  # noqa: ANN001, ANN201  (Keras tensors)
        from keras import ops

        x = ops.cast(inputs, self.compute_dtype)
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "torch":
            mean = ops.convert_to_tensor(TORCH_MEAN, dtype=x.dtype)
            std = ops.convert_to_tensor(TORCH_STD, dtype=x.dtype)
            return (x / 255.0 - mean) / std
        if self.mode == "caffe":
            bgr = ops.flip(x, axis=-1)
            return bgr - ops.convert_to_tensor(CAFFE_MEAN_BGR, dtype=x.dtype)
        return x

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "mode": self.mode}


def has_legacy(model: keras.layers.Layer) -> bool:
    """Whether `model` (or any model nested in it) holds the legacy custom `Preprocess` layer."""
    if isinstance(model, Preprocess):
        return True
    return any(has_legacy(layer) for layer in getattr(model, "layers", []))


def upgrade_legacy(model: keras.Model) -> keras.Model:
    """The same model with every legacy `Preprocess` layer replaced by the built-in block (same name, same math).

    The weights are copied over (the legacy layer has none, nor has the block, so the weight lists line up).
    Returns `model` itself when there is nothing to replace.
    """
    if not has_legacy(model):
        return model

    def clone(layer: keras.layers.Layer) -> keras.layers.Layer:
        if isinstance(layer, Preprocess):
            block = preprocessing_block(layer.mode, name=layer.name)
            block.trainable = layer.trainable
            return block
        return layer.__class__.from_config(layer.get_config())

    upgraded = keras.models.clone_model(model, clone_function=clone, recursive=True)
    upgraded.set_weights(model.get_weights())
    return upgraded
