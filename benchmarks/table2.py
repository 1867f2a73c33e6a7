"""The paper's Omniglot table (Table 2) on this machine, at equal wall time per method.

For every chosen (setting, algorithm): `fit` for M minutes of wall time (--trainer.max_time) with
seed 0, then `test` on the best checkpoint by validation accuracy (600 fixed episodes), once
with the training's inner steps and once with EVALUATION_STEPS times as many (below; both are
validated too, and the table marks the test of the better one). Each
cell's cosine schedule must end with its budget: a cell first times 30 meta-steps (median
train/step_seconds) and gets max_steps = 90% of the budget at that speed (validation takes the
rest); max_time stops it at M minutes all the same. Prints one Markdown table (the paper's number
beside each cell; "rejected inner steps": the GD safeguard's undone steps or HF's failed line
searches, per task, averaged over the logged meta-steps) and draws every run's validation
accuracy against wall-clock minutes into one PNG. Each cell keeps its folder under --out: a
finished cell is read back, a killed one resumes from its last.ckpt with the same plan
(Lightning's timer carries the elapsed time), so rerunning the command continues a half-finished
table. The latest tables, with their date and machine: docs/benchmarks.md.

Usage: python -m benchmarks.table2 [--minutes M] [--settings 5w1s 20w1s ...]
       [--algorithms imaml-gd imaml-hf maml fomaml reptile] [--out benchmarks/results/table2]
       [--seed N] [--steps-of OUT | --steps N] [--extra FLAG ...]
       (--seed 1 --steps-of benchmarks/results/table2: seed 1 of each cell, training exactly the
       meta-steps and schedule its seed-0 cell did, with no time limit; the table then adds each
       cell's mean and spread over its seeds; --steps N: exactly N meta-steps, no time limit,
       for a long run that spans sessions)
       python -m benchmarks.table2 --quick   (one tiny cell for a few seconds, in a temporary folder)
"""
import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks.common import (
    OMNIGLOT_ROOT, QUICK_HELP, ROOT, TINY_OMNIGLOT, cli, machine, markdown_table, step_seconds,
)

SETTINGS = {  # name: (config, default minutes; None: the config's max_steps, no time limit)
    "5w1s": ("omniglot_5way_1shot.yaml", 20), "5w5s": ("omniglot_5way_5shot.yaml", 20),
    "20w1s": ("omniglot_20way_1shot.yaml", 45), "20w5s": ("omniglot_20way_5shot.yaml", 45),
    "5w1s-paper": ("omniglot_5way_1shot_paper.yaml", None),
}
ALGORITHMS = {
    "imaml-gd": ["--model.solver.algorithm", "imaml"],
    # 2 Newton steps: a Newton step (a gradient, CG's Gauss-Newton products, the line search's
    # trials) costs several GD steps, and 2 reach about the inner objective of the config's GD
    # steps (docs/studies/hf_vs_gd.md); the config's count would leave HF far fewer meta-steps.
    "imaml-hf": ["--model.solver.algorithm", "imaml", "--model.solver.inner_solver", "hf",
                 "--model.solver.inner_steps", "2"],
    "maml": ["--model.solver.algorithm", "maml"],
    "fomaml": ["--model.solver.algorithm", "fomaml"],
    # Reptile's outer step: 0.005, not the config's 0.001: the best validation accuracy of a
    # short sweep (docs/benchmarks.md, from benchmarks/results/table2/tuning.md).
    "reptile": ["--model.solver.algorithm", "reptile", "--model.outer_lr", "0.005"],
}
# Evaluated again with twice the training's inner steps: the meta-gradient is the one at the
# inner problem's minimizer, which the training's GD steps do not reach; on 20-way 1-shot twice
# the steps validated clearly better, four times hardly better than twice (docs/benchmarks.md,
# from benchmarks/results/table2/tuning.md). On 5-way it can lose: validation decides per cell,
# and the table shows both tests.
EVALUATION_STEPS = 2
PAPER = {  # Table 2 of Rajeswaran et al. (2019), accuracy % and 95% CI
    "maml": {"5w1s": "98.7 ± 0.4", "5w5s": "99.9 ± 0.1", "20w1s": "95.8 ± 0.3", "20w5s": "98.9 ± 0.2"},
    "fomaml": {"5w1s": "98.3 ± 0.5", "5w5s": "99.2 ± 0.2", "20w1s": "89.4 ± 0.5", "20w5s": "97.9 ± 0.1"},
    "reptile": {"5w1s": "97.68 ± 0.04", "5w5s": "99.48 ± 0.06", "20w1s": "89.43 ± 0.14",
                "20w5s": "97.12 ± 0.32"},
    "imaml-gd": {"5w1s": "99.16 ± 0.35", "5w5s": "99.67 ± 0.12", "20w1s": "94.46 ± 0.42",
                 "20w5s": "98.69 ± 0.1"},
    "imaml-hf": {"5w1s": "99.50 ± 0.26", "5w5s": "99.74 ± 0.11", "20w1s": "96.18 ± 0.36",
                 "20w5s": "99.14 ± 0.1"},
}


