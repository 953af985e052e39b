"""Writes the example workflows (workflows/*.json, UI format) and their API-format twins (workflows/api/*.json).

    python tests/workflow_builder.py        # rewrites both folders

A developer tool: the JSON files are what ships and what the tests check (tests/test_workflows.py validates them
against the node definitions and checks that each API twin equals the UI file's "Export (API)"), so a workflow
edited and re-saved in ComfyUI is fine too. Node sockets are listed in definition order; widget values are given
by name and written in the widget order of the definitions (see tests/comfy_harness.py widget_slots), every
widget not named here taking its definition's default.

What a user sees on opening one:
  - No saved view (`extra.ds`): the frontend then fits the graph into the window (its fitView, as for ComfyUI's
    own templates). A saved scale/offset is applied as is and depends on the window and on the frontend's
    chrome (tab bar, sidebar); the one we used to ship put the top row under the tab bar and Save Image off-screen.
  - Real numbers in the sampler (4 steps, guidance 1.0, 1024x1024 ...), not the node's "auto" values (steps 0,
    guidance -1, size 0), which stay available in the node.
  - Every link runs left to right into the next column: a node placed left of or under its source hides the link
    behind itself (links are drawn beneath nodes).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

HF = "https://huggingface.co/Comfy-Org"
# The public Comfy-Org download addresses (as in ComfyUI's own klein and Z-Image templates).
MODELS = {
    "flux-2-klein-4b.safetensors": (f"{HF}/flux2-klein/resolve/main/split_files/diffusion_models/", "diffusion_models"),
    "flux-2-klein-base-4b.safetensors": (f"{HF}/flux2-klein/resolve/main/split_files/diffusion_models/",
                                         "diffusion_models"),
    "z_image_turbo_bf16.safetensors": (f"{HF}/z_image_turbo/resolve/main/split_files/diffusion_models/",
                                       "diffusion_models"),
    "qwen_3_4b.safetensors": (f"{HF}/flux2-klein/resolve/main/split_files/text_encoders/", "text_encoders"),
    "flux2-vae.safetensors": (f"{HF}/flux2-dev/resolve/main/split_files/vae/", "vae"),
    "ae.safetensors": (f"{HF}/z_image_turbo/resolve/main/split_files/vae/", "vae"),
}
# Sizes in canvas units, large enough for each node's widgets in the 1.4x frontend (which grows a node that is
# too small but never shrinks one). Columns are these widths plus GAP.
SIZES = {"loader": [300, 190], "FluxCoreQwen3Encode": [360, 300], "LoadImage": [340, 330],
         "FluxCoreReferenceImageEncode": [270, 110], "FluxCoreSampler": [380, 310], "FluxCoreVAEDecode": [230, 60],
         "SaveImage": [380, 420]}
GAP = 40
SEED = 42


class Graph:
    def __init__(self, info: dict):
        self.info, self.nodes, self.links = info, [], []

    def add(self, type_, pos, widgets=None, inputs=None, title=None, model_file=None, mode=0):
        """widgets: {input name: value}, the rest take the definition's defaults; inputs: {socket: (node, index)}."""
        from comfy_harness import input_type, is_widget, ordered_inputs

        d = self.info[type_]
        size = SIZES.get(type_) or SIZES["loader"]
        node = {"id": len(self.nodes) + 1, "type": type_, "pos": list(pos), "size": list(size),
                "flags": {}, "order": len(self.nodes), "mode": mode, "inputs": [], "outputs": [],
                "properties": {"Node name for S&R": type_}, "widgets_values": widget_values(d, widgets or {})}
        if title:
            node["title"] = title
        if model_file:
            node["properties"]["models"] = [{"name": model_file, "url": MODELS[model_file][0] + model_file,
                                             "directory": MODELS[model_file][1]}]
        for _, name, spec in ordered_inputs(d):
            if not is_widget(spec):
                node["inputs"].append({"name": name, "type": input_type(spec), "link": None})
        for i, (t, n) in enumerate(zip(d["output"], d["output_name"])):
            node["outputs"].append({"name": n, "type": t, "links": [], "slot_index": i})
        self.nodes.append(node)
        for name, (src, slot) in (inputs or {}).items():
            self.link(src, slot, node, name)
        return node

    def link(self, src, slot, dst, name):
        lid = len(self.links) + 1
        tslot = next(i for i, x in enumerate(dst["inputs"]) if x["name"] == name)
        typ = src["outputs"][slot]["type"]
        self.links.append([lid, src["id"], slot, dst["id"], tslot, typ])
        src["outputs"][slot]["links"].append(lid)
        dst["inputs"][tslot]["link"] = lid

    def ui(self) -> dict:
        for n in self.nodes:
            for o in n["outputs"]:
                o["links"] = o["links"] or None
        # no "ds" in extra: the frontend fits the graph into the window on open (see the module docstring)
        return {"id": "00000000-0000-4000-8000-000000000000", "revision": 0, "last_node_id": len(self.nodes),
                "last_link_id": len(self.links), "nodes": self.nodes, "links": self.links, "groups": [],
                "config": {}, "extra": {}, "version": 0.4}


