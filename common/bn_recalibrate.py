"""Re-estimate BatchNorm running statistics after the weights changed under them (averaging, end of training).

Not torch.optim.swa_utils.update_bn: that one leaves every module in the top module's mode, reads the whole loader
(no batch count, no error when data runs short) and restores no momentum when interrupted. The OneShot recipe's
1,250 batches at lr 0 with momentum 1/k are the cumulative average, PyTorch's momentum=None, with no optimizer step."""
from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from common.errors import UserError


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[Any], num_batches: int,
                          forward: Callable[[nn.Module, Any], Any] | None = None) -> None:
    """Replace every BatchNorm's running mean and variance by their exact average over `num_batches` batches (model
    inputs, or what `forward(model, batch)` runs). The whole model runs in train mode, as in the original recipe, so
    side heads are re-estimated too; momenta and modes are restored afterwards. UserError if `batches` runs out."""
    if num_batches < 1:
        raise ValueError(f"num_batches must be at least 1, got {num_batches}")
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not norms:
        return
    modes = {module: module.training for module in model.modules()}
    momenta = {norm: norm.momentum for norm in norms}
    run = forward or (lambda net, batch: net(batch))
    done = 0
    try:
        for norm in norms:
            norm.reset_running_stats()
            # None makes BatchNorm weight the k-th batch by 1/k: a cumulative mean, the original's schedule.
            norm.momentum = None
        model.train()
        # islice, not a break inside the loop: a data loader must not decode a batch that is never used.
        for batch in itertools.islice(batches, num_batches):
            run(model, batch)
            done += 1
    finally:
        for norm, momentum in momenta.items():
            norm.momentum = momentum
        for module, training in modes.items():
            module.train(training)
    if done < num_batches:
        raise UserError(f"BatchNorm re-estimation needs {num_batches} batches but the data gave only {done}; "
                        f"ask for fewer batches")
