"""A run's plan: its batch sizes, its step count, and where its training loops stop (evaluations,
the end, the plateau), read from the command line once."""

from __future__ import annotations

from recipes.inception_bn import plateau


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
        self.plateau = plateau.Rule(args.plateau_window, args.plateau_min_delta)

    def evaluation_due(self, step: int) -> bool:
        return step % self.eval_every == 0 or step == self.total_steps

    def steps_to_next_boundary(self, step: int) -> int:
        next_evaluation = (step // self.eval_every + 1) * self.eval_every
        return min(self.steps_per_loop, next_evaluation - step, self.total_steps - step)
