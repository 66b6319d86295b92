"""Train BN-Inception (or its no-BN baseline) in one of the paper's variants.

    python -m recipes.inception_bn.train --variant bn-x5 --dataset imagenet2012 \\
        --data-dir ~/imagenet --run-dir runs/bn-x5

Uses every visible GPU (MirroredStrategy), or every machine in TF_CONFIG
(MultiWorkerMirroredStrategy; the run directory must then be on a
filesystem all workers share); BN is synchronized over the global batch
when there is more than one replica unless --no-sync-bn. The run directory
gets TensorBoard logs (logs/), history.csv (one row per evaluation: step,
loss, accuracy, learning rate, images/s), checkpoints (checkpoints/) and, at
the end, a SavedModel with BN folded (export/). Rerunning the same command
resumes from the last checkpoint.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from recipes.inception_bn.data import DEFAULT_IMAGE_SIZE, SOURCES  # noqa: E402
from recipes.inception_bn.variants import VARIANTS, variants_help  # noqa: E402

HISTORY_FIELDS = ("step", "epoch", "learning_rate", "train_loss", "train_accuracy",
                  "eval_loss", "eval_accuracy", "eval_top5", "images_per_second", "wall_seconds")


DIVERGED = "diverged.json"  # written when the loss stops being finite


class RecipeError(Exception):
    """A problem the user can fix; reported as one line."""


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped training; the message says what was kept."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m recipes.inception_bn.train",
        description=__doc__.split("\n\n")[0],
        epilog="variants:\n" + variants_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", required=True, choices=list(VARIANTS), metavar="NAME",
                        help="training variant (listed below)")
    parser.add_argument("--dataset", default="imagenet2012", choices=SOURCES)
    parser.add_argument("--data-dir", help="imagenet2012: the directory holding ILSVRC2012_img_train.tar and "
                        "ILSVRC2012_img_val.tar; fashion_mnist: the idx files (default: Debian's "
                        "/usr/share/datasets/fashion-mnist)")
    parser.add_argument("--prepared-dir", help="where tfds writes the prepared imagenet2012 "
                        "(default: tfds' ~/tensorflow_datasets)")
    parser.add_argument("--run-dir", required=True, help="checkpoints, logs, history and export go here")
    parser.add_argument("--steps", type=int, help="training steps (default: 30 epochs)")
    parser.add_argument("--batch-size", type=int, default=32, help="per replica (default 32, the paper's)")
    parser.add_argument("--image-size", type=int,
                        help="input size (default: " + ", ".join(f"{k} {v}" for k, v in DEFAULT_IMAGE_SIZE.items()) + ")")
    parser.add_argument("--width-multiplier", type=float, default=1.0, help="scales every layer's filters")
    parser.add_argument("--bn-momentum", type=float, default=0.99,
                        help="BN moving-average momentum (0.99; 0.9 suits runs of a few thousand steps)")
    parser.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=None,
                        help="BN statistics over the global batch (default: when more than one replica)")
    parser.add_argument("--mixed-precision", action="store_true",
                        help="mixed_float16 on GPUs (with loss scaling), mixed_bfloat16 on CPUs")
    parser.add_argument("--eval-every", type=int, default=1000, help="steps between evaluations and checkpoints")
    parser.add_argument("--eval-examples", type=int, help="evaluate on the first N examples (default: all)")
    parser.add_argument("--warmup-epochs", type=float, default=0.0, help="linear learning-rate warm-up")
    parser.add_argument("--cpu-replicas", type=int, default=1,
                        help="split the CPU into N logical devices, one replica each (no GPUs needed)")
    parser.add_argument("--jit", action="store_true", help="XLA-compile the training step")
    parser.add_argument("--recalibrate-steps", type=int, default=0,
                        help="after training, set BN's population statistics exactly from N training batches "
                        "(the paper's Algorithm 2; kerasbn.recalibrate_statistics) before the last evaluation "
                        "and the export (default 0: keep the moving averages)")
    parser.add_argument("--no-export", dest="export", action="store_false", help="skip the SavedModel export")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.recalibrate_steps < 0:
        parser.error("--recalibrate-steps must be at least 0")
    for name in ("batch_size", "eval_every", "cpu_replicas"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be at least 1")
    if not 0 <= args.bn_momentum < 1:
        parser.error("--bn-momentum must be in [0, 1)")
    if args.width_multiplier <= 0:
        parser.error("--width-multiplier must be positive")
    return args


# Distribution -----------------------------------------------------------------------------------

def make_strategy(cpu_replicas: int = 1):
    """MultiWorkerMirroredStrategy from TF_CONFIG, else MirroredStrategy over the GPUs
    (or ``cpu_replicas`` logical CPUs), else the default strategy."""
    import tensorflow as tf

    if os.environ.get("TF_CONFIG"):
        try:
            json.loads(os.environ["TF_CONFIG"])
        except ValueError as error:
            raise RecipeError(f"TF_CONFIG is not valid JSON: {error}") from None
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.OneDeviceStrategy("/gpu:0")
    if cpu_replicas > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * cpu_replicas)
        return tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(cpu_replicas)])
    return tf.distribute.get_strategy()


def worker_role(strategy):
    """``(is_chief, task_index)``; without TF_CONFIG the one process is the chief."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True, 0
    chief = resolver.task_type == "chief" or (
        resolver.task_type == "worker" and resolver.task_id == 0
        and "chief" not in resolver.cluster_spec().as_dict())
    return chief, resolver.task_id


