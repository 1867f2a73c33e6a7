"""Whether episode loading holds training back: sampler speed, and data wait per meta-step.

On the real Omniglot:

1. Episodes per second of two samplers of the same N-way K-shot tasks: learn2learn's task
   machinery (MetaDataset + TaskDataset with NWays, KShots, LoadData, RemapLabels,
   ConsecutiveLabels) and ours (imaml_lightning.data.images.ClassificationTasks, tensor indexing).
2. For 5-way 1-shot and 20-way 5-shot: seconds to fetch one meta-batch from the training
   DataLoader in the main process (num_workers=0, the default: the step waits for all of it)
   against the seconds of the meta-step that consumes it (shipped Omniglot solver settings).
   Target: data waits <= 2% of the step.
3. Steps much shorter than this CPU's (a GPU's), for Omniglot and for Mini-ImageNet-shaped data
   (its config: 5-way 1-shot, 15 queries, meta-batch 32, 84x84 RGB): the wait per step with
   DataLoader workers while the main process is busy for an assumed step time (a sleep: the
   GPU works while the CPU idles). Batches travel as uint8; their conversion to float happens
   on the device (ImageClassificationDataModule.on_after_batch_transfer), inside the step.
4. learn2learn's datasets (Learn2LearnDataModule): for the shape of each one's train split
   (classes, images per class, image size), generated images, 5-way 1-shot with 15 queries:
   episodes per second of learn2learn's Taskset.sample() and of ours on the same data, and our
   fetch time of a meta-batch against a meta-step on that image size (conv-4, 32 filters).

The latest tables, with their date and machine: docs/benchmarks.md.

Usage: python -m benchmarks.data_pipeline [--omniglot-root ../shared/data/omniglot]
       [--sections omniglot workers learn2learn]
       python -m benchmarks.data_pipeline --quick   (one setting and one dataset, short samples)
"""
import argparse
import tempfile
import time
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from benchmarks.common import OMNIGLOT_ROOT, QUICK_HELP, machine, markdown_table, median_seconds
from imaml_lightning.data import OmniglotDataModule
from imaml_lightning.data.base import EpisodicDataModule
from imaml_lightning.data.episodes import task_generator
from imaml_lightning.data.images import ClassificationTasks, LabeledImages, to_unit_range
from imaml_lightning.models import ConvNet
from imaml_lightning.solver import SolverConfig, Task, meta_gradient, surrogate_loss

SETTINGS = [(5, 1, 5, 8), (20, 5, 5, 8)]  # ways, shots, queries, meta-batch
SHIPPED = SolverConfig(lam=0.5, inner_steps=10, inner_lr=0.3, cg_steps=5)  # configs/omniglot_5way_1shot.yaml
# The train split of each of learn2learn's datasets: classes, images per class (mean), side.
LEARN2LEARN_SHAPES = {
    "tiered-imagenet": (351, 1278, 84), "cifarfs": (64, 600, 32), "fc100": (60, 600, 32),
    "cub": (140, 59, 84), "aircraft": (70, 100, 84), "vgg-flowers": (71, 80, 84), "dtd": (33, 120, 84),
}
# Distinct generated images, which the classes index into: sampling costs the same as from
# distinct images held in memory; from a cache larger than memory, a first touch of an image
# also reads it from disk (benchmarks/studies/memmap_rss.py times sampling from such a file).
POOL = 2000


class Sizes(NamedTuple):
    """How much of each section runs: all of it, or --quick's sample."""
    sampling_seconds: float  # per sampler, for its episodes per second
    omniglot_settings: list  # of SETTINGS
    worker_steps: int  # timed steps + 5 of warm-up, per DataLoader
    step_scale: float  # of the assumed step times of the workers section
    synthetic_per_class: int  # images per class of the Mini-ImageNet-shaped data
    learn2learn_datasets: list  # of LEARN2LEARN_SHAPES
    learn2learn_batch: int  # tasks per meta-batch on learn2learn's datasets
    solver: SolverConfig  # of the meta-steps
    hidden: tuple  # channels of the conv-4 on Omniglot, and on learn2learn's datasets


