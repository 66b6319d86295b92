"""The paper's Figure 1 on Fashion-MNIST: BN trains the sigmoid network faster and keeps the
distribution of a sigmoid's input still."""

import numpy as np
import pytest

from recipes.fashion_mnist import find_data_dir
from recipes.figure1 import train as figure1
from tests.helpers import figures


@pytest.mark.skipif(find_data_dir() is None, reason="Debian's dataset-fashion-mnist is not installed")
def test_figure1(tmp_path, capsys):
    assert figure1.main(["--run-dir", str(tmp_path), "--steps", "300", "--record-every", "100"]) == 0
    rows = np.genfromtxt(tmp_path / "figure1.csv", delimiter=",", skip_header=1, dtype=None, encoding=None)
    without = np.array([list(r)[1:] for r in rows if r[0] == "without BN"], float)
    with_bn = np.array([list(r)[1:] for r in rows if r[0] == "with BN"], float)
    assert without[:, 0].tolist() == with_bn[:, 0].tolist() == [0, 100, 200, 300]
    assert with_bn[-1, 1] > without[-1, 1] + 0.1  # test accuracy after 300 steps (measured: 0.79, 0.10)
    assert np.all(with_bn[:, 2] <= with_bn[:, 3]) and np.all(with_bn[:, 3] <= with_bn[:, 4])
    pixels = figures.read(tmp_path / "figure1.png", figsize=(13, 3.8), dpi=110)
    accuracy, without_bn, with_bn = np.array_split(pixels, 3, axis=1)  # the three panels
    # (a): a line per network (without BN's, at chance, is below the axes' 0.5: its legend only).
    lines = [figures.curve(accuracy, color) for color in figures.CYCLE]
    assert lines[0].pixels > 0 and figures.drawn(lines[1], dpi=110) and lines[2].pixels == 0, lines
    for panel in (without_bn, with_bn):  # (b), (c): the 15th, 50th, 85th percentile, in that order
        p15, p50, p85 = (figures.curve(panel, color) for color in figures.CYCLE)
        assert all(figures.drawn(line, dpi=110) for line in (p15, p50, p85))
        assert p85.row < p50.row < p15.row, (p15, p50, p85)
    assert "Figure 1:" in capsys.readouterr().out
