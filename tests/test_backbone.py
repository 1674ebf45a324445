"""The timm-style backbone interface of every network: features, heads, classifier reset, features_only loading."""
from __future__ import annotations

import pytest
import torch

from common.model_state import WeightsMismatchError
from common.pretrained import load_pretrained
from conftest import network, released_state_dict

MODELS = ("OneShot", "ShuffleNetV2.Large", "ShuffleNetV2.ExLarge")


def uninitialised(model: str, *args, **kwargs) -> torch.nn.Module:
    """The network with unset memory, for tests that load every tensor (skips seconds of random init)."""
    with torch.device("meta"):
        net = network(model).create_network(*args, **kwargs)
    return net.to_empty(device="cpu")


@pytest.mark.parametrize("model", MODELS)
def test_stage_shapes_agree_with_feature_info_at_two_sizes(model):
    with torch.device("meta"):
        net = network(model).create_network().eval()
        for size in (64, 96):
            x = torch.zeros(2, 3, size, size)
            final, stages = net.forward_intermediates(x)
            assert [tuple(f.shape) for f in stages] == [
                (2, info["num_chs"], size // info["reduction"], size // info["reduction"]) for info in net.feature_info]
            assert [info["reduction"] for info in net.feature_info] == [4, 8, 16, 32]
            assert tuple(net.forward_head(final, pre_logits=True).shape) == (2, net.num_features)
            for name in [info["module"] for info in net.feature_info]:
                net.get_submodule(name)
        backbone = network(model).create_network(features_only=True, out_indices=(1, -1))
        assert [tuple(f.shape) for f in backbone(x)] == [
            (2, net.feature_info[i]["num_chs"], size // r, size // r) for i, r in ((1, 8), (3, 32))]
        assert [info["reduction"] for info in backbone.feature_info] == [8, 32]


@pytest.mark.parametrize("model", MODELS)
def test_released_weights_load_into_features_only_and_match_the_full_network(model):
    state = released_state_dict(model)
    full = uninitialised(model).eval()
    load_pretrained(full, state)
    backbone = uninitialised(model, features_only=True, out_indices=(0, 2)).eval()
    report = load_pretrained(backbone, state)
    assert report.reinitialised == []
    assert not any(key.startswith(("fc.", "classifier.", "predict_", "conv_last.")) for key in backbone.state_dict())
    assert report.loaded == len(backbone.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        logits = full(x)
        _, expected = full.forward_intermediates(x, indices=(0, 2))
        features = backbone(x)
        assert torch.equal(full.forward_head(full.forward_features(x)), logits)
    assert len(features) == 2 and all(torch.equal(a, b) for a, b in zip(features, expected))

    # Outside the classifier and side heads everything is strict: a mis-shaped backbone tensor is named.
    key = next(k for k in backbone.state_dict() if k.endswith("conv.weight") or k.endswith(".0.weight"))
    broken = dict(state, **{key: torch.zeros(1)})
    with pytest.raises(WeightsMismatchError, match=key.replace(".", r"\.")):
        load_pretrained(backbone, broken)


@pytest.mark.parametrize("model", ["OneShot", "ShuffleNetV2.Large"])
def test_reset_classifier_then_forward(model):
    torch.manual_seed(0)
    net = network(model).create_network(num_classes=10) if model == "OneShot" else uninitialised(model, 10)
    keys = list(net.state_dict())
    net.reset_classifier(7)
    assert list(net.state_dict()) == keys and net.num_classes == 7
    x = torch.randn(2, 3, 64, 64)
    assert net.eval()(x).shape == (2, 7)
    outputs = net.train()(x)
    if net.side_head_names:
        assert [tuple(o.shape) for o in outputs] == [(2, 7)] * 4
    else:
        assert outputs.shape == (2, 7)
    net.reset_classifier(0)
    assert net.num_classes == 0 and net.eval()(x).shape == (2, net.num_features)
    assert net.get_classifier() is getattr(net, network(model).CLASSIFIER)
    # The features in training mode too: Large gave its side heads' pooled features beside them, a 4-tuple.
    assert net.train()(x).shape == (2, net.num_features)
    assert network(model).create_network(num_classes=0).train()(x).shape == (2, net.num_features)


@pytest.mark.parametrize("out_indices", [(True,), (0, 3.0)])
def test_stage_indices_that_are_no_whole_numbers_are_refused_as_out_of_range_ones_are(out_indices):
    """(True,) was taken as stage 1 and (0, 3.0) failed with a TypeError deep inside."""
    with pytest.raises(ValueError, match=f"stage index {out_indices[-1]}: choose from 0 to 3"):
        network("OneShot").create_network(features_only=True, out_indices=out_indices)
