"""End-to-end: flux_core's klein pipeline (files in ComfyUI layouts, our loaders, our sampler) against diffusers'
Flux2KleinPipeline built from the same tiny random components, with the same injected noise.

Compared: the final packed latents (captured by diffusers' step-end callback) ≤ 1e-4 relative, for text-to-image,
one and two reference images, and the base model with CFG; and the CLI given only --seed against diffusers with
generator=torch.Generator("cpu").manual_seed(seed) (the pixels of the PNG).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import rel_err
from PIL import Image

from flux_core import models, pipeline
from flux_core.torch.runtime import pack

PROMPT = "a small red fox, snow"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from refs import klein as rk
    from refs import qwen3 as rq
    from refs import vae as rv

    root = tmp_path_factory.mktemp("klein_e2e")
    te = rq.tiny_hf_model(seed=0)
    tr = rk.build_reference(seed=1, in_channels=16, joint_attention_dim=3 * te.config.hidden_size)
    vae = rv.build_reference("flux2", seed=2)
    files = {
        "te": rq.save_tiny_qwen3(root, "single", te),
        "tr": rk.save_bfl(tr, root / "flux-2-klein-4b.safetensors"),
        "vae": rv.save_layouts(vae, "flux2", root / "vae")["ldm"],
        "tok": rq.write_tiny_tokenizer(root / "tokenizer"),
    }
    return dict(te=te, tr=tr, vae=vae, tok=rq.tiny_hf_tokenizer(), files=files)


def _reference_pipe(s, distilled: bool):
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096,
                                            time_shift_type="exponential")
    return Flux2KleinPipeline(scheduler=sched, vae=s["vae"], text_encoder=s["te"], tokenizer=s["tok"],
                              transformer=s["tr"], is_distilled=distilled)


def _ours(s, distilled: bool):
    f = s["files"]
    tr = models.load_transformer(f["tr"], backend="torch", device="cpu", dtype="float32", distilled=distilled)
    te = models.load_text_encoder(f["te"], str(f["tok"]), backend="torch", device="cpu", dtype="float32")
    vae = models.load_vae(f["vae"], backend="torch", device="cpu", dtype="float32")
    return tr, te, vae


def _run_reference(pipe, noise, **kw):
    final = {}

    def grab(_pipe, i, t, cb):
        final["latents"] = cb["latents"].clone()
        return cb

    pipe(prompt=PROMPT, latents=noise, output_type="latent", callback_on_step_end=grab, **kw)
    return final["latents"]


def _refs(*sizes):
    g = np.random.default_rng(5)
    return [Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


CASES = {
    "t2i": dict(distilled=True, refs=(), steps=3, w=96, h=64, guidance=None),
    "one_reference": dict(distilled=True, refs=((80, 96),), steps=2, w=64, h=64, guidance=None),
    "two_references": dict(distilled=True, refs=((64, 64), (112, 80)), steps=2, w=80, h=64, guidance=None),
    "base_cfg": dict(distilled=False, refs=(), steps=3, w=64, h=80, guidance=4.0),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_final_latents_match_diffusers(setup, case):
    c = CASES[case]
    tr, te, vae = _ours(setup, c["distilled"])
    noise = pipeline.make_noise(7, 1, 16, c["h"] // 16, c["w"] // 16)
    refs = _refs(*c["refs"])
    kw = dict(height=c["h"], width=c["w"], num_inference_steps=c["steps"])
    if c["guidance"] is not None:
        kw["guidance_scale"] = c["guidance"]
    if refs:
        kw["image"] = refs
    want = _run_reference(_reference_pipe(setup, c["distilled"]), noise.clone(), **kw)

    cond = pipeline.encode_prompt(te, [PROMPT], "klein")
    for img in refs:
        cond = cond.with_reference(pipeline.encode_reference(vae, img))
    uncond = pipeline.encode_prompt(te, [""], "klein") if not c["distilled"] else None
    res = pipeline.sample(tr, cond, uncond, width=c["w"], height=c["h"], steps=c["steps"], guidance=c["guidance"],
                          noise=noise)
    got = pack(res.latent)
    assert got.shape == want.shape
    err = rel_err(got, want)
    assert err <= 1e-4, f"{case}: final latents differ from Flux2KleinPipeline by {err:.2e}"


@pytest.mark.slow
def test_generate_uses_variant_defaults_and_reference_size(setup):
    """generate(): the distilled default is 4 steps; with no size given, the first reference sets it (diffusers)."""
    tr, te, vae = _ours(setup, True)
    gen = pipeline.generate(tr, te, vae, PROMPT, references=_refs((96, 80)), seed=3)
    assert gen.params["steps"] == 4 and (gen.params["width"], gen.params["height"]) == (96, 80)
    assert gen.images.shape == (1, 80, 96, 3) and 0.0 <= gen.images.min() and gen.images.max() <= 1.0


@pytest.mark.slow
def test_cli_seed_reproduces_diffusers_image(setup, tmp_path):
    """`generate` given only --seed draws the same CPU noise as diffusers with Generator('cpu').manual_seed(seed)."""
    from flux_core.__main__ import main

    f = setup["files"]
    out = tmp_path / "fox.png"
    latent_file = tmp_path / "fox.safetensors"
    rc = main(["generate", "--model", str(f["tr"]), "--text-encoder", str(f["te"]), "--vae", str(f["vae"]),
               "--tokenizer", str(f["tok"]), "--prompt", PROMPT, "--width", "64", "--height", "48",
               "--seed", "1234", "--backend", "torch", "--output", str(out), "--output-latent", str(latent_file)])
    assert rc == 0
    pipe = _reference_pipe(setup, True)
    want = pipe(prompt=PROMPT, height=48, width=64, num_inference_steps=4,
                generator=torch.Generator("cpu").manual_seed(1234), output_type="np").images[0]
    got = np.asarray(Image.open(out).convert("RGB"), dtype=np.float32) / 255.0
    assert got.shape == want.shape
    # PNG quantisation: diffusers' float image vs our 8-bit file, so at most half a level plus float noise.
    assert np.abs(got - want).max() <= 1.0 / 255.0
    info = Image.open(out).info
    assert '"seed": 1234' in info["fluxcore"] and "Seed: 1234" in info["parameters"]
    from safetensors.torch import load_file

    lat = load_file(str(latent_file))["latent"]
    assert lat.shape == (1, 16, 3, 4)  # native klein layout [B, 4*zc, H/16, W/16]
