"""MLX CPU vs torch CPU: time per denoising step through `pipeline.sample` on the same small configs, same process.

    python bench/bench_mlx_cpu.py                  # both backends, float32
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 OPENBLAS_NUM_THREADS=2 \
        python bench/bench_mlx_cpu.py --backends mlx  # MLX with Debian's OpenBLAS instead of its bundled reference BLAS

The configs are small but not toy: klein with hidden 512 (8 heads x 64), 2 double + 4 single blocks, a 256x256 image
(256 image tokens) and the real 512 text tokens; Z-Image with dim 512, 4 layers + 1 refiner of each kind, 256 image
tokens and a 96-token caption. Random fan-in-scaled weights (flux_core.demo). The first step of each run (MLX: the
mx.compile trace; both: warm caches) is reported separately; the per-step figure is the median of the others.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

P = argparse.ArgumentParser()
P.add_argument("--backends", default="torch,mlx")
P.add_argument("--steps", type=int, default=6)
P.add_argument("--out", default=None)
A = P.parse_args()


def build(folder: Path):
    from flux_core import demo
    from flux_core.configs import KleinConfig, ZImageConfig
    from flux_core.torch.klein import Flux2Transformer
    from flux_core.torch.zimage import ZImageTransformer
    from flux_core.weights.io import save_safetensors

    paths = demo.write_demo_checkpoints(folder)
    k = demo._random_state(demo._build(Flux2Transformer, KleinConfig(
        in_channels=16, out_channels=16, hidden_size=512, num_heads=8, head_dim=64, depth=2, depth_single=4,
        context_in_dim=96, axes_dim=(16, 16, 16, 16))), 1)
    save_safetensors(k, folder / "klein_small.safetensors")
    z = demo._random_state(demo._build(ZImageTransformer, ZImageConfig(
        dim=512, n_layers=4, n_refiner_layers=1, n_heads=8, in_channels=16, cap_feat_dim=32,
        ffn_hidden=int(512 / 3 * 8), adaln_dim=256, axes_dims=(16, 24, 24))), 2)
    save_safetensors(z, folder / "zimage_small.safetensors")
    return paths


def run(folder: Path, paths, backend: str, family: str):
    from flux_core import models, pipeline

    tr = models.load_transformer(folder / f"{family}_small.safetensors", backend=backend, device="cpu",
                                 dtype="float32")
    te = models.load_text_encoder(paths["text_encoder"], str(paths["tokenizer"]), backend="torch", device="cpu")
    prompt = "a lighthouse on a cliff at dawn, " * (4 if family == "zimage" else 1)
    cond = pipeline.encode_prompt(te, [prompt], tr.variant.text_mode)
    stamps = [time.perf_counter()]
    pipeline.sample(tr, cond, width=256, height=256, steps=A.steps, seed=0,
                    callback=lambda i, n, x: stamps.append(time.perf_counter()))
    dts = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"backend": backend, "family": family, "first_step_s": dts[0], "step_s": statistics.median(dts[1:]),
            "blas": "openblas (LD_PRELOAD)" if "openblas" in os.environ.get("LD_PRELOAD", "") else "default"}


def main():
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        paths = build(folder)
        for family in ("klein", "zimage"):
            for be in A.backends.split(","):
                rows.append(run(folder, paths, be, family))
                print(json.dumps(rows[-1]), flush=True)
    if A.out:
        Path(A.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
