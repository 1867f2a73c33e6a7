"""20-way 1-shot: meta-train with the inner problem solved, at equal CPU time (issue 26, item 3).

The implicit meta-gradient is exact only at the inner minimizer phi*. The 20-way config's 10 GD
steps stop short of it (its runs end their inner loops at ||grad G|| ~ 1.6). Arms:
- "10 steps", the config: table2's seed cells (benchmarks/results/table2_seeds/20w1s_imaml-gd*),
  4,440 meta-steps, the 45 minutes of Table 2 on the machine that planned them;
- "25 steps", the paper's count;
- "25 steps, tol": the same cap, a task stopping once ||grad G|| <= TOL, a little under where the
  25-step arm's inner loops end late in training (0.28), so that many tasks stop before the cap.
  Under vmap its frozen tasks still run to the cap: it costs as much as "25 steps".
Equal time: an arm trains 4,440 x t(10) / t(arm) meta-steps, its cosine schedule and validation
interval scaled alike. t is the seconds of the solver's meta-gradient on one meta-batch of the
config's training tasks (most of a meta-step; the rest is the same in every arm), measured in
this process with the arms alternating over --rounds rounds on an idle machine; t(10) / t(arm)
is the median of the rounds' ratios (step_seconds.json keeps every round). Then the steps are fixed
(no time limit), so whatever else the machine runs, the result is the same, and a stopped arm
continues from its last.ckpt. Each arm is validated and tested as a Table 2 cell is (its inner
steps and twice as many; the test of the length that validated better counts). Prints a
Markdown table and plots validation accuracy against minutes at the measured step times.
The results: docs/studies/training_inner_steps.md.

Usage: python -m benchmarks.studies.training_inner_steps [--arms "25 steps" ...] [--rounds 2]
       [--out benchmarks/results/inner_steps]
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

from benchmarks import table2
from benchmarks.common import (
    OMNIGLOT_ROOT, ROOT, alternating_rounds, machine, markdown_table, seconds_of_one_call,
)

TOL = 0.25
ARMS = {"10 steps": {}, "25 steps": {"inner_steps": 25}, "25 steps, tol": {"inner_steps": 25, "inner_tol": TOL}}
REFERENCE = ROOT / "benchmarks/results/table2_seeds"  # the "10 steps" cells


def folder(arm: str) -> str:
    return arm.replace(" steps", "steps").replace(", tol", f"_tol{TOL}")


def command(arm: str, root: str) -> list:
    solver = [flag for key, value in ARMS[arm].items() for flag in (f"--model.solver.{key}", str(value))]
    return table2.flags("20w1s", "imaml-gd", root, solver)


def meta_gradient_seconds(root: str, rounds: int) -> dict:
    """{arm: [seconds of one meta-gradient per round]}, arms alternating, on one meta-batch."""
    import torch
    import torch.nn.functional as F
    import yaml

    from imaml_lightning.data import OmniglotDataModule
    from imaml_lightning.data.images import to_unit_range
    from imaml_lightning.models import ConvNet
    from imaml_lightning.solver import SolverConfig, Task, VectorizedMetaGradient

    config = yaml.safe_load((ROOT / "configs" / table2.SETTINGS["20w1s"][0]).read_text())
    data = OmniglotDataModule(**{**config["data"]["init_args"], "root": root})
    data.setup("fit")
    tasks = Task(*to_unit_range(next(iter(data.train_dataloader()))))
    torch.manual_seed(0)
    net = ConvNet(config["data"]["init_args"]["ways"], **config["model"]["net"]["init_args"])
    params = dict(net.named_parameters())
    timers = {}
    for arm, overrides in ARMS.items():
        solve = VectorizedMetaGradient(net, F.cross_entropy, SolverConfig(**{**config["model"]["solver"], **overrides}))
        solve(params, tasks, False)  # warm-up
        timers[arm] = seconds_of_one_call(lambda solve=solve: solve(params, tasks, False))
    return alternating_rounds(timers, rounds)


def plan_arms(out: Path, arms: list, root: str, rounds: int) -> None:
    """Each arm's plan.json: the reference cell's steps scaled by the step-time ratio, measured
    once with every arm (the reference included) alternating, and kept in step_seconds.json
    (the arms planned later use the same measurement)."""
    measured = out / "step_seconds.json"
    if not measured.is_file():
        out.mkdir(parents=True, exist_ok=True)
        seconds = meta_gradient_seconds(root, rounds)
        measured.write_text(json.dumps({"machine": machine(), **seconds}, indent=2) + "\n")
    seconds = json.loads(measured.read_text())
    reference = json.loads((REFERENCE / "20w1s_imaml-gd/plan.json").read_text())
    for arm in arms:
        if (out / folder(arm) / "plan.json").is_file():
            continue
        ratio = statistics.median(a / b for a, b in zip(seconds["10 steps"], seconds[arm]))
        steps = {key: round(reference[key] * ratio) for key in ("max_steps", "lr_schedule_steps")}
        planned = {"minutes": None, **steps, "val_check_interval": steps["max_steps"] // 8,
                   "speed_ratio_to_10_steps": ratio}
        (out / folder(arm)).mkdir(parents=True, exist_ok=True)
        (out / folder(arm) / "plan.json").write_text(json.dumps(planned, indent=2) + "\n")


def cells(out: Path) -> dict:
    """{(label, arm): cell folder}: the 10-step seed cells, then the other arms."""
    found = {(f"10 steps, seed {seed}", "10 steps"): REFERENCE / table2.cell_name("20w1s", "imaml-gd", seed)
             for seed in table2.SEEDS}
    found.update({(arm, arm): out / folder(arm) for arm in ARMS if arm != "10 steps"})
    return {key: cell for key, cell in found.items() if (cell / "result.json").is_file()}


def training_records(out: Path) -> dict:
    """{label: (meta-step, val/acc) points and the median end-of-inner-loop ||grad G|| over the
    last quarter of training}, from each cell's events, kept in curves.json for the cells whose
    events are not on this machine (only the small records are committed)."""
    path = out / "curves.json"
    records = json.loads(path.read_text()) if path.is_file() else {}
    for (label, _), cell in cells(out).items():
        points = {e.step: e.value for start, end, logged in table2.training_parts(cell) for e in logged}
        norms = table2.scalars(cell, "train/inner_grad_norm")
        if points and norms:
            records[label] = {"validation": sorted(points.items()),
                              "inner_grad_norm": statistics.median(norms[-len(norms) // 4:])}
    path.write_text(json.dumps(records, indent=2) + "\n")
    return records


def main(args) -> None:
    out = Path(args.out).resolve()
    if not (REFERENCE / "20w1s_imaml-gd/result.json").is_file():
        sys.exit(f"error: the 10-step reference cell is missing under {REFERENCE}: run "
                 "python -m benchmarks.table2 --settings 20w1s --algorithms imaml-gd "
                 f"--out {REFERENCE} first")
    plan_arms(out, args.arms, args.omniglot_root, args.rounds)
    for arm in args.arms:
        cell, flags = out / folder(arm), command(arm, args.omniglot_root)
        table2.evaluate_longer_adaptation(cell, flags, table2.run_cell(cell, flags, None, table2.SETTINGS["20w1s"][0]))
    seconds = json.loads((out / "step_seconds.json").read_text())  # of a meta-gradient
    records, rows, curves = training_records(out), [], {}
    for (label, arm), cell in cells(out).items():
        result, step_time = json.loads((cell / "result.json").read_text()), statistics.median(seconds[arm])
        record = records.get(label, {})
        rows.append([label, f"{result['meta_steps']} (best {result['best_step']})", f"{step_time:.2f}",
                     f"{record['inner_grad_norm']:.2f}" if record else "-",
                     *table2.evaluation_columns(result)])
        points = record.get("validation", [])
        curves[label] = ([step * step_time / 60 for step, _ in points], [100 * acc for _, acc in points])
    report = (f"{seconds['machine']} (step times); {machine()} (table)\nOmniglot 20-way 1-shot, "
              "iMAML-GD, the shipped config but the inner steps; equal training time (the 10-step "
              "cells' 4,440 meta-steps scaled by the step times measured here); test on the best "
              "checkpoint by validation, 600 fixed episodes\n\n"
              + markdown_table(["arm", "meta-steps", "seconds per meta-gradient",
                                "||grad G|| after the inner loop, last quarter (median)",
                                "val acc, training's / 2x its inner steps",
                                "test acc, training's inner steps", "test acc, 2x"], rows))
    print(f"\n{report}")
    (out / "inner_steps.md").write_text(report + "\n")
    # Validation during training adapts with the training's inner steps: the 10-step curves sit
    # below what their checkpoints validate with 20 (the table has both).
    table2.plot_curves(curves, out / "inner_steps.png",
                       xlabel="minutes of meta-training at the measured step time",
                       ylabel="val accuracy (%), adapting with the training's inner steps",
                       title="Omniglot 20-way 1-shot, inner steps in training")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    trained = [arm for arm in ARMS if arm != "10 steps"]
    parser.add_argument("--arms", nargs="+", choices=trained, default=trained)
    parser.add_argument("--rounds", type=int, default=20, help="of the step-time measurement")
    parser.add_argument("--omniglot-root", default=OMNIGLOT_ROOT)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/inner_steps"))
    args = parser.parse_args()
    if args.rounds < 1:  # before anything is measured or written under --out
        parser.error(f"--rounds={args.rounds} is invalid: must be >= 1")
    main(args)
