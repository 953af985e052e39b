"""Declarative checkpoint key maps and strict loading.

Every model in flux_core names its modules after the *original* checkpoint keys (BFL / ComfyUI / LDM / HF layout),
so a ComfyUI single file loads one to one. Other layouts (diffusers folders) are described by a list of `Rule`s
that say how their keys become ours. The same rules run backwards (`from_native`) so tests and the demo can write
files in the foreign layout.

A rule is data:
    Rule("double_blocks.{n}.img_attn.qkv.weight",
         ("transformer_blocks.{n}.attn.to_q.weight", "transformer_blocks.{n}.attn.to_k.weight",
          "transformer_blocks.{n}.attn.to_v.weight"), op="cat")
`{name}` placeholders match digits. Ops:
    copy        one source, same tensor
    cat         several sources concatenated along dim 0 (split back into equal parts)
    swap_halves one source whose two row halves swap (FLUX.2 final adaLN: BFL [shift;scale] vs diffusers [scale;shift])
    linear_to_conv1x1  diffusers Linear [O,I] <-> LDM 1x1 conv [O,I,1,1] (VAE mid-block attention)
Keys that match no rule pass through unchanged (most names are identical); strict loading then catches leftovers.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from ..errors import WeightError

_PLACEHOLDER = re.compile(r"\{(\w+)\}")
OPS = ("copy", "cat", "swap_halves", "linear_to_conv1x1")


@dataclass(frozen=True)
class Rule:
    native: str
    sources: tuple[str, ...]
    op: str = "copy"

    def __post_init__(self):
        if isinstance(self.sources, str):
            object.__setattr__(self, "sources", (self.sources,))
        if self.op not in OPS:
            raise ValueError(f"unknown key-map op {self.op!r}")
        if self.op != "cat" and len(self.sources) != 1:
            raise ValueError(f"op {self.op} takes one source: {self}")


def _compile(pattern: str) -> re.Pattern:
    parts, last = [], 0
    for m in _PLACEHOLDER.finditer(pattern):
        parts.append(re.escape(pattern[last:m.start()]))
        parts.append(f"(?P<{m.group(1)}>\\d+)")
        last = m.end()
    parts.append(re.escape(pattern[last:]))
    return re.compile("^" + "".join(parts) + "$")


@dataclass
class KeyMap:
    """Rules from one foreign layout to ours, plus keys to drop (e.g. `lm_head.weight`, `bn.num_batches_tracked`)."""

    rules: list[Rule]
    ignore: tuple[str, ...] = ()
    _fwd: list = field(default_factory=list, repr=False)
    _inv: list = field(default_factory=list, repr=False)

    def __post_init__(self):
        self._fwd = [(_compile(r.sources[0]), r) for r in self.rules]
        self._inv = [(_compile(r.native), r) for r in self.rules]
        self._ignore = [re.compile(p) for p in self.ignore]

    def ignored(self, key: str) -> bool:
        return any(p.search(key) for p in self._ignore)

    def to_native(self, sd: Mapping[str, "object"]) -> dict:
        """Foreign layout -> ours. Consumes every source key; unknown keys pass through for strict load to report."""
        out, used, passthrough = {}, set(), {}
        for key in sd:
            if key in used or self.ignored(key):
                continue
            for pat, rule in self._fwd:
                m = pat.match(key)
                if not m:
                    continue
                names = [s.format(**m.groupdict()) for s in rule.sources]
                missing = [n for n in names if n not in sd]
                if missing:
                    raise WeightError(f"checkpoint has {key} but not its partner key(s) {missing}")
                out[rule.native.format(**m.groupdict())] = _apply(rule.op, [sd[n] for n in names])
                used.update(names)
                break
            else:
                passthrough[key] = sd[key]
        # A later cat source (to_k) can come before its first source (to_q) in a sorted file: drop it once consumed.
        out.update({k: v for k, v in passthrough.items() if k not in used})
        return out

    def from_native(self, sd: Mapping[str, "object"]) -> dict:
        """Ours -> foreign layout (the inverse ops); used to write test fixtures and demo files."""
        out = {}
        for key, value in sd.items():
            for pat, rule in self._inv:
                m = pat.match(key)
                if not m:
                    continue
                names = [s.format(**m.groupdict()) for s in rule.sources]
                for name, part in zip(names, _invert(rule.op, value, len(names))):
                    out[name] = part
                break
            else:
                out[key] = value
        return out


def _apply(op: str, tensors: list):
    t = tensors[0]
    if op == "copy":
        return t
    if op == "cat":
        return _cat(tensors)
    if op == "swap_halves":
        h = t.shape[0] // 2
        return _cat([t[h:], t[:h]])
    if op == "linear_to_conv1x1":
        return t.reshape(*t.shape, 1, 1) if len(t.shape) == 2 else t
    raise AssertionError(op)


def _invert(op: str, t, n: int):
    if op == "copy":
        return [t]
    if op == "cat":
        size = t.shape[0] // n
        return [t[i * size:(i + 1) * size] for i in range(n)]
    if op == "swap_halves":
        h = t.shape[0] // 2
        return [_cat([t[h:], t[:h]])]
    if op == "linear_to_conv1x1":
        return [t.reshape(t.shape[0], t.shape[1]) if len(t.shape) == 4 else t]
    raise AssertionError(op)


def _cat(tensors: list):
    """Concatenate along dim 0 with the arrays' own library (torch, mlx or numpy), which is already imported
    because the arrays exist: this module never imports a backend itself."""
    lib = type(tensors[0]).__module__.split(".")[0]
    if lib == "torch":
        return sys.modules["torch"].cat(tensors, 0)
    if lib == "mlx":
        return sys.modules["mlx.core"].concatenate(tensors, 0)
    import numpy as np

    return np.concatenate([np.asarray(t) for t in tensors], 0)


def strip_prefix(sd: Mapping, prefixes: Iterable[str]) -> dict:
    """Drop the first prefix that every matching key carries (`model.diffusion_model.`, `model.`, ...)."""
    for p in prefixes:
        if any(k.startswith(p) for k in sd):
            return {(k[len(p):] if k.startswith(p) else k): v for k, v in sd.items()}
    return dict(sd)


def check_strict(expected: Mapping[str, tuple], got: Mapping[str, tuple], what: str, max_list: int = 12) -> None:
    """Compare key -> shape maps; raise WeightError naming missing, unexpected and mis-shaped keys."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    bad = sorted(k for k in set(expected) & set(got) if tuple(expected[k]) != tuple(got[k]))
    if not (missing or unexpected or bad):
        return
    lines = [f"{what}: the checkpoint does not match the model it was detected as."]

    def block(title, keys, fmt):
        if keys:
            shown = ", ".join(fmt(k) for k in keys[:max_list])
            more = f" (and {len(keys) - max_list} more)" if len(keys) > max_list else ""
            lines.append(f"  {title} ({len(keys)}): {shown}{more}")

    block("missing keys", missing, str)
    block("unexpected keys", unexpected, str)
    block("wrong shapes", bad, lambda k: f"{k} file {tuple(got[k])} vs model {tuple(expected[k])}")
    lines.append("  Is this the right file for this loader (a FLUX.2 klein / Z-Image / Qwen3 / VAE file, not another"
                 " model or a LoRA)? A truncated download also shows up as missing keys.")
    raise WeightError("\n".join(lines))


def shapes(sd: Mapping) -> dict:
    return {k: tuple(v.shape) for k, v in sd.items()}
