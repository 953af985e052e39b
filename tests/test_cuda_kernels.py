"""The Triton q / k RMSNorm + RoPE kernel of the eager CUDA path (flux_core/torch/kernels.py) against the torch ops it
replaces and against float64. The GPU tests skip without CUDA + Triton (CI has neither); bench/run_summary.sh runs
this file first in every device call ($OUT/gpu_tests.txt; docs/PERF.md §P13). On the CPU the torch ops must run."""
from __future__ import annotations

import pytest
import torch

from flux_core.torch import kernels, klein as K, zimage as Z

GPU = torch.cuda.is_available() and kernels.triton is not None
gpu = pytest.mark.skipif(not GPU, reason="needs CUDA and Triton")


def test_cpu_tensors_take_the_torch_ops():
    x, w = torch.randn(1, 3, 2, 8, dtype=torch.bfloat16), torch.ones(8, dtype=torch.bfloat16)
    assert not kernels.usable(x, w)
    assert not kernels.usable(x.float(), w.float())
    was = kernels.ENABLED
    with kernels.disabled():
        assert not kernels.ENABLED
    assert kernels.ENABLED == was


def test_a_kernel_that_cannot_run_turns_itself_off(monkeypatch, caplog):
    """A Triton that cannot build or launch for this GPU must cost one warning, not a failed generation: norm_rope
    returns None (the caller then runs the torch ops) and the kernels stay off for the process."""
    def broken(*a, **k):
        raise RuntimeError("PTX .version 8.7 does not support .target sm_61")

    monkeypatch.setattr(kernels, "_launch", broken)
    monkeypatch.setattr(kernels, "ENABLED", True)
    x, w = torch.randn(1, 5, 2, 8), torch.ones(8)
    cs = torch.ones(1, 5, 4)
    with caplog.at_level("WARNING", logger="flux_core.torch.kernels"):
        assert kernels.norm_rope(x, w, cs, cs, 1e-6, round_before_weight=False) is None
    assert not kernels.ENABLED and "torch's ops instead" in caplog.text


def _qkv_view(B, L, H, D, dtype, g):
    """q as the models see it: a strided view of the fused qkv projection output."""
    qkv = torch.randn(B, L, 3 * H * D, generator=g, device="cuda").to(dtype) * 3
    return qkv.unflatten(-1, (3, H, D)).unbind(2)[0]


def _angles(Bp, L, D, g):
    return torch.rand(Bp, L, D // 2, generator=g, device="cuda", dtype=torch.float64) * 40


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _reference(x, w, cos, sin, eps, round_before_weight):
    """float64 truth of the normed, rotated x (no intermediate rounding)."""
    xd = x.double()
    n = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps) * w.double()
    n0, n1 = n.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos.double()[:, :, None], sin.double()[:, :, None]
    return torch.stack([n0 * c - n1 * s, n0 * s + n1 * c], -1).flatten(-2)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,Bp", [(1, 1), (2, 1), (2, 2)])
@pytest.mark.parametrize("L", [1, 37, 4608])
def test_klein_kernel_equals_the_torch_ops(dtype, B, Bp, L):
    g = torch.Generator("cuda").manual_seed(L + B)
    H, D = 3, 128
    x = _qkv_view(B, L, H, D, dtype, g)
    norm = K.RMSNorm(D, 1e-6).to("cuda", dtype)
    norm.scale.data = (1 + 0.1 * torch.randn(D, generator=g, device="cuda")).to(dtype)
    ang = _angles(Bp, L, D, g)
    pe = K.rope_pairs(torch.stack([ang.cos(), ang.sin()], -1).float())
    with torch.inference_mode():
        assert kernels.usable(x, norm.scale)
        got = kernels.norm_rope(x, norm.scale, pe[..., 0, 0], pe[..., 0, 1], norm.eps, round_before_weight=False)
        want = K.apply_rope(norm(x), pe)
    assert got.shape == want.shape == (B, L, H, D) and got.dtype == dtype and got.is_contiguous()
    assert torch.isfinite(got).all()
    truth = _reference(x, norm.scale, pe[..., 0, 0], pe[..., 0, 1], norm.eps, False)
    # same function: as close to float64 as the torch ops, and close to them (a rare flipped rounding)
    assert _rel(got, truth) <= 1.05 * _rel(want, truth) + 1e-4
    assert _rel(got, want) < 5e-3
    assert (got != want).float().mean() < 0.02


