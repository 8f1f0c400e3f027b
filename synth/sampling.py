"""Samplers for an epsilon-predicting diffusion model: DDIM (MONAI) and DPM-Solver++(2M).

DPM-Solver++ (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models", arXiv:2211.01095) integrates the diffusion ODE in the data-prediction form
with a second-order multistep update, which reaches the quality of 20-50 DDIM steps in about 10. It
needs no retraining: it reads the same noise schedule (``alphas_cumprod``) the model was trained with.

Classifier-free guidance can be limited to an interval of the noise levels (Kynkaanniemi et al. 2024,
"Applying Guidance in a Limited Interval Improves Sample and Distribution Quality in Diffusion
Models", arXiv:2404.07724): guidance matters most at high and middle noise, where the anatomy is laid
out, and a step without guidance runs the network on one input instead of two.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

__all__ = ["SAMPLERS", "dpm_solver_pp_2m", "dpm_timesteps"]

SAMPLERS = ("ddim", "dpm++2m")

EpsFn = Callable[[torch.Tensor, int, bool], torch.Tensor]  # (x, t, guided) -> predicted noise


def dpm_timesteps(alphas_cumprod: torch.Tensor, steps: int, spacing: str = "logsnr") -> list[int]:
    """``steps`` decreasing training timesteps from pure noise (``T - 1``) to the least noisy (0).

    Args:
        alphas_cumprod: The training schedule (length T).
        steps: How many model evaluations.
        spacing: ``logsnr``: evenly spaced in log signal-to-noise ratio, the spacing DPM-Solver is
            analysed in (Lu et al. 2022); ``time``: evenly spaced in training timesteps.

    Ending at 0 matters: the last update returns the data prediction there, and a prediction made at a
    noisier level is a posterior mean (a blurred image), not the end of the sampling trajectory.
    """
    n_train = len(alphas_cumprod)
    if not 1 <= steps <= n_train:
        raise ValueError(f"`steps` must be within 1-{n_train}, got {steps}")
    if spacing not in ("logsnr", "time"):
        raise ValueError(f"`spacing` must be logsnr or time, got {spacing!r}")
    last = n_train - 1
    if steps == 1:
        return [last]
    if spacing == "time":
        return [round(last - i * last / (steps - 1)) for i in range(steps)]
    a = alphas_cumprod.double()
    lam = 0.5 * (torch.log(a) - torch.log1p(-a))  # log(alpha / sigma), increasing as t decreases
    out: list[int] = []
    for v in torch.linspace(float(lam[last]), float(lam[0]), steps, dtype=torch.float64):
        t = int(torch.argmin((lam - v).abs()))
        out.append(min(t, out[-1] - 1) if out else t)  # strictly decreasing
    if out[-1] < 0:  # more steps than distinct levels near 0: fall back to every timestep there
        out = [t for t in out if t >= 0]
    return out


def _coefficients(alphas_cumprod: torch.Tensor, t: int) -> tuple[float, float, float]:
    """alpha_t, sigma_t and lambda_t = log(alpha_t / sigma_t) of timestep ``t`` (``t < 0``: clean)."""
    if t < 0:
        return 1.0, 0.0, math.inf
    a = float(alphas_cumprod[t])
    alpha, sigma = math.sqrt(a), math.sqrt(1.0 - a)
    return alpha, sigma, math.log(alpha / sigma)


@torch.no_grad()
def dpm_solver_pp_2m(
    eps_fn: EpsFn,
    x: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    timesteps: Sequence[int],
    guided: Sequence[bool] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Integrate from noise ``x`` at ``timesteps[0]`` to a clean sample with DPM-Solver++(2M).

    Args:
        eps_fn: The model: ``eps_fn(x, t, guided)`` -> predicted noise for ``x`` at timestep ``t``.
        x: Initial noise (any shape).
        alphas_cumprod: The training schedule's cumulative alpha products (length T).
        timesteps: Decreasing training timesteps; the last update goes to the clean sample.
        guided: Per step, whether to apply classifier-free guidance (default: every step).
        progress: Called as ``progress(step, total)`` after each network evaluation.

    Returns:
        The clean sample, float32. The last update is first order (``lower_order_final``), which is
        the stable choice for few steps.
    """
    total = len(timesteps)
    guided = [True] * total if guided is None else list(guided)
    if len(guided) != total:
        raise ValueError(f"`guided` must have one entry per step ({total}), got {len(guided)}")
    x = x.float()
    x0_prev, h_prev = None, None
    for i, t in enumerate(timesteps):
        alpha_s, sigma_s, lambda_s = _coefficients(alphas_cumprod, int(t))
        eps = eps_fn(x, int(t), bool(guided[i])).float()
        x0 = (x - sigma_s * eps) / alpha_s
        t_next = int(timesteps[i + 1]) if i + 1 < total else -1
        alpha_t, sigma_t, lambda_t = _coefficients(alphas_cumprod, t_next)
        if t_next < 0:
            x = x0  # to the clean sample: sigma 0, first order
        else:
            h = lambda_t - lambda_s
            d = x0
            if x0_prev is not None:
                r = h_prev / h
                d = (1.0 + 1.0 / (2.0 * r)) * x0 - (1.0 / (2.0 * r)) * x0_prev
            x = (sigma_t / sigma_s) * x - alpha_t * math.expm1(-h) * d
            h_prev = h
        x0_prev = x0
        if progress:
            progress(i + 1, total)
    return x
