"""MLX on CUDA vs our torch path: one klein-4B and one Z-Image-Turbo DiT step at 1024², same weights, one process.

    python bench/bench_mlx_cuda.py --out DIR              (GPU; mlx + mlx-cuda-13 0.32.4 importable: run_mlx_cuda.sh)
    python bench/bench_mlx_cuda.py --tiny --out DIR       (CPU smoke test with mlx[cpu]: toy configs, float32, no
                                                           torch compile; MLX vs torch must agree to <= 1e-4)
    python bench/bench_mlx_cuda.py --only zimage --reps 20 --out DIR

Writes DIR/mlx_cuda.json after every measurement (a timeout keeps what was measured):
  mlx_cuda_step_1024_ms  klein_mlx / zimage_mlx: the MLX step as our sampler runs it (flux_core/mlx/runtime.py
                         `make_denoiser`: ONE mx.compile'd step, constants evaluated before the trace, one mx.eval);
                         klein_torch / zimage_torch: the torch step as shipped with compile=True (regional
                         torch.compile via loaders.compile_blocks, the step replayed from a CUDA graph by
                         torch/runtime.py's CudaGraphCache).
  variants               eager steps of both (MLX: the same denoiser with mx.disable_compile()), first-call /
                         compile times, torch compiled without the graph, peak memory, versions, the MLX device;
                         what MLX loses, op by op: mx.fast.scaled_dot_product_attention vs torch SDPA at the step's
                         shapes, and the RoPE rotation alone (eager and mx.compile'd), with the calls per step.
  checks                 relative L2 of the outputs (MLX vs torch on the same inputs: the same function; each fast
                         path vs its own eager path as the yardstick of bf16 noise) and whether they are finite.

Method: the weights are drawn ONCE in our native layout (N(0, 0.02), 1-D norm scales N(1, 0.02), as bench_summary's
`random_like`; drawn on the torch device, never zeros) and loaded into both backends through our loaders
(flux_core/{torch,mlx}/loaders.py), bf16. Both sides go through their runtime's `make_denoiser`, i.e. they compute
(latent [1, C, h, w] float32, model time) -> velocity float32 with the same packing and casts. MLX is timed as wall
time around mx.eval + mx.synchronize (lazy evaluation inside the timing); torch with CUDA events (wall time recorded
beside it). Warm-up calls first, then the median of --reps. Each model pair is freed before the next one.
The bench never imports diffusers.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

P = argparse.ArgumentParser()
P.add_argument("--tiny", action="store_true", help="toy configs on the CPU (smoke test): float32, no torch compile")
P.add_argument("--only", choices=("klein", "zimage"), help="one family only")
P.add_argument("--reps", type=int, default=None, help="timed calls per measurement (default 10; tiny 3)")
P.add_argument("--no-micro", action="store_true", help="skip the attention / RoPE op timings")
P.add_argument("--out", default=os.environ.get("OUT", "bench_out"), help="folder for mlx_cuda.json")
A = P.parse_args()
T0 = time.time()

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

TDEV = torch.device("cuda" if torch.cuda.is_available() and not A.tiny else "cpu")
TDT = torch.bfloat16 if TDEV.type == "cuda" else torch.float32
DTYPE = "bfloat16" if TDT == torch.bfloat16 else "float32"  # the same load dtype for both backends
MLX_DEV = "gpu" if mx.default_device().type == mx.DeviceType.gpu else "cpu"
COMPILE = TDEV.type == "cuda"  # the CPU smoke test skips torch.compile (minutes of C++ builds for nothing)
REPS = A.reps or (3 if A.tiny else 10)
INNER = 10  # op timings: calls per timed evaluation, so launch / eval overhead does not dominate a 1 ms kernel
OUT = Path(A.out) / "mlx_cuda.json"
REC = {"mlx_cuda_step_1024_ms": {"klein_mlx": None, "klein_torch": None, "zimage_mlx": None, "zimage_torch": None},
       "variants": {}, "checks": [], "notes": []}

if COMPILE:
    import torch._dynamo as dynamo

    dynamo.config.automatic_dynamic_shapes = False  # one static graph per shape, as bench_summary.py
    dynamo.config.cache_size_limit = 64


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def save():
    REC["wall_s"] = round(time.time() - T0, 1)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(REC, indent=1))


def put(key, value):
    REC["mlx_cuda_step_1024_ms"][key] = value
    log(key, "=", value)
    save()


def variant(key, value):
    REC["variants"][key] = value
    log("variant", key, "=", value)
    save()


def note(text):
    REC["notes"].append(text)
    log("NOTE", text)
    save()


def check(what, a, b):
    """Relative L2 difference of two float32 numpy outputs, and whether `a` is finite (NaN / inf would hide here)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    rel = float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
    finite = bool(np.isfinite(a).all())
    REC["checks"].append({"what": what, "rel_l2": rel, "finite": finite})
    log(f"CHECK {what}: rel {rel:.3e} finite {finite}")
    save()
    return rel


