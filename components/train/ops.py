"""The KFP lightweight components train_head_op and fine_tune_op: thin wrappers calling the plain functions.

KFP reads a component's parameters from its source, so the signatures are spelled out here;
tests/unit/test_parameter_parity.py holds them to the definitions in components/train/params.py (names, types,
defaults and the docstring's Args).
"""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from kfp_finetune.components.core import settings


@dsl.component(base_image=settings.component_image(), install_kfp_package=False)
def train_head_op(
    dataset: Input[Dataset],
    backbone: Input[Model],
    model: Output[Model],
    epochs: int = 5,
    learning_rate: float = 1e-3,
    batch_size: int = 32,
    dropout: float = 0.2,
    augment: bool = True,
    augment_strength: float = 0.1,
    class_weights: str = "auto",
    cache_features: str = "auto",
    label_smoothing: float = 0.1,
    seed: int = 0,
    determinism: str = "data",
    checkpoint_dir: str = "",
    checkpoint_every_steps: int = 0,
) -> None:
    """Train a classification head (dropout + dense softmax) on the frozen backbone.

    Args:
        dataset: Dataset artifact written by ingest (TFDS-format directory).
        backbone: Model artifact written by backbone (the frozen feature extractor).
        model: Output Model artifact: the full pixels -> probabilities classifier and model.json.
        epochs: Training epochs; 0 writes the untrained classifier (fine_tune then trains everything).
        learning_rate: Adam learning rate.
        batch_size: Global batch size.
        dropout: Dropout rate before the dense head.
        augment: Random flip/rotation/zoom/contrast inside the model, active in training only.
        augment_strength: Rotation (fraction of a turn), zoom and contrast factor of the augmentation, in (0, 0.5].
        class_weights: "auto" (balanced, from the train counts) or "none".
        cache_features: "auto" (on when augment is off), "on" or "off": run the backbone once and train on features.
        label_smoothing: Mix the one-hot targets with the uniform distribution by this much (0 = off).
        seed: Random seed.
        determinism: "data" (seeded, ordered input: the same seed and data give the same model on a CPU),
            "ops" (also TensorFlow op determinism, for accelerators) or "off".
        checkpoint_dir: Where to save the training state every epoch and on SIGTERM, so that a retry resumes
            mid-epoch; "" uses $AIP_CHECKPOINT_DIR when set. A preempted attempt exits with status 75.
        checkpoint_every_steps: With a checkpoint folder, also save every N training steps (0: every epoch only).
    """
    arguments = dict(locals())  # every argument is handed on: HeadConfig takes the ones params.HEAD defines
    from kfp_finetune.components.train import HeadConfig, train_head

    paths = {"dataset": dataset.path, "backbone": backbone.path, "output": model.path}
    result = train_head(HeadConfig.from_step(**{**arguments, **paths}))
    model.metadata.update(result.artifact_metadata())


@dsl.component(base_image=settings.component_image(), install_kfp_package=False)
def fine_tune_op(
    dataset: Input[Dataset],
    model: Input[Model],
    tuned_model: Output[Model],
    unfreeze_top: int = 0,
    unfreeze_from: str = "",
    epochs: int = 10,
    learning_rate: float = 0.0,
    warmup_epochs: int = 1,
    batch_size: int = 32,
    batch_norm: str = "auto",
    ema_momentum: float = 0.0,
    layer_lr_ratio: float = 1.0,
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    early_stopping_patience: int = 0,
    checkpoint_dir: str = "",
    checkpoint_every_steps: int = 0,
    label_smoothing: float = 0.1,
    seed: int = 0,
    determinism: str = "data",
) -> None:
    """Fine-tune a train_head model: unfreeze the backbone, AdamW with warmup + cosine decay, and never return a
    model worse on validation than the one it started from (the guard keeps the head or the best epoch).

    Args:
        dataset: Dataset artifact written by ingest.
        model: Model artifact written by train_head.
        tuned_model: Output Model artifact (full classifier and model.json with both phases' history).
        unfreeze_top: Unfreeze the top N backbone layers; 0 with unfreeze_from "" unfreezes all.
        unfreeze_from: Unfreeze every backbone layer from this one up; "" for none.
        epochs: Maximum epochs (early stopping may end sooner).
        learning_rate: Peak learning rate after warmup; 0 means the backbone family's (components/train/family.py).
        warmup_epochs: Epochs of linear warmup from 0.
        batch_size: Global batch size.
        batch_norm: "train" (BN statistics adapt), "frozen" (inference mode) or "auto" (the backbone family's).
        ema_momentum: Keep a moving average of the weights with this momentum (e.g. 0.99); validation, the guard and
            the output use it. 0 (default): off.
        layer_lr_ratio: Discriminative learning rates: the first backbone layer trains at this fraction of the peak
            rate, the top layer and the head at the full rate, geometrically between. 1 (default): one rate.
        mixup_alpha: MixUp: mix each training batch with a shuffled copy of itself, pixels and targets, by
            λ ~ Beta(α, α) (e.g. 0.2). 0 (default): off.
        cutmix_alpha: CutMix: paste a box of a shuffled copy, of area 1-λ, targets mixed by area (e.g. 1.0); with
            mixup_alpha too, each batch takes one of the two at random. 0 (default): off.
        early_stopping_patience: Epochs without val_loss improvement before stopping; 0 (default) disables.
        checkpoint_dir: Where to save the training state every epoch and on SIGTERM, so that a retry resumes
            mid-epoch; "" uses $AIP_CHECKPOINT_DIR when set. A preempted attempt exits with status 75.
        checkpoint_every_steps: With a checkpoint folder, also save every N training steps (0: every epoch only).
        label_smoothing: Mix the one-hot targets with the uniform distribution by this much (0 = off).
        seed: Random seed.
        determinism: "data" (seeded, ordered input: the same seed and data give the same model on a CPU),
            "ops" (also TensorFlow op determinism, for accelerators) or "off".
    """
    arguments = dict(locals())  # every argument is handed on: FineTuneConfig takes the ones params.FINE_TUNE defines
    from kfp_finetune.components.train import FineTuneConfig, fine_tune

    paths = {"dataset": dataset.path, "model": model.path, "output": tuned_model.path}
    result = fine_tune(FineTuneConfig.from_step(**{**arguments, **paths}))
    tuned_model.metadata.update(result.artifact_metadata())
