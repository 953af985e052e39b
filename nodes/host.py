"""Everything the nodes need from ComfyUI, with stand-ins so the nodes import and run without it.

Inside ComfyUI: model files come from `folder_paths`, progress and previews go through `comfy.utils.ProgressBar`,
interrupts through `comfy.model_management`, and our model cache follows ComfyUI's memory management (see
`install_memory_hooks`). Outside ComfyUI (tests, scripts): files are listed under the roots given to
`set_model_roots()` or env FLUXCORE_MODELS_DIR (os.pathsep-separated), each with the standard subfolders
(`diffusion_models/`, `text_encoders/`, `vae/`, plus the legacy `unet/` and `clip/`); progress is a no-op.
Nothing here configures logging or prints (docs/CONTRIBUTING.md §C9).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from . import memory

log = logging.getLogger(__name__)

try:  # ComfyUI puts these top-level modules on sys.path; a plain `pytest` run has none of them
    import folder_paths  # type: ignore
except ImportError:
    folder_paths = None
try:
    import comfy.model_management as model_management  # type: ignore
    import comfy.utils as comfy_utils  # type: ignore
except ImportError:
    model_management = comfy_utils = None

IN_COMFYUI = folder_paths is not None and model_management is not None

# ComfyUI's folder names, with the legacy aliases it maps onto them (folder_paths.py:30-31, map_legacy)
FOLDERS = {"diffusion_models": ("diffusion_models", "unet"), "text_encoders": ("text_encoders", "clip"),
           "vae": ("vae",), "loras": ("loras",)}
MODEL_EXTENSIONS = (".safetensors", ".sft")
# GGUF files (ComfyUI-GGUF's downloads) sit in the same folders; ComfyUI's own lists filter them out by extension
GGUF_FOLDERS = ("diffusion_models", "text_encoders")
_ROOTS: list[Path] = []


def set_model_roots(roots) -> None:
    """Outside ComfyUI: the models folders to list (each holding diffusion_models/, text_encoders/, vae/)."""
    _ROOTS[:] = [Path(r).expanduser() for r in roots]


def _fallback_roots() -> list[Path]:
    env = os.environ.get("FLUXCORE_MODELS_DIR", "")
    return _ROOTS + [Path(p).expanduser() for p in env.split(os.pathsep) if p]


def list_models(folder: str) -> list[str]:
    """File names (relative, subfolders included) a loader's combo offers; .gguf too for models / text encoders."""
    exts = MODEL_EXTENSIONS + ((".gguf",) if folder in GGUF_FOLDERS else ())
    if folder_paths is not None:
        names = {f for f in folder_paths.get_filename_list(folder) if f.lower().endswith(exts)}
        bases = [Path(p) for p in folder_paths.get_folder_paths(folder)]
    else:
        names, bases = set(), [root / sub for root in _fallback_roots() for sub in FOLDERS[folder]]
    for base in bases:
        if base.is_dir():
            names.update(p.relative_to(base).as_posix() for p in base.rglob("*")
                         if p.is_file() and p.suffix.lower() in exts)
    return sorted(names)


def model_path(folder: str, name: str) -> str:
    """The full path of a file picked in a loader, or an error that says where it was looked for."""
    from flux_core.errors import ConfigError

    if folder_paths is not None:
        path = folder_paths.get_full_path(folder, name)
        places = folder_paths.get_folder_paths(folder)
    else:
        places = [str(r / sub) for r in _fallback_roots() for sub in FOLDERS[folder]]
        path = next((str(Path(p) / name) for p in places if (Path(p) / name).is_file()), None)
    if path is None:
        raise ConfigError(f"{name!r} is not in the {folder} folder (looked in: {', '.join(places) or 'nowhere'}). "
                          f"Put the file into models/{folder}/ and refresh the browser (R) so the list updates.")
    return path


def tokenizer_dirs() -> tuple[str, ...]:
    """Tokenizer folders to fall back on: ComfyUI ships the Qwen2.5/Qwen3 vocabulary, which Qwen3-4B shares."""
    where = getattr(model_management, "__file__", None)  # comfy/model_management.py; None outside ComfyUI
    if not where:
        return ()
    return (str(Path(where).parent / "text_encoders" / "qwen25_tokenizer"),)


