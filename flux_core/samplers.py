"""The sampling loops, backend-neutral: each takes a denoiser closure and works on torch tensors and mx arrays alike.

A denoiser maps (latent x float32, model time t) to the velocity v = noise − x0 in float32 for both families (see
`flux_core/torch/runtime.py` and `flux_core/mlx/runtime.py`); the sigmas come from the family (`Family.sigmas`,
`flux_core/schedule.py`) and run from 1 (noise) down to 0; `Family.model_time` maps σ to the network's time.
All arithmetic on the latent is array ⊙ Python float, so the same code serves both backends and keeps float32.

  euler          x ← x + (σ_{i+1} − σ_i)·v. What diffusers' FlowMatchEulerDiscreteScheduler does, and ComfyUI's
                 `euler` on the same sigmas (its d = (x − x0)/σ is our v).
  res_multistep  ComfyUI's `res_multistep` (eta 0: no noise added), the sampler its official Z-Image-Turbo template
                 uses: a second-order exponential multistep method (the paper ComfyUI's code cites is arXiv
                 2308.02157) on the denoised prediction x0 = x − σ·v, reusing the previous step's x0, so it costs
                 one model call per step like Euler. The first step, and a step to σ = 0, are Euler steps.
                 Written from ComfyUI `comfy/k_diffusion/sampling.py` (`res_multistep`, `sample_res_multistep`):
                 with t = −ln σ and h = t_{i+1} − t_i,
                     c2 = (t_{i−1} − t_i) / h,   φ1(z) = (e^z − 1)/z,   φ2(z) = (φ1(z) − 1)/z,
                     b1 = φ1(−h) − φ2(−h)/c2,    b2 = φ2(−h)/c2,
                     x_{i+1} = e^{−h}·x_i + h·(b1·x0_i + b2·x0_{i−1}).
                 ComfyUI evaluates the scalars in float32 torch ops; we use float64 Python math (the results agree
                 to float32 rounding, see tests/test_samplers.py).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from .errors import ConfigError, Interrupted

SAMPLERS = ("euler", "res_multistep")
DEFAULT_SAMPLER = "euler"


def check_sampler(name: str) -> str:
    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler {name!r}: pick one of {', '.join(SAMPLERS)}")
    return name


def run(name: str, denoise: Callable, x, sigmas, family, start: int = 0, callback=None, interrupt=None,
        ops=None):
    """Run sampler `name` from sigmas[start] to the end. callback(step, total, x) after every step; interrupt() is
    polled before every step and raises Interrupted; ops.step_done(x) ends each step (MLX evaluates there)."""
    step = {"euler": _euler_step, "res_multistep": _ResMultistep()}[check_sampler(name)]
    total = len(sigmas) - 1 - start
    for n, i in enumerate(range(start, len(sigmas) - 1)):
        if interrupt is not None and interrupt():
            raise Interrupted(f"interrupted before step {n + 1} of {total}")
        v = denoise(x, family.model_time(sigmas[i]))
        x = step(x, v, sigmas, i)
        if ops is not None:
            x = ops.step_done(x)
        if callback is not None:
            callback(n + 1, total, x)
    return x


def _euler_step(x, v, sigmas, i: int):
    return x + float(np.float32(sigmas[i + 1] - sigmas[i])) * v


class _ResMultistep:
    """One res_multistep step per call; keeps the previous step's denoised prediction (one instance per run)."""

    def __init__(self):
        self.old_x0 = None

    def __call__(self, x, v, sigmas, i: int):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        x0 = x - s * v
        if s_next == 0.0 or self.old_x0 is None:
            out = _euler_step(x, v, sigmas, i)
        else:
            out = _multistep(x, x0, self.old_x0, float(sigmas[i - 1]), s, s_next)
        self.old_x0 = x0
        return out


def res_multistep_coefficients(s_prev: float, s: float, s_next: float) -> tuple[float, float, float]:
    """(e^{−h}, h·b1, h·b2) of the second-order step from σ = s to s_next; the previous step was at s_prev."""
    t, t_next, t_prev = -math.log(s), -math.log(s_next), -math.log(s_prev)
    h = t_next - t
    if h == 0.0:  # a repeated sigma: ComfyUI's coefficients are NaN there and it zeroes them (x unchanged)
        return 1.0, 0.0, 0.0
    c2 = (t_prev - t) / h
    phi1 = math.expm1(-h) / -h
    phi2 = (phi1 - 1.0) / -h
    b1, b2 = phi1 - phi2 / c2, phi2 / c2
    return math.exp(-h), h * b1, h * b2


def _multistep(x, x0, old_x0, s_prev: float, s: float, s_next: float):
    decay, w_new, w_old = res_multistep_coefficients(s_prev, s, s_next)
    return decay * x + w_new * x0 + w_old * old_x0
