"""Discriminative (layer-wise) learning rates for fine_tune: the backbone's first layer trains at `ratio` times the
peak rate, its top layer and the head at the full rate, and the layers between at a geometric interpolation by
position (fastai's `slice(lr/100, lr)` is `ratio=0.01`; layer-wise learning-rate decay is the same idea counted in
blocks).

Keras 3 optimizers have one learning rate; `LayerwiseAdamW` scales it per variable in `update_step` (and AdamW's
decoupled weight decay with it, as a per-parameter-group rate would). Models are saved uncompiled
(`modelio.save_model`), so this class never reaches an artifact.
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
    """AdamW (keyword arguments as keras.optimizers.AdamW) with the backbone's layer-wise factors; `ratio=1`: plain
    AdamW."""
    import keras

    if ratio == 1.0:
        return keras.optimizers.AdamW(**kwargs)
    return _optimizer_class()(multipliers(model, ratio), **kwargs)


@functools.cache
def _optimizer_class() -> type:
    """The class, defined once on first use (Keras is imported only when fine-tuning)."""
    import keras

    class LayerwiseAdamW(keras.optimizers.AdamW):
        """AdamW whose step for each variable uses `learning_rate * factor` (factors by `id` of the Keras variable,
        resolved to the optimizer's variable index when it is built)."""

        def __init__(self, factors: dict[int, float], **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self._factors_by_id = dict(factors)
            self._factors: list[float] = []

        def build(self, variables: list) -> None:
            super().build(variables)
            self._factors = [self._factors_by_id.get(id(v), 1.0) for v in variables]

        def _factor(self, variable: Any) -> float:
            return self._factors[self._get_variable_index(variable)]

        def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
            factor = self._factor(variable)
            super().update_step(gradient, variable, learning_rate if factor == 1.0 else learning_rate * factor)

        def _apply_weight_decay(self, variables: list) -> None:
            # The TensorFlow backend's own (distribution-aware) decay, with each variable's factor on the rate.
            import tensorflow as tf

            if self.weight_decay is None:
                return

            def apply(distribution: Any, variables: list) -> None:
                def decay(variable: Any) -> None:
                    if self._use_weight_decay(variable):
                        lr = tf.cast(self.learning_rate, variable.dtype) * self._factor(variable)
                        variable.assign_sub(variable * tf.cast(self.weight_decay, variable.dtype) * lr)

                for variable in variables:
                    if isinstance(variable, keras.Variable):
                        variable = variable.value
                    distribution.extended.update(variable, decay, group=False)

            tf.__internal__.distribute.interim.maybe_merge_call(apply, self._distribution_strategy, variables)

    return LayerwiseAdamW

