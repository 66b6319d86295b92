"""Input pipelines: ImageNet through tensorflow-datasets, Fashion-MNIST, synthetic.

Every source gives per-replica ``tf.data`` pipelines for ``strategy.distribute_datasets_from_function``:
the training one shuffled, augmented, repeated and prefetched; the evaluation one a single pass.

Host and device split the work. Per image, the host does only what it must - read, crop,
decode, resize, flip - in uint8, and draws the image's photometric-distortion factors (four
floats). :func:`recipes.inception_bn.steps.network_input`, called inside the training step on the
device and on the whole batch, applies the distortion with those factors, scales to [-1, 1] and casts to the compute
dtype: the per-pixel float arithmetic leaves the host, and the host sends a quarter of float32's
bytes. Training elements are ``(images uint8 (B, H, W, C), factors float32 (B, 4), labels int32
(B,))``; evaluation elements, unbatched, ``(image uint8 (H, W, C), label int32)``.

The paper's augmentation (section 4.2, from GoogLeNet): random crops of 8%-100% of the image area and
3/4-4/3 aspect ratio, resized to the network's input, random horizontal flips and photometric
distortions (brightness, saturation, hue, contrast) whose strength the variant sets (section 4.2.1
reduces it with BN).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
import tensorflow as tf

from recipes.inception_bn import order
from recipes.inception_bn.partitions import choose_partitions, pipeline_records

IMAGENET_TARS = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
SOURCES = ("imagenet2012", "fashion_mnist", "synthetic")
DEFAULT_IMAGE_SIZE = {"imagenet2012": 224, "fashion_mnist": 28, "synthetic": 32}


class DataNotFoundError(FileNotFoundError):
    """The dataset is not where the user said; the message says what must be there."""


class TrainInput(Protocol):
    """``Source.train``: this pipeline's replicas' batches of ``(images uint8, factors float32,
    labels int32)`` from global step ``start_step`` on, ``batch_size`` per replica, repeated;
    ``partitions``: for sources read from files, the run's (``order.DataOrder``)."""

    def __call__(self, batch_size: int, distortion: float, seed: int, input_context=None, start_step: int = 0,
                 partitions: int | None = None) -> tf.data.Dataset: ...


class Examples(Protocol):
    """``Source.eval`` and ``Source.test``: this pipeline's share of the first ``limit`` examples
    (all when None), unbatched ``(image uint8, label int32)``."""

    def __call__(self, limit: int | None = None, input_context=None) -> tf.data.Dataset: ...


@dataclasses.dataclass
class Source:
    """A dataset ready to feed the recipe.

    Attributes:
        name: one of ``SOURCES``.
        num_classes: classifier outputs.
        image_shape: ``(size, size, channels)`` the network sees.
        train_examples: examples per training epoch.
        eval_examples: examples in the evaluation split.
        train: ``(batch_size, distortion, seed, input_context, start_step) -> tf.data.Dataset`` of
            batched ``(images uint8, factors float32, labels int32)``, repeated: this pipeline's
            replicas' batches from global step ``start_step`` on, ``batch_size`` per replica.
        eval: ``(limit, input_context) -> tf.data.Dataset`` of unbatched ``(image uint8, label
            int32)``: this pipeline's share of the first ``limit`` examples (all when None).
        partitions_for: sources read from files: ``global_batch -> K``, the number of canonical
            partitions of the stream (``partitions.py``); None for sources with random access.
        test: with a validation split held out of the training set, ``eval`` reads it and
            ``test`` (same signature) the test set, which no training decision reads; None when
            ``eval`` is the test set.
        test_examples: examples in the test set when ``test`` is set.
    """

    name: str
    num_classes: int
    image_shape: tuple
    train_examples: int
    eval_examples: int
    train: TrainInput
    eval: Examples
    partitions_for: Callable[[int], int] | None = None
    test: Examples | None = None
    test_examples: int = 0


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


# Columns of the per-image factors: brightness delta, saturation factor, hue delta, contrast factor.
NEUTRAL_FACTORS = (0.0, 1.0, 0.0, 1.0)


