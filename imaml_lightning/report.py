"""`python -m imaml_lightning report RUN_DIR... [--out report]`: learning curves of one or more
runs as a PNG, and their validation/test results as a Markdown table.

A RUN_DIR is any folder holding TensorBoard event files (a lightning_logs/version_N folder, or
lightning_logs/ itself: a resumed run's versions are joined into one curve) and the
*_result.json files that `validate` and `test` write.
"""
import argparse
import json
from pathlib import Path
from typing import Dict, List, Tuple

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from imaml_lightning.charts import new_figure

CURVES = (("val/acc", "val/mse"), ("train/acc_after", "train/query_loss_after"))


def read_scalars(run: Path) -> Dict[str, List[Tuple[int, float]]]:
    """Every scalar tag of every event file under `run`, joined and sorted by step."""
    series: Dict[str, Dict[int, float]] = {}
    for events_file in sorted(run.rglob("events.out.tfevents.*")):
        events = EventAccumulator(str(events_file), size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            series.setdefault(tag, {}).update((e.step, e.value) for e in events.Scalars(tag))
    return {tag: sorted(points.items()) for tag, points in series.items()}


def read_results(run: Path) -> List[dict]:
    return [json.loads(path.read_text()) for path in sorted(run.rglob("*_result.json"))]


def markdown(runs: Dict[str, Path]) -> str:
    lines = ["| run | dataset | metric | mean ± 95% CI | episodes | meta-steps | checkpoint |",
             "|---|---|---|---|---|---|---|"]
    for name, run in runs.items():
        for r in read_results(run):
            percent = r["metric"].endswith("/acc")
            scale, unit = (100, "%") if percent else (1, "")
            lines.append(f"| {name} | {r.get('dataset', '?')} | {r['metric']} | {scale * r['mean']:.4g} ± {scale * r['ci95']:.2g}{unit} "
                         f"| {r['episodes']} | {r['meta_steps']} | {r['checkpoint']} |")
    if len(lines) == 2:
        lines.append("| (no *_result.json found: run `validate` or `test` first) | | | | | | |")
    return "\n".join(lines)


def plot(runs: Dict[str, Path], path: Path) -> None:
    scalars = {name: read_scalars(run) for name, run in runs.items()}
    figure = new_figure(9, 3.5)
    for axes, candidates in zip(figure.subplots(1, 2), CURVES):
        for name, series in scalars.items():
            tag = next((t for t in candidates if t in series), None)
            if tag:
                steps, values = zip(*series[tag])
                axes.plot(steps, values, "o-" if tag.startswith("val") else "-", markersize=3,
                          label=f"{name}: {tag}")
        axes.set(xlabel="meta-step", title=" / ".join(candidates))
        axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m imaml_lightning report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="folders with event files / results")
    parser.add_argument("--out", type=Path, default=Path("report"), help="folder for report.png/.md")
    args = parser.parse_args(argv)
    missing = [str(run) for run in args.runs if not run.is_dir()]
    if missing:
        parser.error(f"runs={missing} is invalid: each must be an existing folder")
    names = [run.resolve().name for run in args.runs]
    runs = {(name if names.count(name) == 1 else str(run)): run for name, run in zip(names, args.runs)}
    args.out.mkdir(parents=True, exist_ok=True)
    plot(runs, args.out / "report.png")
    table = markdown(runs)
    (args.out / "report.md").write_text(f"![learning curves](report.png)\n\n{table}\n")
    print(table)
    print(f"\nwritten: {args.out / 'report.png'}, {args.out / 'report.md'}")
