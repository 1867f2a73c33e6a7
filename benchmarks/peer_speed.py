"""Our solver beside the authors' released iMAML code, in one process, on the same tasks.

The reference meta-iteration of the authors' Omniglot script (examples/omniglot_implicit_maml.py
upstream): 5-way 1-shot, 1 query per class, meta-batch 32, 16 inner GD steps of 0.1, 5 CG steps,
lambda = 2, Adam on the meta-parameters. The authors' code runs it one task at a time as their
script does (set_params -> learn_task(16) -> one proximal pull-back step -> query gradient ->
utils.cg_solve with their matrix_evaluator -> mean -> outer_step_with_grad), without the
diagnostics their script also computes (losses and accuracies before/after), which ours skips
too (diagnose_before=False). Ours runs meta_gradient (vmap over the 32 tasks) with each
curvature, then the surrogate loss's backward and Adam's step; `--compiled C ...` adds arms with
the solver compiled by torch.compile for those curvatures (VectorizedMetaGradient(compile=True),
what --model.compile_solver trains with), and their first call (the compilation: minutes where
Inductor's cache, TORCHINDUCTOR_CACHE_DIR, is cold, about half a minute where it is warm).

Both run on both networks: their conv-4 (make_conv_network: a ZeroPad2d before conv3, their
init) and ours (imaml_lightning.models.ConvNet). Rounds alternate the arms (the order reversed
every other round); each cell is the median over rounds with the range (min-max), and the
speed-up is the authors' median over ours on the same network. The tasks are real Omniglot
episodes (the compute does not depend on the pixels, but the GD safeguard does). The two codes do not solve the same system (theirs: no
proximal term in the inner loop, CG on 2I + H/(lam + 10); ours: the paper's), so this times
equal work, not equal results.

Usage: python -m benchmarks.peer_speed [--rounds 7] [--compiled gauss_newton hessian]
       [--peer ../shared/peers/imaml_dev]
"""
import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import alternating_rounds, machine, markdown_table, seconds_of_one_call
from imaml_lightning.data import OmniglotDataModule
from imaml_lightning.data.images import to_unit_range
from imaml_lightning.models import ConvNet
from imaml_lightning.solver import CURVATURES, SolverConfig, Task, VectorizedMetaGradient, surrogate_loss

ROOT = Path(__file__).resolve().parents[1]
WAYS, SHOTS, QUERIES, META_BATCH, K, CG, LAM, INNER_LR, OUTER_LR = 5, 1, 1, 32, 16, 5, 2.0, 0.1, 1e-3


def omniglot_tasks(root: str, count: int, seed: int = 0) -> Task:
    sampler = OmniglotDataModule(root=root, ways=WAYS, shots=SHOTS, queries=QUERIES,
                                 download=False).make_sampler()
    g = torch.Generator().manual_seed(seed)
    tasks = [to_unit_range(sampler("train", g)) for _ in range(count)]
    return Task(*(torch.stack(t) for t in zip(*tasks)))


def peer_iteration(peer, net: torch.nn.Module, tasks: Task):
    """One meta-iteration of the authors' script, as they wrote it, on a copy of `net`."""
    learner_model, utils = peer
    meta = learner_model.Learner(net, torch.nn.CrossEntropyLoss(), inner_lr=INNER_LR,
                                 outer_lr=OUTER_LR, GPU=False)
    fast = learner_model.Learner(copy.deepcopy(net), torch.nn.CrossEntropyLoss(),
                                 inner_lr=INNER_LR, outer_lr=OUTER_LR, GPU=False)
    lam = torch.tensor(LAM)
    peer_tasks = [{"x_train": tasks.support_x[i], "y_train": tasks.support_y[i],
                   "x_val": tasks.query_x[i], "y_val": tasks.query_y[i]} for i in range(META_BATCH)]

    def run():
        w_k = meta.get_params()
        meta_grad = 0.0
        for task in peer_tasks:
            fast.set_params(w_k.clone())
            fast.learn_task(task, num_steps=K)
            fast.inner_opt.zero_grad()  # their "pull back" step on the proximal term
            fast.regularization_loss(w_k, lam).backward()
            fast.inner_opt.step()
            valid_loss = fast.get_loss(task["x_val"], task["y_val"])
            valid_grad = torch.autograd.grad(valid_loss, fast.model.parameters())
            flat_grad = torch.cat([g.contiguous().view(-1) for g in valid_grad])
            evaluator = fast.matrix_evaluator(task, lam, 1.0)
            meta_grad += utils.cg_solve(evaluator, flat_grad, CG, x_init=None) / META_BATCH
        meta.outer_step_with_grad(meta_grad, flat_grad=True)

    return run


