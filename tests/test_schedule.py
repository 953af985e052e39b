"""Sigma schedules against diffusers' scheduler (bit-exact) and BFL's get_schedule formula."""
import math

import numpy as np
import pytest
import torch

from flux_core import schedule
from flux_core.families import FAMILIES
from flux_core.errors import ConfigError


def _diffusers_klein(steps, seq_len):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    s = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                        base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential")
    s.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=compute_empirical_mu(seq_len, steps))
    return s


def _bfl_schedule(steps, seq_len):
    """BFL flux2 `get_schedule`: linspace(1, 0, N+1) through generalized_time_snr_shift, in float64."""
    mu = schedule.empirical_mu(seq_len, steps)
    t = np.linspace(1.0, 0.0, steps + 1)
    out = np.zeros_like(t)
    nz = t > 0
    out[nz] = math.exp(mu) / (math.exp(mu) + (1 / t[nz] - 1) ** 1.0)
    return out


# image token counts: 256² .. 2048², non-square, and both sides of the 4300-token switch
@pytest.mark.parametrize("seq_len", [256, 1024, 1536, 4096, 4300, 4301, 4356, 7225, 16384])
@pytest.mark.parametrize("steps", [1, 2, 4, 8, 28, 50])
def test_klein_sigmas_equal_diffusers_and_bfl(steps, seq_len):
    ref = _diffusers_klein(steps, seq_len)
    ours = schedule.klein_sigmas(steps, seq_len)
    assert ours.dtype == np.float32 and len(ours) == steps + 1 and ours[-1] == 0
    np.testing.assert_array_equal(ours, ref.sigmas.numpy())
    np.testing.assert_allclose(ours, _bfl_schedule(steps, seq_len), rtol=0, atol=2e-6)
    # what the network is fed: diffusers passes (σ·1000 in float32) / 1000
    fed = [(t / 1000).to(torch.float32).item() for t in ref.timesteps]
    assert [float(FAMILIES["klein"].model_time(s)) for s in ours[:-1]] == fed


def test_klein_mu_discontinuity():
    """Above 4300 image tokens μ stops depending on the step count and drops (REFERENCE §0.13)."""
    assert schedule.empirical_mu(4300, 4) != schedule.empirical_mu(4300, 50)
    assert schedule.empirical_mu(4301, 4) == schedule.empirical_mu(4301, 50)
    assert schedule.empirical_mu(4301, 4) < schedule.empirical_mu(4300, 4)
    # REFERENCE §1.8's published 4-step table at 512² and 1024²
    np.testing.assert_allclose(schedule.klein_sigmas(4, 1024), [1, 0.95809, 0.88398, 0.71750, 0], atol=6e-6)
    np.testing.assert_allclose(schedule.klein_sigmas(4, 4096), [1, 0.96738, 0.90814, 0.76720, 0], atol=6e-6)


@pytest.mark.parametrize("steps", [1, 2, 3, 8, 9, 20, 50])
def test_zimage_sigmas_equal_diffusers(steps):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.z_image.pipeline_z_image import get_default_z_image_sigmas

    s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    s.set_timesteps(sigmas=get_default_z_image_sigmas(steps), mu=0.7)
    ours = schedule.zimage_sigmas(steps)
    np.testing.assert_array_equal(ours, s.sigmas.numpy())
    fed = [((1000 - t) / 1000).item() for t in s.timesteps]
    assert [float(FAMILIES["zimage"].model_time(x)) for x in ours[:-1]] == fed


def test_zimage_turbo_table():
    np.testing.assert_allclose(schedule.zimage_sigmas(8), [1, 0.95455, 0.9, 0.83333, 0.75, 0.64286, 0.5, 0.3, 0],
                               atol=6e-6)


@pytest.mark.parametrize("steps,strength", [(8, 0.6), (8, 1.0), (10, 0.25), (50, 0.33), (4, 0.5)])
def test_img2img_start_matches_diffusers(steps, strength):
    init = min(steps * strength, steps)  # ZImageImg2ImgPipeline.get_timesteps
    assert schedule.img2img_start(schedule.zimage_sigmas(steps), strength) == int(max(steps - init, 0))


def test_bad_steps_and_strength_are_clear_errors():
    with pytest.raises(ConfigError, match="steps"):
        schedule.klein_sigmas(0, 1024)
    with pytest.raises(ConfigError, match="strength"):
        schedule.img2img_start(schedule.zimage_sigmas(8), 0.0)


def test_cfg_conventions():
    pos, neg = np.float32(2.0), np.float32(0.5)
    klein, zimage = FAMILIES["klein"], FAMILIES["zimage"]
    assert klein.cfg_combine(pos, neg, 4.0) == neg + 4.0 * (pos - neg)
    assert zimage.cfg_combine(pos, neg, 4.0) == pos + 4.0 * (pos - neg)
    assert not klein.uses_cfg(4.0, distilled=True)
    assert klein.uses_cfg(4.0, distilled=False) and not klein.uses_cfg(1.0, distilled=False)
    assert zimage.uses_cfg(0.5, distilled=True) and not zimage.uses_cfg(0.0, distilled=False)
