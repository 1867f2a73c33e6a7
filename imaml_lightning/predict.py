"""`python -m imaml_lightning predict --ckpt_path CKPT --support DIR --query DIR_OR_FILES...`:
adapt a meta-trained model to a user's few labelled examples and label new ones.

Our own subcommand rather than LightningCLI's `predict`: that one rebuilds the data module from
the command line, so a user would repeat every training data flag, and its data is episodes of
the training dataset, not a user's folders. Here the checkpoint supplies the network, the
preprocessing (its data module's settings) and the solver settings; the command line may
override the solver's (--model.solver.NAME, --model.test_inner_steps). Lightning's Trainer
still runs the prediction (devices, progress bar, batches).
"""
import csv
import sys
from argparse import ArgumentError
from dataclasses import fields
from importlib import import_module
from pathlib import Path
from typing import List, Optional

import pytorch_lightning as pl
import torch
from jsonargparse import ArgumentParser
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from imaml_lightning.cli import check_checkpoint_file
from imaml_lightning.data.images import ImageClassificationDataModule
from imaml_lightning.data.prediction import (
    PredictionData, QueryImages, SupportSet, list_query_files, read_numbers, read_support_images,
)
from imaml_lightning.errors import SettingError, require, summarize_parse_error
from imaml_lightning.export import save_adapted_network
from imaml_lightning.module import IMAML
from imaml_lightning.run_settings import forward_error, section, upgrade
from imaml_lightning.solver import SolverConfig

NOT_MODEL_ARGUMENTS = ("_instantiator", "_class_path")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m imaml_lightning predict", exit_on_error=False,
                            description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt_path", type=str, required=True, help="a checkpoint of `fit`")
    parser.add_argument("--support", type=str, required=True,
                        help="images: a folder of class folders (ImageFolder layout, K >= 1 "
                             "images each); regression: a CSV of input,target rows")
    parser.add_argument("--query", type=str, nargs="+", required=True,
                        help="images: folders (searched recursively) or files; regression: a "
                             "CSV of input rows")
    parser.add_argument("--out", type=str, default="predictions.csv", help="the CSV written")
    parser.add_argument("--save_adapted", type=Optional[str], default=None,
                        help="also write the adapted network (torch.export program, .pt2)")
    parser.add_argument("--batch_size", type=int, default=64, help="queries per batch")
    parser.add_argument("--num_workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--accelerator", type=str, default="auto", help="cpu, gpu, auto")
    parser.add_argument("--model.test_inner_steps", type=Optional[int], default=None,
                        help="inner steps of the adaptation (default: the checkpoint's)")
    for field in fields(SolverConfig):
        parser.add_argument(f"--model.solver.{field.name}", type=Optional[field.type], default=None,
                            help="(default: the checkpoint's)")
    return parser


def import_object(path: str):
    module, _, name = path.rpartition(".")
    return getattr(import_module(module), name)


def load_model(ckpt_path: str, solver_overrides: dict, test_inner_steps: Optional[int]):
    """The trained IMAML with the checkpoint's network and settings (the overrides over them),
    and the checkpoint's run settings."""
    check_checkpoint_file(ckpt_path)
    checkpoint = upgrade(torch.load(ckpt_path, map_location="cpu", weights_only=False))
    settings = checkpoint.get("run_settings")
    require(bool(settings) and "model.net.class_path" in settings, "ckpt_path", ckpt_path,
            "a checkpoint of this program's `fit` command (it records the network and data "
            "settings), not of another script")
    net_class = import_object(settings["model.net.class_path"])
    net_args = section(settings, "model.net.init_args.")
    hparams = {k: v for k, v in checkpoint["hyper_parameters"].items() if k not in NOT_MODEL_ARGUMENTS}
    solver = {**hparams.pop("solver"), **solver_overrides}
    if test_inner_steps is not None:
        hparams["test_inner_steps"] = test_inner_steps
    try:
        model = IMAML(net=lambda n: net_class(n, **net_args), solver=SolverConfig(**solver), **hparams)
    except SettingError as error:
        raise SettingError(f"model.{error}" if str(error).startswith("solver.") else str(error)) from None
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval(), settings


def training_data(settings: dict):
    """The checkpoint's data module, built from its settings (nothing is read): it knows how
    its images were preprocessed."""
    return import_object(settings["data.class_path"])(**section(settings, "data.init_args."))


