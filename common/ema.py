"""Exponential moving average of the weights during training (timm's ModelEmaV3, with decay warm-up).

The decay of each update is a function of the step passed to `update(model, step=...)`, so a resumed run continues
exactly; the EMA of a low-precision model is kept in float32, so ModelEmaV3's stochastic rounding is never used."""
from __future__ import annotations

import torch
from timm.utils import ModelEmaV3, unwrap_model
from torch import nn

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def create_ema(model: nn.Module, decay: float = 0.9998) -> ModelEmaV3:
    """An EMA copy of `model` (wrappers removed) on its device; call `ema.update(model, step=n)` after the n-th step.
    The decay rises as 1 - n^(-2/3) up to `decay`, so early weights leave the average fast."""
    model = unwrap_model(model)
    low_precision = any(p.dtype in _LOW_PRECISION for p in model.parameters())
    # float16 cannot hold (1 - decay) * (model - ema) at all, and bfloat16 would need stochastic rounding whose
    # generator state a checkpoint does not keep: averaging in float32 keeps resume exact for both.
    return ModelEmaV3(model, decay=decay, use_warmup=True, dtype=torch.float32 if low_precision else None)
