"""ComfyUI's OWN model classes for the klein-4B and Z-Image-Turbo DiT step, beside ours, with the same weights.

ComfyUI is imported only inside the functions (never at module import): `add_comfy_to_path` first.

    python bench/comfy_native.py --prepare /work/comfy/ComfyUI .dev/comfyui [--site DIR]   copy what the import needs
    python bench/comfy_native.py --check .dev/comfyui        tiny float32 CPU parity, one JSON line (the test runs it)
    bench_summary.py part:  part_comfy_native(A, DEV, DT, timeit, check, put, variant, klein_cfg, zimage_cfg)

Preparing the carried copy (a device call carries the repo tree plus at most 8 named git-ignored paths, 64 MiB in
all; `/.dev/` is in .git/info/exclude):

    cd /work/main
    .venv/bin/python bench/comfy_native.py --prepare /work/comfy/ComfyUI .dev/comfyui \
        --site /work/comfy/venv/lib/python3.11/site-packages          # where comfy_kitchen and einops are installed
    COMFYUI_DIR=.dev/comfyui .venv/bin/python -m pytest -q tests/test_comfy_native.py   # the copy alone works
    # device call: carry=[".dev/comfyui"]; the part reads COMFYUI_DIR (default .dev/comfyui)

The copy is every *.py of ComfyUI's `comfy/` package (~4.5 MB; no tokenizer data), plus `_site/` with the pure-Python
files of comfy_kitchen (its 137 MB CUDA extension `_C*.so` left out) and einops. `_site` goes at the END of sys.path,
so a package the interpreter already has wins. For ComfyUI as a CUDA 13 user runs it, carry comfy_kitchen's own
wheel in `.whl/` too (40 MB, abi3, installed into /tmp/site by run_summary.sh, ahead of `_site`):

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 -d .whl comfy-kitchen==0.2.24

With it (calls 9-11, 2026-12-02) the kitchen's CUDA backend runs ComfyUI's RoPE and q/k norms: its eager klein step
went from 79.7 to 71.7 ms, Z-Image from 136.4 to 116.8 ms.

What the model-class import chain needs beyond the standard library and torch (measured: modules imported by
`comfy.ldm.flux.model`, `comfy.ldm.lumina.model`, `comfy.ops`): einops, numpy, PIL (pillow), psutil, safetensors,
tqdm, packaging, comfy_kitchen, comfy_aimdo. On the GPU machine's list: einops numpy pillow psutil safetensors tqdm
(packaging comes with transformers). Not there:
  - comfy_kitchen: USED by the forward (flux `math.apply_rope` -> `ck.apply_rope`, Z-Image attention ->
    `ck.rms_rope`), so it cannot be stubbed: its pure-Python part is carried in `_site`. Without its CUDA extension
    (which ComfyUI also disables on torch builds older than CUDA 13) it runs its "eager" backend (call 8); with the
    wheel carried, its CUDA backend (calls 9-11). Its Triton backend is importable on the H200 but disabled, as
    ComfyUI leaves it (`comfyui_setup` in the results). Its ops
    are torch.library custom ops (opaque to inductor: not fused with their neighbours when compiled).
  - comfy_aimdo: NOT used by a forward with resident weights (only by the dynamic-VRAM loader and by
    `ops.cast_bias_weight` for weights that live in an aimdo "vbar"): stubbed by `add_comfy_to_path` when missing,
    with empty modules that raise AttributeError if anything is looked up.
`comfy.model_detection` (only for the cross-check of our parameters) also needs transformers, torchvision, scipy.

What is timed (docs/PERF.md method): `diffusion_model(x, timestep, context=..., ..., transformer_options=...)`, the
call `model_base.BaseModel._apply_model` makes, on the inputs it would pass (see `comfy_klein_args` /
`comfy_zimage_args`), with weights resident in bf16 and `comfy.ops.disable_weight_init` layers: what
`comfy.ops.pick_operations` returns when the weight dtype is the compute dtype and no fp8 / --fast option is set,
and what the non-dynamic ModelPatcher runs once the weights are fully loaded (comfy_cast_weights False, so every
Linear is plain `torch.nn.Linear.forward`). Attention is whatever `comfy.ldm.modules.attention.optimized_attention`
picked at import (on NVIDIA without xformers / sage flags: `attention_pytorch` = torch SDPA). The compiled variant
is what the TorchCompileModel node does (comfy_extras/nodes_torch_compile.py + comfy_api/torch_helpers): the whole
`diffusion_model` through `torch.compile(backend="inductor", options={"guard_filter_fn": <skip guards on
transformer_options>}, mode=None, fullgraph=False, dynamic=None)`; the node also forces the non-dynamic patcher.
Not reproduced: ComfyUI's default on NVIDIA since its dynamic-VRAM loader ("comfy-aimdo", on unless
--disable-dynamic-vram / --highvram / --gpu-only), which routes every Linear through `cast_bias_weight`.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

VENDORED = ("comfy_kitchen", "einops")  # carried in <copy>/_site (pure Python only)
STUBBED = {"comfy_aimdo": ("control", "host_buffer", "model_mmap", "model_vbar", "torch", "vram_buffer")}
SETUP: dict = {}


# ============================================================================================== ComfyUI on sys.path

class _Stub(types.ModuleType):
    """An empty stand-in: importable, but any attribute look-up fails loudly (it must stay unused)."""

    def __getattr__(self, name):
        raise AttributeError(f"{self.__name__} is a stub (package not installed); {name!r} is not available "
                             "(only ComfyUI's dynamic-VRAM loader uses it)")


def _stub_if_missing(name: str, submodules) -> bool:
    if importlib.util.find_spec(name) is not None:
        return False
    pkg = _Stub(name)
    pkg.__path__ = []
    sys.modules[name] = pkg
    for sub in submodules:
        mod = _Stub(f"{name}.{sub}")
        sys.modules[mod.__name__] = mod
        pkg.__dict__[sub] = mod
    return True


def add_comfy_to_path(comfy_dir) -> dict:
    """Make `comfy.*` importable from a ComfyUI checkout (or a --prepare'd copy) and import the model classes.

    Our argv is never parsed: `comfy.options.enable_args_parsing(False)` before `comfy.cli_args`, which then parses
    []. On a torch without CUDA `args.cpu` is set before `comfy.model_management` is imported (it probes the device
    at import and would fail); on a CUDA machine it picks cuda:0 as ComfyUI does. Idempotent. Returns SETUP."""
    comfy_dir = Path(comfy_dir).resolve()
    if not (comfy_dir / "comfy" / "model_management.py").is_file():
        raise FileNotFoundError(f"{comfy_dir} is not a ComfyUI checkout (no comfy/model_management.py); "
                                "set COMFYUI_DIR or run `bench/comfy_native.py --prepare`")
    loaded = sys.modules.get("comfy")
    if loaded is not None:
        where = Path(next(iter(loaded.__path__))).resolve().parent
        if where != comfy_dir:
            raise RuntimeError(f"another ComfyUI is already imported from {where}")
        return SETUP
    sys.path.insert(0, str(comfy_dir))
    if (comfy_dir / "_site").is_dir():
        sys.path.append(str(comfy_dir / "_site"))
    stubs = [n for n, subs in STUBBED.items() if _stub_if_missing(n, subs)]
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    import comfy.ldm.flux.model  # noqa: F401  (model_management, ops, attention come with it)
    import comfy.ldm.lumina.model  # noqa: F401
    import comfy.ldm.modules.attention as attention
    import comfy.model_management as mm
    import comfy.quant_ops as qo

    SETUP.update(comfy_dir=str(comfy_dir), commit=_commit(comfy_dir), stubs=stubs, device=str(mm.get_torch_device()),
                 attention=attention.optimized_attention.__name__, comfy_kitchen=_kitchen(getattr(qo, "ck", None)),
                 ops="comfy.ops.disable_weight_init", torch=torch.__version__)
    return SETUP


def _kitchen(ck) -> dict | None:
    """comfy_kitchen's version and which of its backends run (informational: 'eager' = plain torch ops)."""
    try:
        return {"version": importlib.metadata.version("comfy_kitchen"), "backends": ck.list_backends()}
    except Exception as e:
        return None if ck is None else {"error": repr(e)[:200]}


def _commit(comfy_dir: Path) -> str | None:
    if (comfy_dir / "PREPARED.json").is_file():
        return json.loads((comfy_dir / "PREPARED.json").read_text()).get("commit")
    if (comfy_dir / "COMMIT.txt").is_file():  # a snapshot without .git
        return (comfy_dir / "COMMIT.txt").read_text().split()[0]
    try:
        return subprocess.run(["git", "-C", str(comfy_dir), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        return None


# ============================================================================================== parameters
# As comfy/model_detection.py `detect_unet_config` derives them (commit in SETUP). Shapes come from the state dict;
# the rest is fixed there for these checkpoints. Where model_detection hard-codes a number that a tiny test model
# must change (klein out_channels / RoPE axes, Z-Image heads / axes) it comes from our config instead.
KLEIN_FIXED = dict(image_model="flux2", mlp_ratio=3.0, theta=2000, global_modulation=True, mlp_silu_act=True,
                   qkv_bias=False, ops_bias=False, default_ref_method="index", ref_index_scale=10.0, txt_ids_dims=[3],
                   patch_size=1, vec_in_dim=None, yak_mlp=False, txt_norm=False)
ZIMAGE_FIXED = dict(image_model="lumina2", patch_size=2, in_channels=16, qk_norm=True,
                    axes_lens=[1536, 512, 512], rope_theta=256.0, ffn_dim_multiplier=8.0 / 3.0,
                    z_image_modulation=True, time_scale=1000.0, pad_tokens_multiple=32)
# comfy/supported_models.py Flux.process_unet_state_dict: BFL `*_norm.scale` is `*_norm.weight` in ComfyUI's modules.
KLEIN_SUFFIX_RENAMES = (("_norm.scale", "_norm.weight"),)
# Z-Image: ComfyUI's NextDiT is named after the original (Tongyi) keys, which are our native keys: no renames.
ZIMAGE_SUFFIX_RENAMES = ()


def _count(keys, prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in keys if k.startswith(prefix)})


def klein_params(sd, cfg) -> dict:
    """Flux(**params) for a native (BFL-key) klein state dict; cfg: our KleinConfig (RoPE axes)."""
    shape = lambda k: tuple(sd[k].shape)  # noqa: E731
    hidden, in_ch = shape("img_in.weight")
    p = dict(KLEIN_FIXED, in_channels=in_ch, out_channels=shape("final_layer.linear.weight")[0], hidden_size=hidden,
             context_in_dim=shape("txt_in.weight")[1], axes_dim=list(cfg.axes_dim),
             num_heads=hidden // sum(cfg.axes_dim), depth=_count(sd, "double_blocks."),
             depth_single_blocks=_count(sd, "single_blocks."),
             guidance_embed="guidance_in.in_layer.weight" in sd)
    if (cfg.mlp_ratio, cfg.theta) != (p["mlp_ratio"], p["theta"]):
        raise ValueError(f"ComfyUI's FLUX.2 has mlp_ratio 3 and theta 2000, not {cfg.mlp_ratio} / {cfg.theta}")
    return p


def zimage_params(sd, cfg) -> dict:
    """NextDiT(**params) for a native Z-Image state dict; cfg: our ZImageConfig (heads, RoPE axes).

    ComfyUI's NextDiT sizes the timestep MLP min(dim, 1024) wide with a 256 output and the modulation input
    min(dim, 256): it only runs (and only matches the reference) for dim >= 1024."""
    dim, cap = tuple(sd["cap_embedder.1.weight"].shape)
    if dim < 1024:
        raise ValueError(f"ComfyUI's NextDiT cannot run a Z-Image of width {dim} (< 1024): its t_embedder is "
                         "min(dim, 1024) wide with a 256 output; use a test model at least 1024 wide")
    return dict(ZIMAGE_FIXED, dim=dim, cap_feat_dim=cap, n_layers=_count(sd, "layers."), n_heads=cfg.n_heads,
                n_kv_heads=cfg.n_heads, n_refiner_layers=_count(sd, "noise_refiner."), axes_dims=list(cfg.axes_dims))


def to_comfy_keys(sd, renames) -> dict:
    def rename(k):
        return next((k[: -len(old)] + new for old, new in renames if k.endswith(old)), k)

    return {rename(k): v for k, v in sd.items()}


def _build(cls, params, sd, dtype, device, what):
    """Construct as model_base.BaseModel does (dtype, device, operations), then load strictly (missing / unexpected /
    shape errors name the keys). Weights are copied, not aliased (ComfyUI's non-dynamic load uses assign=False)."""
    import comfy.ops

    model = cls(**params, dtype=dtype, device=device, operations=comfy.ops.disable_weight_init)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    bad = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
           if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad:
        raise ValueError(f"{what}: missing {missing[:8]}, unexpected {unexpected[:8]}, shape {bad[:8]}")
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in sd.items()}, strict=True)
    return model.eval().requires_grad_(False)


