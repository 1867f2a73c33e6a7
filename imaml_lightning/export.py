"""The adapted network as a file plain PyTorch runs: a torch.export program.

A state_dict alone would not reproduce predict's outputs: BatchNorm there normalizes with the
support set's statistics, which a freshly built network does not have (ours keeps no running
statistics). The exported program holds the adapted weights, those statistics as BatchNorm's
running statistics, and the softmax over the classes in use, so that

    model = torch.export.load("adapted.pt2").module()
    probabilities = model(images)  # float [N, C, H, W] in [0, 1], preprocessed as predict does

needs nothing but torch. The class names travel in the file (extra file "classes.json").
"""
import copy
import json

import torch
from torch import nn

from imaml_lightning.solver.batch_norm import support_statistics

CLASSES_FILE = "classes.json"


class AdaptedNetwork(nn.Module):
    def __init__(self, net: nn.Module, classes: int, classification: bool):
        super().__init__()
        self.net, self.classes, self.classification = net, classes, classification

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self.net(x)
        return output[..., :self.classes].softmax(-1) if self.classification else output


def adapted_network(model) -> AdaptedNetwork:
    """A copy of model.net holding predict's adapted parameters, with each BatchNorm layer in
    evaluation mode on the support set's statistics (as running statistics)."""
    support_x, phi, classes = model.adapted
    net = copy.deepcopy(model.net).cpu()
    statistics = support_statistics(model.net, phi, support_x)
    names = {layer: name for name, layer in model.net.named_modules()}
    net.load_state_dict({k: v.cpu() for k, v in phi.items()}, strict=False)
    for layer, (mean, var) in statistics.items():
        copied = net.get_submodule(names[layer])
        copied.track_running_stats = True
        copied.register_buffer("running_mean", mean.detach().cpu())
        copied.register_buffer("running_var", var.detach().cpu())
        copied.register_buffer("num_batches_tracked", torch.tensor(1))
    out_features = model.hparams.out_features
    return AdaptedNetwork(net.eval(), classes or out_features, model.classification).eval()


def save_adapted_network(model, path: str, class_names: list) -> None:
    network = adapted_network(model)
    example = model.adapted.support_x[:2].cpu()
    batch = torch.export.Dim("batch")
    program = torch.export.export(network, (example,), dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, path, extra_files={CLASSES_FILE: json.dumps(class_names)})
