"""The samplers (flux_core/samplers.py) against ComfyUI's own, on the same model outputs.

The "model" is a random linear map of the latent and the model time (float32), wrapped for each side in its own
convention: ours gets (x, t) and returns v = noise − x0; ComfyUI's k-diffusion samplers get (x, σ) and want the
denoised x0 = x − σ·v (what ComfyUI's CONST model sampling computes from a flow model's output).

- In CI: against `comfy_res_multistep` below, a faithful copy of the math of ComfyUI's `res_multistep` (file
  comfy/k_diffusion/sampling.py of comfyanonymous/ComfyUI, functions `res_multistep` with eta = 0 and cfg_pp off,
  as `sample_res_multistep` calls it, plus `get_ancestral_step` and `to_d` from the same file), float32 torch ops
  as there.
- Opt-in (COMFYUI_DIR, COMFYUI_PYTHON as for tests/test_comfyui_e2e.py): ComfyUI's own `sample_res_multistep` and
  `sample_euler`, imported from the checkout in its own Python, on the same inputs.

Tolerance: 1e-5 relative (float32; the scalars are float32 torch in ComfyUI and float64 here).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import rel_err
from flux_core import families, pipeline, samplers, schedule
from flux_core.errors import ConfigError, Interrupted

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5
SHAPE = (2, 8, 6, 5)


def linear_model(seed: int, channels: int = SHAPE[1]):
    """(A, b, c) of v = A·x (over channels) + t·b + c, scaled so that x stays O(1) along a trajectory."""
    g = torch.Generator().manual_seed(seed)
    a = 0.4 * torch.randn(channels, channels, generator=g) / channels ** 0.5
    b = torch.randn(1, channels, 1, 1, generator=g)
    c = 0.5 * torch.randn(1, channels, 1, 1, generator=g)
    return a, b, c


def velocity(params, x, t):
    a, b, c = params
    return torch.einsum("oc,bchw->bohw", a, x) + float(t) * b + c


def our_denoiser(params):
    return lambda x, t: velocity(params, x, t)


def comfy_model(params, family):
    """What a ComfyUI sampler calls: model(x, σ·s_in) -> denoised, our v at the model time we would feed."""
    def model(x, sigma):
        t = family.model_time(np.float32(sigma[0].item()))
        return x - sigma.view(-1, 1, 1, 1) * velocity(params, x, t)
    return model


def comfy_res_multistep(model, x, sigmas):
    """ComfyUI comfy/k_diffusion/sampling.py `res_multistep` for eta = 0, cfg_pp = False (`sample_res_multistep`):
    the noise term is sigma_up = 0 there, so it is left out. Kept line for line with the original's math."""
    s_in = x.new_ones([x.shape[0]])
    sigma_fn = lambda t: t.neg().exp()  # noqa: E731
    t_fn = lambda sigma: sigma.log().neg()  # noqa: E731
    phi1_fn = lambda t: torch.expm1(t) / t  # noqa: E731
    phi2_fn = lambda t: (phi1_fn(t) - 1.0) / t  # noqa: E731
    old_sigma_down = None
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        sigma_down = sigmas[i + 1]  # get_ancestral_step(sigmas[i], sigmas[i + 1], eta=0) -> (sigma_to, 0)
        if sigma_down == 0 or old_denoised is None:
            d = (x - denoised) / sigmas[i]  # to_d
            dt = sigma_down - sigmas[i]
            x = x + d * dt
        else:
            t, t_old, t_next, t_prev = t_fn(sigmas[i]), t_fn(old_sigma_down), t_fn(sigma_down), t_fn(sigmas[i - 1])
            h = t_next - t
            c2 = (t_prev - t_old) / h
            phi1_val, phi2_val = phi1_fn(-h), phi2_fn(-h)
            b1 = torch.nan_to_num(phi1_val - phi2_val / c2, nan=0.0)
            b2 = torch.nan_to_num(phi2_val / c2, nan=0.0)
            x = sigma_fn(h) * x + h * (b1 * denoised + b2 * old_denoised)
        old_denoised = denoised
        old_sigma_down = sigma_down
    return x


def comfy_euler(model, x, sigmas):
    """ComfyUI `sample_euler` without churn (s_churn = 0, its default)."""
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


def noise(seed: int = 1):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