def guarded(label, fn):
    """Run one section; a failure is recorded in the notes and the next section still runs (a partial JSON beats
    none: the torch numbers stay useful when MLX breaks, and the other way round)."""
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 -- a measurement, never a crash of the whole call
        traceback.print_exc()
        note(f"{label} stopped: {type(err).__name__}: {str(err)[:400]}")
        return None


def env() -> dict:
    info = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "mlx_version": mx.__version__,
            "mlx_device": str(mx.default_device()), "torch_device": str(TDEV), "dtype": DTYPE, "reps": REPS,
            "gpu": torch.cuda.get_device_name(0) if TDEV.type == "cuda" else "cpu"}
    try:
        info["mlx_device_info"] = {k: (v if isinstance(v, (int, float, str)) else str(v))
                                   for k, v in mx.device_info().items()}
    except Exception as err:  # noqa: BLE001 -- informative only
        info["mlx_device_info"] = repr(err)[:200]
    cuda = getattr(mx, "cuda", None)
    info["mlx_cuda_available"] = bool(cuda.is_available()) if cuda is not None else False
    return info


# ============================================================================================== configs and inputs

def klein_cfg():
    from flux_core.configs import KleinConfig

    if A.tiny:
        return KleinConfig(in_channels=16, out_channels=16, hidden_size=64, num_heads=4, head_dim=16, depth=2,
                           depth_single=2, context_in_dim=96, axes_dim=(4, 4, 4, 4))
    return KleinConfig()  # klein-4B


def zimage_cfg():
    from flux_core.configs import ZImageConfig

    if A.tiny:
        return ZImageConfig(dim=64, n_layers=2, n_refiner_layers=1, n_heads=2, cap_feat_dim=32, ffn_hidden=170,
                            adaln_dim=64, axes_dims=(8, 12, 12))
    return ZImageConfig()  # Z-Image-Turbo


def geometry(name: str) -> dict:
    """Latent grid and text length of the measured step: 1024² = klein 64x64 packed tokens (+ 512 text tokens),
    Z-Image 128x128 latent = 64x64 patches (+ a 512-token caption). Tiny: 64 image tokens, 32 / 20 text tokens
    (20 exercises Z-Image's caption padding)."""
    if name == "klein":
        return {"h": 8, "w": 8, "text": 32} if A.tiny else {"h": 64, "w": 64, "text": 512}
    return {"h": 16, "w": 16, "text": 20} if A.tiny else {"h": 128, "w": 128, "text": 512}


def random_native(name: str, cfg, seed: int) -> dict:
    """bench_summary's `random_like` for our own layout: every tensor N(0, 0.02), the 1-D scales of norm modules
    N(1, 0.02) (found by module type, not key name: Z-Image's caption RMSNorm is `cap_embedder.0.weight`). Drawn on
    the torch device in the load dtype, so the torch loader assigns these very tensors (no second copy)."""
    from flux_core.torch.klein import Flux2Transformer
    from flux_core.torch.zimage import ZImageTransformer

    with torch.device("meta"):
        net = (Flux2Transformer if name == "klein" else ZImageTransformer)(cfg)
    norms = {f"{m}.{p}".lstrip(".") for m, mod in net.named_modules() if "Norm" in type(mod).__name__
             for p, _ in mod.named_parameters(recurse=False)}
    g = torch.Generator(TDEV).manual_seed(seed)
    sd = {}
    with torch.no_grad():
        for k, p in net.state_dict().items():
            t = torch.randn(p.shape, generator=g, device=TDEV, dtype=torch.float32).mul_(0.02)
            if p.dim() == 1 and k in norms:
                t.add_(1.0)
            sd[k] = t.to(TDT)
    return sd


