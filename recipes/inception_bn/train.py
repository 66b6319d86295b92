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
resumes from the last checkpoint; SIGTERM or Ctrl-C stops within a step or
two, saves the step reached (every worker the same step) and exits with 130
(see recipes/inception_bn/stopping.py). A lost or frozen worker, or no step
for --stall-timeout seconds, ends every worker with one line and status 138:
rerun every worker to resume (recipes/inception_bn/failures.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":
    # First, before TensorFlow starts a thread: every thread inherits the blocked stop signals.
    from recipes.inception_bn.stopping import block_stop_signals

    block_stop_signals()

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import kerasbn  # noqa: E402
from recipes.inception_bn import cluster, ending, failures, order, plateau  # noqa: E402
from recipes.inception_bn.checkpoints import Checkpoints, resume_message  # noqa: E402
from recipes.inception_bn.data import DEFAULT_IMAGE_SIZE, SOURCES, network_input  # noqa: E402
from recipes.inception_bn.ending import Interrupted, PeerLost, Refused  # noqa: E402
from recipes.inception_bn.history import DIVERGED, atomic_write  # noqa: E402
from recipes.inception_bn.run_log import RunLog  # noqa: E402
from recipes.inception_bn.stopping import make_agreement  # noqa: E402
from recipes.inception_bn.variants import VARIANTS, variants_help  # noqa: E402


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
    parser.add_argument("--steps-per-loop", type=int, default=1,
                        help="training steps per tf.function call (GPUs then wait less on Python); evaluations, "
                        "checkpoints stay exact at loop boundaries; a stop request ends a loop after the current step")
    parser.add_argument("--eval-examples", type=int, help="evaluate on the first N examples (default: all)")
    parser.add_argument("--validation-examples", type=int, default=0, metavar="N",
                        help="fashion_mnist: hold the last N training examples out as the validation set the "
                        "evaluations read; the test set is then read once, at the end, with the weights of the "
                        "best validation accuracy (finished.json) (default 0: evaluate on the test set)")
    parser.add_argument("--plateau-window", type=int, metavar="STEPS",
                        help="stop when the validation accuracy has not improved (by more than "
                        "--plateau-min-delta) for STEPS steps; --steps is then the cap (recipes/inception_bn/plateau.py)")
    parser.add_argument("--plateau-min-delta", type=float, default=plateau.DEFAULT_MIN_DELTA,
                        help=f"the least gain that counts as an improvement (default {plateau.DEFAULT_MIN_DELTA})")
    parser.add_argument("--warmup-epochs", type=float, default=0.0, help="linear learning-rate warm-up")
    parser.add_argument("--cpu-replicas", type=int, default=1,
                        help="split the CPU into N logical devices, one replica each (no GPUs needed)")
    parser.add_argument("--jit", action="store_true", help="XLA-compile the training step")
    parser.add_argument("--data-service", metavar="grpc://HOST:PORT",
                        help="run the training input's host part on a tf.data service (its dispatcher's "
                        "address; start one with python -m recipes.inception_bn.data_service)")
    parser.add_argument("--recalibrate-steps", type=int, default=0,
                        help="after training, set BN's population statistics exactly from N training batches "
                        "(the paper's Algorithm 2; kerasbn.recalibrate_statistics) before the last evaluation "
                        "and the export (default 0: keep the moving averages)")
    parser.add_argument("--no-export", dest="export", action="store_false", help="skip the SavedModel export")
    parser.add_argument("--stall-timeout", type=float, default=failures.DEFAULT_STALL_TIMEOUT, metavar="SECONDS",
                        help="exit (status 138, retryable) when no training loop, evaluation batch or checkpoint "
                        f"completes for this long (default {failures.DEFAULT_STALL_TIMEOUT:g}: above the first step's "
                        "tracing and a checkpoint; raise it if one loop of --steps-per-loop steps can take "
                        "longer; 0: never)")
    parser.add_argument("--startup-timeout", type=float, default=cluster.DEFAULT_STARTUP_TIMEOUT, metavar="SECONDS",
                        help="with TF_CONFIG: exit (status 138, retryable) when the workers have not all answered "
                        f"each other within this long (default {cluster.DEFAULT_STARTUP_TIMEOUT:g}, torchrun's "
                        "--rdzv-timeout; 0: wait forever); see recipes/inception_bn/cluster.py")
    parser.add_argument("--seed", type=int, default=0,
                        help="initial weights, and the training stream: each epoch's order and every augmentation "
                        "draw (a function of the position in the stream, so a resume continues it exactly)")
    parser.add_argument("--partitions", type=int, metavar="K",
                        help="imagenet2012: read the training files in K canonical partitions, fixed for the run "
                        "(K divides the global batch, the workers divide K; default: the largest divisor of the "
                        "global batch up to 16); see docs/recipes.md")
    parser.add_argument("--deterministic", action="store_true",
                        help="TensorFlow's op determinism: a run stopped and resumed ends with bit-identical weights "
                        "to the uninterrupted run (same machine); not with --data-service")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.recalibrate_steps < 0:
        parser.error("--recalibrate-steps must be at least 0")
    for name in ("batch_size", "eval_every", "cpu_replicas", "steps_per_loop"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be at least 1")
    if not args.stall_timeout >= 0:
        parser.error("--stall-timeout must be at least 0 (0: never)")
    if not args.startup_timeout >= 0:
        parser.error("--startup-timeout must be at least 0 (0: never)")
    if not 0 <= args.bn_momentum < 1:
        parser.error("--bn-momentum must be in [0, 1)")
    if args.width_multiplier <= 0:
        parser.error("--width-multiplier must be positive")
    if args.data_service is not None:
        from recipes.inception_bn.data_service import SERVICE_SOURCES, check_address

        try:
            check_address(args.data_service)
        except ValueError as error:
            parser.error(str(error))
        if args.dataset not in SERVICE_SOURCES:
            parser.error(f"--data-service serves {' and '.join(SERVICE_SOURCES)}; {args.dataset} is held in "
                         "every trainer's memory, there is nothing to offload")
        if args.partitions is not None:
            parser.error("--partitions cannot be combined with --data-service: the service deals the training "
                         "files to whichever of its workers asks next")
        if args.deterministic:
            parser.error("--deterministic cannot be combined with --data-service: the service hands out its "
                         "input to whichever trainer asks first, so the order of the batches is not reproducible")
    if args.deterministic and args.jit:
        parser.error("--deterministic cannot be combined with --jit: TensorFlow has no deterministic XLA "
                     "implementation of MaxPool's gradient, which every variant's network runs; drop one of them")
    if args.validation_examples < 0:
        parser.error("--validation-examples must be at least 0")
    if args.validation_examples and args.dataset != "fashion_mnist":
        parser.error("--validation-examples holds out part of fashion_mnist's training set; "
                     f"{args.dataset} evaluates on its own evaluation split")
    if args.plateau_window is not None and args.plateau_window < 1:
        parser.error("--plateau-window must be at least 1 step")
    if not args.plateau_min_delta >= 0:
        parser.error("--plateau-min-delta must be at least 0")
    if args.partitions is not None and args.dataset != "imagenet2012":
        parser.error(f"--partitions is for imagenet2012's training files; {args.dataset} is read by position")
    return args


# Training ---------------------------------------------------------------------------------------

def l2_penalty(model, weight_decay):
    """``c/2 * sum(w^2)`` over convolution and classifier kernels (not biases, not BN)."""
    kernels = [w for w in model.trainable_weights
               if any(k in w.path for k in ("kernel", "depthwise_kernel", "pointwise_kernel"))]
    return weight_decay * 0.5 * tf.add_n([tf.reduce_sum(tf.square(tf.cast(w, tf.float32))) for w in kernels])


def train(args, stop) -> None:
    """The run, as its outline: set up, restore, train (with evaluations and checkpoints), finish.

    What ends it early is raised as an ``ending.RunEnded`` (refused, interrupted, a lost peer) and
    turned into its exit status and line by :func:`main`; the stall watchdog and the signal thread's
    forced exit end the process through ``ending.end_process``.
    """
    run = Run(args, stop)
    try:
        run.restore()
        run.loop()
        run.finish()
    except tf.errors.OpError as error:
        if not run.lost_peer(error):
            raise
        raise PeerLost(run.lost_peer_message(error)) from None
    finally:
        run.watchdog.stop()


class _StopAgreed(Exception):
    """Every worker agreed to stop: after a training loop, or during an evaluation (whose checkpoint
    is saved; the rerun evaluates it)."""


class Run:
    """One training run: its settings (flags, variant, data, plan), its parts (strategy, model,
    checkpoints, data order, log) and its phases, each a method ``train`` calls in turn."""
    def __init__(self, args, stop):
        self.started = time.time()
        if args.deterministic:  # first: it applies to the kernels created from here on
            tf.config.experimental.enable_op_determinism()
        self.args, self.stop = args, stop
        self.variant = VARIANTS[args.variant]
        self.run_dir = prepare_run_dir(args.run_dir)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        stop.resume_message(self.resume_message)
        # Nothing trained yet, nothing to save: a stop request exits at once, the cluster's start-up included.
        stop.exit_now_when(lambda: f"interrupted before training started; {self.resume_message()}")
        self.strategy = cluster.make_strategy(args.cpu_replicas, args.startup_timeout, self.resume_message)
        self.is_chief, self.task_index, self.own_task = cluster.worker_role(self.strategy)
        self.multi_worker = isinstance(self.strategy, tf.distribute.MultiWorkerMirroredStrategy)
        if self.multi_worker:  # from here every worker stops at the same step (the stop votes)
            stop.exit_now_when(None)
        self.stop_flag = tf.Variable(0, trainable=False, name="stop_requested")  # this worker's, not mirrored
        stop.bind(self.stop_flag)
        if args.mixed_precision:
            on_gpu = bool(tf.config.list_physical_devices("GPU"))
            keras.mixed_precision.set_global_policy("mixed_float16" if on_gpu else "mixed_bfloat16")
        keras.utils.set_random_seed(args.seed)
        self.source = load_data(args)
        self.plan = RunPlan(args, self.variant, self.source, self.strategy.num_replicas_in_sync)
        try:
            self.order = order.DataOrder(self.source, args.seed, self.plan.global_batch, self.plan.replicas,
                                         cluster.input_pipelines(self.strategy))
        except ValueError as error:  # partitions the run's pipelines cannot share
            raise Refused(str(error)) from None
        self.model, self.optimizer, self.schedule = build_model(self.variant, self.source, self.plan, args,
                                                                self.strategy)
        self.checkpoints = Checkpoints(
            tf.train.Checkpoint(model=self.model, optimizer=self.optimizer), self.run_dir, self.is_chief,
            self.task_index, barrier=make_agreement(self.strategy, self.stop_flag) if self.multi_worker else None)
        self.step = int(self.optimizer.iterations.numpy())
        self.watchdog = failures.StallWatchdog(args.stall_timeout, self.run_dir, self.own_task, self.resume_message)

    def resume_message(self) -> str:
        return resume_message(self.checkpoint_dir)

    # Restore ----------------------------------------------------------------------------------------
    def restore(self) -> None:
        """Every worker at the step the checkpoint holds, on the stream it was trained on; the log
        and the settings written; the input pipelines and the step functions made."""
        start_step, latest = self.step, self.checkpoints.latest
        if self.multi_worker and self.plan.replicas > 1:
            cluster.check_same_step(self.strategy, start_step)
        try:
            self.order.check_resume(self.run_dir, resuming=bool(latest), record=self.is_chief)
        except order.StreamMismatch as error:
            raise Refused(str(error)) from None
        self.log = RunLog(self.run_dir, self.is_chief, self.plan.total_steps, self.plan.steps_per_epoch,
                          self.args.quiet, resumed_at=start_step if latest else None)
        # Where the run stopped improving (--plateau-window), or None: it changes only with a new evaluation.
        self.plateau_at = self.plan.plateau_step(self.log.history)
        self.announce(start_step, latest)
        if self.is_chief:
            self.write_settings()
        self.train_data = self.strategy.distribute_datasets_from_function(
            lambda context: self.training_input(context, start_step))

        # The device's share of the input pipeline runs inside the step (recipes/inception_bn/data.py).
        def prepare(images, factors):
            return network_input(images, factors, self.variant.distortion, self.model.compute_dtype)

        self.train_loop = make_train_loop(self.strategy, self.model, self.optimizer, self.variant.weight_decay,
                                          self.plan, self.args.jit, self.stop_flag, prepare)
        self.evaluate = make_evaluate(self.strategy, self.model, self.source, self.args.eval_examples,
                                      self.stop_flag,
                                      on_batch=lambda: self.watchdog.progress(f"the evaluation at step {self.step}"))

    def training_input(self, input_context, start_step):
        """This worker's training batches: local, or from the tf.data service (which shards)."""
        per_replica = input_context.get_per_replica_batch_size(self.plan.global_batch)
        if self.args.data_service is None:
            return self.order.local_input(input_context, per_replica, self.variant.distortion, start_step)
        from recipes.inception_bn import data_service

        # One pipeline for every trainer: the same stream positions from the same step, dealt to the
        # trainers in the order they ask (dynamic sharding; not reproducible).
        return data_service.distribute(self.order.service_input(per_replica, self.variant.distortion, start_step),
                                       self.args.data_service, data_service.job_name(self.run_dir, start_step))

    # The loop ---------------------------------------------------------------------------------------
    def loop(self) -> None:
        """Train until ``--steps`` or the plateau: an evaluation and a checkpoint at every boundary,
        a stop request saved at the step every worker agreed on."""
        self.stop.exit_now_when(None)  # from here a stop saves first
        self.watchdog.start(f"the first training loop from step {self.step} (tracing it first)")
        try:
            if self.checkpoints.latest and self.plan.evaluation_due(self.step) and self.log.last_step != self.step:
                # Stopped between the checkpoint and its evaluation: evaluate now, so no row is missing.
                self.record_evaluation(trained=None)
            iterator, meter = iter(self.train_data), TrainMeter()
            while self.step < self.plan.total_steps and self.plateau_at is None:
                stop_votes = self.train_steps(iterator, meter)
                if stop_votes > 0:  # every worker ended its loop after this same step
                    raise _StopAgreed
                if self.plan.evaluation_due(self.step):
                    self.watchdog.progress(f"the checkpoint of step {self.step}")
                    self.checkpoints.save(self.step)  # first: a stop during the evaluation then loses no training
                    self.record_evaluation(trained=meter.take())
                    meter.restart_clock()  # images/s counts training time only
        except _StopAgreed:
            self.watchdog.progress(f"the checkpoint of step {self.step} (stopping)")
            raise Interrupted(self.checkpoints.save_for_stop(self.step)) from None
        finally:
            self.checkpoints.close()
        if not self.multi_worker:
            self.stop.exit_now_when(
                lambda: f"interrupted after training, at step {self.step}; {self.resume_message()}")

    def train_steps(self, iterator, meter) -> float:
        """Steps to the next boundary (evaluation, end) in one call; returns the stop votes."""
        loops = self.plan.steps_to_next_boundary(self.step)
        self.watchdog.progress(f"training steps {self.step + 1}-{self.step + loops}"
                               + (f" (input from the tf.data service {self.args.data_service})"
                                  if self.args.data_service else ""))
        steps_done, loss_sum, correct_sum, stop_votes = self.train_loop(iterator, tf.constant(loops))
        self.step += int(steps_done)
        learning_rate = float(self.schedule(self.step))
        meter.add(float(loss_sum), float(correct_sum), int(steps_done) * self.plan.global_batch)
        self.stop_if_diverged(meter, learning_rate)
        self.log.progress(self.step, meter.loss, meter.accuracy, learning_rate)
        return float(stop_votes)

    def record_evaluation(self, trained) -> None:
        """Evaluates (a stop request abandons it on every worker), logs, and keeps the best weights."""
        self.watchdog.progress(f"the evaluation at step {self.step}")
        result = self.evaluate(stoppable=True)
        if result is None:
            raise _StopAgreed
        self.log.record(self.step, float(self.schedule(self.step)), result, train=trained)
        self.plateau_at = self.plan.plateau_step(self.log.history)
        self.keep_if_best()

    def stop_if_diverged(self, meter, learning_rate) -> None:
        if meter.loss_sum == meter.loss_sum and abs(meter.loss_sum) != float("inf"):
            return
        if self.is_chief:
            (self.run_dir / DIVERGED).write_text(json.dumps({"step": self.step, "loss": str(meter.loss)}))
        raise Refused(f"the training loss became {meter.loss} at step {self.step}: the learning rate "
                      f"({learning_rate:.3g}) is too high for this network (diverged). "
                      f"The last good checkpoint is in {self.checkpoints.directory}.")

    def keep_if_best(self) -> None:
        """With a validation split, the chief keeps the weights of the best evaluation so far (the
        one ``plateau.chosen`` picks): the ones the test set reads at the end."""
        if not self.is_chief or self.source.test is None:
            return
        step, _ = plateau.chosen(*plateau.from_history(self.log.history))
        if step == self.log.last_step:
            self.model.save_weights(self.run_dir / BEST_WEIGHTS)
            atomic_write(self.run_dir / BEST_STEP, json.dumps({"step": step}))

    # The end ----------------------------------------------------------------------------------------
    def finish(self) -> None:
        """The test set with the chosen weights (with a validation split), population statistics
        (Algorithm 2) if asked, the serving export, and the summary line."""
        self.watchdog.progress("the end of the run (test, recalibration, export)")
        tested = self.test_chosen_weights() if self.source.test else {}
        if self.is_chief:
            reason = "steps" if self.plateau_at is None else "plateau"
            atomic_write(self.run_dir / FINISHED,
                         json.dumps({"step": self.step, "reason": reason, **tested}, indent=1))
        args, log = self.args, self.log
        recalibrated = bool(args.recalibrate_steps and self.variant.batch_norm)
        if recalibrated:
            before = self.evaluate()[1]
            with self.strategy.scope():
                # Batched globally, as tf.distribute expects: every replica sees --batch-size images.
                batches = self.source.train(self.plan.global_batch, self.variant.distortion, args.seed + 1).map(
                    lambda images, factors, labels: (network_input(images, factors, self.variant.distortion),
                                                     labels))
                kerasbn.recalibrate_statistics(self.model, batches, steps=args.recalibrate_steps, verbose=0)
            after = self.evaluate()[1]
            log.say(f"Population statistics from {args.recalibrate_steps} training batches (Algorithm 2): "
                    f"eval accuracy {after:.4f} (moving averages: {before:.4f})")
            if log.is_chief:
                atomic_write(self.run_dir / "recalibrated.json", json.dumps(
                    {"step": self.step, "batches": args.recalibrate_steps, "eval_accuracy": after,
                     "eval_accuracy_moving_averages": before}))
        if args.export and log.is_chief:
            export_dir = self.run_dir / "export"
            exported = kerasbn.export_for_serving(self.model, export_dir)
            left = sum(isinstance(layer, kerasbn.BatchNormalization) for layer in exported.layers)
            log.say(f"SavedModel (BN folded, {left} BN layers left) in {export_dir}")
        if log.history:
            final = after if recalibrated else float(log.history[-1]["eval_accuracy"])
            log.say(f"Done: step {log.history[-1]['step']}, eval accuracy {final:.4f}"
                    f"{' (population statistics)' if recalibrated else ''}; "
                    f"history in {log.history_path}, TensorBoard logs in {log.logs_dir}")

    def test_chosen_weights(self) -> dict:
        """With a validation split: the test set's accuracy with the weights of the best validation
        accuracy (this run's kept ones; the last weights, said so, when a resume lost them)."""
        chosen_step, validation_accuracy = plateau.chosen(*plateau.from_history(self.log.history))
        kept = self.run_dir / BEST_STEP
        tested_step = self.step
        if kept.exists() and json.loads(kept.read_text())["step"] == chosen_step:
            self.model.load_weights(self.run_dir / BEST_WEIGHTS)
            tested_step = chosen_step
        _, test_accuracy, test_top5 = make_evaluate(self.strategy, self.model, self.source, None, self.stop_flag,
                                                    split="test")()
        self.log.say(f"Test accuracy {test_accuracy:.4f} with the weights of step {tested_step} "
                     f"(best validation accuracy {validation_accuracy:.4f} at step {chosen_step})")
        return {"chosen_step": chosen_step, "validation_accuracy": validation_accuracy,
                "tested_step": tested_step, "test_accuracy": test_accuracy, "test_top5": test_top5}

    # Lost peers -------------------------------------------------------------------------------------
    def lost_peer(self, error) -> bool:
        return self.multi_worker and failures.lost_peer(error)

    def lost_peer_message(self, error) -> str:
        cluster = self.strategy.cluster_resolver.cluster_spec().as_dict()
        addresses = {address: f"{job} {index}" for job, tasks in cluster.items()
                     for index, address in enumerate(tasks)}
        return failures.lost_peer_message(error, self.run_dir, self.own_task, self.step, self.resume_message(),
                                          addresses, leader="chief 0" if "chief" in cluster else "worker 0",
                                          since=self.started)

    # What the run says ----------------------------------------------------------------------------
    def announce(self, start_step, latest) -> None:
        log, plan, variant, schedule = self.log, self.plan, self.variant, self.schedule
        if self.plateau_at is not None and latest:
            log.say(f"{self.run_dir}: already stopped improving at step {self.plateau_at} "
                    f"(--plateau-window {plan.plateau_window}); finishing.")
        elif start_step >= plan.total_steps and latest:
            log.say(f"{self.run_dir}: already trained {start_step} of {plan.total_steps} steps; exporting.")
        elif latest:
            log.say(f"Resuming {self.run_dir} from step {start_step} of {plan.total_steps} ({latest}).")
        log.say(f"{variant.name}: {variant.description}")
        log.say(f"{self.model.count_params() / 1e6:.2f}M weights; {self.source.name} {self.source.image_shape}, "
                f"{self.source.num_classes} classes; {plan.replicas} replica(s) x batch "
                f"{plan.global_batch // plan.replicas} = {plan.global_batch}"
                f"{', synchronized BN' if plan.synchronized and variant.batch_norm else ''}; "
                f"lr {schedule.initial_learning_rate:g} decaying x{variant.decay_rate} every "
                f"{schedule.decay_steps:.0f} steps; {plan.total_steps} steps "
                f"({plan.total_steps / plan.steps_per_epoch:.2f} epochs)")

    def write_settings(self) -> None:
        plan, variant = self.plan, self.variant
        settings = {"variant": variant.name, "dataset": self.source.name, "num_classes": self.source.num_classes,
                    "replicas": plan.replicas, "global_batch": plan.global_batch,
                    "synchronized_bn": bool(plan.synchronized and variant.batch_norm),
                    "initial_learning_rate": float(self.schedule.initial_learning_rate),
                    "decay_rate": float(variant.decay_rate), "decay_steps": float(self.schedule.decay_steps),
                    "steps": plan.total_steps, "arguments": vars(self.args)}
        atomic_write(self.run_dir / "run.json", json.dumps(settings, indent=1, default=str))


# Set-up -----------------------------------------------------------------------------------------

def prepare_run_dir(path) -> Path:
    run_dir = Path(path).expanduser()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as error:
        raise Refused(f"--run-dir {run_dir} cannot be written: {error.strerror or error}") from None
    return run_dir


def load_data(args):
    from recipes.fashion_mnist import DatasetNotFoundError
    from recipes.inception_bn.data import DataNotFoundError, load_source

    try:
        return load_source(args.dataset, args.data_dir, args.image_size, args.prepared_dir, args.partitions,
                           args.validation_examples)
    except (DataNotFoundError, DatasetNotFoundError, ValueError) as error:
        raise Refused(str(error)) from None


class RunPlan:
    """Batch sizes, the step count, and where training loops stop (evaluations, the end)."""
    def __init__(self, args, variant, source, replicas: int):
        self.replicas = replicas
        self.synchronized = replicas > 1 if args.sync_bn is None else args.sync_bn
        self.global_batch = args.batch_size * replicas
        self.steps_per_epoch = source.train_examples / self.global_batch
        self.total_steps = args.steps or int(round(30 * self.steps_per_epoch))
        self.eval_every = args.eval_every
        self.steps_per_loop = args.steps_per_loop
        self.plateau_window = args.plateau_window
        self.plateau_min_delta = args.plateau_min_delta

    def plateau_step(self, history) -> int | None:
        """The evaluation at which the run stopped improving (``--plateau-window``), or None."""
        if self.plateau_window is None:
            return None
        return plateau.stopping_step(*plateau.from_history(history), self.plateau_window, self.plateau_min_delta)

    def evaluation_due(self, step: int) -> bool:
        return step % self.eval_every == 0 or step == self.total_steps

    def steps_to_next_boundary(self, step: int) -> int:
        next_evaluation = (step // self.eval_every + 1) * self.eval_every
        return min(self.steps_per_loop, next_evaluation - step, self.total_steps - step)


def build_model(variant, source, plan, args, strategy):

    with strategy.scope():
        model = variant.build_model(source.num_classes, source.image_shape, args.width_multiplier,
                                    plan.synchronized, args.bn_momentum)
        schedule = variant.schedule(plan.global_batch, source.train_examples, args.warmup_epochs)
        optimizer = keras.optimizers.SGD(schedule, momentum=variant.momentum)
        if keras.mixed_precision.global_policy().name == "mixed_float16":
            optimizer = keras.mixed_precision.LossScaleOptimizer(optimizer)
        optimizer.build(model.trainable_variables)
    return model, optimizer, schedule


# Steps ------------------------------------------------------------------------------------------

def train_replica(model, optimizer, loss_fn, weight_decay, global_batch, replicas, images, labels):
    """One replica's share of a training step; returns its summed loss and correct count."""
    with tf.GradientTape() as tape:
        logits = tf.cast(model(images, training=True), tf.float32)
        per_example = loss_fn(labels, logits)
        # Mean over the global batch; the L2 term once over all replicas.
        loss = tf.reduce_sum(per_example) / global_batch + l2_penalty(model, weight_decay) / replicas
        scaled = optimizer.scale_loss(loss) if hasattr(optimizer, "scale_loss") else loss
    gradients = tape.gradient(scaled, model.trainable_variables)
    optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))
    correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels), tf.float32))
    return tf.reduce_sum(per_example), correct