KLEIN, ZIMAGE = families.get("klein"), families.get("zimage")
SCHEDULES = {  # the official templates' schedules: Z-Image-Turbo 8 steps, klein 4 steps, base 50 steps
    "zimage-8": (ZIMAGE, lambda: schedule.zimage_sigmas(8)),
    "klein-4": (KLEIN, lambda: schedule.klein_sigmas(4, 4096)),
    "klein-50": (KLEIN, lambda: schedule.klein_sigmas(50, 1024)),
    "zimage-3": (ZIMAGE, lambda: schedule.zimage_sigmas(3)),
}


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_res_multistep_equals_comfyui_math(name):
    family, make = SCHEDULES[name]
    sigmas = make()
    params = linear_model(7)
    ours = samplers.run("res_multistep", our_denoiser(params), noise(), sigmas, family)
    ref = comfy_res_multistep(comfy_model(params, family), noise(), torch.from_numpy(sigmas))
    assert rel_err(ours, ref) <= TOL
    # and it is a different sampler: the second-order steps move the result well past float32 noise
    euler = samplers.run("euler", our_denoiser(params), noise(), sigmas, family)
    assert rel_err(euler, ref) > 1e-3


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_euler_equals_comfyui_math_and_the_pipeline_loop(name):
    family, make = SCHEDULES[name]
    sigmas = make()
    params = linear_model(3)
    ours = samplers.run("euler", our_denoiser(params), noise(), sigmas, family)
    assert torch.equal(ours, pipeline.euler(our_denoiser(params), noise(), sigmas, family))
    ref = comfy_euler(comfy_model(params, family), noise(), torch.from_numpy(sigmas))
    assert rel_err(ours, ref) <= TOL


def test_res_multistep_from_a_later_start_equals_comfyui_on_the_cut_schedule():
    """Image-to-image: ComfyUI samples the tail of the schedule; its first step there is an Euler step, as ours."""
    sigmas = schedule.zimage_sigmas(8)
    params = linear_model(11)
    x = noise(2) * float(sigmas[3])
    ours = samplers.run("res_multistep", our_denoiser(params), x.clone(), sigmas, ZIMAGE, start=3)
    ref = comfy_res_multistep(comfy_model(params, ZIMAGE), x.clone(), torch.from_numpy(sigmas[3:]))
    assert rel_err(ours, ref) <= TOL


def test_res_multistep_is_exact_on_a_single_data_point():
    """A denoiser that always predicts the same x0 has the straight line x = σ·noise + (1 − σ)·x0 as its exact
    flow; the exponential integrator follows it exactly at every step (e^{−h} + h·(b1 + b2) = 1), Euler too."""
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    eps = noise(6)
    sigmas = schedule.zimage_sigmas(6)
    seen = []
    denoise = lambda x, t: (x - x0) / float(sigmas[len(seen)])  # noqa: E731  (v = (x − x0)/σ at this step's σ)
    out = samplers.run("res_multistep", denoise, eps.clone(), sigmas, ZIMAGE,
                       callback=lambda n, total, x: seen.append(x.clone()))
    for n, x in enumerate(seen[:-1], start=1):
        s = float(sigmas[n])
        assert rel_err(x, s * eps + (1 - s) * x0) <= TOL
    assert rel_err(out, x0) <= TOL


def test_two_steps_are_two_euler_steps():
    """First step (no previous x0) and the step to σ = 0 are Euler steps in ComfyUI's res_multistep."""
    sigmas = schedule.klein_sigmas(2, 256)
    params = linear_model(9)
    a = samplers.run("res_multistep", our_denoiser(params), noise(), sigmas, KLEIN)
    b = samplers.run("euler", our_denoiser(params), noise(), sigmas, KLEIN)
    assert torch.equal(a, b)


def test_coefficients_match_comfyui_formula_and_a_repeated_sigma_leaves_x():
    s_prev, s, s_next = 0.9, 0.7, 0.4
    decay, w_new, w_old = samplers.res_multistep_coefficients(s_prev, s, s_next)
    t = torch.tensor([s_prev, s, s_next], dtype=torch.float64).log().neg()
    h = t[2] - t[1]
    c2 = (t[0] - t[1]) / h
    phi1 = torch.expm1(-h) / -h
    phi2 = (phi1 - 1.0) / -h
    assert decay == pytest.approx(s_next / s, rel=1e-12)
    assert w_new == pytest.approx(float(h * (phi1 - phi2 / c2)), rel=1e-12)
    assert w_old == pytest.approx(float(h * phi2 / c2), rel=1e-12)
    assert decay + w_new + w_old == pytest.approx(1.0, rel=1e-12)  # consistent: a fixed point stays put
    assert samplers.res_multistep_coefficients(0.9, 0.5, 0.5) == (1.0, 0.0, 0.0)


