"""The trained models in models/: the best checkpoint of each headline Table 2 cell and of the
paper-scale run, as weights and settings only, with a table of how each was made and what it scores.

For each model whose cell has finished (its result.json): writes models/NAME.ckpt (the cell's best
checkpoint by validation through imaml_lightning.checkpointing.shareable, the data root reset to
the config's), then runs `test` on that file as a user would, on all the config's test episodes
(the accuracy in the table, which must equal the cell's recorded test) and on the first
SMALL_SET of them (the value tests/test_models.py checks on every CI run), and records both with
the file's SHA-256 in models/models.json; models/README.md gets the table. A cell not finished
yet is left out (said so); a model already in models.json is kept unless --force.

Usage: python -m benchmarks.ship_models [--names omniglot_5way_1shot ...] [--force]
       python -m benchmarks.ship_models --quick [--cells DIR]   (a table2 --quick cell, new or
       from DIR, shipped to a temporary folder)
"""
import argparse
import hashlib
import json
import re
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks import table2
from benchmarks.common import OMNIGLOT_ROOT, QUICK_HELP, ROOT, TINY_OMNIGLOT, cli, machine, markdown_table
from imaml_lightning.checkpointing import shareable
from imaml_lightning.module import adaptation_steps

RESULTS = ROOT / "benchmarks" / "results"
# name: (table2 setting, the cell it comes from). The Table 2 cells are their seed-0 runs of
# fixed steps (table2 --steps-of: the recorded cells' checkpoints were not kept).
MODELS = {
    "omniglot_5way_1shot": ("5w1s", RESULTS / "table2_seeds" / "5w1s_imaml-gd"),
    "omniglot_5way_5shot": ("5w5s", RESULTS / "table2_seeds" / "5w5s_imaml-gd"),
    "omniglot_20way_1shot": ("20w1s", RESULTS / "table2_seeds" / "20w1s_imaml-gd"),
    "omniglot_20way_5shot": ("20w5s", RESULTS / "table2_seeds" / "20w5s_imaml-gd"),
    "omniglot_5way_1shot_paper": ("5w1s-paper", RESULTS / "paper_scale" / "5w1s-paper_imaml-gd"),
}
SMALL_SET = 20  # test episodes a CI run reproduces per model (seconds each)
DEFAULT_ROOT = "data/omniglot"  # the configs' data.root, in place of the training machine's


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def training_command(cell: Path, result: dict) -> str:
    """The cell's fit command as a user types it from the repository root: its recorded flags,
    the plan's steps and schedule, the configs' data root."""
    plan = json.loads((cell / "plan.json").read_text())
    steps = [f"--trainer.max_steps {plan['max_steps']}", f"--trainer.val_check_interval {plan['val_check_interval']}"]
    if "lr_schedule_steps" in plan:
        steps.append(f"--model.lr_schedule_steps {plan['lr_schedule_steps']}")
    command = re.sub(r"--data\.root \S+", f"--data.root {DEFAULT_ROOT}", result["command"])
    return " ".join([command.replace(str(ROOT) + "/", ""), *steps])


def ship(name: str, setting: str, cell: Path, out: Path, root: str, extra: list) -> dict:
    result = json.loads((cell / "result.json").read_text())
    checkpoint = torch.load(cell / "checkpoints" / result["best_checkpoint"], map_location="cpu",
                            weights_only=False)
    file = out / f"{name}.ckpt"
    # Evaluated eagerly: compiling the solver takes minutes on a machine without Inductor's cache;
    # the test below checks that the file still scores the cell's recorded accuracy.
    settings = {"data.init_args.root": DEFAULT_ROOT, "model.compile_solver": False}
    inner_steps, recorded = table2.validated_evaluation(result)
    if inner_steps is not None and inner_steps != checkpoint["hyper_parameters"]["solver"]["inner_steps"]:
        settings["model.test_inner_steps"] = inner_steps  # test and predict adapt as validated
    torch.save(shareable(checkpoint, **settings), file)
    config = table2.SETTINGS[setting][0]
    flags = ["--config", str(ROOT / "configs" / config), "--ckpt_path", str(file), "--data.root", root, *extra]
    with tempfile.TemporaryDirectory() as workdir:  # their logs are not kept
        (full,), _ = cli("test", *flags, workdir=Path(workdir))
        (small,), _ = cli("test", *flags, "--data.init_args.test_episodes", str(SMALL_SET),
                          workdir=Path(workdir))
    test = f"{full[2]} ± {full[3]}"
    if test != recorded:
        file.unlink()
        sys.exit(f"error: {name} tests {test}%, its cell recorded {recorded}%: not shipped")
    return {"file": file.name, "config": f"configs/{config}", "setting": setting,
            "trained_by": training_command(cell, result), "meta_steps": checkpoint["global_step"],
            "test": test, "small_set": {"episodes": SMALL_SET, "acc": small[2]},
            "sha256": sha256(file), "bytes": file.stat().st_size, "shipped": machine()}