def flags(setting: str, algorithm: str, root: str, extra: list, seed: int = 0) -> list:
    return ["--config", str(ROOT / "configs" / SETTINGS[setting][0]), "--data.root", root,
            *ALGORITHMS[algorithm], "--seed_everything", str(seed), *extra]


def cell_name(setting: str, algorithm: str, seed: int) -> str:
    return f"{setting}_{algorithm}" + (f"_seed{seed}" if seed else "")


def plan_of_steps(cell: Path, reference: Path) -> dict:
    """A plan of fixed meta-steps, no time limit: those `reference` (a finished cell) trained,
    with its cosine schedule's length. So another seed, or the same one on another day, trains
    the very steps the reference did, whatever the machine's speed."""
    done = json.loads((reference / "result.json").read_text())
    planned = json.loads((reference / "plan.json").read_text())
    steps = {"minutes": None, "max_steps": done["meta_steps"], "lr_schedule_steps": planned["max_steps"],
             "val_check_interval": planned["val_check_interval"], "steps_of": str(reference)}
    cell.mkdir(parents=True, exist_ok=True)
    (cell / "plan.json").write_text(json.dumps(steps, indent=2) + "\n")
    return steps


def plan_fixed_steps(cell: Path, steps: int) -> None:
    """A plan of exactly `steps` meta-steps (the cosine schedule as long), no time limit: a long
    run whose result does not depend on the machine's speed or load, stopped and resumed at will."""
    path = cell / "plan.json"
    if path.is_file():
        planned = json.loads(path.read_text())
        if planned["max_steps"] != steps:
            sys.exit(f"error: {cell} was planned for {planned['max_steps']} meta-steps, not --steps "
                     f"{steps}: rerun it with those, or choose another --out")
        return
    cell.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"minutes": None, "max_steps": steps,
                                "val_check_interval": max(1, steps // 8)}, indent=2) + "\n")


def plan(cell: Path, command: list, minutes: float, config: str) -> dict:
    """The cell's meta-steps for its budget, measured once and kept (a resume reuses it). With
    no budget (minutes None), the config's fixed max_steps, so the result does not depend on
    how fast the machine was."""
    path = cell / "plan.json"
    if path.is_file():
        return json.loads(path.read_text())
    if minutes is None:
        import yaml

        trainer = yaml.safe_load((ROOT / "configs" / config).read_text())["trainer"]
        cell.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"minutes": None, **trainer}, indent=2) + "\n")
        return json.loads(path.read_text())
    with tempfile.TemporaryDirectory() as workdir:
        cli("fit", *command, "--trainer.max_steps", "30", "--trainer.val_check_interval", "30",
            "--data.init_args.val_episodes", "8", "--trainer.log_every_n_steps", "1",
            workdir=Path(workdir))
        seconds = statistics.median(step_seconds(Path(workdir) / "lightning_logs"))
    steps = int(0.9 * minutes * 60 / seconds)
    planned = {"minutes": minutes, "step_seconds": seconds, "max_steps": steps,
               "val_check_interval": max(1, steps // 8)}
    cell.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(planned, indent=2) + "\n")
    return planned


def run_cell(cell: Path, command: list, minutes: float, config: str) -> dict:
    done = cell / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    planned = plan(cell, command, minutes, config)
    if planned["minutes"] != minutes:
        sys.exit(f"error: {cell} was planned for minutes={planned['minutes']}, not {minutes}: "
                 "rerun it with those, or choose another --out")
    resume = ["--ckpt_path", "last"] if list((cell / "checkpoints").glob("last*.ckpt")) else []
    budget = []
    if minutes is not None:
        seconds = int(minutes * 60)
        budget = ["--trainer.max_time", f"00:{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:"
                                        f"{seconds % 60:02d}"]
    schedule = (["--model.lr_schedule_steps", str(planned["lr_schedule_steps"])]
                if "lr_schedule_steps" in planned else [])
    _, wall = cli("fit", *command, "--trainer.max_steps", str(planned["max_steps"]),
                  "--trainer.val_check_interval", str(planned["val_check_interval"]),
                  *schedule, *budget, *resume, workdir=cell)
    trained = fit_record(cell, wall)["meta_steps"]
    if minutes is None and trained < planned["max_steps"]:  # stopped by a signal, not a budget
        sys.exit(f"{cell.name}: stopped at meta-step {trained} of {planned['max_steps']}; the same "
                 "command continues it from its last.ckpt")
    (best,) = (cell / "checkpoints").glob("best-step*.ckpt")
    (test,), _ = cli("test", *command, "--ckpt_path", str(best), workdir=cell)
    result = {"command": "python -m imaml_lightning fit " + " ".join(command),
              **fit_record(cell, wall), "best_step": int(test[5]),
              "test": f"{test[2]} ± {test[3]}", "step_seconds": planned.get("step_seconds"),
              "best_checkpoint": best.name}
    done.write_text(json.dumps(result, indent=2) + "\n")
    return result


def fit_record(cell: Path, wall: float) -> dict:
    """Meta-steps and minutes of the cell's whole fit, resumed parts included: last.ckpt's step
    and Lightning's timer, or where the checkpoint has none (no --trainer.max_time) the parts'
    minutes in the events (this invocation's `wall` when they have none)."""
    import torch

    (last,) = (cell / "checkpoints").glob("last*.ckpt")
    checkpoint = torch.load(last, map_location="cpu", weights_only=False, mmap=True)
    timer = checkpoint["callbacks"].get("Timer")
    seconds = timer["time_elapsed"]["train"] if timer else 60 * sum(
        end - start for start, end, _ in training_parts(cell)) or wall
    return {"meta_steps": checkpoint["global_step"], "fit_minutes": round(seconds / 60, 1)}


def trained_inner_steps(checkpoint: Path) -> int:
    """The inner steps a checkpoint was trained with (its config's, or a flag's over it)."""
    import torch

    from imaml_lightning.run_settings import upgrade

    loaded = upgrade(torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True))
    return loaded["hyper_parameters"]["solver"]["inner_steps"]


