"""`python -m flux_core quantize`: write a transformer or Qwen3 text encoder in FluxCore's quantized format.

    python -m flux_core quantize --model flux-2-klein-4b.safetensors --quantization int4 --output klein-4b-int4.safetensors
    python -m flux_core quantize --text-encoder qwen_3_4b.safetensors --quantization int8 --output qwen_3_4b-int8.safetensors

The output loads anywhere a full-precision file does (CLI --model / --text-encoder, the loader nodes, models.load_*)
without quantizing again and without ever holding the full-precision weights (flux_core/weights/qfile.py).
"""
from __future__ import annotations

import logging
from pathlib import Path

from .errors import ConfigError

log = logging.getLogger(__name__)
MODES = ("int8", "int4", "fp8")


def add_args(p) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="transformer to quantize: a klein / Z-Image .safetensors file or diffusers folder")
    src.add_argument("--text-encoder", help="Qwen3 text encoder to quantize: a .safetensors file or folder")
    p.add_argument("--quantization", required=True, choices=MODES,
                   help="int8: per-row scale; int4: groups of 64 with fp16 scales (modulation included); fp8: e4m3")
    p.add_argument("--output", required=True, help="the .safetensors file to write")


def run(args) -> dict:
    from .torch.qload import quantize_file

    source = args.model or args.text_encoder
    component = "transformer" if args.model else "text_encoder"
    out = Path(args.output)
    if out.suffix != ".safetensors":
        raise ConfigError(f"--output {out} must end in .safetensors (the loaders look for that suffix)")
    if out.resolve() == Path(source).resolve():
        raise ConfigError("--output must not overwrite the source checkpoint")
    return quantize_file(source, out, args.quantization, component)
