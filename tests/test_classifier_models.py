"""Shipped classifiers: CIFAR ResNet sizes as published, feature hook, model names."""

import pytest
import torch

from divergent.models.classifiers import MLP, FeatureHook, SmallCNN, build_model
from divergent.models.resnet_cifar import RESNETS


@pytest.mark.parametrize(
    "name, millions",
    # Parameter counts for CIFAR-100 reported in the CRD paper (Tian et al. 2020), Table 1.
    [("resnet8x4", 1.23), ("resnet32x4", 7.43), ("resnet20", 0.28), ("resnet56", 0.86)],
)
def test_resnet_parameter_counts_match_published(name, millions):
    model = RESNETS[name](num_classes=100)
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert count == pytest.approx(millions, abs=0.01)


def test_resnet_forward_and_feature_width():
    model = build_model("resnet20", (3, 32, 32), 10)
    with FeatureHook(model) as hook:
        logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10)
    assert hook.features.shape == (2, model.feature_dim) == (2, 64)
    assert [s.shape[1] for s in hook.stages] == [16, 32, 64]
    assert [s.shape[-1] for s in hook.stages] == [32, 16, 8]


def test_feature_hook_records_what_enters_the_classifier():
    model = MLP((5,), 3, hidden=(4,))
    x = torch.randn(6, 5)
    with FeatureHook(model) as hook:
        logits = model(x)
    torch.testing.assert_close(model.classifier(hook.features), logits)
    torch.testing.assert_close(hook.features, torch.relu(model.body[1][0](x)))


def test_feature_hook_is_removed_after_use():
    model = SmallCNN(1, 10, width=4)
    with FeatureHook(model) as hook:
        model(torch.randn(1, 1, 8, 8))
    hook.features = None
    model(torch.randn(1, 1, 8, 8))
    assert hook.features is None


def test_feature_hook_on_any_module_names_its_head():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    with FeatureHook(model, head="2", stages=["0"]) as hook:
        model(torch.randn(2, 3))
    assert hook.features.shape == (2, 4) and hook.stages[0].shape == (2, 4)
    with pytest.raises(ValueError, match="head 'classifier'.*one of: 0, 2"):
        FeatureHook(model)


@pytest.mark.parametrize("name", ["mlp-", "mlp-a", "cnn-x", "vgg8", "resnet9"])
def test_bad_model_names_raise(name):
    with pytest.raises(ValueError):
        build_model(name, (1, 8, 8), 10)
