"""Reading the JSON that travels with checkpoints (config.json, *.index.json, the safetensors `config` metadata)
so that nothing but our own errors can come out of it.

A config is user input from disk: it may be truncated, hand-edited, NaN-laden (Python's json accepts `NaN`), nested
deep enough to blow the recursion limit, or simply another tool's blob under the same name. Every value a model
builder reads is checked here against one table of expected kinds, so the builders can call `int()` / `float()` /
`.get()` without guarding each use, and a bad value is reported with its file and key instead of a TypeError three
modules away.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import WeightError

_MAX_INT = 1 << 24   # no real dimension / layer count is near this; bigger ones would only allocate and fail later
_MAX_FLOAT = 1e12    # rope_theta (1e6 for Qwen3) is the largest real value; a larger ratio would size huge layers

# key -> expected kind. "dim": int >= 1, "count": int >= 0, "pos": finite float > 0, "num": finite float,
# "nonzero": finite float != 0, "ints": list of dims, "bool", "str", "obj": JSON object (checked recursively),
# "?"-prefixed kinds also accept null, "a|b" either kind (the FLUX.2 VAE's patch_size is [2, 2], the transformer's
# an int). Keys are the ones our builders read from diffusers / transformers configs.
CONFIG_KINDS = {
    # FLUX.2 klein (diffusers Flux2Transformer2DModel)
    "_class_name": "str", "patch_size": "dim|ints", "num_attention_heads": "dim", "attention_head_dim": "dim",
    "in_channels": "dim", "out_channels": "?dim", "num_layers": "count", "num_single_layers": "count",
    "joint_attention_dim": "dim", "timestep_guidance_channels": "dim", "mlp_ratio": "pos", "axes_dims_rope": "ints",
    "rope_theta": "pos", "eps": "pos", "guidance_embeds": "bool",
    # Z-Image (diffusers ZImageTransformer2DModel)
    "siglip_feat_dim": "?dim", "qk_norm": "bool", "all_patch_size": "ints", "all_f_patch_size": "ints", "dim": "dim",
    "n_layers": "count", "n_refiner_layers": "count", "n_heads": "dim", "cap_feat_dim": "dim", "norm_eps": "pos",
    "t_scale": "pos", "axes_dims": "ints", "axes_lens": "ints",
    # Qwen3 (transformers Qwen3Config)
    "vocab_size": "dim", "hidden_size": "dim", "head_dim": "dim", "intermediate_size": "dim",
    "num_hidden_layers": "count", "num_key_value_heads": "dim", "rms_norm_eps": "pos",
    "rope_parameters": "?obj", "rope_scaling": "?obj", "rope_type": "str", "type": "str",
    # VAE (diffusers AutoencoderKL / AutoencoderKLFlux2)
    "norm_num_groups": "dim", "batch_norm_eps": "pos", "scaling_factor": "nonzero", "shift_factor": "?num",
}


def parse_json(text: str | bytes, where: str):
    """JSON text -> object, or WeightError naming `where`. Rejects NaN/Infinity (not JSON; strict parsers refuse
    them) and nesting deep enough to hit the recursion limit."""
    def no_constant(name):
        raise ValueError(f"{name} is not a JSON number")

    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return json.loads(text, parse_constant=no_constant)
    except RecursionError:
        raise WeightError(f"{where} is nested too deeply to be a config; the file is damaged: re-download it") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError and our NaN refusal are all ValueErrors
        raise WeightError(f"{where} is not valid JSON ({e}); the file is damaged or hand-edited: re-download it "
                          "or fix it") from None


def read_json(path: str | Path, what: str = ""):
    """A JSON file -> object, or WeightError naming the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise WeightError(f"cannot read {path} ({e.strerror or e})") from None
    return parse_json(data, f"{what + ' ' if what else ''}{path}")


def check_config(config, where: str) -> dict:
    """A parsed config must be a JSON object whose known keys have the kinds in CONFIG_KINDS."""
    if not isinstance(config, dict):
        raise WeightError(f"{where} must be a JSON object, not {type(config).__name__}; the file is damaged: "
                          "re-download it")
    for key, value in config.items():
        kind = CONFIG_KINDS.get(key)
        if kind is None:
            continue
        problem = _problem(kind, value)
        if problem is None and isinstance(value, dict):
            check_config(value, f"{where} ({key})")
        if problem:
            raise WeightError(f"{where}: '{key}' is {_show(value)}, but it must be {problem}; the config is damaged: "
                              "re-download it (or remove that key to use the value read from the weights)")
    return config


def read_config(path: str | Path) -> dict:
    """config.json beside the weights: parsed and checked."""
    return check_config(read_json(path, "config"), str(path))


def read_index(path: str | Path) -> list[str]:
    """A sharded checkpoint's *.safetensors.index.json -> the shard file names it lists (plain names in its folder)."""
    data = read_json(path, "index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise WeightError(f"index {path} has no 'weight_map' object (key -> shard file); the download is incomplete "
                          "or the file is damaged: re-download it, or delete it to load every *.safetensors there")
    shards = set()
    for key, name in weight_map.items():
        if not isinstance(name, str) or not name or Path(name).name != name:
            raise WeightError(f"index {path}: key {key!r} maps to {_show(name)}, not a shard file name in that "
                              "folder; re-download the index")
        shards.add(name)
    return sorted(shards)


def _problem(kind: str, v) -> str | None:
    """None when `v` fits `kind`, else what it should have been."""
    if "|" in kind:
        problems = [_problem(k, v) for k in kind.split("|")]
        return None if None in problems else " or ".join(problems)
    if kind.startswith("?"):
        if v is None:
            return None
        kind = kind[1:]
    if kind in ("dim", "count"):
        low = 1 if kind == "dim" else 0
        ok = _is_int(v) and low <= v <= _MAX_INT
        return None if ok else f"a whole number from {low} to {_MAX_INT}"
    if kind in ("pos", "num", "nonzero"):
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and abs(v) <= _MAX_FLOAT
        ok = ok and (kind == "num" or (v > 0 if kind == "pos" else v != 0))
        return None if ok else {"pos": "a number > 0", "num": "a finite number",
                                "nonzero": "a non-zero number"}[kind] + f" (at most {_MAX_FLOAT:g} in size)"
    if kind == "ints":
        ok = isinstance(v, list) and 0 < len(v) <= 16 and all(_is_int(a) and 1 <= a <= _MAX_INT for a in v)
        return None if ok else "a list of whole numbers >= 1"
    expected = {"bool": bool, "str": str, "obj": dict}[kind]
    return None if isinstance(v, expected) else {"bool": "true or false", "str": "a string",
                                                 "obj": "a JSON object"}[kind]


def _is_int(v) -> bool:
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer())


def _show(v) -> str:
    text = json.dumps(v) if isinstance(v, (str, int, float, bool, type(None))) else type(v).__name__
    return text if len(text) <= 40 else text[:37] + "..."
