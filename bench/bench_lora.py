"""LoRA cost on the GPU: klein-4B step time with and without a merged rank-32 LoRA on every Linear, and the wall time
to read, resolve, merge, re-merge (strength change) and remove that LoRA.

    python bench/bench_lora.py --out bench_out/lora.json            (GPU: klein-4B, bf16, 1024², 512 text tokens)
    python bench/bench_lora.py --tiny --out /tmp/lora_tiny.json     (CPU smoke test at toy sizes)
    python bench/bench_lora.py --quantization fp8 --out ...         (the same on a load-time quantized model)

Method: weights drawn N(0, 0.02) in bf16 (1-D norm scales N(1, 0.02)), never zeros; the LoRA is written to a
.safetensors file in ai-toolkit's layout (`diffusion_model.<name>.lora_A/B.weight`, bf16, A ~ N(0, 1/in),
B ~ N(0, 0.002)) so reading it is part of the measured time, as it is for a user. Step = one transformer forward,
batch 1, torch.inference_mode, CUDA events, median of --reps after --warmup. Goals (issue 9): merged LoRA adds
≤ 2 % to the step; applying it takes < 1 s.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from timing import median_ms  # noqa: E402  (bench/ is sys.path[0] when a bench script runs)

P = argparse.ArgumentParser()
P.add_argument("--out", required=True, help="JSON file to write")
P.add_argument("--tiny", action="store_true", help="CPU smoke test at toy sizes")
P.add_argument("--size", type=int, default=1024)
P.add_argument("--rank", type=int, default=32)
P.add_argument("--reps", type=int, default=20)
P.add_argument("--warmup", type=int, default=3)
P.add_argument("--quantization", default="none", choices=["none", "int8", "int4", "fp8"])
P.add_argument("--backup", default="auto", choices=["auto", "device", "cpu"])
A = P.parse_args()

DEV = torch.device("cuda" if torch.cuda.is_available() and not A.tiny else "cpu")
if A.tiny:   # toy matmuls on a shared CPU: extra threads only add contention noise to the step times
    torch.set_num_threads(1)
DT = torch.bfloat16 if DEV.type == "cuda" else torch.float32
T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def wall(fn):
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t


def step_ms(fn):
    return median_ms(fn, A.reps, DEV.type == "cuda", A.warmup, cpu_reps=max(3, A.reps // 5))


def build():
    from diffusers import Flux2Transformer2DModel

    from flux_core.torch.klein import load_klein
    from flux_core.weights.klein import to_native

    cfg = (dict(in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=4,
                joint_attention_dim=96, axes_dims_rope=(4, 4, 4, 4)) if A.tiny else
           dict(in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128, num_attention_heads=24,
                joint_attention_dim=7680, axes_dims_rope=(32, 32, 32, 32)))
    with torch.device("meta"):
        meta = Flux2Transformer2DModel(patch_size=1, timestep_guidance_channels=256, mlp_ratio=3.0, rope_theta=2000,
                                       eps=1e-6, guidance_embeds=False, **cfg)
    g = torch.Generator(DEV).manual_seed(0)
    sd = {}
    for k, p in meta.state_dict().items():
        one = p.dim() == 1 and ("norm" in k or k.endswith("scale"))
        sd[k] = ((1 if one else 0) + 0.02 * torch.randn(p.shape, generator=g, device=DEV)).to(DT)
    model = load_klein(to_native(sd), dtype=DT, device=DEV).eval()
    del sd
    if A.quantization != "none":
        from flux_core.torch.quant import quantize_model

        quantize_model(model, A.quantization)
    return model, cfg


def write_lora(model, folder: Path) -> tuple[Path, int]:
    """A rank-r LoRA on every Linear of the model, in ai-toolkit's key layout."""
    from safetensors.torch import save_file

    from flux_core.torch.lora import weight_shapes

    g = torch.Generator("cpu").manual_seed(1)
    sd = {}
    for key, shape in weight_shapes(model).items():
        if not key.endswith(".weight") or len(shape) != 2:
            continue
        out_f, in_f = shape
        r = min(A.rank, out_f, in_f)
        base = "diffusion_model." + key[: -len(".weight")]
        sd[base + ".lora_A.weight"] = (torch.randn(r, in_f, generator=g) / in_f ** 0.5).to(torch.bfloat16)
        sd[base + ".lora_B.weight"] = (0.002 * torch.randn(out_f, r, generator=g)).to(torch.bfloat16)
    path = folder / "bench_lora.safetensors"
    save_file(sd, str(path))
    return path, len(sd) // 2