def build_comfy_klein(sd_native, dtype, device, cfg):
    """comfy.ldm.flux.model.Flux with model_detection's FLUX.2 parameters and comfy.ops.disable_weight_init."""
    import comfy.ldm.flux.model

    return _build(comfy.ldm.flux.model.Flux, klein_params(sd_native, cfg),
                  to_comfy_keys(sd_native, KLEIN_SUFFIX_RENAMES), dtype, device, "ComfyUI Flux (klein)")


def build_comfy_zimage(sd_native, dtype, device, cfg):
    """comfy.ldm.lumina.model.NextDiT with model_detection's Z-Image parameters and comfy.ops.disable_weight_init."""
    import comfy.ldm.lumina.model

    return _build(comfy.ldm.lumina.model.NextDiT, zimage_params(sd_native, cfg),
                  to_comfy_keys(sd_native, ZIMAGE_SUFFIX_RENAMES), dtype, device, "ComfyUI NextDiT (Z-Image)")


# ============================================================================================== one step

def _options(sigma) -> dict:
    """The transformer_options a sampler step carries (samplers.calc_cond_batch + model_base._apply_model)."""
    return {"cond_or_uncond": [0], "uuids": [None], "sigmas": sigma, "prefetch_dynamic_vbars": False}


def _token_groups(ids):
    """Our klein ids [N, 4] (t, h, w, l) -> [(start, t, h, w)] per image, checking each is a row-major grid."""
    from flux_core.torch.klein import position_ids

    ids, groups, start = ids.cpu().long(), [], 0
    while start < len(ids):
        t = int(ids[start, 0])
        n = int((ids[start:, 0] == t).long().cumprod(0).sum())
        h, w = int(ids[start:start + n, 1].max()) + 1, int(ids[start:start + n, 2].max()) + 1
        if h * w != n or not torch.equal(ids[start:start + n], position_ids(h, w, t=t).long()):
            raise ValueError(f"klein ids at token {start} are not a row-major {h}x{w} grid")
        groups.append((start, t, h, w))
        start += n
    return groups


