"""Writing what a generation produces: PNGs with the parameters as text metadata, and the final latent.

Shared by the CLI (`python -m flux_core generate`), the demo and Python users (`save_pngs(gen.images, "out.png",
gen.params)`).
"""
from __future__ import annotations

import json
from pathlib import Path


def save_pngs(images, output: str, params: dict) -> list[Path]:
    import numpy as np
    from PIL import Image, PngImagePlugin

    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for i, img in enumerate(images):
        info = PngImagePlugin.PngInfo()
        info.add_text("fluxcore", json.dumps({**params, "batch_index": i}))
        info.add_text("parameters", _a1111_style(params))
        path = out if len(images) == 1 else out.with_name(f"{out.stem}_{i + 1}{out.suffix}")
        Image.fromarray((np.clip(img, 0, 1) * 255.0).round().astype("uint8")).save(path, pnginfo=info)
        written.append(path)
    return written


def _a1111_style(p: dict) -> str:
    text = p.get("prompt", "")
    if p.get("negative_prompt"):
        text += f"\nNegative prompt: {p['negative_prompt']}"
    return text + (f"\nSteps: {p['steps']}, Sampler: {p.get('sampler', 'euler')}, CFG scale: {p['guidance']}, "
                   f"Seed: {p['seed']}, Size: {p['width']}x{p['height']}, Model: {p.get('model')}")


def save_latent(latent, path: str, params: dict) -> None:
    import torch

    from .weights.io import save_safetensors

    t = latent if isinstance(latent, torch.Tensor) else torch.as_tensor(__import__("numpy").asarray(latent))
    save_safetensors({"latent": t.detach().float().cpu()}, path,
                     metadata={"fluxcore": json.dumps(params), "layout": "native"})
