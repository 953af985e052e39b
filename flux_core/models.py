"""Loading the three components from files, with a cache keyed by (file, backend, dtype, quantization).

A `LoadedModel` is what the sampler and the ComfyUI nodes hold: the backend's module plus what was decided about it
(family, variant, backend, precision and the reason for each choice), so the UI can show what actually runs.
Models live in this cache, never on node instances (docs/CONTRIBUTING.md §C8); `release()` drops them explicitly.
"""
from __future__ import annotations

import gc
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from . import backend as backends
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

    @property
    def family(self) -> Family | None:
        return self.variant.family if self.variant else None

    def describe(self) -> str:
        parts = [self.kind, Path(self.source).name, f"{self.backend}:{self.device}", self.dtype]
        if self.quantization != "none":
            parts.append(self.quantization)
        if self.variant:
            parts.append(self.variant.name)
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
            for k in [k for k, v in _CACHE.items() if v is model]:
                del _CACHE[k]
    gc.collect()
    backends.empty_cache()


def cached_models() -> list[LoadedModel]:
    with _LOCK:
        return list(_CACHE.values())


def _resolve(backend: str, device: str | None, dtype: str | None):
    choice = backends.choose(backend, device)
    dt = backends.resolve_dtype(dtype, choice)
    return choice, dt


def load_transformer(path, backend: str = "auto", device: str | None = None, dtype: str | None = None,
                     quantization: str = "none", distilled: bool | None = None, compile: bool = False) -> LoadedModel:
    """A klein or Z-Image transformer from a single file, a transformer/ folder or a diffusers pipeline folder.
    compile=True (torch): each transformer block is compiled with torch.compile on first use (regional compilation:
    one block per type compiles once, ~1.4x faster steps on CUDA; the first generation pays the compile)."""
    choice, dt = _resolve(backend, device, dtype)
    backends.check_quantization(quantization, choice)

    def build():
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
        module = backends.load_transformer(choice, family, ckpt, dt, quantization)
        if compile:
            notes.append(backends.compile_blocks(module, choice))
        variant = family.variant(flag, module.config)
        return LoadedModel("transformer", module, ckpt.source, choice.backend, choice.device, dt, label,
                           variant, notes + pre_note)

    key = _key("transformer", path, choice.backend + choice.device, dt, quantization, (distilled, compile))
    return _cached(key, build)


def load_text_encoder(path, tokenizer: str | None = None, backend: str = "auto", device: str | None = None,
                      dtype: str | None = None, quantization: str = "none",
                      tokenizer_search: tuple = ()) -> LoadedModel:
    """Qwen3 text encoder; the tokenizer is looked for next to the weights, in `tokenizer_search`, or at `tokenizer`."""
    from .text import QwenTokenizer, find_tokenizer

    choice, dt = _resolve(backend, device, dtype)
    backends.check_quantization(quantization, choice)
    tok_dir = find_tokenizer(explicit=tokenizer, near=(path,), extra_dirs=tuple(tokenizer_search))

    def build():
        ckpt = load_checkpoint(path, component="text_encoder")
        label, pre_note = _prequantized(ckpt, quantization)
        encoder = backends.build_text_encoder(choice, ckpt, dt, quantization, QwenTokenizer(tok_dir))
        return LoadedModel("text_encoder", encoder, ckpt.source, choice.backend, choice.device, dt, label,
                           None, [choice.reason, f"tokenizer: {tok_dir}"] + pre_note)

    key = _key("text_encoder", path, choice.backend + choice.device, dt, quantization, (str(tok_dir),))
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


def load_vae(path, backend: str = "auto", device: str | None = None, dtype: str | None = None) -> LoadedModel:
    choice, dt = _resolve(backend, device, dtype)

    def build():
        ckpt = load_checkpoint(path, component="vae")
        vae = backends.load_vae(choice, ckpt, dt)
        return LoadedModel("vae", vae, ckpt.source, choice.backend, choice.device, dt, "none", None,
                           [choice.reason, f"{vae.kind.upper()} VAE detected from the keys"])

    key = _key("vae", path, choice.backend + choice.device, dt, "none")
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
