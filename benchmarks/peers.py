"""The two codes a user would pick instead of ours, driven on our episodes, each as its own
script trains and tests it: the authors' released iMAML (imported unmodified from its folder,
../shared/peers/imaml_dev/ORIGIN.md) and learn2learn's MAML wrapper with the settings of
learn2learn's Omniglot example. Used by peer_speed (seconds per meta-iteration) and
peer_accuracy (test accuracy after equal minutes).

A peer is an object with `meta_step(tasks)`, one meta-iteration of its training script on a
meta-batch (a Task of stacked tensors), `accuracy(task)`, its own test procedure on one
episode (% of the query images right), and `state()` / `load(state)` for its best weights.
"""
import copy
import importlib
import sys
from pathlib import Path
from types import ModuleType
from typing import Optional, Tuple

import torch

from imaml_lightning.solver import Task


class PeerMissing(Exception):
    """A peer's code is not where it was looked for; the message says where and what to do."""


def import_authors_code(folder: str) -> Tuple[ModuleType, ModuleType]:
    """(learner_model, utils) of the authors' implicit_maml package in `folder`."""
    if not (Path(folder) / "implicit_maml" / "learner_model.py").is_file():
        raise PeerMissing(f"the authors' code is not at {folder} (implicit_maml/learner_model.py; "
                          "see ../shared/peers/imaml_dev/ORIGIN.md)")
    sys.path.insert(0, str(Path(folder).resolve()))
    from implicit_maml import learner_model, utils  # the authors' code, unmodified

    return learner_model, utils


def task_dicts(tasks: Task) -> list:
    """A meta-batch as the authors' code takes a task: a dict of x/y_train and x/y_val."""
    return [{"x_train": tasks.support_x[i], "y_train": tasks.support_y[i],
             "x_val": tasks.query_x[i], "y_val": tasks.query_y[i]} for i in range(len(tasks.support_x))]


class AuthorsIMAML:
    """examples/omniglot_implicit_maml.py upstream with the flags of its README's 5-way 1-shot
    command (inner lr 0.1, outer lr 1e-3, 16 inner steps, meta-batch 32, lambda 2, 5 CG steps,
    cg_damping 1; 20-way: the paper's 25 inner steps), on its own conv-4 (make_conv_network).
    Tested as its measure_accuracy.py runs per its README: 16 (25) steps of 0.1, lam 0, then the
    query batch's prediction (BatchNorm on batch statistics: transductive)."""

    network = "theirs (conv-4, make_conv_network)"

    def __init__(self, code, ways: int, inner_steps: int, cg_steps: int = 5, lam: float = 2.0,
                 inner_lr: float = 0.1, outer_lr: float = 1e-3, net: Optional[torch.nn.Module] = None):
        learner_model, self.utils = code
        loss = torch.nn.CrossEntropyLoss()
        net = net if net is not None else learner_model.make_conv_network(1, ways)
        self.meta = learner_model.Learner(net, loss, inner_lr=inner_lr, outer_lr=outer_lr, GPU=False)
        self.fast = learner_model.Learner(copy.deepcopy(net), loss, inner_lr=inner_lr,
                                          outer_lr=outer_lr, GPU=False)
        self.inner_steps, self.cg_steps, self.lam = inner_steps, cg_steps, torch.tensor(lam)
        self.evaluation = f"{inner_steps} GD steps of {inner_lr}, no proximal term (their measure_accuracy.py)"

    def meta_step(self, tasks: Task) -> None:
        """Their script's loop body, without its diagnostics (losses and accuracies before and
        after adaptation), which change nothing."""
        w_k = self.meta.get_params()
        batch = task_dicts(tasks)
        meta_grad = 0.0
        for task in batch:
            self.fast.set_params(w_k.clone())
            self.fast.learn_task(task, num_steps=self.inner_steps)
            self.fast.inner_opt.zero_grad()  # their "pull back" step on the proximal term
            self.fast.regularization_loss(w_k, self.lam).backward()
            self.fast.inner_opt.step()
            valid_loss = self.fast.get_loss(task["x_val"], task["y_val"])
            valid_grad = torch.autograd.grad(valid_loss, self.fast.model.parameters())
            flat_grad = torch.cat([g.contiguous().view(-1) for g in valid_grad])
            evaluator = self.fast.matrix_evaluator(task, self.lam, 1.0)
            meta_grad += self.utils.cg_solve(evaluator, flat_grad, self.cg_steps, x_init=None) / len(batch)
        self.meta.outer_step_with_grad(meta_grad, flat_grad=True)

    def accuracy(self, task: Task) -> float:
        (task,) = task_dicts(Task(*(t.unsqueeze(0) for t in task)))
        self.fast.set_params(self.meta.get_params())
        self.fast.learn_task(task, num_steps=self.inner_steps, add_regularization=False)
        # (their pull-back step with lam 0 moves nothing)
        return float(self.utils.measure_accuracy(task, self.fast, train=False))

    def state(self) -> torch.Tensor:
        return self.meta.get_params()

    def load(self, state: torch.Tensor) -> None:
        self.meta.set_params(state)


class Learn2LearnMAML:
    """learn2learn's examples/vision/maml_omniglot.py: l2l.vision.models.OmniglotFC(28**2, ways)
    (a 4-layer MLP with BatchNorm on batch statistics), MAML(lr=0.5, first_order=False), Adam
    3e-3, meta-batch 32, 1 adaptation step, as many query images as support images; tested with
    the same fast_adapt (clone, 1 adapt step, predict the query batch: transductive)."""

    network = "learn2learn's OmniglotFC (MLP 256-128-64-64)"

    def __init__(self, ways: int, fast_lr: float = 0.5, meta_lr: float = 3e-3, adaptation_steps: int = 1):
        import learn2learn as l2l

        self.maml = l2l.algorithms.MAML(l2l.vision.models.OmniglotFC(28 ** 2, ways), lr=fast_lr,
                                        first_order=False)
        self.optimizer = torch.optim.Adam(self.maml.parameters(), meta_lr)
        self.loss = torch.nn.CrossEntropyLoss(reduction="mean")
        self.adaptation_steps = adaptation_steps
        self.evaluation = f"{adaptation_steps} adapt() step of {fast_lr} (its fast_adapt)"

    def adapted_predictions(self, support_x, support_y, query_x) -> torch.Tensor:
        learner = self.maml.clone()
        for _ in range(self.adaptation_steps):
            learner.adapt(self.loss(learner(support_x), support_y))
        return learner(query_x)

    def meta_step(self, tasks: Task) -> None:
        self.optimizer.zero_grad()
        for support_x, support_y, query_x, query_y in zip(*tasks):
            self.loss(self.adapted_predictions(support_x, support_y, query_x), query_y).backward()
        for p in self.maml.parameters():
            p.grad.data.mul_(1.0 / len(tasks.support_x))
        self.optimizer.step()

    def accuracy(self, task: Task) -> float:
        predictions = self.adapted_predictions(task.support_x, task.support_y, task.query_x)
        return 100.0 * (predictions.argmax(dim=1) == task.query_y).float().mean().item()

    def state(self) -> dict:
        return copy.deepcopy(self.maml.state_dict())

    def load(self, state: dict) -> None:
        self.maml.load_state_dict(state)


def learn2learn_missing() -> Optional[str]:
    """Why learn2learn's MAML cannot run here, or None."""
    try:
        importlib.import_module("learn2learn")
    except ImportError as error:
        return f"learn2learn does not import ({error}); bash scripts/install.sh builds it"
    return None
