"""Reading GGUF files as ComfyUI-GGUF users have them: klein / Z-Image transformers and Qwen3 text encoders.

Layouts (city96/ComfyUI-GGUF `loader.py`, `tools/convert.py`; llama.cpp `gguf-py`):
  * Diffusion models: `general.architecture` "flux" (klein: FLUX.2 converts as the FLUX family, detected by
    `double_blocks.0.img_attn.proj.weight`) or "lumina2" (Z-Image: `cap_embedder.1.weight` + `context_refiner.*`).
    Tensor names are the original (BFL / Tongyi / ComfyUI) state-dict keys, sometimes with `model.diffusion_model.`.
    ComfyUI-GGUF's converter keeps 1-D tensors and tensors of <= 1024 values in F32, writes the rest F16 / BF16,
    and llama.cpp's quantizer then turns the big 2-D weights into Q8_0, Q6_K, Q5_K, Q4_K, Q4_0, ...
  * A tensor whose shape was flattened to fit 256-wide blocks carries `comfy.gguf.orig_shape.<name>` (INT32 array).
  * ggml stores dims fastest-first (`ne`): the torch shape is the reversed `tensor.shape`.
  * Text encoders are llama.cpp GGUFs: architecture "qwen3", names `token_embd.weight`, `blk.N.attn_q.weight`,
    `attn_k`, `attn_v`, `attn_output`, `attn_q_norm`, `attn_k_norm`, `attn_norm`, `ffn_gate/up/down`, `ffn_norm`,
    `output_norm.weight` (+ `output.weight` when untied). Qwen3 converts without the q/k row permutation that
    llama.cpp applies to LLaMA, so the names map one to one (QWEN3_NAMES). The geometry is also in the metadata
    (`qwen3.block_count`, `qwen3.rope.freq_base`, `qwen3.attention.layer_norm_rms_epsilon`, ...).

The result is a QState (flux_core/weights/qstate.py): float tensors (F32 / F16 / BF16) become Lazy float tensors,
quantized ones QWeight("gguf", type name) holding the raw blocks; the loaders keep quantized Linears quantized and
dequantize the rest (e.g. Qwen3's token embedding, an nn.Embedding) at load.
"""
from __future__ import annotations

import re
from pathlib import Path

from ..errors import ConfigError, WeightError
from .qstate import Lazy, QWeight

IMAGE_ARCHS = ("flux", "lumina2")
TEXT_ARCHS = ("qwen3", "qwen3vl")
FLOAT_TYPES = ("F32", "F16", "BF16")
# type name -> (weights per block, bytes per block), as ggml's GGML_QUANT_SIZES
SIZES = {"F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20),
         "Q5_0": (32, 22), "Q5_1": (32, 24), "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144),
         "Q5_K": (256, 176), "Q6_K": (256, 210)}

# llama.cpp tensor names -> our Qwen3 keys (HF names without `model.`)
QWEN3_NAMES = [
    (r"^token_embd\.", "embed_tokens."),
    (r"^output_norm\.", "norm."),
    (r"^output\.", "lm_head."),
    (r"^blk\.(\d+)\.attn_norm\.", r"layers.\1.input_layernorm."),
    (r"^blk\.(\d+)\.attn_q_norm\.", r"layers.\1.self_attn.q_norm."),
    (r"^blk\.(\d+)\.attn_k_norm\.", r"layers.\1.self_attn.k_norm."),
    (r"^blk\.(\d+)\.attn_q\.", r"layers.\1.self_attn.q_proj."),
    (r"^blk\.(\d+)\.attn_k\.", r"layers.\1.self_attn.k_proj."),
    (r"^blk\.(\d+)\.attn_v\.", r"layers.\1.self_attn.v_proj."),
    (r"^blk\.(\d+)\.attn_output\.", r"layers.\1.self_attn.o_proj."),
    (r"^blk\.(\d+)\.ffn_gate\.", r"layers.\1.mlp.gate_proj."),
    (r"^blk\.(\d+)\.ffn_up\.", r"layers.\1.mlp.up_proj."),
    (r"^blk\.(\d+)\.ffn_down\.", r"layers.\1.mlp.down_proj."),
    (r"^blk\.(\d+)\.ffn_norm\.", r"layers.\1.post_attention_layernorm."),
]
_QWEN3_RE = [(re.compile(a), b) for a, b in QWEN3_NAMES]
# gguf metadata (under "<arch>.") -> HF config.json fields, for the Qwen3 config cross-check
QWEN3_CONFIG = {"block_count": "num_hidden_layers", "embedding_length": "hidden_size",
                "feed_forward_length": "intermediate_size", "attention.head_count": "num_attention_heads",
                "attention.head_count_kv": "num_key_value_heads", "attention.key_length": "head_dim",
                "rope.freq_base": "rope_theta", "attention.layer_norm_rms_epsilon": "rms_norm_eps"}


