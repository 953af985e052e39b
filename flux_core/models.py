"""Loading the three components from files, with a cache keyed by (file, backend, dtype, quantization, offload).

A `LoadedModel` is what the sampler and the ComfyUI nodes hold: the backend's module plus what was decided about it
(family, variant, backend, precision and the reason for each choice), so the UI can show what actually runs.
Models live in this cache, never on node instances (docs/CONTRIBUTING.md §C8); `release()` drops them explicitly.
Before a file is read, its device-memory need is estimated from the header and a load that cannot fit is refused
with the settings that would (flux_core/memory.py); `offload` keeps weights in host memory (docs/MEMORY.md).
"""
from __future__ import annotations

import gc
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import backend as backends
from . import memory
from .errors import ConfigError, WeightError
from .families import VAE_KINDS, Family, Variant, detect_family, read_is_distilled
from .weights.io import load_checkpoint

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    kind: str                 # "transformer" | "text_encoder" | "vae"
    module: object            # the backend module (torch nn.Module or MLX model)
    source: str
    backend: str              # "torch" | "mlx"
    device: str
    dtype: str
    quantization: str = "none"
    variant: Variant | None = None
    notes: list[str] = field(default_factory=list)  # why this backend / precision / variant was chosen
    offload: str = "none"     # none | model | blocks (what was decided from the asked-for mode)
    loras: tuple = ()                                   # LoraSpecs merged when this handle is used (transformer)
    lora_resolved: list = field(default_factory=list, repr=False)
    lora_reports: list[str] = field(default_factory=list)
    views: dict = field(default_factory=dict, repr=False)   # base model: its LoRA'd handles, by LoRA key

    def activate(self) -> None:
        """Make the (shared) module hold exactly this handle's LoRAs; a no-op when it already does."""
        if self.kind == "transformer":
            from .lora.runtime import activate

            activate(self)

    @property
    def family(self) -> Family | None:
        return self.variant.family if self.variant else None

    def describe(self) -> str:
        parts = [self.kind, Path(self.source).name, f"{self.backend}:{self.device}", self.dtype]
        if self.quantization != "none":
            parts.append(self.quantization)
        if self.offload != "none":
            parts.append(f"offload {self.offload}")
        if self.variant:
            parts.append(self.variant.name)
        parts += [f"LoRA {spec.describe()}" for spec in self.loras]
        return " | ".join(parts)


_CACHE: "OrderedDict[tuple, LoadedModel]" = OrderedDict()
_LOCK = threading.RLock()
MAX_CACHED = int(os.environ.get("FLUXCORE_MAX_CACHED_MODELS", "6"))


def _key(kind, path, backend, dtype, quant, extra=()):
    p = Path(path).expanduser()
    stamp = p.stat().st_mtime_ns if p.exists() else 0
    return (kind, str(p.resolve()), stamp, backend, dtype, quant) + tuple(extra)


def _cached(key, build):
    with _LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    model = build()
    with _LOCK:
        _CACHE[key] = model
        while len(_CACHE) > MAX_CACHED:
            old_key, old = _CACHE.popitem(last=False)
            log.info("fluxcore: evicting %s from the model cache", old.describe())
        return model


def release(model: LoadedModel | None = None) -> None:
    """Drop one model (or all) from the cache and free backend memory."""
    with _LOCK:
        if model is None:
            _CACHE.clear()
        else:
            base = model.views.get("base", model)
            for k in [k for k, v in _CACHE.items() if v is base]:
                del _CACHE[k]
    gc.collect()
    backends.empty_cache()


def cached_models() -> list[LoadedModel]:
    with _LOCK:
        return list(_CACHE.values())


def _resolve(backend: str, device: str | None, dtype: str | None):
    from .validate import check_device

    check_device(backend, device)  # a typo must not cost a checkpoint read
    choice = backends.choose(backend, device)
    dt = backends.resolve_dtype(dtype, choice)
    return choice, dt