def comfy_klein_args(x, ids, txt, tids, sigma, dtype):
    """Our klein inputs -> (args, kwargs) of the ComfyUI diffusion_model call, as model_base.Flux2 makes it:
    x tokens [B, N, C] -> latent [B, C, h, w] (patch size 1) and each reference image -> `ref_latents` (already in
    model space: model_base's process_latent_in happens before); timestep = ModelSamplingFlux.timestep(sigma) =
    sigma, float32; context in the model dtype; guidance 3.5 (Flux.extra_conds' default; klein ignores it)."""
    from flux_core.torch.klein import text_ids

    groups = _token_groups(ids)
    if groups[0][1] != 0 or [g[1] for g in groups[1:]] != [10 * (i + 1) for i in range(len(groups) - 1)]:
        raise ValueError("ComfyUI puts the image at t=0 and reference i at t=10*(i+1) (ref_latents_method 'index')")
    if not torch.equal(tids.cpu().long(), text_ids(txt.shape[1]).long()):
        raise ValueError("ComfyUI builds text ids (0, 0, 0, l) itself; ours differ")
    B, C = x.shape[0], x.shape[2]
    lat = [x[:, s:s + h * w].transpose(1, 2).reshape(B, C, h, w).to(dtype) for s, _, h, w in groups]
    sig = torch.as_tensor(sigma, device=x.device).reshape(-1).float().expand(B).contiguous()
    kw = dict(context=txt.to(dtype), guidance=torch.full((B,), 3.5, device=x.device, dtype=dtype),
              control=None, transformer_options=_options(sig))
    if len(lat) > 1:
        kw["ref_latents"] = lat[1:]
    return (lat[0], sig), kw


