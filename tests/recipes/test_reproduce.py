"""make reproduce: the stopping rule, Table 2 and Figure 2 from recorded curves, and one tiny run of
the command end to end."""

import json
import os
import signal
import threading
import time

import numpy as np
import pytest

from recipes.inception_bn import plateau, processes, reproduce
from recipes.inception_bn.history import HISTORY_FIELDS, read_history, write_history
from recipes.inception_bn.run_files import RunFiles
from tests.helpers import figures
from tests.helpers.distributed import TIMEOUT
from tests.helpers.tables import table_row

# ------------------------------------------------------------------------------ the stopping rule


def test_the_rule_stops_a_window_after_the_last_improvement():
    steps = [100, 200, 300, 400, 500, 600, 700]
    accuracies = [0.50, 0.60, 0.601, 0.605, 0.59, 0.60, 0.62]
    # 0.601 and 0.605 beat 0.60 by less than 0.01: the last improvement stays at step 200.
    assert plateau.stopping_step(steps, accuracies, window=300, min_delta=0.01) == 500
    assert plateau.stopping_step(steps, accuracies, window=500, min_delta=0.01) is None  # 0.62 came first
    # Any gain counts with min_delta 0: 0.605 at step 400 restarts the window, 0.62 at 700 again.
    assert plateau.stopping_step(steps, accuracies, window=200, min_delta=0.0) == 600
    assert plateau.stopping_step(steps, accuracies, window=300, min_delta=0.0) is None
    assert plateau.stopping_step(steps[:3], accuracies[:3], window=100, min_delta=0.01) == 300


def test_a_runs_rule_reads_its_history_rows_and_without_a_window_never_stops():
    rows = [{"step": str(s), "eval_accuracy": str(a)} for s, a in
            zip([100, 200, 300, 400, 500], [0.50, 0.60, 0.601, 0.605, 0.59], strict=True)]
    assert plateau.Rule(window=300, min_delta=0.01).stopping_step(rows) == 500
    assert plateau.Rule(window=300, min_delta=0.0).stopping_step(rows) is None  # 0.605 restarted it
    assert plateau.Rule(window=None).stopping_step(rows) is None


def test_the_rule_never_stops_a_run_that_keeps_improving():
    steps = list(range(250, 10001, 250))
    accuracies = [0.1 + 0.02 * i for i in range(len(steps))]
    assert plateau.stopping_step(steps, accuracies, window=250, min_delta=0.01) is None


def test_the_chosen_evaluation_is_the_best_and_the_earliest_of_equals():
    assert plateau.chosen([10, 20, 30, 40], [0.3, 0.7, 0.7, 0.6]) == (20, 0.7)
    with pytest.raises(ValueError, match="no evaluation"):
        plateau.chosen([], [])
    with pytest.raises(ValueError, match="at least 1 step"):
        plateau.stopping_step([10], [0.1], window=0)
    with pytest.raises(ValueError):
        plateau.stopping_step([10, 20], [0.1], window=5)  # lengths must match


# ------------------------------------------------------------------------- the table and figure

def _record(run_dir, seed, name, accuracies, every=100, reason="plateau", test=None, chosen_step=None,
            seconds_each=""):
    directory = reproduce.run_directory(run_dir, seed) / name
    directory.mkdir(parents=True)
    rows = [dict.fromkeys(HISTORY_FIELDS, "") | {"step": str(every * (i + 1)), "eval_accuracy": str(a),
                                                 "wall_seconds": str(seconds_each)}
            for i, a in enumerate(accuracies)]
    write_history(RunFiles(directory).history, rows)
    if reason is not None:
        RunFiles(directory).finished.write_text(json.dumps(
            {"step": every * len(accuracies), "reason": reason, "test_accuracy": test,
             "chosen_step": chosen_step}))


def _curves(run_dir, inception_reason="plateau"):
    # Seed 0: inception peaks at 0.80 (step 400); seed 1: at 0.70 (step 300).
    _record(run_dir, 0, "inception", [0.1, 0.5, 0.7, 0.80, 0.79, 0.78], reason=inception_reason, test=0.79)
    _record(run_dir, 1, "inception", [0.2, 0.6, 0.70, 0.69, 0.70], reason=inception_reason, test=0.68)
    _record(run_dir, 0, "bn-x5", [0.6, 0.81, 0.85, 0.84], test=0.84)   # reaches 0.80 at 200: 2.0x
    _record(run_dir, 1, "bn-x5", [0.72, 0.8, 0.82], test=0.83)         # reaches 0.70 at 100: 3.0x
    _record(run_dir, 0, "bn-x5-sigmoid", [0.3, 0.5, 0.6], test=0.60)   # never reaches 0.80
    _record(run_dir, 1, "bn-x5-sigmoid", [0.3, 0.71], reason=None)     # still training
    return reproduce.collect(run_dir, ["inception", "bn-x5", "bn-x5-sigmoid"], [0, 1])


