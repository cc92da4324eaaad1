"""MixUp and CutMix (components/train/mixing.py), and the soft-target loss and accuracy they train with.

Each test builds batches where image i is a constant field of value v[label i]: then any mix of two images has a mean
pixel value that is the same mix of their values, and the soft targets must say exactly that mix.
"""

import numpy as np
import pytest

from kfp_finetune.components.train import mixing

CLASSES = 5
VALUES = np.array([0.0, 10.0, 40.0, 90.0, 160.0], np.float32)  # v[c]: no value is a mix of two others by chance


def _batch(labels: list[int], size: int = 16):
    import tensorflow as tf

    images = np.stack([np.full((size, size, 3), VALUES[c], np.float32) for c in labels])
    return tf.constant(images), tf.constant(labels, tf.int32)


def _mix(seed: tuple[int, int], labels: list[int], **alphas: float):
    import tensorflow as tf

    images, y = _batch(labels)
    return mixing.mix_batch(images, y, tf.constant(seed, tf.int64), num_classes=CLASSES,
                            **{"mixup_alpha": 0.0, "cutmix_alpha": 0.0, **alphas})


@pytest.mark.parametrize("alphas", [{"mixup_alpha": 0.4}, {"cutmix_alpha": 1.0}])
def test_each_mixed_image_is_the_mix_its_targets_say(alphas: dict) -> None:
    labels = [0, 1, 2, 3, 4, 4, 2, 0]
    lams = []
    for index in range(12):
        pixels, targets = (t.numpy() for t in _mix((7, index), labels, **alphas))
        assert pixels.shape == (8, 16, 16, 3) and targets.shape == (8, CLASSES)
        np.testing.assert_allclose(targets.sum(axis=1), 1.0, rtol=1e-6)
        # The mean pixel of each mixed image is its targets' mix of the class values.
        np.testing.assert_allclose(pixels.mean(axis=(1, 2, 3)), targets @ VALUES, rtol=1e-5, atol=1e-3)
        own = targets[np.arange(8), labels]
        lams.append(float(own.min()))
        assert (own >= 0.0).all() and (own <= 1.0 + 1e-6).all()
        if "mixup_alpha" in alphas:  # MixUp: every pixel is the mix, not only the mean
            np.testing.assert_allclose(pixels.std(axis=(1, 2, 3)), 0.0, atol=1e-3)
    # λ is drawn anew for each batch index, and at least one batch is really mixed.
    assert len({round(v, 5) for v in lams}) > 6 and min(lams) < 0.9


def test_cutmix_pastes_one_box_of_the_partner() -> None:
    pixels, targets = (t.numpy() for t in _mix((3, 1), [0, 4], cutmix_alpha=1.0))
    changed = pixels[0, :, :, 0] != VALUES[0]
    if changed.any():  # the pasted region is one axis-aligned box, of the area the targets give the partner
        rows, cols = np.where(changed.any(axis=1))[0], np.where(changed.any(axis=0))[0]
        assert changed[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()
        assert changed.mean() == pytest.approx(targets[0, 4], abs=1e-6)
    else:  # the partner was itself
        assert targets[0, 0] == pytest.approx(1.0)


def test_the_draws_are_a_function_of_the_seed_alone() -> None:
    labels = [0, 1, 2, 3, 4, 0, 1, 2]
    first = [t.numpy() for t in _mix((5, 2), labels, mixup_alpha=0.2, cutmix_alpha=1.0)]
    again = [t.numpy() for t in _mix((5, 2), labels, mixup_alpha=0.2, cutmix_alpha=1.0)]
    other = [t.numpy() for t in _mix((5, 3), labels, mixup_alpha=0.2, cutmix_alpha=1.0)]
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[1], other[1])


def test_both_alphas_take_mixup_or_cutmix_per_batch() -> None:
    labels = [0, 1, 2, 3, 4, 0, 1, 2]
    kinds = set()
    for index in range(16):
        pixels, targets = (t.numpy() for t in _mix((11, index), labels, mixup_alpha=1.0, cutmix_alpha=1.0))
        np.testing.assert_allclose(pixels.mean(axis=(1, 2, 3)), targets @ VALUES, rtol=1e-5, atol=1e-3)
        kinds.add("mixup" if np.allclose(pixels.std(axis=(1, 2, 3)), 0.0, atol=1e-3) else "cutmix")
    assert kinds == {"mixup", "cutmix"}


def test_class_weights_mix_like_the_targets() -> None:
    import tensorflow as tf

    weights = {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0, 4: 5.0}
    images, y = _batch([0, 1, 2, 3, 4, 4])
    _, targets, sample_weight = mixing.mix_batch(images, y, tf.constant([1, 2], tf.int64), num_classes=CLASSES,
                                                 mixup_alpha=0.4, cutmix_alpha=0.0, class_weight=weights)
    np.testing.assert_allclose(sample_weight.numpy(), targets.numpy() @ np.array([1, 2, 3, 4, 5], np.float32),
                               rtol=1e-6)


def test_mix_batches_draws_anew_each_epoch_and_repeats_an_epoch_exactly() -> None:
    import tensorflow as tf

    images, labels = _batch([0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 2, 1])
    ds = tf.data.Dataset.from_tensor_slices((images, labels)).batch(4)
    epoch = tf.Variable(0, dtype=tf.int64)
    mixed = mixing.mix_batches(ds, num_classes=CLASSES, mixup_alpha=0.4, cutmix_alpha=0.0, seed=1, epoch=epoch)
    assert int(mixed.cardinality()) == 3

    def targets() -> np.ndarray:
        return np.concatenate([t.numpy() for _, t in mixed])

    first, again = targets(), targets()
    epoch.assign(1)
    second = targets()
    np.testing.assert_array_equal(first, again)  # an epoch (e.g. resumed) repeats its draws
    assert not np.array_equal(first, second)
    assert not np.array_equal(first[:4], first[4:8])  # each batch index has its own draw


def test_soft_target_loss_and_accuracy_agree_with_sparse_labels() -> None:
    import keras

    from kfp_finetune.components.train.model import _accuracy, sparse_crossentropy

    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(CLASSES), size=6).astype(np.float32)
    labels = np.array([0, 1, 2, 3, 4, 1])
    one_hot = np.eye(CLASSES, dtype=np.float32)[labels]
    for smoothing in (0.0, 0.1):
        sparse = float(sparse_crossentropy(smoothing)(labels, probs))
        soft = sparse_crossentropy(smoothing, soft_targets=True)
        assert float(soft(one_hot, probs)) == pytest.approx(sparse, rel=1e-5)
        assert float(soft(labels, probs)) == pytest.approx(sparse, rel=1e-5)  # validation's sparse labels
    half = 0.5 * one_hot + 0.5 * np.eye(CLASSES, dtype=np.float32)[[1, 2, 3, 4, 0, 0]]
    expected = -0.5 * (np.log(probs[np.arange(6), labels]) + np.log(probs[np.arange(6), [1, 2, 3, 4, 0, 0]]))
    assert float(sparse_crossentropy(0.0, soft_targets=True)(half, probs)) == pytest.approx(expected.mean(), rel=1e-5)

    truth = (probs.argmax(axis=1) == labels).mean()
    for targets in (labels, one_hot):
        metric = _accuracy(soft_targets=True)
        metric.update_state(keras.ops.convert_to_tensor(targets), keras.ops.convert_to_tensor(probs))
        assert float(metric.result()) == pytest.approx(truth)