def comfy_klein_step(model, x, ids, txt, tids, sigma):
    """One ComfyUI klein step on our inputs; returns the image tokens [B, h*w, C] (ComfyUI drops the reference
    tokens; compare with ours[:, :h*w]). The same quantity as ours: the raw velocity (model_base's CONST
    calculate_denoised x - v*sigma happens outside)."""
    args, kw = comfy_klein_args(x, ids, txt, tids, sigma, _dtype(model))
    out = model(*args, **kw)
    return out.flatten(2).transpose(1, 2)


def comfy_zimage_args(x, t, cap, dtype):
    """Our Z-Image inputs (x [B, 16, H, W], t = 1 - sigma, cap [L, D] or list / [B, L, D]) -> the ComfyUI call as
    model_base.Lumina2 makes it: timestep = ModelSamplingDiscreteFlow.timestep(sigma) = sigma (multiplier 1.0),
    float32; context [B, L, D]; num_tokens = L; no attention_mask (all-ones masks are dropped by extra_conds)."""
    B = x.shape[0]
    cap = torch.stack(list(cap)) if isinstance(cap, (list, tuple)) else cap
    cap = cap[None].expand(B, -1, -1) if cap.dim() == 2 else cap
    sig = (1.0 - torch.as_tensor(t, device=x.device, dtype=torch.float32)).reshape(-1).expand(B).contiguous()
    kw = dict(context=cap.to(dtype), num_tokens=cap.shape[1], control=None, transformer_options=_options(sig))
    return (x.to(dtype), sig), kw


