"""Test fixtures for pre-quantized files: tiny models wide enough for 256-wide GGUF blocks, GGUF files written the
way ComfyUI-GGUF's converter + llama.cpp's quantizer write them (with the `gguf` package's writer and quantizer),
and MLX affine folders written the way mflux's ModelSaver writes them (mx.quantize per Linear, shards + index).

Every writer also returns the reference weights: what the `gguf` package (`gguf.quants.dequantize`) or MLX
(`mx.dequantize`) decode the stored blocks to, which the tests save as an ordinary safetensors file and load with
the ordinary loaders.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

# Sizes chosen so that every big Linear's input width divides 256 (K-quant super-blocks); the 16-wide img_in /
# x_embedder do not, and fall back to F16 as ComfyUI-GGUF's converter does when a type does not fit.
KLEIN = dict(in_channels=16, out_channels=16, hidden_size=256, num_heads=2, head_dim=128, depth=1, depth_single=1,
             context_in_dim=768, axes_dim=(32, 32, 32, 32))
ZIMAGE = dict(dim=256, n_layers=1, n_refiner_layers=1, n_heads=2, in_channels=16, cap_feat_dim=256,
              ffn_hidden=768, adaln_dim=256, axes_dims=(32, 48, 48))
QWEN = dict(vocab_size=261, hidden_size=256, intermediate_size=512, num_hidden_layers=28, num_attention_heads=2,
            num_key_value_heads=1, head_dim=128)
GGUF_TYPES = ("F16", "BF16", "F32", "Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q4_K", "Q4_0")
# sizes of the random fp16 super-block scales of the K-quants that gguf-py cannot quantize: weights ~ N(0, 0.03)
K_SCALE = {"Q6_K": 3e-5, "Q5_K": 7e-5, "Q4_K": 1.5e-4, "Q3_K": 5e-4, "Q2_K": 1.5e-3}
QUANT_THRESHOLD = 1024   # ComfyUI-GGUF convert.py: tensors this small stay F32


def random_state(kind: str, seed: int = 0) -> dict:
    """Random float32 weights (our keys) for the GGUF-sized tiny klein / Z-Image / Qwen3."""
    from flux_core.torch.klein import Flux2Transformer, KleinConfig
    from flux_core.torch.qwen3 import Qwen3Config, Qwen3Encoder
    from flux_core.torch.zimage import ZImageConfig, ZImageTransformer

    cls, cfg = {"klein": (Flux2Transformer, KleinConfig(**KLEIN)), "zimage": (ZImageTransformer, ZImageConfig(**ZIMAGE)),
                "qwen3": (Qwen3Encoder, Qwen3Config(**QWEN))}[kind]
    with torch.device("meta"):
        module = cls(cfg)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in module.state_dict().items():
        shape = tuple(p.shape)
        if len(shape) == 1 and ("norm" in name or name.endswith(".scale")):
            out[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[-1]
            out[name] = torch.randn(shape, generator=g) / math.sqrt(max(fan_in, 1))
    return out


# ------------------------------------------------------------------------------------------------ GGUF

def random_k_blocks(shape: tuple, qtype: str, rng) -> np.ndarray:
    """Valid random K-quant blocks (gguf-py cannot quantize these types): random codes and sub-scales, small
    positive fp16 super-block scales so the weights have a sane size."""
    import gguf

    per, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    n_blocks = int(np.prod(shape)) // per
    b = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    scale = lambda: (rng.random((n_blocks, 1)) * K_SCALE[qtype]).astype(np.float16).view(np.uint8)
    if qtype in ("Q4_K", "Q5_K"):
        b[:, 0:2], b[:, 2:4] = scale(), scale()
    elif qtype == "Q6_K":
        b[:, 208:210] = scale()
    elif qtype == "Q3_K":
        b[:, 108:110] = scale()
    elif qtype == "Q2_K":
        b[:, 80:82], b[:, 82:84] = scale(), scale()
    return b.reshape(*shape[:-1], shape[-1] // per * size)


def encode(a: np.ndarray, qtype: str, rng) -> tuple[np.ndarray, str]:
    """One tensor as ComfyUI-GGUF + llama.cpp would store it: (stored array, type name)."""
    import gguf

    T = gguf.GGMLQuantizationType
    if a.ndim == 1 or a.size <= QUANT_THRESHOLD:
        return a.astype(np.float32), "F32"
    per = gguf.GGML_QUANT_SIZES[T[qtype]][0]
    if a.shape[-1] % per:
        qtype = "F16"  # convert.py's fallback for a type that does not fit
    if qtype in K_SCALE:
        return random_k_blocks(a.shape, qtype, rng), qtype
    return gguf.quants.quantize(a.astype(np.float32), T[qtype]), qtype


def write_gguf(sd: dict, path, arch: str, qtype: str, seed: int = 0, kv: dict | None = None,
               rename=None) -> dict:
    """Write `sd` (name -> float tensor) as a GGUF; returns {name: reference float32 tensor} (gguf's dequant)."""
    import gguf

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for k, v in (kv or {}).items():
        (w.add_uint32 if isinstance(v, int) else w.add_float32)(k, v)
    ref = {}
    for name, t in sd.items():
        data, used = encode(t.float().numpy(), qtype, rng)
        stored = rename(name) if rename else name
        w.add_tensor(stored, data, raw_dtype=gguf.GGMLQuantizationType[used])
        ref[name] = torch.from_numpy(np.array(gguf.quants.dequantize(data, gguf.GGMLQuantizationType[used]),
                                              dtype=np.float32)).reshape(t.shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return ref


def hf_to_llama(name: str) -> str:
    """Our Qwen3 key -> llama.cpp's tensor name (written here independently of flux_core's reverse map)."""
    table = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    if name.startswith("embed_tokens."):
        return "token_embd." + name.split(".", 1)[1]
    if name.startswith("norm."):
        return "output_norm." + name.split(".", 1)[1]
    _, i, rest = name.split(".", 2)
    mod, leaf = rest.rsplit(".", 1)
    return f"blk.{i}.{table[mod]}.{leaf}"


def qwen3_kv() -> dict:
    c = QWEN
    return {"qwen3.block_count": c["num_hidden_layers"], "qwen3.embedding_length": c["hidden_size"],
            "qwen3.feed_forward_length": c["intermediate_size"], "qwen3.attention.head_count": c["num_attention_heads"],
            "qwen3.attention.head_count_kv": c["num_key_value_heads"], "qwen3.attention.key_length": c["head_dim"],
            "qwen3.rope.freq_base": 1e6, "qwen3.attention.layer_norm_rms_epsilon": 1e-6}


# ------------------------------------------------------------------------------------------------ MLX affine

def write_mlx_folder(sd_foreign: dict, folder, bits: int, group: int = 64, shard_bytes: int = 1 << 20,
                     metadata: bool = True, config: dict | None = None) -> dict:
    """An mflux-style component folder: every 2-D `*.weight` whose input width divides `group` quantized with
    mx.quantize (what nn.QuantizedLinear.from_linear does), shards of at most `shard_bytes` named 0.safetensors...,
    a model.safetensors.index.json, `quantization_level` / `mflux_version` metadata. Returns the reference weights
    {name: float32 torch tensor} as mx.dequantize decodes them (unquantized tensors as given)."""
    import mlx.core as mx

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays, ref = {}, {}
    for name, t in sd_foreign.items():
        a = mx.array(t.float().numpy())
        if name.endswith(".weight") and t.ndim == 2 and t.shape[1] % group == 0:
            q, s, b = mx.quantize(a, group_size=group, bits=bits)
            base = name[: -len(".weight")]
            arrays.update({name: q, base + ".scales": s, base + ".biases": b})
            ref[name] = torch.from_numpy(np.array(mx.dequantize(q, s, b, group_size=group, bits=bits)))
        else:
            arrays[name] = a
            ref[name] = t.float()
    meta = {"quantization_level": str(bits), "mflux_version": "0.24.0"} if metadata else {}
    shards, cur, size = [], {}, 0
    for k, v in arrays.items():
        if cur and size + v.nbytes > shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = v
        size += v.nbytes
    shards.append(cur)
    weight_map = {}
    for i, shard in enumerate(shards):
        mx.save_safetensors(str(folder / f"{i}.safetensors"), shard, meta)
        weight_map.update({k: f"{i}.safetensors" for k in shard})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": meta, "weight_map": weight_map}))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return ref


MFLUX_NAMES = [("time_guidance_embed.timestep_embedder.linear_", "time_guidance_embed.linear_"),
               ("t_embedder.mlp.0.", "t_embedder.linear1."), ("t_embedder.mlp.2.", "t_embedder.linear2."),
               ("all_final_layer.2-1.adaLN_modulation.1.", "all_final_layer.2-1.adaLN_modulation.0.")]


def to_mflux_names(diffusers_sd: dict) -> dict:
    """diffusers names -> mflux's MLX parameter paths (mflux flux2/z_image weight mappings' to_patterns)."""
    import re

    out = {}
    for k, v in diffusers_sd.items():
        for a, b in MFLUX_NAMES:
            k = k.replace(a, b)
        k = re.sub(r"^(transformer_blocks\.\d+\.attn\.to_out)\.0\.", r"\1.", k)
        out[k] = v
    return out
