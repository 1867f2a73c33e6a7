"""The README's "Use your model" numbers, as a new user would get them on Omniglot.

1. predict: support = the first drawing of 5 held-out characters of the evaluation alphabets,
   query = their other 19 drawings each; the command's summary line gives the accuracy, read
   from the query folders' names.
2. test under both BatchNorm modes (transductive: the paper's protocol; support: queries
   normalized with the support set's statistics), 600 fixed test episodes, same checkpoint.

Usage: python -m benchmarks.use_your_model --ckpt CHECKPOINT [--omniglot-root ../shared/data/omniglot]
"""
import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import machine, markdown_table
from benchmarks.walking_skeleton import ROOT, cli

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


def main(args) -> None:
    ckpt = str(Path(args.ckpt).resolve())
    with tempfile.TemporaryDirectory() as work:
        make_episode(Path(args.omniglot_root), Path(work))
        summary = predict(ckpt, Path(work))
    rows = []
    for mode in ("transductive", "support"):
        with tempfile.TemporaryDirectory() as work:
            (test,), _ = cli("test", "--config", str(ROOT / "configs/omniglot_5way_1shot.yaml"),
                             "--data.root", args.omniglot_root, "--ckpt_path", ckpt,
                             "--model.batch_norm", mode, workdir=Path(work))
        rows.append([mode, f"{test[2]} ± {test[3]}%"])
    print(f"\n{machine()}\ncheckpoint: {args.ckpt}\n\npredict: {summary}\n")
    print(markdown_table(["--model.batch_norm", "test acc (600 episodes, 95% CI)"], rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--omniglot-root", default=str(ROOT.parent / "shared/data/omniglot"))
    main(parser.parse_args())