def distortion_factors(batch_size, strength: float, uniforms=None):
    """``(batch_size, 4)`` per-image factors of GoogLeNet's photometric distortion at ``strength``:
    brightness delta in +-32/255 s, saturation and contrast factors in [1 - s/2, 1 + s/2], hue
    delta in +-0.2 s, each uniform and independent (what ``tf.image.random_*`` draw). Neutral at 0.
    ``uniforms``: the ``(batch_size, 4)`` draws in [0, 1) to use (random when None)."""
    if strength <= 0:
        return tf.tile(tf.constant([NEUTRAL_FACTORS], tf.float32), [batch_size, 1])
    max_delta, (lower, upper) = _distortion_ranges(strength)
    max_hue = 0.2 * strength
    low = tf.constant([-max_delta, lower, -max_hue, lower], tf.float32)
    high = tf.constant([max_delta, upper, max_hue, upper], tf.float32)
    if uniforms is None:
        uniforms = tf.random.uniform((batch_size, 4))
    return low + uniforms * (high - low)


def position_factors(seed: int, positions, strength: float):
    """The distortion factors of the images at stream ``positions`` (``order.py``'s FACTORS draw)."""
    return distortion_factors(tf.shape(positions)[0], strength, order.position_uniform(seed, positions, order.FACTORS, 4))


def apply_distortion(images, factors):
    """Photometric distortion of a float ``(B, H, W, C)`` batch in [0, 1], per image, in batched
    ops: brightness, then (colour images) saturation and hue, then contrast, clipped to [0, 1] -
    the order and the arithmetic of ``tf.image.adjust_brightness/saturation/hue/contrast``."""
    def column(i):
        return tf.reshape(factors[:, i], [-1, 1, 1])

    images = images + column(0)[..., None]
    if images.shape[-1] == 3:
        hue, saturation, value = tf.unstack(tf.image.rgb_to_hsv(images), axis=-1)
        saturation = tf.clip_by_value(saturation * column(1), 0.0, 1.0)
        hue = tf.math.floormod(hue + column(2), 1.0)
        images = tf.image.hsv_to_rgb(tf.stack([hue, saturation, value], axis=-1))
    mean = tf.reduce_mean(images, axis=(1, 2), keepdims=True)
    images = (images - mean) * column(3)[..., None] + mean
    return tf.clip_by_value(images, 0.0, 1.0)


def resize_to_uint8(images, size: int):
    """Bilinear resize to ``size x size``, rounded back to uint8."""
    return tf.saturate_cast(tf.round(tf.image.resize(images, (size, size))), tf.uint8)


def random_crops_and_flips(images, pad: int, draws=None):
    """Each image of a ``(B, H, W, C)`` batch zero-padded by ``pad``, cropped back to ``H x W``
    at a random offset and flipped left-right with probability 1/2 (per image, in batched ops).
    ``draws``: ``(B, 3)`` uniforms in [0, 1) for the row, the column and the flip (random when None)."""
    batch, height, width = tf.shape(images)[0], images.shape[1], images.shape[2]
    padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
    if draws is None:
        offsets = tf.random.uniform((2, batch, 1), 0, 2 * pad + 1, tf.int32)
        flip = tf.random.uniform((batch, 1, 1, 1)) < 0.5
    else:
        offsets = tf.cast(tf.transpose(draws[:, :2])[..., None] * (2 * pad + 1), tf.int32)
        flip = tf.reshape(draws[:, 2], (-1, 1, 1, 1)) < 0.5
    rows = tf.gather(padded, offsets[0] + tf.range(height), axis=1, batch_dims=1)
    crops = tf.gather(rows, offsets[1] + tf.range(width), axis=2, batch_dims=1)
    return tf.where(flip, tf.reverse(crops, [2]), crops)


def first_examples(dataset, limit, input_context):
    """The first ``limit`` examples (all when None), this pipeline's share of them: each of them
    in exactly one pipeline."""
    if limit is not None:
        dataset = dataset.take(limit)
    return _shard(dataset, input_context)


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


def _inception_crop(image_bytes, size, seed=None):
    """The Inception crop (8%-100% of the area, aspect 3/4-4/3), decoded from the JPEG's crop
    window only, resized to uint8: the host's whole per-image work for training but the flip.
    ``seed``: the crop's stateless seed, shape (2,) (a random crop when None)."""
    shape = tf.image.extract_jpeg_shape(image_bytes)
    box = dict(bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=(1, 1, 4)), min_object_covered=0.1,
               aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0), max_attempts=10,
               use_image_if_no_bounding_boxes=True)
    if seed is None:
        begin, crop_size, _ = tf.image.sample_distorted_bounding_box(shape, **box)
    else:
        begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(shape, seed=seed, **box)
    offset_y, offset_x, _ = tf.unstack(begin)
    height, width, _ = tf.unstack(crop_size)
    image = tf.image.decode_and_crop_jpeg(image_bytes, tf.stack([offset_y, offset_x, height, width]), channels=3)
    return resize_to_uint8(image, size)


