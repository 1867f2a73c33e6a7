import pytest
import torch
from torch.func import functional_call, vmap

from imaml_lightning.errors import SettingError
from imaml_lightning.models import ConvNet

SHAPES = {  # name: (ConvNet settings, one image's shape)
    "omniglot": (dict(in_channels=1, image_size=28), (1, 28, 28)),
    "miniimagenet": (dict(in_channels=3, image_size=84, max_pool=True), (3, 84, 84)),
}


def parameter_count(net) -> int:
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("head", ["flatten", "average"])
@pytest.mark.parametrize("data", SHAPES)
def test_both_heads_give_one_row_of_logits_per_image(head, data):
    settings, image = SHAPES[data]
    net = ConvNet(5, hidden=8, head=head, **settings)
    assert net(torch.rand(6, *image)).shape == (6, 5)


def test_average_head_has_hidden_inputs_whatever_the_image_size():
    sizes = (28, 56, 84)
    average = {parameter_count(ConvNet(5, hidden=8, head="average", image_size=s)) for s in sizes}
    flatten = [parameter_count(ConvNet(5, hidden=8, head="flatten", image_size=s)) for s in sizes]
    assert len(average) == 1 and ConvNet(5, hidden=8, head="average").classifier.in_features == 8
    assert len(set(flatten)) == len(sizes)


def test_flatten_is_the_default_with_the_same_parameter_names():
    default, flatten = ConvNet(5, hidden=8), ConvNet(5, hidden=8, head="flatten")
    assert default.head == "flatten"
    assert [n for n, _ in default.named_parameters()] == [n for n, _ in flatten.named_parameters()]
    assert default.classifier.in_features == 8 * 2 * 2  # 28 -> 14 -> 7 -> 4 -> 2


def test_average_head_averages_the_features_over_space():
    torch.manual_seed(0)
    net = ConvNet(5, hidden=8, head="average")
    x = torch.rand(4, 1, 28, 28)
    expected = net.classifier(net.features(x).mean((2, 3)))
    torch.testing.assert_close(net(x), expected)


@pytest.mark.parametrize("head", ["flatten", "average"])
def test_heads_work_under_functional_call_and_vmap(head):
    torch.manual_seed(0)
    net = ConvNet(5, hidden=8, head=head)
    params = {k: v.detach().expand(3, *v.shape).clone() for k, v in net.named_parameters()}
    x = torch.rand(3, 4, 1, 28, 28)
    batched = vmap(lambda p, xi: functional_call(net, p, (xi,)))(params, x)
    one_by_one = torch.stack([
        functional_call(net, {k: v[i] for k, v in params.items()}, (x[i],)) for i in range(3)
    ])
    torch.testing.assert_close(batched, one_by_one)


def test_unknown_head_is_a_setting_error_naming_the_allowed_values():
    with pytest.raises(SettingError, match=r"head='mean' is invalid: .*'flatten', 'average'"):
        ConvNet(5, head="mean")
