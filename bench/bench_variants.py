"""Variants of the shipped fast path, measured before any of them ships (issue 12's next steps), one GPU call.

    python bench/bench_variants.py --out DIR [--sections profile,emulate,autotune,outliers]   (H200, no diffusers)
    python bench/bench_variants.py --tiny --out DIR                                            (CPU smoke test)

Each section runs in a FRESH process (inductor options are read at compile time) and writes DIR/<section>.json after
every measurement, so a timeout keeps what was measured:
  zprofile  the same for the Z-Image-Turbo step; fp8profile for the klein step with fp8 block weights.
  profile   klein-4B step at 1024² as shipped (regional compile, attention outside, CUDA-graph replay): time, fast vs
            plain, and where the GPU time goes (kernel time by kind from torch.profiler over compiled, ungraphed steps).
  emulate   the same with inductor's `emulate_precision_casts` (the compiled code rounds to bf16 where eager rounds):
            does fast vs plain fall under 1e-2, and what does it cost? klein and Z-Image.
  autotune  the klein blocks compiled with mode="max-autotune-no-cudagraphs" (Triton GEMM templates with epilogue /
            prologue fusion): bf16 and int8 weight-only (dequantization fused into the GEMM's prologue, if inductor
            does it).
  eager     where the EAGER klein and Z-Image steps (compile off: the nodes' default) spend GPU time, kernel time by
            kind and the top kernels; and SDPA on klein's shapes with q / k / v token-major views (ours) against
            head-major contiguous tensors (ComfyUI's layout).
  outliers  fp8 (W8A8 through torch._scaled_mm) and int8 step error against bf16 eager on weights with heavy channels
            (0.5 % of input columns and output rows scaled up, as trained weights have), eager, full size.
Method as bench/bench_summary.py: bf16 weights N(0, 0.02), 1-D norm scales N(1, 0.02); CUDA events; median of --reps.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SECTIONS = ("profile", "emulate", "outliers", "autotune")  # default set; zprofile on request
LIMITS = {"eager": 120, "profile": 120, "zprofile": 150, "fp8profile": 120, "emulate": 150, "autotune": 300, "outliers": 120}

P = argparse.ArgumentParser()
P.add_argument("--sections", default=",".join(SECTIONS))
P.add_argument("--section", help="(internal) run one section in this process")
P.add_argument("--reps", type=int, default=10)
P.add_argument("--budget", type=float, default=560.0)
P.add_argument("--heavy", type=float, default=8.0, help="outliers: scale of the heavy channels")
P.add_argument("--tiny", action="store_true")
P.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
A = P.parse_args()
T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def driver():
    os.makedirs(A.out, exist_ok=True)
    for sec in [s for s in A.sections.split(",") if s]:
        left = A.budget - (time.time() - T0)
        if left < 20:
            log(f"{sec}: skipped, {left:.0f} s left")
            continue
        env = dict(os.environ, TORCHINDUCTOR_EMULATE_PRECISION_CASTS="1" if sec == "emulate" else "0")
        cmd = [sys.executable, __file__, "--section", sec, "--out", A.out, "--reps", str(A.reps),
               "--heavy", str(A.heavy)] + (["--tiny"] if A.tiny else [])
        log(f"{sec}: start")
        try:
            subprocess.run(cmd, timeout=min(LIMITS[sec], left), env=env, check=False)
        except subprocess.TimeoutExpired:
            log(f"{sec}: TIMEOUT (kept what it wrote)")


# ============================================================================================== in a section

REC: dict = {}


def put(key, value):
    REC[key] = value
    log(key, "=", value)
    REC["wall_s"] = round(time.time() - T0, 1)
    (Path(A.out) / f"{A.section}.json").write_text(json.dumps(REC, indent=1))


def setup():
    global torch, DEV, DT, GPU
    import torch

    GPU = torch.cuda.is_available() and not A.tiny
    DEV = torch.device("cuda" if GPU else "cpu")
    DT = torch.bfloat16 if GPU else torch.float32
    if GPU:
        import torch._dynamo as dynamo

        dynamo.config.automatic_dynamic_shapes = False
        dynamo.config.cache_size_limit = 64
    put("env", {"device": torch.cuda.get_device_name(0) if GPU else "cpu", "torch": torch.__version__,
                "utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                "emulate_precision_casts": os.environ.get("TORCHINDUCTOR_EMULATE_PRECISION_CASTS")})


def sync():
    if GPU:
        torch.cuda.synchronize()


def timeit(fn, warmup=3):
    from timing import median_ms

    return median_ms(fn, A.reps, GPU, warmup)


def rel(a, b):
    return {"rel_l2": float((a.float() - b.float()).norm() / b.float().norm()), "finite": bool(torch.isfinite(a).all())}


def random_sd(model, seed=1, heavy=0.0):
    """N(0, 0.02) matrices, N(1, 0.02) 1-D norm scales; with heavy > 0, 0.5 % of the input columns of every block
    matrix are scaled by `heavy` and 0.5 % of its output rows by heavy / 2 (heavy channels, as trained weights have)."""
    g = torch.Generator(DEV).manual_seed(seed)
    sd = {}
    for k, p in model.state_dict().items():
        if p.dim() == 1:
            sd[k] = (1 + 0.02 * torch.randn(p.shape, generator=g, device=DEV)).to(DT)
            continue
        w = 0.02 * torch.randn(p.shape, generator=g, device=DEV)
        if heavy and "blocks" in k and w.dim() == 2:
            cols = torch.randperm(w.shape[1], generator=g, device=DEV)[:max(1, w.shape[1] // 200)]
            rows = torch.randperm(w.shape[0], generator=g, device=DEV)[:max(1, w.shape[0] // 200)]
            w[:, cols] *= heavy
            w[rows] *= heavy / 2
        sd[k] = w.to(DT)
    return sd


def klein(heavy=0.0):
    from flux_core.configs import KleinConfig
    from flux_core.torch.klein import Flux2Transformer, position_ids, text_ids

    cfg = (KleinConfig(hidden_size=64, num_heads=4, head_dim=16, depth=1, depth_single=2, context_in_dim=96,
                       in_channels=16, out_channels=16, axes_dim=(4, 4, 4, 4)) if A.tiny else KleinConfig())
    with torch.device("meta"):
        m = Flux2Transformer(cfg)
    m.load_state_dict(random_sd(m, heavy=heavy), assign=True)
    m = m.eval().requires_grad_(False)
    n = 4 if A.tiny else 64
    ids, tids = position_ids(n, n).to(DEV), text_ids(512).to(DEV)
    g = torch.Generator(DEV).manual_seed(2)
    x = torch.randn(1, n * n, cfg.in_channels, generator=g, device=DEV).to(DT)
    txt = torch.randn(1, 512, cfg.context_in_dim, generator=g, device=DEV).to(DT)
    sig = torch.tensor([0.9], device=DEV)
    pe = m.make_pe(ids[None], tids[None])
    step = lambda x_, s_: m(x_, ids[None], txt, tids[None], s_, pe=pe)
    return m, step, x, sig


def zimage():
    from flux_core.configs import ZImageConfig
    from flux_core.torch.zimage import ZImageTransformer

    cfg = (ZImageConfig(dim=64, n_layers=2, n_refiner_layers=1, n_heads=2, cap_feat_dim=32, ffn_hidden=170, adaln_dim=64,
                        axes_dims=(8, 12, 12)) if A.tiny else ZImageConfig())
    with torch.device("meta"):
        m = ZImageTransformer(cfg)
    m.load_state_dict(random_sd(m), assign=True)
    m = m.eval().requires_grad_(False)
    s = 64 if A.tiny else 1024
    g = torch.Generator(DEV).manual_seed(2)
    x = torch.randn(1, 16, s // 8, s // 8, generator=g, device=DEV).to(DT)
    cap = torch.randn(512, cfg.cap_feat_dim, generator=g, device=DEV).to(DT)
    rope = m.make_rope([512], x.shape[-2], x.shape[-1], device=DEV)
    step = lambda x_, t_: m(x_, t_, [cap], rope_cache=rope)[0]
    return m, step, x, torch.tensor([0.1], device=DEV)


def fast_path(m, step, x, t, label, mode=None):
    """compile_blocks (optionally another inductor mode) + CUDA-graph replay, timed beside the plain eager step."""
    from flux_core.torch.graphs import CudaGraphCache
    from flux_core.torch.loaders import compile_blocks

    with torch.inference_mode():
        plain = step(x, t)
        put(f"{label}_eager_ms", timeit(lambda: step(x, t)))
        if not GPU:
            return plain
        if mode:
            for b in __import__("flux_core.torch.common", fromlist=["blocks"]).blocks(m):
                b.compile(mode=mode)
            m.fluxcore_cuda_graphs = True
        else:
            compile_blocks(m)
        sync()
        t0 = time.time()
        step(x, t)
        sync()
        put(f"{label}_compile_s", round(time.time() - t0, 1))
        put(f"{label}_compiled_ms", timeit(lambda: step(x, t)))
        cache = CudaGraphCache(step, name=label, max_entries=1)
        put(f"{label}_fast_ms", timeit(lambda: cache(x, t)))
        put(f"{label}_fast_vs_plain", rel(cache(x, t), plain))
        return plain


# ---------------------------------------------------------------------------------------------- sections

KINDS = (("attention", ("fmha", "flash", "attention", "sdpa")), ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "sm90_",
         "matmul", "cudnn")), ("triton", ("triton",)), ("copy", ("copy", "memcpy", "memset", "cat", "elementwise")))


def kind_of(name):
    low = name.lower()
    return next((k for k, pats in KINDS if any(p in low for p in pats)), "other")


def section_profile():
    m, step, x, sig = klein()
    fast_path(m, step, x, sig, "klein")
    profile_step(step, x, sig, "klein")


def section_fp8profile():
    """The fp8 step's kernels: are the activations' amax / scale / cast fused into the preceding kernels?"""
    from flux_core.torch import quant

    m, step, x, sig = klein()
    quant.quantize_model(m, "fp8")
    fast_path(m, step, x, sig, "klein_fp8")
    profile_step(step, x, sig, "klein_fp8")


def section_zprofile():
    m, step, x, t = zimage()
    fast_path(m, step, x, t, "zimage")
    profile_step(step, x, t, "zimage")


def section_eager():
    import torch.nn.functional as F

    for build, label in ((klein, "klein"), (zimage, "zimage")):
        m, step, x, t = build()
        with torch.inference_mode():
            put(f"{label}_eager_ms", timeit(lambda: step(x, t)))
        profile_step(step, x, t, label, "eager")
        del m
        if GPU:
            torch.cuda.empty_cache()
    if not GPU:
        return
    g = torch.Generator(DEV).manual_seed(3)
    tok = [torch.randn(1, 4608, 24, 128, generator=g, device=DEV).to(DT) for _ in range(3)]
    head = [a.transpose(1, 2).contiguous() for a in tok]
    with torch.inference_mode():
        views = [a.transpose(1, 2) for a in tok]
        put("sdpa_klein_token_major_views_ms", timeit(lambda: F.scaled_dot_product_attention(*views)))
        put("sdpa_klein_head_major_ms", timeit(lambda: F.scaled_dot_product_attention(*head)))
        put("sdpa_layouts_equal", bool(torch.equal(F.scaled_dot_product_attention(*views),
                                                   F.scaled_dot_product_attention(*head))))


def profile_step(step, x, t, label, how="compiled, ungraphed"):
    """Kernel time per step by kind (torch.profiler over 3 steps as they are: compiled or not) and the top kernels."""
    if not GPU:
        return
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step(x, t)
            sync()
    per_kind, top = {}, []
    for ev in prof.key_averages():
        dev_us = ev.self_device_time_total
        if dev_us <= 0 or ev.device_type != DeviceType.CUDA:  # kernels only: aten ops and Triton launchers (CPU
            continue                                          # events) re-list their kernels' device time
        k = kind_of(ev.key)
        per_kind[k] = per_kind.get(k, 0) + dev_us / 3e3
        top.append((round(dev_us / 3e3, 3), ev.count // 3, k, ev.key[:90]))
    put(f"{label}_ms_per_step_by_kind ({how})", {k: round(v, 2) for k, v in sorted(per_kind.items())})
    put(f"{label}_top_kernels [ms/step, calls/step, kind, name]", sorted(top, reverse=True)[:40])


def section_emulate():
    m, step, x, sig = klein()
    fast_path(m, step, x, sig, "klein")
    del m
    if GPU:
        torch.cuda.empty_cache()
    m, step, x, t = zimage()
    fast_path(m, step, x, t, "zimage")


def section_autotune():
    mode = "max-autotune-no-cudagraphs"
    m, step, x, sig = klein()
    fast_path(m, step, x, sig, "klein_bf16", mode=mode)
    del m
    if GPU:
        torch.cuda.empty_cache()
    from flux_core.torch import quant

    m, step, x, sig = klein()
    quant.quantize_model(m, "int8")
    fast_path(m, step, x, sig, "klein_int8", mode=mode)


def section_outliers():
    from flux_core.torch import quant

    for heavy in (0.0, A.heavy):
        outs = {}
        for mode in ("none", "int8", "fp8"):
            m, step, x, sig = klein(heavy)
            if mode != "none":
                quant.quantize_model(m, mode)
            with torch.inference_mode():
                outs[mode] = step(x, sig)
            del m
            if GPU:
                torch.cuda.empty_cache()
        e = {mode: rel(outs[mode], outs["none"]) for mode in ("int8", "fp8")}
        put(f"klein_step_error_vs_bf16_heavy{heavy:g}", e)
        put(f"klein_fp8_over_int8_heavy{heavy:g}", round(e["fp8"]["rel_l2"] / e["int8"]["rel_l2"], 3))


if __name__ == "__main__":
    if A.section:
        setup()
        globals()[f"section_{A.section}"]()
    else:
        driver()
