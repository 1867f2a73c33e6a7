"""Seconds per meta-iteration of our solver beside the authors' released iMAML code, on the same tasks.

Both run in one process. The reference meta-iteration of the authors' Omniglot script
(examples/omniglot_implicit_maml.py upstream): 5-way 1-shot, 1 query per class, meta-batch 32,
16 inner GD steps of 0.1, 5 CG steps, lambda = 2, Adam on the meta-parameters. The authors' code
runs it one task at a time as their script does (set_params -> learn_task(16) -> one proximal
pull-back step -> query gradient -> utils.cg_solve with their matrix_evaluator -> mean ->
outer_step_with_grad), without the diagnostics their script also computes (losses and accuracies
before/after), which ours skips too (diagnose_before=False). Ours runs meta_gradient (vmap over
the 32 tasks) with each curvature, then the surrogate loss's backward and Adam's step;
`--compiled C ...` adds arms with the solver compiled by torch.compile for those curvatures
(VectorizedMetaGradient(compile=True), what --model.compile_solver trains with), and their first
call (the compilation: far longer where Inductor's cache, TORCHINDUCTOR_CACHE_DIR, is cold than
where it is warm).

Both run on both networks: their conv-4 (make_conv_network: a ZeroPad2d before conv3, their
init) and ours (imaml_lightning.models.ConvNet). Rounds alternate the arms (the order reversed
every other round); each cell is the median over rounds with the range (min-max), and the
speed-up is the authors' median over ours on the same network. The tasks are real Omniglot episodes
(the compute does not depend on the pixels, but the GD safeguard does). The two codes do not
solve the same system (theirs: no proximal term in the inner loop, CG on 2I + H/(lam + 10);
ours: the paper's), so this times equal work, not equal results.

The latest table, with its date and machine: docs/benchmarks.md.

Usage: python -m benchmarks.peer_speed [--rounds 7] [--compiled gauss_newton hessian]
       [--peer ../shared/peers/imaml_dev] [--omniglot-root ../shared/data/omniglot]
       python -m benchmarks.peer_speed --quick   (2 tasks, 2 inner and 2 CG steps, 1 round)
"""
import argparse
import copy
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import (
    OMNIGLOT_ROOT, PEER_ROOT, QUICK_HELP, alternating_rounds, machine, markdown_table, seconds_of_one_call,
)
from benchmarks.peers import AuthorsIMAML, PeerMissing, import_authors_code
from benchmarks.solver_speed import QUICK, REFERENCE, Sizes
from imaml_lightning.data import OmniglotDataModule
from imaml_lightning.data.images import to_unit_range
from imaml_lightning.models import ConvNet
from imaml_lightning.solver import CURVATURES, SolverConfig, Task, VectorizedMetaGradient, surrogate_loss

WAYS, SHOTS, QUERIES, LAM, INNER_LR, OUTER_LR = 5, 1, 1, 2.0, 0.1, 1e-3


def omniglot_tasks(root: str, count: int, seed: int = 0) -> Task:
    sampler = OmniglotDataModule(root=root, ways=WAYS, shots=SHOTS, queries=QUERIES,
                                 download=False).make_sampler()
    g = torch.Generator().manual_seed(seed)
    tasks = [to_unit_range(sampler("train", g)) for _ in range(count)]
    return Task(*(torch.stack(t) for t in zip(*tasks)))


def peer_iteration(peer, net: torch.nn.Module, tasks: Task, sizes: Sizes):
    """One meta-iteration of the authors' script, as they wrote it, on `net`."""
    authors = AuthorsIMAML(peer, WAYS, sizes.k, sizes.cg, LAM, INNER_LR, OUTER_LR, net=net)
    return lambda: authors.meta_step(tasks)


def our_iteration(net: torch.nn.Module, tasks: Task, curvature: str, sizes: Sizes, compile: bool = False):
    params = dict(net.named_parameters())
    optimizer = torch.optim.Adam(net.parameters(), lr=OUTER_LR, eps=1e-3)
    config = SolverConfig(lam=LAM, inner_steps=sizes.k, inner_lr=INNER_LR, cg_steps=sizes.cg,
                          curvature=curvature)
    meta_gradient = VectorizedMetaGradient(net, F.cross_entropy, config, compile=compile)

    def run():
        result = meta_gradient(params, tasks, diagnose_before=False)
        optimizer.zero_grad()
        surrogate_loss(params, result.grads).backward()
        optimizer.step()

    return run


def main(args) -> None:
    try:
        learner_model, utils = import_authors_code(args.peer)
    except PeerMissing as missing:
        print(f"skipped: {missing}")
        return
    if not (Path(args.omniglot_root) / "images_background").is_dir():
        print(f"skipped: no Omniglot at {args.omniglot_root}")
        return

    sizes = QUICK if args.quick else REFERENCE
    torch.manual_seed(0)
    tasks = omniglot_tasks(args.omniglot_root, sizes.meta_batch)
    # --quick keeps both networks' size: theirs is the authors' code, unmodified
    networks = {"theirs": learner_model.make_conv_network(1, WAYS), "ours": ConvNet(WAYS)}
    arms = {}
    for name, net in networks.items():
        arms[("authors' code", name)] = peer_iteration((learner_model, utils), copy.deepcopy(net), tasks,
                                                       sizes)
        for curvature in CURVATURES:
            arms[(f"ours, {curvature}", name)] = our_iteration(copy.deepcopy(net), tasks, curvature, sizes)
        for curvature in args.compiled:
            arms[(f"ours, {curvature}, compiled", name)] = our_iteration(
                copy.deepcopy(net), tasks, curvature, sizes, compile=True)
    timers = {name: seconds_of_one_call(run) for name, run in arms.items()}
    first = {name: timer() for name, timer in timers.items()}  # compiles, warms up
    times = alternating_rounds(timers, args.rounds)

    print(machine())
    print(f"reference meta-iteration: Omniglot {WAYS}-way {SHOTS}-shot, {QUERIES} query/class, "
          f"meta-batch {sizes.meta_batch}, {sizes.k} GD steps of {INNER_LR}, {sizes.cg} CG steps, lambda={LAM}; "
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
    parser.add_argument("--rounds", type=int, help="default 7 (--quick: 1)")
    parser.add_argument("--compiled", nargs="*", default=[], choices=CURVATURES,
                        help="curvatures to time also with the solver compiled (torch.compile)")
    parser.add_argument("--peer", default=PEER_ROOT, help="the authors' code (implicit_maml/)")
    parser.add_argument("--omniglot-root", default=OMNIGLOT_ROOT)
    parser.add_argument("--quick", action="store_true", help=QUICK_HELP)
    args = parser.parse_args()
    args.rounds = args.rounds or (1 if args.quick else 7)
    main(args)
