"""The recipe's input pipelines, including the real tfds ``imagenet2012`` builder on a fake
ImageNet laid out as the user's download (offline)."""

import numpy as np
import pytest
import tensorflow as tf

from recipes.fashion_mnist import find_data_dir
from recipes.inception_bn.data import (
    DataNotFoundError,
    check_imagenet_dir,
    load_source,
)
from recipes.inception_bn.steps import network_input
from tests.helpers import fake_imagenet as fake


@pytest.fixture(scope="module")
def fake_imagenet(tmp_path_factory):
    """Six training JPEGs, class 1's brighter (40 and 190 grey levels), four validation JPEGs."""
    return fake.write(tmp_path_factory.mktemp("imagenet"), [[40] * 3, [190] * 3])


def test_tfds_imagenet2012_from_the_manual_dir(fake_imagenet, tmp_path):
    source = load_source("imagenet2012", fake_imagenet, image_size=32, prepared_dir=tmp_path / "prepared")
    assert (source.num_classes, source.image_shape) == (1000, (32, 32, 3))
    assert (source.train_examples, source.eval_examples) == (6, 4)
    images, factors, labels = next(iter(source.train(4, 1.0, seed=0)))
    assert images.shape == (4, 32, 32, 3) and images.dtype == tf.uint8  # the host sends uint8
    assert factors.shape == (4, 4) and factors.dtype == tf.float32
    assert set(labels.numpy()) <= {0, 1}
    # Class 1's images are brighter (150 grey levels): the labels travel with their images
    # through the random crops, and the device's distortion keeps them apart.
    for batch in (tf.cast(images, tf.float32) / 255 * 2 - 1, network_input(images, factors, 1.0)):
        means = tf.reduce_mean(batch, [1, 2, 3]).numpy()
        for mean, label in zip(means, labels.numpy(), strict=True):
            assert (mean > 0.0) == (label == 1)
    eval_images, eval_labels = next(iter(source.eval().batch(8)))
    assert eval_images.shape == (4, 32, 32, 3)
    # Validation labels: tfds' validation_labels.txt, line i for val image i, as indices in labels.txt.
    import tensorflow_datasets as tfds

    folder = tfds.core.tfds_path("datasets/imagenet2012")
    synsets = (folder / "labels.txt").read_text().split()
    expected = [synsets.index(s) for s in (folder / "validation_labels.txt").read_text().split()[:4]]
    assert sorted(eval_labels.numpy().tolist()) == sorted(expected)
    np.testing.assert_allclose(network_input(eval_images).numpy(), 100 / 255 * 2 - 1, atol=0.03)
    assert [int(tf.shape(b[0])[0]) for b in source.eval(3).batch(8)] == [3]
    # Prepared once: a second load reads the TFRecords without the tars.
    again = load_source("imagenet2012", None, image_size=32, prepared_dir=tmp_path / "prepared")
    assert again.train_examples == 6


def test_imagenet_dir_checks(tmp_path):
    with pytest.raises(DataNotFoundError, match="--data-dir is required"):
        check_imagenet_dir(None)
    with pytest.raises(DataNotFoundError, match="does not exist"):
        check_imagenet_dir(tmp_path / "nope")
    with pytest.raises(DataNotFoundError, match="lacks ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar"):
        check_imagenet_dir(tmp_path)


def test_synthetic_is_learnable_and_sharded():
    source = load_source("synthetic", image_size=16)
    images, labels = next(iter(source.eval().batch(1000)))
    # Each class's images share a pattern: the nearest class mean recovers most labels.
    flat = images.numpy().reshape(len(images), -1)
    centroids = np.stack([flat[labels.numpy() == c].mean(0) for c in range(10)])
    predicted = np.argmin(((flat[:, None] - centroids[None]) ** 2).sum(-1), 1)
    assert (predicted == labels.numpy()).mean() > 0.9
    context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=1, num_replicas_in_sync=2)
    assert sum(1 for _ in source.eval(None, context)) == 500
    # The first 333 examples, split between two pipelines: each example in exactly one of them.
    first = [int(label) for _, label in source.eval(333)]
    shares = [[int(label) for _, label in source.eval(333, tf.distribute.InputContext(2, i, 2))] for i in (0, 1)]
    assert len(shares[0]) + len(shares[1]) == 333 and sorted(shares[0] + shares[1]) == sorted(first)


