"""One run, however it is split or stopped (recipes/inception_bn/order.py).

The stream: every example once per epoch, and the global batch of a step the same examples with
the same augmentation on any number of replicas and input pipelines, and after a resume. The
recipe: with --deterministic, a run stopped by SIGTERM and SIGKILL and resumed ends bit-identical
to the uninterrupted one; on 1, 2 and 4 replicas and 2 loopback workers (synchronized BN) within
float32 tolerance, and with unsynchronized BN measurably not.
"""

import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tests.helpers import forkserver
from tests.helpers.distributed import ROOT, TIMEOUT, _env, start_cluster
from tests.recipes.test_inception_bn_train import (
    _checkpoint_steps,
    _main_in_process,
    _named_checkpoint,
    _stopped_at,
    _wait_for,
)

GLOBAL_BATCH = 16


def _global_batches(source, replicas, pipelines=1, start_step=0, steps=5, seed=3):
    """The first ``steps`` global batches from ``start_step``, each pipeline's replicas' shares in
    replica order, as tf.distribute deals them (a pipeline's consecutive elements to its replicas)."""
    import tensorflow as tf

    iterators = [iter(source.train(GLOBAL_BATCH // replicas, 1.0, seed,
                                   tf.distribute.InputContext(pipelines, pipeline, replicas), start_step))
                 for pipeline in range(pipelines)]
    batches = []
    for _ in range(steps):
        shares = [next(iterator) for iterator in iterators for _ in range(replicas // pipelines)]
        batches.append([np.concatenate([share[part].numpy() for share in shares]) for part in range(3)])
    return batches


def _assert_same_batches(expected, actual, what):
    for step, (want, got) in enumerate(zip(expected, actual, strict=True)):
        for name, a, b in zip(("images", "distortion factors", "labels"), want, got, strict=True):
            assert np.array_equal(a, b), f"{what}: step {step} has other {name}"


def test_every_example_is_used_once_per_epoch_in_a_new_order_each_epoch():
    from recipes.inception_bn.order import example_ids

    for examples in (1, 7, 60000):
        ids = example_ids(5, examples, np.arange(3 * examples)).numpy().reshape(3, examples)
        for epoch in ids:
            np.testing.assert_array_equal(np.sort(epoch), np.arange(examples))
        if examples > 1:
            assert not np.array_equal(ids[0], ids[1]) and not np.array_equal(ids[1], ids[2])
    # A whole-epoch shuffle, not a buffer's: the first 1% of an epoch comes from all over the set.
    first = example_ids(0, 60000, np.arange(600)).numpy()
    assert first.min() < 3000 and first.max() > 57000
    assert not np.array_equal(example_ids(0, 60000, np.arange(100)), example_ids(1, 60000, np.arange(100)))


def test_augmentation_draws_are_uniform_and_independent_per_position():
    from recipes.inception_bn.order import CROP_WINDOW, FACTORS, position_uniform

    draws = position_uniform(0, np.arange(200000), FACTORS, 4).numpy()
    assert draws.min() >= 0 and draws.max() < 1
    np.testing.assert_allclose(draws.mean(0), 0.5, atol=0.005)
    np.testing.assert_allclose(draws.var(0), 1 / 12, atol=0.002)
    correlations = np.corrcoef(draws.T)
    assert np.all(np.abs(correlations[np.triu_indices(4, 1)]) < 0.01)
    neighbours = np.corrcoef(draws[:-1, 0], draws[1:, 0])[0, 1]
    other_draw = np.corrcoef(draws[:, 0], position_uniform(0, np.arange(200000), CROP_WINDOW, 1).numpy()[:, 0])[0, 1]
    assert abs(neighbours) < 0.01 and abs(other_draw) < 0.01


# Fake ImageNet through tfds: 8 files of 4 examples, example i a uniform grey of 8 + 7 i (class
# i >= 16): whatever the crop and flip, an image's mean names its example.
IMAGENET_EXAMPLES, IMAGENET_FILES = 32, 8


def _grey_of(example):
    return 8 + 7 * example


@pytest.fixture(scope="module")
def prepared_imagenet(tmp_path_factory):
    from tests.helpers import fake_imagenet

    root = tmp_path_factory.mktemp("sharded-imagenet")
    values = [_grey_of(i) for i in range(IMAGENET_EXAMPLES)]
    half = IMAGENET_EXAMPLES // 2
    fake_imagenet.write(root, [values[:half], values[half:]], validation=IMAGENET_FILES)
    return fake_imagenet.prepare(root, root / "prepared", IMAGENET_FILES)


def _load(dataset, request):
    from recipes.inception_bn.data import load_source

    if dataset == "imagenet2012":
        return load_source(dataset, None, 32, prepared_dir=request.getfixturevalue("prepared_imagenet"))
    return load_source(dataset)


@pytest.mark.parametrize("dataset", ["fashion_mnist", "synthetic", "imagenet2012"])
def test_global_batches_are_the_same_on_any_split_and_after_a_resume_on_another(dataset, request):
    source = _load(dataset, request)
    one = _global_batches(source, replicas=1, steps=6)
    splits = [(2, 1), (4, 1), (2, 2), (4, 2)]
    if dataset == "imagenet2012":  # every split of the partitions: test_partitions_read_their_own_files...
        splits = [(2, 1), (4, 2)]
    for replicas, pipelines in splits:
        _assert_same_batches(one, _global_batches(source, replicas, pipelines, steps=6),
                             f"{replicas} replicas on {pipelines} pipelines")
    # Stopped after step 3 on one split, resumed on another: the same stream goes on.
    _assert_same_batches(one[3:], _global_batches(source, replicas=4, start_step=3, steps=3), "resumed on 4")
    _assert_same_batches(one[3:], _global_batches(source, replicas=2, pipelines=2, start_step=3, steps=3),
                         "resumed on 2 workers")
    assert not np.array_equal(one[0][0], _global_batches(source, 1, seed=4, steps=1)[0][0]), "the seed is ignored"
    assert not np.array_equal(one[0][0], one[1][0])


def test_fake_imagenet_through_tfds_uses_every_example_once_per_epoch(request):
    # 32 examples, global batch 16, 8 partitions of one file: each epoch is two steps, and holds
    # every example (named by its grey level) once, with its own label, in a new order.
    source = _load("imagenet2012", request)
    assert source.partitions_for(GLOBAL_BATCH) == IMAGENET_FILES
    examples = []
    for images, factors, labels in _global_batches(source, replicas=2, pipelines=2, steps=8):
        means = images.reshape(len(images), -1).mean(1)
        ids = np.rint((means - 8) / 7).astype(int)
        np.testing.assert_allclose(means, _grey_of(ids), atol=1.0)
        np.testing.assert_array_equal(labels, ids >= IMAGENET_EXAMPLES // 2)
        assert len(np.unique(factors, axis=0)) == len(factors)  # a draw per position
        examples.extend(ids)
    epochs = np.reshape(examples, (4, IMAGENET_EXAMPLES))
    for epoch in epochs:
        np.testing.assert_array_equal(np.sort(epoch), np.arange(IMAGENET_EXAMPLES))
    assert len({tuple(epoch) for epoch in epochs}) == 4


def test_fake_imagenet_through_a_data_service_gives_labelled_images_of_every_file(request):
    # Dynamic sharding deals the partitions' file slots and the positions to the service's workers
    # independently (docs/recipes.md): not the local stream, but every image with its own label,
    # and every example within the first epochs.
    import tensorflow as tf

    from recipes.inception_bn import data_service

    source = _load("imagenet2012", request)
    dispatcher = tf.data.experimental.service.DispatchServer()
    worker = tf.data.experimental.service.WorkerServer(
        tf.data.experimental.service.WorkerConfig(dispatcher_address=dispatcher.target.split("://")[1]))
    # A finite job: a worker stopping with a task of an endless one still running waits on it.
    served = data_service.distribute(source.train(8, 1.0, 3).take(16), dispatcher.target, "one-run-test")
    examples = set()
    try:
        for images, _, labels in served:
            ids = np.rint((images.numpy().reshape(8, -1).mean(1) - 8) / 7).astype(int)
            np.testing.assert_array_equal(labels.numpy(), ids >= IMAGENET_EXAMPLES // 2)
            examples.update(ids.tolist())
    finally:
        del worker  # stopped before the dispatcher it reports to
    assert examples == set(range(IMAGENET_EXAMPLES))


def _tfrecord_files(directory, counts):
    """TFRecord files holding records ``b"0"``, ``b"1"``, ... in order, ``counts[i]`` in file i."""
    import tensorflow as tf

    files, record = [], 0
    for i, count in enumerate(counts):
        files.append(str(directory / f"train.tfrecord-{i:05d}"))
        with tf.io.TFRecordWriter(files[-1]) as writer:
            for _ in range(count):
                writer.write(str(record).encode())
                record += 1
    return files


def test_partitions_read_their_own_files_once_per_epoch_on_any_split(tmp_path):
    # ImageNet's layout in small: files of unequal length, K partitions, read by position.
    import tensorflow as tf

    from recipes.inception_bn.order import pipeline_positions
    from recipes.inception_bn.partitions import pipeline_records

    counts = [5, 6, 5, 7, 6, 5, 6, 4]
    files = _tfrecord_files(tmp_path, counts)
    file_of = np.repeat(np.arange(len(counts)), counts)
    partitions, batch = 4, 8

    def global_batches(replicas, pipelines=1, start_step=0, steps=18):
        def pipeline(w):
            context = tf.distribute.InputContext(pipelines, w, replicas)
            records = pipeline_records(files, counts, 3, partitions, batch // replicas, start_step, context)
            positions = pipeline_positions(batch // replicas, start_step, context).unbatch()
            return iter(tf.data.Dataset.zip(positions, records).batch(batch // replicas))

        iterators = [pipeline(w) for w in range(pipelines)]
        result = []
        for _ in range(steps):
            shares = [(w, next(iterators[w])) for w in range(pipelines) for _ in range(replicas // pipelines)]
            for w, (_, records) in shares:  # pipeline w reads only partitions [w K/W, (w+1) K/W)
                owned = file_of[records.numpy().astype(int)] % partitions
                assert np.all(owned * pipelines // partitions == w), f"pipeline {w} read another's file"
            result.append((np.concatenate([p.numpy() for _, (p, _) in shares]),
                           np.concatenate([r.numpy().astype(int) for _, (_, r) in shares])))
        return result

    one = global_batches(1)
    assert [p.tolist() for p, _ in one[:2]] == [list(range(8)), list(range(8, 16))]
    # Each partition (slots 2k, 2k+1 of every step) uses each of its records once per its epoch.
    records = np.stack([r for _, r in one])
    for k in range(partitions):
        stream = records[:, 2 * k:2 * k + 2].reshape(-1)
        own = np.flatnonzero(file_of % partitions == k)
        epochs = [stream[i:i + len(own)] for i in range(0, len(stream) - len(own) + 1, len(own))]
        assert len(epochs) >= 3
        for epoch in epochs:
            np.testing.assert_array_equal(np.sort(epoch), own)
        assert not np.array_equal(epochs[0], epochs[1])
    for replicas, pipelines in [(2, 1), (4, 2), (4, 4)]:
        assert all(np.array_equal(a[1], b[1]) for a, b in zip(one[:12], global_batches(replicas, pipelines, steps=12), strict=True)), \
            f"{replicas} replicas on {pipelines} pipelines read another stream"
    for step, (replicas, pipelines) in [(5, (1, 1)), (13, (4, 2))]:  # mid-file; a later epoch, another split
        resumed = global_batches(replicas, pipelines, start_step=step, steps=5)
        assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
                   for a, b in zip(one[step:step + 5], resumed, strict=True)), f"resumed at step {step} on {replicas}"


def test_partitions_that_cannot_work_are_one_clear_error():
    from recipes.inception_bn.order import check_pipelines
    from recipes.inception_bn.partitions import choose_partitions

    assert choose_partitions(256, 1024) == 16 and choose_partitions(4, 1024) == 4
    assert choose_partitions(24, 1024) == 12 and choose_partitions(256, 3) == 2 and choose_partitions(7, 1) == 1
    for requested, expected in [(3, "--partitions 3 must divide the global batch 16"),
                                (32, "--partitions 32 is more than the dataset's 8 training files"),
                                (0, "--partitions must be at least 1")]:
        with pytest.raises(ValueError, match=expected):
            choose_partitions(16, 8, requested)
    with pytest.raises(ValueError, match="16 partitions, which 3 input pipelines"):
        check_pipelines(16, 3)
    check_pipelines(16, 4)
    assert choose_partitions(16, 8, 4) == 4


def test_a_resume_with_other_partitions_is_refused(tmp_path):
    from recipes.inception_bn.order import Stream, StreamMismatch

    Stream(0, 32, 16, 8).check_resume(tmp_path, resuming=False, record=True)
    Stream(0, 32, 16, 8).check_resume(tmp_path, resuming=True, record=False)
    with pytest.raises(StreamMismatch, match=r"partitions 8 \(now 4\).*--partitions"):
        Stream(0, 32, 16, 4).check_resume(tmp_path, resuming=True, record=False)


def test_the_batches_are_the_examples_at_their_positions():
    # Independent of the pipeline: the synthetic source's example i is a pure function of i, so
    # the images of step s must be those of example_ids(positions of step s).
    from recipes.inception_bn.data import load_source
    from recipes.inception_bn.order import example_ids

    source = load_source("synthetic")
    wanted_ids = example_ids(3, source.train_examples, np.arange(2 * source.train_examples - 5,
                                                                 2 * source.train_examples + 5)).numpy()
    # One example per step (position = step), resumed 5 examples before the end of epoch 1.
    resumed = iter(source.train(1, 0.0, 3, None, start_step=2 * source.train_examples - 5))
    reference = iter(source.train(source.train_examples, 0.0, 3))  # the whole epoch 0, in order
    epoch0 = next(reference)
    by_id = {}
    positions = example_ids(3, source.train_examples, np.arange(source.train_examples)).numpy()
    for image, example in zip(epoch0[0].numpy(), positions, strict=True):
        by_id[int(example)] = image
    assert sorted(by_id) == list(range(source.train_examples))
    for example in wanted_ids:  # across the boundary of epochs 1 and 2
        np.testing.assert_array_equal(next(resumed)[0].numpy()[0], by_id[int(example)])


def _weights(run_dir, step):
    """Every model and optimizer variable of checkpoint ``step`` (not the save counter)."""
    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(run_dir / "checkpoints" / f"ckpt-{step}"))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if name.startswith(("model/", "optimizer/")) and "save_counter" not in name}


ONE_RUN = ["-m", "tests.helpers.tiny_train", "--variant", "tiny", "--dataset", "fashion_mnist", "--eval-examples", "64",
           "--eval-every", "10", "--quiet", "--no-export", "--deterministic"]


def _command(run_dir, replicas, steps, *extra):
    return [sys.executable, *ONE_RUN, "--run-dir", str(run_dir), "--batch-size", str(GLOBAL_BATCH // replicas),
            "--cpu-replicas", str(replicas), "--steps", str(steps), *extra]


def _run(run_dir, replicas, steps, *extra):
    result = forkserver.run(_command(run_dir, replicas, steps, *extra), capture_output=True, text=True,
                            timeout=TIMEOUT, env=_env(), cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _stopped_killed_and_resumed(run_dir, steps):
    """SIGTERM the instant the first checkpoint appears, SIGKILL once the rerun saved the next one
    (in its evaluation or the steps after it), then run to the end: the steps it stopped at."""
    proc = forkserver.popen(_command(run_dir, 1, steps), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env(), cwd=ROOT)
    _wait_for([proc], lambda: _checkpoint_steps(run_dir) if (run_dir / "checkpoints").exists() else False,
              "checkpoint")
    proc.send_signal(signal.SIGTERM)
    stopped, _ = _stopped_at(proc, run_dir)
    proc = forkserver.popen(_command(run_dir, 1, steps), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env(), cwd=ROOT)
    _wait_for([proc], lambda: _named_checkpoint(run_dir) > stopped, "a checkpoint past the stop")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=TIMEOUT)
    killed = _named_checkpoint(run_dir)
    assert stopped < killed < steps
    assert f"Resuming {run_dir} from step {killed} of {steps}" in _run(run_dir, 1, steps)
    return stopped, killed


STEPS = 40


@pytest.mark.processes
@pytest.mark.slow(cores=2)
def test_one_run_stopped_killed_or_split_ends_with_the_uninterrupted_weights(tmp_path, capsys, tiny_variant):
    # One global batch of 16 on every split, --deterministic, synchronized BN unless --no-sync-bn:
    # - stopped by SIGTERM and SIGKILL and resumed: bit-identical to the uninterrupted run;
    # - on 2 and 4 replicas, and on 2 loopback workers for half the steps then resumed on the one
    #   machine left with 2 replicas (the global batch is what the stream needs): within TOLERANCE;
    # - unsynchronized BN on 2 replicas: measurably not.
    def workers_then_the_machine_left():
        # Half the run on 2 workers of batch 8; then, as if worker 1 were lost, the rest on the one
        # machine left with 2 replicas of batch 8 (the second --batch-size wins).
        half = [*_command(tmp_path / "workers", 1, STEPS // 2), "--batch-size", str(GLOBAL_BATCH // 2)]
        start_cluster(lambda index: half, cwd=ROOT)
        assert f"from step {STEPS // 2} of {STEPS}" in _run(tmp_path / "workers", 2, STEPS)

    runs = {"1": lambda: _run(tmp_path / "1", 1, STEPS), "2": lambda: _run(tmp_path / "2", 2, STEPS),
            "4": lambda: _run(tmp_path / "4", 4, STEPS), "workers": workers_then_the_machine_left,
            "unsynchronized": lambda: _run(tmp_path / "unsynchronized", 2, STEPS, "--no-sync-bn"),
            "stopped": lambda: _stopped_killed_and_resumed(tmp_path / "stopped", STEPS)}
    with ThreadPoolExecutor(3) as pool:
        futures = {name: pool.submit(run) for name, run in runs.items()}
        results = {name: future.result() for name, future in futures.items()}
    stopped, killed = results["stopped"]
    print(f"stopped at {stopped} (SIGTERM), killed after {killed}, finished at {STEPS}")

    reference = _weights(tmp_path / "1", STEPS)
    resumed = _weights(tmp_path / "stopped", STEPS)
    assert resumed.keys() == reference.keys() and len(reference) > 10
    different = [name for name in reference if not np.array_equal(reference[name], resumed[name])]
    assert not different, f"not bit-identical to the uninterrupted run: {different}"

    def largest_difference(name):
        weights = _weights(tmp_path / name, STEPS)
        assert weights.keys() == reference.keys()
        return max(float(np.max(np.abs(weights[k] - reference[k]) / (np.abs(reference[k]) + 1e-3)))
                   for k in reference if k.startswith("model/"))

    differences = {name: largest_difference(name) for name in ("2", "4", "workers", "unsynchronized")}
    print("largest relative weight difference to 1 replica:", {k: f"{v:.1e}" for k, v in differences.items()})
    # float32 sums in another order (per-replica partial sums, then the all-reduce), grown over 40
    # steps: measured 3e-5 to 8e-5 (AMD EPYC, TF 2.21), a tenth of TOLERANCE; without synchronized BN
    # every replica normalizes with its own batch of 8: measured 5 (relative), 5000 x TOLERANCE.
    for name in ("2", "4", "workers"):
        assert differences[name] < TOLERANCE, f"{name}: {differences[name]:.2e}"
    assert differences["unsynchronized"] > 100 * TOLERANCE

    # A resume on another stream (global batch 8 where 16 trained): refused in one line naming both.
    # In this process, before training; without --deterministic, which would stay on here.
    status, stderr = _main_in_process(["--run-dir", str(tmp_path / "1"), "--variant", "tiny", "--dataset",
                                       "fashion_mnist", "--batch-size", "8", "--steps", str(2 * STEPS)], capsys)
    assert status == 2 and "Traceback" not in stderr, stderr
    (line,) = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert "global_batch 16 (now 8)" in line and str(tmp_path / "1") in line


TOLERANCE = 1e-3


@pytest.mark.parametrize("args, expected", [
    (["--deterministic", "--dataset", "synthetic", "--data-service", "grpc://localhost:5050"],
     "--deterministic cannot be combined with --data-service"),
    (["--dataset", "synthetic", "--data-service", "grpc://localhost:5050", "--partitions", "4"],
     "--partitions cannot be combined with --data-service"),
    (["--dataset", "fashion_mnist", "--partitions", "4"], "--partitions is for imagenet2012's training files"),
])
def test_what_the_stream_cannot_keep_is_refused(tmp_path, args, expected, capsys):
    status, stderr = _main_in_process(["--run-dir", str(tmp_path), "--variant", "bn-x5", *args], capsys)
    assert status == 2 and expected in stderr and "Traceback" not in stderr


def test_imagenet_partitions_that_do_not_divide_the_global_batch_are_one_line(tmp_path, capsys, request, tiny_variant):
    # In this process, before training: the chosen partitions are checked against the global batch.
    status, stderr = _main_in_process(
        ["--run-dir", str(tmp_path / "run"), "--variant", "tiny", "--dataset", "imagenet2012", "--prepared-dir",
         str(request.getfixturevalue("prepared_imagenet")), "--image-size", "32", "--batch-size", "4",
         "--partitions", "3", "--steps", "1"], capsys)
    assert status == 2 and "Traceback" not in stderr, stderr
    (line,) = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert "--partitions 3 must divide the global batch 4" in line