@gpu
@pytest.mark.parametrize("B", [1, 2])
@pytest.mark.parametrize("L", [5, 4608])
def test_zimage_kernel_equals_the_torch_ops(B, L):
    g = torch.Generator("cuda").manual_seed(7 * L + B)
    H, D, dtype = 4, 128, torch.bfloat16
    x = _qkv_view(B, L, H, D, dtype, g)
    norm = Z.RMSNorm(D, 1e-5).to("cuda", dtype)
    norm.weight.data = (1 + 0.1 * torch.randn(D, generator=g, device="cuda")).to(dtype)
    ang = _angles(B, L, D, g)[:, :, None]
    cos, sin = ang.cos().float(), ang.sin().float()
    rope = (cos, sin, torch.complex(cos, sin))
    with torch.inference_mode():
        got = kernels.norm_rope(x, norm.weight, cos[:, :, 0], sin[:, :, 0], norm.eps, round_before_weight=True)
        want = Z.apply_rope(norm(x), rope)
    truth = _reference(x, norm.weight, cos[:, :, 0], sin[:, :, 0], norm.eps, True)
    assert torch.isfinite(got).all()
    assert _rel(got, truth) <= 1.05 * _rel(want, truth) + 1e-4
    assert _rel(got, want) < 5e-3
    assert (got != want).float().mean() < 0.02


def _tiny(build):
    from flux_core.configs import KleinConfig, ZImageConfig

    torch.manual_seed(0)
    if build == "klein":
        m = K.Flux2Transformer(KleinConfig(hidden_size=256, num_heads=2, head_dim=128, depth=1, depth_single=2,
                                           context_in_dim=64, in_channels=16, out_channels=16,
                                           axes_dim=(32, 32, 32, 32)))
    else:
        m = Z.ZImageTransformer(ZImageConfig(dim=256, n_layers=2, n_refiner_layers=1, n_heads=2, cap_feat_dim=64,
                                             ffn_hidden=512, adaln_dim=64, axes_dims=(32, 48, 48)))
    for p in m.parameters():
        p.data = (1 + 0.02 * torch.randn_like(p)) if p.dim() == 1 else 0.05 * torch.randn_like(p)
    return m.to("cuda", torch.bfloat16).eval().requires_grad_(False)


def _step(build, m):
    g = torch.Generator("cuda").manual_seed(1)
    if build == "klein":
        ids, tids = K.position_ids(8, 8).cuda(), K.text_ids(20).cuda()
        x = torch.randn(1, 64, 16, generator=g, device="cuda")
        txt = torch.randn(1, 20, 64, generator=g, device="cuda")
        return lambda: m(x, ids[None], txt, tids[None], torch.tensor([0.7], device="cuda"))
    x = torch.randn(1, 16, 16, 16, generator=g, device="cuda").bfloat16()
    cap = torch.randn(20, 64, generator=g, device="cuda").bfloat16()
    return lambda: m(x, torch.tensor([0.3], device="cuda"), [cap])[0]


@gpu
@pytest.mark.parametrize("build", ["klein", "zimage"])
def test_whole_model_with_and_without_the_kernel(build, monkeypatch):
    """The eager forward takes the kernel on CUDA, and gives what the torch ops give, to bf16 round-off."""
    m = _tiny(build)
    step = _step(build, m)
    calls = []
    real = kernels.norm_rope
    monkeypatch.setattr(kernels, "norm_rope", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.inference_mode():
        fast = step()
        assert calls, "the eager CUDA forward did not use the kernel"
        n = len(calls)
        with kernels.disabled():
            plain = step()
        assert len(calls) == n
    assert torch.isfinite(fast).all()
    assert _rel(fast, plain) < 2e-2
