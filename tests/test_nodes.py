"""The ComfyUI nodes without ComfyUI: definitions valid for ComfyUI's validator, and each node run in-process on the
tiny demo checkpoints, checked against the library it wraps (a node must add nothing but the wrapping)."""
from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from comfy_harness import check_node_class, node_info, widget_slots
from conftest import rel_err

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from flux_core.demo import write_demo_checkpoints
    from nodes import host

    paths = write_demo_checkpoints(tmp_path_factory.mktemp("models"))
    host.set_model_roots([paths["klein"].parents[1]])
    yield paths
    host.set_model_roots([])


def run(name, **kwargs):
    """Call a node the way ComfyUI does; returns (result tuple, badge payload)."""
    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS[name]
    out = getattr(cls(), cls.FUNCTION)(**kwargs)
    assert isinstance(out, dict) and set(out) == {"ui", "result"}, out
    (payload,) = out["ui"]["fluxcore"]
    assert payload["badge"] and isinstance(payload["details"], list)
    return out["result"], payload


def load_all(demo, model="flux-2-klein-4b.safetensors", vae="flux2-vae.safetensors", variant="auto"):
    loader = "FluxCoreKleinModelLoader" if "klein" in model else "FluxCoreZImageModelLoader"
    (te,), _ = run("FluxCoreTextEncoderLoader", text_encoder="qwen_3_4b.safetensors", backend="torch",
                   dtype="float32", quantization="none", tokenizer=str(demo["tokenizer"]))
    (m,), badge = run(loader, model_name=model, backend="torch", dtype="float32", quantization="none",
                      variant=variant)
    (v,), _ = run("FluxCoreVAELoader", vae_name=vae, backend="torch", dtype="float32")
    return te, m, v, badge


def lib_models(demo, model_key="klein", vae_key="flux2_vae"):
    from flux_core import models

    return (models.load_transformer(demo[model_key], "torch", dtype="float32"),
            models.load_text_encoder(demo["text_encoder"], str(demo["tokenizer"]), "torch", dtype="float32"),
            models.load_vae(demo[vae_key], "torch", dtype="float32"))


def sampler_args(**kw):
    args = dict(seed=7, steps=0, guidance=-1.0, width=64, height=48, batch_size=1)
    args.update(kw)
    return args