def inputs(cfg):
    from flux_core.torch.klein import position_ids, text_ids

    size = A.size // 16 if A.tiny else A.size
    h = w = size // 16
    img_ids = position_ids(h, w).to(DEV)
    g = torch.Generator(DEV).manual_seed(2)
    x = torch.randn(1, img_ids.shape[0], cfg["in_channels"], generator=g, device=DEV).to(DT)
    txt = torch.randn(1, 512, cfg["joint_attention_dim"], generator=g, device=DEV).to(DT)
    return x, img_ids, txt, text_ids(512).to(DEV), torch.tensor([0.9], device=DEV), size


def main():
    from flux_core.lora import read_lora
    from flux_core.torch import lora as TL

    model, cfg = build()
    log("model", sum(p.numel() for p in model.parameters()) / 1e9, "B params on", DEV, A.quantization)
    x, img_ids, txt, tids, sigma, size = inputs(cfg)
    row = {"model": "klein-4b" if not A.tiny else "klein-tiny", "device": str(DEV), "dtype": str(DT),
           "size": size, "tokens": int(img_ids.shape[0]) + 512, "rank": A.rank, "quantization": A.quantization}
    if DEV.type == "cuda":
        row["gpu"] = torch.cuda.get_device_name(DEV)
    with torch.inference_mode():
        pe = model.make_pe(img_ids[None], tids[None])
        fwd = lambda: model(x, img_ids[None], txt, tids[None], sigma, pe=pe)  # noqa: E731
        before = fwd().float()
        row["step_ms_no_lora"] = step_ms(fwd)
    with tempfile.TemporaryDirectory() as tmp:
        path, n_modules = write_lora(model, Path(tmp))
        row["lora_modules"] = n_modules
        row["lora_file_mb"] = path.stat().st_size / 2 ** 20
        lf, row["read_s"] = wall(lambda: read_lora(path))
        res, row["resolve_s"] = wall(lambda: TL.resolve_for(model, lf))
        _, row["merge_first_s"] = wall(lambda: TL.apply_loras(model, [(res, 1.0)], backup=A.backup))
        row["apply_total_s"] = row["read_s"] + row["resolve_s"] + row["merge_first_s"]
        row["backup_gb"] = TL.backup_bytes(model) / 2 ** 30
        row["backup_device"] = str(TL.TorchApplier(model, A.backup).backup_device)
        with torch.inference_mode():
            after = fwd().float()
            row["output_change_rel"] = float((after - before).norm() / before.norm())
            row["step_ms_with_lora"] = step_ms(fwd)
        _, row["merge_strength_change_s"] = wall(lambda: TL.apply_loras(model, [(res, 0.5)], backup=A.backup))
        _, row["remove_s"] = wall(lambda: TL.apply_loras(model, [], backup=A.backup))
        with torch.inference_mode():
            row["restored_exactly"] = bool(torch.equal(fwd().float(), before))
    row["step_overhead_pct"] = 100.0 * (row["step_ms_with_lora"] / row["step_ms_no_lora"] - 1.0)
    if DEV.type == "cuda":
        row["peak_gb"] = torch.cuda.max_memory_allocated(DEV) / 2 ** 30
    for k, v in row.items():
        log(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}")
    out = Path(A.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=2))
    log("wrote", out)


if __name__ == "__main__":
    main()
