"""Exponential moving average of the weights during training (timm's ModelEmaV3, with decay warm-up).

Saving and resuming: the EMA's whole state is its module's weights and buffers, which get_training_state(ema=...)
stores and load_checkpoint(ema=...) restores. The decay at each update is a function of the step number passed
to `update(model, step=...)` alone, so a resumed run that keeps passing the global iteration continues exactly
as an uninterrupted one would. The one piece of hidden state ModelEmaV3 has, the generator of its stochastic
rounding for bfloat16 EMA tensors, is never used here: the EMA of a low-precision model is kept in float32.
"""
from __future__ import annotations

import torch
from timm.utils import ModelEmaV3, unwrap_model
from torch import nn

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def create_ema(model: nn.Module, decay: float = 0.9998, warmup: bool = True) -> ModelEmaV3:
    """An EMA copy of `model` (DDP/compile wrappers removed), on the model's device.

    Call `ema.update(model, step=n)` after the n-th optimizer step (n = 1 first). With `warmup` the decay
    is 0 at n = 1 (the first update copies the weights) and rises as 1 - n^(-2/3) until it reaches `decay`, so
    the early, fast-changing weights leave the average quickly instead of lingering for ~1/(1 - decay) steps.
    """
    model = unwrap_model(model)
    low_precision = any(p.dtype in _LOW_PRECISION for p in model.parameters())
    # float16 cannot hold (1 - decay) * (model - ema) at all, and bfloat16 would need stochastic rounding whose
    # generator state a checkpoint does not keep: averaging in float32 keeps resume exact for both.
    return ModelEmaV3(model, decay=decay, use_warmup=warmup, dtype=torch.float32 if low_precision else None)
