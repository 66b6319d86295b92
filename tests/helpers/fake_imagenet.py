"""A fake ImageNet laid out as the user's download: the two tars tfds' ``imagenet2012`` reads."""

import io
import tarfile

import numpy as np

SYNSETS = ["n01440764", "n01443537"]  # the first two of tfds' labels.txt: labels 0 and 1


def jpeg(value, size=(40, 48)):
    """A uniform grey JPEG: any crop, resize or flip of it keeps ``value`` (quality 95 keeps it exact)."""
    import tensorflow as tf

    return tf.io.encode_jpeg(np.full((*size, 3), value, np.uint8), quality=95).numpy()


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write(root, values_per_class, validation=4, validation_value=100):
    """ILSVRC2012_img_train.tar of per-class tars (class ``c``'s images the greys
    ``values_per_class[c]``), ILSVRC2012_img_val.tar of ``validation`` flat JPEGs."""
    with tarfile.open(root / "ILSVRC2012_img_train.tar", "w") as outer:
        for synset, values in zip(SYNSETS, values_per_class, strict=True):
            inner_bytes = io.BytesIO()
            with tarfile.open(fileobj=inner_bytes, mode="w") as inner:
                for i, value in enumerate(values):
                    _add(inner, f"{synset}_{i}.JPEG", jpeg(value))
            _add(outer, f"{synset}.tar", inner_bytes.getvalue())
    with tarfile.open(root / "ILSVRC2012_img_val.tar", "w") as val:
        for i in range(1, validation + 1):
            _add(val, f"ILSVRC2012_val_{i:08d}.JPEG", jpeg(validation_value))
    return root


def prepare(download, prepared, shards):
    """tfds prepares the download into ``shards`` TFRecord files per split, as a user can
    (``DownloadConfig(num_shards=...)``); the recipe then reads the prepared directory."""
    import tensorflow_datasets as tfds

    builder = tfds.builder("imagenet2012", data_dir=str(prepared))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(download),
                                                                              num_shards=shards))
    return prepared