FULL = Sizes(3.0, SETTINGS, 40, 1.0, 100, list(LEARN2LEARN_SHAPES), 4, SHIPPED, (64, 32))
QUICK = Sizes(0.2, SETTINGS[:1], 7, 0.1, 20, ["cifarfs"], 1,  # 20 images: a shot and 15 queries
              SolverConfig(lam=0.5, inner_steps=2, inner_lr=0.3, cg_steps=2), (8, 8))


def episodes_per_second(sample, seconds: float = 3.0) -> float:
    sample(0)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        count += 1
        sample(count)
    return count / (time.perf_counter() - start)


def learn2learn_sampler(data_module, ways: int, shots: int, queries: int):
    """The same train split through learn2learn's TaskDataset (rotations off: it has no
    rotation-as-class transform; ours is measured both ways)."""
    import learn2learn as l2l

    tasks = data_module.sampler
    classes = tasks.splits["train"].tolist()
    indices = torch.cat([tasks.members[c][: tasks.counts[c]] for c in classes])
    labels = torch.cat([torch.full((tasks.counts[c].item(),), c) for c in classes])
    images = tasks.images[indices]  # uint8, as ours returns them
    dataset = torch.utils.data.TensorDataset(images, labels)
    meta = l2l.data.MetaDataset(dataset, indices_to_labels=dict(enumerate(labels.tolist())))
    taskset = l2l.data.TaskDataset(meta, num_tasks=-1, task_transforms=[
        l2l.data.transforms.NWays(meta, ways),
        l2l.data.transforms.KShots(meta, shots + queries),
        l2l.data.transforms.LoadData(meta),
        l2l.data.transforms.RemapLabels(meta),
        l2l.data.transforms.ConsecutiveLabels(meta),
    ])
    return lambda i: taskset.sample()


def data_module(root: str, cache: str, ways: int, shots: int, queries: int, batch: int,
                rotations: str = "classes") -> OmniglotDataModule:
    dm = OmniglotDataModule(root=root, ways=ways, shots=shots, queries=queries, download=False,
                            meta_batch_size=batch, cache_dir=cache, rotations=rotations)
    dm.setup("fit")
    return dm


def solver_text(sizes: Sizes) -> str:
    solver = sizes.solver
    return f"lam {solver.lam}, {solver.inner_steps} GD steps, {solver.cg_steps} CG steps"


def step_seconds(batch, sizes: Sizes, net: Optional[torch.nn.Module] = None) -> float:
    """One meta-step of the solver settings (the shipped ones but for --quick) on this
    meta-batch, with the Adam update (default network: Omniglot's conv-4)."""
    torch.manual_seed(0)
    if net is None:
        net = ConvNet(batch[1].max().item() + 1, hidden=sizes.hidden[0])
    params = dict(net.named_parameters())
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    tasks = Task(*to_unit_range(batch))

    def step():
        result = meta_gradient(net, params, tasks, F.cross_entropy, sizes.solver, diagnose_before=False)
        optimizer.zero_grad()
        surrogate_loss(params, result.grads).backward()
        optimizer.step()

    return median_seconds(step, repeats=3)


class SyntheticImages(EpisodicDataModule):
    """Mini-ImageNet-shaped classes of random pixels (sampling cost depends on the shapes)."""

    def __init__(self, ways, shots, queries, classes=(64, 16, 20), per_class=100, side=84, **kw):
        super().__init__(**kw)
        total = sum(classes) * per_class
        images = torch.randint(0, 256, (total, 3, side, side), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(0))
        members = list(torch.arange(total).view(sum(classes), per_class))
        ids = torch.arange(sum(classes)).split(list(classes))
        self.tasks = ClassificationTasks(LabeledImages(images, members, [""] * sum(classes)),
                                         dict(zip(("train", "val", "test"), ids)), ways, shots,
                                         queries)

    def make_sampler(self):
        return self.tasks


