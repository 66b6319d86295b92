"""The demo's Fashion-MNIST reader: real idx files, and a clear error when missing."""

import gzip
import struct

import numpy as np
import pytest

from recipes import demo
from recipes.fashion_mnist import FILES, DatasetNotFoundError, find_data_dir, load_fashion_mnist


def _write_idx(path, array):
    header = struct.pack(">I", 0x0800 | array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_reads_idx_files_from_a_data_dir(tmp_path):
    rng = np.random.RandomState(0)
    arrays = {"train_images": rng.randint(0, 256, (5, 28, 28)), "train_labels": rng.randint(0, 10, 5),
              "test_images": rng.randint(0, 256, (3, 28, 28)), "test_labels": rng.randint(0, 10, 3)}
    for key, stem in FILES.items():
        _write_idx(tmp_path / (stem + ".gz"), arrays[key])
    (x_train, y_train), (x_test, y_test) = load_fashion_mnist(tmp_path)
    np.testing.assert_array_equal(x_train, arrays["train_images"])
    np.testing.assert_array_equal(y_test, arrays["test_labels"])
    assert x_test.shape == (3, 28, 28) and y_train.dtype == np.uint8


def test_missing_data_dir_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(DatasetNotFoundError, match="train-images-idx3-ubyte"):
        load_fashion_mnist(tmp_path / "nowhere")
    assert demo.main(["--data-dir", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err


@pytest.mark.skipif(find_data_dir() is None, reason="Debian's dataset-fashion-mnist is not installed")
def test_debian_fashion_mnist():
    (x_train, y_train), (x_test, y_test) = load_fashion_mnist()
    assert x_train.shape == (60000, 28, 28) and x_test.shape == (10000, 28, 28)
    assert sorted(np.unique(y_train)) == list(range(10))


@pytest.mark.slow(cores=2)
@pytest.mark.skipif(find_data_dir() is None, reason="Debian's dataset-fashion-mnist is not installed")
def test_demo_runs_end_to_end_on_fashion_mnist(tmp_path):
    # The main job (`make demo`), shortened: Figure 1 and the variants' comparison, outputs where it says.
    import subprocess  # noqa: F401
    import sys
    from pathlib import Path

    from tests.helpers import forkserver

    root = Path(__file__).resolve().parents[2]
    # The baseline and BN-x30, two of the five variants: the others run the same code.
    variants = ("inception", "bn-x30")
    result = forkserver.run([sys.executable, "-m", "recipes.demo", "--run-dir", str(tmp_path), "--steps", "10",
                             "--figure1-steps", "100", "--variants", ",".join(variants)],
                            capture_output=True, text=True, cwd=root, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = [tmp_path / "figure1" / "figure1.png", tmp_path / "inception_bn" / "compare.png",
               tmp_path / "inception_bn" / "compare.md"]
    for path in outputs:
        assert path.exists() and str(path) in result.stdout
    table = outputs[2].read_text()
    for name in variants:
        assert f"| {name} |" in table
    assert "| bn-x30 | 0.045 |" in table  # the paper's learning rate at the demo's batch of 32