@pytest.mark.skipif(find_data_dir() is None, reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_pipeline():
    source = load_source("fashion_mnist", image_size=32)
    assert (source.num_classes, source.image_shape, source.train_examples) == (10, (32, 32, 1), 60000)
    images, factors, labels = next(iter(source.train(16, 0.5, seed=0)))
    assert images.shape == (16, 32, 32, 1) and images.dtype == tf.uint8 and labels.dtype == tf.int32
    assert network_input(images, factors, 0.5).shape == (16, 32, 32, 1)
    eval_images, _ = next(iter(source.eval().batch(10000)))
    assert eval_images.shape == (10000, 32, 32, 1) and eval_images.dtype == tf.uint8


def test_fashion_mnist_validation_split_is_held_out_of_training():
    from recipes.fashion_mnist import load_fashion_mnist

    (x_train, y_train), (x_test, y_test) = load_fashion_mnist()
    source = load_source("fashion_mnist", image_size=28, validation_examples=5000)
    assert (source.train_examples, source.eval_examples, source.test_examples) == (55000, 5000, 10000)
    assert source.test is not None and load_source("fashion_mnist").test is None
    validation_images, validation_labels = next(iter(source.eval().batch(5000)))
    np.testing.assert_array_equal(validation_images.numpy()[..., 0], x_train[55000:])
    np.testing.assert_array_equal(validation_labels.numpy(), y_train[55000:])
    test_images, test_labels = next(iter(source.test().batch(10000)))
    np.testing.assert_array_equal(test_images.numpy()[..., 0], x_test)
    np.testing.assert_array_equal(test_labels.numpy(), y_test)


def test_batched_crops_flips_and_distortion_are_per_image():
    from recipes.inception_bn.data import random_crops_and_flips

    tf.random.set_seed(0)
    images = tf.reshape(tf.range(64 * 6 * 6, dtype=tf.float32), (64, 6, 6, 1)) + 1.0
    crops = random_crops_and_flips(images, pad=2).numpy()
    padded = np.pad(images.numpy(), [(0, 0), (2, 2), (2, 2), (0, 0)])
    windows = set()
    for image, crop in zip(padded, crops, strict=True):
        # Each output is one 6x6 window of its own padded image, mirrored or not.
        found = [(dy, dx, flip) for dy in range(5) for dx in range(5) for flip in (False, True)
                 if np.array_equal(crop, (image[dy:dy + 6, dx:dx + 6, :][:, ::-1] if flip
                                          else image[dy:dy + 6, dx:dx + 6, :]))]
        assert found
        windows.add(found[0])
    assert len(windows) > 10  # offsets and flips drawn per image, not once per batch



def _per_image_reference(image, factors):
    """Today's per-image distortion, with given factors: tf.image's own ops, one image at a time."""
    brightness, saturation, hue, contrast = (float(f) for f in factors)
    image = tf.image.adjust_brightness(image, brightness)
    if image.shape[-1] == 3:
        image = tf.image.adjust_saturation(image, saturation)
        image = tf.image.adjust_hue(image, hue)
    return tf.clip_by_value(tf.image.adjust_contrast(image, contrast), 0.0, 1.0)


@pytest.mark.parametrize("channels", [3, 1])
def test_batched_device_distortion_equals_the_per_image_ops(channels):
    from recipes.inception_bn.data import apply_distortion, distortion_factors

    tf.random.set_seed(1)
    images = tf.random.uniform((16, 8, 8, channels), 0.15, 0.85)
    factors = distortion_factors(16, 1.0)
    batched = apply_distortion(images, factors).numpy()
    for image, f, out in zip(images, factors, batched, strict=True):
        np.testing.assert_allclose(out, _per_image_reference(image, f).numpy(), atol=2e-5)
    assert np.std(batched.mean((1, 2, 3))) > 0.01  # factors differ between images


def test_distortion_factors_are_googlenets_ranges_drawn_per_image():
    from recipes.inception_bn.data import NEUTRAL_FACTORS, distortion_factors

    tf.random.set_seed(2)
    factors = distortion_factors(20000, 0.5).numpy()
    # Uniform on [-16/255, 16/255], [0.75, 1.25], [-0.1, 0.1], [0.75, 1.25]: mean, spread, bounds.
    low, high = np.array([-16 / 255, 0.75, -0.1, 0.75]), np.array([16 / 255, 1.25, 0.1, 1.25])
    assert np.all(factors >= low) and np.all(factors <= high)
    np.testing.assert_allclose(factors.mean(0), (low + high) / 2, atol=0.01 * (high - low).max())
    np.testing.assert_allclose(factors.std(0), (high - low) / np.sqrt(12), rtol=0.03)
    assert abs(np.corrcoef(factors.T)[np.triu_indices(4, 1)]).max() < 0.05  # independent
    np.testing.assert_array_equal(distortion_factors(3, 0.0).numpy(), [NEUTRAL_FACTORS] * 3)


def test_network_input_scales_uint8_to_signed_unit_in_the_compute_dtype():
    images = tf.constant([[[[0], [255]], [[51], [204]]]], tf.uint8)
    out = network_input(images, dtype=tf.bfloat16)
    assert out.dtype == tf.bfloat16
    np.testing.assert_allclose(tf.cast(out, tf.float32).numpy().ravel(), [-1, 1, -0.6, 0.6], atol=1e-2)


def test_bad_source_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        load_source("cifar")
    with pytest.raises(ValueError, match="image size must be at least 16"):
        load_source("synthetic", image_size=8)
    with pytest.raises(DataNotFoundError, match="does not exist"):
        load_source("fashion_mnist", tmp_path / "nowhere")


@pytest.mark.slow
def test_train_on_fake_imagenet_end_to_end_on_two_replicas_in_mixed_precision(fake_imagenet, tmp_path):
    """The user's command on ImageNet's layout: tfds prepares, train.py trains on two replicas with
    synchronized BN in mixed precision (and op determinism), evaluates on both, exports a float32
    serving model. On the two-convolution network with bn-x30's schedule: the recipe's path is the
    subject here (the real network traced for two replicas took 41 of this test's 45 s); the real
    network folds exactly in test_inception_bn_model.py and trains in the demo's test."""
    import json
    import subprocess  # noqa: F401
    import sys

    from tests.helpers import forkserver
    from tests.helpers.distributed import ROOT, TIMEOUT, _env

    run_dir = tmp_path / "run"
    result = forkserver.run(
        [sys.executable, "-m", "tests.helpers.tiny_train", "--tiny-network", "--variant", "bn-x30",
         "--dataset", "imagenet2012",
         "--data-dir", str(fake_imagenet), "--prepared-dir", str(tmp_path / "prepared"), "--run-dir",
         str(run_dir), "--image-size", "32", "--width-multiplier", "0.125", "--batch-size", "2",
         "--cpu-replicas", "2", "--mixed-precision",  # mixed_bfloat16 on CPUs
         "--deterministic", "--steps", "4", "--eval-every", "2"], capture_output=True, text=True, timeout=TIMEOUT, env=_env(), cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "imagenet2012 (32, 32, 3), 1000 classes" in result.stdout
    assert "2 replica(s) x batch 2 = 4, synchronized BN" in result.stdout
    import csv

    with open(run_dir / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [2, 4]
    assert all(np.isfinite(float(r["train_loss"])) and 0 <= float(r["eval_top5"]) <= 1 for r in rows)
    # Learning rate scaled for the global batch of 4 (linear rule): 0.045 * 4 / 32, decayed x0.96 once
    # by step 2 (every 1.33 epochs of 1.5 steps: 6 examples, batch 4).
    assert float(rows[0]["learning_rate"]) == pytest.approx(0.005625 * 0.96, rel=1e-3)
    settings = json.loads((run_dir / "run.json").read_text())
    assert settings["initial_learning_rate"] == pytest.approx(0.005625) and settings["global_batch"] == 4
    assert settings["replicas"] == 2 and settings["synchronized_bn"] and settings["steps"] == 4
    assert settings["num_classes"] == 1000 and settings["arguments"]["deterministic"]
    # The serving model is float32 whatever the training precision.
    loaded = tf.saved_model.load(str(run_dir / "export"))
    out = loaded.serve(tf.zeros((2, 32, 32, 3))).numpy()
    assert out.shape == (2, 1000) and out.dtype == np.float32 and np.all(np.isfinite(out))
