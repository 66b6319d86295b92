"""The ImageNet training input pipeline on one core, against the crop-decode-resize floor.

Photo-sized JPEGs (500x375, quality 90, about 90 KB: smooth colour fields plus noise) are laid out
as ImageNet's training and validation tars and prepared by tfds' own ``imagenet2012`` builder, as
a user's download would be. Then, in this process pinned to one core, alternating rounds of (one
pipeline alive at a time, each warmed up before it is timed):

- floor: what only the host can do - read the record, extract the JPEG's shape, sample the
  Inception crop, ``decode_and_crop_jpeg``, resize to uint8 - batched;
- recipe: the recipe's training pipeline (``recipes.inception_bn.data``: shuffle, the same
  crop-decode-resize, flip, per-image distortion factors), what the device is fed;
- float (before): the previous pipeline's host work - the same crop and decode, resized in float32,
  flipped, the photometric distortion per image on the host, float32 images out.

Prints images/s of each, the ratio to the floor, and how many such cores feed a GPU training at a
given rate (``--gpu-rate``).

    .venv/bin/python benchmarks/bench_input.py [--images 256] [--size 224] [--rounds 5] [--work-dir D]
"""

import argparse
import io
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core, before TF starts threads

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from common import markdown_table  # noqa: E402

SYNSETS = ["n01440764", "n01443537"]  # labels 0 and 1 in tfds' labels.txt


def photo_jpeg(rng) -> bytes:
    low = rng.uniform(0, 255, (12, 16, 3)).astype("float32")
    image = tf.image.resize(low[None], (375, 500), method="bicubic")[0].numpy()
    image += rng.normal(0, 15, image.shape)
    return tf.io.encode_jpeg(np.clip(image, 0, 255).astype("uint8"), quality=90).numpy()


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def fake_imagenet(root: Path, images: int) -> float:
    """The two tars, ``images`` training JPEGs over two classes; returns the mean JPEG size."""
    rng = np.random.RandomState(0)
    sizes = []
    with tarfile.open(root / "ILSVRC2012_img_train.tar", "w") as outer:
        for synset in SYNSETS:
            inner_bytes = io.BytesIO()
            with tarfile.open(fileobj=inner_bytes, mode="w") as inner:
                for i in range(images // len(SYNSETS)):
                    data = photo_jpeg(rng)
                    sizes.append(len(data))
                    _add(inner, f"{synset}_{i}.JPEG", data)
            _add(outer, f"{synset}.tar", inner_bytes.getvalue())
    with tarfile.open(root / "ILSVRC2012_img_val.tar", "w") as val:
        for i in range(1, 5):
            _add(val, f"ILSVRC2012_val_{i:08d}.JPEG", photo_jpeg(rng))
    return float(np.mean(sizes))


def floor_pipeline(builder, size, batch):
    import tensorflow_datasets as tfds

    from recipes.inception_bn.data import _inception_crop

    dataset = builder.as_dataset("train", as_supervised=True, decoders={"image": tfds.decode.SkipDecoding()})
    return (dataset.repeat().map(lambda b, y: (_inception_crop(b, size), y), num_parallel_calls=tf.data.AUTOTUNE)
            .batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE))


def float_pipeline(builder, size, batch, strength):
    """The previous release's host pipeline, for reference."""
    import tensorflow_datasets as tfds

    from recipes.inception_bn.data import _distortion_ranges

    def augment(image_bytes, label):
        shape = tf.image.extract_jpeg_shape(image_bytes)
        begin, crop, _ = tf.image.sample_distorted_bounding_box(
            shape, bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=(1, 1, 4)), min_object_covered=0.1,
            aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0), max_attempts=10,
            use_image_if_no_bounding_boxes=True)
        y, x, _ = tf.unstack(begin)
        h, w, _ = tf.unstack(crop)
        image = tf.image.decode_and_crop_jpeg(image_bytes, tf.stack([y, x, h, w]), channels=3)
        image = tf.image.resize(tf.image.convert_image_dtype(image, tf.float32), (size, size))
        image = tf.image.random_flip_left_right(image)
        max_delta, factors = _distortion_ranges(strength)
        image = tf.image.random_brightness(image, max_delta)
        image = tf.image.random_saturation(image, *factors)
        image = tf.image.random_hue(image, 0.2 * strength)
        image = tf.image.random_contrast(image, *factors)
        return (tf.clip_by_value(image, 0.0, 1.0) - 0.5) * 2.0, label

    dataset = builder.as_dataset("train", as_supervised=True, decoders={"image": tfds.decode.SkipDecoding()})
    return (dataset.shuffle(4096, seed=0).repeat().map(augment, num_parallel_calls=tf.data.AUTOTUNE)
            .batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE))


def images_per_second(iterator, batches, batch):
    next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        element = next(iterator)
    tf.nest.map_structure(lambda t: t.numpy(), element)
    return batches * batch / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256, help="training JPEGs in the fake download")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=16, help="batches timed per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--distortion", type=float, default=1.0, help="photometric strength (bn-baseline: 1)")
    parser.add_argument("--gpu-rate", type=float, default=3000.0, help="images/s one GPU trains")
    parser.add_argument("--work-dir", help="keep the fake download and its tfds preparation here")
    args = parser.parse_args(argv)

    import tensorflow_datasets as tfds

    from recipes.inception_bn.data import load_source

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_input-"))
    (work / "download").mkdir(parents=True, exist_ok=True)
    mean_bytes = None
    if not (work / "download" / "ILSVRC2012_img_train.tar").exists():
        mean_bytes = fake_imagenet(work / "download", args.images)
    source = load_source("imagenet2012", work / "download", args.size, prepared_dir=work / "prepared")
    builder = tfds.builder("imagenet2012", data_dir=str(work / "prepared"))
    candidates = {
        "floor": lambda: floor_pipeline(builder, args.size, args.batch),
        "recipe": lambda: source.train(args.batch, args.distortion, seed=0),
        "float (before)": lambda: float_pipeline(builder, args.size, args.batch, args.distortion),
    }
    rates = {name: [] for name in candidates}
    for _ in range(args.rounds):
        for name, pipeline in candidates.items():
            # One pipeline alive at a time: an idle one's background threads refill its prefetch
            # buffers and take the core from the one being timed.
            iterator = iter(pipeline())
            images_per_second(iterator, 4, args.batch)  # warm up: shuffle buffers, autotuning
            rates[name].append(images_per_second(iterator, args.batches, args.batch))
            del iterator
    medians = {name: float(np.median(r)) for name, r in rates.items()}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "all"
    print(f"{args.images} JPEGs, 500x375 q90"
          + (f", {mean_bytes / 1e3:.0f} KB each" if mean_bytes else "")
          + f"; {args.size}x{args.size}, batch {args.batch}; {cores} core(s); median of {args.rounds} rounds")
    rows = [[name, f"{rate:.0f}", f"{rate / medians['floor']:.2f}",
             f"{args.gpu_rate / rate:.1f}"] for name, rate in medians.items()]
    print(markdown_table(["pipeline", "images/s", "of the floor", f"cores for {args.gpu_rate:.0f} images/s"],
                         rows))


if __name__ == "__main__":
    main()