def comfy_zimage_step(model, x, t, cap):
    """One ComfyUI Z-Image step in OUR sign: NextDiT embeds 1 - sigma (= our t) and returns -(raw prediction) so that
    model_base's CONST sampling sees a velocity; ours returns the raw prediction (the sampler negates). So -out."""
    args, kw = comfy_zimage_args(x, t, cap, _dtype(model))
    return -model(*args, **kw)


def _dtype(model):
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def compile_like_node(model, backend="inductor"):
    """What TorchCompileModel does to `diffusion_model` (its default backend is the first option, inductor)."""
    def skip_transformer_options(entries):  # the node's skip_torch_compile_dict
        return [("transformer_options" not in e.name) for e in entries]

    return torch.compile(model, backend=backend, options={"guard_filter_fn": skip_transformer_options},
                         mode=None, fullgraph=False, dynamic=None)


# ============================================================================================== weights, models

def random_native(model, seed, device, dtype) -> dict:
    """bench_summary's law in our layout: N(0, 0.02), 1-D norm scales N(1, 0.02); drawn in float32, then cast."""
    g = torch.Generator(device).manual_seed(seed)
    one = lambda k, p: 1.0 if p.dim() == 1 and ("norm" in k or k.endswith("scale")) else 0.0  # noqa: E731
    return {k: (torch.randn(p.shape, generator=g, device=device) * 0.02 + one(k, p)).to(dtype)
            for k, p in model.state_dict().items()}


def klein_config(diffusers_cfg: dict):
    from flux_core.configs import KleinConfig
    from flux_core.weights.klein import config_from_diffusers

    full = dict(timestep_guidance_channels=256, mlp_ratio=3.0, rope_theta=2000, eps=1e-6, guidance_embeds=False)
    return KleinConfig(**config_from_diffusers(dict(full, **diffusers_cfg)))


def zimage_config(diffusers_cfg: dict):
    from flux_core.configs import ZImageConfig

    return ZImageConfig.from_diffusers(dict(diffusers_cfg))


def ours_and_weights(kind, cfg, seed, device, dtype):
    """Our model (loaded from random native weights) and those weights (what the ComfyUI model gets too). The
    loader derives the config from the shapes again; it must be `cfg` (RoPE axes included), or the peers differ."""
    from flux_core.torch.klein import Flux2Transformer, load_klein
    from flux_core.torch.zimage import ZImageTransformer, load_zimage
    from flux_core.weights.io import Checkpoint

    cls, load = (Flux2Transformer, load_klein) if kind == "klein" else (ZImageTransformer, load_zimage)
    with torch.device("meta"):
        shell = cls(cfg)
    sd = random_native(shell, seed, device, dtype)
    ours = load(sd if kind == "klein" else Checkpoint(sd), dtype=dtype, device=device)
    if ours.config != cfg:
        raise ValueError(f"our loader read {ours.config} from the weights, not {cfg}")
    return ours, sd


def klein_inputs(cfg, size, ntxt, nref, device, dtype, seed=1):
    from flux_core.torch.klein import position_ids, text_ids

    h = w = size // 16
    ids = torch.cat([position_ids(h, w)] + [position_ids(h, w, t=10 * (i + 1)) for i in range(nref)]).to(device)
    g = torch.Generator(device).manual_seed(seed)
    x = torch.randn(1, ids.shape[0], cfg.in_channels, generator=g, device=device).to(dtype)
    txt = torch.randn(1, ntxt, cfg.context_in_dim, generator=g, device=device).to(dtype)
    return x, ids, txt, text_ids(ntxt).to(device), torch.tensor([0.9], device=device), h * w