def waits_with_workers(dm: EpisodicDataModule, workers: int, step: float, steps: int = 40):
    """Mean seconds next() blocks per step when the consumer is busy `step` seconds."""
    dm.num_workers = workers
    loader = iter(dm.train_dataloader())
    next(loader)  # workers started
    waits = []
    for _ in range(steps):
        start = time.perf_counter()
        next(loader)
        waits.append(time.perf_counter() - start)
        time.sleep(step)
    return sum(waits[5:]) / len(waits[5:])


def worker_rows(root: str, cache: str, sizes: Sizes):
    setups = [("Omniglot 5-way 1-shot, 5 queries", 8, 0.1 * sizes.step_scale,
               lambda: data_module(root, cache, 5, 1, 5, 8)),
              ("Mini-ImageNet-shaped 5-way 1-shot, 15 queries", 32, 0.5 * sizes.step_scale,
               lambda: SyntheticImages(5, 1, 15, per_class=sizes.synthetic_per_class, meta_batch_size=32))]
    rows = []
    for name, batch, step, make in setups:
        dm = make()
        dm.setup("fit")
        for workers in (0, 2):
            wait = waits_with_workers(dm, workers, step, sizes.worker_steps)
            rows.append([name, batch, f"{step:.2f} (assumed)", workers, f"{wait * 1e3:.1f}",
                         f"{100 * wait / (wait + step):.2f}%", "<= 2%"])
    return rows


def generated_split(classes: int, per_class: int, side: int):
    """(LabeledImages, image index of every member) of one dataset's shape, from a pool."""
    generator = torch.Generator().manual_seed(0)
    pool = torch.randint(0, 256, (POOL, 3, side, side), dtype=torch.uint8, generator=generator)
    index = torch.randint(0, POOL, (classes * per_class,), generator=generator)
    members = list(index.view(classes, per_class))
    return LabeledImages(pool, members, [str(c) for c in range(classes)]), index


def learn2learn_taskset(data: LabeledImages, index: torch.Tensor, ways: int, shots: int):
    """learn2learn's Taskset over the same images, as its benchmarks build one."""
    import learn2learn as l2l

    per_class = len(data.members[0])
    labels = torch.arange(len(data.members)).repeat_interleave(per_class).tolist()

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return len(index)

        def __getitem__(self, i):
            return data.images[index[i]], labels[i]

    meta = l2l.data.MetaDataset(Images(), indices_to_labels=dict(enumerate(labels)))
    taskset = l2l.data.Taskset(meta, num_tasks=-1, task_transforms=[
        l2l.data.transforms.NWays(meta, ways), l2l.data.transforms.KShots(meta, shots),
        l2l.data.transforms.LoadData(meta), l2l.data.transforms.RemapLabels(meta),
        l2l.data.transforms.ConsecutiveLabels(meta)])
    return lambda i: taskset.sample()


def learn2learn_rows(sizes: Sizes, ways: int = 5, shots: int = 1, queries: int = 15):
    steps, rows, batch = {}, [], sizes.learn2learn_batch
    for name in sizes.learn2learn_datasets:
        classes, per_class, side = LEARN2LEARN_SHAPES[name]
        data, index = generated_split(classes, per_class, side)
        tasks = ClassificationTasks(data, {"train": torch.arange(classes)}, ways, shots, queries)
        ours = episodes_per_second(lambda i: tasks("train", task_generator(0, "train", i)),
                                   sizes.sampling_seconds)
        theirs = episodes_per_second(learn2learn_taskset(data, index, ways, shots + queries),
                                     sizes.sampling_seconds)
        drawn = iter(range(10**9))  # new tasks at every call
        meta_batch = lambda: default_collate([tasks("train", task_generator(0, "train", next(drawn)))  # noqa: E731
                                              for _ in range(batch)])
        fetch = median_seconds(lambda: to_unit_range(meta_batch()), repeats=10, warmup=1)
        if side not in steps:
            net = ConvNet(ways, in_channels=3, hidden=sizes.hidden[1], max_pool=True, image_size=side)
            steps[side] = step_seconds(meta_batch(), sizes, net)
        rows.append([name, f"{classes} x {per_class}, {side}x{side}", f"{theirs:.0f}", f"{ours:.0f}",
                     f"{ours / theirs:.1f}x", f"{fetch * 1e3:.1f}", f"{steps[side]:.2f}",
                     f"{100 * fetch / (fetch + steps[side]):.2f}%", "<= 2%"])
    return rows


