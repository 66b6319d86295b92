"""compare.py's table: the paper's columns (steps to reach the baseline's best, best, speed-up), from
histories written as train.py writes them, and its plot."""

import json
import sys

import pytest

from recipes.inception_bn import compare, processes
from recipes.inception_bn.history import HISTORY_FIELDS, write_history
from tests.helpers import figures
from tests.helpers.tables import table_row


def _run(run_dir, name, accuracies, every=50, initial_lr=None, num_classes=None):
    variant_dir = run_dir / name
    variant_dir.mkdir(parents=True)
    rows = [dict.fromkeys(HISTORY_FIELDS, "0") | {"step": str(every * (i + 1)), "eval_accuracy": str(a),
                                                   "learning_rate": "0.0099"}
            for i, a in enumerate(accuracies)]
    write_history(variant_dir / "history.csv", rows)
    settings = {"initial_learning_rate": initial_lr, "num_classes": num_classes}
    settings = {k: v for k, v in settings.items() if v is not None}
    if settings:
        (variant_dir / "run.json").write_text(json.dumps(settings))


def test_table_counts_steps_to_the_baselines_best_accuracy(tmp_path):
    _run(tmp_path, "inception", [0.1, 0.3, 0.5, 0.45], initial_lr=0.0015)  # best 0.5 at step 150
    _run(tmp_path, "bn-x5", [0.4, 0.55, 0.7, 0.8], initial_lr=0.0075)     # reaches 0.5 at step 100
    _run(tmp_path, "bn-x30", [0.2, 0.3, 0.4, 0.45])                         # never; no run.json
    names = ["inception", "bn-x5", "bn-x30"]
    table, histories = compare.summarize(tmp_path, names, {"bn-x30": {"diverged": None}})

    assert "inception's best evaluation accuracy within this comparison's budget (200 steps), 0.5000, " \
           "reached at step 150. It is the best within the budget, not inception trained to its plateau" in table
    assert table_row(table, "inception")[1:6] == ["0.0015", "150", "0.5000", "1.0x", "-"]  # num_classes unknown
    assert table_row(table, "bn-x5")[1:5] == ["0.0075", "100", "0.8000", "1.5x"]
    bn_x30 = table_row(table, "bn-x30")
    # Without run.json the learning rate falls back to the first evaluation's.
    assert bn_x30[1:5] == ["0.0099", "-", "0.4500", "-"] and "never reached the target in 200 steps" in bn_x30[6]
    assert set(histories) == set(names)


def test_table_notes_a_diverged_run(tmp_path):
    _run(tmp_path, "inception", [0.2, 0.4])
    _run(tmp_path, "inception-x5", [0.1])
    outcomes = {"inception-x5": {"diverged": {"step": 73, "loss": "nan"}}}
    table, _ = compare.summarize(tmp_path, ["inception", "inception-x5"], outcomes)
    assert "diverged at step 73 (loss nan)" in table_row(table, "inception-x5")[6]


def test_table_says_how_long_a_run_stalled_at_chance(tmp_path):
    # 10 classes: below 0.2 (twice chance) counts as stalled; a brief rise does not end the stall.
    _run(tmp_path, "inception", [0.1, 0.3, 0.5], num_classes=10)
    _run(tmp_path, "inception-x30", [0.1, 0.21, 0.11, 0.19, 0.6, 0.7], num_classes=10)
    _run(tmp_path, "bn-x30", [0.5, 0.7], num_classes=10)
    _run(tmp_path, "stuck", [0.1, 0.1], num_classes=10)
    table, _ = compare.summarize(tmp_path, ["inception", "inception-x30", "bn-x30", "stuck"], {})
    assert table_row(table, "inception")[5] == "50"
    assert table_row(table, "inception-x30")[5] == "200"
    assert table_row(table, "bn-x30")[5] == "-"
    assert table_row(table, "stuck")[5] == "100" and "never reached the target in 100 steps" in table_row(table, "stuck")[6]


def test_plot_draws_one_line_per_variant_at_its_accuracies(tmp_path):
    _run(tmp_path, "inception", [0.2, 0.4])
    _run(tmp_path, "bn-x5", [0.5, 0.6])
    _, histories = compare.summarize(tmp_path, ["inception", "bn-x5"], {})
    compare.plot(tmp_path / "compare.png", histories, "title")
    pixels = figures.read(tmp_path / "compare.png", figsize=(7, 4.5), dpi=120)
    inception, bn_x5, third = (figures.curve(pixels, color) for color in figures.CYCLE)
    for line in (inception, bn_x5):  # each from step 50 to 100: across the axes
        assert figures.drawn(line, dpi=120) and line.width > pixels.shape[1] / 2, line
    assert bn_x5.row < inception.row  # 0.5-0.6 above 0.2-0.4
    assert third.pixels == 0  # two variants, two lines


def test_parallel_runs_name_every_failed_variant_and_its_log(tmp_path, capsys, monkeypatch):
    # Two variants at once (--jobs 2), both refused by train.py: compare waits for both, then names
    # each failure with the file holding its output. Each is a real process, forked by the tests'
    # fork server (TensorFlow imported once).
    from tests.helpers import forkserver

    monkeypatch.setattr(processes, "start_process", forkserver.popen)
    with pytest.raises(SystemExit) as stopped:
        compare.main(["--run-dir", str(tmp_path), "--dataset", "synthetic", "--variants", "inception,bn-x5",
                      "--jobs", "2", "--batch-size", "0"])
    message = str(stopped.value)
    for name in ("inception", "bn-x5"):
        log = tmp_path / name / "train.log"
        assert f"{name} (exit 2; its output: {log})" in message
        assert "--batch-size must be at least 1" in log.read_text()
    assert message.startswith("error: ") and message.endswith("failed; rerun to resume")
    out = capsys.readouterr().out
    assert "== inception: failed in" in out and "== bn-x5: failed in" in out


def test_an_interrupted_variant_ends_the_comparison_with_130(tmp_path, capsys, monkeypatch):
    # The first variant's train.py stopped on SIGINT (exit 130): the second never starts.
    from tests.helpers import forkserver

    commands = []

    def start(command, **kwargs):
        commands.append(command)
        return forkserver.popen([sys.executable, "-c", "import sys; sys.exit(130)"], **kwargs)

    monkeypatch.setattr(processes, "start_process", start)
    status = compare.main(["--run-dir", str(tmp_path), "--dataset", "synthetic", "--variants", "inception,bn-x5"])
    assert status == 130 and len(commands) == 1
    assert "inception was interrupted" in capsys.readouterr().err
