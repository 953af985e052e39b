"""MLX affine-quantized checkpoints: mflux saves and MLX-community 4-/8-bit folders.

What they hold (mflux `models/common/weights/saving/model_saver.py`; MLX `nn.quantize`):
  * one folder per component (`transformer/`, `text_encoder/`, `vae/`), shards `0.safetensors`, `1.safetensors`, ...
    of at most 2 GB, a `model.safetensors.index.json`, each shard's metadata `quantization_level` (the bits) and
    `mflux_version`. MLX-community style folders state `"quantization": {"group_size": G, "bits": B}` in
    config.json instead.
  * every quantized Linear (and mflux's QuantizedEmbedding) as `<name>.weight` uint32 [O, I*bits/32] (a
    little-endian bit stream per row), `<name>.scales` and `<name>.biases` [O, I/group] (bf16 / fp16 / fp32):
    w = scales * q + biases per group of `group_size` inputs (MLX's default and mflux's: 64).
  * the keys are mflux's MLX parameter paths, which are diffusers' names with a few renames (MFLUX_RENAMES,
    from mflux's `flux2_weight_mapping.py` / `z_image_weight_mapping.py`); the Qwen3 encoder uses HF names
    without `model.` (ours).
The reader turns them into a QState in our key layout: QWeight("mlx") for every (weight, scales, biases) triple,
Lazy tensors for the rest, the diffusers q / k / v split re-fused by row concatenation (exact on affine codes).
Bits and group size: from the metadata / config when stated, else from the shapes with group 64.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import WeightError
from .qstate import QWeight, SafetensorsStream, apply_keymap

# mflux parameter path -> diffusers name (the rest of mflux's names are diffusers' own)
MFLUX_RENAMES = [
    (r"^time_guidance_embed\.linear_(\d)\.", r"time_guidance_embed.timestep_embedder.linear_\1."),
    (r"^transformer_blocks\.(\d+)\.attn\.to_out\.weight$", r"transformer_blocks.\1.attn.to_out.0.weight"),
    (r"^t_embedder\.linear1\.", "t_embedder.mlp.0."),
    (r"^t_embedder\.linear2\.", "t_embedder.mlp.2."),
    (r"^all_final_layer\.2-1\.adaLN_modulation\.0\.", "all_final_layer.2-1.adaLN_modulation.1."),
]
_RENAMES = [(re.compile(a), b) for a, b in MFLUX_RENAMES]
DEFAULT_GROUP = 64


def _files(p: Path) -> list[Path]:
    if p.is_file():
        return [p]
    if not p.is_dir():
        return []
    for index in sorted(p.glob("*.safetensors.index.json")):
        with open(index) as f:
            return [p / s for s in sorted(set(json.load(f)["weight_map"].values()))]
    return sorted(f for f in p.glob("*.safetensors") if not f.name.startswith("._"))


def is_mlx_quantized(path) -> bool:
    """A file / folder whose tensors include MLX's `<name>.scales` + `<name>.biases` next to a uint32 weight.
    Anything unreadable is "no": the ordinary loader then reports the damage with its own message."""
    try:
        files = _files(Path(path))
        if not files or files[0].suffix != ".safetensors" or not files[0].is_file():
            return False
        s = SafetensorsStream(files[0])
    except (WeightError, OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return any(k.endswith(".scales") and k[: -len(".scales")] + ".biases" in s.entries
               and s.entries.get(k[: -len(".scales")] + ".weight", {}).get("dtype") == "U32" for k in s.keys())


def _settings(p: Path, streams: list) -> tuple[int | None, int | None, dict | None]:
    """(bits, group size, config.json) as stated by the folder, None where it does not say."""
    bits = group = config = None
    for s in streams:
        if s.metadata.get("quantization_level"):
            bits = int(s.metadata["quantization_level"])
    cfg_path = (p if p.is_dir() else p.parent) / "config.json"
    if cfg_path.is_file():
        config = json.loads(cfg_path.read_text())
        q = config.get("quantization") or config.get("quantization_config") or {}
        bits = int(q.get("bits", bits or 0)) or bits
        group = int(q.get("group_size", 0)) or None
    return bits, group, config


def read(path) -> tuple[dict, dict, dict | None]:
    """An MLX affine-quantized file / component folder -> (QState in our layout, metadata, config.json or None)."""
    p = Path(path)
    files = _files(p)
    if not files:
        raise WeightError(f"no .safetensors files in {p}")
    streams = [SafetensorsStream(f) for f in files]
    bits, group, config = _settings(p, streams)
    where = {k: s for s in streams for k in s.keys()}
    raw, seen_bits = {}, set()
    for k, s in where.items():
        if k.endswith((".scales", ".biases")):
            continue
        base = k[: -len(".weight")] if k.endswith(".weight") else None
        if base is not None and base + ".scales" in where:
            qw = _qweight(base, where, bits, group)
            seen_bits.add((qw.bits, qw.group_size))
            raw[_rename(k)] = qw
        else:
            raw[_rename(k)] = s.lazy(k)
    meta = {"mlx.bits": ",".join(str(b) for b, _ in sorted(seen_bits)),
            "mlx.group_size": ",".join(str(g) for _, g in sorted(seen_bits))}
    for s in streams:
        meta.update({f"mlx.{k}": v for k, v in s.metadata.items()})
    return _to_ours(raw), meta, _plain_config(config)


def _qweight(base: str, where: dict, bits: int | None, group: int | None) -> QWeight:
    w, sc, bi = base + ".weight", base + ".scales", base + ".biases"
    if bi not in where:
        raise WeightError(f"{base}: MLX quantized weight without .biases (only affine mode is read, not mxfp4/nvfp4)")
    out_f, words = where[w].shape(w)
    n_groups = where[sc].shape(sc)[-1]
    bits_x_group = 32 * words // n_groups          # bits * group_size, from the shapes
    if bits is None:
        group = group or DEFAULT_GROUP
        bits = bits_x_group // group
    elif group is None:
        group = bits_x_group // bits
    if bits * group != bits_x_group or bits not in (2, 3, 4, 5, 6, 8):
        raise WeightError(f"{base}: packed shape [{out_f}, {words}] with {n_groups} groups does not fit "
                          f"{bits}-bit weights in groups of {group}")
    parts = {"weight": where[w].lazy(w), "scales": where[sc].lazy(sc), "biases": where[bi].lazy(bi)}
    return QWeight("mlx", "affine", (out_f, n_groups * group), parts, bits=bits, group_size=group)


def _rename(key: str) -> str:
    for pat, rep in _RENAMES:
        if pat.match(key):
            return pat.sub(rep, key, count=1)
    return key


def _to_ours(raw: dict) -> dict:
    """diffusers-layout transformers -> our (BFL / original) layout, row ops included; others unchanged."""
    from . import klein, zimage

    keys = set(raw)
    if any(k.startswith("double_stream_modulation_img.") for k in keys) and \
            any(k.startswith(("transformer_blocks.", "single_transformer_blocks.", "x_embedder.")) for k in keys):
        return apply_keymap(klein.DIFFUSERS, raw)
    if zimage.detect_layout(dict.fromkeys(raw)) == "diffusers":
        return apply_keymap(zimage.DIFFUSERS, {k: v for k, v in raw.items() if k not in zimage.STRAY})
    return raw


def _plain_config(config: dict | None) -> dict | None:
    """config.json minus the quantization block (the model configs read the rest)."""
    if not config:
        return None
    return {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
