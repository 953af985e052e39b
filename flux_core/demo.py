"""`python -m flux_core demo`: the whole pipeline on tiny random-weight checkpoints, no download.

The checkpoints are written in the real file layouts and under the standard Comfy-Org file names
(`diffusion_models/flux-2-klein-4b.safetensors`, `text_encoders/qwen_3_4b.safetensors`, `vae/flux2-vae.safetensors`,
`diffusion_models/z_image_turbo_bf16.safetensors`, `vae/ae.safetensors`, ...), with a byte-level Qwen-style tokenizer,
so they go through exactly the loading, detection and sampling code a real 16 GB download would. The image is noise
from random weights: the point is that every stage runs and the files are laid out as users have them.
Tests and the ComfyUI node tests use `write_demo_checkpoints` for the same reason.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

DEFAULT_DIR = Path.home() / ".cache" / "fluxcore" / "demo"

# Tiny geometries (docs/MODELS.md §X): every real structural feature kept (28 Qwen3 layers so hs 9/18/27 exist,
# 4 VAE levels for the real 8x factor, 4 RoPE axes, GQA), every width shrunk.
QWEN = dict(vocab_size=261, hidden_size=32, intermediate_size=64, num_hidden_layers=28, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16)
KLEIN = dict(in_channels=16, out_channels=16, hidden_size=64, num_heads=4, head_dim=16, depth=2, depth_single=2,
             context_in_dim=96, axes_dim=(4, 4, 4, 4))
ZIMAGE = dict(dim=64, n_layers=2, n_refiner_layers=1, n_heads=2, in_channels=16, cap_feat_dim=32,
              ffn_hidden=int(64 / 3 * 8), adaln_dim=64, axes_dims=(8, 12, 12))
VAE_COMMON = dict(enc_channels=(8, 16, 16, 16), dec_channels=(8, 16, 16, 16), enc_blocks=1, dec_blocks=2,
                  norm_num_groups=4)

FILES = {
    "klein": "diffusion_models/flux-2-klein-4b.safetensors",
    "klein_base": "diffusion_models/flux-2-klein-base-4b.safetensors",
    "zimage": "diffusion_models/z_image_turbo_bf16.safetensors",
    "text_encoder": "text_encoders/qwen_3_4b.safetensors",
    "flux2_vae": "vae/flux2-vae.safetensors",
    "flux1_vae": "vae/ae.safetensors",
    "tokenizer": "tokenizer",
}
STAMP = "fluxcore-demo.json"  # the recipe of the files in a folder; the same recipe is not written twice
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / Qwen byte-level alphabet: each byte as a printable character."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars)))


def write_byte_tokenizer(folder: Path) -> Path:
    """A Qwen-format tokenizer (vocab.json, merges.txt, added_tokens.json) over the 256 bytes + 5 specials (ids 256..260)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {sym: b for b, sym in sorted(bytes_to_unicode().items())}
    added = {str(256 + i): {"content": t, "special": t.startswith("<|")} for i, t in enumerate(SPECIALS)}
    vocab.update({t: 256 + i for i, t in enumerate(SPECIALS)})
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "added_tokens.json").write_text(json.dumps({"added_tokens": added}, indent=1))
    return folder


def _random_state(module, seed: int) -> dict:
    """Random weights for every tensor of `module` (built on the meta device): fan-in scaled, norms near 1."""
    import torch

    g = torch.Generator("cpu").manual_seed(seed)
    out = {}
    for name, p in module.state_dict().items():
        shape = tuple(p.shape)
        if name.endswith("running_var"):
            t = 0.5 + torch.rand(shape, generator=g)
        elif name.endswith("running_mean"):
            t = 0.1 * torch.randn(shape, generator=g)
        elif name.endswith("num_batches_tracked"):
            t = torch.zeros(shape, dtype=torch.long)
        elif len(shape) == 1 and ("norm" in name or name.endswith(".scale")):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[-1]
            t = torch.randn(shape, generator=g) / math.sqrt(max(fan_in, 1))
        out[name] = t.to(torch.float32) if t.is_floating_point() else t
    return out


def _build(cls, cfg):
    import torch

    with torch.device("meta"):
        return cls(cfg)


