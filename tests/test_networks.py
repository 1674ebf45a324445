"""The three networks against the released key lists and the published figures (MODELS.md)."""
from __future__ import annotations

from functools import cache

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from common.counting import count_macs, count_parameters
from common.layers import channel_split_shuffle
from conftest import FIXTURES, KEY_FILES, SHARED, network, released_keys

MODELS = ("OneShot", "ShuffleNetV2.Large", "ShuffleNetV2.ExLarge")
FIGURES = {  # parameters with side heads, without, MACs at 224
    "OneShot": (3_432_579, 3_432_579, 327_857_920),
    "ShuffleNetV2.Large": (140_685_664, 125_120_936, 12_780_652_544),
    "ShuffleNetV2.ExLarge": (271_283_296, 255_374_504, 46_174_794_752),
}


@cache
def built(model: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return network(model).create_network()


@pytest.mark.parametrize("model", MODELS)
def test_parameter_and_mac_counts(model):
    with_heads, without_heads, macs = FIGURES[model]
    with torch.device("meta"):
        net = network(model).create_network()
    assert count_parameters(net) == with_heads
    assert count_parameters(net, include_side_heads=False) == without_heads
    assert count_macs(net) == macs
    assert network(model).PUBLISHED["params"] == with_heads and network(model).PUBLISHED["macs"] == macs


@pytest.mark.parametrize("model", MODELS)
def test_state_dict_matches_released_keys(model):
    with torch.device("meta"):
        net = network(model).create_network()
    expected = [(k, s) for k, s in released_keys(model).items() if ".se_block." not in k]
    assert [(k, tuple(v.shape)) for k, v in net.state_dict().items()] == expected
    aliases = [k for k in released_keys(model) if ".se_block." in k]
    assert len(aliases) == (0 if model == "OneShot" else sum(".se_fc" in k for k, _ in expected))


@pytest.mark.parametrize("model", MODELS)
def test_key_fixtures_equal_shared_spec(model):
    spec = SHARED / "spec" / "keys" / KEY_FILES[model]
    if not spec.exists():
        pytest.skip(f"{spec} is absent (a user's clone has no ../shared)")
    assert spec.read_text() == (FIXTURES / "keys" / KEY_FILES[model]).read_text()


def test_channel_split_shuffle_takes_even_and_odd_channels():
    x = torch.arange(2 * 8 * 3 * 3, dtype=torch.float32).reshape(2, 8, 3, 3)
    even, odd = channel_split_shuffle(x)
    assert torch.equal(even, x[:, 0::2]) and torch.equal(odd, x[:, 1::2])


class MaxRank(TorchFunctionMode):
    """Records the largest rank of any tensor an operation produces."""

    def __init__(self):
        super().__init__()
        self.max_rank = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for value in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(value, torch.Tensor):
                self.max_rank = max(self.max_rank, value.dim())
        return result


@pytest.mark.parametrize("model", MODELS)
def test_training_and_eval_outputs(model):
    net = built(model)
    x = torch.randn(2, 3, 64, 64)
    net.train()
    with torch.no_grad(), MaxRank() as ranks:
        out = net(x)
    assert ranks.max_rank <= 5
    if model == "OneShot":
        assert out.shape == (2, 1000)
    else:
        assert isinstance(out, tuple) and len(out) == 4
        assert all(o.shape == (2, 1000) for o in out)
    net.eval()
    calls = []
    hooks = [getattr(net, name).register_forward_hook(lambda *a: calls.append(1))
             for name in ("predict_14", "predict_28", "predict_56") if hasattr(net, name)]
    with torch.no_grad(), MaxRank() as ranks:
        logits = net(x)
    for hook in hooks:
        hook.remove()
    assert ranks.max_rank <= 5
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 1000) and torch.isfinite(logits).all()
    assert not calls, "side heads must not run in eval mode"


@pytest.mark.parametrize("size", [32, 96, 160])
def test_any_multiple_of_32_works(size):
    net = built("OneShot").eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, size, size)).shape == (1, 1000)


def test_num_classes():
    net = network("OneShot").create_network(num_classes=7).eval()
    assert net(torch.randn(1, 3, 64, 64)).shape == (1, 7)


def test_exlarge_at_224_once():
    net = built("ShuffleNetV2.ExLarge").eval()
    with torch.no_grad():
        logits = net(torch.randn(1, 3, 224, 224))
    assert logits.shape == (1, 1000) and torch.isfinite(logits).all()


@pytest.mark.parametrize("model", MODELS)
def test_initialisation(model):
    net = built(model, seed=1)  # a network no other test has run
    for name, module in net.named_modules():
        if isinstance(module, nn.Conv2d) and module.weight.numel() >= 20_000:
            expected = 0.01 if name.startswith("first_conv") else 1.0 / module.weight.shape[1]
            assert module.weight.std().item() == pytest.approx(expected, rel=0.05), name
            assert abs(module.weight.mean().item()) < 4 * expected / module.weight.numel() ** 0.5 + 1e-6
        elif isinstance(module, nn.BatchNorm2d):
            assert torch.all(module.weight == 1) and torch.allclose(module.bias, torch.full_like(module.bias, 1e-4))
            assert torch.all(module.running_mean == 0) and torch.all(module.running_var == 1)
        elif isinstance(module, nn.Linear) and module.weight.numel() >= 20_000:
            assert module.weight.std().item() == pytest.approx(0.01, rel=0.05), name
            assert module.bias is None or torch.all(module.bias == 0)
    first = net.first_conv[0]
    first_weight = first.weight if isinstance(first, nn.Conv2d) else first.conv.weight
    assert first_weight.std().item() == pytest.approx(0.01, rel=0.3)
