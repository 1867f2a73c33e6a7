"""Test accuracy after the same minutes of training: ours beside the authors' iMAML and
learn2learn's MAML, on the same machine, episodes and test set.

Arms, one after another (never two at once: they share the CPU):
- "authors' iMAML": their code, network, inner loop, CG system and settings as their example
  script runs them (benchmarks/peers.py), tested with their own adaptation procedure;
- "learn2learn MAML": l2l.algorithms.MAML around the network of learn2learn's Omniglot example,
  with that example's settings, tested with its own clone()/adapt();
- "ours" and "ours, compiled": the shipped config of the setting (`--model.compile_solver true`
  for the second), trained and tested by the command line as table2 does.
Each arm trains for M minutes of wall time, validation included (a peer keeps the length of its
last validation free at the end), validating 8 times on the setting's 200 validation episodes;
then the weights that validated best are tested on the setting's 600 test episodes, ours with
the training's inner steps or twice as many, whichever validated better (as table2 reports a
cell). Every arm draws its training tasks from our sampler (paper split, the same images; bright
strokes on black, as learn2learn's loader gives them and the authors' gives the inverse: their
first BatchNorm makes the two equivalent); the peers train with as many queries as shots, as
their scripts do. Validation and test episodes are the shipped config's, the same for all (5
queries per class on 5-way, 3 on 20-way, where the peers' scripts test with as many as shots).
BatchNorm uses the query batch's statistics at test in every arm (transductive; each network's
own BatchNorm does so). Prints a Markdown table and draws validation accuracy against minutes
(one panel per setting). Each arm keeps its arm.json under --out/<setting>_<arm>: rerunning
the command skips finished arms (with the same minutes and seed; a killed peer arm starts
again, ours resumes as table2 does), and the table and plot hold every finished arm there
(with the seed), so the arms can run in separate sessions.

Usage: python -m benchmarks.peer_accuracy [--minutes M] [--settings 5w1s 20w1s] [--arms ...]
       [--out benchmarks/results/peer_accuracy] [--peer ../shared/peers/imaml_dev]
       [--omniglot-root ../shared/data/omniglot]
       python -m benchmarks.peer_accuracy --quick   (seconds per arm, tiny sizes, a temporary folder)
"""
import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from benchmarks import table2
from benchmarks.common import OMNIGLOT_ROOT, PEER_ROOT, QUICK_HELP, ROOT, TINY_OMNIGLOT, machine, markdown_table
from benchmarks.peers import AuthorsIMAML, Learn2LearnMAML, PeerMissing, import_authors_code, learn2learn_missing
from imaml_lightning.data import OmniglotDataModule
from imaml_lightning.data.episodes import EpisodeStream, FixedEpisodes
from imaml_lightning.data.images import ClassificationTasks, to_unit_range
from imaml_lightning.metrics import MeanConfidenceInterval
from imaml_lightning.solver import Task

SETTINGS = {"5w1s": 20, "20w1s": 45}  # the default minutes: Table 2's budgets (table2.SETTINGS)
ARMS = ("authors' iMAML", "learn2learn MAML", "ours", "ours, compiled")
VALIDATIONS = 8
# Their scripts' inner steps: the authors' README runs 16 for 5-way; the paper used 25 for 20-way.
AUTHORS_INNER_STEPS = {5: 16, 20: 25}
PEER_META_BATCH = 32  # both scripts' (the authors' README command, learn2learn's example)


def data_settings(setting: str) -> dict:
    """The shipped config's data arguments (ways, shots, queries, episodes...)."""
    config = ROOT / "configs" / table2.SETTINGS[setting][0]
    return yaml.safe_load(config.read_text())["data"]["init_args"]


def samplers(setting: str, root: str) -> tuple:
    """(the shipped config's sampler, the same with the peers' own query count = shots), from
    one load of the images (built here, before the clock starts, as ours builds its own)."""
    data = OmniglotDataModule(**{**data_settings(setting), "root": root, "download": False})
    images, splits = data.load()
    evaluation, training = (ClassificationTasks(images, splits, data.ways, data.shots, queries,
                                                data.rotations)
                            for queries in (data.queries, data.shots))
    return data, evaluation, training


def evaluation_episodes(data: OmniglotDataModule, sampler: ClassificationTasks, sizes: dict) -> dict:
    """{"val": [...], "test": [...]}: the fixed episodes the command line evaluates the shipped
    config on (their count from the config, or from `sizes`), each a Task in [0, 1]."""
    counts = {"val": data.val_episodes, "test": data.test_episodes}
    fixed = {split: FixedEpisodes(sampler, split, sizes.get(split, count), data.eval_seed)
             for split, count in counts.items()}
    return {split: [Task(*to_unit_range(e[i])) for i in range(len(e))] for split, e in fixed.items()}


