"""One training run: its settings, its parts and its phases (``train`` calls them in turn).

A :class:`Run` is whole when constructed - strategy (the cluster formed), data, model, the checkpoint
restored, the data order checked, the log, the compiled steps; then ``begin`` (every worker at the
same step), ``loop`` (train to each boundary, checkpoint, evaluate) and ``finish`` (test, recalibrate,
export).
"""

from __future__ import annotations

import json
import time

import keras
import tensorflow as tf

import kerasbn
from kerasbn._files import atomic_write
from recipes.fashion_mnist import DatasetNotFoundError
from recipes.inception_bn import cluster, failures, order, plateau
from recipes.inception_bn.checkpoints import Checkpoints, resume_message
from recipes.inception_bn.data import DataNotFoundError, load_source
from recipes.inception_bn.ending import Interrupted, Refused
from recipes.inception_bn.plan import RunPlan
from recipes.inception_bn.run_files import RunFiles
from recipes.inception_bn.run_log import RunLog
from recipes.inception_bn.steps import (
    EvalSet,
    Objective,
    TrainMeter,
    make_evaluate,
    make_train_loop,
    network_input,
)
from recipes.inception_bn.stopping import make_agreement
from recipes.inception_bn.variants import VARIANTS


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
        try:
            self.files = RunFiles.prepare(args.run_dir)
        except OSError as error:
            raise Refused(f"--run-dir {args.run_dir} cannot be written: {error.strerror or error}") from None
        stop.resume_message(self.resume_message)
        # Nothing trained yet, nothing to save: a stop request exits at once, the cluster's start-up included.
        stop.exit_now_when(lambda: f"interrupted before training started; {self.resume_message()}")
        self.strategy = cluster.make_strategy(args.cpu_replicas, args.startup_timeout, self.resume_message)
        self.is_chief, self.task_index, self.own_task, pipelines = cluster.worker_role(self.strategy)
        self.multi_worker = isinstance(self.strategy, tf.distribute.MultiWorkerMirroredStrategy)
        if self.multi_worker:  # from here every worker stops at the same step (the stop votes)
            stop.exit_now_when(None)
        self.stop_flag = tf.Variable(0, trainable=False, name="stop_requested")  # this worker's, not mirrored
        stop.bind(self.stop_flag)
        if args.mixed_precision:
            on_gpu = bool(tf.config.list_physical_devices("GPU"))
            keras.mixed_precision.set_global_policy("mixed_float16" if on_gpu else "mixed_bfloat16")
        keras.utils.set_random_seed(args.seed)
        try:
            self.source = load_source(args.dataset, args.data_dir, args.image_size, args.prepared_dir,
                                      args.partitions, args.validation_examples)
        except (DataNotFoundError, DatasetNotFoundError, ValueError) as error:
            raise Refused(str(error)) from None
        self.plan = RunPlan(args, self.variant, self.source, self.strategy.num_replicas_in_sync)
        try:
            self.order = order.DataOrder(self.source, args.seed, self.plan.global_batch, self.plan.replicas,
                                         pipelines)
        except ValueError as error:  # partitions the run's pipelines cannot share
            raise Refused(str(error)) from None
        self.model, self.optimizer, self.schedule = self.variant.build_for_training(
            self.source, self.plan, args.width_multiplier, args.stem, args.bn_momentum, args.warmup_epochs, self.strategy)
        self.checkpoints = Checkpoints(
            tf.train.Checkpoint(model=self.model, optimizer=self.optimizer), self.files.root, self.is_chief,
            self.task_index, barrier=make_agreement(self.strategy, self.stop_flag) if self.multi_worker else None)
        self.step = self.start_step = int(self.optimizer.iterations.numpy())
        self.resumed_from = self.checkpoints.latest
        self.watchdog = failures.StallWatchdog(args.stall_timeout, self.files.root, self.own_task,
                                               self.resume_message)
        try:  # a resume continues the stream it was trained on
            self.order.check_resume(self.files.root, resuming=bool(self.resumed_from), record=self.is_chief)
        except order.StreamMismatch as error:
            raise Refused(str(error)) from None
        self.log = RunLog(self.files.root, self.is_chief, self.plan.total_steps, self.plan.steps_per_epoch,
                          args.quiet, resumed_at=self.start_step if self.resumed_from else None)
        # Where the run stopped improving (--plateau-window), or None: it changes only with a new evaluation.
        self.plateau_at = self.plan.plateau.stopping_step(self.log.history)
        self.train_data = self.strategy.distribute_datasets_from_function(
            lambda context: self.order.training_input(context, self.variant.distortion, self.start_step,
                                                      args.data_service, self.files.root))

        # The device's share of the input pipeline runs inside the step (recipes/inception_bn/data.py).
        def prepare(images, factors):
            return network_input(images, factors, self.variant.distortion, self.model.compute_dtype)

        # Algorithm 2's batches for --recalibrate-steps (finish), batched globally as tf.distribute
        # expects: every replica sees --batch-size images.
        self.recalibration_batches = None
        if args.recalibrate_steps and self.variant.batch_norm:
            self.recalibration_batches = self.source.train(
                self.plan.global_batch, self.variant.distortion, args.seed + 1).map(
                lambda images, factors, labels: (network_input(images, factors, self.variant.distortion), labels))

        objective = Objective(self.variant.weight_decay, self.plan.global_batch, self.plan.replicas)
        self.train_loop = make_train_loop(self.strategy, self.model, self.optimizer, objective, args.jit,
                                          self.stop_flag, prepare)
        self.evaluate = make_evaluate(self.strategy, self.model, self.source, self.stop_flag,
                                      EvalSet(limit=args.eval_examples),
                                      on_batch=lambda: self.watchdog.progress(f"the evaluation at step {self.step}"))
        # With a validation split, the test set is read once, at the end (test_chosen_weights).
        self.evaluate_test = make_evaluate(self.strategy, self.model, self.source, self.stop_flag,
                                           EvalSet(split="test")) if self.source.test else None

    def resume_message(self) -> str:
        return resume_message(self.files.checkpoints)

    # Begin ------------------------------------------------------------------------------------------
    def begin(self) -> None:
        """The run says what it trains (each worker the step it restored); then every worker at the
        same step (the first collective: a refusal names the steps after each worker's own line)."""
        self.announce()
        if self.is_chief:
            self.write_settings()
        if self.multi_worker and self.plan.replicas > 1:
            cluster.check_same_step(self.strategy, self.start_step)

    # The loop ---------------------------------------------------------------------------------------
    def loop(self) -> None:
        """Train until ``--steps`` or the plateau: an evaluation and a checkpoint at every boundary,
        a stop request saved at the step every worker agreed on."""
        self.stop.exit_now_when(None)  # from here a stop saves first
        self.watchdog.start(f"the first training loop from step {self.step} (tracing it first)")
        try:
            if self.resumed_from and self.plan.evaluation_due(self.step) and self.log.last_step != self.step:
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
        self.plateau_at = self.plan.plateau.stopping_step(self.log.history)
        self.keep_if_best()

    def stop_if_diverged(self, meter, learning_rate) -> None:
        if meter.loss_sum == meter.loss_sum and abs(meter.loss_sum) != float("inf"):
            return
        if self.is_chief:
            self.files.diverged.write_text(json.dumps({"step": self.step, "loss": str(meter.loss)}))
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
            self.model.save_weights(self.files.best_weights)
            atomic_write(self.files.best_step, json.dumps({"step": step}))

    # The end ----------------------------------------------------------------------------------------
    def finish(self) -> None:
        """The test set with the chosen weights (with a validation split), population statistics
        (Algorithm 2) if asked, the serving export, and the summary line."""
        self.watchdog.progress("the end of the run (test, recalibration, export)")
        tested = self.test_chosen_weights() if self.source.test else {}
        args, log = self.args, self.log
        recalibrated = self.recalibration_batches is not None
        if recalibrated:
            before = self.evaluate()[1]
            with self.strategy.scope():
                kerasbn.recalibrate_statistics(self.model, self.recalibration_batches, steps=args.recalibrate_steps,
                                               verbose=0)
            after = self.evaluate()[1]
            log.say(f"Population statistics from {args.recalibrate_steps} training batches (Algorithm 2): "
                    f"eval accuracy {after:.4f} (moving averages: {before:.4f})")
        if self.is_chief:  # the record of the end, once what it records is done
            if recalibrated:
                atomic_write(self.files.recalibrated, json.dumps(
                    {"step": self.step, "batches": args.recalibrate_steps, "eval_accuracy": after,
                     "eval_accuracy_moving_averages": before}))
            reason = "steps" if self.plateau_at is None else "plateau"
            atomic_write(self.files.finished,
                         json.dumps({"step": self.step, "reason": reason, **tested}, indent=1))
        if args.export and log.is_chief:
            export_dir = self.files.export
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
        kept = self.files.best_step
        tested_step = self.step
        if kept.exists() and json.loads(kept.read_text())["step"] == chosen_step:
            self.model.load_weights(self.files.best_weights)
            tested_step = chosen_step
        _, test_accuracy, test_top5 = self.evaluate_test()
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
        resume = self.resume_message()
        return failures.lost_peer_message(error, self.files.root, self.own_task, self.step, resume, addresses,
                                          since=self.started)

    # What the run says ----------------------------------------------------------------------------
    def announce(self) -> None:
        log, plan, variant, schedule = self.log, self.plan, self.variant, self.schedule
        start_step, latest = self.start_step, self.resumed_from
        if self.plateau_at is not None and latest:
            log.say(f"{self.files.root}: already stopped improving at step {self.plateau_at} "
                    f"(--plateau-window {plan.plateau.window}); finishing.")
        elif start_step >= plan.total_steps and latest:
            log.say(f"{self.files.root}: already trained {start_step} of {plan.total_steps} steps; exporting.")
        elif latest:
            log.say(f"Resuming {self.files.root} from step {start_step} of {plan.total_steps} ({latest}).")
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
        atomic_write(self.files.settings, json.dumps(settings, indent=1, default=str))
