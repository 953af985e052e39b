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
    """Above 4300 image tokens μ stops depending on the step count and drops (docs/MODELS.md §S2)."""
    assert schedule.empirical_mu(4300, 4) != schedule.empirical_mu(4300, 50)
    assert schedule.empirical_mu(4301, 4) == schedule.empirical_mu(4301, 50)
    assert schedule.empirical_mu(4301, 4) < schedule.empirical_mu(4300, 4)
    # the 4-step tables at 512² and 1024² of docs/MODELS.md §S2 (computed with diffusers 0.42.1's scheduler)
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


def _diffusers_img2img(pipeline_cls, scheduler, steps, strength):
    """diffusers' own `get_timesteps` of an img2img-style pipeline, on a scheduler set up as its `__call__` does.
    Returns (the sigmas it will run, first one included; the step count) or None where the pipeline raises."""
    from types import SimpleNamespace

    _, remaining = pipeline_cls.get_timesteps(SimpleNamespace(scheduler=scheduler), steps, strength, "cpu")
    if remaining < 1:  # the pipeline raises ValueError("... the number of pipeline steps is 0 ...")
        return None
    return scheduler.sigmas[scheduler.begin_index:].numpy(), remaining


# strengths with awkward float products (10 * 0.3 = 3.0000000000000004, 50 * 0.07 = 3.5000000000000004), the ends,
# and one so small that N·strength vanishes next to N (diffusers then refuses to run)
STRENGTHS = [1e-17, 0.01, 0.07, 0.1, 0.125, 0.2, 0.25, 0.3, 1 / 3, 0.33, 0.5, 0.6, 0.7, 0.75, 0.8, 0.9, 0.99, 1.0]


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 8, 9, 10, 20, 28, 50])
def test_img2img_start_equals_diffusers_zimage_get_timesteps(steps):
    """Our start index (schedule.img2img_start) against ZImageImg2ImgPipeline.get_timesteps run on the scheduler
    that pipeline builds: the same number of steps, starting at the same sigma (the noise level the init latent is
    brought to), or no run at all where diffusers refuses one."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.z_image.pipeline_z_image_img2img import (ZImageImg2ImgPipeline, calculate_shift,
                                                                      get_default_z_image_sigmas, retrieve_timesteps)

    ours = schedule.zimage_sigmas(steps)
    for strength in STRENGTHS:
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
        retrieve_timesteps(sched, steps, "cpu", sigmas=get_default_z_image_sigmas(steps),
                           mu=calculate_shift(1024, 256, 4096, 0.5, 1.15))
        ref = _diffusers_img2img(ZImageImg2ImgPipeline, sched, steps, strength)
        start = schedule.img2img_start(ours, strength)
        if ref is None:
            assert start >= steps, (steps, strength)  # pipeline.sample raises ConfigError there
            continue
        ref_sigmas, remaining = ref
        assert steps - start == remaining, (steps, strength)
        np.testing.assert_array_equal(ours[start:], ref_sigmas, err_msg=f"{steps} steps, strength {strength}")


@pytest.mark.parametrize("steps", [1, 2, 4, 8, 50])
def test_img2img_start_equals_diffusers_klein_get_timesteps(steps):
    """The same rule on a second schedule (klein's), against Flux2KleinInpaintPipeline.get_timesteps: the start index
    must not depend on which schedule it cuts. (Our klein family exposes no img2img, and diffusers 0.42.1 has no klein
    img2img pipeline; its inpaint pipeline applies strength the same way.)"""
    from diffusers.pipelines.flux2.pipeline_flux2_klein_inpaint import Flux2KleinInpaintPipeline

    seq_len = 1024
    ours = schedule.klein_sigmas(steps, seq_len)
    for strength in STRENGTHS:
        ref = _diffusers_img2img(Flux2KleinInpaintPipeline, _diffusers_klein(steps, seq_len), steps, strength)
        start = schedule.img2img_start(ours, strength)
        if ref is None:
            assert start >= steps, (steps, strength)
            continue
        ref_sigmas, remaining = ref
        assert steps - start == remaining, (steps, strength)
        np.testing.assert_array_equal(ours[start:], ref_sigmas, err_msg=f"{steps} steps, strength {strength}")


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