def test_table_two_from_recorded_curves(tmp_path):
    table, numbers = reproduce.summarize(_curves(tmp_path), max_steps=1000)
    assert "seed 0: 0.8000 at step 400, seed 1: 0.7000 at step 300" in table
    assert "did not reach its plateau" not in table

    assert table_row(table, "inception")[1:4] == ["350 [300-400]", "400, 300", "1.0x [1.0x-1.0x]"]
    bn_x5 = table_row(table, "bn-x5")
    assert bn_x5[1:5] == ["150 [100-200]", "200, 100", "2.5x [2.0x-3.0x]", "0.8350 +- 0.0071"]
    assert bn_x5[5] == "0.8400, 0.8300" and bn_x5[6] == "400 (plateau), 300 (plateau)"
    assert bn_x5[7:9] == ["2.1M", "73.0%"]  # the paper's figures beside ours
    sigmoid = table_row(table, "bn-x5-sigmoid")
    assert sigmoid[1:5] == ["200 (1 of 2 never)", "never, 200", "1.5x", "0.6000"]
    assert sigmoid[6] == "300 (plateau), - (unfinished)"

    assert numbers["bn-x5"]["per_seed"][1] == {"reach": 100, "speedup": 3.0, "test_accuracy": 0.83,
                                               "stopped": 300, "reason": "plateau"}
    assert numbers["bn-x5"]["test_mean"] == pytest.approx(0.835)


def test_each_network_is_paired_with_the_baseline_seed_by_seed(tmp_path):
    table, numbers = reproduce.summarize(_curves(tmp_path), max_steps=1000)
    # bn-x5 - inception: seed 0 0.84 - 0.79, seed 1 0.83 - 0.68; two seeds: t(1) = 12.706.
    half = 12.706 * np.std([0.05, 0.15], ddof=1) / np.sqrt(2)
    assert table_row(table, "bn-x5", section=1)[1:] == [
        "+0.0500, +0.1500", f"+0.1000 [{0.1 - half:+.4f}, {0.1 + half:+.4f}]", "no", "2 of 2 seeds"]
    assert numbers["bn-x5"]["paired_test_difference"]["resolved"] is False
    # bn-x5-sigmoid: one seed tested (0.60 - 0.79), no interval; it never reached the target sooner.
    assert table_row(table, "bn-x5-sigmoid", section=1)[1:] == ["-0.1900", "-0.1900", "no", "1 of 2 seeds"]


def test_a_paired_difference_is_resolved_when_its_interval_excludes_zero():
    differences = [0.05, 0.06, 0.055]
    half = 4.303 * np.std(differences, ddof=1) / np.sqrt(3)
    agree = reproduce.paired(differences)
    assert agree["mean"] == pytest.approx(0.055) and agree["low"] == pytest.approx(0.055 - half)
    assert agree["resolved"] is True
    assert reproduce.paired([0.05, -0.01, 0.02])["resolved"] is False  # the seeds disagree


def test_progress_says_the_runs_done_and_the_time_left(tmp_path):
    names, seeds = ["inception", "bn-x5"], [0, 1]
    assert reproduce.progress_summary(tmp_path, names, seeds, {}, jobs=2) == \
        "0 of 4 runs done, 0 running; time left: estimated once a run has finished"
    _record(tmp_path, 0, "inception", [0.5] * 10, seconds_each=60)           # 10 min
    _record(tmp_path, 0, "bn-x5", [0.5] * 4, seconds_each=60)                # 4 min
    _record(tmp_path, 1, "inception", [0.5] * 3, reason=None, seconds_each=60)  # 3 min of ~10 trained
    running = {("inception", 1): tmp_path}
    # Left: inception seed 1 ~7 min, bn-x5 seed 1 ~4 min; two at a time: the longer, 7 min.
    assert reproduce.progress_summary(tmp_path, names, seeds, running, jobs=2) == \
        "2 of 4 runs done, 1 running; about 7 min left"
    assert reproduce.progress_summary(tmp_path, names, seeds, running, jobs=1).endswith("about 11 min left")
    # Nothing running: the finished runs' pace (0.6 s a step) for the same steps left.
    assert reproduce.progress_summary(tmp_path, names, seeds, {}, jobs=2).endswith("about 7 min left")


