"""LoRAs merged into an MLX transformer (float or `nn.quantize`d), the same merge as flux_core/torch/lora.py.

The deltas come from the same backend-neutral pieces (`flux_core/lora`), computed op for op in MLX float32, so a
merged MLX weight equals the torch one to float32 rounding. MLX arrays are immutable: a merge puts a NEW array in
the module and the backup is simply the old array kept alive (no copy is made to keep it). Quantized layers
(`nn.QuantizedLinear`, affine or mxfp8) are dequantized from their kept original, patched in float32 and
quantized once with the layer's own settings.
"""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..lora.resolve import ResolvedLora, resolve
from ..lora.stack import LoraState, set_loras
from .common import to_mx

STATE_ATTR = "_fluxcore_lora_state"
_QPARTS = ("weight", "scales", "biases")


class MlxOps:
    """The `xp` of flux_core/lora/adapters.py on MLX."""

    @staticmethod
    def array(t):
        return to_mx(t, "float32")

    @staticmethod
    def cat(parts):
        return mx.concatenate(parts, axis=0)

    @staticmethod
    def rownorm(x):
        return mx.sqrt(mx.sum(x * x, axis=1, keepdims=True))

    @staticmethod
    def colnorm(x):
        return mx.sqrt(mx.sum(x * x, axis=0, keepdims=True))


def _walk(model: nn.Module, path: str):
    obj = model
    for part in path.split(".") if path else ():
        obj = obj[int(part)] if isinstance(obj, list) else obj[part]
    return obj


def weight_shapes(model: nn.Module) -> dict:
    """{our key: logical shape}; a QuantizedLinear's packed weight reports [out, in] and hides scales / biases."""
    shapes = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    for name, m in model.named_modules():
        if isinstance(m, nn.QuantizedLinear):
            out_f, packed = m.weight.shape
            shapes[f"{name}.weight"] = (out_f, packed * 32 // m.bits)
            shapes.pop(f"{name}.scales", None)
            shapes.pop(f"{name}.biases", None)
    return shapes


class MlxApplier:
    xp = MlxOps

    def __init__(self, model: nn.Module):
        self.model = model

    def _locate(self, key: str):
        mod_name, _, leaf = key.rpartition(".")
        return _walk(self.model, mod_name), leaf

    def snapshot(self, key: str):
        mod, leaf = self._locate(key)
        if isinstance(mod, nn.QuantizedLinear) and leaf == "weight":
            return tuple(mod.get(p) for p in _QPARTS)
        return mod[leaf]

    def original(self, key: str, backup):
        mod, leaf = self._locate(key)
        if isinstance(backup, tuple):
            w, scales, biases = backup
            return mx.dequantize(w, scales, biases, group_size=mod.group_size, bits=mod.bits,
                                 mode=getattr(mod, "mode", "affine")).astype(mx.float32)
        return backup.astype(mx.float32)

    def write(self, key: str, w32):
        mod, leaf = self._locate(key)
        if isinstance(mod, nn.QuantizedLinear) and leaf == "weight":
            # quantize from the compute dtype, as nn.quantize did at load (affine scales carry that dtype)
            dt = mod.scales.dtype if mod.scales.dtype in (mx.float16, mx.bfloat16, mx.float32) else mx.bfloat16
            parts = mx.quantize(w32.astype(dt), group_size=mod.group_size, bits=mod.bits,
                                mode=getattr(mod, "mode", "affine"))
            for name, value in zip(_QPARTS, list(parts) + [None] * (3 - len(parts))):
                if name in mod:
                    mod[name] = value
            mx.eval([mod[p] for p in _QPARTS if p in mod])
            return
        new = w32.reshape(mod[leaf].shape).astype(mod[leaf].dtype)
        mx.eval(new)
        mod[leaf] = new

    def restore(self, key: str, backup):
        mod, leaf = self._locate(key)
        if isinstance(backup, tuple):
            for name, value in zip(_QPARTS, backup):
                if name in mod:
                    mod[name] = value
        else:
            mod[leaf] = backup

    @staticmethod
    def nbytes(backup) -> int:
        parts = backup if isinstance(backup, tuple) else (backup,)
        return sum(p.nbytes for p in parts if p is not None)

    def begin(self):
        pass

    def sync(self):
        mx.eval(self.model.parameters())


def state(model) -> LoraState:
    st = getattr(model, STATE_ATTR, None)
    if st is None:
        st = LoraState()
        object.__setattr__(model, STATE_ATTR, st)
    return st


def resolve_for(model, path_or_file) -> ResolvedLora:
    return resolve(path_or_file, weight_shapes(model))


def apply_loras(model, loras: list) -> int:
    """Make `model` hold exactly `loras` = [(ResolvedLora | path, strength), ...]; [] restores the original weights."""
    resolved = [(r if isinstance(r, ResolvedLora) else resolve_for(model, r), s) for r, s in loras]
    return set_loras(MlxApplier(model), state(model), resolved)


def backup_bytes(model) -> int:
    st = getattr(model, STATE_ATTR, None)
    return 0 if st is None else sum(MlxApplier.nbytes(b) for b in st.backups.values())
