"""The classifier and its loss: build the head on a frozen feature extractor, unfreeze the backbone for fine-tuning,
compile with (smoothed) sparse cross-entropy, save in float32.
"""

from pathlib import Path
from typing import TYPE_CHECKING, Any

from kfp_finetune.components.core.errors import UserError
from kfp_finetune.components.train.distribute import with_policy

if TYPE_CHECKING:  # pragma: no cover
    import keras


def sparse_crossentropy(label_smoothing: float = 0.0, soft_targets: bool = False) -> Any:
    """Cross-entropy on sparse integer labels, with optional label smoothing.

    Keras's SparseCategoricalCrossentropy has no `label_smoothing`; with smoothing the labels are one-hot encoded
    inside the loss (the dataset keeps sparse labels, so `class_weight` still indexes them). `soft_targets`
    (MixUp/CutMix, components/train/mixing.py): it also takes targets that are already distributions over the
    classes ([B, classes]), as the mixed training batches are, while validation's labels stay sparse.
    """
    import keras

    if not label_smoothing and not soft_targets:
        return keras.losses.SparseCategoricalCrossentropy()
    return _smoothed_loss_class()(label_smoothing=float(label_smoothing))


def _is_soft(y_true: Any, y_pred: Any) -> bool:
    """Targets [B, classes] (a distribution per example), not sparse labels [B] or [B, 1]: static shapes decide."""
    return len(y_true.shape) == 2 and y_true.shape[-1] not in (None, 1) and y_true.shape[-1] == y_pred.shape[-1]


def _smoothed_loss_class() -> type:
    import keras

    registered = keras.saving.get_registered_object("kfp_finetune>SparseCategoricalCrossentropyWithSmoothing")
    if registered is not None:
        return registered

    @keras.saving.register_keras_serializable(package="kfp_finetune")
    class SparseCategoricalCrossentropyWithSmoothing(keras.losses.Loss):
        def __init__(self, label_smoothing: float = 0.0, name: str = "sparse_categorical_crossentropy_ls",
                     **kwargs: Any) -> None:
            super().__init__(name=name, **kwargs)
            self.label_smoothing = label_smoothing

        def call(self, y_true: Any, y_pred: Any) -> Any:
            ops = keras.ops
            if _is_soft(y_true, y_pred):
                targets = ops.cast(y_true, y_pred.dtype)
            else:
                labels = ops.cast(ops.reshape(y_true, (-1,)), "int32")
                targets = ops.one_hot(labels, ops.shape(y_pred)[-1], dtype=y_pred.dtype)
            return keras.losses.categorical_crossentropy(targets, y_pred, label_smoothing=self.label_smoothing)

        def get_config(self) -> dict[str, Any]:
            return {**super().get_config(), "label_smoothing": self.label_smoothing}

    return SparseCategoricalCrossentropyWithSmoothing


def _accuracy(soft_targets: bool) -> Any:
    """The compiled `accuracy`: Keras's sparse one, or (soft_targets) one that also reads a soft target's largest
    class (a mixed training example counts as right when the model picks its larger part)."""
    import keras

    if not soft_targets:
        return keras.metrics.SparseCategoricalAccuracy(name="accuracy")

    def accuracy(y_true: Any, y_pred: Any) -> Any:
        ops = keras.ops
        truth = ops.argmax(y_true, axis=-1) if _is_soft(y_true, y_pred) else ops.reshape(y_true, (-1,))
        return ops.cast(ops.equal(ops.cast(truth, "int32"), ops.cast(ops.argmax(y_pred, axis=-1), "int32")),
                        "float32")

    return keras.metrics.MeanMetricWrapper(accuracy, name="accuracy")


def _compile(model: "keras.Model", optimizer: Any, steps_per_execution: int = 1, label_smoothing: float = 0.0,
             soft_targets: bool = False) -> None:
    model.compile(
        optimizer=optimizer,
        loss=sparse_crossentropy(label_smoothing, soft_targets),
        metrics=[_accuracy(soft_targets)],
        steps_per_execution=steps_per_execution,
    )
    _build_training_state(model)


def _build_training_state(model: "keras.Model") -> None:
    """Create the optimizer's and the compiled metrics' variables now, eagerly, in the caller's strategy scope.

    Keras leaves them to the first trace of the train function when no distribution strategy is set, and a
    tf.function whose first trace creates variables is traced a second time: the whole forward and backward graph,
    twice. Measured on MobileNet v1 α=0.25 at 64 px (tests' size): the first `fit` epoch took 18.6 s with the
    second trace and 9.7 s without it. Built here, resumed checkpoints find the same variables (preempt.py).
    """
    import keras

    model.optimizer.build(model.trainable_variables)
    classes = int(model.output_shape[-1])
    y_true, y_pred = keras.ops.zeros((1,), dtype="int32"), keras.ops.full((1, classes), 1.0 / classes)
    model.compute_metrics(None, y_true, y_pred, None)  # builds the compiled metrics (and the loss's trackers)
    model.compute_loss(None, y_true, y_pred)
    model.reset_metrics()


