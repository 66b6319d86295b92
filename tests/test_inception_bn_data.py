"""The recipe's input pipelines, including the real tfds ``imagenet2012`` builder on a fake
ImageNet laid out as the user's download (offline)."""

import io
import tarfile

import numpy as np
import pytest
import tensorflow as tf

from recipes.fashion_mnist import find_data_dir
from recipes.inception_bn.data import DataNotFoundError, check_imagenet_dir, load_source

SYNSETS = ["n01440764", "n01443537"]  # the first two of tfds' labels.txt: labels 0 and 1


def _jpeg(value, size=(40, 48)):
    image = np.full((*size, 3), value, np.uint8)
    return tf.io.encode_jpeg(image, quality=95).numpy()


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def fake_imagenet(tmp_path_factory):
    """ILSVRC2012_img_train.tar of per-class tars, ILSVRC2012_img_val.tar of flat JPEGs."""
    root = tmp_path_factory.mktemp("imagenet")
    with tarfile.open(root / "ILSVRC2012_img_train.tar", "w") as outer:
        for label, synset in enumerate(SYNSETS):
            inner_bytes = io.BytesIO()
            with tarfile.open(fileobj=inner_bytes, mode="w") as inner:
                for i in range(3):
                    _add(inner, f"{synset}_{i}.JPEG", _jpeg(40 + 150 * label))
            _add(outer, f"{synset}.tar", inner_bytes.getvalue())
    with tarfile.open(root / "ILSVRC2012_img_val.tar", "w") as val:
        for i in range(1, 5):
            _add(val, f"ILSVRC2012_val_{i:08d}.JPEG", _jpeg(100))
    return root


def test_tfds_imagenet2012_from_the_manual_dir(fake_imagenet, tmp_path):
    source = load_source("imagenet2012", fake_imagenet, image_size=32, prepared_dir=tmp_path / "prepared")
    assert (source.num_classes, source.image_shape) == (1000, (32, 32, 3))
    assert (source.train_examples, source.eval_examples) == (6, 4)
    images, labels = next(iter(source.train(4, 1.0, seed=0)))
    assert images.shape == (4, 32, 32, 3) and images.dtype == tf.float32
    assert -1.0 <= float(tf.reduce_min(images)) and float(tf.reduce_max(images)) <= 1.0
    assert set(labels.numpy()) <= {0, 1}
    # Class 1's images are brighter (150 grey levels): the labels travel with their images
    # through the random crops and distortions.
    means = tf.reduce_mean(images, [1, 2, 3]).numpy()
    for mean, label in zip(means, labels.numpy()):
        assert (mean > 0.0) == (label == 1)
    eval_images, eval_labels = next(iter(source.eval(8)))
    assert eval_images.shape == (4, 32, 32, 3)
    # Validation labels: tfds' validation_labels.txt, line i for val image i, as indices in labels.txt.
    import tensorflow_datasets as tfds

    folder = tfds.core.tfds_path("datasets/imagenet2012")
    synsets = (folder / "labels.txt").read_text().split()
    expected = [synsets.index(s) for s in (folder / "validation_labels.txt").read_text().split()[:4]]
    assert sorted(eval_labels.numpy().tolist()) == sorted(expected)
    np.testing.assert_allclose(eval_images.numpy(), 100 / 255 * 2 - 1, atol=0.03)
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
    images, labels = next(iter(source.eval(1000)))
    # Each class's images share a pattern: the nearest class mean recovers most labels.
    flat = images.numpy().reshape(len(images), -1)
    centroids = np.stack([flat[labels.numpy() == c].mean(0) for c in range(10)])
    predicted = np.argmin(((flat[:, None] - centroids[None]) ** 2).sum(-1), 1)
    assert (predicted == labels.numpy()).mean() > 0.9
    context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=1, num_replicas_in_sync=2)
    assert sum(int(tf.shape(b[1])[0]) for b in source.eval(100, context)) == 500


@pytest.mark.skipif(find_data_dir() is None, reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_pipeline():
    source = load_source("fashion_mnist", image_size=32)
    assert (source.num_classes, source.image_shape, source.train_examples) == (10, (32, 32, 1), 60000)
    images, labels = next(iter(source.train(16, 0.5, seed=0)))
    assert images.shape == (16, 32, 32, 1) and labels.dtype == tf.int32
    eval_images, _ = next(iter(source.eval(10000)))
    assert eval_images.shape == (10000, 32, 32, 1)


def test_batched_crops_flips_and_distortion_are_per_image():
    from recipes.inception_bn.data import grayscale_distortion, random_crops_and_flips

    tf.random.set_seed(0)
    images = tf.reshape(tf.range(64 * 6 * 6, dtype=tf.float32), (64, 6, 6, 1)) + 1.0
    crops = random_crops_and_flips(images, pad=2).numpy()
    padded = np.pad(images.numpy(), [(0, 0), (2, 2), (2, 2), (0, 0)])
    windows = set()
    for image, crop in zip(padded, crops):
        # Each output is one 6x6 window of its own padded image, mirrored or not.
        found = [(dy, dx, flip) for dy in range(5) for dx in range(5) for flip in (False, True)
                 if np.array_equal(crop, (image[dy:dy + 6, dx:dx + 6, :][:, ::-1] if flip
                                          else image[dy:dy + 6, dx:dx + 6, :]))]
        assert found
        windows.add(found[0])
    assert len(windows) > 10  # offsets and flips drawn per image, not once per batch

    flat = tf.fill((32, 4, 4, 1), 0.5) + tf.random.uniform((32, 4, 4, 1), -0.1, 0.1)
    distorted = grayscale_distortion(flat, 1.0).numpy()
    assert distorted.min() >= 0 and distorted.max() <= 1
    assert np.std(distorted.mean((1, 2, 3))) > 0.01  # brightness differs between images
    assert grayscale_distortion(flat, 0.0) is flat


def test_bad_source_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        load_source("cifar")
    with pytest.raises(ValueError, match="image size must be at least 16"):
        load_source("synthetic", image_size=8)
    with pytest.raises(DataNotFoundError, match="does not exist"):
        load_source("fashion_mnist", tmp_path / "nowhere")


@pytest.mark.slow
def test_train_on_fake_imagenet_end_to_end(fake_imagenet, tmp_path):
    """The user's command on ImageNet's layout: tfds prepares, train.py trains, evaluates, exports."""
    import subprocess
    import sys

    from tests.distributed import ROOT, TIMEOUT, _env

    result = subprocess.run(
        [sys.executable, "-m", "recipes.inception_bn.train", "--variant", "bn-x30", "--dataset", "imagenet2012",
         "--data-dir", str(fake_imagenet), "--prepared-dir", str(tmp_path / "prepared"), "--run-dir",
         str(tmp_path / "run"), "--image-size", "32", "--width-multiplier", "0.125", "--batch-size", "2",
         "--steps", "2", "--eval-every", "2"], capture_output=True, text=True, timeout=TIMEOUT, env=_env(), cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "imagenet2012 (32, 32, 3), 1000 classes" in result.stdout
    history = (tmp_path / "run" / "history.csv").read_text().splitlines()
    assert len(history) == 2 and history[1].startswith("2,")
    assert (tmp_path / "run" / "export" / "saved_model.pb").exists()
