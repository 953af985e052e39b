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
import traceback
from pathlib import Path

from . import validate
from .errors import FluxCoreError
from .samplers import DEFAULT_SAMPLER, SAMPLERS

log = logging.getLogger("flux_core")


def _add_generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="transformer .safetensors, a transformer/ folder, or a diffusers "
                                                 "pipeline folder (which then supplies every component)")
    p.add_argument("--text-encoder", help="Qwen3 .safetensors or text_encoder/ folder (default: from the --model folder)")
    p.add_argument("--vae", help="VAE .safetensors or vae/ folder (default: from the --model folder)")
    p.add_argument("--tokenizer", help="folder with the Qwen tokenizer (vocab.json + merges.txt, or tokenizer.json) "
                                       "(default: found next to the text encoder)")
    p.add_argument("--prompt", required=True, help="what the image should show (for klein edits: what to change)")
    p.add_argument("--negative-prompt", default="", help="what to avoid; used only with CFG (default: empty)")
    p.add_argument("--reference", action="append", default=[], metavar="IMG",
                   help="klein: a reference image for editing; repeat for several (default: none)")
    p.add_argument("--init-image", metavar="IMG", help="Z-Image: start from this image (image-to-image) (default: none)")
    p.add_argument("--strength", type=float, metavar="S",
                   help="with --init-image: how much to change it, above 0 and at most 1 (1 = ignore the image) "
                        "(default: 0.6)")
    p.add_argument("--width", type=int, metavar="PX",
                   help=f"image width in pixels, floored to a multiple of 16, at most {validate.MAX_SIDE} "
                        "(default: the first reference's or the init image's width, else 1024)")
    p.add_argument("--height", type=int, metavar="PX", help="image height in pixels, as --width (default: 1024)")
    p.add_argument("--steps", type=int, help=f"denoising steps, 1 to {validate.MAX_STEPS} "
                                             "(default: 4 klein, 50 klein base, 8 Z-Image-Turbo)")
    p.add_argument("--sampler", choices=SAMPLERS, default=DEFAULT_SAMPLER,
                   help="euler (what diffusers does) or res_multistep (ComfyUI's, as in its official "
                        "Z-Image-Turbo template: the same image as that template at the same seed) "
                        f"(default: {DEFAULT_SAMPLER})")
    p.add_argument("--guidance", type=float, help="CFG scale, a number >= 0: base models use CFG above 1 (klein) or "
                                                  "above 0 (Z-Image) (default: 4.0 klein base, 0 Z-Image-Turbo; "
                                                  "distilled klein ignores it)")
    p.add_argument("--variant", choices=["auto", "distilled", "base"], default="auto",
                   help="distilled/Turbo or base, when the file does not say (default: auto = the file's metadata, "
                        "else distilled)")
    p.add_argument("--seed", type=int, help="noise seed, 0 to 2^64-1; the same seed gives the same image (default: "
                                            "random, printed)")
    p.add_argument("--batch-size", type=int, default=1, metavar="N",
                   help="images per run, from one noise draw (default: 1)")
    p.add_argument("--backend", choices=["auto", "mlx", "torch"], default="auto",
                   help="auto = MLX on Apple Silicon with mlx installed, else torch (default: auto)")
    p.add_argument("--device", help="torch: cuda, cuda:1, mps, cpu; mlx: gpu, cpu (default: the best available)")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                   help="compute precision; auto = bfloat16 on GPUs, float32 on CPUs (default: auto)")
    p.add_argument("--quantization", choices=["none", "int8", "int4", "fp8"], default="none",
                   help="quantize the transformer's and the text encoder's block weights at load time (MLX fp8: "
                        "mxfp8) (default: none)")
    p.add_argument("--output", default="out.png", metavar="FILE",
                   help="image file: .png, .jpg or .webp, with the parameters embedded; with --batch-size > 1, "
                        "_1, _2 ... are added (default: out.png)")
    p.add_argument("--output-latent", metavar="FILE",
                   help="also save the final latent (.safetensors, key 'latent', native layout) (default: none)")
    p.add_argument("--compile", action="store_true",
                   help="torch: compile the transformer blocks, the Qwen3 layers and the VAE decoder (faster steps, "
                        "encodes and decodes on CUDA after a one-off compile) (default: off)")
    p.add_argument("--offload", choices=["auto", "none", "model", "blocks"], default="auto",
                   help="CUDA: keep weights in host memory and copy them in when used: model = whole components "
                        "between stages, blocks = transformer / text-encoder blocks streamed while the previous "
                        "one computes (about 2 GB for klein-4B); auto = none when it fits, else blocks. MLX / CPU: "
                        "none (unified memory) (default: auto)")
    p.add_argument("--vae-tile", default="auto", metavar="auto|off|PX",
                   help="VAE in overlapping tiles of PX pixels (auto: above 2 MP or when memory is short) (default: auto)")
    p.add_argument("--release-text-encoder", choices=["auto", "yes", "no"], default="auto",
                   help="free the text encoder after encoding (default: auto = on devices with less than 32 GB)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:STRENGTH]",
                   help="a LoRA .safetensors merged into the transformer, strength 1.0 unless given "
                        "(C:\\x.safetensors is a path); repeat for several (default: none)")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="print what was loaded and why, per-step timings, and the traceback of internal errors "
                        "(default: off)")


