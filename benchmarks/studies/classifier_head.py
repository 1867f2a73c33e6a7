"""ConvNet's two classifier heads on Omniglot 5-way 1-shot: validation accuracy during training.

After every check of one meta-training run per head (mean ± 95% CI over the fixed validation
episodes), the flattened features (`--model.net.init_args.head flatten`, the default) against
their average over space (`average`, as MAML's TensorFlow code does on Omniglot).

Both runs are the command line a user runs, each in a fresh temporary folder, with the shipped
config (configs/omniglot_5way_1shot.yaml), seed 0 and the same --steps (the cosine decay of the
outer lr spans them): only the head differs. Prints a Markdown table and saves a plot of val
accuracy against meta-steps. The results: docs/studies/classifier_head.md.

Usage: python -m benchmarks.studies.classifier_head [--omniglot-root ../shared/data/omniglot]
       [--steps 600] [--interval 100] [--plot benchmarks/results/classifier_head.png]
"""
import argparse
import tempfile
from pathlib import Path

from benchmarks.common import OMNIGLOT_ROOT, ROOT, cli, machine, markdown_table, save_line_plot

HEADS = ("flatten", "average")


def val_accuracy(head: str, root: str, steps: int, interval: int):
    """{meta-step: (accuracy %, 95% CI half-width)} of one fit, and its seconds."""
    with tempfile.TemporaryDirectory() as workdir:
        scores, seconds = cli("fit", "--config", str(ROOT / "configs/omniglot_5way_1shot.yaml"),
                              "--data.root", root, "--model.net.init_args.head", head,
                              "--trainer.max_steps", str(steps),
                              "--trainer.val_check_interval", str(interval),
                              "--seed_everything", "0", workdir=Path(workdir))
    return {int(m[5]): (float(m[2]), m[3]) for m in scores if m[:2] == ("val", "acc")}, seconds


def main(root: str, steps: int, interval: int, plot: str) -> None:
    runs = {head: val_accuracy(head, root, steps, interval) for head in HEADS}
    checks = sorted(set().union(*(acc for acc, _ in runs.values())))
    cell = lambda acc, s: f"{acc[s][0]:.2f} ± {acc[s][1]}" if s in acc else "-"  # noqa: E731
    print(f"\n{machine()}")
    print(f"Omniglot 5-way 1-shot, configs/omniglot_5way_1shot.yaml, {steps} meta-steps, seed 0; "
          + ", ".join(f"{head} fit took {seconds:.0f} s" for head, (_, seconds) in runs.items())
          + "\n")
    print(markdown_table(["step", *(f"val acc % {head}" for head in HEADS)],
                         [[step, *(cell(runs[head][0], step) for head in HEADS)]
                          for step in checks]))
    if plot and checks:
        save_line_plot(plot, checks, {head: [runs[head][0].get(s, (float("nan"),))[0]
                                             for s in checks] for head in HEADS},
                       "meta-steps", "val accuracy (%)", "Omniglot 5w1s: ConvNet classifier head")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--omniglot-root", default=OMNIGLOT_ROOT)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--interval", type=int, default=100, help="meta-steps between checks")
    parser.add_argument("--plot", default=str(ROOT / "benchmarks/results/classifier_head.png"),
                        help="'' for none")
    args = parser.parse_args()
    main(args.omniglot_root, args.steps, args.interval, args.plot)
