"""Hand-written Triton kernels for the EAGER torch path on CUDA (compile off, the loader nodes' default).

With compile on, inductor already fuses these steps; eager torch runs each op as its own kernel over a float32 copy.
One kernel here replaces the per-head q / k RMSNorm and the RoPE rotation that follows it (klein and Z-Image):

    x [B, L, H, d] (any strides, last dim contiguous), norm weight [d], cos / sin [B' or B, L, d/2]
      -> out [B, L, H, d] contiguous, in x's dtype

Per row of d values: r = rsqrt(mean(x²) + eps) in float32, then the normed value as the eager op rounds it --
klein `F.rms_norm(x, w)`: dtype(x·r·w); Z-Image (diffusers' RMSNorm): dtype(dtype(x·r)·w) -- then the rotation of
each interleaved pair (n0, n1) -> (n0·cos - n1·sin, n0·sin + n1·cos) in float32, rounded once to the dtype. The
same arithmetic as the torch ops, up to the order of the 128-term sum and fused multiply-adds (float32 round-off;
a bf16 rounding flips rarely). H200 profile of the eager klein step (bench_variants `eager`, docs/PERF.md §P13):
rms_norm, the two rotation kernels and the cast took ~15 ms of 77 ms; this kernel takes 0.95 ms (15.8 µs a call).

Used only where it can run: a CUDA tensor in bf16 / fp16 on an Ampere or newer GPU, Triton importable, nothing asking
for gradients, not inside torch.compile (inductor fuses its own) -- everything else takes the torch ops, and so does
every later call once a launch has failed (a Triton that cannot build here: one warning, no failed generation).
FLUXCORE_TRITON=0 turns it off (`ENABLED`; `with disabled():` times both in one process).
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager

import torch

try:  # Triton ships with CUDA builds of torch on Linux; CPU, MPS and most Windows installs have none
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 -- any import failure means: use the torch ops
    triton = None

log = logging.getLogger(__name__)

ENABLED = os.environ.get("FLUXCORE_TRITON", "1") != "0"
MIN_CAPABILITY = (8, 0)   # Ampere and newer (native bf16); older GPUs keep the torch ops
ROWS_PER_PROGRAM = 16   # rows of head_dim values per program; bench_variants `eager` times other choices
NUM_WARPS = 4


@contextmanager
def disabled():
    """Inside this block the torch ops run instead of the kernels (a benchmark's comparison; not thread-safe)."""
    global ENABLED
    was, ENABLED = ENABLED, False
    try:
        yield
    finally:
        ENABLED = was


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `norm_rope` may run for this q / k tensor and norm weight (else the caller uses the torch ops)."""
    d = x.shape[-1]
    return (ENABLED and triton is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
            and weight.dtype == x.dtype and weight.shape == (d,)
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))   # no autograd here
            and not torch.compiler.is_compiling()
            and d >= 2 and (d & (d - 1)) == 0   # head_dim a power of two (tl.arange); klein, Z-Image: 128
            and _capable(x.device))


_CAPABLE: dict = {}


def _capable(device) -> bool:
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _CAPABLE:
        _CAPABLE[i] = torch.cuda.get_device_capability(i) >= MIN_CAPABILITY
    return _CAPABLE[i]


def norm_rope(x, weight, cos, sin, eps: float, round_before_weight: bool):
    """RMSNorm over the last dim, then RoPE on interleaved pairs, in one kernel. x [B, L, H, d]; weight [d];
    cos, sin [B' or B, L, d/2] (B' = 1 broadcasts). `round_before_weight`: Z-Image's norm (round, then weight);
    otherwise klein's (one rounding after the weight). Returns None if Triton cannot build or launch the kernel
    here (then the kernels are off for the process, with one warning, and the caller uses the torch ops)."""
    B, L, H, D = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.expand(B, L, D // 2), sin.expand(B, L, D // 2)
    if cos.stride(-1) != 1 or sin.stride(-1) != 1 or cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    weight = weight.contiguous()
    out = torch.empty((B, L, H, D), dtype=x.dtype, device=x.device)
    rows = B * L * H
    if rows:
        try:
            _launch((rows + ROWS_PER_PROGRAM - 1) // ROWS_PER_PROGRAM, x, weight, cos, sin, out, rows, H, L,
                    float(eps), D, round_before_weight)
        except Exception as err:  # noqa: BLE001 -- a Triton that cannot build for this GPU: torch ops from now on
            global ENABLED
            ENABLED = False
            log.warning("fluxcore: the Triton norm + RoPE kernel failed here (%s: %s); using torch's ops instead",
                        type(err).__name__, str(err).splitlines()[0] if str(err) else "")
            return None
    return out


def _launch(programs, x, weight, cos, sin, out, rows, H, L, eps, D, round_before_weight):
    with torch.cuda.device(x.device):   # Triton launches on the current device: make it x's (cuda:1 etc.)
        _norm_rope_kernel[(programs,)](x, weight, cos, sin, out, rows, H, L,
                                       x.stride(0), x.stride(1), x.stride(2), cos.stride(0), cos.stride(1),
                                       eps, D=D, ROUND_BEFORE_WEIGHT=round_before_weight,
                                       BLOCK_R=ROWS_PER_PROGRAM, num_warps=NUM_WARPS)


if triton is not None:
    @triton.jit
    def _norm_rope_kernel(X, W, COS, SIN, OUT, n_rows, H, L, sxb, sxl, sxh, scb, scl, eps,
                          D: tl.constexpr, ROUND_BEFORE_WEIGHT: tl.constexpr, BLOCK_R: tl.constexpr):
        # BLOCK_R rows of D contiguous values each: whole rows are loaded and stored (vector accesses), and the
        # pairs (x[2j], x[2j+1]) are split and joined in registers
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        live = rows < n_rows
        h = rows % H
        l_ = (rows // H) % L
        b = rows // (H * L)
        k = tl.arange(0, D)
        m = live[:, None]
        x = tl.load(X + (b * sxb + l_ * sxl + h * sxh)[:, None] + k[None, :], mask=m, other=0.0).to(tl.float32)
        r = tl.rsqrt(tl.sum(x * x, 1) / D + eps)[:, None]
        w = tl.load(W + k).to(tl.float32)[None, :]
        dt = OUT.dtype.element_ty
        if ROUND_BEFORE_WEIGHT:
            n = ((x * r).to(dt).to(tl.float32) * w).to(dt).to(tl.float32)
        else:
            n = (x * r * w).to(dt).to(tl.float32)
        n0, n1 = tl.split(tl.reshape(n, (BLOCK_R, D // 2, 2)))
        j = tl.arange(0, D // 2)
        t = (b * scb + l_ * scl)[:, None] + j[None, :]
        c = tl.load(COS + t, mask=m, other=0.0).to(tl.float32)
        s = tl.load(SIN + t, mask=m, other=0.0).to(tl.float32)
        out = tl.reshape(tl.join(n0 * c - n1 * s, n0 * s + n1 * c), (BLOCK_R, D))
        tl.store(OUT + rows[:, None] * D + k[None, :], out.to(dt), mask=m)