def _central_crop(image_bytes, size, fraction=0.875):
    image = tf.image.central_crop(tf.io.decode_jpeg(image_bytes, channels=3), fraction)
    return resize_to_uint8(image, size)


def imagenet2012(data_dir, image_size: int = 224, prepared_dir=None, partitions_requested=None) -> Source:
    """ILSVRC 2012 through ``tfds.builder("imagenet2012")``, ``data_dir`` as its manual_dir.

    The first run converts the tars to TFRecords in ``prepared_dir``
    (tfds' default, ``~/tensorflow_datasets``, when None); later runs read those. The training
    stream is read by position from the TFRecord files in canonical partitions
    (``recipes/inception_bn/partitions.py``; ``partitions_requested``: their number, or the default).
    """
    import tensorflow_datasets as tfds

    builder = tfds.builder("imagenet2012", data_dir=None if prepared_dir is None else str(prepared_dir))
    if not builder.is_prepared():
        manual_dir = check_imagenet_dir(data_dir)
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
    splits = builder.info.splits
    # The training TFRecords read directly, by position; tfds' metadata gives each file's records,
    # so a resume goes straight to its file and record.
    train_files = [os.fspath(path) for path in splits["train"].filepaths]
    train_counts = [int(n) for n in splits["train"].shard_lengths]
    features = builder.info.features

    def parse(record):
        example = features.deserialize_example(record, decoders={"image": tfds.decode.SkipDecoding()})
        return example["image"], example["label"]

    def partitions_for(global_batch):
        return choose_partitions(global_batch, len(train_files), partitions_requested)

    def train(batch_size, distortion, seed, input_context=None, start_step=0, partitions=None):
        if partitions is None:  # outside a run (its order.DataOrder passes them): the default
            partitions = partitions_for(batch_size * order.pipeline_split(input_context)[2])
        records = pipeline_records(train_files, train_counts, seed, partitions, batch_size, start_step,
                                   input_context)

        def draws(positions):
            # Every draw of a replica's batch in a few batched ops; per image only its own work.
            crop_seeds = order.position_hash(seed, positions, order.CROP_BOX, 2)
            flips = order.position_uniform(seed, positions, order.CROP_WINDOW)[:, 0] < 0.5
            return crop_seeds, flips, position_factors(seed, positions, distortion)

        def crop_and_flip(record, draw):
            crop_seed, flip, factors = draw
            image_bytes, label = parse(record)
            image = _inception_crop(image_bytes, image_size, crop_seed)
            # cond, not where: a select of both images cost a third of the pipeline's throughput.
            image = tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)
            return image, factors, tf.cast(label, tf.int32)

        per_image_draws = order.pipeline_positions(batch_size, start_step, input_context).map(draws).unbatch()
        return (tf.data.Dataset.zip(records, per_image_draws).map(crop_and_flip, num_parallel_calls=tf.data.AUTOTUNE)
                .batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE))

    def evaluate(limit=None, input_context=None):
        dataset = builder.as_dataset("validation", shuffle_files=False, as_supervised=True,
                                     decoders={"image": tfds.decode.SkipDecoding()})
        # Shard the records before decoding: each pipeline decodes only its share.
        return first_examples(dataset, limit, input_context).map(
            lambda b, y: (_central_crop(b, image_size), tf.cast(y, tf.int32)), num_parallel_calls=tf.data.AUTOTUNE)

    return Source("imagenet2012", builder.info.features["label"].num_classes, (image_size, image_size, 3),
                  splits["train"].num_examples, splits["validation"].num_examples, train, evaluate, partitions_for)


# Fashion-MNIST -------------------------------------------------------------------------------------

