"""Accuracy of `predict` and `test` on a trained checkpoint, as a new user would get them on Omniglot.

1. predict: support = the first drawing of 5 held-out characters of the evaluation alphabets,
   query = their other 19 drawings each; the command's summary line gives the accuracy, read
   from the query folders' names.
2. test under both BatchNorm modes (transductive: the paper's protocol; support: queries
   normalized with the support set's statistics), 600 fixed test episodes, same checkpoint.

The latest table, with its date, machine and checkpoint: docs/benchmarks.md.

Usage: python -m benchmarks.use_your_model --ckpt CHECKPOINT [--omniglot-root ../shared/data/omniglot]
       python -m benchmarks.use_your_model --quick   (a tiny network trained for 2 meta-steps, 8 test episodes)
"""
import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import OMNIGLOT_ROOT, QUICK_HELP, ROOT, TINY_OMNIGLOT, cli, machine, markdown_table

CONFIG = str(ROOT / "configs/omniglot_5way_1shot.yaml")

# The first 5 characters (one per alphabet, in name order) of the evaluation alphabets that the
# paper split, which the shipped config trains with, holds out for testing: never trained on.
CHARACTERS = ("Angelic/character02", "Atemayar_Qelisayer/character01", "Atlantean/character01",
              "Aurek-Besh/character01", "Avesta/character03")


def make_episode(omniglot: Path, folder: Path) -> None:
    for character in CHARACTERS:
        name = character.replace("/", "_")
        drawings = sorted((omniglot / "images_evaluation" / character).glob("*.png"))
        for kind, chosen in (("support", drawings[:1]), ("query", drawings[1:])):
            (folder / kind / name).mkdir(parents=True, exist_ok=True)
            for drawing in chosen:
                shutil.copy(drawing, folder / kind / name / drawing.name)


def predict(ckpt: str, folder: Path) -> str:
    command = [sys.executable, "-m", "imaml_lightning", "predict", "--ckpt_path", ckpt,
               "--support", "support", "--query", "query", "--out", "predictions.csv",
               "--save_adapted", "adapted.pt2"]
    print("$", " ".join(command[1:]), flush=True)
    run = subprocess.run(command, cwd=folder, capture_output=True, text=True, check=True)
    return run.stdout.strip().splitlines()[-1]


def tiny_checkpoint(root: str, folder: Path) -> str:
    """--quick without --ckpt: the best checkpoint of a tiny network after 2 meta-steps."""
    cli("fit", "--config", CONFIG, "--data.root", root, *TINY_OMNIGLOT, "--trainer.max_steps", "2",
        "--trainer.val_check_interval", "2", workdir=folder)
    (best,) = (folder / "checkpoints").glob("best-step*.ckpt")
    return str(best)


def main(args) -> None:
    episodes = 8 if args.quick else 600  # 600: the data modules' default, the paper's protocol
    with tempfile.TemporaryDirectory() as trained:
        ckpt = str(Path(args.ckpt).resolve()) if args.ckpt else tiny_checkpoint(args.omniglot_root,
                                                                               Path(trained))
        with tempfile.TemporaryDirectory() as work:
            make_episode(Path(args.omniglot_root), Path(work))
            summary = predict(ckpt, Path(work))
        rows = []
        for mode in ("transductive", "support"):
            with tempfile.TemporaryDirectory() as work:
                (test,), _ = cli("test", "--config", CONFIG, "--data.root", args.omniglot_root,
                                 "--ckpt_path", ckpt, "--model.batch_norm", mode,
                                 "--data.init_args.test_episodes", str(episodes),
                                 workdir=Path(work))
            rows.append([mode, f"{test[2]} ± {test[3]}%"])
    print(f"\n{machine()}\ncheckpoint: {args.ckpt or 'a tiny one (--quick)'}\n\npredict: {summary}\n")
    print(markdown_table(["--model.batch_norm", f"test acc ({episodes} episodes, 95% CI)"], rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt", help="required, except with --quick (default: a tiny one)")
    parser.add_argument("--omniglot-root", default=OMNIGLOT_ROOT)
    parser.add_argument("--quick", action="store_true", help=QUICK_HELP)
    args = parser.parse_args()
    if not (args.ckpt or args.quick):
        parser.error("--ckpt is required (or --quick)")
    main(args)
