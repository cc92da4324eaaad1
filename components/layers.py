"""Our Keras-serializable layers: the per-family input preprocessing that lives inside every model.

Registered under package "kfp_finetune", so `keras.saving.load_model(..., safe_mode=True)` rebuilds them from the
config alone (no Lambda, no pickled code). `components.modelio.load_model` imports this module before loading.

The modes are those of `keras.applications.imagenet_utils.preprocess_input`, fed raw RGB pixels in 0..255:
    tf     x / 127.5 - 1                                  (MobileNet v1/v2, ResNetV2, Inception, Xception, NASNet)
    torch  x / 255, then (x - ImageNet mean) / ImageNet std, RGB order   (DenseNet)
    caffe  RGB -> BGR, then subtract the ImageNet BGR means, no scaling  (VGG, ResNet v1)
    none   identity: the keras.applications model preprocesses inside itself
           (EfficientNet, EfficientNetV2, ConvNeXt, MobileNetV3)
"""

from __future__ import annotations

from typing import Any

import keras

PREPROCESSING_MODES = ("tf", "torch", "caffe", "none")

# The constants Keras uses in imagenet_utils._preprocess_numpy_input / _preprocess_tensor_input.
TORCH_MEAN = (0.485, 0.456, 0.406)
TORCH_STD = (0.229, 0.224, 0.225)
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


@keras.saving.register_keras_serializable(package="kfp_finetune")
class Preprocess(keras.layers.Layer):
    """Maps raw RGB pixels (0..255, channels last) to what a keras.applications backbone expects."""

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
