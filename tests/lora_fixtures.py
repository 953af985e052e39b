"""LoRA fixtures: one random ground-truth delta bank per tiny model, written out in every file format the real tools
write (key names, α conventions, metadata, storage dtypes), plus the expected merged weights computed here in float64
numpy from the STORED tensors (so bf16 / fp16 storage is part of the truth, and nothing of flux_core is used).

A writer returns a `Fixture`: the safetensors dict, its header metadata, and `Expect` entries saying which native
weight rows each stored adapter changes and how. `expected_weights(base, fixture, strength)` applies them.

Formats and the tools they mirror (docs/LORA.md has the sources):
  klein   ai_toolkit (diffusion_model.<BFL> A/B, no α, bf16)  kohya (lora_unet_<BFL_> down/up + .alpha, dense qkv)
          kohya_sparse (block-diagonal q/k/v on the fused qkv, α x3)  diffusers (transformer.<diffusers> + PEFT
          metadata, rank/alpha patterns)  diffusers_rslora  fal (base_model.model.<BFL> incl. globals)
          diffsynth (bare diffusers + .lora_A.default.weight)  comfy (diffusion_model.<BFL> up/down, α = 1.0)
          lokr_full (α 1e10 -> inf in fp16)  lokr_factor (lycoris_<diffusers_>)  loha  dora_scale  dora_peft
          dora_magnitude (ai-toolkit)  diff  duplicate (fused + split both present)  te_only / junk extras
  zimage  the same families with Z-Image's conventions (ai-toolkit/mflux diffusers names, musubi raw split names and
          its ComfyUI conversion, ComfyUI-native fused qkv incl. context_refiner, .diff_b on biases)
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np
import torch

RANKS = (1, 3, 6, 4, 2, 5)


@dataclass
class Expect:
    key: str                      # native weight key
    rows: tuple | None            # row slice (None: all)
    delta: np.ndarray             # float64, in the SOURCE module's row order
    swap: bool = False
    dora: tuple | None = None     # (magnitude [out], per_row)


@dataclass
class Fixture:
    name: str
    sd: dict
    metadata: dict = field(default_factory=dict)
    expect: list = field(default_factory=list)
    diffusers_reads: bool = False   # diffusers' load_lora_weights accepts this format


def _rng(*names) -> np.random.Generator:
    h = int(hashlib.sha256("/".join(map(str, names)).encode()).hexdigest()[:12], 16)
    return np.random.default_rng(h)


def _f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _t(a: np.ndarray, dtype) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(dtype)


class Bank:
    """Deterministic random LoRAs per (model, module name): ranks 1/3/6/... differ per module, α differs from r."""

    def __init__(self, model: str):
        self.model = model
        self.count = 0

    def lora(self, module: str, out_f: int, in_f: int, salt=""):
        g = _rng(self.model, module, salt)
        r = RANKS[int(g.integers(0, len(RANKS)))]
        r = max(1, min(r, out_f, in_f))
        a = g.standard_normal((r, in_f)) * 0.3
        b = g.standard_normal((out_f, r)) * 0.3
        alpha = float(g.choice([0.5, 1.0, 2.0 * r, r + 1.5]))
        return a, b, alpha

    def matrix(self, module: str, shape, salt="", scale=0.05):
        return _rng(self.model, module, salt).standard_normal(shape) * scale


# ------------------------------------------------------------------------------------------------ module sets

def diffusers_names(shapes: dict, family: str) -> dict:
    """{native weight key: [(diffusers module name, rows, swap)]}, from the diffusers -> native rules of our key map
    (keys they do not mention have the same name in both layouts)."""
    from flux_core.families import FAMILIES
    from flux_core.weights.keymap import _compile

    out = {}
    for rule in FAMILIES[family].keys.DIFFUSERS.rules:
        pattern = _compile(rule.native)
        for key in shapes:
            m = pattern.match(key)
            if not m:
                continue
            names = [src.format(**m.groupdict()).rsplit(".", 1)[0] for src in rule.sources]
            size = shapes[key][0] // len(names)
            out[key] = [(n, (i * size, (i + 1) * size) if rule.op == "cat" else None, rule.op == "swap_halves")
                        for i, n in enumerate(names)]
    return out


def _linears(shapes, prefixes):
    return [k for k in sorted(shapes) if k.endswith(".weight") and len(shapes[k]) == 2 and k.startswith(prefixes)]


KLEIN_BLOCKS = ("double_blocks.", "single_blocks.")
KLEIN_GLOBALS = ("img_in.", "txt_in.", "time_in.", "double_stream_modulation_", "single_stream_modulation.",
                 "final_layer.")


def modules(shapes: dict, family: str, prefixes, split: bool, skip=()) -> list:
    """[(native key, rows, source module name, swap)] for the Linears under `prefixes`; split=True uses the
    diffusers (split q/k/v, norm_out) names, split=False ours."""
    names = diffusers_names(shapes, family) if split else {}
    out = []
    for key in _linears(shapes, prefixes):
        if any(s in key for s in skip):
            continue
        for name, rows, swap in names.get(key, [(key[:-7], None, False)]):
            out.append((key, rows, name, swap))
    return out


def _rows_shape(shapes, key, rows):
    out_f, in_f = shapes[key]
    return (rows[1] - rows[0] if rows else out_f), in_f


# ------------------------------------------------------------------------------------------------ LoRA writers

def write_lora(name, bank, shapes, modules, *, prefix, down, up, alpha_mode, dtype=torch.bfloat16, flatten=False,
               metadata=None, rslora=False, diffusers_reads=False) -> Fixture:
    """Generic A/B writer. alpha_mode: 'tensor' (.alpha stored), 'fold' (α/r baked into B, no .alpha),
    'one' (.alpha = 1.0, ComfyUI's trainer), 'peft' (α in the header, scale α/r or α/√r), 'sqrt' (√(α/r) in both)."""
    fx = Fixture(name, {}, diffusers_reads=diffusers_reads)
    alphas, ranks = {}, {}
    for key, rows, src, swap in modules:
        out_f, in_f = _rows_shape(shapes, key, rows)
        a, b, alpha = bank.lora(src, out_f, in_f)
        r = a.shape[0]
        mod = prefix + (src.replace(".", "_") if flatten else src)
        if alpha_mode == "fold":
            b, scale = b * (alpha / r), 1.0
        elif alpha_mode == "sqrt":
            a, b, scale = a * np.sqrt(alpha / r), b * np.sqrt(alpha / r), 1.0
        elif alpha_mode == "one":
            alpha, scale = 1.0, 1.0 / r
        elif alpha_mode == "peft":
            scale = alpha / np.sqrt(r) if rslora else alpha / r
            alphas[src], ranks[src] = alpha, r
        else:
            scale = alpha / r
        A, B = _t(a, dtype), _t(b, dtype)
        fx.sd[f"{mod}.{down}"], fx.sd[f"{mod}.{up}"] = A, B
        if alpha_mode in ("tensor", "one"):
            fx.sd[f"{mod}.alpha"] = torch.tensor(alpha, dtype=dtype)
            scale = _f64(fx.sd[f"{mod}.alpha"]).item() / r
        fx.expect.append(Expect(key, rows, scale * (_f64(B) @ _f64(A)), swap))
    if alpha_mode == "peft":
        fx.metadata = {"lora_adapter_metadata": json.dumps(peft_metadata(alphas, ranks, rslora)), "format": "pt"}
    if metadata:
        fx.metadata.update(metadata)
    return fx


def peft_metadata(alphas: dict, ranks: dict, rslora: bool) -> dict:
    """A LoraConfig dict the way diffusers' save_lora_weights writes it: fields prefixed `transformer.`, the most
    common rank / α as r / lora_alpha, the others in rank_pattern / alpha_pattern."""
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    cfg = {"r": r, "lora_alpha": alpha, "use_rslora": rslora, "use_dora": False, "peft_type": "LORA",
           "rank_pattern": {k: v for k, v in ranks.items() if v != r},
           "alpha_pattern": {k: v for k, v in alphas.items() if v != alpha},
           "target_modules": sorted(ranks), "lora_dropout": 0.0, "bias": "none"}
    return {f"transformer.{k}": v for k, v in cfg.items()}


def write_block_diag(name, bank, shapes, groups, *, prefix, flatten=True, dtype=torch.float32) -> Fixture:
    """musubi's lossless q/k/v fusion (its Z-Image -> ComfyUI converter, kohya-sparse klein): down = cat(A_q,A_k,A_v),
    up = block_diag(B_q, B_k, B_v), α x3 so that α/r is unchanged. groups: [(fused key, fused name, [split rows])]."""
    fx = Fixture(name, {})
    for key, fused, parts in groups:
        As, Bs, alpha0 = [], [], None
        out_f, in_f = shapes[key]
        size = out_f // len(parts)
        for src in parts:   # every part rank 2, so the shared α means the same α/r for each
            As.append(bank.matrix(src, (2, in_f), "bdA", 0.3))
            Bs.append(bank.matrix(src, (size, 2), "bdB", 0.3))
        alpha0 = 1.5
        down = np.concatenate(As)
        up = np.zeros((out_f, down.shape[0]))
        for i, b in enumerate(Bs):
            up[i * size:(i + 1) * size, 2 * i:2 * i + 2] = b
        mod = prefix + (fused.replace(".", "_") if flatten else fused)
        fx.sd[f"{mod}.lora_down.weight"], fx.sd[f"{mod}.lora_up.weight"] = _t(down, dtype), _t(up, dtype)
        fx.sd[f"{mod}.alpha"] = torch.tensor(3 * alpha0, dtype=dtype)
        scale = 3 * alpha0 / down.shape[0]
        fx.expect.append(Expect(key, None, scale * (_f64(fx.sd[f"{mod}.lora_up.weight"])
                                                    @ _f64(fx.sd[f"{mod}.lora_down.weight"]))))
    return fx


def _factor(n: int) -> tuple[int, int]:
    """n = p * q with p the largest divisor <= sqrt(n) (LyCORIS' factorization)."""
    p = int(np.sqrt(n))
    while n % p:
        p -= 1
    return p, n // p


def write_lokr(name, bank, shapes, modules, *, prefix, flatten, factorised: bool, dtype=torch.float16) -> Fixture:
    fx = Fixture(name, {})
    for key, rows, src, swap in modules:
        out_f, in_f = _rows_shape(shapes, key, rows)
        (a, c), (b, d) = _factor(out_f), _factor(in_f)
        mod = prefix + (src.replace(".", "_") if flatten else src)
        w1 = bank.matrix(src, (a, b), "w1", 0.5)
        fx.sd[f"{mod}.lokr_w1"] = _t(w1, dtype)
        if factorised:
            r = 2
            w2a, w2b = bank.matrix(src, (c, r), "w2a", 0.5), bank.matrix(src, (r, d), "w2b", 0.5)
            fx.sd[f"{mod}.lokr_w2_a"], fx.sd[f"{mod}.lokr_w2_b"] = _t(w2a, dtype), _t(w2b, dtype)
            fx.sd[f"{mod}.alpha"] = torch.tensor(3.0, dtype=dtype)
            w2, scale = _f64(fx.sd[f"{mod}.lokr_w2_a"]) @ _f64(fx.sd[f"{mod}.lokr_w2_b"]), 3.0 / r
        else:
            fx.sd[f"{mod}.lokr_w2"] = _t(bank.matrix(src, (c, d), "w2", 0.5), dtype)
            # ai-toolkit full-rank LoKr: linear_alpha = 9999999999, inf once stored in fp16; it must be ignored
            fx.sd[f"{mod}.alpha"] = torch.tensor(9999999999.0, dtype=dtype)
            w2, scale = _f64(fx.sd[f"{mod}.lokr_w2"]), 1.0
        fx.expect.append(Expect(key, rows, scale * np.kron(_f64(fx.sd[f"{mod}.lokr_w1"]), w2), swap))
    return fx


def write_loha(name, bank, shapes, modules, *, prefix, flatten, dtype=torch.bfloat16) -> Fixture:
    fx = Fixture(name, {})
    for key, rows, src, swap in modules:
        out_f, in_f = _rows_shape(shapes, key, rows)
        r = 3
        mod = prefix + (src.replace(".", "_") if flatten else src)
        parts = {p: bank.matrix(src, s, p, 0.4) for p, s in
                 (("hada_w1_a", (out_f, r)), ("hada_w1_b", (r, in_f)), ("hada_w2_a", (out_f, r)), ("hada_w2_b", (r, in_f)))}
        for p, v in parts.items():
            fx.sd[f"{mod}.{p}"] = _t(v, dtype)
        fx.sd[f"{mod}.alpha"] = torch.tensor(2.0, dtype=dtype)
        g = {p: _f64(fx.sd[f"{mod}.{p}"]) for p in parts}
        fx.expect.append(Expect(key, rows, (2.0 / r) * (g["hada_w1_a"] @ g["hada_w1_b"]) * (g["hada_w2_a"] @ g["hada_w2_b"]),
                                swap))
    return fx


def write_dora(name, bank, shapes, base: dict, modules, *, prefix, flatten, encoding, down, up,
               dtype=torch.float32) -> Fixture:
    """DoRA: 'dora_scale' (LyCORIS/kohya, [out, 1] per-row or [1, in] per-column, with .alpha), 'peft'
    (lora_magnitude_vector [out], α = r) or 'magnitude' (ai-toolkit, [out], α folded)."""
    fx = Fixture(name, {})
    for i, (key, rows, src, swap) in enumerate(modules):
        out_f, in_f = _rows_shape(shapes, key, rows)
        a, b, alpha = bank.lora(src, out_f, in_f, salt="dora")
        r = a.shape[0]
        mod = prefix + (src.replace(".", "_") if flatten else src)
        per_row = not (encoding == "dora_scale" and i % 2)
        w = _f64(base[key])[rows[0]:rows[1]] if rows else _f64(base[key])
        norm = np.linalg.norm(w, axis=1) if per_row else np.linalg.norm(w, axis=0)
        mag = norm * (1.0 + 0.2 * bank.matrix(src, norm.shape, "mag", 1.0))
        A, B = _t(a, dtype), _t(b, dtype)
        fx.sd[f"{mod}.{down}"], fx.sd[f"{mod}.{up}"] = A, B
        if encoding == "dora_scale":
            fx.sd[f"{mod}.alpha"] = torch.tensor(alpha, dtype=dtype)
            fx.sd[f"{mod}.dora_scale"] = _t(mag.reshape(-1, 1) if per_row else mag.reshape(1, -1), dtype)
            scale = alpha / r
        else:
            fx.sd[f"{mod}.{'lora_magnitude_vector' if encoding == 'peft' else 'magnitude'}"] = _t(mag, dtype)
            scale = 1.0
        m = _f64(fx.sd[[k for k in fx.sd if k.startswith(mod + ".") and ("magnitude" in k or "dora_scale" in k)][0]])
        fx.expect.append(Expect(key, rows, scale * (_f64(B) @ _f64(A)), swap, dora=(m.reshape(-1), per_row)))
    if encoding == "peft":
        fx.metadata = {"lora_adapter_metadata": json.dumps({"transformer.use_dora": True}), "format": "pt"}
    return fx


def write_diff(name, bank, shapes, keys, *, prefix, biases=()) -> Fixture:
    fx = Fixture(name, {})
    for key in keys:
        d = bank.matrix(key, shapes[key], "diff", 0.02)
        fx.sd[f"{prefix}{key[:-7]}.diff"] = _t(d, torch.float32)
        fx.expect.append(Expect(key, None, _f64(fx.sd[f"{prefix}{key[:-7]}.diff"])))
    for key in biases:
        d = bank.matrix(key, shapes[key], "diff_b", 0.02)
        fx.sd[f"{prefix}{key[:-5]}.diff_b"] = _t(d, torch.float32)
        fx.expect.append(Expect(key, None, _f64(fx.sd[f"{prefix}{key[:-5]}.diff_b"])))
    return fx


# ------------------------------------------------------------------------------------------------ expectation

def expected_weights(base: dict, fixtures_and_strengths, keys=None) -> dict:
    """float64 {key: W'} = base patched by every Expect of every (fixture, strength), in order."""
    out = {k: _f64(v).copy() for k, v in base.items() if keys is None or k in keys}
    for fx, s in fixtures_and_strengths:
        for e in fx.expect:
            w = out[e.key]
            lo, hi = e.rows if e.rows else (0, w.shape[0])
            region = w[lo:hi].copy()
            if e.swap:
                h = region.shape[0] // 2
                region = np.concatenate([region[h:], region[:h]])
            if e.dora is None:
                new = region + s * e.delta.reshape(region.shape)
            else:
                m, per_row = e.dora
                merged = region + e.delta
                norm = (np.linalg.norm(merged, axis=1, keepdims=True) if per_row
                        else np.linalg.norm(merged, axis=0, keepdims=True))
                target = merged * ((m.reshape(-1, 1) if per_row else m.reshape(1, -1)) / norm)
                new = region + s * (target - region)
            if e.swap:
                h = new.shape[0] // 2
                new = np.concatenate([new[h:], new[:h]])
            w[lo:hi] = new
    return out


# ------------------------------------------------------------------------------------------------ catalogues

def klein_fixtures(shapes: dict, base: dict) -> dict:
    """Every klein format, one Fixture each, from one bank."""
    bank = Bank("klein")
    blocks = modules(shapes, "klein", KLEIN_BLOCKS, split=False)
    everything = modules(shapes, "klein", KLEIN_BLOCKS + KLEIN_GLOBALS, split=False)
    d_blocks = modules(shapes, "klein", KLEIN_BLOCKS, split=True)
    d_all = modules(shapes, "klein", KLEIN_BLOCKS + KLEIN_GLOBALS, split=True)
    fx = [
        write_lora("ai_toolkit", bank, shapes, blocks, prefix="diffusion_model.", down="lora_A.weight",
                   up="lora_B.weight", alpha_mode="fold", diffusers_reads=True),
        write_lora("bfl_down_up", bank, shapes, blocks, prefix="diffusion_model.", down="lora_down.weight",
                   up="lora_up.weight", alpha_mode="tensor"),
        # float32: diffusers folds α into bf16 tensors (a rounding of its own), which would blur the oracle test
        write_lora("kohya", bank, shapes, blocks, prefix="lora_unet_", down="lora_down.weight", up="lora_up.weight",
                   alpha_mode="tensor", flatten=True, dtype=torch.float32, diffusers_reads=True),
        write_block_diag("kohya_sparse", bank, shapes,
                         [(k, k[:-7], [f"{k[:-7]}.{p}" for p in "qkv"]) for k, _, _, _ in blocks
                          if k.endswith("attn.qkv.weight")], prefix="lora_unet_"),
        write_lora("diffusers", bank, shapes, d_all, prefix="transformer.", down="lora_A.weight",
                   up="lora_B.weight", alpha_mode="peft", dtype=torch.float32, diffusers_reads=True),
        write_lora("diffusers_rslora", bank, shapes, d_blocks, prefix="transformer.", down="lora_A.weight",
                   up="lora_B.weight", alpha_mode="peft", rslora=True, dtype=torch.float32, diffusers_reads=True),
        write_lora("fal", bank, shapes, everything, prefix="base_model.model.", down="lora_A.weight",
                   up="lora_B.weight", alpha_mode="fold", dtype=torch.float32, diffusers_reads=True),
        write_lora("diffsynth", bank, shapes, d_blocks, prefix="", down="lora_A.default.weight",
                   up="lora_B.default.weight", alpha_mode="fold", dtype=torch.float32),
        write_lora("comfy", bank, shapes, everything, prefix="diffusion_model.", down="lora_down.weight",
                   up="lora_up.weight", alpha_mode="one", dtype=torch.float16),
        write_lokr("lokr_full", bank, shapes, blocks, prefix="diffusion_model.", flatten=False, factorised=False),
        write_lokr("lokr_factor", bank, shapes, d_blocks, prefix="lycoris_", flatten=True, factorised=True),
        write_loha("loha", bank, shapes, d_blocks, prefix="lycoris_", flatten=True),
        write_dora("dora_scale", bank, shapes, base, blocks, prefix="lora_unet_", flatten=True,
                   encoding="dora_scale", down="lora_down.weight", up="lora_up.weight"),
        write_dora("dora_peft", bank, shapes, base, d_all, prefix="transformer.", flatten=False, encoding="peft",
                   down="lora_A.weight", up="lora_B.weight"),
        write_dora("dora_magnitude", bank, shapes, base, blocks, prefix="diffusion_model.", flatten=False,
                   encoding="magnitude", down="lora_A.weight", up="lora_B.weight"),
        write_diff("diff", bank, shapes, [k for k, _, _, _ in everything], prefix="diffusion_model."),
    ]
    return {f.name: f for f in fx}


ZIMAGE_KINDS = ("layers.", "noise_refiner.", "context_refiner.")
ZIMAGE_GLOBALS = ("x_embedder.", "cap_embedder.", "t_embedder.", "final_layer.")


def zimage_fixtures(shapes: dict, base: dict) -> dict:
    bank = Bank("zimage")
    d_layers = modules(shapes, "zimage", ("layers.",), split=True)
    raw_musubi = modules(shapes, "zimage", ("layers.",), split=True, skip=("adaLN",))
    d_all = modules(shapes, "zimage", ZIMAGE_KINDS + ZIMAGE_GLOBALS, split=True)
    native_all = modules(shapes, "zimage", ZIMAGE_KINDS + ZIMAGE_GLOBALS, split=False)
    native_layers = modules(shapes, "zimage", ZIMAGE_KINDS, split=False)
    qkv = [k for k in _linears(shapes, ZIMAGE_KINDS) if k.endswith("attention.qkv.weight")]
    fx = [
        write_lora("ai_toolkit", bank, shapes, d_layers, prefix="diffusion_model.", down="lora_A.weight",
                   up="lora_B.weight", alpha_mode="fold", diffusers_reads=True),
        write_lora("musubi", bank, shapes, raw_musubi, prefix="lora_unet_", down="lora_down.weight",
                   up="lora_up.weight", alpha_mode="tensor", flatten=True, dtype=torch.float32, diffusers_reads=True),
        write_block_diag("musubi_comfy", bank, shapes,
                         [(k, k[:-7], [f"{k[:-len('qkv.weight')]}to_{p}" for p in "qkv"]) for k in qkv
                          if k.startswith("layers.")], prefix="lora_unet_"),
        write_lora("musubi_diffusers", bank, shapes, raw_musubi, prefix="diffusion_model.", down="lora_A.weight",
                   up="lora_B.weight", alpha_mode="sqrt", diffusers_reads=True),
        write_lora("diffusers", bank, shapes, d_all, prefix="transformer.", down="lora_A.weight",
                   up="lora_B.weight", alpha_mode="peft", dtype=torch.float32, diffusers_reads=True),
        write_lora("diffusers_rslora", bank, shapes, d_layers, prefix="transformer.", down="lora_A.weight",
                   up="lora_B.weight", alpha_mode="peft", rslora=True, dtype=torch.float32, diffusers_reads=True),
        write_lora("diffsynth", bank, shapes, d_layers, prefix="", down="lora_A.default.weight",
                   up="lora_B.default.weight", alpha_mode="fold", dtype=torch.float32, diffusers_reads=True),
        write_lora("comfy", bank, shapes, native_all, prefix="diffusion_model.", down="lora_down.weight",
                   up="lora_up.weight", alpha_mode="one", dtype=torch.float16),
        write_lokr("lokr_full", bank, shapes, d_layers, prefix="diffusion_model.", flatten=False, factorised=False),
        write_lokr("lokr_factor", bank, shapes, d_all, prefix="lycoris_", flatten=True, factorised=True),
        write_loha("loha", bank, shapes, d_all, prefix="lycoris_", flatten=True),
        write_dora("dora_scale", bank, shapes, base, native_layers, prefix="lora_unet_", flatten=True,
                   encoding="dora_scale", down="lora_down.weight", up="lora_up.weight"),
        write_dora("dora_peft", bank, shapes, base, d_layers, prefix="transformer.", flatten=False,
                   encoding="peft", down="lora_A.weight", up="lora_B.weight"),
        write_diff("diff", bank, shapes, [k for k, _, _, _ in native_all], prefix="diffusion_model.",
                   biases=[k for k in sorted(shapes) if k.endswith(".bias")]),
    ]
    return {f.name: f for f in fx}


def save(fx: Fixture, folder) -> str:
    from safetensors.torch import save_file

    path = f"{folder}/{fx.name}.safetensors"
    save_file({k: v.contiguous() for k, v in fx.sd.items()}, path, metadata=fx.metadata or None)
    return path


# names the LoRA example workflows pick (workflows/fluxcore_*_lora.json); LoRAs have no standard download
DEMO_LORAS = {"klein_style_lora.safetensors": ("klein", "kohya"),
              "klein_detail_lora.safetensors": ("klein", "lokr_factor"),
              "zimage_style_lora.safetensors": ("zimage", "musubi")}


def write_demo_loras(paths: dict) -> dict:
    """LoRAs for the tiny demo checkpoints (flux_core.demo.write_demo_checkpoints' {role: path}) under the names the
    example workflows use, into <models root>/loras/. Returns {file name: path}."""
    from flux_core import models
    from flux_core.torch.lora import weight_shapes

    folder = paths["klein"].parents[1] / "loras"
    folder.mkdir(parents=True, exist_ok=True)
    made = {}
    for role, make in (("klein", klein_fixtures), ("zimage", zimage_fixtures)):
        base = models.load_transformer(paths[role], "torch", dtype="float32")
        made[role] = make(weight_shapes(base.module), base.module.state_dict())
    out = {}
    for name, (role, fmt) in DEMO_LORAS.items():
        fx = made[role][fmt]
        out[name] = save(Fixture(name[:-len(".safetensors")], fx.sd, fx.metadata, fx.expect), folder)
    return out