def _placement(path, kind: str, choice, dtype: str, quantization: str, offload: str):
    """(offload mode, the Choice to load with, why, spare bytes): resolve `auto` from the free memory, refuse what
    cannot fit (before anything is read), and load on the host when the weights are to be offloaded."""
    free = backends.free_bytes(choice)
    specs = memory.checkpoint_specs(path, kind)
    mode, why = memory.resolve_offload(offload, choice.backend, choice.device, specs, kind, dtype, quantization,
                                       lambda: free)
    if offload == "auto" and mode == "none" and free is not None and any(
            m.offload != "none" and m.device == choice.device for m in cached_models()):
        # an offloaded component measured the free memory without this one: it must take turns with it, or it
        # would hold its memory while that one runs
        mode, why = "model", "offload model: other components on this device are offloaded and take turns with it"
    need = memory.check_fits(path, kind, dtype, quantization, mode, lambda: free)
    spare = max(0, free - need) if free is not None and need is not None else 0
    return mode, (replace(choice, device="cpu") if mode != "none" else choice), why, spare


def _offload(choice, module, mode: str, notes: list, spare: int = 0) -> None:
    if mode != "none":
        notes.append(backends.offload(choice, module, mode, spare))


def load_transformer(path, backend: str = "auto", device: str | None = None, dtype: str | None = None,
                     quantization: str = "none", distilled: bool | None = None, compile: bool = False,
                     offload: str = "auto", loras=()) -> LoadedModel:
    """A klein or Z-Image transformer from a single file, a transformer/ folder or a diffusers pipeline folder.
    compile=True (torch): each transformer block is compiled with torch.compile on first use (regional compilation:
    one block per type compiles once, ~1.4x faster steps on CUDA; the first generation pays the compile).
    offload: none | model | blocks | auto (CUDA: none when it fits in free memory, else blocks; elsewhere none).
    loras=[(path, strength), ...]: merged into the weights (docs/LORA.md). The base checkpoint is cached once; each
    LoRA list is a handle on the same module, re-merged when used, so strengths change without a reload."""
    choice, dt = _resolve(backend, device, dtype)
    backends.check_quantization(quantization, choice)

    def build():
        mode, load_choice, why, spare = _placement(path, "transformer", choice, dt, quantization, offload)
        if compile and mode != "none":
            raise ConfigError(f"compile cannot be combined with offload {mode} (the weights move between the "
                              "compiled calls): turn compile off, or free memory for offload none")
        ckpt = load_checkpoint(path, component="transformer")
        label, pre_note = _prequantized(ckpt, quantization)
        family = detect_family(ckpt.sd)
        flag = read_is_distilled(ckpt.source, ckpt.metadata, ckpt.config)
        notes = [choice.reason]
        if flag is None:
            flag = True if distilled is None else distilled
            notes.append(f"{'distilled' if flag else 'base'} "
                         + ("(your choice)" if distilled is not None else
                            "(default: the file does not say; choose 'base' for the undistilled model)"))
        else:
            if distilled is not None and distilled != flag:
                notes.append(f"your variant choice overrides the file's is_distilled={flag}")
                flag = distilled
            else:
                notes.append(f"{'distilled' if flag else 'base'} (from the checkpoint's metadata)")
        module = backends.load_transformer(load_choice, family, ckpt, dt, quantization)
        notes.append(why)
        _offload(choice, module, mode, notes, spare)
        if compile:
            notes.append(backends.compile_blocks(module, choice))
        variant = family.variant(flag, module.config)
        return LoadedModel("transformer", module, ckpt.source, choice.backend, choice.device, dt, label,
                           variant, notes + pre_note, mode)

    key = _key("transformer", path, choice.backend + choice.device, dt, quantization, (distilled, compile, offload))
    return with_loras(_cached(key, build), loras)


def with_loras(model: LoadedModel, loras=()) -> LoadedModel:
    """The handle of `model`'s base with exactly `loras` = [(path, strength) | path | LoraSpec, ...] merged, made
    active now. Handles are cached on the base (keyed by file, modification time and strength), so they go when
    the base is released or evicted; an unreadable or wrong-model LoRA raises before any weight changes."""
    from dataclasses import replace

    from .lora.spec import as_specs

    base = model.views.get("base", model)
    specs = as_specs(loras)
    if not specs:
        base.activate()
        return base
    vkey = tuple(s.key() for s in specs)
    with _LOCK:
        view = base.views.get(vkey)
    if view is None:
        from .lora.runtime import resolve_specs

        resolved = resolve_specs(base, specs)
        reports = [r.report.message() for r in resolved]
        view = replace(base, loras=specs, lora_resolved=resolved, lora_reports=reports, notes=base.notes + reports,
                       views={"base": base})
        with _LOCK:
            base.views[vkey] = view
    view.activate()
    return view