def inputs(name: str, cfg, geo: dict):
    """(Conditioning with CPU float32 text features, latent noise numpy float32 [1, C, h, w], model time). Each
    backend's runtime casts the features to its model dtype itself, as in a real generation."""
    from flux_core.families import FAMILIES
    from flux_core.pipeline import Conditioning

    g = torch.Generator("cpu").manual_seed(1)
    if name == "klein":
        embeds = torch.randn(1, geo["text"], cfg.context_in_dim, generator=g)
        c, t = cfg.in_channels, 0.9  # t = σ
    else:
        embeds = [torch.randn(geo["text"], cfg.cap_feat_dim, generator=g)]
        c, t = cfg.in_channels, 0.1  # t = 1 − σ
    x = torch.randn(1, c, geo["h"], geo["w"], generator=g).numpy()
    return Conditioning(FAMILIES[name].text_mode, embeds, ["bench"]), x, t


def load_pair(name: str, cfg, sd: dict):
    """The same state dict through both backends' loaders, wrapped as the sampler sees them (LoadedModel)."""
    from flux_core.families import FAMILIES
    from flux_core.models import LoadedModel
    from flux_core.mlx import loaders as mlx_loaders
    from flux_core.torch import loaders as torch_loaders
    from flux_core.weights.io import Checkpoint

    family = FAMILIES[name]
    var = family.variant(True, cfg)
    t = time.time()
    tmod = torch_loaders.load_transformer(family, Checkpoint(dict(sd), source="bench random"), DTYPE, str(TDEV))
    variant(f"{name}_torch_load_s", round(time.time() - t, 1))
    t = time.time()
    # consume=True inside: it empties this Checkpoint's dict copy only; the torch model keeps the tensors
    mmod = mlx_loaders.load_transformer(family, Checkpoint(dict(sd), source="bench random"), DTYPE, MLX_DEV)
    variant(f"{name}_mlx_load_s", round(time.time() - t, 1))
    return (LoadedModel("transformer", tmod, "bench", "torch", str(TDEV), DTYPE, variant=var),
            LoadedModel("transformer", mmod, "bench", "mlx", MLX_DEV, DTYPE, variant=var))


# ============================================================================================== timers

def time_mlx(fn, reps=None, warmup=2) -> float:
    """Median wall ms of fn() + mx.eval + mx.synchronize: the lazy graph is built AND run inside the timing."""
    for _ in range(warmup):
        mx.eval(fn())
    mx.synchronize()
    times = []
    for _ in range(reps or REPS):
        t = time.perf_counter()
        mx.eval(fn())
        mx.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return round(statistics.median(times), 3)


def sync():
    if TDEV.type == "cuda":
        torch.cuda.synchronize()


def time_torch(fn, reps=None, warmup=2) -> tuple[float, float]:
    """(median CUDA-event ms, median wall ms) of fn(); on the CPU both are wall time (bench/timing.py)."""
    from timing import samples_ms

    device, wall = samples_ms(fn, reps or REPS, TDEV.type == "cuda", warmup)
    return round(statistics.median(device), 3), round(statistics.median(wall), 3)


def timed_first_torch(fn):
    sync()
    t = time.time()
    out = fn()
    sync()
    return out, round(time.time() - t, 1)


# ============================================================================================== the step, both backends

def mlx_step(name: str, model, cond, x_np, t, geo, outs: dict):
    """The sampler's MLX step: runtime.make_denoiser (constants evaluated, ONE mx.compile'd function) + step_done
    (the one mx.eval). Eager = the same denoiser with compilation switched off globally (mx.disable_compile is read
    at call time, so the traced function and the eager one are the same Python code)."""
    from flux_core.mlx import runtime

    mx.reset_peak_memory()
    den = runtime.make_denoiser(model, cond, None, 1.0, 1, geo["h"], geo["w"])
    x = runtime.to_backend(x_np)
    step = lambda: runtime.step_done(den(x, t))  # noqa: E731
    mx.disable_compile()
    try:
        outs["mlx_eager"] = runtime.to_numpy(step())
        variant(f"{name}_mlx_eager_ms", time_mlx(step))
    finally:
        mx.enable_compile()
    w = time.perf_counter()
    outs["mlx"] = runtime.to_numpy(step())  # the trace, the compile and (CUDA) the JIT of the fused kernels
    variant(f"{name}_mlx_first_compiled_call_s", round(time.perf_counter() - w, 2))
    put(f"{name}_mlx", time_mlx(step))
    variant(f"{name}_mlx_peak_gb", round(mx.get_peak_memory() / 1e9, 2))
    check(f"{name} mlx compiled vs mlx eager (yardstick)", outs["mlx"], outs["mlx_eager"])


