"""The demo: its Fashion-MNIST reader (real idx files, a clear error when missing) and the whole
job end to end, Figure 1 checked against the paper."""

import gzip
import json
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
def test_demo_runs_end_to_end_on_fashion_mnist(tmp_path, capsys, monkeypatch):
    # The main job (`make demo`), shortened: Figure 1 and the variants' comparison, outputs where it
    # says. Its training processes are the recipe's, forked from the tests' server, on the tiny
    # network (each variant's schedule); the demo's own networks train in test_inception_bn_model.
    from recipes.inception_bn import processes
    from tests.helpers import forkserver, tiny_train

    monkeypatch.setattr(processes, "start_process", tiny_train.on_tiny_networks(forkserver.popen))
    variants = ("inception", "bn-x30")  # the baseline and a BN variant: the others run the same code
    assert demo.main(["--run-dir", str(tmp_path), "--steps", "10", "--figure1-steps", "300",
                      "--variants", ",".join(variants)]) == 0
    out = capsys.readouterr().out
    outputs = [tmp_path / "figure1" / "figure1.png", tmp_path / "inception_bn" / "compare.png",
               tmp_path / "inception_bn" / "compare.md"]
    for path in outputs:
        assert path.exists() and str(path) in out
    _check_figure1(tmp_path / "figure1")
    table = outputs[2].read_text()
    for name in variants:
        assert f"| {name} |" in table
        settings = json.loads((tmp_path / "inception_bn" / name / "run.json").read_text())
        assert settings["arguments"]["image_size"] == 28 and settings["arguments"]["stem"] == "small"
    assert "| bn-x30 | 0.045 |" in table  # the paper's learning rate at the demo's batch of 32


def _check_figure1(run_dir):
    """The paper's Figure 1 after 300 steps: BN trains the sigmoid network faster (its accuracy) and
    keeps the distribution of a sigmoid's input in order (its percentiles), and the plot shows both."""
    from tests.helpers import figures

    rows = np.genfromtxt(run_dir / "figure1.csv", delimiter=",", skip_header=1, dtype=None, encoding=None)
    without = np.array([list(r)[1:] for r in rows if r[0] == "without BN"], float)
    with_bn = np.array([list(r)[1:] for r in rows if r[0] == "with BN"], float)
    assert without[:, 0].tolist() == with_bn[:, 0].tolist() == [0, 100, 200, 300]
    assert with_bn[-1, 1] > without[-1, 1] + 0.1  # test accuracy after 300 steps (measured: 0.79, 0.10)
    assert np.all(with_bn[:, 2] <= with_bn[:, 3]) and np.all(with_bn[:, 3] <= with_bn[:, 4])
    pixels = figures.read(run_dir / "figure1.png", figsize=(13, 3.8), dpi=110)
    accuracy, without_bn, with_bn = np.array_split(pixels, 3, axis=1)  # the three panels
    # (a): a line per network (without BN's, at chance, is below the axes' 0.5: its legend only).
    lines = [figures.curve(accuracy, color) for color in figures.CYCLE]
    assert lines[0].pixels > 0 and figures.drawn(lines[1], dpi=110) and lines[2].pixels == 0, lines
    for panel in (without_bn, with_bn):  # (b), (c): the 15th, 50th, 85th percentile, in that order
        p15, p50, p85 = (figures.curve(panel, color) for color in figures.CYCLE)
        assert all(figures.drawn(line, dpi=110) for line in (p15, p50, p85))
        assert p85.row < p50.row < p15.row, (p15, p50, p85)
