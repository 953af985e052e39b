"""The LoRA node: MODEL -> MODEL with one more (LoRA file, strength) on the handle. Chain several.

The node never touches weights: it returns the model handle with the LoRA appended (`ModelRef.loras`), and whoever
loads the handle gets the base model from the library cache with exactly those LoRAs merged
(`flux_core.models.load_transformer(..., loras=...)`), so the base checkpoint is read once however the LoRAs or
strengths change. The LoRA is resolved here once, so a LoRA for another model fails on this node, with its name.
"""
from __future__ import annotations

from dataclasses import replace

from . import host
from .common import CATEGORY, MODEL, describe, ui

STRENGTH_TIP = ("How much of the LoRA to add: 1.0 is the strength it was trained at, 0 switches it off, negative "
                "values push away from it. Changing it re-merges only this LoRA's weights; the base model file is "
                "not read again.")


class LoraLoader:
    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The same model with this LoRA merged (chain more LoRA loaders after it).",)
    FUNCTION = "apply"
    CATEGORY = CATEGORY + "/loaders"
    DESCRIPTION = ("Adds a LoRA from models/loras/ to a FluxCore klein or Z-Image model: ai-toolkit, kohya/musubi, "
                   "diffusers/PEFT, fal, DiffSynth, ComfyUI, LoKr, LoHa, DoRA and .diff files. The badge says how "
                   "many tensors applied; a LoRA made for another model is an error that names it.")
    SEARCH_ALIASES = ["lora", "load lora", "lora loader", "lycoris", "lokr", "loha", "dora"]

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (MODEL, {"tooltip": "A FluxCore klein or Z-Image model (from its loader or another LoRA node)."}),
            "lora_name": (host.list_models("loras"),
                          {"tooltip": "The LoRA .safetensors file in models/loras/ (trained for this model: "
                                      "klein 4B, klein 9B or Z-Image)."}),
            "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                   "tooltip": STRENGTH_TIP}),
        }}

    def apply(self, model, lora_name, strength):
        from flux_core.errors import ConfigError

        if model.kind != "transformer":
            raise ConfigError("the FluxCore LoRA Loader takes a FluxCore diffusion model (klein or Z-Image)")
        path = host.model_path("loras", lora_name)
        ref = replace(model, loras=tuple(model.loras) + ((path, float(strength)),))
        loaded = ref.load()   # resolves the LoRA now: a wrong file fails on this node, named
        payload = describe(loaded, f"{len(ref.loras)} LoRA" + ("s" if len(ref.loras) > 1 else ""))
        return ui(payload, (ref,))
