"""Run INSIDE a ComfyUI venv (tests/test_lora_comfy.py starts it): merge LoRA files into native weights with ComfyUI's
own `comfy.lora.load_lora` + `calculate_weight`, the key map built as ComfyUI's `model_lora_keys_unet` builds it for
Flux (klein) and Lumina2 (Z-Image), without constructing a model.

usage: python comfy_lora_oracle.py COMFYUI_DIR base.safetensors klein|zimage CONFIG_JSON STRENGTH OUT LORA...
The base file holds our native weights without prefix; OUT receives the merged weights ComfyUI computes."""
import json
import sys

comfy_dir, base_path, family, cfg_json, strength, out_path, *loras = sys.argv[1:]
sys.path.insert(0, comfy_dir)
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
import comfy.lora  # noqa: E402
import comfy.utils  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

base = {"diffusion_model." + k: v for k, v in load_file(base_path).items()}
cfg = json.loads(cfg_json)
km = {}
for k in base:   # model_lora_keys_unet, generic part
    if k.endswith(".weight"):
        km["lora_unet_" + k[len("diffusion_model."):-len(".weight")].replace(".", "_")] = k
        km[k[:-len(".weight")]] = k
    else:
        km[k] = k
if family == "klein":
    diff = comfy.utils.flux_to_diffusers(cfg, output_prefix="diffusion_model.")
    aliases = lambda b: ["transformer." + b, "lycoris_" + b.replace(".", "_"), "lora_transformer_" + b.replace(".", "_"), b]  # noqa: E731
else:
    diff = comfy.utils.z_image_to_diffusers(cfg, output_prefix="diffusion_model.")
    aliases = lambda b: ["diffusion_model." + b, "transformer." + b, "lycoris_" + b.replace(".", "_"), b]  # noqa: E731
for d, to in diff.items():
    if d.endswith(".weight"):
        for a in aliases(d[:-len(".weight")]):
            km[a] = to

patches = {}
for path in loras:
    for k, adapter in comfy.lora.load_lora(load_file(path), km).items():
        key, offset, fn = (k, None, None) if isinstance(k, str) else (k[0], k[1], k[2] if len(k) > 2 else None)
        patches.setdefault(key, []).append((float(strength), adapter, 1.0, offset, fn))
out = {}
for key, plist in patches.items():
    w = comfy.lora.calculate_weight(plist, base[key].float().clone(), key)
    out[key[len("diffusion_model."):]] = w.contiguous()
save_file(out, out_path)
