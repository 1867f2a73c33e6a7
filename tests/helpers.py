"""What several test files share: running the command line in a subprocess as a user (or a
launcher) would, reading what a run wrote, and small data written on the fly."""
import hashlib
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.func import functional_call

from benchmarks.meta_gradients import relative_distance
from imaml_lightning.checkpoint_io import AtomicCheckpointIO
from imaml_lightning.solver import Task, mse_loss

REPO = Path(__file__).resolve().parents[1]


def cli_command(*args) -> list:
    return [sys.executable, "-m", "imaml_lightning", *args]


def cli_env() -> dict:
    return {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO)}


def run_cli(workdir: Path, *args) -> subprocess.CompletedProcess:
    run = subprocess.run(cli_command(*args), cwd=workdir, env=cli_env(), capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    return run


def load(path: Path) -> dict:
    return torch.load(path, weights_only=False, map_location="cpu")


def tiny_omniglot(root, cache_dir, meta_batch_size: int = 2) -> list:
    """The shipped Omniglot config shrunk to seconds per step (an 8-channel conv-4, 2 inner and
    2 CG steps), 2 meta-steps with a validation at the end: for the compiled solver's tests."""
    return ["--config", str(REPO / "configs/omniglot_5way_1shot.yaml"), "--data.root", str(root),
            "--data.init_args.cache_dir", str(cache_dir),
            "--data.init_args.meta_batch_size", str(meta_batch_size),
            "--data.init_args.val_episodes", "4", "--model.solver.inner_steps", "2",
            "--model.solver.cg_steps", "2", "--model.net.init_args.hidden", "8",
            "--trainer.val_check_interval", "2", "--trainer.enable_progress_bar", "false"]


def assert_compiled_trains_as_eager(compiled: dict, eager: dict) -> None:
    """The same weights to float32 rounding (Inductor sums in another order), except a
    convolution's bias before BatchNorm: its gradient is 0 up to rounding, which Adam's
    normalized step turns into a full step either way."""
    for name, value in eager["state_dict"].items():
        if not re.fullmatch(r"net\.features\.\d+\.0\.bias", name):
            torch.testing.assert_close(compiled["state_dict"][name], value, rtol=1e-4, atol=1e-6)


def scalars(log_dir) -> dict:
    """Every TensorBoard scalar of a run folder: {tag: [(step, value), ...]}."""
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


# A sinusoid run for resume tests: small, with a cosine schedule whose state must be restored too.
RESUME_RUN = [
    "--config", str(REPO / "configs/sinusoid.yaml"), "--data.init_args.meta_batch_size", "4",
    "--data.init_args.val_episodes", "6", "--model.solver.inner_steps", "3",
    "--trainer.val_check_interval", "3", "--trainer.log_every_n_steps", "1",
    "--trainer.enable_progress_bar", "false",
    "--model.lr_schedule", "cosine", "--model.lr_schedule_steps", "10",
]


def assert_same_tree(a, b, where="checkpoint"):
    """Two checkpoints (nested dicts, lists, tensors) equal bit for bit, naming the first leaf
    that differs."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


FOLDER_CLASSES = [f"class_{c:02d}" for c in range(12)]
FOLDER_SIDE = 16


def noise(name: str, index: int, width: int = FOLDER_SIDE, height: int = FOLDER_SIDE) -> np.ndarray:
    """Seeded noise: an image's pixels alone say which file it is."""
    seed = int.from_bytes(hashlib.sha256(f"{name}/{index}".encode()).digest()[:8], "little")
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def make_root(root, classes=FOLDER_CLASSES, images=6):
    """An ImageFolder-style tree of noise PNGs: root/class/index.png."""
    for name in classes:
        (root / name).mkdir(parents=True)
        for index in range(images):
            Image.fromarray(noise(name, index)).save(root / name / f"{index}.png")
    return root


MINIIMAGENET_FILES = {"train": "train", "val": "validation", "test": "test"}


def write_fake_miniimagenet(root: Path, classes: dict, per_class: int, seed: int = 0) -> dict:
    """A fake Mini-ImageNet: the three pickles under root; returns {image bytes (HWC): (split, class name)}."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    owner = {}
    for split, mode in MINIIMAGENET_FILES.items():
        images = rng.integers(0, 256, (classes[split] * per_class, 84, 84, 3), dtype=np.uint8)
        # Members scattered through image_data, as nothing in the format promises blocks.
        order = rng.permutation(len(images)).reshape(classes[split], per_class)
        class_dict = {f"n{split}{c:03d}": order[c].tolist() for c in range(classes[split])}
        for name, ids in class_dict.items():
            owner.update({images[i].tobytes(): (split, name) for i in ids})
        with open(root / f"mini-imagenet-cache-{mode}.pkl", "wb") as file:
            pickle.dump({"image_data": images, "class_dict": class_dict}, file, protocol=4)
    return owner


def small_fake_miniimagenet(root: Path) -> Path:
    write_fake_miniimagenet(root, {"train": 3, "val": 2, "test": 2}, per_class=4)
    return root


# The solver's closed forms and small tasks (tests/solver).
def half_mse(output, target):  # L = (1/2n) ||Xw - y||^2, the loss of the closed form
    return 0.5 * mse_loss(output, target)


def ridge_tasks(tasks=3, n=20, d=6, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    shape = lambda *s: torch.randn(tasks, *s, generator=g, dtype=torch.float64)  # noqa: E731
    return Task(*(t.to(device) for t in (shape(n, d), shape(n, 1), shape(n, d), shape(n, 1))))


def closed_form_meta_gradient(theta, task, lam):
    """IMAML_NOTES.md: phi* = (H + lam I)^-1 (X^T y/n + lam theta), dphi*/dtheta = lam (H + lam I)^-1."""
    X, y, Xq, yq = task
    n, d = X.shape
    H = X.T @ X / n
    regularized = H + lam * torch.eye(d, dtype=X.dtype, device=X.device)
    phi = torch.linalg.solve(regularized, X.T @ y / n + lam * theta.T)
    query_grad = Xq.T @ (Xq @ phi - yq) / len(Xq)
    return (lam * torch.linalg.solve(regularized, query_grad)).T


def flat_functions(model, x, y, loss_fn):
    """(params, flat params, unflatten, flat -> network outputs, outputs -> loss)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    names, shapes = list(params), [p.shape for p in params.values()]
    sizes = [p.numel() for p in params.values()]

    def unflatten(flat):
        return {n: c.reshape(s) for n, c, s in zip(names, flat.split(sizes), shapes)}

    def outputs(flat):
        return functional_call(model, unflatten(flat), (x,))

    flat = torch.cat([p.flatten() for p in params.values()])
    return params, flat, unflatten, outputs, lambda z: loss_fn(z, y)


def omniglot_like_tasks(tasks=3, ways=5, shots=1, queries=2, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    images = lambda n: torch.rand(tasks, n, 1, 28, 28, generator=g).to(device)  # noqa: E731
    labels = lambda k: torch.arange(ways, device=device).repeat_interleave(k).expand(tasks, -1)  # noqa: E731
    return Task(images(ways * shots), labels(shots), images(ways * queries), labels(queries))


# Meta-gradients recorded step by step (benchmarks.meta_gradients.MetaGradientRecorder).
def recording(folder: Path, world: int) -> list:
    """[rank][step] as MetaGradientRecorder wrote them."""
    assert sorted(p.name for p in folder.glob("rank*.pt")) == [f"rank{r}.pt" for r in range(world)]
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(world)]


def assert_same_meta_gradients(reference: list, ranks: list, environment: str, steps: int) -> None:
    """`ranks` ([rank][step] recordings of a launch) against `reference` (one process that
    replayed the launch's parameters): at every step the same episodes, split across the ranks
    in rank order, and the same meta-gradient but for the order of the sums."""
    assert [s["step"] for s in reference] == list(range(steps))
    for rank, recorded_steps in enumerate(ranks):
        assert [(s["step"], s["rank"], s["world_size"], s["environment"])
                for s in recorded_steps] == [(step, rank, len(ranks), environment)
                                             for step in range(steps)]
    for step, one in enumerate(reference):
        each = [recorded_steps[step] for recorded_steps in ranks]
        # Rank r solved the r-th share of the global meta-batch: the episodes one process solves.
        assert sum((s["tasks"] for s in each), []) == one["tasks"], step
        # Every rank applies the same all-reduced meta-gradient ...
        assert all(torch.equal(s["grad"][k], v) for s in each for k, v in each[0]["grad"].items()), step
        # ... which is one process's, but for the order of the sums (5.5e-8 seen).
        assert relative_distance(each[0]["grad"], one["grad"]) <= 1e-6, step


class RecordingCheckpointIO(AtomicCheckpointIO):
    """The shipped checkpoint writer, noting each write in `log` (a JSON line: the writing
    process's global rank, the file, the step), to show which processes write last.ckpt."""

    def __init__(self, log: str):
        super().__init__()
        self.log = log

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        super().save_checkpoint(checkpoint, path, storage_options)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else None
        with open(self.log, "a") as log:
            log.write(json.dumps({"rank": rank, "file": Path(path).name,
                                  "step": checkpoint["global_step"]}) + "\n")