def zimage_inputs(cfg, size, ncap, device, dtype, seed=1):
    g = torch.Generator(device).manual_seed(seed)
    x = torch.randn(1, cfg.in_channels, size // 8, size // 8, generator=g, device=device).to(dtype)
    cap = torch.randn(ncap, cfg.cap_feat_dim, generator=g, device=device).to(dtype)
    return x, torch.tensor([0.1], device=device), cap


def rel_l2(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def detection_check() -> dict:
    """Our parameters vs comfy.model_detection.detect_unet_config on full-size (meta) klein-4B / Z-Image-Turbo
    state dicts; a parameter model_detection leaves out is the class default. Needs model_detection's imports
    (transformers, torchvision, scipy): 'unavailable' without them."""
    try:
        import comfy.model_detection as md
    except Exception as e:
        return {"status": f"unavailable: {type(e).__name__}: {str(e)[:120]}"}
    import dataclasses
    import inspect

    import comfy.ldm.flux.model as fm
    import comfy.ldm.lumina.model as lm
    from flux_core.configs import KleinConfig, ZImageConfig
    from flux_core.torch.klein import Flux2Transformer
    from flux_core.torch.zimage import ZImageTransformer

    flux_defaults = {f.name: f.default for f in dataclasses.fields(fm.FluxParams)
                     if f.default is not dataclasses.MISSING}
    nextdit_defaults = {k: v.default for k, v in inspect.signature(lm.NextDiT.__init__).parameters.items()
                        if v.default is not inspect.Parameter.empty}
    out = {}
    for kind, cls, cfg, fn, ren, defaults in (
            ("klein", Flux2Transformer, KleinConfig(), klein_params, KLEIN_SUFFIX_RENAMES, flux_defaults),
            ("zimage", ZImageTransformer, ZImageConfig(), zimage_params, ZIMAGE_SUFFIX_RENAMES, nextdit_defaults)):
        with torch.device("meta"):
            sd = cls(cfg).state_dict()
        theirs = dict(defaults, **md.detect_unet_config(to_comfy_keys(sd, ren), ""))
        theirs.pop("allow_fp16", None)  # a dtype hint for supported_models (std of a weight), not a parameter
        ours = dict(defaults, **fn(sd, cfg))
        norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
        diff = {k: [str(ours.get(k)), str(theirs.get(k))] for k in set(ours) | set(theirs)
                if norm(ours.get(k)) != norm(theirs.get(k))}
        out[kind] = diff or "match"
    out["status"] = "match" if all(v == "match" for v in out.values()) else "differ"
    return out


# ============================================================================================== tiny CPU check

TINY_KLEIN = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                  num_attention_heads=4, joint_attention_dim=96, axes_dims_rope=(4, 4, 4, 4))  # bench_summary's tiny
# bench_summary's tiny Z-Image (dim 64) cannot run in ComfyUI's NextDiT (see zimage_params); the smallest width whose
# FFN size int(dim / 3 * 8) is also what NextDiT's rounding to a multiple of 256 gives is 1056 (11 heads x 96).
# RoPE axes: what our loader derives from the shapes for head dim 96 (the real 32:48:48 proportion).
TINY_ZIMAGE = dict(dim=1056, n_layers=2, n_refiner_layers=1, n_heads=11, n_kv_heads=11, cap_feat_dim=64,
                   axes_dims=[24, 36, 36])


def tiny_check(comfy_dir) -> dict:
    """Float32 CPU: ComfyUI's model vs ours, one step, relative L2 (klein, klein + 1 reference, Z-Image aligned and
    with caption / image pad tokens)."""
    setup = add_comfy_to_path(comfy_dir)
    dev, dt, res = torch.device("cpu"), torch.float32, {}
    with torch.inference_mode():
        cfg = klein_config(TINY_KLEIN)
        ours, sd = ours_and_weights("klein", cfg, 0, dev, dt)
        comfy = build_comfy_klein(sd, dt, dev, cfg)
        for nref in (0, 1):
            x, ids, txt, tids, sig, n = klein_inputs(cfg, 64, 24, nref, dev, dt)
            want = ours(x, ids[None], txt, tids[None], sig)[:, :n]
            res[f"klein_ref{nref}"] = rel_l2(comfy_klein_step(comfy, x, ids, txt, tids, sig), want)
        cfg = zimage_config(TINY_ZIMAGE)
        ours, sd = ours_and_weights("zimage", cfg, 0, dev, dt)
        comfy = build_comfy_zimage(sd, dt, dev, cfg)
        for name, size, ncap in (("zimage_aligned", 128, 32), ("zimage_padded", 96, 20)):
            x, t, cap = zimage_inputs(cfg, size, ncap, dev, dt)
            res[name] = rel_l2(comfy_zimage_step(comfy, x, t, [cap]), ours(x, t, [cap]))
    return {"rel_l2": res, "setup": setup, "detection": detection_check()}


# ============================================================================================== GPU part

def part_comfy_native(A, DEV, DT, timeit, check, put, variant, klein_cfg, zimage_cfg, models=("klein", "zimage")):
    """bench_summary part: ComfyUI's native klein-4B and Z-Image-Turbo steps at 1024² (eager and compiled like
    TorchCompileModel) beside our eager output, one model resident at a time. COMFYUI_DIR (default .dev/comfyui).
    Whole-model inductor compiles take minutes: `models` lets two bench parts split the work, and
    COMFY_NATIVE_EAGER_ONLY=1 leaves the compiled models out (an eager comparison in a short call)."""
    variant("comfyui_setup", dict(add_comfy_to_path(os.environ.get("COMFYUI_DIR", ROOT / ".dev" / "comfyui"))))
    variant("comfyui_detection", detection_check())
    compile_ok = DEV.type == "cuda" and os.environ.get("COMFY_NATIVE_EAGER_ONLY") != "1"
    size = 64 if A.tiny else 1024
    if "klein" in models:
        _klein_part(klein_config(klein_cfg()), size, DEV, DT, compile_ok, timeit, check, put, variant)
        _free()
    if "zimage" not in models:
        return
    zcfg = zimage_cfg()
    if zcfg["dim"] < 1024:  # bench_summary's --tiny Z-Image is too narrow for ComfyUI's NextDiT (zimage_params)
        zcfg = TINY_ZIMAGE
    _zimage_part(zimage_config(zcfg), size, DEV, DT, compile_ok, timeit, check, put, variant)
    _free()


def _free():
    gc.collect()
    torch._dynamo.reset()  # compiled graphs hold the freed model's parameters
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _timed_first(fn):
    """The first (compiling) call, in seconds; only used on CUDA."""
    torch.cuda.synchronize()
    t = time.time()
    out = fn()
    torch.cuda.synchronize()
    return out, round(time.time() - t, 1)


def _klein_part(cfg, size, DEV, DT, compile_ok, timeit, check, put, variant):
    ours, sd = ours_and_weights("klein", cfg, 1, DEV, DT)
    comfy = build_comfy_klein(sd, DT, DEV, cfg)
    del sd
    compiled = compile_like_node(comfy) if compile_ok else None
    for nref, tag in ((0, ""), (1, "_ref")):
        x, ids, txt, tids, sig, n = klein_inputs(cfg, size, 512, nref, DEV, DT)
        args, kw = comfy_klein_args(x, ids, txt, tids, sig, DT)
        pe = ours.make_pe(ids[None], tids[None])  # once per layout, as our sampler does (not part of a step)
        want = ours(x, ids[None], txt, tids[None], sig, pe=pe)[:, :n]
        eager = lambda: comfy(*args, **kw)  # noqa: E731  the call model_base makes; layout converted outside
        out = eager()
        check(f"klein{tag} comfyui eager vs ours eager", out.flatten(2).transpose(1, 2), want)
        put(f"comfyui_klein{tag}_eager_ms", timeit(eager))
        if not tag:
            variant("ours_klein_eager_ms (same process)",
                    timeit(lambda: ours(x, ids[None], txt, tids[None], sig, pe=pe)))
            variant("ours_klein_eager_torch_ops_ms (same process)",
                    _torch_ops(lambda: timeit(lambda: ours(x, ids[None], txt, tids[None], sig, pe=pe))))
        if compiled is None:
            continue
        fast = lambda: compiled(*args, **kw)  # noqa: E731
        got, t = _timed_first(fast)
        variant(f"comfyui_klein{tag}_compile_s", t)
        check(f"klein{tag} comfyui compiled vs comfyui eager (yardstick)", got, out)
        check(f"klein{tag} comfyui compiled vs ours eager", got.flatten(2).transpose(1, 2), want)
        put(f"comfyui_klein{tag}_compiled_ms", timeit(fast))


def _torch_ops(fn):
    """fn() with our eager path's Triton kernel off (flux_core/torch/kernels.py)."""
    from flux_core.torch import kernels

    with kernels.disabled():
        return fn()


def _zimage_part(cfg, size, DEV, DT, compile_ok, timeit, check, put, variant):
    ours, sd = ours_and_weights("zimage", cfg, 1, DEV, DT)
    comfy = build_comfy_zimage(sd, DT, DEV, cfg)
    del sd
    x, t, cap = zimage_inputs(cfg, size, 512, DEV, DT)
    args, kw = comfy_zimage_args(x, t, cap, DT)
    rope = ours.make_rope([cap.shape[0]], x.shape[-2], x.shape[-1], device=DEV)
    want = ours(x, t, [cap], rope_cache=rope)
    eager = lambda: comfy(*args, **kw)  # noqa: E731
    out = eager()
    check("zimage comfyui eager vs ours eager (sign flipped)", -out, want)
    put("comfyui_zimage_eager_ms", timeit(eager))
    variant("ours_zimage_eager_ms (same process)", timeit(lambda: ours(x, t, [cap], rope_cache=rope)))
    variant("ours_zimage_eager_torch_ops_ms (same process)",
            _torch_ops(lambda: timeit(lambda: ours(x, t, [cap], rope_cache=rope))))
    if not compile_ok:
        return
    compiled = compile_like_node(comfy)
    fast = lambda: compiled(*args, **kw)  # noqa: E731
    got, tc = _timed_first(fast)
    variant("comfyui_zimage_compile_s", tc)
    check("zimage comfyui compiled vs comfyui eager (yardstick)", got, out)
    check("zimage comfyui compiled vs ours eager (sign flipped)", -got, want)
    put("comfyui_zimage_compiled_ms", timeit(fast))


# ============================================================================================== prepare

def _copy_py(src: Path, dst: Path) -> int:
    """Every *.py under src (no __pycache__, no compiled extensions, no data files) -> dst; returns bytes."""
    total = 0
    for f in (f for f in src.rglob("*.py") if "__pycache__" not in f.parts):
        out = dst / f.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, out)
        total += f.stat().st_size
    return total