def our_iteration(net: torch.nn.Module, tasks: Task, curvature: str, compile: bool = False):
    params = dict(net.named_parameters())
    optimizer = torch.optim.Adam(net.parameters(), lr=OUTER_LR, eps=1e-3)
    config = SolverConfig(lam=LAM, inner_steps=K, inner_lr=INNER_LR, cg_steps=CG, curvature=curvature)
    meta_gradient = VectorizedMetaGradient(net, F.cross_entropy, config, compile=compile)

    def run():
        result = meta_gradient(params, tasks, diagnose_before=False)
        optimizer.zero_grad()
        surrogate_loss(params, result.grads).backward()
        optimizer.step()

    return run


def main(args) -> None:
    peer_root = Path(args.peer)
    if not (peer_root / "implicit_maml" / "learner_model.py").is_file():
        print(f"skipped: the authors' code is not at {peer_root} (see ../shared/peers/imaml_dev/ORIGIN.md)")
        return
    if not (Path(args.omniglot_root) / "images_background").is_dir():
        print(f"skipped: no Omniglot at {args.omniglot_root}")
        return
    sys.path.insert(0, str(peer_root))
    from implicit_maml import learner_model, utils  # the authors' code, unmodified

    torch.manual_seed(0)
    tasks = omniglot_tasks(args.omniglot_root, META_BATCH)
    networks = {"theirs": learner_model.make_conv_network(1, WAYS), "ours": ConvNet(WAYS)}
    arms = {}
    for name, net in networks.items():
        arms[("authors' code", name)] = peer_iteration((learner_model, utils), copy.deepcopy(net), tasks)
        for curvature in CURVATURES:
            arms[(f"ours, {curvature}", name)] = our_iteration(copy.deepcopy(net), tasks, curvature)
        for curvature in args.compiled:
            arms[(f"ours, {curvature}, compiled", name)] = our_iteration(
                copy.deepcopy(net), tasks, curvature, compile=True)
    timers = {name: seconds_of_one_call(run) for name, run in arms.items()}
    first = {name: timer() for name, timer in timers.items()}  # compiles, warms up
    times = alternating_rounds(timers, args.rounds)

    print(machine())
    print(f"reference meta-iteration: Omniglot {WAYS}-way {SHOTS}-shot, {QUERIES} query/class, "
          f"meta-batch {META_BATCH}, {K} GD steps of {INNER_LR}, {CG} CG steps, lambda={LAM}; "
          f"{args.rounds} rounds after one warm-up each, the arms' order reversed every other round\n")
    rows = []
    for (code, network), seconds in times.items():
        median = statistics.median(seconds)
        peer = statistics.median(times[("authors' code", network)])
        rows.append([code, network, f"{median:.3f}", f"{min(seconds):.3f}-{max(seconds):.3f}",
                     f"{peer / median:.2f}x", f"{first[(code, network)]:.1f}"])
    print(markdown_table(["code", "network", "seconds (median)", "range", "speed-up over the authors'",
                          "first call (s)"], rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--compiled", nargs="*", default=[], choices=CURVATURES,
                        help="curvatures to time also with the solver compiled (torch.compile)")
    parser.add_argument("--peer", default=str(ROOT.parent / "shared/peers/imaml_dev"))
    parser.add_argument("--omniglot-root", default=str(ROOT.parent / "shared/data/omniglot"))
    main(parser.parse_args())
