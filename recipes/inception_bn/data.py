"""Input pipelines: ImageNet through tensorflow-datasets, Fashion-MNIST, synthetic.

Every source gives per-replica ``tf.data`` pipelines for
``strategy.distribute_datasets_from_function``: the training one shuffled,
augmented, repeated and prefetched; the evaluation one a single pass.
Images come out as float32 in [-1, 1], labels as int32.

The paper's augmentation (section 4.2, from GoogLeNet): random crops of
8%-100% of the image area and 3/4-4/3 aspect ratio, resized to the
network's input, random horizontal flips and photometric distortions
(brightness, saturation, hue, contrast) whose strength the variant sets
(section 4.2.1 reduces it with BN).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import tensorflow as tf

IMAGENET_TARS = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
SOURCES = ("imagenet2012", "fashion_mnist", "synthetic")
DEFAULT_IMAGE_SIZE = {"imagenet2012": 224, "fashion_mnist": 28, "synthetic": 32}


class DataNotFoundError(FileNotFoundError):
    """The dataset is not where the user said; the message says what must be there."""


@dataclasses.dataclass
class Source:
    """A dataset ready to feed the recipe.

    Attributes:
        name: one of ``SOURCES``.
        num_classes: classifier outputs.
        image_shape: ``(size, size, channels)`` the network sees.
        train_examples: examples per training epoch.
        eval_examples: examples in the evaluation split.
        train: ``(batch_size, distortion, seed, input_context) -> tf.data.Dataset``.
        eval: ``(batch_size, input_context) -> tf.data.Dataset``.
    """

    name: str
    num_classes: int
    image_shape: tuple
    train_examples: int
    eval_examples: int
    train: object
    eval: object


def _shard(dataset, input_context):
    if input_context is None or input_context.num_input_pipelines == 1:
        return dataset
    return dataset.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)


def to_signed_unit(image):
    """[0, 1] -> [-1, 1]."""
    return (image - 0.5) * 2.0


def _distortion_ranges(strength: float):
    """GoogLeNet-style distortion at ``strength``: the largest brightness shift, and the
    ``(lower, upper)`` factor range for contrast and saturation."""
    return 32.0 / 255.0 * strength, (1.0 - 0.5 * strength, 1.0 + 0.5 * strength)


def photometric_distortion(image, strength: float):
    """GoogLeNet-style colour distortion, scaled by ``strength`` (0: none)."""
    if strength <= 0:
        return image
    max_delta, factors = _distortion_ranges(strength)
    image = tf.image.random_brightness(image, max_delta)
    if image.shape[-1] == 3:
        image = tf.image.random_saturation(image, *factors)
        image = tf.image.random_hue(image, 0.2 * strength)
    image = tf.image.random_contrast(image, *factors)
    return tf.clip_by_value(image, 0.0, 1.0)


def random_crops_and_flips(images, pad: int):
    """Each image of a ``(B, H, W, C)`` batch zero-padded by ``pad``, cropped back to ``H x W``
    at a random offset and flipped left-right with probability 1/2 (per image, in batched ops)."""
    batch, height, width = tf.shape(images)[0], images.shape[1], images.shape[2]
    padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
    offsets = tf.random.uniform((2, batch, 1), 0, 2 * pad + 1, tf.int32)
    rows = tf.gather(padded, offsets[0] + tf.range(height), axis=1, batch_dims=1)
    crops = tf.gather(rows, offsets[1] + tf.range(width), axis=2, batch_dims=1)
    flip = tf.random.uniform((batch, 1, 1, 1)) < 0.5
    return tf.where(flip, tf.reverse(crops, [2]), crops)


def grayscale_distortion(images, strength: float):
    """:func:`photometric_distortion` for a batch of grayscale images, per image: random
    brightness, then random contrast, clipped to [0, 1]."""
    if strength <= 0:
        return images
    batch = (tf.shape(images)[0], 1, 1, 1)
    max_delta, factors = _distortion_ranges(strength)
    images = images + tf.random.uniform(batch, -max_delta, max_delta)
    factor = tf.random.uniform(batch, *factors)
    mean = tf.reduce_mean(images, axis=(1, 2), keepdims=True)
    return tf.clip_by_value((images - mean) * factor + mean, 0.0, 1.0)


# ImageNet ------------------------------------------------------------------------------------------

def check_imagenet_dir(data_dir) -> Path:
    """``data_dir`` must hold ImageNet's two tars; DataNotFoundError naming them otherwise."""
    wanted = " and ".join(IMAGENET_TARS)
    if data_dir is None:
        raise DataNotFoundError(f"--data-dir is required for imagenet2012: a directory holding {wanted} "
                                "(download them from https://image-net.org)")
    directory = Path(data_dir).expanduser()
    if not directory.is_dir():
        raise DataNotFoundError(f"--data-dir {directory} does not exist; it must hold {wanted}")
    missing = [name for name in IMAGENET_TARS
               if not (directory / name).is_file() or (directory / name).stat().st_size == 0]
    if missing:
        raise DataNotFoundError(f"--data-dir {directory} lacks {' and '.join(missing)} (non-empty); "
                                f"it must hold {wanted} from https://image-net.org")
    return directory