def test_the_time_left_follows_the_pace_the_runs_keep_now(tmp_path):
    # The finished runs trained at 0.6 s a step; the running one now takes 1.2 s (a busier machine):
    # inception seed 1 has 700 of its network's 1000 steps left, bn-x5 seed 1 all 400: 14 min, not 7.
    names, seeds = ["inception", "bn-x5"], [0, 1]
    _record(tmp_path, 0, "inception", [0.5] * 10, seconds_each=60)
    _record(tmp_path, 0, "bn-x5", [0.5] * 4, seconds_each=60)
    _record(tmp_path, 1, "inception", [0.5] * 3, reason=None, seconds_each=120)
    assert reproduce.progress_summary(tmp_path, names, seeds, {("inception", 1): tmp_path}, jobs=2) == \
        "2 of 4 runs done, 1 running; about 14 min left"


def test_one_interval_stretched_by_a_pause_does_not_multiply_the_time_left(tmp_path):
    # The running run's last interval took 20 min (the machine suspended) where the others took 1:
    # the estimate stays the 7 min of the steady pace (the last interval's pace alone: 140 min).
    names, seeds = ["inception", "bn-x5"], [0, 1]
    _record(tmp_path, 0, "inception", [0.5] * 10, seconds_each=60)
    _record(tmp_path, 0, "bn-x5", [0.5] * 4, seconds_each=60)
    _record(tmp_path, 1, "inception", [0.5] * 3, reason=None, seconds_each=60)
    history = RunFiles(reproduce.run_directory(tmp_path, 1) / "inception").history
    rows = read_history(history)
    rows[-1]["wall_seconds"] = "1200"
    write_history(history, rows)
    assert reproduce.progress_summary(tmp_path, names, seeds, {("inception", 1): tmp_path}, jobs=2) == \
        "2 of 4 runs done, 1 running; about 7 min left"


def test_table_says_when_the_baseline_hit_the_cap(tmp_path):
    table, numbers = reproduce.summarize(_curves(tmp_path, inception_reason="steps"), max_steps=600)
    assert "**inception did not reach its plateau in seed(s) 0, 1** (cap 600 steps" in table
    assert numbers["inception"]["per_seed"][0]["reason"] == "steps"


def test_figure_two_draws_each_networks_median_band_and_the_baselines_maximum(tmp_path):
    runs = _curves(tmp_path)
    reproduce.plot(tmp_path / "figure2.png", runs, "title")
    pixels = figures.read(tmp_path / "figure2.png", figsize=(7.5, 4.8), dpi=120)
    inception, bn_x5, sigmoid = (figures.curve(pixels, color) for color in figures.CYCLE)
    for color, median in zip(figures.CYCLE, (inception, bn_x5, sigmoid), strict=True):
        assert figures.drawn(median, dpi=120), median
        assert figures.band(pixels, color, alpha=0.2) > 1000  # the seeds differ: a band around it
    assert bn_x5.row < min(inception.row, sigmoid.row)  # the highest at every step
    # The baseline's median maximum (0.75): a dashed line across the axes, between its spines
    # (the rows dark across the whole axes) and above most of the baseline's median.
    dark = (pixels.max(axis=-1) < 80).sum(axis=1)
    spines = np.flatnonzero(dark == dark.max())
    dashed = np.flatnonzero((dark > 0.4 * dark.max()) & (dark < 0.9 * dark.max()))
    assert len(spines) == 2 and len(dashed), (spines, dashed)
    assert spines[0] < dashed.min() and dashed.max() < min(spines[1], inception.row)