def uint8_image(h, w, seed=0):
    """A float IMAGE whose values are exact uint8 levels, so IMAGE -> PIL -> array is lossless."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (1, h, w, 3), generator=g).float() / 255.0


# ------------------------------------------------------------------------------------------------ definitions
def test_pack_imports_without_comfyui():
    """The entry point loads the way ComfyUI loads a custom-node folder, with no ComfyUI module importable."""
    assert "folder_paths" not in sys.modules and "comfy.model_management" not in sys.modules
    spec = importlib.util.spec_from_file_location("fluxcore_pack_under_test", ROOT / "__init__.py")
    pack = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = pack
    try:
        spec.loader.exec_module(pack)
    finally:
        del sys.modules[spec.name]
    assert len(pack.NODE_CLASS_MAPPINGS) == 10
    assert set(pack.NODE_CLASS_MAPPINGS) == set(pack.NODE_DISPLAY_NAME_MAPPINGS)
    web = ROOT / pack.WEB_DIRECTORY
    assert web.is_dir() and list(web.glob("*.js")), "WEB_DIRECTORY must hold the JS extension"
    from nodes import host

    assert not host.IN_COMFYUI


def _classes():
    import nodes

    return sorted(nodes.NODE_CLASS_MAPPINGS.items())


@pytest.mark.parametrize("name,cls", _classes(), ids=[n for n, _ in _classes()])
def test_definition_follows_comfyui_rules(name, cls, demo):
    import nodes

    assert check_node_class(name, cls, nodes.NODE_DISPLAY_NAME_MAPPINGS) == []


def test_checker_catches_bad_definitions():
    class Bad:
        CATEGORY = "Other"
        RETURN_TYPES = ("LATENT",)
        RETURN_NAMES = ("a", "b")
        FUNCTION = "go"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"steps": ("INT", {"default": 500, "min": 1, "max": 100}),
                                 "mode": (["a", "b"], {"default": "c", "tooltip": "x"}),
                                 "seed": ("FLOAT", {"default": 0.0, "control_after_generate": True, "tooltip": "x"})},
                    "optional": {"extra": ("STRING", {"tooltip": "x"})}}

        def go(self, steps, mode, seed, extra):
            return None

    problems = " | ".join(check_node_class("Bad", Bad, {}))
    for needle in ("FluxCore", "display name", "CATEGORY", "DESCRIPTION", "SEARCH_ALIASES", "RETURN_NAMES",
                   "steps: no tooltip", "default: 500 > max 100", "not among the options",
                   "control_after_generate is for INT", "extra: optional/hidden input needs a default"):
        assert needle in problems, (needle, problems)


def test_widget_order_and_seed_control():
    import nodes

    info = node_info("FluxCoreSampler", nodes.NODE_CLASS_MAPPINGS["FluxCoreSampler"])
    assert widget_slots(info) == [("seed", "value"), ("seed", "control"), ("steps", "value"),
                                  ("guidance", "value"), ("width", "value"), ("height", "value"),
                                  ("batch_size", "value"), ("denoise", "value"), ("sampler", "value")]


def test_loader_lists_standard_files(demo):
    import nodes

    combos = {name: nodes.NODE_CLASS_MAPPINGS[name].INPUT_TYPES()["required"][key][0] for name, key in
              (("FluxCoreKleinModelLoader", "model_name"), ("FluxCoreTextEncoderLoader", "text_encoder"),
               ("FluxCoreVAELoader", "vae_name"))}
    assert "flux-2-klein-4b.safetensors" in combos["FluxCoreKleinModelLoader"]
    assert "z_image_turbo_bf16.safetensors" in combos["FluxCoreKleinModelLoader"]
    assert combos["FluxCoreTextEncoderLoader"] == ["qwen_3_4b.safetensors"]
    assert combos["FluxCoreVAELoader"] == ["ae.safetensors", "flux2-vae.safetensors"]


def test_compile_inputs_reach_the_library(demo):
    """The loaders' compile toggles compile what `--compile` compiles (the Qwen3 layers, the VAE decoder); the badge
    details say so; compile off loads a separate, uncompiled model."""
    (te,), te_badge = run("FluxCoreTextEncoderLoader", text_encoder="qwen_3_4b.safetensors", backend="torch",
                          dtype="float32", quantization="none", tokenizer=str(demo["tokenizer"]), compile=True)
    (vae,), vae_badge = run("FluxCoreVAELoader", vae_name="flux2-vae.safetensors", backend="torch", dtype="float32",
                            compile=True)
    assert te.compile and vae.compile
    encoder, decoder = te.load().module.model, vae.load().module.decoder
    assert all(layer._compiled_call_impl is not None for layer in encoder.layers)
    assert decoder._compiled_call_impl is not None
    assert any("Qwen3 layers" in d for d in map(str, te_badge["details"]))
    assert any("VAE decoder" in d for d in map(str, vae_badge["details"]))
    (plain,), _ = run("FluxCoreVAELoader", vae_name="flux2-vae.safetensors", backend="torch", dtype="float32")
    assert plain.load().module.decoder._compiled_call_impl is None


# ----------------------------------------------------------------------------------------------------- running
@pytest.mark.slow
def test_klein_text_to_image_matches_library(demo):
    from flux_core import pipeline

    te, m, v, badge = load_all(demo)
    assert "torch:cpu" in badge["badge"] and "float32" in badge["badge"] and "4 steps" in badge["badge"]
    assert any("metadata" in d for d in badge["details"]), badge  # why distilled: the file says so
    (pos, neg), _ = run("FluxCoreQwen3Encode", text_encoder=te, prompt="a red fox", mode="auto", model=m)
    assert pos.mode == "klein" and pos.batch == 1 and neg.prompts == [""]
    (latent,), sb = run("FluxCoreSampler", model=m, positive=pos, negative=neg, **sampler_args(batch_size=2))
    assert "4 steps" in sb["badge"] and "no cfg" in sb["badge"]
    assert set(latent) == {"samples"} and latent["samples"].shape[:2] == (2, 16)
    (images,), _ = run("FluxCoreVAEDecode", vae=v, samples=latent)
    assert images.shape == (2, 48, 64, 3) and images.dtype == torch.float32

    tr, tel, vl = lib_models(demo)
    ref = pipeline.generate(tr, tel, vl, "a red fox", width=64, height=48, seed=7, batch_size=2)
    assert rel_err(latent["samples"], ref.latent) < 1e-6
    assert rel_err(images, ref.images) < 1e-6


@pytest.mark.slow
def test_klein_edit_and_multi_reference_match_library(demo):
    from flux_core import pipeline

    te, m, v, _ = load_all(demo)
    img1, img2 = uint8_image(100, 90, 1), uint8_image(64, 128, 2)
    (pos, _), _ = run("FluxCoreQwen3Encode", text_encoder=te, prompt="make it blue", mode="klein", model=m)
    (c1,), rb = run("FluxCoreReferenceImageEncode", conditioning=pos, vae=v, image=img1, keep_size=False)
    (c2,), _ = run("FluxCoreReferenceImageEncode", conditioning=c1, vae=v, image=img2, keep_size=False)
    assert len(pos.refs) == 0 and len(c1.refs) == 1 and len(c2.refs) == 2  # chaining never mutates its input
    assert "80x96" in rb["badge"]
    # width/height 0: the output follows the first reference, as diffusers does
    (latent,), sb = run("FluxCoreSampler", model=m, positive=c2, **sampler_args(width=0, height=0))
    assert "80x96" in sb["badge"]

    tr, tel, vl = lib_models(demo)
    pil = [pipeline.to_pil(img1), pipeline.to_pil(img2)]
    ref = pipeline.generate(tr, tel, vl, "make it blue", seed=7, references=pil)
    assert ref.params["width"] == 80 and ref.params["height"] == 96
    assert rel_err(latent["samples"], ref.latent) < 1e-6


@pytest.mark.slow
def test_klein_base_cfg_uses_negative(demo):
    from flux_core import pipeline

    te, m, v, badge = load_all(demo, "flux-2-klein-base-4b.safetensors", variant="base")
    assert "klein" in badge["badge"] and "base" in badge["badge"] and "50 steps · cfg 4" in badge["badge"]
    (pos, neg), _ = run("FluxCoreQwen3Encode", text_encoder=te, prompt="a lighthouse", mode="auto", model=m,
                        negative_prompt="blurry")
    with pytest.raises(Exception, match="negative"):
        run("FluxCoreSampler", model=m, positive=pos, **sampler_args(steps=3))
    (latent,), sb = run("FluxCoreSampler", model=m, positive=pos, negative=neg, **sampler_args(steps=3))
    assert "3 steps" in sb["badge"] and "cfg 4" in sb["badge"]
    tr, tel, vl = lib_models(demo, "klein_base")
    ref = pipeline.generate(tr, tel, vl, "a lighthouse", negative_prompt="blurry", width=64, height=48, steps=3,
                            seed=7)
    assert rel_err(latent["samples"], ref.latent) < 1e-6


@pytest.mark.slow
def test_zimage_latent_is_comfyui_native_and_img2img_works(demo):
    """Z-Image LATENTs carry the raw FLUX.1 VAE mean (ComfyUI applies (x-0.1159)*0.3611 inside the model)."""
    from flux_core import pipeline

    te, m, v, badge = load_all(demo, "z_image_turbo_bf16.safetensors", "ae.safetensors")
    assert "zimage-turbo" in badge["badge"] and "8 steps" in badge["badge"]
    img = uint8_image(48, 70, 3)
    (lat,), _ = run("FluxCoreVAEEncode", vae=v, pixels=img)
    assert lat["downscale_ratio_spacial"] == 8 and lat["samples"].shape == (1, 16, 6, 8)  # 70 -> 64 wide
    vm = v.load().module
    raw = vm._mean(img[:, :, 3:67].permute(0, 3, 1, 2))
    assert rel_err(lat["samples"], raw) < 1e-5

    (pos, _), _ = run("FluxCoreQwen3Encode", text_encoder=te, prompt="a cozy room", mode="auto", model=m)
    (t2i,), _ = run("FluxCoreSampler", model=m, positive=pos, **sampler_args(steps=3, width=64, height=48))
    (full,), _ = run("FluxCoreSampler", model=m, positive=pos, latent=lat, denoise=1.0, **sampler_args(steps=3))
    assert rel_err(full["samples"], t2i["samples"]) < 1e-6  # denoise 1 ignores the image entirely
    (half,), hb = run("FluxCoreSampler", model=m, positive=pos, latent=lat, denoise=0.5, **sampler_args(steps=4))
    assert "denoise 0.5" in hb["badge"]
    tr, tel, vl = lib_models(demo, "zimage", "flux1_vae")
    cond = pipeline.encode_prompt(tel, ["a cozy room"], "zimage")
    init = pipeline.encode_image(vl, img[:, :, 3:67].permute(0, 3, 1, 2).numpy())
    ref = pipeline.sample(tr, cond, width=64, height=48, steps=4, seed=7, init_latent=init, strength=0.5)
    assert rel_err(half["samples"], ref.latent / 0.3611 + 0.1159) < 1e-5
    (images,), _ = run("FluxCoreVAEDecode", vae=v, samples=half)
    assert rel_err(images, pipeline.decode(vl, ref.latent)) < 1e-5


def test_klein_vae_encode_is_normalised_latent(demo):
    _, _, v, _ = load_all(demo)
    img = uint8_image(64, 48, 4)
    (lat,), _ = run("FluxCoreVAEEncode", vae=v, pixels=img)
    assert set(lat) == {"samples"}
    assert rel_err(lat["samples"], v.load().module.encode(img.permute(0, 3, 1, 2))) < 1e-6


# ------------------------------------------------------------------------------------------------------ errors
def test_clear_errors(demo):
    from flux_core.errors import ConfigError

    te, m, v, _ = load_all(demo)
    with pytest.raises(ConfigError, match="no model is linked"):
        run("FluxCoreQwen3Encode", text_encoder=te, prompt="x", mode="auto")
    with pytest.raises(ConfigError, match="does not match the linked model"):
        run("FluxCoreQwen3Encode", text_encoder=te, prompt="x", mode="zimage", model=m)
    with pytest.raises(ConfigError, match="Z-Image Model Loader"):
        run("FluxCoreKleinModelLoader", model_name="z_image_turbo_bf16.safetensors", backend="torch",
            dtype="float32", quantization="none", variant="auto")
    with pytest.raises(ConfigError, match="not in the diffusion_models folder"):
        run("FluxCoreKleinModelLoader", model_name="missing.safetensors", backend="torch", dtype="float32",
            quantization="none", variant="auto")
    (zv,), _ = run("FluxCoreVAELoader", vae_name="ae.safetensors", backend="torch", dtype="float32")
    (pos, _), _ = run("FluxCoreQwen3Encode", text_encoder=te, prompt="x", mode="klein")
    with pytest.raises(ConfigError, match="FLUX.2 VAE"):
        run("FluxCoreReferenceImageEncode", conditioning=pos, vae=zv, image=uint8_image(64, 64), keep_size=False)
    # a real klein LATENT (128 channels) into the FLUX.1 VAE; the tiny klein's 16 channels would pass unnoticed
    with pytest.raises(ConfigError, match="FLUX.2 klein latent"):
        run("FluxCoreVAEDecode", vae=zv, samples={"samples": torch.zeros(1, 128, 4, 4)})
    with pytest.raises(ConfigError, match="channels"):
        run("FluxCoreSampler", model=m, positive=pos, latent={"samples": torch.zeros(1, 128, 3, 4)},
            **sampler_args(steps=1))


# ------------------------------------------------------------------------------- ComfyUI integration (faked)
class _FakeBar:
    updates: list = []

    def __init__(self, total, node_id=None):
        self.node_id = node_id

    def update_absolute(self, value, total=None, preview=None):
        self.updates.append((self.node_id, value, total, preview))


def test_progress_previews_and_interrupt(demo, monkeypatch):
    from flux_core import models
    from nodes import host

    te, m, v, _ = load_all(demo, "z_image_turbo_bf16.safetensors", "ae.safetensors")
    (pos, _), _ = run("FluxCoreQwen3Encode", text_encoder=te, prompt="x", mode="zimage")
    monkeypatch.setattr(host, "comfy_utils", types.SimpleNamespace(ProgressBar=_FakeBar))
    monkeypatch.setattr(host, "previews_enabled", lambda: True)
    _FakeBar.updates = []
    run("FluxCoreSampler", model=m, positive=pos, unique_id="12", **sampler_args(steps=3))
    assert [(u[0], u[1], u[2]) for u in _FakeBar.updates] == [("12", 1, 3), ("12", 2, 3), ("12", 3, 3)]
    fmt, img, size = _FakeBar.updates[-1][3]
    assert fmt == "JPEG" and img.size[0] > 0 and size == 512

    class Stop(BaseException):  # ComfyUI's InterruptProcessingException is a BaseException too
        pass

    calls = []

    def interrupt():
        calls.append(1)
        if len(calls) == 2:
            raise Stop()
        return False

    monkeypatch.setattr(host, "check_interrupt", interrupt)
    with pytest.raises(Stop):
        run("FluxCoreSampler", model=m, positive=pos, **sampler_args(steps=4))
    assert len(calls) == 2  # polled before every step, stopped before the second
    monkeypatch.setattr(host, "check_interrupt", lambda: False)
    models.release()  # as ComfyUI's /free does: the handles reload on the next run
    assert models.cached_models() == []
    (lat,), _ = run("FluxCoreSampler", model=m, positive=pos, **sampler_args(steps=1))
    assert torch.isfinite(lat["samples"]).all()


def test_memory_hooks_release_our_cache(demo, monkeypatch):
    from flux_core import models
    from nodes import host

    calls = []
    free = {"cuda": 0}
    fake = types.SimpleNamespace(
        unload_all_models=lambda: calls.append("unload_all"),
        free_memory=lambda need, device, keep_loaded=[], **kw: calls.append(("free", need, device.type)),
        get_free_memory=lambda device: free["cuda"])
    monkeypatch.setattr(host, "model_management", fake)
    assert host.install_memory_hooks() is True
    assert host.install_memory_hooks() is False  # idempotent
    load_all(demo)
    assert len(models.cached_models()) >= 3
    # ComfyUI short of memory on a CUDA device: only models on that device are released (ours are on the CPU)
    fake.free_memory(1e9, types.SimpleNamespace(type="cuda"))
    assert calls[-1] == ("free", 1e9, "cuda") and len(models.cached_models()) >= 3
    cpu_model = models.cached_models()[0]
    monkeypatch.setattr(cpu_model, "device", "cuda")
    fake.free_memory(1e9, types.SimpleNamespace(type="cuda"))
    assert cpu_model not in models.cached_models()
    fake.unload_all_models()  # /free with unload_models, or ComfyUI's OOM handler
    assert calls[-1] == "unload_all" and models.cached_models() == []


def test_latent_helpers_roundtrip():
    from flux_core.families import VAE_KINDS
    from nodes.common import from_comfy_latent, to_comfy_latent

    x = torch.randn(2, 16, 4, 5)
    for kind in VAE_KINDS.values():
        d = to_comfy_latent(x, kind)
        assert rel_err(from_comfy_latent(d, kind), x) < 1e-6
    d = to_comfy_latent(np.ones((1, 16, 2, 2), np.float32), VAE_KINDS["flux1"])
    assert float(d["samples"][0, 0, 0, 0]) == pytest.approx(1 / 0.3611 + 0.1159)


@pytest.mark.slow
def test_mlx_backend_through_the_nodes_matches_torch(demo):
    """backend=mlx end to end through the model, VAE, reference and sampler nodes (MLX's CPU build on Linux)."""
    from flux_core import backend

    if not backend.mlx_available():
        pytest.skip("mlx is not installed")
    te, m, v, _ = load_all(demo)
    (mm,), badge = run("FluxCoreKleinModelLoader", model_name="flux-2-klein-4b.safetensors", backend="mlx",
                       dtype="float32", quantization="none", variant="auto")
    (mv,), _ = run("FluxCoreVAELoader", vae_name="flux2-vae.safetensors", backend="mlx", dtype="float32")
    assert badge["badge"].startswith("mlx:")
    (pos, _), _ = run("FluxCoreQwen3Encode", text_encoder=te, prompt="a red fox", mode="auto", model=mm)
    img = uint8_image(64, 80, 5)
    (c_t,), _ = run("FluxCoreReferenceImageEncode", conditioning=pos, vae=v, image=img, keep_size=False)
    (c_m,), _ = run("FluxCoreReferenceImageEncode", conditioning=pos, vae=mv, image=img, keep_size=False)
    (lt,), _ = run("FluxCoreSampler", model=m, positive=c_t, **sampler_args(steps=2))
    (lm,), _ = run("FluxCoreSampler", model=mm, positive=c_m, **sampler_args(steps=2))
    assert isinstance(lm["samples"], torch.Tensor) and lm["samples"].device.type == "cpu"
    assert rel_err(lm["samples"], lt["samples"]) < 1e-4  # float32 on two backends: summation order only
    (it,), _ = run("FluxCoreVAEDecode", vae=v, samples=lt)
    (im,), _ = run("FluxCoreVAEDecode", vae=mv, samples=lt)
    assert im.shape == it.shape and rel_err(im, it) < 1e-4


def test_sampler_widget_res_multistep_matches_library(demo):
    """The `sampler` widget reaches pipeline.sample; it is the last widget, so workflows saved before it existed
    (one value fewer) keep their positional values and get euler."""
    import nodes
    from flux_core import pipeline

    info = node_info("FluxCoreSampler", nodes.NODE_CLASS_MAPPINGS["FluxCoreSampler"])
    assert widget_slots(info)[-1] == ("sampler", "value")
    te, m, v, _ = load_all(demo, "z_image_turbo_bf16.safetensors", "ae.safetensors")
    (pos, _), _ = run("FluxCoreQwen3Encode", text_encoder=te, prompt="a cozy room", mode="auto", model=m)
    (lat,), sb = run("FluxCoreSampler", model=m, positive=pos, sampler="res_multistep", **sampler_args(steps=4))
    assert "4 steps res_multistep" in sb["badge"]
    (eul,), eb = run("FluxCoreSampler", model=m, positive=pos, **sampler_args(steps=4))
    assert "res_multistep" not in eb["badge"]
    tr, tel, _ = lib_models(demo, "zimage", "flux1_vae")
    cond = pipeline.encode_prompt(tel, ["a cozy room"], "zimage")
    ref = pipeline.sample(tr, cond, width=64, height=48, steps=4, seed=7, sampler="res_multistep")
    assert rel_err(lat["samples"], ref.latent / 0.3611 + 0.1159) < 1e-5
    assert rel_err(lat["samples"], eul["samples"]) > 1e-4  # a different sampler gives a different latent