def _inception_crop(image_bytes, size):
    shape = tf.image.extract_jpeg_shape(image_bytes)
    begin, crop_size, _ = tf.image.sample_distorted_bounding_box(
        shape, bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=(1, 1, 4)),
        min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0),
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    offset_y, offset_x, _ = tf.unstack(begin)
    height, width, _ = tf.unstack(crop_size)
    image = tf.image.decode_and_crop_jpeg(image_bytes, tf.stack([offset_y, offset_x, height, width]), channels=3)
    return tf.image.resize(tf.image.convert_image_dtype(image, tf.float32), (size, size))


def _central_crop(image_bytes, size, fraction=0.875):
    image = tf.image.convert_image_dtype(tf.io.decode_jpeg(image_bytes, channels=3), tf.float32)
    return tf.image.resize(tf.image.central_crop(image, fraction), (size, size))


def imagenet2012(data_dir, image_size: int = 224, prepared_dir=None) -> Source:
    """ILSVRC 2012 through ``tfds.builder("imagenet2012")``, ``data_dir`` as its manual_dir.

    The first run converts the tars to TFRecords in ``prepared_dir``
    (tfds' default, ``~/tensorflow_datasets``, when None); later runs read those.
    """
    import tensorflow_datasets as tfds

    builder = tfds.builder("imagenet2012", data_dir=None if prepared_dir is None else str(prepared_dir))
    if not builder.is_prepared():
        manual_dir = check_imagenet_dir(data_dir)
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
    splits = builder.info.splits

    def train(batch_size, distortion, seed, input_context=None):
        read = tfds.ReadConfig(input_context=input_context, shuffle_seed=seed,
                               interleave_cycle_length=tf.data.AUTOTUNE)
        dataset = builder.as_dataset("train", shuffle_files=True, read_config=read, as_supervised=True,
                                     decoders={"image": tfds.decode.SkipDecoding()})

        def augment(image_bytes, label):
            image = tf.image.random_flip_left_right(_inception_crop(image_bytes, image_size))
            return to_signed_unit(photometric_distortion(image, distortion)), tf.cast(label, tf.int32)

        # Thorough shuffling (section 4.2.1): shuffled files, interleaved, and a large buffer.
        return (dataset.shuffle(min(16384, splits["train"].num_examples), seed=seed).repeat()
                .map(augment, num_parallel_calls=tf.data.AUTOTUNE)
                .batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE))

    def evaluate(batch_size, input_context=None):
        read = tfds.ReadConfig(input_context=input_context)
        dataset = builder.as_dataset("validation", read_config=read, as_supervised=True,
                                     decoders={"image": tfds.decode.SkipDecoding()})
        return (dataset.map(lambda b, y: (to_signed_unit(_central_crop(b, image_size)), tf.cast(y, tf.int32)),
                            num_parallel_calls=tf.data.AUTOTUNE)
                .batch(batch_size).prefetch(tf.data.AUTOTUNE))

    return Source("imagenet2012", builder.info.features["label"].num_classes, (image_size, image_size, 3),
                  splits["train"].num_examples, splits["validation"].num_examples, train, evaluate)


# Fashion-MNIST -------------------------------------------------------------------------------------