# History ----------------------------------------------------------------------------------------

def read_history(path: Path, up_to_step: int | None = None) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if up_to_step is not None:
        rows = [row for row in rows if int(row["step"]) <= up_to_step]
    return rows


def write_history(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, HISTORY_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)  # atomic: a kill never leaves half a file


# Training ---------------------------------------------------------------------------------------

def l2_penalty(model, weight_decay):
    """``c/2 * sum(w^2)`` over convolution and classifier kernels (not biases, not BN)."""
    import tensorflow as tf

    kernels = [w for w in model.trainable_weights
               if any(k in w.path for k in ("kernel", "depthwise_kernel", "pointwise_kernel"))]
    return weight_decay * 0.5 * tf.add_n([tf.reduce_sum(tf.square(tf.cast(w, tf.float32))) for w in kernels])


def train(args) -> int:
    import keras
    import tensorflow as tf

    import kerasbn
    from recipes.fashion_mnist import DatasetNotFoundError
    from recipes.inception_bn.data import DataNotFoundError, load_source

    variant = VARIANTS[args.variant]
    run_dir = Path(args.run_dir).expanduser()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as error:
        raise RecipeError(f"--run-dir {run_dir} cannot be written: {error.strerror or error}") from None
    strategy = make_strategy(args.cpu_replicas)
    is_chief, task_index = worker_role(strategy)
    multi_worker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
    say = print if is_chief else (lambda *a, **k: None)
    replicas = strategy.num_replicas_in_sync
    synchronized = replicas > 1 if args.sync_bn is None else args.sync_bn
    if args.mixed_precision:
        on_gpu = bool(tf.config.list_physical_devices("GPU"))
        keras.mixed_precision.set_global_policy("mixed_float16" if on_gpu else "mixed_bfloat16")
    keras.utils.set_random_seed(args.seed)

    try:
        source = load_source(args.dataset, args.data_dir, args.image_size, args.prepared_dir)
    except (DataNotFoundError, DatasetNotFoundError) as error:
        raise RecipeError(str(error)) from None
    global_batch = args.batch_size * replicas
    steps_per_epoch = source.train_examples / global_batch
    total_steps = args.steps or int(round(30 * steps_per_epoch))

    with strategy.scope():
        model = variant.build_model(source.num_classes, source.image_shape, args.width_multiplier, synchronized,
                                    args.bn_momentum)
        schedule = variant.schedule(global_batch, source.train_examples, args.warmup_epochs)
        optimizer = keras.optimizers.SGD(schedule, momentum=variant.momentum)
        if keras.mixed_precision.global_policy().name == "mixed_float16":
            optimizer = keras.mixed_precision.LossScaleOptimizer(optimizer)
        optimizer.build(model.trainable_variables)
        checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)

    # Checkpoints: the chief writes checkpoints/; the other workers must save too (the save
    # reads distributed variables), into a private directory removed afterwards.
    checkpoint_dir = run_dir / "checkpoints"
    write_dir = checkpoint_dir if is_chief else Path(tempfile.mkdtemp(prefix=f"worker{task_index}-"))
    manager = tf.train.CheckpointManager(checkpoint, str(write_dir), max_to_keep=3)
    latest = tf.train.latest_checkpoint(str(checkpoint_dir))
    if latest:
        checkpoint.restore(latest).assert_existing_objects_matched()
    start_step = int(optimizer.iterations.numpy())
    if multi_worker and replicas > 1:
        _check_same_step(strategy, start_step)
    if start_step >= total_steps and latest:
        say(f"{run_dir}: already trained {start_step} of {total_steps} steps; exporting.")
    elif latest:
        say(f"Resuming {run_dir} from step {start_step} of {total_steps} ({latest}).")
    history_path = run_dir / "history.csv"
    history = read_history(history_path, up_to_step=start_step if latest else -1)

    say(f"{variant.name}: {variant.description}")
    say(f"{model.count_params() / 1e6:.2f}M weights; {source.name} {source.image_shape}, "
        f"{source.num_classes} classes; {replicas} replica(s) x batch {args.batch_size} = {global_batch}"
        f"{', synchronized BN' if synchronized and variant.batch_norm else ''}; "
        f"lr {schedule.initial_learning_rate:g} decaying x{variant.decay_rate} every {schedule.decay_steps:.0f} "
        f"steps; {total_steps} steps ({total_steps / steps_per_epoch:.2f} epochs)")

    if is_chief:
        settings = {"variant": variant.name, "dataset": source.name, "num_classes": source.num_classes,
                    "replicas": replicas,
                    "global_batch": global_batch, "synchronized_bn": bool(synchronized and variant.batch_norm),
                    "initial_learning_rate": float(schedule.initial_learning_rate),
                    "decay_rate": float(variant.decay_rate), "decay_steps": float(schedule.decay_steps),
                    "steps": total_steps, "arguments": vars(args)}
        tmp = run_dir / "run.json.tmp"
        tmp.write_text(json.dumps(settings, indent=1, default=str))
        os.replace(tmp, run_dir / "run.json")

    # Data: distinct shuffling after a resume, so a resumed run does not replay the same batches.
    seed = args.seed + start_step
    train_data = strategy.distribute_datasets_from_function(
        lambda ctx: source.train(ctx.get_per_replica_batch_size(global_batch), variant.distortion, seed, ctx))
    eval_examples = source.eval_examples if args.eval_examples is None else min(args.eval_examples,
                                                                                 source.eval_examples)

    # Evaluation runs on each worker's own copy of the weights, outside the strategy: with
    # several replicas a last partial batch would leave some replicas empty batches.
    eval_data = source.eval(256)
    if args.eval_examples is not None:
        eval_data = eval_data.unbatch().take(eval_examples).batch(256)

    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")

    def train_replica(images, labels):
        with tf.GradientTape() as tape:
            logits = tf.cast(model(images, training=True), tf.float32)
            per_example = loss_fn(labels, logits)
            # Mean over the global batch; the L2 term once over all replicas.
            loss = tf.reduce_sum(per_example) / global_batch + l2_penalty(model, variant.weight_decay) / replicas
            scaled = optimizer.scale_loss(loss) if hasattr(optimizer, "scale_loss") else loss
        gradients = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels), tf.float32))
        return tf.reduce_sum(per_example), correct

    @tf.function(jit_compile=args.jit or None)
    def train_step(iterator):
        loss, correct = strategy.run(train_replica, args=next(iterator))
        return (strategy.reduce("SUM", loss, axis=None), strategy.reduce("SUM", correct, axis=None))

    @tf.function
    def eval_step(images, labels):
        logits = tf.cast(model(images, training=False), tf.float32)
        k = min(5, source.num_classes)
        top5 = tf.reduce_sum(tf.cast(tf.nn.in_top_k(labels, logits, k), tf.float32))
        top1 = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels), tf.float32))
        return tf.reduce_sum(loss_fn(labels, logits)), top1, top5, tf.cast(tf.size(labels), tf.float32)

    def evaluate():
        totals = [0.0, 0.0, 0.0, 0.0]
        for images, labels in eval_data:
            totals = [t + float(v) for t, v in zip(totals, eval_step(images, labels))]
        loss, top1, top5, count = totals
        return loss / max(count, 1), top1 / max(count, 1), top5 / max(count, 1)

    writers = ({split: tf.summary.create_file_writer(str(run_dir / "logs" / split)) for split in ("train", "eval")}
               if is_chief else {})
    progress = None if args.quiet or not is_chief else keras.utils.Progbar(
        total_steps, stateful_metrics=["loss", "accuracy", "lr"], verbose=1 if sys.stdout.isatty() else 2)

    def evaluation_due(step):
        return step % args.eval_every == 0 or step == total_steps

    def record(step, loss_sum, correct_sum, seen, elapsed):
        """Evaluates at ``step`` and writes the history row and TensorBoard scalars (train columns
        blank when ``seen`` is 0: an evaluation repeated after a resume)."""
        eval_loss, eval_top1, eval_top5 = evaluate()
        lr = float(schedule(step))
        train = {"loss": loss_sum / seen, "accuracy": correct_sum / seen} if seen else {}
        history.append({"step": step, "epoch": f"{step / steps_per_epoch:.4f}", "learning_rate": f"{lr:.6g}",
                        "train_loss": f"{train['loss']:.5f}" if seen else "",
                        "train_accuracy": f"{train['accuracy']:.5f}" if seen else "",
                        "eval_loss": f"{eval_loss:.5f}", "eval_accuracy": f"{eval_top1:.5f}",
                        "eval_top5": f"{eval_top5:.5f}", "images_per_second": f"{seen / elapsed:.1f}" if seen else "",
                        "wall_seconds": f"{elapsed:.2f}" if seen else ""})
        if is_chief:
            write_history(history_path, history)
            for split, values in (("train", {**train, "learning_rate": lr}),
                                  ("eval", {"loss": eval_loss, "accuracy": eval_top1, "top5": eval_top5})):
                with writers[split].as_default(step=step):
                    for key, value in values.items():
                        tf.summary.scalar(key, value)
                writers[split].flush()
        trained = (f"train loss {train['loss']:.4f} acc {train['accuracy']:.4f}; " if seen else "")
        return (f"step {step}/{total_steps}: {trained}eval loss {eval_loss:.4f} acc {eval_top1:.4f}; lr {lr:.3g}"
                + (f"; {seen / elapsed:.0f} images/s" if seen else ""))

    if latest and evaluation_due(start_step) and (not history or int(history[-1]["step"]) != start_step):
        # Stopped between the checkpoint and its evaluation: evaluate now, so no row is missing.
        say(record(start_step, 0.0, 0.0, 0, 0.0), flush=True)

    iterator = iter(train_data)
    step, loss_sum, correct_sum, seen = start_step, 0.0, 0.0, 0
    clock = time.perf_counter()
    try:
        while step < total_steps:
            loss, correct = train_step(iterator)
            step += 1
            loss_sum, correct_sum, seen = loss_sum + float(loss), correct_sum + float(correct), seen + global_batch
            if not (loss_sum == loss_sum and abs(loss_sum) != float("inf")):
                if is_chief:
                    (run_dir / DIVERGED).write_text(json.dumps({"step": step, "loss": str(loss_sum / seen)}))
                raise RecipeError(f"the training loss became {loss_sum / seen} at step {step}: the learning rate "
                                  f"({float(schedule(step)):.3g}) is too high for this network (diverged). "
                                  f"The last good checkpoint is in {checkpoint_dir}.")
            if progress is not None and progress.verbose == 1:
                progress.update(step, [("loss", loss_sum / seen), ("accuracy", correct_sum / seen),
                                       ("lr", float(schedule(step)))])
            if evaluation_due(step):
                # Checkpoint first: an interruption during the evaluation then loses no training.
                manager.save(checkpoint_number=step)
                line = record(step, loss_sum, correct_sum, seen, time.perf_counter() - clock)
                if progress is None or progress.verbose != 1:
                    say(line, flush=True)
                else:
                    print()
                loss_sum, correct_sum, seen = 0.0, 0.0, 0
                clock = time.perf_counter()
    except KeyboardInterrupt:
        raise Interrupted(_save_on_interrupt(manager, optimizer, start_step, multi_worker)) from None
    if not is_chief:
        tf.io.gfile.rmtree(str(write_dir))
    recalibrated = bool(args.recalibrate_steps and variant.batch_norm)
    if recalibrated:
        before = evaluate()[1]
        with strategy.scope():
            # Batched globally, as tf.distribute expects: every replica sees --batch-size images, as in training.
            kerasbn.recalibrate_statistics(model, source.train(global_batch, variant.distortion, seed + 1),
                                           steps=args.recalibrate_steps, verbose=0)
        after = evaluate()[1]
        say(f"Population statistics from {args.recalibrate_steps} training batches (Algorithm 2): "
            f"eval accuracy {after:.4f} (moving averages: {before:.4f})")
        if is_chief:
            (run_dir / "recalibrated.json").write_text(json.dumps(
                {"step": step, "batches": args.recalibrate_steps, "eval_accuracy": after,
                 "eval_accuracy_moving_averages": before}))
    if args.export and is_chief:
        export_dir = run_dir / "export"
        exported = kerasbn.export_for_serving(model, export_dir)
        left = sum(isinstance(layer, kerasbn.BatchNormalization) for layer in exported.layers)
        say(f"SavedModel (BN folded, {left} BN layers left) in {export_dir}")
    if history:
        final = after if recalibrated else float(history[-1]["eval_accuracy"])
        say(f"Done: step {history[-1]['step']}, eval accuracy {final:.4f}"
            f"{' (population statistics)' if recalibrated else ''}; "
            f"history in {history_path}, TensorBoard logs in {run_dir / 'logs'}")
    return 0


