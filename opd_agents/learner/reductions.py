"""Masked tensor helpers shared by the losses (`losses.py`) and their diagnostics (`diagnostics.py`).

Owns the log-prob floor, the fill of support padding, the compute dtype (half precision upcast to float32, float64
kept), masking that stops gradients at masked slots, the masked mean, and turning metric tensors into floats. Pure
tensor code. Shapes: `x` is `(...)` or `(..., K)`; a `mask` is bool or 0/1, left-aligned with `x` (`(...)`).
"""
from __future__ import annotations

import torch

# Log-probs are floored here: e^-100 ≈ 4e-44 is below float32's smallest normal, so no representable fp32
# probability changes, while a -inf (teacher says "impossible") becomes a large but finite log-ratio.
LOGPROB_FLOOR = -100.0
# Fill for padding slots of a support: exp() of it is exactly 0, yet arithmetic on it stays finite (no 0·inf).
NO_MASS = -1e9


def compute_dtype(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def masked(x: torch.Tensor, mask: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """`x` where mask (broadcast from the left-aligned `mask`), else `fill`; gradients never reach masked slots."""
    m = mask.bool().reshape(mask.shape + (1,) * (x.dim() - mask.dim()))
    return torch.where(m, x, torch.full_like(x, fill))


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` `(...)` over `mask` `(...)` (0 if empty)."""
    m = mask.bool()
    return masked(values, m).sum() / m.sum().clamp(min=1)


def floats(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    """Detach to python floats with a single device sync."""
    if not metrics:
        return {}
    values = torch.stack([v.detach().double().reshape(()) for v in metrics.values()]).tolist()
    return dict(zip(metrics, values))
