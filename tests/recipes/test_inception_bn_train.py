"""The training recipe end to end, in fresh processes: interrupt, kill and resume, export and serve,
two replicas, two workers on loopback, and the one-line errors."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.helpers import forkserver
from tests.helpers.distributed import ROOT, TIMEOUT, _env, free_ports, start_cluster, tf_config

SMALL = ["--dataset", "synthetic", "--image-size", "32", "--width-multiplier", "0.125", "--batch-size", "8"]
# The stop/resume/cluster machinery on the recipe's own main, with a two-convolution network
# (tests/helpers/tiny_train.py): what these tests check is processes, signals and checkpoints, and
# BN-Inception would add ~10 s of tracing to every process.
TINY = ["--variant", "tiny", "--dataset", "synthetic", "--image-size", "32", "--batch-size", "8"]
RECIPE = ["-m", "tests.helpers.tiny_train"]


def _train(run_dir, *args, env=None, check=True):
    result = forkserver.run(
        [sys.executable, *RECIPE, "--run-dir", str(run_dir), *args],
        capture_output=True, text=True, timeout=TIMEOUT, env=_env(env), cwd=ROOT)
    if check and result.returncode != 0:
        raise AssertionError(f"train failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def _start(run_dir, *args, stdout=subprocess.PIPE):
    return forkserver.popen([sys.executable, *RECIPE, "--run-dir", str(run_dir), *args],
                            stdout=stdout, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)


def _main_in_process(argv, capsys):
    """``train.main(argv)`` in this process: ``(exit status, stderr)``, for errors raised before training."""
    from recipes.inception_bn import train

    handler = signal.getsignal(signal.SIGTERM)  # main() takes SIGTERM over
    try:
        status = train.main(argv)
    except SystemExit as exit_:  # argparse
        status = exit_.code
    finally:
        signal.signal(signal.SIGTERM, handler)
    return status, capsys.readouterr().err


def _error_lines(stderr):
    """The recipe's own error lines (TensorFlow's C++ start-up may log before them)."""
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def _history(run_dir):
    with open(run_dir / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def _checkpoint_steps(run_dir):
    return sorted(int(p.name[len("ckpt-"):-len(".index")]) for p in (run_dir / "checkpoints").glob("ckpt-*.index"))


def _wait_for(procs, condition, what):
    """Until ``condition()``: synchronized on what the run writes (the timeout is a safety net only)."""
    deadline = time.time() + TIMEOUT
    while not condition():
        for proc in procs:
            assert proc.poll() is None, f"training ended early:\n{proc.communicate()[1][-3000:]}"
        assert time.time() < deadline, f"no {what} in time"
        time.sleep(0.005)


def _wait_for_checkpoint_past(procs, run_dir, step):
    _wait_for(procs, lambda: max(_checkpoint_steps(run_dir), default=0) > step, "checkpoint")


def _named_checkpoint(run_dir):
    """The step of the checkpoint the state file names (a kill during a save leaves the previous one)."""
    state = (run_dir / "checkpoints" / "checkpoint").read_text()
    return int(state.split('"')[1].rsplit("-", 1)[1])


def _stopped_at(proc, run_dir):
    """The step of the one "interrupted at step K; saved .../ckpt-K" line, checked against the disk."""
    _, stderr = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    (line,) = [line for line in stderr.splitlines() if line.startswith("interrupted at step")]
    step = int(line.split()[3].rstrip(";"))
    assert line.endswith(f"saved {run_dir / 'checkpoints' / f'ckpt-{step}'}; rerun the same command to resume"), line
    assert _named_checkpoint(run_dir) == step  # what the rerun resumes from
    return step, stderr


@pytest.mark.slow
def test_stops_and_kills_at_any_instant_resume_losing_nothing_and_export_a_serving_model(tmp_path, capsys, tiny_variant):
    """One run, stopped five ways, each checked against the checkpoint state file on disk."""
    run_dir = tmp_path / "run"
    # Loops of 100 steps (a second or more here), evaluations of 1000 examples.
    args = [*TINY, "--eval-every", "100", "--steps-per-loop", "100", "--quiet"]

    # 1. Two signals at once (Ctrl-C twice; a scheduler signalling the process and its group) as the
    # second 100-step loop starts: the loop ends after the step in progress, one message, status 130.
    proc = _start(run_dir, *args, "--steps", "100000")
    _wait_for([proc], lambda: (run_dir / "history.csv").exists() and _history(run_dir), "evaluation")
    signalled = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGINT)
    stopped, stderr = _stopped_at(proc, run_dir)
    print(f"SIGTERM+SIGINT to exit: {time.perf_counter() - signalled:.2f} s; saved step {stopped}, "
          f"{stopped - 100} steps into the loop")
    assert 100 < stopped < 200, "the loop ran to its end"
    assert "forced exit" not in stderr

    # 2. SIGTERM the instant the next checkpoint's files appear: the save, or the evaluation that
    # follows it, is in progress; the save is not interrupted and the evaluation is abandoned.
    with open(tmp_path / "resumed.out", "w") as out:
        proc = _start(run_dir, *args, "--steps", "100000", stdout=out)
        _wait_for([proc], lambda: max(_checkpoint_steps(run_dir)) >= 200, "checkpoint")
        proc.send_signal(signal.SIGTERM)
        again, _ = _stopped_at(proc, run_dir)
    assert f"Resuming {run_dir} from step {stopped} of 100000" in (tmp_path / "resumed.out").read_text()
    abandoned = [int(r["step"]) for r in _history(run_dir)][-1] != 200
    assert again >= 200 and (not abandoned or again == 200)  # abandoned: its checkpoint is what was saved
    print(f"SIGTERM as ckpt-200 appeared: saved step {again}, evaluation abandoned: {abandoned}")

    # 3. SIGKILL (no chance to clean up) after the next checkpoint keeps the last complete one.
    proc = _start(run_dir, *args, "--steps", "100000")
    _wait_for_checkpoint_past([proc], run_dir, again)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=TIMEOUT)
    killed_at = _named_checkpoint(run_dir)
    assert killed_at >= again and not (run_dir / "export").exists()

    # 4. Three signals as the next checkpoint appears, each once the run answered the one before
    # (no merged signals): the third forces an exit, saving nothing more, and says truly what the
    # rerun resumes from.
    # (Past every checkpoint file on disk: a SIGKILL during a save leaves files the state file
    # does not name, and a signal before the new process blocks signals would simply kill it.)
    on_disk = max(_checkpoint_steps(run_dir))
    proc = _start(run_dir, *args, "--steps", "100000")
    _wait_for_checkpoint_past([proc], run_dir, on_disk)
    seen = []
    for signum, answer in ((signal.SIGTERM, "stopping at the next safe point"), (signal.SIGINT, "already stopping")):
        proc.send_signal(signum)
        while answer not in (line := proc.stderr.readline()):
            assert line, f"no {answer!r} line:\n{''.join(seen)[-3000:]}"
            seen.append(line)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    resumes_from = _named_checkpoint(run_dir)
    forced = [line for line in stderr.splitlines() if line.startswith("forced exit")]
    if forced:
        assert forced == [f"forced exit without saving; the rerun resumes from "
                          f"{run_dir / 'checkpoints' / f'ckpt-{resumes_from}'}"]
    else:
        assert f"interrupted at step {resumes_from}; saved" in stderr
    print(f"three signals: forced exit {bool(forced)}, resumes from {resumes_from}")

    # 5. The rerun resumes there and finishes: every evaluation exactly once (those abandoned are
    # redone first), nothing lost, nothing repeated.
    total = resumes_from + 4
    result = _train(run_dir, *args, "--steps", str(total))
    assert f"Resuming {run_dir} from step {resumes_from} of {total}" in result.stdout
    assert [int(row["step"]) for row in _history(run_dir)] == sorted({*range(100, total + 1, 100), total})
    assert _checkpoint_steps(run_dir)[-1] == total

    # The SavedModel (BN folded) serves the trained network: same outputs as the checkpoint's
    # weights in a freshly built model, run in inference mode.
    import tensorflow as tf

    from tests.helpers.tiny_train import TINY as tiny

    model = tiny.build_model(10, (32, 32, 3))
    tf.train.Checkpoint(model=model).restore(str(run_dir / "checkpoints" / f"ckpt-{total}")).expect_partial()
    x = np.random.RandomState(1).uniform(-1, 1, (3, 32, 32, 3)).astype("float32")
    loaded = tf.saved_model.load(str(run_dir / "export"))  # held: its variables die with it
    served = loaded.serve(tf.constant(x)).numpy()
    np.testing.assert_allclose(served, model(x, training=False).numpy(), rtol=1e-4, atol=1e-4)

    # 6. A finished run stopped after its last checkpoint but before that evaluation was written:
    # the rerun trains nothing and evaluates that step (the same weights give the same
    # accuracy), train columns blank.
    from recipes.inception_bn.history import write_history

    *earlier, last = _history(run_dir)
    write_history(run_dir / "history.csv", earlier)
    from recipes.inception_bn import train
    capsys.readouterr()
    status = train.main(["--run-dir", str(run_dir), *args, "--steps", str(total), "--no-export"])  # in this process
    assert status == 0 and f"already trained {total} of {total} steps" in capsys.readouterr().out
    *kept, redone = _history(run_dir)
    assert kept == earlier and redone["step"] == str(total) and redone["train_loss"] == ""
    assert float(redone["eval_accuracy"]) == pytest.approx(float(last["eval_accuracy"]), abs=1e-3)
    assert float(redone["eval_loss"]) == pytest.approx(float(last["eval_loss"]), abs=1e-3)


@pytest.mark.processes
@pytest.mark.slow(cores=2)
def test_two_workers_stopped_inside_a_long_loop_save_the_same_step_and_the_rerun_resumes(tmp_path):
    # A scheduler preempting one machine of a multi-worker run (SIGTERM to the non-chief) in the
    # middle of a 1000-step loop: every worker ends its loop after the same step and saves it;
    # rerunning the command on both resumes there.
    def command(steps):
        return [sys.executable, *RECIPE, "--run-dir", str(tmp_path), *TINY, "--steps", str(steps),
                "--eval-every", "1000", "--eval-examples", "16", "--steps-per-loop", "1000", "--quiet",
                "--no-export"]

    ports = free_ports(2)
    procs = [forkserver.popen(command(100000), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                              env=_env({"TF_CONFIG": tf_config(ports, index)})) for index in range(2)]
    try:
        announced = [procs[0].stdout.readline() for _ in range(2)]  # the chief is about to train
        procs[1].send_signal(signal.SIGTERM)
        results = [p.communicate(timeout=TIMEOUT) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert "2 replica(s) x batch 8 = 16, synchronized BN" in announced[1] and results[1][0] == ""
    saved = []
    for proc, (_, stderr) in zip(procs, results, strict=True):
        assert proc.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
        (line,) = [line for line in stderr.splitlines() if line.startswith("interrupted at step")]
        saved.append(int(line.split()[3].rstrip(";")))
        assert line.endswith(f"saved {tmp_path / 'checkpoints' / f'ckpt-{saved[-1]}'}; rerun the same command to resume")
    step = saved[0]
    assert saved == [step, step] and 1 <= step < 1000
    assert _named_checkpoint(tmp_path) == step
    assert not list(tmp_path.rglob("workertemp_*"))
    # The rerun resumes there, finishes, recalibrates and exports (chief only).
    chief, worker = start_cluster(lambda index: [*command(step + 2)[:-1], "--recalibrate-steps", "2"], cwd=ROOT)
    assert f"Resuming {tmp_path} from step {step} of {step + 2}" in chief and worker == ""
    assert _checkpoint_steps(tmp_path)[-1] == step + 2
    assert "Population statistics from 2 training batches (Algorithm 2)" in chief
    recalibrated = json.loads((tmp_path / "recalibrated.json").read_text())
    assert recalibrated["step"] == step + 2 and 0 <= recalibrated["eval_accuracy"] <= 1
    assert f"eval accuracy {recalibrated['eval_accuracy']:.4f} (population statistics)" in chief
    assert [int(r["step"]) for r in _history(tmp_path)] == [step + 2]
    assert (tmp_path / "export" / "saved_model.pb").exists()
    # That evaluation ran on both workers, each on its share of the 16 images: it equals one
    # evaluation of the checkpoint's weights on one device.
    import tensorflow as tf

    from recipes.inception_bn.data import load_source
    from recipes.inception_bn.steps import network_input
    from tests.helpers.tiny_train import TINY as tiny

    model = tiny.build_model(10, (32, 32, 3))
    tf.train.Checkpoint(model=model).restore(str(tmp_path / "checkpoints" / f"ckpt-{step + 2}")).expect_partial()
    images, labels = next(iter(load_source("synthetic", image_size=32).eval(16).batch(16)))
    logits = model(network_input(images), training=False)
    loss = float(tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)))
    accuracy = float(np.mean(np.argmax(logits, -1) == labels.numpy()))
    (row,) = _history(tmp_path)
    assert float(row["eval_loss"]) == pytest.approx(loss, abs=2e-5)
    assert float(row["eval_accuracy"]) == pytest.approx(accuracy, abs=1e-6)


def test_help_lists_the_variants(capsys):
    from recipes.inception_bn import train

    with pytest.raises(SystemExit) as exit_:
        train.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for name in ("inception", "bn-baseline", "bn-x5", "bn-x30", "bn-x5-sigmoid"):
        assert f"  {name} " in out


@pytest.mark.parametrize("setup, expected", [
    ("missing", "does not exist; it must hold ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar"),
    ("empty", "lacks ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar"),
    ("no_val", "lacks ILSVRC2012_img_val.tar"),
])
def test_missing_imagenet_is_one_line(tmp_path, setup, expected, capsys):
    data_dir = tmp_path / "imagenet"
    if setup != "missing":
        data_dir.mkdir()
    if setup == "no_val":
        (data_dir / "ILSVRC2012_img_train.tar").write_bytes(b"x" * 10)
        (data_dir / "ILSVRC2012_img_val.tar").write_bytes(b"")  # empty counts as missing
    status, stderr = _main_in_process(["--run-dir", str(tmp_path / "run"), "--variant", "bn-x5", "--dataset",
                                       "imagenet2012", "--data-dir", str(data_dir), "--prepared-dir",
                                       str(tmp_path / "prepared")], capsys)
    assert status == 2 and stderr.count("\n") == 1
    (err,) = _error_lines(stderr)
    assert err.startswith("error: --data-dir") and expected in err and str(data_dir) in err


@pytest.mark.parametrize("args, expected", [
    (["--variant", "bn-x6"], "invalid choice"),
    (["--variant", "bn-x5", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["--variant", "bn-x5", "--dataset", "cifar"], "invalid choice"),
    (["--variant", "bn-x5", "--stall-timeout", "-1"], "--stall-timeout must be at least 0 (0: never)"),
    (["--variant", "bn-x5", "--stall-timeout", "nan"], "--stall-timeout must be at least 0 (0: never)"),
    (["--variant", "bn-x5", "--validation-examples", "100"], "holds out part of fashion_mnist's training set"),
    (["--variant", "bn-x5", "--dataset", "fashion_mnist", "--validation-examples", "-1"],
     "--validation-examples must be at least 0"),
    (["--variant", "bn-x5", "--plateau-window", "0"], "--plateau-window must be at least 1 step"),
    (["--variant", "bn-x5", "--deterministic", "--jit"], "--deterministic cannot be combined with --jit"),
    (["--variant", "bn-x5", "--plateau-min-delta", "nan"], "--plateau-min-delta must be at least 0"),
    (["--variant", "bn-x5", "--dataset", "fashion_mnist", "--validation-examples", "60000"],
     "--validation-examples must be in [0, 60000)"),
])
def test_bad_flags(tmp_path, args, expected, capsys):
    status, stderr = _main_in_process(["--run-dir", str(tmp_path), *args], capsys)
    assert status == 2 and expected in stderr and "Traceback" not in stderr


def test_unwritable_run_dir_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    status, stderr = _main_in_process(["--run-dir", str(blocker / "run"), "--variant", "bn-x5", *SMALL], capsys)
    assert status == 2 and stderr.count("\n") == 1 and _error_lines(stderr)[0].startswith("error: --run-dir")


def test_divergence_stops_with_a_clear_message(tmp_path, capsys, monkeypatch):
    # A learning rate no network survives (BN keeps the convolutions scale-invariant, not the
    # classifier): the loss overflows; the run stops, says so, and
    # compare reads the marker it leaves.
    import dataclasses

    from recipes.inception_bn import variants
    from recipes.inception_bn.run_files import RunFiles
    from tests.helpers.tiny_train import TINY as tiny

    monkeypatch.setitem(variants.VARIANTS, "tiny", dataclasses.replace(tiny, learning_rate=1e30))
    status, stderr = _main_in_process(["--run-dir", str(tmp_path), *TINY, "--steps", "50", "--eval-every", "50",
                                       "--quiet"], capsys)
    assert status == 2 and stderr.count("\n") == 1
    (err,) = _error_lines(stderr)
    assert "diverged" in err and str(tmp_path / "checkpoints") in err
    assert RunFiles(tmp_path).diverged.exists()  # where compare and reproduce look for it


if os.name != "posix":  # SIGKILL
    pytestmark = pytest.mark.skip("POSIX only")


def test_a_missing_recipe_extra_is_one_line_naming_what_to_install():
    # What a user without kerasbn[recipes] sees (tensorboard stands for any of the extra's packages),
    # from each recipe's main, one after another in one fresh process.
    modules = ["recipes.inception_bn.train", "recipes.demo", "recipes.figure1.train", "recipes.inception_bn.compare"]
    code = ("import sys, importlib; sys.modules['tensorboard'] = None\n"
            "for name in sys.argv[1:]:\n"
            "    try:\n"
            "        status = importlib.import_module(name).main(['--run-dir', 'unused'])\n"
            "    except SystemExit as exit_:\n"
            "        status = exit_.code\n"
            "    print(f'{name} exited {status}', file=sys.stderr, flush=True)\n")
    result = forkserver.run([sys.executable, "-c", code, *modules], capture_output=True, text=True, env=_env(),
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    line = ("error: the recipes need kerasbn's `recipes` extra (missing: tensorboard); "
            "from the repository: pip install -e '.[recipes]'")
    ours = [x for x in result.stderr.splitlines() if x.startswith("error:") or " exited " in x]
    assert ours == [x for name in modules for x in (line, f"{name} exited 2")]


def test_training_loops_stop_at_every_evaluation_and_at_the_end():
    from types import SimpleNamespace

    from recipes.inception_bn.plan import RunPlan

    args = SimpleNamespace(sync_bn=None, batch_size=8, steps=14, eval_every=6, steps_per_loop=4,
                           plateau_window=None, plateau_min_delta=0.0)
    plan = RunPlan(args, None, SimpleNamespace(train_examples=800), replicas=1)
    step, boundaries = 0, []
    while step < plan.total_steps:
        step += plan.steps_to_next_boundary(step)
        boundaries.append(step)
    assert boundaries == [4, 6, 10, 12, 14]
    assert [s for s in boundaries if plan.evaluation_due(s)] == [6, 12, 14]


@pytest.mark.slow
def test_steps_per_loop_trains_exactly_as_one_step_per_call():
    # The recipe's own loop, 6 steps as 6 calls of 1 and as 2 calls of 3, from the same weights.

    import keras
    import tensorflow as tf

    from recipes.inception_bn.steps import Objective, make_train_loop
    from tests.helpers.tiny_train import TINY as tiny

    rng = np.random.RandomState(0)
    images = rng.uniform(-1, 1, (48, 32, 32, 3)).astype("float32")
    labels = rng.randint(0, 10, 48).astype("int32")
    strategy = tf.distribute.get_strategy()
    keras.utils.set_random_seed(0)
    model = tiny.build_model(10, (32, 32, 3))
    optimizer = keras.optimizers.SGD(0.05, momentum=0.9)
    optimizer.build(model.trainable_variables)
    initial = [v.numpy() for v in [*model.weights, *optimizer.variables]]
    loop = make_train_loop(strategy, model, optimizer, Objective(4e-5, 8))
    results = []
    for loops in ([1] * 6, [3, 3]):  # one step a call runs without the while loop: both paths agree
        for variable, value in zip([*model.weights, *optimizer.variables], initial, strict=True):
            variable.assign(value)
        iterator = iter(strategy.distribute_datasets_from_function(
            lambda ctx: tf.data.Dataset.from_tensor_slices((images, labels)).batch(8)))
        losses = [float(loop(iterator, tf.constant(n))[1]) for n in loops]
        results.append((sum(losses), [w.numpy() for w in model.weights], int(optimizer.iterations.numpy())))
    (loss_1, weights_1, steps_1), (loss_3, weights_3, steps_3) = results
    assert steps_1 == steps_3 == 6
    assert loss_1 == pytest.approx(loss_3, rel=1e-5)
    for a, b in zip(weights_1, weights_3, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert not np.allclose(weights_1[0], initial[0])  # it trained


def test_a_stop_request_ends_the_training_loop_after_the_current_step():

    import keras
    import tensorflow as tf

    from recipes.inception_bn.steps import Objective, make_train_loop
    from tests.helpers.tiny_train import TINY as tiny

    strategy = tf.distribute.get_strategy()
    model = tiny.build_model(10, (32, 32, 3))
    optimizer = keras.optimizers.SGD(0.05)
    flag = tf.Variable(0)
    loop = make_train_loop(strategy, model, optimizer, Objective(4e-5, 8), False, flag)
    iterator = iter(tf.data.Dataset.from_tensors(
        (tf.zeros((8, 32, 32, 3)), tf.zeros((8,), tf.int32))).repeat())
    steps, _, _, votes = loop(iterator, tf.constant(3))
    assert (int(steps), float(votes)) == (3, 0.0)
    flag.assign(1)  # what the stop thread does on SIGTERM or SIGINT
    steps, _, _, votes = loop(iterator, tf.constant(1000))
    assert (int(steps), float(votes)) == (1, 1.0)
    steps, _, _, votes = loop(iterator, tf.constant(1))  # one step: called without the while loop
    assert (int(steps), float(votes)) == (1, 1.0)
    assert int(optimizer.iterations.numpy()) == 5


@pytest.mark.slow
def test_evaluation_on_three_replicas_counts_every_example_once(tmp_path):
    # 997 = 20 global batches of 48 and 37 left; 5: most replicas never get an example.
    from tests.helpers.distributed import run_script

    result = run_script("eval_worker.py", ["--replicas", "3", "--examples", "997,5", "--batch", "16"], tmp_path)
    for i, examples in enumerate((997, 5)):
        assert int(result["count"][i]) == examples
        np.testing.assert_allclose(result["distributed"][i], result["single"][i], rtol=1e-5, atol=1e-6)
    loss, top1, top5 = result["distributed"][0]
    assert 0 < top1 < top5 <= 1  # a real evaluation, not a constant


def _start_service_process(*args):
    """A data-service process (dispatcher or worker); returns it once it says it is serving."""
    proc = forkserver.popen([sys.executable, "-m", "recipes.inception_bn.data_service", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=_env(), cwd=ROOT)
    line = proc.stdout.readline()
    assert "serving" in line, f"data service {args[0]} did not start: {line!r}"
    return proc


def _stop_service_process(proc, signum, role):
    """Signals a data-service process; checks its one line and status; returns the seconds it took."""
    signalled = time.perf_counter()
    proc.send_signal(signum)
    stdout, _ = proc.communicate(timeout=TIMEOUT)
    seconds = time.perf_counter() - signalled
    assert proc.returncode == 0, (role, proc.returncode)
    assert stdout.splitlines()[-1].startswith(f"{role} stopped by {signal.Signals(signum).name}"), stdout
    return seconds


@pytest.mark.processes
@pytest.mark.slow
def test_training_through_a_data_service_survives_a_lost_worker_and_a_restarted_dispatcher(tmp_path):
    # One service run, every way its processes end: a worker SIGKILLed (training goes on with the
    # other), the dispatcher stopped by SIGTERM while serving and restarted on its journal (the
    # trainer goes on), the last worker SIGKILLed (the trainer's input stalls: its watchdog ends it,
    # status 138), the trainer rerun (a new job, a new worker), then the service stopped (a worker
    # by Ctrl-C, the dispatcher by SIGTERM), each with one line and status 0.
    # (server.join() is one long C++ call: a Python SIGTERM handler never ran, nothing stopped.)
    (port,) = free_ports(1)
    journal = ["dispatcher", "--port", str(port), "--work-dir", str(tmp_path / "journal")]
    service = [_start_service_process(*journal)]
    seconds = {}
    # Above the longest gap between loops here (tracing, the dispatcher's restart): a forked
    # dispatcher restarts in about a second; a fresh interpreter imports TensorFlow first, which
    # took 11 s on a loaded 2-core machine.
    stall_timeout = 40 if forkserver.fresh_interpreters() else 20
    try:
        service += [_start_service_process("worker", "--dispatcher", f"127.0.0.1:{port}") for _ in range(2)]
        run_dir = tmp_path / "run"
        args = [*TINY, "--eval-every", "20", "--steps-per-loop", "20", "--eval-examples", "16",
                "--quiet", "--no-export", "--data-service", f"grpc://127.0.0.1:{port}",
                "--stall-timeout", str(stall_timeout)]
        proc = _start(run_dir, *args, "--steps", "100000")
        _wait_for([proc], lambda: max(_checkpoint_steps(run_dir), default=0) >= 20, "checkpoint")
        # One service worker dies (SIGKILL: no goodbye to the dispatcher); training goes on with the other.
        service[1].kill()
        service[1].wait()
        lost_at = max(_checkpoint_steps(run_dir))
        _wait_for([proc], lambda: max(_checkpoint_steps(run_dir)) >= lost_at + 20, "checkpoint after the loss")
        # The dispatcher is stopped while serving, and restarted on the same port and journal.
        seconds["dispatcher serving, SIGTERM"] = _stop_service_process(service[0], signal.SIGTERM, "dispatcher")
        service[0] = _start_service_process(*journal)
        restarted_at = max(_checkpoint_steps(run_dir))
        _wait_for([proc], lambda: max(_checkpoint_steps(run_dir)) >= restarted_at + 20,
                  "checkpoint after the dispatcher's restart")
        # The last service worker dies: no input comes, the trainer waits in the loop; the watchdog
        # ends it within --stall-timeout (plus its check interval), naming what it waited for.
        service[2].kill()
        lost = time.perf_counter()
        _, stderr = proc.communicate(timeout=TIMEOUT)
        stalled_after = time.perf_counter() - lost
        print(f"the only service worker killed: the trainer exited {stalled_after:.1f} s later")
        assert proc.returncode == 138 and "Traceback" not in stderr, stderr[-3000:]
        assert stalled_after < stall_timeout + 30
        (line,) = [line for line in stderr.splitlines() if line.startswith("stalled:")]
        stopped = _named_checkpoint(run_dir)
        assert f"(--stall-timeout {stall_timeout}), waiting for training steps " in line, line
        assert f"(input from the tf.data service grpc://127.0.0.1:{port})" in line, line
        assert f"the rerun resumes from {run_dir / 'checkpoints' / f'ckpt-{stopped}'}" in line, line
        assert "Thread" in (run_dir / "trainer-errors.log").read_text()  # every thread's stack
        # The rerun resumes through the service (a new job, a new worker) and finishes.
        service[2] = _start_service_process("worker", "--dispatcher", f"127.0.0.1:{port}")
        result = _train(run_dir, *args, "--steps", str(stopped + 20))
        assert f"Resuming {run_dir} from step {stopped} of {stopped + 20}" in result.stdout
        assert _checkpoint_steps(run_dir)[-1] == stopped + 20
        assert all(np.isfinite(float(row["train_loss"])) for row in _history(run_dir) if row["train_loss"])
        seconds["worker, SIGINT"] = _stop_service_process(service[2], signal.SIGINT, "worker")
        seconds["dispatcher without workers, SIGTERM"] = _stop_service_process(service[0], signal.SIGTERM,
                                                                               "dispatcher")
    finally:
        for p in service:
            p.kill()
    print(seconds)
    # A bound for a busy machine, not a speed claim (measured: under 0.1 s each).
    assert max(seconds.values()) < 20, seconds


def test_bad_data_service_flags_are_one_line(tmp_path, capsys):
    status, stderr = _main_in_process(["--variant", "bn-x5", "--run-dir", str(tmp_path), "--dataset", "synthetic",
                                       "--data-service", "localhost:5050"], capsys)
    assert status == 2 and "--data-service must be grpc://HOST:PORT" in stderr
    status, stderr = _main_in_process(["--variant", "bn-x5", "--run-dir", str(tmp_path), "--dataset", "fashion_mnist",
                                       "--data-service", "grpc://localhost:5050"], capsys)
    assert status == 2 and "nothing to offload" in stderr


def test_a_save_cut_short_leaves_no_later_checkpoint_behind(tmp_path):
    # A SIGKILL or a forced exit during the save of step 30 leaves its files, which the state file
    # never named; the rerun (the chief) restores step 20 and removes them, keeping every named one.
    import shutil

    import tensorflow as tf

    from recipes.inception_bn.checkpoints import Checkpoints

    weight = tf.Variable(0.0)
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(weight=weight), str(tmp_path / "checkpoints"),
                                         max_to_keep=3)
    for step in (10, 20):
        weight.assign(float(step))
        manager.save(checkpoint_number=step)
    for path in (tmp_path / "checkpoints").glob("ckpt-20.*"):  # the unfinished save's files
        shutil.copy(path, path.with_name(path.name.replace("ckpt-20", "ckpt-30")))
    (tmp_path / "checkpoints" / "ckpt-30_temp").mkdir()
    restored = tf.Variable(-1.0)
    checkpoints = Checkpoints(tf.train.Checkpoint(weight=restored), tmp_path, is_chief=True, task_index=0)
    assert checkpoints.saved_step == 20 and float(restored.numpy()) == 20.0
    assert _checkpoint_steps(tmp_path) == [10, 20]
    assert not (tmp_path / "checkpoints" / "ckpt-30_temp").exists()