def write_demo_checkpoints(folder: Path | str = DEFAULT_DIR, seed: int = 0) -> dict[str, Path]:
    """Write every tiny checkpoint under its standard file name; returns {role: path}. Idempotent."""
    from .configs import KleinConfig, Qwen3Config, VAEConfig, ZImageConfig
    from .torch.klein import Flux2Transformer
    from .torch.qwen3 import Qwen3Encoder
    from .torch.vae import Flux1VAE, Flux2VAE
    from .torch.zimage import ZImageTransformer
    from .weights.io import save_safetensors

    root = Path(folder).expanduser()
    paths = {k: root / v for k, v in FILES.items()}
    stamp = root / STAMP
    recipe = json.dumps({"version": 1, "seed": seed, "qwen": QWEN, "klein": KLEIN, "zimage": ZIMAGE,
                         "vae": VAE_COMMON}, sort_keys=True)
    if stamp.is_file() and stamp.read_text() == recipe and all(p.exists() for p in paths.values()):
        return paths  # already written by an earlier run with the same recipe
    write_byte_tokenizer(paths["tokenizer"])
    qwen = _random_state(_build(Qwen3Encoder, Qwen3Config(**QWEN)), seed)
    # ComfyUI's qwen_3_4b.safetensors uses HF names with the `model.` prefix (docs/MODELS.md §Q6).
    save_safetensors({"model." + k: v for k, v in qwen.items()}, paths["text_encoder"])
    klein = _random_state(_build(Flux2Transformer, KleinConfig(**KLEIN)), seed + 1)
    save_safetensors(klein, paths["klein"], {"fluxcore.distilled": "true"})
    save_safetensors(klein, paths["klein_base"], {"fluxcore.distilled": "false"})
    zimg = _random_state(_build(ZImageTransformer, ZImageConfig(**ZIMAGE)), seed + 2)
    save_safetensors({"model.diffusion_model." + k: v for k, v in zimg.items()}, paths["zimage"])
    # The GroupNorm group count is not in the weights; real VAEs use 32, these tiny ones 4 (told via metadata).
    meta = {"config": json.dumps({"norm_num_groups": VAE_COMMON["norm_num_groups"]})}
    f2 = _random_state(_build(Flux2VAE, VAEConfig(kind="flux2", z_channels=4, **VAE_COMMON)), seed + 3)
    save_safetensors(f2, paths["flux2_vae"], meta)
    f1 = _random_state(_build(Flux1VAE, VAEConfig(kind="flux1", z_channels=16, quant_conv=False, **VAE_COMMON)), seed + 4)
    save_safetensors(f1, paths["flux1_vae"], meta)
    stamp.write_text(recipe)  # last: an interrupted write is redone next time
    return paths


def add_demo_args(p) -> None:
    p.add_argument("--model", choices=["klein", "zimage", "both"], default="both",
                   help="which pipeline to run (default: both)")
    p.add_argument("--dir", default=str(DEFAULT_DIR),
                   help=f"where the tiny checkpoints go; written once, reused later (default: {DEFAULT_DIR})")
    p.add_argument("--output-dir", default="out", help="where the PNGs go (default: ./out)")
    p.add_argument("--prompt", default="a lighthouse on a cliff at dawn",
                   help="the prompt (default: a lighthouse on a cliff at dawn)")
    p.add_argument("--seed", type=int, default=42, help="noise seed (default: 42)")
    p.add_argument("--backend", choices=["auto", "mlx", "torch"], default="auto",
                   help="auto = MLX on Apple Silicon with mlx installed, else torch (default: auto)")
    p.add_argument("--verbose", "-v", action="store_true", help="log what was loaded and why (default: off)")


def run_demo(args) -> list[Path]:
    from . import models, pipeline
    from .outputs import check_output_path, save_images

    out = Path(args.output_dir)
    check_output_path(out / "demo_klein.png", "--output-dir")
    fresh = not (Path(args.dir).expanduser() / STAMP).is_file()
    print(f"{'writing' if fresh else 'using'} the tiny random-weight checkpoints in {Path(args.dir).expanduser()}"
          + (" (kept for later runs)" if fresh else ""))
    paths = write_demo_checkpoints(args.dir)
    written = []
    jobs = {"klein": ("klein", "flux2_vae"), "zimage": ("zimage", "flux1_vae")}
    for name in (["klein", "zimage"] if args.model == "both" else [args.model]):
        model_key, vae_key = jobs[name]
        t0 = time.perf_counter()
        tr = models.load_transformer(paths[model_key], backend=args.backend)
        te = models.load_text_encoder(paths["text_encoder"], str(paths["tokenizer"]), backend=args.backend)
        vae = models.load_vae(paths[vae_key], backend=args.backend)
        gen = pipeline.generate(tr, te, vae, args.prompt, width=256, height=256, seed=args.seed)
        written += save_images(gen.images, out / f"demo_{name}.png", gen.params)
        print(f"{tr.variant.name}: {gen.params['steps']} steps at 256x256 on {tr.backend}:{tr.device} "
              f"in {time.perf_counter() - t0:.1f} s -> {written[-1]}")
    print("The images are noise: the weights are random. The demo shows that every stage runs on files laid out as "
          "the real downloads; see README 'Generating with real weights'.")
    return written