def widget_values(info: dict, named: dict) -> list:
    """`widgets_values` in slot order: the named values, else each input's default (the frontend's own fill)."""
    from comfy_harness import combo_values, input_options, widget_slots

    specs = {name: spec for sec in ("required", "optional") for name, spec in info["input"].get(sec, {}).items()}
    unknown = set(named) - set(specs)
    if unknown:
        raise KeyError(f"{info['name']} has no widget {sorted(unknown)}")
    out = []
    for name, role in widget_slots(info):
        if role == "control":
            out.append("randomize")
        elif role == "upload":
            out.append("image")
        elif name in named:
            out.append(named[name])
        else:
            opts = input_options(specs[name])
            out.append(opts["default"] if "default" in opts else combo_values(specs[name])[0])
    return out


def col(*widths: int) -> int:
    """The x of the column after columns of these widths."""
    return sum(w + GAP for w in widths)


IMAGE_Y = 630  # Load Image below the band y 330..600 that the VAE loader's links cross
L, E, R, S, D = (SIZES[k][0] for k in ("loader", "FluxCoreQwen3Encode", "FluxCoreReferenceImageEncode",
                                       "FluxCoreSampler", "FluxCoreVAEDecode"))


def loaders(g: Graph, model_file: str, vae_file: str, variant: str = "auto"):
    klein = "klein" in model_file
    te = g.add("FluxCoreTextEncoderLoader", (0, 0), {"text_encoder": "qwen_3_4b.safetensors"},
               model_file="qwen_3_4b.safetensors")
    m = g.add("FluxCoreKleinModelLoader" if klein else "FluxCoreZImageModelLoader", (0, 280),
              {"model_name": model_file, "variant": variant}, model_file=model_file)
    vae = g.add("FluxCoreVAELoader", (0, 550), {"vae_name": vae_file}, model_file=vae_file)
    return te, m, vae


def encode(g: Graph, te, m, prompt: str, negative: str = ""):
    return g.add("FluxCoreQwen3Encode", (col(L), 0), {"prompt": prompt, "negative_prompt": negative},
                 {"text_encoder": (te, 0), "model": (m, 0)})


def finish(g: Graph, m, pos, neg, vae, sampler: dict, prefix: str, x: int):
    s = g.add("FluxCoreSampler", (x, 0), {"seed": SEED, "batch_size": 1, **sampler},
              {"model": (m, 0), "positive": pos, **({"negative": neg} if neg else {})})
    d = g.add("FluxCoreVAEDecode", (x + S + GAP, 0), {}, {"vae": (vae, 0), "samples": (s, 0)})
    g.add("SaveImage", (x + S + GAP + D + GAP, 0), {"filename_prefix": prefix}, {"images": (d, 0)})


# What each sampler shows: the variant's defaults spelled out (klein distilled: 4 steps, no CFG at guidance 1;
# klein base: 50 steps at CFG 4, as Flux2KleinPipeline; Z-Image-Turbo: 8 steps at guidance 0, Z-Image's own
# convention where 0 means no CFG, i.e. ComfyUI's cfg 1.0).
KLEIN = {"steps": 4, "guidance": 1.0, "width": 1024, "height": 1024}
KLEIN_BASE = {"steps": 50, "guidance": 4.0, "width": 1024, "height": 1024}
ZIMAGE_TURBO = {"steps": 8, "guidance": 0.0, "width": 1024, "height": 1024}