def evaluate_longer_adaptation(cell: Path, command: list, result: dict) -> dict:
    """The best checkpoint with the training's inner steps and with EVALUATION_STEPS times as
    many: validation with both (which to prefer is decided there), test with the longer (the
    other test is result["test"]). Kept in result.json, so a finished cell gains them once."""
    if "test_longer" in result:
        return result
    best = cell / "checkpoints" / result["best_checkpoint"]
    steps = trained_inner_steps(best)
    longer = EVALUATION_STEPS * steps
    for key, subcommand, n in (("val", "validate", steps), ("val_longer", "validate", longer),
                               ("test_longer", "test", longer)):
        if key not in result:
            (score,), _ = cli(subcommand, *command, "--ckpt_path", str(best),
                              "--model.test_inner_steps", str(n), workdir=cell)
            result = {**result, key: f"{score[2]} ± {score[3]}", "longer_inner_steps": longer}
            (cell / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def event_logs(cell: Path):
    """(scalar tags, accumulator) of each TensorBoard events file of a cell's run(s), in the order
    they were started (a resumed run's parts, and its validate/test runs, each have one)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for events in sorted((cell / "lightning_logs").rglob("events.out.tfevents.*"),
                         key=lambda path: int(path.name.split(".")[3])):  # its creation time
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        yield accumulator.Tags()["scalars"], accumulator


def scalars(cell: Path, tag: str) -> list:
    """Every logged value of one TensorBoard scalar of a cell's run(s)."""
    return [e.value for tags, log in event_logs(cell) if tag in tags for e in log.Scalars(tag)]


def training_parts(cell: Path):
    """(start, end, val/acc events) in minutes of each part of a cell's fit (a resumed run's
    parts): from its first event (its hyperparameters, logged before the first meta-step, so a
    compiled solver's compilation counts) to its last logged meta-step."""
    for tags, log in event_logs(cell):
        if "val/acc" in tags and "train/step_seconds" in tags:
            end = log.Scalars("train/step_seconds")[-1].wall_time
            yield log.FirstEventTimestamp() / 60, end / 60, log.Scalars("val/acc")


def validation_curve(cell: Path) -> tuple:
    """(minutes of fit, val/acc in %) of a cell's run(s); a resumed part continues the minutes
    where the part before it stopped logging."""
    points, offset = {}, 0.0
    for start, end, validations in training_parts(cell):
        points.update({e.step: (offset + e.wall_time / 60 - start, 100 * e.value) for e in validations})
        offset += end - start
    return tuple(zip(*(points[s] for s in sorted(points)))) or ((), ())


def validated_evaluation(result: dict) -> tuple:
    """(inner steps, test acc) of the evaluation length that validated better: the training's or
    EVALUATION_STEPS times as many (inner steps None where only the training's was measured)."""
    if "test_longer" not in result:
        return None, result["test"]
    if float(result["val_longer"].split()[0]) > float(result["val"].split()[0]):
        return result["longer_inner_steps"], result["test_longer"]
    return result["longer_inner_steps"] // EVALUATION_STEPS, result["test"]


def evaluation_columns(result: dict) -> list:
    """[val acc at both lengths, test acc at each], the test of the length that validated
    better in bold."""
    if "test_longer" not in result:
        return ["-", f"**{result['test']}%**", "-"]
    longer_wins = validated_evaluation(result)[0] == result["longer_inner_steps"]
    tests = [f"{result['test']}%", f"{result['test_longer']}%"]
    tests[longer_wins] = f"**{tests[longer_wins]}**"
    return [f"{result['val']}% / {result['val_longer']}%", *tests]


def plot(cells: dict, path: Path) -> None:
    plot_curves({name: validation_curve(cell) for name, cell in cells.items()}, path,
                xlabel="wall-clock minutes of meta-training", ylabel="val accuracy (%)",
                title="Omniglot, 200 validation episodes")


def plot_curves(curves: dict, path: Path, **labels) -> None:
    """One PNG of {label: (x values, y values)}, axes.set(**labels)."""
    from imaml_lightning.charts import new_figure

    figure = new_figure(6, 4)
    axes = figure.subplots()
    for label, (x, y) in curves.items():
        axes.plot(x, y, "o-", markersize=3, label=label)
    axes.set(**labels)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"plot: {path}")


