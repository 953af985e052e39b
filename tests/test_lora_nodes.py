"""The FluxCore LoRA Loader node without ComfyUI: two chained nodes give the same image as the CLI with two --lora
flags (same seed), the LoRAs are in the PNG metadata, and the handle carries the LoRAs without mutating its input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from lora_fixtures import klein_fixtures, save
from PIL import Image
from test_nodes import load_all, run, sampler_args

from flux_core.errors import WeightError


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from flux_core import models
    from flux_core.demo import write_demo_checkpoints
    from flux_core.torch.lora import weight_shapes
    from nodes import host

    paths = write_demo_checkpoints(tmp_path_factory.mktemp("models"))
    root = paths["klein"].parents[1]
    (root / "loras").mkdir(exist_ok=True)
    base = models.load_transformer(paths["klein"], "torch", dtype="float32")
    fixtures = klein_fixtures(weight_shapes(base.module), base.module.state_dict())
    paths["lora_a"] = save(fixtures["kohya"], root / "loras")
    paths["lora_b"] = save(fixtures["lokr_factor"], root / "loras")
    zbase = models.load_transformer(paths["zimage"], "torch", dtype="float32")
    from lora_fixtures import zimage_fixtures

    paths["lora_z"] = save(zimage_fixtures(weight_shapes(zbase.module), zbase.module.state_dict())["musubi"],
                           root / "loras")
    host.set_model_roots([root])
    yield paths
    host.set_model_roots([])


@pytest.mark.slow
def test_two_chained_lora_nodes_equal_the_cli_with_two_flags(demo, tmp_path):
    from flux_core.__main__ import main

    te, m, v, _ = load_all(demo)
    (m1,), badge1 = run("FluxCoreLoraLoader", model=m, lora_name="kohya.safetensors", strength=0.7)
    (m2,), badge2 = run("FluxCoreLoraLoader", model=m1, lora_name="lokr_factor.safetensors", strength=-0.4)
    assert m.loras == () and len(m1.loras) == 1 and [s for _, s in m2.loras] == [0.7, -0.4]
    assert "2 LoRAs" in badge2["badge"] and any("applied" in d for d in badge2["details"])
    (pos, neg), _ = run("FluxCoreQwen3Encode", text_encoder=te, prompt="a red fox", mode="auto", model=m2)
    (latent,), _ = run("FluxCoreSampler", model=m2, positive=pos, negative=neg, **sampler_args())
    (images,), _ = run("FluxCoreVAEDecode", vae=v, samples=latent)
    # the plain model handle, sampled after, is the base again (the LoRAs come out of the shared module)
    (plain,), _ = run("FluxCoreSampler", model=m, positive=pos, negative=neg, **sampler_args())
    assert (plain["samples"] - latent["samples"]).abs().max() > 1e-3

    out = tmp_path / "cli.png"
    rc = main(["generate", "--model", str(demo["klein"]), "--text-encoder", str(demo["text_encoder"]),
               "--vae", str(demo["flux2_vae"]), "--tokenizer", str(demo["tokenizer"]), "--prompt", "a red fox",
               "--width", "64", "--height", "48", "--seed", "7", "--backend", "torch", "--dtype", "float32",
               "--lora", f"{demo['lora_a']}:0.7", "--lora", f"{demo['lora_b']}:-0.4", "--output", str(out)])
    assert rc == 0
    cli = np.asarray(Image.open(out).convert("RGB"), dtype=np.float32)
    ours = np.round(images[0].numpy() * 255.0)
    assert np.abs(cli - ours).max() <= 1.0
    info = Image.open(out).info
    meta = json.loads(info["fluxcore"])
    assert meta["loras"] == [{"file": "kohya.safetensors", "strength": 0.7},
                             {"file": "lokr_factor.safetensors", "strength": -0.4}]
    assert "Lora: kohya.safetensors:0.7" in info["parameters"]


def test_lora_for_another_model_fails_on_the_node(demo):
    _, m, _, _ = load_all(demo)
    with pytest.raises(WeightError, match="musubi.safetensors is a LoRA for Z-Image"):
        run("FluxCoreLoraLoader", model=m, lora_name="musubi.safetensors", strength=1.0)


@pytest.mark.slow
def test_zimage_lora_node_applies(demo):
    te, m, v, _ = load_all(demo, model="z_image_turbo_bf16.safetensors", vae="ae.safetensors")
    (mz,), badge = run("FluxCoreLoraLoader", model=m, lora_name="musubi.safetensors", strength=1.0)
    assert "1 LoRA" in badge["badge"]
    (pos, neg), _ = run("FluxCoreQwen3Encode", text_encoder=te, prompt="a lamp", mode="auto", model=mz)
    (a,), _ = run("FluxCoreSampler", model=mz, positive=pos, negative=neg, **sampler_args(width=32, height=32))
    (b,), _ = run("FluxCoreSampler", model=m, positive=pos, negative=neg, **sampler_args(width=32, height=32))
    assert torch.isfinite(a["samples"]).all() and (a["samples"] - b["samples"]).abs().max() > 1e-4