def load_text_encoder(path, tokenizer: str | None = None, backend: str = "auto", device: str | None = None,
                      dtype: str | None = None, quantization: str = "none",
                      tokenizer_search: tuple = (), offload: str = "auto", compile: bool = False) -> LoadedModel:
    """Qwen3 text encoder; the tokenizer is looked for next to the weights, in `tokenizer_search`, or at `tokenizer`.
    offload: as for load_transformer (blocks streams the Qwen3 layers). compile=True (torch): each decoder layer is
    compiled on first use, under the CUDA-graph replay (~1.5x faster encodes on CUDA); not with an offloaded encoder."""
    from .text import QwenTokenizer, find_tokenizer

    choice, dt = _resolve(backend, device, dtype)
    backends.check_quantization(quantization, choice)
    tok_dir = find_tokenizer(explicit=tokenizer, near=(path,), extra_dirs=tuple(tokenizer_search))

    def build():
        mode, load_choice, why, spare = _placement(path, "text_encoder", choice, dt, quantization, offload)
        ckpt = load_checkpoint(path, component="text_encoder")
        label, pre_note = _prequantized(ckpt, quantization)
        encoder = backends.build_text_encoder(load_choice, ckpt, dt, quantization, QwenTokenizer(tok_dir))
        notes = [choice.reason, f"tokenizer: {tok_dir}", why] + pre_note
        _offload(choice, encoder.model, mode, notes, spare)
        if compile:
            notes.append(backends.compile_text_encoder(encoder.model, choice) if mode == "none" else
                         f"text encoder not compiled: offload {mode} moves its weights between calls")
        return LoadedModel("text_encoder", encoder, ckpt.source, choice.backend, choice.device, dt, label,
                           None, notes, mode)

    key = _key("text_encoder", path, choice.backend + choice.device, dt, quantization, (str(tok_dir), offload, compile))
    return _cached(key, build)


def _prequantized(ckpt, quantization: str) -> tuple[str, list[str]]:
    """(the quantization label, notes) of a checkpoint; a pre-quantized file refuses a second quantization."""
    from .weights import prequant

    if not ckpt.metadata.get("fluxcore.prequantized"):
        return quantization, []
    label = prequant.quantization_label(ckpt.metadata)
    if quantization != "none":
        raise ConfigError(f"{Path(ckpt.source).name} is already quantized ({prequant.describe(ckpt.metadata)}): "
                          f"load it with quantization 'none' instead of {quantization!r}")
    return label, [prequant.describe(ckpt.metadata)]


def load_vae(path, backend: str = "auto", device: str | None = None, dtype: str | None = None,
             offload: str = "auto", compile: bool = False) -> LoadedModel:
    """offload: none | model | auto (blocks means model here: the VAE moves whole). compile=True (torch): the decoder
    is compiled channels-last on first decode (~2.4x faster decode on CUDA); not with an offloaded VAE."""
    choice, dt = _resolve(backend, device, dtype)
    offload = "model" if offload == "blocks" else offload

    def build():
        mode, load_choice, why, _ = _placement(path, "vae", choice, dt, "none", offload)
        ckpt = load_checkpoint(path, component="vae")
        vae = backends.load_vae(load_choice, ckpt, dt)
        notes = [choice.reason, f"{vae.kind.upper()} VAE detected from the keys", why]
        _offload(choice, vae, mode, notes)
        if compile and mode == "none":
            notes.append(backends.compile_vae(vae, choice))
        elif compile:
            notes.append(f"VAE not compiled: offload {mode} moves its weights between calls")
        return LoadedModel("vae", vae, ckpt.source, choice.backend, choice.device, dt, "none", None, notes, mode)

    key = _key("vae", path, choice.backend + choice.device, dt, "none", (offload, compile))
    return _cached(key, build)


def check_pair(transformer: LoadedModel, vae: LoadedModel) -> None:
    want = transformer.variant.vae_kind
    if vae.module.kind != want:
        raise ConfigError(f"{transformer.variant.name} needs {VAE_KINDS[want].title}, but {Path(vae.source).name} "
                          f"is {VAE_KINDS[vae.module.kind].title}.")


def check_text_width(transformer: LoadedModel, width: int) -> None:
    need = transformer.family.text_width(transformer.module.config)
    if width != need:
        raise WeightError(f"the text encoder gives {width}-wide features but {transformer.variant.name} expects "
                          f"{need}: klein-4B and Z-Image pair with Qwen3-4B (qwen_3_4b.safetensors), klein-9B with "
                          "Qwen3-8B.")
