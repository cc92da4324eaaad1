"""MixUp and CutMix for fine_tune: each training batch mixed with a shuffled copy of itself, images and targets.

- MixUp (Zhang et al., 2018): pixels λ·x + (1-λ)·x[perm], targets λ·y + (1-λ)·y[perm].
- CutMix (Yun et al., 2019): a box of x[perm] pasted into x, its area (1-λ) of the image; the targets mix by the
  box's actual area (after clipping at the border).
- λ ~ Beta(α, α), one per batch (timm's default "batch" mode). With both α set, each batch takes one of the two
  with probability 1/2.

The randomness is stateless: a function of (seed, epoch, batch index), so a run resumed mid-epoch from a checkpoint
mixes the batches it has not seen as the uninterrupted run would (components/train/preempt.py passes over the
epoch's first batches). Targets become soft (one-hot, mixed), so the loss and the accuracy the fine-tune compiles
take soft targets too (components/train/model.py, `soft_targets`); validation keeps its sparse labels. With class
weights, each mixed example's weight is the same mix of its two classes' weights.

No TensorFlow at import: the pipeline imports the training package at compile time.
"""

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import tensorflow as tf


def enabled(mixup_alpha: float, cutmix_alpha: float) -> bool:
    return bool(mixup_alpha) or bool(cutmix_alpha)


def describe(mixup_alpha: float, cutmix_alpha: float) -> str:
    """For the log: "MixUp α=0.2", "CutMix α=1", "MixUp α=0.2 or CutMix α=1 (1/2 each)", or ""."""
    parts = [f"{name} α={alpha:g}" for name, alpha in (("MixUp", mixup_alpha), ("CutMix", cutmix_alpha)) if alpha]
    return " or ".join(parts) + (" (1/2 each)" if len(parts) == 2 else "")


def _beta(alpha: float, seeds: "tf.Tensor") -> "tf.Tensor":
    """One draw of Beta(α, α) from two stateless gamma draws (seeds: [2, 2] int64)."""
    import tensorflow as tf

    a = tf.random.stateless_gamma([], seed=seeds[0], alpha=alpha)
    b = tf.random.stateless_gamma([], seed=seeds[1], alpha=alpha)
    return a / tf.maximum(a + b, 1e-12)


def _cutmix(images: "tf.Tensor", partner: "tf.Tensor", lam: "tf.Tensor", seed: "tf.Tensor") -> tuple:
    """Paste a box of `partner` with area ≈ (1-λ) of the image into `images` (one box for the whole batch, as
    timm does); returns (pixels, λ of the box actually pasted)."""
    import tensorflow as tf

    shape = tf.shape(images)
    h, w = shape[1], shape[2]
    hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
    ratio = tf.sqrt(1.0 - lam)
    cut_h, cut_w = tf.cast(hf * ratio, tf.int32), tf.cast(wf * ratio, tf.int32)
    center = tf.random.stateless_uniform([2], seed=seed, minval=0.0, maxval=1.0)
    cy, cx = tf.cast(center[0] * hf, tf.int32), tf.cast(center[1] * wf, tf.int32)
    y0, y1 = tf.clip_by_value(cy - cut_h // 2, 0, h), tf.clip_by_value(cy + cut_h // 2, 0, h)
    x0, x1 = tf.clip_by_value(cx - cut_w // 2, 0, w), tf.clip_by_value(cx + cut_w // 2, 0, w)
    rows, cols = tf.range(h), tf.range(w)
    in_rows = (rows >= y0) & (rows < y1)
    in_cols = (cols >= x0) & (cols < x1)
    box = tf.logical_and(in_rows[:, None], in_cols[None, :])[None, :, :, None]
    area = tf.cast((y1 - y0) * (x1 - x0), tf.float32) / (hf * wf)
    return tf.where(box, partner, images), 1.0 - area


def mix_batch(
    images: "tf.Tensor", labels: "tf.Tensor", seed: "tf.Tensor", *, num_classes: int, mixup_alpha: float,
    cutmix_alpha: float, class_weight: Mapping[int, float] | None = None,
) -> tuple:
    """One batch (pixels [B, H, W, 3], sparse labels [B]) mixed; `seed`: a stateless seed, int64 [2].

    Returns (pixels, soft targets [B, num_classes]) or, with `class_weight`, (pixels, targets, sample weights [B]).
    """
    import tensorflow as tf

    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=6)
    labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
    batch = tf.shape(labels)[0]
    perm = tf.argsort(tf.random.stateless_uniform([batch], seed=seeds[0]))
    partner = tf.gather(images, perm)
    partner_labels = tf.gather(labels, perm)

    def mixup() -> tuple:
        lam = _beta(mixup_alpha, seeds[1:3])
        return lam * images + (1.0 - lam) * partner, lam

    def cutmix() -> tuple:
        return _cutmix(images, partner, _beta(cutmix_alpha, seeds[3:5]), seeds[5])

    if mixup_alpha and cutmix_alpha:
        pick_cutmix = tf.random.stateless_uniform([], seed=seeds[5] + 1) < 0.5
        pixels, lam = tf.cond(pick_cutmix, cutmix, mixup)
    elif cutmix_alpha:
        pixels, lam = cutmix()
    else:
        pixels, lam = mixup()
    targets = (lam * tf.one_hot(labels, num_classes) + (1.0 - lam) * tf.one_hot(partner_labels, num_classes))
    if class_weight is None:
        return pixels, targets
    weights = tf.constant([float(class_weight.get(i, 1.0)) for i in range(num_classes)], tf.float32)
    sample_weight = lam * tf.gather(weights, labels) + (1.0 - lam) * tf.gather(weights, partner_labels)
    return pixels, targets, sample_weight


def mix_batches(
    ds: "tf.data.Dataset", *, num_classes: int, mixup_alpha: float, cutmix_alpha: float, seed: int,
    epoch: "tf.Variable | None" = None, class_weight: Mapping[int, float] | None = None,
) -> "tf.data.Dataset":
    """The training batches of `ds` mixed (mix_batch), each with the stateless seed (seed, epoch, batch index).

    `epoch` (one worker: components/train/preempt.py sets it at each epoch's start) makes every epoch's draws new;
    without it (multi-worker input) each epoch repeats the same λ and boxes, over batches shuffled anew.
    """
    import tensorflow as tf

    def mix(index: "tf.Tensor", batch: tuple) -> tuple:
        images, labels = batch
        epoch_value = tf.cast(epoch, tf.int64) if epoch is not None else tf.constant(0, tf.int64)
        key = tf.stack([tf.constant(seed, tf.int64) * 1_000_003 + epoch_value, tf.cast(index, tf.int64)])
        return mix_batch(images, labels, key, num_classes=num_classes, mixup_alpha=mixup_alpha,
                         cutmix_alpha=cutmix_alpha, class_weight=class_weight)

    return ds.enumerate().map(mix, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
