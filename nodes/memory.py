"""FluxCore's torch models inside ComfyUI's memory management (the imports are guarded: outside ComfyUI, `use()` does
nothing and says so in the debug log).

ComfyUI keeps a list of loaded models (`model_management.current_loaded_models`), each a `ModelPatcher`. Before a
node runs a model it calls `load_models_gpu([patcher], memory_required)`, which first frees memory on that device by
unloading other patchers (least recently used first) and then asks the patcher to load itself with a budget
(`partially_load(device, extra_memory)`); under pressure it asks loaded patchers to shrink (`partially_unload`) or to
leave the device (`detach`). ComfyUI-GGUF fits in by subclassing ModelPatcher for its own weight handling; we do the
same, but the weights move through our Offloader (flux_core/torch/offload.py), so ComfyUI's requests map onto its
three states: a full budget -> resident, a short one (or `--lowvram` / `--novram`) -> blocks streamed from pinned
host memory, detach -> host. ComfyUI holds patchers only weakly; `_PATCHERS` keeps ours alive as long as the model.

Only torch models on a CUDA device take part: CPU models have nothing to free, and MLX (Apple's unified memory)
has no separate device memory for ComfyUI to manage.
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)

try:
    import comfy.model_management as mm  # type: ignore
    import comfy.model_patcher as mp  # type: ignore
except ImportError:
    mm = mp = None

_PATCHERS: dict[int, object] = {}  # id(torch module) -> its patcher
_CLASS = None


def lowvram() -> bool:
    """ComfyUI was started with --lowvram or --novram (or chose low-VRAM mode itself)."""
    if mm is None:
        return False
    state = getattr(mm, "vram_state", None)
    return state is not None and state.name in ("LOW_VRAM", "NO_VRAM")


def resolve_offload(requested: str) -> str:
    """A loader's offload widget inside ComfyUI: `auto` is `blocks` under --lowvram, else left to ComfyUI's memory
    management (which streams blocks only when the model does not fit)."""
    if requested == "auto" and lowvram():
        return "blocks"
    return requested


def _torch_module(loaded):
    """The nn.Module behind a LoadedModel (a text encoder wraps its Qwen3 model)."""
    module = loaded.module
    return getattr(module, "model", module) if loaded.kind == "text_encoder" else module


def _patcher_class():
    global _CLASS
    if _CLASS is not None:
        return _CLASS

    class FluxCorePatcher(mp.ModelPatcher):
        """A ModelPatcher whose loading and unloading are our Offloader's state changes."""

        def __init__(self, offloader, load_device, offload_device):
            super().__init__(offloader.module, load_device, offload_device, size=offloader.host_bytes)
            self.offloader = offloader

        def model_size(self):
            return self.offloader.host_bytes

        def loaded_size(self):
            return self.offloader.device_bytes()

        def current_loaded_device(self):
            return self.offload_device if self.offloader.state == "host" else self.load_device

        def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
            before = self.loaded_size()
            self.offloader.to_state(target_state(self.offloader, before + extra_memory))
            return self.loaded_size() - before

        def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False):
            before = self.loaded_size()
            if self.offloader.state == "resident" and self.offloader.stream_ids:
                self.offloader.to_state("blocks")
            return before - self.loaded_size()

        def detach(self, unpatch_all=True):
            self.offloader.to_state("host")
            return self.model

        def __del__(self):  # the stock one unpatches weights; ours have nothing patched
            pass

    _CLASS = FluxCorePatcher
    return _CLASS


def target_state(offloader, budget: float) -> str:
    """The state for a device budget in bytes: resident when the whole model fits (and not --lowvram), else blocks
    where the model has them, else resident anyway (a VAE or a model without blocks has nothing smaller)."""
    if offloader.stream_ids and (lowvram() or offloader.mode == "blocks"
                                 or budget < offloader.device_bytes("resident")):
        return "blocks"
    return "resident"


def patcher_for(loaded):
    """The ComfyUI patcher of a loaded FluxCore model (made on first use), or None where ComfyUI has no say."""
    if mm is None or mp is None or loaded.backend != "torch" or not str(loaded.device).startswith("cuda"):
        return None
    module = _torch_module(loaded)
    if module is None:  # a released text encoder
        return None
    p = _PATCHERS.get(id(module))
    if p is not None and p.model is module:
        return p
    import torch

    from flux_core.torch import offload as O

    off = O.offloader_of(module) or O.offload(module, loaded.device, "model", exclusive=False)
    off.exclusive = False  # ComfyUI decides what leaves the device, not our one-at-a-time rule
    p = _patcher_class()(off, torch.device(loaded.device), torch.device("cpu"))
    _PATCHERS[id(module)] = p
    return p


def use(loaded, memory_required: float = 0) -> bool:
    """Before running `loaded`: let ComfyUI make room (unloading its own models first) and load ours with the
    budget it can give. Returns False where ComfyUI does not manage the model (no ComfyUI, CPU, MLX)."""
    p = patcher_for(loaded)
    if p is None:
        log.debug("fluxcore: %s is not under ComfyUI's memory management", getattr(loaded, "kind", loaded))
        return False
    mm.load_models_gpu([p], memory_required=memory_required)
    return True


def forget(loaded=None) -> None:
    """Drop the patchers of a released model (or all): ComfyUI's weak references then die with the model."""
    if loaded is None:
        _PATCHERS.clear()
        return
    module = _torch_module(loaded)
    if module is not None:
        _PATCHERS.pop(id(module), None)
