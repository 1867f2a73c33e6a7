"""Run settings: plain values in checkpoints, and checkpoints of the earlier layout read as today's."""
import json

import torch

from imaml_lightning.run_settings import VERSION, incompatibility, upgrade


def test_a_checkpoint_from_before_the_nested_solver_settings_reads_as_todays():
    old = {"hyper_parameters": {"lam": 2.0, "inner_steps": 16, "curvature": "hessian", "outer_lr": 1e-3},
           "run_settings": {"model.lam": json.dumps(2.0), "model.net.init_args.hidden": json.dumps([40, 40]),
                            "data.class_path": json.dumps("imaml_lightning.data.SinusoidDataModule")}}
    new = upgrade(old)
    assert new["hyper_parameters"] == {"outer_lr": 1e-3, "solver": {
        "lam": 2.0, "inner_steps": 16, "curvature": "hessian"}}
    assert new["run_settings"] == {"model.solver.lam": 2.0, "model.net.init_args.hidden": [40, 40],
                                   "data.class_path": "imaml_lightning.data.SinusoidDataModule"}
    assert new["run_settings_version"] == VERSION
    assert upgrade(dict(new)) == new  # today's layout passes through unchanged


def test_incompatibility_names_the_settings_that_differ():
    checkpoint = {"state_dict": {"w": torch.zeros(3, 2)},
                  "run_settings": {"model.net.init_args.hidden": 3, "model.solver.lam": 0.5}}
    message = incompatibility(checkpoint, {"w": torch.zeros(4, 2)},
                              {"model.net.init_args.hidden": 4, "model.solver.lam": 0.5})
    assert "w is [3, 2] there, [4, 2] here" in message
    assert "model.net.init_args.hidden=3 there, 4 here" in message and "lam" not in message
    assert incompatibility(checkpoint, {"w": torch.ones(3, 2)}, {}) is None
