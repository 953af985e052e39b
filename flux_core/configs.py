"""The model configurations and their derivation from checkpoints, shared by both backends.

Each dataclass holds the real published defaults and reads every size it can from tensor SHAPES (so meta tensors and
any backend's arrays work) plus what only a config.json can say. This module imports neither torch nor mlx: the
torch and MLX model files (`flux_core/torch/*.py`, `flux_core/mlx/*.py`) build their modules from these configs,
and the integer position grids both backends feed to RoPE are built here, once, in numpy.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Mapping, Sequence

import numpy as np

from .errors import ConfigError, WeightError
from .weights import klein as klein_keys
from .weights import qwen3 as qwen3_keys


# The attribute names of the repeated-block containers in every model we build (klein: double/single blocks; Z-Image:
# refiners and layers; Qwen3: layers). Regional compilation and weight quantization walk these.
BLOCK_CONTAINERS = ("double_blocks", "single_blocks", "noise_refiner", "context_refiner", "layers")
# int4 also quantizes these (klein's shared modulations; Z-Image's per-block adaLN_modulation is inside the blocks)
MODULATION_CONTAINERS = ("double_stream_modulation_img", "double_stream_modulation_txt", "single_stream_modulation")


def count_blocks(sd: Mapping, name: str, what: str) -> int:
    """Number of `name.N.*` blocks in a native state dict; the indices must run 0..N-1 (a gap is a broken file)."""
    pat = re.compile(re.escape(name) + r"\.(\d+)\.")
    found = {int(m.group(1)) for k in sd if (m := pat.match(k))}
    if found != set(range(len(found))):
        missing = sorted(set(range(max(found) + 1)) - found)
        raise WeightError(f"{what}: {name} blocks {missing} are missing from the checkpoint (truncated or partial "
                          "download?)")
    return len(found)


# ------------------------------------------------------------------------------------------------ FLUX.2 klein

@dataclass
class KleinConfig:
    """Defaults are klein-4B (BFL / diffusers published config)."""

    in_channels: int = 128
    out_channels: int = 128
    hidden_size: int = 3072
    num_heads: int = 24
    head_dim: int = 128
    depth: int = 5            # double-stream blocks
    depth_single: int = 20    # single-stream blocks
    context_in_dim: int = 7680
    time_dim: int = 256       # sinusoid width fed to time_in
    mlp_ratio: float = 3.0
    axes_dim: tuple = (32, 32, 32, 32)
    theta: float = 2000.0
    eps: float = 1e-6
    guidance_embed: bool = False

    def __post_init__(self):
        self.axes_dim = tuple(int(a) for a in self.axes_dim)
        if self.num_heads * self.head_dim != self.hidden_size:
            raise ConfigError(f"hidden_size {self.hidden_size} != num_heads {self.num_heads} x head_dim {self.head_dim}")
        if sum(self.axes_dim) != self.head_dim or any(a % 2 for a in self.axes_dim):
            raise ConfigError(f"RoPE axes {self.axes_dim} must be even and sum to head_dim {self.head_dim}")

    @property
    def mlp_hidden(self) -> int:
        v = self.hidden_size * self.mlp_ratio   # diffusers: int(); the round() guards ratios derived from shapes
        return round(v) if abs(v - round(v)) < 1e-6 else int(v)

    @classmethod
    def from_state_dict(cls, sd: Mapping, config_json: Mapping | None = None) -> "KleinConfig":
        """From a diffusers config.json when given, else from the shapes of a native (BFL-layout) state dict."""
        if klein_keys.is_flux2_config(config_json):
            return cls(**klein_keys.config_from_diffusers(config_json))

        def shape(key):
            if key not in sd:
                raise WeightError(f"not a FLUX.2 transformer: missing {key}")
            return tuple(sd[key].shape)

        hidden, in_channels = shape("img_in.weight")
        first = "double_blocks.0.img_attn" if "double_blocks.0.img_attn.qkv.weight" in sd else "single_blocks.0"
        head_dim = shape(f"{first}.norm.query_norm.scale")[0]
        if "double_blocks.0.img_mlp.0.weight" in sd:
            mlp_hidden = shape("double_blocks.0.img_mlp.0.weight")[0] // 2      # [a | b] of the SwiGLU
        else:
            mlp_hidden = shape("single_blocks.0.linear2.weight")[1] - hidden    # [attn | mlp] columns
        if hidden % head_dim or head_dim % 8:
            raise WeightError(f"hidden size {hidden} / head dim {head_dim} from the checkpoint do not fit FLUX.2")
        return cls(
            in_channels=in_channels,
            out_channels=shape("final_layer.linear.weight")[0],
            hidden_size=hidden,
            num_heads=hidden // head_dim,
            head_dim=head_dim,
            depth=count_blocks(sd, "double_blocks", "FLUX.2 transformer"),
            depth_single=count_blocks(sd, "single_blocks", "FLUX.2 transformer"),
            context_in_dim=shape("txt_in.weight")[1],
            time_dim=shape("time_in.in_layer.weight")[1],
            mlp_ratio=mlp_hidden / hidden,
            axes_dim=(head_dim // 4,) * 4,   # BFL / ComfyUI fix 4 equal axes (32 each for head_dim 128)
            theta=2000.0,
            eps=1e-6,
            guidance_embed="guidance_in.in_layer.weight" in sd,
        )



def klein_position_ids(h: int, w: int, t: int = 0) -> np.ndarray:
    """Ids of an h x w grid of packed latent tokens, row-major: (t, row, col, 0). t = 0 for the noise image,
    10, 20, ... for reference images (docs/MODELS.md §K4). int64 [h*w, 4]."""
    ids = np.zeros((h * w, 4), dtype=np.int64)
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    ids[:, 0] = t
    ids[:, 1] = rows.reshape(-1)
    ids[:, 2] = cols.reshape(-1)
    return ids


def klein_text_ids(n: int) -> np.ndarray:
    """Ids of n text tokens: (0, 0, 0, l) for l = 0..n-1 (padding positions included). int64 [n, 4]."""
    ids = np.zeros((n, 4), dtype=np.int64)
    ids[:, 3] = np.arange(n)
    return ids


# ------------------------------------------------------------------------------------------------ Z-Image

SEQ_MULTIPLE = 32  # caption and image token counts are padded to this (learned pad tokens)
FREQ_DIM = 256  # sinusoidal timestep embedding width
REAL_AXES = (32, 48, 48)  # Z-Image-Turbo RoPE split of head_dim 128; other head dims keep this proportion


_Z = "Z-Image transformer"


@dataclass
class ZImageConfig:
    dim: int = 3840
    n_layers: int = 30
    n_refiner_layers: int = 2
    n_heads: int = 30
    in_channels: int = 16
    patch_size: int = 2
    cap_feat_dim: int = 2560
    ffn_hidden: int = 10240  # int(dim / 3 * 8)
    adaln_dim: int = 256  # min(dim, 256)
    t_hidden: int = 1024  # t_embedder MLP width, fixed in the reference
    norm_eps: float = 1e-5  # sandwich + caption RMSNorms
    qk_norm_eps: float = 1e-5  # per-head q/k RMSNorm (hard-coded in diffusers, independent of norm_eps)
    final_eps: float = 1e-6  # final non-affine LayerNorm
    rope_theta: float = 256.0
    t_scale: float = 1000.0
    axes_dims: tuple = REAL_AXES
    axes_lens: tuple = (1536, 512, 512)  # the published config; diffusers' default [1024,512,512] is not it

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.in_channels

    def padded_caption_lengths(self, cap_lens: Sequence[int], height: int, width: int) -> list[int]:
        """Validate a RoPE request (both backends' make_rope) and return each caption's padded length."""
        p = self.patch_size
        if height % p or width % p:
            raise ConfigError(f"latent {height}x{width} is not divisible by the patch size {p} "
                              f"(image sides must be multiples of {8 * p} pixels)")
        if not cap_lens or min(cap_lens) < 1:
            raise ConfigError(f"every caption needs at least one token, got lengths {list(cap_lens)}")
        return [ceil_seq(n) for n in cap_lens]

    def check_positions(self, top: Sequence[int]) -> None:
        """The largest (t, h, w) position ids must stay inside the trained RoPE range (`axes_lens`)."""
        if any(m >= n for m, n in zip(top, self.axes_lens)):
            raise ConfigError(f"caption or image too large for Z-Image: RoPE positions {list(top)} exceed the trained "
                              f"range {list(self.axes_lens)} (t = padded caption length + 1, h/w = patch rows/cols)")

    def __post_init__(self):
        self.axes_dims, self.axes_lens = tuple(self.axes_dims), tuple(self.axes_lens)
        if self.dim % self.n_heads or sum(self.axes_dims) != self.head_dim or any(d % 2 for d in self.axes_dims):
            raise ConfigError(f"inconsistent Z-Image config: dim {self.dim}, {self.n_heads} heads, "
                              f"RoPE axes {self.axes_dims} (must be even and sum to the head dim)")

    @classmethod
    def from_diffusers(cls, cfg: Mapping) -> "ZImageConfig":
        """A diffusers `transformer/config.json` (ZImageTransformer2DModel)."""
        if cfg.get("siglip_feat_dim") is not None:
            raise ConfigError("Z-Image Omni (siglip_feat_dim set) is not supported, only text-to-image Z-Image.")
        if not cfg.get("qk_norm", True):
            raise ConfigError("Z-Image config with qk_norm=false is not supported (no published model uses it).")
        patches = list(cfg.get("all_patch_size", [2]))
        if len(patches) != 1 or list(cfg.get("all_f_patch_size", [1])) != [1]:
            raise ConfigError(f"only one 2-D patch size is supported, got {patches} / {cfg.get('all_f_patch_size')}")
        dim = int(cfg.get("dim", 3840))
        return cls(dim=dim, n_layers=int(cfg.get("n_layers", 30)), n_refiner_layers=int(cfg.get("n_refiner_layers", 2)),
                   n_heads=int(cfg.get("n_heads", 30)), in_channels=int(cfg.get("in_channels", 16)),
                   patch_size=int(patches[0]), cap_feat_dim=int(cfg.get("cap_feat_dim", 2560)),
                   ffn_hidden=int(dim / 3 * 8), adaln_dim=min(dim, 256), norm_eps=float(cfg.get("norm_eps", 1e-5)),
                   rope_theta=float(cfg.get("rope_theta", 256.0)), t_scale=float(cfg.get("t_scale", 1000.0)),
                   axes_dims=tuple(cfg.get("axes_dims", REAL_AXES)),
                   axes_lens=tuple(cfg.get("axes_lens", (1536, 512, 512))))

    @classmethod
    def from_state_dict(cls, sd: Mapping, config_json: Mapping | None = None) -> "ZImageConfig":
        """From a diffusers config.json when given (and it is one), else from the shapes of a native state dict."""
        if config_json and "dim" in config_json and "n_layers" in config_json:
            return cls.from_diffusers(config_json)
        need = ("x_embedder.weight", "layers.0.attention.q_norm.weight", "layers.0.feed_forward.w1.weight",
                "cap_embedder.1.weight", "t_embedder.mlp.0.weight", "t_embedder.mlp.2.weight")
        missing = [k for k in need if k not in sd]
        if missing:
            raise WeightError(f"Z-Image transformer: cannot infer the config, missing keys {missing}")
        dim, patch_dim = sd["x_embedder.weight"].shape
        head_dim = sd["layers.0.attention.q_norm.weight"].shape[0]
        refiners = count_blocks(sd, "noise_refiner", _Z)
        if count_blocks(sd, "context_refiner", _Z) != refiners:
            raise WeightError("Z-Image transformer: noise_refiner and context_refiner have different layer counts "
                              f"({refiners} vs {count_blocks(sd, 'context_refiner', _Z)})")
        patch = 2  # every published Z-Image model; not recoverable from shapes (p*p*C is)
        return cls(dim=dim, n_layers=count_blocks(sd, "layers", _Z), n_refiner_layers=refiners, n_heads=dim // head_dim,
                   in_channels=patch_dim // (patch * patch), patch_size=patch,
                   cap_feat_dim=sd["cap_embedder.1.weight"].shape[1],
                   ffn_hidden=sd["layers.0.feed_forward.w1.weight"].shape[0],
                   adaln_dim=sd["t_embedder.mlp.2.weight"].shape[0], t_hidden=sd["t_embedder.mlp.0.weight"].shape[0],
                   axes_dims=axes_dims_for(head_dim))


def axes_dims_for(head_dim: int) -> tuple:
    """RoPE split of a head dim in the real 32:48:48 proportion, every part even: 128 -> (32,48,48), 32 -> (8,12,12)."""
    hw = 2 * round(head_dim * REAL_AXES[1] / sum(REAL_AXES) / 2)
    t = head_dim - 2 * hw
    if t <= 0 or t % 2:
        raise ConfigError(f"cannot split head dim {head_dim} into even RoPE axes in the 32:48:48 proportion")
    return (t, hw, hw)


def ceil_seq(n: int) -> int:
    """Token count padded up to a multiple of SEQ_MULTIPLE (Z-Image pads captions and images with learned tokens)."""
    return -(-n // SEQ_MULTIPLE) * SEQ_MULTIPLE


def zimage_position_ids(cap_padded: int, h_tokens: int, w_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(caption ids [Lp, 3], image ids [Np, 3]) int64. Caption slot j -> (1+j, 0, 0) for all Lp slots (pads too);
    image patch (h, w) -> (Lp+1, h, w), row-major; image pad tokens -> (0, 0, 0) (docs/MODELS.md §Z3)."""
    cap = np.zeros((cap_padded, 3), dtype=np.int64)
    cap[:, 0] = np.arange(1, cap_padded + 1)
    n = h_tokens * w_tokens
    img = np.zeros((ceil_seq(n), 3), dtype=np.int64)
    hh, ww = np.meshgrid(np.arange(h_tokens), np.arange(w_tokens), indexing="ij")
    img[:n, 0] = cap_padded + 1
    img[:n, 1] = hh.reshape(-1)
    img[:n, 2] = ww.reshape(-1)
    return cap, img


def check_rope_cache(rope, cap_lens: Sequence[int], height: int, width: int) -> None:
    """A precomputed Z-Image RoPE cache (either backend's ZImageRope) must match the inputs it is used with."""
    if tuple(cap_lens) != rope.cap_lens or (height, width) != (rope.height, rope.width):
        raise ConfigError(f"rope_cache was built for captions {rope.cap_lens} at {rope.height}x{rope.width} "
                          f"latent, but the inputs are {tuple(cap_lens)} at {height}x{width}")


def caption_list(cap_feats, batch: int, cap_dim: int) -> list:
    """Z-Image captions as a list of [L_i, cap_dim] arrays (torch or mx); a [B, L, cap_dim] array is split."""
    if hasattr(cap_feats, "shape"):
        if len(cap_feats.shape) != 3:
            raise ConfigError(f"cap_feats must be [B, L, {cap_dim}] or a list of [L, {cap_dim}], got "
                              f"{tuple(cap_feats.shape)}")
        cap_feats = [cap_feats[i] for i in range(cap_feats.shape[0])]
    caps = list(cap_feats)
    if len(caps) != batch:
        raise ConfigError(f"got {len(caps)} captions for a batch of {batch} latents")
    for c in caps:
        if len(c.shape) != 2 or c.shape[-1] != cap_dim:
            raise ConfigError(f"each caption must be [L, {cap_dim}] (Qwen3 hidden states), got {tuple(c.shape)}")
    return caps


# ------------------------------------------------------------------------------------------------ Qwen3

@dataclass
class Qwen3Config:
    """Qwen3-4B defaults. `from_state_dict` reads every size from tensor shapes, theta/eps from config.json."""

    vocab_size: int = 151936
    hidden_size: int = 2560
    intermediate_size: int = 9728
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6

    @property
    def num_layers(self) -> int:
        return self.num_hidden_layers

    @classmethod
    def from_state_dict(cls, sd: Mapping, config_json: dict | None = None) -> "Qwen3Config":
        """Detect the geometry from a state dict in OUR layout (see weights/qwen3.to_native); shapes only, so meta
        tensors work. config.json supplies rope_theta / rms_norm_eps and is cross-checked against the shapes."""
        def shape(key):
            if key not in sd:
                raise WeightError(f"Qwen3 text encoder: key {key!r} not found; is this a Qwen3 checkpoint? "
                                  f"(first keys: {sorted(sd)[:5]})")
            return tuple(sd[key].shape)

        vocab, hidden = shape("embed_tokens.weight")
        head_dim = shape("layers.0.self_attn.q_norm.weight")[0]
        layers = {qwen3_keys.layer_index(k) for k in sd} - {None}
        if layers != set(range(len(layers))):
            missing = sorted(set(range(max(layers) + 1)) - layers)
            raise WeightError(f"Qwen3 text encoder: decoder layers {missing} are missing from the checkpoint "
                              "(truncated or partial download?)")
        cfg = cls(vocab_size=vocab, hidden_size=hidden, head_dim=head_dim,
                  intermediate_size=shape("layers.0.mlp.gate_proj.weight")[0],
                  num_hidden_layers=len(layers),
                  num_attention_heads=shape("layers.0.self_attn.q_proj.weight")[0] // head_dim,
                  num_key_value_heads=shape("layers.0.self_attn.k_proj.weight")[0] // head_dim)
        if config_json:
            cfg.rope_theta, cfg.rms_norm_eps = _theta_and_eps(config_json)
            _cross_check(cfg, config_json)
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise WeightError(f"Qwen3 text encoder: {cfg.num_attention_heads} query heads are not a multiple of "
                              f"{cfg.num_key_value_heads} KV heads")
        return cfg


    def resolve_layer(self, k: int, n_built: int, has_norm: bool) -> int:
        """HF hidden_states index (negatives count from the end of the FULL model's tuple) -> 0..num_layers, for an
        encoder built with `n_built` layers (and the final norm when `has_norm`)."""
        total = self.num_layers + 1
        i = k + total if k < 0 else k
        if not 0 <= i < total:
            raise ConfigError(f"hidden-state index {k} is out of range for a {self.num_layers}-layer Qwen3")
        if i > n_built or (i == self.num_layers and not has_norm):
            what = f"{i} Qwen3 layers" + (" and the final norm" if i == total - 1 else "")
            raise ConfigError(f"hidden-state index {k} needs {what}, but this encoder was loaded with only "
                              f"{n_built}: load it with max_layers >= {i}")
        return i


def _theta_and_eps(config_json: dict) -> tuple[float, float]:
    """rope_theta: transformers <5 writes `rope_theta`, 5.x `rope_parameters.rope_theta`; default 1e6 (Qwen3)."""
    rope = config_json.get("rope_parameters") or {}
    scaling = config_json.get("rope_scaling") or {}
    kind = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise ConfigError(f"Qwen3 config asks for RoPE type {kind!r}; only the default RoPE of Qwen3-4B/8B "
                          "is supported")
    theta = config_json.get("rope_theta", rope.get("rope_theta", 1e6))
    return float(theta), float(config_json.get("rms_norm_eps", 1e-6))


def _cross_check(cfg: Qwen3Config, config_json: dict) -> None:
    """A config.json that disagrees with the tensors means a mixed-up folder; say so instead of computing garbage."""
    bad = [f"{f.name}: config.json {config_json[f.name]} vs weights {getattr(cfg, f.name)}"
           for f in fields(cfg) if f.name not in ("rope_theta", "rms_norm_eps") and f.name in config_json
           and config_json[f.name] is not None and config_json[f.name] != getattr(cfg, f.name)]
    if bad:
        raise WeightError("Qwen3 text encoder: config.json does not match the weights (" + "; ".join(bad) + ")")


# ------------------------------------------------------------------------------------------------ VAEs
# The FLUX.1 VAE's latent normalisation, (mean - shift) * scale (Z-Image's vae/config.json; ComfyUI latent_formats.Flux)
FLUX1_SCALE = 0.3611
FLUX1_SHIFT = 0.1159

GN_EPS = 1e-6  # every GroupNorm in both VAEs (diffusers resnet_eps, BFL eps=1e-6)


@dataclass
class VAEConfig:
    """Defaults are the real FLUX.2 VAE (diffusers `AutoencoderKLFlux2()` defaults, docs/MODELS.md §V1)."""
    kind: str = "flux2"                                       # "flux2" | "flux1"
    in_channels: int = 3
    out_channels: int = 3
    enc_channels: tuple[int, ...] = (128, 256, 512, 512)     # per level, level 0 = full resolution
    dec_channels: tuple[int, ...] = (128, 256, 512, 512)     # LDM order too (decoder runs them backwards)
    enc_blocks: int = 2                                      # ResnetBlocks per encoder level (layers_per_block)
    dec_blocks: int = 3                                      # per decoder level (layers_per_block + 1)
    z_channels: int = 32                                     # posterior channels (FLUX.1: 16)
    mid_attention: bool = True
    norm_num_groups: int = 32
    quant_conv: bool = True                                  # FLUX.2 only
    batch_norm_eps: float = 1e-4                             # FLUX.2 latent normalisation
    scaling_factor: float = FLUX1_SCALE                      # FLUX.1 latent scale / shift (Z-Image vae/config.json)
    shift_factor: float = FLUX1_SHIFT

    @property
    def levels(self) -> int:
        return len(self.dec_channels)


def flux1_config() -> VAEConfig:
    """The real FLUX.1 VAE (Z-Image's `vae/`, BFL `ae.safetensors`)."""
    return VAEConfig(kind="flux1", z_channels=16, quant_conv=False)


# ------------------------------------------------------------------------------------------------ blocks


def config_from_weights(sd: Mapping, kind: str, config: dict | None = None,
                        norm_num_groups: int | None = None) -> VAEConfig:
    """Structure from the (native-layout) shapes; groups, eps and latent scale/shift from config.json when present."""
    config = config or {}
    enc = _level_widths(sd, "encoder.down", "block.0.conv1.weight")
    dec = _level_widths(sd, "decoder.up", "block.0.conv1.weight")
    if not enc or not dec:
        raise WeightError("VAE checkpoint needs both an encoder (`encoder.down.N.*`) and a decoder (`decoder.up.N.*`); "
                          f"found {len(enc)} encoder and {len(dec)} decoder levels.")
    for key in ("encoder.conv_in.weight", "decoder.conv_in.weight", "decoder.conv_out.weight"):
        if key not in sd:
            raise WeightError(f"VAE checkpoint lacks {key}; is this a complete VAE file?")
    defaults = VAEConfig() if kind == "flux2" else flux1_config()
    cfg = VAEConfig(
        kind=kind,
        in_channels=sd["encoder.conv_in.weight"].shape[1],
        out_channels=sd["decoder.conv_out.weight"].shape[0],
        enc_channels=enc, dec_channels=dec,
        enc_blocks=_count(sd, r"encoder\.down\.0\.block\.(\d+)\."),
        dec_blocks=_count(sd, r"decoder\.up\.0\.block\.(\d+)\."),
        z_channels=sd["decoder.conv_in.weight"].shape[1],
        mid_attention=any(".mid.attn_1." in k for k in sd),  # any key: a missing one is then reported by name
        norm_num_groups=int(norm_num_groups or config.get("norm_num_groups") or defaults.norm_num_groups),
        quant_conv=kind == "flux2",
        batch_norm_eps=float(_get(config, "batch_norm_eps", defaults.batch_norm_eps)),
        scaling_factor=float(_get(config, "scaling_factor", defaults.scaling_factor)),
        shift_factor=float(_get(config, "shift_factor", defaults.shift_factor)),
    )
    bad = sorted({c for c in enc + dec if c % cfg.norm_num_groups})
    if bad:
        raise ConfigError(f"VAE GroupNorm: {cfg.norm_num_groups} groups do not divide the channel widths {bad}. "
                          "The group count is not stored in the weights: pass norm_num_groups= to load_vae, or put "
                          "it in config.json / the safetensors metadata `config` JSON.")
    return cfg


def _get(config: dict, key: str, default):
    value = config.get(key)
    return default if value is None else value


def _count(sd: Mapping, pattern: str) -> int:
    pat = re.compile("^" + pattern)
    return len({m.group(1) for k in sd if (m := pat.match(k))})


def _level_widths(sd: Mapping, prefix: str, leaf: str) -> tuple[int, ...]:
    n = _count(sd, re.escape(prefix) + r"\.(\d+)\.")
    try:
        return tuple(int(sd[f"{prefix}.{i}.{leaf}"].shape[0]) for i in range(n))
    except KeyError as e:
        raise WeightError(f"VAE checkpoint lacks {e.args[0]}; levels must be numbered 0..{n - 1}.") from None