def read_inputs(model: IMAML, settings: dict, support: str, query: List[str]):
    """(SupportSet, query Dataset, query names) read as the checkpoint's training data was."""
    if not model.classification:  # rows of numbers: as many inputs as the first layer takes
        layers = [m for m in model.net.modules() if isinstance(m, torch.nn.Linear)]
        require(bool(layers), "ckpt_path", settings["model.net.class_path"],
                "predict reads regression inputs for networks that start with nn.Linear")
        inputs = layers[0].in_features
        points = read_numbers(Path(support), "support", inputs + model.hparams.out_features)
        require(len(query) == 1, "query", query, "must be one CSV file of input rows")
        queries = read_numbers(Path(query[0]), "query", inputs)
        return (SupportSet(points[:, :inputs], points[:, inputs:], []), queries,
                [",".join(f"{v:g}" for v in row) for row in queries.tolist()])
    data = training_data(settings)
    require(isinstance(data, ImageClassificationDataModule), "ckpt_path", settings["data.class_path"],
            "predict reads images as an image dataset's data module does; this one has no reader")
    support_set = read_support_images(Path(support), data.read_image_file)
    outputs = model.hparams.out_features
    require(len(support_set.classes) <= outputs, "support", support,
            f"holds {len(support_set.classes)} classes, the model has {outputs} outputs "
            f"(it was meta-trained on {outputs}-way tasks): use at most {outputs}")
    files = list_query_files(query)
    check_network_takes(model, support_set.x)
    return support_set, QueryImages(files, data.read_image_file), [str(f) for f in files]


def check_network_takes(model: IMAML, x: torch.Tensor) -> None:
    error = forward_error(model.net, x[:2])
    if error:
        raise SettingError(f"support is invalid: its images are {list(x.shape[1:])} after "
                           f"preprocessing, which the checkpoint's network does not take ({error})")


def check_writable(setting: str, path: Optional[str]) -> None:
    if path is not None:
        folder = Path(path).resolve().parent
        require(folder.is_dir(), setting, path, f"its folder {folder} does not exist")


def write_csv(path: str, names: List[str], outputs: torch.Tensor, support: SupportSet) -> None:
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        if support.classes:
            writer.writerow(["path", "predicted", *support.classes])
            for name, p in zip(names, outputs.tolist()):
                writer.writerow([name, support.classes[max(range(len(p)), key=p.__getitem__)],
                                 *(f"{v:.6g}" for v in p)])
        else:
            writer.writerow(["input", *(f"predicted_{i}" for i in range(outputs.shape[1]))])
            for name, y in zip(names, outputs.tolist()):
                writer.writerow([name, *(f"{v:.6g}" for v in y)])


def summary(names: List[str], outputs: torch.Tensor, support: SupportSet, out: str) -> str:
    line = f"predicted {len(names)} queries into {out}"
    if not support.classes:
        return line
    predicted = [support.classes[i] for i in outputs.argmax(-1).tolist()]
    counts = ", ".join(f"{c} {predicted.count(c)}" for c in support.classes)
    line += f" ({len(support.classes)} classes; predicted: {counts})"
    # Queries filed under folders named after the support classes: report the accuracy too.
    truth = [Path(n).parent.name for n in names]
    if all(t in support.classes for t in truth):
        accuracy = sum(t == p for t, p in zip(truth, predicted)) / len(names)
        line += f"; accuracy {100 * accuracy:.2f}% by the query folders' names"
    return line


def run(args) -> None:
    check_writable("out", args.out)
    check_writable("save_adapted", args.save_adapted)
    require(args.batch_size >= 1, "batch_size", args.batch_size, "must be >= 1")
    overrides = {k: v for k, v in vars(args.model.solver).items() if v is not None}
    model, settings = load_model(args.ckpt_path, overrides, args.model.test_inner_steps)
    support, queries, names = read_inputs(model, settings, args.support, args.query)
    data = PredictionData(support, queries, args.batch_size, args.num_workers)
    trainer = pl.Trainer(accelerator=args.accelerator, devices=1, logger=False,
                         enable_checkpointing=False, inference_mode=False)
    outputs = torch.cat([o.cpu() for o in trainer.predict(model, datamodule=data)])
    write_csv(args.out, names, outputs, support)
    if args.save_adapted:
        save_adapted_network(model, args.save_adapted, support.classes)
    print(summary(names, outputs, support, args.out))


def main(argv=None) -> None:
    parser = build_parser()
    try:
        args = parser.parse_args(sys.argv[2:] if argv is None else argv)
        run(args)
    except SettingError as error:
        sys.exit(f"error: {error}")
    except MisconfigurationException as error:
        sys.exit(f"error: a trainer setting is invalid: {str(error).splitlines()[0]}")
    except ArgumentError as error:
        sys.exit(f"error: {summarize_parse_error(str(error))} (--help lists every setting)")
