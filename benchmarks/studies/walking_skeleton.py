"""The walking skeleton's two promises, measured on this machine: a Markdown table.

1. Sinusoid: meta-validation MSE after 10-shot adaptation, at step 0 and after 5 minutes of
   meta-training (target: at least 5x lower).
2. Omniglot 5-way 1-shot: meta-test accuracy (mean ± 95% CI over 600 fixed episodes of the
   held-out characters) after at most 20 minutes of meta-training (target: >= 90%).

Every number comes from the command line a user runs (python -m imaml_lightning ...). The
results: docs/studies/walking_skeleton.md.

Usage: python -m benchmarks.studies.walking_skeleton [--omniglot-root ../shared/data/omniglot]
       [--only sinusoid|omniglot] [--out benchmarks/results/walking_skeleton]
"""
import argparse
import datetime
import os
import platform
import shutil
from pathlib import Path

import torch

from benchmarks.common import OMNIGLOT_ROOT, ROOT, cli


def sinusoid(workdir):
    common = ["--config", str(ROOT / "configs/sinusoid.yaml")]
    (start,), _ = cli("validate", *common, workdir=workdir)
    scores, seconds = cli("fit", *common, "--trainer.max_time", "00:00:05:00",
                          "--trainer.max_steps", "100000", "--trainer.val_check_interval", "500",
                          workdir=workdir)
    best = min(scores, key=lambda m: float(m[2]))
    return [("sinusoid 10-shot val MSE, step 0", f"{float(start[2]):.3f} ± {start[3]}", ""),
            ("sinusoid 10-shot val MSE, best in 5 min",
             f"{float(best[2]):.3f} ± {best[3]} (step {best[5]})",
             f"{float(start[2]) / float(best[2]):.1f}x lower (target >= 5x); fit took {seconds:.0f} s"
             f" for {scores[-1][5]} steps")]


def omniglot(workdir, root):
    common = ["--config", str(ROOT / "configs/omniglot_5way_1shot.yaml"), "--data.root", root]
    # The config's max_steps (and its cosine schedule) fit the budget on a 2-core CPU; max_time
    # stops a slower machine at 20 minutes all the same (docs/studies/walking_skeleton.md).
    scores, seconds = cli("fit", *common, "--trainer.max_time", "00:00:20:00", workdir=workdir)
    # Model selection on the validation characters: the best checkpoint by val/acc (top-1 kept).
    (best,) = (workdir / "checkpoints").glob("best-step*.ckpt")
    (test,), _ = cli("test", *common, "--ckpt_path", str(best), workdir=workdir)
    return [("Omniglot 5w1s val acc during fit",
             " → ".join(f"{m[2]}% (step {m[5]})" for m in scores[-3:]), f"fit took {seconds:.0f} s"),
            ("Omniglot 5w1s test acc, 600 episodes", f"{test[2]} ± {test[3]}%",
             f"after {test[5]} meta-steps (target >= 90%)")]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--omniglot-root", default=OMNIGLOT_ROOT)
    parser.add_argument("--only", choices=["sinusoid", "omniglot"])
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/walking_skeleton"))
    args = parser.parse_args()
    workdir = Path(args.out)
    for name in ("sinusoid", "omniglot"):  # fresh runs: no checkpoint of an earlier run is reused
        if args.only in (None, name):
            shutil.rmtree(workdir / name, ignore_errors=True)
            (workdir / name).mkdir(parents=True)
    rows = []
    if args.only in (None, "sinusoid"):
        rows += sinusoid(workdir / "sinusoid")
    if args.only in (None, "omniglot"):
        rows += omniglot(workdir / "omniglot", args.omniglot_root)
    print(f"\n{datetime.date.today()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPU cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    print("| measurement | result | note |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
