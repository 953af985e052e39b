"""Quantized klein-4B files: sizes, int4 weight bytes on the GPU, host peak RSS while loading the int8 file.

Real-size klein-4B (5 double + 20 single blocks, width 3072) with random N(0, 0.02) bf16 weights is written once,
quantized to our int8 and int4 formats (flux_core/weights/qfile.py), then:
  * file sizes (GB = 1e9 bytes),
  * int4: bytes of the loaded model's parameters + buffers on the device and torch.cuda.memory_allocated(),
  * int8: peak host RSS of a fresh process while it loads the file onto the device, above the baseline RSS taken
    after torch / CUDA initialised (VmHWM after a clear_refs reset), and its ratio to the file size.

    python bench/bench_quant_memory.py --out bench/results/quant_memory.json            # H200
    python bench/bench_quant_memory.py --tiny --out /tmp/quant_memory_tiny.json          # CPU smoke run
Keys `int4_weights`, `int8_file_load_host_peak`, `int8_file_size` go into summary.json's "klein_memory_1024_gb".
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KLEIN_4B = dict(in_channels=128, out_channels=128, hidden_size=3072, num_heads=24, head_dim=128, depth=5,
                depth_single=20, context_in_dim=7680, axes_dim=(32, 32, 32, 32), guidance_embed=False)
KLEIN_TINY = dict(in_channels=16, out_channels=16, hidden_size=256, num_heads=2, head_dim=128, depth=1,
                  depth_single=2, context_in_dim=768, axes_dim=(32, 32, 32, 32), guidance_embed=False)

_LOAD = """
import json, sys, torch
sys.path.insert(0, sys.argv[3])
from flux_core.torch import klein, qload, qwen3, zimage  # every import before the baseline
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
dev = sys.argv[2]
torch.ones(1, device=dev) @ torch.ones(1, device=dev)        # CUDA context + allocator before the baseline
base = rss("VmRSS")
open("/proc/self/clear_refs", "w").write("5")                 # VmHWM := current RSS
model, _ = qload.load_file(sys.argv[1], dtype=torch.bfloat16, device=dev)
if dev.startswith("cuda"):
    torch.cuda.synchronize()
print(json.dumps({"base": base, "peak": rss("VmHWM")}))
"""


def write_source(cfg: dict, path: Path) -> None:
    from flux_core.torch.klein import Flux2Transformer, KleinConfig
    from flux_core.weights.io import save_safetensors

    with torch.device("meta"):
        model = Flux2Transformer(KleinConfig(**cfg))
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, p in model.state_dict().items():
        t = torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(0.02)
        if p.ndim == 1 and ("norm" in k or k.endswith(".scale")):
            t.add_(1.0)
        sd[k] = t.to(torch.bfloat16)
    save_safetensors(sd, path, {"fluxcore.distilled": "true"})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON result file")
    ap.add_argument("--tiny", action="store_true", help="a tiny klein on the CPU (checks that the script runs)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--workdir", default=None, help="where the multi-GB files go (default: a temp dir)")
    args = ap.parse_args(argv)
    from flux_core.torch import qload, quant

    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = KLEIN_TINY if args.tiny else KLEIN_4B
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fluxcore-quant-"))
    work.mkdir(parents=True, exist_ok=True)
    src, f8, f4 = work / "klein-src-bf16.safetensors", work / "klein-int8.safetensors", work / "klein-int4.safetensors"
    res = {"device": torch.cuda.get_device_name(0) if dev.startswith("cuda") else "cpu", "tiny": args.tiny}
    t0 = time.perf_counter()
    write_source(cfg, src)
    res["source_file_size"] = src.stat().st_size / 1e9
    for mode, path in (("int8", f8), ("int4", f4)):
        t = time.perf_counter()
        qload.quantize_file(src, path, mode)
        res[f"{mode}_quantize_s"] = round(time.perf_counter() - t, 1)
        res[f"{mode}_file_size"] = path.stat().st_size / 1e9
    # int4 weights on the device
    if dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    model, _ = qload.load_file(f4, dtype=torch.bfloat16, device=dev)
    res["int4_weights"] = quant.module_bytes(model) / 1e9
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
        res["int4_cuda_allocated"] = (torch.cuda.memory_allocated() - before) / 1e9
    del model
    # host peak while loading the int8 file, in a fresh process
    out = subprocess.run([sys.executable, "-c", _LOAD, str(f8), dev, str(ROOT)], capture_output=True, text=True,
                         check=True)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    res["int8_file_load_host_peak"] = (m["peak"] - m["base"]) / 1e9
    res["int8_file_load_host_peak_ratio"] = (m["peak"] - m["base"]) / f8.stat().st_size
    res["total_s"] = round(time.perf_counter() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    if not args.workdir:
        for p in (src, f8, f4):
            p.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
