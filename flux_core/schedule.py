"""Sigma schedules as small backend-neutral functions (the Euler loop is `pipeline.euler`).

Both models are rectified flows sampled from σ=1 (noise) to σ=0 (data); they differ in the schedule:

  klein   σ = e^μ / (e^μ + (1/s − 1)), s = linspace(1, 1/N, N), μ = empirical_mu(image tokens, N)
  Z-Image σ = 3s / (1 + 2s) (static shift 3)

What each network is fed and returns, and its CFG convention, are family rules (`flux_core/families.py`). The
arithmetic mirrors diffusers' FlowMatchEulerDiscreteScheduler step by step (float32 numpy, the same casts), so the
sigmas are bit-identical to diffusers' (docs/MODELS.md §S2, §S3).
"""
from __future__ import annotations

import math

import numpy as np

from .errors import ConfigError

# BFL / diffusers `compute_empirical_mu` fit constants (FLUX.2): two linear fits in image tokens, at 10 and 200 steps.
_MU_A1, _MU_B1 = 8.73809524e-05, 1.89833333
_MU_A2, _MU_B2 = 0.00016927, 0.45666666
_MU_SWITCH = 4300  # above this many image tokens μ ignores the step count (a real discontinuity in BFL's fit)


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    m200 = _MU_A2 * image_seq_len + _MU_B2
    if image_seq_len > _MU_SWITCH:
        return float(m200)
    m10 = _MU_A1 * image_seq_len + _MU_B1
    a = (m200 - m10) / 190.0
    b = m200 - 200.0 * a
    return float(a * num_steps + b)


def _check_steps(steps: int) -> None:
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ConfigError(f"steps must be a positive integer, got {steps!r}")


def klein_sigmas(num_steps: int, image_seq_len: int) -> np.ndarray:
    """FLUX.2 klein schedule: N+1 float32 sigmas ending in 0 (diffusers Flux2KleinPipeline + scheduler, bit for bit)."""
    _check_steps(num_steps)
    s = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
    mu = empirical_mu(image_seq_len, num_steps)
    sig = math.exp(mu) / (math.exp(mu) + (1.0 / s - 1.0) ** 1.0)
    return np.append(sig.astype(np.float32), np.float32(0.0))


def zimage_sigmas(num_steps: int, shift: float = 3.0) -> np.ndarray:
    """Z-Image schedule: static shift 3 over linspace(1, 1/N, N) (torch.linspace in float32, as diffusers draws it)."""
    _check_steps(num_steps)
    # diffusers builds this grid with torch.linspace in float32 (`get_default_z_image_sigmas`), whose rounding differs
    # from numpy's float64 linspace by an ulp at some steps (seen at N = 50): use the same call.
    import torch

    s = np.array(torch.linspace(1.0, 1.0 / num_steps, num_steps).tolist()).astype(np.float32)
    sig = shift * s / (1 + (shift - 1) * s)
    return np.append(sig.astype(np.float32), np.float32(0.0))


def img2img_start(sigmas: np.ndarray, strength: float) -> int:
    """Index of the first step to run for image-to-image at `strength` (1 = from pure noise, as diffusers' img2img
    pipelines do: skip int(N·(1 − strength)) leading steps)."""
    if not 0.0 < strength <= 1.0:
        raise ConfigError(f"strength must be in (0, 1], got {strength}")
    n = len(sigmas) - 1
    init = min(n * strength, n)
    return int(max(n - init, 0))