def is_gguf(path) -> bool:
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == b"GGUF"


def llama_to_ours(name: str) -> str:
    for pat, rep in _QWEN3_RE:
        if pat.match(name):
            return pat.sub(rep, name, count=1)
    return name


def _field(reader, name):
    f = reader.get_field(name)
    return None if f is None else f.contents()


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ConfigError("reading .gguf files needs the `gguf` package, which is not installed in this Python: "
                          "pip install gguf (inside ComfyUI: its python -m pip install gguf)") from None
    return gguf


def read(path) -> tuple[dict, dict, dict | None]:
    """A .gguf file -> (QState, metadata {'gguf.architecture', 'gguf.types'}, config.json-like dict or None)."""
    gguf = _gguf()

    try:
        reader = gguf.GGUFReader(str(path))
    except FileNotFoundError:
        raise WeightError(f"checkpoint not found: {path}") from None
    except Exception as e:  # gguf raises ValueError / struct errors for damaged files
        raise WeightError(f"cannot read {path} as GGUF ({e}). Is the download complete?") from None
    arch = _field(reader, "general.architecture")
    names = {t.name for t in reader.tensors}
    text = arch in TEXT_ARCHS or "token_embd.weight" in names
    if arch is not None and not text and arch not in IMAGE_ARCHS:
        raise WeightError(f"{Path(path).name} is a GGUF for architecture {arch!r}; FluxCore reads FLUX.2 klein "
                          f"('flux'), Z-Image ('lumina2') and Qwen3 text encoders ('qwen3')")
    qstate, types = {}, {}
    for t in reader.tensors:
        qtype = t.tensor_type.name
        types[qtype] = types.get(qtype, 0) + 1
        orig = _field(reader, f"comfy.gguf.orig_shape.{t.name}")
        shape = tuple(int(v) for v in orig) if orig is not None else tuple(int(v) for v in reversed(t.shape))
        key = llama_to_ours(t.name) if text else t.name
        qstate[key] = _entry(t, qtype, shape)
    config = _qwen3_config(reader, arch) if text else None
    meta = {"gguf.architecture": str(arch), "gguf.types": ", ".join(f"{k} ({v})" for k, v in types.items())}
    return qstate, meta, config


def _entry(t, qtype: str, shape: tuple):
    data = t.data
    if qtype in FLOAT_TYPES:
        return Lazy(shape, lambda: _float_tensor(data, qtype, shape), qtype)
    if qtype not in SIZES:
        raise WeightError(f"GGUF tensor {t.name} has type {qtype}, which FluxCore does not read (supported: "
                          f"{', '.join(SIZES)})")
    raw = Lazy(tuple(data.shape), lambda: _bytes_tensor(data), "U8")
    return QWeight("gguf", qtype, shape, {"data": raw}, group_size=SIZES[qtype][0])


def _bytes_tensor(data):
    import numpy as np
    import torch

    return torch.from_numpy(np.array(data, dtype=np.uint8, copy=True))  # a copy: the mmap is read-only


def _float_tensor(data, qtype: str, shape: tuple):
    import numpy as np
    import torch

    a = np.array(data, copy=True)
    if qtype == "BF16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16).reshape(shape)
    return torch.from_numpy(a).reshape(shape)


def _qwen3_config(reader, arch) -> dict | None:
    cfg = {}
    for src, dst in QWEN3_CONFIG.items():
        v = _field(reader, f"{arch}.{src}")
        if v is not None:
            cfg[dst] = float(v) if dst in ("rope_theta", "rms_norm_eps") else int(v)
    return cfg or None


# ------------------------------------------------------------------------------------------------ numpy helpers (MLX)

def dequantize_numpy(raw, qtype: str, shape: tuple):
    """float32 numpy weights from raw blocks with the `gguf` package's own reference dequantizer."""
    import numpy as np

    gguf = _gguf()

    out = gguf.quants.dequantize(np.ascontiguousarray(raw).reshape(shape[0], -1), gguf.GGMLQuantizationType[qtype])
    return np.ascontiguousarray(out, dtype=np.float32).reshape(shape)


def split_q8_0(raw):
    """Q8_0 rows -> (d float16 [blocks], codes int8 [blocks, 32]) with w = codes * d."""
    import numpy as np

    b = np.ascontiguousarray(raw).reshape(-1, 34)
    return b[:, :2].copy().view(np.float16)[:, 0], b[:, 2:].copy().view(np.int8)


def split_q4_0(raw):
    """Q4_0 rows -> (d float16 [blocks], codes int8 [blocks, 32] in weight order, -8..7) with w = codes * d."""
    import numpy as np

    b = np.ascontiguousarray(raw).reshape(-1, 18)
    qs = b[:, 2:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int8) - 8
    return b[:, :2].copy().view(np.float16)[:, 0], codes