def training_stream(sampler: ClassificationTasks, meta_batch: int, seed: int):
    """Endless meta-batches from our sampler."""
    stream = EpisodeStream(sampler, seed, meta_batch)
    return (Task(*to_unit_range(stream.meta_batch(step))) for step in itertools.count())


def summary(peer, tasks: list) -> tuple:
    """(mean %, 95% CI half-width) of the peer's accuracy over the episodes."""
    metric = MeanConfidenceInterval()
    for task in tasks:
        metric.update(torch.tensor(peer.accuracy(task)))
    mean, ci, _ = metric.compute()
    return round(mean.item(), 2), round(ci.item(), 2)


def train_peer(peer, setting: str, args, sizes: dict) -> dict:
    """M minutes of meta-steps (validation included), then the best weights tested."""
    data, evaluation_sampler, training_sampler = samplers(setting, args.omniglot_root)
    evaluation = evaluation_episodes(data, evaluation_sampler, sizes)
    stream = training_stream(training_sampler, sizes.get("meta_batch", PEER_META_BATCH), args.seed)
    budget, curve, best, steps = minutes(args, setting) * 60, [], (-1.0, None, 0), 0
    validation_seconds = 0.0  # the last validation's, kept free at the end of the budget
    start = time.perf_counter()
    for validation in range(1, VALIDATIONS + 1):
        end = budget * validation / VALIDATIONS - (validation_seconds if validation == VALIDATIONS else 0)
        while time.perf_counter() - start < end:
            peer.meta_step(next(stream))
            steps += 1
        validation_start = time.perf_counter()
        accuracy, ci = summary(peer, evaluation["val"])
        validation_seconds = time.perf_counter() - validation_start
        curve.append((round((time.perf_counter() - start) / 60, 2), accuracy))
        print(f"    val acc = {accuracy} ± {ci}% after {steps} meta-steps, {curve[-1][0]} min", flush=True)
        if accuracy > best[0]:
            best = (accuracy, peer.state(), steps)
    peer.load(best[1])
    accuracy, ci = summary(peer, evaluation["test"])
    return {"meta_steps": steps, "fit_minutes": curve[-1][0], "best_step": best[2],
            "test": f"{accuracy} ± {ci}", "evaluation": peer.evaluation, "curve": curve,
            "network": peer.network}


def make_peer(arm: str, setting: str, args, sizes: dict):
    ways = data_settings(setting)["ways"]
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)  # learn2learn's initialization draws from NumPy (scipy's truncnorm)
    if arm == "authors' iMAML":
        steps = sizes.get("inner_steps", AUTHORS_INNER_STEPS[ways])
        return AuthorsIMAML(import_authors_code(args.peer), ways, steps, sizes.get("cg_steps", 5))
    if reason := learn2learn_missing():
        raise PeerMissing(reason)
    return Learn2LearnMAML(ways)


def run_ours(arm: str, setting: str, cell: Path, args) -> dict:
    command = table2.flags(setting, "imaml-gd", args.omniglot_root, args.extra, args.seed)
    if arm == "ours, compiled":
        command += ["--model.compile_solver", "true"]
    result = table2.run_cell(cell, command, minutes(args, setting), table2.SETTINGS[setting][0])
    # As table2 reports a cell: tested with the training's inner steps or twice as many,
    # whichever validated better (on 20-way, 10 GD steps do not reach the inner minimizer).
    result = table2.evaluate_longer_adaptation(cell, command, result)
    inner_steps, test = table2.validated_evaluation(result)
    times, accuracy = table2.validation_curve(cell)
    return {**result, "test": test, "evaluation": f"{inner_steps} inner steps, chosen by validation",
            "curve": list(zip(times, accuracy)), "network": "ours (conv-4, ConvNet)"}


def cell_folder(args, setting: str, arm: str) -> Path:
    return Path(args.out) / f"{setting}_{arm.replace(' ', '-').replace(',', '').replace(chr(39), '')}"


def recorded_arms(args) -> dict:
    """{(setting, arm): record} of every finished arm under --out with this seed: a run of some
    arms (a session's share of a long comparison) reports them beside those run before."""
    records = {}
    for setting, arm in itertools.product(SETTINGS, ARMS):
        done = cell_folder(args, setting, arm) / "arm.json"
        if done.is_file() and (record := json.loads(done.read_text()))["seed"] == args.seed:
            records[(setting, arm)] = record
    return records


