"""Parameter and multiply-accumulate counts, counted the way the published tables count them (hand-written so that
the count is exactly theirs: Conv2d and Linear multiply-accumulates, nothing else)."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from common.cli import ArgumentParser
from common.errors import exit_on_user_error
from common.model_state import is_side_head


def count_parameters(model: nn.Module, include_side_heads: bool = True) -> int:
    """Number of parameters; side heads are the training-only `predict_*` modules."""
    return sum(p.numel() for name, p in model.named_parameters()
               if include_side_heads or not is_side_head(name))


def count_macs(model: nn.Module, image_size: int = 224) -> int:
    """Multiply-accumulates of Conv2d and Linear layers for one image in eval mode (BatchNorm not counted)."""
    total = 0

    def hook(module: nn.Conv2d | nn.Linear, inputs, output: torch.Tensor) -> None:
        nonlocal total
        # Each output value costs one multiply-accumulate per weight of its filter (a Linear's row).
        total += output[0].numel() * module.weight[0].numel()

    handles = [module.register_forward_hook(hook) for module in model.modules()
               if isinstance(module, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    try:
        with torch.inference_mode():
            # Runs on the model's device: a model built under torch.device("meta") is counted without any arithmetic.
            model.eval()(torch.zeros(1, 3, image_size, image_size, device=next(model.parameters()).device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return total


@exit_on_user_error
def figures_main(name: str, create_network: Callable[[], nn.Module], published: dict) -> int:
    """A folder's `python network.py`: its counts beside the published figures; status 1 when one differs."""
    ArgumentParser(description=f"Count {name}'s parameters and multiply-accumulates (at 1x3x224x224) and "
                                        "compare them with the published figures.").parse_args()
    return 0 if print_figures(name, create_network(), published["params"], published["macs"]) else 1


def print_figures(name: str, model: nn.Module, params: int, macs: int) -> bool:
    """Print a network's parameter and MAC counts beside the published figures; whether both agree."""
    counted_params, counted_macs = count_parameters(model), count_macs(model)
    without_heads = count_parameters(model, include_side_heads=False)
    print(f"{name}")
    print(f"  parameters:            {counted_params:>17,}   expected {params:>17,}   "
          f"{'ok' if counted_params == params else 'MISMATCH'}")
    if without_heads != counted_params:
        print(f"  without the side heads:{without_heads:>17,}")
    print(f"  MACs (1x3x224x224):    {counted_macs:>17,}   expected {macs:>17,}   "
          f"{'ok' if counted_macs == macs else 'MISMATCH'}")
    return counted_params == params and counted_macs == macs
