"""Qwen3 decoder used as a text encoder (torch): the shared text model of FLUX.2 [klein] and Z-Image.

Matches HF transformers `Qwen3Model` / `Qwen3ForCausalLM` (`hidden_states` with a padding mask, float32 to ~1e-6;
tests/test_qwen3.py). docs/MODELS.md §Q1, §Q2.

Architecture (Qwen3-4B; Qwen3-8B for klein-9B in brackets):
  embed_tokens 151936 x 2560 [4096]; 36 pre-norm decoder layers; final RMSNorm `norm`.
  layer: x += o_proj(attn(input_layernorm(x)));  x += down(silu(gate(h)) * up(h)), h = post_attention_layernorm(x)
  attention: 32 query heads, 8 KV heads (GQA x4), head_dim 128 (q width 4096 != hidden 2560), no biases,
             RMSNorm over head_dim on q and k (`q_norm`, `k_norm`) BEFORE rotate-half RoPE, theta 1e6.
  MLP 9728 [12288]; RMSNorm eps 1e-6.

`forward(..., output_layers)` returns HF `hidden_states[k]` for each k: 0 = embeddings, k = raw output of decoder layer
k-1, num_layers = final-normed output (HF overwrites its last entry with `last_hidden_state`). Negative k count from
the end like HF's tuple (-1 = normed, -2 = raw output of the second-to-last layer). klein reads 9/18/27, Z-Image -2.

Pitfalls:
  - The loop stops after the deepest requested layer, and the model can be BUILT with fewer layers than the checkpoint
    (`max_layers`): klein needs 27 of 36, Z-Image 35. `norm` only exists when every layer is built.
  - Mask = causal AND key padding. A right-pad query row attends all real tokens (not itself): its hidden state is
    still used by klein, which feeds all 512 positions to the DiT. A row with no visible key at all (left padding)
    would be NaN in some SDPA kernels: we let it see everything and zero its attention output afterwards, which is
    what HF's SDPA path gives on torch >= 2.5.
  - RMSNorm statistics in float32, cast back to the activation dtype BEFORE the weight multiply (HF order).
  - RoPE tables and rotation in float32 (inv_freq built exactly as HF: float32 `theta ** (arange(0, d, 2) / d)`).
  - Qwen3Config() in transformers 5 defaults rope_theta to 1e4: a config.json without a theta means 1e6 here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import Qwen3Config
from ..errors import ConfigError
from ..weights import qwen3 as qwen3_keys
from ..weights.io import as_checkpoint
from .common import load_into_torch


# ----------------------------------------------------------------------------------------------------------- blocks
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # statistics in float32 (one fused kernel), cast back first, then the weight multiply (HF order)
        return F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype) * self.weight


class Qwen3Attention(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        d, hq, hkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim, self.n_heads, self.n_kv = d, hq, hkv
        self.q_proj = nn.Linear(cfg.hidden_size, hq * d, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, hkv * d, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, hkv * d, bias=False)
        self.o_proj = nn.Linear(hq * d, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)  # per head, over head_dim
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, rope: tuple, mask: "AttnMask") -> torch.Tensor:
        B, S, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, S, self.n_heads, self.head_dim)).transpose(1, 2)  # [B, Hq, S, d]
        k = self.k_norm(self.k_proj(x).view(B, S, self.n_kv, self.head_dim)).transpose(1, 2)     # [B, Hkv, S, d]
        v = self.v_proj(x).view(B, S, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        rep = self.n_heads // self.n_kv  # query head h reads KV head h // rep (HF repeat_kv)
        if rep > 1:  # expand + reshape, as HF: repeat_interleave may ask the GPU for its output size (a host sync)
            k = k[:, :, None].expand(B, self.n_kv, rep, S, self.head_dim).reshape(B, self.n_heads, S, self.head_dim)
            v = v[:, :, None].expand(B, self.n_kv, rep, S, self.head_dim).reshape(B, self.n_heads, S, self.head_dim)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.bias, is_causal=mask.bias is None,
                                             scale=1.0 / math.sqrt(self.head_dim))
        if mask.dead is not None:
            out = out.masked_fill(mask.dead, 0.0)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim))


class Qwen3MLP(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen3Layer(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.self_attn = Qwen3Attention(cfg)
        self.mlp = Qwen3MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, rope: tuple, mask: "AttnMask") -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


# -------------------------------------------------------------------------------------------------------- top model
class Qwen3Encoder(nn.Module):
    """Qwen3 decoder stack returning selected hidden states. Module names = HF keys without `model.`."""

    def __init__(self, cfg: Qwen3Config, max_layers: int | None = None):
        super().__init__()
        self.config = cfg
        n = cfg.num_layers if max_layers is None else int(max_layers)
        if not 1 <= n <= cfg.num_layers:
            raise ConfigError(f"max_layers={max_layers}: the checkpoint has {cfg.num_layers} Qwen3 layers")
        self.n_built = n
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Qwen3Layer(cfg) for _ in range(n))
        # The final norm only serves hidden_states[num_layers]; a truncated model has no use (and no key) for it.
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if n == cfg.num_layers else None
        self.graphed = None  # a graphs.CudaGraphCache of `_run` once `use_cuda_graphs()` was called

    def resolve_layer(self, k: int) -> int:
        """HF hidden_states index -> 0..num_layers (configs.Qwen3Config.resolve_layer)."""
        return self.config.resolve_layer(k, self.n_built, self.norm is not None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                output_layers: Sequence[int] = (-1,)) -> list[torch.Tensor]:
        want = tuple(self.resolve_layer(k) for k in output_layers)
        # the mask is built on the host side of the call (it asks whether there is padding at all); the rest is a
        # function of tensors only, which a CUDA graph can replay (`use_cuda_graphs`)
        mask = make_mask(attention_mask, input_ids.shape[1], input_ids.device, self.embed_tokens.weight.dtype)
        run = self._run if self.graphed is None else self.graphed
        return list(run(input_ids, mask.bias, mask.dead, want))

    def use_cuda_graphs(self) -> "Qwen3Encoder":
        """Replay each (batch, length, layers) call from a CUDA graph from its second call on (graphs.py): at 512
        tokens the plain call is ~1,700 small kernel launches and the GPU waits on the host half the time."""
        from .graphs import CudaGraphCache

        self.graphed = CudaGraphCache(self._run, name="Qwen3 encoder", max_entries=4)
        return self

    def _run(self, input_ids, bias, dead, want: tuple) -> list[torch.Tensor]:
        last = max(want)
        S = input_ids.shape[1]
        # 1. embeddings, RoPE tables and the mask, computed once for all layers
        x = self.embed_tokens(input_ids)                                                    # [B, S, H]
        rope = rope_tables(S, self.config.head_dim, self.config.rope_theta, x.device)
        mask = AttnMask(None, bias, dead)
        taps = {0: x}
        # 2. decoder layers, stopping after the deepest requested one
        for i in range(last):
            x = self.layers[i](x, rope, mask)
            taps[i + 1] = x
        # 3. hidden_states[num_layers] is the final-normed output, not the raw last layer (HF semantics)
        if last == self.config.num_layers:
            taps[last] = self.norm(x)
        return [taps[i] for i in want]

    def hidden_states(self, input_ids, attention_mask=None, output_layers: Sequence[int] = (-1,)) -> list:
        """The entry `TextEncoder` uses on both backends: CPU ids / mask in, hidden states on the model's device out
        (the MLX twin has the same method)."""
        dev = self.embed_tokens.weight.device
        mask = None if attention_mask is None else attention_mask.to(dev)
        with torch.inference_mode():
            return self(input_ids.to(dev), mask, output_layers=output_layers)


def load_qwen3(path_or_checkpoint, dtype=torch.float32, device="cpu", max_layers: int | None = None) -> Qwen3Encoder:
    """Load a Qwen3 text encoder: a single HF-layout file (with or without `model.`), a diffusers `text_encoder/`
    folder (sharded or not, Qwen3ForCausalLM or Qwen3Model naming), a pipeline folder, or a loaded `Checkpoint`.

    Only the first `max_layers` decoder layers are built and loaded (the rest of the file is skipped on purpose)."""
    ckpt = as_checkpoint(path_or_checkpoint, component="text_encoder")
    sd = qwen3_keys.to_native(ckpt.sd)
    cfg = Qwen3Config.from_state_dict(sd, ckpt.config)
    n = cfg.num_layers if max_layers is None else min(int(max_layers), cfg.num_layers)
    sd = qwen3_keys.drop_unused(sd, n, keep_norm=n == cfg.num_layers)
    with torch.device("meta"):
        model = Qwen3Encoder(cfg, max_layers=n)
    load_into_torch(model, sd, f"Qwen3 text encoder ({ckpt.source or 'state dict'})", dtype=dtype, device=device)
    return model.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------------ pure helpers
@dataclass
class AttnMask:
    keep: torch.Tensor | None = None   # [B, 1, S, S] bool, True = may attend; None = plain causal (is_causal)
    bias: torch.Tensor | None = None   # the same as an additive 0 / -inf mask in the activation dtype
    dead: torch.Tensor | None = None   # [B, 1, S, 1] bool rows that see no key at all (zeroed after SDPA)


def make_mask(attention_mask: torch.Tensor | None, S: int, device, dtype=torch.float32) -> AttnMask:
    """Causal AND key-padding mask. No padding -> no mask, so SDPA can use its fused causal kernels.

    Built once per forward as an additive mask: SDPA would otherwise convert a boolean mask in every layer."""
    if attention_mask is None or bool(attention_mask.bool().all()):
        return AttnMask()
    causal = torch.ones(S, S, dtype=torch.bool, device=device).tril()
    keep = causal[None, None] & attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
    dead = ~keep.any(-1, keepdim=True)
    dead = dead if bool(dead.any()) else None
    if dead is not None:
        keep = keep | dead  # an all -inf row is NaN in some kernels; its output is zeroed instead
    bias = torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill_(~keep, float("-inf"))
    return AttnMask(keep, bias, dead)


def rope_tables(S: int, head_dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE cos/sin [S, head_dim] in float32; inv_freq exactly as HF builds it (float32 pow)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    freqs = torch.arange(S, device=device).float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, rope: tuple) -> torch.Tensor:
    cos, sin = rope
    h = x.float()
    half = h.shape[-1] // 2
    rotated = torch.cat((-h[..., half:], h[..., :half]), dim=-1)
    return (h * cos + rotated * sin).to(x.dtype)