def torch_step(name: str, model, cond, x_np, t, geo, outs: dict):
    """The sampler's torch step: runtime.make_denoiser, eager; then compile_blocks (what compile=True ships) and a
    new denoiser, whose forward the runtime replays from a CudaGraphCache (first call plain = compile, second call
    captures, then replays)."""
    from flux_core.torch import loaders, runtime

    if TDEV.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    x = torch.from_numpy(x_np).to(TDEV)
    den = runtime.make_denoiser(model, cond, None, 1.0, 1, geo["h"], geo["w"])
    outs["torch_eager"] = runtime.to_numpy(den(x, t))
    ev, wall = time_torch(lambda: den(x, t))
    variant(f"{name}_torch_eager_ms", ev)
    variant(f"{name}_torch_eager_wall_ms", wall)
    if not COMPILE:
        note(f"{name}: CPU smoke test, torch compile skipped: {name}_torch is the eager step")
        outs["torch"] = outs["torch_eager"]
        put(f"{name}_torch", ev)
        return
    variant(f"{name}_torch_compile_blocks", loaders.compile_blocks(model.module))
    den = runtime.make_denoiser(model, cond, None, 1.0, 1, geo["h"], geo["w"])
    step = lambda: den(x, t)  # noqa: E731
    _, s = timed_first_torch(step)
    variant(f"{name}_torch_compile_s", s)
    _, s = timed_first_torch(step)
    variant(f"{name}_torch_graph_capture_s", s)
    ev, wall = time_torch(step)
    put(f"{name}_torch", ev)
    variant(f"{name}_torch_compiled_graph_wall_ms", wall)
    caches = list(getattr(model.module, "fluxcore_graph_caches", {}).values())
    variant(f"{name}_torch_graph", {"replays": sum(c.replays for c in caches), "failed": any(c.failed for c in caches)})
    outs["torch"] = runtime.to_numpy(step())
    os.environ["FLUXCORE_CUDA_GRAPHS"] = "0"  # graphs.enabled() is read per call: the compiled step without replay
    try:
        variant(f"{name}_torch_compiled_nograph_ms", time_torch(step)[0])
    finally:
        os.environ["FLUXCORE_CUDA_GRAPHS"] = "1"
    variant(f"{name}_torch_peak_gb", round(torch.cuda.max_memory_allocated() / 1e9, 2))
    check(f"{name} torch compiled + graph vs torch eager (yardstick)", outs["torch"], outs["torch_eager"])


# ============================================================================================== ops alone

