"""Reading a LoRA file: safetensors only, keys split into (module name, part), parts turned into adapters.

Key anatomy: `<prefix><module name>.<part>`. The part names the adapter type, whatever tool wrote it:
  lora_up / lora_B / lora.up / lora_B.<adapter>.weight (PEFT's `.default`, DiffSynth) -> B      (LoRA)
  lora_down / lora_A / lora.down / lora_A.<adapter>.weight                            -> A
  alpha (0-d, any float dtype)                                                        -> α
  lokr_w1 | lokr_w1_a + lokr_w1_b, lokr_w2 | lokr_w2_a + lokr_w2_b                    -> LoKr
  hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b                                          -> LoHa
  dora_scale (LyCORIS), lora_magnitude_vector (PEFT), magnitude (ai-toolkit)          -> DoRA on the LoRA
  diff / diff_b                                                                       -> full ΔW of the weight / bias
Parts we recognise but do not implement (Tucker `lora_mid`, `lokr_t2`, `hada_t*`, OFT, GLoRA, `set_weight`, ...)
are reported as "not supported", never dropped silently. The module name is resolved later (`resolve.py`) by lookup.

α for files without `.alpha` tensors (diffusers / PEFT): the safetensors header key `lora_adapter_metadata` holds the
PEFT LoraConfig with keys prefixed `transformer.` (`lora_alpha`, `alpha_pattern`, `use_rslora`, ...), see diffusers
`loaders/lora_base.py`; without it α = r, scale 1 (diffusers `utils/peft_utils.py get_peft_kwargs`).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import WeightError
from .adapters import DoRA, Full, LoHa, LoKr, LoRA

_ADAPTER = r"(?:\.[A-Za-z0-9_\-]+)?"
_PARTS = [
    ("up", rf"lora_up\.weight|lora_B{_ADAPTER}\.weight|lora\.up\.weight|lora_linear_layer\.up\.weight"),
    ("down", rf"lora_down\.weight|lora_A{_ADAPTER}\.weight|lora\.down\.weight|lora_linear_layer\.down\.weight"),
    ("alpha", r"alpha"),
    ("dora_scale", r"dora_scale"),
    ("magnitude", rf"lora_magnitude_vector{_ADAPTER}(?:\.weight)?|magnitude"),
    ("lokr", r"lokr_(?:w1|w2|w1_a|w1_b|w2_a|w2_b)"),
    ("loha", r"hada_(?:w1_a|w1_b|w2_a|w2_b)"),
    ("diff", r"diff"),
    ("diff_b", r"diff_b"),
    ("unsupported", r"lora_mid\.weight|lokr_t[12]|hada_t[12]|oft_blocks|rescale|[ab][12]\.weight|set_weight|"
                    r"w_norm|b_norm|reshape_weight|lora_B\.bias|lora_up\.bias"),
]
_PART_RE = re.compile(r"^(?P<module>.+?)\.(?P<part>" + "|".join(f"(?P<{n}>{p})" for n, p in _PARTS) + r")$")
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl")


@dataclass
class Module:
    """All tensors of one module of the file, by part name (`up`, `down`, `alpha`, `lokr_w1`, ...)."""
    name: str
    parts: dict = field(default_factory=dict)
    keys: list = field(default_factory=list)


@dataclass
class LoraFile:
    path: str
    modules: dict            # module name -> Module
    loose: list              # keys that have no recognised part (reported as not recognised)
    metadata: dict

    @property
    def n_tensors(self) -> int:
        return sum(len(m.keys) for m in self.modules.values()) + len(self.loose)


def read_lora(path) -> LoraFile:
    """Read a LoRA .safetensors file (header metadata included). Pickle files are refused before anything is read."""
    from ..weights.io import read_safetensors

    p = Path(path).expanduser()
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise WeightError(f"{p.name}: pickle LoRA files ({p.suffix}) can run code when loaded and are refused. "
                          "Use the .safetensors version of this LoRA (most trainers write it; otherwise convert it "
                          "once in a trusted environment).")
    sd, meta = read_safetensors(p)
    return group(sd, meta, str(p))


def group(sd: dict, metadata: dict | None = None, path: str = "<memory>") -> LoraFile:
    modules, loose = {}, []
    for key in sd:
        m = _PART_RE.match(key)
        if not m:
            loose.append(key)
            continue
        part = m.group("part")
        kind = next(n for n, _ in _PARTS if m.group(n) is not None)
        name = part if kind in ("lokr", "loha") else kind
        if kind == "unsupported":
            name = "unsupported:" + part
        mod = modules.setdefault(m.group("module"), Module(m.group("module")))
        mod.parts[name] = sd[key]
        mod.keys.append(key)
    return LoraFile(path, modules, loose, dict(metadata or {}))


# ------------------------------------------------------------------------------------------------ α from metadata

@dataclass
class PeftAlpha:
    """The α rules of a diffusers / PEFT file's header (`lora_adapter_metadata`)."""
    alpha: float | None
    alpha_pattern: dict
    rslora: bool

    @classmethod
    def from_metadata(cls, metadata: dict) -> "PeftAlpha | None":
        raw = metadata.get("lora_adapter_metadata")
        if not raw:
            return None
        try:
            cfg = json.loads(raw)
        except ValueError:
            return None
        # diffusers prefixes every LoraConfig field with the component name ("transformer.lora_alpha")
        cfg = {k.split(".", 1)[1] if k.startswith(("transformer.", "unet.")) else k: v for k, v in cfg.items()}
        alpha = cfg.get("lora_alpha")
        return cls(None if alpha is None else float(alpha), dict(cfg.get("alpha_pattern") or {}),
                   bool(cfg.get("use_rslora")))

    def scale(self, module: str, rank: int) -> float:
        alpha = self.alpha
        for pattern, value in self.alpha_pattern.items():  # PEFT: the pattern matches the end of the module path
            if re.fullmatch(rf"(?:.*\.)?(?:{pattern})", module):
                alpha = float(value)
                break
        if alpha is None:
            alpha = float(rank)
        return alpha / math.sqrt(rank) if self.rslora else alpha / rank


