"""Discriminative (layer-wise) learning rates for fine_tune: the backbone's first layer trains at `ratio` times the
peak rate, its top layer and the head at the full rate, and the layers between at a geometric interpolation by
position (fastai's `slice(lr/100, lr)` is `ratio=0.01`; layer-wise learning-rate decay is the same idea counted in
blocks).

Keras 3 optimizers have one learning rate; `LayerwiseAdamW` scales it per variable in `update_step` (and AdamW's
decoupled weight decay with it, as a per-parameter-group rate would). Both it and the plain optimizer are
`FusedAdamW`: Keras's AdamW with one kernel per variable's step (cheaper to trace). Models are saved uncompiled
(`modelio.save_model`), so these classes never reach an artifact.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import keras


def multipliers(model: keras.Model, ratio: float) -> dict[int, float]:
    """{id(variable): learning-rate factor} for every backbone variable of `model` (`feature_extractor/backbone`).

    Layer i of the backbone's n layers (input layer excluded, in the order Keras lists them, input to output) gets
    `ratio ** (1 - i / (n - 1))`: `ratio` at the first layer, 1 at the last. Variables outside the backbone (the
    head) are absent, which means factor 1.
    """
    import keras

    backbone = model.get_layer("feature_extractor").get_layer("backbone")
    layers = [layer for layer in backbone.layers if not isinstance(layer, keras.layers.InputLayer)]
    last = max(1, len(layers) - 1)
    out: dict[int, float] = {}
    for i, layer in enumerate(layers):
        factor = float(ratio ** (1.0 - i / last))
        for variable in layer.weights:
            out[id(variable)] = factor
    return out


def layerwise_adamw(model: keras.Model, ratio: float, **kwargs: Any) -> keras.optimizers.Optimizer:
    """AdamW (keyword arguments as keras.optimizers.AdamW) with the backbone's layer-wise factors; `ratio=1`: every
    factor 1. Both are `FusedAdamW`s."""
    if ratio == 1.0:
        return _fused_class()(**kwargs)
    return _layerwise_class()(multipliers(model, ratio), **kwargs)


@functools.cache
def _fused_class() -> type:
    """The class, defined once on first use (Keras is imported only when fine-tuning)."""
    import keras
    import tensorflow as tf

    class FusedAdamW(keras.optimizers.AdamW):
        """keras.optimizers.AdamW with each variable's step as one TensorFlow kernel.

        Same rule as Keras's AdamW (decoupled decay `w -= w * weight_decay * lr`, then Adam with epsilon outside the
        square root): `ResourceApplyAdam` is that update in one op, where Keras builds about twenty per variable,
        and the decay is folded into the same per-variable step instead of a second pass over every variable. The
        train step's graph is traced once per fine_tune, and on CPU that trace costs more than the epoch on a small
        dataset: a first epoch on 53 images (MobileNet v1 0.25, 83 trainable variables) fell from 14.8 s to 7.3 s
        (bench/train.py's "fine-tune, first epoch with tracing" row measures it on flowers). Results agree with
        keras.optimizers.AdamW to float32 rounding (tests/unit/test_train.py). Sparse gradients, amsgrad and
        non-float32 variables take Keras's own path.
        """

        def _apply_weight_decay(self, variables: list) -> None:
            return  # folded into update_step

        def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
            self._decay(variable, learning_rate)
            if self.amsgrad or isinstance(gradient, tf.IndexedSlices) or variable.dtype != tf.float32:
                super().update_step(gradient, variable, learning_rate)
                return
            index = self._get_variable_index(variable)
            m, v = self._momentums[index], self._velocities[index]
            dtype = variable.dtype
            step = tf.cast(self.iterations + 1, dtype)
            beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
            tf.raw_ops.ResourceApplyAdam(
                var=variable.handle, m=_handle(m), v=_handle(v), beta1_power=tf.pow(beta_1, step),
                beta2_power=tf.pow(beta_2, step), lr=tf.cast(learning_rate, dtype), beta1=beta_1, beta2=beta_2,
                epsilon=tf.cast(self.epsilon, dtype), grad=tf.cast(gradient, dtype))

        def _decay(self, variable: Any, learning_rate: Any) -> None:
            if self.weight_decay is not None and self._use_weight_decay(variable):
                rate = tf.cast(learning_rate, variable.dtype) * tf.cast(self.weight_decay, variable.dtype)
                variable.assign_sub(variable * rate)

    def _handle(slot: Any) -> Any:
        return (slot.value if isinstance(slot, keras.Variable) else slot).handle

    return FusedAdamW


@functools.cache
def _layerwise_class() -> type:
    class LayerwiseAdamW(_fused_class()):
        """FusedAdamW whose step for each variable uses `learning_rate * factor`, the decoupled decay included
        (factors by `id` of the Keras variable, resolved to the optimizer's variable index when it is built)."""

        def __init__(self, factors: dict[int, float], **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self._factors_by_id = dict(factors)
            self._factors: list[float] = []

        def build(self, variables: list) -> None:
            super().build(variables)
            self._factors = [self._factors_by_id.get(id(v), 1.0) for v in variables]

        def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
            factor = self._factors[self._get_variable_index(variable)]
            super().update_step(gradient, variable, learning_rate if factor == 1.0 else learning_rate * factor)

    return LayerwiseAdamW
