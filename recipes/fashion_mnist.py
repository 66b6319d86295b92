"""Fashion-MNIST from the idx files that install offline.

Debian's ``dataset-fashion-mnist`` package puts the four idx files in
``/usr/share/datasets/fashion-mnist``; ``--data-dir`` may point elsewhere.
When neither has them, ``keras.datasets.fashion_mnist`` is used, which
downloads (and so works only online).
"""

from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path

import numpy as np

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


class DatasetNotFoundError(FileNotFoundError):
    """The dataset is neither on disk nor downloadable."""


def _read_idx(path: Path) -> np.ndarray:
    stat = path.stat()
    return _read_idx_file(path.resolve(), stat.st_mtime_ns, stat.st_size)


# Decompressing the training images takes ~0.3 s of CPU: a process reading them again (the demo,
# the tests' fork server before it forks) keeps them. The arrays are read-only views of the
# bytes read, so sharing them is safe; a file changed on disk is read again.
@functools.lru_cache(maxsize=8)
def _read_idx_file(path: Path, mtime_ns: int, size: int) -> np.ndarray:
    del mtime_ns, size  # the cache key
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    ndim = magic & 0xFF
    if magic >> 8 != 0x08:  # unsigned byte data
        raise ValueError(f"{path} is not an unsigned-byte idx file (magic {magic:#x}).")
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def find_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The first directory holding all four idx files, or None."""
    candidates = [Path(data_dir)] if data_dir else [DEBIAN_DIR]
    for directory in candidates:
        if all(_find(directory, stem) for stem in FILES.values()):
            return directory
    return None


def load_fashion_mnist(data_dir: str | os.PathLike | None = None):
    """Returns ``(x_train, y_train), (x_test, y_test)`` as uint8 arrays.

    Raises:
        DatasetNotFoundError: ``data_dir`` was given and lacks the idx files,
            or no local copy exists and the download fails.
    """
    directory = find_data_dir(data_dir)
    if directory is not None:
        arrays = {key: _read_idx(_find(directory, stem)) for key, stem in FILES.items()}
        return ((arrays["train_images"], arrays["train_labels"]),
                (arrays["test_images"], arrays["test_labels"]))
    wanted = ", ".join(s + "[.gz]" for s in FILES.values())
    if data_dir is not None:
        raise DatasetNotFoundError(f"{data_dir} must hold the Fashion-MNIST idx files: {wanted}")
    try:
        import keras

        return keras.datasets.fashion_mnist.load_data()
    except Exception as error:  # offline: say where the files should be
        raise DatasetNotFoundError(
            f"Fashion-MNIST not found in {DEBIAN_DIR} (install Debian's "
            f"dataset-fashion-mnist, or pass --data-dir with {wanted}) and the "
            f"download failed: {error}"
        ) from None
