"""The trained models shipped in models/: each file is the one recorded (SHA-256), holds weights
and settings only, tests to its recorded accuracy on its first test episodes, and predicts."""
import csv
import hashlib
import json
import re
import shutil

import pytest
import torch

from imaml_lightning.checkpointing import SHAREABLE_KEYS
from imaml_lightning.data.omniglot import list_characters, locate, paper_split
from tests.helpers import REPO, run_cli

MODELS = REPO / "models"
RECORDS = json.loads((MODELS / "models.json").read_text()) if (MODELS / "models.json").is_file() else {}


def test_every_shipped_file_is_recorded_with_its_hash_and_holds_weights_and_settings_only():
    assert sorted(p.name for p in MODELS.glob("*.ckpt")) == sorted(r["file"] for r in RECORDS.values())
    sums = (MODELS / "SHA256SUMS").read_text().splitlines() if RECORDS else []
    assert sorted(sums) == sorted(f"{r['sha256']}  {r['file']}" for r in RECORDS.values())
    for record in RECORDS.values():
        path = MODELS / record["file"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == record["sha256"]
        assert path.stat().st_size < 1_000_000
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        assert set(checkpoint) == set(SHAREABLE_KEYS)
        assert checkpoint["run_settings"]["data.init_args.root"] == "data/omniglot"  # no machine's path


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_a_shipped_model_tests_to_its_recorded_accuracy(name, omniglot_root, cache_dir, tmp_path):
    record = RECORDS[name]
    run = run_cli(tmp_path, "test", "--config", str(REPO / record["config"]), "--ckpt_path",
                  str(MODELS / record["file"]), "--data.root", str(omniglot_root),
                  "--data.init_args.cache_dir", str(cache_dir),
                  "--data.init_args.test_episodes", str(record["small_set"]["episodes"]),
                  "--trainer.enable_progress_bar", "false")
    (accuracy,) = re.findall(r"test/acc = ([0-9.]+) ±", run.stdout + run.stderr)
    assert accuracy == record["small_set"]["acc"]


def held_out_characters(omniglot_root, count: int) -> list:
    """The image files of the first `count` test characters of the paper split."""
    characters = list_characters(locate(omniglot_root))
    return [characters[i] for i in paper_split(characters)["test"][:count].tolist()]


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_a_shipped_model_labels_held_out_characters(name, omniglot_root, tmp_path):
    """The README's predict example with each shipped model: as many characters as it was
    trained for (never seen in training), as many drawings of each as support as its shots, their
    other drawings as queries."""
    ways, shots = map(int, re.match(r"(\d+)w(\d+)s", RECORDS[name]["setting"]).groups())
    for index, files in enumerate(held_out_characters(omniglot_root, ways)):
        files = sorted(files)
        for folder, chosen in (("support", files[:shots]), ("query", files[shots:])):
            (tmp_path / folder / f"c{index}").mkdir(parents=True)
            for file in chosen:
                shutil.copy(file, tmp_path / folder / f"c{index}")
    run_cli(tmp_path, "predict", "--ckpt_path", str(MODELS / RECORDS[name]["file"]),
            "--support", "support", "--query", "query", "--out", "predictions.csv")
    with open(tmp_path / "predictions.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == ways * (20 - shots)  # Omniglot has 20 drawings of each character
    right = sum(row["path"].split("/")[-2] == row["predicted"] for row in rows)
    assert right >= 0.8 * len(rows), f"{right} of {len(rows)}"
