"""LoRAs merged into a torch transformer (float or load-time quantized), on the model's own device.

ΔW is computed on the device that holds the weight (a rank-32 LoRA on every klein-4B Linear is ~250 GFLOP of
float32 matmul: milliseconds on a GPU, seconds on a CPU), added to a float32 copy of the original weight and rounded
once into the parameter, in place (no new Parameter objects: compiled blocks keep their guards).

Backups of the original weights stay on the device when it has room for them (re-merging is then a device copy),
otherwise on the host, as ComfyUI's ModelPatcher does (`backup="cpu"` forces that).

Quantized Linears (`quant.QuantLinear`) keep their packed original; a merge dequantizes it, adds ΔW in float32 and
quantizes once, so the forward pass stays the plain quantized one (docs/LORA.md "Quantized models" has the numbers).
"""
from __future__ import annotations

import torch

from ..lora.resolve import ResolvedLora, resolve
from ..lora.stack import LoraState, set_loras
from .offload import offloader_of
from .quant import DEQUANTIZERS, QUANTIZERS, QuantLinear

STATE_ATTR = "_fluxcore_lora_state"


class TorchOps:
    """The `xp` of flux_core/lora/adapters.py on one torch device."""

    def __init__(self, device):
        self.device = torch.device(device)

    def array(self, t):
        return t.to(self.device, torch.float32)

    @staticmethod
    def cat(parts):
        return torch.cat(parts, 0)

    @staticmethod
    def rownorm(x):
        return torch.linalg.vector_norm(x, dim=1, keepdim=True)

    @staticmethod
    def colnorm(x):
        return torch.linalg.vector_norm(x, dim=0, keepdim=True)


def weight_shapes(model: torch.nn.Module) -> dict:
    """{our key: logical shape} of every parameter (a quantized Linear reports its weight as [out, in])."""
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            shapes[f"{name}.weight"] = (m.out_features, m.in_features)
            shapes.pop(f"{name}.weight_scale", None)
    return shapes


class TorchApplier:
    def __init__(self, model: torch.nn.Module, backup: str = "auto"):
        self.model = model
        self.offloader = off = offloader_of(model)
        # offloaded weights: the host buffers are the masters (device copies are remade from them on the next
        # entry), so merges go there, computed on the offload device; backups stay on the host
        self.device = off.device if off is not None else next(model.parameters()).device
        self.xp = TorchOps(self.device)
        self.backup_device = torch.device("cpu") if off is not None else self._backup_device(backup)

    def begin(self):
        if self.offloader is not None:
            self.offloader.to_state("host")   # every parameter points at its host master now

    def _backup_device(self, backup: str):
        if backup == "cpu" or self.device.type == "cpu":
            return torch.device("cpu")
        if backup == "device" or self.device.type != "cuda":
            return self.device
        free, _ = torch.cuda.mem_get_info(self.device)
        need = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return self.device if free > need + (4 << 30) else torch.device("cpu")

    def _locate(self, key: str):
        mod_name, _, leaf = key.rpartition(".")
        mod = self.model.get_submodule(mod_name)
        return mod, leaf

    def snapshot(self, key: str):
        mod, leaf = self._locate(key)
        if isinstance(mod, QuantLinear) and leaf == "weight":
            return (mod.weight.detach().to(self.backup_device, copy=True),
                    mod.weight_scale.detach().to(self.backup_device, copy=True))
        return getattr(mod, leaf).detach().to(self.backup_device, copy=True)

    def original(self, key: str, backup):
        mod, leaf = self._locate(key)
        if isinstance(backup, tuple):
            q, scale = (t.to(self.device) for t in backup)
            return DEQUANTIZERS[mod.mode](q, scale, mod.in_features).float()
        return backup.to(self.device, torch.float32)

    def write(self, key: str, w32):
        mod, leaf = self._locate(key)
        if isinstance(mod, QuantLinear) and leaf == "weight":
            q, scale = QUANTIZERS[mod.mode](w32)
            mod.weight.copy_(q)
            mod.weight_scale.copy_(scale)
            return
        target = getattr(mod, leaf)
        target.copy_(w32.reshape(target.shape).to(target.dtype), non_blocking=False)

    def restore(self, key: str, backup):
        mod, leaf = self._locate(key)
        if isinstance(backup, tuple):
            mod.weight.copy_(backup[0])
            mod.weight_scale.copy_(backup[1])
        else:
            getattr(mod, leaf).copy_(backup)

    @staticmethod
    def nbytes(backup) -> int:
        parts = backup if isinstance(backup, tuple) else (backup,)
        return sum(t.numel() * t.element_size() for t in parts)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def state(model) -> LoraState:
    st = model.__dict__.get(STATE_ATTR)
    if st is None:
        st = LoraState()
        model.__dict__[STATE_ATTR] = st
    return st


def resolve_for(model, path_or_file) -> ResolvedLora:
    return resolve(path_or_file, weight_shapes(model))


def apply_loras(model, loras: list, backup: str = "auto") -> int:
    """Make `model` hold exactly `loras` = [(ResolvedLora | path, strength), ...]; [] restores the original weights.
    Returns how many weights were re-merged."""
    resolved = [(r if isinstance(r, ResolvedLora) else resolve_for(model, r), s) for r, s in loras]
    st = state(model)
    if offloader_of(model) is not None:   # backups made before the model was offloaded leave the device
        st.backups = {k: tuple(t.cpu() for t in b) if isinstance(b, tuple) else b.cpu() for k, b in st.backups.items()}
    # inference_mode: in-place writes are legal whether the parameters were made inside it (a host that loads
    # under inference_mode) or not
    with torch.inference_mode():
        return set_loras(TorchApplier(model, backup), st, resolved)


def backup_bytes(model) -> int:
    st = model.__dict__.get(STATE_ATTR)
    return 0 if st is None else sum(TorchApplier.nbytes(b) for b in st.backups.values())