def test_unknown_sampler_and_interrupt():
    sigmas = schedule.zimage_sigmas(4)
    with pytest.raises(ConfigError, match="res_multistep"):
        samplers.run("dpmpp_2m", our_denoiser(linear_model(1)), noise(), sigmas, ZIMAGE)
    calls = []
    with pytest.raises(Interrupted, match="step 3 of 4"):
        samplers.run("res_multistep", our_denoiser(linear_model(1)), noise(), sigmas, ZIMAGE,
                     callback=lambda *a: calls.append(a[:2]), interrupt=lambda: len(calls) == 2)
    assert calls == [(1, 4), (2, 4)]


def test_res_multistep_on_mlx_equals_torch():
    mx = pytest.importorskip("mlx.core")
    params = linear_model(4)
    a, b, c = (mx.array(p.numpy()) for p in params)

    def mlx_denoiser(x, t):
        return mx.einsum("oc,bchw->bohw", a, x) + float(t) * b + c

    class Ops:
        @staticmethod
        def step_done(x):
            mx.eval(x)
            return x

    sigmas = schedule.zimage_sigmas(8)
    out = samplers.run("res_multistep", mlx_denoiser, mx.array(noise().numpy()), sigmas, ZIMAGE, ops=Ops)
    ref = samplers.run("res_multistep", our_denoiser(params), noise(), sigmas, ZIMAGE)
    assert out.dtype == mx.float32
    assert rel_err(torch.from_numpy(np.array(out)), ref) <= TOL


# ------------------------------------------------------------------------------------ opt-in: ComfyUI itself
COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
COMFY_SCRIPT = r"""
import json, sys
import numpy as np, torch
sys.argv = [sys.argv[0], "--cpu"]              # ComfyUI parses its command line when comfy.* is imported
import comfy.options
comfy.options.enable_args_parsing()
import comfy.k_diffusion.sampling as K
from types import SimpleNamespace
from flux_core import families

data = np.load(IN)
params = [torch.from_numpy(data[k]) for k in ("a", "b", "c")]
x = torch.from_numpy(data["x"])
sigmas = torch.from_numpy(data["sigmas"])
family = families.get(str(data["kind"]))

def velocity(x, t):
    return torch.einsum("oc,bchw->bohw", params[0], x) + float(t) * params[1] + params[2]

class Model:
    # res_multistep reads model.inner_model.model_patcher.get_model_object("model_sampling").noise_scale
    inner_model = SimpleNamespace(model_patcher=SimpleNamespace(get_model_object=lambda name: SimpleNamespace()))
    def __call__(self, x, sigma, **kwargs):
        t = family.model_time(np.float32(sigma[0].item()))
        return x - sigma.view(-1, 1, 1, 1) * velocity(x, t)

out = {name: fn(Model(), x.clone(), sigmas, disable=True).numpy()
       for name, fn in (("res_multistep", K.sample_res_multistep), ("euler", K.sample_euler))}

# the schedules of the official templates: klein's Flux2Scheduler(steps, width, height); Z-Image's
# ModelSamplingAuraFlow(shift 3) (flow sampling, multiplier 1.0) with KSampler's "simple" scheduler
from comfy_extras.nodes_flux import Flux2Scheduler
import comfy.model_sampling, comfy.samplers
for steps, width, height in ((4, 1024, 1024), (50, 1024, 768), (4, 512, 512)):
    out[f"klein_{steps}_{width}_{height}"] = np.asarray(Flux2Scheduler.execute(steps, width, height)[0])
class AuraFlow(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
    pass
ms = AuraFlow()
ms.set_parameters(shift=3.0, multiplier=1.0)
for steps in (8, 9, 10, 50):
    out[f"zimage_{steps}"] = comfy.samplers.simple_scheduler(ms, steps).numpy()
np.savez(OUT, **out)
"""