def trainable_layer_names(model: "keras.Model") -> list[str]:
    """Names (nested as `outer/inner`) of the layers whose weights train, in model order."""
    import keras

    names: list[str] = []

    def walk(layer: "keras.layers.Layer", prefix: str) -> None:
        if isinstance(layer, keras.Model):
            for sub in layer.layers:
                walk(sub, f"{prefix}{layer.name}/" if layer is not model else prefix)
        elif layer.trainable and layer.trainable_weights:
            names.append(prefix + layer.name)

    walk(model, "")
    return names


def _feature_extractor(model: "keras.Model", what: str) -> "keras.Model":
    try:
        return model.get_layer("feature_extractor")
    except ValueError as exc:
        raise UserError(f"{what}: the model has no `feature_extractor` layer; pass the output of train-head") from exc


def _augmentation(seed: int, strength: float = 0.1) -> "keras.Sequential":
    """Flip, then rotation, zoom and contrast by up to `strength`: Keras preprocessing layers that act only when
    training=True."""
    import keras

    return keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal", seed=seed),
            keras.layers.RandomRotation(strength, seed=seed + 1),
            keras.layers.RandomZoom(strength, seed=seed + 2),
            keras.layers.RandomContrast(strength, value_range=(0, 255), seed=seed + 3),
        ],
        name="augment",
    )


def build_classifier(
    extractor: "keras.Model", num_classes: int, dropout: float, augment: bool, seed: int = 0,
    augment_strength: float = 0.1,
) -> "keras.Model":
    """pixels -> [augment] -> feature_extractor (frozen) -> Dropout `dropout` -> Dense softmax `head`.

    The head starts at zero, so the untrained classifier predicts the uniform distribution (loss ln k). A random
    (Glorot) head on these un-normalised pooled features (ReLU6 outputs, L2 norm ~25 for MobileNet) starts with
    logits of standard deviation ~2 and a loss of 3-4 on 5 classes, which Adam at 1e-3 needs dozens of steps to
    undo: on a 100-photo set (3 steps an epoch) the head was still worse than chance after 2 epochs.
    """
    import keras

    from kfp_finetune.components.core.modelio import input_size

    extractor.trainable = False
    size = input_size(extractor)
    inputs = keras.Input(shape=(size, size, 3), name="pixels")
    x = _augmentation(seed, augment_strength)(inputs) if augment else inputs
    x = extractor(x, training=False)
    x = keras.layers.Dropout(dropout, seed=seed, name="dropout")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", kernel_initializer="zeros",
                                 name="head")(x)
    return keras.Model(inputs, outputs, name="classifier")


def _save(model: "keras.Model", meta: dict[str, Any], directory: Path, mixed: bool) -> None:
    """Save the model in float32 (the policy evaluation and serving on CPUs want)."""
    import keras

    from kfp_finetune.components.core import modelio

    if mixed:
        keras.mixed_precision.set_global_policy("float32")
        model = with_policy(model, "float32")
    modelio.save_model(model, meta, directory)


def unfreeze(model: "keras.Model", unfreeze_top: int | None, unfreeze_from: str | None, batch_norm: str) -> list[str]:
    """Make the nested `backbone` trainable, all of it unless `unfreeze_top` (its top N layers) or `unfreeze_from`
    (that layer and all above it) asks for less, and apply the BN policy.

    Returns the names of the backbone layers made trainable.
    """
    import keras

    extractor = _feature_extractor(model, "--model")
    try:
        backbone = extractor.get_layer("backbone")
    except ValueError as exc:
        raise UserError("--model: the feature_extractor has no nested `backbone` model") from exc
    layers = [layer for layer in backbone.layers if not isinstance(layer, keras.layers.InputLayer)]
    if unfreeze_from:
        names = [layer.name for layer in layers]
        if unfreeze_from not in names:
            raise UserError(f"--unfreeze-from {unfreeze_from!r} is not a layer of the backbone; its layers are: "
                            + ", ".join(names))
        start = names.index(unfreeze_from)
    elif unfreeze_top is not None:
        if unfreeze_top > len(layers):
            raise UserError(f"--unfreeze-top {unfreeze_top} is out of range: the backbone has {len(layers)} layers")
        start = len(layers) - unfreeze_top
    else:
        start = 0
    # Keras 3: setting trainable on a container sets it on every sublayer, so open the containers first.
    model.trainable = True
    extractor.trainable = True
    backbone.trainable = True
    for i, layer in enumerate(layers):
        layer.trainable = i >= start
    if batch_norm == "frozen":
        for layer in _all_layers(backbone):
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False
    return [layer.name for layer in layers[start:]]


def _backbone_size(model: "keras.Model") -> int:
    import keras

    backbone = model.get_layer("feature_extractor").get_layer("backbone")
    return sum(1 for layer in backbone.layers if not isinstance(layer, keras.layers.InputLayer))


def _all_layers(model: "keras.Model") -> list["keras.layers.Layer"]:
    """Every layer inside `model`, nested models' layers included (through the public `.layers`)."""
    out = []
    for layer in model.layers:
        out.append(layer)
        if hasattr(layer, "layers"):
            out.extend(_all_layers(layer))
    return out