def attention_calls(name: str, cfg, geo) -> list:
    """(sequence length, calls per step) of the step's attentions; each call also rotates q and k (2 RoPEs)."""
    if name == "klein":
        return [(geo["text"] + geo["h"] * geo["w"], cfg.depth + cfg.depth_single)]
    from flux_core.configs import ceil_seq

    img = ceil_seq((geo["h"] // cfg.patch_size) * (geo["w"] // cfg.patch_size))
    cap = ceil_seq(geo["text"])
    return [(img + cap, cfg.n_layers), (img, cfg.n_refiner_layers), (cap, cfg.n_refiner_layers)]


def micro_attention(name: str, heads: int, d: int, L: int):
    """mx.fast.scaled_dot_product_attention vs F.scaled_dot_product_attention on the same [1, H, L, d] arrays, plus
    our MLX wrapper (common.attention: [B, L, H, d] in, transposes around the kernel) -- the layout the model uses."""
    import torch.nn.functional as F

    from flux_core.mlx.common import attention, to_mx, to_numpy

    g = torch.Generator("cpu").manual_seed(5)
    q, k, v = (torch.randn(1, heads, L, d, generator=g).to(TDT) for _ in range(3))
    mq, mk, mv = (to_mx(a, DTYPE) for a in (q, k, v))
    tq, tk, tv = (a.to(TDEV) for a in (q, k, v))
    scale = 1.0 / d ** 0.5
    sdpa = lambda: mx.fast.scaled_dot_product_attention(mq, mk, mv, scale=scale)  # noqa: E731
    variant(f"{name}_attn_L{L}_mlx_ms", round(time_mlx(lambda: [sdpa() for _ in range(INNER)]) / INNER, 4))
    bq, bk, bv = (mx.contiguous(a.transpose(0, 2, 1, 3)) for a in (mq, mk, mv))
    mx.eval(bq, bk, bv)
    variant(f"{name}_attn_L{L}_mlx_wrapper_ms",
            round(time_mlx(lambda: [attention(bq, bk, bv) for _ in range(INNER)]) / INNER, 4))
    with torch.inference_mode():
        ev, _ = time_torch(lambda: [F.scaled_dot_product_attention(tq, tk, tv) for _ in range(INNER)])
        variant(f"{name}_attn_L{L}_torch_ms", round(ev / INNER, 4))
        check(f"{name} attention L{L} mlx vs torch sdpa", to_numpy(sdpa()),
              F.scaled_dot_product_attention(tq, tk, tv).float().cpu().numpy())


def micro_rope(name: str, heads: int, d: int, L: int):
    """The RoPE rotation of one q (or k) [1, L, H, d] with float32 tables: MLX eager (what mx.compile has to fuse),
    MLX mx.compile'd alone, and torch's eager formula (klein.apply_rope; inside our compiled blocks torch fuses it)."""
    from flux_core.mlx.common import apply_rope, to_mx, to_numpy
    from flux_core.torch.klein import apply_rope as torch_rope, rope_pairs

    g = torch.Generator("cpu").manual_seed(6)
    x = torch.randn(1, L, heads, d, generator=g).to(TDT)
    ang = torch.rand(1, L, d // 2, generator=g) * 6.2832
    pe = torch.stack([ang.cos(), ang.sin()], -1)
    mxx = to_mx(x, DTYPE)
    cos, sin = (to_mx(pe[:, :, None, :, i], "float32") for i in range(2))
    mx.eval(mxx, cos, sin)
    compiled = mx.compile(apply_rope)
    variant(f"{name}_rope_L{L}_mlx_eager_ms",
            round(time_mlx(lambda: [apply_rope(mxx, cos, sin) for _ in range(INNER)]) / INNER, 4))
    variant(f"{name}_rope_L{L}_mlx_compiled_ms",
            round(time_mlx(lambda: [compiled(mxx, cos, sin) for _ in range(INNER)]) / INNER, 4))
    tx, tpe = x.to(TDEV), rope_pairs(pe).to(TDEV)
    with torch.inference_mode():
        ev, _ = time_torch(lambda: [torch_rope(tx, tpe) for _ in range(INNER)])
        variant(f"{name}_rope_L{L}_torch_eager_ms", round(ev / INNER, 4))
        check(f"{name} rope L{L} mlx vs torch", to_numpy(compiled(mxx, cos, sin)),
              torch_rope(tx, tpe).float().cpu().numpy())


def gemm_shapes(name: str, cfg, L: int, n_img: int) -> list:
    """(label, M, K, N, calls per step) of the step's big matrix products (x [M, K] @ W^T [K, N]); L tokens in the
    joint sequence, n_img of them image tokens (klein's double blocks run the image stream alone)."""
    if name == "klein":
        D, F = cfg.hidden_size, cfg.mlp_hidden
        single, double = cfg.depth_single, cfg.depth
        return [("single.linear1", L, D, 3 * D + 2 * F, single), ("single.linear2", L, D + F, D, single),
                ("double.img_qkv", n_img, D, 3 * D, double), ("double.img_mlp_in", n_img, D, 2 * F, double),
                ("double.img_mlp_out", n_img, F, D, double)]
    D, F = cfg.dim, cfg.ffn_hidden
    return [("layer.qkv", L, D, 3 * D, cfg.n_layers), ("layer.w13", L, D, 2 * F, cfg.n_layers),
            ("layer.w2", L, F, D, cfg.n_layers), ("layer.out", L, D, D, cfg.n_layers)]


def micro_gemm(name: str, cfg, L: int, n_img: int):
    """Each big product of the step alone, bf16, MLX vs torch (random data): where MLX's compiled step loses the
    time that attention and RoPE do not explain. Records ms per call and the per-step total (x calls)."""
    from flux_core.mlx.common import to_mx

    total_mx = total_t = 0.0
    for label, M, K, N, n in gemm_shapes(name, cfg, L, n_img):
        g = torch.Generator("cpu").manual_seed(7)
        a, w = torch.randn(M, K, generator=g).to(TDT), (0.02 * torch.randn(N, K, generator=g)).to(TDT)
        ma, mw = to_mx(a, DTYPE), to_mx(w, DTYPE)
        mx.eval(ma, mw)
        t_mx = time_mlx(lambda: [ma @ mw.T for _ in range(INNER)]) / INNER
        ta, tw = a.to(TDEV), w.to(TDEV)
        with torch.inference_mode():
            t_t = time_torch(lambda: [ta @ tw.T for _ in range(INNER)])[0] / INNER
        variant(f"{name}_gemm_{label}_{M}x{K}x{N}_ms", {"mlx": round(t_mx, 4), "torch": round(t_t, 4), "calls": n})
        total_mx, total_t = total_mx + n * t_mx, total_t + n * t_t
    variant(f"{name}_gemm_step_total_ms", {"mlx": round(total_mx, 2), "torch": round(total_t, 2)})


def micro(name: str, cfg, geo):
    heads, d = (cfg.num_heads, cfg.head_dim) if name == "klein" else (cfg.n_heads, cfg.head_dim)
    calls = attention_calls(name, cfg, geo)
    variant(f"{name}_attention_calls_per_step", {f"L{L}": n for L, n in calls})
    main_len = calls[0][0]
    micro_attention(name, heads, d, main_len)
    micro_rope(name, heads, d, main_len)
    micro_gemm(name, cfg, main_len, geo["h"] * geo["w"])


# ============================================================================================== one family

def free_all():
    """Drop every cached buffer of both backends before the next model pair (H200: 140 GB, but Z-Image ~12 GB per
    backend plus compile workspaces and the CUDA graph pool)."""
    gc.collect()
    mx.clear_cache()
    if COMPILE:
        torch._dynamo.reset()  # compiled code holds guards on the freed modules
    if TDEV.type == "cuda":
        torch.cuda.empty_cache()


def run_family(name: str):
    cfg = klein_cfg() if name == "klein" else zimage_cfg()
    geo = geometry(name)
    t0 = time.time()
    sd = random_native(name, cfg, seed=1 if name == "klein" else 2)
    variant(f"{name}_params_m", round(sum(v.numel() for v in sd.values()) / 1e6, 1))
    sync()
    variant(f"{name}_draw_s", round(time.time() - t0, 1))
    tm, mm = load_pair(name, cfg, sd)
    del sd
    cond, x_np, t = inputs(name, cfg, geo)
    outs = {}
    guarded(f"{name} mlx step", lambda: mlx_step(name, mm, cond, x_np, t, geo, outs))
    guarded(f"{name} torch step", lambda: torch_step(name, tm, cond, x_np, t, geo, outs))
    if "mlx_eager" in outs and "torch_eager" in outs:  # the sanity check: both backends compute the same function
        check(f"{name} mlx eager vs torch eager (same weights, same inputs)", outs["mlx_eager"], outs["torch_eager"])
    if "mlx" in outs and "torch" in outs:
        check(f"{name} mlx compiled vs torch compiled + graph", outs["mlx"], outs["torch"])
    if not A.no_micro:
        guarded(f"{name} op timings", lambda: micro(name, cfg, geo))
    # returning drops the last references to both models; main() then frees the backends' caches


def main():
    REC["env"] = env()
    REC["variants"].update({k: REC["env"][k] for k in ("mlx_device", "mlx_version", "mlx_cuda_available", "gpu")})
    log("env", json.dumps(REC["env"]))
    save()
    if MLX_DEV != "gpu" and not A.tiny:
        note(f"MLX default device is {mx.default_device()}, not the GPU: mlx-cuda-13 is not active")
    for name in [A.only] if A.only else ["klein", "zimage"]:
        guarded(name, lambda: run_family(name))
        free_all()
    log("done:", json.dumps(REC["mlx_cuda_step_1024_ms"]))


if __name__ == "__main__":
    main()