def _save_on_interrupt(manager, optimizer, start_step, multi_worker) -> str:
    """Checkpoints the step training stopped at (one process only: a multi-worker save needs
    every worker); returns what was kept."""
    step = int(optimizer.iterations.numpy())  # the completed steps, whatever Python was doing
    if multi_worker:
        return f"interrupted at step {step}; the last checkpoint is in {manager.directory}"
    if step > start_step and manager.latest_checkpoint != os.path.join(manager.directory, f"ckpt-{step}"):
        manager.save(checkpoint_number=step)
    if manager.latest_checkpoint is None:  # stopped before the first step of a new run
        return f"interrupted at step {step}; nothing to save yet"
    return f"interrupted at step {step}; saved {manager.latest_checkpoint}"


def _check_same_step(strategy, step):
    """Every worker must resume at the same step (the run directory is shared); say so if not."""
    import tensorflow as tf

    # strategy.reduce has SUM and MEAN only: all steps are equal iff R * sum(s^2) == sum(s)^2.
    value = tf.constant([float(step), float(step) ** 2], tf.float64)
    total, squares = strategy.reduce("SUM", strategy.run(lambda: tf.identity(value)), axis=None).numpy()
    replicas = strategy.num_replicas_in_sync
    if abs(replicas * squares - total ** 2) > 0.5:
        raise RecipeError(f"workers restored different steps (mean {total / replicas:.1f}, this one {step}): "
                          "--run-dir must be on a filesystem every worker shares")


def main(argv=None) -> int:
    args = parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        # Schedulers preempt with SIGTERM: treat it as Ctrl-C, so the current step is checkpointed.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return train(args)
    except RecipeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Interrupted as interrupted:
        print(f"\n{interrupted}; rerun the same command to resume", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # before training started: nothing to keep
        print("\ninterrupted before training started", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