def write_table(records: dict, out: Path) -> str:
    hyper_parameters = {name: torch.load(out / r["file"], weights_only=True)["hyper_parameters"]
                        for name, r in records.items()}
    rows = [[f"[{name}]({r['file']})", r["setting"], f"`{r['trained_by']}`", r["meta_steps"],
             adaptation_steps(hyper_parameters[name]), f"{r['test']}%", f"`{r['sha256'][:16]}…`",
             f"{r['bytes'] / 1e6:.2f} MB"] for name, r in records.items()]
    table = markdown_table(["model", "setting", "trained by", "meta-steps (best checkpoint)",
                            "inner steps at test (chosen on validation)",
                            "test acc (the config's test episodes, 95% CI)", "SHA-256 (models.json: whole)", "size"], rows)
    (out / "models.json").write_text(json.dumps(records, indent=2) + "\n")
    (out / "SHA256SUMS").write_text("".join(f"{r['sha256']}  {r['file']}\n" for r in records.values()))
    readme = out / "README.md"
    text = readme.read_text() if readme.is_file() else "# Trained models\n\n<!-- table -->\n<!-- /table -->\n"
    head, rest = text.split("<!-- table -->", 1)
    readme.write_text(f"{head}<!-- table -->\n{table}\n<!-- /table -->{rest.split('<!-- /table -->', 1)[1]}")
    return table


def main(args, models: dict, extra: list) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    index = out / "models.json"
    records = json.loads(index.read_text()) if index.is_file() else {}
    for name in args.names or list(models):
        setting, cell = models[name]
        if name in records and not args.force:
            continue
        if not (cell / "result.json").is_file():
            print(f"{name}: not shipped, its cell {cell} has not finished")
            continue
        records[name] = ship(name, setting, cell, out, args.omniglot_root, extra)
    print(write_table({n: records[n] for n in models if n in records}, out))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--names", nargs="+", choices=list(MODELS))
    parser.add_argument("--force", action="store_true", help="ship again the models already in models.json")
    parser.add_argument("--omniglot-root", default=OMNIGLOT_ROOT)
    parser.add_argument("--out", default=str(ROOT / "models"))
    parser.add_argument("--quick", action="store_true", help=QUICK_HELP)
    parser.add_argument("--cells", help="--quick: ship the 5w1s cell of this table2 --quick folder "
                        "(default: a new one)")
    args = parser.parse_args()
    args.omniglot_root = str(Path(args.omniglot_root).resolve())
    if args.quick:
        with tempfile.TemporaryDirectory() as folder:
            cells = Path(args.cells or Path(folder) / "cells").resolve()
            if not args.cells:
                table2.main(argparse.Namespace(
                    settings=["5w1s"], algorithms=["imaml-gd"], minutes=0.1, extra=TINY_OMNIGLOT,
                    omniglot_root=args.omniglot_root, seed=0, steps_of=None, steps=None, out=str(cells)))
            args.out, args.names = str(Path(folder) / "models"), None
            main(args, {"omniglot_5way_1shot": ("5w1s", cells / "5w1s_imaml-gd")}, TINY_OMNIGLOT)
    else:
        main(args, MODELS, [])