# ------------------------------------------------------------------------------------------- progress and interrupt
class Progress:
    """A ComfyUI progress bar for one node (no-op outside ComfyUI), with optional step previews of a `family`'s
    latents when ComfyUI's preview method is on."""

    def __init__(self, total: int, node_id=None, family=None):
        self.bar = comfy_utils.ProgressBar(total, node_id=node_id) if comfy_utils is not None else None
        self.family = family if previews_enabled() else None

    def step(self, step: int, total: int, latent) -> None:
        """The sampler's callback: advance the bar, with a cheap preview of the latent when enabled."""
        rgb = None
        if self.family is not None:
            try:
                from flux_core.pipeline import preview

                from .common import to_cpu_tensor

                rgb = preview(to_cpu_tensor(latent[:1]).numpy(), self.family)
            except Exception:  # a preview must never fail the run
                log.debug("fluxcore: step preview failed", exc_info=True)
        self.update(step, total, rgb)

    def update(self, value: int, total: int, preview_rgb=None) -> None:
        if self.bar is None:
            return
        preview = None
        if preview_rgb is not None:
            from PIL import Image

            img = Image.fromarray((preview_rgb * 255).round().astype("uint8"))
            preview = ("JPEG", img, preview_size())
        self.bar.update_absolute(value, total, preview)


def previews_enabled() -> bool:
    """Follow ComfyUI's --preview-method (default none), which the frontend may override per prompt."""
    try:
        from comfy.cli_args import LatentPreviewMethod, args  # type: ignore
    except ImportError:
        return False
    return args.preview_method != LatentPreviewMethod.NoPreviews


def preview_size() -> int:
    try:
        from comfy.cli_args import args  # type: ignore
    except ImportError:
        return 512
    return int(args.preview_size)


def check_interrupt() -> bool:
    """Raise ComfyUI's own InterruptProcessingException when the user pressed Cancel (so ComfyUI reports an
    interruption, not an error, and clears the flag). Returns False to let the sampler continue otherwise."""
    if model_management is not None:
        model_management.throw_exception_if_processing_interrupted()
    return False


# ------------------------------------------------------------------------------------------- memory management
def make_room(path: str, device: str) -> None:
    """Before loading a model onto a GPU, ask ComfyUI to offload its own models to make room for this file."""
    if model_management is None or not device.startswith("cuda"):
        return
    try:
        import torch

        need = os.path.getsize(path) * 1.2  # the weights plus activations headroom; an estimate, never exact
        model_management.free_memory(need, torch.device(device))
    except Exception:  # never let a best-effort free block a load
        log.debug("fluxcore: free_memory before load failed", exc_info=True)


def _release_for_device(device, memory_required: float) -> None:
    """ComfyUI is short of memory on `device`: drop our least recently used models there until it has enough."""
    from flux_core import models

    kind = getattr(device, "type", str(device))
    for m in models.cached_models():  # oldest first
        ours = m.device.split(":")[0]
        same = ours == kind or (m.backend == "mlx" and kind == "mps")
        if not same:
            continue
        if model_management.get_free_memory(device) >= memory_required:
            return
        log.info("fluxcore: releasing %s for ComfyUI (memory pressure)", m.describe())
        memory.forget(m)
        models.release(m)


def install_memory_hooks() -> bool:
    """Make ComfyUI's memory management cover our cache. (Our torch CUDA models are also registered with it as
    ModelPatchers, nodes/memory.py, so ComfyUI moves them to system RAM like its own; these hooks are the backstop
    that frees the RAM as well.)

    ComfyUI has no public hook for foreign model caches, so we wrap two module functions that every path goes
    through (main.py looks them up as attributes, so wrapping works): `unload_all_models` (the /free endpoint's
    unload_models and free_memory, the OOM handler in execution.py) releases our whole cache; `free_memory` (called
    before ComfyUI loads a model onto a GPU) releases our models on that device, oldest first, when ComfyUI's own
    unloading did not free enough. Idempotent; the wrappers never raise into ComfyUI."""
    mm = model_management
    if mm is None or getattr(mm.unload_all_models, "_fluxcore", False):
        return False
    orig_unload, orig_free = mm.unload_all_models, mm.free_memory

    def unload_all_models(*args, **kwargs):
        result = orig_unload(*args, **kwargs)
        try:
            from flux_core import models

            if models.cached_models():
                log.info("fluxcore: ComfyUI unloads all models; releasing %d FluxCore models",
                         len(models.cached_models()))
                memory.forget()
                models.release()
        except Exception:
            log.warning("fluxcore: could not release the model cache", exc_info=True)
        return result

    def free_memory(memory_required, device, *args, **kwargs):
        result = orig_free(memory_required, device, *args, **kwargs)
        keep_loaded = args[0] if args else kwargs.get("keep_loaded")
        try:
            # keep_loaded set = a targeted unload of one model (unload_model_and_clones), not memory pressure;
            # the CPU device is only ever "all of it" (unload_all_models, handled above).
            if device is not None and getattr(device, "type", "cpu") != "cpu" and not keep_loaded:
                _release_for_device(device, memory_required)
        except Exception:
            log.warning("fluxcore: could not release models under memory pressure", exc_info=True)
        return result

    unload_all_models._fluxcore = free_memory._fluxcore = True
    mm.unload_all_models, mm.free_memory = unload_all_models, free_memory
    return True