# ------------------------------------------------------------------------------------------------ adapters

def _alpha(mod: Module) -> float | None:
    a = mod.parts.get("alpha")
    return None if a is None else float(a.float().reshape(-1)[0].item())


def build_adapters(mod: Module, short_name: str, peft: PeftAlpha | None) -> tuple[list, list, object | None]:
    """-> (weight adapters, unsupported part names, bias delta or None) for one module of the file."""
    p = mod.parts
    unsupported = [k.split(":", 1)[1] for k in p if k.startswith("unsupported:")]
    if unsupported:
        return [], unsupported, None
    out = []
    alpha = _alpha(mod)
    if "up" in p or "down" in p:
        if not ("up" in p and "down" in p):
            raise WeightError(f"{mod.name}: a LoRA needs both its up (B) and down (A) matrices; only one is in the file")
        rank = int(p["down"].shape[0])
        if alpha is not None:
            scale = alpha / rank
        elif peft is not None:
            scale = peft.scale(short_name, rank)
        else:
            scale = 1.0
        out.append(_with_dora(LoRA(p["up"], p["down"], scale), p, mod.name))
    if any(k.startswith("lokr_") for k in p):
        out.append(_with_dora(_lokr(p, alpha, mod.name), p, mod.name))
    if any(k.startswith("hada_") for k in p):
        need = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        if not all(k in p for k in need):
            raise WeightError(f"{mod.name}: LoHa needs {', '.join(need)}")
        dim = int(p["hada_w1_b"].shape[0])
        out.append(_with_dora(LoHa(*(p[k] for k in need), (alpha / dim) if alpha is not None else 1.0), p, mod.name))
    if "diff" in p:
        out.append(Full(p["diff"]))
    bias = Full(p["diff_b"]) if "diff_b" in p else None
    return out, [], bias


def _lokr(p: dict, alpha: float | None, name: str) -> LoKr:
    def factor(i):
        full, a, b = p.get(f"lokr_w{i}"), p.get(f"lokr_w{i}_a"), p.get(f"lokr_w{i}_b")
        if full is None and (a is None or b is None):
            raise WeightError(f"{name}: LoKr needs lokr_w{i} or both lokr_w{i}_a and lokr_w{i}_b")
        return (full, None) if full is not None else (None, (a, b))

    (w1, w1_ab), (w2, w2_ab) = factor(1), factor(2)
    scale = 1.0
    factorised = w2_ab if w2_ab is not None else w1_ab  # ComfyUI: w2's rank wins
    if factorised is not None and alpha is not None and math.isfinite(alpha):
        scale = alpha / int(factorised[1].shape[0])
    return LoKr(w1, w1_ab, w2, w2_ab, scale)


def _with_dora(inner, p: dict, name: str):
    if "magnitude" in p:
        return DoRA(inner, p["magnitude"].reshape(-1), per_row=True)
    if "dora_scale" in p:
        ds = p["dora_scale"]
        out, _ = inner.shape
        per_row = int(ds.shape[0]) == out and (len(ds.shape) == 1 or int(ds.reshape(ds.shape[0], -1).shape[1]) == 1)
        return DoRA(inner, ds.reshape(-1), per_row=per_row)
    return inner
