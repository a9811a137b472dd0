"""POVID-style image distortion: the forward diffusion process at step t (Zhou et al. 2024; paper 000 Appendix E.1).

    betas_k   = sigmoid(linspace(-6, 6, 1000))_k * (5e-3 - 1e-5) + 1e-5          k = 0..999
    alphabar_t = prod_{k<=t} (1 - betas_k)
    x_t       = sqrt(alphabar_t) * x_0 + sqrt(1 - alphabar_t) * eps,   eps ~ N(0, I)

x_0 is the image in [0, 1]. POVID uses t = 500 and redraws eps every time.

Departure: the noise is added to the image at the model's input resolution (after resize / crop / AnyRes tiling),
working directly on the normalised `pixel_values` -- pv = (x - mean) / std is affine in x, so
pv_t = (sqrt(ab) x_0 + sqrt(1-ab) eps - mean) / std is exact. Noise added before resizing would be partly averaged
away by the resampling filter.
"""
from __future__ import annotations

import torch

N_STEPS = 1000


def alphabar(t: int) -> float:
    if not 0 <= t < N_STEPS:
        raise ValueError(f"noise step must be in [0, {N_STEPS}), got {t}")
    betas = torch.sigmoid(torch.linspace(-6, 6, N_STEPS, dtype=torch.float64)) * (5e-3 - 1e-5) + 1e-5
    return float(torch.cumprod(1 - betas, 0)[t])


def noisy_pixel_values(pixel_values: torch.Tensor, mean, std, t: int = 500,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """pixel_values (..., 3, S, S) normalised with per-channel mean/std -> the same after x_t = diffusion(x_0, t)."""
    ab = alphabar(t)
    shape = [1] * (pixel_values.dim() - 3) + [3, 1, 1]
    mean = torch.as_tensor(mean, dtype=torch.float32).view(shape)
    std = torch.as_tensor(std, dtype=torch.float32).view(shape)
    x0 = pixel_values.float() * std + mean
    eps = torch.randn(x0.shape, generator=generator, dtype=torch.float32)
    xt = ab ** 0.5 * x0 + (1 - ab) ** 0.5 * eps
    return ((xt - mean) / std).to(pixel_values.dtype)