def fashion_mnist(data_dir=None, image_size: int = 28) -> Source:
    """Fashion-MNIST from the offline idx files (``recipes.fashion_mnist``)."""
    from recipes.fashion_mnist import load_fashion_mnist

    (x_train, y_train), (x_test, y_test) = load_fashion_mnist(data_dir)

    def prepare(images):
        images = tf.image.convert_image_dtype(images[..., None], tf.float32)
        if image_size != images.shape[1]:
            images = tf.image.resize(images, (image_size, image_size))
        return images

    def augment_batch(images, distortion):
        # Random crops of a padded image (the 28x28 digits-style frame leaves no room
        # for the ImageNet crop), random flips, photometric distortion.
        images = random_crops_and_flips(prepare(images), max(1, image_size // 14))
        return to_signed_unit(grayscale_distortion(images, distortion))

    def train(batch_size, distortion, seed, input_context=None):
        dataset = tf.data.Dataset.from_tensor_slices((x_train, y_train.astype(np.int32)))
        dataset = _shard(dataset, input_context)
        # Shuffled as 28x28 bytes and augmented a batch at a time: per-image float copies and
        # per-image ops took CPU time from the training they feed.
        return (dataset.shuffle(len(x_train), seed=seed, reshuffle_each_iteration=True).repeat()
                .batch(batch_size, drop_remainder=True)
                .map(lambda images, labels: (augment_batch(images, distortion), labels),
                     num_parallel_calls=tf.data.AUTOTUNE)
                .prefetch(tf.data.AUTOTUNE))

    def evaluate(batch_size, input_context=None):
        dataset = tf.data.Dataset.from_tensor_slices((to_signed_unit(prepare(x_test)), y_test.astype(np.int32)))
        return _shard(dataset, input_context).batch(batch_size).prefetch(tf.data.AUTOTUNE)

    return Source("fashion_mnist", 10, (image_size, image_size, 1), len(x_train), len(x_test), train, evaluate)


# Synthetic -----------------------------------------------------------------------------------------

def synthetic(image_size: int = 32, num_classes: int = 10, train_examples: int = 10000,
              eval_examples: int = 1000) -> Source:
    """Random images for smoke tests and throughput, learnable: each class has its own
    low-frequency pattern, and every image is its class's pattern plus noise."""
    templates = tf.image.resize(
        tf.constant(np.random.RandomState(0).uniform(0.2, 0.8, (num_classes, 4, 4, 3)), tf.float32),
        (image_size, image_size))

    def make(index, seed):
        label = tf.random.stateless_uniform((), (seed, index), 0, num_classes, tf.int32)
        noise = tf.random.stateless_normal((image_size, image_size, 3), (index, seed), stddev=0.2)
        return to_signed_unit(tf.gather(templates, label) + noise), label

    def train(batch_size, distortion, seed, input_context=None):
        del distortion
        dataset = _shard(tf.data.Dataset.range(train_examples), input_context).repeat()
        return (dataset.map(lambda i: make(i, seed + 1), num_parallel_calls=tf.data.AUTOTUNE)
                .batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE))

    def evaluate(batch_size, input_context=None):
        dataset = _shard(tf.data.Dataset.range(eval_examples), input_context)
        return dataset.map(lambda i: make(i, 0), num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size)

    return Source("synthetic", num_classes, (image_size, image_size, 3), train_examples, eval_examples,
                  train, evaluate)


def load_source(name: str, data_dir=None, image_size: int | None = None, prepared_dir=None) -> Source:
    """The dataset called ``name`` (one of ``SOURCES``) at ``image_size`` (its default when None)."""
    if name not in SOURCES:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(SOURCES)}")
    size = DEFAULT_IMAGE_SIZE[name] if image_size is None else int(image_size)
    if size < 16:
        raise ValueError(f"image size must be at least 16, got {size}")
    if name == "imagenet2012":
        return imagenet2012(data_dir, size, prepared_dir)
    if name == "fashion_mnist":
        if data_dir is not None and not os.path.isdir(data_dir):
            raise DataNotFoundError(f"--data-dir {data_dir} does not exist; it must hold the Fashion-MNIST idx files")
        return fashion_mnist(data_dir, size)
    return synthetic(size)