def build(info: dict) -> dict[str, dict]:
    out = {}

    g = Graph(info)
    te, m, vae = loaders(g, "flux-2-klein-4b.safetensors", "flux2-vae.safetensors")
    enc = encode(g, te, m, "a red fox sitting in fresh snow at sunrise, soft golden light, shallow depth of field")
    finish(g, m, (enc, 0), None, vae, KLEIN, "fluxcore_klein", col(L, E))
    out["fluxcore_klein_text_to_image"] = g.ui()

    g = Graph(info)
    te, m, vae = loaders(g, "flux-2-klein-4b.safetensors", "flux2-vae.safetensors")
    enc = encode(g, te, m, "Change the color of the bag to deep blue, keep everything else.")
    # the image under the encoder with a free band between them: the VAE's link to the reference encoder runs
    # through that band instead of behind a node
    img = g.add("LoadImage", (col(L), IMAGE_Y), {"image": "fluxcore_reference.png"})
    ref = g.add("FluxCoreReferenceImageEncode", (col(L, E), 380), {},
                {"conditioning": (enc, 0), "vae": (vae, 0), "image": (img, 0)})
    finish(g, m, (ref, 0), None, vae, KLEIN, "fluxcore_klein_edit", col(L, E, R))
    out["fluxcore_klein_edit"] = g.ui()

    g = Graph(info)
    te, m, vae = loaders(g, "flux-2-klein-4b.safetensors", "flux2-vae.safetensors")
    enc = encode(g, te, m, "The person from the first image wearing the jacket from the second image, standing "
                           "in a city street.")
    img1 = g.add("LoadImage", (col(L), IMAGE_Y), {"image": "fluxcore_reference.png"}, title="Reference 1")
    img2 = g.add("LoadImage", (col(L), IMAGE_Y + 370), {"image": "fluxcore_reference_2.png"}, title="Reference 2")
    # the second encoder one column right of the first and lower: its conditioning link runs forward, visible
    ref1 = g.add("FluxCoreReferenceImageEncode", (col(L, E), 380), {},
                 {"conditioning": (enc, 0), "vae": (vae, 0), "image": (img1, 0)})
    ref2 = g.add("FluxCoreReferenceImageEncode", (col(L, E, R), 520), {},
                 {"conditioning": (ref1, 0), "vae": (vae, 0), "image": (img2, 0)})
    finish(g, m, (ref2, 0), None, vae, KLEIN, "fluxcore_klein_multiref", col(L, E, R, R))
    out["fluxcore_klein_multi_reference"] = g.ui()

    g = Graph(info)
    te, m, vae = loaders(g, "flux-2-klein-base-4b.safetensors", "flux2-vae.safetensors", variant="base")
    enc = encode(g, te, m, "a watercolor painting of a lighthouse on a cliff, stormy sea",
                 "blurry, low quality, watermark")
    finish(g, m, (enc, 0), (enc, 1), vae, KLEIN_BASE, "fluxcore_klein_base", col(L, E))
    out["fluxcore_klein_base_cfg"] = g.ui()

    g = Graph(info)
    te, m, vae = loaders(g, "z_image_turbo_bf16.safetensors", "ae.safetensors")
    enc = encode(g, te, m, "a cozy reading nook by a rainy window, warm lamp light, photorealistic")
    finish(g, m, (enc, 0), None, vae, ZIMAGE_TURBO, "fluxcore_zimage", col(L, E))
    out["fluxcore_zimage_turbo_text_to_image"] = g.ui()

    g = Graph(info)   # two chained LoRA Loader nodes: the encode and the sampler take the LoRA'd model
    te, m, vae = loaders(g, "flux-2-klein-4b.safetensors", "flux2-vae.safetensors")
    l1 = g.add("FluxCoreLoraLoader", (col(L), 250), {"lora_name": "klein_style_lora.safetensors", "strength": 0.8},
               {"model": (m, 0)}, title="LoRA 1 (any klein-4B LoRA in models/loras)")
    # each chained LoRA node one column further right: links run forward, never behind a node
    l2 = g.add("FluxCoreLoraLoader", (col(L, L), 400), {"lora_name": "klein_detail_lora.safetensors",
                                                        "strength": 0.5},
               {"model": (l1, 0)}, title="LoRA 2 (chain as many as you like)")
    enc = g.add("FluxCoreQwen3Encode", (col(L, L, L), 0), {"prompt": "a red fox sitting in fresh snow at sunrise, "
                                                                     "in the LoRA's style"},
                {"text_encoder": (te, 0), "model": (l2, 0)})
    finish(g, l2, (enc, 0), None, vae, KLEIN, "fluxcore_klein_lora", col(L, L, L, E))
    out["fluxcore_klein_lora"] = g.ui()

    g = Graph(info)
    te, m, vae = loaders(g, "z_image_turbo_bf16.safetensors", "ae.safetensors")
    lz = g.add("FluxCoreLoraLoader", (col(L), 250), {"lora_name": "zimage_style_lora.safetensors", "strength": 1.0},
               {"model": (m, 0)}, title="LoRA (any Z-Image LoRA in models/loras)")
    enc = g.add("FluxCoreQwen3Encode", (col(L, L), 0), {"prompt": "a cozy reading nook by a rainy window, in the "
                                                                  "LoRA's style"},
                {"text_encoder": (te, 0), "model": (lz, 0)})
    finish(g, lz, (enc, 0), None, vae, ZIMAGE_TURBO, "fluxcore_zimage_lora", col(L, L, E))
    out["fluxcore_zimage_lora"] = g.ui()
    return out


def main() -> None:
    import nodes
    from comfy_harness import object_info, ui_to_api

    from flux_core.demo import write_demo_checkpoints
    from lora_fixtures import write_demo_loras
    from nodes import host

    import tempfile

    paths = write_demo_checkpoints(Path(tempfile.mkdtemp()) / "models")   # so the combos list the picked files
    write_demo_loras(paths)
    host.set_model_roots([paths["klein"].parents[1]])
    info = object_info(nodes.NODE_CLASS_MAPPINGS, nodes.NODE_DISPLAY_NAME_MAPPINGS)
    folder = ROOT / "workflows"
    (folder / "api").mkdir(parents=True, exist_ok=True)
    for name, wf in build(info).items():
        (folder / f"{name}.json").write_text(json.dumps(wf, indent=2) + "\n")
        (folder / "api" / f"{name}.json").write_text(json.dumps(ui_to_api(wf, info), indent=2) + "\n")
        print("wrote", name)


if __name__ == "__main__":
    main()
