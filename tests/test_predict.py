"""`predict` on a small checkpoint trained here: a user's support folder and queries in, a CSV
and an exported adapted network out, equal to what evaluation computes on the same task."""
import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from imaml_lightning.data.folder import FolderDataModule, list_images
from imaml_lightning.predict import load_model, main
from imaml_lightning.solver import Task, adapt_and_predict
from tests.helpers import REPO, make_root, noise, run_cli

CLASSES = [f"class_{c:02d}" for c in range(6)]  # 2 per split: 2-way training
SIDE = 16


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(checkpoint, training root, cache) of a 2-way 2-shot conv net on 16x16 RGB folders."""
    work = tmp_path_factory.mktemp("predict")
    root = make_root(work / "root", CLASSES, images=6)
    run_cli(work, "fit", "--config", str(REPO / "configs/folder_5way_1shot.yaml"),
            "--data.init_args.root", str(root), "--data.init_args.cache_dir", str(work / "cache"),
            "--data.init_args.ways", "2", "--data.init_args.shots", "2", "--data.init_args.queries", "2",
            "--data.init_args.image_size", str(SIDE),
            "--data.init_args.split_ratios", "[0.34, 0.33, 0.33]",
            "--data.init_args.meta_batch_size", "2", "--data.init_args.val_episodes", "2",
            "--model.net.init_args.image_size", str(SIDE), "--model.net.init_args.hidden", "8",
            "--model.net.init_args.max_pool", "false", "--model.solver.inner_steps", "2",
            "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
            "--trainer.enable_progress_bar", "false", "--charts.every_n_steps", "0")
    return work / "checkpoints" / "last.ckpt", root, work / "cache"


def episode(root: Path, folder: Path, classes, shots=2):
    """support/<class>/ with the first `shots` images of each class, query/<class>/ the rest."""
    for name in classes:
        images = sorted((root / name).glob("*.png"))
        for kind, chosen in (("support", images[:shots]), ("query", images[shots:])):
            (folder / kind / name).mkdir(parents=True, exist_ok=True)
            for image in chosen:
                shutil.copy(image, folder / kind / name / image.name)
    return folder / "support", folder / "query"


def read_csv(path: Path):
    with open(path, newline="") as file:
        rows = list(csv.reader(file))
    return rows[0], rows[1:]


def predict(*args):
    with pytest.raises(SystemExit) as stop:
        main(list(map(str, args)))
        raise SystemExit(0)
    return stop.value.code


def test_predict_equals_what_evaluation_computes_for_the_same_task(trained, tmp_path):
    ckpt, root, cache = trained
    support, query = episode(root, tmp_path, CLASSES[:2])
    out = tmp_path / "predictions.csv"
    run_cli(tmp_path, "predict", "--ckpt_path", ckpt, "--support", support, "--query", query,
            "--out", out, "--save_adapted", tmp_path / "adapted.pt2")
    header, rows = read_csv(out)
    assert header == ["path", "predicted", *CLASSES[:2]]
    assert len(rows) == 2 * 4 and all(Path(r[0]).parent.parent == query for r in rows)
    probabilities = torch.tensor([[float(v) for v in r[2:]] for r in rows])
    torch.testing.assert_close(probabilities.sum(1), torch.ones(len(rows)), atol=1e-5, rtol=0)
    assert [r[1] for r in rows] == [CLASSES[i] for i in probabilities.argmax(1).tolist()]

    # The same task as `test --model.batch_norm support` scores it, from the training cache's
    # images (so the preprocessing is compared too).
    data = FolderDataModule(root=str(root), cache_dir=str(cache), image_size=SIDE, channels=3,
                            split_ratios=(0.34, 0.33, 0.33))
    images, _ = data.load()
    files = [p.relative_to(root) for paths in list_images(root).values() for p in paths]
    pick = lambda paths: images.images[[files.index(p) for p in paths]].float() / 255  # noqa: E731
    support_files = [Path(c) / p.name for c in CLASSES[:2] for p in sorted((support / c).iterdir())]
    query_files = [Path(r[0]).relative_to(query) for r in rows]
    task = Task(pick(support_files)[None], torch.tensor([0, 0, 1, 1])[None],
                pick(query_files)[None], torch.zeros(1, len(rows), dtype=torch.long))
    model, _ = load_model(str(ckpt), {}, None)
    expected = adapt_and_predict(model.net, model.params(), task, model.loss_fn, model.config,
                                 batch_norm="support")[0, :, :2].softmax(-1)
    torch.testing.assert_close(probabilities, expected.detach(), atol=1e-5, rtol=0)

    # The exported adapted network, run with plain PyTorch, gives the CSV's probabilities.
    extra = {"classes.json": ""}
    network = torch.export.load(tmp_path / "adapted.pt2", extra_files=extra).module()
    assert json.loads(extra["classes.json"]) == CLASSES[:2]
    torch.testing.assert_close(network(pick(query_files)), probabilities, atol=1e-5, rtol=0)


def test_a_prediction_does_not_depend_on_the_other_queries(trained, tmp_path, device):
    ckpt, root, _ = trained
    support, query = episode(root, tmp_path, CLASSES[:2])
    accelerator = "gpu" if torch.device(device).type == "cuda" else "cpu"
    for size in (1, 50):
        assert predict("--ckpt_path", ckpt, "--support", support, "--query", query,
                       "--batch_size", size, "--out", tmp_path / f"{size}.csv",
                       "--accelerator", accelerator) == 0
    one, fifty = (torch.tensor([[float(v) for v in r[2:]] for r in read_csv(tmp_path / f"{n}.csv")[1]])
                  for n in (1, 50))
    torch.testing.assert_close(one, fifty, atol=1e-5, rtol=0)


def test_fewer_support_classes_than_outputs_use_the_first_outputs(trained, tmp_path):
    ckpt, root, _ = trained
    support, query = episode(root, tmp_path, CLASSES[:1] + CLASSES[3:4])
    shutil.rmtree(support / CLASSES[3])
    shutil.rmtree(query / CLASSES[3])
    (support / CLASSES[3]).mkdir()
    shutil.copy(next((root / CLASSES[3]).glob("*.png")), support / CLASSES[3] / "a.png")
    assert predict("--ckpt_path", ckpt, "--support", support, "--query", query / CLASSES[0],
                   "--out", tmp_path / "p.csv") == 0
    header, rows = read_csv(tmp_path / "p.csv")
    assert header[2:] == [CLASSES[0], CLASSES[3]] and len(rows) == 4


def bad_inputs(tmp_path, ckpt, root):
    support, query = episode(root, tmp_path, CLASSES[:2])
    (tmp_path / "empty_class" / "a").mkdir(parents=True)
    shutil.copytree(support, tmp_path / "empty_class", dirs_exist_ok=True)
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "foreign.ckpt").write_bytes(b"\x00garbage")
    torch.save({"state_dict": {}, "global_step": 1}, tmp_path / "other.ckpt")
    too_many = tmp_path / "too_many"
    episode(root, too_many, CLASSES[:3])
    ok = ["--ckpt_path", ckpt, "--support", support, "--query", query]
    return {
        "a support class with no images": (
            ["--ckpt_path", ckpt, "--support", tmp_path / "empty_class", "--query", query],
            "support=", "class folder 'a' holds no images"),
        "a query path that does not exist": (
            ok[:4] + ["--query", tmp_path / "nowhere"], "query=", "no such file or folder"),
        "a corrupt image": (ok[:4] + ["--query", tmp_path / "corrupt"], "query is invalid",
                            "broken.png"),
        "a damaged checkpoint": (["--ckpt_path", tmp_path / "foreign.ckpt"] + ok[2:], "ckpt_path=",
                                 "not a checkpoint that torch.load can read"),
        "a checkpoint not ours": (["--ckpt_path", tmp_path / "other.ckpt"] + ok[2:], "ckpt_path=",
                                  "this program's `fit`"),
        "more classes than outputs": (
            ["--ckpt_path", ckpt, "--support", too_many / "support", "--query", query],
            "support=", "holds 3 classes, the model has 2 outputs"),
        "--out in a folder that does not exist": (ok + ["--out", tmp_path / "no" / "p.csv"],
                                                  "out=", "does not exist"),
        "a solver override out of range": (ok + ["--model.solver.lam", "-1"],
                                           "model.solver.lam=-1.0", "must be > 0"),
    }


@pytest.mark.parametrize("case", ["a support class with no images", "a query path that does not exist",
                                  "a corrupt image", "a damaged checkpoint", "a checkpoint not ours",
                                  "more classes than outputs", "--out in a folder that does not exist",
                                  "a solver override out of range"])
def test_bad_input_is_one_line_and_writes_nothing(trained, tmp_path, monkeypatch, case):
    ckpt, root, _ = trained
    args, setting, why = bad_inputs(tmp_path, ckpt, root)[case]
    monkeypatch.chdir(tmp_path)
    before = sorted(p for p in tmp_path.rglob("*"))
    message = predict(*args)
    assert isinstance(message, str) and "\n" not in message, message
    assert message.startswith(f"error: {setting}") and why in message, message
    assert sorted(p for p in tmp_path.rglob("*")) == before  # no predictions.csv, nothing else


def test_images_the_network_cannot_take_are_one_line(tmp_path, monkeypatch):
    """A model trained on native-size images (data.image_size null) and support images of
    another size: the error names the preprocessed shape (channels are converted as in training,
    so only the size can differ)."""
    root = make_root(tmp_path / "root", CLASSES, images=6)
    run_cli(tmp_path, "fit", "--config", str(REPO / "configs/folder_5way_1shot.yaml"),
            "--data.init_args.root", str(root), "--data.init_args.cache_dir", str(tmp_path / "cache"),
            "--data.init_args.ways", "2", "--data.init_args.queries", "2",
            "--data.init_args.image_size", "null", "--data.init_args.split_ratios", "[0.34, 0.33, 0.33]",
            "--data.init_args.meta_batch_size", "2", "--data.init_args.val_episodes", "2",
            "--model.net.init_args.image_size", str(SIDE), "--model.net.init_args.hidden", "8",
            "--model.net.init_args.max_pool", "false", "--model.solver.inner_steps", "1",
            "--trainer.max_steps", "1", "--trainer.val_check_interval", "1",
            "--trainer.enable_progress_bar", "false", "--charts.every_n_steps", "0")
    support = tmp_path / "support"
    for name in CLASSES[:2]:
        (support / name).mkdir(parents=True)
        Image.fromarray(noise(name, 0, width=2 * SIDE, height=2 * SIDE)).save(support / name / "0.png")
    monkeypatch.chdir(tmp_path)
    message = predict("--ckpt_path", tmp_path / "checkpoints" / "last.ckpt", "--support", support,
                      "--query", support)
    assert message.startswith("error: support is invalid: its images are [3, 32, 32]"), message
    assert not (tmp_path / "predictions.csv").exists()


def test_regression_checkpoints_take_csv_points(tmp_path):
    run_cli(tmp_path, "fit", "--config", str(REPO / "configs/sinusoid.yaml"), "--trainer.max_steps", "3",
            "--trainer.val_check_interval", "3", "--data.init_args.val_episodes", "4",
            "--trainer.enable_progress_bar", "false", "--charts.every_n_steps", "0")
    x = torch.linspace(-4, 4, 10)[:, None]
    y = 2 * torch.sin(x + 0.5)
    (tmp_path / "support.csv").write_text("x,y\n" + "".join(f"{a},{b}\n" for a, b in zip(x[:, 0].tolist(), y[:, 0].tolist())))
    queries = torch.tensor([[-3.0], [0.0], [2.5]])
    (tmp_path / "query.csv").write_text("x\n-3\n0\n2.5\n")
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert predict("--ckpt_path", ckpt, "--support", tmp_path / "support.csv",
                   "--query", tmp_path / "query.csv", "--out", tmp_path / "y.csv") == 0
    header, rows = read_csv(tmp_path / "y.csv")
    assert header == ["input", "predicted_0"] and [r[0] for r in rows] == ["-3", "0", "2.5"]
    model, _ = load_model(str(ckpt), {}, None)
    task = Task(x[None], y[None], queries[None], torch.zeros(1, 3, 1))
    expected = adapt_and_predict(model.net, model.params(), task, model.loss_fn, model.config)[0]
    torch.testing.assert_close(torch.tensor([[float(r[1])] for r in rows]), expected.detach(),
                               atol=1e-5, rtol=1e-5)