@pytest.mark.comfyui
@pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run")
@pytest.mark.parametrize("name", ["zimage-8", "klein-4"])
def test_equals_comfyui_own_samplers(tmp_path, name):
    from comfy_server import comfy_python

    family, make = SCHEDULES[name]
    sigmas = make()
    params = linear_model(21)
    x = noise(3)
    np.savez(tmp_path / "in.npz", a=params[0].numpy(), b=params[1].numpy(), c=params[2].numpy(), x=x.numpy(),
             sigmas=sigmas, kind=family.name)
    script = f"IN = {str(tmp_path / 'in.npz')!r}\nOUT = {str(tmp_path / 'out.npz')!r}\n" + COMFY_SCRIPT
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([COMFYUI_DIR, str(ROOT)])}
    r = subprocess.run([comfy_python(Path(COMFYUI_DIR)), "-c", script], cwd=COMFYUI_DIR, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    theirs = np.load(tmp_path / "out.npz")
    for sampler in ("res_multistep", "euler"):
        ours = samplers.run(sampler, our_denoiser(params), x.clone(), sigmas, family)
        assert rel_err(ours, torch.from_numpy(theirs[sampler])) <= TOL, sampler
    assert rel_err(torch.from_numpy(theirs["res_multistep"]), torch.from_numpy(theirs["euler"])) > 1e-3
    # the sigmas: ours (diffusers' schedules) equal the official templates' to float32 rounding
    for steps, width, height in ((4, 1024, 1024), (50, 1024, 768), (4, 512, 512)):
        ref = theirs[f"klein_{steps}_{width}_{height}"]
        np.testing.assert_allclose(schedule.klein_sigmas(steps, width * height // 256), ref, rtol=2e-6, atol=1e-7)
    for steps in (8, 10, 50):
        np.testing.assert_allclose(schedule.zimage_sigmas(steps), theirs[f"zimage_{steps}"], rtol=2e-6, atol=1e-7)
    # "simple" picks from a 1000-entry table: t = 1 − floor(k·1000/N)/1000, on linspace's grid only when N divides
    # 1000 (docs/COMFYUI.md says so); 9 steps land up to ~2e-3 away in σ
    assert 1e-4 < np.abs(schedule.zimage_sigmas(9) - theirs["zimage_9"]).max() < 3e-3


# ------------------------------------------------------------------- through the pipeline, on a real (tiny) model
@pytest.fixture(scope="module")
def zimage(tmp_path_factory):
    from flux_core import demo, models

    paths = demo.write_demo_checkpoints(tmp_path_factory.mktemp("demo"))
    tr = models.load_transformer(paths["zimage"], "torch", dtype="float32")
    te = models.load_text_encoder(paths["text_encoder"], str(paths["tokenizer"]), "torch", dtype="float32")
    return paths, tr, pipeline.encode_prompt(te, ["a cozy room"], "zimage")


@pytest.mark.slow
def test_pipeline_sample_res_multistep_equals_comfyui_math_on_the_model(zimage):
    """pipeline.sample(sampler="res_multistep") on the tiny Z-Image: ComfyUI's res_multistep (the copy above) fed
    the same network outputs, as ComfyUI's CONST model sampling turns them into x0, from the seed's noise."""
    from flux_core.backend import impl

    _, tr, cond = zimage
    res = pipeline.sample(tr, cond, width=64, height=48, steps=8, seed=3, sampler="res_multistep")
    assert res.sampler == "res_multistep"
    c, h, w = pipeline.latent_size(tr, 64, 48)
    denoise = impl("torch", "runtime").make_denoiser(tr, cond, None, 0.0, 1, h, w)
    model = lambda x, s: x - s.view(-1, 1, 1, 1) * denoise(x, tr.family.model_time(np.float32(s[0].item())))  # noqa
    ref = comfy_res_multistep(model, pipeline.make_noise(3, 1, c, h, w), torch.from_numpy(res.sigmas))
    assert rel_err(res.latent, ref) <= TOL
    euler = pipeline.sample(tr, cond, width=64, height=48, steps=8, seed=3)
    assert rel_err(euler.latent, ref) > 1e-4
    with pytest.raises(ConfigError, match="unknown sampler"):
        pipeline.sample(tr, cond, width=64, height=48, sampler="heun")


@pytest.mark.slow
def test_cli_sampler_flag(zimage, tmp_path, capsys):
    from PIL import Image

    from flux_core.__main__ import main

    paths, _, _ = zimage
    args = ["generate", "--model", str(paths["zimage"]), "--text-encoder", str(paths["text_encoder"]),
            "--vae", str(paths["flux1_vae"]), "--tokenizer", str(paths["tokenizer"]), "--prompt", "a cozy room",
            "--width", "64", "--height", "48", "--seed", "3", "--backend", "torch", "--dtype", "float32"]
    out = {}
    for sampler in ("euler", "res_multistep"):
        out[sampler] = tmp_path / f"{sampler}.png"
        assert main([*args, "--sampler", sampler, "--output", str(out[sampler])]) == 0
        text = Image.open(out[sampler]).text
        assert json.loads(text["fluxcore"])["sampler"] == sampler and f"Sampler: {sampler}," in text["parameters"]
    a, b = (np.asarray(Image.open(out[k]), dtype=np.int16) for k in ("euler", "res_multistep"))
    assert np.abs(a - b).max() > 0
    with pytest.raises(SystemExit) as e:
        main([*args, "--sampler", "heun"])
    assert e.value.code == 2 and "res_multistep" in capsys.readouterr().err