def make_train_loop(strategy, model, optimizer, weight_decay, plan, jit, stop_flag=None, prepare=None):
    """``loop(iterator, n)``: up to n training steps in one tf.function call.

    The iterator yields ``(images, labels)``, or ``(images, factors, labels)`` that
    ``prepare(images, factors)`` turns into the network's input inside the step.

    Returns the steps run, the summed loss and correct count, and the stop votes: the loop
    ends early, after the same step on every worker, once any worker's ``stop_flag`` is set
    (read each step and summed with the loss, in the step's one all-reduce). A call of one step
    runs the step's function alone: a while loop around it makes the first call (tracing and
    graph optimization) markedly slower (CHANGELOG 0.5.0).
    """
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
    if stop_flag is None:
        stop_flag = tf.Variable(0, trainable=False)

    def step(*batch):
        images, labels = (prepare(*batch[:-1]) if prepare else batch[0]), batch[-1]
        loss, correct = train_replica(model, optimizer, loss_fn, weight_decay, plan.global_batch, plan.replicas,
                                      images, labels)
        return tf.stack([loss, correct, tf.cast(stop_flag.read_value(), tf.float32)])

    @tf.function(jit_compile=jit or None, autograph=False)
    def one_step(batch):
        return strategy.reduce("SUM", strategy.run(step, args=batch), axis=None)

    # An explicit while loop, not AutoGraph: tracing then never depends on reading this file's source.
    @tf.function(autograph=False)
    def loop(iterator, steps):
        def body(i, totals):
            return i + 1, totals + one_step(next(iterator))

        i, totals = tf.while_loop(lambda i, totals: (i < steps) & (totals[2] == 0.0), body,
                                  (tf.constant(0), tf.zeros([3])))
        return i, totals[0], totals[1], totals[2]

    def run(iterator, steps):
        if int(steps) != 1:
            return loop(iterator, steps)
        # One step (--steps-per-loop 1, the default): no while loop around it, see the docstring.
        totals = one_step(next(iterator))
        return tf.constant(1), totals[0], totals[1], totals[2]

    return run