def check_args(args):
    """Every option checked before any model loads; returns the opened (references, init image). A 16 GB
    checkpoint takes minutes to read: a typo in a path or a number must not wait for it."""
    from . import outputs

    validate.check_prompt(args.prompt, "--prompt")
    validate.check_prompt(args.negative_prompt, "--negative-prompt")
    validate.check_batch(args.batch_size, "--batch-size")
    validate.check_steps(args.steps, "--steps")
    validate.check_guidance(args.guidance, "--guidance")
    args.strength = validate.check_strength(args.strength, args.init_image is not None, "--strength", "--init-image")
    if args.seed is not None:
        validate.check_seed(args.seed, "--seed")
    for name, value in (("--width", args.width), ("--height", args.height)):
        if value is not None:
            validate.check_size(value, value, 16, validate.MAX_SIDE, (name, name))
    validate.check_device(args.backend, args.device, "--device")
    outputs.check_output_path(args.output, "--output")
    if args.output_latent:
        outputs.check_output_path(args.output_latent, "--output-latent", formats={".safetensors": None})
    for option, path in (("--model", args.model), ("--text-encoder", args.text_encoder), ("--vae", args.vae)):
        if path is not None and not Path(path).expanduser().exists():
            raise FluxCoreError(f"{option} {path} not found")
    from .lora import parse_lora_arg

    for text in args.lora:   # a missing LoRA fails here, not after the base model was read
        if not Path(parse_lora_arg(text).path).expanduser().is_file():
            raise FluxCoreError(f"--lora {text}: file not found (PATH or PATH:STRENGTH)")
    refs = [validate.open_image(r, "--reference", validate.MIN_REFERENCE_SIDE) for r in args.reference]
    init = validate.open_image(args.init_image, "--init-image", 16) if args.init_image else None
    return refs, init


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
    from . import backend as backends
    from . import models, pipeline, tiling

    refs, init = check_args(args)
    model_path, te_path, vae_path, tok = _components(args)
    distilled = {"auto": None, "distilled": True, "base": False}[args.variant]
    backends.choose(args.backend, args.device)  # an unavailable device is refused before the weights are read
    t0 = time.perf_counter()
    tiling.parse_option(args.vae_tile)  # a bad value fails before any loading
    from .lora import parse_lora_arg

    loras = [parse_lora_arg(a) for a in args.lora]
    transformer = models.load_transformer(model_path, args.backend, args.device, args.dtype, args.quantization,
                                          distilled=distilled, compile=args.compile, offload=args.offload,
                                          loras=loras)
    text_encoder = models.load_text_encoder(te_path, tok, args.backend, args.device, args.dtype, args.quantization,
                                            offload=args.offload, compile=args.compile)
    vae = models.load_vae(vae_path, args.backend, args.device, args.dtype, offload=args.offload, compile=args.compile)
    for m in (transformer, text_encoder, vae):
        log.info("loaded %s (%s)", m.describe(), "; ".join(m.notes))
    log.info("loading took %.1f s", time.perf_counter() - t0)
    seed = args.seed
    if seed is None:
        seed = secrets.randbelow(2**32)
        print(f"seed: {seed}")
    t1 = time.perf_counter()

    def progress(step, total, _x):
        log.info("step %d/%d (%.2f s)", step, total, time.perf_counter() - t1)

    gen = pipeline.generate(transformer, text_encoder, vae, args.prompt, negative_prompt=args.negative_prompt,
                            width=args.width, height=args.height, steps=args.steps, guidance=args.guidance,
                            seed=seed, batch_size=args.batch_size, references=refs, init_image=init,
                            sampler=args.sampler,
                            strength=args.strength if init is None else (args.strength or 0.6), callback=progress,
                            release_text_encoder={"auto": None, "yes": True, "no": False}[args.release_text_encoder],
                            vae_tile=args.vae_tile)
    log.info("generation took %.2f s", time.perf_counter() - t1)
    gen.params.update({"model_file": Path(model_path).name, "text_encoder_file": Path(te_path).name,
                       "vae_file": Path(vae_path).name})
    if loras:
        gen.params["loras"] = [{"file": Path(s.path).name, "strength": s.strength} for s in loras]
    from .outputs import save_images, save_latent

    if args.output_latent:  # first: a failure here must not leave images that look like a complete run
        save_latent(gen.latent, args.output_latent, gen.params)
    written = save_images(gen.images, args.output, gen.params)
    for p in written:
        print(p)
    return written


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
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    try:
        if args.cmd == "generate":
            run_generate(args)
        elif args.cmd == "quantize":
            from .quantize import run as run_quantize

            print(json.dumps(run_quantize(args)))
        else:
            from .demo import run_demo

            run_demo(args)
    except FluxCoreError as e:  # expected: bad input or a bad file; the message names the fix
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: files already written are complete; nothing half-written was left", file=sys.stderr)
        return 130
    except OSError as e:  # the file system refused (disk full, permissions changed mid-run): not a bug of ours
        if verbose:
            traceback.print_exc()
        print(f"error: {e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug: one line, the traceback only with --verbose
        if verbose:
            traceback.print_exc()
        print(f"error: internal error ({type(e).__name__}: {e}). This is a FluxCore bug: please report it with "
              "the output of the same command with --verbose", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