def main(args) -> None:
    for setting in args.settings:
        config, default_minutes = SETTINGS[setting]
        minutes = args.minutes if args.minutes is not None else default_minutes
        for algorithm in args.algorithms:
            name = cell_name(setting, algorithm, args.seed)
            cell = Path(args.out) / name
            command = flags(setting, algorithm, args.omniglot_root, args.extra, args.seed)
            if args.steps_of:  # no time limit: the steps of the seed-0 cell
                minutes = None
                if not (cell / "plan.json").is_file():
                    plan_of_steps(cell, Path(args.steps_of) / cell_name(setting, algorithm, 0))
            elif args.steps:
                minutes = None
                plan_fixed_steps(cell, args.steps)
            evaluate_longer_adaptation(cell, command, run_cell(cell, command, minutes, config))
    # The table and the plot hold every finished cell under --out, not only this invocation's,
    # so running the settings one command at a time builds one table.
    rows, cells = [], {}
    for setting, algorithm, seed in ((s, a, seed) for s in SETTINGS for a in ALGORITHMS for seed in SEEDS):
        cell = Path(args.out) / cell_name(setting, algorithm, seed)
        if (cell / "result.json").is_file():
            result = json.loads((cell / "result.json").read_text())
            cells[f"{setting} {algorithm}" + (f" seed {seed}" if seed else "")] = cell
            rejected = scalars(cell, "train/inner_rejected_steps")
            rows.append([setting, algorithm, seed, f"{result['meta_steps']} (best {result['best_step']})",
                         result["fit_minutes"], f"{statistics.mean(rejected):.3f}" if rejected else "-",
                         *evaluation_columns(result), f"{PAPER[algorithm][setting.split('-')[0]]}%"])
    report = (f"{machine()}\nOmniglot, conv-4, paper split; test on the best checkpoint by "
              f"validation accuracy, 600 fixed episodes (the same for every run), mean ± 95% CI\n\n"
              + markdown_table(["setting", "algorithm", "seed", "meta-steps", "fit minutes",
                                "rejected inner steps per task and meta-step",
                                f"val acc, training's / {EVALUATION_STEPS}x its inner steps",
                                "test acc, training's inner steps",
                                f"test acc, {EVALUATION_STEPS}x", "paper"], rows)
              + seed_summary(rows))
    print(f"\n{report}")
    (Path(args.out) / "table2.md").write_text(report + "\n")
    plot(cells, Path(args.out) / "table2.png")