def make_evaluate(strategy, model, source, eval_examples, stop_flag, batch_size=256, on_batch=None,
                  split="eval"):
    """``evaluate(stoppable=False)``: loss, top-1 and top-5 accuracy on the evaluation set
    (``split="test"``: on the test set held apart from a validation split).

    Every replica of every worker evaluates its share of the first ``eval_examples`` examples
    (all when None), ``batch_size`` at a time, and the sums (loss, top-1, top-5, count) are
    all-reduced: each example is counted exactly once, the last partial batch and replicas left
    without examples included. Each pipeline's share is followed by weight-0 padding, so every
    replica always has a full batch (one shape: one trace), and the evaluation ends at the first
    step where no replica had a real example. The step's all-reduce also carries the stop votes:
    with ``stoppable``, a stop request abandons the evaluation (returns None) on every worker at the
    same batch. ``on_batch()`` is called after each step (the stall watchdog's progress).
    """
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
    k = min(5, source.num_classes)
    total = source.eval_examples if split == "eval" else source.test_examples
    limit = None if eval_examples is None else min(eval_examples, total)
    padding = tf.data.Dataset.from_tensors((tf.zeros(source.image_shape, tf.uint8), tf.constant(0), 0.0)).repeat()

    def dataset_fn(input_context):
        examples = getattr(source, split)(limit, input_context).map(lambda image, label: (image, label, 1.0))
        per_replica = input_context.get_per_replica_batch_size(batch_size * input_context.num_replicas_in_sync)
        return examples.concatenate(padding).batch(per_replica, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

    data = strategy.distribute_datasets_from_function(dataset_fn)

    def replica_sums(images, labels, weights):
        logits = tf.cast(model(network_input(images, dtype=model.compute_dtype), training=False), tf.float32)
        top5 = tf.cast(tf.nn.in_top_k(labels, logits, k), tf.float32)
        top1 = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels), tf.float32)
        sums = [tf.reduce_sum(weights * t) for t in (loss_fn(labels, logits), top1, top5, weights)]
        return tf.stack([*sums, tf.cast(stop_flag.read_value(), tf.float32)])

    @tf.function(autograph=False)
    def eval_step(iterator):
        return strategy.reduce("SUM", strategy.run(replica_sums, args=next(iterator)), axis=None)

    def evaluate(stoppable=False):
        totals = np.zeros(4)
        iterator = iter(data)
        while True:
            *sums, stop_votes = eval_step(iterator).numpy()
            if on_batch is not None:
                on_batch()
            if stoppable and stop_votes > 0:
                return None
            if sums[3] == 0:  # only padding left, on every replica
                break
            totals += sums
        loss, top1, top5, count = totals
        return loss / max(count, 1), top1 / max(count, 1), top5 / max(count, 1)

    return evaluate


