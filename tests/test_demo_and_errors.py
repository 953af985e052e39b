"""The demo (README's main job), the CLI's error handling, callbacks/interrupts and the loader's detection, on the
tiny checkpoints written under the standard Comfy-Org file names."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from flux_core import models, pipeline
from flux_core.demo import write_demo_checkpoints
from flux_core.errors import ConfigError, Interrupted, WeightError


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_checkpoints(tmp_path_factory.mktemp("demo"))


def _load(demo, key="klein", vae="flux2_vae"):
    tr = models.load_transformer(demo[key], backend="torch", device="cpu")
    te = models.load_text_encoder(demo["text_encoder"], str(demo["tokenizer"]), backend="torch", device="cpu")
    return tr, te, models.load_vae(demo[vae], backend="torch", device="cpu")


@pytest.mark.slow
def test_demo_command_writes_both_images(demo, tmp_path, capsys):
    from flux_core.__main__ import main

    root = demo["tokenizer"].parent
    stamps = {k: p.stat().st_mtime_ns for k, p in demo.items() if p.is_file()}
    assert main(["demo", "--dir", str(root), "--output-dir", str(tmp_path)]) == 0
    for name, model in (("klein", "klein"), ("zimage", "zimage-turbo")):
        img = Image.open(tmp_path / f"demo_{name}.png")
        assert img.size == (256, 256)
        meta = json.loads(img.info["fluxcore"])
        assert meta["seed"] == 42 and meta["model"] == model  # a real name, not a made-up size such as "klein-d64"
        assert np.asarray(img).std() > 1.0  # not a blank image
    out = capsys.readouterr().out
    assert f"using the tiny random-weight checkpoints in {root}" in out and "noise" in out and "random" in out
    assert {k: p.stat().st_mtime_ns for k, p in demo.items() if p.is_file()} == stamps  # not rewritten


def test_demo_checkpoints_are_written_once_per_recipe(tmp_path):
    first = write_demo_checkpoints(tmp_path)
    mtime = first["klein"].stat().st_mtime_ns
    assert write_demo_checkpoints(tmp_path)["klein"].stat().st_mtime_ns == mtime
    write_demo_checkpoints(tmp_path, seed=1)  # another recipe: rewritten
    assert first["klein"].stat().st_mtime_ns != mtime


def test_detection_from_files(demo):
    tr, te, vae = _load(demo)
    assert tr.variant.family.name == "klein" and tr.variant.distilled and tr.variant.steps == 4
    base = models.load_transformer(demo["klein_base"], backend="torch", device="cpu")
    assert not base.variant.distilled and base.variant.steps == 50 and base.variant.guidance == 4.0
    assert any("metadata" in n for n in base.notes)
    z = models.load_transformer(demo["zimage"], backend="torch", device="cpu")
    assert z.variant.name == "zimage-turbo" and z.variant.steps == 8 and z.variant.guidance == 0.0
    assert vae.module.kind == "flux2" and models.load_vae(demo["flux1_vae"], backend="torch").module.kind == "flux1"
    assert models.load_transformer(demo["klein"], backend="torch", device="cpu") is tr  # cached


@pytest.mark.parametrize("prefix", ["transformer.", "model.diffusion_model.", "diffusion_model.", "model."])
def test_prefixed_klein_files_load_through_models(demo, tmp_path, prefix):
    """Every prefix the klein key map strips is also accepted by family detection (`transformer.` once was not)."""
    from flux_core.weights.io import load_checkpoint, save_safetensors

    sd = load_checkpoint(demo["klein"]).sd
    path = tmp_path / "prefixed.safetensors"
    save_safetensors({prefix + k: v for k, v in sd.items()}, path, {"fluxcore.distilled": "true"})
    tr = models.load_transformer(path, backend="torch", device="cpu")
    ref = models.load_transformer(demo["klein"], backend="torch", device="cpu")
    assert tr.family.name == "klein" and tr.variant.name == ref.variant.name
    assert all(torch.equal(v, ref.module.state_dict()[k]) for k, v in tr.module.state_dict().items())


def test_wrong_file_in_the_wrong_slot_names_the_fix(demo):
    with pytest.raises(WeightError, match="text encoder"):
        models.load_transformer(demo["text_encoder"], backend="torch")
    with pytest.raises(WeightError, match="VAE"):
        models.load_transformer(demo["flux2_vae"], backend="torch")
    tr, te, vae1 = _load(demo, "zimage", "flux2_vae")
    with pytest.raises(ConfigError, match="ae.safetensors"):
        pipeline.generate(tr, te, vae1, "x", width=64, height=64)


def test_callback_interrupt_and_recovery(demo):
    tr, te, vae = _load(demo)
    cond = pipeline.encode_prompt(te, ["a cat"], "klein")
    seen = []
    res = pipeline.sample(tr, cond, width=64, height=48, seed=1, callback=lambda i, n, x: seen.append((i, n)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)] and tuple(res.latent.shape) == (1, 16, 3, 4)
    calls = []
    with pytest.raises(Interrupted):
        pipeline.sample(tr, cond, width=64, height=48, seed=1, interrupt=lambda: calls.append(1) or len(calls) > 2)
    again = pipeline.sample(tr, cond, width=64, height=48, seed=1)  # the model is still usable, and deterministic
    assert np.array_equal(again.latent.numpy(), res.latent.numpy())


def test_bad_inputs_are_clear_errors(demo):
    tr, te, vae = _load(demo)
    cond = pipeline.encode_prompt(te, ["a cat"], "klein")
    with pytest.raises(ConfigError, match="at least"):
        pipeline.sample(tr, cond, width=8, height=64)
    with pytest.raises(ConfigError, match="seed"):
        pipeline.sample(tr, cond, width=64, height=64, seed=-1)
    with pytest.raises(ConfigError, match="negative"):
        base = models.load_transformer(demo["klein_base"], backend="torch", device="cpu")
        pipeline.sample(base, cond, None, width=64, height=64)
    with pytest.raises(ConfigError, match="aspect ratio"):
        pipeline.prepare_reference(Image.new("RGB", (1024, 64)), 16)
    # sizes that are not multiples of 16 are floored, as diffusers does
    res = pipeline.sample(tr, cond, width=70, height=50, seed=0)
    assert tuple(res.latent.shape[-2:]) == (3, 4)


def test_cli_reports_errors_without_a_traceback(demo, tmp_path, capsys):
    from flux_core.__main__ import main

    rc = main(["generate", "--model", str(tmp_path / "missing.safetensors"), "--text-encoder", str(demo["text_encoder"]),
               "--vae", str(demo["flux2_vae"]), "--prompt", "x"])
    assert rc == 2 and "not found" in capsys.readouterr().err


def test_reference_preparation_matches_diffusers_rules():
    big = Image.fromarray(np.random.default_rng(0).integers(0, 256, (1100, 1500, 3), dtype=np.uint8))
    arr = pipeline.prepare_reference(big, 16)
    h, w = arr.shape[-2:]
    assert h % 16 == 0 and w % 16 == 0 and h * w <= 1024 * 1024 and w > h
    kept = pipeline.prepare_reference(big, 16, keep_size=True)
    assert kept.shape[-2:] == (1088, 1488)  # centre crop to a multiple of 16, no area cap


@pytest.mark.slow
def test_text_encoder_release_frees_it_and_a_new_load_works(demo):
    tr, te, vae = _load(demo)
    gen = pipeline.generate(tr, te, vae, "a cat", width=64, height=64, seed=2, release_text_encoder=True)
    assert te.module.model is None and te not in models.cached_models()
    te2 = models.load_text_encoder(demo["text_encoder"], str(demo["tokenizer"]), backend="torch", device="cpu")
    assert te2 is not te and te2.module.model is not None
    again = pipeline.generate(tr, te2, vae, "a cat", width=64, height=64, seed=2, release_text_encoder=False)
    assert np.array_equal(gen.images, again.images) and te2 in models.cached_models()
