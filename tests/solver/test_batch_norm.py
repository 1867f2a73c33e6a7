"""BatchNorm with the support set's statistics: a query's output depends on that query alone."""
import torch

from imaml_lightning.models import ConvNet
from imaml_lightning.solver import predict


def test_support_statistics_make_a_prediction_independent_of_the_other_queries(device):
    torch.manual_seed(0)
    net = ConvNet(5, hidden=8).to(device)
    phi = {k: v.detach() for k, v in net.named_parameters()}
    support, queries = (torch.rand(n, 1, 28, 28).to(device) for n in (5, 51))
    alone = predict(net, phi, support, queries[:1], batch_norm="support")
    in_batch = predict(net, phi, support, queries, batch_norm="support")[:1]
    torch.testing.assert_close(alone, in_batch, rtol=0, atol=1e-5)
    # The test can tell the modes apart: normalized by their own batch, the outputs move.
    alone = predict(net, phi, support, queries[:1], batch_norm="transductive")
    in_batch = predict(net, phi, support, queries, batch_norm="transductive")[:1]
    assert (alone - in_batch).abs().max() > 1e-2


def test_support_statistics_are_the_support_batch_statistics(device):
    """On the support set itself, "support" mode is plain batch-statistics BatchNorm."""
    torch.manual_seed(1)
    net = ConvNet(5, hidden=8).to(device)
    phi = {k: v.detach() for k, v in net.named_parameters()}
    support = torch.rand(10, 1, 28, 28).to(device)
    torch.testing.assert_close(predict(net, phi, support, support, batch_norm="support"),
                               predict(net, phi, support, support, batch_norm="transductive"))