SEEDS = range(10)  # the seeds a table looks for


def seed_summary(rows: list) -> str:
    """Per (setting, algorithm) run with several seeds: the mean and the spread (sample standard
    deviation, min-max) over seeds of the bold test accuracy (each seed's validated choice)."""
    bold = {}
    for row in rows:
        test = next(c for c in row[-3:-1] if c.startswith("**"))
        bold.setdefault((row[0], row[1]), []).append(float(test.strip("*%").split()[0]))
    lines = [f"| {s} | {a} | {len(v)} | **{statistics.mean(v):.2f}%** | {statistics.stdev(v):.2f} | "
             f"{min(v):.2f}-{max(v):.2f} |" for (s, a), v in bold.items() if len(v) > 1]
    if not lines:
        return ""
    return ("\n\nOver seeds:\n\n| setting | algorithm | seeds | mean test acc | std | range |\n"
            "|---|---|---|---|---|---|\n" + "\n".join(lines))


def positive_minutes(text: str) -> float:
    if not (minutes := float(text)) > 0:
        raise argparse.ArgumentTypeError(f"--minutes={text} is invalid: must be > 0")
    return minutes


def positive_steps(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"--steps={text} is invalid: must be an integer >= 1")
    return int(text)


def quick(args) -> None:
    """--quick: one cell (5w1s imaml-gd unless chosen) of a tiny network with a budget of a few
    seconds, in a temporary folder unless --out is given: benchmarks/results is left alone."""
    args.settings, args.algorithms = args.settings or ["5w1s"], args.algorithms or ["imaml-gd"]
    args.minutes, args.extra = args.minutes or 0.1, [*TINY_OMNIGLOT, *args.extra]
    with tempfile.TemporaryDirectory() as folder:
        args.out = str(Path(args.out or folder).resolve())
        main(args)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=positive_minutes, help="per cell (default: 20 for 5-way, 45 for 20-way)")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), help="default: all")
    parser.add_argument("--algorithms", nargs="+", choices=list(ALGORITHMS), help="default: all")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="further flags for every run (e.g. --model.solver.lam 2)")
    parser.add_argument("--omniglot-root", default=OMNIGLOT_ROOT)
    parser.add_argument("--seed", type=int, default=0, choices=SEEDS,
                        help="--seed_everything of every run (cells of seed N > 0 are named *_seedN)")
    parser.add_argument("--steps-of", help="an --out folder whose finished seed-0 cells set each cell's "
                        "meta-steps and schedule (no time limit), e.g. for more seeds")
    parser.add_argument("--steps", type=positive_steps, help="every cell trains exactly this many "
                        "meta-steps, its cosine schedule as long, no time limit (a long run)")
    parser.add_argument("--out", help="default: benchmarks/results/table2 (--quick: a temporary folder)")
    parser.add_argument("--quick", action="store_true", help=QUICK_HELP)
    args = parser.parse_args()
    if args.steps and (args.minutes or args.steps_of):
        parser.error("--steps excludes --minutes and --steps-of (a plan is either steps or minutes)")
    if args.quick:
        quick(args)
    else:
        args.settings, args.algorithms = args.settings or list(SETTINGS), args.algorithms or list(ALGORITHMS)
        # each run works in its cell: a relative --out would not resolve there
        args.out = str(Path(args.out or ROOT / "benchmarks/results/table2").resolve())
        main(args)
