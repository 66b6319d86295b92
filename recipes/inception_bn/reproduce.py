"""The paper's Table 2 and Figure 2 on Fashion-MNIST: every network trained to its plateau, over seeds.

    python -m recipes.inception_bn.reproduce [--run-dir runs/reproduce] [--seeds 0,1,2] [--jobs 2]

Each of the paper's five networks trains once per seed (``train.py``, so each run is resumable)
into ``RUN_DIR/seed-S/VARIANT``, until its validation accuracy stops improving
(``--plateau-window`` steps without a gain above ``--plateau-min-delta``; ``--max-steps`` caps
it, and the table says when a run hit the cap). Validation reads ``--validation-examples`` held
out of the training set; the test set is read once per run, with the weights of its best
validation accuracy (``finished.json``). Every network of a seed sees the same data in the same
order. Rerunning continues the unfinished runs; finished ones are not trained again.

Written: ``RUN_DIR/table2.md`` (steps to reach inception's maximum validation accuracy, per seed,
median and range; test accuracy at the chosen weights, mean and spread; the paper's figures beside
them) and ``RUN_DIR/figure2.png`` (validation accuracy against steps, log scale, a band over seeds
per network, inception's maximum as a line).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

from kerasbn._files import atomic_write
from recipes.inception_bn import compare, ending, plateau, processes
from recipes.inception_bn.history import read_history
from recipes.inception_bn.run_files import RunFiles
from recipes.inception_bn.variants import PAPER_VARIANTS, VARIANTS
from recipes.plots import saved_figure

BASELINE = "inception"
# The paper's ImageNet results (Table 2): steps to reach Inception's 72.2%, and maximum accuracy.
PAPER = {"inception": ("31.0M", "72.2%"), "bn-baseline": ("13.3M", "72.7%"), "bn-x5": ("2.1M", "73.0%"),
         "bn-x30": ("2.7M", "74.8%"), "bn-x5-sigmoid": ("-", "69.8%")}
# The network and budget chosen by short measured runs (docs/recipes.md): Fashion-MNIST's own 28 px
# through the small stem (inception stages at 14, 7 and 4), width x0.25, the paper's batch of 32.
BUDGET = {"--image-size": "28", "--stem": "small", "--width-multiplier": "0.25", "--batch-size": "32",
          "--eval-every": "500", "--validation-examples": "5000", "--plateau-window": "3000",
          "--plateau-min-delta": "0.002", "--steps-per-loop": "10"}
DEFAULT_MAX_STEPS = 30000
PROGRESS_SECONDS = 60.0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m recipes.inception_bn.reproduce",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Other flags go to train.py (defaults: "
                                     + " ".join(f"{k} {v}" for k, v in BUDGET.items()) + ").")
    parser.add_argument("--run-dir", default="runs/reproduce")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated (at least 2; default 0,1,2)")
    parser.add_argument("--variants", default=",".join(PAPER_VARIANTS),
                        help=f"comma-separated, the first is the baseline (default: {','.join(PAPER_VARIANTS)})")
    parser.add_argument("--max-steps", type=int, default=DEFAULT_MAX_STEPS,
                        help=f"the cap on every run (default {DEFAULT_MAX_STEPS})")
    parser.add_argument("--jobs", type=int, default=compare.usable_cores(),
                        help="runs trained at once, each on its share of the cores (default: one per core)")
    parser.add_argument("--data-dir", help="the Fashion-MNIST idx files (default: Debian's location)")
    parser.add_argument("--train-module", default="recipes.inception_bn.train", help=argparse.SUPPRESS)
    args, train_args = parser.parse_known_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        parser.error(f"--seeds needs at least two different seeds for a spread, got {args.seeds!r}")
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        parser.error(f"unknown --variants {', '.join(unknown) or '(none)'}; choose among {', '.join(VARIANTS)}")
    if args.max_steps < 1 or args.jobs < 1:
        parser.error("--max-steps and --jobs must be at least 1")
    for flag in ("--variant", "--run-dir", "--dataset", "--seed", "--steps"):
        if any(a == flag or a.startswith(flag + "=") for a in train_args):
            parser.error(f"{flag} is set per run by reproduce")
    given = {a.split("=")[0] for a in train_args if a.startswith("--")}
    defaults = [item for flag, value in BUDGET.items() if flag not in given for item in (flag, value)]
    train_args = [*defaults, *train_args, "--steps", str(args.max_steps)]
    if args.data_dir:
        train_args += ["--data-dir", args.data_dir]
    return args, names, seeds, train_args


# Running -----------------------------------------------------------------------------------------

def run_directory(run_dir: Path, seed: int) -> Path:
    return run_dir / f"seed-{seed}"


def finished(run_dir: Path, name: str, seed: int) -> dict | None:
    path = RunFiles(run_directory(run_dir, seed) / name).finished
    return json.loads(path.read_text()) if path.exists() else None


def run_all(run_dir: Path, names, seeds, train_args, jobs: int, train_module: str) -> None:
    """Trains every (network, seed) not yet finished, ``jobs`` at a time, the baseline's first (the
    longest); reports progress while they run. Exits naming a failed run."""
    pending = [(name, seed) for name in names for seed in seeds if finished(run_dir, name, seed) is None]
    for name in names:
        for seed in seeds:
            done = finished(run_dir, name, seed)
            if done is not None:
                print(f"== {name} seed {seed}: finished at step {done['step']} ({done['reason']}); not retrained",
                      flush=True)
    if not pending:
        return
    env = compare.thread_environment(jobs)
    running: dict = {}
    stop_progress = threading.Event()

    def train(job):
        name, seed = job
        directory = run_directory(run_dir, seed)
        log_path = RunFiles(directory / name).console
        print(f"== {name} seed {seed}: {VARIANTS[name].description}; output in {log_path}", flush=True)
        running[job] = directory / name
        try:
            outcome = compare.run_variant(name, directory, "fashion_mnist", [*train_args, "--seed", str(seed)],
                                          log_path, env, module=train_module)
        finally:
            running.pop(job, None)
        done = finished(run_dir, name, seed)
        if outcome["failed"] is not None or (done is None and not outcome["diverged"]):
            return f"{name} seed {seed} (exit {outcome['failed']}; its output: {log_path})"
        status = (f"diverged at step {outcome['diverged']['step']}" if outcome["diverged"] else
                  f"stopped at step {done['step']} ({done['reason']}), best validation "
                  f"{done.get('validation_accuracy', float('nan')):.4f} at step {done.get('chosen_step')}")
        print(f"== {name} seed {seed}: {status} in {outcome['seconds']:.0f} s", flush=True)
        return None

    def report_progress():
        while not stop_progress.wait(PROGRESS_SECONDS):
            print(f"-- {progress_summary(run_dir, names, seeds, running, jobs)}", flush=True)
            for (name, seed), directory in list(running.items()):
                print(f"   {name} seed {seed}: {progress_line(read_history(RunFiles(directory).history))}",
                      flush=True)

    reporter = threading.Thread(target=report_progress, daemon=True)
    reporter.start()
    try:
        failures = [f for f in processes.in_parallel(train, pending, jobs) if f]
    finally:
        stop_progress.set()
    if failures:
        raise SystemExit(f"error: {', '.join(failures)} failed; rerun to resume")


def progress_line(history) -> str:
    if not history:
        return "starting (tracing the network)"
    step, accuracy = plateau.chosen(*plateau.from_history(history))
    return f"step {history[-1]['step']}, validation {float(history[-1]['eval_accuracy']):.4f}; " \
           f"best {accuracy:.4f} at step {step}"


def training_seconds(history) -> float:
    """The wall time a run has trained (its evaluations included), summed over its resumes."""
    return sum(float(row["wall_seconds"] or 0) for row in history)


RECENT_INTERVALS = 5


def _recent_seconds_per_step(history) -> float | None:
    """A run's pace now: the median wall time per step of its last few evaluation intervals (None
    without one). The median, so that one interval stretched by a pause (the machine suspended, the
    process stopped) does not multiply the estimate."""
    paces = []
    for i in range(max(len(history) - RECENT_INTERVALS, 0), len(history)):
        steps = int(history[i]["step"]) - (int(history[i - 1]["step"]) if i > 0 else 0)
        if history[i]["wall_seconds"] and steps > 0:
            paces.append(float(history[i]["wall_seconds"]) / steps)
    return statistics.median(paces) if paces else None


def progress_summary(run_dir: Path, names, seeds, running, jobs: int) -> str:
    """Runs done of all, and the time left: each unfinished run is expected to train as many steps
    as the finished runs of its network (of any network while none of its own has finished), less
    what it has trained, at the pace the running runs keep now (the finished runs' pace before one
    has a recent evaluation), ``jobs`` at a time. No estimate before a run has finished."""
    done, left, paces = {}, [], []
    for name in names:
        for seed in seeds:
            history = read_history(RunFiles(run_directory(run_dir, seed) / name).history)
            steps = int(history[-1]["step"]) if history else 0
            if finished(run_dir, name, seed) is not None:
                done.setdefault(name, []).append((steps, training_seconds(history)))
            else:
                left.append((name, steps))
                if (name, seed) in running and (pace := _recent_seconds_per_step(history)) is not None:
                    paces.append(pace)
    total = len(names) * len(seeds)
    line = f"{total - len(left)} of {total} runs done, {len(running)} running"
    if not left:
        return line
    if not done:
        return line + "; time left: estimated once a run has finished"
    every = [run for runs in done.values() for run in runs]
    expected = {name: statistics.fmean(steps for steps, _ in done.get(name) or every) for name in names}
    pace = (statistics.fmean(paces) if paces
            else sum(seconds for _, seconds in every) / max(1, sum(steps for steps, _ in every)))
    remaining = [max(expected[name] - trained, 0.0) * pace for name, trained in left]
    seconds = max(sum(remaining) / max(1, jobs), max(remaining))
    return line + f"; about {seconds / 60:.0f} min left"


# Reporting -----------------------------------------------------------------------------------------

def collect(run_dir: Path, names, seeds) -> dict:
    """``{name: {seed: {"history": rows, "finished": finished.json or None, "diverged": ...}}}``."""
    runs = {}
    for name in names:
        runs[name] = {}
        for seed in seeds:
            directory = run_directory(run_dir, seed) / name
            diverged = RunFiles(directory).diverged
            runs[name][seed] = {"history": read_history(RunFiles(directory).history),
                                "finished": finished(run_dir, name, seed),
                                "diverged": json.loads(diverged.read_text()) if diverged.exists() else None}
    return runs


def first_step_reaching(history, target: float) -> int | None:
    for row in history:
        if float(row["eval_accuracy"]) >= target:
            return int(row["step"])
    return None


def _spread(values, fmt) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    middle = statistics.median(values)
    return f"{fmt(middle)} [{fmt(min(values))}-{fmt(max(values))}]" if len(values) > 1 else fmt(middle)


# Student's t, two-sided 95%, by degrees of freedom (a paired comparison over n seeds has n - 1).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def paired(differences) -> dict:
    """The mean of per-seed differences, its 95% interval (Student's t over the seeds) and whether
    the seeds resolve it: the interval excludes zero."""
    n = len(differences)
    mean = statistics.fmean(differences)
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "resolved": False}
    half = _T95.get(n - 1, 1.96) * statistics.stdev(differences) / n ** 0.5
    return {"mean": mean, "low": mean - half, "high": mean + half, "resolved": not mean - half <= 0 <= mean + half}


def paired_table(numbers: dict, baseline: str) -> list[str]:
    """Each network against the baseline seed by seed (same data order per seed): test accuracy
    differences with their 95% interval, and in how many seeds it reached the baseline's maximum sooner."""
    lines = [f"Paired by seed against {baseline} (each seed: same initial-weight seed, same data in the same "
             "order). Test accuracy difference = network - baseline; the interval is Student's t over the "
             "seeds' differences; *resolved* when it excludes zero.", "",
             "| network | test accuracy difference per seed | mean [95% interval] | resolved | "
             f"reached {baseline}'s maximum sooner than {baseline} itself |", "|---|---|---|---|---|"]
    base = numbers[baseline]["per_seed"]
    for name, entry in numbers.items():
        if name == baseline:
            continue
        seeds = [s for s, run in entry["per_seed"].items()
                 if run["test_accuracy"] is not None and base.get(s, {}).get("test_accuracy") is not None]
        differences = [entry["per_seed"][s]["test_accuracy"] - base[s]["test_accuracy"] for s in seeds]
        sooner = sum((entry["per_seed"][s]["speedup"] or 0) > 1 for s in entry["per_seed"])
        if not differences:
            lines.append(f"| {name} | - | - | - | {sooner} of {len(entry['per_seed'])} seeds |")
            continue
        comparison = paired(differences)
        entry["paired_test_difference"] = comparison
        interval = "" if comparison["low"] is None else f" [{comparison['low']:+.4f}, {comparison['high']:+.4f}]"
        lines.append(f"| {name} | {', '.join(f'{d:+.4f}' for d in differences)} | {comparison['mean']:+.4f}"
                     f"{interval} | {'yes' if comparison['resolved'] else 'no'} | "
                     f"{sooner} of {len(entry['per_seed'])} seeds |")
    return lines


def summarize(runs: dict, max_steps: int) -> tuple[str, dict]:
    """Table 2 as Markdown, and its numbers (``numbers[name]``) for tests and the docs."""
    names = list(runs)
    baseline = names[0]
    seeds = list(runs[baseline])
    targets, numbers = {}, {}
    for seed, run in runs[baseline].items():
        if run["history"]:
            targets[seed] = plateau.chosen(*plateau.from_history(run["history"]))
    for name in names:
        per_seed = {}
        for seed in seeds:
            run = runs[name][seed]
            done = run["finished"] or {}
            reach = first_step_reaching(run["history"], targets[seed][1]) if seed in targets else None
            per_seed[seed] = {
                "reach": reach,
                "speedup": targets[seed][0] / reach if reach and seed in targets else None,
                "test_accuracy": done.get("test_accuracy"),
                "stopped": done.get("step"),
                "reason": done.get("reason") or ("diverged" if run["diverged"] else "unfinished"),
            }
        tests = [s["test_accuracy"] for s in per_seed.values() if s["test_accuracy"] is not None]
        numbers[name] = {"per_seed": per_seed, "test_mean": statistics.fmean(tests) if tests else None,
                         "test_std": statistics.stdev(tests) if len(tests) > 1 else None}

    def steps(v):
        return f"{v:.0f}"

    lines = [f"Target per seed: {baseline}'s maximum validation accuracy over its whole run, trained until it "
             f"stopped improving: " + ", ".join(f"seed {s}: {a:.4f} at step {t}" for s, (t, a) in targets.items())
             + ".", ""]
    capped = [s for s in seeds if numbers[baseline]["per_seed"][s]["reason"] != "plateau"]
    if capped:
        lines += [f"**{baseline} did not reach its plateau in seed(s) {', '.join(map(str, capped))}** "
                  f"(cap {max_steps} steps, or unfinished): its maximum is a lower bound there, and so are "
                  "the other networks' steps to reach it.", ""]
    lines += ["| network | steps to reach the target: median [range] | per seed | speed-up: median [range] | "
              "max test accuracy: mean +- std | per seed | stopped at step (why) | paper: steps to 72.2% | "
              "paper: max accuracy |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        per_seed = numbers[name]["per_seed"]
        reach_cells = ", ".join(str(s["reach"]) if s["reach"] else "never" for s in per_seed.values())
        mean, std = numbers[name]["test_mean"], numbers[name]["test_std"]
        test_cell = "-" if mean is None else f"{mean:.4f}" + (f" +- {std:.4f}" if std is not None else "")
        tests_cells = ", ".join("-" if s["test_accuracy"] is None else f"{s['test_accuracy']:.4f}"
                                for s in per_seed.values())
        stops = ", ".join(f"{s['stopped'] or '-'} ({s['reason']})" for s in per_seed.values())
        paper_steps, paper_max = PAPER.get(name, ("", ""))
        reach = _spread([s["reach"] for s in per_seed.values()], steps)
        never = sum(s["reach"] is None for s in per_seed.values())
        if never and reach != "-":  # the median and range are over the seeds that reached it
            reach += f" ({never} of {len(per_seed)} never)"
        lines.append(f"| {name} | {reach} | {reach_cells} | "
                     f"{_spread([s['speedup'] for s in per_seed.values()], lambda v: f'{v:.1f}x')} | {test_cell} | "
                     f"{tests_cells} | {stops} | {paper_steps} | {paper_max} |")
    lines += ["", *paired_table(numbers, baseline)]
    lines += ["", f"Seeds: {', '.join(map(str, seeds))}. Every number comes from `seed-S/NETWORK/history.csv` "
              "(validation accuracy at each evaluation) and `seed-S/NETWORK/finished.json` (where the run stopped "
              "and why; its test accuracy with the weights of its best validation accuracy)."]
    return "\n".join(lines) + "\n", numbers


def plot(path: Path, runs: dict, title: str) -> None:
    """Figure 2: validation accuracy against steps (log scale), the band between the seeds' lowest
    and highest curve and their median per network, the baseline's median maximum as a line."""
    with saved_figure(path, figsize=(7.5, 4.8)) as ax:
        _draw_figure2(ax, runs, title)


def _draw_figure2(ax, runs: dict, title: str) -> None:
    import numpy as np

    names = list(runs)
    for name in names:
        curves = [plateau.from_history(run["history"]) for run in runs[name].values() if run["history"]]
        if not curves:
            continue
        grid = sorted({step for steps, _ in curves for step in steps})
        # Each seed's curve held at its last value after it stopped, so the band covers every step.
        values = np.array([np.interp(grid, steps, accuracies, right=np.nan) for steps, accuracies in curves])
        line, = ax.plot(grid, np.nanmedian(values, 0), label=name)
        ax.fill_between(grid, np.nanmin(values, 0), np.nanmax(values, 0), color=line.get_color(), alpha=0.2)
    maxima = [plateau.chosen(*plateau.from_history(run["history"]))[1]
              for run in runs[names[0]].values() if run["history"]]
    if maxima:
        ax.axhline(statistics.median(maxima), color="black", linestyle="--", linewidth=1,
                   label=f"{names[0]}'s maximum ({statistics.median(maxima):.4f})")
    ax.set_xscale("log")
    ax.set_xlabel("training steps (log scale)")
    ax.set_ylabel("validation accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)


def main(argv=None) -> int:
    from recipes.requirements import require_recipe_extra

    require_recipe_extra()
    args, names, seeds, train_args = parse_args(argv)
    from recipes.fashion_mnist import DatasetNotFoundError, load_fashion_mnist

    try:
        load_fashion_mnist(args.data_dir)
    except DatasetNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return ending.REFUSED
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    print(f"== Table 2 and Figure 2 on Fashion-MNIST: {', '.join(names)}; seeds {', '.join(map(str, seeds))}; "
          f"train.py {' '.join(train_args)}", flush=True)
    try:
        processes.exclusively(run_dir, lambda: run_all(run_dir, names, seeds, train_args, args.jobs,
                                                       args.train_module))
    except ending.RunEnded as ended:
        print(ended.line(), file=sys.stderr)
        return ended.status
    table, numbers = summarize(collect(run_dir, names, seeds), args.max_steps)
    atomic_write(run_dir / "table2.md", table)
    atomic_write(run_dir / "table2.json", json.dumps(numbers, indent=1, default=str))
    plot(run_dir / "figure2.png", collect(run_dir, names, seeds),
         f"Scaled-down BN-Inception on Fashion-MNIST, {len(seeds)} seeds")
    print("\n" + table)
    print(f"Done in {(time.perf_counter() - start) / 60:.1f} min. Table: {run_dir / 'table2.md'}; "
          f"figure: {run_dir / 'figure2.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