def main(root: str, sections, sizes: Sizes = FULL) -> None:
    print(machine())
    with tempfile.TemporaryDirectory() as cache:  # Omniglot preprocessed once for both sections
        if "omniglot" in sections:
            omniglot_tables(root, cache, sizes)
        if "workers" in sections:
            rows = worker_rows(root, cache, sizes)
            print("\nData wait per meta-step for short (GPU-like) steps, with and without "
                  "DataLoader workers\n")
            print(markdown_table(["task", "meta-batch", "step s", "workers", "wait ms",
                                  "data share of step", "target"], rows))
    if "learn2learn" in sections:
        print("\nlearn2learn's datasets, shapes of their train splits (generated images), 5-way "
              f"1-shot, 15 queries: episodes per second, and the data wait of a meta-batch of "
              f"{sizes.learn2learn_batch} (in the main process) against a meta-step "
              f"({solver_text(sizes)}, conv-4 with "
              f"{sizes.hidden[1]} filters and max-pooling)\n")
        print(markdown_table(["dataset", "classes x images, size", "learn2learn Taskset",
                              "ours", "ours / learn2learn", "fetch ms", "step s",
                              "data share of step", "target"], learn2learn_rows(sizes)))


def omniglot_tables(root: str, cache: str, sizes: Sizes) -> None:
    sampler_rows, wait_rows = [], []
    for ways, shots, queries, batch in sizes.omniglot_settings:
        name = f"{ways}-way {shots}-shot, {queries} queries"
        dm = data_module(root, cache, ways, shots, queries, batch)
        plain = data_module(root, cache, ways, shots, queries, batch, rotations="none")
        ours = episodes_per_second(lambda i: dm.sampler("train", task_generator(0, "train", i)),
                                   sizes.sampling_seconds)
        ours_plain = episodes_per_second(
            lambda i: plain.sampler("train", task_generator(0, "train", i)), sizes.sampling_seconds)
        theirs = episodes_per_second(learn2learn_sampler(plain, ways, shots, queries),
                                     sizes.sampling_seconds)
        sampler_rows.append([name, f"{theirs:.0f}", f"{ours_plain:.0f}", f"{ours:.0f}",
                             f"{ours_plain / theirs:.1f}x"])

        loader = iter(dm.train_dataloader())
        # In-process, the uint8 -> float conversion is CPU work of the step's process too.
        fetch = median_seconds(lambda: to_unit_range(next(loader)), repeats=30, warmup=2)
        step = step_seconds(next(loader), sizes)
        wait_rows.append([name, batch, f"{fetch * 1e3:.2f}", f"{step:.3f}",
                          f"{100 * fetch / (fetch + step):.2f}%", "<= 2%"])
    print("\nEpisodes per second of one sampler (train split of the paper split, one process)\n")
    print(markdown_table(["task", "learn2learn TaskDataset", "ours, rotations none",
                          "ours, rotations as classes", "ours / learn2learn"], sampler_rows))
    print("\nData wait per meta-step: DataLoader in the main process (num_workers=0) vs the "
          f"meta-step ({solver_text(sizes)}, conv-4 {sizes.hidden[0]} channels)\n")
    print(markdown_table(["task", "meta-batch", "fetch ms", "step s", "data share of step",
                          "target"], wait_rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--omniglot-root", default=OMNIGLOT_ROOT)
    parser.add_argument("--sections", nargs="+", default=["omniglot", "workers", "learn2learn"],
                        choices=["omniglot", "workers", "learn2learn"])
    parser.add_argument("--quick", action="store_true", help=QUICK_HELP)
    args = parser.parse_args()
    main(args.omniglot_root, args.sections, QUICK if args.quick else FULL)
