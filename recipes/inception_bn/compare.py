"""Train several variants on the same data and compare them like the paper's Figure 2 and table.

    python -m recipes.inception_bn.compare --dataset fashion_mnist --run-dir runs/compare \\
        --width-multiplier 0.25 --steps 1500

Each variant trains in its own process (``train.py``, so each is resumable)
into ``RUN_DIR/<variant>``, ``--jobs`` of them at a time; then ``RUN_DIR/compare.png`` plots evaluation
accuracy against training steps, one line per variant, and
``RUN_DIR/compare.md`` gives the paper's table: steps for each variant to
reach the no-BN baseline's best accuracy, the best accuracy, the speed-up,
and how long each run stalled (its last evaluation below twice chance).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from recipes.inception_bn import ending, processes
from recipes.inception_bn.data import SOURCES
from recipes.inception_bn.history import read_history
from recipes.inception_bn.run_files import RunFiles
from recipes.inception_bn.variants import PAPER_VARIANTS, VARIANTS, get_variant
from recipes.plots import saved_figure

BASELINE = "inception"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m recipes.inception_bn.compare",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(PAPER_VARIANTS),
                        help=f"comma-separated, the first is the baseline (default: {','.join(PAPER_VARIANTS)}; "
                        f"all: {','.join(VARIANTS)})")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--dataset", default="fashion_mnist", choices=SOURCES)
    parser.add_argument("--title", default=None, help="plot title")
    parser.add_argument("--jobs", type=int, default=1,
                        help="variants trained at once, each on its share of the cores (default 1; with more, "
                        "each variant's output goes to RUN_DIR/<variant>/train.log)")
    args, train_args = parser.parse_known_args(argv)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    try:
        for name in names:
            get_variant(name)
    except ValueError as error:
        parser.error(str(error))
    if not names:
        parser.error("--variants is empty")
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    for flag in ("--variant", "--run-dir", "--dataset"):
        if any(a == flag or a.startswith(flag + "=") for a in train_args):
            parser.error(f"{flag} is set per variant by compare")
    return args, names, train_args


def run_variant(name, run_dir: Path, dataset, train_args, log_path: Path | None = None, env=None,
                module="recipes.inception_bn.train") -> dict:
    """Trains one variant in a fresh process (``python -m module``), its output to the console or
    appended to ``log_path``; returns its outcome (``failed``: the exit status of a run that
    neither finished nor diverged, else None)."""
    command = [sys.executable, "-m", module, "--variant", name, "--dataset", dataset,
               "--run-dir", str(run_dir / name), "--quiet", "--no-export", *train_args]
    start = time.perf_counter()
    if log_path is None:
        returncode = processes.RUNS.run(name, command, env=env)
    else:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a") as log:
            returncode = processes.RUNS.run(name, command, stdout=log, stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - start
    if returncode in processes.INTERRUPTED:
        raise processes.RunInterrupted(f"{name} was interrupted ({run_dir / name})")
    diverged = RunFiles(run_dir / name).diverged
    failed = returncode if returncode != 0 and not diverged.exists() else None
    return {"seconds": seconds, "diverged": json.loads(diverged.read_text()) if diverged.exists() else None,
            "failed": failed}


def run_variants(names, run_dir: Path, dataset, train_args, jobs: int) -> dict:
    """Trains every variant, ``jobs`` at a time; returns their outcomes or exits naming a failure."""
    if jobs == 1:
        outcomes = {}
        for name in names:
            print(f"\n== {name}: {VARIANTS[name].description}", flush=True)
            outcomes[name] = run_variant(name, run_dir, dataset, train_args)
            if outcomes[name]["failed"] is not None:
                raise SystemExit(f"error: {name} failed (exit {outcomes[name]['failed']}); rerun to resume it")
        return outcomes

    env = thread_environment(jobs)

    def run(name):
        log_path = RunFiles(run_dir / name).console
        print(f"== {name}: {VARIANTS[name].description}; output in {log_path}", flush=True)
        outcome = run_variant(name, run_dir, dataset, train_args, log_path, env)
        done = [line for line in log_path.read_text().splitlines() if line.startswith("Done:")]
        status = "failed" if outcome["failed"] is not None else "diverged" if outcome["diverged"] else "finished"
        print(f"== {name}: {status} in {outcome['seconds']:.0f} s{'; ' + done[-1] if done else ''}", flush=True)
        return outcome

    outcomes = dict(zip(names, processes.in_parallel(run, names, jobs), strict=True))
    failed = [f"{name} (exit {o['failed']}; its output: {RunFiles(run_dir / name).console})"
              for name, o in outcomes.items() if o["failed"] is not None]
    if failed:
        raise SystemExit(f"error: {', '.join(failed)} failed; rerun to resume")
    return outcomes


def thread_environment(jobs: int) -> dict:
    """The environment of ``jobs`` runs at once: each gets its share of the cores (TensorFlow reads
    TF_NUM_INTRAOP_THREADS): small networks gain little or lose from threads within an op
    (benchmarks/bench_threads.py), and the runs' start-ups overlap."""
    env = dict(os.environ)
    env.setdefault("TF_NUM_INTRAOP_THREADS", str(max(1, usable_cores() // jobs)))
    return env


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def steps_to_reach(history, target):
    for row in history:
        if float(row["eval_accuracy"]) >= target:
            return int(row["step"])
    return None


def last_step_at_chance(history, num_classes):
    """The last evaluation step whose accuracy is below twice chance (``2 / num_classes``): how long
    a run stalled. None when no evaluation was that low."""
    low = [int(row["step"]) for row in history if float(row["eval_accuracy"]) < 2 / num_classes]
    return low[-1] if low else None


def run_settings(variant_dir: Path) -> dict:
    """train.py's run.json (empty when the run wrote none)."""
    path = RunFiles(variant_dir).settings
    return json.loads(path.read_text()) if path.exists() else {}


def initial_learning_rate(settings: dict, history) -> float:
    """The run's initial learning rate from run.json (the history starts at the first evaluation)."""
    if "initial_learning_rate" in settings:
        return float(settings["initial_learning_rate"])
    return float(history[0]["learning_rate"]) if history else float("nan")


def summarize(run_dir: Path, names, outcomes) -> tuple[str, dict]:
    """The markdown table and the per-variant histories."""
    histories = {name: read_history(RunFiles(run_dir / name).history) for name in names}
    baseline = names[0]
    if not histories[baseline]:
        raise SystemExit(f"error: the baseline {baseline} has no evaluations")
    best_row = max(histories[baseline], key=lambda r: float(r["eval_accuracy"]))
    target, baseline_steps = float(best_row["eval_accuracy"]), int(best_row["step"])
    last_step = int(histories[baseline][-1]["step"])
    lines = [f"Target: {baseline}'s best evaluation accuracy within this comparison's budget ({last_step} steps), "
             f"{target:.4f}, reached at step {baseline_steps}. It is the best within the budget, not {baseline} "
             "trained to its plateau: the speed-ups measure the budget as much as BN (`make reproduce` trains "
             "every network until it stops improving).", "",
             "| variant | initial lr | steps to reach target | best accuracy | speed-up | at chance until step | note |",
             "|---|---|---|---|---|---|---|"]
    for name in names:
        history = histories[name]
        outcome = outcomes.get(name, {})
        settings = run_settings(run_dir / name)
        lr = initial_learning_rate(settings, history)
        stalled = last_step_at_chance(history, settings["num_classes"]) if "num_classes" in settings else None
        reach = steps_to_reach(history, target)
        best = max((float(r["eval_accuracy"]) for r in history), default=float("nan"))
        note = ""
        if outcome.get("diverged"):
            note = f"diverged at step {outcome['diverged']['step']} (loss {outcome['diverged']['loss']})"
        elif reach is None and history:
            last = int(history[-1]["step"])
            note = f"never reached the target in {last} steps"
        speedup = f"{baseline_steps / reach:.1f}x" if reach else "-"
        lines.append(f"| {name} | {lr:.4g} | {reach if reach else '-'} | {best:.4f} | {speedup} | "
                     f"{stalled if stalled else '-'} | {note} |")
    return "\n".join(lines) + "\n", histories


def plot(path: Path, histories, title):
    with saved_figure(path, figsize=(7, 4.5)) as ax:
        for name, history in histories.items():
            if history:
                ax.plot([int(r["step"]) for r in history], [float(r["eval_accuracy"]) for r in history],
                        marker=".", label=name)
        ax.set(xlabel="training steps", ylabel="evaluation accuracy", title=title)
        ax.grid(alpha=0.3)
        ax.legend()


def main(argv=None) -> int:
    from recipes.requirements import require_recipe_extra

    require_recipe_extra()
    args, names, train_args = parse_args(argv)
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        outcomes = processes.exclusively(
            run_dir, lambda: run_variants(names, run_dir, args.dataset, train_args, args.jobs))
    except ending.RunEnded as ended:
        print(ended.line(), file=sys.stderr)
        return ended.status
    table, histories = summarize(run_dir, names, outcomes)
    (run_dir / "compare.md").write_text(table)
    plot(run_dir / "compare.png", histories, args.title or f"BN-Inception variants on {args.dataset}")
    print("\n" + table)
    print(f"Table: {run_dir / 'compare.md'}; plot: {run_dir / 'compare.png'}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