def _package_dir(name: str, site) -> Path:
    spec = None if site else importlib.util.find_spec(name)
    path = Path(site) / name if site else Path(next(iter(spec.submodule_search_locations))) if spec else None
    if path is None or not path.is_dir():
        raise FileNotFoundError(f"{name} not found {'in ' + site if site else 'by this interpreter'}: pass --site "
                                "<the site-packages of ComfyUI's venv>")
    return path


def prepare(src, dst, site=None) -> dict:
    """Copy what the model-class import chain needs into dst (see the module docstring). Replaces an earlier copy."""
    src, dst = Path(src).resolve(), Path(dst).resolve()
    if not (src / "comfy" / "model_management.py").is_file():
        raise FileNotFoundError(f"{src} is not a ComfyUI checkout")
    if dst.exists():
        if not (dst / "PREPARED.json").is_file():
            raise FileExistsError(f"{dst} exists and is not a prepared copy; refusing to replace it")
        shutil.rmtree(dst)
    pkgs = {name: _package_dir(name, site) for name in VENDORED}  # fail before copying anything
    info = {"source": str(src), "commit": _commit(src), "vendored": {}}
    info["comfy_bytes"] = _copy_py(src / "comfy", dst / "comfy")
    for name, pkg in pkgs.items():
        nbytes = _copy_py(pkg, dst / "_site" / name)
        for dist in pkg.parent.glob(f"{name}-*.dist-info"):  # version and licence travel with the code
            for f in [dist / "METADATA", *dist.glob("LICENSE*"), *dist.glob("licenses/*")]:
                if f.is_file():
                    out = dst / "_site" / dist.name / f.relative_to(dist)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(f, out)
            info["vendored"][name] = {"dist": dist.name, "bytes": nbytes}
    info["total_mb"] = round(sum(f.stat().st_size for f in dst.rglob("*") if f.is_file()) / 2**20, 2)
    (dst / "PREPARED.json").write_text(json.dumps(info, indent=1))
    return info


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prepare", nargs=2, metavar=("COMFYUI_DIR", "DEST"))
    p.add_argument("--site", help="site-packages holding comfy_kitchen and einops (default: this interpreter's)")
    p.add_argument("--check", metavar="COMFYUI_DIR", help="tiny CPU parity, prints one JSON line")
    a = p.parse_args(argv)
    if a.prepare:
        print(json.dumps(prepare(*a.prepare, site=a.site)))
    elif a.check:
        print(json.dumps(tiny_check(a.check)))
    else:
        p.print_help()


if __name__ == "__main__":
    main()
