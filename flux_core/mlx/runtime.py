"""The MLX side of the sampler: the same functions as `flux_core/torch/runtime.py`, for `pipeline.euler`.

A denoiser maps (latent x [B, C, h, w] float32, model time t) to the velocity v = noise − x0 in float32, hiding each
family's conventions (klein: packed tokens, reference tokens at t = 10·(i+1), t = σ, CFG neg + g(pos − neg);
Z-Image: t = 1 − σ, negated output, CFG pos + g(pos − neg)). The speed tricks of the seeds' MLX port:

  * everything that depends only on sizes (position ids, the multi-axis RoPE tables, Z-Image masks) and the text
    features are built ONCE per generation in `make_denoiser` and evaluated there;
  * the step (transformer forward(s) + CFG + unpack) is ONE `mx.compile`d function whose constants (weights, tables,
    text features) were all evaluated before it is traced (lazy constants inside a trace made mflux's output depend
    on when they were first evaluated, mflux #714);
  * the graph of a step stays lazy (`euler` only adds x + dt·v) until `step_done`, which holds the ONE `mx.eval` per
    denoising step.
Latents stay float32 between steps; the model runs in its load dtype (bf16 by default).
"""
from __future__ import annotations

import mlx.core as mx
import numpy as np

from .common import F32, to_mx, to_numpy as _to_numpy


def to_backend(arr, model=None) -> mx.array:
    """numpy / torch / mx -> mx float32 (bf16 torch tensors included)."""
    return to_mx(arr, "float32")


def to_numpy(a) -> np.ndarray:
    return _to_numpy(a)


def step_done(x: mx.array) -> mx.array:
    """The one evaluation of a denoising step: the transformer graph(s), CFG and the Euler update, at once."""
    mx.eval(x)
    return x


def initial_latent(noise, init_latent, sigma, model) -> mx.array:
    """The seed's (torch-drawn, float32) noise handed over bit for bit; img2img mixes in the init latent at σ_start
    exactly as the torch path does (diffusers' scale_noise)."""
    x = to_backend(noise, model)
    if init_latent is not None:
        s = float(np.float32(sigma))
        x = s * x + (1.0 - s) * to_backend(init_latent, model)
    return x


def make_denoiser(model, cond, uncond, guidance: float, batch: int, h: int, w: int):
    device = mx.gpu if model.device == "gpu" else mx.cpu
    with mx.stream(device):
        make = globals()[f"_{model.family.module}_step"]  # the family's step below
        step, consts = make(model.module, model.family, cond, uncond, guidance, batch, h, w)
        mx.eval(consts)  # every constant of the compiled step is concrete before tracing
    compiled = mx.compile(step)

    def denoise(x, t):
        with mx.stream(device):
            return compiled(x if isinstance(x, mx.array) else to_backend(x), mx.array(np.float32(t)))

    return denoise


def pack(x: mx.array) -> mx.array:
    """[B, C, h, w] -> [B, h·w, C] (row-major tokens, diffusers `_pack_latents`)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h * w).transpose(0, 2, 1)


def unpack(tokens: mx.array, h: int, w: int) -> mx.array:
    b, n, c = tokens.shape
    return tokens.transpose(0, 2, 1).reshape(b, c, h, w)


def _klein_step(net, family, cond, uncond, guidance, batch, h, w):
    from .klein import position_ids, text_ids

    dt = net.dtype
    ids, refs = [position_ids(h, w)], []
    for i, ref in enumerate(cond.refs):  # reference i: t = 10·(i+1), h/w restart at 0 (docs/MODELS.md §K4)
        ref = to_backend(ref)
        ids.append(position_ids(ref.shape[-2], ref.shape[-1], t=10 * (i + 1)))
        refs.append(pack(ref))
    ref_tokens = None
    if refs:  # never noised, identical every step: packed and cast once
        ref_tokens = mx.broadcast_to(mx.concatenate(refs, 1), (batch, sum(r.shape[1] for r in refs), refs[0].shape[2]))
        ref_tokens = ref_tokens.astype(dt)
    txt = to_mx(cond.embeds, dt)
    neg = to_mx(uncond.embeds, dt) if uncond is not None else None
    if neg is not None and neg.shape[1] != txt.shape[1]:
        raise ValueError("positive and negative klein conditionings must have the same token count (512)")
    if neg is not None:  # CFG: one forward over [pos; neg] (2B rows) instead of two
        txt = mx.concatenate([txt, neg], 0)
    rows = txt.shape[0]
    img_ids = np.concatenate(ids, 0)
    pe = net.make_pe(img_ids, text_ids(txt.shape[1]))  # [1, T+N, d/2, 2], shared by every row and every step
    n_noise = h * w

    def step(x, t):
        tokens = pack(x).astype(dt)
        if ref_tokens is not None:
            tokens = mx.concatenate([tokens, ref_tokens], 1)
        if rows != batch:
            tokens = mx.concatenate([tokens, tokens], 0)
        ts = mx.broadcast_to(t, (rows,))  # σ stays float32, as on the torch path (see torch/klein.py)
        v = net(tokens, None, txt, None, ts, pe=pe)[:, :n_noise].astype(F32)
        if rows != batch:
            v = family.cfg_combine(v[:batch], v[batch:], guidance)
        return unpack(family.velocity(v), h, w)

    return step, [c for c in (txt, ref_tokens, pe) if c is not None]


def _zimage_step(net, family, cond, uncond, guidance, batch, h, w):
    dt = net.dtype
    caps = _caption_arrays(cond.embeds, dt)
    if uncond is not None:  # CFG: one forward over [positive; negative] captions (padded and masked per row)
        caps += _caption_arrays(uncond.embeds, dt)
    rows = len(caps)
    rope = net.make_rope([c.shape[0] for c in caps], h, w)  # once per generation (sizes only)

    def step(x, t):
        xin = x.astype(dt)
        if rows != batch:
            xin = mx.concatenate([xin, xin], 0)
        ts = mx.broadcast_to(t.astype(F32), (rows,))
        out = net(xin, ts, caps, rope_cache=rope).astype(F32)
        if rows != batch:
            out = family.cfg_combine(out[:batch], out[batch:], guidance)
        return family.velocity(out)  # Z-Image predicts x0 − noise: v is its negation

    return step, caps + rope.arrays()


def _caption_arrays(embeds, dtype) -> list:
    """A list of [L_i, H] (torch or mx) or one [B, L, H] array -> list of mx [L_i, H] in the model dtype."""
    if hasattr(embeds, "shape") and len(embeds.shape) == 3:
        embeds = [embeds[i] for i in range(embeds.shape[0])]
    return [to_mx(c, dtype) for c in embeds]
