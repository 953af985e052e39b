"""The models of bench_summary.py: the published configs (or toy ones for --tiny), random weights drawn once in the
peer's layout and the same weights loaded into ours. `configure(device, dtype, tiny)` first (bench_summary does).

Weights: matrices N(0, 0.02), 1-D norm scales N(1, 0.02), BatchNorm running variances in [0.5, 1.5); never zeros."""
from __future__ import annotations

import torch

DEV, DT, TINY = torch.device("cpu"), torch.float32, False


def configure(device, dtype, tiny: bool) -> None:
    global DEV, DT, TINY
    DEV, DT, TINY = device, dtype, tiny


def random_like(model, seed=0, device=None, dtype=None):
    """Random weights for `model`'s state dict (bench/bench_pipeline.py uses it too): N(0, 0.02) matrices, N(1, 0.02)
    norm scales, BatchNorm variances in [0.5, 1.5) kept float32; on `device` / `dtype` (default: configure()'s)."""
    dev, dt = device or DEV, dtype or DT
    g = torch.Generator(dev).manual_seed(seed)
    sd = {}
    for k, p in model.state_dict().items():
        if k.endswith("running_var"):
            t = 0.5 + torch.rand(p.shape, generator=g, device=dev)
        elif k.endswith("num_batches_tracked"):
            sd[k] = torch.zeros((), dtype=torch.long, device=dev)
            continue
        elif p.dim() == 1 and ("norm" in k or k.endswith("scale")):
            t = 1 + 0.02 * torch.randn(p.shape, generator=g, device=dev)
        else:
            t = 0.02 * torch.randn(p.shape, generator=g, device=dev)
        sd[k] = t.float() if k.startswith("bn.") else t.to(dt)
    return sd


# ---------------------------------------------------------------------------------------------- configs

def klein_cfg():
    if TINY:
        return dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                    num_attention_heads=4, joint_attention_dim=96, axes_dims_rope=(4, 4, 4, 4))
    return dict(patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=7680, axes_dims_rope=(32, 32, 32, 32))


def zimage_cfg():
    if TINY:
        return dict(dim=64, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32, axes_dims=[8, 12, 12])
    return dict(dim=3840, n_layers=30, n_refiner_layers=2, n_heads=30, n_kv_heads=30, cap_feat_dim=2560,
                axes_dims=[32, 48, 48])


def qwen_cfg():
    if TINY:
        return dict(vocab_size=261, hidden_size=32, intermediate_size=64, num_hidden_layers=28, num_attention_heads=2,
                    num_key_value_heads=1, head_dim=16)
    return dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128)


def vae_cfg(kind):
    from refs import vae as rv

    if TINY:
        return dict(rv.TINY_FLUX2 if kind == "flux2" else rv.TINY_FLUX1)
    return dict(rv.REAL_FLUX2 if kind == "flux2" else rv.REAL_FLUX1)


def size():
    return 64 if TINY else 1024


def build_klein():
    from diffusers import Flux2Transformer2DModel

    from flux_core.torch.klein import load_klein
    from flux_core.weights.klein import to_native

    with torch.device("meta"):
        ref = Flux2Transformer2DModel(timestep_guidance_channels=256, mlp_ratio=3.0, rope_theta=2000, eps=1e-6,
                                      guidance_embeds=False, **klein_cfg())
    sd = random_like(ref, 1)
    ref.load_state_dict(sd, assign=True)
    return ref.eval(), load_klein(to_native(sd), dtype=DT, device=DEV).eval(), sd


def build_zimage():
    from diffusers import ZImageTransformer2DModel

    from flux_core.torch.zimage import load_zimage
    from flux_core.weights.io import Checkpoint
    from flux_core.weights.zimage import to_native

    with torch.device("meta"):
        ref = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, norm_eps=1e-5,
                                       qk_norm=True, rope_theta=256.0, t_scale=1000.0, axes_lens=[1536, 512, 512],
                                       **zimage_cfg())
    sd = random_like(ref, 1)
    ref.load_state_dict(sd, assign=True)
    return ref.eval(), load_zimage(Checkpoint(to_native(sd)), dtype=DT, device=DEV).eval()


def build_qwen3(seed=3):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    with torch.device(DEV):  # not meta: the rotary inv_freq buffer is computed at construction
        ref = Qwen3ForCausalLM(Qwen3Config(rope_theta=1e6, tie_word_embeddings=True, **qwen_cfg())).to(DT)
    sd = {k: v for k, v in random_like(ref, seed).items() if k != "lm_head.weight"}
    ref.load_state_dict(sd, strict=False)
    ref.tie_weights()
    return ref.eval(), sd


def build_vae(kind, seed=2):
    from diffusers import AutoencoderKL, AutoencoderKLFlux2

    from flux_core.torch.vae import load_vae
    from flux_core.weights.io import Checkpoint
    from flux_core.weights.vae import to_native

    cfg = vae_cfg(kind)
    with torch.device("meta"):
        ref = (AutoencoderKLFlux2 if kind == "flux2" else AutoencoderKL)(**cfg)
    sd = random_like(ref, seed)
    ref.load_state_dict(sd, assign=True)
    conf = {k: cfg[k] for k in ("norm_num_groups", "scaling_factor", "shift_factor") if k in cfg} or None
    return ref.eval(), load_vae(Checkpoint(to_native(sd), config=conf), dtype=DT, device=DEV)
