"""Command line: `python -m flux_core generate ...` and `python -m flux_core demo`.

    python -m flux_core generate --model flux-2-klein-4b.safetensors --text-encoder qwen_3_4b.safetensors \
        --vae flux2-vae.safetensors --prompt "a red fox in snow" --seed 42 --output fox.png
    python -m flux_core generate --model ./FLUX.2-klein-4B --prompt "..."     # a diffusers pipeline folder
    python -m flux_core demo                                                  # tiny random weights, no download

Defaults (steps, guidance) come from the detected variant. The PNG carries the parameters as text metadata.
"""
from __future__ import annotations

import argparse
import json
import logging
import secrets
import sys
import time
from pathlib import Path

from .errors import FluxCoreError
from .samplers import DEFAULT_SAMPLER, SAMPLERS

log = logging.getLogger("flux_core")


def _add_generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="transformer .safetensors, a transformer/ folder, or a diffusers "
                                                 "pipeline folder (which then supplies every component)")
    p.add_argument("--text-encoder", help="Qwen3 .safetensors or text_encoder/ folder (default: from the --model folder)")
    p.add_argument("--vae", help="VAE .safetensors or vae/ folder (default: from the --model folder)")
    p.add_argument("--tokenizer", help="folder with the Qwen tokenizer (vocab.json + merges.txt, or tokenizer.json)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="", help="for base models with CFG (default: empty)")
    p.add_argument("--reference", action="append", default=[], metavar="IMG",
                   help="klein: a reference image for editing; repeat for several")
    p.add_argument("--init-image", help="Z-Image: start from this image (image-to-image)")
    p.add_argument("--strength", type=float, default=0.6, help="with --init-image: 1 = ignore the image (default 0.6)")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--steps", type=int, help="default: 4 (klein), 50 (klein base), 8 (Z-Image-Turbo)")
    p.add_argument("--sampler", choices=SAMPLERS, default=DEFAULT_SAMPLER,
                   help="euler (default; what diffusers does) or res_multistep (ComfyUI's, as in its official "
                        "Z-Image-Turbo template: the same image as that template at the same seed)")
    p.add_argument("--guidance", type=float, help="CFG scale for base models (klein base 4.0; Z-Image g>0 enables CFG)")
    p.add_argument("--variant", choices=["auto", "distilled", "base"], default="auto",
                   help="distilled/Turbo or base, when the file does not say (default: distilled)")
    p.add_argument("--seed", type=int, help="default: random (printed)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--backend", choices=["auto", "mlx", "torch"], default="auto")
    p.add_argument("--device", help="torch: cuda, cuda:1, mps, cpu; mlx: gpu, cpu")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto")
    p.add_argument("--quantization", choices=["none", "int8", "int4", "fp8"], default="none",
                   help="quantize the transformer's and the text encoder's block weights at load time (MLX fp8: mxfp8)")
    p.add_argument("--output", default="out.png", help="PNG path; with --batch-size > 1, _1, _2 ... are added")
    p.add_argument("--output-latent", help="also save the final latent (safetensors, key 'latent', native layout)")
    p.add_argument("--compile", action="store_true",
                   help="torch: compile the transformer blocks and the VAE decoder (faster steps and decode on CUDA "
                        "after a one-off compile)")
    p.add_argument("--offload", choices=["auto", "none", "model", "blocks"], default="auto",
                   help="CUDA: keep weights in host memory and copy them in when used: model = whole components "
                        "between stages, blocks = transformer / text-encoder blocks streamed while the previous "
                        "one computes (about 2 GB for klein-4B); auto = none when it fits, else blocks. MLX / CPU: "
                        "none (unified memory)")
    p.add_argument("--vae-tile", default="auto", metavar="auto|off|PX",
                   help="VAE in overlapping tiles of PX pixels (auto: above 2 MP or when memory is short)")
    p.add_argument("--release-text-encoder", choices=["auto", "yes", "no"], default="auto",
                   help="free the text encoder after encoding (auto: on devices with less than 32 GB)")
    p.add_argument("--verbose", "-v", action="store_true")


def _components(args):
    model = Path(args.model)
    te = args.text_encoder or (str(model / "text_encoder") if (model / "text_encoder").is_dir() else None)
    vae = args.vae or (str(model / "vae") if (model / "vae").is_dir() else None)
    tok = args.tokenizer or (str(model / "tokenizer") if (model / "tokenizer").is_dir() else None)
    if te is None or vae is None:
        missing = [n for n, v in (("--text-encoder", te), ("--vae", vae)) if v is None]
        raise FluxCoreError(f"{args.model} is not a diffusers pipeline folder, so {' and '.join(missing)} must be given "
                            "(e.g. --text-encoder qwen_3_4b.safetensors --vae flux2-vae.safetensors)")
    return str(model), te, vae, tok


def run_generate(args) -> list[Path]:
    from . import models, pipeline, tiling

    model_path, te_path, vae_path, tok = _components(args)
    distilled = {"auto": None, "distilled": True, "base": False}[args.variant]
    t0 = time.perf_counter()
    tiling.parse_option(args.vae_tile)  # a bad value fails before any loading
    transformer = models.load_transformer(model_path, args.backend, args.device, args.dtype, args.quantization,
                                          distilled=distilled, compile=args.compile, offload=args.offload)
    text_encoder = models.load_text_encoder(te_path, tok, args.backend, args.device, args.dtype, args.quantization,
                                            offload=args.offload)
    vae = models.load_vae(vae_path, args.backend, args.device, args.dtype, offload=args.offload, compile=args.compile)
    for m in (transformer, text_encoder, vae):
        log.info("loaded %s (%s)", m.describe(), "; ".join(m.notes))
    log.info("loading took %.1f s", time.perf_counter() - t0)
    seed = args.seed
    if seed is None:
        seed = secrets.randbelow(2**32)
        print(f"seed: {seed}")
    refs = [_open_image(r) for r in args.reference]
    init = _open_image(args.init_image) if args.init_image else None
    t1 = time.perf_counter()

    def progress(step, total, _x):
        log.info("step %d/%d (%.2f s)", step, total, time.perf_counter() - t1)

    gen = pipeline.generate(transformer, text_encoder, vae, args.prompt, negative_prompt=args.negative_prompt,
                            width=args.width, height=args.height, steps=args.steps, guidance=args.guidance,
                            seed=seed, batch_size=args.batch_size, references=refs, init_image=init,
                            sampler=args.sampler,
                            strength=args.strength if init is not None else 1.0, callback=progress,
                            release_text_encoder={"auto": None, "yes": True, "no": False}[args.release_text_encoder],
                            vae_tile=args.vae_tile)
    log.info("generation took %.2f s", time.perf_counter() - t1)
    gen.params.update({"model_file": Path(model_path).name, "text_encoder_file": Path(te_path).name,
                       "vae_file": Path(vae_path).name})
    from .outputs import save_latent, save_pngs

    written = save_pngs(gen.images, args.output, gen.params)
    if args.output_latent:
        save_latent(gen.latent, args.output_latent, gen.params)
    for p in written:
        print(p)
    return written


def _open_image(path):
    from PIL import Image

    try:
        return Image.open(path).convert("RGB")
    except FileNotFoundError:
        raise FluxCoreError(f"image not found: {path}") from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flux_core", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    gen = sub.add_parser("generate", help="generate images from a prompt")
    _add_generate_args(gen)
    demo = sub.add_parser("demo", help="build tiny random-weight checkpoints in the real file layouts and run the "
                                       "whole pipeline on them (no download)")
    from .demo import add_demo_args
    from .quantize import add_args as add_quantize_args

    add_demo_args(demo)
    add_quantize_args(sub.add_parser("quantize", help="save a transformer / Qwen3 text encoder in FluxCore's "
                                                      "quantized format (int8 | int4 | fp8)"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(message)s")
    try:
        if args.cmd == "generate":
            run_generate(args)
        elif args.cmd == "quantize":
            from .quantize import run as run_quantize

            print(json.dumps(run_quantize(args)))
        else:
            from .demo import run_demo

            run_demo(args)
    except FluxCoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