def test_bad_arguments_are_refused_in_one_line(capsys):
    for argv, message in ((["--seeds", "0"], "at least two different seeds"),
                          (["--seeds", "a,b"], "comma-separated integers"),
                          (["--variants", "inception,nope"], "unknown --variants nope"),
                          (["--steps", "10"], "--steps is set per run by reproduce")):
        with pytest.raises(SystemExit) as exit_info:
            reproduce.parse_args(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


def test_the_budget_goes_to_train_and_the_user_overrides_it():
    _, names, seeds, train_args = reproduce.parse_args(["--image-size", "28", "--max-steps", "500"])
    assert names == ["inception", "bn-baseline", "bn-x5", "bn-x30", "bn-x5-sigmoid"] and seeds == [0, 1, 2]
    assert train_args.count("--image-size") == 1 and train_args[train_args.index("--image-size") + 1] == "28"
    assert train_args[train_args.index("--plateau-window") + 1] == reproduce.BUDGET["--plateau-window"]
    assert train_args[-2:] == ["--steps", "500"]


# --------------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_the_command_end_to_end_on_tiny_networks(tmp_path, capsys, monkeypatch):
    """Two networks (the tiny network with each one's schedule, with and without BN), two seeds, a
    few dozen steps. SIGTERM to the command alone (``kill PID``, a scheduler) as the first checkpoint
    appears: it reaches the runs under way, which save and exit, nothing more starts, status 130.
    Rerun: every run resumes or starts and stops by the rule or the cap, the table and figure are
    written, both networks of a seed read the same stream, and a third run trains nothing."""
    from tests.helpers import forkserver

    if not forkserver.fresh_interpreters():  # else each run starts as a user's does, in a session of its own
        monkeypatch.setattr(processes, "start_process", forkserver.popen)
    names = ["inception", "bn-x30"]
    argv = ["--run-dir", str(tmp_path), "--seeds", "0,1", "--variants", ",".join(names),
            "--train-module", "tests.helpers.tiny_train",
            "--tiny-network", "--max-steps", "60", "--eval-every", "20", "--plateau-window", "20",
            "--plateau-min-delta", "0.05", "--image-size", "16", "--validation-examples", "500", "--jobs", "2"]
    first = reproduce.run_directory(tmp_path, 0) / "inception" / "checkpoints"

    def terminate_this_process_at_the_first_checkpoint():
        deadline = time.time() + TIMEOUT  # a safety net: synchronized on the checkpoint
        while not list(first.glob("ckpt-*.index")) and time.time() < deadline:
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGTERM)

    # Should SIGTERM arrive after the command restored its handlers, it is recorded here, not fatal.
    late = []
    previous = signal.signal(signal.SIGTERM, lambda *_: late.append(True))
    try:
        killer = threading.Thread(target=terminate_this_process_at_the_first_checkpoint)
        killer.start()
        assert reproduce.main(argv) == 130
        killer.join()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert not late
    err = capsys.readouterr().err
    assert "was interrupted" in err and err.rstrip().endswith("rerun the same command to resume"), err
    console = RunFiles(reproduce.run_directory(tmp_path, 0) / "inception").console.read_text()
    (line,) = [line for line in console.splitlines() if line.startswith("interrupted at step")]
    stopped = int(line.split()[3].rstrip(";"))
    assert stopped >= 20 and not any(reproduce.finished(tmp_path, name, seed) for name in names for seed in (0, 1))
    assert not any((reproduce.run_directory(tmp_path, seed) / "bn-x30").exists() for seed in (0, 1))  # not started

    assert reproduce.main(argv) == 0
    out = capsys.readouterr().out
    console = RunFiles(reproduce.run_directory(tmp_path, 0) / "inception").console.read_text()
    assert f"Resuming {reproduce.run_directory(tmp_path, 0) / 'inception'} from step {stopped}" in console
    table = (tmp_path / "table2.md").read_text()
    for name in names:
        assert table_row(table, name)[0] == name
        for seed in (0, 1):
            done = reproduce.finished(tmp_path, name, seed)
            assert done["reason"] in ("plateau", "steps") and done["step"] <= 60
            assert 0.0 <= done["test_accuracy"] <= 1.0 and done["tested_step"] == done["chosen_step"]
            assert f"== {name} seed {seed}: stopped at step {done['step']} ({done['reason']})" in out
    for seed in (0, 1):
        streams = {(reproduce.run_directory(tmp_path, seed) / name / "stream.json").read_text()
                   for name in names}
        assert len(streams) == 1, streams
    # Runs of a few evaluations: each network at least in the legend, no third one.
    pixels = figures.read(tmp_path / "figure2.png", figsize=(7.5, 4.8), dpi=120)
    assert [figures.curve(pixels, color).pixels > 0 for color in figures.CYCLE] == [True, True, False]
    assert list(json.loads((tmp_path / "table2.json").read_text())) == names

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(processes, "start_process", no_training)
    assert reproduce.main(argv) == 0
    assert "== bn-x30 seed 1: finished at step" in capsys.readouterr().out
    assert (tmp_path / "table2.md").read_text() == table