class TrainMeter:
    """Training loss and accuracy since the last evaluation, and the images/s."""
    def __init__(self):
        self._reset()

    def _reset(self):
        self.loss_sum, self.correct_sum, self.seen = 0.0, 0.0, 0
        self.restart_clock()

    def restart_clock(self) -> None:
        self.clock = time.perf_counter()

    def add(self, loss_sum: float, correct_sum: float, images: int) -> None:
        self.loss_sum, self.correct_sum, self.seen = self.loss_sum + loss_sum, self.correct_sum + correct_sum, \
            self.seen + images

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.seen, 1)

    @property
    def accuracy(self) -> float:
        return self.correct_sum / max(self.seen, 1)

    def take(self) -> dict:
        seconds = time.perf_counter() - self.clock
        values = {"loss": self.loss, "accuracy": self.accuracy, "images_per_second": self.seen / seconds,
                  "seconds": seconds}
        self._reset()
        return values


BEST_WEIGHTS, BEST_STEP, FINISHED = "best.weights.h5", "best.json", "finished.json"


# The end ----------------------------------------------------------------------------------------

def main(argv=None) -> int:
    from recipes.inception_bn.stopping import StopRequest
    from recipes.requirements import require_recipe_extra

    require_recipe_extra()
    args = parse_args(argv)
    with StopRequest() as stop:
        return ending.main(lambda: train(args, stop))


if __name__ == "__main__":
    sys.exit(main())
