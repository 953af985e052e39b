"""LoRAs on a loaded transformer (`flux_core.models.LoadedModel`): resolve them once, and make the shared module hold
exactly one handle's LoRAs when that handle is used.

A base model and its LoRA'd handles share ONE module (the checkpoint is read once). `activate(model)` re-merges
only what differs from what the module holds now (flux_core/lora/stack.py), so switching between handles or
strengths costs a re-merge of the touched weights, never a reload.
"""
from __future__ import annotations

import importlib

from .resolve import ResolvedLora


def backend_impl(backend: str):
    """flux_core.torch.lora or flux_core.mlx.lora (imported on demand: this package imports no backend)."""
    return importlib.import_module(f"flux_core.{'mlx' if backend == 'mlx' else 'torch'}.lora")


def resolve_specs(model, specs) -> list[ResolvedLora]:
    """Read and resolve every LoraSpec against the model's weights; all errors come before anything is merged."""
    impl = backend_impl(model.backend)
    return [impl.resolve_for(model.module, spec.path) for spec in specs]


def activate(model) -> int:
    """Merge `model.loras` into the shared module (and take out any other LoRA). Returns the re-merged weight count."""
    impl = backend_impl(model.backend)
    pairs = [(r, spec.strength) for r, spec in zip(model.lora_resolved, model.loras)]
    return impl.apply_loras(model.module, pairs)
