"""End-to-end: flux_core's Z-Image pipeline (ComfyUI-layout files, our loaders and sampler) against diffusers'
ZImagePipeline / ZImageImg2ImgPipeline built from the same tiny random components, with the same noise.

Final latents ≤ 1e-4 relative for g = 0 (Turbo) and g > 0 (CFG, with a negative prompt), image-to-image, and the CLI
given only --seed against diffusers with generator=torch.Generator("cpu").manual_seed(seed).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import rel_err
from PIL import Image

from flux_core import models, pipeline

PROMPT = "a tiny robot reading a book under a lamp"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from refs import qwen3 as rq
    from refs import vae as rv
    from refs import zimage as rz

    root = tmp_path_factory.mktemp("zimage_e2e")
    te = rq.tiny_hf_model(seed=0)
    tr = rz.build_reference(seed=1)
    assert tr.config.cap_feat_dim == te.config.hidden_size
    vae = rv.build_reference("flux1", seed=2)
    files = {
        "te": rq.save_tiny_qwen3(root, "single", te),
        "tr": rz.save_layouts(tr, root / "tr")["prefixed"],
        "vae": rv.save_layouts(vae, "flux1", root / "vae")["ldm"],
        "tok": rq.write_tiny_tokenizer(root / "tokenizer"),
    }
    return dict(te=te, tr=tr, vae=vae, tok=rq.tiny_hf_tokenizer(), files=files)


def _scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)


def _pipe(s, cls_name="ZImagePipeline"):
    import diffusers

    cls = getattr(diffusers, cls_name)
    return cls(scheduler=_scheduler(), vae=s["vae"], text_encoder=s["te"].model, tokenizer=s["tok"],
               transformer=s["tr"])


def _ours(s, distilled=True):
    f = s["files"]
    tr = models.load_transformer(f["tr"], backend="torch", device="cpu", dtype="float32", distilled=distilled)
    te = models.load_text_encoder(f["te"], str(f["tok"]), backend="torch", device="cpu", dtype="float32")
    vae = models.load_vae(f["vae"], backend="torch", device="cpu", dtype="float32")
    return tr, te, vae


def _final(pipe, **kw):
    final = {}

    def grab(_pipe, i, t, cb):
        final["latents"] = cb["latents"].clone()
        return cb

    pipe(callback_on_step_end=grab, output_type="latent", **kw)
    return final["latents"]


@pytest.mark.slow
@pytest.mark.parametrize("guidance,negative,steps,w,h", [(0.0, None, 8, 64, 48), (2.5, "blurry, dark", 3, 48, 64)])
def test_final_latents_match_diffusers(setup, guidance, negative, steps, w, h):
    tr, te, vae = _ours(setup, distilled=guidance == 0.0)
    noise = pipeline.make_noise(11, 1, 16, h // 8, w // 8)
    want = _final(_pipe(setup), prompt=PROMPT, negative_prompt=negative, height=h, width=w,
                  num_inference_steps=steps, guidance_scale=guidance, latents=noise.clone())
    cond = pipeline.encode_prompt(te, [PROMPT], "zimage")
    uncond = pipeline.encode_prompt(te, [negative or ""], "zimage") if guidance > 0 else None
    res = pipeline.sample(tr, cond, uncond, width=w, height=h, steps=steps, guidance=guidance, noise=noise)
    err = rel_err(res.latent, want)
    assert err <= 1e-4, f"g={guidance}: final latents differ from ZImagePipeline by {err:.2e}"


@pytest.mark.slow
def test_img2img_matches_diffusers(setup, monkeypatch):
    """Our img2img encodes the init image with the posterior mean; diffusers samples the posterior, so the reference is
    run with its encode switched to the mean (`sample_mode="argmax"`); the noise then comes from the same generator."""
    import diffusers.pipelines.z_image.pipeline_z_image_img2img as zi2i

    real = zi2i.retrieve_latents
    monkeypatch.setattr(zi2i, "retrieve_latents", lambda out, generator=None, sample_mode="sample":
                        real(out, generator, sample_mode="argmax"))
    tr, te, vae = _ours(setup)
    img = Image.fromarray(np.random.default_rng(3).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    want = _final(_pipe(setup, "ZImageImg2ImgPipeline"), prompt=PROMPT, image=img, strength=0.6,
                  num_inference_steps=8, guidance_scale=0.0, generator=torch.Generator("cpu").manual_seed(21))
    gen = pipeline.generate(tr, te, vae, PROMPT, init_image=img, strength=0.6, seed=21)
    assert gen.params["strength"] == 0.6 and (gen.params["width"], gen.params["height"]) == (64, 48)
    err = rel_err(gen.latent, want)
    assert err <= 1e-4, f"img2img final latents differ from ZImageImg2ImgPipeline by {err:.2e}"


@pytest.mark.slow
def test_cli_seed_reproduces_diffusers_image(setup, tmp_path):
    from flux_core.__main__ import main

    f = setup["files"]
    out = tmp_path / "robot.png"
    rc = main(["generate", "--model", str(f["tr"]), "--text-encoder", str(f["te"]), "--vae", str(f["vae"]),
               "--tokenizer", str(f["tok"]), "--prompt", PROMPT, "--width", "48", "--height", "32", "--seed", "99",
               "--backend", "torch", "--output", str(out)])
    assert rc == 0
    want = _pipe(setup)(prompt=PROMPT, height=32, width=48, num_inference_steps=8, guidance_scale=0.0,
                        generator=torch.Generator("cpu").manual_seed(99), output_type="np").images[0]
    got = np.asarray(Image.open(out).convert("RGB"), dtype=np.float32) / 255.0
    assert got.shape == want.shape and np.abs(got - want).max() <= 1.0 / 255.0


def test_wrong_pairings_are_clear_errors(setup):
    from flux_core.errors import ConfigError

    tr, te, vae = _ours(setup)
    cond = pipeline.encode_prompt(te, [PROMPT], "klein")
    with pytest.raises(ConfigError, match="zimage"):
        pipeline.sample(tr, cond, width=32, height=32)
    with pytest.raises(ConfigError, match="reference"):
        pipeline.generate(tr, te, vae, PROMPT, references=[Image.new("RGB", (64, 64))])


def test_rope_tables_are_built_once_per_layout(setup, monkeypatch):
    """Building Z-Image's RoPE tables is host work (position ids and angles on the CPU) that left the GPU idle
    ~95 ms before the first step of a generation (H200, docs/PERF.md): a second generation of the same layout must
    reuse them, a new size must build new ones, and the images must not change."""
    tr, te, vae = _ours(setup)
    built = []
    real = tr.module.make_rope
    monkeypatch.setattr(tr.module, "make_rope", lambda *a, **k: built.append(a) or real(*a, **k))
    kw = dict(width=32, height=32, steps=2, seed=3)
    first = pipeline.generate(tr, te, vae, PROMPT, **kw).images[0]
    again = pipeline.generate(tr, te, vae, PROMPT, **kw).images[0]
    assert len(built) == 1 and np.array_equal(np.asarray(first), np.asarray(again))
    pipeline.generate(tr, te, vae, PROMPT, width=48, height=32, steps=2, seed=3)
    assert len(built) == 2
