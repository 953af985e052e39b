"""Offload and tiled-decode memory / speed on a GPU: klein-4B resident step vs block-streamed step, pipeline peaks.

    python bench/bench_offload.py --out DIR          (GPU, real klein-4B / Qwen3-4B / FLUX.2 VAE geometry)
    python bench/bench_offload.py --tiny --out DIR   (CPU smoke test of the same code path, tiny geometry)

Random weights N(0, 0.02) (1-D norm scales N(1, 0.02)) in bf16, drawn on the device; nothing but our models in the
process. Steps are timed with CUDA events around one transformer forward at 1024² (4096 image + 512 text tokens),
3 warm-ups, median of 10. Memory is torch's allocator peak (max_memory_allocated; reserved alongside), GB = 1e9 B.
  1. resident step; blocks-streamed steps with 0, 5, 10, 15 blocks kept resident (ratio, peak, equality check)
  2. the pipeline with offload: Qwen3 encode (512 tokens) -> 4 transformer steps -> VAE decode, every component
     offloaded (text encoder and transformer `blocks`, VAE `model`), decode untiled and tiled (512 px)
  3. VAE decode alone at 1024², untiled vs tiled: working memory above the weights, time, difference
  4. the pipeline resident, per weight mode (bf16, int8, int4: transformer and Qwen3 block Linears quantized after
     loading), the text encoder released after encoding and the decode tiled (512 px): peak per stage
JSON to --out/bench_offload.json; a short table last.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flux_core.configs import KleinConfig, Qwen3Config, VAEConfig  # noqa: E402
from flux_core.demo import KLEIN, QWEN, VAE_COMMON  # noqa: E402
from flux_core.torch import offload as O  # noqa: E402
from flux_core.torch.klein import Flux2Transformer, position_ids, text_ids  # noqa: E402
from flux_core.torch.qwen3 import Qwen3Encoder  # noqa: E402
from flux_core.torch.vae import Flux2VAE  # noqa: E402

P = argparse.ArgumentParser()
P.add_argument("--tiny", action="store_true")
P.add_argument("--size", type=int, default=1024)
P.add_argument("--reps", type=int, default=10)
P.add_argument("--keep", default="0,6,10,14", help="resident-block counts to try with blocks streaming")
P.add_argument("--tile", type=int, default=512)
P.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
P.add_argument("--parts", default="steps,vae,pipeline,quant_pipeline", help="which parts to run, comma-separated")
A = P.parse_args()
CUDA = torch.cuda.is_available() and not A.tiny
DEV = torch.device("cuda" if CUDA else "cpu")
DT = torch.bfloat16 if CUDA else torch.float32
GB = 1e9
SIZE = 128 if A.tiny else A.size
TILE = 64 if A.tiny else A.tile


def sync():
    if CUDA:
        torch.cuda.synchronize()


def reset_peak():
    import gc

    gc.collect()
    if CUDA:
        sync()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak() -> dict:
    if not CUDA:
        return {"allocated": 0.0, "reserved": 0.0}
    sync()
    return {"allocated": torch.cuda.max_memory_allocated() / GB, "reserved": torch.cuda.max_memory_reserved() / GB}


def randomize(model, seed):
    """Materialise a meta-built model on the device with random weights."""
    model = model.to_empty(device=DEV)
    g = torch.Generator(DEV).manual_seed(seed)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("running_var"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g, device=DEV))
            elif p.dim() == 1 and ("norm" in name or name.endswith("scale")):
                p.copy_(1 + 0.02 * torch.randn(p.shape, generator=g, device=DEV))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g, device=DEV))
    model = model.to(DT)
    if isinstance(model, Flux2VAE):
        model.bn.float()
    return model.eval().requires_grad_(False)


def build(cls, cfg, seed):
    with torch.device("meta"):
        m = cls(cfg) if not isinstance(cfg, tuple) else cls(*cfg)
    return randomize(m, seed)


def time_calls(fn, reps) -> list[float]:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if CUDA:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            sync()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return times


def klein_inputs(cfg):
    h = w = SIZE // 16
    g = torch.Generator(DEV).manual_seed(7)
    img = torch.randn(1, h * w, cfg.in_channels, generator=g, device=DEV).to(DT)
    txt = torch.randn(1, 512 if not A.tiny else 16, cfg.context_in_dim, generator=g, device=DEV).to(DT)
    img_ids, txt_ids = position_ids(h, w)[None].to(DEV), text_ids(txt.shape[1])[None].to(DEV)
    return img, img_ids, txt, txt_ids


def bench_steps(res: dict) -> None:
    cfg = KleinConfig(**KLEIN) if A.tiny else KleinConfig()
    img, img_ids, txt, txt_ids = klein_inputs(cfg)
    ts = torch.tensor([0.75], device=DEV)
    reset_peak()
    net = build(Flux2Transformer, cfg, 1)
    pe = net.make_pe(img_ids, txt_ids)

    def step():
        with torch.inference_mode():
            return net(img, img_ids, txt, txt_ids, ts, pe=pe)

    want = step()
    t = time_calls(step, A.reps)
    res["resident"] = {"step_ms": statistics.median(t), "peak": peak(), "weights_gb": sum(
        p.numel() * p.element_size() for p in net.parameters()) / GB}
    rows = []
    for keep in [int(k) for k in A.keep.split(",")]:
        off = O.offload(net, DEV, "blocks", resident_blocks=keep, copy=True)
        reset_peak()
        got = step()
        t = time_calls(step, A.reps)
        rows.append({"resident_blocks": keep, "step_ms": statistics.median(t), "peak": peak(),
                     "ratio": statistics.median(t) / res["resident"]["step_ms"],
                     "device_weights_gb": off.device_bytes("blocks") / GB, "stalls": off.stalls,
                     "bit_identical": bool(torch.equal(got, want))})
        print(f"blocks keep={keep}: {rows[-1]}", flush=True)
        off.remove("resident")
        del off
    res["blocks"] = rows
    del net, pe, want
    reset_peak()


def denoise(net, img, img_ids, txt, txt_ids, h: int, w: int):
    """Four transformer steps (the sampler's work without its arithmetic) -> the latent grid [1, C, h, w] float32."""
    pe = net.make_pe(img_ids, txt_ids)
    x = img
    for s in range(4):
        x = net(x, img_ids, txt, txt_ids, torch.tensor([1 - s / 4], device=DEV), pe=pe)
    return x.float().permute(0, 2, 1).reshape(1, -1, h, w)


def bench_pipeline(res: dict) -> None:
    """Encode -> 4 steps -> decode with every component offloaded, peak over the whole run."""
    qcfg = Qwen3Config(**QWEN) if A.tiny else Qwen3Config()
    kcfg = KleinConfig(**KLEIN) if A.tiny else KleinConfig()
    vcfg = VAEConfig(**VAE_COMMON, z_channels=kcfg.in_channels // 4) if A.tiny else VAEConfig()
    te = build(Qwen3Encoder, (qcfg, qcfg.num_layers - 1), 3)
    net = build(Flux2Transformer, kcfg, 1)
    vae = build(Flux2VAE, vcfg, 2)
    offs = [O.offload(te, DEV, "blocks"), O.offload(net, DEV, "blocks"), O.offload(vae, DEV, "model")]
    img, img_ids, txt_noise, txt_ids = klein_inputs(kcfg)
    ids = torch.randint(0, qcfg.vocab_size, (1, txt_noise.shape[1]), device=DEV)
    h = w = SIZE // 16
    for tile in (None, TILE):
        reset_peak()
        stages = {}
        t0 = time.perf_counter()
        with torch.inference_mode():
            hs = te(ids, torch.ones_like(ids), output_layers=(9, 18, 27))
            txt = torch.cat(hs, -1).to(DT)
            stages["encode"] = peak()
            lat = denoise(net, img, img_ids, txt, txt_ids, h, w)
            stages["denoise"] = peak()
            out = vae.decode(lat, tile=tile)
            stages["decode"] = peak()
        sync()
        key = "pipeline_blocks_tiled" if tile else "pipeline_blocks_untiled"
        res[key] = {"stages": stages, "peak": peak(), "seconds": time.perf_counter() - t0, "tile": tile,
                    "image": list(out.shape)}
        print(f"{key}: {res[key]}", flush=True)
    for o in offs:
        o.remove("host")
    del te, net, vae, offs
    reset_peak()


def bench_quant_pipeline(res: dict) -> None:
    """Per weight mode, the stage peaks of a generation whose text encoder leaves the GPU before the transformer
    arrives (what `offload model` does, and `release_text_encoder` with loads in stage order): encode (512 tokens)
    -> release -> 4 steps -> tiled decode. Each model's peak is reset after it is built, so the transient full-
    precision copy of quantize-at-load is not counted (a pre-quantized file, flux_core's or GGUF, has none)."""
    import gc

    from flux_core.torch.quant import module_bytes, quantize_model

    qcfg = Qwen3Config(**QWEN) if A.tiny else Qwen3Config()
    kcfg = KleinConfig(**KLEIN) if A.tiny else KleinConfig()
    vcfg = VAEConfig(**VAE_COMMON, z_channels=kcfg.in_channels // 4) if A.tiny else VAEConfig()
    img, img_ids, _, txt_ids = klein_inputs(kcfg)
    h = w = SIZE // 16
    rows = {}
    for mode in ("none", "int8", "int4"):
        stages = {}
        with torch.inference_mode():
            te = build(Qwen3Encoder, (qcfg, qcfg.num_layers - 1), 3)
            quantize_model(te, mode)
            ids = torch.randint(0, qcfg.vocab_size, (1, txt_ids.shape[-2]), device=DEV)
            reset_peak()
            txt = torch.cat(te(ids, torch.ones_like(ids), output_layers=(9, 18, 27)), -1).to(DT)
            stages["encode"] = peak()
            te_gb = module_bytes(te) / GB
            del te
            gc.collect()
            net = build(Flux2Transformer, kcfg, 1)
            quantize_model(net, mode)
            vae = build(Flux2VAE, vcfg, 2)
            reset_peak()
            lat = denoise(net, img, img_ids, txt, txt_ids, h, w)
            stages["denoise"] = peak()
            reset_peak()
            vae.decode(lat, tile=TILE)
            stages["decode"] = peak()
        rows[mode] = {"text_encoder_weights_gb": te_gb, "transformer_weights_gb": module_bytes(net) / GB,
                      "stages": stages, "peak": max((v for v in stages.values()), key=lambda v: v["allocated"])}
        print(f"quant pipeline {mode}: {rows[mode]}", flush=True)
        del net, vae, txt, lat
        reset_peak()
    res["quant_pipeline"] = rows


def bench_vae(res: dict) -> None:
    vcfg = VAEConfig(**VAE_COMMON) if A.tiny else VAEConfig()
    vae = build(Flux2VAE, vcfg, 2)
    g = torch.Generator(DEV).manual_seed(9)
    lat = torch.randn(1, vae.latent_channels, SIZE // 16, SIZE // 16, generator=g, device=DEV)
    rows = {}
    ref = None
    for tile in [None, TILE] + ([768] if not A.tiny else []):
        reset_peak()
        base = torch.cuda.memory_allocated() / GB if CUDA else 0.0
        with torch.inference_mode():
            t = time_calls(lambda: vae.decode(lat, tile=tile), 3)
            out = vae.decode(lat, tile=tile)
        p = peak()
        if ref is None:
            ref = out
        rows[str(tile or "off")] = {"ms": statistics.median(t), "peak_above_weights": p["allocated"] - base,
                                    "mean_abs_diff": float((out - ref).abs().mean()),
                                    "max_abs_diff": float((out - ref).abs().max())}
        print(f"vae decode tile={tile}: {rows[str(tile or 'off')]}", flush=True)
    res["vae_decode"] = rows


def summary(res: dict) -> dict:
    """The issue's keys: the whole pipeline's peak with everything streamed and the decode tiled, and the step ratio
    of the fastest streaming setting that stays under 4.0 GB (all-streamed ratio alongside)."""
    rows = res.get("blocks", [])
    under = [r for r in rows if r["peak"]["allocated"] <= 4.0]
    best = min(under, key=lambda r: r["step_ms"]) if under else None
    pipe = res.get("pipeline_blocks_tiled", {})
    q = res.get("quant_pipeline", {})
    mem = {"bf16_blocks_peak": pipe.get("peak", {}).get("allocated")}
    for mode, key in (("none", "bf16_peak"), ("int8", "int8_peak"), ("int4", "int4_peak")):
        if mode in q:
            mem[key] = q[mode]["peak"]["allocated"]
    if "int4" in q:
        mem["int4_weights"] = q["int4"]["transformer_weights_gb"]
    return {"klein_memory_1024_gb": mem,
            "offload_step_ratio": best["ratio"] if best else None,
            "offload_resident_blocks": best["resident_blocks"] if best else None,
            "offload_step_ratio_all_streamed": rows[0]["ratio"] if rows else None}


def main():
    out = Path(A.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"device": torch.cuda.get_device_name(0) if CUDA else "cpu", "torch": torch.__version__,
           "size": SIZE, "date": time.strftime("%Y-%m-%d"), "dtype": str(DT)}
    if CUDA:
        x = torch.empty(int(1e9), dtype=torch.uint8, pin_memory=True)
        y = torch.empty_like(x, device=DEV)
        y.copy_(x, non_blocking=True)
        t = time_calls(lambda: y.copy_(x, non_blocking=True), 5)
        res["h2d_pinned_gb_s"] = 1.0 / (statistics.median(t) / 1e3)
        del x, y
        print("H2D pinned GB/s:", res["h2d_pinned_gb_s"], flush=True)
    chosen = set(A.parts.split(","))
    parts = {"steps": bench_steps, "vae": bench_vae, "pipeline": bench_pipeline, "quant_pipeline": bench_quant_pipeline}
    for part in [fn for name, fn in parts.items() if name in chosen]:
        try:
            part(res)
        except Exception as e:  # keep the other parts' numbers
            res[part.__name__ + "_error"] = repr(e)
            print(part.__name__, "failed:", repr(e), flush=True)
        (out / "bench_offload.json").write_text(json.dumps(res, indent=1))
    res["summary"] = summary(res)
    (out / "bench_offload.json").write_text(json.dumps(res, indent=1))
    r = res.get("resident", {})
    print(json.dumps(res["summary"]))
    print(f"\n{res['device']} {SIZE}^2 {res['dtype']}: resident step {r.get('step_ms', 0):.1f} ms, "
          f"peak {r.get('peak', {}).get('allocated', 0):.2f} GB")
    for row in res.get("blocks", []):
        print(f"  blocks keep {row['resident_blocks']:2d}: {row['step_ms']:.1f} ms ({row['ratio']:.2f}x), "
              f"peak {row['peak']['allocated']:.2f} GB, identical {row['bit_identical']}")
    for k in ("pipeline_blocks_untiled", "pipeline_blocks_tiled"):
        if k in res:
            print(f"  {k}: peak {res[k]['peak']['allocated']:.2f} GB (reserved {res[k]['peak']['reserved']:.2f}), "
                  f"stages {json.dumps({s: round(v['allocated'], 2) for s, v in res[k]['stages'].items()})}")


if __name__ == "__main__":
    main()
