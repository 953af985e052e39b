"""The torch side of the sampler: the per-family denoiser closures and array conversions.

A denoiser maps (latent x [B, C, h, w] float32, model time t) to the velocity v = noise − x0 in float32, hiding each
family's conventions (klein: packed tokens, reference tokens, t = σ; Z-Image: t = 1 − σ, negated output) so that
`pipeline.euler` is one loop for both. Position ids and RoPE tables are built once per generation, not per step.
"""
from __future__ import annotations

import numpy as np
import torch



def to_backend(arr, model):
    dev = model.device
    if isinstance(arr, torch.Tensor):
        return arr.to(dev)
    return torch.as_tensor(np.asarray(arr), device=dev)


def to_numpy(t) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def step_done(x):
    return x


def initial_latent(noise, init_latent, sigma, model):
    x = to_backend(noise, model).float()
    if init_latent is not None:
        # flow-matching forward process at σ_start (diffusers FlowMatchEulerDiscreteScheduler.scale_noise)
        s = float(np.float32(sigma))
        x = s * x + (1.0 - s) * to_backend(init_latent, model).float()
    return x


def make_denoiser(model, cond, uncond, guidance: float, batch: int, h: int, w: int):
    """The family's denoiser (`_<family.module>_denoiser` below): (x, t) -> v = noise − x0, float32."""
    make = globals()[f"_{model.family.module}_denoiser"]
    return make(model.module, model.family, cond, uncond, guidance, batch, h, w)


def compute_device(net):
    """Where the module computes: an offloaded module's weights may sit on the host between uses."""
    from .offload import offloader_of

    off = offloader_of(net)
    return off.device if off is not None else next(net.parameters()).device


def pack(x):
    """[B, C, h, w] -> [B, h·w, C] (row-major tokens, diffusers `_pack_latents`)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h * w).permute(0, 2, 1)


def unpack(tokens, h: int, w: int):
    b, n, c = tokens.shape
    return tokens.permute(0, 2, 1).reshape(b, c, h, w)


def _klein_denoiser(net, family, cond, uncond, guidance, batch, h, w):
    from .klein import position_ids, text_ids

    dev, dt = compute_device(net), next(net.parameters()).dtype
    ids = [position_ids(h, w)]
    refs = []
    for i, ref in enumerate(cond.refs):  # reference i: t = 10·(i+1), h/w restart at 0 (docs/MODELS.md §K4)
        ref = ref.to(dev)
        ids.append(position_ids(ref.shape[-2], ref.shape[-1], t=10 * (i + 1)))
        refs.append(pack(ref.float()))
    img_ids = torch.cat(ids, 0).to(dev)[None]
    ref_tokens = torch.cat(refs, 1).expand(batch, -1, -1) if refs else None
    txt = cond.embeds.to(dev, dt)
    txt_ids = text_ids(txt.shape[1]).to(dev)[None]
    pe = net.make_pe(img_ids, txt_ids)  # [1, T+N, d/2, 2]: shared by every row, positive and negative alike
    if uncond is not None:
        neg = uncond.embeds.to(dev, dt)
        if neg.shape[1] != txt.shape[1]:
            raise ValueError("positive and negative klein conditionings must have the same token count (512)")
        txt = torch.cat([txt, neg], 0)  # CFG: one forward over [positive; negative] rows
    rows = txt.shape[0]
    n_noise = h * w

    @torch.inference_mode()
    def denoise(x, t):
        tokens = pack(x)
        if ref_tokens is not None:
            tokens = torch.cat([tokens, ref_tokens], 1)
        tokens = tokens.to(dt).repeat(rows // batch, 1, 1)
        ts = torch.full((rows,), float(t), dtype=torch.float32, device=dev)  # sigma stays float32 (see klein.py)
        v = net(tokens, img_ids, txt, txt_ids, ts, pe=pe)[:, :n_noise].float()
        if rows > batch:
            v = family.cfg_combine(v[:batch], v[batch:], guidance)
        return unpack(family.velocity(v), h, w)

    return denoise


def _zimage_denoiser(net, family, cond, uncond, guidance, batch, h, w):
    dev, dt = compute_device(net), next(net.parameters()).dtype
    caps = [c.to(dev, dt) for c in cond.embeds]
    if uncond is not None:  # CFG: one forward over [positive; negative] captions (padded and masked per row)
        caps += [c.to(dev, dt) for c in uncond.embeds]
    rows = len(caps)
    rope = None

    @torch.inference_mode()
    def denoise(x, t):
        nonlocal rope
        if rope is None:  # built on the first step, reused after (depends only on sizes)
            rope = net.make_rope([c.shape[0] for c in caps], x.shape[-2], x.shape[-1], device=dev)
        xin = x.to(dt).repeat(rows // batch, 1, 1, 1)
        ts = torch.full((rows,), float(t), dtype=torch.float32, device=dev)
        out = net(xin, ts, caps, rope_cache=rope).float()
        if rows > batch:
            out = family.cfg_combine(out[:batch], out[batch:], guidance)
        return family.velocity(out)  # Z-Image predicts x0 − noise: v is its negation

    return denoise
