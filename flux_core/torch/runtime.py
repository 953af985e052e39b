"""The torch side of the sampler: the per-family denoiser closures and array conversions.

A denoiser maps (latent x [B, C, h, w] float32, model time t) to the velocity v = noise − x0 in float32, hiding each
family's conventions (klein: packed tokens, reference tokens, t = σ; Z-Image: t = 1 − σ, negated output) so that
`pipeline.euler` is one loop for both. Position ids and RoPE tables are built once per generation, not per step.

A compiled transformer on CUDA (`fluxcore_cuda_graphs`, set by `loaders.compile_blocks`) runs its forward through
one `graphs.CudaGraphCache` kept on the model, whose inputs are all tensors (latent tokens, text, time, RoPE tables):
the graph captured once for a shape serves every later step and every later generation of that shape (new prompt
text is copied into the captured buffers), so the host enqueues a step in one launch and never re-captures.
"""
from __future__ import annotations

import numpy as np
import torch

from .graphs import CudaGraphCache


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
    step = make(model.module, model.family, cond, uncond, guidance, batch, h, w)
    dev = next(model.module.parameters()).device

    @torch.inference_mode()
    def denoise(x, t):
        return step(x, torch.full((1,), float(t), dtype=torch.float32, device=dev))

    return denoise


def _forward(net, fn):
    """`fn` (a function of tensors and hashable constants only), replayed from the model's CUDA graph cache when the
    model was compiled on CUDA; one graph per model (a new shape replaces it), shared by all generations."""
    if not getattr(net, "fluxcore_cuda_graphs", False):
        return fn
    caches = getattr(net, "fluxcore_graph_caches", None)
    if caches is None:
        caches = net.fluxcore_graph_caches = {}
    if fn not in caches:
        caches[fn] = CudaGraphCache(fn, name=f"{type(net).__name__} forward", max_entries=1)
    return caches[fn]


def _klein_forward(net, tokens, txt, ts, pe):
    return net(tokens, None, txt, None, ts, pe=pe)


def _zimage_forward(net, xin, ts, meta, *flat):
    n_caps = meta[0]
    rope = ZImageRopeFlat.unflatten(meta[1:], flat[n_caps:])
    return net(xin, ts, list(flat[:n_caps]), rope_cache=rope)


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
    ref_tokens = torch.cat(refs, 1).expand(batch, -1, -1) if refs else None
    txt = cond.embeds.to(dev, dt)
    # [1, T+N, d/2, 2]: shared by every row, positive and negative alike, and by every generation of this layout
    layout = ((h, w), tuple(tuple(r.shape[-2:]) for r in cond.refs), txt.shape[1], str(dev))
    pe = _cached_pe(net, layout, lambda: net.make_pe(torch.cat(ids, 0)[None], text_ids(txt.shape[1])[None]).to(dev))
    if uncond is not None:
        neg = uncond.embeds.to(dev, dt)
        if neg.shape[1] != txt.shape[1]:
            raise ValueError("positive and negative klein conditionings must have the same token count (512)")
        txt = torch.cat([txt, neg], 0)  # CFG: one forward over [positive; negative] rows
    rows = txt.shape[0]
    n_noise = h * w
    forward = _forward(net, _klein_forward)

    @torch.inference_mode()
    def step(x, t):  # x [B, C, h, w] float32, t [1] float32 on the device
        tokens = pack(x)
        if ref_tokens is not None:
            tokens = torch.cat([tokens, ref_tokens], 1)
        tokens = tokens.to(dt).repeat(rows // batch, 1, 1)
        ts = t.expand(rows)  # sigma stays float32 (see klein.py)
        v = forward(net, tokens, txt, ts, pe)[:, :n_noise].float()
        if rows > batch:
            v = family.cfg_combine(v[:batch], v[batch:], guidance)
        return unpack(family.velocity(v), h, w)

    return step


PE_CACHE_SIZE = 4


def _cached_pe(net, layout, build):
    """RoPE tables for a token layout, kept on the model: klein's (image size, reference sizes, text length) and
    Z-Image's (caption lengths, latent size).

    Measured on an H200 (2026-12-02): building klein's (float64 cos / sin on the CPU, for bit-equality with
    diffusers) took 40-120 ms of host time per generation depending on the process -- the GPU idled that long before
    the first step (the "slow mode" of whole-image runs). Z-Image's (position ids and angles on the CPU) showed the
    same later: first steps of 187 ms instead of 92 in the first images of fresh processes. Both depend only on the
    layout, so each is built once per layout."""
    cache = getattr(net, "fluxcore_pe_cache", None)
    if cache is None:
        cache = net.fluxcore_pe_cache = {}
    if layout not in cache:
        if len(cache) >= PE_CACHE_SIZE:
            cache.pop(next(iter(cache)))
        cache[layout] = build()
    return cache[layout]


def _zimage_denoiser(net, family, cond, uncond, guidance, batch, h, w):
    dev, dt = compute_device(net), next(net.parameters()).dtype
    caps = [c.to(dev, dt) for c in cond.embeds]
    if uncond is not None:  # CFG: one forward over [positive; negative] captions (padded and masked per row)
        caps += [c.to(dev, dt) for c in uncond.embeds]
    rows = len(caps)
    rope = None
    forward = _forward(net, _zimage_forward)

    @torch.inference_mode()
    def step(x, t):  # x [B, C, h, w] float32, t [1] float32 on the device
        nonlocal rope
        if rope is None:  # depends only on sizes: built once per layout, kept on the model (see _cached_pe)
            lens = [c.shape[0] for c in caps]
            layout = ("zimage", tuple(lens), x.shape[-2], x.shape[-1], str(dev))
            rope = _cached_pe(net, layout, lambda: net.make_rope(lens, x.shape[-2], x.shape[-1], device=dev))
        xin = x.to(dt).repeat(rows // batch, 1, 1, 1)
        ts = t.expand(rows)
        out = forward(net, xin, ts, (len(caps),) + ZImageRopeFlat.meta(rope), *caps, *ZImageRopeFlat.tensors(rope))
        out = out.float()
        if rows > batch:
            out = family.cfg_combine(out[:batch], out[batch:], guidance)
        return family.velocity(out)  # Z-Image predicts x0 − noise: v is its negation

    return step


class ZImageRopeFlat:
    """A ZImageRope as (hashable metadata, tensors) and back, so a CUDA graph can take its tables as inputs."""

    @staticmethod
    def meta(rope) -> tuple:
        return (rope.cap_lens, rope.height, rope.width, rope.cap_padded, rope.cap_mask is None, rope.joint_mask is None)

    @staticmethod
    def tensors(rope) -> tuple:
        masks = tuple(m for m in (rope.cap_mask, rope.joint_mask) if m is not None)
        return tuple(rope.img) + tuple(rope.cap) + tuple(rope.joint) + masks

    @staticmethod
    def unflatten(meta, flat):
        from .zimage import ZImageRope

        cap_lens, height, width, cap_padded, no_cap_mask, no_joint_mask = meta
        masks = list(flat[9:])
        cap_mask = None if no_cap_mask else masks.pop(0)
        joint_mask = None if no_joint_mask else masks.pop(0)
        return ZImageRope(cap_lens, height, width, tuple(flat[0:3]), tuple(flat[3:6]), tuple(flat[6:9]),
                          cap_mask, joint_mask, cap_padded)
