"""Our LoRA merge against diffusers' own: `lora_state_dict` + `load_lora_into_transformer` + `fuse_lora` (PEFT) on the
same tiny reference transformer, its fused weights converted to our layout by our key map, for every fixture format
diffusers reads. Then a whole klein and Z-Image generation with a LoRA against the diffusers pipeline with the same
LoRA, same seed (≤ 1/255 on the PNG).

Where diffusers leaves a weight alone or gets it wrong, the test says so instead of skipping it:
  klein `diffusers`: diffusers loads no LoRA on x_embedder / context_embedder / proj_out (img_in, txt_in,
      final_layer.linear stay unpatched there);
  klein `fal`: diffusers maps the BFL final adaLN (`final_layer.adaLN_modulation.1`) onto `norm_out.linear` without
      swapping the two row halves (docs/LORA.md), so that weight must differ, and only there;
  zimage `diffusers`: diffusers' Z-Image converter renames the embedder / final-layer LoRA keys to names its model
      does not have (x_embedder, final_layer.*), which stay unpatched there.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from lora_fixtures import save
from test_lora import _build

from flux_core.torch import lora as TL

DIFFUSERS_GAPS: dict = {}
DIFFUSERS_WRONG = {("klein", "fal"): {"final_layer.adaLN_modulation.1.weight"}}


@pytest.fixture(scope="module")
def setups(tmp_path_factory):
    return {f: _build(f, tmp_path_factory.mktemp(f"lora_d_{f}")) for f in ("klein", "zimage")}


def _diffusers_fused(family: str, path: str, strength: float) -> dict:
    if family == "klein":
        from diffusers.loaders.lora_pipeline import Flux2LoraLoaderMixin as Mixin
        from refs import klein as ref

        from flux_core.weights.klein import to_native
    else:
        from diffusers.loaders.lora_pipeline import ZImageLoraLoaderMixin as Mixin
        from refs import zimage as ref

        from flux_core.weights.zimage import to_native
    model = ref.build_reference(seed=1)
    sd, metadata = Mixin.lora_state_dict(path, return_lora_metadata=True)
    Mixin.load_lora_into_transformer(sd, transformer=model, metadata=metadata)
    model.fuse_lora(lora_scale=strength)
    model.unload_lora()
    return to_native(dict(model.state_dict()))


CASES = [("klein", f) for f in ("ai_toolkit", "kohya", "diffusers", "diffusers_rslora", "fal")] + \
        [("zimage", f) for f in ("ai_toolkit", "musubi", "musubi_diffusers", "diffusers", "diffusers_rslora",
                                 "diffsynth")]


@pytest.mark.slow
@pytest.mark.parametrize("family,fmt", CASES)
def test_merge_equals_diffusers_fuse_lora(setups, family, fmt):
    s = setups[family]
    assert s["fixtures"][fmt].diffusers_reads
    theirs = _diffusers_fused(family, s["files"][fmt], 0.6)
    TL.apply_loras(s["model"].module, [(s["files"][fmt], 0.6)])
    ours = {k: v.detach().double() for k, v in s["model"].module.state_dict().items()}
    TL.apply_loras(s["model"].module, [])
    touched = {e.key for e in s["fixtures"][fmt].expect}
    gaps = DIFFUSERS_GAPS.get((family, fmt), set())
    wrong = DIFFUSERS_WRONG.get((family, fmt), set())
    for key in touched:
        t = theirs[key].double()
        err = float((ours[key] - t).abs().max() / t.abs().max())
        if key in gaps:
            assert torch.equal(theirs[key], s["base"][key]), f"{key}: diffusers now patches it; drop the gap"
        elif key in wrong:
            assert err > 1e-3, f"{key}: diffusers now agrees; drop it from DIFFUSERS_WRONG"
        else:
            assert err <= 1e-6, f"{family}/{fmt} {key}: ours vs diffusers fuse_lora {err:.2e}"


# ------------------------------------------------------------------------------------------------ whole images

@pytest.mark.slow
def test_klein_generation_with_lora_equals_diffusers(tmp_path):
    """A kohya LoRA at 0.8: our final latents (injected noise) == Flux2KleinPipeline with load_lora_weights +
    fuse_lora(0.8) (≤ 1e-4 relative, as the plain pipeline test), the LoRA moves them by far more than that, and the
    seed-only generation gives the same image as diffusers' to 1/255 (the PNG's quantization)."""
    from conftest import rel_err
    from lora_fixtures import klein_fixtures
    from refs import klein as rk
    from refs import qwen3 as rq
    from refs import vae as rv
    from test_pipeline_klein import PROMPT, _reference_pipe, _run_reference

    from flux_core import models, pipeline
    from flux_core.torch.runtime import pack

    te = rq.tiny_hf_model(seed=0)
    tr = rk.build_reference(seed=1, in_channels=16, joint_attention_dim=3 * te.config.hidden_size)
    vae = rv.build_reference("flux2", seed=2)
    f_tr = rk.save_bfl(tr, tmp_path / "klein.safetensors")
    f_te = rq.save_tiny_qwen3(tmp_path, "single", te)
    f_vae = rv.save_layouts(vae, "flux2", tmp_path / "vae")["ldm"]
    f_tok = rq.write_tiny_tokenizer(tmp_path / "tokenizer")
    ours = models.load_transformer(f_tr, backend="torch", device="cpu", dtype="float32")
    te_m = models.load_text_encoder(f_te, str(f_tok), backend="torch", device="cpu", dtype="float32")
    vae_m = models.load_vae(f_vae, backend="torch", device="cpu", dtype="float32")
    lora = save(klein_fixtures(TL.weight_shapes(ours.module), ours.module.state_dict())["kohya"], tmp_path)

    pipe = _reference_pipe(dict(vae=vae, te=te, tok=rq.tiny_hf_tokenizer(), tr=tr), True)
    noise = pipeline.make_noise(7, 1, 16, 4, 4)
    plain = _run_reference(pipe, noise.clone(), height=64, width=64, num_inference_steps=3)
    pipe.load_lora_weights(lora)
    pipe.fuse_lora(lora_scale=0.8)
    want = _run_reference(pipe, noise.clone(), height=64, width=64, num_inference_steps=3)
    want_img = pipe(prompt=PROMPT, height=48, width=64, num_inference_steps=4,
                    generator=torch.Generator("cpu").manual_seed(1234), output_type="np").images[0]

    with_lora = models.with_loras(ours, [(lora, 0.8)])   # a handle on the same module; sampling activates it
    cond = pipeline.encode_prompt(te_m, [PROMPT], "klein")
    res = pipeline.sample(with_lora, cond, None, width=64, height=64, steps=3, guidance=None, noise=noise)
    gen = pipeline.generate(with_lora, te_m, vae_m, PROMPT, width=64, height=48, seed=1234, release_text_encoder=False)
    models.with_loras(ours)
    got = pack(res.latent)
    assert rel_err(got, want) <= 1e-4
    assert rel_err(plain, want) > 1e-2, "the LoRA must change the result for this comparison to mean anything"
    img = np.round(np.asarray(gen.images[0], dtype=np.float64) * 255) / 255   # what the PNG holds
    assert img.shape == want_img.shape and np.abs(img - want_img).max() <= 1.0 / 255.0


@pytest.mark.slow
def test_zimage_generation_with_lora_equals_diffusers(tmp_path):
    """A raw musubi Z-Image LoRA (the file ComfyUI loads only half of) at 0.7: final latents == ZImagePipeline with
    load_lora_weights + fuse_lora(0.7) ≤ 1e-4 relative; the LoRA moves them by far more."""
    from conftest import rel_err
    from lora_fixtures import zimage_fixtures
    from refs import qwen3 as rq
    from refs import vae as rv
    from refs import zimage as rz
    from test_pipeline_zimage import PROMPT, _final, _pipe

    from flux_core import models, pipeline

    te = rq.tiny_hf_model(seed=0)
    tr = rz.build_reference(seed=1)
    vae = rv.build_reference("flux1", seed=2)
    s = dict(te=te, tr=tr, vae=vae, tok=rq.tiny_hf_tokenizer())
    f_tr = rz.save_layouts(tr, tmp_path / "tr")["prefixed"]
    f_te = rq.save_tiny_qwen3(tmp_path, "single", te)
    f_tok = rq.write_tiny_tokenizer(tmp_path / "tokenizer")
    ours = models.load_transformer(f_tr, backend="torch", device="cpu", dtype="float32")
    te_m = models.load_text_encoder(f_te, str(f_tok), backend="torch", device="cpu", dtype="float32")
    lora = save(zimage_fixtures(TL.weight_shapes(ours.module), ours.module.state_dict())["musubi"], tmp_path)

    noise = pipeline.make_noise(11, 1, 16, 6, 8)
    kw = dict(prompt=PROMPT, height=48, width=64, num_inference_steps=4, guidance_scale=0.0)
    pipe = _pipe(s)
    plain = _final(pipe, latents=noise.clone(), **kw)
    pipe.load_lora_weights(lora)
    pipe.fuse_lora(lora_scale=0.7)
    want = _final(pipe, latents=noise.clone(), **kw)

    cond = pipeline.encode_prompt(te_m, [PROMPT], "zimage")
    res = pipeline.sample(models.with_loras(ours, [(lora, 0.7)]), cond, None, width=64, height=48, steps=4,
                          guidance=0.0, noise=noise)
    models.with_loras(ours)
    assert rel_err(res.latent, want) <= 1e-4
    assert rel_err(plain, want) > 1e-2