def fashion_mnist(data_dir=None, image_size: int = 28, validation_examples: int = 0) -> Source:
    """Fashion-MNIST from the offline idx files (``recipes.fashion_mnist``).

    With ``validation_examples``, the last that many training examples are held out: training
    reads the others, ``eval`` the held-out ones and ``test`` the test set.
    """
    from recipes.fashion_mnist import load_fashion_mnist

    (x_train, y_train), (x_test, y_test) = load_fashion_mnist(data_dir)
    if not 0 <= validation_examples < len(x_train):
        raise ValueError(f"--validation-examples must be in [0, {len(x_train)}), got {validation_examples}")
    held_out = len(x_train) - validation_examples
    (x_train, y_train), (x_valid, y_valid) = ((x_train[:held_out], y_train[:held_out]),
                                              (x_train[held_out:], y_train[held_out:]))

    def resized(images):
        images = images[..., None]
        return images if image_size == images.shape[1] else resize_to_uint8(images, image_size)

    train_images, train_labels = tf.constant(x_train), tf.constant(y_train.astype(np.int32))
    pad = max(1, image_size // 14)

    def train(batch_size, distortion, seed, input_context=None, start_step=0, partitions=None):
        # Random access by stream position (recipes/inception_bn/order.py): the examples and every
        # draw of this replica's share of each global batch, and nothing else. Cropped a batch at a
        # time on uint8: per-image copies and per-image ops took CPU time from the training they feed.
        def batch_at(positions):
            ids = order.example_ids(seed, len(x_train), positions)
            draws = order.position_uniform(seed, positions, order.CROP_WINDOW, 3)
            images = random_crops_and_flips(resized(tf.gather(train_images, ids)), pad, draws)
            return images, position_factors(seed, positions, distortion), tf.gather(train_labels, ids)

        return order.batches_by_position(batch_at, batch_size, start_step, input_context)

    def split(images, labels):
        images = resized(tf.constant(images))

        def examples(limit=None, input_context=None):
            dataset = tf.data.Dataset.from_tensor_slices((images, labels.astype(np.int32)))
            return first_examples(dataset, limit, input_context)

        return examples

    shape = (image_size, image_size, 1)
    if not validation_examples:
        return Source("fashion_mnist", 10, shape, len(x_train), len(x_test), train, split(x_test, y_test))
    return Source("fashion_mnist", 10, shape, len(x_train), len(x_valid), train, split(x_valid, y_valid),
                  test=split(x_test, y_test), test_examples=len(x_test))


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
        image = tf.saturate_cast(tf.round((tf.gather(templates, label) + noise) * 255.0), tf.uint8)
        return image, label

    def train(batch_size, distortion, seed, input_context=None, start_step=0, partitions=None):
        del distortion  # the patterns are the signal: no photometric distortion
        def batch_at(positions):
            ids = order.example_ids(seed, train_examples, positions)
            images, labels = tf.map_fn(lambda i: make(i, seed + 1), ids,
                                       fn_output_signature=(tf.uint8, tf.int32))
            return images, distortion_factors(tf.shape(ids)[0], 0.0), labels

        return order.batches_by_position(batch_at, batch_size, start_step, input_context)

    def evaluate(limit=None, input_context=None):
        dataset = first_examples(tf.data.Dataset.range(eval_examples), limit, input_context)
        return dataset.map(lambda i: make(i, 0), num_parallel_calls=tf.data.AUTOTUNE)

    return Source("synthetic", num_classes, (image_size, image_size, 3), train_examples, eval_examples,
                  train, evaluate)


def load_source(name: str, data_dir=None, image_size: int | None = None, prepared_dir=None,
                partitions=None, validation_examples: int = 0) -> Source:
    """The dataset called ``name`` (one of ``SOURCES``) at ``image_size`` (its default when None);
    ``partitions``: imagenet2012's canonical partitions (``partitions.py``; the default when None);
    ``validation_examples``: fashion_mnist's training examples held out for validation."""
    if name not in SOURCES:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(SOURCES)}")
    size = DEFAULT_IMAGE_SIZE[name] if image_size is None else int(image_size)
    if size < 16:
        raise ValueError(f"image size must be at least 16, got {size}")
    if name == "imagenet2012":
        return imagenet2012(data_dir, size, prepared_dir, partitions)
    if name == "fashion_mnist":
        if data_dir is not None and not os.path.isdir(data_dir):
            raise DataNotFoundError(f"--data-dir {data_dir} does not exist; it must hold the Fashion-MNIST idx files")
        return fashion_mnist(data_dir, size, validation_examples)
    return synthetic(size)