def run_arm(arm: str, setting: str, args, sizes: dict) -> None:
    cell = cell_folder(args, setting, arm)
    done = cell / "arm.json"
    if done.is_file():
        recorded = json.loads(done.read_text())
        if (recorded["minutes"], recorded["seed"]) != (minutes(args, setting), args.seed):
            sys.exit(f"error: {cell} holds a run of {recorded['minutes']} minutes with seed "
                     f"{recorded['seed']}: choose another --out for other minutes or seeds")
        return
    print(f"{setting}, {arm}: {minutes(args, setting)} minutes", flush=True)
    try:
        result = (run_ours(arm, setting, cell, args) if arm.startswith("ours")
                  else train_peer(make_peer(arm, setting, args, sizes), setting, args, sizes))
    except PeerMissing as missing:
        print(f"skipped {arm}: {missing}")
        return
    cell.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps({"arm": arm, "setting": setting, "minutes": minutes(args, setting),
                                "seed": args.seed, **result}, indent=2) + "\n")


def plot(results: dict, path: Path) -> None:
    from imaml_lightning.charts import new_figure

    settings = sorted({setting for setting, _ in results}, key=list(SETTINGS).index)
    figure = new_figure(5 * len(settings), 3.8)
    for axes, setting in zip(figure.subplots(1, len(settings), squeeze=False)[0], settings):
        for (s, arm), result in results.items():
            if s == setting:
                times, accuracy = zip(*result["curve"]) if result["curve"] else ((), ())
                axes.plot(times, accuracy, "o-", markersize=3, label=arm)
        axes.set(xlabel="wall-clock minutes of meta-training", ylabel="val accuracy (%)",
                 title=f"Omniglot {setting}, 200 validation episodes")
        axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"plot: {path}")


def main(args, sizes: dict) -> None:
    if not (Path(args.omniglot_root) / "images_background").is_dir():
        raise SystemExit(f"error: --omniglot-root={args.omniglot_root!r} is invalid: it holds no "
                         "images_background and images_evaluation folders (the Omniglot of "
                         "github.com/brendenlake/omniglot, unzipped)")
    for setting in args.settings:
        for arm in args.arms:
            run_arm(arm, setting, args, sizes)
    if not (results := recorded_arms(args)):
        raise SystemExit("no arm ran (see the lines above)")
    rows = [[setting, arm, result["network"], f"{result['meta_steps']} (best {result['best_step']})",
             result["fit_minutes"], result["evaluation"], f"{result['test']}%", "transductive"]
            for (setting, arm), result in results.items()]
    report = (f"{machine()}\nOmniglot, paper split, our episodes for every arm; test on the "
              "weights that validated best, the shipped config's fixed test episodes (the same "
              "for every arm), mean ± 95% CI\n\n"
              + markdown_table(["setting", "method", "network", "meta-steps", "fit minutes",
                                "adaptation at test", "test acc", "BatchNorm at test"], rows))
    print(f"\n{report}")
    (Path(args.out) / "peer_accuracy.md").write_text(report + "\n")
    plot(results, Path(args.out) / "peer_accuracy.png")


def minutes(args, setting: str) -> float:
    return args.minutes or SETTINGS[setting]


def positive_minutes(text: str) -> float:
    if not (minutes := float(text)) > 0:
        raise argparse.ArgumentTypeError(f"--minutes={text} is invalid: must be > 0")
    return minutes


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=positive_minutes, help="per arm (default: 20 for 5w1s, 45 for 20w1s)")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--seed", type=int, default=0, help="every arm's initialization and training tasks")
    parser.add_argument("--peer", default=PEER_ROOT, help="the authors' code (implicit_maml/)")
    parser.add_argument("--omniglot-root", default=OMNIGLOT_ROOT)
    parser.add_argument("--out", help="default: benchmarks/results/peer_accuracy (--quick: a temporary folder)")
    parser.add_argument("--quick", action="store_true", help=QUICK_HELP)
    args = parser.parse_args()
    args.omniglot_root = str(Path(args.omniglot_root).resolve())
    if args.quick:
        args.settings, args.extra = args.settings[:1], TINY_OMNIGLOT
        args.minutes = args.minutes or 0.1
        quick_sizes = {"val": 4, "test": 8, "meta_batch": 2, "inner_steps": 2, "cg_steps": 2}  # as TINY_OMNIGLOT
        with tempfile.TemporaryDirectory() as folder:
            args.out = str(Path(args.out or folder).resolve())
            main(args, quick_sizes)
    else:
        args.extra = []
        args.out = str(Path(args.out or ROOT / "benchmarks/results/peer_accuracy").resolve())
        Path(args.out).mkdir(parents=True, exist_ok=True)
        main(args, {})
